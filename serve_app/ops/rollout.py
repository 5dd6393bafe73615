"""Promote, roll back, canary and shadow on a running cluster, without restarting replicas.

Each step is Ray Serve's own mechanism: the running config is redeployed (`serve deploy`)
with a new `user_config`, and every replica's `reconfigure` loads and verifies the new
version before it takes traffic. A replica that cannot load it keeps serving what it
served, and says why at GET /admin/status; these functions wait until every replica has
either switched or refused, and raise with the replica's reason on a refusal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import httpx

from serve_app.ops import control


class RolloutRefused(RuntimeError):
    """A replica refused the new user_config; it keeps serving the old one."""


@dataclass(frozen=True)
class Target:
    address: str | None = None  # the Ray dashboard, as for `serve deploy -a`
    app: str = control.APP_NAME
    url: str | None = None  # the app's HTTP base URL; found from the cluster if None


def _http_base(details: Mapping[str, Any], target: Target) -> str:
    if target.url:
        return target.url.rstrip("/")
    options = details.get("http_options") or {}
    host = options.get("host") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    prefix = (details.get("applications", {}).get(target.app, {}).get("route_prefix") or "/").rstrip("/")
    return f"http://{host}:{options.get('port', 8000)}{prefix}"


# A replica in one of these states may still answer requests with what it served before.
_LIVE_STATES = frozenset({"STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION"})


def _replica_states(details: Mapping[str, Any], app: str) -> dict[int | None, str]:
    """pid -> state of every replica that is or may soon be serving."""
    deployments = details.get("applications", {}).get(app, {}).get("deployments", {})
    replicas = deployments.get(control.DEPLOYMENT_NAME, {}).get("replicas", [])
    return {r.get("pid"): r.get("state") for r in replicas if r.get("state") in _LIVE_STATES}


def _all_switched(states: Mapping[int | None, str], seen: Mapping[int, Mapping[str, Any]], expect: Callable[[Mapping[str, Any]], bool]) -> bool:
    # Every live replica is RUNNING (an UPDATING one is still inside reconfigure and answers
    # with its old routing) and has itself been seen to report the new routing.
    return bool(states) and all(
        state == "RUNNING" and pid in seen and expect(seen[pid]["routing"]) for pid, state in states.items()
    )


def current_user_config(target: Target) -> dict[str, Any]:
    config = control.deployed_config(target.address)
    app = control.find_app(config, target.app)
    for deployment in app.get("deployments", []):
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
) -> dict[str, Any]:
    """Redeploys the running config with `updates` to the user_config and waits until every
    replica's routing satisfies `expect`; returns the last status seen per replica."""
    config = control.with_user_config(control.deployed_config(target.address), updates, target.app)
    control.deploy(config, target.address)
    deadline = time.monotonic() + timeout_s
    seen: dict[int, dict[str, Any]] = {}
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            details = control.details(target.address)
            base = _http_base(details, target)
            try:
                status = client.get(f"{base}/admin/status").json()
            except (httpx.HTTPError, ValueError):
                time.sleep(0.2)
                continue
            seen[status["pid"]] = status
            error = status.get("last_reconfigure_error")
            if error and not expect(status["routing"]):
                raise RolloutRefused(f"replica pid {status['pid']} refused the change and keeps serving {status['routing']}: {error}")
            states = _replica_states(details, target.app)
            if _all_switched(states, seen, expect):
                return {pid: seen[pid] for pid in states if pid is not None}
            time.sleep(0.1)
    raise TimeoutError(f"not every replica switched within {timeout_s}s; last seen: {list(seen.values())}")


def serve_version(version: str, target: Target = Target()) -> dict[str, Any]:
    """Every replica serves `version` alone (canary and shadow cleared)."""
    return apply(
        {"version": version, "canary": None, "shadow": None},
        lambda r: r["default"] == version and r["canary"] is None,
        target,
    )


def set_canary(version: str, weight: float, sticky_header: str | None, target: Target = Target()) -> dict[str, Any]:
    canary = {"version": version, "weight": weight, "sticky_header": sticky_header} if weight > 0 else None

    def expect(routing: Mapping[str, Any]) -> bool:
        if canary is None:
            return routing["canary"] is None
        return bool(routing["canary"]) and routing["canary"]["version"] == version and routing["canary"]["weight"] == weight

    return apply({"canary": canary}, expect, target)


def set_shadow(version: str | None, fraction: float, target: Target = Target()) -> dict[str, Any]:
    shadow = {"version": version, "fraction": fraction} if version else None

    def expect(routing: Mapping[str, Any]) -> bool:
        if shadow is None:
            return routing["shadow"] is None
        return bool(routing["shadow"]) and routing["shadow"]["version"] == version and routing["shadow"]["fraction"] == fraction

    return apply({"shadow": shadow}, expect, target)
