"""Bad input on every protocol, over real HTTP through HAProxy to real replicas.

Each bad request must get the right 4xx with `{"error": "..."}` naming what was wrong
(never a 500, never a traceback), and a valid request on the same protocol right after
must still succeed. Statuses: 400 the body cannot be parsed (invalid JSON, NaN/Infinity
literals, numbers beyond float64, broken binary framing), 415 not JSON, 422 parsed but
not a valid request for the model, 413 over the body or row limit, 404 unknown model or
version. A JSON integer beyond 64 bits such as 2**70 is a finite float64 for float
features (the parser reads it as 1.18e21), so it is predicted, not refused; as an INT64
tensor it is a 422.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from serve_app.client import v2
from serve_app.protocol import oip_v2

from .conftest import IRIS_ROWS, app_config, wait_for

pytestmark = pytest.mark.ray

JSON_HEADERS = {"content-type": "application/json"}
ROW = b"[5.1, 3.5, 1.4, 0.2]"
LIMIT_BODY = 2048
LIMIT_ROWS = 10
PROTOCOLS = ("seed", "v1", "v2json", "v2binary")


@dataclass(frozen=True)
class Case:
    protocol: str
    name: str
    path: str
    body: bytes
    status: int
    says: str  # a fragment the error message must contain (lower case)
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON_HEADERS))
    app: str = "served"

    @property
    def id(self) -> str:
        return f"{self.protocol}-{self.name}"


def _path(protocol: str, model: str = "iris") -> str:
    return {"seed": "/predict", "v1": f"/v1/models/{model}:predict"}.get(protocol, f"/v2/models/{model}/infer")


def _json_body(protocol: str, rows: bytes, shape: str = "[1, 4]", datatype: str = "FP64") -> bytes:
    """`rows` (a JSON fragment) in the protocol's request envelope."""
    if protocol == "seed":
        return b'{"features": ' + rows + b"}"
    if protocol == "v1":
        return b'{"instances": ' + rows + b"}"
    return (
        b'{"inputs": [{"name": "input-0", "shape": ' + shape.encode() + b', "datatype": "'
        + datatype.encode() + b'", "data": ' + rows + b"}]}"
    )


def _binary(header: dict[str, Any], data: bytes, declared: int | None = None) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    length = len(head) if declared is None else declared
    return head + data, {"content-type": oip_v2.BINARY_CONTENT_TYPE, oip_v2.BINARY_HEADER: str(length)}


def _tensor_header(shape: list[int], datatype: str = "FP32", size: int | None = None, **extra: Any) -> dict[str, Any]:
    itemsize = oip_v2.DATATYPES[datatype].itemsize if datatype in oip_v2.DATATYPES else 4
    nbytes = size if size is not None else int(np.prod(shape)) * itemsize
    return {"inputs": [{"name": "input-0", "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": nbytes}}], **extra}


def _valid(protocol: str, prefix: str = "") -> tuple[str, bytes, dict[str, str]]:
    if protocol == "v2binary":
        body, headers = v2.encode_request(np.array([IRIS_ROWS[0]], dtype=np.float32), binary=True)
        return prefix + _path(protocol), body, headers
    return prefix + _path(protocol), _json_body(protocol, b"[" + ROW + b"]"), dict(JSON_HEADERS)


