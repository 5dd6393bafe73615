"""The replica's monitor: the request path appends one record, a thread does the rest.

The replica's ledger (serving/ledger.py) hands it each `RequestRecord` (one per request,
any status), `Prediction` (the rows and outputs of a model answer) and `ModelCall` (one
model call on a batch); `put` only appends to a bounded deque: no locks, no I/O, no
metric calls on the event loop. Every `flush_interval_s` the monitor thread drains the
deque and

- records the Prometheus metrics (counters summed per flush, histograms per value),
- writes sampled predictions to the prediction log,
- adds the inputs to this replica's drift windows (the float64 matrix of an all-numeric
  model, or the `ColumnTable` of a model with typed columns: see drift.py),
- sends the hub (see hub.py) an update: join records, window counts and traffic,
  fire-and-forget.

When the deque is full a record is dropped and counted, never waited for. `close()`
(from the deployment's `__del__`, which Ray Serve calls on graceful shutdown) drains
what is left, fsyncs the log and sends the last update.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from typing import Any, Mapping, Protocol

import numpy as np

from serve_app.monitoring import metrics as m
from serve_app.monitoring.drift import DriftReference, RowWindow, WindowCounts
from serve_app.monitoring.hub import TRAFFIC_LATENCY_EDGES_MS, MonitorHub
from serve_app.monitoring.predlog import PredictionLog, encode, logged_inputs
from serve_app.model.predictor import PREDICT, PREDICT_PROBA, Predictor
from serve_app.serving.ledger import ModelCall, Prediction, Record, RequestRecord
from serve_app.settings import MonitoringSettings

logger = logging.getLogger("ray.serve")

MAX_INFLIGHT_UPDATES = 4
# While the hub is behind, updates are merged and held; past this many join records the
# held update is dropped (and counted as hub_busy) rather than grow without bound.
MAX_HELD_PREDICTIONS = 200_000


def merge_updates(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """One update saying what both say (drift counts are a state: the newest wins)."""
    merged = dict(new)
    merged["predictions"] = [*old.get("predictions", ()), *new.get("predictions", ())]
    a, b = old.get("traffic") or {}, new.get("traffic") or {}
    merged["traffic"] = {
        "requests": [*a.get("requests", ()), *b.get("requests", ())],
        "latency": a["latency"] + b["latency"] if "latency" in a and "latency" in b else b.get("latency", a.get("latency")),
        "rows": a.get("rows", 0) + b.get("rows", 0),
        "classes": [*a.get("classes", ()), *b.get("classes", ())],
    }
    dropped = dict(old.get("dropped") or {})
    for reason, count in (new.get("dropped") or {}).items():
        dropped[reason] = dropped.get(reason, 0) + count
    merged["dropped"] = dropped
    return merged


class HubLink(Protocol):
    def send(self, replica: str, update: Mapping[str, Any]) -> bool: ...

    async def call(self, method: str, *args: Any) -> Any: ...


class LocalHub:
    """A hub in this process (unit tests, or a Predictor used without Ray)."""

    def __init__(self, hub: MonitorHub) -> None:
        self.hub = hub

    def send(self, replica: str, update: Mapping[str, Any]) -> bool:
        self.hub.ingest(replica, update)
        return True

    async def call(self, method: str, *args: Any) -> Any:
        return getattr(self.hub, method)(*args)


class RayHub:
    """The application's named, detached hub actor, created by whichever replica is first."""

    def __init__(self, app: str, store: str, settings: Mapping[str, Any]) -> None:
        self.app, self.store, self.settings = app, store, dict(settings)
        self._inflight: deque[Any] = deque()
        self._held: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._connect()

    def _connect(self) -> None:
        import ray

        from serve_app.monitoring.hub import HUB_NAMESPACE, hub_name

        actor = ray.remote(MonitorHub).options(
            name=hub_name(self.app), namespace=HUB_NAMESPACE, lifetime="detached",
            get_if_exists=True, num_cpus=0, max_restarts=0,
        )
        handle: Any = actor.remote(self.app, self.store, self.settings)
        handle.configure.remote(self.settings)
        handle.start_idle_watch.remote()
        self.handle = handle

    def _reconnect_if_dead(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        done, _ = ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=0)
        for ref in done:
            self._inflight.remove(ref)
            try:
                ray.get(ref)
            except RayActorError:
                logger.warning("monitor hub of %s is gone; creating it again", self.app)
                self._inflight.clear()
                self._connect()
                return
            except Exception:
                logger.exception("monitor hub rejected an update")

    def send(self, replica: str, update: Mapping[str, Any]) -> bool:
        with self._lock:
            if self._inflight:
                self._reconnect_if_dead()
            if self._held is not None:
                update = merge_updates(self._held, update)
                self._held = None
            if len(self._inflight) >= MAX_INFLIGHT_UPDATES:
                # The hub is behind: hold this update and send it with the next one.
                if len(update["predictions"]) > MAX_HELD_PREDICTIONS:
                    return False  # dropped and counted rather than held without bound
                self._held = dict(update)
                return True
            self._inflight.append(self.handle.ingest.remote(replica, update))
            return True

    async def call(self, method: str, *args: Any) -> Any:
        from ray.exceptions import RayActorError

        try:
            return await getattr(self.handle, method).remote(*args)
        except RayActorError:
            with self._lock:
                self._inflight.clear()
                self._connect()
            return await getattr(self.handle, method).remote(*args)


