"""`serve-app batch` times both runtimes of a compiled version on chunk-sized calls and predicts
with the faster (no Ray: the choice and the chunk function are called directly)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

from serve_app.model.predictor import Predictor
from serve_app.model.store import ModelStore
from serve_app.model.training import save_fitted
from serve_app.ops import batch


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    features, target = make_classification(600, 6, random_state=0)
    store = ModelStore(tmp_path_factory.mktemp("batch-runtime") / "models")
    forest = RandomForestClassifier(n_estimators=10, random_state=0).fit(features, target)
    save_fitted(store, forest, name="forest", reference=features, held_out=features[:100])  # compiled
    save_fitted(store, forest, name="plain", reference=features, compile=False)
    return store


def slower(monkeypatch: pytest.MonkeyPatch, runtime: str, seconds: float = 0.05) -> None:
    """Makes `Predictor.predict` of one runtime slower by `seconds` a call."""
    real = Predictor.predict

    def predict(self: Predictor, rows: Any) -> np.ndarray:
        if self.runtime == runtime:
            time.sleep(seconds)
        return real(self, rows)

    monkeypatch.setattr(Predictor, "predict", predict)


def test_a_compiled_version_is_predicted_by_the_faster_runtime(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    assert store.manifest("forest").runtime == "onnxruntime"
    slower(monkeypatch, "onnxruntime")
    chosen = batch.choose_batch_runtime(str(store.root), "forest", "1", probe_rows=256)
    assert chosen.choice == "sklearn" and "ONNX Runtime" in chosen.reason and "scikit-learn" in chosen.reason, chosen
    monkeypatch.undo()
    slower(monkeypatch, "sklearn")
    chosen = batch.choose_batch_runtime(str(store.root), "forest", "1", probe_rows=256)
    assert chosen.choice == "auto" and chosen.reason.startswith("ONNX Runtime"), chosen


def test_a_version_without_a_compiled_model_is_not_timed(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Predictor, "load", lambda *a, **k: pytest.fail("nothing to time"))
    chosen = batch.choose_batch_runtime(str(store.root), "plain", "1")
    assert chosen.choice == "auto" and "not compiled" in chosen.reason, chosen


def test_the_tasks_load_the_runtime_chosen(store: ModelStore) -> None:
    batch._PREDICTORS.clear()
    assert batch._predictor(str(store.root), "forest", "1", "sklearn").runtime == "sklearn"
    assert batch._predictor(str(store.root), "forest", "1").runtime == "onnxruntime"
