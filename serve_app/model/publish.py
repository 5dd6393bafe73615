"""Publishing a model you trained yourself: check it, describe its columns, store it safely.

`publish` takes a fitted scikit-learn estimator or Pipeline and a sample of its training data
(a DataFrame, or a .csv / .parquet file), and stores an immutable version whose manifest
records the input schema (named, typed columns), the training statistics drift is measured
against, the test metrics and the runtime that serves it. Before storing, it proves that the
version will answer as the estimator does:

- the sample's rows, decoded exactly as a server decodes a request (`decode_frame`), give the
  same predictions as the estimator on the sample itself;
- the estimator, written in the safe skops format and read back through the allow-list the
  servers use (`formats.loads`), gives those same predictions.

Whatever cannot be served faithfully or safely is refused with `UnservableModel`, every reason
listed. Nothing here unpickles: loading the user's joblib file is the CLI's job, behind an
explicit flag (serve_app/ops/cli.py).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import pandas as pd

from serve_app.errors import InvalidInput, ModelLoadError
from serve_app.model import formats
from serve_app.model.manifest import FeatureStats, Manifest, library_versions
from serve_app.model.schema import CategoryStats, InputSchema, UnservableModel, column_stats, infer_schema
from serve_app.model.store import ModelStore
from serve_app.model.training import Progress, choose_runtime, estimator_fields
from serve_app.protocol.columns import decode_frame

Frame = Union[pd.DataFrame, str, os.PathLike[str]]
StoreLike = Union[ModelStore, str, os.PathLike[str]]
# Rows of the sample the faithfulness checks predict on, at most: enough to meet every
# category and null pattern of a realistic sample, while a publish stays a few seconds.
CHECK_ROWS = 2_000
# Regressors: the decoded rows must predict within this relative difference. Not 0: the same
# values in a differently laid-out array may be summed in another order by BLAS.
REGRESSION_RTOL = 1e-12
SHOWN_ROWS = 5
READERS = {".csv": "read_csv", ".parquet": "read_parquet"}
# What scikit-learn says when a matrix reaches an estimator fitted on named columns (or the
# reverse). The all-numeric fast path sends a matrix in the schema's column order, which is
# the fitted order, so for these checks the names carry nothing.
_FEATURE_NAME_WARNINGS = (r"X does not have valid feature names", r"X has feature names, but")


def publish(
    estimator: Any,
    *,
    name: str,
    sample: Frame,
    target: str | None = None,
    test: Frame | None = None,
    store: StoreLike = "models",
    dataset: str = "custom",
    promote_first: bool = True,
    progress: Progress | None = None,
) -> Manifest:
    """Stores a fitted scikit-learn estimator or Pipeline as the next version of `name`.

    `sample` is (a sample of) its training data: a DataFrame or a .csv / .parquet path; the
    column `target`, if named, is split off. `test`, with the `target` column, is scored
    (accuracy and macro F1, or R² and MAE). The schema, statistics and row counts come from
    the sample. All-numeric models are compiled to ONNX when that verifies; models with typed
    columns are served by scikit-learn. Raises `UnservableModel` (every reason listed) for
    what cannot be served faithfully or safely, `StoreError` for a bad name.
    """
    say = progress or (lambda message: None)
    models = store if isinstance(store, ModelStore) else ModelStore(store)
    models.check_name(name)  # before any work, not after it
    check_estimator(estimator)
    features = _split_target(read_frame(sample, "sample"), target, "sample")
    test_frame = _test_frame(test, target)  # its problems are cheap to find: before the checks
    say(f"inferring the input schema from {len(features)} sample rows ...")
    schema = infer_schema(estimator, features)
    features = features[schema.names]
    rows = _check_rows(features)
    say(f"checking on {len(rows)} rows that requests decoded as the server does predict as the model does ...")
    expected = _predict(estimator, rows)
    check_faithful(estimator, rows, schema, expected)
    say("checking that the model stores in the safe skops format and loads back the same ...")
    check_storable(estimator, rows, expected, name)
    metrics, held_out = _score(estimator, test_frame, target, schema)
    stats = column_stats(features, schema)
    fields: dict[str, Any] = {
        "name": name,
        **estimator_fields(estimator),  # check_estimator made sure it is a classifier or regressor
        "feature_names": schema.names,
        "n_features": len(schema.names),
        "dataset": dataset,
        "params": scalar_params(estimator),
        "metrics": metrics,
        "n_train": len(features),
        "n_test": 0 if held_out is None else len(held_out),
        "training_stats": {k: v for k, v in stats.items() if isinstance(v, FeatureStats)},
        "category_stats": {k: v for k, v in stats.items() if isinstance(v, CategoryStats)},
        "input_schema": schema,
        "versions": library_versions(),
    }
    runtime, compiled = _runtime(estimator, schema, features, held_out, progress)
    say(f"storing {name} ...")
    return models.save(estimator, {**fields, **runtime}, fmt="skops", promote_first=promote_first, compiled=compiled)


def check_estimator(estimator: Any) -> None:
    """Refuses anything but a fitted scikit-learn classifier or regressor (or Pipeline ending in one)."""
    from sklearn.base import BaseEstimator
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    kind = type(estimator).__name__
    if not isinstance(estimator, BaseEstimator):
        raise UnservableModel([f"a {kind} is not a scikit-learn estimator or Pipeline"])
    reasons = []
    if not hasattr(estimator, "predict"):
        reasons.append(f"a {kind} has no predict method (a transformer alone is not a model)")
    try:
        check_is_fitted(estimator)
    except NotFittedError:
        reasons.append(f"the {kind} is not fitted: call fit(...) before publishing it")
    except TypeError as exc:
        reasons.append(f"the {kind} cannot be checked for being fitted ({exc})")
    if not reasons and _task(estimator) is None:
        reasons.append(f"a {kind} is neither a classifier nor a regressor; only those are served")
    if reasons:
        raise UnservableModel(reasons)


def read_frame(source: Any, what: str) -> pd.DataFrame:
    """`source` as a DataFrame: itself, or read from a .csv or .parquet file."""
    if isinstance(source, pd.DataFrame):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise UnservableModel(
            [f"the {what} must be a pandas DataFrame or the path of a .csv or .parquet file, got {type(source).__name__}"]
        )
    path = Path(source)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise InvalidInput(f"the {what} {path.name!r} is neither a .csv nor a .parquet file")
    try:
        frame: pd.DataFrame = getattr(pd, reader)(path)
    except FileNotFoundError:
        raise InvalidInput(f"the {what} file {str(path)!r} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's problem
        raise InvalidInput(f"cannot read the {what} file {path.name!r}: {type(exc).__name__}: {exc}") from None
    return frame


def check_faithful(estimator: Any, rows: pd.DataFrame, schema: InputSchema, expected: np.ndarray) -> None:
    """Refuses unless `rows`, decoded as a server decodes a request, predict `expected`."""
    try:
        decoded = decode_frame(rows, schema).to_dataframe()
    except InvalidInput as exc:
        raise UnservableModel([f"the sample's rows are not valid requests for the inferred schema: {exc.message}"]) from None
    served = _predict(estimator, decoded)
    differ = _differing(expected, served, estimator)
    if differ.any():
        raise UnservableModel([
            f"the sample's rows, decoded as the server decodes requests, predict differently on "
            f"{int(differ.sum())} of {len(rows)} rows (rows {_labels(rows, differ)}); "
            f"{_column_differences(rows, decoded)}"
        ])


def check_storable(estimator: Any, rows: pd.DataFrame, expected: np.ndarray, name: str) -> None:
    """Refuses unless the estimator round-trips through skops and the servers' allow-list
    (serve_app/model/formats.py) and then predicts `expected` on `rows`."""
    import skops.io

    try:
        data = skops.io.dumps(estimator)
    except Exception as exc:  # noqa: BLE001 - skops has no common error type
        raise UnservableModel([f"skops cannot write this model: {type(exc).__name__}: {exc}"]) from None
    try:
        stored = formats.loads(data, "skops", f"{name} (to be published)")
    except ModelLoadError as exc:
        raise UnservableModel([f"it cannot be stored safely: {exc.message}"]) from exc
    differ = _differing(expected, _predict(stored, rows), estimator)
    if differ.any():
        raise UnservableModel([
            f"the model read back from the skops format predicts differently on {int(differ.sum())} of "
            f"{len(rows)} sample rows (rows {_labels(rows, differ)})"
        ])


def scalar_params(estimator: Any) -> dict[str, Any]:
    """The estimator's plain parameters, a Pipeline's steps' included (`model__max_iter`)."""
    return {k: v for k, v in estimator.get_params(deep=True).items() if isinstance(v, (int, float, str, bool, type(None)))}


