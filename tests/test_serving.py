"""The served application over real HTTP (through HAProxy) and through Ray handles."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from serve_app.client import v2
from serve_app.protocol import oip_v2
from serve_app.model.predictor import Predictor

from .conftest import IRIS_ROWS, app_config, wait_for

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def expected(served: dict[str, Any]) -> dict[str, np.ndarray]:
    predictor = Predictor.load(served["store"], "iris", "production")
    rows = np.array(IRIS_ROWS)
    return {"predict": predictor.model.predict(rows), "predict_proba": predictor.model.predict_proba(rows)}


def test_seed_contract_single_row(served: dict[str, Any]) -> None:
    reply = httpx.post(f"{served['base_url']}/predict", json={"features": [5.1, 3.5, 1.4, 0.2]})
    assert reply.status_code == 200
    body = reply.json()
    assert body["prediction"] == 0
    assert body["model"] == "iris" and body["version"] == "1"
    assert reply.headers["x-model-name"] == "iris"
    assert reply.headers["x-model-version"] == "1"
    assert reply.headers["content-type"] == "application/json"


def test_seed_contract_with_curl_default_content_type(served: dict[str, Any]) -> None:
    # `curl -d` sends application/x-www-form-urlencoded; the README's curl must work.
    reply = httpx.post(
        f"{served['base_url']}/predict",
        content=b'{"features":[5.1,3.5,1.4,0.2]}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["prediction"] == 0


def test_seed_many_rows(served: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    reply = httpx.post(f"{served['base_url']}/predict", json={"features": IRIS_ROWS})
    assert reply.status_code == 200
    assert reply.json()["predictions"] == expected["predict"].tolist()


def test_seed_flask_client_unchanged(served: dict[str, Any]) -> None:
    import requests  # the seed's client library

    reply = requests.post(f"{served['base_url']}/predict", json={"features": [5.1, 3.5, 1.4, 0.2]}, timeout=10)
    assert reply.json()["prediction"] == 0


def test_kserve_v1(served: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    reply = httpx.post(f"{served['base_url']}/v1/models/iris:predict", json={"instances": IRIS_ROWS})
    assert reply.status_code == 200
    body = reply.json()
    assert body["predictions"] == expected["predict"].tolist()
    assert body["model_name"] == "iris" and body["model_version"] == "1"
    status = httpx.get(f"{served['base_url']}/v1/models/iris").json()
    assert status == {"name": "iris", "ready": True, "version": "1"}


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT32", "INT64"])
def test_v2_json_all_outputs_by_default(served: dict[str, Any], datatype: str) -> None:
    # Values exact in every datatype, so the server's float64 view equals ours.
    exact = [[5.0, 3.5, 1.5, 0.25], [6.75, 3.0, 5.25, 2.25]] if datatype.startswith("FP") else [[5, 3, 1, 0], [7, 3, 5, 2]]
    rows = np.array(exact, dtype=oip_v2.DATATYPES[datatype])
    body, headers = v2.encode_request(rows, binary=False)
    reply = httpx.post(f"{served['base_url']}/v2/models/iris/infer", content=body, headers=headers)
    assert reply.status_code == 200, reply.text
    outputs = v2.decode_response(reply.content, reply.headers.get(oip_v2.BINARY_HEADER))
    model = Predictor.load(served["store"], "iris", "1").model
    as_float = rows.astype(np.float64)
    assert outputs["predict"].tolist() == model.predict(as_float).tolist()
    np.testing.assert_allclose(outputs["predict_proba"], model.predict_proba(as_float), rtol=1e-12)
    assert reply.json()["model_version"] == "1"


def test_v2_binary_inputs_and_outputs(served: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    rows = np.array(IRIS_ROWS, dtype=np.float32)
    body, headers = v2.encode_request(rows, binary=True, outputs=["predict_proba", "predict"], binary_outputs=True)
    reply = httpx.post(f"{served['base_url']}/v2/models/iris/infer", content=body, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == oip_v2.BINARY_CONTENT_TYPE
    assert int(reply.headers[oip_v2.BINARY_HEADER]) < len(reply.content)
    outputs = v2.decode_response(reply.content, reply.headers[oip_v2.BINARY_HEADER])
    model = Predictor.load(served["store"], "iris", "1").model
    assert outputs["predict"].tolist() == model.predict(rows.astype(np.float64)).tolist()
    np.testing.assert_array_equal(outputs["predict_proba"], model.predict_proba(rows.astype(np.float64)))
    assert reply.headers["x-model-version"] == "1"


def test_v2_only_requested_output(served: dict[str, Any]) -> None:
    body, headers = v2.encode_request(np.array(IRIS_ROWS), binary=False, outputs=["predict"])
    reply = httpx.post(f"{served['base_url']}/v2/models/iris/infer", content=body, headers=headers)
    assert [o["name"] for o in reply.json()["outputs"]] == ["predict"]


def test_v2_specific_version_side_by_side(served: dict[str, Any]) -> None:
    store = served["store"]
    rows = np.array(IRIS_ROWS)
    for version in ("1", "2"):
        body, headers = v2.encode_request(rows, binary=True, outputs=["predict"])
        reply = httpx.post(f"{served['base_url']}/v2/models/iris/versions/{version}/infer", content=body, headers=headers)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model_version"] == version
        expected = Predictor.load(store, "iris", version).model.predict(rows)
        assert v2.decode_response(reply.content, None)["predict"].tolist() == expected.tolist()
    # The seed route picks a version with a header.
    reply = httpx.post(f"{served['base_url']}/predict", json={"features": IRIS_ROWS[0]}, headers={"x-model-version": "2"})
    assert reply.json()["version"] == "2"


def test_v2_health_and_metadata(served: dict[str, Any]) -> None:
    url = served["base_url"]
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(f"{url}/v2/models/iris").json()
    assert meta["name"] == "iris" and meta["platform"] == "sklearn"
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
    assert {o["name"] for o in meta["outputs"]} == {"predict", "predict_proba"}
    assert httpx.get(f"{url}/v2/models/iris/versions/2").json()["parameters"]["version"] == "2"
    assert httpx.get(f"{url}/v2/models/iris/ready").json()["ready"] is True
    assert httpx.get(f"{url}/v2/models/iris/versions/2/ready").json()["version"] == "2"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/models/nope", 404),
        ("GET", "/v2/models/iris/versions/99", 404),
        ("POST", "/v2/models/iris/versions/99/infer", 404),
        ("GET", "/no/such/route", 404),
        ("GET", "/predict", 405),
    ],
)
def test_unknown_things_are_json_errors(served: dict[str, Any], method: str, path: str, status: int) -> None:
    reply = httpx.request(method, f"{served['base_url']}{path}", content=b"{}")
    assert reply.status_code == status
    assert set(reply.json()) == {"error"}


def test_openapi_lists_every_route(served: dict[str, Any]) -> None:
    from starlette.routing import Route

    from serve_app.serving.http.app import build_http_app

    document = httpx.get(f"{served['base_url']}/openapi.json").json()
    assert document["openapi"].startswith("3.")

    class Stub:
        settings = type("S", (), {"max_body_bytes": 1})()
        service = None

    app = build_http_app(Stub())  # type: ignore[arg-type]
    served_routes = {(r.path, m.lower()) for r in app.routes if isinstance(r, Route) for m in (r.methods or ()) if m != "HEAD"}
    documented = {(path, method) for path, item in document["paths"].items() for method in item if method != "parameters"}
    assert served_routes == documented


def test_handle_calls_skip_http(served: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    handle = served["handle"]
    assert handle.predict.remote(np.array(IRIS_ROWS)).result().tolist() == expected["predict"].tolist()
    assert handle.predict.remote(IRIS_ROWS[0]).result().tolist() == expected["predict"][:1].tolist()
    np.testing.assert_allclose(handle.predict_proba.remote(IRIS_ROWS).result(), expected["predict_proba"])
    # A named version answers (v2 is a random forest: its probabilities are not v1's).
    v2 = Predictor.load(served["store"], "iris", "2")
    np.testing.assert_allclose(handle.predict_proba.remote(IRIS_ROWS, "2").result(), v2.predict_proba(np.array(IRIS_ROWS)))
    result = handle.infer.remote(IRIS_ROWS, ["predict"], "2").result()
    assert result.version == "2"
    assert result.outputs["predict"].tolist() == v2.predict(np.array(IRIS_ROWS)).tolist()


def test_handle_errors_keep_their_status(served: dict[str, Any]) -> None:
    from serve_app.errors import InvalidInput

    with pytest.raises(InvalidInput) as raised:
        served["handle"].predict.remote([[1.0, 2.0]]).result()
    assert raised.value.status_code == 422
    assert "4 features" in str(raised.value)


def _redeploy(served: dict[str, Any], user_config: dict[str, Any]) -> None:
    served["cluster"].apply(app_config(served["store"], num_replicas=2, user_config=user_config), wait=False)


def _replica_statuses(served: dict[str, Any]) -> list[dict[str, Any]]:
    """/admin/status of every RUNNING replica (by pid, as the controller lists them), asked
    over HTTP until each has answered: HAProxy spreads calls over the replicas, while a
    handle's router may send every one of a run of sequential calls to the same replica."""
    from serve_app.ops import control

    def running_pids() -> set[int] | None:
        deployment = control.details(served["cluster"].dashboard)["applications"]["serve_app"]["deployments"]["ModelServer"]
        pids = {r["pid"] for r in deployment["replicas"] if r["state"] == "RUNNING"}
        # A replica being reconfigured (an earlier test's user_config) is UPDATING, not RUNNING.
        return pids if len(pids) == deployment["target_num_replicas"] else None

    pids = wait_for(running_pids, what="every replica RUNNING")
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(400):
        status = httpx.get(f"{served['base_url']}/admin/status").json()
        seen[status["pid"]] = status
        if pids <= set(seen):
            return [seen[pid] for pid in pids]
    raise AssertionError(f"replicas {sorted(pids - set(seen))} did not answer 400 status calls")


