"""Offline training into the model store (no Ray needed).

The default is the seed's model: LogisticRegression(max_iter=1000) on iris. The heavy
models of the benchmarks are `--dataset synthetic30` (30 features, 10,000 rows) with
`--estimator random_forest_200` or `hist_gradient_boosting`.

Publishing converts the model to ONNX and verifies it against scikit-learn on a sample of
the training rows and on the held-out rows (compiled.py); the manifest records which runtime
serves and why. A model that does not convert or verify is published all the same, served
by scikit-learn, with the reason.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from serve_app.model.formats import ModelFormat
from serve_app.model.manifest import Manifest, library_versions, training_stats
from serve_app.model.store import ModelStore

DEFAULT_MODEL_NAME = "iris"
DEFAULT_DATASET = "iris"
# Rows the compiled model is verified on at publish time, at most, from each of the training
# sample and the held-out set (a 200-tree forest checks 10,000 rows in about a second).
VERIFY_ROWS = 5_000
Progress = Callable[[str], None]


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


def _synthetic30() -> Dataset:
    """The benchmarks' heavy-model data: 10,000 rows of 30 features, two classes, seeded."""
    from sklearn.datasets import make_classification

    features, target = make_classification(
        n_samples=10_000, n_features=30, n_informative=10, n_redundant=5, n_classes=2, random_state=0
    )
    return Dataset(features, target, [f"x{i:02d}" for i in range(30)], "classification")


DATASETS: dict[str, Callable[[], Dataset]] = {
    "iris": _builtin("load_iris", "classification"),
    "wine": _builtin("load_wine", "classification"),
    "breast_cancer": _builtin("load_breast_cancer", "classification"),
    "diabetes": _builtin("load_diabetes", "regression"),
    "synthetic30": _synthetic30,  # 30 features, 10,000 rows: the heavy models' benchmark data
}


def _estimator(module: str, name: str, **params: Any) -> Callable[[], Any]:
    def make() -> Any:
        return getattr(importlib.import_module(module), name)(**params)

    return make