def _task(estimator: Any) -> str | None:
    from sklearn.base import is_classifier, is_regressor

    if is_classifier(estimator):
        return "classification"
    if is_regressor(estimator):
        return "regression"
    return None


def _split_target(frame: pd.DataFrame, target: str | None, what: str) -> pd.DataFrame:
    if target is None:
        return frame
    if target not in frame.columns:
        raise UnservableModel([f"the {what} has no target column {target!r} (columns: {', '.join(map(str, frame.columns))})"])
    return frame.drop(columns=[target])


def _check_rows(features: pd.DataFrame) -> pd.DataFrame:
    if len(features) <= CHECK_ROWS:
        return features
    picked = np.sort(np.random.default_rng(0).choice(len(features), size=CHECK_ROWS, replace=False))
    return features.iloc[picked]


@contextlib.contextmanager
def _quiet_feature_names() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _FEATURE_NAME_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def _predict(estimator: Any, rows: pd.DataFrame) -> np.ndarray:
    try:
        with _quiet_feature_names():
            return np.asarray(estimator.predict(rows))
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is a reason
        raise UnservableModel([f"the model fails to predict: {type(exc).__name__}: {exc}".splitlines()[0][:300]]) from None


def _differing(expected: np.ndarray, actual: np.ndarray, estimator: Any) -> np.ndarray:
    """Per row, whether `actual` differs from `expected`: labels exactly, regressors within
    REGRESSION_RTOL of the largest prediction."""
    if expected.shape != actual.shape:
        return np.ones(len(expected), dtype=bool)
    if _task(estimator) == "classification" or expected.dtype.kind not in "fc":
        return np.asarray(np.asarray(expected != actual).reshape(len(expected), -1).any(axis=1), dtype=bool)
    scale = max(1.0, float(np.nanmax(np.abs(expected)))) if expected.size else 1.0
    close = np.isclose(actual, expected, rtol=REGRESSION_RTOL, atol=REGRESSION_RTOL * scale, equal_nan=True)
    return np.asarray(np.asarray(~close).reshape(len(expected), -1).any(axis=1), dtype=bool)


