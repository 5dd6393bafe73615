"""A built-in realistic tabular model: a seeded synthetic "churn" dataset and its Pipeline.

The data is generated here (no downloads) and has what real tabular data has: numbers with
missing values, integers, strings (one with a long tail of rare values), booleans, and a
binary target that depends on most of them. The Pipeline is the one real users bring:
a ColumnTransformer (one-hot strings, scaled numbers, booleans as they are) in front of a
HistGradientBoostingClassifier, which handles the missing values itself.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

TARGET = "churned"
NUMBER_COLUMNS = ("monthly_charges",)
INTEGER_COLUMNS = ("tenure_months", "support_calls")
STRING_COLUMNS = ("contract", "payment_method", "region")
BOOLEAN_COLUMNS = ("paperless_billing", "senior_citizen")
CONTRACTS = ("month-to-month", "one-year", "two-year")
PAYMENT_METHODS = ("bank transfer", "credit card", "electronic check", "mailed check")
# 30 regions with Zipf-like weights: a few common, a long tail of rare ones.
REGIONS = tuple(f"region-{i:02d}" for i in range(1, 31))
MISSING_CHARGES_SHARE = 0.04


def churn_frame(n_rows: int = 5000, seed: int = 0) -> pd.DataFrame:
    """The feature columns and the `churned` target (0/1), the same for the same seed."""
    rng = np.random.default_rng(seed)
    contract = rng.choice(CONTRACTS, size=n_rows, p=[0.55, 0.25, 0.20])
    payment = rng.choice(PAYMENT_METHODS, size=n_rows, p=[0.22, 0.22, 0.34, 0.22])
    weights = 1.0 / np.arange(1, len(REGIONS) + 1) ** 1.1
    region = rng.choice(REGIONS, size=n_rows, p=weights / weights.sum())
    tenure = np.clip(rng.gamma(1.6, 14.0, size=n_rows), 0, 72).astype(np.int64)
    monthly = np.round(rng.normal(65.0, 25.0, size=n_rows).clip(18.0, 120.0), 2)
    support_calls = rng.poisson(1.2, size=n_rows).astype(np.int64)
    paperless = rng.random(n_rows) < 0.6
    senior = rng.random(n_rows) < 0.16
    logit = (
        -1.2
        + 1.6 * (contract == "month-to-month")
        - 1.0 * (contract == "two-year")
        - 0.045 * tenure
        + 0.025 * (monthly - 65.0)
        + 0.5 * paperless
        + 0.7 * (payment == "electronic check")
        + 0.45 * support_calls
        + 0.4 * senior
        + 0.5 * np.isin(region, REGIONS[20:])  # the rare regions churn more
    )
    churned = (rng.random(n_rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    monthly[rng.random(n_rows) < MISSING_CHARGES_SHARE] = np.nan  # recorded after the fact
    return pd.DataFrame(
        {
            "tenure_months": tenure,
            "monthly_charges": monthly,
            "support_calls": support_calls,
            "contract": pd.array(contract, dtype="str"),
            "payment_method": pd.array(payment, dtype="str"),
            "region": pd.array(region, dtype="str"),
            "paperless_billing": paperless,
            "senior_citizen": senior,
            TARGET: churned,
        }
    )


def churn_pipeline(random_state: int = 0) -> Pipeline:
    """The unfitted Pipeline: one-hot strings (unknown categories ignored), scaled numbers,
    booleans passed through, then gradient boosting (which takes the NaNs the scaler keeps)."""
    columns = ColumnTransformer(
        [
            ("strings", OneHotEncoder(handle_unknown="ignore", sparse_output=False), list(STRING_COLUMNS)),
            ("numbers", StandardScaler(), [*NUMBER_COLUMNS, *INTEGER_COLUMNS]),
            ("booleans", "passthrough", list(BOOLEAN_COLUMNS)),
        ]
    )
    return Pipeline([("columns", columns), ("model", HistGradientBoostingClassifier(max_iter=60, random_state=random_state))])


def fit_churn(frame: pd.DataFrame, random_state: int = 0) -> Pipeline:
    """`churn_pipeline` fitted on `frame` (the target column split off)."""
    return churn_pipeline(random_state).fit(frame.drop(columns=[TARGET]), frame[TARGET])
