"""serve_app's numpy transform of a typed Pipeline's ColumnTransformer (model/encoder.py): used
only where it gives scikit-learn's own output, and then the served answers are the model's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from serve_app.model import encoder as encoder_module
from serve_app.model.churn import TARGET, churn_frame, fit_churn
from serve_app.model.predictor import Predictor
from serve_app.model.publish import publish
from serve_app.model.store import ModelStore
from serve_app.protocol.columns import decode_frame


def mixed_frame(n_rows: int, seed: int) -> pd.DataFrame:
    """Strings with and without missing values, a nullable integer, booleans, floats with NaN."""
    rng = np.random.default_rng(seed)
    city = rng.choice(["paris", "lyon", "nice", "lille"], n_rows).astype(object)
    city[rng.random(n_rows) < 0.1] = np.nan
    visits = pd.array(rng.integers(0, 30, n_rows), dtype="Int64")
    visits[rng.random(n_rows) < 0.1] = pd.NA
    income = rng.normal(3000, 800, n_rows)
    income[rng.random(n_rows) < 0.1] = np.nan
    return pd.DataFrame({
        "city": pd.Series(city, dtype=object),
        "plan": pd.array(rng.choice(["basic", "pro"], n_rows), dtype="str"),
        "age": rng.integers(18, 90, n_rows),
        "income": income,
        "visits": visits,
        "active": rng.random(n_rows) < 0.5,
    })


def target(frame: pd.DataFrame) -> np.ndarray:
    return ((frame["age"] > 50) ^ (frame["plan"] == "pro")).to_numpy().astype(int)


STRINGS, NUMBERS = ["city", "plan"], ["age", "income", "visits"]


def pipeline(columns: ColumnTransformer, final: Any = None) -> Pipeline:
    return Pipeline([("columns", columns), ("model", HistGradientBoostingClassifier(max_iter=15, random_state=0) if final is None else final)])


SUPPORTED: dict[str, Callable[[], Pipeline]] = {
    "one-hot, scaled, passed through": lambda: pipeline(ColumnTransformer([
        ("strings", OneHotEncoder(handle_unknown="ignore", sparse_output=False), STRINGS),
        ("numbers", StandardScaler(), NUMBERS),
        ("booleans", "passthrough", ["active"]),
    ])),
    "unknown categories an error, scaler without mean, rest passed through": lambda: pipeline(ColumnTransformer([
        ("strings", OneHotEncoder(sparse_output=False), STRINGS),
        ("numbers", StandardScaler(with_mean=False), ["income", "visits"]),
    ], remainder="passthrough")),
    "integers and booleans one-hot, a column dropped": lambda: pipeline(ColumnTransformer([
        ("codes", OneHotEncoder(handle_unknown="ignore", sparse_output=False), ["age", "active", "plan"]),
        ("unused", "drop", ["city"]),
        ("numbers", StandardScaler(with_std=False), ["income"]),
    ])),
    "imputers before the encoder and the scaler, a linear model after": lambda: pipeline(ColumnTransformer([
        ("strings", make_pipeline(SimpleImputer(strategy="most_frequent"),
                                  OneHotEncoder(handle_unknown="ignore", sparse_output=False)), ["city"]),
        ("plans", make_pipeline(SimpleImputer(strategy="constant", fill_value="none"), OneHotEncoder(sparse_output=False)), ["plan"]),
        ("numbers", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), NUMBERS),
        ("filled", SimpleImputer(strategy="constant", fill_value=-1.0), ["visits"]),
        ("booleans", "passthrough", ["active"]),
    ]), LogisticRegression(max_iter=500)),
    "a forest after it": lambda: pipeline(ColumnTransformer([
        ("strings", OneHotEncoder(handle_unknown="ignore", sparse_output=False), ["plan"]),
        ("numbers", "passthrough", ["age", "active"]),
    ]), RandomForestClassifier(n_estimators=5, random_state=0)),
}

UNSUPPORTED: dict[str, tuple[Callable[[], Pipeline], str]] = {
    "an imputer of another missing value": (lambda: pipeline(ColumnTransformer([
        ("strings", OneHotEncoder(handle_unknown="ignore", sparse_output=False), STRINGS),
        ("ages", make_pipeline(SimpleImputer(missing_values=0), StandardScaler()), ["age"]),  # 0: age unknown
    ])), "missing_values other than NaN"),
    "another transformer in a step's Pipeline": (lambda: pipeline(ColumnTransformer([
        ("strings", OneHotEncoder(handle_unknown="ignore", sparse_output=False), STRINGS),
        ("numbers", make_pipeline(StandardScaler(), SimpleImputer()), NUMBERS),
    ])), "StandardScaler before its last step"),
    "a dropped first category": (lambda: pipeline(ColumnTransformer([
        ("strings", OneHotEncoder(drop="first", sparse_output=False), ["plan"]),
        ("numbers", "passthrough", ["age"]),
    ])), "drops a category"),
    "infrequent categories": (lambda: pipeline(ColumnTransformer([
        ("strings", OneHotEncoder(min_frequency=0.2, handle_unknown="infrequent_if_exist", sparse_output=False), ["city"]),
        ("numbers", "passthrough", ["age"]),
    ])), "infrequent"),
    "DataFrame output": (lambda: pipeline(ColumnTransformer([
        ("strings", OneHotEncoder(handle_unknown="ignore", sparse_output=False), ["plan"]),
        ("numbers", "passthrough", ["age"]),
    ]).set_output(transform="pandas")), "DataFrames"),
}


def published(tmp_path: Path, model: Pipeline, name: str = "mixed") -> tuple[Predictor, pd.DataFrame]:
    sample = mixed_frame(600, seed=0)
    model.fit(sample, target(sample))
    store = ModelStore(tmp_path / "models")
    publish(model, name=name, sample=sample, store=store)
    return Predictor.load(store, name), sample


def assert_served_as_the_model(predictor: Predictor, model: Pipeline, rows: pd.DataFrame) -> None:
    table = decode_frame(rows, predictor.schema)
    np.testing.assert_array_equal(predictor.predict(table), model.predict(rows))
    np.testing.assert_array_equal(predictor.predict_proba(table), model.predict_proba(rows))
    labels, proba = predictor.predict_with_proba(table)
    np.testing.assert_array_equal(labels, model.predict(rows))
    np.testing.assert_array_equal(proba, model.predict_proba(rows))


@pytest.mark.parametrize("shape", list(SUPPORTED))
def test_a_supported_head_is_encoded_by_serve_app_identically(tmp_path: Path, shape: str) -> None:
    model = SUPPORTED[shape]()
    predictor, _ = published(tmp_path, model)
    assert predictor.encoder_reason.startswith("serve_app, numpy"), predictor.encoder_reason
    assert predictor.metadata()["column_encoder"] == predictor.encoder_reason
    rows = mixed_frame(2000, seed=7)  # other rows than the probe or the sample, nulls included
    table = decode_frame(rows, predictor.schema)
    ours = predictor._encoder.transform(table)  # type: ignore[union-attr]
    # (scikit-learn stacks an object array when integers or booleans pass through beside
    # floats; the model's input check makes it float64, which the encoder gives directly.)
    np.testing.assert_array_equal(ours, np.asarray(model[:-1].transform(rows)).astype(np.float64))
    assert ours.dtype == np.float64
    assert_served_as_the_model(predictor, model, rows)
    assert_served_as_the_model(predictor, model, rows.iloc[[3]])  # one row, as most requests are


@pytest.mark.parametrize("shape", list(UNSUPPORTED))
def test_another_head_is_left_to_scikit_learn_saying_why(tmp_path: Path, shape: str) -> None:
    make, why = UNSUPPORTED[shape]
    model = make()
    predictor, _ = published(tmp_path, model)
    assert predictor._encoder is None
    assert predictor.encoder_reason.startswith("scikit-learn (") and why in predictor.encoder_reason, predictor.encoder_reason
    assert_served_as_the_model(predictor, model, mixed_frame(300, seed=8))


def test_the_churn_example_is_encoded_by_serve_app(tmp_path: Path) -> None:
    frame = churn_frame(1500, seed=0)
    model = fit_churn(frame)
    store = ModelStore(tmp_path / "models")
    publish(model, name="churn", sample=frame.drop(columns=[TARGET]), store=store)
    predictor = Predictor.load(store, "churn")
    assert predictor.encoder_reason.startswith("serve_app, numpy"), predictor.encoder_reason
    assert_served_as_the_model(predictor, model, churn_frame(3000, seed=4).drop(columns=[TARGET]))


def test_an_unknown_category_is_zeros_where_ignored_and_scikit_learns_call_where_not(tmp_path: Path) -> None:
    ignoring = SUPPORTED["one-hot, scaled, passed through"]()
    predictor, sample = published(tmp_path / "a", ignoring)
    rows = sample.iloc[:3].copy()
    rows["city"] = ["marseille", "paris", "brest"]
    from serve_app.protocol.columns import ColumnTable

    table = ColumnTable(predictor.schema, {**decode_frame(sample.iloc[:3], predictor.schema).columns,
                                           "city": np.array(rows["city"].tolist(), dtype=object)}, 3)
    expected = np.asarray(ignoring[:-1].transform(rows)).astype(np.float64)
    np.testing.assert_array_equal(predictor._encoder.transform(table), expected)  # type: ignore[union-attr]

    refusing = SUPPORTED["unknown categories an error, scaler without mean, rest passed through"]()
    predictor, sample = published(tmp_path / "b", refusing)
    table = ColumnTable(predictor.schema, {**decode_frame(sample.iloc[:3], predictor.schema).columns,
                                           "city": np.array(rows["city"].tolist(), dtype=object)}, 3)
    assert predictor._encoder.transform(table) is None  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown categor"):
        predictor.predict(table)  # scikit-learn's own answer (the routes refuse such rows before)


def test_an_encoder_that_differs_on_the_probe_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe is what stands between a wrong encoder and wrong answers: one that forgets the
    scaler's division is caught there, and scikit-learn answers."""
    def scaled_without_division(scaler: Any) -> Any:
        return lambda values: encoder_module._numbers(values) - scaler.mean_

    monkeypatch.setattr(encoder_module, "_scaled", scaled_without_division)
    model = SUPPORTED["one-hot, scaled, passed through"]()
    predictor, _ = published(tmp_path, model)
    assert predictor._encoder is None
    assert "differed on its probe: row" in predictor.encoder_reason, predictor.encoder_reason
    assert_served_as_the_model(predictor, model, mixed_frame(300, seed=9))
