"""The replica's monitor: the request path appends one tuple, a thread does the rest.

`observe_http` (every answered HTTP request, any status), `observe` (every prediction)
and `observe_batch` (every model call) only append to a bounded deque: no locks, no I/O,
no metric calls on the event loop. Every `flush_interval_s` the monitor thread drains
the deque and

- records the Prometheus metrics (counters summed per flush, histograms per value),
- writes sampled predictions to the prediction log,
- adds the inputs to this replica's drift windows,
- sends the hub (see hub.py) join records, window counts and traffic, fire-and-forget.

When the deque is full a record is dropped and counted, never waited for. `close()`
(from the deployment's `__del__`, which Ray Serve calls on graceful shutdown) drains
what is left, fsyncs the log and sends the last report.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from serve_app.monitoring import metrics as m
from serve_app.monitoring.drift import DriftReference, RowWindow, WindowCounts
from serve_app.monitoring.hub import TRAFFIC_LATENCY_EDGES_MS, MonitorHub
from serve_app.monitoring.predlog import PredictionLog, encode
from serve_app.model.predictor import PREDICT, PREDICT_PROBA, Predictor
from serve_app.settings import MonitoringSettings

logger = logging.getLogger("ray.serve")

HTTP, INFER, BATCH = 0, 1, 2
MAX_INFLIGHT_REPORTS = 4
# While the hub is behind, reports are merged and held; past this many join records the
# held report is dropped (and counted as hub_busy) rather than grow without bound.
MAX_HELD_PREDICTIONS = 200_000


def merge_reports(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """One report saying what both say (drift counts are a state: the newest wins)."""
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


def current_request_id() -> str:
    """Ray Serve's id of the request being served (the x-request-id header, or one it made)."""
    try:
        from ray.serve.context import _get_serve_request_context  # private; no public accessor in 2.60

        return _get_serve_request_context().request_id
    except Exception:  # pragma: no cover - outside Ray Serve
        return ""


class HubLink(Protocol):
    def send(self, replica: str, report: Mapping[str, Any]) -> bool: ...

    async def call(self, method: str, *args: Any) -> Any: ...