def _labels(predictor: Predictor, outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
    if PREDICT in outputs:
        return outputs[PREDICT]
    classes = predictor.manifest.classes
    if PREDICT_PROBA in outputs and classes:
        return np.asarray(classes).take(outputs[PREDICT_PROBA].argmax(axis=1))
    return None


class Monitor:
    def __init__(
        self,
        settings: MonitoringSettings,
        *,
        replica: str,
        hub: HubLink | None,
        metrics: Mapping[str, Any] | None = None,
        start: bool = True,
    ) -> None:
        self.settings = settings
        self.replica = replica
        self.hub = hub
        self._metrics = metrics if metrics is not None else m.replica_metrics()
        self._queue: deque[Record] = deque()
        self._capacity = settings.queue_size
        self._rate = settings.log_sample_rate
        self.log = (
            PredictionLog(settings.log_dir, replica, max_bytes=settings.log_max_bytes, backups=settings.log_backups)
            if settings.log_dir and settings.log_sample_rate > 0
            else None
        )
        self._windows: dict[tuple[str, str], tuple[DriftReference, RowWindow]] = {}
        self._no_reference: set[tuple[str, str]] = set()
        self.dropped = 0  # read by the request path's callers, written there too
        self._dropped_sent = 0
        self.dropped_updates = 0
        self.log_errors = 0
        self.log_lines = 0
        self._stop = threading.Event()
        self._closed = False
        self._cycle_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="serve-app-monitor", daemon=True)
        if start:
            self._thread.start()

    # ---- the request path: one append each ---------------------------------------------

    def put(self, record: Record) -> None:
        if len(self._queue) < self._capacity:
            self._queue.append(record)
        else:
            self.dropped += 1

    # ---- the monitor thread --------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.settings.flush_interval_s):
            try:
                self.flush()
            except Exception:  # never let monitoring kill itself; say why in the replica log
                logger.exception("monitor flush failed")

    def flush(self) -> None:
        """Processes everything queued so far (the thread calls it; tests may too)."""
        with self._cycle_lock:
            self._cycle()

    def _window(self, predictor: Predictor) -> tuple[DriftReference, RowWindow] | None:
        key = (predictor.name, predictor.version)
        found = self._windows.get(key)
        if found is None and key not in self._no_reference:
            reference = DriftReference.from_manifest(predictor.manifest)
            if reference is None:
                self._no_reference.add(key)
                return None
            found = self._windows[key] = (reference, RowWindow(self.settings.drift_window, reference.width))
        return found

    def _cycle(self) -> None:
        metrics = self._metrics
        requests: dict[tuple[str, str, str, int], int] = {}
        latencies: list[float] = []
        rows_by_key: dict[tuple[str, str], int] = {}
        labels_by_key: dict[tuple[str, str], list[np.ndarray]] = {}
        joins: list[tuple[str, str, str, list[Any]]] = []
        lines: list[bytes] = []
        rate = self._rate
        for _ in range(len(self._queue)):
            record = self._queue.popleft()
            if type(record) is RequestRecord:
                key = (record.route, record.model, record.version, record.status)
                requests[key] = requests.get(key, 0) + 1
                latency_ms = record.latency_s * 1000.0
                latencies.append(latency_ms)
                metrics[m.REQUEST_LATENCY].observe(latency_ms, tags={"route": record.route, "model": record.model, "version": record.version})
                if record.rows:
                    version_key = (record.model, record.version)
                    rows_by_key[version_key] = rows_by_key.get(version_key, 0) + record.rows
            elif type(record) is Prediction:
                predictor = record.predictor
                version_key = (predictor.name, predictor.version)
                window = self._window(predictor)
                if window is not None:
                    reference, rows = window
                    try:
                        rows.add(reference.window_rows(record.inputs))
                    except (TypeError, ValueError, KeyError):  # inputs of the wrong form: say so, monitor the rest
                        logger.exception("drift: inputs of %s v%s not added to the window", *version_key)
                labels = _labels(predictor, record.outputs)
                request_id = record.request.request_id
                if labels is not None and predictor.manifest.task == "classification":
                    labels_by_key.setdefault(version_key, []).append(labels)
                    if request_id and self.hub is not None:
                        joins.append((request_id, version_key[0], version_key[1], labels.tolist()))
                if self.log is not None and (rate >= 1.0 or random.random() < rate):
                    lines.append(encode({
                        "ts": record.ts, "request_id": request_id, "model": version_key[0], "version": version_key[1],
                        "inputs": logged_inputs(record.inputs), "outputs": dict(record.outputs),
                        "latency_ms": round((record.at - record.request.started) * 1000.0, 3),
                    }))
            elif type(record) is ModelCall:
                tags = {"model": record.model, "version": record.version}
                metrics[m.MODEL_LATENCY].observe(record.seconds * 1000.0, tags=tags)
                metrics[m.BATCH_ROWS].observe(record.rows, tags=tags)

        for (route, model, version, status), count in requests.items():
            metrics[m.REQUESTS].inc(count, tags={"route": route, "model": model, "version": version, "status": str(status)})
        classes: list[tuple[str, str, str, int]] = []
        for (model, version), count in rows_by_key.items():
            metrics[m.ROWS_PREDICTED].inc(count, tags={"model": model, "version": version})
        for (model, version), chunks in labels_by_key.items():
            values, counts = np.unique(np.concatenate(chunks), return_counts=True)
            for value, count in zip(values.tolist(), counts.tolist()):
                metrics[m.PREDICTED_CLASSES].inc(count, tags={"model": model, "version": version, "class": str(value)})
                classes.append((model, version, str(value), count))
        if lines and self.log is not None:
            try:
                self.log_lines += self.log.write(lines)
                self.log.flush()
                metrics[m.LOG_LINES].inc(len(lines))
            except OSError as exc:
                logger.error("prediction log: cannot write %d line(s) to %s: %s", len(lines), self.log.path, exc)
                self.log_errors += len(lines)
        dropped = self.dropped - self._dropped_sent
        self._dropped_sent += dropped
        if self.hub is not None:
            self._send_update(requests, latencies, rows_by_key, classes, joins, dropped)
        for reason, total in (("queue_full", self.dropped), ("hub_busy", self.dropped_updates), ("log_error", self.log_errors)):
            metrics[m.MONITOR_DROPPED].set(total, tags={"reason": reason})

    def _send_update(
        self,
        requests: Mapping[tuple[str, str, str, int], int],
        latencies: list[float],
        rows_by_key: Mapping[tuple[str, str], int],
        classes: list[tuple[str, str, str, int]],
        joins: list[tuple[str, str, str, list[Any]]],
        dropped: int,
    ) -> None:
        """Sends the hub what this cycle drained, derived from the same records as the metrics."""
        assert self.hub is not None
        by_route: dict[tuple[str, int], int] = {}
        for (route, _, _, status), count in requests.items():
            by_route[(route, status)] = by_route.get((route, status), 0) + count
        latency_counts = np.bincount(
            np.searchsorted(TRAFFIC_LATENCY_EDGES_MS, latencies), minlength=len(TRAFFIC_LATENCY_EDGES_MS) + 1
        )
        update: dict[str, Any] = {
            "predictions": joins,
            "traffic": {
                "requests": [(route, status, count) for (route, status), count in by_route.items()],
                "latency": latency_counts,
                "rows": sum(rows_by_key.values()),
                "classes": classes,
            },
            "drift": [
                (model, version, WindowCounts.of(reference, window.rows()).to_wire())
                for (model, version), (reference, window) in self._windows.items()
                if window.filled
            ],
            "dropped": {"queue_full": dropped} if dropped else {},
        }
        if not self.hub.send(self.replica, update):
            self.dropped_updates += 1

    # ---- shutdown and introspection ------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops the thread, then writes and sends whatever is still queued. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        try:
            self.flush()
        finally:
            if self.log is not None:
                self.log.close()

    def stats(self) -> dict[str, Any]:
        return {
            "queued": len(self._queue),
            "dropped": self.dropped,
            "dropped_updates": self.dropped_updates,
            "log_errors": self.log_errors,
            "log_lines": self.log_lines,
            "log_file": str(self.log.path) if self.log is not None else None,
            "drift_windows": {f"{k[0]}:{k[1]}": w.filled for k, (_, w) in self._windows.items()},
        }
