"""The one wrapper every route goes through, and what handlers share.

`route(endpoint, backend, guard)` makes a Starlette route that, for every request:

- checks the API key first when the endpoint is private and a key is configured;
- opens the request's `RequestRecord`, which the handler passes to `backend.infer`
  (infer writes the model and version that answer into it, and the rows predicted);
- turns a `ServeAppError` into `{"error": "..."}` with the status it carries, and any
  other exception into a logged JSON 500 that shows no internals;
- finishes the record (status, latency) and hands it to `backend.ledger.record`, once.
  A streamed answer is finished when its body is, not when its headers leave.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Protocol, Sequence

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from serve_app.errors import PayloadTooLarge, ServeAppError
from serve_app.model.predictor import Predictor
from serve_app.protocol import json as wire_json
from serve_app.serving import auth
from serve_app.serving.ledger import RequestLedger, RequestRecord
from serve_app.serving.versions import ModelVersions
from serve_app.settings import AppSettings

logger = logging.getLogger("ray.serve")
JSON = "application/json"
VERSION_HEADER = "x-model-version"
INTERNAL_ERROR = "internal error; the server log has the details"


class InferenceResult(Protocol):
    @property
    def model(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def outputs(self) -> Mapping[str, Any]: ...


class InferenceBackend(Protocol):
    """What the routes use of the deployment (a test can pass any object like it)."""

    settings: AppSettings
    versions: ModelVersions
    ledger: RequestLedger
    monitor: Any  # the replica's Monitor, or None when monitoring is off

    async def infer_with(
        self, predictor: Predictor, rows: Any, outputs: Sequence[str], request: RequestRecord
    ) -> InferenceResult: ...

    def status(self) -> dict[str, Any]: ...


Handler = Callable[[Request, RequestRecord], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    path: str
    handler: Handler
    methods: tuple[str, ...]
    private: bool = True  # the API key applies (predictions, model details, admin data)


def json_response(payload: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(wire_json.dumps(payload), status_code=status_code, media_type=JSON, headers=headers)


def error_response(exc: ServeAppError) -> Response:
    return json_response({"error": exc.message}, exc.status_code, getattr(exc, "headers", None))


def answered_by(model: str, version: str) -> dict[str, str]:
    """The headers naming the model and version that produced an answer."""
    return {"x-model-name": model, VERSION_HEADER: version}


def sticky_key(backend: InferenceBackend, request: Request) -> str | None:
    """The canary's sticky key, if a canary with a sticky header is configured."""
    routing = backend.versions.routing
    header = routing.sticky_header if routing is not None else None
    return request.headers.get(header) if header else None


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


async def json_body(request: Request, limit: int) -> bytes:
    wire_json.check_json_content_type(request.headers.get("content-type"))
    return await read_body(request, limit)


def route(endpoint: Endpoint, backend: InferenceBackend, guard: auth.Guard | None) -> Route:
    guard = guard if endpoint.private else None
    handler, path = endpoint.handler, endpoint.path

    async def served(request: Request) -> Response:
        record = RequestRecord(path)
        try:
            if guard is not None:
                guard(request)
            response = await handler(request, record)
        except ServeAppError as exc:
            response = error_response(exc)
        except Exception:
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
            response = json_response({"error": INTERNAL_ERROR}, 500)
        if isinstance(response, StreamingResponse):
            response.body_iterator = _recorded_when_done(response.body_iterator, record, response.status_code, backend.ledger)
        else:
            record.finish(response.status_code)
            backend.ledger.record(record)
        return response

    return Route(path, served, methods=list(endpoint.methods))


async def _recorded_when_done(
    body: AsyncIterable[Any], record: RequestRecord, status: int, ledger: RequestLedger
) -> AsyncIterator[Any]:
    try:
        async for chunk in body:
            yield chunk
    finally:  # the body ended, failed, or the client went away: the request is over
        record.finish(status)
        ledger.record(record)
