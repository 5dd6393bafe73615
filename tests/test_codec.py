"""Request bytes <-> numpy (`serve_app.protocol`) for the `/predict` API, KServe V1 and the
Open Inference Protocol V2, and the V2 client codec (`serve_app.client.v2`)."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any, Callable

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import np_to_triton_dtype

from serve_app.client import v2
from serve_app.protocol import kserve_v1, oip_v2, predict_api
from serve_app.protocol.json import check_json_content_type, dumps
from serve_app.errors import BadRequest, InvalidInput, ServeAppError, UnsupportedMediaType

NUMERIC = list(oip_v2.NUMERIC_INPUT_DATATYPES)


def raises(error: type[ServeAppError], call: Callable[[], Any], *fragments: str) -> ServeAppError:
    """Asserts `call` raises exactly `error` with its status, and that the message holds each fragment."""
    with pytest.raises(ServeAppError) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value.message}"
    assert info.value.status_code == error.status_code
    for fragment in fragments:
        assert fragment in info.value.message, f"{fragment!r} not in {info.value.message!r}"
    return info.value


def v2_body(tensor: dict[str, Any] | None = None, **payload: Any) -> bytes:
    tensor = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2], **(tensor or {})}
    return json.dumps({"inputs": [tensor], **payload}).encode()


def binary_request(rows: np.ndarray, **kwargs: Any) -> tuple[bytes, str]:
    body, headers = v2.encode_request(rows, binary=True, **kwargs)
    return body, headers[oip_v2.BINARY_HEADER]


def sample(datatype: str, shape: tuple[int, ...] = (3, 4), seed: int = 0) -> np.ndarray:
    """Random values spanning a datatype's whole range (ints) or many magnitudes (floats)."""
    rng = np.random.default_rng(seed)
    dtype = oip_v2.DATATYPES[datatype]
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        values.flat[0], values.flat[-1] = info.min, info.max
        return values
    finfo = np.finfo(dtype)
    values = (rng.normal(size=shape) * 10.0 ** rng.integers(-3, 4, size=shape)).astype(dtype)
    values.flat[0], values.flat[-1] = finfo.max, finfo.smallest_subnormal
    return values


# ---- the /predict API's {"features": ...} ------------------------------------------------------------


def test_predict_api_single_row() -> None:
    decoded = predict_api.decode_request(b'{"features": [5.1, 3.5, 1.4, 0.2]}')
    assert decoded.single is True
    assert decoded.rows.shape == (1, 4) and decoded.rows.dtype == np.float64
    assert decoded.rows.tolist() == [[5.1, 3.5, 1.4, 0.2]]


def test_predict_api_many_rows_and_ints() -> None:
    decoded = predict_api.decode_request(b'{"features": [[5, 3, 1, 0], [6.7, 3.0, 5.2, 2.3]]}')
    assert decoded.single is False
    assert decoded.rows.tolist() == [[5, 3, 1, 0], [6.7, 3.0, 5.2, 2.3]]
    ints = predict_api.decode_request(b'{"features": [[5, 3, 1, 0]]}')
    assert ints.rows.dtype.kind == "i" and ints.single is False


def test_predict_api_ignores_other_keys() -> None:
    assert predict_api.decode_request(b'{"features": [1, 2], "id": "x"}').rows.tolist() == [[1, 2]]


# ---- KServe V1 ------------------------------------------------------------------------------


def test_v1_instances_and_inputs() -> None:
    assert kserve_v1.decode_request(b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}').tolist() == [[5.1, 3.5, 1.4, 0.2]]
    assert kserve_v1.decode_request(b'{"inputs": [[1, 2, 3, 4], [5, 6, 7, 8]]}').shape == (2, 4)


# ---- bad input, the same for every JSON decoder -------------------------------------------------

