"""The in-process model runtime: verified loading, input validation, and exact predictions."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np
import pytest
from sklearn import datasets
from sklearn.linear_model import LinearRegression, LogisticRegression

from serve_app import Predictor
from serve_app.errors import InvalidInput, ModelLoadError, NotFound, PayloadTooLarge, ServeAppError
from serve_app.model.manifest import MANIFEST_FILENAME
from serve_app.model.store import ModelStore
from serve_app.model.training import save_fitted

from .conftest import IRIS_ROWS, fit_dummy

ROW_COUNTS = [1, 2, 3, 5, 8, 16, 31, 64, 100, 255, 256, 257, 1000, 4096]


def _edit_manifest(store: ModelStore, name: str, version: str, **changes: Any) -> None:
    path = store.version_dir(name, version) / MANIFEST_FILENAME
    os.chmod(path, 0o644)  # stored files are read-only
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    store.sign_version(name, version, check=False)  # as its publisher: only the edit is tested


def _random_rows(rng: np.random.Generator, n: int, n_features: int, scale: float = 3.0) -> np.ndarray:
    return rng.normal(loc=3.0, scale=scale, size=(n, n_features))


# ---- loading --------------------------------------------------------------------------------


def test_load_by_alias_and_version(iris_store: ModelStore) -> None:
    save_fitted(iris_store, fit_dummy(), name="iris")  # v2, production stays v1
    default = Predictor.load(iris_store, "iris")
    assert (default.name, default.version, default.n_features) == ("iris", "1", 4)
    assert Predictor.load(iris_store.root, "iris", "latest").version == "2"
    assert Predictor.load(str(iris_store.root), "iris", 2).version == "2"
    assert Predictor.load(iris_store, "iris", "1").outputs == ("predict", "predict_proba")
    rows = default.validate(IRIS_ROWS)
    assert default.predict(rows).tolist() == [0, 2, 1]


def test_load_unknown_model_or_version(iris_store: ModelStore) -> None:
    with pytest.raises(NotFound, match=r"no model named 'wine'.*\(models: iris\)"):
        Predictor.load(iris_store, "wine")
    with pytest.raises(NotFound, match=r"has no version 7 \(versions: 1\)"):
        Predictor.load(iris_store, "iris", 7)


def test_tampered_model_file_is_refused(iris_store: ModelStore) -> None:
    path = iris_store.version_dir("iris", "1") / "model.skops"
    os.chmod(path, 0o644)
    with open(path, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelLoadError, match="sha256 of iris/1/model.skops is .*the file was changed after it was stored") as info:
        Predictor.load(iris_store, "iris")
    assert info.value.status_code == 500


def test_missing_model_file_is_refused(iris_store: ModelStore) -> None:
    path = iris_store.version_dir("iris", "1") / "model.skops"
    path.unlink()
    with pytest.raises(ModelLoadError, match="model file iris/1/model.skops is missing"):
        Predictor.load(iris_store, "iris")


def test_manifest_from_another_sklearn_is_refused(iris_store: ModelStore) -> None:
    manifest = iris_store.manifest("iris", "1")
    _edit_manifest(iris_store, "iris", "1", versions={**manifest.versions, "sklearn": "0.24.2"})
    with pytest.raises(ModelLoadError, match=r"saved with scikit-learn 0.24.2 but .* is installed; install scikit-learn==0.24.2 or retrain"):
        Predictor.load(iris_store, "iris")


def test_expected_features_mismatch(iris_store: ModelStore) -> None:
    assert Predictor.load(iris_store, "iris", expected_features=4).n_features == 4
    with pytest.raises(ModelLoadError, match=r"the config expects 5 features but iris v1 takes 4 \(sepal length"):
        Predictor.load(iris_store, "iris", expected_features=5)


def test_manifest_feature_count_must_match_the_model(iris_store: ModelStore) -> None:
    _edit_manifest(iris_store, "iris", "1", n_features=3)
    with pytest.raises(ModelLoadError, match="the model takes 4 features, its manifest says 3"):
        Predictor.load(iris_store, "iris")


# ---- validate ---------------------------------------------------------------------------------


@pytest.fixture
def iris(iris_store: ModelStore) -> Predictor:
    return Predictor.load(iris_store, "iris", max_rows=50)


def test_validate_accepts_lists_ints_and_float32(iris: Predictor) -> None:
    expected = np.array([[5.0, 3.0, 1.0, 0.0]])
    for rows in ([5, 3, 1, 0], [[5, 3, 1, 0]], np.array([[5, 3, 1, 0]], dtype=np.int8),
                 np.array([[5, 3, 1, 0]], dtype=np.uint64), np.array([[5.0, 3.0, 1.0, 0.0]], dtype=np.float32)):
        array = iris.validate(rows)
        assert array.dtype == np.float64 and array.flags.c_contiguous
        assert np.array_equal(array, expected)
    # A non-contiguous view is copied into a contiguous array.
    wide = np.arange(16, dtype=float).reshape(2, 8)[:, ::2]
    assert np.array_equal(iris.validate(wide), wide) and iris.validate(wide).flags.c_contiguous


@pytest.mark.parametrize(
    ("rows", "error", "message"),
    [
        ([[1, 2, 3]], InvalidInput, r"each row needs 4 features \(sepal length \(cm\), .*\), got 3"),
        ([1, 2, 3], InvalidInput, r"expected rows of 4 features \(shape \[rows, 4\]\), got shape \[3\]"),
        ([[1, 2, 3, 4, 5]], InvalidInput, "each row needs 4 features .* got 5"),
        (np.zeros((0, 4)), InvalidInput, "no rows to predict; send at least one row"),
        (np.zeros((51, 4)), PayloadTooLarge, "51 rows in one request; the limit is 50"),
        ([[1, 2, float("nan"), 4]], InvalidInput, r"row 0, feature 2 \(petal length \(cm\)\) is nan; features must be finite"),
        ([[1, 2, 3, 4], [1, float("inf"), 3, 4]], InvalidInput, r"row 1, feature 1 \(sepal width \(cm\)\) is inf"),
        ([[1, 2, 3, -float("inf")]], InvalidInput, r"row 0, feature 3 \(petal width \(cm\)\) is -inf"),
        (np.zeros((2, 2, 4)), InvalidInput, r"shape \[rows, 4\]\), got shape \[2, 2, 4\]"),
        ([["a", "b", "c", "d"]], InvalidInput, "features must be numbers, got <U1 values"),
        ([[1, "2", 3, 4]], InvalidInput, "features must be numbers"),
        ([[True, False, True, False]], InvalidInput, "features must be numbers, got bool values"),
        ([[1, None, 3, 4]], InvalidInput, "features must be numbers, got object values"),
        (np.array([[1j, 2, 3, 4]]), InvalidInput, "features must be numbers, got complex128 values"),
    ],
)
def test_validate_refuses(iris: Predictor, rows: Any, error: type[ServeAppError], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        iris.validate(rows)
    assert info.value.status_code == error.status_code
    assert info.value.status_code in (413, 422)


def test_too_many_rows_is_413(iris: Predictor) -> None:
    assert len(iris.validate(np.zeros((50, 4)))) == 50
    with pytest.raises(PayloadTooLarge) as info:
        iris.validate(np.zeros((51, 4)))
    assert info.value.status_code == 413



def test_validate_finds_non_finite_values_among_huge_ones(iris: Predictor) -> None:
    # Huge finite values are valid features (their sum would overflow); NaN and inf are not.
    huge = [[1e308, 1e308, -1e308, 1e308]]
    assert iris.validate(huge).tolist() == huge
    with pytest.raises(InvalidInput, match=r"row 1, feature 0 \(sepal length \(cm\)\) is nan"):
        iris.validate([[1e308, 1e308, 1, 1], [float("nan"), 1, 1, 1]])
    with pytest.raises(InvalidInput, match=r"row 0, feature 3 \(petal width \(cm\)\) is inf"):
        iris.validate(np.array([[1, 2, 3, np.inf]], dtype=np.float32))


def test_validate_copies_a_request_tensor_at_most_once(iris: Predictor) -> None:
    # A binary V2 tensor arrives as a read-only view of the request body, at any offset.
    rows = np.random.default_rng(0).normal(size=(40, 4))
    body = b"{}" + rows.tobytes()
    unaligned = np.frombuffer(body, np.float64, offset=2).reshape(40, 4)
    aligned = np.frombuffer(rows.tobytes(), np.float64).reshape(40, 4)
    assert not unaligned.flags.aligned and aligned.flags.aligned
    assert iris.validate(aligned) is aligned  # already what the model reads: no copy
    copied = iris.validate(unaligned)
    assert copied.flags.aligned and copied.flags.c_contiguous and np.array_equal(copied, rows)
    as_float32 = iris.validate(rows.astype(np.float32))
    assert as_float32.dtype == np.float64 and as_float32.flags.aligned

# ---- predictions: the LogisticRegression fast path is bit-identical to sklearn ----------------


@functools.lru_cache(maxsize=None)
def _fit_logistic(n_classes: int, labels: tuple[Any, ...] | None = None) -> LogisticRegression:
    """Fitted once per argument set; tests only read it (the store keeps its own copy)."""
    iris = datasets.load_iris()
    keep = iris.target < n_classes
    target = iris.target[keep]
    if labels is not None:
        target = np.array(labels)[target]
    return LogisticRegression(max_iter=1000).fit(iris.data[keep], target)


@pytest.mark.parametrize(
    ("n_classes", "labels"),
    [(3, None), (2, None), (3, ("setosa", "versicolor", "virginica")), (2, (-1, 1))],
    ids=["multiclass", "binary", "multiclass-strings", "binary-minus-one"],
)
def test_logistic_fast_path_is_identical_to_sklearn(store: ModelStore, n_classes: int, labels: Any) -> None:
    model = _fit_logistic(n_classes, labels)
    save_fitted(store, model, name="lr")
    predictor = Predictor.load(store, "lr")
    assert predictor._linear is not None  # the fast path is the one under test
    reference, _ = store.load_verified("lr")  # a separate copy, through sklearn's own code
    rng = np.random.default_rng(42)
    for n in ROW_COUNTS:
        for scale in (0.1, 3.0, 100.0):  # near the decision boundaries and far from them
            rows = predictor.validate(_random_rows(rng, n, 4, scale))
            labels_fast = predictor.predict(rows)
            assert labels_fast.dtype == reference.predict(rows).dtype
            assert np.array_equal(labels_fast, reference.predict(rows)), (n, scale)
            assert np.array_equal(predictor.predict_proba(rows), reference.predict_proba(rows)), (n, scale)
            assert np.array_equal(predictor.run(rows, ("predict", "predict_proba"))["predict_proba"], reference.predict_proba(rows))


def test_logistic_fast_path_on_iris_itself(iris_store: ModelStore) -> None:
    predictor = Predictor.load(iris_store, "iris")
    data = predictor.validate(datasets.load_iris().data)
    assert np.array_equal(predictor.predict(data), predictor.model.predict(data))
    assert np.array_equal(predictor.predict_proba(data), predictor.model.predict_proba(data))
    assert np.allclose(predictor.predict_proba(data).sum(axis=1), 1.0)


def test_one_vs_rest_logistic_uses_sklearn_for_probabilities(store: ModelStore) -> None:
    # sklearn < 1.8 computed one-vs-rest probabilities for multi_class="ovr"; softmax would be wrong.
    model = _fit_logistic(3)
    save_fitted(store, model, name="lr")
    predictor = Predictor.load(store, "lr")
    predictor.model.multi_class = "ovr"
    predictor = Predictor(predictor.model, predictor.manifest)
    calls: list[int] = []
    original = predictor.model.predict_proba
    predictor.model.predict_proba = lambda x: calls.append(len(x)) or original(x)
    predictor.predict_proba(predictor.validate(IRIS_ROWS))
    assert calls == [3]


def test_other_estimators_go_through_sklearn(store: ModelStore) -> None:
    model = fit_dummy(classes=("a", "b", "c"))
    save_fitted(store, model, name="dummy")
    predictor = Predictor.load(store, "dummy")
    assert predictor._linear is None
    calls: list[str] = []
    for method in ("predict", "predict_proba"):
        original = getattr(predictor.model, method)
        setattr(predictor.model, method, lambda x, _m=method, _o=original: calls.append(_m) or _o(x))
    rows = predictor.validate(np.zeros((5, 4)))
    assert predictor.predict(rows).tolist() == model.predict(rows).tolist()
    assert np.array_equal(predictor.predict_proba(rows), model.predict_proba(rows))
    assert calls == ["predict", "predict_proba"]


def test_random_forest_predictions_match(store: ModelStore) -> None:
    from sklearn.ensemble import RandomForestClassifier

    iris = datasets.load_iris()
    save_fitted(store, RandomForestClassifier(n_estimators=10, random_state=0).fit(iris.data, iris.target), name="forest")
    predictor = Predictor.load(store, "forest")
    reference, _ = store.load_verified("forest")
    rows = predictor.validate(_random_rows(np.random.default_rng(0), 300, 4))
    assert np.array_equal(predictor.predict(rows), reference.predict(rows))
    assert np.array_equal(predictor.predict_proba(rows), reference.predict_proba(rows))


@pytest.mark.parametrize("forest_class", ["RandomForestClassifier"])  # ExtraTrees: not on the store's allow-list
@pytest.mark.parametrize("n_classes", [2, 3])
def test_forests_are_answered_bit_for_bit_without_joblib(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch, forest_class: str, n_classes: int
) -> None:
    """The scikit-learn runtime sums the trees itself (predictor.forest_proba): the same bits as
    the forest's own predict/predict_proba, and joblib's Parallel is never called for it."""
    import sklearn.ensemble
    from sklearn.ensemble import _forest
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(n_classes)
    features = rng.normal(size=(400, 5))
    noisy = features[:, 0] * 2 + features[:, 1] + rng.normal(scale=1.5, size=400)
    target = (noisy > 0).astype(int) + (features[:, 2] > 1 if n_classes == 3 else 0)
    # Leaves of 7+ rows hold fractions (0.142857...), so the order of the sum shows in the bits.
    # n_jobs=1: with threads scikit-learn's own sum order (hence last bits) varies run to run.
    forest = getattr(sklearn.ensemble, forest_class)(n_estimators=25, min_samples_leaf=7, random_state=0).fit(features, target)
    pipeline = make_pipeline(StandardScaler(), getattr(sklearn.ensemble, forest_class)(
        n_estimators=25, min_samples_leaf=7, random_state=1)).fit(features, target)
    rows = _random_rows(rng, 300, 5)
    for name, model in (("forest", forest), ("pipeline", pipeline)):
        save_fitted(store, model, name=f"{name}-{n_classes}", compile=False)
        predictor = Predictor.load(store, f"{name}-{n_classes}")
        expected = (model.predict(rows), model.predict_proba(rows))

        def no_joblib(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the forest went through joblib")

        with monkeypatch.context() as patched:
            patched.setattr(_forest, "Parallel", no_joblib)
            checked = predictor.validate(rows)
            assert np.array_equal(predictor.predict(checked), expected[0])
            assert np.array_equal(predictor.predict_proba(checked), expected[1])  # bit for bit
            labels, proba = predictor.predict_with_proba(checked)
            assert np.array_equal(labels, expected[0]) and np.array_equal(proba, expected[1])
            assert np.array_equal(predictor.predict(checked[:1]), expected[0][:1])


# ---- outputs --------------------------------------------------------------------------------


def test_regressor_has_no_predict_proba(store: ModelStore) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3))
    model = LinearRegression().fit(x, x @ [1.0, 2.0, 3.0])
    save_fitted(store, model, name="reg")
    predictor = Predictor.load(store, "reg")
    assert predictor.outputs == ("predict",)
    assert np.array_equal(predictor.predict(predictor.validate(x)), model.predict(x))
    with pytest.raises(InvalidInput, match=r"reg v1 \(sklearn.linear_model._base.LinearRegression\) has no predict_proba") as info:
        predictor.predict_proba(predictor.validate(x))
    assert info.value.status_code == 422
    with pytest.raises(InvalidInput, match="unknown output 'predict_proba' for reg v1; available: predict"):
        predictor.run(predictor.validate(x), ("predict", "predict_proba"))


def test_unknown_output_name(iris: Predictor) -> None:
    with pytest.raises(InvalidInput, match="unknown output 'labels' for iris v1; available: predict, predict_proba"):
        iris.check_outputs(["predict", "labels"])
    iris.check_outputs(["predict_proba", "predict"])  # known names pass


def test_metadata_leaves_out_training_stats(iris: Predictor) -> None:
    metadata = iris.metadata()
    assert "training_stats" not in metadata
    assert metadata["name"] == "iris" and metadata["version"] == "1"
    assert metadata["classes"] == [0, 1, 2]


# ---- health ---------------------------------------------------------------------------------


def test_check_health(iris: Predictor, store: ModelStore) -> None:
    iris.check_health()  # the canned row is the training mean
    assert iris._canned_row.tolist() == [[iris.manifest.training_stats[f].mean for f in iris.manifest.feature_names]]

    save_fitted(store, fit_dummy(), name="dummy")  # no training stats: a row of zeros
    broken = Predictor.load(store, "dummy")
    broken.check_health()

    def fail(rows: np.ndarray) -> np.ndarray:
        raise MemoryError("model is broken")

    broken.model.predict = fail
    with pytest.raises(MemoryError, match="model is broken"):
        broken.check_health()
    broken.model.predict = lambda rows: np.zeros(2)
    with pytest.raises(RuntimeError, match=r"health check: expected 1 prediction, got shape \(2,\)"):
        broken.check_health()
