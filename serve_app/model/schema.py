"""A model's input schema: named, typed columns (what a request must send, per column).

A model trained on a numeric matrix (the built-in datasets) has only `number` columns and is
served on the fast path: one float64 matrix, no pandas. A Pipeline fitted on a DataFrame
(strings, booleans, missing values) has typed columns; requests are checked column by column
against this schema before anything reaches the model.

`infer_schema` reads the schema off a fitted estimator and a sample of its training data, and
refuses (`UnservableModel`, every reason listed) what could not be served faithfully.
`column_stats` computes the per-column training statistics drift is measured against.
pandas is imported only inside the functions that take a DataFrame: this module is on the
request path of all-numeric models, which never need pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from serve_app.errors import InvalidInput

if TYPE_CHECKING:
    import pandas as pd

    # manifest.py records schemas: importing it here at run time would make a cycle.
    from serve_app.model.manifest import FeatureStats

ColumnKind = Literal["number", "integer", "boolean", "string"]
# The Open Inference Protocol V2 datatype each kind travels as (MLServer's pandas codec and
# tritonclient use the same convention: one named input per column).
V2_DATATYPES: dict[str, str] = {"number": "FP64", "integer": "INT64", "boolean": "BOOL", "string": "BYTES"}
# The pandas dtype a column gets when its schema names none (a model fitted on a matrix).
DEFAULT_DTYPES: dict[str, str] = {"number": "float64", "integer": "int64", "boolean": "bool", "string": "object"}

# Encoders that turn a category never seen in fit into something defined (all zeros, an
# "infrequent" column, a chosen code) instead of raising: class name -> handle_unknown values.
_UNKNOWN_TOLERANT = {
    "OneHotEncoder": ("ignore", "infrequent_if_exist"),
    "OrdinalEncoder": ("use_encoded_value",),
}
# Rows of the sample the probes predict on (a few: probes run once per nullable column).
_PROBE_ROWS = 4
_UNSEEN_PROBE = "\x00serve-app: a category never seen in training"


class Column(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: ColumnKind
    nullable: bool = False
    """Whether a null (JSON null, NaN, None) may be sent: the training sample had missing values
    and the model handles them."""
    categories: tuple[str, ...] | None = None
    """For `string` columns: the categories seen in training, sorted."""
    unknown_categories: Literal["refused", "allowed"] = "refused"
    """Whether a category never seen in training may be sent (allowed where the model handles
    it, e.g. OneHotEncoder(handle_unknown="ignore"))."""
    dtype: str | None = None
    """The pandas dtype the model was fitted with ("float64", "Int64", "bool", "boolean", "str",
    "string", "object", "category", ...): requests are handed to the model with it. None: the
    kind's default (`DEFAULT_DTYPES`)."""

    @property
    def v2_datatype(self) -> str:
        return V2_DATATYPES[self.kind]

    @property
    def pandas_dtype(self) -> str:
        return self.dtype or DEFAULT_DTYPES[self.kind]


class InputSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [column.name for column in self.columns]

    @property
    def all_numeric(self) -> bool:
        """True when requests can be one float64 matrix (the fast path)."""
        return all(column.kind == "number" and not column.nullable for column in self.columns)

    def column(self, name: str) -> Column | None:
        return next((column for column in self.columns if column.name == name), None)

    @classmethod
    def numeric(cls, names: list[str]) -> "InputSchema":
        return cls(columns=tuple(Column(name=name, kind="number") for name in names))


class CategoryStats(BaseModel):
    """Training-time distribution of one categorical (string or boolean) column: the
    categorical drift monitor's reference, beside the numeric `FeatureStats`."""

    model_config = ConfigDict(extra="forbid")

    rows: int
    """Rows of the sample, nulls included."""
    null_share: float
    """Fraction of those rows that were null."""
    frequencies: dict[str, float]
    """Per category (booleans as "false"/"true"), its fraction of the non-null rows; most
    frequent first, ties by name."""


class UnservableModel(InvalidInput):
    """The estimator and sample cannot be served faithfully; `reasons` says why, one per problem."""

    def __init__(self, reasons: Sequence[str], status_code: int | None = None) -> None:
        self.reasons = list(reasons) if not isinstance(reasons, str) else [reasons]
        super().__init__("cannot serve this model: " + "; ".join(self.reasons), status_code)

    def __reduce__(self) -> tuple[type, tuple[list[str], int]]:  # type: ignore[override]
        return (type(self), (self.reasons, self.status_code))


