"""A Pipeline with named, typed columns served by the real replica class (no Ray): every protocol
answers what the model's own `predict` answers on the same rows, bad records get a 422 naming
the column, and typed requests batch across requests like numeric ones."""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OrdinalEncoder

from serve_app.errors import InvalidInput
from serve_app.model.churn import TARGET, churn_frame, fit_churn
from serve_app.model.predictor import Predictor
from serve_app.model.publish import publish
from serve_app.model.store import ModelStore
from serve_app.serving.deployment import ModelServer
from serve_app.serving.http.app import build_http_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def churn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Pipeline, pd.DataFrame]:
    frame = churn_frame(1200, seed=3)
    features = frame.drop(columns=[TARGET])
    model = fit_churn(frame)
    store = ModelStore(tmp_path_factory.mktemp("typed") / "models")
    publish(model, name="churn", sample=features, store=store)
    # Unknown categories refused: an OrdinalEncoder that raises on them.
    strict = Pipeline([
        ("columns", ColumnTransformer([("contract", OrdinalEncoder(), ["contract"])], remainder="drop")),
        ("model", LogisticRegression()),
    ]).fit(features[["contract"]], frame[TARGET])
    publish(strict, name="strict", sample=features[["contract"]], store=store)
    return store.root, model, features


def replica(store: Path, model: str, **args: Any) -> Any:
    cls = next(c for c in ModelServer.func_or_class.__mro__ if "reconfigure" in vars(c))
    server = cls({"store": str(store), "model": model, "monitoring": {"enabled": False}, **args})
    server.reconfigure({})
    return server


@pytest.fixture(scope="module")
def server(churn: tuple[Path, Pipeline, pd.DataFrame]) -> Any:
    return replica(churn[0], "churn")


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[TestClient]:
    with TestClient(build_http_app(server), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def rows(churn: tuple[Path, Pipeline, pd.DataFrame]) -> pd.DataFrame:
    """Rows with every kind of value, a missing number included."""
    features = churn[2]
    picked = pd.concat([features[features["monthly_charges"].isna()].head(3), features.head(13)])
    assert picked["monthly_charges"].isna().sum() >= 3 and picked["paperless_billing"].nunique() == 2
    return picked.reset_index(drop=True)


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """As a client sends them: JSON with null for a missing value."""
    return json.loads(frame.to_json(orient="records"))


def expected(churn: tuple[Path, Pipeline, pd.DataFrame], frame: pd.DataFrame) -> list[Any]:
    return churn[1].predict(frame).tolist()


def test_predict_takes_one_record_or_many(client: TestClient, churn: Any, rows: pd.DataFrame) -> None:
    want = expected(churn, rows)
    many = client.post("/predict", json={"features": records(rows)})
    assert many.status_code == 200, many.text
    assert many.json()["predictions"] == want
    one = client.post("/predict", json={"features": records(rows)[0]})
    assert one.status_code == 200, one.text
    assert one.json()["prediction"] == want[0]


def test_kserve_v1_records_and_columnar_inputs(client: TestClient, churn: Any, rows: pd.DataFrame) -> None:
    want = expected(churn, rows)
    instances = client.post("/v1/models/churn:predict", json={"instances": records(rows)})
    assert instances.status_code == 200, instances.text
    assert instances.json()["predictions"] == want
    columnar = {name: [r[name] for r in records(rows)] for name in rows.columns}
    assert client.post("/v1/models/churn:predict", json={"inputs": columnar}).json()["predictions"] == want


def _named_inputs(frame: pd.DataFrame, schema: Any) -> list[dict[str, Any]]:
    return [{"name": c.name, "datatype": c.v2_datatype, "shape": [len(frame)], "data": [r[c.name] for r in records(frame)]}
            for c in schema.columns]


def test_v2_json_named_inputs_with_both_outputs(client: TestClient, server: Any, churn: Any, rows: pd.DataFrame) -> None:
    reply = client.post("/v2/models/churn/infer", json={"inputs": _named_inputs(rows, server.versions.default.schema)})
    assert reply.status_code == 200, reply.text
    outputs = {o["name"]: o for o in reply.json()["outputs"]}
    assert outputs["predict"]["data"] == expected(churn, rows)
    proba = np.array(outputs["predict_proba"]["data"]).reshape(len(rows), 2)
    np.testing.assert_allclose(proba, churn[1].predict_proba(rows), rtol=1e-12)


def test_v2_binary_named_inputs_built_by_tritonclient(client: TestClient, churn: Any, rows: pd.DataFrame) -> None:
    import tritonclient.http as triton

    inputs = []
    for name, datatype, values in [
        ("tenure_months", "INT64", rows["tenure_months"].to_numpy(np.int64)),
        ("monthly_charges", "FP64", rows["monthly_charges"].to_numpy(np.float64)),  # NaN: the missing value
        ("support_calls", "INT64", rows["support_calls"].to_numpy(np.int64)),
        ("contract", "BYTES", rows["contract"].to_numpy(object)),
        ("payment_method", "BYTES", rows["payment_method"].to_numpy(object)),
        ("region", "BYTES", rows["region"].to_numpy(object)),
        ("paperless_billing", "BOOL", rows["paperless_billing"].to_numpy(bool)),
        ("senior_citizen", "BOOL", rows["senior_citizen"].to_numpy(bool)),
    ]:
        tensor = triton.InferInput(name, [len(rows)], datatype)
        tensor.set_data_from_numpy(values, binary_data=True)
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput("predict", binary_data=True)]
    body, header_length = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}
    reply = client.post("/v2/models/churn/infer", content=body, headers=headers)
    assert reply.status_code == 200, reply.text
    result = triton.InferenceServerClient.parse_response_body(
        reply.content, header_length=int(reply.headers["Inference-Header-Content-Length"]))
    assert result.as_numpy("predict").tolist() == expected(churn, rows)


