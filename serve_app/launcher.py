"""`serve-app run`: `serve run CONFIG` on a fresh local Ray, in the foreground, cleaned up fully.

It trains the default model if the store is empty, turns on Ray Serve's fast path
(HAProxy ingress, throughput-optimized mode), and on Ctrl-C or SIGTERM lets `serve run`
drain and shut Ray down, then ends whatever of its process tree is left (HAProxy above
all), so the port is free for the next run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from serve_app import processes
from serve_app.app import settings_from_args
from serve_app.store import ModelStore

DRAIN_TIMEOUT_S = 60.0


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"cannot read config {path}: {exc}") from None
    if not isinstance(config, dict) or not config.get("applications"):
        raise SystemExit(f"{path} is not a Ray Serve config: it needs an 'applications' list")
    return config


def serve_app_args(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        app.get("args") or {}
        for app in config["applications"]
        if str(app.get("import_path", "")).startswith("serve_app.")
    ]


def ensure_models(config: dict[str, Any], log: Any = print) -> None:
    from serve_app.training import train

    for args in serve_app_args(config):
        settings = settings_from_args(args)
        store = ModelStore(settings.store)
        if not store.versions(settings.model):
            log(f"serve-app: the store {store.root} has no model {settings.model!r}; training the default one")
            manifest = train(store, name=settings.model)
            log(f"serve-app: stored {manifest.name} v{manifest.version} (accuracy {manifest.metrics})")


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


def run(config_path: Path, *, fast_path: bool = True) -> int:
    config = read_config(config_path)
    http = config.get("http_options") or {}
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    if not processes.port_is_free(port, host if host not in ("0.0.0.0", "::") else "127.0.0.1"):
        print(f"serve-app: port {port} is already in use; stop whatever holds it (ss -ltnp 'sport = :{port}')", file=sys.stderr)
        return 1
    ensure_models(config)

    env = dict(os.environ)
    # HAProxy refuses a socket path over 97 bytes, and Ray adds a 56-character folder.
    state_dir = Path(tempfile.mkdtemp(prefix="sa-", dir="/tmp"))
    if fast_path:
        env.update(processes.FAST_PATH_ENV)
        env.update(processes.haproxy_env(state_dir))
    serve_cli = Path(sys.executable).with_name("serve")
    command = [str(serve_cli), "run", "--address", "local", str(config_path)]
    print(f"serve-app: {' '.join(command)}" + (" (HAProxy ingress, throughput-optimized)" if fast_path else ""), flush=True)
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
    try:
        announced = False
        while proc.poll() is None and not stopping["signal"]:
            seen |= processes.descendants(proc.pid)
            if not announced and wait_until_serving(url, proc, timeout_s=1.0):
                announced = True
                print(f"serve-app: serving on http://{host}:{port} (POST /predict); Ctrl-C stops it", flush=True)
            time.sleep(0.5)
        seen |= processes.descendants(proc.pid)
        if proc.poll() is None:
            print("serve-app: stopping: draining requests, then shutting Ray down", flush=True)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(DRAIN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        leftovers = processes.end(seen)
        if leftovers:
            print(f"serve-app: ended {len(leftovers)} leftover process(es) of this run: {sorted(leftovers)}", flush=True)
    free = processes.port_is_free(port)
    print(f"serve-app: stopped; port {port} is {'free' if free else 'STILL IN USE'}", flush=True)
    if stopping["signal"]:
        return 0 if free else 1
    return proc.returncode or 0
