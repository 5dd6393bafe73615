"""The HTTP app of a replica: every protocol's routes, each through the one route wrapper.

One module per protocol turns its wire format into a data-plane call
(`versions.resolve`, then `infer`) and the answer back into its wire format:

    predict.py      serve_app's `/predict` JSON API
    streaming.py    `/predict/stream`: NDJSON rows in, predictions out as they are computed
    kserve_v1.py    KServe V1
    oip_v2.py       the Open Inference Protocol V2 (KServe V2, Triton), JSON and binary
    monitoring.py   feedback, drift, accuracy, the dashboard
    admin.py        `/admin/status`, `/openapi.json`

endpoint.py is the wrapper they all go through: API key, JSON errors with the status a
`ServeAppError` carries, and the request recorded once in the replica's ledger. Each
answer names the model and version that produced it, in the body and in the
`x-model-name` / `x-model-version` headers.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from serve_app.errors import NotFound
from serve_app.serving import auth
from serve_app.serving.http import admin, kserve_v1, monitoring, oip_v2, predict, streaming
from serve_app.serving.http.endpoint import InferenceBackend, error_response, json_response, route

PROTOCOLS = (predict, streaming, kserve_v1, oip_v2, admin, monitoring)


def build_http_app(backend: InferenceBackend) -> Starlette:
    guard = auth.guard_for(backend.settings)  # None unless args name an API key
    routes = [route(endpoint, backend, guard) for protocol in PROTOCOLS for endpoint in protocol.endpoints(backend)]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


async def not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    if status == 405:
        return json_response({"error": f"method {request.method} is not allowed on {request.url.path}"}, 405)
    return error_response(NotFound(f"no route {request.method} {request.url.path}; see /openapi.json for the API"))
