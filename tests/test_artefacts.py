"""Model files (skops/joblib), the manifest written beside them, and offline training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import joblib
import numpy as np
import pytest
import sklearn
import skops
from sklearn import datasets
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split

from serve_app.model import formats as artefacts
from serve_app.errors import ModelLoadError
from serve_app.model.manifest import MANIFEST_FILENAME, QUANTILES, feature_stats, sha256_of
from serve_app.model.store import ModelStore
from serve_app.model.training import save_fitted, train

from .conftest import fit_dummy

if TYPE_CHECKING:
    import pandas as pd


class HomeMadeClassifier(ClassifierMixin, BaseEstimator):
    """A type outside the skops allow-list (it lives in the tests package)."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> "HomeMadeClassifier":
        self.classes_ = np.unique(y)
        self.n_features_in_ = x.shape[1]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), self.classes_[0])


# ---- artefacts ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["skops", "joblib"])
def test_dump_and_load_round_trip(tmp_path: Path, fmt: str) -> None:
    model = fit_dummy(classes=("a", "b", "c"))
    path = tmp_path / f"model.{fmt}"
    artefacts.dump(model, path, fmt)  # type: ignore[arg-type]
    loaded = artefacts.load(path, fmt)  # type: ignore[arg-type]
    rows = np.zeros((3, 4))
    assert loaded.predict(rows).tolist() == model.predict(rows).tolist()


def test_skops_refuses_types_outside_the_allow_list(tmp_path: Path) -> None:
    path = tmp_path / "model.skops"
    artefacts.dump(HomeMadeClassifier().fit(np.zeros((2, 3)), np.array([0, 1])), path, "skops")
    with pytest.raises(ModelLoadError, match=r"contains types outside the allow-list \(tests\.test_artefacts\.HomeMadeClassifier\)"):
        artefacts.load(path, "skops")


@pytest.mark.parametrize("fmt", ["skops", "joblib"])
def test_corrupt_files_are_load_errors(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"model.{fmt}"
    path.write_bytes(b"this is not a model")
    with pytest.raises(ModelLoadError) as info:
        artefacts.load(path, fmt)  # type: ignore[arg-type]
    assert str(path) in info.value.message
    assert info.value.status_code == 500


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model format 'pickle'; use one of skops, joblib"):
        artefacts.dump(fit_dummy(), tmp_path / "m", "pickle")  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match="unknown model format 'pickle'"):
        artefacts.load(tmp_path / "m", "pickle")  # type: ignore[arg-type]


# ---- the manifest of the default model -----------------------------------------------------


@pytest.fixture(scope="module")
def iris_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """conftest's iris_store, trained once for the module's read-only tests."""
    store = ModelStore(tmp_path_factory.mktemp("iris") / "models")
    train(store)
    return store


def test_iris_manifest(iris_store: ModelStore) -> None:
    manifest = iris_store.manifest("iris", "1")
    path = iris_store.version_dir("iris", "1") / manifest.model_file
    assert manifest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_of(path)
    assert manifest.size_bytes == path.stat().st_size
    assert manifest.format == "skops" and manifest.model_file == "model.skops"
    assert manifest.versions["sklearn"] == sklearn.__version__
    assert manifest.versions["joblib"] == joblib.__version__
    assert manifest.versions["numpy"] == np.__version__
    assert manifest.versions["skops"] == skops.__version__
    assert manifest.estimator == "sklearn.linear_model._logistic.LogisticRegression"
    assert manifest.task == "classification"
    assert manifest.feature_names == list(datasets.load_iris().feature_names)
    assert manifest.n_features == 4
    assert manifest.classes == [0, 1, 2]
    assert manifest.outputs == ["predict", "predict_proba"]
    assert manifest.dataset == "iris"
    assert manifest.params["max_iter"] == 1000
    assert manifest.n_train == 112 and manifest.n_test == 38
    assert set(manifest.metrics) == {"accuracy"}
    assert 0.9 <= manifest.metrics["accuracy"] <= 1.0
    assert manifest.created_at and manifest.created_by
    # The file on disk is the manifest the store returns.
    on_disk = json.loads((path.parent / MANIFEST_FILENAME).read_text())
    assert on_disk == manifest.model_dump(mode="json")