class LocalHub:
    """A hub in this process (unit tests, or a Predictor used without Ray)."""

    def __init__(self, hub: MonitorHub) -> None:
        self.hub = hub

    def send(self, replica: str, report: Mapping[str, Any]) -> bool:
        self.hub.ingest(replica, report)
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
        self.handle = actor.remote(self.app, self.store, self.settings)
        self.handle.configure.remote(self.settings)
        self.handle.start_idle_watch.remote()

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
                logger.exception("monitor hub rejected a report")

    def send(self, replica: str, report: Mapping[str, Any]) -> bool:
        with self._lock:
            if self._inflight:
                self._reconnect_if_dead()
            if self._held is not None:
                report = merge_reports(self._held, report)
                self._held = None
            if len(self._inflight) >= MAX_INFLIGHT_REPORTS:
                # The hub is behind: hold this report and send it with the next one.
                if len(report["predictions"]) > MAX_HELD_PREDICTIONS:
                    return False  # dropped and counted rather than held without bound
                self._held = dict(report)
                return True
            self._inflight.append(self.handle.ingest.remote(replica, report))
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
        clock: Callable[[], float] = time.time,
        start: bool = True,
    ) -> None:
        self.settings = settings
        self.replica = replica
        self.hub = hub
        self.clock = clock
        self._metrics = metrics if metrics is not None else m.replica_metrics()
        self._queue: deque[tuple[Any, ...]] = deque()
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
        self._dropped_reported = 0
        self.dropped_reports = 0
        self.log_errors = 0
        self.log_lines = 0
        self._stop = threading.Event()
        self._closed = False
        self._cycle_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="serve-app-monitor", daemon=True)
        if start:
            self._thread.start()

    # ---- the request path: one append each ---------------------------------------------

    def observe_http(self, route: str, model: str, version: str, status: int, seconds: float) -> None:
        if len(self._queue) < self._capacity:
            self._queue.append((HTTP, route, model, version, status, seconds))
        else:
            self.dropped += 1

    def observe(self, predictor: Predictor, rows: np.ndarray, outputs: Mapping[str, np.ndarray], seconds: float) -> None:
        if len(self._queue) < self._capacity:
            sampled = self.log is not None and (self._rate >= 1.0 or random.random() < self._rate)
            self._queue.append((INFER, self.clock(), current_request_id(), predictor, rows, outputs, seconds, sampled))
        else:
            self.dropped += 1

    def observe_batch(self, predictor: Predictor, rows: int, seconds: float) -> None:
        if len(self._queue) < self._capacity:
            self._queue.append((BATCH, predictor.name, predictor.version, rows, seconds))
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
            found = self._windows[key] = (reference, RowWindow(self.settings.drift_window, predictor.n_features))
        return found

    def _cycle(self) -> None:
        metrics = self._metrics
        requests: dict[tuple[str, str, str, int], int] = {}
        latencies: list[float] = []
        rows_by_key: dict[tuple[str, str], int] = {}
        labels_by_key: dict[tuple[str, str], list[np.ndarray]] = {}
        joins: list[tuple[str, str, str, list[Any]]] = []
        lines: list[bytes] = []
        for _ in range(len(self._queue)):
            item = self._queue.popleft()
            kind = item[0]
            if kind == HTTP:
                _, route, model, version, status, seconds = item
                key = (route, model, version, status)
                requests[key] = requests.get(key, 0) + 1
                latencies.append(seconds * 1000.0)
                metrics[m.REQUEST_LATENCY].observe(seconds * 1000.0, tags={"route": route, "model": model, "version": version})
            elif kind == BATCH:
                _, model, version, rows, seconds = item
                tags = {"model": model, "version": version}
                metrics[m.MODEL_LATENCY].observe(seconds * 1000.0, tags=tags)
                metrics[m.BATCH_ROWS].observe(rows, tags=tags)
            else:
                _, ts, request_id, predictor, rows, outputs, seconds, sampled = item
                key = (predictor.name, predictor.version)
                rows_by_key[key] = rows_by_key.get(key, 0) + len(rows)
                window = self._window(predictor)
                if window is not None:
                    window[1].add(rows)
                labels = _labels(predictor, outputs)
                if labels is not None and predictor.manifest.task == "classification":
                    labels_by_key.setdefault(key, []).append(labels)
                    if request_id and self.hub is not None:
                        joins.append((request_id, key[0], key[1], labels.tolist()))
                if sampled:
                    lines.append(encode({
                        "ts": ts, "request_id": request_id, "model": key[0], "version": key[1],
                        "inputs": rows, "outputs": dict(outputs), "latency_ms": round(seconds * 1000.0, 3),
                    }))

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
        dropped = self.dropped - self._dropped_reported
        self._dropped_reported += dropped
        if self.hub is not None:
            self._report(requests, latencies, rows_by_key, classes, joins, dropped)
        for reason, total in (("queue_full", self.dropped), ("hub_busy", self.dropped_reports), ("log_error", self.log_errors)):
            metrics[m.MONITOR_DROPPED].set(total, tags={"reason": reason})

    def _report(
        self,
        requests: Mapping[tuple[str, str, str, int], int],
        latencies: list[float],
        rows_by_key: Mapping[tuple[str, str], int],
        classes: list[tuple[str, str, str, int]],
        joins: list[tuple[str, str, str, list[Any]]],
        dropped: int,
    ) -> None:
        assert self.hub is not None
        by_route: dict[tuple[str, int], int] = {}
        for (route, _, _, status), count in requests.items():
            by_route[(route, status)] = by_route.get((route, status), 0) + count
        latency_counts = np.bincount(
            np.searchsorted(TRAFFIC_LATENCY_EDGES_MS, latencies), minlength=len(TRAFFIC_LATENCY_EDGES_MS) + 1
        )
        report: dict[str, Any] = {
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
        if not self.hub.send(self.replica, report):
            self.dropped_reports += 1

    # ---- shutdown and introspection ------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops the thread, then writes and reports whatever is still queued. Idempotent."""
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
            "dropped_reports": self.dropped_reports,
            "log_errors": self.log_errors,
            "log_lines": self.log_lines,
            "log_file": str(self.log.path) if self.log is not None else None,
            "drift_windows": {f"{k[0]}:{k[1]}": w.filled for k, (_, w) in self._windows.items()},
        }
