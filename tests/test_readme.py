"""The README is true: its commands run, and give the answers it shows.

`make run` is started in a copy of the repository (so its store starts empty, as on a fresh
clone), the README's curl, Python and serve-app commands are run against it, then it is
stopped with Ctrl-C (SIGINT to its process group, as a terminal does), twice in a row.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from serve_app.ops import processes

from .conftest import run_bounded, wait_for


from .readme import ROOT, blocks_in, command_starting, commands_with_answers, every_command, on_port, record, section

pytestmark = [pytest.mark.ray, pytest.mark.scenario]
# Not 8000: a developer's own `make run` may hold it. The copy's configs/local.yaml and every
# command run from the README are pointed at this port instead.
PORT = processes.free_port()


def copy_of_repo(destination: Path) -> Path:
    # What a clone would hold: tracked files plus new ones not ignored (.venv, models/ are ignored).
    listing = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    tracked = subprocess.run(listing, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)  # keeps mtimes: make sees .venv as up to date
    (destination / ".venv").symlink_to(ROOT / ".venv")
    config = destination / "configs" / "local.yaml"
    text = config.read_text()
    assert "  port: 8000\n" in text
    config.write_text(text.replace("  port: 8000\n", f"  port: {PORT}\n"))
    return destination


IRIS_PROBE = ("/predict", {"features": [5.1, 3.5, 1.4, 0.2]})


class MakeRun:
    """`make run` in the foreground of its own process group, stopped like Ctrl-C; serving once
    `probe` (path, JSON body) is answered 200. `make_args` follow `run` (`MODEL=churn`)."""

    def __init__(self, repo: Path, make_args: tuple[str, ...] = (), probe: tuple[str, Any] = IRIS_PROBE) -> None:
        self.repo = repo
        self.make_args = make_args
        self.probe = probe
        self.log = repo / f"make-run-{time.monotonic_ns()}.log"
        self.seen: set[processes.Process] = set()

    def __enter__(self) -> "MakeRun":
        assert processes.port_is_free(PORT), f"port {PORT} is in use: stop what holds it before running this test"
        env = user_env()
        self.proc = subprocess.Popen(
            # -o: the copy shares this checkout's .venv, which must keep pointing here.
            ["make", "-o", ".venv/.installed", "run", *self.make_args], cwd=self.repo, env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True
        )

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            self.seen |= processes.descendants(self.proc.pid)
            if self.proc.poll() is not None:
                raise AssertionError(f"make run exited early:\n{self.log.read_text()[-3000:]}")
            try:
                reply = httpx.post(f"http://127.0.0.1:{PORT}{self.probe[0]}", json=self.probe[1], timeout=5)
                if reply.status_code == 200:
                    self.first_answer = reply.json()
                    self.seen |= processes.descendants(self.proc.pid)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"make run did not serve within 240 s:\n{self.log.read_text()[-3000:]}")

    def ray_address(self) -> str:
        """The GCS address of this run's Ray, from its gcs_server's command line."""
        for pid, _ in processes.descendants(self.proc.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"gcs_server"):
                pairs = (a.decode().lstrip("-").split("=", 1) for a in argv[1:] if b"=" in a)
                args = {key.replace("_", "-"): value for key, value in pairs}
                # It picks its port at start (--gcs_server_port=0) and writes it in the session dir.
                port = (Path(args["session-dir"]) / f"gcs_server_port_{args['node-id']}").read_text().strip()
                return f"{args['node-ip-address']}:{port}"
        raise AssertionError("no gcs_server under make run")

    def stop(self) -> str:
        """Ctrl-C, then the run's own last words: make itself reports the interrupt."""
        self.seen |= processes.descendants(self.proc.pid)
        os.killpg(self.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        self.proc.wait(timeout=150)
        return self.log.read_text()

    def assert_clean_stop(self) -> None:
        log = self.stop() if self.proc.poll() is None else self.log.read_text()
        assert f"serve-app: stopped; port {PORT} is free" in log, log[-3000:]
        leftovers = [p for p in self.seen if processes.alive(p)]
        assert not leftovers, f"make run left processes behind: {leftovers}"
        assert processes.port_is_free(PORT)

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()
        processes.end(self.seen)  # never leave anything behind, even when the test failed


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_of_repo(tmp_path_factory.mktemp("clone"))


@pytest.fixture(scope="module")
def running(repo: Path) -> Iterator[MakeRun]:
    with MakeRun(repo) as run:
        # A fresh clone's store is empty: make run trained the default model first.
        assert "training the default one" in run.log.read_text()
        # The quick start's `make run` (the README's other one serves MODEL=my-churn).
        record(commands_with_answers(blocks_in("## Quick start", "bash")[0])[0][0])
        yield run
        run.assert_clean_stop()


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell: none of this test session's Ray settings (its RAY_AUTH_MODE, HAProxy
    files, ports), the venv's bin first on PATH, then what the README tells them to set."""
    # The publisher key stays in this run's temp dir, not in the real ~/.config/serve_app.
    kept = ("RAY_USAGE_STATS_ENABLED", "SERVE_APP_SIGNING_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SERVE_APP_")) or k in kept}
    return {**env, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", **extra}


def readme_exports() -> dict[str, str]:
    """The `export NAME=value` lines the README gives for attaching to `make run`'s Ray."""
    (block,) = blocks_in("## From Python", "bash")
    exports = dict(re.findall(r"^export (\w+)=(\S+)", block, flags=re.M))
    assert exports == {"RAY_AUTH_MODE": "token"}, exports
    record(command_starting("export RAY_AUTH_MODE=token"))
    return exports


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it has exited
        return b""


def shell(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run_bounded(["bash", "-c", command], cwd=cwd, env=user_env(**env), timeout_s=300)


def run_readme(command: str, cwd: Path, filled: dict[str, str] | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs a README command line against this module's `make run` (its placeholders, such as
    <x-request-id>, `filled`), and records it as run."""
    text = on_port(command, PORT)
    for placeholder, value in (filled or {}).items():
        text = text.replace(placeholder, value)
    result = shell(text, cwd, **env)
    record(command)
    return result


def test_the_commands_of_the_quick_start_are_documented_and_run_by_ci() -> None:
    quick_start = [c for c, _ in commands_with_answers(blocks_in("## Quick start", "bash")[0])]
    assert quick_start[:3] == [
        "make run               # creates .venv, installs, trains iris if the store is empty, serves on 127.0.0.1:8000",
        "make test              # the fast tier: unit tests and the real Ray + real HTTP ones (under 8 minutes)",
        "make test-scenarios    # the multi-minute scenarios: this README, a 3-node cluster, bench, tune, chaos, browser",
    ]
    # `make run` is run by the fixture below; CI runs both tiers through .ci/run, which is what runs this file.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nmake test PYTEST_ARGS=" in ci and "\nmake test-scenarios PYTEST_ARGS=" in ci
    record(quick_start[1])
    record(quick_start[2])


def test_curl_examples_answer_as_shown(running: MakeRun) -> None:
    checked = 0
    for block in blocks_in("## Ask it for predictions", "bash"):
        for command, shown in commands_with_answers(block):
            result = run_readme(command, running.repo)
            assert result.returncode == 0, (command, result.stderr)
            body = json.loads(result.stdout)
            if shown is not None:
                assert body == json.loads(shown), (command, body)
                checked += 1
            elif "/v2/health/ready" in command:
                assert body == {"ready": True} or body.get("ready") is True, body
            elif "openapi.json" in command:
                assert "/predict" in body["paths"], body
            else:
                assert body["name"] == "iris" and body["versions"] and body["inputs"], (command, body)
    assert checked >= 5


def test_python_examples_run(running: MakeRun) -> None:
    blocks = blocks_in("## Ask it for predictions", "python") + blocks_in("## From Python", "python")
    assert len(blocks) == 3
    for block in blocks:
        result = run_bounded(
            [sys.executable, "-c", on_port(block, PORT)], cwd=running.repo, timeout_s=180,
            env=user_env(**readme_exports(), RAY_ADDRESS=running.ray_address()),
        )
        assert result.returncode == 0, (block, result.stderr[-3000:])
        record(block)


def test_training_and_rollout_commands_run(running: MakeRun) -> None:
    manage = blocks_in("## Train and manage versions", "bash")
    assert len(manage) == 3  # training, publishing keys, rolling out
    for block in manage:
        for command, _ in commands_with_answers(block):
            result = run_readme(command, running.repo)
            assert result.returncode == 0, (command, result.stdout, result.stderr)
    # The rollout block ended on v1 without canary or shadow: every replica agrees.
    status = json.loads(shell("serve-app models status", running.repo).stdout)
    assert status["replicas"] and all(r["routing"]["default"] == "1" and r["routing"]["canary"] is None for r in status["replicas"])


def test_monitoring_commands_run(running: MakeRun) -> None:
    block = blocks_in("## Monitoring", "bash")[0]
    commands = [c for c, _ in commands_with_answers(block)]
    assert [c.split()[0:3] for c in commands] == [["curl", "-s", "-X"], ["curl", "-s", "-X"], ["curl", "-s", "127.0.0.1:8000/v2/models/iris/accuracy"],
                                                   ["curl", "-s", "127.0.0.1:8000/v2/models/iris/drift"], ["serve-app", "report", "--url"]]
    first = run_readme(commands[0], running.repo)
    request_id = re.search(r"^x-request-id: (\S+)", first.stdout, flags=re.M | re.I)
    assert request_id, first.stdout
    assert json.loads(first.stdout.split("\n\n", 1)[1])["prediction"] == 0  # setosa: the label 0 sent back is right

    feedback = run_readme(commands[1], running.repo, {"<x-request-id>": request_id.group(1)})
    answer = json.loads(feedback.stdout)
    assert answer["rejected"] == [] and answer["joined"] + answer["pending"] == 1, answer

    def accuracy() -> dict[str, Any] | None:
        versions = json.loads(run_readme(commands[2], running.repo).stdout)["versions"]
        return versions.get("1") if versions.get("1", {}).get("labelled_rows") else None

    wait_for(accuracy, timeout_s=30, what="the label to be joined")
    v1 = accuracy()
    assert v1 is not None and v1["labelled_rows"] >= 1 and v1["accuracy"] == 1.0, v1  # every label sent here was right

    drift = json.loads(run_readme(commands[3], running.repo).stdout)
    assert drift["model"] == "iris" and "1" in drift["versions"], drift
    assert set(drift["versions"]["1"]["features"]) == {"sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"}

    report = run_readme(commands[4], running.repo)
    assert report.returncode == 0, (report.stdout, report.stderr)
    page = (running.repo / "report.html").read_text()
    assert "petal width (cm)" in page and "data:image/png;base64," in page
    assert (running.repo / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_command_runs(running: MakeRun) -> None:
    block = blocks_in("## Cluster, batch jobs, streaming", "bash")[0]
    (command,) = [c for c, _ in commands_with_answers(block)]
    rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]] * 100
    (running.repo / "rows.csv").write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    # On the cluster `make run` started, as a driver attached to it would.
    result = run_readme(command, running.repo, RAY_ADDRESS=running.ray_address())
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    import pandas as pd

    predictions = pd.read_parquet(running.repo / "predictions.parquet")
    assert predictions["prediction"].tolist() == [0, 2, 1] * 100


def test_serve_build_makes_a_config(running: MakeRun, tmp_path: Path) -> None:
    block = blocks_in("## Configs", "bash")[0]
    (command,) = [c for c, _ in commands_with_answers(block)]
    result = shell(command.replace("config.yaml", str(tmp_path / "built.yaml")), running.repo)
    record(command)
    assert result.returncode == 0, result.stderr
    assert "serve_app.default_app:app" in (tmp_path / "built.yaml").read_text()
    status = shell("serve status", running.repo, **readme_exports())  # Ray's own CLI, against make run's cluster
    assert status.returncode == 0 and "serve_app" in status.stdout and "RUNNING" in status.stdout, status


def test_make_run_twice_in_a_row_and_stopped_by_sigterm(repo: Path, running: MakeRun) -> None:
    # The module fixture's run is still up: Ctrl-C it here, then start a second one ...
    running.assert_clean_stop()
    with MakeRun(repo) as second:
        assert second.first_answer["prediction"] == 0
        assert "training the default one" not in second.log.read_text()  # the store kept v1
        # ... and stop that one as a service manager would: SIGTERM to serve-app alone.
        (serve_app,) = [pid for pid, started in second.seen if b"serve-app" in cmdline(pid) and processes.alive((pid, started))]
        os.kill(serve_app, signal.SIGTERM)
        second.proc.wait(timeout=150)
        assert second.proc.returncode == 0, second.log.read_text()[-3000:]
        second.assert_clean_stop()


def test_plain_serve_run_without_the_fast_path(repo: Path, running: MakeRun) -> None:
    """`serve run configs/local.yaml` as the README allows: Ray's own proxy, no HAProxy."""
    running.assert_clean_stop()  # the port is the config's: one server at a time
    log = repo / "serve-run.log"
    proc = subprocess.Popen(["serve", "run", "configs/local.yaml"], cwd=repo, env=user_env(), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[processes.Process] = set()

    def answers() -> dict[str, Any] | None:
        seen.update(processes.descendants(proc.pid))
        assert proc.poll() is None, log.read_text()[-3000:]
        reply = httpx.post(f"http://127.0.0.1:{PORT}/predict", json={"features": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}, timeout=5)
        return reply.json() if reply.status_code == 200 else None

    try:
        assert wait_for(answers, timeout_s=240, interval_s=1, what="plain serve run to answer") == {
            "predictions": [0, 2], "model": "iris", "version": "1"}
        assert not [p for p in seen if b"haproxy" in cmdline(p[0])], "HAProxy without the fast path"
    finally:
        seen.update(processes.descendants(proc.pid))
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=90)
        finally:
            processes.end(seen)
    assert not [p for p in seen if processes.alive(p)]
