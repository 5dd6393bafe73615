"""The monitor hub: one small Ray actor per application that every replica sends updates to.

Why one actor: feedback for a request may reach any replica, usually not the one that
answered it, and drift and traffic are only meaningful over all replicas. So replicas
keep their own windows and counts, and every `flush_interval_s` their monitor thread
sends this actor (fire-and-forget, batched) what happened since the last send:

- join records `(request_id, model, version, labels)` for every prediction, kept in a
  bounded LRU so `POST /feedback` on any replica can score them (feedback that arrives
  before its prediction's batch waits here, bounded and for `PENDING_TTL_S`);
- each replica's drift window summary (additive counts, see drift.py: numeric bins and
  categorical counts alike), replaced on every update and forgotten when the replica stops
  sending them;
- traffic: request counts, a latency histogram and predicted classes (derived from the
  replica's request records, serving/ledger.py), kept in time buckets for
  `/v2/models/{name}/monitoring` and `serve-app report`.

The alternative, broadcasting feedback to every replica, costs N calls per label and
still needs a place to sum accuracy. The actor is detached (it outlives any one replica,
so a rolling restart keeps the accuracy window) and ends itself after `IDLE_EXIT_S`
without updates, so a deleted application does not leave it behind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Mapping, Sequence

import numpy as np

from serve_app.monitoring import metrics as m
from serve_app.monitoring.drift import DriftReference, Thresholds, WindowCounts, score, worst

logger = logging.getLogger("serve_app")

HUB_NAMESPACE = "serve_app"
PENDING_TTL_S = 120.0
IDLE_EXIT_S = 600.0
# Traffic time series: buckets of BUCKET_S seconds, the last HISTORY_BUCKETS of them.
BUCKET_S = 5.0
HISTORY_BUCKETS = 360
# Latency histogram edges (ms) for percentiles in the summary (finer than Prometheus').
TRAFFIC_LATENCY_EDGES_MS = np.geomspace(0.05, 60_000, 121)


def hub_name(app: str) -> str:
    return f"serve_app_monitor:{app}"


def percentile_from_counts(counts: np.ndarray, q: float) -> float | None:
    """The q-quantile (0..1) of a histogram over TRAFFIC_LATENCY_EDGES_MS (upper bin edge)."""
    total = counts.sum()
    if total == 0:
        return None
    index = int(np.searchsorted(np.cumsum(counts), q * total, side="left"))
    edges = TRAFFIC_LATENCY_EDGES_MS
    return float(edges[min(index, len(edges) - 1)])


class _Bucket:
    __slots__ = ("requests", "errors", "rows", "latency")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.rows = 0
        self.latency = np.zeros(len(TRAFFIC_LATENCY_EDGES_MS) + 1, dtype=np.int64)


class MonitorHub:
    def __init__(self, app: str, store: str, settings: Mapping[str, Any], *, emit_metrics: bool = True) -> None:
        from serve_app.model.store import ModelStore

        self.app = app
        self.store = ModelStore(store)
        self.emit_metrics = emit_metrics
        self._references: dict[tuple[str, str], DriftReference | None] = {}
        self._predictions: OrderedDict[str, tuple[str, str, list[Any]] | None] = OrderedDict()
        self._pending: OrderedDict[str, tuple[float, list[Any]]] = OrderedDict()
        self._accuracy: dict[tuple[str, str], deque[int]] = {}
        self._feedback_counts: dict[tuple[str, str, str], int] = {}
        self._drift: dict[str, tuple[float, dict[tuple[str, str], dict[str, Any]]]] = {}
        self._buckets: OrderedDict[int, _Bucket] = OrderedDict()
        self._classes: dict[tuple[str, str], dict[str, int]] = {}
        self._routes: dict[tuple[str, str], int] = {}
        self._dropped: dict[str, int] = {}
        self._last_drift_emit = 0.0
        self.last_seen = time.monotonic()
        self.configure(settings)

    # ---- configuration and liveness ------------------------------------------------

    def configure(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        self.thresholds = Thresholds.from_settings(settings)
        self.capacity = int(settings["feedback_capacity"])
        self.accuracy_window = int(settings["accuracy_window"])
        # A replica that has sent no update for this long is gone (or stuck): ignore its window.
        self.stale_after_s = max(10.0, 10 * float(settings["flush_interval_s"]))

    def start_idle_watch(self, idle_exit_s: float = IDLE_EXIT_S) -> None:
        """In the actor: end it after `idle_exit_s` without an update from any replica."""
        import ray

        me = ray.get_runtime_context().current_actor

        def watch() -> None:
            while True:
                time.sleep(min(30.0, idle_exit_s / 4))
                if time.monotonic() - self.last_seen > idle_exit_s:
                    logger.info("monitor hub %s: no replica sent an update for %.0fs; exiting", self.app, idle_exit_s)
                    ray.kill(me)
                    return

        threading.Thread(target=watch, name="hub-idle-watch", daemon=True).start()

    # ---- updates from replicas -----------------------------------------------------

    def ingest(self, replica: str, update: Mapping[str, Any]) -> None:
        now = time.monotonic()
        self.last_seen = now
        scored: set[tuple[str, str]] = set()
        for request_id, model, version, labels in update.get("predictions", ()):
            if not request_id:
                continue
            self._predictions[request_id] = (model, version, labels)
            self._predictions.move_to_end(request_id)
            waiting = self._pending.pop(request_id, None)
            if waiting is not None:
                error = self._score(request_id, waiting[1])
                if error:
                    logger.warning("feedback for %s refused: %s", request_id, error)
                else:
                    scored.add((model, version))
        while len(self._predictions) > self.capacity:
            self._predictions.popitem(last=False)
        self._expire_pending(now)

        if "drift" in update:
            windows = {(model, version): counts for model, version, counts in update["drift"]}
            self._drift[replica] = (now, windows)
        traffic = update.get("traffic")
        if traffic:
            self._add_traffic(traffic)
        for reason, count in (update.get("dropped") or {}).items():
            self._dropped[reason] = self._dropped.get(reason, 0) + int(count)
        if self.emit_metrics:
            self._emit_accuracy(scored)
            if now - self._last_drift_emit >= 1.0:
                self._last_drift_emit = now
                self._emit_drift()

    def _add_traffic(self, traffic: Mapping[str, Any]) -> None:
        key = int(time.time() // BUCKET_S)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
            while len(self._buckets) > HISTORY_BUCKETS:
                self._buckets.popitem(last=False)
        for route, status, count in traffic.get("requests", ()):
            bucket.requests += count
            if int(status) >= 400:
                bucket.errors += count
            self._routes[(route, str(status))] = self._routes.get((route, str(status)), 0) + count
        bucket.rows += int(traffic.get("rows", 0))
        latency = traffic.get("latency")
        if latency is not None:
            bucket.latency += np.asarray(latency, dtype=np.int64)
        for model, version, label, count in traffic.get("classes", ()):
            per_version = self._classes.setdefault((model, version), {})
            per_version[label] = per_version.get(label, 0) + count

    # ---- feedback and accuracy -----------------------------------------------------

    def feedback(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Joins true labels with logged predictions: `[{"request_id", "labels": [...]}]`."""
        self._expire_pending(time.monotonic())
        joined, pending, rejected = 0, 0, []
        touched: set[tuple[str, str]] = set()
        for item in items:
            request_id, labels = item["request_id"], list(item["labels"])
            if request_id in self._predictions:
                record = self._predictions[request_id]
                error = self._score(request_id, labels)
                if error:
                    rejected.append({"request_id": request_id, "error": error})
                else:
                    joined += 1
                    assert record is not None
                    touched.add((record[0], record[1]))
            elif request_id in self._pending:
                rejected.append({"request_id": request_id, "error": "feedback for this request id was already received"})
            else:
                self._pending[request_id] = (time.monotonic(), labels)
                pending += 1
                while len(self._pending) > self.capacity:
                    self._unmatched(self._pending.popitem(last=False)[0])
        if self.emit_metrics:
            self._emit_accuracy(touched)
        return {"joined": joined, "pending": pending, "rejected": rejected}

    def _score(self, request_id: str, labels: list[Any]) -> str | None:
        record = self._predictions.get(request_id)
        if record is None:
            return "feedback for this request id was already received"
        model, version, predicted = record
        if len(labels) != len(predicted):
            return f"the request had {len(predicted)} row(s) but {len(labels)} label(s) were given"
        self._predictions[request_id] = None  # scored once; a second label is refused
        window = self._accuracy.setdefault((model, version), deque(maxlen=self.accuracy_window))
        for truth, guess in zip(labels, predicted):
            correct = int(truth == guess or str(truth) == str(guess))
            window.append(correct)
            outcome = "correct" if correct else "wrong"
            key = (model, version, outcome)
            self._feedback_counts[key] = self._feedback_counts.get(key, 0) + 1
            if self.emit_metrics:
                m.hub_metrics()[m.FEEDBACK].inc(1, tags={"app": self.app, "model": model, "version": version, "outcome": outcome})
        return None

    def _unmatched(self, request_id: str) -> None:
        key = ("", "", "unmatched")
        self._feedback_counts[key] = self._feedback_counts.get(key, 0) + 1
        if self.emit_metrics:
            m.hub_metrics()[m.FEEDBACK].inc(1, tags={"app": self.app, "model": "", "version": "", "outcome": "unmatched"})

    def _expire_pending(self, now: float) -> None:
        while self._pending:
            request_id, (received, _) = next(iter(self._pending.items()))
            if now - received < PENDING_TTL_S:
                break
            self._pending.popitem(last=False)
            self._unmatched(request_id)

    def accuracy(self, model: str) -> dict[str, Any]:
        versions = {}
        for (name, version), window in sorted(self._accuracy.items()):
            if name == model:
                versions[version] = {
                    "accuracy": (sum(window) / len(window)) if window else None,
                    "labelled_rows": len(window),
                    "window": self.accuracy_window,
                }
        totals = {outcome: n for (name, _, outcome), n in self._feedback_counts.items() if name in (model, "")}
        return {"model": model, "versions": versions, "pending_feedback": len(self._pending), "feedback": totals}

    def _emit_accuracy(self, keys: set[tuple[str, str]]) -> None:
        gauges = m.hub_metrics()
        for model, version in keys:
            window = self._accuracy.get((model, version))
            if window:
                tags = {"app": self.app, "model": model, "version": version}
                gauges[m.ACCURACY].set(sum(window) / len(window), tags=tags)
                gauges[m.ACCURACY_LABELS].set(len(window), tags=tags)

    # ---- drift ---------------------------------------------------------------------

    def reference(self, model: str, version: str) -> DriftReference | None:
        key = (model, version)
        if key not in self._references:
            try:
                self._references[key] = DriftReference.from_manifest(self.store.manifest(model, version))
            except Exception as exc:  # a version deleted from the store: no reference
                logger.warning("no drift reference for %s v%s: %s", model, version, exc)
                self._references[key] = None
        return self._references[key]

    def _windows(self) -> dict[tuple[str, str], tuple[WindowCounts, int]]:
        now = time.monotonic()
        combined: dict[tuple[str, str], tuple[WindowCounts, int]] = {}
        for replica, (seen, windows) in list(self._drift.items()):
            if now - seen > self.stale_after_s:
                del self._drift[replica]
                continue
            for key, wire in windows.items():
                counts = WindowCounts.from_wire(wire)
                if key in combined:
                    total, replicas = combined[key]
                    combined[key] = (total + counts, replicas + 1)
                else:
                    combined[key] = (counts, 1)
        return combined

    def drift(self, model: str) -> dict[str, Any]:
        versions = {}
        for (name, version), (counts, replicas) in sorted(self._windows().items()):
            reference = self.reference(name, version)
            if name != model or reference is None:
                continue
            scored = score(reference, counts, self.thresholds)
            scored["replicas"] = replicas
            versions[version] = scored
        return {
            "model": model,
            "status": worst([v["status"] for v in versions.values()]),
            "thresholds": {
                "psi_warning": self.thresholds.psi_warning, "psi_drift": self.thresholds.psi_drift,
                "ks_warning": self.thresholds.ks_warning, "ks_drift": self.thresholds.ks_drift,
                "min_rows": self.thresholds.min_rows,
            },
            "versions": versions,
        }

    def _emit_drift(self) -> None:
        gauges = m.hub_metrics()
        for (model, version), (counts, _) in self._windows().items():
            reference = self.reference(model, version)
            if reference is None:
                continue
            scored = score(reference, counts, self.thresholds)
            tags = {"app": self.app, "model": model, "version": version}
            gauges[m.DRIFT_ROWS].set(counts.rows, tags=tags)
            for feature, result in scored["features"].items():
                feature_tags = {**tags, "feature": feature}
                gauges[m.DRIFT_PSI].set(result["psi"], tags=feature_tags)
                if "ks" in result:  # categorical columns have none
                    gauges[m.DRIFT_KS].set(result["ks"], tags=feature_tags)
                if "unseen_share" in result:
                    gauges[m.DRIFT_UNSEEN].set(result["unseen_share"], tags=feature_tags)
                if "null_share" in result:
                    gauges[m.DRIFT_NULLS].set(result["null_share"], tags=feature_tags)
                gauges[m.DRIFT_STATUS].set(m.DRIFT_STATUS_VALUES[result["status"]], tags=feature_tags)

    # ---- everything, for /v2/models/{name}/monitoring and `serve-app report` ---------

    def summary(self, model: str) -> dict[str, Any]:
        series = []
        latency_total = np.zeros(len(TRAFFIC_LATENCY_EDGES_MS) + 1, dtype=np.int64)
        for key, bucket in self._buckets.items():
            latency_total += bucket.latency
            series.append({
                "t": key * BUCKET_S,
                "requests_per_s": bucket.requests / BUCKET_S,
                "errors_per_s": bucket.errors / BUCKET_S,
                "rows_per_s": bucket.rows / BUCKET_S,
                "p50_ms": percentile_from_counts(bucket.latency, 0.50),
                "p90_ms": percentile_from_counts(bucket.latency, 0.90),
                "p99_ms": percentile_from_counts(bucket.latency, 0.99),
            })
        classes = {version: dict(sorted(counts.items())) for (name, version), counts in sorted(self._classes.items()) if name == model}
        return {
            "app": self.app,
            "model": model,
            "generated_at": time.time(),
            "bucket_s": BUCKET_S,
            "series": series,
            "latency_ms": {f"p{int(q * 100)}": percentile_from_counts(latency_total, q) for q in (0.5, 0.9, 0.99)},
            "requests": [{"route": r, "status": s, "count": n} for (r, s), n in sorted(self._routes.items())],
            "classes": classes,
            "drift": self.drift(model),
            "accuracy": self.accuracy(model),
            "dropped": dict(self._dropped),
            "replicas_reporting": len(self._drift),
        }