def test_iris_training_stats_describe_the_training_split(iris_store: ModelStore) -> None:
    manifest = iris_store.manifest("iris", "1")
    iris = datasets.load_iris()
    x_train, _, _, _ = train_test_split(iris.data, iris.target, test_size=0.25, random_state=0, stratify=iris.target)
    assert sorted(manifest.training_stats) == sorted(manifest.feature_names)
    for index, name in enumerate(manifest.feature_names):
        stats = manifest.training_stats[name]
        column = x_train[:, index]
        assert stats.mean == pytest.approx(column.mean())
        assert stats.std == pytest.approx(column.std())
        assert (stats.min, stats.max) == (column.min(), column.max())
        assert set(stats.quantiles) == {str(q) for q in QUANTILES}
        assert stats.quantiles["0.5"] == pytest.approx(np.median(column))
        assert list(stats.quantiles.values()) == sorted(stats.quantiles.values())
        edges = np.array(stats.bin_edges)
        assert np.all(np.diff(edges) > 0)
        assert edges[0] == column.min() and edges[-1] == column.max()
        assert len(stats.bin_fractions) == len(edges) - 1
        assert sum(stats.bin_fractions) == pytest.approx(1.0)
        counts, _ = np.histogram(column, bins=edges)
        assert stats.bin_fractions == pytest.approx((counts / len(column)).tolist())
        assert len(stats.sample) == len(column) == 112  # fewer rows than the sample size
        assert stats.sample == sorted(stats.sample)
        assert sorted(stats.sample) == sorted(column.tolist())


def test_feature_stats_of_a_constant_and_a_long_column() -> None:
    rng = np.random.default_rng(0)
    constant = feature_stats(np.full(50, 3.0), rng)
    assert constant.bin_edges == [2.5, 3.5] and constant.bin_fractions == [1.0]
    assert constant.std == 0.0
    long = feature_stats(rng.normal(size=5000), rng)
    assert len(long.sample) == 256
    assert len(long.bin_fractions) == 10
    assert sum(long.bin_fractions) == pytest.approx(1.0)


# ---- training ------------------------------------------------------------------------------


def test_train_other_dataset_estimator_and_format(store: ModelStore) -> None:
    manifest = train(store, name="wine", dataset="wine", estimator="random_forest", fmt="joblib")
    assert manifest.estimator.endswith("RandomForestClassifier")
    assert manifest.format == "joblib" and manifest.n_features == 13
    assert manifest.classes == [0, 1, 2]
    model, _ = store.load_verified("wine")
    wine = datasets.load_wine()
    assert (model.predict(wine.data) == wine.target).mean() > 0.9


def test_train_a_regressor(store: ModelStore) -> None:
    manifest = train(store, name="diabetes", dataset="diabetes")
    assert manifest.task == "regression"
    assert manifest.classes is None
    assert manifest.outputs == ["predict"]
    assert set(manifest.metrics) == {"r2", "mae"}


def test_train_refuses_unknown_choices(store: ModelStore) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of iris, wine"):
        train(store, dataset="mnist")
    with pytest.raises(ValueError, match="estimator 'linear_regression' does not fit the classification dataset 'iris'"):
        train(store, estimator="linear_regression")
    assert store.names() == []


def test_save_fitted_without_reference_data(store: ModelStore) -> None:
    manifest = save_fitted(store, fit_dummy(n_features=3), name="tiny")
    assert manifest.feature_names == ["x0", "x1", "x2"]
    assert manifest.training_stats == {}
    assert manifest.dataset == "custom"


# ---- gradient boosting and tabular pipelines (#16, #17), in both formats -----------------------


def _numeric_rows() -> np.ndarray:
    rows = np.random.default_rng(0).normal(size=(60, 3))
    rows[::7, 0] = np.nan  # HistGradientBoosting handles missing values itself
    return rows


def tabular_frame() -> "pd.DataFrame":
    import pandas as pd

    rows = _numeric_rows()
    return pd.DataFrame({
        "plan": np.array(["basic", "pro", "team"])[np.arange(60) % 3],
        "region": np.array(["north", "south"])[np.arange(60) % 2],
        "city": np.array(["paris", "lyon", "nice", "lille"])[np.arange(60) % 4],
        "active": np.arange(60) % 4 == 0,
        "tenure": rows[:, 0],  # with NaN
        "spend": rows[:, 1],
        "age": rows[:, 2] * 10 + 40,
        "unused": np.arange(60.0),
    })


def tabular_pipeline(head: Any) -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MinMaxScaler, OneHotEncoder, OrdinalEncoder, StandardScaler

    columns = ColumnTransformer([
        ("onehot", OneHotEncoder(handle_unknown="ignore"), ["city", "active"]),
        ("strict", OneHotEncoder(handle_unknown="error"), ["region"]),
        ("ordinal", OrdinalEncoder(), ["plan"]),
        ("impute", SimpleImputer(), ["tenure"]),
        ("scale", StandardScaler(), ["spend"]),
        ("minmax", MinMaxScaler(), ["age"]),
        ("keep", "passthrough", ["spend"]),
        ("ignored", "drop", ["unused"]),
    ])
    return Pipeline([("columns", columns), ("model", head)])