def _json_protocol_cases(protocol: str) -> Iterator[Case]:
    path = _path(protocol)
    v2 = protocol == "v2json"

    def case(name: str, rows: bytes, status: int, says: str, shape: str = "[1, 4]", **kw: Any) -> Case:
        body = kw.pop("body", None)
        body = _json_body(protocol, rows, shape) if body is None else body
        return Case(protocol, name, kw.pop("path", path), body, status, says, **kw)

    key = {"seed": "features", "v1": "instances", "v2json": "inputs"}[protocol]
    yield case("invalid-json", b"", 400, "not valid json", body=_json_body(protocol, b"[" + ROW)[:-3])
    yield case("wrong-content-type", b"[" + ROW + b"]", 415, "content-type", headers={"content-type": "text/html"})
    yield case("xml-content-type", b"[" + ROW + b"]", 415, "content-type", headers={"content-type": "application/xml"})
    yield case("empty-body", b"", 400, "empty", body=b"")
    yield case("missing-key", b"", 422, f"missing key '{key}'", body=b'{"rows": [[1, 2, 3, 4]]}')
    yield case("not-an-object", b"", 422, "expected a json object", body=b"[[5.1, 3.5, 1.4, 0.2]]")
    yield case("wrong-feature-count", b"[[1, 2, 3]]", 422, "4 features", shape="[1, 3]")
    yield case("ragged-rows", b"[[1, 2, 3, 4], [1, 2, 3]]", 422, "different lengths", shape="[2, 4]")
    yield case("strings", b'[["a", 3.5, 1.4, 0.2]]', 422, "numbers")
    yield case("numeric-strings", b'[["5.1", 3.5, 1.4, 0.2]]', 422, "numbers")
    yield case("booleans", b"[[true, 3.5, 1.4, 0.2]]", 422, "bool")
    yield case("nulls", b"[[null, 3.5, 1.4, 0.2]]", 422, "null")
    yield case("object-in-row", b'[[{"a": 1}, 3.5, 1.4, 0.2]]', 422, "numbers")
    yield case("nan-literal", b"[[NaN, 3.5, 1.4, 0.2]]", 400, "nan and infinity are not json numbers")
    yield case("infinity-literal", b"[[Infinity, 3.5, 1.4, 0.2]]", 400, "not valid json")
    yield case("minus-infinity", b"[[-Infinity, 3.5, 1.4, 0.2]]", 400, "not valid json")
    yield case("1e400", b"[[1e400, 3.5, 1.4, 0.2]]", 400, "infinity")
    yield case("zero-rows", b"[]", 422, "4 features" if not v2 else "no rows", shape="[0, 4]")
    yield case("empty-row", b"[[]]", 422, "4 features", shape="[1, 0]")
    yield case("nested-4-deep", b"[[[[5.1, 3.5, 1.4, 0.2]]]]", 422, "shape", shape="[1, 1, 1, 4]")
    yield case("nested-300-deep", b"[" * 300 + b"1" + b"]" * 300, 422, "deep", shape="[1, 1]")
    yield case("not-a-list", b'"5.1,3.5,1.4,0.2"', 422, "a string" if not v2 else "string")
    if protocol == "v1":
        yield case("unknown-model", b"[" + ROW + b"]", 404, "unknown model 'nope'", path=_path(protocol, "nope"))
    if protocol == "seed":
        yield case("unknown-version", b"[" + ROW + b"]", 404, "no version 99", headers={**JSON_HEADERS, "x-model-version": "99"})
        yield case("unknown-alias", b"[" + ROW + b"]", 404, "no alias 'nope'", headers={**JSON_HEADERS, "x-model-version": "nope"})
    if v2:
        yield case("unknown-model", b"[]", 404, "unknown model 'nope'", path=_path(protocol, "nope"))
        yield case("unknown-version", b"[]", 404, "no version 99", path="/v2/models/iris/versions/99/infer")
        tensor = b'{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ' + ROW + b"}"
        yield case("unknown-datatype", ROW, 422, "'fp128' is not supported", body=_json_body(protocol, ROW, datatype="FP128"))
        yield case("bytes-datatype", b'["a", "b", "c", "d"]', 422, "'bytes' is not supported", body=_json_body(protocol, b'["a", "b", "c", "d"]', datatype="BYTES"))
        yield case("shape-data-mismatch", ROW, 422, "needs 8", shape="[2, 4]")
        yield case("bad-shape", ROW, 422, "shape must be", shape='"four"')
        yield case("int64-2**70", b"[1180591620717411303424, 3, 1, 0]", 422, "int64", body=_json_body(protocol, b"[1180591620717411303424, 3, 1, 0]", datatype="INT64"))
        yield case("uint8-out-of-range", b"[300, 3, 1, 0]", 422, "range", body=_json_body(protocol, b"[300, 3, 1, 0]", datatype="UINT8"))
        yield case("int-with-fraction", ROW, 422, "non-integer", body=_json_body(protocol, ROW, datatype="INT32"))
        yield case("two-inputs", b"", 422, "exactly one tensor", body=b'{"inputs": [' + tensor + b", " + tensor + b"]}")
        yield case("no-inputs", b"", 422, "exactly one tensor", body=b'{"inputs": []}')
        yield case("unknown-output", b"", 422, "unknown output 'decision'", body=b'{"inputs": [' + tensor + b'], "outputs": [{"name": "decision"}]}')
        yield case("outputs-not-a-list", b"", 422, "outputs must be a list", body=b'{"inputs": [' + tensor + b'], "outputs": "predict"}')


