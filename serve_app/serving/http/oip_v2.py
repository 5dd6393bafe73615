"""The Open Inference Protocol V2 (KServe V2, Triton): health, metadata and infer routes.

`/v2/models/{name}/infer` takes tensors as JSON or in Triton's binary extension and
answers in the form asked for; `.../versions/{version}/...` names a version.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from starlette.requests import Request
from starlette.responses import Response

from serve_app.errors import InvalidInput
from serve_app.model.predictor import PREDICT, PREDICT_PROBA, Predictor
from serve_app.protocol import columns, oip_v2
from serve_app.protocol.json import loads
from serve_app.serving.http.endpoint import (
    JSON, Endpoint, InferenceBackend, answered_by, json_body, json_response, read_body, sticky_key,
)
from serve_app.serving.ledger import RequestRecord


def endpoints(backend: InferenceBackend) -> list[Endpoint]:
    limit = backend.settings.max_body_bytes

    async def server_metadata(request: Request, record: RequestRecord) -> Response:
        return json_response({"name": "serve_app", "version": _package_version(), "extensions": ["binary_tensor_data"]})

    async def live(request: Request, record: RequestRecord) -> Response:
        return json_response({"live": True})

    async def ready(request: Request, record: RequestRecord) -> Response:
        backend.versions.default  # raises NotFound (404) until a model is loaded
        return json_response({"ready": True})

    async def predictor_of(request: Request) -> Predictor:
        version = request.path_params.get("version")
        return await backend.versions.resolve(version, request.path_params["name"], None if version else sticky_key(backend, request))

    async def model_metadata(request: Request, record: RequestRecord) -> Response:
        return json_response(metadata(await predictor_of(request), backend.versions.catalog.versions))

    async def model_ready(request: Request, record: RequestRecord) -> Response:
        # A probe, open without the API key: it answers from versions already loaded here
        # and never loads one from disk, so an unauthenticated caller cannot make a replica
        # read (or learn about) stored versions.
        predictor = backend.versions.loaded_predictor(request.path_params.get("version"), request.path_params["name"])
        return json_response({"name": predictor.name, "version": predictor.version, "ready": True})

    async def infer(request: Request, record: RequestRecord) -> Response:
        predictor = await predictor_of(request)  # an unknown model or version is a 404 first
        header_length = request.headers.get(oip_v2.BINARY_HEADER)
        body = await (json_body(request, limit) if header_length is None else read_body(request, limit))
        # One named input per column for a typed model; one 2-D tensor of numbers otherwise,
        # or for an all-numeric model also one named input per feature (tritonclient's habit).
        decoded: Any = columns.decode_v2(body, predictor.schema, header_length) if predictor.typed else _numeric_request(body, header_length, predictor)
        rows = decoded.table if isinstance(decoded, columns.NamedInferRequest) else decoded.rows
        requested = decoded.outputs
        if requested is None:  # the spec: no outputs named means all of them
            requested = tuple(oip_v2.RequestedOutput(name, decoded.binary_default) for name in predictor.outputs)
        # The version chosen above (canary split included) is the one that answers.
        result = await backend.infer_with(predictor, rows, [output.name for output in requested], record)
        head: dict[str, Any] = {"model_name": result.model, "model_version": result.version}
        if decoded.id is not None:
            head["id"] = decoded.id
        body_out, header_len = oip_v2.encode_response(head, [(o.name, result.outputs[o.name], o.binary) for o in requested])
        headers = answered_by(result.model, result.version)
        if header_len is None:
            return Response(body_out, media_type=JSON, headers=headers)
        headers[oip_v2.BINARY_HEADER] = str(header_len)
        return Response(body_out, media_type=oip_v2.BINARY_CONTENT_TYPE, headers=headers)

    return [
        Endpoint("/v2", server_metadata, ("GET",), private=False),
        Endpoint("/v2/health/live", live, ("GET",), private=False),
        Endpoint("/v2/health/ready", ready, ("GET",), private=False),
        Endpoint("/v2/models/{name}", model_metadata, ("GET",)),
        Endpoint("/v2/models/{name}/ready", model_ready, ("GET",), private=False),
        Endpoint("/v2/models/{name}/infer", infer, ("POST",)),
        Endpoint("/v2/models/{name}/versions/{version}", model_metadata, ("GET",)),
        Endpoint("/v2/models/{name}/versions/{version}/ready", model_ready, ("GET",), private=False),
        Endpoint("/v2/models/{name}/versions/{version}/infer", infer, ("POST",)),
    ]


def metadata(predictor: Predictor, versions: Sequence[str]) -> dict[str, Any]:
    manifest = predictor.manifest
    outputs = [{"name": PREDICT, "datatype": _label_datatype(manifest.classes), "shape": [-1]}]
    if PREDICT_PROBA in predictor.outputs:
        outputs.append({"name": PREDICT_PROBA, "datatype": "FP64", "shape": [-1, len(manifest.classes or [])]})
    return {
        "name": predictor.name,
        "versions": list(versions),
        "platform": "onnxruntime_onnx" if predictor.runtime == "onnxruntime" else "sklearn",
        "inputs": _inputs(predictor),
        "outputs": outputs,
        "parameters": {
            "version": predictor.version,
            "estimator": manifest.estimator,
            "feature_names": manifest.feature_names,
            "classes": manifest.classes,
            "metrics": manifest.metrics,
            "sha256": manifest.sha256,
            "created_at": manifest.created_at,
            # Which runtime answers this version here, and why (publish-time verification or fallback).
            "runtime": predictor.runtime,
            "runtime_reason": predictor.runtime_reason,
            # A typed Pipeline: whether serve_app's numpy encoder or scikit-learn transforms its columns.
            **({"column_encoder": predictor.encoder_reason} if predictor.encoder_reason else {}),
        },
    }


def _numeric_request(body: bytes, header_length: str | None, predictor: Predictor) -> oip_v2.InferRequest:
    """An all-numeric model's request: one [rows, features] tensor, or one named input per
    feature (then decoded column by column and stacked into the same float64 matrix)."""
    try:
        return oip_v2.decode_request(body, header_length)
    except InvalidInput as exc:
        if not str(exc.message).startswith(oip_v2.ONE_TENSOR_ERROR) or predictor.n_features < 2:
            raise
        if not _names_features(body, header_length, predictor):
            raise  # not an attempt at named inputs: the one-tensor form is what to explain
        named = columns.decode_v2(body, predictor.schema, header_length)  # its own error names the column
        matrix = np.column_stack([named.table.columns[name] for name in predictor.schema.names])
        return oip_v2.InferRequest("", matrix, named.outputs, named.binary_default, named.id, named.parameters)


def _names_features(body: bytes, header_length: str | None, predictor: Predictor) -> bool:
    """Whether the request's inputs are named after the model's features (two or more)."""
    json_part, _ = oip_v2.split_body(body, header_length)
    inputs = loads(json_part).get("inputs")
    names = {spec.get("name") for spec in inputs if isinstance(spec, dict)} if isinstance(inputs, list) else set()
    return len(names) > 1 and names <= set(predictor.schema.names)


def _inputs(predictor: Predictor) -> list[dict[str, Any]]:
    """One named input per column for a typed model (its datatype, and its categories where
    they are a closed set); one [-1, n_features] FP64 tensor otherwise."""
    if not predictor.typed:
        return [{"name": "input-0", "datatype": "FP64", "shape": [-1, predictor.n_features]}]
    described = []
    for column in predictor.schema.columns:
        parameters: dict[str, Any] = {"kind": column.kind, "nullable": column.nullable}
        if column.dtype is not None:
            parameters["dtype"] = column.dtype
        if column.categories is not None:
            parameters["categories"] = list(column.categories)
            parameters["unknown_categories"] = column.unknown_categories
        described.append({"name": column.name, "datatype": column.v2_datatype, "shape": [-1], "parameters": parameters})
    return described


def _label_datatype(classes: list[Any] | None) -> str:
    if classes is None:
        return "FP64"
    if all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        return "INT64"
    return "BYTES"


def _package_version() -> str:
    from serve_app import __version__

    return __version__
