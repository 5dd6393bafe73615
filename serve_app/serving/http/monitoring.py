"""HTTP for monitoring: request metrics on every route, and the monitoring endpoints.

    POST /feedback                      {"request_id": "...", "label": 0}  (or "labels": [...],
    POST /v2/models/{name}/feedback      or a list of such objects) -> joined with the prediction
    GET  /v2/models/{name}/drift        ok / warning / drift per feature, over all replicas
    GET  /v2/models/{name}/accuracy     live accuracy per version over the last labelled rows
    GET  /v2/models/{name}/monitoring   all of it plus traffic, for `serve-app report`
    GET  /dashboard                     the same as an HTML page with plots

`observe_routes` wraps each route so every answer (200 or 4xx/5xx alike) is counted by
route template, model, version and status, and timed. The `x-request-id` that /feedback
takes is Ray Serve's request id: the client's header if it sent one, else one Serve made;
Ray Serve itself echoes it in every answer (through its proxy and with HAProxy alike).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from serve_app.protocol import codec
from serve_app.errors import InvalidInput, NotFound
from serve_app.monitoring.monitor import Monitor

MAX_FEEDBACK_ITEMS = 10_000
FEEDBACK_EXAMPLE = '{"request_id": "<x-request-id of the prediction>", "label": 0}'
Handler = Callable[[Request], Awaitable[Response]]


def observe_routes(routes: list[Route], backend: Any) -> list[Route]:
    """The same routes, each counted and timed by the backend's monitor (if it has one)."""
    default_model = getattr(getattr(backend, "settings", None), "model", "")

    def observed(handler: Handler, template: str) -> Handler:
        async def wrapped(request: Request) -> Response:
            started = time.perf_counter()
            response = await handler(request)
            monitor: Monitor | None = getattr(backend, "monitor", None)
            if monitor is not None:
                headers = response.headers
                monitor.observe_http(
                    template, headers.get("x-model-name", default_model), headers.get("x-model-version", ""),
                    response.status_code, time.perf_counter() - started,
                )
            return response

        return wrapped

    return [Route(r.path, observed(r.endpoint, r.path), methods=r.methods, name=r.name) for r in routes]


def decode_feedback(body: bytes) -> list[dict[str, Any]]:
    """`{"request_id", "label"|"labels"}` or a list of them -> [{"request_id", "labels": [...]}]."""
    if not body:
        raise InvalidInput(f"request body is empty; expected JSON such as {FEEDBACK_EXAMPLE}")
    payload = codec.loads(body)
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise InvalidInput(f"no feedback given; expected an object such as {FEEDBACK_EXAMPLE} or a list of them")
    if len(items) > MAX_FEEDBACK_ITEMS:
        raise InvalidInput(f"{len(items)} feedback items in one request; the limit is {MAX_FEEDBACK_ITEMS}")
    decoded = []
    for index, item in enumerate(items):
        where = f"item {index}" if isinstance(payload, list) else "the body"
        if not isinstance(item, dict):
            raise InvalidInput(f"{where} is {type(item).__name__}; expected an object such as {FEEDBACK_EXAMPLE}")
        unknown = set(item) - {"request_id", "label", "labels"}
        if unknown:
            raise InvalidInput(f"{where}: unknown key(s) {sorted(unknown)}; allowed: request_id, label, labels")
        request_id = item.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidInput(f"{where}: 'request_id' must be the x-request-id header of the prediction's answer")
        if ("label" in item) == ("labels" in item):
            raise InvalidInput(f"{where}: give 'label' (one row) or 'labels' (one per row), not {'both' if 'label' in item else 'neither'}")
        labels = item["labels"] if "labels" in item else [item["label"]]
        if not isinstance(labels, list) or not labels:
            raise InvalidInput(f"{where}: 'labels' must be a non-empty list, one label per row of the request")
        for label in labels:
            if isinstance(label, bool) or not isinstance(label, (int, float, str)):
                raise InvalidInput(f"{where}: labels must be numbers or strings, got {label!r}")
        decoded.append({"request_id": request_id, "labels": labels})
    return decoded


