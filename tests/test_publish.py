"""Publishing a model you trained yourself (model/publish.py), `serve-app models import` and
`serve-app train --dataset churn`: real small models in tmp_path, no Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.dummy import DummyRegressor
from sklearn.ensemble import RandomForestClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import serve_app
from serve_app.model.churn import BOOLEAN_COLUMNS, INTEGER_COLUMNS, NUMBER_COLUMNS, STRING_COLUMNS, TARGET, churn_frame, churn_pipeline, fit_churn
from serve_app.model.publish import publish
from serve_app.model.schema import UnservableModel
from serve_app.model.store import ModelStore
from serve_app.ops.cli import main

# Small enough that fitting and publishing take well under a second.
ROWS = 1200


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return churn_frame(ROWS)


@pytest.fixture(scope="module")
def train_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.iloc[:900]


@pytest.fixture(scope="module")
def test_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.iloc[900:]


@pytest.fixture(scope="module")
def churn_model(train_rows: pd.DataFrame) -> Pipeline:
    return fit_churn(train_rows)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- publish ------------------------------------------------------------------------------


def test_publishing_the_churn_pipeline_records_its_columns(
    store: ModelStore, churn_model: Pipeline, train_rows: pd.DataFrame, test_rows: pd.DataFrame
) -> None:
    manifest = publish(churn_model, name="churn", sample=train_rows, target=TARGET, test=test_rows, store=store)
    assert (manifest.name, manifest.version, manifest.format, manifest.dataset) == ("churn", "1", "skops", "custom")
    assert manifest.estimator == "sklearn.pipeline.Pipeline"
    assert manifest.task == "classification" and manifest.classes == [0, 1]
    assert manifest.outputs == ["predict", "predict_proba"]
    assert (manifest.n_train, manifest.n_test) == (900, 300)
    assert manifest.input_schema is not None and manifest.typed
    kinds = {column.name: column.kind for column in manifest.input_schema.columns}
    assert kinds == {
        **{c: "number" for c in NUMBER_COLUMNS}, **{c: "integer" for c in INTEGER_COLUMNS},
        **{c: "string" for c in STRING_COLUMNS}, **{c: "boolean" for c in BOOLEAN_COLUMNS},
    }
    assert manifest.feature_names == list(train_rows.columns.drop(TARGET))
    assert manifest.input_schema.column("monthly_charges").nullable  # type: ignore[union-attr]
    assert set(manifest.training_stats) == {*NUMBER_COLUMNS, *INTEGER_COLUMNS}
    assert set(manifest.category_stats) == {*STRING_COLUMNS, *BOOLEAN_COLUMNS}
    assert set(manifest.category_stats["paperless_billing"].frequencies) == {"true", "false"}
    assert set(manifest.category_stats["contract"].frequencies) == {"month-to-month", "one-year", "two-year"}
    expected = churn_model.predict(test_rows.drop(columns=[TARGET]))
    assert manifest.metrics["accuracy"] == pytest.approx(float(np.mean(expected == test_rows[TARGET])))
    assert 0 < manifest.metrics["f1_macro"] <= 1
    assert manifest.runtime == "sklearn" and manifest.compiled_file is None
    assert "typed columns" in manifest.runtime_reason and "all-numeric" in manifest.runtime_reason
    assert store.aliases("churn")["production"] == "1"


def test_the_stored_version_loads_back_and_predicts_the_same(
    store: ModelStore, churn_model: Pipeline, train_rows: pd.DataFrame, test_rows: pd.DataFrame
) -> None:
    publish(churn_model, name="churn", sample=train_rows.drop(columns=[TARGET]), store=store)
    loaded, manifest = store.load_verified("churn")
    rows = test_rows.drop(columns=[TARGET])
    np.testing.assert_array_equal(loaded.predict(rows), churn_model.predict(rows))
    assert manifest.metrics == {} and manifest.n_test == 0


def test_serve_app_publish_is_the_function() -> None:
    assert serve_app.publish is publish
    assert "publish" in serve_app.__all__


def test_an_all_numeric_dataframe_model_is_compiled(store: ModelStore) -> None:
    rng = np.random.default_rng(0)
    features = pd.DataFrame(rng.normal(size=(200, 3)), columns=["a", "b", "c"])
    labels = (features["a"] + features["b"] > 0).astype(int)
    model = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0).fit(features, labels)
    manifest = publish(model, name="numeric", sample=features.assign(y=labels), target="y", store=store)
    assert manifest.runtime == "onnxruntime" and manifest.compiled_file == "model.onnx", manifest.runtime_reason
    assert manifest.input_schema is not None and manifest.input_schema.all_numeric and not manifest.typed
    assert [c.kind for c in manifest.input_schema.columns] == ["number"] * 3
    assert set(manifest.training_stats) == {"a", "b", "c"} and manifest.category_stats == {}


# ---- refusals -----------------------------------------------------------------------------


def refused(excinfo: pytest.ExceptionInfo[UnservableModel]) -> str:
    return " | ".join(excinfo.value.reasons)


def test_an_unfitted_pipeline_is_refused(store: ModelStore, train_rows: pd.DataFrame) -> None:
    with pytest.raises(UnservableModel) as excinfo:
        publish(churn_pipeline(), name="churn", sample=train_rows, target=TARGET, store=store)
    assert "is not fitted: call fit(...) before publishing it" in refused(excinfo)
    assert store.names() == []


def test_a_transformer_alone_is_refused(store: ModelStore, train_rows: pd.DataFrame) -> None:
    scaler = StandardScaler().fit(train_rows[["tenure_months"]])
    with pytest.raises(UnservableModel) as excinfo:
        publish(scaler, name="scaler", sample=train_rows[["tenure_months"]], store=store)
    assert "has no predict method" in refused(excinfo)


def test_a_sample_missing_a_column_is_refused(
    store: ModelStore, churn_model: Pipeline, train_rows: pd.DataFrame
) -> None:
    with pytest.raises(UnservableModel) as excinfo:
        publish(churn_model, name="churn", sample=train_rows.drop(columns=["region"]), target=TARGET, store=store)
    assert "lacks column(s) ['region']" in refused(excinfo)
    assert store.names() == []


def test_a_sample_that_is_not_a_dataframe_is_refused(store: ModelStore, churn_model: Pipeline) -> None:
    with pytest.raises(UnservableModel) as excinfo:
        publish(churn_model, name="churn", sample=np.zeros((3, 8)), store=store)  # type: ignore[arg-type]
    assert "must be a pandas DataFrame or the path of a .csv or .parquet file, got ndarray" in refused(excinfo)


def test_a_test_set_without_its_target_is_refused(
    store: ModelStore, churn_model: Pipeline, train_rows: pd.DataFrame, test_rows: pd.DataFrame
) -> None:
    with pytest.raises(UnservableModel) as excinfo:
        publish(churn_model, name="churn", sample=train_rows, target=TARGET, test=test_rows.drop(columns=[TARGET]), store=store)
    assert f"no target column {TARGET!r}" in refused(excinfo)


class IndexEcho(DummyRegressor):
    """Predicts each row's index label: an input the server never passes on."""

    def predict(self, X: Any, return_std: bool = False) -> Any:  # noqa: N803 - scikit-learn's name
        return np.asarray(X.index, dtype=np.float64)


