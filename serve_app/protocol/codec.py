"""Request bytes <-> numpy, for every protocol serve_app speaks.

The seed's `{"features": ...}`, KServe V1 `{"instances": ...}` and the Open Inference
Protocol V2 (JSON and Triton's binary tensor extension) are decoded here, and only here.
Decoders return numeric arrays; the Predictor checks their shape against the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import orjson

from serve_app.errors import BadRequest, InvalidInput, UnsupportedMediaType

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY

# Open Inference Protocol datatypes <-> numpy (always little-endian on the wire).
V2_DATATYPES: dict[str, np.dtype[Any]] = {
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
NUMERIC_INPUT_DATATYPES = tuple(name for name in V2_DATATYPES if name != "BOOL")
BINARY_HEADER = "inference-header-content-length"
BINARY_CONTENT_TYPE = "application/octet-stream"

# curl -d sends form-urlencoded and many clients send text/plain; the body is still JSON.
_JSON_CONTENT_TYPES = ("application/json", "application/x-www-form-urlencoded", "text/plain")
_SEED_EXAMPLE = '{"features": [5.1, 3.5, 1.4, 0.2]}'


def datatype_of(array: np.ndarray) -> str:
    for name, dtype in V2_DATATYPES.items():
        if array.dtype == dtype:
            return name
    if array.dtype.kind in "US":
        return "BYTES"
    if array.dtype.kind == "O":
        return "BYTES"
    raise TypeError(f"no V2 datatype for numpy dtype {array.dtype}")


def _to_builtin(value: Any) -> Any:
    # orjson serialises numeric numpy arrays itself; string or object arrays (class labels
    # such as "setosa") and numpy scalars come here.
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(payload: Any) -> bytes:
    """Strict JSON: NaN and infinities become null, numpy values serialise natively."""
    return orjson.dumps(payload, default=_to_builtin, option=JSON_OPTIONS)


def check_json_content_type(content_type: str | None) -> None:
    if not content_type:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type in _JSON_CONTENT_TYPES or media_type.endswith("+json") or media_type == "*/*":
        return
    raise UnsupportedMediaType(
        f"unsupported Content-Type {media_type!r}; send JSON with 'Content-Type: application/json'"
    )


def loads(body: bytes) -> Any:
    if not body:
        raise BadRequest(f"request body is empty; expected JSON such as {_SEED_EXAMPLE}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"request body is not valid JSON ({exc}); NaN and Infinity are not JSON numbers"
        ) from None


def _require_object(payload: Any, expected: str) -> Mapping[str, Any]:
    if not isinstance(payload, dict):
        raise InvalidInput(f"expected a JSON object such as {expected}, got {type(payload).__name__}")
    return payload


def _require_key(payload: Mapping[str, Any], key: str, expected: str) -> Any:
    try:
        return payload[key]
    except KeyError:
        raise InvalidInput(f"missing key {key!r}; expected {expected}") from None


def _first_non_number(value: Any, path: str) -> str | None:
    """Where the first element that is not a JSON number sits, for error messages."""
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_non_number(item, f"{path}[{index}]")
            if found:
                return found
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = "null" if value is None else orjson.dumps(value).decode()[:40]
        return f"{path} is {shown} ({'null' if value is None else type(value).__name__})"
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return f"{path} is {value}, out of range for a 64-bit number"
    return None


def numeric_array(value: Any, where: str, body: bytes = b"") -> np.ndarray:
    """A JSON (nested) list of numbers as an int or float array; anything else is a 422.

    `body` lets the check for booleans run only when the raw JSON contains one, because
    numpy silently turns `true` into 1 and that scan costs more than the decode itself.
    """
    if not isinstance(value, list):
        raise InvalidInput(f"{where} must be a list of numbers, got {_json_type(value)}")
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):
        depth = _depth(value)
        if depth > 2:
            raise InvalidInput(
                f"{where} is nested {depth} levels deep; expected a row of numbers or a list of rows"
            ) from None
        raise InvalidInput(
            f"{where}: rows have different lengths; every row needs the same number of features"
        ) from None
    needs_scan = array.dtype.kind not in "iuf" or b"true" in body or b"false" in body
    if needs_scan:
        problem = _first_non_number(value, where)
        if problem:
            raise InvalidInput(f"{problem}; expected numbers only")
        if array.dtype.kind not in "iuf":
            array = np.asarray(value, dtype=np.float64)
    return array


def _depth(value: Any) -> int:
    """How deeply lists nest in `value` (iteratively: the JSON parser allows 1024 levels)."""
    depth, level = 0, [value]
    while True:
        lists = [v for v in level if isinstance(v, list)]
        if not lists:
            return depth
        depth += 1
        level = [item for v in lists for item in v]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class SeedRequest:
    rows: np.ndarray
    single: bool  # `{"features": [..]}` answers `{"prediction": x}`; a list of rows answers a list


def decode_seed(body: bytes) -> SeedRequest:
    payload = _require_object(loads(body), _SEED_EXAMPLE)
    features = _require_key(payload, "features", _SEED_EXAMPLE + ' or {"features": [[...], [...]]}')
    array = numeric_array(features, "features", body)
    if array.ndim == 1:
        return SeedRequest(array.reshape(1, -1), single=True)
    return SeedRequest(array, single=False)


def decode_v1(body: bytes) -> np.ndarray:
    expected = '{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
    payload = _require_object(loads(body), expected)
    key = "instances" if "instances" in payload else "inputs"
    if key not in payload:
        raise InvalidInput(f"missing key 'instances' (or 'inputs'); expected {expected}")
    return numeric_array(payload[key], key, body)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class V2Request:
    input_name: str
    rows: np.ndarray
    outputs: tuple[RequestedOutput, ...] | None  # None: the client named none, send all
    binary_default: bool
    id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


def _split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
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
    return body[:length], body[length:]


def _shape_of(spec: Mapping[str, Any], where: str) -> tuple[int, ...]:
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidInput(f"{where}.shape must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def _datatype_of(spec: Mapping[str, Any], where: str) -> np.dtype[Any]:
    datatype = spec.get("datatype")
    if datatype not in NUMERIC_INPUT_DATATYPES:
        raise InvalidInput(
            f"{where}.datatype {datatype!r} is not supported; use one of "
            + ", ".join(NUMERIC_INPUT_DATATYPES)
        )
    return V2_DATATYPES[datatype]


def _v2_tensor(
    spec: Mapping[str, Any], where: str, binary: bytes, offset: int, body: bytes
) -> tuple[np.ndarray, int]:
    shape = _shape_of(spec, where)
    dtype = _datatype_of(spec, where)
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
        chunk = binary[offset : offset + binary_size]
        if len(chunk) != binary_size:
            raise BadRequest(
                f"{where}: the body holds {len(binary) - offset} bytes of tensor data after the "
                f"JSON header, {binary_size} were declared"
            )
        return np.frombuffer(chunk, dtype=dtype).reshape(shape), offset + binary_size
    if "data" not in spec:
        raise InvalidInput(f"{where} needs 'data' (or parameters.binary_data_size with binary data)")
    array = numeric_array(spec["data"], f"{where}.data", body)
    if array.size != count:
        raise InvalidInput(
            f"{where}.data has {array.size} values but shape {list(shape)} needs {count}"
        )
    if dtype.kind in "iu":
        limits = np.iinfo(dtype)
        if array.dtype.kind == "f":
            if _has_float(spec["data"]):
                # (the JSON parser also reads integers beyond 64 bits as floats)
                raise InvalidInput(
                    f"{where}.data has non-integer values (or integers beyond 64 bits) "
                    f"for datatype {spec['datatype']}"
                )
            # Only integers, but numpy made floats of them: some are beyond int64 (UINT64 values).
            try:
                array = np.array(spec["data"], dtype=dtype)
            except OverflowError:
                raise InvalidInput(
                    f"{where}.data has values outside {limits.min}..{limits.max}, "
                    f"the range of datatype {spec['datatype']}"
                ) from None
        if array.size and (int(array.min()) < limits.min or int(array.max()) > limits.max):
            raise InvalidInput(
                f"{where}.data has values outside {limits.min}..{limits.max}, "
                f"the range of datatype {spec['datatype']}"
            )
    # The declared datatype decides the values, as in the binary form: FP32 data is
    # rounded to float32 here too, so JSON and binary requests predict the same.
    with np.errstate(over="ignore"):
        typed = array.astype(dtype, copy=False)
    if dtype.itemsize < 8 and dtype.kind == "f" and not np.isfinite(typed).all():
        raise InvalidInput(f"{where}.data has values too large for datatype {spec['datatype']}")
    return typed.reshape(shape), offset


def _has_float(value: Any) -> bool:
    return isinstance(value, float) or (isinstance(value, list) and any(_has_float(v) for v in value))


def _requested_outputs(payload: Mapping[str, Any], binary_default: bool) -> tuple[RequestedOutput, ...] | None:
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


def decode_v2(body: bytes, header_length: str | None = None) -> V2Request:
    """An Open Inference Protocol infer request; with `header_length`, Triton's binary form."""
    expected = (
        '{"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", '
        '"data": [5.1, 3.5, 1.4, 0.2]}]}'
    )
    json_part, binary = _split_binary(body, header_length)
    payload = _require_object(loads(json_part), expected)
    inputs = _require_key(payload, "inputs", expected)
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput(f"inputs must hold exactly one tensor of shape [rows, features]; expected {expected}")
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("parameters must be an object")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput(f"parameters.binary_data_output must be true or false, got {binary_default!r}")
    rows, used = _v2_tensor(inputs[0], "inputs[0]", binary, 0, json_part)
    if used != len(binary):
        raise BadRequest(
            f"the body has {len(binary) - used} bytes after the declared tensor data; "
            f"check {BINARY_HEADER} and binary_data_size"
        )
    request_id = payload.get("id")
    return V2Request(
        input_name=str(inputs[0].get("name", "input-0")),
        rows=rows,
        outputs=_requested_outputs(payload, binary_default),
        binary_default=binary_default,
        id=str(request_id) if request_id is not None else None,
        parameters=parameters,
    )