def infer_schema(estimator: Any, sample: "pd.DataFrame") -> InputSchema:
    """The input schema of a fitted estimator (or Pipeline), read off it and a sample of its
    training data (a DataFrame of the feature columns, without the target).

    Per column: the kind from the sample's dtype; `nullable` when the sample has nulls there
    and the model predicts with a null in that column; the categories seen; unknown categories
    `allowed` when the column's first transformer is an encoder that tolerates them
    (OneHotEncoder(handle_unknown="ignore"|"infrequent_if_exist"),
    OrdinalEncoder(handle_unknown="use_encoded_value")) and the model does predict on one.
    Raises `UnservableModel` with every reason when a column cannot be served faithfully.
    """
    import pandas as pd

    if not isinstance(sample, pd.DataFrame):
        raise UnservableModel([f"the sample must be a pandas DataFrame, got {type(sample).__name__}"])
    if len(sample) == 0:
        raise UnservableModel(["the sample has no rows"])
    reasons: list[str] = []
    names = _feature_names(estimator, sample, reasons)
    if reasons:
        raise UnservableModel(reasons)
    frame = sample[names]
    consumers = _first_consumers(estimator, names)
    base = frame[~frame.isna().any(axis=1)].head(_PROBE_ROWS)
    if base.empty:
        base = frame.head(_PROBE_ROWS)
    base_error = _predict_error(estimator, base)
    if base_error:
        raise UnservableModel([f"the model does not predict on the sample's rows ({base_error})"])
    columns = []
    for name in names:
        series = frame[name]
        kind, problem = _kind_of(series)
        if kind is None:
            reasons.append(f"column {name!r}: {problem}")
            continue
        consumer = consumers.get(name)
        nulls = int(series.isna().sum())
        nullable = False
        if nulls:
            error = _predict_error(estimator, _with_null(base, name))
            if error:
                reasons.append(
                    f"column {name!r} has {nulls} null(s) in the sample, but the model fails on a null "
                    f"there ({_describe(consumer)}: {error}); impute it in the Pipeline "
                    "(e.g. SimpleImputer) or drop those rows from the sample"
                )
                continue
            nullable = True
        categories = None
        unknown: Literal["refused", "allowed"] = "refused"
        if kind == "string":
            categories = tuple(sorted({str(v) for v in series.dropna().unique()}))
            if _tolerates_unknown(consumer) and not _predict_error(estimator, _with_unseen(base, name)):
                unknown = "allowed"
        columns.append(
            Column(
                name=name, kind=kind, nullable=nullable, categories=categories,
                unknown_categories=unknown, dtype=str(series.dtype),
            )
        )
    if reasons:
        raise UnservableModel(reasons)
    return InputSchema(columns=tuple(columns))


def column_stats(
    sample: "pd.DataFrame", schema: InputSchema, seed: int = 0
) -> dict[str, FeatureStats | CategoryStats]:
    """Per column, the training statistics drift is measured against: `FeatureStats` (as for
    numeric models, over the non-null values) for number and integer columns, `CategoryStats`
    for string and boolean ones. A numeric column with no non-null value gets none."""
    from serve_app.model.manifest import feature_stats

    rng = np.random.default_rng(seed)
    stats: dict[str, FeatureStats | CategoryStats] = {}
    for column in schema.columns:
        series = sample[column.name]
        if column.kind in ("number", "integer"):
            values = series.dropna().to_numpy(dtype=np.float64)
            if len(values):
                stats[column.name] = feature_stats(values, rng)
        else:
            stats[column.name] = category_stats(series)
    return stats


def category_stats(series: "pd.Series") -> CategoryStats:
    rows = len(series)
    values = series.dropna()
    counts: dict[str, int] = {}
    for value, count in values.value_counts(sort=False).items():
        key = category_key(value)
        counts[key] = counts.get(key, 0) + int(count)
    total = sum(counts.values())
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return CategoryStats(
        rows=rows,
        null_share=(rows - total) / rows if rows else 0.0,
        frequencies={key: count / total for key, count in ordered},
    )


