"""What monitoring costs in throughput, measured on three copies of the same app side by side:
`off` (monitoring.enabled: false), `log0` (metrics, drift and accuracy on, no prediction log)
and `log100` (everything on, every request in the prediction log).

    .venv/bin/python benchmarks/monitoring_overhead.py [--duration 10] [--rounds 3] [--replicas 1]

Starts its own Ray (fast path: HAProxy, throughput-optimized) on free ports, drives each app
with the same load in turn (the order rotates every round), and prints the median requests/s
of each and the costs as medians of per-round ratios: the prediction log's (log100 vs log0),
the rest of monitoring's (log0 vs off) and the total. It ends every process it started. A
measurement, not a test: on a shared 2-core machine the figures move with other load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_app.ops import processes  # noqa: E402

STATE = Path(tempfile.mkdtemp(prefix="sa-mo", dir="/tmp"))
HTTP_PORT = processes.free_port()
os.environ.update(processes.FAST_PATH_ENV)
os.environ.update(processes.haproxy_env(STATE, stats_port=processes.free_port(), metrics_port=processes.free_port()))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--connections", type=int, default=32)
    options = parser.parse_args()

    import httpx
    import ray

    from serve_app.ops import control
    from serve_app.ops.loadgen import run_load
    from serve_app.model.store import ModelStore
    from serve_app.model.training import train

    store = ModelStore(STATE / "models")
    train(store)
    log_dir = STATE / "predlog"
    dashboard_port = processes.free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"

    def app(name: str, monitoring: dict) -> dict:
        return {
            "name": name, "route_prefix": f"/{name}", "import_path": "serve_app.app:build_app",
            "args": {"store": str(store.root), "monitoring": monitoring},
            "deployments": [{"name": "ModelServer", "num_replicas": options.replicas, "user_config": {"version": "production"}}],
        }

    # off: no monitoring at all; log0: metrics, drift and accuracy on, nothing logged;
    # log100: everything on and every request in the prediction log.
    configs = {
        "off": app("off", {"enabled": False}),
        "log0": app("log0", {"log_dir": str(log_dir), "log_sample_rate": 0.0}),
        "log100": app("log100", {"log_dir": str(log_dir), "log_sample_rate": 1.0}),
    }
    results: dict[str, list[float]] = {name: [] for name in configs}
    started: set[processes.Process] = set()
    try:
        ray.init(address="local", num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=dashboard_port, log_to_driver=False)
        started = processes.descendants(os.getpid())
        control.deploy({"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
                    "applications": list(configs.values())}, dashboard)
        for name in configs:
            control.wait_until_running(name, dashboard)
        body = json.dumps({"features": [5.1, 3.5, 1.4, 0.2]}).encode()
        headers = {"content-type": "application/json"}
        for name in configs:
            deadline = time.monotonic() + 60
            while httpx.post(f"http://127.0.0.1:{HTTP_PORT}/{name}/predict", content=body, headers=headers).status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} does not answer")
                time.sleep(0.5)
            run_load(f"http://127.0.0.1:{HTTP_PORT}/{name}/predict", body, headers, connections=options.connections, duration_s=2)  # warm-up
        for round_ in range(options.rounds):
            # The order turns each round so no arm always runs first (or after the same one).
            names = list(configs)
            names = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in names:
                load = run_load(f"http://127.0.0.1:{HTTP_PORT}/{name}/predict", body, headers,
                                connections=options.connections, duration_s=options.duration)
                rate = load.requests / load.duration_s
                results[name].append(rate)
                print(f"round {round_ + 1} {name:7s} {rate:8.0f} req/s  p50 {load.p50_ms:.2f} ms  p99 {load.p99_ms:.2f} ms  "
                      f"({load.generator}, non-2xx {load.non_2xx})", flush=True)
        time.sleep(2)
        lines = sum(len(p.read_bytes().splitlines()) for p in log_dir.glob("*.jsonl"))
        def cost_pct(arm: str, base: str) -> float:
            # Paired by round: the two arms ran minutes apart at most, under the same load.
            ratios = [a / b for a, b in zip(results[arm], results[base])]
            return round(100 * (1 - statistics.median(ratios)), 1)

        print(json.dumps({
            "median_rps": {name: round(statistics.median(rates)) for name, rates in results.items()},
            "prediction_log_cost_pct (log100 vs log0)": cost_pct("log100", "log0"),
            "monitoring_cost_pct (log0 vs off)": cost_pct("log0", "off"),
            "total_cost_pct (log100 vs off)": cost_pct("log100", "off"),
            "log_lines_written": lines,
            "rounds": options.rounds, "duration_s": options.duration, "replicas": options.replicas,
            "connections": options.connections, "load_average": [round(x, 2) for x in os.getloadavg()],
        }, indent=2))
    finally:
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            processes.end(started | processes.descendants(os.getpid()))
            shutil.rmtree(STATE, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
