"""`serve-app run`: `serve run CONFIG` on a fresh local Ray, in the foreground, cleaned up fully.

It checks the config first (Ray's keys, serve_app's `args` and `user_config`, the store,
the port), trains the default model if the store lacks it (any other missing model is
refused, naming the store's models and how to add one), with `--model NAME` serves that
stored model instead of the config's (a copy of the config, the user's file untouched), turns on Ray Serve's fast path
(HAProxy ingress, throughput-optimized mode), and watches the application through the
Ray dashboard until it serves: a status line while it deploys and, when it cannot start,
serve_app's own reason and what to change, then everything stopped and a non-zero exit
(in throughput-optimized mode Ray logs replica errors only to files, so without this the
terminal showed nothing while the port answered 503). While serving, a deployment that
turns UNHEALTHY is reported as it happens. On Ctrl-C or SIGTERM it lets `serve run` drain
and shut Ray down, then ends whatever of its process tree is left (HAProxy above all), so
the port is free for the next run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import yaml

from serve_app.ops import control

from serve_app.ops import processes
from serve_app.app import settings_from_args
from serve_app.settings import DEFAULT_STORE, ConfigError
from serve_app.model.store import ModelStore

DRAIN_TIMEOUT_S = 60.0
FAILED_STOP_TIMEOUT_S = 15.0  # nothing serves: Ray gets this long to stop before it is ended
DASHBOARD_PORT = 8265  # Ray's default, so `serve status` finds it; the next free one if taken
WATCH_INTERVAL_S = 2.0  # how often a serving app's health is looked at


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"cannot read config {path}: {exc}") from None
    if not isinstance(config, dict) or not config.get("applications"):
        raise SystemExit(f"{path} is not a Ray Serve config: it needs an 'applications' list")
    return config


def serve_app_apps(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [app for app in config["applications"] if str(app.get("import_path", "")).startswith("serve_app.")]


def serve_app_args(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [app.get("args") or {} for app in serve_app_apps(config)]


def with_model(config: dict[str, Any], model: str, source: str = "the config") -> dict[str, Any]:
    """A copy of `config` whose serve_app applications serve `model` (`args.model`);
    everything else as it was."""
    import copy

    ModelStore.check_name(model)
    changed = copy.deepcopy(config)
    apps = serve_app_apps(changed)
    if not apps:
        raise ConfigError(f"{source} has no serve_app application (import_path serve_app...) whose model --model could set")
    for app in apps:
        app["args"] = {**(app.get("args") or {}), "model": model}
    return changed


def config_text_with_model(text: str, model: str, source: str = "the config") -> str:
    """The YAML of a Serve config with its serve_app applications' model replaced (comments
    are not kept: the text is a temporary copy for `serve run`)."""
    config = yaml.safe_load(text)
    if not isinstance(config, dict) or not config.get("applications"):
        raise ConfigError(f"{source} is not a Ray Serve config: it needs an 'applications' list")
    return yaml.safe_dump(with_model(config, model, source), sort_keys=False)


class MissingModel(ConfigError):
    """The config (or --model) names a model the store has not got, and it is not the default
    one, which `serve-app run` would train."""


def missing_model_message(store: ModelStore, name: str) -> str:
    names = store.names()
    have = f"it has: {', '.join(names)}" if names else "it has no models yet"
    return (
        f"the model store {store.root} has no model {name!r} ({have}). Serve one of those "
        f"(serve-app run --model NAME), or add {name!r} to the store: train the built-in example with "
        f"`serve-app train --store {store.root} --dataset churn --name {name}`, or publish a model you "
        f"trained with `serve-app models import MODEL_FILE --name {name} --sample TRAIN.csv --store {store.root}`"
    )


def ensure_models(config: dict[str, Any], log: Any = print) -> None:
    """Trains the default model into a store that lacks it; refuses a store path that does
    not exist, unless it is ./models (the project's own, which a fresh clone has not got):
    anywhere else a missing directory is a typo, and training into it would serve iris in
    place of the model the config meant. Any other missing model is refused (`MissingModel`):
    training iris under its name would serve the wrong model."""
    from serve_app.model.training import DEFAULT_MODEL_NAME, train

    for args in serve_app_args(config):
        settings = settings_from_args(args)
        store = ModelStore(settings.store)
        if not store.root.is_dir() and store.root != Path(DEFAULT_STORE).resolve():
            raise ConfigError(
                f"the model store {store.root} does not exist; set args.store to the directory that holds "
                f"your models, or train one into it: serve-app train --store {store.root} --name {settings.model}"
            )
        if not store.versions(settings.model):
            if settings.model != DEFAULT_MODEL_NAME:
                raise MissingModel(missing_model_message(store, settings.model))
            log(f"serve-app: the store {store.root} has no model {settings.model!r}; training the default one")
            manifest = train(store, name=settings.model)
            log(f"serve-app: stored {manifest.name} v{manifest.version} (accuracy {manifest.metrics})")


def busy_port_message(port: int, config_path: Path) -> str:
    holders = processes.listeners(port)
    who = "; ".join(f"pid {pid}: {command[:120]}" for pid, command in holders) if holders else ""
    return (
        f"port {port} (http_options.port in {config_path}) is already in use"
        + (f" by {who}" if who else f" by another program (`ss -ltnp 'sport = :{port}'` shows which)")
        + f"; stop it, or set another http_options.port in {config_path}"
    )


def wait_until_serving(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 180.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return True
        except Exception:
            pass
        time.sleep(0.5)
    return False


class Watch:
    """The run's applications as the Ray dashboard reports them (control.failure/progress/unhealthy).

    While they deploy, a status line each time it changes. (Not one line rewritten in place
    on a terminal: Ray's own log lines, which the child writes to the same terminal, would
    land in the middle of it.)"""

    def __init__(self, apps: list[str], dashboard: str) -> None:
        self.apps = apps
        self.dashboard = dashboard
        self.started = time.monotonic()
        self.shown = ""
        self.retrying: set[tuple[str, str]] = set()  # (app, reason) already said
        self.unhealthy: dict[tuple[str, str], str] = {}
        self.running_pids: set[int] = set()
        self.gone: set[int] = set()  # replicas that were RUNNING and whose process ended

    def _details(self) -> dict[str, Any] | None:
        if os.environ.get("RAY_AUTH_MODE", "token") == "token" and not processes.ray_token_available():
            return None  # a first run: the new cluster has not written its token yet
        if "RAY_AUTH_MODE" not in os.environ:
            # Ray turned token auth on for the cluster it started, and wrote the token just
            # now: this process must send it too (cli.main could not, it had no token yet).
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        try:
            return control.details(self.dashboard)
        except Exception:  # the dashboard is not up yet (or Ray is stopping)
            return None

    def deploying(self) -> control.Failure | None:
        """One look while the apps deploy: shows progress, returns a failure that is final."""
        details = self._details()
        if details is None:
            self.show("starting Ray")
            return None
        lines = []
        for name in self.apps:
            app = (details.get("applications") or {}).get(name)
            problem = control.failure(name, app) if app else None
            if problem is not None and problem.final:
                return problem
            if problem is not None and (name, problem.reason) not in self.retrying:
                self.retrying.add((name, problem.reason))
                self.say(f"serve-app: {problem.summary.replace('cannot start', 'is not starting yet')} "
                         f"(Ray retries it): {problem.reason}")
            lines.append(f"{name} {control.progress(app)}")
        self.show("; ".join(lines))
        return None

    def serving(self) -> None:
        """One look while serving: says when a deployment turns UNHEALTHY, and when it recovers."""
        details = self._details()
        if details is None:
            return
        now: dict[tuple[str, str], str] = {}
        running: set[int] = set()
        for name in self.apps:
            app = (details.get("applications") or {}).get(name) or {}
            for deployment, message in control.unhealthy(app).items():
                now[(name, deployment)] = message
            for deployment in (app.get("deployments") or {}).values():
                running |= {r["pid"] for r in deployment.get("replicas") or [] if r.get("state") == "RUNNING" and r.get("pid")}
        # A killed replica can still be listed RUNNING when Ray already calls the deployment
        # UNHEALTHY, so every pid seen is checked, not only those that left the list.
        # (The run's Ray is local: each replica's pid is a process on this machine.)
        self.gone |= {pid for pid in self.running_pids | running if not _pid_alive(pid)}
        self.running_pids = running
        for key, message in now.items():
            if self.unhealthy.get(key) != message:
                gone = f" (replica process {', '.join(map(str, sorted(self.gone)))} ended)" if self.gone else ""
                self.say(f"serve-app: warning: {key[0]}/{key[1]} is UNHEALTHY{gone}: {message}", sys.stderr)
        for key in self.unhealthy.keys() - now.keys():
            self.say(f"serve-app: {key[0]}/{key[1]} is healthy again")
        self.unhealthy = now
        if not now:
            self.gone = set()

    def show(self, status: str) -> None:
        if status != self.shown:
            self.shown = status
            self.say(f"serve-app: [{time.monotonic() - self.started:3.0f}s] {status}")

    def say(self, line: str, stream: Any = sys.stdout) -> None:
        print(line, file=stream, flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def print_failure(problem: control.Failure, config_path: Path, config: dict[str, Any]) -> None:
    lines = [f"serve-app: error: {problem.summary}:"]
    lines += [f"serve-app:   {line}" for line in problem.reason.splitlines()]
    if problem.hint:
        hint = problem.hint.replace("the config", str(config_path))
        app: dict[str, Any] = next((a for a in config["applications"] if a.get("name", "default") == problem.app), {})
        if str(app.get("import_path", "")).startswith("serve_app."):
            hint = hint.replace("STORE", settings_from_args(app.get("args")).store)
        lines.append(f"serve-app: what to change: {hint}")
    lines.append(f"serve-app: Ray's own logs, tracebacks included: {ray_logs_dir()}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def ray_logs_dir() -> str:
    from ray._common.utils import get_default_ray_temp_dir

    return str(Path(get_default_ray_temp_dir()) / "session_latest" / "logs")


def choose_dashboard_port(wanted: int | None) -> int:
    if wanted is not None:
        if not processes.port_is_free(wanted):
            raise ConfigError(f"--dashboard-port {wanted} is already in use; pick a free one")
        return wanted
    for port in range(DASHBOARD_PORT, DASHBOARD_PORT + 50):  # as Ray itself does for its default
        if processes.port_is_free(port):
            return port
    return processes.free_port()


def run(config_path: Path, *, fast_path: bool = True, dashboard_port: int | None = None, model: str | None = None) -> int:
    """`serve run CONFIG` in the foreground; `model`: serve that stored model in place of
    the config's (`args.model` of its serve_app applications), from a copy of the config."""
    config = read_config(config_path)
    if model is not None:
        config = with_model(config, model, str(config_path))
    control.check_config(config, str(config_path))
    http = config.get("http_options") or {}
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    if not processes.port_is_free(port, host if host not in ("0.0.0.0", "::") else "127.0.0.1"):
        print(f"serve-app: error: {busy_port_message(port, config_path)}", file=sys.stderr)
        return 1
    try:
        ensure_models(config)
    except MissingModel as exc:
        print(f"serve-app: error: {exc}", file=sys.stderr)
        return 1
    dashboard_port = choose_dashboard_port(dashboard_port)
    dashboard = f"http://127.0.0.1:{dashboard_port}"

    env = dict(os.environ)
    # HAProxy refuses a socket path over 97 bytes, and Ray adds a 56-character folder.
    state_dir = Path(tempfile.mkdtemp(prefix="sa-", dir="/tmp"))
    serve_config = config_path
    if model is not None:  # serve run reads a file: a copy with the model replaced, gone with the run
        serve_config = state_dir / config_path.name
        serve_config.write_text(yaml.safe_dump(config, sort_keys=False))
    if fast_path:
        env.update(processes.FAST_PATH_ENV)
        env.update(processes.haproxy_env(state_dir))
    command = [sys.executable, "-m", "serve_app.ops.launcher", "--dashboard-port", str(dashboard_port), str(serve_config)]
    print(f"serve-app: serve run {config_path}" + (f" with model {model!r}" if model is not None else "")
          + f" on a new local Ray, dashboard {dashboard}"
          + (" (HAProxy ingress, throughput-optimized)" if fast_path else ""), flush=True)
    # Own session: the terminal's Ctrl-C reaches only us, and we pass it on once. The child
    # gets the default SIGINT action back even if we were started with it ignored.
    proc = subprocess.Popen(
        command, env=env, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    stopping = {"signal": 0}

    def request_stop(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    seen: set[processes.Process] = set()
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    watch = Watch([str(app.get("name", "default")) for app in config["applications"]], dashboard)
    failed: control.Failure | None = None
    announced = died_early = False
    try:
        next_look = 0.0
        while proc.poll() is None and not stopping["signal"]:
            seen |= processes.descendants(proc.pid)
            if not announced and wait_until_serving(url, proc, timeout_s=0.1):
                announced = True
                watch.say(f"serve-app: serving on http://{host}:{port} (POST /predict); Ctrl-C stops it")
            elif time.monotonic() >= next_look and not announced:
                failed = watch.deploying()
                if failed is not None:
                    break
                next_look = time.monotonic() + 1.0
            elif time.monotonic() >= next_look:
                watch.serving()
                next_look = time.monotonic() + WATCH_INTERVAL_S
            time.sleep(0.5)
        seen |= processes.descendants(proc.pid) | set(processes.with_arguments("haproxy", str(state_dir)))
        if failed is not None:
            print_failure(failed, config_path, config)
            print("serve-app: stopping what this run started", flush=True)
            _stop(proc, signal.SIGINT, FAILED_STOP_TIMEOUT_S)
        elif proc.poll() is None:
            print("serve-app: stopping: draining requests, then shutting Ray down", flush=True)
            _stop(proc, signal.SIGINT, DRAIN_TIMEOUT_S)
        elif not announced and not stopping["signal"]:
            died_early = True
            print(f"serve-app: error: serve run exited with code {proc.returncode} before the application "
                  "served; its output above says why", file=sys.stderr, flush=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        seen |= set(processes.with_arguments("haproxy", str(state_dir)))  # HAProxy, if it left the tree
        leftovers = processes.end(seen)
        if leftovers:
            print(f"serve-app: ended {len(leftovers)} leftover process(es) of this run: {sorted(leftovers)}", flush=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    free = processes.port_is_free(port)
    if died_early and not free:  # taken by another program after the check, before HAProxy bound it
        print(f"serve-app: error: {busy_port_message(port, config_path)}", file=sys.stderr, flush=True)
    print(f"serve-app: stopped; port {port} is {'free' if free else 'STILL IN USE'}", flush=True)
    if failed is not None:
        return 1
    if stopping["signal"]:
        return 0 if free else 1
    if not announced:
        return proc.returncode or 1
    return proc.returncode or 0


def _stop(proc: subprocess.Popen[bytes], signum: int, timeout_s: float) -> None:
    proc.send_signal(signum)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_run(config_path: str, dashboard_port: int) -> int:
    """The child: Ray's own `serve run CONFIG`, on a new local Ray whose dashboard (and so
    its REST API, which the launcher watches) listens on `dashboard_port`. `serve run
    --address local` would pick the port itself and not say where."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.scripts import cli

    # log_to_driver=False: the controller and replicas keep their logs (a failing replica's
    # traceback included) in Ray's log files; the launcher prints serve_app's reason itself
    # and says where those files are, instead of a traceback scrolling past in the terminal.
    ray.init(address="local", namespace=SERVE_NAMESPACE, include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=dashboard_port, log_to_driver=False)
    # `serve run` uses the Ray this process started (it calls ray.init only when none is),
    # and exits the process itself, as the `serve` command does.
    cli(args=["run", config_path], prog_name="serve")
    return 0


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.ops.launcher", description=serve_run.__doc__)
    parser.add_argument("--dashboard-port", type=int, required=True)
    parser.add_argument("config")
    args = parser.parse_args(argv)
    return serve_run(args.config, args.dashboard_port)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
