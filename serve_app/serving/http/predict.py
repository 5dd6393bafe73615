"""serve_app's `/predict` JSON API: `{"features": row or rows}` in, labels out.

A model with named, typed columns takes records instead: `{"features": {"col": value}}`
or a list of them (`protocol/columns.py` checks each column)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from serve_app.model.predictor import PREDICT
from serve_app.protocol import columns, predict_api
from serve_app.serving.http.endpoint import (
    VERSION_HEADER, Endpoint, InferenceBackend, answered_by, json_body, json_response, sticky_key,
)
from serve_app.serving.ledger import RequestRecord


def endpoints(backend: InferenceBackend) -> list[Endpoint]:
    limit = backend.settings.max_body_bytes

    async def predict(request: Request, record: RequestRecord) -> Response:
        body = await json_body(request, limit)
        predictor = await backend.versions.resolve(request.headers.get(VERSION_HEADER), None, sticky_key(backend, request))
        # The version that answers decides the format: its columns, or the numeric fast path.
        decoded = columns.decode_predict(body, predictor.schema) if predictor.typed else predict_api.decode_request(body)
        rows = decoded.table if isinstance(decoded, columns.NamedPredictRequest) else decoded.rows
        result = await backend.infer_with(predictor, rows, (PREDICT,), record)
        labels = result.outputs[PREDICT].tolist()
        payload: dict[str, Any] = {"prediction": labels[0]} if decoded.single else {"predictions": labels}
        payload["model"] = result.model
        payload["version"] = result.version
        return json_response(payload, headers=answered_by(result.model, result.version))

    return [Endpoint("/predict", predict, ("POST",))]
