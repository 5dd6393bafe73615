"""The replica monitor, the hub and the prediction log, in one process (no Ray)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from serve_app.errors import InvalidInput
from serve_app.monitoring import metrics as m
from serve_app.monitoring.hub import MonitorHub
from serve_app.monitoring.monitor import LocalHub, Monitor
from serve_app.monitoring.predlog import PredictionLog
from serve_app.serving.http.monitoring import decode_feedback
from serve_app.serving.ledger import ModelCall, Prediction, RequestRecord
from serve_app.model.predictor import Predictor
from serve_app.settings import AppSettings, MonitoringSettings
from serve_app.model.store import ModelStore

from .conftest import IRIS_ROWS


class Recorder:
    """Stands in for one Ray metric: remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str]]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.calls.append((value, dict(tags or {})))

    observe = set = inc

    def total(self, **tags: str) -> float:
        return sum(v for v, t in self.calls if all(t.get(k) == want for k, want in tags.items()))


@pytest.fixture
def recorders() -> dict[str, Recorder]:
    return defaultdict(Recorder)


@pytest.fixture
def predictor(iris_store: ModelStore) -> Predictor:
    return Predictor.load(iris_store, "iris")


def make(settings: MonitoringSettings, store: ModelStore, recorders: dict[str, Recorder]) -> tuple[Monitor, MonitorHub]:
    hub = MonitorHub("app", str(store.root), settings.model_dump(), emit_metrics=False)
    monitor = Monitor(settings, replica="app_r1", hub=LocalHub(hub), metrics=recorders, start=False)
    return monitor, hub


def predict(monitor: Monitor, predictor: Predictor, rows: list[list[float]], request_id: str) -> np.ndarray:
    """What a replica's ledger hands its monitor for one /predict: its prediction (answered
    2 ms after the request arrived), the model call, then the finished request (3 ms)."""
    array = predictor.validate(rows)
    outputs = {"predict": predictor.predict(array)}
    request = RequestRecord("/predict", predictor.name, predictor.version, request_id=request_id)
    monitor.put(Prediction(request, predictor, array, outputs, at=request.started + 0.002, ts=time.time()))
    monitor.put(ModelCall(predictor.name, predictor.version, 1, len(array), 0.001))
    request.status, request.rows, request.latency_s = 200, len(array), 0.003
    monitor.put(request)
    return outputs["predict"]


def test_metrics_log_and_feedback_accuracy(tmp_path: Path, iris_store: ModelStore, predictor: Predictor, recorders: dict[str, Recorder]) -> None:
    settings = MonitoringSettings(log_dir=str(tmp_path / "log"))
    monitor, hub = make(settings, iris_store, recorders)
    labels = {f"req-{i}": predict(monitor, predictor, [row], f"req-{i}")[0] for i, row in enumerate(IRIS_ROWS * 4)}
    monitor.put(RequestRecord("/predict", "iris", "1", status=422, latency_s=0.0005))  # one that failed validation
    monitor.flush()

    assert recorders[m.REQUESTS].total(route="/predict", status="200", version="1") == 12
    assert recorders[m.REQUESTS].total(route="/predict", status="422") == 1
    assert len(recorders[m.REQUEST_LATENCY].calls) == 13
    assert recorders[m.ROWS_PREDICTED].total(model="iris", version="1") == 12
    assert recorders[m.PREDICTED_CLASSES].total() == 12
    assert recorders[m.BATCH_ROWS].total() == 12

    lines = [json.loads(line) for line in (tmp_path / "log").glob("*.jsonl").__next__().read_text().splitlines()]
    assert len(lines) == 12
    first = lines[0]
    assert first["request_id"] == "req-0" and first["model"] == "iris" and first["version"] == "1"
    assert first["inputs"] == [IRIS_ROWS[0]] and first["outputs"] == {"predict": [int(labels["req-0"])]}
    assert first["latency_ms"] == 2.0 and first["ts"] > 1.7e9

    # Feedback: two right, one wrong, one for a request the hub never saw.
    wrong = (int(labels["req-2"]) + 1) % 3
    items = [
        {"request_id": "req-0", "labels": [int(labels["req-0"])]},
        {"request_id": "req-1", "labels": [int(labels["req-1"])]},
        {"request_id": "req-2", "labels": [wrong]},
        {"request_id": "later", "labels": [0]},
    ]
    result = hub.feedback(items)
    assert result == {"joined": 3, "pending": 1, "rejected": []}
    assert hub.accuracy("iris")["versions"]["1"]["accuracy"] == pytest.approx(2 / 3)
    again = hub.feedback([{"request_id": "req-0", "labels": [0]}])
    assert again["joined"] == 0 and "already" in again["rejected"][0]["error"]
    wrong_count = hub.feedback([{"request_id": "req-3", "labels": [0, 1]}])
    assert "1 row(s) but 2 label(s)" in wrong_count["rejected"][0]["error"]

    # Feedback that arrived before its prediction is joined when the prediction comes in.
    predict(monitor, predictor, [IRIS_ROWS[0]], "later")
    monitor.flush()
    accuracy = hub.accuracy("iris")["versions"]["1"]
    assert accuracy["labelled_rows"] == 4 and accuracy["accuracy"] == pytest.approx(3 / 4)
    monitor.close()