def encode_v2_response(
    head: Mapping[str, Any],
    outputs: Iterable[tuple[str, np.ndarray, bool]],
) -> tuple[bytes, int | None]:
    """`head` plus the named output tensors; binary ones go after the JSON header.

    Returns the body and, when any output is binary, the JSON header's length for
    the Inference-Header-Content-Length response header.
    """
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array, binary in outputs:
        tensor: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if binary and array.dtype.kind in "biuf":
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            tensor["data"] = array.ravel()
        tensors.append(tensor)
    header = dumps({**head, "outputs": tensors})
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def encode_v2_request(
    rows: np.ndarray,
    *,
    binary: bool,
    outputs: Sequence[str] = (),
    binary_outputs: bool = False,
    input_name: str = "input-0",
) -> tuple[bytes, dict[str, str]]:
    """The client side of `decode_v2`, used by the benchmark and tests."""
    tensor: dict[str, Any] = {"name": input_name, "shape": list(rows.shape), "datatype": datatype_of(rows)}
    payload: dict[str, Any] = {"inputs": [tensor]}
    if outputs:
        payload["outputs"] = [{"name": o, "parameters": {"binary_data": binary_outputs}} for o in outputs]
    if not binary:
        tensor["data"] = rows.ravel()
        return dumps(payload), {"content-type": "application/json"}
    data = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<")).tobytes()
    tensor["parameters"] = {"binary_data_size": len(data)}
    header = dumps(payload)
    return header + data, {"content-type": BINARY_CONTENT_TYPE, BINARY_HEADER: str(len(header))}


def decode_v2_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """Output tensors of a V2 response (JSON or binary) by name; for tests and clients."""
    json_part, binary = _split_binary(body, header_length)
    payload = orjson.loads(json_part)
    offset = 0
    tensors: dict[str, np.ndarray] = {}
    for out in payload["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            dtype = V2_DATATYPES[out["datatype"]]
            tensors[out["name"]] = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(out["shape"])
            offset += size
        else:
            # null (a NaN on the server) becomes NaN again in a float datatype.
            dtype = V2_DATATYPES.get(out["datatype"])
            tensors[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
    return tensors
