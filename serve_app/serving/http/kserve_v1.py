"""KServe's V1 protocol: `POST /v1/models/{name}:predict` and the model status route."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from serve_app.model.predictor import PREDICT
from serve_app.protocol import columns, kserve_v1
from serve_app.serving.http.endpoint import Endpoint, InferenceBackend, answered_by, json_body, json_response, sticky_key
from serve_app.serving.ledger import RequestRecord


def endpoints(backend: InferenceBackend) -> list[Endpoint]:
    limit = backend.settings.max_body_bytes

    async def predict(request: Request, record: RequestRecord) -> Response:
        body = await json_body(request, limit)
        predictor = await backend.versions.resolve(None, request.path_params["name"], sticky_key(backend, request))
        # Records (`instances`) or columnar `inputs` for a typed model; rows of numbers otherwise.
        rows = columns.decode_kserve_v1(body, predictor.schema) if predictor.typed else kserve_v1.decode_request(body)
        result = await backend.infer_with(predictor, rows, (PREDICT,), record)
        payload = {"predictions": result.outputs[PREDICT], "model_name": result.model, "model_version": result.version}
        return json_response(payload, headers=answered_by(result.model, result.version))

    async def model(request: Request, record: RequestRecord) -> Response:
        predictor = backend.versions.loaded_predictor(None, request.path_params["name"])  # open: memory only
        return json_response({"name": predictor.name, "ready": True, "version": predictor.version})

    return [
        Endpoint("/v1/models/{name}:predict", predict, ("POST",)),
        Endpoint("/v1/models/{name}", model, ("GET",), private=False),
    ]
