"""A smoke run of `serve-app bench --quick`: the table and plot are produced, every request succeeds.

It starts its own Ray (`ray start` on free ports) in a child process, apart from the test
session's, and checks that run ended everything it started. No timing is asserted: the
figures of a CI machine say nothing, the benchmark's job is to produce them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.loadgen import wrk_path

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent


def test_bench_quick_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in list(env):  # the session's own Ray and HAProxy settings are not the bench's
        if name.startswith("RAY_SERVE_HAPROXY") or name in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY"):
            env.pop(name)
    done = subprocess.run(
        [sys.executable, "-m", "serve_app", "bench", "--quick", "--duration", "1", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
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

    table = (out / "results.md").read_text()
    assert "| serve_app | 1 row, c=32 |" in table and "x Starlette req/s" in table
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # Everything the bench started for serve_app (Ray's tree, HAProxy) is gone, and its port free.
    from serve_app.processes import alive, port_is_free

    started = [tuple(p) for p in report["deployment_processes"]]
    assert started and not [p for p in started if alive(p)]  # type: ignore[arg-type]
    assert port_is_free(report["serve_app_port"])


def test_python_load_generator_counts_every_answer(tmp_path: Path) -> None:
    """The fallback used when wrk is missing: against a tiny server, every answer is counted."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from serve_app.loadgen import run_load

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["content-length"]))
            status = 200 if body == b'{"x": 1}' else 400
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        good = run_load(url, b'{"x": 1}', {"content-type": "application/json"}, connections=2, duration_s=1, generator="python")
        bad = run_load(url, b'{"x": 2}', {"content-type": "application/json"}, connections=2, duration_s=1, generator="python")
    finally:
        server.shutdown()
        server.server_close()
    assert good.generator == "python" and good.requests > 0 and good.failed == 0
    assert bad.requests > 0 and bad.non_2xx == bad.requests
