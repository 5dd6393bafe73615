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

from serve_app import processes


pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PORT = 8000


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + len(title))
    return README[start : end if end != -1 else None]


def blocks_in(title: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(title), flags=re.S)


def commands_with_answers(block: str) -> list[tuple[str, str | None]]:
    """Each command line of a bash block, with the `# {...}` answer shown under it, if any."""
    pairs: list[tuple[str, str | None]] = []
    for line in block.splitlines():
        if line.startswith("# ") and pairs:
            pairs[-1] = (pairs[-1][0], line[2:])
        elif line.strip() and not line.startswith("#"):
            pairs.append((line, None))
    return pairs


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
    return destination


class MakeRun:
    """`make run` in the foreground of its own process group, stopped like Ctrl-C."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.log = repo / f"make-run-{time.monotonic_ns()}.log"
        self.seen: set[processes.Process] = set()

    def __enter__(self) -> "MakeRun":
        assert processes.port_is_free(PORT), f"port {PORT} is in use: stop what holds it before running this test"
        env = user_env()
        self.proc = subprocess.Popen(
            # -o: the copy shares this checkout's .venv, which must keep pointing here.
            ["make", "-o", ".venv/.installed", "run"], cwd=self.repo, env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True
        )

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            self.seen |= processes.descendants(self.proc.pid)
            if self.proc.poll() is not None:
                raise AssertionError(f"make run exited early:\n{self.log.read_text()[-3000:]}")
            try:
                reply = httpx.post(f"http://127.0.0.1:{PORT}/predict", json={"features": [5.1, 3.5, 1.4, 0.2]}, timeout=5)
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
        yield run
        run.assert_clean_stop()


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell: none of this test session's Ray settings (its RAY_AUTH_MODE, HAProxy
    files, ports), the venv's bin first on PATH, then what the README tells them to set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SERVE_APP_")) or k == "RAY_USAGE_STATS_ENABLED"}
    return {**env, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", **extra}


def readme_exports() -> dict[str, str]:
    """The `export NAME=value` lines the README gives for attaching to `make run`'s Ray."""
    (block,) = blocks_in("## From Python", "bash")
    exports = dict(re.findall(r"^export (\w+)=(\S+)", block, flags=re.M))
    assert exports == {"RAY_AUTH_MODE": "token"}, exports
    return exports


def shell(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=user_env(**env), capture_output=True, text=True, timeout=300)


def test_the_two_commands_are_documented() -> None:
    quick_start = blocks_in("## Quick start", "bash")[0]
    assert [c for c, _ in commands_with_answers(quick_start)][:2] == [
        "make run    # creates .venv, installs, trains iris if the store is empty, serves on 127.0.0.1:8000",
        "make test   # installs the test extras and runs the whole suite (unit + real Ray + real HTTP)",
    ]
    # `make test` is what runs this file; CI runs it through .ci/run.
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_curl_examples_answer_as_shown(running: MakeRun) -> None:
    checked = 0
    for block in blocks_in("## Ask it for predictions", "bash"):
        for command, shown in commands_with_answers(block):
            result = shell(command, running.repo)
            assert result.returncode == 0, (command, result.stderr)
            body = json.loads(result.stdout)
            assert "error" not in body or "features\":[1,2]" in command, (command, body)
            if shown is not None:
                assert body == json.loads(shown), (command, body)
                checked += 1
    assert checked >= 5


def test_python_examples_run(running: MakeRun) -> None:
    blocks = blocks_in("## Ask it for predictions", "python") + blocks_in("## From Python", "python")
    assert len(blocks) == 3
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", block], cwd=running.repo, capture_output=True, text=True, timeout=180,
            env=user_env(**readme_exports(), RAY_ADDRESS=running.ray_address()),
        )
        assert result.returncode == 0, (block, result.stderr[-3000:])


