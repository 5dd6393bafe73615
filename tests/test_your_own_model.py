"""The README's "Serve your own model", end to end, as a user runs it (issue 16's must-show).

A Pipeline (ColumnTransformer: OneHotEncoder on strings, a scaler on numbers; then
HistGradientBoosting) fitted on a DataFrame with strings, booleans and NaN, saved with
`joblib.dump` in a directory outside the project, published with the README's
`serve-app models import` and served with its `make run MODEL=...`. Every protocol (/predict
records, KServe V1 records, OIP V2 named inputs with tritonclient in binary and JSON, a Ray
handle with a DataFrame) answers what the model's own `predict` answers on the same rows; bad
records get a 422 naming the column; traffic shifted on one categorical column is drift on
that column only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import joblib
import numpy as np
import pandas as pd
import pytest

from .readme import blocks_in, commands_with_answers, on_port, record
from .test_readme import PORT, MakeRun, copy_of_repo, readme_exports, run_bounded, run_readme, user_env

pytestmark = [pytest.mark.ray, pytest.mark.scenario]
SECTION = "## Serve your own model"
MODEL = "my-churn"
TARGET = "churned"
ROWS = 60  # rows each protocol is asked about


@pytest.fixture(scope="module")
def notebook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's notebook block, run in a directory of its own, outside the project."""
    directory = tmp_path_factory.mktemp("notebook")
    (block, _tritonclient) = blocks_in(SECTION, "python")
    result = run_bounded([sys.executable, "-c", block], cwd=directory, env=user_env(), timeout_s=180)
    assert result.returncode == 0, result.stderr[-3000:]
    record(block)
    assert {p.name for p in directory.iterdir()} >= {"churn_model.joblib", "churn_train.csv", "churn_test.csv"}
    return directory


