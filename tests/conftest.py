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

import resource
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from serve_app.ops import processes

# Everything a test run creates lives in one folder, removed at the end: pytest's tmp_path,
# Ray's session dirs (Ray honours TMPDIR), HAProxy's files, `make run`'s and the local
# clusters' state. Short: Ray and HAProxy put unix sockets under it (108-byte limit).
RUN_DIR = Path(tempfile.mkdtemp(prefix="sa-run-", dir="/tmp"))
os.environ["TMPDIR"] = tempfile.tempdir = str(RUN_DIR)
# Every process this run starts inherits this variable (Ray workers and HAProxy included),
# which is how the session-end check finds the ones that outlived their test.
RUN_MARKER = "SA_TEST_RUN"
os.environ[RUN_MARKER] = RUN_DIR.name
os.environ["SERVE_APP_SIGNING_DIR"] = str(RUN_DIR / "signing")  # this run's publisher key pair, outside every store
# Token auth on, with this run's own token: how test clusters start must not depend on
# whether ~/.ray/auth_token happens to exist (Ray reads RAY_AUTH_TOKEN before that file).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
# The overload bursts open 1,000 sockets at once, past the usual soft limit of 1,024 fds
# once Ray's own are counted; children (HAProxy, replicas) inherit the raised limit.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(_soft, min(_hard, 65536)), _hard))

# Before Ray is imported anywhere: workers inherit this environment from the driver.
_HAPROXY_DIR = RUN_DIR / "hap"
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

from serve_app.model.store import ModelStore  # noqa: E402
from serve_app.model.training import save_fitted, train  # noqa: E402

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
    """The session's Ray + Serve, driven declaratively like `serve deploy` (control.deploy).

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
        from serve_app.ops import control

        self.apps[app["name"]] = app
        control.deploy(self.config(), self.dashboard)
        if wait:
            control.wait_until_running(app["name"], self.dashboard)

    def remove(self, name: str) -> None:
        from serve_app.ops import control

        if self.apps.pop(name, None) is not None:
            control.deploy(self.config(), self.dashboard)


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
    # Logical CPUs only: lets several test apps share the 2 real cores. No prestarted
    # workers: they would sit idle for the whole run, each holding ~100 MB and a share of
    # the start-up CPU.
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        log_to_driver=False,
        _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False},
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
            # Listed again after the shutdown: the controller may restart HAProxy during it.
            started |= processes.descendants(os.getpid())
            ray.shutdown()
            processes.end(started | processes.descendants(os.getpid()))


# ---- nothing left behind ------------------------------------------------------------------


def _marked_processes() -> set[processes.Process]:
    """Live processes started by this run: they carry RUN_MARKER in their environment."""
    marker = f"{RUN_MARKER}={RUN_DIR.name}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                found.add((int(entry), int(fields[19])))
    return found


def _describe(process: processes.Process) -> str:
    try:
        argv = Path(f"/proc/{process[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        argv = "?"
    return f"{process[0]} {argv[:160]}"


_TMP_BEFORE = {entry.name for entry in Path("/tmp").iterdir() if entry.name.startswith("sa")}


def _readme_commands_not_run(session: pytest.Session) -> set[str]:
    """After a run of every scenario (the tier that runs the README), its commands no test ran."""
    from .readme import every_command, recorded

    config = session.config
    whole_tier = (
        config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and config.option.markexpr in ("", "scenario")
        and not any(getattr(config.option, name, None) for name in ("keyword", "deselect", "lf", "collectonly", "exitfirst"))
    )
    if not whole_tier or session.testsfailed or session.shouldfail or session.shouldstop:
        return set()
    return every_command() - recorded()


@pytest.hookimpl(trylast=True)  # after pytest's own teardown of session fixtures (on Ctrl-C too)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fails the run if any process it started outlived the fixtures, or a temp dir stayed.

    Runs after every fixture's teardown. A leak is reported, then ended (by pid), so the
    next run starts clean either way.
    """
    deadline = time.monotonic() + 20  # processes told to stop may take a moment to go
    leftovers = _marked_processes()
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.5)
        leftovers = _marked_processes()
    problems = [f"process left running: {_describe(p)}" for p in sorted(leftovers)]
    processes.end(leftovers)
    not_run = _readme_commands_not_run(session)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    created = {entry.name for entry in Path("/tmp").iterdir() if entry.name.startswith("sa")} - _TMP_BEFORE
    problems += [f"temp dir left behind: /tmp/{name}" for name in sorted(created)]
    problems += [f"README command that no test ran: {command!r}" for command in sorted(not_run)]
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "this run left things behind", red=True)
            for line in problems:
                reporter.write_line(line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


def env_for_own_ray() -> dict[str, str]:
    """This environment for a child that starts a Ray of its own (bench, tune, benchmarks):
    none of the session Ray's Serve settings (HAProxy files, ports), the run's signing key kept."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_SERVE_", "SERVE_APP_")) or k == "SERVE_APP_SIGNING_DIR"}


def run_bounded(argv: list[str], *, timeout_s: float, **popen: Any) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(..., capture_output=True, text=True)` whose timeout ends the child's
    whole tree (its own Ray and HAProxy, which outlive a killed parent), not the child alone."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)
    seen: set[processes.Process] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            seen.update(processes.descendants(proc.pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        seen.update(processes.descendants(proc.pid))
        proc.kill()
        processes.end(seen)
        out, err = proc.communicate()
        raise AssertionError(f"{argv[:3]} still running after {timeout_s:.0f} s; ended it and its {len(seen)} processes:\n{out[-2000:]}\n{err[-2000:]}") from None
    finally:
        done.set()
        watcher.join()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


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