def test_a_model_that_answers_requests_differently_is_refused(store: ModelStore) -> None:
    features = pd.DataFrame({"a": np.arange(10.0)}, index=np.arange(100, 110))
    model = IndexEcho().fit(features, np.zeros(10))
    with pytest.raises(UnservableModel) as excinfo:
        publish(model, name="echo", sample=features, store=store)
    assert "decoded as the server decodes requests, predict differently on 10 of 10 rows" in refused(excinfo)
    assert "rows 100, 101, 102, 103, 104 and 5 more" in refused(excinfo)
    assert store.names() == []


def test_a_class_outside_the_allow_list_is_refused(store: ModelStore) -> None:
    features = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0]})
    model = KNeighborsClassifier(n_neighbors=1).fit(features, [0, 0, 1, 1])
    with pytest.raises(UnservableModel) as excinfo:
        publish(model, name="knn", sample=features, store=store)
    assert "cannot be stored safely" in refused(excinfo) and "KNeighborsClassifier" in refused(excinfo)
    assert store.names() == []


# ---- serve-app models import ----------------------------------------------------------------


def _leave_marker(path: str) -> None:
    Path(path).write_text("unpickled")


class Booby:
    """A pickle that, when loaded, writes a file: what any pickle can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_leave_marker, (str(self.marker),))


def test_import_without_trust_pickle_never_loads_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    joblib.dump(Booby(marker), tmp_path / "model.joblib")
    (tmp_path / "train.csv").write_text("a\n1\n")
    code, out, err = run(capsys, "models", "import", str(tmp_path / "model.joblib"), "--name", "mine",
                         "--sample", str(tmp_path / "train.csv"), "--store", str(tmp_path / "models"))
    assert code == 2 and out == ""
    assert "runs whatever code it holds" in err and "--trust-pickle" in err and "servers never unpickle" in err
    assert "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "models").exists()


def test_import_with_trust_pickle_stores_a_safe_version(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, churn_model: Pipeline, train_rows: pd.DataFrame,
    test_rows: pd.DataFrame,
) -> None:
    joblib.dump(churn_model, tmp_path / "model.joblib")
    train_rows.to_csv(tmp_path / "train.csv", index=False)
    test_rows.to_parquet(tmp_path / "test.parquet")
    store = ModelStore(tmp_path / "models")
    code, out, err = run(capsys, "models", "import", str(tmp_path / "model.joblib"), "--name", "mine",
                         "--sample", str(tmp_path / "train.csv"), "--target", TARGET,
                         "--test", str(tmp_path / "test.parquet"), "--store", str(store.root), "--trust-pickle")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("stored mine v1 (Pipeline on custom, skops; accuracy=")
    assert "runtime: scikit-learn; served by scikit-learn: typed columns" in lines[2]
    assert lines[3].split() == ["COLUMN", "KIND", "NULLABLE", "CATEGORIES"]
    assert "contract           string   no        3, unknown allowed" in out
    assert "monthly_charges    number   yes       -" in out
    manifest = store.manifest("mine")
    assert manifest.format == "skops" and manifest.n_test == len(test_rows)
    loaded, _ = store.load_verified("mine")
    rows = test_rows.drop(columns=[TARGET])
    np.testing.assert_array_equal(loaded.predict(rows), churn_model.predict(rows))


def test_import_of_an_unservable_model_exits_1_with_every_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, churn_model: Pipeline, train_rows: pd.DataFrame
) -> None:
    joblib.dump(churn_model, tmp_path / "model.joblib")
    train_rows.drop(columns=["region", "contract"]).assign(extra=1).to_csv(tmp_path / "train.csv", index=False)
    code, out, err = run(capsys, "models", "import", str(tmp_path / "model.joblib"), "--name", "mine",
                         "--sample", str(tmp_path / "train.csv"), "--target", TARGET,
                         "--store", str(tmp_path / "models"), "--trust-pickle")
    assert code == 1 and out == ""
    assert "Traceback" not in err
    assert "serve-app: error: cannot publish mine:\n  - " in err
    assert "lacks column(s) ['contract', 'region']" in err and "does not know" in err and "['extra']" in err
    assert ModelStore(tmp_path / "models").names() == []


# ---- serve-app train --dataset churn -----------------------------------------------------------


def test_train_churn_stores_a_version_named_churn(capsys: pytest.CaptureFixture[str], store: ModelStore) -> None:
    code, out, err = run(capsys, "train", "--dataset", "churn", "--store", str(store.root))
    assert code == 0, err
    assert err.startswith("fitting the churn Pipeline on 3750 training rows")
    assert out.startswith("stored churn v1 (Pipeline on churn, skops; accuracy=")
    manifest = store.manifest("churn")
    assert (manifest.dataset, manifest.n_train, manifest.n_test) == ("churn", 3750, 1250)
    assert manifest.metrics["accuracy"] > 0.7
    assert manifest.typed and set(manifest.category_stats) == {*STRING_COLUMNS, *BOOLEAN_COLUMNS}


def test_train_churn_refuses_an_estimator(capsys: pytest.CaptureFixture[str], store: ModelStore) -> None:
    code, out, err = run(capsys, "train", "--dataset", "churn", "--estimator", "random_forest", "--store", str(store.root))
    assert code == 2 and out == "" and "trains its own Pipeline" in err
    assert store.names() == []
