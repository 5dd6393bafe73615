"""The README's `make bench`, as a quick run: the table and plot are produced, every request succeeds.

It starts its own Ray (`ray start` on free ports) in a child process, apart from the test
session's, and checks that run ended everything it started. No timing is asserted: the
figures of a CI machine say nothing, the benchmark's job is to produce them.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from serve_app.ops.loadgen import wrk_path

from .conftest import env_for_own_ray, run_bounded
from .readme import command_starting, record

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.ray
@pytest.mark.scenario
def test_make_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = env_for_own_ray()
    command = command_starting("make bench")
    done = run_bounded(
        # -o: the checkout's venv is installed already; BENCH_ARGS: a quick run, into tmp_path.
        ["make", "-o", ".venv/.installed", "bench", f"BENCH_ARGS=--quick --duration 1 --soak 3 --out {out}"],
        cwd=REPO, env=env, timeout_s=600,
    )
    record(command)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stopping Ray and HAProxy" in done.stdout

    report = json.loads((out / "results.json").read_text())
    rows = {(r["server"], r["workload"]): r for r in report["results"]}
    expected = {
        ("flask", "row1_c1"), ("flask", "row1_c32"), ("flask", "row1_c128"),
        ("starlette", "row1_c1"), ("starlette", "row1_c32"), ("starlette", "row1_c128"), ("starlette", "rows256_c8"),
        ("serve_app", "row1_c1"), ("serve_app", "row1_c32"), ("serve_app", "row1_c128"), ("serve_app", "rows256_c8"),
        ("serve_app", "v2bin4096_c8"),
        ("serve_app", "handle1_c1"), ("serve_app", "handle1_c32"), ("serve_app", "handle256_c8"),
    }
    assert expected <= set(rows), sorted(expected - set(rows))
    for key, row in rows.items():
        assert row["requests"] > 0, key
        assert row["errors"] == row["non_2xx"] == 0, (key, row)
        if key[0] == "serve_app":  # a baseline may answer a request after wrk's 5 s timeout
            assert row["timeouts"] == 0, (key, row)
    assert rows[("serve_app", "row1_c32")]["x_starlette_req_s"] > 0  # ratios are computed, whatever they are
    assert report["generator"].startswith("wrk" if wrk_path() else "python")
    assert report["memory"]["idle"]["rss_mib"] > 0 and report["memory"]["idle"]["haproxy_processes"] >= 1
    assert {g["goal"][:8] for g in report["goals"]} >= {"1 row, c", "256-row ", "V2 binar"}
    soak = report["soak"]  # paced to ~70% of the c=32 figure measured just before
    assert soak["failed"] == 0 and soak["pause_ms"] >= 1 and soak["windows"], soak
    assert soak["req_s"] < soak["peak_req_s"], soak

    table = (out / "results.md").read_text()
    assert "| serve_app | 1 row, c=32 |" in table and "x Starlette req/s" in table
    assert "Soak: 3 s at c=32" in table and "paced by" in table
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # Everything the bench started for serve_app (Ray's tree, HAProxy) is gone, and its port free.
    from serve_app.ops.processes import alive, port_is_free

    started = [tuple(p) for p in report["deployment_processes"]]
    assert started and not [p for p in started if alive(p)]  # type: ignore[arg-type]
    assert port_is_free(report["serve_app_port"])


class _TinyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.server.arrivals.setdefault(self.client_address, []).append(time.monotonic())  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers["content-length"]))
        status = 200 if body == b'{"x": 1}' else 400
        self.send_response(status)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


class _TinyServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _TinyHandler)
        self.arrivals: dict[tuple[str, int], list[float]] = {}  # per client connection
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"
        _RUNNING[self.url] = self


_RUNNING: dict[str, _TinyServer] = {}


def _server_of(url: str) -> _TinyServer:
    return _RUNNING[url]


@pytest.fixture
def tiny_server() -> Iterator[str]:
    """An HTTP server answering 200 to the body {"x": 1} and 400 to anything else."""
    server = _TinyServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        _RUNNING.pop(server.url)
        server.shutdown()
        server.server_close()


def test_python_load_generator_counts_every_answer(tiny_server: str) -> None:
    """The fallback used when wrk is missing: against a tiny server, every answer is counted."""
    from serve_app.ops.loadgen import run_load

    good = run_load(tiny_server, b'{"x": 1}', {"content-type": "application/json"}, connections=2, duration_s=1, generator="python")
    bad = run_load(tiny_server, b'{"x": 2}', {"content-type": "application/json"}, connections=2, duration_s=1, generator="python")
    assert good.generator == "python" and good.requests > 0 and good.failed == 0
    assert bad.requests > 0 and bad.non_2xx == bad.requests


def _gaps_ms(arrivals: dict[tuple[str, int], list[float]]) -> list[float]:
    """Time between consecutive requests on the same connection, over all connections."""
    return [1000 * (b - a) for times in arrivals.values() for a, b in zip(times, times[1:])]


@pytest.mark.parametrize("generator", ["python", pytest.param("wrk", marks=pytest.mark.scenario)])
def test_paced_load_waits_its_pause_between_requests(tiny_server: str, generator: str) -> None:
    """The soak's pacing, seen by the server: on each connection, a paced load leaves at
    least its pause between one request and the next; the same load unpaced does not."""
    from serve_app.ops.loadgen import run_load, wrk_path

    assert generator == "python" or wrk_path(), "wrk is not installed: `make test-scenarios` installs it"
    body, headers = b'{"x": 1}', {"content-type": "application/json"}
    server = _server_of(tiny_server)
    paced = run_load(tiny_server, body, headers, connections=2, duration_s=1, generator=generator, pause_ms=100)
    paced_gaps, server.arrivals = _gaps_ms(server.arrivals), {}
    flat = run_load(tiny_server, body, headers, connections=2, duration_s=1, generator=generator)
    flat_gaps = _gaps_ms(server.arrivals)
    assert paced.failed == 0 and flat.failed == 0 and paced.requests > 0
    assert paced_gaps and min(paced_gaps) >= 95, sorted(paced_gaps)[:5]  # the 100 ms pause (timers tick in ms)
    assert flat_gaps and min(flat_gaps) < 95, sorted(flat_gaps)[:5]
    assert paced.requests <= 2 * 10 + 2, paced  # 2 connections x 1 s x 10 a second, +1 each in flight


def test_soak_pause_offers_the_asked_share_of_the_peak() -> None:
    from serve_app.ops.bench import soak_pause_ms

    # 32 connections, 70% of 1,400 req/s = 980 req/s: a 32.65 ms cycle, of which 1.5 ms is the request.
    assert soak_pause_ms(32, 980.0, 1.5) == 31
    assert soak_pause_ms(32, 1e9, 1.5) == 1  # never 0: 0 would mean "not paced" to wrk


def test_bench_outside_a_checkout_says_it_needs_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default config is the checkout's: without it the bench stops before starting anything."""
    from serve_app.ops.cli import main

    assert main(["bench", "--config", str(tmp_path / "local.yaml"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "no such file" in error and "checkout" in error and "--config PATH" in error
    assert not (tmp_path / "out").exists()


def test_the_baselines_ship_in_the_package() -> None:
    import importlib.util

    from serve_app.ops.bench import BASELINES, SERVERS

    for name in SERVERS[:2]:
        assert importlib.util.find_spec(f"{BASELINES}.{name}_app") is not None, name