DECODERS: dict[str, tuple[Callable[[bytes], Any], Callable[[str], bytes]]] = {
    # name: (decode, wrap a JSON value where the rows go)
    "predict": (predict_api.decode_request, lambda v: b'{"features": ' + v.encode() + b"}"),
    "v1-instances": (kserve_v1.decode_request, lambda v: b'{"instances": ' + v.encode() + b"}"),
    "v1-inputs": (kserve_v1.decode_request, lambda v: b'{"inputs": ' + v.encode() + b"}"),
    "v2": (
        oip_v2.decode_request,
        lambda v: b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": ' + v.encode() + b"}]}",
    ),
}


@pytest.fixture(params=list(DECODERS))
def decoder(request: pytest.FixtureRequest) -> tuple[Callable[[bytes], Any], Callable[[str], bytes]]:
    return DECODERS[request.param]


def test_empty_body(decoder: Any) -> None:
    decode, _ = decoder
    raises(BadRequest, lambda: decode(b""), "request body is empty", '{"features": [5.1, 3.5, 1.4, 0.2]}')


@pytest.mark.parametrize("body", [b"{", b"features=1,2,3,4", b'{"features": [1, 2,]}', b"\xff\xfe", b"[1] x"])
def test_invalid_json(decoder: Any, body: bytes) -> None:
    decode, _ = decoder
    raises(BadRequest, lambda: decode(body), "request body is not valid JSON")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400])
def test_nan_and_infinite_literals(decoder: Any, literal: str) -> None:
    decode, wrap = decoder
    raises(BadRequest, lambda: decode(wrap(f"[1, 2, {literal}, 4]")), "not valid JSON", "NaN and Infinity are not JSON numbers")


def test_json_nested_beyond_the_parser_limit(decoder: Any) -> None:
    decode, wrap = decoder
    raises(BadRequest, lambda: decode(wrap("[" * 2000 + "]" * 2000)), "not valid JSON", "depth limit exceeded")


def test_lists_nested_too_deep_for_an_array(decoder: Any) -> None:
    decode, wrap = decoder
    raises(InvalidInput, lambda: decode(wrap("[" * 200 + "1" + "]" * 200)), "nested 200 levels deep", "a list of rows")


@pytest.mark.parametrize("rows", ["[[1, 2, 3, 4], [1, 2, 3]]", "[[1, 2], 3, 4]"])
def test_ragged_rows(decoder: Any, rows: str) -> None:
    decode, wrap = decoder
    raises(InvalidInput, lambda: decode(wrap(rows)), "rows have different lengths", "same number of features")


@pytest.mark.parametrize(
    ("rows", "where", "shown"),
    [
        ('[1, "2", 3, 4]', "[1]", '"2" (str)'),
        ('[[1, 2, 3, 4], [1, 2, "x", 4]]', "[1][2]", '"x" (str)'),
        ("[true, false, true, true]", "[0]", "true (bool)"),
        ("[1, true, 3, 4]", "[1]", "true (bool)"),
        ("[1.5, 2.5, false, 4]", "[2]", "false (bool)"),
        ("[1, null, 3, 4]", "[1]", "null (null)"),
        ("[null, null, null, null]", "[0]", "null (null)"),
        ('[1, {"a": 1}, 3, 4]', "[1]", '{"a":1} (dict)'),
    ],
)
def test_non_numbers_name_their_place(decoder: Any, rows: str, where: str, shown: str) -> None:
    decode, wrap = decoder
    error = raises(InvalidInput, lambda: decode(wrap(rows)), f"{where} is {shown}", "expected numbers only")
    assert "features" in error.message or "instances" in error.message or "inputs" in error.message or "data" in error.message


def test_booleans_elsewhere_in_the_body_are_not_mistaken(decoder: Any) -> None:
    # `true` in the body triggers the slower scan; numbers must still pass it.
    decode, wrap = decoder
    body = wrap("[1, 2, 3, 4]")[:-1] + b', "flag": true}'
    decode(body)


