"""HTTP for monitoring: the feedback, drift, accuracy and dashboard endpoints.

    POST /feedback                      {"request_id": "...", "label": 0}  (or "labels": [...],
    POST /v2/models/{name}/feedback      or a list of such objects) -> joined with the prediction
    GET  /v2/models/{name}/drift        ok / warning / drift per feature, over all replicas (for
                                         typed models per column: numeric PSI/KS, categorical
                                         PSI, unseen and null shares, top categories)
    GET  /v2/models/{name}/accuracy     live accuracy per version over the last labelled rows
    GET  /v2/models/{name}/monitoring   all of it plus traffic, for `serve-app report`
    GET  /dashboard                     the same as an HTML page with plots

Every route's requests are counted and timed by the one route wrapper
(serving/http/endpoint.py) in the replica's ledger (serving/ledger.py). The `x-request-id`
that /feedback takes is Ray Serve's request id: the client's header if it sent one, else one Serve made;
Ray Serve itself echoes it in every answer (through its proxy and with HAProxy alike).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from serve_app.protocol.json import loads
from serve_app.errors import InvalidInput, NotFound
from serve_app.monitoring.monitor import Monitor
from serve_app.serving.http.endpoint import Endpoint, InferenceBackend, json_body, json_response
from serve_app.serving.ledger import RequestRecord

MAX_FEEDBACK_ITEMS = 10_000
FEEDBACK_EXAMPLE = '{"request_id": "<x-request-id of the prediction>", "label": 0}'


def decode_feedback(body: bytes) -> list[dict[str, Any]]:
    """`{"request_id", "label"|"labels"}` or a list of them -> [{"request_id", "labels": [...]}]."""
    if not body:
        raise InvalidInput(f"request body is empty; expected JSON such as {FEEDBACK_EXAMPLE}")
    payload = loads(body)
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


def endpoints(backend: InferenceBackend) -> list[Endpoint]:
    limit = backend.settings.max_body_bytes

    def monitor_of(request: Request) -> Monitor:
        name = request.path_params.get("name")
        if name is not None:
            backend.versions.check_model(name)  # an unknown model is a 404
        monitor: Monitor | None = backend.monitor
        if monitor is None or monitor.hub is None:
            raise NotFound("monitoring is disabled in this application's config (args.monitoring.enabled)")
        return monitor

    async def from_hub(monitor: Monitor, method: str, *args: Any) -> Any:
        # This replica's latest rows first, so the answer includes what it just served.
        await asyncio.to_thread(monitor.flush)
        assert monitor.hub is not None
        return await monitor.hub.call(method, *args)

    async def feedback(request: Request, record: RequestRecord) -> Response:
        monitor = monitor_of(request)
        items = decode_feedback(await json_body(request, limit))
        result = await from_hub(monitor, "feedback", items)
        return json_response(result)

    async def drift(request: Request, record: RequestRecord) -> Response:
        monitor = monitor_of(request)
        return json_response(await from_hub(monitor, "drift", backend.versions.name))

    async def accuracy(request: Request, record: RequestRecord) -> Response:
        monitor = monitor_of(request)
        return json_response(await from_hub(monitor, "accuracy", backend.versions.name))

    async def summary_of(request: Request) -> dict[str, Any]:
        monitor = monitor_of(request)
        summary: dict[str, Any] = await from_hub(monitor, "summary", backend.versions.name)
        summary["replica"] = {"id": monitor.replica, **monitor.stats()}
        return summary

    async def monitoring(request: Request, record: RequestRecord) -> Response:
        return json_response(await summary_of(request))

    async def dashboard(request: Request, record: RequestRecord) -> Response:
        from serve_app.monitoring.dashboard import render_html

        summary = await summary_of(request)
        page = await asyncio.to_thread(render_html, summary, str(request.base_url).rstrip("/"))
        return HTMLResponse(page)

    return [
        Endpoint("/feedback", feedback, ("POST",)),
        Endpoint("/v2/models/{name}/feedback", feedback, ("POST",)),
        Endpoint("/v2/models/{name}/drift", drift, ("GET",)),
        Endpoint("/v2/models/{name}/accuracy", accuracy, ("GET",)),
        Endpoint("/v2/models/{name}/monitoring", monitoring, ("GET",)),
        Endpoint("/dashboard", dashboard, ("GET",)),
    ]


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
        "/v2/models/{name}/drift": {"parameters": [name], **get("Data drift per feature over all replicas' recent inputs: PSI and KS for numeric columns; PSI over categories, the share of unseen categories and the training vs recent share of the top categories for string and boolean columns")},
        "/v2/models/{name}/accuracy": {"parameters": [name], **get("Live accuracy per version from /feedback")},
        "/v2/models/{name}/monitoring": {"parameters": [name], **get("Traffic, latency, class mix, drift and accuracy")},
        "/dashboard": get("The monitoring summary as an HTML page", "text/html"),
    }
