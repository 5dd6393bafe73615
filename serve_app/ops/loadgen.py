"""Driving an HTTP server with one fixed POST body: `wrk` when installed, else a Python fallback.

Both return the same `LoadResult`. wrk (C, epoll) barely loads a core, so it measures the
server; the fallback (`python -m serve_app.ops.loadgen`) is an asyncio keep-alive client that
saturates a core by itself around a few thousand req/s: its figures say "the server works",
not "the server is this fast", and the bench table says which generator produced them.

Both run as a child process so the client's CPU time is measured on its own (`os.wait4`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# wrk runs this in each thread's Lua state; `done` runs once, after the run, with the totals.
WRK_SCRIPT = r"""
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
local extra = os.getenv("BENCH_HEADER_NAME")
if extra ~= nil and extra ~= "" then
  wrk.headers[extra] = os.getenv("BENCH_HEADER_VALUE")
end

function done(summary, latency, requests)
  local e = summary.errors
  local out = assert(io.open(os.getenv("BENCH_OUT"), "w"))
  out:write(string.format(
    '{"requests": %d, "duration_s": %.6f, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "non_2xx": %d, "timeouts": %d, ' ..
    '"p50_ms": %.4f, "p90_ms": %.4f, "p99_ms": %.4f, "max_ms": %.4f, "mean_ms": %.4f}',
    summary.requests, summary.duration / 1e6, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, latency.mean / 1e3))
  out:close()
end
"""

# Appended when a rate is asked for: each connection pauses this long between an answer and
# its next request (wrk's `delay` hook counts whole milliseconds).
WRK_PACING = r"""
local pause_ms = tonumber(os.getenv("BENCH_DELAY_MS"))
function delay()
  return pause_ms
end
"""


@dataclass
class LoadResult:
    requests: int
    duration_s: float
    connect_errors: int
    read_errors: int
    write_errors: int
    non_2xx: int
    timeouts: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    client_cpu_s: float = 0.0
    generator: str = "wrk"

    @property
    def errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors

    @property
    def failed(self) -> int:
        return self.errors + self.non_2xx + self.timeouts

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def client_cpu_pct(self) -> float:
        return 100.0 * self.client_cpu_s / self.duration_s if self.duration_s else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_load(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    connections: int,
    duration_s: float,
    generator: str = "auto",
    timeout_s: float = 5.0,
    pause_ms: int = 0,
) -> LoadResult:
    """POSTs `body` to `url` from `connections` keep-alive connections for `duration_s`.

    `pause_ms` > 0 paces the load: each connection waits that long after an answer before
    sending again, so `connections` x 1000 / (pause_ms + latency) requests a second at most.
    """
    if generator == "auto":
        generator = "wrk" if wrk_path() else "python"
    extra = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    if len(extra) > 1:
        raise ValueError("at most one header besides Content-Type")
    with tempfile.TemporaryDirectory(prefix="sa-load-") as tmp:
        body_file, out_file = Path(tmp) / "body", Path(tmp) / "out.json"
        body_file.write_bytes(body)
        env = dict(os.environ)
        env.update({
            "BENCH_BODY": str(body_file),
            "BENCH_OUT": str(out_file),
            "BENCH_CONTENT_TYPE": headers.get("content-type", "application/json"),
            "BENCH_HEADER_NAME": next(iter(extra), ""),
            "BENCH_HEADER_VALUE": next(iter(extra.values()), ""),
            "BENCH_DELAY_MS": str(int(pause_ms)),
        })
        seconds = max(1, round(duration_s))
        if generator == "wrk":
            script = Path(tmp) / "post.lua"
            script.write_text(WRK_SCRIPT + (WRK_PACING if pause_ms > 0 else ""))
            threads = min(2, connections)
            command = [
                wrk_path() or "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
                f"--timeout={timeout_s:g}s", "-s", str(script), url,
            ]
        else:
            command = [
                sys.executable, "-m", "serve_app.ops.loadgen", url, "-c", str(connections),
                "-d", str(seconds), "--timeout", str(timeout_s),
            ]
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
        proc.stdout.close(), proc.stderr.close()  # type: ignore[union-attr]
        if proc.returncode != 0 or not out_file.exists():
            raise RuntimeError(
                f"{generator} failed ({proc.returncode}): {stderr.decode(errors='replace')[-800:]}"
                f"{stdout.decode(errors='replace')[-400:]}"
            )
        raw = json.loads(out_file.read_text())
    return LoadResult(**raw, client_cpu_s=usage.ru_utime + usage.ru_stime, generator=generator)


# ---- the Python fallback (a child process; reads the same BENCH_* environment) --------------


def _request_bytes(url: str, body: bytes) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    lines = [
        f"POST {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1",
        f"Host: {parts.hostname}:{parts.port}",
        f"Content-Type: {os.environ.get('BENCH_CONTENT_TYPE', 'application/json')}",
        f"Content-Length: {len(body)}",
    ]
    if os.environ.get("BENCH_HEADER_NAME"):
        lines.append(f"{os.environ['BENCH_HEADER_NAME']}: {os.environ.get('BENCH_HEADER_VALUE', '')}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return parts.hostname or "127.0.0.1", parts.port or 80, head + body


async def _connection(
    host: str, port: int, request: bytes, deadline: float, timeout_s: float,
    latencies: list[float], counts: dict[str, int], pause_s: float = 0.0,
) -> None:
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            counts["connect_errors"] += 1
            await asyncio.sleep(0.05)
            continue
        assert reader is not None
        start = time.perf_counter()
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
            status = int(head.split(b" ", 2)[1])
            length = 0
            keep_alive = True
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    keep_alive = False
            if length:
                await asyncio.wait_for(reader.readexactly(length), timeout_s)
        except asyncio.TimeoutError:
            counts["timeouts"] += 1
            writer.close()
            writer = None
            continue
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            counts["read_errors"] += 1
            writer.close()
            writer = None
            continue
        latencies.append(time.perf_counter() - start)
        if not 200 <= status < 400:
            counts["non_2xx"] += 1
        if not keep_alive:
            writer.close()
            writer = None
        if pause_s:
            await asyncio.sleep(pause_s)
    if writer is not None:
        writer.close()


async def _drive(
    url: str, body: bytes, connections: int, duration_s: float, timeout_s: float, pause_s: float = 0.0
) -> dict[str, Any]:
    host, port, request = _request_bytes(url, body)
    latencies: list[float] = []
    counts = {"connect_errors": 0, "read_errors": 0, "write_errors": 0, "non_2xx": 0, "timeouts": 0}
    start = time.monotonic()
    deadline = start + duration_s
    await asyncio.gather(*(
        _connection(host, port, request, deadline, timeout_s, latencies, counts, pause_s) for _ in range(connections)
    ))
    elapsed = time.monotonic() - start
    ordered = sorted(latencies) or [0.0]

    def pct(p: float) -> float:
        return 1e3 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {
        "requests": len(latencies), "duration_s": elapsed, **counts,
        "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": 1e3 * ordered[-1],
        "mean_ms": 1e3 * sum(ordered) / len(ordered),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Python fallback load generator (see module doc)")
    parser.add_argument("url")
    parser.add_argument("-c", "--connections", type=int, default=8)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    body = Path(os.environ["BENCH_BODY"]).read_bytes()
    pause_s = int(os.environ.get("BENCH_DELAY_MS") or 0) / 1e3
    result = asyncio.run(_drive(args.url, body, args.connections, args.duration, args.timeout, pause_s))
    Path(os.environ["BENCH_OUT"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