def test_v2_metadata_and_openapi_describe_every_column(client: TestClient, server: Any) -> None:
    schema = server.versions.default.schema
    metadata = client.get("/v2/models/churn").json()
    assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [(c.name, c.v2_datatype) for c in schema.columns]
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]}["paperless_billing"] == "BOOL"
    # Who transforms the columns: serve_app's encoder, verified against scikit-learn at load.
    assert metadata["parameters"]["column_encoder"].startswith("serve_app, numpy")
    assert server.status()["column_encoder"] == metadata["parameters"]["column_encoder"]
    record = client.get("/openapi.json").json()["components"]["schemas"]["Record"]
    assert record["required"] == schema.names
    assert record["properties"]["contract"]["type"] == "string"
    assert record["properties"]["monthly_charges"].get("nullable") is True


def test_the_stream_takes_one_record_per_line(client: TestClient, churn: Any, rows: pd.DataFrame) -> None:
    lines = [json.dumps(r) for r in records(rows)]
    lines.insert(2, json.dumps({**records(rows)[0], "contract": 5}))  # a bad line gets its own error
    reply = client.post("/predict/stream", content="\n".join(lines) + "\n", headers={"content-type": "application/x-ndjson"})
    answers = [json.loads(line) for line in reply.text.splitlines()]
    assert "contract" in answers[2]["error"] and answers[2]["line"] == 3
    del answers[2]
    assert [a["prediction"] for a in answers] == expected(churn, rows)


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"contract": 3}, ["contract", "string"]),
        ({"tenure_months": "ten"}, ["tenure_months", "integer"]),
        ({"paperless_billing": 1}, ["paperless_billing", "true"]),
        ({"contract": None}, ["contract", "null"]),
        ({"colour": "red"}, ["colour"]),
        ({"region": None, "drop": "region"}, ["region"]),
    ],
)
def test_a_bad_record_is_a_422_naming_the_column(client: TestClient, rows: pd.DataFrame, change: dict[str, Any], fragments: list[str]) -> None:
    record = dict(records(rows)[0])
    dropped = change.pop("drop", None)
    record.update(change)
    if dropped:
        del record[dropped]
    for path, body in [("/predict", {"features": record}), ("/v1/models/churn:predict", {"instances": [record]})]:
        reply = client.post(path, json=body)
        assert reply.status_code == 422, reply.text
        message = reply.json()["error"]
        for fragment in fragments:
            assert fragment in message, message


