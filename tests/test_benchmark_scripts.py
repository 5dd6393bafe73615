"""The scripts in benchmarks/ whose figures the README quotes, run small: each completes,
prints its figures and ends what it started. What the figures are is theirs to say."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from .conftest import env_for_own_ray, run_bounded

pytestmark = [pytest.mark.ray, pytest.mark.scenario]

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    env = env_for_own_ray()
    env["PYTHONPATH"] = str(REPO)
    done = run_bounded([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env, timeout_s=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_batch_bench() -> None:
    out = _run("batch_bench.py", "--rows", "20000")
    assert "generated 20,000 rows" in out
    assert re.search(r"pandas \+ sklearn, 1 process : +[\d.]+ s +[\d,]+ rows/s", out), out
    assert re.search(r"serve-app batch \(Ray Data\)  : +[\d.]+ s .*to start Ray", out), out
    assert re.search(r"ratio: [\d.]+x", out), out
    assert len(re.findall(r"peak RSS [\d,]+ MiB", out)) == 2, out  # each side's


def test_batch_bench_heavy_model() -> None:
    """The forest mode, with a 3-tree forest on the same 30-feature data: both sides run,
    each one's peak RSS and the ratio with Ray's start-up against issue 17's goal are printed."""
    out = _run("batch_bench.py", "--heavy", "--trees", "3", "--rows", "20000")
    assert re.search(r"model: forest v1 RandomForestClassifier \(30 features\), runtime (onnxruntime|sklearn)", out), out
    assert "generated 20,000 rows" in out
    assert re.search(r"pandas \+ sklearn, 1 process : +[\d.]+ s +[\d,]+ rows/s +peak RSS [\d,]+ MiB", out), out
    assert re.search(r"serve-app batch \(Ray Data\)  : .*to start Ray.*peak RSS [\d,]+ MiB", out), out
    assert "warm workers" not in out  # the heavy job runs once: the goal counts the cold start
    assert re.search(r"goal >= 5x counting start-up: (met|NOT MET)", out), out


def test_monitoring_overhead() -> None:
    out = _run("monitoring_overhead.py", "--duration", "1", "--rounds", "1", "--connections", "4")
    for name in ("off", "log0", "log100"):
        assert re.search(rf"round 1 {name} +\d+ req/s", out), out


def test_rollout_under_load() -> None:
    out = _run("rollout_under_load.py", "--seconds-per-step", "1", "--clients", "2")
    assert re.search(r"all steps: \d+ requests, 0 non-2xx", out), out
    for step in ("canary v2 at 10%", "canary v2 at 50%", "promote v2", "roll back to v1"):
        assert step in out, out
