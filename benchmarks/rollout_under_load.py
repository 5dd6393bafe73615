"""Version control under steady load, as a benchmark: canary 90/10 -> 50/50, promote, roll back.

    .venv/bin/python benchmarks/rollout_under_load.py [--seconds-per-step 10] [--clients 8]

Starts the project's deployment (configs/local.yaml on a private Ray, like `serve-app bench`)
with iris v1 (LogisticRegression) and v2 (RandomForest), keeps `--clients` connections sending
1-row requests, and applies each step live (serve_app.ops.rollout, the same calls as the CLI). It
prints, per step, the requests sent, non-2xx, and which versions answered; requests are
stamped when sent, and one sent after a step completed must be answered by that step's
versions. Exits 1 if any request failed or a version answered that was not live.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from serve_app.ops import rollout
from serve_app.ops.localray import RayDeployment
from serve_app.ops.progress import Progress
from serve_app.model.store import ModelStore
from serve_app.model.training import train

ROOT = Path(__file__).resolve().parents[1]
ROW = [6.7, 3.0, 5.2, 2.3]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds-per-step", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    options = parser.parse_args()
    log = Progress("rollout")
    # In /tmp, whatever TMPDIR says: Ray's session dir goes under it, and its unix sockets
    # must stay within 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="sa-rollout-", dir="/tmp"))
    store = ModelStore(work / "models")
    train(store)
    train(store, estimator="random_forest")
    deployment = RayDeployment(ROOT / "configs" / "local.yaml", store.root, work, log)
    records: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    reply = http.post(f"{deployment.base_url}/predict", json={"features": ROW})
                    records.append((sent, reply.status_code, reply.json().get("version") if reply.status_code == 200 else None))
                except httpx.HTTPError:
                    records.append((sent, 0, None))

    target = rollout.Target(address=None, app="serve_app")
    steps = [
        ("v1 alone", {"1"}, None),
        ("canary v2 at 10%", {"1", "2"}, lambda t: rollout.set_canary("2", 0.1, None, t)),
        ("canary v2 at 50%", {"1", "2"}, lambda t: rollout.set_canary("2", 0.5, None, t)),
        ("promote v2", {"2"}, lambda t: rollout.serve_version("2", t)),
        ("roll back to v1", {"1"}, lambda t: rollout.serve_version("1", t)),
    ]
    failed = False
    try:
        deployment.start()
        target = rollout.Target(address=deployment.dashboard, app="serve_app", url=deployment.base_url)
        threads = [threading.Thread(target=client, daemon=True) for _ in range(options.clients)]
        for thread in threads:
            thread.start()
        print(f"{'step':<20} {'switch s':>8} {'sent':>7} {'non-2xx':>8}  versions answering (share)")
        for name, live, action in steps:
            switch_started = time.monotonic()
            if action is not None:
                action(target)
            applied = time.monotonic()
            time.sleep(options.seconds_per_step)
            window = [r for r in records if applied <= r[0] < time.monotonic()]
            versions = Counter(v for _, _, v in window)
            bad = sum(1 for _, code, _ in window if code != 200)
            shares = ", ".join(f"v{v}: {n / len(window):.0%}" for v, n in sorted(versions.items(), key=str))
            print(f"{name:<20} {applied - switch_started:>8.1f} {len(window):>7} {bad:>8}  {shares}")
            if bad or not set(versions) <= live:
                failed = True
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        total_bad = sum(1 for _, code, _ in records if code != 200)
        print(f"all steps: {len(records)} requests, {total_bad} non-2xx")
        failed = failed or total_bad > 0
    finally:
        stop.set()
        deployment.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