def category_key(value: Any) -> str:
    """How a categorical value is named in statistics: booleans as "true"/"false", else str()."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    return str(value)


def _feature_names(estimator: Any, sample: "pd.DataFrame", reasons: list[str]) -> list[str]:
    columns = list(sample.columns)
    not_str = [c for c in columns if not isinstance(c, str)]
    if not_str:
        reasons.append(f"column names must be strings, got {not_str[:5]!r}")
        return []
    if len(set(columns)) != len(columns):
        reasons.append("the sample has duplicate column names")
        return []
    known = getattr(estimator, "feature_names_in_", None)
    if known is None:
        expected = getattr(estimator, "n_features_in_", None)
        if expected is not None and expected != len(columns):
            reasons.append(
                f"the model was fitted on {expected} features without names, the sample has "
                f"{len(columns)} columns"
            )
        return columns
    names = [str(name) for name in known]
    missing = [name for name in names if name not in columns]
    extra = [name for name in columns if name not in names]
    if missing:
        reasons.append(f"the sample lacks column(s) {missing} the model was fitted on")
    if extra:
        reasons.append(
            f"the sample has column(s) {extra} the model does not know; drop them "
            "(the target column too)"
        )
    return names


def _kind_of(series: "pd.Series") -> tuple[ColumnKind | None, str]:
    """The column kind for a sample column, or None and why it cannot be served."""
    import pandas as pd
    from pandas.api import types

    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        values = dtype.categories
        if types.is_string_dtype(values.dtype) and all(isinstance(v, str) for v in values):
            return "string", ""
        return None, (
            f"a category column whose categories are {values.dtype}, not strings; "
            "convert it to its values' type before fitting"
        )
    if types.is_bool_dtype(dtype):
        return "boolean", ""
    if types.is_integer_dtype(dtype):
        if series.notna().any() and dtype.kind == "u" and int(series.max()) > np.iinfo(np.int64).max:
            return None, "unsigned integers beyond the int64 range"
        return "integer", ""
    if types.is_float_dtype(dtype):
        return "number", ""
    if types.is_datetime64_any_dtype(dtype) or types.is_timedelta64_dtype(dtype) or isinstance(dtype, pd.PeriodDtype):
        return None, (
            f"a {dtype} column: dates and durations have no request type; turn them into "
            "numbers (e.g. days since an epoch) or strings before fitting"
        )
    if types.is_string_dtype(dtype) and dtype != object:
        return "string", ""
    if dtype == object:
        return _object_kind(series)
    return None, f"dtype {dtype} has no request type (use numbers, integers, booleans or strings)"


def _object_kind(series: "pd.Series") -> tuple[ColumnKind | None, str]:
    values = series.dropna()
    if values.empty:
        return None, "no non-null value in the sample, so its type is unknown"
    found = {_python_kind(value) for value in values}
    if found == {"string"}:
        return "string", ""
    if found == {"boolean"}:
        return "boolean", ""
    if found == {"integer"}:
        return "integer", ""
    if found <= {"integer", "number"}:
        return "number", ""
    shown = sorted(sorted({type(v).__name__ for v in values}))
    return None, f"values of mixed or unsupported types ({', '.join(shown)}); give the column one type"


def _python_kind(value: Any) -> str:
    if isinstance(value, str):
        return "string"
    if isinstance(value, (bool, np.bool_)):
        return "boolean"
    if isinstance(value, (int, np.integer)):
        return "integer"
    if isinstance(value, (float, np.floating)):
        return "number"
    return type(value).__name__


def _first_consumers(estimator: Any, names: list[str]) -> dict[str, Any]:
    """Per input column, the first transformer (or estimator) that reads it: the Pipeline's
    first step, or for a ColumnTransformer the first step of the transformer given the column
    ("drop" for dropped columns; a passthrough reaches the next step)."""
    steps = list(getattr(estimator, "steps", [(None, estimator)]))
    steps = [(name, step) for name, step in steps if step not in (None, "passthrough")]
    if not steps:
        return {}
    first = steps[0][1]
    transformers = getattr(first, "transformers_", None)
    if transformers is None:
        return {name: _first_step(first) for name in names}
    after = steps[1][1] if len(steps) > 1 else None
    indices: dict[str, list[int]] = getattr(first, "_transformer_to_input_indices", {})
    consumers: dict[str, Any] = {}
    for label, transformer, columns in transformers:
        chosen = indices.get(label)
        if chosen is None:
            chosen = [names.index(c) if isinstance(c, str) else int(c) for c in np.atleast_1d(columns)]
        for index in chosen:
            if _is_passthrough(transformer):
                consumers[names[index]] = _first_step(after) if after is not None else "passthrough"
            else:
                consumers[names[index]] = transformer if transformer == "drop" else _first_step(transformer)
    return consumers


def _first_step(estimator: Any) -> Any:
    while hasattr(estimator, "steps") and estimator.steps:
        estimator = estimator.steps[0][1]
    return estimator


def _is_passthrough(transformer: Any) -> bool:
    return transformer == "passthrough" or (
        type(transformer).__name__ == "FunctionTransformer" and getattr(transformer, "func", None) is None
    )


def _tolerates_unknown(consumer: Any) -> bool:
    accepted = _UNKNOWN_TOLERANT.get(type(consumer).__name__, ())
    return getattr(consumer, "handle_unknown", None) in accepted


def _describe(consumer: Any) -> str:
    if consumer is None:
        return "the model"
    if isinstance(consumer, str):
        return consumer
    return type(consumer).__name__


def _predict_error(estimator: Any, rows: "pd.DataFrame") -> str:
    """Why the model fails on `rows` (its exception, one line), or "" when it predicts."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimator.predict(rows)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is a reason
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return ""


def _with_null(rows: "pd.DataFrame", name: str) -> "pd.DataFrame":
    probe = rows.copy()
    probe[name] = probe[name].mask(np.ones(len(probe), dtype=bool))
    return probe


def _with_unseen(rows: "pd.DataFrame", name: str) -> "pd.DataFrame":
    import pandas as pd

    probe = rows.copy()
    dtype = probe[name].dtype
    values = [_UNSEEN_PROBE] * len(probe)
    if isinstance(dtype, pd.CategoricalDtype):
        probe[name] = pd.Categorical(values)
    else:
        probe[name] = pd.Series(values, index=probe.index, dtype=dtype)
    return probe
