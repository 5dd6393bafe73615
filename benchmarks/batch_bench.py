"""`serve-app batch` on Ray Data against a plain single-process pandas + scikit-learn script.

    .venv/bin/python benchmarks/batch_bench.py                 # 10 million rows
    .venv/bin/python benchmarks/batch_bench.py --rows 1000000  # quicker

Both read the same generated CSV, predict with the same stored model version and write
Parquet. Each runs in its own process; the figures are wall-clock seconds for the work
(reading to written output). For the Ray job, the time to start Ray is shown apart, and the
job runs twice in one driver: the first pays for starting workers that import scikit-learn
and load the model (~5 s of CPU each here), the second shows the steady rate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEATURES = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]


def generate(path: Path, rows: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    rng = np.random.default_rng(seed)
    with pa_csv.CSVWriter(path, pa.schema([(name, pa.float64()) for name in FEATURES])) as writer:
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            values = rng.uniform(0.1, 7.0, size=(n, 4)).round(2)
            writer.write_table(pa.table({name: values[:, j] for j, name in enumerate(FEATURES)}))


def baseline(csv: str, out: str, store: str, model: str) -> None:
    """The plain script: pandas reads, the sklearn model predicts, pandas writes."""
    import pandas as pd

    from serve_app.model.store import ModelStore

    started = time.perf_counter()
    estimator, _ = ModelStore(store).load_verified(model, "production")
    frame = pd.read_csv(csv)
    labels = estimator.predict(frame[FEATURES].to_numpy())
    pd.DataFrame({"row": range(len(labels)), "prediction": labels}).to_parquet(out)
    print(json.dumps({"seconds": time.perf_counter() - started, "rows": len(labels)}))


def ray_job(csv: str, out: str, store: str, model: str) -> None:
    import ray

    from serve_app.ops.batch import run_batch

    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - started
    result = run_batch(model, csv, out, store=store, progress=False, overwrite=True)
    # The same job again in the same driver: its workers have imported scikit-learn and
    # loaded the model, so this is the steady rate a long-running driver gets.
    warm = run_batch(model, csv, out, store=store, progress=False, overwrite=True)
    print(json.dumps({
        "seconds": result.seconds, "warm_seconds": warm.seconds, "init_seconds": init_s,
        "rows": result.rows, "errors": result.errors,
    }))
    ray.shutdown()


def run(mode: str, *args: str) -> dict[str, float]:
    reply = subprocess.run([sys.executable, __file__, f"--{mode}", *args], capture_output=True, text=True, check=True)
    return dict(json.loads(reply.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--store", default=None, help="model store (default: a fresh one with iris v1)")
    parser.add_argument("--model", default="iris")
    parser.add_argument("--baseline", nargs=4, metavar=("CSV", "OUT", "STORE", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--ray", nargs=4, metavar=("CSV", "OUT", "STORE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        baseline(*args.baseline)
        return 0
    if args.ray:
        ray_job(*args.ray)
        return 0

    work = Path(tempfile.mkdtemp(prefix="sa-batch-bench-"))
    try:
        store = args.store
        if store is None:
            from serve_app.model.store import ModelStore
            from serve_app.model.training import train

            store = str(work / "models")
            train(ModelStore(store))
        csv = work / "rows.csv"
        t = time.perf_counter()
        generate(csv, args.rows)
        print(f"generated {args.rows:,} rows ({csv.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f}s: {csv}")
        plain = run("baseline", str(csv), str(work / "plain.parquet"), store, args.model)
        ray_result = run("ray", str(csv), str(work / "ray.parquet"), store, args.model)
        plain_rate = plain["rows"] / plain["seconds"]
        ray_rate = ray_result["rows"] / ray_result["seconds"]
        with_init = ray_result["rows"] / (ray_result["seconds"] + ray_result["init_seconds"])
        print(f"pandas + sklearn, 1 process : {plain['seconds']:6.1f} s  {plain_rate:12,.0f} rows/s")
        print(f"serve-app batch (Ray Data)  : {ray_result['seconds']:6.1f} s  {ray_rate:12,.0f} rows/s"
              f"  (+ {ray_result['init_seconds']:.1f} s to start Ray: {with_init:,.0f} rows/s)")
        warm_rate = ray_result["rows"] / ray_result["warm_seconds"]
        print(f"  same job again, warm workers: {ray_result['warm_seconds']:6.1f} s  {warm_rate:12,.0f} rows/s")
        print(f"ratio: {ray_rate / plain_rate:.2f}x ({with_init / plain_rate:.2f}x counting Ray start-up; "
              f"{warm_rate / plain_rate:.2f}x on warm workers); goal >= 1.5x")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the CSV alone is 195 MB at 10 M rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
