"""Promote, roll back, canary and shadow on a running cluster, without restarting replicas.

Each step is Ray Serve's own mechanism: the running config is redeployed (`serve deploy`)
with a new `user_config`, and every replica's `reconfigure` loads and verifies the new
version before it takes traffic. A replica that cannot load it keeps serving what it
served, and says why at GET /admin/status; these functions wait until every replica has
either switched or refused, and raise with the replica's reason on a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from serve_app.ops import control
from serve_app.settings import user_config_fingerprint


class RolloutRefused(RuntimeError):
    """A replica refused the new user_config; it keeps serving the old one."""


@dataclass(frozen=True)
class Target:
    address: str | None = None  # the Ray dashboard, as for `serve deploy -a`
    app: str = control.APP_NAME
    url: str | None = None  # the app's HTTP base URL; found from the cluster if None


def _all_switched(view: control.ReplicaView, expect: Callable[[Mapping[str, Any]], bool], deployed: str) -> bool:
    # Every live replica is RUNNING (an UPDATING one is still inside reconfigure and answers
    # with its old routing) and has itself been seen to report the new routing, after handling
    # the user_config just deployed (its routing may have matched before: `serve_version` of
    # the version a refused push left it serving).
    return bool(view.states) and all(
        state == "RUNNING" and pid in view.statuses and _handled(view.statuses[pid], deployed)
        and expect(view.statuses[pid]["routing"])
        for pid, state in view.states.items()
    )


def _handled(status: Mapping[str, Any], deployed: str) -> bool:
    """Whether the replica's status is about the user_config with fingerprint `deployed`."""
    return status.get("user_config") == deployed


def current_user_config(target: Target) -> dict[str, Any]:
    return _user_config_of(control.deployed_config(target.address), target.app)


def _user_config_of(config: Mapping[str, Any], app_name: str) -> dict[str, Any]:
    for deployment in control.find_app(config, app_name).get("deployments", []):
        if deployment.get("name") == control.DEPLOYMENT_NAME:
            return dict(deployment.get("user_config") or {})
    return {}


def model_name(target: Target) -> str:
    app = control.find_app(control.deployed_config(target.address), target.app)
    return str((app.get("args") or {}).get("model", "iris"))


def apply(
    updates: Mapping[str, Any],
    expect: Callable[[Mapping[str, Any]], bool],
    target: Target = Target(),
    timeout_s: float = 120.0,
) -> dict[int, dict[str, Any]]:
    """Redeploys the running config with `updates` to the user_config and waits until every
    replica's routing satisfies `expect`; returns the last status seen per replica."""
    config = control.with_user_config(control.deployed_config(target.address), updates, target.app)
    deployed = user_config_fingerprint(_user_config_of(config, target.app))
    control.deploy(config, target.address)

    def refused(status: Mapping[str, Any]) -> None:
        # An error about an earlier user_config (a refused push before this one) is not this
        # change's: only a replica that handled this one can have refused it.
        error = status.get("last_reconfigure_error")
        if error and _handled(status, deployed) and not expect(status["routing"]):
            raise RolloutRefused(f"replica pid {status['pid']} refused the change and keeps serving {status['routing']}: {error}")

    try:
        view = control.watch_replicas(lambda view: _all_switched(view, expect, deployed), target.address, target.app,
                                      url=target.url, timeout_s=timeout_s, on_status=refused)
    except control.ReplicasNotReady as exc:
        raise TimeoutError(f"not every replica switched within {timeout_s}s; last seen: {list(exc.view.statuses.values())}") from None
    return {pid: view.statuses[pid] for pid in view.states if pid is not None}


def serve_version(version: str, target: Target = Target()) -> dict[int, dict[str, Any]]:
    """Every replica serves `version` alone (canary and shadow cleared)."""
    return apply(
        {"version": version, "canary": None, "shadow": None},
        lambda r: r["default"] == version and r["canary"] is None,
        target,
    )


def set_canary(version: str, weight: float, sticky_header: str | None, target: Target = Target()) -> dict[int, dict[str, Any]]:
    canary = {"version": version, "weight": weight, "sticky_header": sticky_header} if weight > 0 else None

    def expect(routing: Mapping[str, Any]) -> bool:
        if canary is None:
            return routing["canary"] is None
        return bool(routing["canary"]) and routing["canary"]["version"] == version and routing["canary"]["weight"] == weight

    return apply({"canary": canary}, expect, target)


def set_shadow(version: str | None, fraction: float, target: Target = Target()) -> dict[int, dict[str, Any]]:
    shadow = {"version": version, "fraction": fraction} if version else None

    def expect(routing: Mapping[str, Any]) -> bool:
        if shadow is None:
            return routing["shadow"] is None
        return bool(routing["shadow"]) and routing["shadow"]["version"] == version and routing["shadow"]["fraction"] == fraction

    return apply({"shadow": shadow}, expect, target)
