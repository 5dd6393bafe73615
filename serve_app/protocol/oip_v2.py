"""The Open Inference Protocol V2 (KServe V2, Triton), server side: infer requests in, responses out.

Both forms are handled: tensors as JSON `data`, and Triton's binary tensor extension, where
a JSON header of `inference-header-content-length` bytes is followed by the raw tensors.
Binary tensors are read in place from the request body (`np.frombuffer`, no copy) and written
out with one copy, into the response body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from serve_app.errors import BadRequest, InvalidInput
from serve_app.protocol.json import dumps, has_float, loads, numeric_array, require_key, require_object

# Open Inference Protocol datatypes <-> numpy (always little-endian on the wire).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
NUMERIC_INPUT_DATATYPES = tuple(name for name in DATATYPES if name != "BOOL")
BINARY_HEADER = "inference-header-content-length"
BINARY_CONTENT_TYPE = "application/octet-stream"

_EXAMPLE = (
    '{"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", '
    '"data": [5.1, 3.5, 1.4, 0.2]}]}'
)


def datatype_of(array: np.ndarray) -> str:
    for name, dtype in DATATYPES.items():
        if array.dtype == dtype:
            return name
    if array.dtype.kind in "USO":
        return "BYTES"
    raise TypeError(f"no V2 datatype for numpy dtype {array.dtype}")


def little_endian(array: np.ndarray) -> np.ndarray:
    """`array` as C-ordered little-endian values: itself when it already is (no copy)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, int]:
    """The JSON header of a body, and the offset where its binary tensor data starts.

    Only the (small) JSON header is copied out; the tensor data stays in `body`.
    """
    if header_length is None:
        return body, len(body)
    try:
        length = int(header_length)
    except ValueError:
        raise BadRequest(
            f"{BINARY_HEADER} must be a whole number of bytes, got {header_length!r}"
        ) from None
    if not 0 < length <= len(body):
        raise BadRequest(
            f"{BINARY_HEADER} is {length} but the body has {len(body)} bytes; "
            "it must be the length of the JSON header that starts the body"
        )
    return body[:length], length


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    input_name: str
    rows: np.ndarray  # the tensor's declared datatype; binary tensors are views of the body
    outputs: tuple[RequestedOutput, ...] | None  # None: the client named none, send all
    binary_default: bool
    id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


ONE_TENSOR_ERROR = "inputs must hold exactly one tensor of shape [rows, features]"


def decode_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """An infer request; with `header_length`, Triton's binary form."""
    json_part, data_start = split_body(body, header_length)
    payload = require_object(loads(json_part), _EXAMPLE)
    inputs = require_key(payload, "inputs", _EXAMPLE)
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput(f"{ONE_TENSOR_ERROR}; expected {_EXAMPLE}, or one named input per feature")
    parameters, binary_default = request_parameters(payload)
    rows, data_end = _input_tensor(inputs[0], "inputs[0]", body, data_start, json_part)
    if data_end != len(body):
        raise BadRequest(
            f"the body has {len(body) - data_end} bytes after the declared tensor data; "
            f"check {BINARY_HEADER} and binary_data_size"
        )
    request_id = payload.get("id")
    return InferRequest(
        input_name=str(inputs[0].get("name", "input-0")),
        rows=rows,
        outputs=requested_outputs(payload, binary_default),
        binary_default=binary_default,
        id=str(request_id) if request_id is not None else None,
        parameters=parameters,
    )


