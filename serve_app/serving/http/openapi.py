"""The OpenAPI 3 document served at /openapi.json; a test checks it against the routes."""

from __future__ import annotations

from typing import Any

from serve_app.model.schema import Column, InputSchema
from serve_app.serving.http.monitoring import openapi_paths as monitoring_openapi_paths

NUMBER_ROWS = {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": {"type": "number"}}}
LABEL = {"oneOf": [{"type": "number"}, {"type": "string"}]}
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "What was wrong and what is expected."}},
}
V2_DATATYPES = ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
JSON_TYPES = {"number": "number", "integer": "integer", "boolean": "boolean", "string": "string"}


def column_schema(column: Column) -> dict[str, Any]:
    """One column of a record, as JSON Schema: its type, null where allowed, and the known
    categories where an unknown one is refused."""
    schema: dict[str, Any] = {"type": JSON_TYPES[column.kind]}
    if column.nullable:
        schema["nullable"] = True
    if column.categories is not None:
        if column.unknown_categories == "refused":
            schema["enum"] = [*column.categories, *([None] if column.nullable else [])]
        else:
            schema["description"] = "seen in training: " + ", ".join(column.categories) + " (others are accepted)"
    return schema


def record_schema(schema: InputSchema) -> dict[str, Any]:
    return {
        "type": "object",
        "required": schema.names,
        "additionalProperties": False,
        "properties": {column.name: column_schema(column) for column in schema.columns},
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Body is not valid JSON or binary framing is broken.",
        401: "Missing or wrong API key.",
        404: "Unknown model, version or alias.",
        413: "Body or row count over the limit.",
        415: "Content-Type is not JSON.",
        422: "Valid JSON, but not a valid request for this model.",
        503: "Over capacity (max_queued_requests reached): retry after the Retry-After header's seconds.",
    }
    # Ray Serve itself sheds load before the request reaches our app: its 503 is plain text.
    shed = {"text/plain": {"schema": {"type": "string"}}}
    return {
        str(s): {"description": text[s], "content": shed if s == 503 else _json({"$ref": "#/components/schemas/Error"})}
        for s in statuses
    }


def _get(summary: str, schema: dict[str, Any], *errors: int) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": "OK", "content": _json(schema)}, **_errors(*errors)}}}


def _post(summary: str, request: dict[str, Any], response: dict[str, Any], *errors: int, binary: bool = False) -> dict[str, Any]:
    content = _json(request)
    ok: dict[str, Any] = {"description": "OK", "content": _json(response)}
    if binary:
        content["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary"},
            "description": "Triton binary tensor extension: JSON header of Inference-Header-Content-Length bytes, then tensor bytes.",
        }
        ok["content"]["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": content},
            "responses": {"200": ok, **_errors(*errors)},
        }
    }


NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}


def _with(params: list[dict[str, Any]], item: dict[str, Any]) -> dict[str, Any]:
    return {"parameters": params, **item}


