"""Operating a running cluster the way `serve deploy` does: declarative configs over the
Ray dashboard's REST API (token auth included). Used by the CLI and the tests.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, get_args

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


def _models_in(annotation: Any) -> list[type]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def unknown_keys(values: Any, schema: type, where: str = "") -> list[str]:
    """Keys of `values` that `schema` (a Ray Serve config model) does not know, at every
    level: Ray ignores them (its schema is forward-compatible), so a typo such as
    `num_replica: 4` would deploy one replica and never say so."""
    if not isinstance(values, Mapping):
        return []
    fields = schema.model_fields  # type: ignore[attr-defined]
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    found = []
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            found.append(f"{where}{key}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        name = key if key in fields else next(n for n, f in fields.items() if f.alias == key)
        for model in _models_in(fields[name].annotation)[:1]:
            items = value if isinstance(value, list) else [value]
            for index, item in enumerate(items):
                path = f"{where}{key}" + (f"[{index}]" if isinstance(value, list) else "") + "."
                found += unknown_keys(item, model, path)
    return found


def check_config(config: Mapping[str, Any], source: str = "the config") -> None:
    """Refuses, before anything starts, a config that would not deploy as written: keys Ray
    does not know, values its schema rejects, and serve_app `args` / `user_config` that the
    application would refuse. Raises ConfigError listing every problem and what is allowed."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from serve_app.settings import AppSettings, ConfigError, runtime_settings, validated

    problems = [f"unknown key {key}" for key in unknown_keys(config, ServeDeploySchema)]
    if not problems:
        try:
            ServeDeploySchema.model_validate(dict(config))
        except ValidationError as exc:
            problems += [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    for index, app in enumerate(config.get("applications") or []):
        if not isinstance(app, Mapping) or not str(app.get("import_path", "")).startswith("serve_app."):
            continue
        where = f"applications[{index}]"
        try:
            validated(AppSettings, app.get("args"), "application args")
        except ConfigError as exc:
            problems.append(f"{where}: {exc}")
        for number, deployment in enumerate(app.get("deployments") or []):
            if isinstance(deployment, Mapping) and "user_config" in deployment:
                try:
                    runtime_settings(deployment["user_config"])
                except ConfigError as exc:
                    problems.append(f"{where}.deployments[{number}]: {exc}")
    if problems:
        lost = " (Ray Serve ignores keys it does not know: each would be lost without a word)"
        raise ConfigError(f"{source} cannot be deployed as written: " + "; ".join(problems)
                          + (lost if any(p.startswith("unknown key") for p in problems) else ""))


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
            return app
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


# ---- the replicas of a running application ----------------------------------------------------

# A replica in one of these states may still answer requests with what it served before.
LIVE_STATES = frozenset({"STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION"})


def http_base(details: Mapping[str, Any], app: str = APP_NAME, url: str | None = None) -> str:
    """The app's HTTP base URL: `url` when given, else the cluster's http_options and the app's
    route prefix (a wildcard host is reached on 127.0.0.1)."""
    if url:
        return url.rstrip("/")
    options = details.get("http_options") or {}
    host = options.get("host") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    prefix = (details.get("applications", {}).get(app, {}).get("route_prefix") or "/").rstrip("/")
    return f"http://{host}:{options.get('port', 8000)}{prefix}"


def replica_states(details: Mapping[str, Any], app: str = APP_NAME) -> dict[int | None, str]:
    """pid -> state of every replica of the app's ModelServer that is or may soon be serving."""
    deployments = details.get("applications", {}).get(app, {}).get("deployments", {})
    replicas = deployments.get(DEPLOYMENT_NAME, {}).get("replicas", [])
    return {r.get("pid"): r.get("state") for r in replicas if r.get("state") in LIVE_STATES}


@dataclass
class ReplicaView:
    """An app's replicas as Serve lists them, and what each said at GET /admin/status."""

    details: dict[str, Any]  # control.details() at the last look
    states: dict[int | None, str]  # replica_states() at the last look
    statuses: dict[int, dict[str, Any]]  # pid -> that replica's latest /admin/status answer

    @property
    def running(self) -> set[int]:
        return {pid for pid, state in self.states.items() if state == "RUNNING" and pid is not None}


class ReplicasNotReady(TimeoutError):
    """`watch_replicas` gave up; `view` is its last look."""

    def __init__(self, view: ReplicaView, timeout_s: float) -> None:
        super().__init__(f"the replicas did not reach the wanted state within {timeout_s:g}s; "
                         f"last seen: {list(view.statuses.values())}")
        self.view = view


def watch_replicas(
    until: Callable[[ReplicaView], bool],
    address: str | None = None,
    app: str = APP_NAME,
    *,
    url: str | None = None,
    timeout_s: float = 120.0,
    on_status: Callable[[Mapping[str, Any]], None] | None = None,
    polls_per_replica: int = 10,
) -> ReplicaView:
    """Looks at `app`'s replicas until `until(view)` holds, and returns that view.

    Each look reads Serve's details, then polls GET /admin/status until every RUNNING replica
    has answered (the load balancer spreads the polls over the replicas: at most
    `polls_per_replica` polls per replica). A replica's latest answer replaces its earlier
    ones; `on_status` sees each answer as it comes and may raise to stop the watch (a
    replica refusing a change, say). Raises ReplicasNotReady after `timeout_s`."""
    import httpx

    deadline = time.monotonic() + timeout_s
    statuses: dict[int, dict[str, Any]] = {}
    view = ReplicaView({}, {}, statuses)
    with httpx.Client(timeout=5) as client:
        while True:
            info = details(address)
            view = ReplicaView(info, replica_states(info, app), statuses)
            status_url = f"{http_base(info, app, url)}/admin/status"
            for _ in range(polls_per_replica * max(1, len(view.running))):
                try:
                    answer = client.get(status_url)
                    status = answer.json() if answer.status_code == 200 else None
                except (httpx.HTTPError, ValueError):
                    status = None
                if not isinstance(status, dict) or "pid" not in status:
                    break  # not serving (yet): the next look will tell
                statuses[status["pid"]] = status
                if on_status is not None:
                    on_status(status)
                if view.running <= statuses.keys():
                    break
            if until(view):
                return view
            if time.monotonic() >= deadline:
                raise ReplicasNotReady(view, timeout_s)
            time.sleep(0.2)


# ---- why an application is not serving ---------------------------------------------------------

# What to change, by the exception class a replica or the app builder raised. The messages
# themselves (serve_app's own) say what is wrong; these say where to fix it. A ConfigError
# needs none: its message names the key and what is allowed, or the command to run.
HINTS = {
    "ApiKeyConfigError": (
        "give the replicas a key of at least 16 characters: export the variable that args.api_key_env "
        "names in the shell that starts the app (the replicas inherit it), or fix args.api_key_file; "
        "remove both to serve without a key"
    ),
    "ModelLoadError": (
        "serve a version that verifies (user_config.version in the config; `serve-app models list --store STORE` "
        "shows them) or store a new one (`serve-app train --store STORE`)"
    ),
    "NotFound": "check args.model and user_config.version against `serve-app models list --store STORE`",
    "SignatureError": (
        "sign the version where the publisher key is (`serve-app models sign NAME VERSION --store STORE`) and "
        "give the replicas its public key (args.trusted_keys; `serve-app keys show` prints it)"
    ),
    "SigningKeyError": "fix args.trusted_keys (readable Ed25519 public key files; `serve-app keys show` prints one)",
    "UnsafeArtefact": (
        "the model file rebuilds something outside serve_app/model/formats.py's allow-list: serve another version, "
        "or retrain it with an estimator the project trains (`serve-app train --store STORE`)"
    ),
}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The line a Python traceback ends with: `package.module.Class: message` (or `Class(Cause): ...`).
_EXCEPTION_LINE = re.compile(r"^(?P<cls>(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)(?:\((?P<cause>\w+)\))?: (?P<text>.*)")


@dataclass(frozen=True)
class Failure:
    """Why an application cannot start, from what Ray holds for it."""

    app: str
    deployment: str | None  # None: the application itself (its builder) failed
    what: str  # "DEPLOY_FAILED" or "a replica failed to start"
    error: str  # the exception class, e.g. "ApiKeyConfigError" ("" when Ray's message has none)
    reason: str  # serve_app's own message (other code: "Class: message"), never the traceback
    hint: str  # what to change; "" when nothing specific is known
    own: bool = False  # raised by serve_app: it fails the same way on every retry

    @property
    def final(self) -> bool:
        """Ray gave up, or it would only repeat serve_app's own refusal on each retry."""
        return self.what == "DEPLOY_FAILED" or self.own

    @property
    def summary(self) -> str:
        """E.g. "application 'serve_app' cannot start: a replica of ModelServer failed to start"."""
        if self.deployment is None:
            cause = "its builder (import_path) failed"
        elif self.what == "DEPLOY_FAILED":
            cause = f"{self.deployment} is DEPLOY_FAILED"
        else:
            cause = f"a replica of {self.deployment} failed to start"
        return f"application {self.app!r} cannot start: {cause}"

    def describe(self) -> str:
        return f"{self.summary}: {self.reason}"


class DeployFailed(RuntimeError):
    """An application that cannot start; `failure` says why and what to change."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.describe() + (f" (what to change: {failure.hint})" if failure.hint else ""))
        self.failure = failure


def reason_of(message: str) -> tuple[str, str, bool]:
    """(exception class, its message, whether serve_app raised it) from a Ray status
    message that holds a traceback.

    The last exception in it is the one the code raised (Ray wraps it in its own
    RuntimeError traceback first). A serve_app error gives its message alone; other
    exceptions give `Class: message`. A message with no traceback is returned as it is."""
    lines = _ANSI.sub("", message).strip().splitlines()
    for index in range(len(lines) - 1, 0, -1):
        match = _EXCEPTION_LINE.match(lines[index])
        if match and lines[index - 1].startswith(" "):  # right under a frame of the traceback
            name = match["cause"] or match["cls"].rsplit(".", 1)[-1]
            text = "\n".join([match["text"], *lines[index + 1 :]]).strip()
            own = match["cls"].startswith("serve_app.")
            return name, text if own else f"{name}: {text}", own
    return "", "\n".join(line for line in lines if line.strip()), False


def failure(name: str, app: Mapping[str, Any]) -> Failure | None:
    """Why application `name` (its entry in `details()["applications"]`) cannot start, or None.

    DEPLOY_FAILED, or a replica that failed to start. Ray retries a failing constructor up
    to 3 times per replica before DEPLOY_FAILED (20 s to minutes on a busy machine); when
    the error is serve_app's own (a bad key, model or config) each retry fails the same
    way, so such a failure is `final` at once. Other errors (a worker that died, say) may
    pass on a retry: final only once Ray gives up."""
    deployments = app.get("deployments") or {}
    for deployment_name, deployment in deployments.items():
        status, message = deployment.get("status"), deployment.get("message") or ""
        if status == "DEPLOY_FAILED" or (status != "HEALTHY" and message.startswith("A replica failed to start")):
            error, reason, own = reason_of(message.partition("Error:\n")[2] or message)
            what = "DEPLOY_FAILED" if status == "DEPLOY_FAILED" else "a replica failed to start"
            return Failure(name, deployment_name, what, error, reason, HINTS.get(error, ""), own)
    if app.get("status") == "DEPLOY_FAILED":  # the builder failed: no deployment to blame
        message = app.get("message") or ""
        error, reason, own = reason_of(message)
        return Failure(name, None, "DEPLOY_FAILED", error, reason, HINTS.get(error, ""), own)
    return None


def progress(app: Mapping[str, Any] | None) -> str:
    """One line on where a deploying application is, e.g.
    "DEPLOYING: ModelServer 1/2 replicas running, 1 starting (loading the model)"."""
    if not app:
        return "waiting for Serve to take the config"
    parts = []
    for deployment_name, deployment in (app.get("deployments") or {}).items():
        states = [replica.get("state", "?") for replica in deployment.get("replicas") or []]
        target = (deployment.get("target_num_replicas") or deployment.get("deployment_config", {}).get("num_replicas")
                  or len(states))
        counts = {state: states.count(state) for state in dict.fromkeys(states) if state != "RUNNING"}
        others = ", ".join(f"{n} {state.lower()}" for state, n in counts.items())
        starting = " (loading the model)" if "STARTING" in counts else ""
        parts.append(f"{deployment_name} {states.count('RUNNING')}/{target} replicas running"
                     + (f", {others}{starting}" if others else ""))
    return f"{app.get('status')}: " + ("; ".join(parts) if parts else "building the application (import_path)")


def unhealthy(app: Mapping[str, Any]) -> dict[str, str]:
    """Deployments of a serving application that Ray marks UNHEALTHY, with Ray's message."""
    return {
        deployment_name: (deployment.get("message") or "no message from Ray").strip()
        for deployment_name, deployment in (app.get("deployments") or {}).items()
        if deployment.get("status") == "UNHEALTHY"
    }


def wait_until_running(name: str = APP_NAME, address: str | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """Waits for RUNNING. Raises DeployFailed with serve_app's own message as soon as the
    app cannot start (see `failure`: a replica refused by serve_app's own error, or
    DEPLOY_FAILED), TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = app_status(name, address)
        if status.get("status") == "RUNNING":
            return status
        problem = failure(name, status)
        if problem is not None and problem.final:
            raise DeployFailed(problem)
        time.sleep(0.5)
    raise TimeoutError(f"application {name!r} not RUNNING after {timeout_s}s: {status.get('status')} {status.get('message', '')}")
