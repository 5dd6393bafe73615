"""Monitoring: Prometheus metrics, the prediction log, live accuracy and data drift.

monitor.py is what a replica runs (it drains the records of the replica's ledger,
serving/ledger.py, on its own thread), hub.py the per-application actor that joins
feedback and sums drift and traffic over replicas, drift.py the PSI/KS arithmetic,
predlog.py the JSON-lines log, metrics.py the metric names, dashboard.py the HTML page.
The HTTP endpoints are in serving/http/monitoring.py.
"""

from __future__ import annotations

from serve_app.monitoring.monitor import Monitor, RayHub
from serve_app.settings import AppSettings

__all__ = ["Monitor", "replica_monitor"]


def replica_monitor(settings: AppSettings) -> Monitor | None:
    """The monitor of the replica being built (None when `args.monitoring.enabled` is false)."""
    if not settings.monitoring.enabled:
        return None
    from ray import serve

    context = serve.get_replica_context()
    replica = f"{context.app_name}_{context.deployment}_{context.replica_tag}"
    hub = RayHub(context.app_name, settings.store, settings.monitoring.model_dump())
    return Monitor(settings.monitoring, replica=replica, hub=hub)
