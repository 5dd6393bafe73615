"""Ending exactly the processes we started: Ray and the HAProxy it spawns.

`ray stop --force` and a killed `serve run` can leave HAProxy holding port 8000, and it is
not a child of anything we can wait on. So whoever starts Ray records the whole process
tree under it (by pid and start time, so a reused pid is never hit) and ends what is left.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from pathlib import Path
from typing import Iterable, Mapping

Process = tuple[int, int]  # (pid, start time in clock ticks): unique for the machine's uptime

# Environment for Ray Serve's fast path (see README "Environment variables").
FAST_PATH_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # With HAProxy, each stopping replica stays reachable this long before it drains, so an
    # external load balancer can deregister it. Ray's own HAProxy is reconfigured within
    # about a second, so a few seconds is enough; Ray's default of 30 s made every replica
    # stop slow (docs/performance-notes.md). Raise it if an external load balancer points
    # at replicas.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    # Ray's HAProxy writes one log line per request that its manager actor parses into
    # request metrics, a large share of a core on a small machine (docs/performance-notes.md).
    # The replicas record the same ray_serve_http_* request metrics themselves; what is lost
    # is HAProxy's own view (requests it answered without a replica). Set it to 1 to keep that.
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
}


def ray_token_auth_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`RAY_AUTH_MODE=token` when a Ray token is at hand and the mode is not chosen yet.

    Ray 2.60 turns token auth on for every local cluster it starts (`make run`'s included)
    and writes the token to ~/.ray/auth_token, but a driver or CLI *attaching* to a running
    cluster sends the token only if RAY_AUTH_MODE=token is set: otherwise the GCS answers
    InvalidAuthToken and the dashboard 401. An explicit RAY_AUTH_MODE is left alone.
    """
    env = os.environ if environ is None else environ
    if "RAY_AUTH_MODE" in env:
        return {}
    return {"RAY_AUTH_MODE": "token"} if ray_token_available(env) else {}


def ray_token_available(environ: Mapping[str, str] | None = None) -> bool:
    """A Ray auth token is at hand: RAY_AUTH_TOKEN, or the file Ray writes (~/.ray/auth_token)."""
    environ = os.environ if environ is None else environ
    token_file = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return bool(environ.get("RAY_AUTH_TOKEN")) or token_file.is_file()


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def identify(pid: int) -> Process | None:
    """(pid, start time) of a live process: the pair names it for the machine's uptime,
    where a pid alone may have been reused. None when there is no such live process."""
    info = _stat(pid)
    return None if info is None else (pid, info[1])


def memory_kib(pid: int, key: str) -> int:
    """A memory figure of a process in KiB: "VmRSS" (from /proc/PID/status) or "Pss" (from
    /proc/PID/smaps_rollup, shared pages shared out); 0 when it cannot be read."""
    source = "smaps_rollup" if key == "Pss" else "status"
    try:
        for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(root: int) -> set[Process]:
    """Every live process below `root` (not `root` itself)."""
    children: dict[int, list[Process]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info is not None:
                children.setdefault(info[0], []).append((int(entry), info[1]))
    found: set[Process] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child[0])
    return found


def alive(process: Process) -> bool:
    info = _stat(process[0])
    return info is not None and info[1] == process[1]


def end(processes: Iterable[Process], grace_s: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL after `grace_s`, each process that is still the one we saw."""
    targets = [p for p in processes if alive(p)]
    for pid, _ in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in targets):
        time.sleep(0.1)
    for process in targets:
        if alive(process):
            try:
                os.kill(process[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
    return [pid for pid, _ in targets]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def listeners(port: int) -> list[tuple[int, str]]:
    """(pid, command line) of each process with a TCP socket listening on `port`, as far
    as /proc shows them (this network namespace; other users' processes may be hidden)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    found: list[tuple[int, str]] = []
    for entry in os.listdir("/proc") if inodes else []:
        if not entry.isdigit():
            continue
        try:
            holds = any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{entry}/fd"))
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if holds:
            found.append((int(entry), command))
    return found


def with_arguments(*markers: str) -> list[Process]:
    """Live processes whose command line contains every one of `markers` (e.g. "haproxy"
    and a run's private folder, which its HAProxy names even once it left the process tree)."""
    found: list[Process] = []
    needles = [marker.encode() for marker in markers]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        info = _stat(int(entry)) if all(needle in command for needle in needles) else None
        if info is not None:
            found.append((int(entry), info[1]))
    return found


# Ports are handed out below the kernel's ephemeral range (where the OS picks the local port
# of every outgoing connection and of Ray's own port-0 listeners) and above Ray's worker ports
# (10002-19999): a port found free there stays free until its user binds it. Port 0 would
# give one from the ephemeral range, which another process could take in the meantime.
_RAY_WORKER_PORTS_END = 20000
_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port no process listens on, on any address, outside the ephemeral range."""
    end = _ephemeral_start()
    if end - _RAY_WORKER_PORTS_END >= 1000:
        for _ in range(200):
            port = random.randrange(_RAY_WORKER_PORTS_END, end)
            if port not in _handed_out and port_is_free(port, "0.0.0.0"):
                _handed_out.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def haproxy_env(
    state_dir: Path,
    *,
    stats_port: int | None = None,
    metrics_port: int | None = None,
    fallback_proxy_port: int | None = None,
) -> dict[str, str]:
    """Keeps one HAProxy's files (and optionally ports) apart from any other on the machine."""
    state_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state_dir / "server-state"),
    }
    if stats_port is not None:
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(stats_port)
    if metrics_port is not None:
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(metrics_port)
    if fallback_proxy_port is not None:
        # HAProxy's backup server is Ray's proxy on this port (default 8500 for every run).
        env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] = str(fallback_proxy_port)
        env["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"] = str(free_port())
    return env