def _hgb_models() -> dict[str, tuple[Any, Any]]:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    x = _numeric_rows()
    binary, three = (np.nan_to_num(x[:, 1]) > 0).astype(int), np.arange(60) % 3
    target = np.nan_to_num(x[:, 1])
    frame = tabular_frame()
    return {
        "hgb-binary": (HistGradientBoostingClassifier(max_iter=5).fit(x, binary), x),
        "hgb-multiclass": (HistGradientBoostingClassifier(max_iter=5).fit(x, np.array(["a", "b", "c"])[three]), x),
        "hgb-squared-error": (HistGradientBoostingRegressor(max_iter=5).fit(x, target), x),
        "hgb-poisson": (HistGradientBoostingRegressor(max_iter=5, loss="poisson").fit(x, np.abs(target)), x),
        "hgb-gamma": (HistGradientBoostingRegressor(max_iter=5, loss="gamma").fit(x, np.abs(target) + 0.1), x),
        "hgb-absolute-error": (HistGradientBoostingRegressor(max_iter=5, loss="absolute_error").fit(x, target), x),
        "hgb-quantile": (HistGradientBoostingRegressor(max_iter=5, loss="quantile", quantile=0.3).fit(x, target), x),
        "pipeline-hgb": (tabular_pipeline(HistGradientBoostingClassifier(max_iter=5)).fit(frame, binary), frame),
        "pipeline-logistic": (tabular_pipeline(
            __import__("sklearn.linear_model", fromlist=["LogisticRegression"]).LogisticRegression()).fit(frame, three),
            frame),
    }


@pytest.mark.parametrize("fmt", ["skops", "joblib"])
@pytest.mark.parametrize("name", list(_hgb_models()))
def test_gradient_boosting_and_tabular_pipelines_round_trip(tmp_path: Path, fmt: str, name: str) -> None:
    model, rows = _hgb_models()[name]
    path = tmp_path / f"model.{fmt}"
    artefacts.dump(model, path, fmt)  # type: ignore[arg-type]
    artefacts.check(path.read_bytes(), fmt, "model")  # type: ignore[arg-type]
    loaded = artefacts.load(path, fmt)  # type: ignore[arg-type]
    assert np.array_equal(loaded.predict(rows), model.predict(rows))
    if hasattr(model, "predict_proba"):
        assert np.array_equal(loaded.predict_proba(rows), model.predict_proba(rows))
    if name.startswith("pipeline"):
        columns = loaded.named_steps["columns"]
        assert columns.feature_names_in_.dtype == object and list(columns.feature_names_in_) == list(rows.columns)
        unseen = rows.head(2).assign(city="brest")  # handle_unknown="ignore" still ignores it
        assert np.array_equal(loaded.predict(unseen), model.predict(unseen))


@pytest.mark.parametrize("fmt", ["skops", "joblib"])
def test_callables_in_legitimate_models_are_refused(tmp_path: Path, fmt: str) -> None:
    """Real models whose fitted state holds a function: refused, whichever function it is."""
    from sklearn.compose import ColumnTransformer, make_column_selector
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    frame, y = tabular_frame(), np.arange(60) % 2
    numeric = frame[["spend", "age"]]
    by_dtype = ColumnTransformer([("num", StandardScaler(), make_column_selector(dtype_include="number"))])
    categorical = HistGradientBoostingClassifier(max_iter=3, categorical_features=[2])
    models = {
        "make_column_selector": (Pipeline([("c", by_dtype), ("m", LogisticRegression())]).fit(numeric, y),
                                 "make_column_selector"),
        "FunctionTransformer(np.log1p)": (Pipeline([("f", FunctionTransformer(np.log1p)), ("m", LogisticRegression())])
                                          .fit(numeric.abs(), y), "log1p"),
        "FunctionTransformer(an allowed class)": (
            Pipeline([("f", FunctionTransformer(StandardScaler)), ("m", LogisticRegression())]), "func"),
        "FunctionTransformer(kw_args)": (
            Pipeline([("f", FunctionTransformer(kw_args={"copy": True})), ("m", LogisticRegression())]), "kw_args"),
        # categorical_features makes HistGradientBoosting keep a FunctionTransformer(partial(check_array)).
        "HistGradientBoosting(categorical_features)": (
            categorical.fit(np.c_[numeric.to_numpy(), np.arange(60) % 4], y), "functools.partial"),
    }
    for label, (model, named) in models.items():
        path = tmp_path / f"{label}.{fmt}"
        artefacts.dump(model, path, fmt)  # type: ignore[arg-type]
        with pytest.raises(ModelLoadError) as info:
            artefacts.load(path, fmt)  # type: ignore[arg-type]
        assert named in info.value.message, (label, info.value.message)