@pytest.mark.parametrize("value", ['"1,2,3,4"', "5", "{}", "null", "true"])
def test_rows_that_are_not_a_list(value: str) -> None:
    raises(InvalidInput, lambda: predict_api.decode_request(b'{"features": ' + value.encode() + b"}"), "features must be a list of numbers")
    raises(InvalidInput, lambda: kserve_v1.decode_request(b'{"instances": ' + value.encode() + b"}"), "instances must be a list of numbers")


def test_ints_beyond_64_bits() -> None:
    # JSON numbers have no size limit; the parser reads integers beyond 64 bits as floats,
    # a finite feature value the model can score (beyond float64 it is a 400, tested above).
    assert predict_api.decode_request(b'{"features": [1, 2, 36893488147419103232, 4]}').rows[0, 2] == 2.0**65
    raises(InvalidInput, lambda: oip_v2.decode_request(v2_body({"datatype": "INT64", "data": [1, 2, 36893488147419103232, 4]})),
           "non-integer values (or integers beyond 64 bits) for datatype INT64")
    raises(InvalidInput, lambda: oip_v2.decode_request(v2_body({"datatype": "INT64", "data": [1, 2, 2**63, 4]})),
           "outside -9223372036854775808..9223372036854775807, the range of datatype INT64")


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"feature": [1, 2, 3, 4]}', "'features'"),
        (b"{}", "'features'"),
    ],
)
def test_predict_api_missing_key(body: bytes, key: str) -> None:
    raises(InvalidInput, lambda: predict_api.decode_request(body), f"missing key {key}", '{"features": [5.1, 3.5, 1.4, 0.2]}')


def test_v1_missing_key_and_not_an_object() -> None:
    raises(InvalidInput, lambda: kserve_v1.decode_request(b'{"rows": [[1, 2, 3, 4]]}'), "missing key 'instances' (or 'inputs')", '{"instances": [[5.1')
    raises(InvalidInput, lambda: kserve_v1.decode_request(b"[[1, 2, 3, 4]]"), "expected a JSON object such as", "got list")
    raises(InvalidInput, lambda: predict_api.decode_request(b"[5.1, 3.5, 1.4, 0.2]"), "expected a JSON object", "got list")
    raises(InvalidInput, lambda: predict_api.decode_request(b'"x"'), "got str")


# ---- V2 JSON ---------------------------------------------------------------------------------


def test_v2_json_request() -> None:
    decoded = oip_v2.decode_request(v2_body({"name": "features", "shape": [2, 2], "data": [[1, 2], [3, 4]]}, id="req-7"))
    assert decoded.input_name == "features"
    assert decoded.rows.tolist() == [[1, 2], [3, 4]] and decoded.rows.dtype == np.float64
    assert decoded.outputs is None and decoded.binary_default is False
    assert decoded.id == "req-7"


def test_v2_requested_outputs() -> None:
    decoded = oip_v2.decode_request(v2_body(outputs=[{"name": "predict_proba"}, {"name": "predict", "parameters": {"binary_data": True}}]))
    assert decoded.outputs == (oip_v2.RequestedOutput("predict_proba", False), oip_v2.RequestedOutput("predict", True))
    decoded = oip_v2.decode_request(v2_body(outputs=[{"name": "predict"}], parameters={"binary_data_output": True}))
    assert decoded.outputs == (oip_v2.RequestedOutput("predict", True),) and decoded.binary_default is True


