"""The HTTP API: the seed's `/predict`, KServe V1 and the Open Inference Protocol V2.

Every route decodes with `codec`, runs `backend.infer` (batched with other requests) and
encodes the answer; every failure becomes `{"error": "..."}` with the status its
`ServeAppError` carries. Each answer names the model and version that produced it, in
the body and in the `x-model-name` / `x-model-version` headers.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serve_app.serving import auth

from serve_app.protocol import codec
from serve_app.errors import NotFound, PayloadTooLarge, ServeAppError
from serve_app.serving.http.monitoring import monitoring_routes, observe_routes
from serve_app.serving.http.openapi import openapi_document
from serve_app.model.predictor import PREDICT, Predictor
from serve_app.serving.http.streaming import stream_route

logger = logging.getLogger("ray.serve")
JSON = "application/json"
VERSION_HEADER = "x-model-version"


class InferenceBackend(Protocol):
    """What the routes need from the deployment (a test can pass any object like it)."""

    settings: Any
    service: Any

    async def infer(
        self, rows: Any, outputs: Sequence[str] = ..., version: str | None = ..., model: str | None = ...
    ) -> Any: ...

    def status(self) -> dict[str, Any]: ...


def json_response(payload: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(codec.dumps(payload), status_code=status_code, media_type=JSON, headers=headers)


def error_response(exc: ServeAppError) -> Response:
    return json_response({"error": exc.message}, exc.status_code, getattr(exc, "headers", None))


def _answered_by(model: str, version: str) -> dict[str, str]:
    return {"x-model-name": model, VERSION_HEADER: version}


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} bytes")
    if declared is not None and declared.isascii() and declared.isdigit():
        body = await request.body()
    else:  # chunked: stop reading as soon as the limit is passed
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is {len(body)} bytes; the limit is {limit} bytes")
    return body


Handler = Callable[[Request], Awaitable[Response]]


def endpoint(handler: Handler, guard: auth.Guard | None = None) -> Handler:
    """Turns any error into a JSON answer; a bug is logged and answered with a plain 500.

    `guard` (the API key check, when one is configured) runs before the handler.
    """

    async def wrapped(request: Request) -> Response:
        try:
            if guard is not None:
                guard(request)
            return await handler(request)
        except ServeAppError as exc:
            return error_response(exc)
        except Exception:
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
            return json_response({"error": "internal error; the server log has the details"}, 500)

    return wrapped


def build_http_app(backend: InferenceBackend) -> Starlette:
    settings = backend.settings
    limit = settings.max_body_bytes
    guard = auth.guard_for(settings)  # None unless args name an API key

    def private(handler: Handler) -> Handler:
        """Routes that predict or show model details or admin data: the API key applies."""
        return endpoint(handler, guard)

    async def json_body(request: Request) -> bytes:
        codec.check_json_content_type(request.headers.get("content-type"))
        return await read_body(request, limit)

    # ---- the seed's contract -------------------------------------------------------

    def route_key(request: Request) -> str | None:
        """The canary's sticky key, if a canary with a sticky header is configured."""
        routing = backend.versions.routing
        header = routing.sticky_header if routing is not None else None
        return request.headers.get(header) if header else None

    async def predict(request: Request) -> Response:
        decoded = codec.decode_seed(await json_body(request))
        predictor = await backend.versions.resolve(request.headers.get(VERSION_HEADER), None, route_key(request))
        result = await backend.infer(predictor, decoded.rows, (PREDICT,))
        labels = result.outputs[PREDICT].tolist()
        payload: dict[str, Any] = {"prediction": labels[0]} if decoded.single else {"predictions": labels}
        payload["model"] = result.model
        payload["version"] = result.version
        return json_response(payload, headers=_answered_by(result.model, result.version))

    # ---- KServe V1 -----------------------------------------------------------------

    async def v1_predict(request: Request) -> Response:
        rows = codec.decode_v1(await json_body(request))
        predictor = await backend.versions.resolve(None, request.path_params["name"], route_key(request))
        result = await backend.infer(predictor, rows, (PREDICT,))
        payload = {"predictions": result.outputs[PREDICT], "model_name": result.model, "model_version": result.version}
        return json_response(payload, headers=_answered_by(result.model, result.version))

    async def v1_model(request: Request) -> Response:
        predictor = backend.versions.loaded_predictor(None, request.path_params["name"])  # open: memory only
        return json_response({"name": predictor.name, "ready": True, "version": predictor.version})

    # ---- Open Inference Protocol V2 ------------------------------------------------

    async def v2_server_metadata(request: Request) -> Response:
        return json_response({"name": "serve_app", "version": _package_version(), "extensions": ["binary_tensor_data"]})

    async def v2_live(request: Request) -> Response:
        return json_response({"live": True})

    async def v2_ready(request: Request) -> Response:
        backend.versions.default  # raises NotFound (404) until a model is loaded
        return json_response({"ready": True})

    async def v2_predictor(request: Request) -> Predictor:
        version = request.path_params.get("version")
        return await backend.versions.resolve(version, request.path_params["name"], None if version else route_key(request))

    async def v2_model_metadata(request: Request) -> Response:
        return json_response(v2_metadata(await v2_predictor(request), backend.versions.catalog.versions))

    async def v2_model_ready(request: Request) -> Response:
        # A probe, open without the API key: it answers from versions already loaded here
        # and never loads one from disk, so an unauthenticated caller cannot make a replica
        # read (or learn about) stored versions.
        predictor = backend.versions.loaded_predictor(request.path_params.get("version"), request.path_params["name"])
        return json_response({"name": predictor.name, "version": predictor.version, "ready": True})

    async def v2_infer(request: Request) -> Response:
        predictor = await v2_predictor(request)  # an unknown model or version is a 404 first
        header_length = request.headers.get(codec.BINARY_HEADER)
        if header_length is None:
            body = await json_body(request)
        else:
            body = await read_body(request, limit)
        decoded = codec.decode_v2(body, header_length)
        requested = decoded.outputs
        if requested is None:  # the spec: no outputs named means all of them
            requested = tuple(codec.RequestedOutput(name, decoded.binary_default) for name in predictor.outputs)
        names = [output.name for output in requested]
        # The version chosen above (canary split included) is the one that answers.
        result = await backend.infer(predictor, decoded.rows, names)
        head: dict[str, Any] = {"model_name": result.model, "model_version": result.version}
        if decoded.id is not None:
            head["id"] = decoded.id
        body_out, header_len = codec.encode_v2_response(
            head, [(o.name, result.outputs[o.name], o.binary) for o in requested]
        )
        headers = _answered_by(result.model, result.version)
        if header_len is None:
            return Response(body_out, media_type=JSON, headers=headers)
        headers[codec.BINARY_HEADER] = str(header_len)
        return Response(body_out, media_type=codec.BINARY_CONTENT_TYPE, headers=headers)

    async def admin_status(request: Request) -> Response:
        return json_response(backend.status())

    async def openapi(request: Request) -> Response:
        return json_response(openapi_document(backend.versions.name))

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        if status == 405:
            return json_response({"error": f"method {request.method} is not allowed on {request.url.path}"}, 405)
        return error_response(
            NotFound(f"no route {request.method} {request.url.path}; see /openapi.json for the API")
        )

    routes = [
        Route("/predict", private(predict), methods=["POST"]),
        Route("/predict/stream", private(stream_route(backend)), methods=["POST"]),  # serve_app/serving/http/streaming.py
        Route("/v1/models/{name}:predict", private(v1_predict), methods=["POST"]),
        Route("/v1/models/{name}", endpoint(v1_model), methods=["GET"]),
        Route("/v2", endpoint(v2_server_metadata), methods=["GET"]),
        Route("/v2/health/live", endpoint(v2_live), methods=["GET"]),
        Route("/v2/health/ready", endpoint(v2_ready), methods=["GET"]),
        Route("/v2/models/{name}", private(v2_model_metadata), methods=["GET"]),
        Route("/v2/models/{name}/ready", endpoint(v2_model_ready), methods=["GET"]),
        Route("/v2/models/{name}/infer", private(v2_infer), methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}", private(v2_model_metadata), methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", endpoint(v2_model_ready), methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/infer", private(v2_infer), methods=["POST"]),
        Route("/admin/status", private(admin_status), methods=["GET"]),
        Route("/openapi.json", endpoint(openapi), methods=["GET"]),
    ]
    routes += monitoring_routes(backend, private, json_body)  # /feedback, drift, accuracy, /dashboard
    routes = observe_routes(routes, backend)  # every answer counted and timed, whatever its status
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


def v2_metadata(predictor: Predictor, versions: Sequence[str]) -> dict[str, Any]:
    manifest = predictor.manifest
    outputs = [{"name": PREDICT, "datatype": _label_datatype(manifest.classes), "shape": [-1]}]
    if "predict_proba" in predictor.outputs:
        outputs.append({"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(manifest.classes or [])]})
    return {
        "name": predictor.name,
        "versions": list(versions),
        "platform": "sklearn",
        "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, predictor.n_features]}],
        "outputs": outputs,
        "parameters": {
            "version": predictor.version,
            "estimator": manifest.estimator,
            "feature_names": manifest.feature_names,
            "classes": manifest.classes,
            "metrics": manifest.metrics,
            "sha256": manifest.sha256,
            "created_at": manifest.created_at,
        },
    }


def _label_datatype(classes: list[Any] | None) -> str:
    if classes is None:
        return "FP64"
    if all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        return "INT64"
    return "BYTES"


def _package_version() -> str:
    from serve_app import __version__

    return __version__