def _labels(rows: pd.DataFrame, mask: np.ndarray) -> str:
    labels = [str(label) for label in rows.index[mask][:SHOWN_ROWS]]
    more = int(mask.sum()) - len(labels)
    return ", ".join(labels) + (f" and {more} more" if more > 0 else "")


def _column_differences(original: pd.DataFrame, decoded: pd.DataFrame) -> str:
    """Which columns the server would hand the model differently, and how."""
    found = []
    for name in original.columns:
        before, after = original[name], decoded[name]
        changed = [i for i in range(len(original)) if not _same(before.iloc[i], after.iloc[i])]
        if str(before.dtype) != str(after.dtype):
            found.append(f"column {name!r} is {before.dtype} in the sample but {after.dtype} as served")
        if changed:
            i = changed[0]
            found.append(
                f"column {name!r} differs on {len(changed)} row(s) (row {original.index[i]}: "
                f"{before.iloc[i]!r} in the sample, {after.iloc[i]!r} as served)"
            )
    return "; ".join(found) if found else "no column differs, so the model depends on something else about its input"


def _same(left: Any, right: Any) -> bool:
    left_null, right_null = bool(pd.isna(left)), bool(pd.isna(right))
    if left_null or right_null:
        return left_null and right_null
    return bool(left == right)


def _test_frame(test: Frame | None, target: str | None) -> pd.DataFrame | None:
    if test is None:
        return None
    if target is None:
        raise UnservableModel(["a test set is scored against its target column: name it (target=..., --target)"])
    frame = read_frame(test, "test set")
    if target not in frame.columns:
        raise UnservableModel([f"the test set has no target column {target!r}"])
    return frame


def _score(
    estimator: Any, frame: pd.DataFrame | None, target: str | None, schema: InputSchema
) -> tuple[dict[str, float], pd.DataFrame | None]:
    """The test metrics and the test set's feature columns (None when no test set is given)."""
    if frame is None or target is None:
        return {}, None
    missing = [name for name in schema.names if name not in frame.columns]
    if missing:
        raise UnservableModel([f"the test set lacks column(s) {missing} the model was fitted on"])
    features = frame[schema.names]
    predicted = _predict(estimator, features)
    return _metrics(frame[target].to_numpy(), predicted, _task(estimator)), features


def _metrics(truth: np.ndarray, predicted: np.ndarray, task: str | None) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, r2_score

    if task == "classification":
        return {
            "accuracy": float(accuracy_score(truth, predicted)),
            "f1_macro": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        }
    return {"r2": float(r2_score(truth, predicted)), "mae": float(mean_absolute_error(truth, predicted))}


def _runtime(
    estimator: Any, schema: InputSchema, features: pd.DataFrame, held_out: pd.DataFrame | None, progress: Progress | None
) -> tuple[dict[str, Any], bytes | None]:
    if not schema.all_numeric:
        kinds = sorted({column.kind for column in schema.columns if column.kind != "number"})
        nullable = [column.name for column in schema.columns if column.nullable]
        what = ", ".join(
            [f"{kind} columns" for kind in kinds] + ([f"nulls in {', '.join(nullable)}"] if nullable else [])
        )
        return {"runtime": "sklearn", "runtime_reason": (
            f"served by scikit-learn: typed columns ({what}); compiled conversion covers all-numeric models only"
        )}, None
    with _quiet_feature_names():  # the fast path and the ONNX checks pass a matrix in the fitted order
        return choose_runtime(
            estimator,
            features.to_numpy(dtype=np.float64),
            None if held_out is None else held_out.to_numpy(dtype=np.float64),
            progress=progress,
        )