@pytest.mark.parametrize(
    ("body", "error", "fragments"),
    [
        (b'{"input": []}', InvalidInput, ["missing key 'inputs'", '"datatype": "FP64"']),
        (b'{"inputs": []}', InvalidInput, ["inputs must hold exactly one tensor of shape [rows, features]"]),
        (b'{"inputs": {"name": "x"}}', InvalidInput, ["exactly one tensor"]),
        (v2_body()[:-2] + b', {"name": "y"}]}', InvalidInput, ["exactly one tensor"]),
        (v2_body({"data": [1, 2, 3]}), InvalidInput, ["inputs[0].data has 3 values but shape [1, 4] needs 4"]),
        (v2_body({"shape": [2, 4]}), InvalidInput, ["has 4 values but shape [2, 4] needs 8"]),
        (v2_body({"shape": "1,4"}), InvalidInput, ["inputs[0].shape must be a list of non-negative integers, got '1,4'"]),
        (v2_body({"shape": [1, -4]}), InvalidInput, ["shape must be a list of non-negative integers"]),
        (v2_body({"shape": [True, 4]}), InvalidInput, ["shape must be a list of non-negative integers"]),
        (v2_body({"shape": []}), InvalidInput, ["shape must be a list"]),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP64", "data": [1, 2, 3, 4]}]}).encode(), InvalidInput, ["shape must be a list"]),
        (v2_body({"datatype": "FP128"}), InvalidInput, ["inputs[0].datatype 'FP128' is not supported; use one of UINT8", "FP64"]),
        (v2_body({"datatype": None}), InvalidInput, ["datatype None is not supported"]),
        (v2_body({"datatype": "BOOL", "data": [True, False, True, True]}), InvalidInput, ["datatype 'BOOL' is not supported"]),
        (v2_body({"datatype": "BYTES", "data": ["a", "b", "c", "d"]}), InvalidInput, ["datatype 'BYTES' is not supported"]),
        (v2_body({"datatype": "INT32", "data": [1.5, 2, 3, 4]}), InvalidInput, ["non-integer values", "INT32"]),
        (v2_body({"datatype": "UINT8", "data": [1, 2, 300, 4]}), InvalidInput, ["outside 0..255, the range of datatype UINT8"]),
        (v2_body({"datatype": "UINT32", "data": [1, 2, -1, 4]}), InvalidInput, ["outside 0..4294967295"]),
        (v2_body({"datatype": "INT8", "data": [1, 2, -129, 4]}), InvalidInput, ["outside -128..127"]),
        (v2_body({"datatype": "FP16", "data": [1, 2, 1e6, 4]}), InvalidInput, ["too large for datatype FP16"]),
        (v2_body({"datatype": "FP32", "data": [1, 2, 1e300, 4]}), InvalidInput, ["too large for datatype FP32"]),
        (v2_body({"data": None}), InvalidInput, ["inputs[0].data must be a list of numbers, got null"]),
        (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64"}]}).encode(), InvalidInput, ["inputs[0] needs 'data'"]),
        (v2_body({"parameters": [1]}), InvalidInput, ["inputs[0].parameters must be an object"]),
        (v2_body({"parameters": {"binary_data_size": "16"}}), InvalidInput, ["binary_data_size must be a byte count"]),
        (v2_body(parameters=[1]), InvalidInput, ["parameters must be an object"]),
        (v2_body(parameters={"binary_data_output": "yes"}), InvalidInput, ["parameters.binary_data_output must be true or false, got 'yes'"]),
        (v2_body(outputs={"name": "predict"}), InvalidInput, ['outputs must be a list of objects such as [{"name": "predict"}]']),
        (v2_body(outputs=["predict"]), InvalidInput, ["outputs must be a list of objects"]),
        (v2_body(outputs=[{"id": "predict"}]), InvalidInput, ["outputs[0].name must be a string"]),
        (v2_body(outputs=[{"name": "predict", "parameters": {"classification": 2}}]), InvalidInput,
         ["outputs[0].parameters.classification is not supported; the only output parameter is binary_data (true or false)"]),
        (v2_body(outputs=[{"name": "predict"}, {"name": "predict_proba", "parameters": {"binary": True}}]), InvalidInput,
         ["outputs[1].parameters.binary is not supported"]),
        (v2_body(outputs=[{"name": "predict", "parameters": "binary"}]), InvalidInput, ["outputs[0].parameters must be an object"]),
        (v2_body(outputs=[{"name": "predict", "parameters": {"binary_data": "false"}}]), InvalidInput,
         ["outputs[0].parameters.binary_data must be true or false, got 'false'"]),
        (v2_body({"parameters": {"binary_data_size": 32}}), BadRequest, ["the body holds 0 bytes of tensor data after the JSON header, 32 were declared"]),
    ],
)
def test_v2_json_refused(body: bytes, error: type[ServeAppError], fragments: list[str]) -> None:
    raises(error, lambda: oip_v2.decode_request(body), *fragments)


def test_v2_json_data_takes_the_declared_datatype() -> None:
    # FP32 data means float32 values, as in the binary form: both forms predict the same.
    json_rows = oip_v2.decode_request(v2_body({"datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]})).rows
    binary_rows = oip_v2.decode_request(*binary_request(np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32))).rows
    assert json_rows.dtype == binary_rows.dtype == np.float32
    assert np.array_equal(json_rows, binary_rows)
    assert oip_v2.decode_request(v2_body({"datatype": "FP64", "data": [1, 2, 3, 4]})).rows.dtype == np.float64
    assert oip_v2.decode_request(v2_body({"datatype": "UINT64", "data": [0, 1, 2**64 - 1, 2**63]})).rows.tolist() == [[0, 1, 2**64 - 1, 2**63]]


# ---- V2 binary (Triton's binary tensor data extension) ------------------------------------------


def test_v2_binary_request() -> None:
    rows = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])
    body, headers = v2.encode_request(rows, binary=True, outputs=["predict"], binary_outputs=True)
    assert headers["content-type"] == oip_v2.BINARY_CONTENT_TYPE
    header_length = int(headers[oip_v2.BINARY_HEADER])
    assert len(body) == header_length + rows.nbytes
    assert body[header_length:] == rows.astype("<f8").tobytes()
    decoded = oip_v2.decode_request(body, headers[oip_v2.BINARY_HEADER])
    assert np.array_equal(decoded.rows, rows)
    assert decoded.outputs == (oip_v2.RequestedOutput("predict", True),)


@pytest.mark.parametrize(
    ("header", "fragments"),
    [
        ("0", ["inference-header-content-length is 0 but the body has", "the length of the JSON header"]),
        ("-5", ["is -5 but the body has"]),
        ("abc", ["inference-header-content-length must be a whole number of bytes, got 'abc'"]),
        ("", ["must be a whole number of bytes, got ''"]),
        ("1e3", ["must be a whole number of bytes"]),
        ("100000", ["is 100000 but the body has"]),
    ],
)
def test_v2_binary_header_length_wrong(header: str, fragments: list[str]) -> None:
    body, _ = binary_request(np.ones((2, 4)))
    raises(BadRequest, lambda: oip_v2.decode_request(body, header), *fragments)


def test_v2_binary_header_length_not_at_the_json_end() -> None:
    body, header = binary_request(np.ones((2, 4)))
    raises(BadRequest, lambda: oip_v2.decode_request(body, str(int(header) - 3)), "not valid JSON")
    # Longer, but still inside the body: the JSON header swallows tensor bytes.
    raises(BadRequest, lambda: oip_v2.decode_request(body, str(int(header) + 3)), "not valid JSON")


def test_v2_binary_data_size_not_matching_the_shape() -> None:
    body, header = binary_request(np.ones((2, 4), dtype=np.float32))
    wrong = body.replace(b'"binary_data_size":32', b'"binary_data_size":16')
    raises(BadRequest, lambda: oip_v2.decode_request(wrong, str(len(wrong) - 32)),
           "binary_data_size is 16 bytes but shape [2, 4] of FP32 needs 32")
    negative = body.replace(b'"binary_data_size":32', b'"binary_data_size":-1')
    raises(InvalidInput, lambda: oip_v2.decode_request(negative, str(len(negative) - 32)), "binary_data_size must be a byte count")


def test_v2_binary_body_shorter_or_longer_than_declared() -> None:
    body, header = binary_request(np.ones((2, 4)))
    raises(BadRequest, lambda: oip_v2.decode_request(body[:-8], header), "holds 56 bytes of tensor data after the JSON header, 64 were declared")
    raises(BadRequest, lambda: oip_v2.decode_request(body + b"\0\0\0", header), "the body has 3 bytes after the declared tensor data")


def test_v2_binary_header_with_json_data_and_trailing_bytes() -> None:
    body = v2_body()
    raises(BadRequest, lambda: oip_v2.decode_request(body + b"\x01\x02", str(len(body))), "2 bytes after the declared tensor data")
    assert oip_v2.decode_request(body, str(len(body))).rows.tolist() == [[5.1, 3.5, 1.4, 0.2]]


@pytest.mark.parametrize("datatype", ["BOOL", "BYTES"])
def test_v2_binary_non_numeric_inputs(datatype: str) -> None:
    body, header = binary_request(np.ones((1, 4), dtype=bool))
    body = body.replace(b'"BOOL"', f'"{datatype}"'.encode())
    raises(InvalidInput, lambda: oip_v2.decode_request(body, str(int(header) + len(datatype) - 4)), f"datatype '{datatype}' is not supported")


# ---- round trips, and against tritonclient (an independent V2 implementation) ----------------
#
# The self round trips alone would pass for a codec that is wrong in the same way both
# ways (byte order, where binary data starts, which header length counts). So every
# request is also built by Triton's own HTTP client and every response also read by it.


def triton_request(rows: np.ndarray, *, binary: bool, outputs: list[Any] | None = None,
                   request_id: str = "") -> tuple[bytes, str | None]:
    """The body and Inference-Header-Content-Length tritonclient's `infer()` sends."""
    tensor = triton.InferInput("input-0", list(rows.shape), np_to_triton_dtype(rows.dtype))
    tensor.set_data_from_numpy(rows, binary_data=binary)
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor], outputs=outputs, request_id=request_id)
    return body, None if json_size is None else str(json_size)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", NUMERIC)