def openapi_document(model: str, schema: InputSchema | None = None) -> dict[str, Any]:
    """The document for the model the replica serves by default: with `schema` of named,
    typed columns, requests are records of those columns (and V2 one input per column)."""
    typed = schema is not None and not schema.all_numeric
    v2_tensor_in = {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": V2_DATATYPES + (["BOOL", "BYTES"] if typed else [])},
            "data": {"type": "array"},
            "parameters": {"type": "object"},
        },
    }
    v2_request = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "minItems": 1, "maxItems": len(schema.columns) if typed and schema else 1,
                       "items": {"$ref": "#/components/schemas/V2Tensor"}},
            "outputs": {
                "type": "array",
                "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "enum": ["predict", "predict_proba"]}, "parameters": {"type": "object"}}},
            },
            "parameters": {"type": "object"},
        },
    }
    v2_response = {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"]}},
        },
    }
    v2_model = {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {"name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}}, "platform": {"type": "string"}, "inputs": {"type": "array"}, "outputs": {"type": "array"}},
    }
    ready = {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}, "name": {"type": "string"}, "version": {"type": "string"}}}
    predict_request = {
        "type": "object",
        "required": ["features"],
        "properties": {"features": {"oneOf": [{"type": "array", "minItems": 1, "items": {"type": "number"}}, NUMBER_ROWS]}},
    }
    predict_response = {
        "type": "object",
        "properties": {
            "prediction": LABEL,
            "predictions": {"type": "array", "items": LABEL},
            "model": {"type": "string"},
            "version": {"type": "string"},
        },
    }
    v1_request: dict[str, Any] = {"type": "object", "required": ["instances"], "properties": {"instances": NUMBER_ROWS}}
    components: dict[str, Any] = {}
    if typed and schema is not None:
        record = {"$ref": "#/components/schemas/Record"}
        components["Record"] = record_schema(schema)
        predict_request["properties"] = {"features": {"oneOf": [record, {"type": "array", "minItems": 1, "items": record}]}}
        columnar = {"type": "object", "required": schema.names, "additionalProperties": False,
                    "properties": {c.name: {"type": "array", "minItems": 1, "items": column_schema(c)} for c in schema.columns}}
        v1_request = {"type": "object", "oneOf": [
            {"required": ["instances"], "properties": {"instances": {"type": "array", "minItems": 1, "items": record}}},
            {"required": ["inputs"], "properties": {"inputs": columnar}},
        ]}
    v1_response = {"type": "object", "required": ["predictions"], "properties": {"predictions": {"type": "array", "items": LABEL}, "model_name": {"type": "string"}, "model_version": {"type": "string"}}}
    infer = _post("Infer (Open Inference Protocol V2)", {"$ref": "#/components/schemas/V2Request"}, {"$ref": "#/components/schemas/V2Response"}, 400, 401, 404, 413, 415, 422, 503, binary=True)
    return {
        "openapi": "3.0.3",
        "info": {"title": "serve_app", "version": "1", "description": f"Predictions from the scikit-learn model {model!r}."},
        "paths": {
            "/predict": _post("Predict (serve_app's JSON API)", {"$ref": "#/components/schemas/PredictRequest"},
                              {"$ref": "#/components/schemas/PredictResponse"}, 400, 401, 404, 413, 415, 422, 503),
            "/predict/stream": {
                "post": {
                    "summary": "Stream predictions: NDJSON rows in (chunked), NDJSON predictions out as each line arrives",
                    "requestBody": {"required": True, "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                    "responses": {
                        "200": {"description": "One JSON line per input line: a prediction, or an error naming the line", "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                        **_errors(400, 401, 404, 413, 415, 422, 503),
                    },
                }
            },
            "/v1/models/{name}:predict": _with([NAME], _post("Predict (KServe V1)", v1_request, v1_response, 400, 401, 404, 413, 415, 422, 503)),
            "/v1/models/{name}": _with([NAME], _get("Model status (KServe V1)", ready, 404)),
            "/v2": _get("Server metadata", {"type": "object"}),
            "/v2/health/live": _get("Liveness", {"type": "object", "properties": {"live": {"type": "boolean"}}}),
            "/v2/health/ready": _get("Readiness", ready, 404),
            "/v2/models/{name}": _with([NAME], _get("Model metadata", {"$ref": "#/components/schemas/V2Model"}, 404)),
            "/v2/models/{name}/ready": _with([NAME], _get("Model readiness", ready, 404)),
            "/v2/models/{name}/infer": _with([NAME], infer),
            "/v2/models/{name}/versions/{version}": _with([NAME, VERSION], _get("Model version metadata", {"$ref": "#/components/schemas/V2Model"}, 404)),
            "/v2/models/{name}/versions/{version}/ready": _with([NAME, VERSION], _get("Model version readiness", ready, 404)),
            "/v2/models/{name}/versions/{version}/infer": _with([NAME, VERSION], infer),
            "/admin/status": _get("What the replica that answers serves: versions, routing, traffic, batch settings", {"type": "object"}, 401),
            "/openapi.json": _get("This document", {"type": "object"}),
            **monitoring_openapi_paths(),
        },
        "components": {
            "schemas": {
                "Error": ERROR,
                "PredictRequest": predict_request,
                "PredictResponse": predict_response,
                "V2Tensor": v2_tensor_in,
                "V2Request": v2_request,
                "V2Response": v2_response,
                "V2Model": v2_model,
                **components,
            }
        },
    }
