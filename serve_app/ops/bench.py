"""`serve-app bench` (`make bench`): serve_app against the servers it replaces, in one run.

One run stores its models in a temporary store and serves each **same model file** from:

- `flask`: the seed's Flask app on Flask's own server (baselines/flask_app.py), iris only;
- `starlette`: a hand-written one-worker uvicorn + Starlette app calling the scikit-learn
  estimator per request (baselines/starlette_app.py);
- `mlserver`: MLServer's scikit-learn runtime with adaptive batching on, in a venv of its
  own (baselines/mlserver_runtime.py); when it cannot be installed the table says so;
- `serve_app`: configs/local.yaml (port, store and model changed) on a fresh local Ray
  started by `ray start --block` with the fast path of `make run` (HAProxy ingress,
  throughput mode): localray.RayDeployment. One Ray serves the whole run; between models
  the app is redeployed with `args.model` changed, and serves each version with the runtime
  its manifest chose at publish time (ONNX Runtime when the compiled model verified).

The models (`--models`, default all): `iris` (LogisticRegression, `serve-app train`'s
default) and the heavy ones, `forest` (RandomForest, 200 trees) and `boosting`
(HistGradientBoosting, 200 iterations) on a 30-feature synthetic dataset (`--quick` shrinks
them). Model by model, the servers run side by side, are warmed up alike (`--warmup` s of
1-row requests at c=32 each), then measured workload by workload, one server after the
other, so other work on the machine weighs on each alike. Same client, same rows: one row
at 1/32/128 connections and 256-row requests at 8 (MLServer gets them as V2 JSON, its
protocol); for iris also V2 binary 4,096-row requests and Ray handle calls (serve_app only).
Every answer is first checked against scikit-learn's own `predict`.

The tables (Markdown and JSON), the issues' goals computed from this run's figures, memory
per replica and runtime, and a PNG plot go to `--out`. Everything the bench starts is ended
by pid, HAProxy and MLServer's workers included, and every port is a free one.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import math
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
from serve_app.ops import control, processes
from serve_app.ops.baselines import mlserver_runtime
from serve_app.ops.loadgen import LoadResult, run_load, wrk_path
from serve_app.ops.localray import (
    APP_NAME, MODEL_NAME, START_TIMEOUT_S, RayDeployment, require_config, share_package_path,
)
from serve_app.ops.progress import Progress, describe_machine
from serve_app.protocol import oip_v2

SERVERS = ("flask", "starlette", "mlserver", "serve_app")
BASELINES = "serve_app.ops.baselines"
# What each baseline runs on: test dependencies (`pip install 'serve_app[test]'`). MLServer
# is installed by the bench itself, into its own venv.
BASELINE_NEEDS = {"flask": "flask", "starlette": "uvicorn"}
IRIS = MODEL_NAME


# ---- the models -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HeavySpec:
    """A heavy model: `serve-app train --estimator <estimator>` on the 30-feature synthetic
    dataset when that command offers it, else fitted here to the same specification."""

    name: str  # the model's name in the run's store
    estimator: str  # its name for `serve-app train --estimator`
    cls: str  # module.Class
    params: dict[str, Any]
    size_param: str  # trees or iterations: what --quick shrinks
    size: int


HEAVY_FEATURES = 30
HEAVY_SAMPLES = 10_000
QUICK_SIZE = 10  # --quick: trees / iterations
QUICK_SAMPLES = 2_000
HEAVY: dict[str, HeavySpec] = {
    "forest": HeavySpec("forest", "random_forest_200", "sklearn.ensemble.RandomForestClassifier",
                        {"random_state": 0}, "n_estimators", 200),
    "boosting": HeavySpec("boosting", "hist_gradient_boosting", "sklearn.ensemble.HistGradientBoostingClassifier",
                          {"random_state": 0, "early_stopping": False}, "max_iter", 200),
}
MODELS = (IRIS, *HEAVY)


@dataclass
class ServedModel:
    name: str
    estimator: Any  # the scikit-learn estimator, as load_verified rebuilds it: the answers' truth
    manifest: Any
    rows_pool: np.ndarray  # held-out rows the requests are cut from
    how: str  # how it was made, for the table

    @property
    def runtime(self) -> str:
        """What the manifest says serves it ("onnxruntime" or "sklearn"; "sklearn" before compiled inference)."""
        return str(getattr(self.manifest, "runtime", "sklearn"))

    @property
    def runtime_reason(self) -> str:
        return str(getattr(self.manifest, "runtime_reason", ""))

    def rows(self, n: int) -> np.ndarray:
        return np.ascontiguousarray(np.resize(self.rows_pool, (n, self.rows_pool.shape[1])), dtype=np.float64)

    def expected(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.estimator.predict(rows))


def _iris_rows(n: int) -> np.ndarray:
    from sklearn.datasets import load_iris

    data = load_iris().data
    return np.ascontiguousarray(np.resize(data, (n, data.shape[1])), dtype=np.float64)


def heavy_dataset(samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): make_classification, 30 features, 25% held out
    (at 10,000 samples, the rows of `serve-app train --dataset synthetic30`)."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    x, y = make_classification(n_samples=samples, n_features=HEAVY_FEATURES, n_informative=10, n_redundant=5,
                               n_classes=2, random_state=seed)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test


def _train_offers(spec: HeavySpec) -> str | None:
    """The dataset `serve-app train` makes this heavy model on, if it offers one (the
    30-feature synthetic dataset with this estimator); None: the bench fits it itself."""
    from serve_app.model import training

    if spec.estimator not in training.ESTIMATORS.get("classification", {}):
        return None
    return next((name for name in training.DATASETS if "synthetic" in name), None)


def publish_heavy(store: Any, spec: HeavySpec, *, quick: bool) -> str:
    """Stores the heavy model as `spec.name` v1 (production) through the project's own
    publish path, which converts and verifies the compiled model where the project does.
    Returns how it was made."""
    from serve_app.model import training

    dataset = None if quick else _train_offers(spec)
    if dataset is not None:
        manifest = training.train(store, name=spec.name, dataset=dataset, estimator=spec.estimator)
        if manifest.n_features == HEAVY_FEATURES and manifest.params.get(spec.size_param) == spec.size:
            return f"serve-app train --dataset {dataset} --estimator {spec.estimator}"
        raise RuntimeError(
            f"serve-app train --dataset {dataset} --estimator {spec.estimator} made {manifest.n_features} features, "
            f"{spec.size_param}={manifest.params.get(spec.size_param)}; the bench wants {HEAVY_FEATURES} and {spec.size}"
        )
    import importlib

    size = QUICK_SIZE if quick else spec.size
    samples = QUICK_SAMPLES if quick else HEAVY_SAMPLES
    x_train, y_train, x_test, y_test = heavy_dataset(samples)
    module, cls = spec.cls.rsplit(".", 1)
    estimator = getattr(importlib.import_module(module), cls)(**spec.params, **{spec.size_param: size})
    estimator.fit(x_train, y_train)
    accuracy = float((estimator.predict(x_test) == y_test).mean())
    extra: dict[str, Any] = {}
    wanted = inspect.signature(training.save_fitted).parameters
    for key in ("held_out", "x_test", "holdout"):  # the publish path's held-out rows, when it takes them
        if key in wanted:
            extra[key] = x_test
    training.save_fitted(store, estimator, name=spec.name, feature_names=[f"x{i:02d}" for i in range(HEAVY_FEATURES)],
                         reference=x_train, dataset="make_classification", metrics={"accuracy": accuracy},
                         n_train=len(x_train), n_test=len(x_test), **extra)
    return f"{cls}({spec.size_param}={size}) fitted by the bench on make_classification({samples:,} x {HEAVY_FEATURES})"


def prepare_models(store: Any, names: Sequence[str], *, quick: bool, log: Progress) -> dict[str, ServedModel]:
    """Stores every model the run serves (iris always: a fresh Ray first serves it) and loads
    each back the safe way (`load_verified`) as the truth answers are checked against."""
    from serve_app.model.training import train

    hows = {IRIS: "serve-app train (LogisticRegression on iris)"}
    log(f"training {IRIS} into a temporary store {store.root}")
    train(store, name=IRIS)
    log.done("LogisticRegression")
    for name in names:
        if name in HEAVY:
            spec = HEAVY[name]
            log(f"training {name} ({spec.cls.rsplit('.', 1)[-1]}, {spec.size_param}="
                f"{QUICK_SIZE if quick else spec.size}, {HEAVY_FEATURES} features)")
            started = time.perf_counter()
            hows[name] = publish_heavy(store, spec, quick=quick)
            log.done(f"{time.perf_counter() - started:.0f} s")
    out: dict[str, ServedModel] = {}
    for name in (IRIS, *[n for n in names if n != IRIS]):
        estimator, manifest = store.load_verified(name, "production")
        pool = _iris_rows(150) if name == IRIS else heavy_dataset(QUICK_SAMPLES if quick else HEAVY_SAMPLES)[2]
        out[name] = ServedModel(name, estimator, manifest, pool, hows[name])
        log(f"  {name} v{manifest.version}: {manifest.estimator.rsplit('.', 1)[-1]}, "
            f"runtime {out[name].runtime} ({out[name].runtime_reason or 'no reason recorded'})")
    return out


# ---- workloads ------------------------------------------------------------------------------


Check = Callable[[bytes, dict[str, str]], None]


@dataclass(frozen=True)
class Payload:
    path: str
    body: bytes
    headers: dict[str, str]
    check: Check = field(compare=False)


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    model: str
    rows: int
    connections: int
    payloads: dict[str, Payload]  # server -> what it is sent (each server speaks its own protocol)

    @property
    def servers(self) -> tuple[str, ...]:
        return tuple(self.payloads)


JSON_HEADERS = {"content-type": "application/json"}


def _mismatch(got: Any, want: Any) -> AssertionError:
    return AssertionError(f"wrong predictions: {str(got)[:80]} != {str(want)[:80]}")


def predict_payload(rows: np.ndarray, want: np.ndarray) -> Payload:
    """POST /predict, the seed's contract (serve_app, Starlette, Flask)."""
    expected = want.tolist()

    def check(body: bytes, headers: dict[str, str]) -> None:
        answer = orjson.loads(body)
        got = [answer["prediction"]] if len(rows) == 1 else answer["predictions"]
        if got != expected:
            raise _mismatch(got, expected)

    features = rows[0].tolist() if len(rows) == 1 else rows.tolist()
    return Payload("/predict", orjson.dumps({"features": features}), JSON_HEADERS, check)


