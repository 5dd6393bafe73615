"""`serve-app bench` (`make bench`): serve_app against the servers it replaces, in one run.

One run trains a model into a temporary store and serves that same model file from:

- `flask`: the seed's Flask app on Flask's own server (baselines/flask_app.py);
- `starlette`: a hand-written one-worker uvicorn + Starlette app (baselines/starlette_app.py);
- `serve_app`: configs/local.yaml (port and store changed) on a fresh local Ray started by
  `ray start --block` with the fast path of `make run` (HAProxy ingress, throughput mode):
  localray.RayDeployment.

All three run for the whole bench and are measured workload by workload, one server after
the other, so other work on the machine weighs on each alike (an idle Ray costs a few per
cent of a core while the baselines are measured). Same client, same payloads: one row at 1/32/128 connections, 256-row JSON requests, V2
binary 4,096-row requests (serve_app only) and Ray handle calls from a driver attached to
the bench's Ray. The table (Markdown and JSON) and a PNG plot go to `--out`. Everything
the bench starts is ended by pid, HAProxy included, and every port is a free one.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import orjson

from serve_app.client import v2
from serve_app.ops import processes
from serve_app.ops.loadgen import LoadResult, run_load, wrk_path
from serve_app.ops.localray import APP_NAME, MODEL_NAME, RayDeployment, require_config, share_package_path
from serve_app.ops.progress import Progress, describe_machine
from serve_app.protocol import oip_v2

SERVERS = ("flask", "starlette", "serve_app")
BASELINES = "serve_app.ops.baselines"
# What each baseline runs on: test dependencies (`pip install 'serve_app[test]'`).
BASELINE_NEEDS = {"flask": "flask", "starlette": "uvicorn"}


# ---- workloads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    path: str
    body: bytes
    headers: dict[str, str]
    rows: int
    connections: int
    servers: tuple[str, ...]
    check: Callable[[bytes, dict[str, str]], None] = field(compare=False)


def _rows(n: int) -> np.ndarray:
    from sklearn.datasets import load_iris

    data = load_iris().data
    return np.ascontiguousarray(np.resize(data, (n, data.shape[1])), dtype=np.float64)


def workloads(expected: Callable[[np.ndarray], np.ndarray]) -> list[Workload]:
    """The payloads, each with a check of its answer against the model's own `predict`."""
    one = _rows(1)
    many = _rows(256)
    big = _rows(4096)

    def predict_check(rows: np.ndarray) -> Callable[[bytes, dict[str, str]], None]:
        want = expected(rows).tolist()

        def check(body: bytes, headers: dict[str, str]) -> None:
            answer = orjson.loads(body)
            got = [answer["prediction"]] if len(rows) == 1 else answer["predictions"]
            if got != want:
                raise AssertionError(f"wrong predictions: {str(got)[:80]} != {str(want)[:80]}")

        return check

    def v2_check(body: bytes, headers: dict[str, str]) -> None:
        got = v2.decode_response(body, headers.get(oip_v2.BINARY_HEADER))["predict"]
        if not np.array_equal(got, expected(big)):
            raise AssertionError("wrong V2 predictions")

    single = orjson.dumps({"features": one[0].tolist()})
    batch = orjson.dumps({"features": many.tolist()})
    v2_body, v2_headers = v2.encode_request(big, binary=True, outputs=["predict"], binary_outputs=True)
    json_headers = {"content-type": "application/json"}
    everyone = SERVERS
    return [
        Workload("row1_c1", "1 row, c=1", "/predict", single, json_headers, 1, 1, everyone, predict_check(one)),
        Workload("row1_c32", "1 row, c=32", "/predict", single, json_headers, 1, 32, everyone, predict_check(one)),
        Workload("row1_c128", "1 row, c=128", "/predict", single, json_headers, 1, 128, everyone, predict_check(one)),
        # The seed's Flask app takes one row per request only.
        Workload("rows256_c8", "256 rows JSON, c=8", "/predict", batch, json_headers, 256, 8,
                 ("starlette", "serve_app"), predict_check(many)),
        Workload("v2bin4096_c8", "V2 binary 4,096 rows, c=8", f"/v2/models/{MODEL_NAME}/infer", v2_body,
                 v2_headers, 4096, 8, ("serve_app",), v2_check),
    ]


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float = 10.0) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read(), {k.lower(): v for k, v in answer.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), {}


