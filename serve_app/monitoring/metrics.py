"""The Prometheus metrics serve_app emits, through Ray's metrics API.

They are exported on each node's Ray metrics port next to Ray Serve's own (scrape
`http://NODE:METRICS_EXPORT_PORT/metrics`; see cluster/README.md). Ray prefixes every
name with `ray_` and counters get `_total`, so `serve_app_requests` is scraped as
`ray_serve_app_requests_total`. Replica metrics also carry Ray Serve's `application`,
`deployment` and `replica` tags; the hub's (drift, accuracy) are one series per model.
For models with typed columns, the drift gauges have one series per monitored column, numeric
or categorical (`feature` is the column name; categorical columns have no KS), plus the
share of unseen categories (categorical) and of nulls (every typed column).

Metric objects are created once per process (Ray registers a name once) and recorded
from the monitor thread, never per request on the event loop: the replica's metrics are
derived from the request records of its ledger (serving/ledger.py).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

# Names as defined here; scraped, they are prefixed `ray_` (and counters end `_total`).
REQUESTS = "serve_app_requests"
REQUEST_LATENCY = "serve_app_request_latency_ms"
MODEL_LATENCY = "serve_app_model_latency_ms"
BATCH_ROWS = "serve_app_batch_rows"
ROWS_PREDICTED = "serve_app_rows_predicted"
PREDICTED_CLASSES = "serve_app_predicted_class"
MONITOR_DROPPED = "serve_app_monitor_dropped"
LOG_LINES = "serve_app_prediction_log_lines"
DRIFT_PSI = "serve_app_drift_psi"
DRIFT_KS = "serve_app_drift_ks"
DRIFT_STATUS = "serve_app_drift_status"
DRIFT_ROWS = "serve_app_drift_window_rows"
DRIFT_UNSEEN = "serve_app_drift_unseen_share"
DRIFT_NULLS = "serve_app_drift_null_share"
ACCURACY = "serve_app_live_accuracy"
ACCURACY_LABELS = "serve_app_live_accuracy_labels"
FEEDBACK = "serve_app_feedback"


LATENCY_BOUNDARIES_MS = [0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 25, 50, 100, 250, 500, 1000, 2500, 10000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384]
DRIFT_STATUS_VALUES = {"insufficient_data": -1, "ok": 0, "warning": 1, "drift": 2}


def _metric_classes(module: str) -> Any:
    # Ray annotates `tag_keys` as a 1-tuple (`Tuple[str]`); ours have several keys.
    return importlib.import_module(module)


@lru_cache(maxsize=None)
def replica_metrics() -> dict[str, Any]:
    ray_metrics = _metric_classes("ray.serve.metrics")
    Counter, Gauge, Histogram = ray_metrics.Counter, ray_metrics.Gauge, ray_metrics.Histogram
    return {
        REQUESTS: Counter(REQUESTS, description="HTTP requests answered by the replica, by route, model, version and status.", tag_keys=("route", "model", "version", "status")),
        REQUEST_LATENCY: Histogram(REQUEST_LATENCY, description="Time in the replica from request to response (decode, batch wait, predict, encode).", boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("route", "model", "version")),
        MODEL_LATENCY: Histogram(MODEL_LATENCY, description="Time of one model call on a batch.", boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("model", "version")),
        BATCH_ROWS: Histogram(BATCH_ROWS, description="Rows per model call (requests batched together).", boundaries=BATCH_BOUNDARIES, tag_keys=("model", "version")),
        ROWS_PREDICTED: Counter(ROWS_PREDICTED, description="Rows predicted.", tag_keys=("model", "version")),
        PREDICTED_CLASSES: Counter(PREDICTED_CLASSES, description="Predicted labels, by class.", tag_keys=("model", "version", "class")),
        MONITOR_DROPPED: Gauge(MONITOR_DROPPED, description="Records this replica's monitor dropped since it started: queue_full (requests not monitored), hub_busy (updates to the hub not sent), log_error (log lines not written). A gauge so it is exported at 0 too.", tag_keys=("reason",)),
        LOG_LINES: Counter(LOG_LINES, description="Lines written to the prediction log."),
    }


@lru_cache(maxsize=None)
def hub_metrics() -> dict[str, Any]:
    ray_metrics = _metric_classes("ray.util.metrics")
    Counter, Gauge = ray_metrics.Counter, ray_metrics.Gauge
    tags = ("app", "model", "version")
    return {
        DRIFT_PSI: Gauge(DRIFT_PSI, description="Population stability index of recent inputs vs training, per feature (numeric: training deciles; categorical: top categories, other, unseen).", tag_keys=(*tags, "feature")),
        DRIFT_KS: Gauge(DRIFT_KS, description="Kolmogorov-Smirnov statistic of recent inputs vs the training sample, per feature.", tag_keys=(*tags, "feature")),
        DRIFT_STATUS: Gauge(DRIFT_STATUS, description="Drift status per feature: -1 too few rows, 0 ok, 1 warning, 2 drift.", tag_keys=(*tags, "feature")),
        DRIFT_UNSEEN: Gauge(DRIFT_UNSEEN, description="Share of recent non-null values of a categorical column that are categories never seen in training.", tag_keys=(*tags, "feature")),
        DRIFT_NULLS: Gauge(DRIFT_NULLS, description="Share of recent rows with a null in the column (models with typed columns).", tag_keys=(*tags, "feature")),
        DRIFT_ROWS: Gauge(DRIFT_ROWS, description="Rows in the drift windows of all replicas.", tag_keys=tags),
        ACCURACY: Gauge(ACCURACY, description="Accuracy of predictions over the last labelled rows (from /feedback).", tag_keys=tags),
        ACCURACY_LABELS: Gauge(ACCURACY_LABELS, description="Labelled rows in the live accuracy window.", tag_keys=tags),
        FEEDBACK: Counter(FEEDBACK, description="Feedback labels received, by outcome (correct, wrong, unmatched).", tag_keys=(*tags, "outcome")),
    }