ESTIMATORS: dict[str, dict[str, Callable[[], Any]]] = {
    "classification": {
        "logistic_regression": _estimator("sklearn.linear_model", "LogisticRegression", max_iter=1000),
        "random_forest": _estimator("sklearn.ensemble", "RandomForestClassifier", n_estimators=100, random_state=0),
        # The benchmarks' heavy models (issue 17), meant for --dataset synthetic30.
        "random_forest_200": _estimator("sklearn.ensemble", "RandomForestClassifier", n_estimators=200, random_state=0),
        "hist_gradient_boosting": _estimator(
            "sklearn.ensemble", "HistGradientBoostingClassifier", max_iter=200, early_stopping=False, random_state=0
        ),
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
    progress: Progress | None = None,
) -> Manifest:
    """Fits an estimator on a built-in dataset, scores it on a held-out split, stores it.

    The stored model is refitted on all rows after scoring, as the seed did; the metrics
    are the held-out ones. The compiled model is verified on the training split and the
    held-out split. `progress` is told what takes time (fitting, converting).
    """
    store.check_name(name)  # before a fit that may take a while, not after it
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
    say = progress or (lambda message: None)
    started = time.perf_counter()
    say(f"fitting {estimator} on {dataset} ({len(x_train)} training rows, then all {len(data.features)}) ...")
    scored = choices[estimator]().fit(x_train, y_train)
    metrics = _metrics(scored, x_test, y_test)
    model = choices[estimator]().fit(data.features, data.target)
    say(f"fitted in {time.perf_counter() - started:.1f} s")
    return save_fitted(
        store, model, name=name, feature_names=data.feature_names, reference=x_train, held_out=x_test,
        dataset=dataset, metrics=metrics, n_train=len(x_train), n_test=len(x_test), fmt=fmt, progress=progress,
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
    held_out: np.ndarray | None = None,
    compile: bool = True,
    progress: Progress | None = None,
) -> Manifest:
    """Stores an already fitted estimator with a full manifest (also used by tests).

    With `compile`, the estimator is converted to ONNX and verified on up to VERIFY_ROWS
    rows of `reference` (the training sample) and of `held_out`; when it verifies, the
    compiled model is stored beside it and serves (manifest `runtime: onnxruntime`),
    otherwise scikit-learn serves and `runtime_reason` says why. Never fails for that.
    """
    n_features = int(model.n_features_in_)
    names = feature_names or [f"x{i}" for i in range(n_features)]
    fields = {
        "name": name,
        **estimator_fields(model),
        "feature_names": names,
        "n_features": n_features,
        "dataset": dataset,
        "params": {k: v for k, v in model.get_params().items() if isinstance(v, (int, float, str, bool, type(None)))},
        "metrics": metrics or {},
        "n_train": n_train,
        "n_test": n_test,
        "training_stats": training_stats(reference, names) if reference is not None else {},
        "versions": library_versions(),
    }
    runtime, onnx_bytes = choose_runtime(model, reference, held_out, compile=compile, progress=progress)
    return store.save(model, {**fields, **runtime}, fmt=fmt, promote_first=promote_first, compiled=onnx_bytes)


def estimator_fields(model: Any) -> dict[str, Any]:
    """What a manifest says of a fitted estimator: its class, task, classes and outputs."""
    from sklearn.base import is_classifier

    classifier = is_classifier(model)
    return {
        "estimator": f"{type(model).__module__}.{type(model).__qualname__}",
        "task": "classification" if classifier else "regression",
        "classes": np.asarray(model.classes_).tolist() if classifier else None,
        "outputs": ["predict"] + (["predict_proba"] if hasattr(model, "predict_proba") else []),
    }


def _verification_rows(rows: np.ndarray | None, seed: int) -> np.ndarray | None:
    if rows is None or len(rows) == 0:
        return None
    rows = np.asarray(rows, dtype=np.float64)
    if len(rows) <= VERIFY_ROWS:
        return rows
    picked = np.random.default_rng(seed).choice(len(rows), size=VERIFY_ROWS, replace=False)
    return rows[np.sort(picked)]


def choose_runtime(
    model: Any,
    sample: np.ndarray | None,
    held_out: np.ndarray | None,
    *,
    compile: bool = True,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], bytes | None]:
    """The manifest's runtime fields for `model`, and the compiled model's bytes if it serves."""
    from serve_app.model.predictor import served_directly

    say = progress or (lambda message: None)
    estimator = type(model).__name__
    if not compile:
        return {"runtime": "sklearn", "runtime_reason": "served by scikit-learn: not compiled (compile=False)"}, None
    if served_directly(model):
        return {"runtime": "sklearn", "runtime_reason": (
            f"served by scikit-learn: a {estimator} is answered by its own arithmetic in numpy, bit-identical "
            "to scikit-learn and faster than ONNX Runtime for it")}, None
    checked = [rows for rows in (_verification_rows(sample, 0), _verification_rows(held_out, 1)) if rows is not None]
    if not checked:
        return {"runtime": "sklearn", "runtime_reason": (
            "served by scikit-learn: no rows to verify a compiled model on (no training sample or held-out set)")}, None
    from serve_app.model.compiled import Refusal, convert

    n_rows = sum(len(rows) for rows in checked)
    say(f"converting {estimator} to ONNX and verifying it against scikit-learn on {n_rows} rows "
        "(a large forest takes several seconds) ...")
    started = time.perf_counter()
    try:
        result = convert(model, checked[0], checked[-1] if len(checked) > 1 else checked[0][:0])
    except Exception as exc:  # a converter bug must not fail a publish: scikit-learn serves
        result = Refusal("converter_error", f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    say(f"conversion and verification took {time.perf_counter() - started:.1f} s")
    if isinstance(result, Refusal):
        return {"runtime": "sklearn", "runtime_reason": str(result)}, None
    check = result.verification
    classifier = hasattr(model, "predict_proba") and hasattr(model, "classes_")  # as convert() decides
    what = "labels identical, max |proba diff|" if classifier else "max |prediction diff|"
    reason = (f"verified on {check.rows_checked} rows: {what} {check.max_abs_diff:.3g} <= {check.tolerance:.3g} "
              f"({check.input_dtype} input)")
    return {"runtime": "onnxruntime", "runtime_reason": reason, "verification": check.as_dict()}, result.onnx_bytes


CHURN_DATASET = "churn"
CHURN_MODEL_NAME = "churn"


def train_churn(
    store: ModelStore,
    *,
    name: str = CHURN_MODEL_NAME,
    n_rows: int = 5000,
    test_size: float = 0.25,
    seed: int = 0,
    progress: Progress | None = None,
) -> Manifest:
    """Fits the built-in churn Pipeline (model/churn.py) on a training split of its synthetic
    data and publishes it with `publish`, scored on the held-out split. Unlike `train`, the
    stored model is the one scored: a typed-columns model's schema and statistics come from
    the rows it was fitted on."""
    from sklearn.model_selection import train_test_split
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # (a scikit-learn dependency)

    from serve_app.model.churn import TARGET, churn_frame, fit_churn
    from serve_app.model.publish import publish

    store.check_name(name)
    frame = churn_frame(n_rows, seed)
    train_rows, test_rows = train_test_split(frame, test_size=test_size, random_state=seed, stratify=frame[TARGET])
    say = progress or (lambda message: None)
    # One OpenMP thread: gradient boosting on a few thousand rows spends ~10x longer
    # synchronising threads than computing when the cores are shared (3.7 s against 0.3 s here).
    with threadpool_limits(1):
        started = time.perf_counter()
        say(f"fitting the churn Pipeline on {len(train_rows)} training rows ...")
        model = fit_churn(train_rows, random_state=seed)
        say(f"fitted in {time.perf_counter() - started:.1f} s")
        return publish(
            model, name=name, sample=train_rows, target=TARGET, test=test_rows, store=store,
            dataset=CHURN_DATASET, progress=progress,
        )
