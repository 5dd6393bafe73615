"""Shared fixtures: tiny real models in tmp_path, and one real Ray instance per session.

The Ray fixture starts Ray with the same fast path `make run` uses (HAProxy ingress,
throughput-optimized mode) on free ports, and on teardown ends every process it started,
by pid, HAProxy included.
"""

from __future__ import annotations

import os

# One BLAS thread per process: tests, Ray workers and replicas share 2 cores, and idle
# BLAS threads spinning on contended cores cost several times the work itself.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from serve_app import processes

# Before Ray is imported anywhere: workers inherit this environment from the driver.
_HAPROXY_DIR = Path(tempfile.mkdtemp(prefix="sa-t", dir="/tmp"))
_HTTP_PORT = processes.free_port()
os.environ.update(processes.FAST_PATH_ENV)
os.environ.update(
    processes.haproxy_env(
        _HAPROXY_DIR,
        stats_port=processes.free_port(),
        metrics_port=processes.free_port(),
        fallback_proxy_port=processes.free_port(),
    )
)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from serve_app.store import ModelStore  # noqa: E402
from serve_app.training import save_fitted, train  # noqa: E402

IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


# ---- tiny real models ---------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture(scope="session")
def trained_iris(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store root holding iris v1, trained once per session (copy it, never change it)."""
    store = ModelStore(tmp_path_factory.mktemp("iris") / "models")
    train(store)
    return store.root


@pytest.fixture
def iris_store(store: ModelStore, trained_iris: Path) -> ModelStore:
    """A store with iris v1 (the default LogisticRegression), aliased production."""
    import shutil

    shutil.copytree(trained_iris, store.root)
    return store


def fit_dummy(n_features: int = 4, classes: tuple[Any, ...] = (0, 1)) -> Any:
    """A DummyClassifier fitted on a handful of rows: a real model that loads in microseconds."""
    from sklearn.dummy import DummyClassifier

    rows = np.arange(len(classes) * 2 * n_features, dtype=float).reshape(-1, n_features)
    labels = np.array(list(classes) * 2)
    return DummyClassifier(strategy="most_frequent").fit(rows, labels)


# ---- one Ray instance per session ---------------------------------------------------------


@pytest.fixture(scope="session")
def session_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """iris v1 (LogisticRegression, production) and v2 (RandomForest), shared by Ray tests."""
    store = ModelStore(tmp_path_factory.mktemp("session") / "models")
    train(store)
    train(store, estimator="random_forest")
    return store


class ServeCluster:
    """The session's Ray + Serve, driven declaratively like `serve deploy` (ops.deploy).

    Serve forbids mixing imperative `serve.run` apps with config-deployed ones, and each
    config deploy replaces the whole set of apps, so every test app goes through `apply`.
    """

    def __init__(self, port: int, dashboard: str) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.dashboard = dashboard
        self.apps: dict[str, dict[str, Any]] = {}

    def config(self) -> dict[str, Any]:
        return {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": self.port},
            "applications": list(self.apps.values()),
        }

    def apply(self, app: dict[str, Any], wait: bool = True) -> None:
        from serve_app import ops

        self.apps[app["name"]] = app
        ops.deploy(self.config(), self.dashboard)
        if wait:
            ops.wait_until_running(app["name"], self.dashboard)

    def remove(self, name: str) -> None:
        from serve_app import ops

        if self.apps.pop(name, None) is not None:
            ops.deploy(self.config(), self.dashboard)


def app_config(
    store: ModelStore,
    *,
    name: str = "serve_app",
    route_prefix: str = "/",
    user_config: dict[str, Any] | None = None,
    num_replicas: int = 1,
    deployment: dict[str, Any] | None = None,
    **args: Any,
) -> dict[str, Any]:
    """One application entry as it would appear in configs/*.yaml."""
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": "serve_app.app:build_app",
        "args": {"store": str(store.root), **args},
        "deployments": [
            {
                "name": "ModelServer",
                "num_replicas": num_replicas,
                "user_config": {"version": "production", **(user_config or {})},
                **(deployment or {}),
            }
        ],
    }


@pytest.fixture(scope="session")
def ray_session() -> Iterator[ServeCluster]:
    import ray

    dashboard_port = processes.free_port()
    # Logical CPUs only: lets several test apps share the 2 real cores.
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        log_to_driver=False,
    )
    cluster = ServeCluster(_HTTP_PORT, f"http://127.0.0.1:{dashboard_port}")
    try:
        yield cluster
    finally:
        from ray import serve

        started = processes.descendants(os.getpid())
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            processes.end(started)


def wait_for(condition: Callable[[], Any], timeout_s: float = 60.0, interval_s: float = 0.2, what: str = "") -> Any:
    """Polls `condition` until it returns something truthy; fails the test on timeout."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # the condition may raise while things come up
            last_error = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or condition}: {last_error!r}")


@pytest.fixture(scope="session")
def served(ray_session: ServeCluster, session_store: ModelStore) -> dict[str, Any]:
    """The default app (iris production = v1, 2 replicas) on `/`, answering through HAProxy."""
    import httpx

    from serve_app.client import model_handle

    ray_session.apply(app_config(session_store, num_replicas=2))
    url = ray_session.base_url

    def answers() -> bool:
        reply = httpx.post(f"{url}/predict", json={"features": IRIS_ROWS[0]}, timeout=5)
        return reply.status_code == 200

    wait_for(answers, what="the served app to answer through HAProxy")
    return {"cluster": ray_session, "base_url": url, "handle": model_handle(), "store": session_store}