def mlserver_payload(model: str, rows: np.ndarray, want: np.ndarray) -> Payload:
    """MLServer's own protocol: Open Inference Protocol V2 JSON, FP64 [rows, features]."""
    expected = want.tolist()

    def check(body: bytes, headers: dict[str, str]) -> None:
        got = orjson.loads(body)["outputs"][0]["data"]
        if got != expected:
            raise _mismatch(got, expected)

    body = orjson.dumps({"inputs": [{"name": "input-0", "shape": list(rows.shape), "datatype": "FP64",
                                     "data": rows.ravel().tolist()}]})
    return Payload(f"/v2/models/{model}/infer", body, JSON_HEADERS, check)


def v2_binary_payload(rows: np.ndarray, want: np.ndarray) -> Payload:
    def check(body: bytes, headers: dict[str, str]) -> None:
        got = v2.decode_response(body, headers.get(oip_v2.BINARY_HEADER))["predict"]
        if not np.array_equal(got, want):
            raise AssertionError("wrong V2 predictions")

    body, headers = v2.encode_request(rows, binary=True, outputs=["predict"], binary_outputs=True)
    return Payload(f"/v2/models/{MODEL_NAME}/infer", body, headers, check)


def workloads(model: str, rows_of: Callable[[int], np.ndarray], expected: Callable[[np.ndarray], np.ndarray],
              servers: Sequence[str] = SERVERS) -> list[Workload]:
    """The payloads of one model, each with a check of its answer against scikit-learn's `predict`."""

    def payloads(n: int, who: Sequence[str]) -> dict[str, Payload]:
        rows = rows_of(n)
        want = expected(rows)
        out: dict[str, Payload] = {}
        for server in SERVERS:  # the measuring order
            if server in who and server in servers:
                out[server] = mlserver_payload(model, rows, want) if server == "mlserver" else predict_payload(rows, want)
        return out

    # The seed's Flask app serves iris, one row per request only.
    single = ("flask", "starlette", "mlserver", APP_NAME) if model == IRIS else ("starlette", "mlserver", APP_NAME)
    batched = ("starlette", "mlserver", APP_NAME)
    one = payloads(1, single)
    loads = [
        Workload("row1_c1", "1 row, c=1", model, 1, 1, one),
        Workload("row1_c32", "1 row, c=32", model, 1, 32, one),
        Workload("row1_c128", "1 row, c=128", model, 1, 128, one),
        Workload("rows256_c8", "256 rows JSON, c=8", model, 256, 8, payloads(256, batched)),
    ]
    if model == IRIS and APP_NAME in servers:
        big = rows_of(4096)
        loads.append(Workload("v2bin4096_c8", "V2 binary 4,096 rows, c=8", model, 4096, 8,
                              {APP_NAME: v2_binary_payload(big, expected(big))}))
    return loads


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

    def remember(self) -> None:
        for proc in self.procs:
            self.seen |= processes.descendants(proc.pid)
            started = processes.identify(proc.pid)
            if started is not None:
                self.seen.add(started)

    def memory(self) -> dict[str, Any]:
        """RSS and PSS summed over the server's processes (MLServer's workers included)."""
        self.remember()
        live = [p for p in self.seen if processes.alive(p)]
        return {"processes": len(live),
                "rss_mib": sum(processes.memory_kib(pid, "VmRSS") for pid, _ in live) / 1024,
                "pss_mib": sum(processes.memory_kib(pid, "Pss") for pid, _ in live) / 1024}

    def stop(self) -> None:
        self.remember()
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