def test_unknown_categories_follow_the_model(churn: Any, rows: pd.DataFrame) -> None:
    # The churn Pipeline one-hot encodes with handle_unknown="ignore": a new region is answered.
    with TestClient(build_http_app(replica(churn[0], "churn")), raise_server_exceptions=False) as churn_client:
        record = {**records(rows)[0], "region": "region-99"}
        reply = churn_client.post("/predict", json={"features": record})
        assert reply.status_code == 200, reply.text
        assert reply.json()["prediction"] == churn[1].predict(pd.DataFrame([record]).astype(rows.dtypes.to_dict())).tolist()[0]
    # An OrdinalEncoder that raises on unknown categories: refused before the model sees it.
    with TestClient(build_http_app(replica(churn[0], "strict")), raise_server_exceptions=False) as strict_client:
        reply = strict_client.post("/predict", json={"features": {"contract": "five-year"}})
        assert reply.status_code == 422, reply.text
        assert "contract" in reply.json()["error"] and "month-to-month" in reply.json()["error"]


def test_handles_take_a_dataframe_or_records(server: Any, churn: Any, rows: pd.DataFrame) -> None:
    async def calls() -> tuple[Any, Any, Any]:
        return (await server.predict(rows), await server.predict(records(rows)), await server.predict(records(rows)[0]))

    from_frame, from_records, from_record = asyncio.run(calls())
    want = expected(churn, rows)
    assert from_frame.tolist() == want and from_records.tolist() == want and from_record.tolist() == want[:1]


def test_a_handle_stream_of_a_dataframe_is_chunked(server: Any, churn: Any, rows: pd.DataFrame) -> None:
    async def chunks() -> list[list[Any]]:
        return [chunk.tolist() async for chunk in server.predict_stream(rows, chunk_rows=5)]

    got = asyncio.run(chunks())
    assert [len(chunk) for chunk in got] == [5, 5, 5, 1]
    assert sum(got, []) == expected(churn, rows)


def test_typed_requests_are_batched_across_requests(churn: Any, rows: pd.DataFrame) -> None:
    server = replica(churn[0], "churn")
    server.reconfigure({"max_batch_size": 64, "batch_wait_timeout_s": 0.05})

    async def concurrent() -> list[Any]:
        return await asyncio.gather(*(server.predict(records(rows.iloc[[i]])) for i in range(8)))

    answers = asyncio.run(concurrent())
    assert [a.tolist()[0] for a in answers] == expected(churn, rows.iloc[:8])
    batches = server.ledger.batches()
    assert batches["requests"] == 8, batches
    assert batches["batches"] < 8, batches  # fewer model calls than requests


def test_a_typed_model_refuses_a_matrix_saying_what_it_takes(churn: Any) -> None:
    predictor = Predictor.load(churn[0], "churn")
    assert predictor.typed
    with pytest.raises(InvalidInput, match="takes named columns"):
        predictor.validate([[1.0, 2.0]])


def test_an_all_numeric_model_takes_one_named_input_per_feature(tmp_path: Path) -> None:
    from sklearn.datasets import load_iris

    from serve_app.model.training import save_fitted

    iris = load_iris()
    model = LogisticRegression(max_iter=500).fit(iris.data, iris.target)
    store = ModelStore(tmp_path / "models")
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    save_fitted(store, model, name="iris", feature_names=names, compile=False)
    inputs = [{"name": n, "datatype": "FP64", "shape": [3], "data": iris.data[[0, 60, 120], i].tolist()} for i, n in enumerate(names)]
    with TestClient(build_http_app(replica(store.root, "iris")), raise_server_exceptions=False) as iris_client:
        reply = iris_client.post("/v2/models/iris/infer", json={"inputs": inputs, "outputs": [{"name": "predict"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["outputs"][0]["data"] == model.predict(iris.data[[0, 60, 120]]).tolist()
        wrong = iris_client.post("/v2/models/iris/infer", json={"inputs": [{**inputs[0], "datatype": "BYTES"}, *inputs[1:]]})
        assert wrong.status_code == 422 and "sepal_length" in wrong.json()["error"], wrong.text
        two_tensors = iris_client.post("/v2/models/iris/infer", json={"inputs": [{"name": "a", "datatype": "FP64", "shape": [1, 4], "data": [1, 2, 3, 4]}] * 2})
        assert two_tensors.status_code == 422 and "exactly one tensor" in two_tensors.json()["error"], two_tensors.text


def test_more_records_than_max_rows_is_a_413(churn: Any, rows: pd.DataFrame) -> None:
    with TestClient(build_http_app(replica(churn[0], "churn", max_rows=5)), raise_server_exceptions=False) as small:
        reply = small.post("/predict", json={"features": records(rows.head(6))})
        assert reply.status_code == 413 and "limit is 5" in reply.json()["error"], reply.text
        assert small.post("/predict", json={"features": records(rows.head(5))}).status_code == 200
