"""The compiled runtime (serve_app/model/compiled.py): equal answers, fallbacks, refused graphs."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import make_classification, make_regression
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from serve_app.errors import ModelLoadError
from serve_app.model import compiled
from serve_app.model.compiled import PROBA_ATOL, REGRESSION_RTOL, Compiled, CompiledModel, Refusal, UnsafeGraph, convert

N_FEATURES = 8


def data(n_classes: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return make_classification(1200, N_FEATURES, n_informative=5, n_classes=n_classes, random_state=seed)


def fit_and_convert(estimator: Any, X: np.ndarray, y: np.ndarray) -> tuple[Any, Compiled, np.ndarray]:
    """Fits on 400 rows, converts verifying on 100 + 300 others, keeps 400 never seen."""
    estimator.fit(X[:400], y[:400])
    result = convert(estimator, X[400:500], X[500:800])
    assert isinstance(result, Compiled), str(result)
    return estimator, result, X[800:]


CLASSIFIERS = {
    "logistic_regression": (lambda: LogisticRegression(max_iter=500), "float64"),
    # 10 trees: 29 of 400 rows are 5-5 ties, which scikit-learn gives to the first class.
    "random_forest": (lambda: RandomForestClassifier(10, random_state=0), "float32"),
    "hist_gradient_boosting": (lambda: HistGradientBoostingClassifier(max_iter=20, random_state=0), "float32"),
    "pipeline": (lambda: make_pipeline(StandardScaler(), LogisticRegression()), "float64"),
}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_answers_equal_sklearn_on_rows_it_never_saw(name: str) -> None:
    make, input_dtype = CLASSIFIERS[name]
    estimator, result, unseen = fit_and_convert(make(), *data())
    check = result.verification
    assert (check.input_dtype, check.rows_checked, check.label_mismatches) == (input_dtype, 400, 0)
    assert check.max_abs_diff <= check.tolerance == PROBA_ATOL[input_dtype]
    assert set(check.versions) == {"skl2onnx", "onnx", "onnxruntime"}

    model = CompiledModel.load(result.onnx_bytes, threads=1)
    labels, proba = model.predict(unseen), model.predict_proba(unseen)
    expected_labels, expected_proba = estimator.predict(unseen), estimator.predict_proba(unseen)
    assert labels.dtype == expected_labels.dtype and labels.shape == expected_labels.shape
    np.testing.assert_array_equal(labels, expected_labels)
    assert proba.dtype == np.float64 and proba.shape == expected_proba.shape
    np.testing.assert_allclose(proba, expected_proba, rtol=0, atol=PROBA_ATOL[input_dtype])
    if name == "random_forest":
        assert (expected_proba[:, 0] == 0.5).sum() > 10  # the ties are there, and answered alike
    both = model.predict_with_proba(unseen)
    np.testing.assert_array_equal(both[0], labels)
    np.testing.assert_array_equal(both[1], proba)


@pytest.mark.parametrize(
    "classes", [np.array(["setosa", "versicolor", "virginica"]), np.array([3, 7, 11]), np.array(["no", "yes"], dtype=object)]
)
def test_class_labels_come_back_as_the_estimators_own(classes: np.ndarray) -> None:
    X, y = data(n_classes=len(classes), seed=1)
    estimator, result, unseen = fit_and_convert(RandomForestClassifier(5, random_state=0), X, classes[y])
    labels = CompiledModel.load(result.onnx_bytes, threads=1).predict(unseen)
    expected = estimator.predict(unseen)
    assert labels.dtype == expected.dtype == estimator.classes_.dtype
    np.testing.assert_array_equal(labels, expected)
    assert set(labels) == set(classes)


@pytest.mark.parametrize(
    "make", [lambda: RandomForestRegressor(10, random_state=0), lambda: HistGradientBoostingRegressor(max_iter=20),
             LinearRegression],
)
def test_regressor_predictions_within_tolerance(make: Any) -> None:
    X, y = make_regression(1200, N_FEATURES, noise=5, random_state=0)
    estimator, result, unseen = fit_and_convert(make(), X, y)
    model = CompiledModel.load(result.onnx_bytes, threads=1)
    predictions, expected = model.predict(unseen), estimator.predict(unseen)
    assert predictions.dtype == np.float64 and predictions.shape == expected.shape == (400,)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(predictions, expected, rtol=0, atol=REGRESSION_RTOL[result.verification.input_dtype] * scale)
    with pytest.raises(ModelLoadError, match="no predict_proba"):
        model.predict_proba(unseen)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts_are_the_ones_asked_for(threads: int) -> None:
    _, result, _ = fit_and_convert(LogisticRegression(), *data())
    options = CompiledModel.load(result.onnx_bytes, threads=threads).session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (threads, threads)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(ValueError, match="at least 1"):
        CompiledModel.load(result.onnx_bytes, threads=0)


class Homemade(ClassifierMixin, BaseEstimator):
    def fit(self, X: np.ndarray, y: np.ndarray) -> "Homemade":
        self.classes_ = np.unique(y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.full(len(X), self.classes_[0])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.tile([1.0] + [0.0] * (len(self.classes_) - 1), (len(X), 1))


@pytest.mark.parametrize("estimator", [DummyClassifier(), Homemade(), make_pipeline(StandardScaler(), DummyClassifier())])
def test_an_estimator_the_converter_does_not_know_falls_back_with_its_name(estimator: Any) -> None:
    X, y = data()
    estimator.fit(X, y)
    result = convert(estimator, X[:10], X[10:20])
    assert isinstance(result, Refusal) and result.kind == "unsupported"
    name = type(estimator[-1] if hasattr(estimator, "steps") else estimator).__name__
    assert name in str(result) and str(result).startswith("served by scikit-learn (unsupported)")


def test_a_graph_outside_the_tolerance_falls_back_saying_by_how_much() -> None:
    X, y = data()
    estimator = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(X[:400], y[:400])
    result = convert(estimator, X[400:500], X[500:800], proba_atol=0.0)
    assert isinstance(result, Refusal) and result.kind == "mismatch", result
    assert "probabilities differ by up to" in result.reason and "(tolerance 0)" in result.reason


# --- Attacks: each file is refused before ONNX Runtime reads it ---------------------------------


def graph_file(nodes: list[onnx.NodeProto], initializers: Sequence[TensorProto] = (), domains: dict[str, int] | None = None,
               **model_fields: Any) -> bytes:
    """A model Y = <nodes>(X) over [n, 2] floats; `initializers` as given."""
    graph = helper.make_graph(
        nodes, "attack",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 2])],
        initializer=list(initializers),
    )
    opsets = [helper.make_opsetid(d, v) for d, v in {"": 17, **(domains or {})}.items()]
    return helper.make_model(graph, opset_imports=opsets, **model_fields).SerializeToString()


def external(name: str, location: str) -> TensorProto:
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [2], [0.0, 0.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


ADD_W = helper.make_node("Add", ["X", "W"], ["Y"])
BRANCH = helper.make_graph(
    [helper.make_node("Constant", [], ["Z"], value=external("C", "/etc/passwd"))], "then", [],
    [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [2])],
)
ATTACKS = {
    "initializer read from /etc/passwd": graph_file([ADD_W], [external("W", "/etc/passwd")]),
    "initializer read from a relative path": graph_file([ADD_W], [external("W", "../../../../etc/passwd")]),
    "constant read from /etc/passwd": graph_file(
        [helper.make_node("Constant", [], ["W"], value=external("C", "/etc/passwd")), ADD_W]),
    "external data in a subgraph": graph_file(
        [helper.make_node("If", ["cond"], ["W"], then_branch=BRANCH, else_branch=BRANCH), ADD_W],
        [helper.make_tensor("cond", TensorProto.BOOL, [], [True])]),
    "custom domain op": graph_file(
        [helper.make_node("Exec", ["X"], ["Y"], domain="com.evil", command="id")], domains={"com.evil": 1}),
    "onnxruntime contrib op": graph_file(
        [helper.make_node("Gelu", ["X"], ["Y"], domain="com.microsoft")], domains={"com.microsoft": 1}),
    "custom domain op, domain not imported": graph_file(
        [helper.make_node("Exec", ["X"], ["Y"], domain="com.evil")]),
    "custom domain only imported": graph_file([helper.make_node("Identity", ["X"], ["Y"])], domains={"com.evil": 1}),
    "local function": graph_file(
        [helper.make_node("F", ["X"], ["Y"], domain="")],
        functions=[helper.make_function("", "F", ["A"], ["B"], [helper.make_node("Identity", ["A"], ["B"])],
                                        [helper.make_opsetid("", 17)])]),
    "not onnx at all": b"\x08\x07garbage\xff\xff",
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_unsafe_graph_refused_before_onnxruntime_sees_it(attack: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("onnxruntime was handed an unsafe graph")

    monkeypatch.setattr(compiled.onnxruntime, "InferenceSession", never)
    with pytest.raises(UnsafeGraph) as refused:
        CompiledModel.load(ATTACKS[attack], threads=1)
    assert refused.value.status_code == 500


def test_the_same_graphs_without_the_attack_load() -> None:
    """The attack files differ from a loadable one only by the attack (so the test proves the check)."""
    safe_w = helper.make_tensor("W", TensorProto.FLOAT, [2], [1.0, 2.0])
    model = CompiledModel.load(graph_file([ADD_W], [safe_w]), threads=1)
    np.testing.assert_array_equal(model.predict(np.zeros((1, 2))), [[1.0, 2.0]])
