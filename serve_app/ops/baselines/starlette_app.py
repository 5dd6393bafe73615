"""A hand-written one-worker uvicorn + Starlette server: the baseline serve_app must beat.

What an engineer would write without Ray: one route, the JSON body decoded by Starlette
(`request.json()`, stdlib json), the scikit-learn estimator's own `predict` (with its input
validation), a JSONResponse. It takes the seed's contract, one row or a list of rows:

    {"features": [5.1, 3.5, 1.4, 0.2]}            -> {"prediction": 0}
    {"features": [[5.1, 3.5, 1.4, 0.2], ...]}     -> {"predictions": [0, ...]}

The model is read from a store the same safe way serve_app reads it (`load_verified`: the
publisher's signature and the hashes checked, the skops file rebuilt from allowed classes
only); then the scikit-learn estimator is called directly, never a compiled form of it.
uvicorn uses uvloop and httptools when installed (they are, with uvicorn's usual extras),
one worker, no access log (serve_app runs with its access log off too):

    python -m serve_app.ops.baselines.starlette_app --store models --model iris --port 8001
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serve_app.model.store import ModelStore


def build(model: Any) -> Starlette:
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
    parser.add_argument("--store", required=True, help="the model store")
    parser.add_argument("--model", required=True, help="a model name in the store")
    parser.add_argument("--version", default="production", help="version or alias (default: production)")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    estimator, _ = ModelStore(args.store).load_verified(args.model, args.version)
    uvicorn.run(build(estimator), host="127.0.0.1", port=args.port, workers=1, access_log=False, log_level="warning")
