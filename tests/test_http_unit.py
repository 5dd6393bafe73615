"""The HTTP routes without Ray: build_http_app over a small backend holding real Predictors."""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import orjson
import pytest
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    # Starlette >= 1.10 prefers the httpx2 package for its TestClient; httpx still works.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

from serve_app.client import v2
from serve_app.protocol import oip_v2
from serve_app.serving.http.app import build_http_app
from serve_app.model.predictor import PREDICT, Predictor
from serve_app.serving.ledger import RequestLedger, RequestRecord
from serve_app.serving.versions import ModelVersions
from serve_app.settings import AppSettings
from serve_app.model.store import ModelStore
from serve_app.model.training import save_fitted, train

from .conftest import IRIS_ROWS

LIMIT = 4096  # max_body_bytes of the test app


@dataclass(frozen=True)
class Result:
    model: str
    version: str
    outputs: dict[str, np.ndarray]


class FakeBackend:
    """What ModelServer gives the routes (settings, versions, ledger, infer, status), minus Ray and batching."""

    def __init__(self, service: ModelVersions) -> None:
        self.settings = service.settings
        self.versions = service
        self.ledger = RequestLedger()
        self.monitor = None
        self.calls: list[tuple[tuple[int, ...], tuple[str, ...], str | None, str | None]] = []
        self.fail_with: Exception | None = None

    async def infer_with(self, predictor: Predictor, rows: Any, outputs: Sequence[str] = (PREDICT,),
                    request: RequestRecord | None = None) -> Result:
        if self.fail_with is not None:
            raise self.fail_with
        outputs = tuple(outputs)
        predictor.check_outputs(outputs)
        array = predictor.validate(rows)
        self.calls.append((array.shape, outputs, predictor.version, predictor.name))
        return Result(predictor.name, predictor.version, predictor.run(array, outputs))

    def status(self) -> dict[str, Any]:
        return {"model": self.versions.name, "version": self.versions.default.version}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris v1 (LogisticRegression, production) and v2 (a RandomForest), built once."""
    from sklearn import datasets
    from sklearn.ensemble import RandomForestClassifier

    store = ModelStore(tmp_path_factory.mktemp("http") / "models")
    train(store)
    iris = datasets.load_iris()
    forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(iris.data, iris.target)
    save_fitted(store, forest, name="iris", feature_names=list(iris.feature_names))
    return store.root


@pytest.fixture(scope="module")
def settings(trained: Path) -> AppSettings:
    return AppSettings(store=str(trained), max_body_bytes=LIMIT, max_rows=100)


@pytest.fixture(scope="module")
def service(settings: AppSettings) -> ModelVersions:
    """Loaded once: no test changes the store or the default version."""
    service = ModelVersions(settings)
    service.set_default("production")
    return service


@pytest.fixture
def backend(service: ModelVersions) -> FakeBackend:
    return FakeBackend(service)


@pytest.fixture
def client(backend: FakeBackend) -> Iterator[TestClient]:
    with TestClient(build_http_app(backend), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def expected(trained: Path) -> dict[str, dict[str, np.ndarray]]:
    """What each version answers for IRIS_ROWS, in process, straight from sklearn."""
    rows = np.array(IRIS_ROWS)
    answers = {}
    for version in ("1", "2"):
        model = Predictor.load(trained, "iris", version).model
        answers[version] = {"predict": model.predict(rows), "predict_proba": model.predict_proba(rows)}
    return answers


def assert_error(reply: Any, status: int, *fragments: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    assert "Traceback" not in reply.text


# ---- the /predict JSON API --------------------------------------------------------------------


def test_predict_single_row(client: TestClient) -> None:
    reply = client.post("/predict", json={"features": [5.1, 3.5, 1.4, 0.2]})
    assert reply.status_code == 200
    assert reply.json() == {"prediction": 0, "model": "iris", "version": "1"}
    assert reply.headers["x-model-name"] == "iris" and reply.headers["x-model-version"] == "1"
    assert reply.headers["content-type"] == "application/json"


def test_predict_many_rows_and_version_header(client: TestClient, expected: dict[str, Any]) -> None:
    reply = client.post("/predict", json={"features": IRIS_ROWS})
    assert reply.json() == {"predictions": expected["1"]["predict"].tolist(), "model": "iris", "version": "1"}
    reply = client.post("/predict", json={"features": IRIS_ROWS}, headers={"x-model-version": "2"})
    assert reply.json() == {"predictions": expected["2"]["predict"].tolist(), "model": "iris", "version": "2"}
    assert reply.headers["x-model-version"] == "2"
    reply = client.post("/predict", json={"features": IRIS_ROWS}, headers={"x-model-version": "latest"})
    assert reply.json()["version"] == "2"


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
def test_predict_accepts_curl_and_plain_bodies(client: TestClient, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    reply = client.post("/predict", content=b'{"features":[5.1,3.5,1.4,0.2]}', headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.json()["prediction"] == 0


@pytest.mark.parametrize(
    ("body", "status", "fragments"),
    [
        (b"", 400, ["request body is empty"]),
        (b"{", 400, ["not valid JSON"]),
        (b'{"features": [1, 2, NaN, 4]}', 400, ["NaN and Infinity are not JSON numbers"]),
        (b'{"feature": [1, 2, 3, 4]}', 422, ["missing key 'features'"]),
        (b'{"features": [1, 2, 3]}', 422, ["each row needs 4 features", "got 3"]),
        (b'{"features": [[1, 2, 3]]}', 422, ["each row needs 4 features", "got 3"]),
        (b'{"features": [1, true, 3, 4]}', 422, ["features[1] is true (bool)"]),
        (b'{"features": [1, null, 3, 4]}', 422, ["features[1] is null"]),
        (b'{"features": [[1, 2, 3, 4], [1, 2]]}', 422, ["rows have different lengths"]),
        (b'{"features": [1e308, 1e308, 1e308, 1e308]}', 200, []),
        (b'{"features": []}', 422, ["each row needs 4 features"]),
        (b'{"features": [[[1, 2, 3, 4]]]}', 422, ["got shape [1, 1, 4]"]),
        (orjson.dumps({"features": [[1, 2, 3, 4]] * 101}), 413, ["101 rows in one request; the limit is 100"]),
    ],
)
def test_predict_bad_input(client: TestClient, body: bytes, status: int, fragments: list[str]) -> None:
    reply = client.post("/predict", content=body, headers={"content-type": "application/json"})
    if status == 200:
        assert reply.status_code == 200 and reply.json()["version"] == "1"
        return
    assert_error(reply, status, *fragments)


def test_predict_unknown_version_is_404(client: TestClient) -> None:
    assert_error(client.post("/predict", json={"features": IRIS_ROWS[0]}, headers={"x-model-version": "9"}),
                 404, "model 'iris' has no version 9 (versions: 1, 2)")
    assert_error(client.post("/predict", json={"features": IRIS_ROWS[0]}, headers={"x-model-version": "canary"}),
                 404, "has no alias 'canary'")


# ---- KServe V1 ------------------------------------------------------------------------------


def test_v1(client: TestClient, expected: dict[str, Any]) -> None:
    reply = client.post("/v1/models/iris:predict", json={"instances": IRIS_ROWS})
    assert reply.status_code == 200
    assert reply.json() == {"predictions": expected["1"]["predict"].tolist(), "model_name": "iris", "model_version": "1"}
    assert reply.headers["x-model-version"] == "1"
    assert client.get("/v1/models/iris").json() == {"name": "iris", "ready": True, "version": "1"}


def test_v1_errors(client: TestClient) -> None:
    assert_error(client.post("/v1/models/wine:predict", json={"instances": IRIS_ROWS}), 404,
                 "unknown model 'wine'; this server serves 'iris'")
    assert_error(client.get("/v1/models/wine"), 404, "unknown model 'wine'")
    assert_error(client.post("/v1/models/iris:predict", json={"rows": IRIS_ROWS}), 422, "missing key 'instances'")


# ---- Open Inference Protocol V2 ---------------------------------------------------------------


def test_v2_server_routes(client: TestClient) -> None:
    from serve_app import __version__

    assert client.get("/v2").json() == {"name": "serve_app", "version": __version__, "extensions": ["binary_tensor_data"]}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_v2_not_ready_before_a_model_is_loaded(settings: AppSettings) -> None:
    unloaded = FakeBackend(ModelVersions(settings))
    with TestClient(build_http_app(unloaded), raise_server_exceptions=False) as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert_error(client.get("/v2/health/ready"), 404, "model 'iris' is not loaded yet")


def test_v2_model_metadata_and_ready(client: TestClient, backend: FakeBackend) -> None:
    metadata = client.get("/v2/models/iris").json()
    manifest = backend.versions.store.manifest("iris", "1")
    assert metadata["name"] == "iris" and metadata["versions"] == ["1", "2"] and metadata["platform"] == "sklearn"
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
    assert metadata["outputs"] == [{"name": "predict", "datatype": "INT64", "shape": [-1]},
                                   {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3]}]
    assert metadata["parameters"]["version"] == "1" and metadata["parameters"]["sha256"] == manifest.sha256
    assert client.get("/v2/models/iris/versions/2").json()["parameters"]["estimator"].endswith("RandomForestClassifier")
    assert client.get("/v2/models/iris/ready").json() == {"name": "iris", "version": "1", "ready": True}
    assert client.get("/v2/models/iris/versions/2/ready").json() == {"name": "iris", "version": "2", "ready": True}
    assert_error(client.get("/v2/models/iris/versions/9"), 404, "has no version 9")
    assert_error(client.get("/v2/models/wine/ready"), 404, "unknown model 'wine'")


def test_v2_infer_json_all_outputs_by_default(client: TestClient, expected: dict[str, Any]) -> None:
    body, headers = v2.encode_request(np.array(IRIS_ROWS), binary=False)
    reply = client.post("/v2/models/iris/infer", content=body, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    payload = reply.json()
    assert (payload["model_name"], payload["model_version"]) == ("iris", "1")
    outputs = v2.decode_response(reply.content, None)
    assert list(outputs) == ["predict", "predict_proba"]
    assert np.array_equal(outputs["predict"], expected["1"]["predict"])
    assert np.array_equal(outputs["predict_proba"], expected["1"]["predict_proba"])


@pytest.mark.parametrize("binary_outputs", [False, True])
def test_v2_infer_binary(client: TestClient, expected: dict[str, Any], binary_outputs: bool) -> None:
    body, headers = v2.encode_request(np.array(IRIS_ROWS), binary=True, outputs=["predict_proba"],
                                            binary_outputs=binary_outputs)
    reply = client.post("/v2/models/iris/versions/2/infer", content=body, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-model-version"] == "2"
    header_length = reply.headers.get(oip_v2.BINARY_HEADER)
    assert (header_length is not None) is binary_outputs
    assert reply.headers["content-type"] == (oip_v2.BINARY_CONTENT_TYPE if binary_outputs else "application/json")
    outputs = v2.decode_response(reply.content, header_length)
    assert list(outputs) == ["predict_proba"]
    assert np.array_equal(outputs["predict_proba"], expected["2"]["predict_proba"])


def test_v2_infer_echoes_the_id(client: TestClient) -> None:
    body = orjson.dumps({"id": "abc", "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": IRIS_ROWS[0]}],
                         "outputs": [{"name": "predict"}]})
    reply = client.post("/v2/models/iris/infer", content=body, headers={"content-type": "application/json"})
    assert reply.json()["id"] == "abc"
    assert reply.json()["outputs"] == [{"name": "predict", "datatype": "INT64", "shape": [1], "data": [0]}]


@pytest.mark.parametrize(
    ("path", "body", "header", "status", "fragments"),
    [
        ("/v2/models/iris/infer", b'{"inputs": []}', None, 422, ["exactly one tensor"]),
        ("/v2/models/iris/infer", orjson.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]}]}),
         None, 422, ["each row needs 4 features"]),
        ("/v2/models/iris/infer", orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}],
                                                 "outputs": [{"name": "labels"}]}), None, 422,
         ["unknown output 'labels' for iris v1; available: predict, predict_proba"]),
        ("/v2/models/iris/infer", orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "BYTES", "data": ["a"] * 4}]}),
         None, 422, ["datatype 'BYTES' is not supported"]),
        ("/v2/models/wine/infer", b"{}", None, 404, ["unknown model 'wine'"]),
        ("/v2/models/iris/versions/9/infer", b"{}", None, 404, ["has no version 9"]),
        ("/v2/models/iris/infer", b"{}", "abc", 400, ["must be a whole number of bytes"]),
        ("/v2/models/iris/infer", b"{}", "0", 400, ["inference-header-content-length is 0"]),
        ("/v2/models/iris/infer", b"{}", "99", 400, ["is 99 but the body has 2 bytes"]),
    ],
)
def test_v2_infer_errors(client: TestClient, path: str, body: bytes, header: str | None, status: int, fragments: list[str]) -> None:
    headers = {"content-type": "application/json"}
    if header is not None:
        headers = {"content-type": oip_v2.BINARY_CONTENT_TYPE, oip_v2.BINARY_HEADER: header}
    assert_error(client.post(path, content=body, headers=headers), status, *fragments)


def test_superscript_digit_version_is_404_not_500(client: TestClient) -> None:
    assert_error(client.get("/v2/models/iris/versions/%C2%B2/ready"), 404, "'²'")


# ---- other routes ---------------------------------------------------------------------------


def test_admin_status_is_the_backends_answer_as_json(client: TestClient, backend: FakeBackend,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # What a replica's status holds that JSON cannot say as is: numpy numbers and arrays, a NaN.
    answer: dict[str, Any] = {
        "pid": 4242, "loaded_versions": ["2", "1"], "routing": None,
        "batches": {"batches": np.int64(7), "requests": np.int64(9)},
        "batch_wait_timeout_s": np.float32(0.25), "mean_rows": float("nan"), "classes": np.array([0, 1, 2]),
    }
    monkeypatch.setattr(backend, "status", lambda: answer)
    reply = client.get("/admin/status")
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "pid": 4242, "loaded_versions": ["2", "1"], "routing": None, "batches": {"batches": 7, "requests": 9},
        "batch_wait_timeout_s": 0.25, "mean_rows": None, "classes": [0, 1, 2],
    }
    answer["loaded_versions"] = ["1"]  # asked afresh on every request
    assert client.get("/admin/status").json()["loaded_versions"] == ["1"]


def test_openapi_documents_exactly_the_routes_and_methods_served(backend: FakeBackend) -> None:
    import re

    from starlette.routing import Route

    app = build_http_app(backend)
    with TestClient(app) as client:
        reply = client.get("/openapi.json")
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    document = reply.json()
    assert document["openapi"].startswith("3.")
    served = {(r.path, m.lower()) for r in app.routes if isinstance(r, Route) for m in r.methods or () if m != "HEAD"}
    documented = {(path, method) for path, item in document["paths"].items() for method in item if method != "parameters"}
    assert documented == served
    for path, item in document["paths"].items():
        in_path = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert in_path == set(re.findall(r"{(\w+)}", path)), path


def test_openapi_names_the_model_this_app_serves(settings: AppSettings) -> None:
    wine = FakeBackend(ModelVersions(settings.model_copy(update={"model": "wine"})))
    with TestClient(build_http_app(wine)) as client:
        info = client.get("/openapi.json").json()["info"]
    assert info["description"] == "Predictions from the scikit-learn model 'wine'."


V2_EXAMPLE = {"inputs": [{"name": "input-0", "shape": [3, 4], "datatype": "FP64", "data": IRIS_ROWS}]}
# (documented path, a URL of it, a request its documented schema allows)
PREDICTION_ROUTES = [
    ("/predict", "/predict", {"features": IRIS_ROWS[0]}),
    ("/v1/models/{name}:predict", "/v1/models/iris:predict", {"instances": IRIS_ROWS}),
    ("/v2/models/{name}/infer", "/v2/models/iris/infer", V2_EXAMPLE),
    ("/v2/models/{name}/versions/{version}/infer", "/v2/models/iris/versions/2/infer", V2_EXAMPLE),
]


@pytest.mark.parametrize(("path", "url", "example"), PREDICTION_ROUTES, ids=[p for p, _, _ in PREDICTION_ROUTES])
def test_prediction_routes_honour_their_documented_request_and_answers(client: TestClient, path: str, url: str,
                                                                       example: dict[str, Any]) -> None:
    """What /openapi.json says each prediction route takes and answers is what it does."""
    import jsonschema

    document = client.get("/openapi.json").json()
    operation = document["paths"][path]["post"]

    def validator(schema: dict[str, Any]) -> jsonschema.Draft7Validator:
        return jsonschema.Draft7Validator({**schema, "components": document["components"]})

    request_schema = validator(operation["requestBody"]["content"]["application/json"]["schema"])
    request_schema.validate(example)
    reply = client.post(url, json=example)
    assert reply.status_code == 200, reply.text
    validator(operation["responses"]["200"]["content"]["application/json"]["schema"]).validate(reply.json())
    # A body the schema refuses for lacking its required key is refused, naming that key.
    missing = [e.message for e in request_schema.iter_errors({}) if e.validator == "required"]
    assert len(missing) == 1, missing
    required = missing[0].split("'")[1]
    wrong_model = url.replace("/iris", "/wine")
    for attempt, status in [
        (client.post(url, json={}), 422),
        (client.post(url, content=b"{", headers={"content-type": "application/json"}), 400),
        (client.post(url, content=b"<x/>", headers={"content-type": "application/xml"}), 415),
        (client.post(url, content=b" " * (LIMIT + 1), headers={"content-type": "application/json"}), 413),
        *([(client.post(wrong_model, json=example), 404)] if wrong_model != url else []),
    ]:
        assert attempt.status_code == status, attempt.text
        documented = operation["responses"][str(status)]["content"]["application/json"]["schema"]
        validator(documented).validate(attempt.json())
    assert f"missing key '{required}'" in client.post(url, json={}).json()["error"]


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "no route GET /nope; see /openapi.json for the API")
    assert_error(client.post("/v3/models/iris/infer", json={}), 404, "no route POST /v3/models/iris/infer")
    assert_error(client.get("/predict"), 405, "method GET is not allowed on /predict")
    assert_error(client.delete("/v2/models/iris/infer"), 405, "method DELETE is not allowed")


# ---- body limits and media types ----------------------------------------------------------------


def test_body_over_the_limit_by_content_length(client: TestClient, backend: FakeBackend) -> None:
    body = b'{"features": [' + b"1.0, " * 1000 + b"1.0]}"
    assert len(body) > LIMIT
    assert_error(client.post("/predict", content=body, headers={"content-type": "application/json"}), 413,
                 f"request body is {len(body)} bytes; the limit is {LIMIT} bytes")
    binary, headers = v2.encode_request(np.ones((200, 4)), binary=True)
    assert_error(client.post("/v2/models/iris/infer", content=binary, headers=headers), 413, f"the limit is {LIMIT} bytes")
    assert backend.calls == []


def test_chunked_body_over_the_limit(client: TestClient, backend: FakeBackend) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"features": ['
        yield b"1.0, " * 1000
        yield b"1.0]}"

    reply = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert_error(reply, 413, f"request body is over the limit of {LIMIT} bytes")
    assert backend.calls == []


def _asgi_post(app: Any, path: str, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes, int]:
    """Drives the ASGI app directly: the status, the body, and how many chunks it read."""
    received = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received < len(chunks):
            received += 1
            return {"type": "http.request", "body": chunks[received - 1], "more_body": received < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80), "state": {}}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, received


def test_chunked_reading_stops_at_the_limit(backend: FakeBackend) -> None:
    app = build_http_app(backend)
    chunks = [b"[" + b" " * 1023] * 20  # 20 KiB, never valid JSON
    status, body, received = _asgi_post(app, "/predict", chunks, [(b"content-type", b"application/json")])
    assert status == 413 and orjson.loads(body) == {"error": f"request body is over the limit of {LIMIT} bytes"}
    assert received == LIMIT // 1024 + 1  # read one chunk past the limit, not all 20


def test_content_length_that_understates_the_body(backend: FakeBackend) -> None:
    app = build_http_app(backend)
    chunks = [b"{" + b" " * 1023] * 8
    status, body, _ = _asgi_post(app, "/predict", chunks, [(b"content-type", b"application/json"), (b"content-length", b"10")])
    assert status == 413, body
    assert b"the limit is 4096 bytes" in body


@pytest.mark.parametrize("content_type", ["application/xml", "multipart/form-data; boundary=x", "text/csv"])
def test_unsupported_media_type(client: TestClient, content_type: str) -> None:
    media = content_type.split(";")[0]
    for path in ("/predict", "/v1/models/iris:predict", "/v2/models/iris/infer"):
        reply = client.post(path, content=b"<features/>", headers={"content-type": content_type})
        assert_error(reply, 415, f"unsupported Content-Type '{media}'", "application/json")


# ---- failures inside the backend ----------------------------------------------------------------


def test_a_bug_is_a_500_without_details(client: TestClient, backend: FakeBackend, caplog: pytest.LogCaptureFixture) -> None:
    backend.fail_with = ZeroDivisionError("secret internals at /srv/app.py line 42")
    for path, payload in (("/predict", {"features": IRIS_ROWS[0]}), ("/v1/models/iris:predict", {"instances": IRIS_ROWS})):
        reply = client.post(path, json=payload)
        assert_error(reply, 500, "internal error; the server log has the details")
        assert "secret" not in reply.text and "ZeroDivisionError" not in reply.text
    body, headers = v2.encode_request(np.array(IRIS_ROWS), binary=True)
    reply = client.post("/v2/models/iris/infer", content=body, headers=headers)
    assert_error(reply, 500, "internal error")
    # The details go to the log instead.
    assert any("unhandled error on POST /predict" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_serve_app_error_from_the_backend_keeps_its_status(client: TestClient, backend: FakeBackend) -> None:
    from serve_app.errors import ModelLoadError

    backend.fail_with = ModelLoadError("model file is missing")
    assert_error(client.post("/predict", json={"features": IRIS_ROWS[0]}), 500, "model file is missing")