def monitoring_routes(backend: Any, endpoint: Callable[[Handler], Handler], read_json: Callable[[Request], Awaitable[bytes]]) -> list[Route]:
    def monitor_of(request: Request) -> Monitor:
        name = request.path_params.get("name")
        if name is not None:
            backend.versions.check_model(name)  # an unknown model is a 404
        monitor: Monitor | None = getattr(backend, "monitor", None)
        if monitor is None or monitor.hub is None:
            raise NotFound("monitoring is disabled in this application's config (args.monitoring.enabled)")
        return monitor

    async def from_hub(monitor: Monitor, method: str, *args: Any) -> Any:
        # This replica's latest rows first, so the answer includes what it just served.
        await asyncio.to_thread(monitor.flush)
        assert monitor.hub is not None
        return await monitor.hub.call(method, *args)

    async def feedback(request: Request) -> Response:
        monitor = monitor_of(request)
        items = decode_feedback(await read_json(request))
        result = await from_hub(monitor, "feedback", items)
        return codec_response(result)

    async def drift(request: Request) -> Response:
        monitor = monitor_of(request)
        return codec_response(await from_hub(monitor, "drift", backend.versions.name))

    async def accuracy(request: Request) -> Response:
        monitor = monitor_of(request)
        return codec_response(await from_hub(monitor, "accuracy", backend.versions.name))

    async def summary_of(request: Request) -> dict[str, Any]:
        monitor = monitor_of(request)
        summary: dict[str, Any] = await from_hub(monitor, "summary", backend.versions.name)
        summary["replica"] = {"id": monitor.replica, **monitor.stats()}
        return summary

    async def monitoring(request: Request) -> Response:
        return codec_response(await summary_of(request))

    async def dashboard(request: Request) -> Response:
        from serve_app.ops.report import render_html

        summary = await summary_of(request)
        page = await asyncio.to_thread(render_html, summary, str(request.base_url).rstrip("/"))
        return HTMLResponse(page)

    return [
        Route("/feedback", endpoint(feedback), methods=["POST"]),
        Route("/v2/models/{name}/feedback", endpoint(feedback), methods=["POST"]),
        Route("/v2/models/{name}/drift", endpoint(drift), methods=["GET"]),
        Route("/v2/models/{name}/accuracy", endpoint(accuracy), methods=["GET"]),
        Route("/v2/models/{name}/monitoring", endpoint(monitoring), methods=["GET"]),
        Route("/dashboard", endpoint(dashboard), methods=["GET"]),
    ]


def codec_response(payload: Any) -> Response:
    return Response(codec.dumps(payload), media_type="application/json")


def openapi_paths() -> dict[str, Any]:
    """The monitoring routes' entries for /openapi.json."""
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    label = {"oneOf": [{"type": "number"}, {"type": "string"}]}
    item = {
        "type": "object",
        "required": ["request_id"],
        "properties": {
            "request_id": {"type": "string", "description": "The x-request-id header of the prediction's answer."},
            "label": label,
            "labels": {"type": "array", "items": label, "description": "One true label per row of the request."},
        },
    }
    feedback = {
        "post": {
            "summary": "True labels for earlier predictions (live accuracy)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [item, {"type": "array", "items": item}]}}}},
            "responses": {
                "200": {"description": "joined: scored now; pending: its prediction is not at the hub yet; rejected: why not",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                "400": {"description": "Body is not valid JSON.", **error},
                "404": {"description": "Unknown model, or monitoring disabled.", **error},
                "422": {"description": "Not a valid feedback object.", **error},
            },
        }
    }

    def get(summary: str, media: str = "application/json") -> dict[str, Any]:
        return {"get": {"summary": summary, "responses": {
            "200": {"description": "OK", "content": {media: {"schema": {"type": "object" if media.endswith("json") else "string"}}}},
            "404": {"description": "Unknown model, or monitoring disabled.", **error},
        }}}

    return {
        "/feedback": feedback,
        "/v2/models/{name}/feedback": {"parameters": [name], **feedback},
        "/v2/models/{name}/drift": {"parameters": [name], **get("Data drift per feature (PSI, KS) over all replicas' recent inputs")},
        "/v2/models/{name}/accuracy": {"parameters": [name], **get("Live accuracy per version from /feedback")},
        "/v2/models/{name}/monitoring": {"parameters": [name], **get("Traffic, latency, class mix, drift and accuracy")},
        "/dashboard": get("The monitoring summary as an HTML page", "text/html"),
    }