@pytest.mark.parametrize("encoder", ["serve_app", "tritonclient"])
def test_request_round_trip(datatype: str, binary: bool, encoder: str) -> None:
    rows = sample(datatype)
    if encoder == "serve_app":
        body, headers = v2.encode_request(rows, binary=binary)
        header_length = headers.get(oip_v2.BINARY_HEADER)
    else:
        body, header_length = triton_request(rows, binary=binary)
    assert (header_length is not None) is binary
    decoded = oip_v2.decode_request(body, header_length)
    assert decoded.rows.dtype == rows.dtype
    assert np.array_equal(decoded.rows, rows)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_request_options(binary: bool) -> None:
    rows = sample("FP32", (2, 4))
    # No outputs named: tritonclient asks for every output in binary (binary_data_output).
    body, header_length = triton_request(rows, binary=binary, request_id="req-9")
    decoded = oip_v2.decode_request(body, header_length)
    assert (decoded.input_name, decoded.id, decoded.outputs, decoded.binary_default) == ("input-0", "req-9", None, True)
    outputs = [triton.InferRequestedOutput("predict", binary_data=False), triton.InferRequestedOutput("predict_proba")]
    body, header_length = triton_request(rows, binary=binary, outputs=outputs)
    decoded = oip_v2.decode_request(body, header_length)
    assert decoded.outputs == (oip_v2.RequestedOutput("predict", False), oip_v2.RequestedOutput("predict_proba", True))
    assert decoded.binary_default is False and decoded.id is None
    assert np.array_equal(decoded.rows, rows)


