"""`serve-app tune`: a short real run produces the table, plot and a tuned config that deploys.

The run starts its own Ray in a child process (like tests/test_bench.py), apart from the
session's; the tuned YAML is then deployed on the session's Ray. No timing is asserted: the
SLO is set loose so the run has something to recommend on a loaded machine, and the
figures themselves are the tool's output, not the test's business.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.ops import control
from serve_app.ops.tune import Point, Setting, best_at_slo, default_setting, patched_yaml, with_setting

from .conftest import app_config, env_for_own_ray, run_bounded
from .readme import command_starting, record

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "configs" / "local.yaml"


def _validate(config: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)


def _point(setting: Setting, connections: int, req_s: float, p99: float, failed: int = 0, slo: float = 20.0) -> Point:
    return Point(setting.label, setting.replicas, setting.max_ongoing, setting.max_batch_size,
                 setting.batch_wait_timeout_s, "batch", connections, req_s, p99 / 2, p99, p99, p99, 100, failed,
                 failed == 0 and p99 <= slo, 1.0)


def test_default_setting_reads_the_config() -> None:
    assert default_setting(control.load_config(LOCAL)) == Setting(2, 512, 256, 0.0)


def test_patched_yaml_keeps_the_comments_and_loads_as_the_setting(tmp_path: Path) -> None:
    chosen = Setting(replicas=3, max_ongoing=128, max_batch_size=64, batch_wait_timeout_s=0.002)
    text = patched_yaml(LOCAL, chosen, ["measured: 1,234 req/s at p99 9.9 ms"])
    assert text.startswith("# measured: 1,234 req/s at p99 9.9 ms\n")
    assert "# one per core on a 2-core laptop" in text  # the original's own comments survive
    out = tmp_path / "tuned.yaml"
    out.write_text(text)
    config = control.load_config(out)
    _validate(config)
    assert config == with_setting(control.load_config(LOCAL), chosen)
    entry = control.find_app(config)["deployments"][0]
    assert (entry["num_replicas"], entry["max_ongoing_requests"]) == (3, 128)
    assert entry["user_config"] == {"version": "production", "max_batch_size": 64, "batch_wait_timeout_s": 0.002}


def test_best_at_slo_skips_points_over_the_slo_or_with_failures() -> None:
    a, b = Setting(1, 512, 256, 0.0), Setting(2, 512, 256, 0.0)
    points = [_point(a, 16, 900, 12), _point(b, 16, 1500, 35), _point(b, 4, 1200, 8, failed=1), _point(b, 1, 400, 3)]
    assert best_at_slo(points) is points[0]
    assert best_at_slo([_point(a, 1, 10, 50)]) is None
    # A tie in throughput goes to fewer replicas.
    assert best_at_slo([_point(b, 4, 1000, 5), _point(a, 4, 1000, 6)]).replicas == 1  # type: ignore[union-attr]


def test_repeated_runs_count_by_their_worst() -> None:
    a, b = Setting(1, 512, 256, 0.0), Setting(2, 512, 256, 0.0)
    # a: two climbs; the second stopped at c=4 (over the SLO), so its c=16 from the first does not count.
    points = [_point(a, 4, 900, 10), _point(a, 16, 2000, 15), _point(a, 4, 800, 25),
              _point(b, 4, 1000, 9), _point(b, 4, 1100, 12)]
    best = best_at_slo(points)
    assert best is not None and (best.replicas, best.req_s, best.p99_ms) == (2, 1000, 12)


@pytest.mark.ray
@pytest.mark.scenario
def test_readme_tune_command_short_run(tmp_path: Path, ray_session: Any, session_store: Any) -> None:
    out = tmp_path / "tune"
    env = env_for_own_ray()
    command = command_starting("serve-app tune ")
    # The README's command with its loose SLO raised for a loaded CI machine (its figures are
    # the tool's output, not the test's business) and a short budget.
    argv = shlex.split(command.split("#")[0]) + ["--budget-s", "40", "--max-replicas", "2", "--max-connections", "8", "--out", str(out)]
    argv[argv.index("--slo-p99-ms") + 1] = "500"
    done = run_bounded([str(REPO / ".venv" / "bin" / argv[0]), *argv[1:]], cwd=REPO, env=env, timeout_s=900)
    record(command)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "stopping Ray and HAProxy" in done.stdout

    report = json.loads((out / "tune.json").read_text())
    points = report["points"]
    assert {p["phase"] for p in points} >= {"default"}
    assert len({p["setting"] for p in points}) >= 2  # the default and at least one other setting
    for p in points:  # every measured request of every point was answered 2xx
        assert p["requests"] > 0 and p["failed"] == 0, p
    recommended = report["recommended"]
    assert recommended is not None and recommended["meets_slo"]
    runs = [p for p in points if not p["phase"].startswith("confirm") and p["setting"] == recommended["setting"]
            and p["connections"] == recommended["connections"]]
    assert runs and all(p["meets_slo"] for p in runs)
    assert recommended["req_s"] == min(p["req_s"] for p in runs)  # the worst of its runs, not the luckiest

    table = (out / "tune.md").read_text()
    assert table.count("\n| ") == len(points) + 1  # the header and one row per point
    assert "Recommended:" in table
    png = (out / "tune.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    config = control.load_config(out / "tuned.yaml")
    _validate(config)
    entry = control.find_app(config)["deployments"][0]
    assert entry["num_replicas"] == recommended["replicas"]
    assert entry["max_ongoing_requests"] == recommended["max_ongoing"]
    assert entry["user_config"]["max_batch_size"] == recommended["max_batch_size"]
    assert entry["user_config"]["batch_wait_timeout_s"] == recommended["batch_wait_timeout_s"]
    assert "req/s at p99" in (out / "tuned.yaml").read_text().split("applications:")[0]  # figures as comments

    from serve_app.ops.processes import alive

    started = [tuple(p) for p in report["deployment_processes"]]
    assert started and not [p for p in started if alive(p)]  # type: ignore[arg-type]

    # The tuned app deploys as written on the session's Ray; only what points at this
    # machine's files changes (the store, the prediction log) and the route, to share it.
    app = control.find_app(config)
    app.update(name="tuned", route_prefix="/tuned")
    app["args"] = {**app["args"], "store": str(session_store.root)}
    app["args"]["monitoring"] = {**app["args"]["monitoring"], "log_dir": str(tmp_path / "predictions")}
    ray_session.apply(app)
    try:
        answer = httpx.post(f"{ray_session.base_url}/tuned/predict", json={"features": [5.1, 3.5, 1.4, 0.2]}, timeout=10)
        assert answer.status_code == 200 and answer.json()["prediction"] == 0
        status = httpx.get(f"{ray_session.base_url}/tuned/admin/status", timeout=10).json()
        assert status["max_batch_size"] == recommended["max_batch_size"]
        assert status["batch_wait_timeout_s"] == recommended["batch_wait_timeout_s"]
        deployment = control.details(ray_session.dashboard)["applications"]["tuned"]["deployments"]["ModelServer"]
        assert deployment["deployment_config"]["num_replicas"] == recommended["replicas"]
    finally:
        ray_session.remove("tuned")


@pytest.mark.ray
@pytest.mark.scenario
def test_tune_on_a_running_cluster_restores_its_config(tmp_path: Path, ray_session: Any, session_store: Any) -> None:
    """`--address`: the app it was pointed at gets its original config back afterwards."""
    from serve_app.ops.tune import TuneOptions, run

    # Not the code's defaults (256, 0.0), which the sweep itself tries: only a restore puts these back.
    ray_session.apply(app_config(session_store, name="tune_target", route_prefix="/tune_target", num_replicas=1,
                                 user_config={"max_batch_size": 77, "batch_wait_timeout_s": 0.003}, monitoring={"enabled": False}))
    try:
        before = control.find_app(control.deployed_config(ray_session.dashboard), "tune_target")
        report = run(TuneOptions(
            config=LOCAL, slo_p99_ms=500, max_replicas=1, budget_s=20, out=tmp_path / "tune",
            address=ray_session.dashboard, app="tune_target", max_connections=4,
        ))
        assert report["error"] == "" and not report["interrupted"], report["verdict"]
        assert report["restored"].startswith("the original config was redeployed"), report["restored"]
        assert report["points"] and all(p["requests"] > 0 and p["failed"] == 0 for p in report["points"])
        assert len({p["setting"] for p in report["points"]}) >= 2  # something was changed, then put back
        assert control.find_app(control.deployed_config(ray_session.dashboard), "tune_target") == before
        status = httpx.get(f"{ray_session.base_url}/tune_target/admin/status", timeout=10).json()
        assert (status["max_batch_size"], status["batch_wait_timeout_s"]) == (77, 0.003)
    finally:
        ray_session.remove("tune_target")


def test_tune_outside_a_checkout_says_it_needs_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serve_app.ops.cli import main

    argv = ["tune", "--slo-p99-ms", "10", "--config", str(tmp_path / "local.yaml"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "no such file" in error and "checkout" in error
    assert not (tmp_path / "out").exists()