def _binary_cases() -> Iterator[Case]:
    protocol, path = "v2binary", _path("v2binary")
    row = np.array([IRIS_ROWS[0]], dtype="<f4").tobytes()  # 16 bytes
    good = _tensor_header([1, 4])

    def case(name: str, body_headers: tuple[bytes, dict[str, str]], status: int, says: str, **kw: Any) -> Case:
        return Case(protocol, name, kw.pop("path", path), body_headers[0], status, says, headers=body_headers[1], **kw)

    head_len = len(json.dumps(good).encode())
    body, headers = _binary(good, row)
    yield case("header-length-not-a-number", (body, {**headers, oip_v2.BINARY_HEADER: "abc"}), 400, "whole number")
    yield case("header-length-past-body", _binary(good, row, declared=head_len + 100), 400, "but the body has")
    yield case("header-length-zero", _binary(good, row, declared=0), 400, "but the body has")
    yield case("header-length-negative", _binary(good, row, declared=-4), 400, "but the body has")
    yield case("header-length-cuts-json", _binary(good, row, declared=head_len - 5), 400, "not valid json")
    yield case("header-length-too-long", _binary(good, row, declared=head_len + 4), 400, "not valid json")
    yield case("buffer-short", _binary(good, row[:12]), 400, "16 were declared")
    yield case("buffer-long", _binary(good, row + b"\0" * 8), 400, "after the declared tensor data")
    yield case("size-not-matching-shape", _binary(_tensor_header([1, 4], size=12), row[:12]), 400, "needs 16")
    yield case("size-not-matching-datatype", _binary(_tensor_header([1, 4], "FP64", size=16), row), 400, "needs 32")
    yield case("unknown-datatype", _binary(_tensor_header([1, 4], "FP128"), row), 422, "'fp128' is not supported")
    yield case("bool-datatype", _binary(_tensor_header([1, 4], "BOOL", size=4), b"\1\0\1\0"), 422, "'bool' is not supported")
    yield case("nan-in-buffer", _binary(good, np.array([[np.nan, 1, 2, 3]], dtype="<f4").tobytes()), 422, "finite")
    yield case("inf-in-buffer", _binary(good, np.array([[np.inf, 1, 2, 3]], dtype="<f4").tobytes()), 422, "finite")
    yield case("wrong-feature-count", _binary(_tensor_header([1, 3]), row[:12]), 422, "4 features")
    yield case("zero-rows", _binary(_tensor_header([0, 4]), b""), 422, "no rows")
    yield case("3d-shape", _binary(_tensor_header([1, 1, 4]), row), 422, "shape")
    yield case("header-not-json", (b"\xff\xfe" + row, {"content-type": oip_v2.BINARY_CONTENT_TYPE, oip_v2.BINARY_HEADER: "2"}), 400, "not valid json")
    yield case("unknown-output", _binary(_tensor_header([1, 4], outputs=[{"name": "decision"}]), row), 422, "unknown output 'decision'")
    yield case("unknown-model", _binary(good, row), 404, "unknown model 'nope'", path=_path(protocol, "nope"))
    yield case("unknown-version", _binary(good, row), 404, "no version 99", path="/v2/models/iris/versions/99/infer")


