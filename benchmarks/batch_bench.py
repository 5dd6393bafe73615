"""`serve-app batch` on Ray Data against a plain single-process pandas + scikit-learn script.

    .venv/bin/python benchmarks/batch_bench.py                     # iris, 10 million rows
    .venv/bin/python benchmarks/batch_bench.py --rows 1000000      # quicker
    .venv/bin/python benchmarks/batch_bench.py --heavy             # the forest (issue 17), 10 M rows
    .venv/bin/python benchmarks/batch_bench.py --heavy --trees 5 --rows 20000   # a smoke run

Both read the same generated CSV, predict with the same stored model version and write
Parquet. Each runs in its own process; the figures are wall-clock seconds for the work
(reading to written output), and each side's peak memory: the pandas script's peak RSS
(one process, from the kernel's accounting), and for the Ray job the peak of the RSS summed
over the driver and every process below it (Ray's GCS, raylet and workers), sampled every
0.2 s. For the Ray job, the time to start Ray is shown apart and counted in the ratio.

iris (default): LogisticRegression on 4 features; the job runs twice in one driver: the
first pays for starting workers that import scikit-learn and load the model, the second
shows the steady rate. `--heavy`: the forest of `serve-app train --dataset synthetic30
--estimator random_forest_200` (RandomForest, 200 trees, 30 features), served by the
runtime its manifest chose at publish time (ONNX Runtime once compiled inference verified
it), once; rows drawn from the dataset's held-out rows plus a little noise. `--trees N`
fits a smaller forest on the same data instead (tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

IRIS_FEATURES = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
HEAVY_NAME = "forest"
HEAVY_TREES = 200
GOALS = {"iris": 1.5, HEAVY_NAME: 5.0}  # serve-app batch over pandas, Ray's start-up included (issues 3, 17)


def generate(path: Path, rows: int, features: list[str], pool: Any = None, seed: int = 0) -> None:
    """`rows` rows under a header of `features`: uniform iris-like values, or, given `pool`
    (held-out rows of the model's dataset), rows drawn from it with a little noise."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    rng = np.random.default_rng(seed)
    with pa_csv.CSVWriter(path, pa.schema([(name, pa.float64()) for name in features])) as writer:
        for start in range(0, rows, 500_000):
            n = min(500_000, rows - start)
            if pool is None:
                values = rng.uniform(0.1, 7.0, size=(n, len(features))).round(2)
            else:
                values = (pool[rng.integers(len(pool), size=n)] + rng.normal(0, 0.05, size=(n, len(features)))).round(3)
            writer.write_table(pa.table({name: values[:, j] for j, name in enumerate(features)}))


def publish_forest(store: str, trees: int) -> Any:
    """The forest into `store` as `forest` (production); returns held-out rows to draw from."""
    from serve_app.model import training
    from serve_app.model.store import ModelStore
    from serve_app.ops.bench import HEAVY_SAMPLES, heavy_dataset

    x_train, y_train, x_test, _ = heavy_dataset(HEAVY_SAMPLES)
    if trees == HEAVY_TREES and "synthetic30" in training.DATASETS and "random_forest_200" in training.ESTIMATORS["classification"]:
        training.train(ModelStore(store), name=HEAVY_NAME, dataset="synthetic30", estimator="random_forest_200")
        return x_test
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=trees, random_state=0).fit(x_train, y_train)
    training.save_fitted(ModelStore(store), model, name=HEAVY_NAME, feature_names=[f"x{i:02d}" for i in range(x_train.shape[1])],
                         reference=x_train, held_out=x_test, dataset="synthetic30")
    return x_test


def baseline(csv: str, out: str, store: str, model: str) -> None:
    """The plain script: pandas reads, the scikit-learn model predicts, pandas writes."""
    import pandas as pd

    from serve_app.model.store import ModelStore

    started = time.perf_counter()
    estimator, manifest = ModelStore(store).load_verified(model, "production")
    frame = pd.read_csv(csv)
    labels = estimator.predict(frame[list(manifest.feature_names)].to_numpy())
    pd.DataFrame({"row": range(len(labels)), "prediction": labels}).to_parquet(out)
    print(json.dumps({"seconds": time.perf_counter() - started, "rows": len(labels)}))


