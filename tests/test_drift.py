"""PSI and KS against the manifest's training statistics (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ks_2samp
from sklearn.datasets import load_iris

from serve_app.model.manifest import Manifest
from serve_app.monitoring.drift import DriftReference, RowWindow, Thresholds, WindowCounts, score
from serve_app.model.store import ModelStore
from serve_app.model.training import train
from serve_app.settings import MonitoringSettings

IRIS = load_iris().data


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return train(ModelStore(tmp_path_factory.mktemp("drift") / "models"))


@pytest.fixture(scope="module")
def reference(manifest: Manifest) -> DriftReference:
    found = DriftReference.from_manifest(manifest)
    assert found is not None
    return found


THRESHOLDS = Thresholds.from_settings(MonitoringSettings().model_dump())


def _scores(reference: DriftReference, rows: np.ndarray) -> dict:
    return score(reference, WindowCounts.of(reference, rows), THRESHOLDS)


def test_in_distribution_rows_are_ok(reference: DriftReference) -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        result = _scores(reference, IRIS[rng.integers(0, len(IRIS), 1000)])
        assert result["status"] == "ok", result
        assert {f["status"] for f in result["features"].values()} == {"ok"}


def test_two_shifted_features_drift_and_only_those(reference: DriftReference) -> None:
    rng = np.random.default_rng(8)
    rows = IRIS[rng.integers(0, len(IRIS), 1000)].copy()
    rows[:, 0] += 1.0  # sepal length: +1.2 std
    rows[:, 3] *= 1.6  # petal width: scaled
    result = _scores(reference, rows)
    drifted = {name for name, f in result["features"].items() if f["status"] == "drift"}
    assert drifted == {reference.features[0], reference.features[3]}
    assert result["status"] == "drift"
    for name in (reference.features[1], reference.features[2]):
        assert result["features"][name]["status"] == "ok"


def test_too_few_rows_is_not_a_verdict(reference: DriftReference) -> None:
    shifted = IRIS[:50] + 10.0
    result = _scores(reference, shifted)
    assert result["status"] == "insufficient_data"


def test_ks_equals_scipy_two_sample_statistic(reference: DriftReference) -> None:
    rng = np.random.default_rng(9)
    rows = IRIS[rng.integers(0, len(IRIS), 700)] + rng.normal(0, 0.3, (700, 4))
    result = _scores(reference, rows)
    for i, name in enumerate(reference.features):
        expected = ks_2samp(rows[:, i], reference.per_feature[i].sample).statistic
        assert result["features"][name]["ks"] == pytest.approx(expected, abs=1e-6)


def test_counts_of_two_replicas_add_up_to_one_window(reference: DriftReference) -> None:
    rng = np.random.default_rng(10)
    a, b = IRIS[rng.integers(0, 150, 400)] * 1.1, IRIS[rng.integers(0, 150, 300)]
    summed = WindowCounts.of(reference, a) + WindowCounts.of(reference, b)
    whole = WindowCounts.of(reference, np.concatenate([a, b]))
    assert score(reference, summed, THRESHOLDS) == score(reference, whole, THRESHOLDS)
    # And through the wire format the hub receives.
    wired = WindowCounts.from_wire(WindowCounts.of(reference, a).to_wire()) + WindowCounts.of(reference, b)
    assert score(reference, wired, THRESHOLDS) == score(reference, whole, THRESHOLDS)


def test_row_window_keeps_the_most_recent_rows() -> None:
    window = RowWindow(5, 2)
    window.add(np.array([[1.0, 1.0], [2.0, 2.0]]))
    assert window.rows().tolist() == [[1.0, 1.0], [2.0, 2.0]]
    window.add(np.array([[3.0, 3.0], [4.0, 4.0], [5.0, 5.0], [6.0, 6.0]]))  # wraps around
    assert sorted(window.rows()[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]
    window.add(np.arange(20, dtype=float).reshape(10, 2))  # more than the window at once
    assert sorted(window.rows()[:, 0].tolist()) == [10.0, 12.0, 14.0, 16.0, 18.0]


def test_a_model_without_training_stats_has_no_reference(manifest: Manifest) -> None:
    assert DriftReference.from_manifest(manifest.model_copy(update={"training_stats": {}})) is None


# --- Categorical columns -------------------------------------------------------------------

from serve_app.model.schema import CategoryStats  # noqa: E402
from serve_app.monitoring.drift import (  # noqa: E402
    MAX_CATEGORY_BINS,
    CategoryCounts,
    CategoryReference,
    category_psi,
    score_category,
    unseen_share,
)

# A long-tailed column: 3 common categories and 27 rare ones (as the churn dataset's regions).
CATEGORIES = [f"c{i:02d}" for i in range(30)]
_WEIGHTS = 1.0 / np.arange(1, 31) ** 1.1
FREQUENCIES = _WEIGHTS / _WEIGHTS.sum()
CATEGORY_REFERENCE = CategoryReference.from_stats(
    CategoryStats(rows=5000, null_share=0.02, frequencies=dict(zip(CATEGORIES, FREQUENCIES.tolist())))
)


def _draw(rng: np.random.Generator, n: int, p: np.ndarray = FREQUENCIES) -> list[object]:
    return list(rng.choice(CATEGORIES, size=n, p=p))


def _category_scores(values: list[object]) -> dict:
    return score_category(CATEGORY_REFERENCE, CategoryCounts.of(CATEGORY_REFERENCE, values), THRESHOLDS)


def test_categories_bin_like_the_numeric_deciles() -> None:
    assert len(CATEGORY_REFERENCE.bins) == MAX_CATEGORY_BINS + 2  # the 10 most frequent, other, unseen
    assert CATEGORY_REFERENCE.bins[:3] == ("c00", "c01", "c02")
    assert CATEGORY_REFERENCE.fractions.sum() == pytest.approx(1.0) and CATEGORY_REFERENCE.fractions[-1] == 0.0
    assert CATEGORY_REFERENCE.index["c29"] == MAX_CATEGORY_BINS  # a rare seen one: "other"


def test_in_distribution_categories_are_ok() -> None:
    rng = np.random.default_rng(11)
    for _ in range(20):
        result = _category_scores(_draw(rng, 600))
        assert result["status"] == "ok", result
        assert result["unseen_share"] == 0.0


def test_a_shifted_category_mix_drifts() -> None:
    shifted = FREQUENCIES.copy()
    shifted[0], shifted[2] = shifted[2], shifted[0]  # the most common category becomes the third
    result = _category_scores(_draw(np.random.default_rng(12), 1000, shifted))
    assert result["status"] == "drift", result


def test_unseen_categories_count_in_psi_and_are_reported() -> None:
    rng = np.random.default_rng(13)
    for share, status in ((0.005, "ok"), (0.03, "warning"), (0.08, "drift")):
        unseen = int(1000 * share)
        values = _draw(rng, 1000 - unseen) + [f"new-{i}" for i in range(unseen)]
        result = _category_scores(values)
        assert result["unseen_share"] == pytest.approx(share)
        assert result["status"] == status, (share, result)


def test_nulls_are_reported_not_binned_and_few_rows_are_no_verdict() -> None:
    rng = np.random.default_rng(14)
    values = _draw(rng, 600) + [None] * 200 + [float("nan")] * 200
    counts = CategoryCounts.of(CATEGORY_REFERENCE, values)
    assert counts.rows == 1000 and counts.nulls == 400 and counts.bins.sum() == 600
    result = score_category(CATEGORY_REFERENCE, counts, THRESHOLDS)
    assert result["null_share"] == 0.4 and result["training_null_share"] == 0.02 and result["status"] == "ok"
    few = _category_scores(["c00"] * (THRESHOLDS.min_rows - 1) + [None] * 10)
    assert few["status"] == "insufficient_data"


def test_category_counts_add_up_like_one_window() -> None:
    rng = np.random.default_rng(15)
    a, b = _draw(rng, 300) + ["new"], _draw(rng, 400) + [None]
    summed = CategoryCounts.of(CATEGORY_REFERENCE, a) + CategoryCounts.from_wire(CategoryCounts.of(CATEGORY_REFERENCE, b).to_wire())
    whole = CategoryCounts.of(CATEGORY_REFERENCE, a + b)
    assert (summed.rows, summed.nulls, summed.bins.tolist()) == (whole.rows, whole.nulls, whole.bins.tolist())
    assert category_psi(CATEGORY_REFERENCE, summed) == category_psi(CATEGORY_REFERENCE, whole)
    assert unseen_share(whole) == pytest.approx(1 / 701)


def test_booleans_are_categories_too() -> None:
    reference = CategoryReference.from_stats(CategoryStats(rows=100, null_share=0.0, frequencies={"true": 0.6, "false": 0.4}))
    same = CategoryCounts.of(reference, [True] * 600 + [False] * 400)
    flipped = CategoryCounts.of(reference, np.array([True] * 300 + [False] * 700))
    assert score_category(reference, same, THRESHOLDS)["status"] == "ok"
    assert score_category(reference, flipped, THRESHOLDS)["status"] == "drift"
    assert unseen_share(flipped) == 0.0
