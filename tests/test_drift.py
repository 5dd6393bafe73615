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
