"""A private local Ray serving a Serve config, for the tools that measure it (bench, tune,
benchmarks/rollout_under_load.py).

`ray start --head --block` on free ports, with the fast path of `make run` (HAProxy
ingress, throughput mode), the config's port and store replaced; everything it starts,
HAProxy included, is ended by pid. Child processes (Ray's workers, the bench's baselines)
import the same serve_app as this process: see `share_package_path`.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import serve_app
from serve_app.ops import control, processes
from serve_app.ops.progress import Progress

APP_NAME = control.APP_NAME
MODEL_NAME = "iris"  # trained into the run's own store and served from it
START_TIMEOUT_S = 300.0  # Ray starts slowly on a busy small machine (docs/performance-notes.md)
# The folder that holds the serve_app package: a checkout's root, or site-packages.
PACKAGE_PARENT = Path(serve_app.__file__).resolve().parents[1]


def share_package_path() -> None:
    """Every process started from here on (Ray's workers, the baselines) imports this same
    serve_app, be it a checkout's or an installed wheel's: its folder goes first on PYTHONPATH."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))


def require_config(path: Path, flag: str = "--config") -> None:
    """Refuses at once a Serve config that is not there: the default (configs/local.yaml)
    is the project's checkout's, which an installed wheel does not carry."""
    if not path.is_file():
        raise ValueError(
            f"{flag} {path}: no such file. The tool serves a Ray Serve config, by default the project's "
            f"configs/local.yaml: run it from the root of a checkout of the project, or give {flag} PATH "
            "to a config of your own"
        )


class RayStartFailed(RuntimeError):
    pass


class RayDeployment:
    """A private Ray (`ray start --head --block` on free ports) serving the project's config."""

    def __init__(self, config_path: Path, store_root: Path, work_dir: Path, log: Progress) -> None:
        self.log = log
        self.work_dir = work_dir
        self.state_dir = Path(tempfile.mkdtemp(prefix="sab-", dir="/tmp"))  # HAProxy: short socket path
        self.http_port = processes.free_port()
        self.gcs_port = processes.free_port()
        self.dashboard = f"http://127.0.0.1:{processes.free_port()}"
        self.config = self._config(config_path, store_root)
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: set[processes.Process] = set()
        self.base_url = f"http://127.0.0.1:{self.http_port}"

    def _config(self, config_path: Path, store_root: Path) -> dict[str, Any]:
        config = copy.deepcopy(control.load_config(config_path))
        config["http_options"] = {**(config.get("http_options") or {}), "host": "127.0.0.1", "port": self.http_port}
        app = control.find_app(config, APP_NAME)
        app["args"] = {**(app.get("args") or {}), "store": str(store_root), "model": MODEL_NAME}
        monitoring = app["args"].get("monitoring")
        if isinstance(monitoring, dict) and monitoring.get("log_dir"):
            # The prediction log stays on (it is part of what is measured) but not in the repo.
            app["args"]["monitoring"] = {**monitoring, "log_dir": str(self.work_dir / "predictions")}
        control.check_config(config, str(config_path))  # before Ray starts: a typo is said at once
        return config

    def environment(self) -> dict[str, str]:
        env = dict(processes.FAST_PATH_ENV)
        env.update(processes.haproxy_env(
            self.state_dir, stats_port=processes.free_port(), metrics_port=processes.free_port()
        ))
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Serve's fallback proxy otherwise binds fixed ports that another cluster may hold.
        env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] = str(processes.free_port())
        env["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"] = str(processes.free_port())
        # `ray start` turns token auth on when a token file exists and a driver attaching by
        # address would then need it too; this private cluster lives only for the bench.
        env.setdefault("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
        return env

    def start(self, attempts: int = 3) -> None:
        """Ray waits only 30 s for its raylet, which a busy 2-core machine can miss: retry."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start()
            except RayStartFailed as exc:
                self.log(f"  ray start failed (attempt {attempt} of {attempts}): {str(exc).splitlines()[-1]}")
                self._end_processes()
                if attempt == attempts:
                    raise
                self.gcs_port = processes.free_port()
                self.dashboard = f"http://127.0.0.1:{processes.free_port()}"

    def _start(self) -> None:
        # The driver (this process) reads the throughput-optimized switch when ray.serve is
        # imported, and the Ray processes inherit it from `ray start`: set both first.
        os.environ.update(self.environment())
        ray_cli = Path(sys.executable).with_name("ray")
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": int(self.dashboard.rsplit(":", 1)[1]),
            "--ray-client-server-port": processes.free_port(),
            "--dashboard-agent-listen-port": processes.free_port(),
            "--dashboard-agent-grpc-port": processes.free_port(),
            "--runtime-env-agent-port": processes.free_port(),
            "--metrics-export-port": processes.free_port(),
            "--node-manager-port": processes.free_port(),
            "--object-manager-port": processes.free_port(),
        }
        command = [
            str(ray_cli), "start", "--head", "--block", "--disable-usage-stats", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.work_dir / 'ray'}",
            *[f"{flag}={port}" for flag, port in ports.items()],
        ]
        log_path = self.work_dir / "ray-start.log"
        log = open(log_path, "wb")
        self.proc = subprocess.Popen(command, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        # Attach only once `ray start` says the node is up: a driver pointed at a GCS that
        # never comes up waits far longer than the bench should.
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"Ray runtime started" not in log_path.read_bytes():
            self._remember()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-1500:]
                raise RayStartFailed(f"ray start did not come up (exit {self.proc.poll()}); its log ends:\n{tail}")
            time.sleep(0.5)
        import ray

        ray.init(address=f"127.0.0.1:{self.gcs_port}", log_to_driver=False, logging_level=logging.ERROR)

        deadline = time.monotonic() + 120
        while True:  # the dashboard's REST API comes up a little after the GCS
            try:
                control.deploy(self.config, self.dashboard)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        control.wait_until_running(APP_NAME, self.dashboard, timeout_s=START_TIMEOUT_S)
        self._remember()

    def _remember(self) -> None:
        if self.proc is not None:
            self.seen |= processes.descendants(self.proc.pid)
        self.seen |= set(self.haproxy())

    def haproxy(self) -> list[processes.Process]:
        """HAProxy may leave the process tree (it daemonises): found by its own config path."""
        return processes.with_arguments("haproxy", str(self.state_dir))

    def memory(self) -> dict[str, Any]:
        """Resident memory of every process of the deployment (Ray's tree and HAProxy)."""
        self._remember()
        live = [p for p in self.seen if processes.alive(p)]
        rss = pss = 0
        for pid, _ in live:
            rss += processes.memory_kib(pid, "VmRSS")
            pss += processes.memory_kib(pid, "Pss")
        return {"processes": len(live), "rss_mib": rss / 1024, "pss_mib": pss / 1024,
                "haproxy_processes": len(self.haproxy())}

    def stop(self) -> None:
        self._remember()
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:
            pass
        self._end_processes()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _end_processes(self) -> None:
        self._remember()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        processes.end(self.seen, grace_s=10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # Serve reloads HAProxy by starting a new one (-sf): one may appear while Ray stops.
        quiet_scans = 0
        deadline = time.monotonic() + 30
        while quiet_scans < 3 and time.monotonic() < deadline:
            left = self.haproxy()
            quiet_scans = 0 if left else quiet_scans + 1
            processes.end(left, grace_s=5)
            time.sleep(0.5)
        if self.proc is not None and self.proc.poll() is not None:
            self.proc.wait()  # reap it
