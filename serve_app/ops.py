"""Operating a running cluster the way `serve deploy` does: declarative configs over the
Ray dashboard's REST API (token auth included). Used by the CLI and the tests.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
APP_NAME = "serve_app"
DEPLOYMENT_NAME = "ModelServer"


def dashboard_address(address: str | None = None) -> str:
    return address or os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_DASHBOARD


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict) or "applications" not in config:
        raise ValueError(f"{path} is not a Ray Serve config (no 'applications')")
    return config


def _client(address: str | None) -> Any:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(dashboard_address(address))


def deploy(config: Mapping[str, Any], address: str | None = None) -> None:
    """`serve deploy`: the cluster converges to `config` (apps not in it are removed)."""
    _client(address).deploy_applications(dict(config))


def details(address: str | None = None) -> dict[str, Any]:
    return dict(_client(address).get_serve_details())


def deployed_config(address: str | None = None) -> dict[str, Any]:
    """The config the cluster was last given, rebuilt from its details."""
    info = details(address)
    apps = [app["deployed_app_config"] for app in info.get("applications", {}).values() if app.get("deployed_app_config")]
    config: dict[str, Any] = {"applications": apps}
    if info.get("http_options"):
        config["http_options"] = {k: v for k, v in info["http_options"].items() if k in ("host", "port", "request_timeout_s")}
    if info.get("proxy_location"):
        config["proxy_location"] = info["proxy_location"]
    return config


def find_app(config: Mapping[str, Any], name: str = APP_NAME) -> dict[str, Any]:
    for app in config["applications"]:
        if app.get("name") == name:
            return app  # type: ignore[no-any-return]
    raise KeyError(f"no application named {name!r} in the config")


def with_user_config(
    config: Mapping[str, Any], updates: Mapping[str, Any], app: str = APP_NAME, deployment: str = DEPLOYMENT_NAME
) -> dict[str, Any]:
    """A copy of `config` whose deployment's user_config has `updates` applied."""
    result = copy.deepcopy(dict(config))
    target = find_app(result, app)
    deployments = target.setdefault("deployments", [])
    for entry in deployments:
        if entry.get("name") == deployment:
            break
    else:
        entry = {"name": deployment}
        deployments.append(entry)
    entry["user_config"] = {**(entry.get("user_config") or {}), **updates}
    return result


def app_status(name: str = APP_NAME, address: str | None = None) -> dict[str, Any]:
    app = details(address).get("applications", {}).get(name)
    if app is None:
        return {"status": "NOT_DEPLOYED", "message": f"no application {name!r}"}
    return dict(app)


def wait_until_running(name: str = APP_NAME, address: str | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """Waits for RUNNING; raises with Serve's own message on DEPLOY_FAILED or timeout."""
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = app_status(name, address)
        if status.get("status") == "RUNNING":
            return status
        if status.get("status") == "DEPLOY_FAILED":
            raise RuntimeError(f"application {name!r} failed to deploy: {status.get('message')}")
        time.sleep(0.5)
    raise TimeoutError(f"application {name!r} not RUNNING after {timeout_s}s: {status.get('status')} {status.get('message', '')}")