def _limit_cases() -> Iterator[Case]:
    many = b"[" + b", ".join([ROW] * (LIMIT_ROWS + 1)) + b"]"
    padding = b" " * LIMIT_BODY
    for protocol in ("seed", "v1", "v2json"):
        shape = f"[{LIMIT_ROWS + 1}, 4]"
        yield Case(protocol, "too-many-rows", "/limits" + _path(protocol), _json_body(protocol, many, shape), 413, f"the limit is {LIMIT_ROWS}", app="limits")
        yield Case(protocol, "body-over-limit", "/limits" + _path(protocol), _json_body(protocol, b"[" + ROW + padding + b"]"), 413, f"limit is {LIMIT_BODY} bytes", app="limits")
    rows = np.tile(np.array([IRIS_ROWS[0]], dtype="<f4"), (LIMIT_ROWS + 1, 1))
    body, headers = v2.encode_request(rows, binary=True)
    yield Case("v2binary", "too-many-rows", "/limits/v2/models/iris/infer", body, 413, f"the limit is {LIMIT_ROWS}", headers, app="limits")
    big = np.zeros((LIMIT_BODY // 16, 4), dtype="<f4")
    body, headers = v2.encode_request(big, binary=True)
    yield Case("v2binary", "body-over-limit", "/limits/v2/models/iris/infer", body, 413, f"limit is {LIMIT_BODY} bytes", headers, app="limits")


CASES = [c for p in ("seed", "v1", "v2json") for c in _json_protocol_cases(p)] + list(_binary_cases()) + list(_limit_cases())


@pytest.fixture(scope="module")
def limits_app(served: dict[str, Any]) -> Iterator[str]:
    """A second app with small limits, so over-limit bodies stay cheap to send."""
    cluster = served["cluster"]
    cluster.apply(
        app_config(
            served["store"], name="limits", route_prefix="/limits", max_body_bytes=LIMIT_BODY, max_rows=LIMIT_ROWS,
            deployment={"ray_actor_options": {"num_cpus": 0.1}},
        )
    )
    url = served["base_url"]
    wait_for(lambda: httpx.post(f"{url}/limits/predict", json={"features": IRIS_ROWS[0]}, timeout=5).status_code == 200, what="limits app")
    yield url
    cluster.remove("limits")


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as session:
        yield session


def assert_json_error(reply: httpx.Response, status: int, says: str) -> None:
    assert reply.status_code == status, f"{reply.status_code} {reply.text[:300]}"
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    body = reply.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert says.lower() in body["error"].lower(), body["error"]
    assert "Traceback" not in reply.text and 'File "' not in reply.text


def _assert_valid_request_succeeds(client: httpx.Client, url: str, protocol: str, prefix: str) -> None:
    path, body, headers = _valid(protocol, prefix)
    reply = client.post(url + path, content=body, headers=headers)
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("case", CASES, ids=[f"{c.app}-{c.id}" for c in CASES])
def test_bad_input_gets_json_4xx_then_service_continues(
    served: dict[str, Any], limits_app: str, client: httpx.Client, case: Case
) -> None:
    url = served["base_url"]
    reply = client.post(url + case.path, content=case.body, headers=case.headers)
    assert_json_error(reply, case.status, case.says)
    _assert_valid_request_succeeds(client, url, case.protocol, "/limits" if case.app == "limits" else "")


def test_matrix_covers_every_protocol() -> None:
    for protocol in PROTOCOLS:
        names = {c.name for c in CASES if c.protocol == protocol}
        assert {"too-many-rows", "body-over-limit"} <= names, protocol
        assert names & {"unknown-model", "unknown-version"}, protocol
    assert len(CASES) >= 100


@pytest.mark.parametrize("protocol", ["seed", "v1", "v2json"])
def test_chunked_body_over_limit_is_413(limits_app: str, client: httpx.Client, protocol: str) -> None:
    """No Content-Length: the replica stops reading once the limit is passed."""

    def chunks() -> Iterator[bytes]:
        yield _json_body(protocol, b"[" + ROW)[:-2]
        for _ in range(LIMIT_BODY // 512 + 2):
            yield b" " * 512

    reply = client.post(f"{limits_app}/limits{_path(protocol)}", content=chunks(), headers=JSON_HEADERS)
    assert_json_error(reply, 413, "over the limit")
    _assert_valid_request_succeeds(client, limits_app, protocol, "/limits")


@pytest.mark.parametrize("protocol", ["seed", "v1", "v2json"])
def test_integer_beyond_64_bits_is_a_float_feature(served: dict[str, Any], client: httpx.Client, protocol: str) -> None:
    body = _json_body(protocol, b"[[1180591620717411303424, 3.5, 1.4, 0.2]]")
    reply = client.post(served["base_url"] + _path(protocol), content=body, headers=JSON_HEADERS)
    assert reply.status_code == 200, reply.text


def test_nan_outputs_are_strict_json_null(served: dict[str, Any], client: httpx.Client) -> None:
    """Huge finite inputs overflow LogisticRegression's scores; its probabilities become
    NaN, which must reach the client as null, never as a bare NaN token."""
    rows = np.full((1, 4), 1e308)
    body, headers = v2.encode_request(rows, binary=False, outputs=["predict_proba"])
    reply = client.post(f"{served['base_url']}/v2/models/iris/infer", content=body, headers=headers)
    assert reply.status_code == 200, reply.text

    def no_constants(name: str) -> Any:
        raise AssertionError(f"response has a bare {name}: {reply.text}")

    payload = json.loads(reply.text, parse_constant=no_constants)
    data = payload["outputs"][0]["data"]
    assert None in data, f"expected NaN probabilities for 1e308 inputs, got {data}"