def read_response(body: bytes, header_length: int | None, decoder: str) -> dict[str, np.ndarray]:
    if decoder == "serve_app":
        return v2.decode_response(body, None if header_length is None else str(header_length))
    result = triton.InferenceServerClient.parse_response_body(body, header_length=header_length)
    return {output["name"]: result.as_numpy(output["name"]) for output in result.get_response()["outputs"]}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", [*NUMERIC, "BOOL"])
@pytest.mark.parametrize("decoder", ["serve_app", "tritonclient"])
def test_response_round_trip(datatype: str, binary: bool, decoder: str) -> None:
    first, second = sample(datatype, (5,), seed=1), sample(datatype, (5, 3), seed=2)
    head = {"model_name": "iris", "model_version": "1", "id": "x"}
    body, header_length = oip_v2.encode_response(head, [("predict", first, binary), ("predict_proba", second, binary)])
    assert (header_length is None) is not binary
    payload = orjson.loads(body[:header_length] if header_length else body)
    assert {k: payload[k] for k in head} == head
    assert [(o["name"], o["datatype"], o["shape"]) for o in payload["outputs"]] == [
        ("predict", datatype, [5]), ("predict_proba", datatype, [5, 3])
    ]
    outputs = read_response(body, header_length, decoder)
    assert list(outputs) == ["predict", "predict_proba"]
    for name, expected in (("predict", first), ("predict_proba", second)):
        assert outputs[name].dtype == expected.dtype
        assert np.array_equal(outputs[name], expected)


