"""`rollout.apply` judges each replica only by what it said about the user_config just deployed.

The race these pin down (seen in CI): a broken version is pushed and refused, so the replica
keeps serving v1 and reports the error. `serve_version("1")` then found routing already at v1
and returned before the replica had handled it; the next push read the stale error as its own
refusal. The watch is faked here with a scripted sequence of /admin/status answers.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import pytest

from serve_app.ops import control, rollout
from serve_app.settings import user_config_fingerprint

PID = 4242
BASE_CONFIG = {
    "applications": [
        {"name": control.APP_NAME, "deployments": [{"name": control.DEPLOYMENT_NAME, "user_config": {"version": "3"}}]}
    ]
}


def _status(routing: Mapping[str, Any], user_config: Mapping[str, Any], error: str | None = None) -> dict[str, Any]:
    return {"pid": PID, "routing": dict(routing), "last_reconfigure_error": error,
            "user_config": user_config_fingerprint(user_config)}


def _routing(default: str, canary: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"default": default, "canary": canary, "shadow": None}


def _scripted(monkeypatch: pytest.MonkeyPatch, answers: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Fakes the cluster: `answers(deployed_user_config)` is what the replica says, poll by poll,
    after the deploy; returns the statuses the watch handed to the rollout."""
    seen: list[dict[str, Any]] = []
    deployed: dict[str, Any] = {}
    monkeypatch.setattr(control, "deployed_config", lambda address=None: BASE_CONFIG)

    def deploy(config: Mapping[str, Any], address: str | None = None) -> None:
        deployed.update(rollout._user_config_of(config, control.APP_NAME))

    def watch(until: Callable[[control.ReplicaView], bool], address: Any = None, app: str = control.APP_NAME, *,
              url: Any = None, timeout_s: float = 0, on_status: Any = None, **_: Any) -> control.ReplicaView:
        statuses: dict[int, dict[str, Any]] = {}
        view = control.ReplicaView({}, {PID: "RUNNING"}, statuses)
        for status in answers(dict(deployed)):
            seen.append(status)
            statuses[PID] = status
            if on_status is not None:
                on_status(status)
            if until(view):
                return view
        raise control.ReplicasNotReady(view, timeout_s)

    monkeypatch.setattr(control, "deploy", deploy)
    monkeypatch.setattr(control, "watch_replicas", watch)
    return seen


STALE = _status(_routing("1"), {"version": "3"}, error="user_config {'version': '3'} refused: sha256 mismatch")


def test_serve_version_waits_for_the_replica_to_handle_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The replica still answers about the refused v3 push first (routing already v1), then
    # handles the new config; serve_version returns only on the second answer.
    seen = _scripted(monkeypatch, lambda deployed: [STALE, _status(_routing("1"), deployed)])
    statuses = rollout.serve_version("1")
    assert len(seen) == 2
    assert statuses[PID]["last_reconfigure_error"] is None


def test_a_stale_error_is_not_this_pushs_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    canary = {"version": "2", "weight": 0.2, "sticky_header": None}
    seen = _scripted(monkeypatch, lambda deployed: [STALE, _status(_routing("1", canary), deployed)])
    statuses = rollout.set_canary("2", 0.2, None)
    assert statuses[PID]["routing"]["canary"]["version"] == "2"
    assert len(seen) == 2


def test_a_refusal_of_this_push_still_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted(monkeypatch, lambda deployed: [STALE, _status(_routing("1"), deployed, error="v4 refused: no such version")])
    with pytest.raises(rollout.RolloutRefused, match="v4 refused"):
        rollout.set_canary("4", 0.5, None)


def test_fingerprint_is_order_independent_and_value_sensitive() -> None:
    assert user_config_fingerprint({"a": 1, "b": {"c": 2}}) == user_config_fingerprint({"b": {"c": 2}, "a": 1})
    assert user_config_fingerprint({"version": "1"}) != user_config_fingerprint({"version": "2"})
    assert user_config_fingerprint(None) == user_config_fingerprint({})
