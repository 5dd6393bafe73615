"""The built-in churn dataset and Pipeline (model/churn.py): seeded, learnable, servable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.pipeline import Pipeline

from serve_app.model.churn import BOOLEAN_COLUMNS, INTEGER_COLUMNS, REGIONS, STRING_COLUMNS, TARGET, churn_frame, fit_churn
from serve_app.model.schema import infer_schema


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return churn_frame()


@pytest.fixture(scope="module")
def model(frame: pd.DataFrame) -> Pipeline:
    return fit_churn(frame.iloc[:4000])


def test_the_same_seed_gives_the_same_data(frame: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(churn_frame(), frame)
    assert not churn_frame(seed=1).equals(frame)
    assert len(frame) == 5000


def test_it_looks_like_real_tabular_data(frame: pd.DataFrame) -> None:
    assert {str(t) for t in frame.dtypes} == {"int64", "float64", "str", "bool"}
    assert 0.02 < frame["monthly_charges"].isna().mean() < 0.07
    assert frame.drop(columns=["monthly_charges"]).notna().all().all()
    regions = frame["region"].value_counts(normalize=True)
    assert regions.iloc[0] > 0.2 and regions.iloc[-1] < 0.01  # a long tail
    assert 0.3 < frame[TARGET].mean() < 0.6


def test_the_pipeline_learns_real_signal(frame: pd.DataFrame, model: Pipeline) -> None:
    held_out = frame.iloc[4000:]
    accuracy = float((model.predict(held_out.drop(columns=[TARGET])) == held_out[TARGET]).mean())
    majority = max(held_out[TARGET].mean(), 1 - held_out[TARGET].mean())
    assert accuracy > majority + 0.1, (accuracy, majority)
    # Deterministic: refitting gives the same predictions.
    np.testing.assert_array_equal(fit_churn(frame.iloc[:4000]).predict_proba(held_out.drop(columns=[TARGET])), model.predict_proba(held_out.drop(columns=[TARGET])))


def test_its_schema(frame: pd.DataFrame, model: Pipeline) -> None:
    schema = infer_schema(model, frame.iloc[:4000].drop(columns=[TARGET]))
    kinds = {c.name: (c.kind, c.nullable, c.unknown_categories) for c in schema.columns}
    assert kinds == {
        "tenure_months": ("integer", False, "refused"),
        "monthly_charges": ("number", True, "refused"),  # NaN through StandardScaler to the boosted trees
        "support_calls": ("integer", False, "refused"),
        "contract": ("string", False, "allowed"),  # OneHotEncoder(handle_unknown="ignore")
        "payment_method": ("string", False, "allowed"),
        "region": ("string", False, "allowed"),
        "paperless_billing": ("boolean", False, "refused"),
        "senior_citizen": ("boolean", False, "refused"),
    }
    assert schema.column("contract").categories == ("month-to-month", "one-year", "two-year")  # type: ignore[union-attr]
    assert schema.column("region").categories == REGIONS  # type: ignore[union-attr]
    assert set(STRING_COLUMNS) | set(BOOLEAN_COLUMNS) | set(INTEGER_COLUMNS) <= set(schema.names)
