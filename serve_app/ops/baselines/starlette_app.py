"""A hand-written one-worker uvicorn + Starlette server: the baseline serve_app must beat.

What an engineer would write without Ray: one route, the JSON body decoded by Starlette
(`request.json()`, stdlib json), the model's own `predict` (sklearn, with its input
validation), a JSONResponse. It takes the seed's contract, one row or a list of rows:

    {"features": [5.1, 3.5, 1.4, 0.2]}            -> {"prediction": 0}
    {"features": [[5.1, 3.5, 1.4, 0.2], ...]}     -> {"predictions": [0, ...]}

uvicorn uses uvloop and httptools when installed (they are, with uvicorn's usual extras),
one worker, no access log (serve_app runs with its access log off too):

    python -m serve_app.ops.baselines.starlette_app --model models/iris/1/model.skops --port 8001
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serve_app.model import formats as artefacts


def build(model_path: str) -> Starlette:
    model = artefacts.load(Path(model_path), "skops" if model_path.endswith(".skops") else "joblib")

    async def predict(request: Request) -> JSONResponse:
        try:
            features = (await request.json())["features"]
            rows = np.asarray(features, dtype=np.float64)
            single = rows.ndim == 1
            labels = model.predict(rows.reshape(1, -1) if single else rows).tolist()
        except Exception as exc:  # a bad request, not a server error
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"prediction": labels[0]} if single else {"predictions": labels})

    return Starlette(routes=[Route("/predict", predict, methods=["POST"])])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a stored model file (.skops or .joblib)")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(build(args.model), host="127.0.0.1", port=args.port, workers=1, access_log=False, log_level="warning")