class PeakRss:
    """The largest RSS summed over this process and all below it, sampled in a thread."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        from serve_app.ops.processes import descendants, memory_kib

        me = os.getpid()
        while not self._stop.is_set():
            total = memory_kib(me, "VmRSS") + sum(memory_kib(pid, "VmRSS") for pid, _ in descendants(me))
            self.peak_kib = max(self.peak_kib, total)
            self._stop.wait(every_s)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def ray_job(csv: str, out: str, store: str, model: str, twice: bool) -> None:
    import ray

    from serve_app.ops.batch import run_batch

    with PeakRss() as peak:
        started = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - started
        result = run_batch(model, csv, out, store=store, progress=False, overwrite=True)
        figures: dict[str, Any] = {"seconds": result.seconds, "init_seconds": init_s, "rows": result.rows,
                                   "errors": result.errors}
        if twice:
            # The same job again in the same driver: its workers have imported scikit-learn and
            # loaded the model, so this is the steady rate a long-running driver gets.
            figures["warm_seconds"] = run_batch(model, csv, out, store=store, progress=False, overwrite=True).seconds
        figures["peak_rss_mib"] = peak.peak_kib / 1024
        ray.shutdown()
    print(json.dumps(figures))


def run(mode: str, *args: str) -> dict[str, Any]:
    """One side in its own process; its peak RSS (the process alone) from the kernel."""
    proc = subprocess.Popen([sys.executable, __file__, f"--{mode}", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    proc.stdout.close(), proc.stderr.close()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{mode} failed: {stderr.decode(errors='replace')[-2000:]}")
    figures = dict(json.loads(stdout.decode().strip().splitlines()[-1]))
    figures.setdefault("peak_rss_mib", usage.ru_maxrss / 1024)  # ru_maxrss is in KiB on Linux
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--heavy", action="store_true", help="the forest (200 trees, 30 features) instead of iris")
    parser.add_argument("--trees", type=int, default=HEAVY_TREES, help="with --heavy: trees of the forest (default 200)")
    parser.add_argument("--store", default=None, help="model store (default: a fresh one with the model)")
    parser.add_argument("--model", default=None, help="model name in --store (default: iris, or forest with --heavy)")
    parser.add_argument("--baseline", nargs=4, metavar=("CSV", "OUT", "STORE", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--ray", nargs=5, metavar=("CSV", "OUT", "STORE", "MODEL", "TWICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        baseline(*args.baseline)
        return 0
    if args.ray:
        ray_job(*args.ray[:4], twice=args.ray[4] == "1")
        return 0

    model = args.model or (HEAVY_NAME if args.heavy else "iris")
    work = Path(tempfile.mkdtemp(prefix="sa-batch-bench-"))
    try:
        from serve_app.model.store import ModelStore

        store = args.store
        pool = None
        if store is None:
            store = str(work / "models")
            t = time.perf_counter()
            if args.heavy:
                pool = publish_forest(store, args.trees)
            else:
                from serve_app.model.training import train

                train(ModelStore(store))
            print(f"trained {model} in {time.perf_counter() - t:.1f}s")
        elif args.heavy:
            from serve_app.ops.bench import HEAVY_SAMPLES, heavy_dataset

            pool = heavy_dataset(HEAVY_SAMPLES)[2]
        manifest = ModelStore(store).manifest(model)
        runtime = getattr(manifest, "runtime", "sklearn")
        print(f"model: {model} v{manifest.version} {manifest.estimator.rsplit('.', 1)[-1]} "
              f"({manifest.n_features} features), runtime {runtime}")
        csv = work / "rows.csv"
        t = time.perf_counter()
        generate(csv, args.rows, list(manifest.feature_names) if args.heavy else IRIS_FEATURES, pool)
        print(f"generated {args.rows:,} rows ({csv.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f}s: {csv}")
        plain = run("baseline", str(csv), str(work / "plain.parquet"), store, model)
        ray_result = run("ray", str(csv), str(work / "ray.parquet"), store, model, "0" if args.heavy else "1")
        plain_rate = plain["rows"] / plain["seconds"]
        ray_rate = ray_result["rows"] / ray_result["seconds"]
        with_init = ray_result["rows"] / (ray_result["seconds"] + ray_result["init_seconds"])
        print(f"pandas + sklearn, 1 process : {plain['seconds']:6.1f} s  {plain_rate:12,.0f} rows/s"
              f"  peak RSS {plain['peak_rss_mib']:,.0f} MiB")
        print(f"serve-app batch (Ray Data)  : {ray_result['seconds']:6.1f} s  {ray_rate:12,.0f} rows/s"
              f"  (+ {ray_result['init_seconds']:.1f} s to start Ray: {with_init:,.0f} rows/s)"
              f"  peak RSS {ray_result['peak_rss_mib']:,.0f} MiB (driver + Ray's processes)")
        if "warm_seconds" in ray_result:
            warm_rate = ray_result["rows"] / ray_result["warm_seconds"]
            print(f"  same job again, warm workers: {ray_result['warm_seconds']:6.1f} s  {warm_rate:12,.0f} rows/s")
        goal = GOALS.get(model, GOALS["iris"])
        ratio = with_init / plain_rate
        print(f"ratio: {ray_rate / plain_rate:.2f}x ({ratio:.2f}x counting Ray start-up); "
              f"goal >= {goal:g}x counting start-up: {'met' if ratio >= goal else 'NOT MET'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the CSV alone is 195 MB at 10 M iris rows, ~2 GB heavy
    return 0


if __name__ == "__main__":
    sys.exit(main())