def _start(name: str, command: list[str], port: int, log_file: Path, probe: Payload, timeout_s: float,
           env: dict[str, str] | None = None, cwd: Path | None = None) -> Server:
    log = open(log_file, "wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd)
    log.close()
    server = Server(name, f"http://127.0.0.1:{port}", [proc])
    try:
        wait_answering(server.base_url + probe.path, probe.body, probe.headers, timeout_s, proc)
    except Exception as exc:
        server.stop()
        tail = log_file.read_text(errors="replace")[-600:] if log_file.exists() else ""
        raise RuntimeError(f"{name}: {exc}; its log ends: {tail}") from None
    server.remember()
    return server


def start_baseline(name: str, model: str, store_root: Path, model_file: Path, log_dir: Path, probe: Payload) -> Server:
    """Flask serves the model file as the seed did; Starlette loads it from the store (`load_verified`)."""
    port = processes.free_port()
    where = ["--model", str(model_file)] if name == "flask" else ["--store", str(store_root), "--model", model]
    command = [sys.executable, "-m", f"{BASELINES}.{name}_app", *where, "--port", str(port)]
    return _start(name, command, port, log_dir / f"{name}-{model}.log", probe, 60)


def start_mlserver(exe: Path, model: ServedModel, work_dir: Path, probe: Payload) -> Server:
    root = work_dir / f"mlserver-{model.name}"
    ports = {"http": processes.free_port(), "grpc": processes.free_port(), "metrics": processes.free_port()}
    mlserver_runtime.write_repository(root, model.name, model.estimator, ports)
    return _start("mlserver", mlserver_runtime.command(exe, root), ports["http"], work_dir / f"mlserver-{model.name}.log",
                  probe, 180, env=mlserver_runtime.environment(), cwd=root)


def serve_model(ray_dep: RayDeployment, model: str, timeout_s: float = START_TIMEOUT_S) -> list[dict[str, Any]]:
    """Has the bench's Ray serve `model` (a redeploy with args.model changed, unless it
    serves it already) and returns each running replica's GET /admin/status once every
    replica serves it."""
    app = control.find_app(ray_dep.config, APP_NAME)
    wanted = next((int(d.get("num_replicas", 1)) for d in app.get("deployments") or []
                   if d.get("name") == control.DEPLOYMENT_NAME and isinstance(d.get("num_replicas", 1), int)), 1)
    if app["args"].get("model") != model:
        app["args"] = {**app["args"], "model": model}
        control.deploy(ray_dep.config, ray_dep.dashboard)

    def serving(view: control.ReplicaView) -> bool:
        running = view.running
        return (len(running) >= wanted and running <= view.statuses.keys()
                and all(view.statuses[pid].get("model") == model for pid in running))

    view = control.watch_replicas(serving, ray_dep.dashboard, APP_NAME, url=ray_dep.base_url, timeout_s=timeout_s)
    control.wait_until_running(APP_NAME, ray_dep.dashboard, timeout_s=timeout_s)
    return [view.statuses[pid] for pid in sorted(view.running)]


def replica_memory(statuses: Sequence[dict[str, Any]], runtime: str) -> list[dict[str, Any]]:
    return [{"pid": s["pid"], "runtime": s.get("runtime", runtime),
             "rss_mib": processes.memory_kib(s["pid"], "VmRSS") / 1024,
             "pss_mib": processes.memory_kib(s["pid"], "Pss") / 1024} for s in statuses]


# ---- measuring ------------------------------------------------------------------------------


def measure_http(server: Server, workload: Workload, duration_s: float, generator: str) -> dict[str, Any]:
    payload = workload.payloads[server.name]
    url = server.base_url + payload.path
    status, body, headers = _post(url, payload.body, payload.headers)
    if status != 200:
        raise RuntimeError(f"{server.name} {workload.model} {workload.key}: preflight answered {status}: {body[:300]!r}")
    payload.check(body, headers)
    result = run_load(url, payload.body, payload.headers, connections=workload.connections,
                      duration_s=duration_s, generator=generator)
    return row_of(server.name, workload, result)


def row_of(server: str, workload: Workload, result: LoadResult) -> dict[str, Any]:
    return {
        "model": workload.model, "server": server, "workload": workload.key, "title": workload.title, "kind": "http",
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
        "model": IRIS, "server": APP_NAME, "workload": f"handle{n}_c{concurrency}",
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
        await handle.predict.remote(_iris_rows(1))  # warm: the router learns the replicas
        out = []
        for rows_per_call, concurrency in cases:
            log(f"serve_app: handle calls, {rows_per_call} rows, {concurrency} in flight, {duration_s:g}s")
            row = await _handle_load(handle, _iris_rows(rows_per_call), concurrency, duration_s)
            log.done(f"{row['req_s']:,.0f} calls/s, {row['rows_s']:,.0f} rows/s, p50 {row['p50_ms']:.2f} ms"
                     + (f", {row['errors']} FAILED" if row["errors"] else ""))
            out.append(row)
        return out

    return asyncio.run(all_cases())


# ---- the outputs: results.md, results.json, bench.png ---------------------------------------


def _find(rows: Sequence[dict[str, Any]], server: str, workload: str, model: str = IRIS) -> dict[str, Any] | None:
    return next((r for r in rows if r["server"] == server and r["workload"] == workload
                 and r.get("model", IRIS) == model), None)


RATIO_BASES = ("starlette", "mlserver", "flask")


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """serve_app's figures over each baseline's, same model and workload."""
    for row in rows:
        if row["server"] != APP_NAME:
            continue
        for base in RATIO_BASES:
            other = _find(rows, base, row["workload"], row.get("model", IRIS))
            if other and other["req_s"] > 0:
                row[f"x_{base}_req_s"] = row["req_s"] / other["req_s"]
                row[f"x_{base}_p50"] = row["p50_ms"] / other["p50_ms"] if other["p50_ms"] else None
                row[f"x_{base}_p99"] = row["p99_ms"] / other["p99_ms"] if other["p99_ms"] else None


def _divide(ours: float, theirs: float) -> float:
    if theirs > 0:
        return ours / theirs
    return math.inf if ours > 0 else math.nan


class _Goals:
    """Builds the goal list of one model: each goal is met (True), not met (False) or not
    measured (None: a figure is missing), with the ratio that decides it."""

    def __init__(self, rows: Sequence[dict[str, Any]], model: str) -> None:
        self.rows, self.model = rows, model
        self.out: list[dict[str, Any]] = []

    def get(self, server: str, workload: str) -> dict[str, Any] | None:
        return _find(self.rows, server, workload, self.model)

    def add(self, goal: str, met: bool | None, ratio: float | None, measured: str) -> None:
        self.out.append({"model": self.model, "goal": goal, "met": met, "ratio": ratio, "measured": measured})

    def missing(self, goal: str, *figures: tuple[str, dict[str, Any] | None]) -> bool:
        absent = [name for name, row in figures if row is None]
        if absent:
            self.add(goal, None, None, "not measured: no " + ", no ".join(absent) + " figures in this run")
        return bool(absent)

    def at_least(self, goal: str, workload: str, base: str, factor: float, key: str = "req_s") -> None:
        ours, theirs = self.get(APP_NAME, workload), self.get(base, workload)
        if self.missing(goal, (APP_NAME, ours), (base, theirs)):
            return
        assert ours is not None and theirs is not None
        ratio = _divide(ours[key], theirs[key])
        unit = "req/s" if key == "req_s" else "rows/s"
        self.add(goal, ratio >= factor, ratio, f"{ratio:.2f}x ({ours[key]:,.0f} vs {theirs[key]:,.0f} {unit}; goal {factor:g}x)")

    def at_most(self, goal: str, workload: str, base: str, factor: float, key: str = "p50_ms") -> None:
        ours, theirs = self.get(APP_NAME, workload), self.get(base, workload)
        if self.missing(goal, (APP_NAME, ours), (base, theirs)):
            return
        assert ours is not None and theirs is not None
        ratio = _divide(ours[key], theirs[key])
        self.add(goal, ratio <= factor, ratio,
                 f"{key[:3]} {ours[key]:.2f} vs {theirs[key]:.2f} ms ({ratio:.2f}x; goal <= {factor:g}x)")

    def rate_and_tail(self, goal: str, workload: str, base: str, factor: float, p99_factor: float) -> None:
        ours, theirs = self.get(APP_NAME, workload), self.get(base, workload)
        if self.missing(goal, (APP_NAME, ours), (base, theirs)):
            return
        assert ours is not None and theirs is not None
        ratio, tail = _divide(ours["req_s"], theirs["req_s"]), _divide(ours["p99_ms"], theirs["p99_ms"])
        self.add(goal, ratio >= factor and tail <= p99_factor, ratio,
                 f"{ratio:.2f}x req/s ({ours['req_s']:,.0f} vs {theirs['req_s']:,.0f}); p99 {ours['p99_ms']:.2f} vs "
                 f"{theirs['p99_ms']:.2f} ms ({tail:.2f}x)")

    def clean_and_tail(self, goal: str, workload: str, base: str) -> None:
        ours, theirs = self.get(APP_NAME, workload), self.get(base, workload)
        if self.missing(goal, (APP_NAME, ours), (base, theirs)):
            return
        assert ours is not None and theirs is not None
        failed = ours["errors"] + ours["timeouts"] + ours["non_2xx"]
        tail = _divide(ours["p99_ms"], theirs["p99_ms"])
        self.add(goal, failed == 0 and tail <= 1.0, tail,
                 f"{ours['errors']} errors, {ours['timeouts']} timeouts, {ours['non_2xx']} non-2xx; "
                 f"p99 {ours['p99_ms']:.2f} vs {theirs['p99_ms']:.2f} ms ({tail:.2f}x)")


def heavy_goals(rows: Sequence[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """Issue 17's goals for a heavy model (forest, boosting)."""
    g = _Goals(rows, model)
    g.at_least("1 row, c=32: req/s >= 10x Starlette+scikit-learn", "row1_c32", "starlette", 10)
    g.at_least("1 row, c=32: req/s >= 5x MLServer (adaptive batching)", "row1_c32", "mlserver", 5)
    g.at_most("1 row, c=1: p50 <= Starlette's", "row1_c1", "starlette", 1.0)
    g.at_least("256-row requests: rows/s >= 10x Starlette", "rows256_c8", "starlette", 10, key="rows_s")
    g.clean_and_tail("1 row, c=128: zero errors and timeouts, p99 <= Starlette's", "row1_c128", "starlette")
    return g.out


def iris_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 17's iris goals, restated (and issue 3's c=128 goal, kept)."""
    g = _Goals(rows, IRIS)
    g.rate_and_tail("1 row, c=32: req/s >= 1.0x Starlette, p99 <= 1.5x its p99", "row1_c32", "starlette", 1.0, 1.5)
    g.at_most("1 row, c=1: p50 <= 2x Starlette's", "row1_c1", "starlette", 2.0)
    g.at_least("256-row JSON: rows/s >= 1.2x Starlette", "rows256_c8", "starlette", 1.2, key="rows_s")
    g.at_least("1 row, c=32: req/s >= 2x MLServer (adaptive batching)", "row1_c32", "mlserver", 2)
    ours = g.get(APP_NAME, "v2bin4096_c8")
    if not g.missing("V2 binary 4,096-row requests: >= 1,000,000 rows/s", (APP_NAME, ours)):
        assert ours is not None
        g.add("V2 binary 4,096-row requests: >= 1,000,000 rows/s", ours["rows_s"] >= 1e6, ours["rows_s"] / 1e6,
              f"{ours['rows_s']:,.0f} rows/s")
    g.clean_and_tail("1 row, c=128: zero errors and timeouts, p99 <= Starlette's", "row1_c128", "starlette")
    return g.out


def goals(rows: Sequence[dict[str, Any]], models: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The issues' targets for every model measured, each decided by this run's figures."""
    if models is None:
        models = list(dict.fromkeys(r.get("model", IRIS) for r in rows))
    out: list[dict[str, Any]] = []
    for model in models:
        out += iris_goals(rows) if model == IRIS else heavy_goals(rows, model)
    return out


def verdict(goal: dict[str, Any]) -> str:
    return {True: "met", False: "NOT MET", None: "not measured"}[goal["met"]]


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _model_title(outcome: dict[str, Any], model: str) -> str:
    info = (outcome.get("models") or {}).get(model, {})
    runtime = info.get("runtime")
    return f"{model}: {info.get('estimator', '')}" + (f", serve_app runtime {runtime}" if runtime else "")


def markdown(outcome: dict[str, Any]) -> str:
    rows = outcome["results"]
    lines = [
        f"# serve-app bench ({outcome['mode']}, {outcome['started']})",
        "",
        f"Command: `{outcome['command']}`  ",
        f"Machine: {outcome['machine']}; load generator: {outcome['generator']}; "
        f"{outcome['duration_s']:g} s per workload, each after a warm-up of {outcome.get('warmup_s', 0):g} s of "
        "1-row requests at c=32 on every server of that model.",
    ]
    if outcome["generator"].startswith("python"):
        lines.append("**wrk is not installed: the Python fallback load generator was used; it saturates a core by "
                     "itself, so these figures show correctness, not the servers' speed.**")
    mls = outcome.get("mlserver") or {}
    if mls and not mls.get("available"):
        lines.append(f"**MLServer was not measured: {mls.get('reason')}**")
    for model in list(dict.fromkeys(r.get("model", IRIS) for r in rows)):
        info = (outcome.get("models") or {}).get(model, {})
        lines += ["", f"## {_model_title(outcome, model)}", ""]
        if info.get("how"):
            lines.append(f"Made by: {info['how']}. Runtime: {info.get('runtime')} ({info.get('runtime_reason') or '-'}).")
            lines.append("")
        lines += [
            "| server | workload | req/s | rows/s | p50 ms | p90 ms | p99 ms | errors | timeouts | non-2xx "
            "| x Starlette req/s | x Starlette p99 | x MLServer req/s | x Flask req/s | client CPU | load |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            if r.get("model", IRIS) != model:
                continue
            lines.append(
                f"| {r['server']} | {r['title']} | {r['req_s']:,.0f} | {r['rows_s']:,.0f} | {r['p50_ms']:.2f} | "
                f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | {r['timeouts']} | {r['non_2xx']} | "
                f"{_ratio(r.get('x_starlette_req_s'))} | {_ratio(r.get('x_starlette_p99'))} | "
                f"{_ratio(r.get('x_mlserver_req_s'))} | {_ratio(r.get('x_flask_req_s'))} | "
                f"{r['client_cpu_pct']:.0f}% | {r.get('load_avg_1m', 0):.1f} |"
            )
    if outcome["goals"]:
        lines += ["", "## Goals (issue 17), ratios from this run", "", "| model | goal | met | measured |",
                  "|---|---|---|---|"]
        for g in outcome["goals"]:
            mark = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
            lines.append(f"| {g.get('model', IRIS)} | {g['goal']} | {mark} | {g['measured']} |")
    per_model = outcome.get("model_memory") or {}
    if per_model:
        lines += ["", "## Memory per server and model (RSS / PSS MiB, after that model's load)", "",
                  "| model | serve_app runtime | serve_app per replica | Starlette | MLServer (all its processes) |",
                  "|---|---|---|---|---|"]
        for model, m in per_model.items():
            replicas = ", ".join(f"{r['rss_mib']:,.0f} / {r['pss_mib']:,.0f}" for r in m.get("replicas", [])) or "-"

            def total(key: str) -> str:
                s = m.get(key)
                return f"{s['rss_mib']:,.0f} / {s['pss_mib']:,.0f}" if s else "-"

            lines.append(f"| {model} | {m.get('runtime', '-')} | {replicas} | {total('starlette')} | {total('mlserver')} |")
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


COLOURS = {"serve_app": "tab:blue", "starlette": "tab:orange", "flask": "tab:green", "mlserver": "tab:red"}


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One row of panels per model: req/s and latency percentiles against concurrency, and
    rows/s of batched requests (and, for iris, Ray handle calls)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.get("model", IRIS) for r in rows)) or [IRIS]
    fig, axes = plt.subplots(len(models), 3, figsize=(17, 5 * len(models)), squeeze=False)
    for (ax_rps, ax_lat, ax_rows), model in zip(axes, models):
        mine = [r for r in rows if r.get("model", IRIS) == model]
        for server in SERVERS:
            points = sorted((r["connections"], r) for r in mine
                            if r["server"] == server and r["kind"] == "http" and r["rows_per_request"] == 1)
            if not points:
                continue
            xs = [c for c, _ in points]
            ax_rps.plot(xs, [r["req_s"] for _, r in points], "o-", color=COLOURS[server], label=server)
            for key, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^:")):
                ax_lat.plot(xs, [r[key] for _, r in points], style, color=COLOURS[server], label=f"{server} {key[:3]}")
        for ax in (ax_rps, ax_lat):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("connections (1-row requests)")
            ax.grid(True, alpha=0.3)
        ax_rps.set_ylabel("requests/s")
        ax_rps.set_title(f"{model}: throughput vs concurrency")
        ax_rps.legend()
        ax_lat.set_yscale("log")
        ax_lat.set_ylabel("latency (ms)")
        ax_lat.set_title(f"{model}: latency percentiles")
        ax_lat.legend(fontsize=7, ncol=3)
        batch = [r for r in mine if r["rows_per_request"] > 1 or r["kind"] == "handle"]
        ax_rows.barh(range(len(batch)), [r["rows_s"] for r in batch],
                     color=[COLOURS.get(r["server"], "grey") for r in batch])
        ax_rows.set_yticks(range(len(batch)), [f"{r['server']}\n{r['title']}" for r in batch], fontsize=7)
        if batch:
            ax_rows.set_xscale("log")
        ax_rows.set_xlabel("rows/s")
        ax_rows.set_title(f"{model}: batched requests" + (" and handle calls" if model == IRIS else ""))
        ax_rows.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(outcome: dict[str, Any]) -> None:
    header = ["model", "server", "workload", "req/s", "rows/s", "p50", "p90", "p99", "err", "t/o", "non2xx",
              "xStarl", "xStarl p99", "xMLS", "xFlask", "cli CPU"]
    table = [header]
    for r in outcome["results"]:
        table.append([r.get("model", IRIS), r["server"], r["title"], f"{r['req_s']:,.0f}", f"{r['rows_s']:,.0f}",
                      f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", str(r["errors"]),
                      str(r["timeouts"]), str(r["non_2xx"]), _ratio(r.get("x_starlette_req_s")),
                      _ratio(r.get("x_starlette_p99")), _ratio(r.get("x_mlserver_req_s")),
                      _ratio(r.get("x_flask_req_s")), f"{r['client_cpu_pct']:.0f}%"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for row in table:
        print("  ".join(cell.rjust(w) if i > 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    mls = outcome.get("mlserver") or {}
    if mls and not mls.get("available"):
        print(f"  MLServer not measured: {mls.get('reason')}")
    for g in outcome["goals"]:
        print(f"  [{verdict(g)}] {g.get('model', IRIS)}: {g['goal']}: {g['measured']}")
    for model, m in (outcome.get("model_memory") or {}).items():
        replicas = ", ".join(f"{r['rss_mib']:,.0f}" for r in m.get("replicas", [])) or "-"
        others = "".join(f", {k} {m[k]['rss_mib']:,.0f}" for k in ("starlette", "mlserver") if m.get(k))
        print(f"  memory {model} (MiB RSS): serve_app replicas [{m.get('runtime', '-')}] {replicas}{others}")
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
    models: tuple[str, ...] = MODELS
    warmup_s: float | None = None  # per model and server (default 30, 1 with --quick)
    generator: str = "auto"
    soak_s: float = 0.0
    soak_load: float = 0.7  # share of this run's c=32 peak the soak offers (1: flat out)
    mlserver_venv: Path | None = None  # default: mlserver_runtime.venv_dir()


def check_can_run(options: BenchOptions) -> None:
    """Refuses at start what would fail later: a config that is not there, a baseline whose
    server is not installed, a model or server it does not know."""
    for kind, given, known in (("server", options.servers, SERVERS), ("model", options.models, MODELS)):
        unknown = [s for s in given if s not in known]
        if unknown or not given:
            what = f"unknown {kind} {unknown[0]!r}" if unknown else f"no {kind} given"
            raise ValueError(f"{what}; choose from {', '.join(known)}")
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
    warmup = options.warmup_s if options.warmup_s is not None else (1.0 if options.quick else 30.0)
    generator = options.generator
    if generator == "auto":
        generator = "wrk" if wrk_path() else "python"
        if generator == "python":
            log("wrk is not installed (apt-get install wrk): using the Python fallback load generator")
    options.out.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="sa-bench-", dir="/tmp"))
    results: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    model_memory: dict[str, Any] = {}
    models_info: dict[str, Any] = {}
    mlserver: dict[str, Any] = {}
    soak: dict[str, Any] | None = None
    ended: list[processes.Process] = []
    port = 0
    try:
        from serve_app.model.store import ModelStore

        store = ModelStore(work_dir / "models")
        served = prepare_models(store, options.models, quick=options.quick, log=log)
        for name in options.models:
            m = served[name]
            models_info[name] = {"estimator": m.manifest.estimator.rsplit(".", 1)[-1], "version": m.manifest.version,
                                 "how": m.how, "runtime": m.runtime, "runtime_reason": m.runtime_reason,
                                 "n_features": m.manifest.n_features}
        mlserver_exe: Path | None = None
        if "mlserver" in options.servers:
            mlserver = {"available": False, "max_batch_size": mlserver_runtime.MAX_BATCH_SIZE,
                        "max_batch_time_s": mlserver_runtime.MAX_BATCH_TIME_S}
            try:
                mlserver_exe = mlserver_runtime.ensure_installed(options.mlserver_venv, log)
                mlserver.update(available=True, version=mlserver_runtime.version(mlserver_exe), venv=str(mlserver_exe.parents[1]))
            except mlserver_runtime.Unavailable as exc:
                mlserver["reason"] = str(exc)
                log(f"MLServer is not measured: {exc}")

        ray_dep: RayDeployment | None = None
        try:
            if APP_NAME in options.servers:
                log(f"starting Ray and deploying {options.config} (fast path: HAProxy, throughput-optimized)")
                ray_dep = RayDeployment(options.config, store.root, work_dir, log)
                ray_dep.start()
                probe = predict_payload(served[IRIS].rows(1), served[IRIS].expected(served[IRIS].rows(1)))
                wait_answering(ray_dep.base_url + probe.path, probe.body, probe.headers, 120)
                memory["idle"] = ray_dep.memory()
                log.done(f"serving on {ray_dep.base_url}; {memory['idle']['rss_mib']:,.0f} MiB RSS")
            for model_name in options.models:
                model = served[model_name]
                loads = workloads(model_name, model.rows, model.expected, options.servers)
                group: dict[str, Server] = {}
                try:
                    model_memory[model_name] = {"runtime": model.runtime}
                    for name in ("flask", "starlette"):
                        if name in options.servers and name in loads[0].servers:
                            log(f"{model_name}: starting the {name} baseline")
                            group[name] = start_baseline(name, model_name, store.root, store.model_path(model.manifest),
                                                         work_dir, loads[0].payloads[name])
                            log.done(group[name].base_url)
                    if mlserver_exe is not None:
                        log(f"{model_name}: starting MLServer (adaptive batching: {mlserver_runtime.MAX_BATCH_SIZE} "
                            f"requests, {mlserver_runtime.MAX_BATCH_TIME_S * 1e3:g} ms)")
                        try:
                            group["mlserver"] = start_mlserver(mlserver_exe, model, work_dir, loads[0].payloads["mlserver"])
                            log.done(group["mlserver"].base_url)
                        except RuntimeError as exc:
                            mlserver.setdefault("failed", {})[model_name] = str(exc)
                            log.done(f"FAILED, not measured: {str(exc)[:300]}")
                    if ray_dep is not None:
                        log(f"{model_name}: serve_app serving it (args.model; a redeploy unless already)")
                        statuses = serve_model(ray_dep, model_name)
                        runtimes = sorted({str(s.get("runtime", model.runtime)) for s in statuses})
                        models_info[model_name]["runtime"] = model_memory[model_name]["runtime"] = "/".join(runtimes)
                        group[APP_NAME] = Server(APP_NAME, ray_dep.base_url)
                        log.done(f"{len(statuses)} replicas, runtime {'/'.join(runtimes)}")
                    log(f"{model_name}: warming up {', '.join(group)} for {warmup:g} s each (1 row, c=32)")
                    for name, server in group.items():
                        payload = loads[1].payloads[name]
                        run_load(server.base_url + payload.path, payload.body, payload.headers, connections=32,
                                 duration_s=warmup, generator=generator)
                    log.done("warm")
                    # Workload by workload, the servers one after another: whatever else the machine
                    # does at that moment weighs on all of them alike, so the ratios stay fair.
                    for w in loads:
                        for name in w.servers:
                            if name not in group:
                                continue
                            log(f"{model_name} {name}: {w.title} for {duration:g}s")
                            row = measure_http(group[name], w, duration, generator)
                            results.append(row)
                            failed = row["errors"] + row["timeouts"] + row["non_2xx"]
                            log.done(f"{row['req_s']:,.0f} req/s, {row['rows_s']:,.0f} rows/s, p50 {row['p50_ms']:.2f} ms, "
                                     f"p99 {row['p99_ms']:.2f} ms" + (f", {failed} FAILED" if failed else ""))
                    for name in ("starlette", "mlserver"):
                        if name in group:
                            model_memory[model_name][name] = group[name].memory()
                    if ray_dep is not None:
                        model_memory[model_name]["replicas"] = replica_memory(serve_model(ray_dep, model_name), model.runtime)
                        if model_name == IRIS:
                            results += measure_handles(((1, 1), (1, 32), (256, 8)), duration, log)
                            memory["after load"] = ray_dep.memory()
                            if options.soak_s > 0:
                                peak = _find(results, APP_NAME, "row1_c32")
                                idle = _find(results, APP_NAME, "row1_c1")
                                soak = run_soak(group[APP_NAME], loads[1], ray_dep, options.soak_s, generator, log,
                                                peak_req_s=peak["req_s"] if peak else None,
                                                idle_p50_ms=idle["p50_ms"] if idle else 0.0, load=options.soak_load)
                        else:
                            memory[f"after {model_name}"] = ray_dep.memory()
                finally:
                    for name, server in group.items():
                        if name != APP_NAME:
                            server.stop()
        finally:
            if ray_dep is not None:
                log("stopping Ray and HAProxy (by pid)")
                ray_dep.stop()
                ended, port = sorted(ray_dep.seen), ray_dep.http_port
                log.done("stopped")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    for r in results:
        if r["server"] == APP_NAME:
            r["runtime"] = models_info.get(r.get("model", IRIS), {}).get("runtime")
    add_ratios(results)
    outcome = {
        "mode": "quick" if options.quick else "full",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "serve-app bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else []),
        "machine": describe_machine(),
        "generator": generator if generator != "wrk" else f"wrk ({wrk_path()}), 2 threads",
        "duration_s": duration,
        "warmup_s": warmup,
        "config": str(options.config),
        "models": models_info,
        "mlserver": mlserver,
        "baselines": "flask = the seed's app on Flask's threaded dev server, sklearn predict (iris only); starlette = "
                     "uvicorn (uvloop, httptools) 1 worker, no access log, stdlib json via request.json(), the model "
                     "loaded from the store with load_verified and scikit-learn's own predict per request (input "
                     "validation included); mlserver = MLServer's scikit-learn runtime (mlserver_sklearn.SKLearnModel, "
                     f"the same estimator as model.joblib) with adaptive batching (max_batch_size "
                     f"{mlserver_runtime.MAX_BATCH_SIZE}, max_batch_time {mlserver_runtime.MAX_BATCH_TIME_S:g} s), "
                     "debug off, default parallel_workers, V2 JSON requests. All serve the same stored model.",
        "results": results,
        "goals": goals(results, [m for m in options.models if any(r.get("model", IRIS) == m for r in results)]),
        "memory": memory,
        "model_memory": model_memory,
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
        payload = workload.payloads[APP_NAME]
        result = run_load(server.base_url + payload.path, payload.body, payload.headers,
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