def test_training_and_rollout_commands_run(running: MakeRun) -> None:
    manage = blocks_in("## Train and manage versions", "bash")
    assert len(manage) == 2
    for block in manage:
        for command, _ in commands_with_answers(block):
            result = shell(command, running.repo)
            assert result.returncode == 0, (command, result.stdout, result.stderr)
    # The rollout block ended on v1 without canary or shadow: every replica agrees.
    status = json.loads(shell("serve-app models status", running.repo).stdout)
    assert status["replicas"] and all(r["routing"]["default"] == "1" and r["routing"]["canary"] is None for r in status["replicas"])


# Sections whose commands take minutes or a cluster of their own: the test that runs each.
COVERED_ELSEWHERE = {
    "## Performance and tuning": {"make bench": "tests/test_bench.py", "serve-app tune": "tests/test_tune.py"},
}
RUN_HERE = (
    "## Quick start", "## Ask it for predictions", "## From Python", "## Train and manage versions",
    "## Monitoring", "## Cluster, batch jobs, streaming", "## Configs",
)


def test_every_readme_command_is_run_by_a_test() -> None:
    for title in re.findall(r"^## .+$", README, flags=re.M):
        blocks = blocks_in(title, "bash") + blocks_in(title, "python")
        if not blocks:
            continue
        if title in RUN_HERE:
            continue
        assert title in COVERED_ELSEWHERE, f"README section {title!r} has commands no test runs"
        for block in blocks_in(title, "bash"):
            for command, _ in commands_with_answers(block):
                prefix = next(p for p in COVERED_ELSEWHERE[title] if command.startswith(p))
                test_file = ROOT / COVERED_ELSEWHERE[title][prefix]
                subcommand = prefix.split()[-1]
                assert f'"{subcommand}"' in test_file.read_text(), (command, test_file)


def test_monitoring_commands_run(running: MakeRun) -> None:
    block = blocks_in("## Monitoring", "bash")[0]
    commands = [c for c, _ in commands_with_answers(block)]
    first = shell(commands[0], running.repo)
    request_id = re.search(r"^x-request-id: (\S+)", first.stdout, flags=re.M | re.I)
    assert request_id, first.stdout
    for command in commands[1:]:
        result = shell(command.replace("<x-request-id>", request_id.group(1)), running.repo)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        if command.startswith("curl"):
            assert "error" not in json.loads(result.stdout), (command, result.stdout)
    assert (running.repo / "report.html").stat().st_size > 10_000
    assert (running.repo / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_command_runs(running: MakeRun) -> None:
    block = blocks_in("## Cluster, batch jobs, streaming", "bash")[0]
    (command,) = [c for c, _ in commands_with_answers(block)]
    rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]] * 100
    (running.repo / "rows.csv").write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    # On the cluster `make run` started, as a driver attached to it would.
    result = shell(command, running.repo, RAY_ADDRESS=running.ray_address())
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    import pandas as pd

    predictions = pd.read_parquet(running.repo / "predictions.parquet")
    assert len(predictions) == 300
    assert sorted(predictions["prediction"].unique().tolist()) == [0, 1, 2]


def test_serve_build_makes_a_config(running: MakeRun, tmp_path: Path) -> None:
    block = blocks_in("## Configs", "bash")[0]
    (command,) = [c for c, _ in commands_with_answers(block)]
    result = shell(command.replace("config.yaml", str(tmp_path / "built.yaml")), running.repo)
    assert result.returncode == 0, result.stderr
    assert "serve_app.default_app:app" in (tmp_path / "built.yaml").read_text()
    status = shell("serve status", running.repo, **readme_exports())  # Ray's own CLI, against make run's cluster
    assert status.returncode == 0 and "serve_app" in status.stdout and "RUNNING" in status.stdout, status


def test_make_run_twice_in_a_row(repo: Path, running: MakeRun) -> None:
    # The module fixture's run is still up: Ctrl-C it here, then start a second one.
    running.assert_clean_stop()
    with MakeRun(repo) as second:
        assert second.first_answer["prediction"] == 0
        assert "training the default one" not in second.log.read_text()  # the store kept v1
        second.assert_clean_stop()
