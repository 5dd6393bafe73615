"""`serve-app run` (what `make run` runs) when the application cannot start, or stops being
healthy: it says why, in serve_app's own words with what to change, and leaves nothing behind.

Each case runs the real command on a copy of configs/local.yaml (its own free HTTP and
dashboard ports, a store in tmp_path, no monitoring block), as a user's shell would, and
checks: a non-zero exit, the cause in the output, the port free, and no process of the
run's tree alive afterwards. The seconds each case took are printed, not asserted (a busy
2-core machine can take several times longer); the subprocess timeout only guards a hang.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from serve_app.ops import control

from serve_app.ops import processes
from serve_app.model.store import ModelStore
from serve_app.model.training import train

pytestmark = [pytest.mark.scenario]

ROOT = Path(__file__).resolve().parents[1]
SERVE_APP = str(Path(sys.executable).with_name("serve-app"))
HANG_GUARD_S = 120.0
KEY_VARIABLE = "SERVE_APP_TEST_API_KEY"


@dataclass
class Run:
    """One `serve-app run`, watched from outside: its output and every process it had."""

    proc: subprocess.Popen[str]
    port: int
    started: float = field(default_factory=time.monotonic)
    lines: list[str] = field(default_factory=list)
    seen: set[processes.Process] = field(default_factory=set)
    done: threading.Event = field(default_factory=threading.Event)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.reader.start()
        self.watcher.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def _watch(self) -> None:
        while not self.done.wait(0.2):
            self.seen |= processes.descendants(self.proc.pid)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = next((line for line in list(self.lines) if text in line), None)
            if found is not None:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line with {text!r} within {timeout_s:.0f} s:\n{self.output[-4000:]}")

    def finish(self, timeout_s: float = HANG_GUARD_S) -> int:
        try:
            code = self.proc.wait(timeout=max(1.0, timeout_s - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.end()
            raise AssertionError(f"serve-app run still running after {timeout_s:.0f} s:\n{self.output[-4000:]}") from None
        self.seconds = time.monotonic() - self.started
        self.done.set()
        self.watcher.join()
        self.reader.join(timeout=10)
        return code

    def end(self) -> None:
        """Never leave anything behind, whatever the test found: SIGTERM first, so serve-app
        stops its Ray and removes its own files, then whatever is left, by pid."""
        self.done.set()
        self.watcher.join()
        self.seen |= processes.descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        processes.end(self.seen)

    def leftovers(self) -> list[str]:
        deadline = time.monotonic() + 5  # processes.end already waited; this only absorbs a reap
        alive = [p for p in self.seen if processes.alive(p)]
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in alive if processes.alive(p)]
        return [_describe(p) for p in alive]


def _describe(process: processes.Process) -> str:
    try:
        return f"{process[0]} " + Path(f"/proc/{process[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    except OSError:
        return str(process[0])


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell (none of this session's Ray settings) with this session's token and
    model-signing keys (the ones `trained` signed with), the checkout on PYTHONPATH, and
    private HAProxy ports (fixed by default, and another Ray on this machine may hold them)."""
    keep = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED", "SERVE_APP_SIGNING_DIR", "SERVE_APP_TRUSTED_KEYS"}
    env = {k: v for k, v in os.environ.items() if k in keep or not k.startswith(("RAY_", "SERVE_APP_"))}
    env.update({
        "PYTHONPATH": str(ROOT),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(processes.free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(processes.free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(processes.free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(processes.free_port()),
    })
    return {**env, **extra}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris v1 (the default model), copied into each case's own store."""
    store = ModelStore(tmp_path_factory.mktemp("trained") / "models")
    train(store)
    return store.root


@dataclass
class Case:
    dir: Path
    store: Path
    config: dict[str, Any]
    env: dict[str, str]

    @property
    def app(self) -> dict[str, Any]:
        return self.config["applications"][0]  # type: ignore[no-any-return]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.app["deployments"][0]  # type: ignore[no-any-return]

    @property
    def port(self) -> int:
        return int(self.config["http_options"]["port"])

    def start(self, *command: str) -> Run:
        """`serve-app run` on this case's config (or `serve-app COMMAND... --config it`)."""
        path = self.dir / "config.yaml"
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        argv = [SERVE_APP, *(command or ("run", "--dashboard-port", str(processes.free_port()))), "--config", str(path)]
        proc = subprocess.Popen(argv, cwd=self.dir, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        return Run(proc, self.port)


@pytest.fixture
def case(tmp_path: Path, trained: Path) -> Case:
    """configs/local.yaml as shipped (2 replicas), on free ports, with its own store."""
    import shutil

    store = tmp_path / "models"
    shutil.copytree(trained, store)
    config = copy.deepcopy(yaml.safe_load((ROOT / "configs" / "local.yaml").read_text()))
    config["http_options"]["port"] = processes.free_port()
    app = config["applications"][0]
    app["args"]["store"] = str(store)
    app["args"].pop("monitoring", None)
    return Case(tmp_path, store, config, user_env())


def fails(case: Case, says: list[str], name: str, *, before: Callable[[Run], None] | None = None,
          port_held: bool = False, ray_traceback: bool = False, command: tuple[str, ...] = ()) -> Run:
    """Runs the case to its end and checks how it ended: non-zero, every one of `says` in
    the output (serve_app's words, no traceback unless `ray_traceback`: Ray's own when `serve
    run` itself dies), the port free (unless the test holds it) and nothing left running."""
    run = case.start(*command)
    try:
        if before is not None:
            before(run)
        code = run.finish()
        print(f"\n{name}: exit {code} after {run.seconds:.1f} s; its output:\n" + run.output)
        assert code != 0, run.output[-4000:]
        for text in says:
            assert text in run.output, f"{text!r} not in the output:\n{run.output[-4000:]}"
        assert ray_traceback or "Traceback (most recent call last)" not in run.output, run.output[-4000:]
        if "new local Ray" in run.output:  # Ray was started: it was stopped, and said so
            state = "STILL IN USE" if port_held else "free"
            assert f"serve-app: stopped; port {case.port} is {state}" in run.output, run.output[-4000:]
        assert port_held or processes.port_is_free(case.port)
        assert not run.leftovers(), f"left running: {run.leftovers()}"
        return run
    finally:
        run.end()


# ---- the application cannot start: watched through the Ray dashboard --------------------------


def test_short_api_key_is_named_with_what_to_change(case: Case) -> None:
    case.app["args"]["api_key_env"] = KEY_VARIABLE
    case.env[KEY_VARIABLE] = "0123456789ab"  # 12 characters, as in the issue
    fails(case, [
        f"the API key in environment variable {KEY_VARIABLE} (of the replica processes) is too short: "
        "it needs at least 16 characters (e.g. `openssl rand -hex 32`)",
        "what to change: give the replicas a key of at least 16 characters",
        "serve-app: error: application 'serve_app' cannot start: a replica of ModelServer failed to start:",
    ], "short API key")


def test_model_that_fails_verification_is_named(case: Case) -> None:
    store = ModelStore(case.store)
    model_file = store.model_path(store.manifest("iris", "1"))
    os.chmod(model_file, 0o644)  # the store makes artefacts read-only
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    fails(case, ["the file was changed after it was stored", "what to change: serve a version that verifies"],
          "bad model")


def test_bench_stops_at_the_first_refused_replica_with_the_reason(case: Case, tmp_path: Path) -> None:
    """`serve-app bench` (and `tune`, which starts its Ray the same way) deploys the config on
    a private Ray: the same watch ends it with the reason, not a wait for DEPLOY_FAILED."""
    case.app["args"]["api_key_env"] = KEY_VARIABLE
    case.env[KEY_VARIABLE] = "0123456789ab"
    fails(case, ["serve-app: error: application 'serve_app' cannot start: a replica of ModelServer failed to start: "
                 f"the API key in environment variable {KEY_VARIABLE} (of the replica processes) is too short",
                 "what to change: give the replicas a key"],
          "bench", command=("bench", "--quick", "--servers", "serve_app", "--out", str(tmp_path / "bench")))


# ---- refused before anything starts -----------------------------------------------------------


def test_missing_store_is_refused_before_ray_starts(case: Case) -> None:
    missing = case.dir / "no-such-store"
    case.app["args"]["store"] = str(missing)
    run = fails(case, [f"the model store {missing} does not exist; set args.store"], "missing store")
    assert not missing.exists()  # not created and trained into: a typo must not serve iris
    assert "new local Ray" not in run.output


@pytest.mark.parametrize(
    ("where", "edit", "says"),
    [
        ("args", lambda c: c.app["args"].update(modle="iris"), "args.modle: Extra inputs are not permitted"),
        ("user_config", lambda c: c.deployment["user_config"].update(max_batch=64),
         "user_config.max_batch: Extra inputs are not permitted"),
        ("deployment", lambda c: c.deployment.update(num_replica=4),
         "unknown key applications[0].deployments[0].num_replica (did you mean 'num_replicas'?)"),
        ("top level", lambda c: c.config.update(http_option={"port": 1}),
         "unknown key http_option (did you mean 'http_options'?)"),
    ],
)
def test_unknown_config_key_is_named(case: Case, where: str, edit: Callable[[Case], None], says: str) -> None:
    edit(case)
    run = fails(case, ["cannot be deployed as written", says], f"unknown key ({where})")
    assert "new local Ray" not in run.output


def test_busy_port_names_who_holds_it(case: Case) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", case.port))
        holder.listen()
        run = fails(case, [f"port {case.port} (http_options.port in", f"is already in use by pid {os.getpid()}",
                           "set another http_options.port"], "busy port", port_held=True)
    assert "new local Ray" not in run.output


def test_port_taken_after_the_check_is_named(case: Case) -> None:
    """Taken while Ray starts, after serve-app's own check: HAProxy cannot bind it and `serve
    run` exits with Ray's traceback; serve-app then says who holds the port."""
    holder = socket.socket()

    def take_the_port(run: Run) -> None:
        run.wait_for_line("on a new local Ray", timeout_s=60)
        holder.bind(("127.0.0.1", case.port))
        holder.listen()

    with holder:
        fails(case, ["serve run exited with code 1 before the application served",
                     f"is already in use by pid {os.getpid()}"], "port taken late", before=take_the_port,
              port_held=True, ray_traceback=True)


# ---- serving, then a replica dies ---------------------------------------------------------------


def test_unhealthy_deployment_is_reported_while_serving(case: Case) -> None:
    """A replica process killed (SIGKILL) while the app serves: Ray marks the deployment
    UNHEALTHY until it has replaced it. (serve_app's check_health scores a canned row on the
    model in memory; nothing in a config makes it start failing later, so a dead replica is
    the real trigger used here.)"""
    case.deployment["num_replicas"] = 1
    run = case.start()
    try:
        run.wait_for_line("serve-app: serving on", timeout_s=HANG_GUARD_S)
        details = control.details(run.wait_for_line("dashboard http://", 1).split("dashboard ")[1].split()[0])
        replica = details["applications"]["serve_app"]["deployments"]["ModelServer"]["replicas"][0]["pid"]
        os.kill(replica, signal.SIGKILL)
        warning = run.wait_for_line("is UNHEALTHY", timeout_s=60)
        assert f"serve_app/ModelServer is UNHEALTHY (replica process {replica} ended)" in warning, warning
        run.wait_for_line("serve_app/ModelServer is healthy again", timeout_s=HANG_GUARD_S)
        os.kill(run.proc.pid, signal.SIGINT)  # Ctrl-C
        code = run.finish(timeout_s=HANG_GUARD_S)
        print(f"\nunhealthy: exit {code}; its last lines:\n" + "".join(run.lines[-12:]))
        assert code == 0, run.output[-4000:]
        assert f"serve-app: stopped; port {case.port} is free" in run.output
        assert not run.leftovers(), f"left running: {run.leftovers()}"
    finally:
        run.end()


# ---- the reason, out of Ray's message (as `get_serve_details()` reported it, trimmed) -----------

RAY_REPLICA_MESSAGE = (
    "A replica failed to start with exception. Retrying 5 more time(s). Error:\n"
    "\x1b[36mray::ServeReplica:serve_app:ModelServer.initialize_and_get_metadata()\x1b[39m (pid=17312, ip=192.0.2.2)\n"
    '  File ".../ray/serve/_private/replica.py", line 1928, in initialize\n'
    "    raise RuntimeError(traceback.format_exc()) from None\n"
    "RuntimeError: Traceback (most recent call last):\n"
    '  File "/work/main/serve_app/serving/auth.py", line 59, in load_api_key\n'
    "    raise ApiKeyConfigError(\n"
    "serve_app.serving.auth.ApiKeyConfigError: the API key in environment variable K (of the replica processes) is too short"
)


def test_reason_is_serve_apps_own_message_not_the_traceback() -> None:
    app = {"status": "DEPLOYING", "deployments": {"ModelServer": {"status": "UPDATING", "message": RAY_REPLICA_MESSAGE}}}
    problem = control.failure("serve_app", app)
    assert problem is not None and problem.final and problem.deployment == "ModelServer"
    assert problem.reason == "the API key in environment variable K (of the replica processes) is too short"
    assert problem.error == "ApiKeyConfigError" and problem.hint.startswith("give the replicas a key")
    # Not serve_app's own error: Ray may succeed on a retry, so only DEPLOY_FAILED is final.
    other = RAY_REPLICA_MESSAGE.replace("serve_app.serving.auth.ApiKeyConfigError", "ray.exceptions.ActorDiedError")
    app["deployments"]["ModelServer"]["message"] = other
    problem = control.failure("serve_app", app)
    assert problem is not None and not problem.final and problem.reason.startswith("ActorDiedError: the API key")
    app["deployments"]["ModelServer"]["status"] = "DEPLOY_FAILED"
    assert control.failure("serve_app", app).final  # type: ignore[union-attr]
    # The builder failed: the app's own message, with no deployment.
    built = {"status": "DEPLOY_FAILED", "deployments": {}, "message": (
        "Deploying app 'serve_app' failed with exception:\nTraceback (most recent call last):\n"
        '  File "/work/main/serve_app/app.py", line 40, in build_app\n    raise ConfigError(problem)\n'
        "serve_app.settings.ConfigError: the model store /x has no model 'iris'; train one with: serve-app train")}
    problem = control.failure("serve_app", built)
    assert problem is not None and problem.deployment is None and problem.final
    assert problem.reason == "the model store /x has no model 'iris'; train one with: serve-app train"
    healthy = {"status": "RUNNING", "deployments": {"ModelServer": {"status": "HEALTHY", "message": ""}}}
    assert control.failure("serve_app", healthy) is None