# ---- servers --------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    base_url: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    seen: set[processes.Process] = field(default_factory=set)

    def stop(self) -> None:
        for proc in self.procs:
            self.seen |= processes.descendants(proc.pid)
            started = processes.identify(proc.pid)
            if started is not None:
                self.seen.add(started)
        processes.end(self.seen)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def wait_answering(url: str, body: bytes, headers: dict[str, str], timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            status, answer, _ = _post(url, body, headers, timeout=2)
            if status == 200:
                return
            last = f"{status} {answer[:200]!r}"
        except Exception as exc:  # not listening yet
            last = repr(exc)
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s: {last}")


def start_baseline(name: str, model_file: Path, log_dir: Path, probe: Workload) -> Server:
    port = processes.free_port()
    log = open(log_dir / f"{name}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", f"{BASELINES}.{name}_app", "--model", str(model_file), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    server = Server(name, f"http://127.0.0.1:{port}", [proc])
    try:
        wait_answering(server.base_url + probe.path, probe.body, probe.headers, 60, proc)
    except Exception:
        server.stop()
        raise
    return server


# ---- measuring ------------------------------------------------------------------------------


def measure_http(server: Server, workload: Workload, duration_s: float, generator: str) -> dict[str, Any]:
    url = server.base_url + workload.path
    status, body, headers = _post(url, workload.body, workload.headers)
    if status != 200:
        raise RuntimeError(f"{server.name} {workload.key}: preflight answered {status}: {body[:300]!r}")
    workload.check(body, headers)
    result = run_load(url, workload.body, workload.headers, connections=workload.connections,
                      duration_s=duration_s, generator=generator)
    return row_of(server.name, workload, result)


def row_of(server: str, workload: Workload, result: LoadResult) -> dict[str, Any]:
    return {
        "server": server, "workload": workload.key, "title": workload.title, "kind": "http",
        "connections": workload.connections, "rows_per_request": workload.rows,
        "req_s": result.rps, "rows_s": result.rps * workload.rows,
        "p50_ms": result.p50_ms, "p90_ms": result.p90_ms, "p99_ms": result.p99_ms, "max_ms": result.max_ms,
        "requests": result.requests, "errors": result.errors, "timeouts": result.timeouts,
        "non_2xx": result.non_2xx, "client_cpu_pct": result.client_cpu_pct, "generator": result.generator,
        "load_avg_1m": os.getloadavg()[0],  # other work on the machine during this measurement
    }


async def _handle_load(handle: Any, rows: np.ndarray, concurrency: int, duration_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + duration_s

    async def caller() -> None:
        nonlocal failures
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                result = await handle.predict.remote(rows)
                if len(result) != len(rows):
                    failures += 1
            except Exception:
                failures += 1
                continue
            latencies.append(time.perf_counter() - start)

    cpu = time.process_time()
    start = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    cpu = time.process_time() - cpu
    ordered = sorted(latencies) or [0.0]

    def pct(p: float) -> float:
        return 1e3 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    calls_s = len(latencies) / elapsed
    n = len(rows)
    return {
        "server": APP_NAME, "workload": f"handle{n}_c{concurrency}",
        "title": f"handle, {n} row{'s' if n > 1 else ''}, {concurrency} in flight",
        "kind": "handle", "connections": concurrency, "rows_per_request": n,
        "req_s": calls_s, "rows_s": calls_s * n,
        "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": 1e3 * ordered[-1],
        "requests": len(latencies), "errors": failures, "timeouts": 0, "non_2xx": 0,
        "client_cpu_pct": 100 * cpu / elapsed, "generator": "ray handle (bench process)",
        "load_avg_1m": os.getloadavg()[0],
    }


def measure_handles(cases: Sequence[tuple[int, int]], duration_s: float, log: Progress) -> list[dict[str, Any]]:
    """(rows per call, calls in flight) each for `duration_s`, on one event loop.

    A handle's router is bound to the loop it first ran on, so all cases share one.
    """

    async def all_cases() -> list[dict[str, Any]]:
        from serve_app.client import model_handle

        handle = model_handle(APP_NAME)
        await handle.predict.remote(_rows(1))  # warm: the router learns the replicas
        out = []
        for rows_per_call, concurrency in cases:
            log(f"serve_app: handle calls, {rows_per_call} rows, {concurrency} in flight, {duration_s:g}s")
            row = await _handle_load(handle, _rows(rows_per_call), concurrency, duration_s)
            log.done(f"{row['req_s']:,.0f} calls/s, {row['rows_s']:,.0f} rows/s, p50 {row['p50_ms']:.2f} ms"
                     + (f", {row['errors']} FAILED" if row["errors"] else ""))
            out.append(row)
        return out

    return asyncio.run(all_cases())


# ---- the outputs: results.md, results.json, bench.png ---------------------------------------


def _find(rows: Sequence[dict[str, Any]], server: str, workload: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["server"] == server and r["workload"] == workload), None)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if row["server"] != APP_NAME:
            continue
        for base in ("starlette", "flask"):
            other = _find(rows, base, row["workload"])
            if other and other["req_s"] > 0:
                row[f"x_{base}_req_s"] = row["req_s"] / other["req_s"]
                row[f"x_{base}_p50"] = row["p50_ms"] / other["p50_ms"] if other["p50_ms"] else None
                row[f"x_{base}_p99"] = row["p99_ms"] / other["p99_ms"] if other["p99_ms"] else None


def goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figures that decide it (None: not measured)."""

    def pair(workload: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        return _find(rows, APP_NAME, workload), _find(rows, "starlette", workload)

    out: list[dict[str, Any]] = []
    ours, theirs = pair("row1_c32")
    if ours and theirs:
        ratio = ours["req_s"] / theirs["req_s"]
        out.append({"goal": "1 row, c=32: req/s >= 1.5x Starlette, p99 no worse",
                    "met": ratio >= 1.5 and ours["p99_ms"] <= theirs["p99_ms"],
                    "measured": f"{ratio:.2f}x req/s ({ours['req_s']:,.0f} vs {theirs['req_s']:,.0f}); "
                                f"p99 {ours['p99_ms']:.2f} vs {theirs['p99_ms']:.2f} ms"})
    ours, theirs = pair("row1_c1")
    if ours and theirs:
        ratio = ours["p50_ms"] / theirs["p50_ms"]
        out.append({"goal": "1 row, c=1: p50 <= 2x Starlette's", "met": ratio <= 2.0,
                    "measured": f"p50 {ours['p50_ms']:.2f} vs {theirs['p50_ms']:.2f} ms ({ratio:.2f}x)"})
    ours, theirs = pair("rows256_c8")
    if ours and theirs:
        ratio = ours["rows_s"] / theirs["rows_s"]
        out.append({"goal": "256-row JSON: rows/s >= 1.5x Starlette", "met": ratio >= 1.5,
                    "measured": f"{ratio:.2f}x ({ours['rows_s']:,.0f} vs {theirs['rows_s']:,.0f} rows/s)"})
    ours = _find(rows, APP_NAME, "v2bin4096_c8")
    if ours:
        out.append({"goal": "V2 binary 4,096-row requests: >= 1,000,000 rows/s", "met": ours["rows_s"] >= 1e6,
                    "measured": f"{ours['rows_s']:,.0f} rows/s"})
    ours, theirs = pair("row1_c128")
    if ours:
        clean = ours["errors"] + ours["timeouts"] + ours["non_2xx"] == 0
        p99_ok = theirs is None or ours["p99_ms"] <= theirs["p99_ms"]
        versus = f" vs {theirs['p99_ms']:.2f} ms" if theirs else ""
        out.append({"goal": "1 row, c=128: zero errors and timeouts, p99 <= Starlette's", "met": clean and p99_ok,
                    "measured": f"{ours['errors']} errors, {ours['timeouts']} timeouts, {ours['non_2xx']} non-2xx; "
                                f"p99 {ours['p99_ms']:.2f} ms{versus}"})
    return out


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def markdown(outcome: dict[str, Any]) -> str:
    rows = outcome["results"]
    lines = [
        f"# serve-app bench ({outcome['mode']}, {outcome['started']})",
        "",
        f"Command: `{outcome['command']}`  ",
        f"Machine: {outcome['machine']}; load generator: {outcome['generator']}; "
        f"{outcome['duration_s']:g} s per workload.",
    ]
    if outcome["generator"].startswith("python"):
        lines.append("**wrk is not installed: the Python fallback load generator was used; it saturates a core by "
                     "itself, so these figures show correctness, not the servers' speed.**")
    lines += [
        "",
        "| server | workload | req/s | rows/s | p50 ms | p90 ms | p99 ms | errors | timeouts | non-2xx "
        "| x Starlette req/s | x Starlette p99 | x Flask req/s | client CPU | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['title']} | {r['req_s']:,.0f} | {r['rows_s']:,.0f} | {r['p50_ms']:.2f} | "
            f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | {r['timeouts']} | {r['non_2xx']} | "
            f"{_ratio(r.get('x_starlette_req_s'))} | {_ratio(r.get('x_starlette_p99'))} | "
            f"{_ratio(r.get('x_flask_req_s'))} | {r['client_cpu_pct']:.0f}% | {r.get('load_avg_1m', 0):.1f} |"
        )
    if outcome["goals"]:
        lines += ["", "## Goals (issue 3), ratios from this run", "", "| goal | met | measured |", "|---|---|---|"]
        for g in outcome["goals"]:
            lines.append(f"| {g['goal']} | {'yes' if g['met'] else '**no**'} | {g['measured']} |")
    memory = outcome.get("memory")
    if memory:
        lines += ["", "## Memory of the local deployment (Ray's process tree + HAProxy)", ""]
        for stage, m in memory.items():
            lines.append(f"- {stage}: {m['rss_mib']:,.0f} MiB RSS summed over {m['processes']} processes "
                         f"(PSS, shared pages counted once: {m['pss_mib']:,.0f} MiB)")
    if outcome.get("soak"):
        s = outcome["soak"]
        share = (f", {s['load_pct']:.0f}% of this run's c=32 peak of {s['peak_req_s']:,.0f} req/s"
                 + (f", paced by {s['pause_ms']} ms pauses" if s.get("pause_ms") else ", not paced"))
        lines += ["", f"Soak: {s['seconds']:.0f} s at c={s['connections']} ({s['req_s']:,.0f} req/s{share if s.get('load_pct') else ''}, "
                  f"{s['failed']} failed): PSS {s['pss_before_mib']:,.0f} -> {s['pss_after_mib']:,.0f} MiB "
                  f"({s['growth_pct']:+.1f}%)"]
        if s.get("windows"):
            lines += ["", "| soak window end (s) | pause ms | req/s | p50 ms | p99 ms | failed | PSS MiB |",
                      "|---:|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {w['end_s']:.0f} | {w.get('pause_ms', 0)} | {w['req_s']:,.0f} | {w['p50_ms']:.2f} | {w['p99_ms']:.2f} | "
                      f"{w['failed']} | {w['pss_mib']:,.0f} |" for w in s["windows"]]
    lines += ["", "Baselines: " + outcome["baselines"], "",
              "client CPU: the load generator's CPU time over the run (100% = one core); load: the "
              "machine's 1-minute load average when the row was measured (2 cores: above 2, other work "
              "competed).", "", "![throughput and latency](bench.png)", ""]
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rps, ax_lat, ax_rows) = plt.subplots(1, 3, figsize=(17, 5))
    colours = {"serve_app": "tab:blue", "starlette": "tab:orange", "flask": "tab:green"}
    for server in SERVERS:
        points = sorted((r["connections"], r) for r in rows
                        if r["server"] == server and r["kind"] == "http" and r["rows_per_request"] == 1)
        if not points:
            continue
        xs = [c for c, _ in points]
        ax_rps.plot(xs, [r["req_s"] for _, r in points], "o-", color=colours[server], label=server)
        for key, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^:")):
            ax_lat.plot(xs, [r[key] for _, r in points], style, color=colours[server],
                        label=f"{server} {key[:3]}")
    for ax in (ax_rps, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("connections (1-row POST /predict)")
        ax.grid(True, alpha=0.3)
    ax_rps.set_ylabel("requests/s")
    ax_rps.set_title("Throughput vs concurrency")
    ax_rps.legend()
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_title("Latency percentiles")
    ax_lat.legend(fontsize=7, ncol=3)
    batch = [r for r in rows if r["rows_per_request"] > 1 or r["kind"] == "handle"]
    labels = [f"{r['server']}\n{r['title']}" for r in batch]
    ax_rows.barh(range(len(batch)), [r["rows_s"] for r in batch],
                 color=[colours.get(r["server"], "grey") for r in batch])
    ax_rows.set_yticks(range(len(batch)), labels, fontsize=7)
    ax_rows.set_xscale("log")
    ax_rows.set_xlabel("rows/s")
    ax_rows.set_title("Batched requests and handle calls")
    ax_rows.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(outcome: dict[str, Any]) -> None:
    header = ["server", "workload", "req/s", "rows/s", "p50", "p90", "p99", "err", "t/o", "non2xx",
              "xStarl", "xStarl p99", "xFlask", "cli CPU"]
    table = [header]
    for r in outcome["results"]:
        table.append([r["server"], r["title"], f"{r['req_s']:,.0f}", f"{r['rows_s']:,.0f}", f"{r['p50_ms']:.2f}",
                      f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", str(r["errors"]), str(r["timeouts"]),
                      str(r["non_2xx"]), _ratio(r.get("x_starlette_req_s")), _ratio(r.get("x_starlette_p99")),
                      _ratio(r.get("x_flask_req_s")), f"{r['client_cpu_pct']:.0f}%"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for row in table:
        print("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    for g in outcome["goals"]:
        print(f"  [{'met' if g['met'] else 'NOT MET'}] {g['goal']}: {g['measured']}")
    for stage, m in (outcome.get("memory") or {}).items():
        print(f"  memory {stage}: {m['rss_mib']:,.0f} MiB RSS / {m['pss_mib']:,.0f} MiB PSS in {m['processes']} processes")
    print(flush=True)


# ---- the run --------------------------------------------------------------------------------


@dataclass
class BenchOptions:
    out: Path = Path("bench-results")
    quick: bool = False
    duration_s: float | None = None
    config: Path = Path("configs/local.yaml")
    servers: tuple[str, ...] = SERVERS
    generator: str = "auto"
    soak_s: float = 0.0
    soak_load: float = 0.7  # share of this run's c=32 peak the soak offers (1: flat out)


def check_can_run(options: BenchOptions) -> None:
    """Refuses at start what would fail later: a config that is not there, a baseline whose
    server is not installed."""
    if APP_NAME in options.servers:
        require_config(options.config)
    for name, module in BASELINE_NEEDS.items():
        if name in options.servers and importlib.util.find_spec(module) is None:
            raise ValueError(
                f"the {name} baseline needs {module}, which is not installed: pip install 'serve_app[test]', "
                f"or leave it out (--servers {','.join([s for s in options.servers if s != name] or [APP_NAME])})"
            )


def run(options: BenchOptions) -> dict[str, Any]:
    check_can_run(options)
    log = Progress()
    share_package_path()
    duration = options.duration_s or (2.0 if options.quick else 10.0)
    warmup = 1.0 if options.quick else 3.0
    generator = options.generator
    if generator == "auto":
        generator = "wrk" if wrk_path() else "python"
        if generator == "python":
            log("wrk is not installed (apt-get install wrk): using the Python fallback load generator")
    options.out.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="sa-bench-", dir="/tmp"))
    results: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    soak: dict[str, Any] | None = None
    ended: list[processes.Process] = []
    port = 0
    try:
        from serve_app.model.predictor import Predictor
        from serve_app.model.store import ModelStore
        from serve_app.model.training import train

        log(f"training {MODEL_NAME} into a temporary store {work_dir / 'models'}")
        store = ModelStore(work_dir / "models")
        manifest = train(store, name=MODEL_NAME)
        model_file = store.model_path(manifest)
        model = Predictor.load(store, MODEL_NAME).model
        loads = workloads(lambda rows: np.asarray(model.predict(rows)))
        log.done(f"v{manifest.version} {manifest.estimator.rsplit('.', 1)[-1]}, {model_file.name}")

        servers: dict[str, Server] = {}
        ray_dep: RayDeployment | None = None
        try:
            for name in ("flask", "starlette"):
                if name in options.servers:
                    log(f"starting the {name} baseline")
                    servers[name] = start_baseline(name, model_file, work_dir, loads[0])
                    log.done(f"{name} on {servers[name].base_url}")
            if APP_NAME in options.servers:
                log(f"starting Ray and deploying {options.config} (fast path: HAProxy, throughput-optimized)")
                ray_dep = RayDeployment(options.config, store.root, work_dir, log)
                ray_dep.start()
                servers[APP_NAME] = Server(APP_NAME, ray_dep.base_url)
                wait_answering(ray_dep.base_url + loads[0].path, loads[0].body, loads[0].headers, 120)
                memory["idle"] = ray_dep.memory()
                log.done(f"serving on {ray_dep.base_url}; {memory['idle']['rss_mib']:,.0f} MiB RSS")
            for server in servers.values():
                run_load(server.base_url + loads[0].path, loads[0].body, loads[0].headers, connections=32,
                         duration_s=warmup, generator=generator)
            # Workload by workload, the servers one after another: whatever else the machine
            # does at that moment weighs on all of them alike, so the ratios stay fair.
            for w in loads:
                for name in SERVERS:
                    if name not in servers or name not in w.servers:
                        continue
                    log(f"{name}: {w.title} for {duration:g}s")
                    row = measure_http(servers[name], w, duration, generator)
                    results.append(row)
                    failed = row["errors"] + row["timeouts"] + row["non_2xx"]
                    log.done(f"{row['req_s']:,.0f} req/s, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms"
                             + (f", {failed} FAILED" if failed else ""))
            if ray_dep is not None:
                results += measure_handles(((1, 1), (1, 32), (256, 8)), duration, log)
                memory["after load"] = ray_dep.memory()
                if options.soak_s > 0:
                    peak = _find(results, APP_NAME, loads[1].key)
                    idle = _find(results, APP_NAME, loads[0].key)
                    soak = run_soak(servers[APP_NAME], loads[1], ray_dep, options.soak_s, generator, log,
                                    peak_req_s=peak["req_s"] if peak else None,
                                    idle_p50_ms=idle["p50_ms"] if idle else 0.0, load=options.soak_load)
        finally:
            for name in ("flask", "starlette"):
                if name in servers:
                    servers[name].stop()
            if ray_dep is not None:
                log("stopping Ray and HAProxy (by pid)")
                ray_dep.stop()
                ended, port = sorted(ray_dep.seen), ray_dep.http_port
                log.done("stopped")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    add_ratios(results)
    outcome = {
        "mode": "quick" if options.quick else "full",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "serve-app bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else []),
        "machine": describe_machine(),
        "generator": generator if generator != "wrk" else f"wrk ({wrk_path()}), 2 threads",
        "duration_s": duration,
        "config": str(options.config),
        "baselines": "flask = the seed's app on Flask's threaded dev server, sklearn predict; starlette = uvicorn "
                     "(uvloop, httptools) 1 worker, no access log, stdlib json via request.json(), sklearn's own "
                     "predict (input validation included). All serve the same stored model file.",
        "results": results,
        "goals": goals(results),
        "memory": memory,
        "soak": soak,
        "deployment_processes": ended,  # (pid, start time): all ended by the bench
        "serve_app_port": port,
    }
    (options.out / "results.json").write_text(json.dumps(outcome, indent=2))
    (options.out / "results.md").write_text(markdown(outcome))
    plot(results, options.out / "bench.png")
    print_table(outcome)
    log(f"wrote {options.out / 'results.md'}, {options.out / 'results.json'}, {options.out / 'bench.png'}")
    return outcome


def soak_pause_ms(connections: int, target_req_s: float, request_ms: float) -> int:
    """The pause per connection between an answer and its next request that offers about
    `target_req_s`: each connection's cycle is the pause plus `request_ms` (a request's
    latency; the soak starts from an idle one and corrects it window by window)."""
    return max(1, round(1000 * connections / target_req_s - request_ms))


def run_soak(server: Server, workload: Workload, ray_dep: RayDeployment, seconds: float,
             generator: str, log: Progress, window_s: float = 30.0, *, peak_req_s: float | None = None,
             idle_p50_ms: float = 0.0, load: float = 0.7) -> dict[str, Any]:
    """A long run at a steady load (issue 3 goal 6, issue 4 item 9), in back-to-back windows
    so that latency drift and memory growth over time show, not only their end points.

    With `peak_req_s` (this run's c=32 figure) and `load` < 1, the connections are paced to
    offer about `load` x the peak: a server near saturation says little about leaks."""
    pause_ms = 0
    if peak_req_s and 0 < load < 1:
        pause_ms = soak_pause_ms(workload.connections, load * peak_req_s, idle_p50_ms)
    before = ray_dep.memory()
    paced = f", paced to ~{load:.0%} of {peak_req_s:,.0f} req/s ({pause_ms} ms pauses)" if pause_ms else ", flat out"
    log(f"soak: {workload.title} for {seconds:g}s in {window_s:g}s windows{paced}")
    windows: list[dict[str, Any]] = []
    elapsed = 0.0
    while elapsed < seconds - 1e-9:
        length = min(window_s, seconds - elapsed)
        result = run_load(server.base_url + workload.path, workload.body, workload.headers,
                          connections=workload.connections, duration_s=length, generator=generator,
                          pause_ms=pause_ms)
        window_pause = pause_ms
        if pause_ms and peak_req_s and result.rps > 0:
            # Each connection's cycle is its pause plus what the server and client add, which
            # grows with load: correct the next window's pause by what this one measured,
            # halfway (a full correction overshoots: the added time moves with the rate).
            added_ms = 1000 * workload.connections / result.rps - pause_ms
            pause_ms = max(1, round((pause_ms + soak_pause_ms(workload.connections, load * peak_req_s, added_ms)) / 2))
        elapsed += length
        memory = ray_dep.memory()
        windows.append({"end_s": round(elapsed, 1), "req_s": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                        "failed": result.failed, "pss_mib": memory["pss_mib"], "pause_ms": window_pause})
        log(f"  {elapsed:5.0f}s  pause {window_pause:3d} ms  {result.rps:7,.0f} req/s  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:7.2f} ms  "
            f"failed {result.failed}  PSS {memory['pss_mib']:,.0f} MiB")
    after = ray_dep.memory()
    growth = 100 * (after["pss_mib"] - before["pss_mib"]) / before["pss_mib"]
    p50s, p99s = [w["p50_ms"] for w in windows], [w["p99_ms"] for w in windows]
    failed = sum(w["failed"] for w in windows)
    rate = sum(w["req_s"] * (w["end_s"] - (windows[i - 1]["end_s"] if i else 0.0)) for i, w in enumerate(windows)) / elapsed
    log.done(f"{rate:,.0f} req/s, {failed} failed; p50 {min(p50s):.2f}-{max(p50s):.2f} ms, p99 {min(p99s):.2f}-{max(p99s):.2f} ms; "
             f"PSS {before['pss_mib']:,.0f} -> {after['pss_mib']:,.0f} MiB ({growth:+.1f}%)")
    return {"seconds": seconds, "connections": workload.connections, "req_s": rate, "failed": failed,
            "peak_req_s": peak_req_s, "pause_ms": windows[-1]["pause_ms"] if windows else 0,
            "load_pct": 100 * rate / peak_req_s if peak_req_s else None,
            "pss_before_mib": before["pss_mib"], "pss_after_mib": after["pss_mib"], "growth_pct": growth,
            "p50_ms_range": [min(p50s), max(p50s)], "p99_ms_range": [min(p99s), max(p99s)], "windows": windows}