@pytest.fixture(scope="module")
def served(notebook: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    repo = copy_of_repo(tmp_path_factory.mktemp("clone"))
    (publish, serve) = [command for command, _ in commands_with_answers(blocks_in(SECTION, "bash")[0])]
    files = {name: str(notebook / name) for name in ("churn_model.joblib", "churn_train.csv", "churn_test.csv")}
    published = run_readme(publish, repo, files)
    assert published.returncode == 0, (published.stdout, published.stderr)
    assert f"stored {MODEL} v1" in published.stdout and "contract" in published.stdout, published.stdout
    test = pd.read_csv(notebook / "churn_test.csv")
    probe = ("/predict", {"features": json.loads(test.drop(columns=TARGET).head(1).to_json(orient="records"))[0]})
    make_args = tuple(serve.split()[2:])
    assert serve.split()[:2] == ["make", "run"] and make_args == (f"MODEL={MODEL}",), serve
    with MakeRun(repo, make_args, probe) as run:
        record(serve)
        model = joblib.load(notebook / "churn_model.joblib")  # the test's own file: it made it
        features = test.drop(columns=TARGET)
        yield {"repo": repo, "run": run, "model": model, "features": features, "url": f"http://127.0.0.1:{PORT}"}
        run.assert_clean_stop()


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records"))  # NaN -> null, as a client sends it


def _rows(served: dict[str, Any], seed: int) -> tuple[pd.DataFrame, list[Any]]:
    features = served["features"]
    picked = features.sample(ROWS, random_state=seed).reset_index(drop=True)
    assert picked["monthly_charges"].isna().any() or features["monthly_charges"].isna().sum() == 0
    return picked, served["model"].predict(picked).tolist()


def test_the_readme_commands_answer_as_shown(served: dict[str, Any]) -> None:
    (block,) = blocks_in(SECTION, "bash")[1:]
    shown = 0
    for command, answer in commands_with_answers(block):
        result = run_readme(command, served["repo"])
        assert result.returncode == 0, (command, result.stderr)
        body = json.loads(result.stdout)
        if answer is not None:
            assert body == json.loads(answer), (command, body)
            shown += 1
        else:  # the V2 model metadata: one named input per column, with its datatype
            inputs = {i["name"]: i["datatype"] for i in body["inputs"]}
            assert inputs == {
                "tenure_months": "INT64", "monthly_charges": "FP64", "support_calls": "INT64", "contract": "BYTES",
                "payment_method": "BYTES", "region": "BYTES", "paperless_billing": "BOOL", "senior_citizen": "BOOL",
            }, body
    assert shown == 3


def test_the_readme_tritonclient_example_runs(served: dict[str, Any]) -> None:
    (_notebook, block) = blocks_in(SECTION, "python")
    result = run_bounded([sys.executable, "-c", on_port(block, PORT)], cwd=served["repo"], env=user_env(), timeout_s=120)
    assert result.returncode == 0, result.stderr[-3000:]
    record(block)


def test_predict_and_kserve_v1_records_answer_as_the_model(served: dict[str, Any]) -> None:
    rows, expected = _rows(served, seed=1)
    url = served["url"]
    reply = httpx.post(f"{url}/predict", json={"features": _records(rows)}, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"] == expected
    singles = [httpx.post(f"{url}/predict", json={"features": r}, timeout=30).json()["prediction"] for r in _records(rows)[:10]]
    assert singles == expected[:10]
    v1 = httpx.post(f"{url}/v1/models/{MODEL}:predict", json={"instances": _records(rows)}, timeout=30)
    assert v1.status_code == 200, v1.text
    assert v1.json()["predictions"] == expected


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_v2_named_inputs_from_tritonclient_answer_as_the_model(served: dict[str, Any], binary: bool) -> None:
    import tritonclient.http as triton

    rows, expected = _rows(served, seed=2)
    datatypes = {"tenure_months": ("INT64", np.int64), "monthly_charges": ("FP64", np.float64), "support_calls": ("INT64", np.int64),
                 "contract": ("BYTES", object), "payment_method": ("BYTES", object), "region": ("BYTES", object),
                 "paperless_billing": ("BOOL", bool), "senior_citizen": ("BOOL", bool)}
    inputs = []
    for name, (datatype, dtype) in datatypes.items():
        tensor = triton.InferInput(name, [len(rows)], datatype)
        tensor.set_data_from_numpy(rows[name].to_numpy(dtype), binary_data=binary)
        inputs.append(tensor)
    client = triton.InferenceServerClient(url=f"127.0.0.1:{PORT}")
    outputs = [triton.InferRequestedOutput("predict", binary_data=binary), triton.InferRequestedOutput("predict_proba", binary_data=binary)]
    result = client.infer(MODEL, inputs, outputs=outputs)
    assert result.as_numpy("predict").tolist() == expected
    np.testing.assert_allclose(result.as_numpy("predict_proba"), served["model"].predict_proba(rows), rtol=1e-9)


def test_a_handle_takes_a_dataframe(served: dict[str, Any], tmp_path: Path) -> None:
    rows, expected = _rows(served, seed=3)
    rows.to_parquet(tmp_path / "rows.parquet")
    script = (
        "import json, sys, ray, pandas as pd\n"
        "from serve_app.client import model_handle\n"
        "ray.init(address='auto')\n"
        "frame = pd.read_parquet(sys.argv[1])\n"
        "print(json.dumps(model_handle().predict.remote(frame).result().tolist()))\n"
    )
    result = run_bounded([sys.executable, "-c", script, str(tmp_path / "rows.parquet")], cwd=served["repo"], timeout_s=180,
                         env=user_env(**readme_exports(), RAY_ADDRESS=served["run"].ray_address()))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.parametrize(
    ("change", "column"),
    [({"contract": 2}, "contract"), ({"paperless_billing": "yes"}, "paperless_billing"), ({"support_calls": None}, "support_calls"),
     ({"tenure_months": 3.5}, "tenure_months"), ({"colour": "red"}, "colour")],
)
def test_a_bad_record_is_a_422_naming_the_column(served: dict[str, Any], change: dict[str, Any], column: str) -> None:
    record_ = {**_records(served["features"].head(1))[0], **change}
    for path, body in [("/predict", {"features": record_}), (f"/v1/models/{MODEL}:predict", {"instances": [record_]})]:
        reply = httpx.post(f"{served['url']}{path}", json=body, timeout=30)
        assert reply.status_code == 422, reply.text
        assert column in reply.json()["error"], reply.text
    # and the replica goes on answering
    assert httpx.post(f"{served['url']}/predict", json={"features": _records(served["features"].head(1))[0]}, timeout=30).status_code == 200


def test_traffic_shifted_on_one_categorical_column_is_drift_on_that_column_only(served: dict[str, Any]) -> None:
    url, features = served["url"], served["features"]
    rng = np.random.default_rng(5)
    window = 1000  # configs/local.yaml's drift_window, per replica; it runs 2 replicas

    def send(frame: pd.DataFrame) -> None:
        for start in range(0, len(frame), 200):
            reply = httpx.post(f"{url}/predict", json={"features": _records(frame.iloc[start : start + 200])}, timeout=30)
            assert reply.status_code == 200, reply.text

    def drift() -> dict[str, Any]:
        reply = httpx.get(f"{url}/v2/models/{MODEL}/drift", timeout=30)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def latest() -> dict[str, Any]:
        return drift()["versions"]["1"]

    send(features.iloc[rng.integers(0, len(features), 3 * 2 * window)].reset_index(drop=True))
    calm = _wait(lambda: (d := latest())["rows"] >= 2 * window and d, "both windows full")
    assert calm["status"] != "drift", calm
    shifted = features.iloc[rng.integers(0, len(features), 2 * 2 * window)].reset_index(drop=True)
    shifted["contract"] = "two-year"
    send(shifted)
    result = _wait(lambda: (d := latest())["status"] == "drift" and d, "drift on contract")
    drifting = {name for name, column in result["features"].items() if column["status"] == "drift"}
    assert drifting == {"contract"}, result
    assert set(result["features"]) == set(features.columns), result


def _wait(check: Any, what: str, timeout_s: float = 60) -> Any:
    from .conftest import wait_for

    return wait_for(check, timeout_s=timeout_s, what=what)
