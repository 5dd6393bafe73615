"""Offline training into the model store (no Ray needed).

The default is the seed's model: LogisticRegression(max_iter=1000) on iris.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from serve_app.model.formats import ModelFormat
from serve_app.model.manifest import Manifest, library_versions, training_stats
from serve_app.model.store import ModelStore

DEFAULT_MODEL_NAME = "iris"
DEFAULT_DATASET = "iris"


@dataclass(frozen=True)
class Dataset:
    features: np.ndarray
    target: np.ndarray
    feature_names: list[str]
    task: str


# scikit-learn is imported where it is used: it costs ~2 s, and the CLI builds its argument
# parser (dataset and estimator names) for every command, most of which never train.


def _builtin(loader: str, task: str) -> Callable[[], Dataset]:
    def load() -> Dataset:
        from sklearn import datasets

        bunch = getattr(datasets, loader)()
        return Dataset(np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target), list(bunch.feature_names), task)

    return load


DATASETS: dict[str, Callable[[], Dataset]] = {
    "iris": _builtin("load_iris", "classification"),
    "wine": _builtin("load_wine", "classification"),
    "breast_cancer": _builtin("load_breast_cancer", "classification"),
    "diabetes": _builtin("load_diabetes", "regression"),
}


def _estimator(module: str, name: str, **params: Any) -> Callable[[], Any]:
    def make() -> Any:
        return getattr(importlib.import_module(module), name)(**params)

    return make


ESTIMATORS: dict[str, dict[str, Callable[[], Any]]] = {
    "classification": {
        "logistic_regression": _estimator("sklearn.linear_model", "LogisticRegression", max_iter=1000),
        "random_forest": _estimator("sklearn.ensemble", "RandomForestClassifier", n_estimators=100, random_state=0),
    },
    "regression": {
        "linear_regression": _estimator("sklearn.linear_model", "LinearRegression"),
        "random_forest": _estimator("sklearn.ensemble", "RandomForestRegressor", n_estimators=100, random_state=0),
    },
}


def _metrics(model: Any, features: np.ndarray, target: np.ndarray) -> dict[str, float]:
    from sklearn.base import is_classifier
    from sklearn.metrics import accuracy_score, mean_absolute_error, r2_score

    predicted = model.predict(features)
    if is_classifier(model):
        return {"accuracy": float(accuracy_score(target, predicted))}
    return {"r2": float(r2_score(target, predicted)), "mae": float(mean_absolute_error(target, predicted))}


def train(
    store: ModelStore,
    *,
    name: str = DEFAULT_MODEL_NAME,
    dataset: str = DEFAULT_DATASET,
    estimator: str | None = None,
    fmt: ModelFormat = "skops",
    test_size: float = 0.25,
    seed: int = 0,
) -> Manifest:
    """Fits an estimator on a built-in dataset, scores it on a held-out split, stores it.

    The stored model is refitted on all rows after scoring, as the seed did; the metrics
    are the held-out ones.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    data = DATASETS[dataset]()
    choices = ESTIMATORS[data.task]
    estimator = estimator or next(iter(choices))
    if estimator not in choices:
        raise ValueError(
            f"estimator {estimator!r} does not fit the {data.task} dataset {dataset!r}; "
            f"choose one of {', '.join(choices)}"
        )
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        data.features, data.target, test_size=test_size, random_state=seed,
        stratify=data.target if data.task == "classification" else None,
    )
    scored = choices[estimator]().fit(x_train, y_train)
    metrics = _metrics(scored, x_test, y_test)
    model = choices[estimator]().fit(data.features, data.target)
    return save_fitted(
        store, model, name=name, feature_names=data.feature_names, reference=x_train,
        dataset=dataset, metrics=metrics, n_train=len(x_train), n_test=len(x_test), fmt=fmt,
    )


def save_fitted(
    store: ModelStore,
    model: Any,
    *,
    name: str,
    feature_names: list[str] | None = None,
    reference: np.ndarray | None = None,
    dataset: str = "custom",
    metrics: dict[str, float] | None = None,
    n_train: int = 0,
    n_test: int = 0,
    fmt: ModelFormat = "skops",
    promote_first: bool = True,
) -> Manifest:
    """Stores an already fitted estimator with a full manifest (also used by tests)."""
    from sklearn.base import is_classifier

    n_features = int(model.n_features_in_)
    names = feature_names or [f"x{i}" for i in range(n_features)]
    classifier = is_classifier(model)
    outputs = ["predict"] + (["predict_proba"] if hasattr(model, "predict_proba") else [])
    fields = {
        "name": name,
        "estimator": f"{type(model).__module__}.{type(model).__qualname__}",
        "task": "classification" if classifier else "regression",
        "feature_names": names,
        "n_features": n_features,
        "classes": np.asarray(model.classes_).tolist() if classifier else None,
        "outputs": outputs,
        "dataset": dataset,
        "params": {k: v for k, v in model.get_params().items() if isinstance(v, (int, float, str, bool, type(None)))},
        "metrics": metrics or {},
        "n_train": n_train,
        "n_test": n_test,
        "training_stats": training_stats(reference, names) if reference is not None else {},
        "versions": library_versions(),
    }
    return store.save(model, fields, fmt=fmt, promote_first=promote_first)