@pytest.mark.parametrize("decoder", ["serve_app", "tritonclient"])
def test_response_mixes_json_and_binary_outputs(decoder: str) -> None:
    labels, proba = np.array([0, 2]), np.array([[0.75, 0.25, 0.0], [0.0, 0.5, 0.5]])
    body, header_length = oip_v2.encode_response({}, [("predict", labels, False), ("predict_proba", proba, True)])
    assert header_length is not None and len(body) == header_length + proba.nbytes
    header = orjson.loads(body[:header_length])
    assert header["outputs"][0]["data"] == [0, 2]
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 48}
    outputs = read_response(body, header_length, decoder)
    assert np.array_equal(outputs["predict"], labels) and np.array_equal(outputs["predict_proba"], proba)


def test_tritonclient_reads_nulls_and_string_labels() -> None:
    values = np.array([[np.nan, 0.5], [np.inf, -np.inf]])
    body, header_length = oip_v2.encode_response({}, [("predict_proba", values, False), ("predict", np.array(["setosa", "virginica"]), True)])
    assert header_length is None  # strings are never raw bytes, so nothing here is binary
    outputs = read_response(body, header_length, "tritonclient")
    assert np.isnan(outputs["predict_proba"]).tolist() == [[True, False], [True, True]]
    assert outputs["predict_proba"][0, 1] == 0.5
    assert outputs["predict"].tolist() == ["setosa", "virginica"]


def test_nan_in_outputs_serialises_as_null() -> None:
    values = np.array([[np.nan, 0.5], [np.inf, -np.inf]])
    body, header_length = oip_v2.encode_response({}, [("predict_proba", values, False)])
    assert header_length is None
    assert orjson.loads(body)["outputs"][0]["data"] == [None, 0.5, None, None]
    assert b"NaN" not in body and b"Infinity" not in body
    decoded = v2.decode_response(body, None)["predict_proba"]
    assert np.isnan(decoded[0, 0]) and decoded[0, 1] == 0.5
    assert dumps({"x": float("nan"), "y": np.float32("nan")}) == b'{"x":null,"y":null}'


def test_string_labels_serialise() -> None:
    # A classifier trained on string labels predicts a numpy str array.
    labels = np.array(["setosa", "virginica"])
    assert dumps({"predictions": labels}) == b'{"predictions":["setosa","virginica"]}'
    body, header_length = oip_v2.encode_response({}, [("predict", labels, True)])
    assert header_length is None  # strings are never sent as raw bytes
    output = orjson.loads(body)["outputs"][0]
    assert (output["datatype"], output["data"]) == ("BYTES", ["setosa", "virginica"])
    assert dumps({"labels": labels.astype(object), "n": np.int64(3)}) == b'{"labels":["setosa","virginica"],"n":3}'


