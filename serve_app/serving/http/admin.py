"""`GET /admin/status` (what this replica serves and how it is doing) and `GET /openapi.json`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from serve_app.serving.http.endpoint import Endpoint, InferenceBackend, json_response
from serve_app.errors import ServeAppError
from serve_app.serving.http.openapi import openapi_document
from serve_app.serving.ledger import RequestRecord


def endpoints(backend: InferenceBackend) -> list[Endpoint]:
    async def status(request: Request, record: RequestRecord) -> Response:
        return json_response(backend.status())

    async def openapi(request: Request, record: RequestRecord) -> Response:
        try:  # the default version's columns; the generic document until one is loaded
            schema = backend.versions.default.schema
        except ServeAppError:
            schema = None
        return json_response(openapi_document(backend.versions.name, schema))

    return [
        Endpoint("/admin/status", status, ("GET",)),
        Endpoint("/openapi.json", openapi, ("GET",), private=False),
    ]
