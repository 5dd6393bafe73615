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


def test_monitoring_overhead() -> None:
    out = _run("monitoring_overhead.py", "--duration", "1", "--rounds", "1", "--connections", "4")
    for name in ("off", "log0", "log100"):
        assert re.search(rf"round 1 {name} +\d+ req/s", out), out


def test_rollout_under_load() -> None:
    out = _run("rollout_under_load.py", "--seconds-per-step", "1", "--clients", "2")
    assert re.search(r"all steps: \d+ requests, 0 non-2xx", out), out
    for step in ("canary v2 at 10%", "canary v2 at 50%", "promote v2", "roll back to v1"):
        assert step in out, out
