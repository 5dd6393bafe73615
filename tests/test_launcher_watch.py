"""The launcher's watch while serving: what it says when a deployment turns UNHEALTHY and when
it recovers, from the dashboard's details (given here, as Ray would report them)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from serve_app.ops import launcher


def ended_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def details(status: str, replicas: list[dict[str, Any]], message: str = "") -> dict[str, Any]:
    deployment = {"status": status, "message": message, "replicas": replicas}
    return {"applications": {"serve_app": {"deployments": {"ModelServer": deployment}}}}


class Said:
    def __init__(self, looks: list[dict[str, Any]]) -> None:
        self.looks = looks
        self.lines: list[str] = []


@pytest.fixture
def said(monkeypatch: pytest.MonkeyPatch) -> Said:
    record = Said([])
    monkeypatch.setattr(launcher.Watch, "_details", lambda self: record.looks.pop(0))
    monkeypatch.setattr(launcher.Watch, "say", lambda self, line, stream=None: record.lines.append(line))
    return record


def watch_through(said: Said, looks: list[dict[str, Any]]) -> list[str]:
    said.looks[:] = looks
    watch = launcher.Watch(["serve_app"], "http://127.0.0.1:1")
    for _ in looks:
        watch.serving()
    return said.lines


HEALTH_CHECK_FAILED = "A replica's health check failed."


def test_a_killed_replica_still_listed_running_is_named_as_ended(said: Said) -> None:
    dead = ended_pid()
    lines = watch_through(said, [
        details("HEALTHY", [{"pid": dead, "state": "RUNNING"}]),
        details("UNHEALTHY", [{"pid": dead, "state": "RUNNING"}], HEALTH_CHECK_FAILED),
    ])
    assert lines == [f"serve-app: warning: serve_app/ModelServer is UNHEALTHY (replica process {dead} ended): "
                     f"{HEALTH_CHECK_FAILED}"]


def test_a_killed_replica_gone_from_the_list_is_named_as_ended(said: Said) -> None:
    dead = ended_pid()
    lines = watch_through(said, [
        details("HEALTHY", [{"pid": dead, "state": "RUNNING"}]),
        details("UNHEALTHY", [{"pid": 0, "state": "STARTING"}], HEALTH_CHECK_FAILED),
    ])
    assert lines == [f"serve-app: warning: serve_app/ModelServer is UNHEALTHY (replica process {dead} ended): "
                     f"{HEALTH_CHECK_FAILED}"]


def test_unhealthy_with_live_replicas_names_no_process_and_recovery_is_said(said: Said) -> None:
    alive = os.getpid()
    lines = watch_through(said, [
        details("UNHEALTHY", [{"pid": alive, "state": "RUNNING"}], "check_health raised"),
        details("HEALTHY", [{"pid": alive, "state": "RUNNING"}]),
    ])
    assert lines == ["serve-app: warning: serve_app/ModelServer is UNHEALTHY: check_health raised",
                     "serve-app: serve_app/ModelServer is healthy again"]
