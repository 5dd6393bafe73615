"""infer_schema and the categorical training statistics, on tiny real models (model/schema.py)."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from serve_app.model.manifest import FeatureStats
from serve_app.model.schema import CategoryStats, UnservableModel, column_stats, infer_schema

N = 24
Y = np.array([0, 1] * (N // 2))


def _frame(**columns: object) -> pd.DataFrame:
    return pd.DataFrame(columns)


def _numbers(nan_at: tuple[int, ...] = ()) -> np.ndarray:
    values = np.linspace(0.0, 5.0, N)
    values[list(nan_at)] = np.nan
    return values


def test_kinds_dtypes_nulls_and_categories_from_pandas_dtypes() -> None:
    words = ["b", "a", "c"] * (N // 3)
    sample = _frame(
        f64=_numbers(nan_at=(3,)),
        f32=np.arange(N, dtype=np.float32),
        i64=np.arange(N),
        nullable_int=pd.array([1, None] + list(range(N - 2)), dtype="Int64"),
        flag=np.arange(N) % 2 == 0,
        nullable_flag=pd.array([True, None] + [False] * (N - 2), dtype="boolean"),
        text=pd.array(words, dtype="str"),
        text_na=pd.array(["x", None] + ["y"] * (N - 2), dtype="string"),
        obj=pd.Series(words, dtype=object),
        obj_flags=pd.Series([True, False] * (N // 2), dtype=object),
        cat=pd.Categorical(words),
    )
    # DummyClassifier takes any column and any null: kinds and nulls come from the sample.
    schema = infer_schema(DummyClassifier().fit(sample, Y), sample)
    got = {c.name: (c.kind, c.nullable, c.dtype) for c in schema.columns}
    assert got == {
        "f64": ("number", True, "float64"),
        "f32": ("number", False, "float32"),
        "i64": ("integer", False, "int64"),
        "nullable_int": ("integer", True, "Int64"),
        "flag": ("boolean", False, "bool"),
        "nullable_flag": ("boolean", True, "boolean"),
        "text": ("string", False, "str"),
        "text_na": ("string", True, "string"),
        "obj": ("string", False, "object"),
        "obj_flags": ("boolean", False, "object"),
        "cat": ("string", False, "category"),
    }
    assert schema.names == list(sample.columns)
    assert schema.column("text").categories == ("a", "b", "c")  # type: ignore[union-attr]
    assert schema.column("text_na").categories == ("x", "y")  # type: ignore[union-attr]
    assert schema.column("flag").categories is None  # type: ignore[union-attr]
    # No encoder that handles unknown categories: refused.
    assert {c.unknown_categories for c in schema.columns} == {"refused"}
    assert not schema.all_numeric


def _two_columns(nan_in_a: bool) -> pd.DataFrame:
    return _frame(a=_numbers(nan_at=(2, 5) if nan_in_a else ()), b=np.arange(N, dtype=np.float64) % 5)


@pytest.mark.parametrize(
    "model, nullable",
    [
        (make_pipeline(SimpleImputer(), LogisticRegression()), True),  # imputed in front
        (make_pipeline(StandardScaler(), HistGradientBoostingClassifier(max_iter=5)), True),  # native NaN
        (
            Pipeline([
                ("columns", ColumnTransformer([("a", SimpleImputer(), ["a"]), ("b", "passthrough", ["b"])])),
                ("model", LogisticRegression()),
            ]),
            True,
        ),
    ],
    ids=["imputer", "hist-gradient-boosting", "imputer-in-column-transformer"],
)
def test_a_null_the_model_copes_with_is_allowed(model: Pipeline, nullable: bool) -> None:
    sample = _two_columns(nan_in_a=True)
    schema = infer_schema(model.fit(sample, Y), sample)
    assert schema.column("a").nullable is nullable  # type: ignore[union-attr]
    assert schema.column("b").nullable is False  # type: ignore[union-attr]


def test_a_null_the_model_cannot_take_is_refused_naming_the_column() -> None:
    sample = _two_columns(nan_in_a=True)
    # Fitted on complete rows; the sample has NaN where LogisticRegression cannot take it.
    model = Pipeline([
        ("columns", ColumnTransformer([("scaled", StandardScaler(), ["a", "b"])])),
        ("model", LogisticRegression()),
    ]).fit(_two_columns(nan_in_a=False), Y)
    with pytest.raises(UnservableModel) as caught:
        infer_schema(model, sample)
    (reason,) = caught.value.reasons
    assert "'a' has 2 null(s)" in reason and "StandardScaler" in reason and "SimpleImputer" in reason
    assert caught.value.status_code == 422


def _strings() -> pd.DataFrame:
    return _frame(colour=pd.array(["red", "green", "blue", "red"] * (N // 4), dtype="str"), size=_numbers())


@pytest.mark.parametrize(
    "encoder, allowed",
    [
        (OneHotEncoder(handle_unknown="ignore"), "allowed"),
        (OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=2), "allowed"),
        (OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1), "allowed"),
        (OneHotEncoder(), "refused"),
        (OrdinalEncoder(), "refused"),
    ],
    ids=["onehot-ignore", "onehot-infrequent", "ordinal-encoded-value", "onehot-error", "ordinal-error"],
)
def test_unknown_categories_follow_the_encoder_the_column_goes_through(encoder: object, allowed: str) -> None:
    sample = _strings()
    model = Pipeline([
        ("columns", ColumnTransformer([("colour", encoder, ["colour"])], remainder="passthrough")),
        ("model", LogisticRegression()),
    ]).fit(sample, Y)
    schema = infer_schema(model, sample)
    colour = schema.column("colour")
    assert colour is not None and colour.kind == "string"
    assert colour.categories == ("blue", "green", "red")
    assert colour.unknown_categories == allowed
    assert schema.column("size").unknown_categories == "refused"  # type: ignore[union-attr]


def test_what_cannot_be_served_faithfully_is_refused_with_every_reason() -> None:
    sample = _frame(
        mixed=pd.Series(["a", 1, 2.5] * (N // 3), dtype=object),
        when=pd.date_range("2024-01-01", periods=N),
        ok=_numbers(),
    )
    with pytest.raises(UnservableModel) as caught:
        infer_schema(DummyClassifier().fit(sample, Y), sample)
    reasons = caught.value.reasons
    assert len(reasons) == 2
    assert "'mixed'" in reasons[0] and "mixed" in reasons[0] and "float, int, str" in reasons[0]
    assert "'when'" in reasons[1] and "datetime64" in reasons[1]
    # Survives pickling (errors cross Ray handles) with its reasons.
    again = pickle.loads(pickle.dumps(caught.value))
    assert again.reasons == reasons and str(again) == str(caught.value)


def test_columns_the_model_does_not_know_or_lacks_are_refused() -> None:
    sample = _two_columns(nan_in_a=False)
    model = DummyClassifier().fit(sample, Y)
    with pytest.raises(UnservableModel, match=r"\['target'\] the model does not know"):
        infer_schema(model, sample.assign(target=Y))
    with pytest.raises(UnservableModel, match=r"lacks column\(s\) \['b'\]"):
        infer_schema(model, sample[["a"]])


def test_a_model_fitted_without_names_takes_the_samples_columns() -> None:
    sample = _two_columns(nan_in_a=False)
    model = LogisticRegression().fit(sample.to_numpy(), Y)
    schema = infer_schema(model, sample)
    assert schema.names == ["a", "b"] and schema.all_numeric
    with pytest.raises(UnservableModel, match="fitted on 2 features without names, the sample has 1"):
        infer_schema(model, sample[["a"]])


def test_column_stats_has_category_frequencies_and_numeric_stats() -> None:
    sample = _frame(
        colour=pd.array(["red", "red", "blue", None] * (N // 4), dtype="str"),
        flag=np.array([True, True, True, False] * (N // 4)),
        size=_numbers(nan_at=(0, 1)),
    )
    schema = infer_schema(DummyClassifier().fit(sample, Y), sample)
    stats = column_stats(sample, schema)
    colour = stats["colour"]
    assert isinstance(colour, CategoryStats)
    assert colour.rows == N and colour.null_share == pytest.approx(0.25)
    assert colour.frequencies == pytest.approx({"red": 2 / 3, "blue": 1 / 3})
    assert list(colour.frequencies) == ["red", "blue"]  # most frequent first
    assert stats["flag"] == CategoryStats(rows=N, null_share=0.0, frequencies={"true": 0.75, "false": 0.25})
    size = stats["size"]
    assert isinstance(size, FeatureStats)
    assert size.min == pytest.approx(_numbers()[2]) and size.max == 5.0 and len(size.sample) == N - 2
