"""A real multi-node Ray cluster on one machine: `ray start --head` plus `ray start --address`.

Each node is its own `ray start --block` process (own raylet, own object store, own Serve
proxy and HAProxy), started in its own session with its own free ports, its own temp dir
and its own HAProxy files, so it shares nothing with the pytest session's Ray or with other
Ray instances on the machine. Nothing here calls `ray stop` (it would stop every Ray on the
machine): every process is recorded by pid and start time and ended by pid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.ops import processes

RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    http_port: int
    env: dict[str, str]
    seen: set[processes.Process] = field(default_factory=set)

    def tree(self) -> set[processes.Process]:
        """The node's `ray start` process, if it lives, and every live process below it."""
        itself = processes.identify(self.proc.pid)
        return processes.descendants(self.proc.pid) | ({itself} if itself else set())


class LocalCluster:
    """Head (GCS, dashboard, Serve controller; no CPUs for replicas) and worker nodes."""

    def __init__(self, *, worker_cpus: int = 4, head_cpus: int = 0) -> None:
        # Short: Ray and HAProxy put unix sockets under it (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="samn-", dir="/tmp"))
        self.worker_cpus = worker_cpus
        self.head_cpus = head_cpus
        self.gcs_port = processes.free_port()
        self.dashboard_port = processes.free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.head_http_port = processes.free_port()
        self.nodes: list[Node] = []
        self.retired: list[Node] = []  # nodes that failed to start, ended (their pids kept)
        self._stop = threading.Event()
        # HAProxy and workers outlive their parent once it is killed (reparented to init),
        # so the trees are sampled continuously to know every pid this cluster ever had.
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        # Ray turns token auth on for a new cluster when ~/.ray/auth_token exists (it does the
        # same for the session's ray.init); this process's state/REST clients must then send it.
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)

    # ---- processes -------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(0.3):
            for node in list(self.nodes):
                node.seen |= node.tree()

    def _env(self, name: str, http_port: int) -> dict[str, str]:
        env = _clean_env()
        env.update(processes.FAST_PATH_ENV)
        env.update(
            processes.haproxy_env(
                self.root / f"hap-{name}", stats_port=processes.free_port(), metrics_port=processes.free_port()
            )
        )
        env.update(
            {
                "RAY_USAGE_STATS_ENABLED": "0",
                # As configs/cluster.yaml advises when nothing targets replicas directly.
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
                # Head: http_options.port from the config; workers: their own port, because
                # several proxies share this machine's address (ray/serve/_private/proxy.py).
                "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(http_port),
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(processes.free_port()),
                "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(processes.free_port()),
            }
        )
        return env

    def _start(self, name: str, args: list[str], http_port: int) -> Node:
        env = self._env(name, http_port)
        ports = {
            "--node-manager-port": processes.free_port(),
            "--object-manager-port": processes.free_port(),
            "--dashboard-agent-listen-port": processes.free_port(),
            "--dashboard-agent-grpc-port": processes.free_port(),
            "--metrics-export-port": processes.free_port(),
            "--runtime-env-agent-port": processes.free_port(),
        }
        command = [RAY, "start", "--block", "--disable-usage-stats", "--min-worker-port", "0", "--max-worker-port", "0"]
        command += [item for pair in ports.items() for item in (pair[0], str(pair[1]))]
        command += args
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        node = Node(name, proc, http_port, env)
        self.nodes.append(node)
        return node

    def start(self, workers: int = 2, timeout_s: float = 300.0) -> None:
        self._with_retry(lambda: self._start_head(), 1, timeout_s)
        # One at a time: nodes of one session on one machine pick their socket file names
        # (raylet, plasma_store) by probing the session dir, which races if started together.
        for index in range(workers):
            self._with_retry(lambda: self.add_worker(f"worker{index + 1}"), 2 + index, timeout_s)

    def _with_retry(self, start: Any, count: int, timeout_s: float) -> None:
        for attempt in (1, 2):
            node = start()
            try:
                self.wait_nodes(count, timeout_s)
                return
            except RuntimeError:
                # `ray start` gives a node 30 s (fixed in ray/_private/node.py) to register;
                # a machine busy with other Ray sessions can miss that: end it, try again.
                self.nodes.remove(node)
                node.seen |= node.tree()
                processes.end(node.seen)
                self.retired.append(node)
                if attempt == 2:
                    raise

    def _start_head(self) -> Node:
        self.gcs_port = processes.free_port()
        self.dashboard_port = processes.free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        return self._start(
            "head",
            [
                "--head", "--port", str(self.gcs_port), "--temp-dir", str(self.root / "ray"),
                "--num-cpus", str(self.head_cpus), "--include-dashboard", "true",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                "--object-store-memory", str(100 * 1024 * 1024),
            ],
            self.head_http_port,
        )

    def add_worker(self, name: str) -> Node:
        return self._start(
            name,
            [
                "--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(self.worker_cpus),
                "--object-store-memory", str(100 * 1024 * 1024),
            ],
            processes.free_port(),
        )

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def kill_node(self, name: str) -> list[int]:
        """Ends a node the hard way: SIGKILL to its raylet, GCS, workers, HAProxy (by pid)."""
        node = self.node(name)
        node.seen |= node.tree()
        targets = {p for p in node.seen if processes.alive(p)}
        return processes.end(targets, grace_s=0.0)

    def stop(self) -> list[int]:
        """Ends every process any node ever had; returns the pids that were still alive."""
        for node in self.nodes:
            node.seen |= node.tree()
        self._stop.set()
        self._watcher.join(timeout=5)
        ended: list[int] = []
        # Workers first, then the head (raylets first would make GCS log node deaths only).
        for node in reversed(self.nodes):
            node.seen |= node.tree()
            ended += processes.end(node.seen, grace_s=5.0)
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        return ended

    def leftovers(self) -> list[int]:
        nodes = self.nodes + self.retired
        return sorted(pid for node in nodes for pid, started in node.seen if processes.alive((pid, started)))

    # ---- state -----------------------------------------------------------------------

    def alive_nodes(self) -> list[dict[str, Any]]:
        from ray.util.state import list_nodes

        return [n.__dict__ if hasattr(n, "__dict__") else dict(n) for n in list_nodes(address=self.dashboard) if _state(n) == "ALIVE"]

    def wait_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"ray start for {node.name} exited: {(self.root / (node.name + '.log')).read_text()[-3000:]}")
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except Exception as exc:  # the dashboard is not up yet
                last = exc
            time.sleep(1)
        tail = (self.root / f"{self.nodes[-1].name}.log").read_text()[-2000:]
        raise TimeoutError(f"{count} nodes not alive after {timeout_s}s ({last!r}); {self.nodes[-1].name}: {tail}")

    def serve(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """The `serve` CLI against this cluster, in a subprocess (never this process's Ray)."""
        env = _clean_env()
        return subprocess.run(
            [SERVE, *args, "--address", self.dashboard], env=env, capture_output=True, text=True, timeout=timeout_s
        )


def _clean_env() -> dict[str, str]:
    """This process's environment without the session Ray's settings (ports, HAProxy files)."""
    keep = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}  # the session's own token (tests/conftest.py)
    return {k: v for k, v in os.environ.items() if k in keep or not k.startswith(("RAY_", "SERVE_APP_"))}


def _state(node: Any) -> str:
    return str(node["state"] if isinstance(node, dict) else node.state)