def test_live_reconfigure_of_batching_without_restart(served: dict[str, Any]) -> None:
    before = _replica_statuses(served)
    assert {s["max_batch_size"] for s in before} == {256}
    pids = {s["pid"] for s in before}
    _redeploy(served, {"max_batch_size": 8, "batch_wait_timeout_s": 0.002})
    try:
        wait_for(
            lambda: all(s["max_batch_size"] == 8 and s["batch_wait_timeout_s"] == 0.002 for s in _replica_statuses(served)),
            what="every replica to take the new batch settings",
        )
        assert {s["pid"] for s in _replica_statuses(served)} == pids, "replicas were restarted"
        reply = httpx.post(f"{served['base_url']}/predict", json={"features": IRIS_ROWS * 5})
        assert reply.status_code == 200 and len(reply.json()["predictions"]) == 15
    finally:
        _redeploy(served, {})
        wait_for(lambda: {s["max_batch_size"] for s in _replica_statuses(served)} == {256}, what="defaults back")


def _every_replica(served: dict[str, Any]) -> dict[int, dict[str, int]]:
    """pid -> batch counters of each running replica."""
    return {status["pid"]: status["batches"] for status in _replica_statuses(served)}


def test_serve_batch_selected_live_batches_across_requests(served: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    """`user_config.batcher: serve` swaps in Ray Serve's @serve.batch without a restart."""
    pids = {s["pid"] for s in _replica_statuses(served)}
    _redeploy(served, {"batcher": "serve", "max_batch_size": 32, "batch_wait_timeout_s": 0.005})
    try:
        wait_for(lambda: all(s["batcher"] == "serve" for s in _replica_statuses(served)), what="every replica on @serve.batch")
        before = _every_replica(served)
        # 96 concurrent one-row calls: with a 5 ms wait, @serve.batch groups them.
        responses = [served["handle"].predict.remote([row]) for row in IRIS_ROWS * 32]
        assert [r.result().tolist()[0] for r in responses] == expected["predict"].tolist() * 32
        after = _every_replica(served)
        assert set(after) == set(before) == pids, "replicas were restarted"
        batches = sum(after[p]["batches"] - before[p]["batches"] for p in after)
        requests = sum(after[p]["requests"] - before[p]["requests"] for p in after)
        assert requests >= 96 and batches < requests / 2, (batches, requests)
    finally:
        _redeploy(served, {})
        wait_for(lambda: all(s["batcher"] == "micro" for s in _replica_statuses(served)), what="the default batcher back")


def test_standard_v2_client_in_default_binary_mode(served: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    """Triton's own HTTP client, unmodified: binary tensors in and out (its default)."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=served["base_url"].removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris")
    metadata = client.get_model_metadata("iris")
    assert metadata["inputs"][0]["shape"] == [-1, 4]
    rows = np.array(IRIS_ROWS, dtype=np.float32)
    tensor = triton.InferInput("input-0", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)  # binary_data=True by default
    outputs = [triton.InferRequestedOutput("predict"), triton.InferRequestedOutput("predict_proba")]
    result = client.infer("iris", [tensor], outputs=outputs)
    model = Predictor.load(served["store"], "iris", "1").model
    assert result.as_numpy("predict").tolist() == model.predict(rows.astype(np.float64)).tolist()
    np.testing.assert_array_equal(result.as_numpy("predict_proba"), model.predict_proba(rows.astype(np.float64)))
    versioned = client.infer("iris", [tensor], model_version="2", outputs=[triton.InferRequestedOutput("predict")])
    assert versioned.get_response()["model_version"] == "2"