def shape_of(spec: Mapping[str, Any], where: str) -> tuple[int, ...]:
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidInput(f"{where}.shape must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def _input_dtype(spec: Mapping[str, Any], where: str) -> np.dtype[Any]:
    datatype = spec.get("datatype")
    if datatype not in NUMERIC_INPUT_DATATYPES:
        raise InvalidInput(
            f"{where}.datatype {datatype!r} is not supported; use one of "
            + ", ".join(NUMERIC_INPUT_DATATYPES)
        )
    return DATATYPES[datatype]


def _input_tensor(
    spec: Mapping[str, Any], where: str, body: bytes, data_start: int, json_part: bytes
) -> tuple[np.ndarray, int]:
    """The tensor `spec` describes, and the offset in `body` where its binary data ends."""
    shape = shape_of(spec, where)
    dtype = _input_dtype(spec, where)
    count = math.prod(shape)
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{where}.parameters must be an object")
    binary_size = parameters.get("binary_data_size")
    if binary_size is not None:
        if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
            raise InvalidInput(f"{where}.parameters.binary_data_size must be a byte count")
        expected = count * dtype.itemsize
        if binary_size != expected:
            raise BadRequest(
                f"{where}: binary_data_size is {binary_size} bytes but shape {list(shape)} "
                f"of {spec['datatype']} needs {expected}"
            )
        available = len(body) - data_start
        if available < binary_size:
            raise BadRequest(
                f"{where}: the body holds {available} bytes of tensor data after the "
                f"JSON header, {binary_size} were declared"
            )
        # A view of the body, read-only and possibly unaligned; Predictor.validate makes
        # the one copy the model needs, if it needs one.
        tensor = np.frombuffer(body, dtype=dtype, count=count, offset=data_start).reshape(shape)
        return tensor, data_start + binary_size
    if "data" not in spec:
        raise InvalidInput(f"{where} needs 'data' (or parameters.binary_data_size with binary data)")
    return _json_tensor(spec["data"], spec["datatype"], dtype, shape, where, json_part), data_start


def _json_tensor(
    data: Any, datatype: str, dtype: np.dtype[Any], shape: tuple[int, ...], where: str, json_part: bytes
) -> np.ndarray:
    array = numeric_array(data, f"{where}.data", json_part)
    count = math.prod(shape)
    if array.size != count:
        raise InvalidInput(f"{where}.data has {array.size} values but shape {list(shape)} needs {count}")
    if dtype.kind in "iu":
        limits = np.iinfo(dtype)
        if array.dtype.kind == "f":
            if has_float(data):
                # (the JSON parser also reads integers beyond 64 bits as floats)
                raise InvalidInput(
                    f"{where}.data has non-integer values (or integers beyond 64 bits) for datatype {datatype}"
                )
            # Only integers, but numpy made floats of them: some are beyond int64 (UINT64 values).
            try:
                array = np.array(data, dtype=dtype)
            except OverflowError:
                raise InvalidInput(
                    f"{where}.data has values outside {limits.min}..{limits.max}, the range of datatype {datatype}"
                ) from None
        if array.size and (int(array.min()) < limits.min or int(array.max()) > limits.max):
            raise InvalidInput(
                f"{where}.data has values outside {limits.min}..{limits.max}, the range of datatype {datatype}"
            )
    # The declared datatype decides the values, as in the binary form: FP32 data is
    # rounded to float32 here too, so JSON and binary requests predict the same.
    with np.errstate(over="ignore"):
        typed = array.astype(dtype, copy=False)
    if dtype.itemsize < 8 and dtype.kind == "f" and np.isinf(typed).any():
        # JSON numbers are finite, so an infinity here is a value beyond the datatype's range
        # (a range check like the integers' above; finiteness is Predictor.validate's).
        raise InvalidInput(f"{where}.data has values too large for datatype {datatype}")
    return typed.reshape(shape)


def request_parameters(payload: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """The request's `parameters` and whether outputs default to binary."""
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("parameters must be an object")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput(f"parameters.binary_data_output must be true or false, got {binary_default!r}")
    return parameters, binary_default


def requested_outputs(payload: Mapping[str, Any], binary_default: bool) -> tuple[RequestedOutput, ...] | None:
    outputs = payload.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidInput('outputs must be a list of objects such as [{"name": "predict"}]')
    requested = []
    for index, output in enumerate(outputs):
        name = output.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"outputs[{index}].name must be a string")
        parameters = output.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput(f'outputs[{index}].parameters must be an object such as {{"binary_data": true}}')
        unknown = sorted(set(parameters) - {"binary_data"})
        if unknown:
            # e.g. Triton's "classification": answering without it would silently change the output.
            raise InvalidInput(
                f"outputs[{index}].parameters.{unknown[0]} is not supported; "
                "the only output parameter is binary_data (true or false)"
            )
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InvalidInput(f"outputs[{index}].parameters.binary_data must be true or false, got {binary!r}")
        requested.append(RequestedOutput(name, binary))
    return tuple(requested)


def encode_response(
    head: Mapping[str, Any],
    outputs: Iterable[tuple[str, np.ndarray, bool]],
) -> tuple[bytes, int | None]:
    """`head` plus the named output tensors; binary ones go after the JSON header.

    Returns the body and, when any output is binary, the JSON header's length for
    the Inference-Header-Content-Length response header. Each binary tensor is copied
    once, straight into the body.
    """
    tensors: list[dict[str, Any]] = []
    binary_tensors: list[memoryview] = []
    for name, array, binary in outputs:
        tensor: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if binary and array.dtype.kind in "biuf":
            data = little_endian(array)
            tensor["parameters"] = {"binary_data_size": data.nbytes}
            binary_tensors.append(data.data)
        else:
            tensor["data"] = array.ravel()
        tensors.append(tensor)
    header = dumps({**head, "outputs": tensors})
    if not binary_tensors:
        return header, None
    return b"".join([header, *binary_tensors]), len(header)