def test_datatype_of() -> None:
    for name, dtype in oip_v2.DATATYPES.items():
        assert oip_v2.datatype_of(np.zeros(1, dtype=dtype)) == name
    assert oip_v2.datatype_of(np.array(["a"])) == "BYTES"
    assert oip_v2.datatype_of(np.array([b"a"])) == "BYTES"
    with pytest.raises(TypeError, match="no V2 datatype for numpy dtype complex128"):
        oip_v2.datatype_of(np.zeros(1, dtype=complex))


# ---- content types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "", "application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
     "application/x-www-form-urlencoded", "text/plain", "text/plain;charset=UTF-8", "application/vnd.api+json", "*/*"],
)
def test_json_content_types_accepted(content_type: str | None) -> None:
    check_json_content_type(content_type)


@pytest.mark.parametrize(
    ("content_type", "shown"),
    [("application/xml", "'application/xml'"), ("multipart/form-data; boundary=xyz", "'multipart/form-data'"),
     ("text/csv", "'text/csv'"), ("application/octet-stream", "'application/octet-stream'")],
)
def test_other_content_types_are_415(content_type: str, shown: str) -> None:
    raises(UnsupportedMediaType, lambda: check_json_content_type(content_type),
           f"unsupported Content-Type {shown}", "'Content-Type: application/json'")



# ---- binary tensors are copied at most once -----------------------------------------------------

BIG = np.random.default_rng(3).normal(size=(50_000, 4))  # 1.6 MB of FP64


def peak_allocated(call: Callable[[], Any]) -> tuple[Any, int]:
    """What `call` returns, and the most memory it held at once (numpy reports to tracemalloc)."""
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_binary_request_tensor_is_read_in_place() -> None:
    body, header_length = binary_request(BIG)
    decoded, peak = peak_allocated(lambda: oip_v2.decode_request(body, header_length))
    assert np.shares_memory(decoded.rows, np.frombuffer(body, np.uint8))
    assert np.array_equal(decoded.rows, BIG) and not decoded.rows.flags.writeable
    assert peak < BIG.nbytes / 10, f"decoding allocated {peak} bytes for a {BIG.nbytes}-byte tensor"


def test_binary_response_copies_each_tensor_once() -> None:
    labels, proba = BIG[:, 0].astype(np.int64), BIG[:, :3].copy()
    (body, header_length), peak = peak_allocated(
        lambda: oip_v2.encode_response({}, [("predict", labels, True), ("predict_proba", proba, True)])
    )
    size = len(body) - header_length
    assert size == 8 * len(BIG) + proba.nbytes
    assert peak < 1.2 * size, f"encoding {size} bytes of tensors allocated {peak} at once"
    assert np.array_equal(v2.decode_response(body, str(header_length))["predict_proba"], proba)


def test_client_binary_request_copies_the_tensor_once() -> None:
    (body, headers), peak = peak_allocated(lambda: v2.encode_request(BIG, binary=True))
    assert len(body) == int(headers[oip_v2.BINARY_HEADER]) + BIG.nbytes
    assert peak < 1.2 * BIG.nbytes, f"encoding a {BIG.nbytes}-byte tensor allocated {peak} at once"


def test_v2_json_floats_up_to_the_datatype_range() -> None:
    # Values that round to the largest FP16/FP32 number are in range; beyond it they are refused.
    fp32_max = float(np.finfo(np.float32).max)
    rows = oip_v2.decode_request(v2_body({"datatype": "FP32", "data": [fp32_max, -fp32_max, 1, 2]})).rows
    assert rows.tolist() == [[fp32_max, -fp32_max, 1, 2]]
    assert oip_v2.decode_request(v2_body({"datatype": "FP16", "data": [65519, 1, 2, 3]})).rows[0, 0] == 65504
    raises(InvalidInput, lambda: oip_v2.decode_request(v2_body({"datatype": "FP16", "data": [65520, 1, 2, 3]})),
           "too large for datatype FP16")
