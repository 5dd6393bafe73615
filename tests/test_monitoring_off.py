"""`args.monitoring.enabled: false` on a real app: predictions are served, the monitoring
routes answer 404 with a JSON error, and no monitor hub actor is started for the app."""

from __future__ import annotations

from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from serve_app.monitoring.hub import HUB_NAMESPACE, hub_name
from serve_app.model.predictor import Predictor

from .conftest import IRIS_ROWS, app_config, wait_for

pytestmark = pytest.mark.ray

APP = "nomon"
DISABLED = "monitoring is disabled in this application's config (args.monitoring.enabled)"
MONITORING_ROUTES = [
    ("POST", "/feedback", {"request_id": "any", "label": 0}),
    ("POST", "/v2/models/iris/feedback", {"request_id": "any", "label": 0}),
    ("GET", "/v2/models/iris/drift", None),
    ("GET", "/v2/models/iris/accuracy", None),
    ("GET", "/v2/models/iris/monitoring", None),
    ("GET", "/dashboard", None),
]


@pytest.fixture(scope="module")
def unmonitored(served: dict[str, Any]) -> Iterator[str]:
    cluster = served["cluster"]
    cluster.apply(app_config(served["store"], name=APP, route_prefix=f"/{APP}", monitoring={"enabled": False},
                             deployment={"ray_actor_options": {"num_cpus": 0.1}}))
    url = f"{served['base_url']}/{APP}"
    try:
        wait_for(lambda: httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200, what="the nomon app")
        yield url
    finally:
        cluster.remove(APP)


def _hub_exists(app: str) -> bool:
    import ray

    try:
        ray.get_actor(hub_name(app), namespace=HUB_NAMESPACE)
    except ValueError:  # Ray's answer for "no actor of that name"
        return False
    return True


def test_predictions_are_served(served: dict[str, Any], unmonitored: str) -> None:
    expected = Predictor.load(served["store"], "iris", "1").predict(np.array(IRIS_ROWS)).tolist()
    reply = httpx.post(f"{unmonitored}/predict", json={"features": IRIS_ROWS}, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"predictions": expected, "model": "iris", "version": "1"}
    status = httpx.get(f"{unmonitored}/admin/status", timeout=10).json()
    assert status["monitor"] is None


@pytest.mark.parametrize(("method", "path", "body"), MONITORING_ROUTES, ids=[f"{m} {p}" for m, p, _ in MONITORING_ROUTES])
def test_monitoring_routes_answer_404(unmonitored: str, method: str, path: str, body: Any) -> None:
    reply = httpx.request(method, unmonitored + path, json=body, timeout=10)
    assert reply.status_code == 404, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"error": DISABLED}


def test_no_monitor_hub_is_started(served: dict[str, Any], unmonitored: str) -> None:
    # The default app (monitoring on) has its hub, so the lookup below can find one.
    assert wait_for(lambda: _hub_exists("serve_app"), what="the default app's monitor hub")
    httpx.post(f"{unmonitored}/predict", json={"features": IRIS_ROWS[0]}, timeout=10)
    assert not _hub_exists(APP)