def test_sampling_rate_and_no_log_without_a_directory(tmp_path: Path, iris_store: ModelStore, predictor: Predictor, recorders: dict[str, Recorder]) -> None:
    monitor, _ = make(MonitoringSettings(log_dir=str(tmp_path), log_sample_rate=0.25), iris_store, recorders)
    for i in range(2000):
        predict(monitor, predictor, [IRIS_ROWS[0]], f"r{i}")
    monitor.close()
    written = len(next(tmp_path.glob("*.jsonl")).read_text().splitlines())
    assert 400 < written < 600  # binomial(2000, 0.25): mean 500, sd 19
    silent, _ = make(MonitoringSettings(), iris_store, recorders)
    assert silent.log is None


def test_full_queue_drops_and_counts(iris_store: ModelStore, predictor: Predictor, recorders: dict[str, Recorder]) -> None:
    monitor, hub = make(MonitoringSettings(queue_size=100), iris_store, recorders)
    for i in range(150):
        monitor.put(RequestRecord("/predict", "iris", "1", status=200, latency_s=0.001))
    assert monitor.dropped == 50
    monitor.flush()
    assert recorders[m.MONITOR_DROPPED].calls[-3:] == [(50, {"reason": "queue_full"}), (0, {"reason": "hub_busy"}), (0, {"reason": "log_error"})]
    assert recorders[m.REQUESTS].total() == 100
    assert hub.summary("iris")["dropped"] == {"queue_full": 50}


def test_close_writes_what_is_queued(tmp_path: Path, iris_store: ModelStore, predictor: Predictor, recorders: dict[str, Recorder]) -> None:
    settings = MonitoringSettings(log_dir=str(tmp_path), flush_interval_s=60)
    hub = MonitorHub("app", str(iris_store.root), settings.model_dump(), emit_metrics=False)
    monitor = Monitor(settings, replica="r", hub=LocalHub(hub), metrics=recorders)  # its thread waits 60 s
    for i in range(50):
        predict(monitor, predictor, [IRIS_ROWS[1]], f"c{i}")
    monitor.close()
    assert len(next(tmp_path.glob("*.jsonl")).read_text().splitlines()) == 50
    assert not monitor._thread.is_alive()
    monitor.close()  # idempotent


def test_drift_through_the_hub(iris_store: ModelStore, predictor: Predictor, recorders: dict[str, Recorder]) -> None:
    from sklearn.datasets import load_iris

    settings = MonitoringSettings(drift_window=400, drift_min_rows=500)
    hub = MonitorHub("app", str(iris_store.root), settings.model_dump(), emit_metrics=False)
    replicas = [Monitor(settings, replica=f"r{i}", hub=LocalHub(hub), metrics=recorders, start=False) for i in range(2)]
    rows = load_iris().data[np.random.default_rng(0).integers(0, 150, 800)]
    for i, monitor in enumerate(replicas):
        for chunk in np.array_split(rows[i * 400 : (i + 1) * 400], 40):
            predict(monitor, predictor, chunk.tolist(), "")
        monitor.flush()
    report = hub.drift("iris")
    version = report["versions"]["1"]
    assert version["rows"] == 800 and version["replicas"] == 2  # each replica's 400 rows, summed
    assert report["status"] == "ok"
    shifted = rows.copy()
    shifted[:, 1] += 1.0
    shifted[:, 2] *= 1.5
    for i, monitor in enumerate(replicas):  # one window's worth of shifted rows per replica
        predict(monitor, predictor, shifted[i * 400 : (i + 1) * 400].tolist(), "")
        monitor.flush()
    features = hub.drift("iris")["versions"]["1"]["features"]
    assert {name for name, f in features.items() if f["status"] == "drift"} == {predictor.manifest.feature_names[1], predictor.manifest.feature_names[2]}


def test_rotation_keeps_at_most_the_backups(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, "rep/1", max_bytes=1000, backups=2)
    log.write([b"x" * 99 + b"\n"] * 55)  # 5500 bytes: five full files' worth
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["predictions-rep_1.1.jsonl", "predictions-rep_1.2.jsonl", "predictions-rep_1.jsonl"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"[]", "no feedback"),
        (b'{"request_id": "a"}', "neither"),
        (b'{"request_id": "a", "label": 1, "labels": [1]}', "both"),
        (b'{"request_id": "", "label": 1}', "x-request-id"),
        (b'{"request_id": "a", "labels": []}', "non-empty"),
        (b'{"request_id": "a", "label": [1]}', "numbers or strings"),
        (b'{"request_id": "a", "label": 1, "extra": 2}', "unknown key"),
        (b'[{"request_id": "a", "label": 1}, 5]', "item 1"),
    ],
)
def test_bad_feedback_is_a_422_that_says_why(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        decode_feedback(body)
    assert message in raised.value.message


def test_feedback_forms() -> None:
    assert decode_feedback(b'{"request_id": "a", "label": "setosa"}') == [{"request_id": "a", "labels": ["setosa"]}]
    assert decode_feedback(b'[{"request_id": "a", "labels": [1, 2]}]') == [{"request_id": "a", "labels": [1, 2]}]


def test_settings_are_strict_and_ordered() -> None:
    with pytest.raises(ValidationError, match="extra"):
        AppSettings(monitoring={"log_sample_rte": 0.5})
    with pytest.raises(ValidationError, match="warning thresholds"):
        MonitoringSettings(psi_warning=0.5, psi_drift=0.2)
    with pytest.raises(ValidationError):
        MonitoringSettings(log_sample_rate=1.5)
    assert AppSettings(monitoring={"log_dir": "rel"}).monitoring.log_dir == str(Path("rel").resolve())


def test_local_hub_call_is_awaitable(iris_store: ModelStore) -> None:
    hub = MonitorHub("app", str(iris_store.root), MonitoringSettings().model_dump(), emit_metrics=False)
    assert asyncio.run(LocalHub(hub).call("accuracy", "iris"))["versions"] == {}
