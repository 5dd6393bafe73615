"""Settings from the Ray Serve YAML, validated when the application is built.

`AppSettings` is the application's `args` (fixed for a deployment's life);
`BatchSettings` and the model version are its `user_config` (applied live in
`reconfigure`, without restarting replicas). Unknown keys are refused, so a typo fails
at `serve run`/`serve deploy` time with a message that says what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve_app.model.store import DEFAULT_ALIAS, NAME_PATTERN

SettingsT = TypeVar("SettingsT", bound=BaseModel)

DEFAULT_MAX_ROWS = 100_000  # rows in one request; more get 413

# Which runtime a replica may use for a version: "auto" is the compiled ONNX model where the
# version's manifest says it verified, else scikit-learn; "sklearn" is always scikit-learn.
RuntimeChoice = Literal["auto", "sklearn"]
RUNTIME_CHOICES: tuple[RuntimeChoice, ...] = ("auto", "sklearn")

STORE_ENV = "SERVE_APP_STORE"
DEFAULT_STORE = "models"


def default_store() -> str:
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


class MonitoringSettings(BaseModel):
    """`args.monitoring`: metrics, prediction log, drift and live accuracy (serve_app/monitoring/)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    """Off: the replica records nothing per request and /feedback, /drift answer 404."""

    log_dir: Optional[str] = None
    """Directory of the prediction log (JSON lines, one file per replica, rotated by size).
    Unset: no log. Relative paths are resolved where the YAML is read, like `store`."""

    log_sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of requests written to the prediction log (decided once per request)."""

    log_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """A log file that would grow past this is rotated to `.1.jsonl`."""

    log_backups: int = Field(default=5, ge=0, le=1000)
    """Rotated files kept per replica; older ones are deleted."""

    queue_size: int = Field(default=20_000, ge=100)
    """Requests waiting for the monitor thread; past this they are dropped and counted
    (metric serve_app_monitor_dropped{reason="queue_full"}), so memory stays bounded."""

    flush_interval_s: float = Field(default=0.5, gt=0.0, le=60.0)
    """How often the monitor thread writes the log, records metrics and reports to the hub."""

    drift_window: int = Field(default=1000, ge=10, le=1_000_000)
    """Most recent input rows each replica keeps per model version for drift scores."""

    drift_min_rows: int = Field(default=500, ge=1)
    """Fewer rows (over all replicas) than this: status `insufficient_data`, not a verdict
    (PSI on 10 bins is noisy below a few hundred rows)."""

    psi_warning: float = Field(default=0.1, gt=0.0)
    """PSI at or above this: `warning` (0.1 is the usual "moderate shift")."""

    psi_drift: float = Field(default=0.25, gt=0.0)
    """PSI at or above this: `drift` (0.25 is the usual "significant shift")."""

    ks_warning: float = Field(default=0.15, gt=0.0, le=1.0)
    """Kolmogorov-Smirnov statistic at or above this: `warning`."""

    ks_drift: float = Field(default=0.3, gt=0.0, le=1.0)
    """Kolmogorov-Smirnov statistic at or above this: `drift`."""

    accuracy_window: int = Field(default=1000, ge=1)
    """Live accuracy is over this many most recent labelled rows, per model version."""

    feedback_capacity: int = Field(default=100_000, ge=100)
    """Predictions kept (over all replicas) for joining with /feedback; older ones are forgotten."""

    @field_validator("log_dir")
    @classmethod
    def _log_dir(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else str(Path(value).expanduser().resolve())

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> "MonitoringSettings":
        if self.psi_warning > self.psi_drift or self.ks_warning > self.ks_drift:
            raise ValueError("warning thresholds must not be above drift thresholds (psi_warning <= psi_drift, ks_warning <= ks_drift)")
        return self


class AppSettings(BaseModel):
    """The `args` of the application in a Ray Serve config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "iris"
    """Name of the model in the store."""

    store: str = Field(default_factory=default_store, validate_default=True)  # a default is made absolute too
    """Model store directory: a path every node can read (a shared mount on a cluster).
    Defaults to $SERVE_APP_STORE, else ./models. Relative paths are relative to the
    directory `serve run`/`serve deploy` was started in."""

    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    """Requests with a larger body get 413."""

    max_rows: int = Field(default=DEFAULT_MAX_ROWS, gt=0)
    """Requests with more rows get 413."""

    expected_features: Optional[int] = Field(default=None, gt=0)
    """If set, a model version with another feature count is refused at load time."""

    api_key_env: Optional[str] = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """If set, predict, model-metadata and admin routes need `Authorization: Bearer <key>`,
    the key being this environment variable of the replicas (e.g. set through the app's
    runtime_env.env_vars). Probes and /openapi.json stay open. See serve_app/serving/auth.py."""

    api_key_file: Optional[str] = None
    """Like api_key_env, the key read from this file instead (a mounted secret). Set one
    of the two, not both; a key that is missing or under 16 characters stops the replica."""

    trusted_keys: Optional[list[str]] = None
    """Public keys (PEM files) of the publishers whose signed versions the replicas load; a
    version not signed by one of them is refused (serve_app/model/signing.py). Unset: the keys in
    $SERVE_APP_TRUSTED_KEYS, else the local publisher's key (a laptop). Keep them where
    whoever can write the model store cannot write."""

    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    """Metrics, prediction log, drift and live accuracy (see MonitoringSettings)."""

    runtime: RuntimeChoice = "auto"
    """"auto": serve a version with its compiled ONNX model (ONNX Runtime) when its manifest
    says one was verified at publish time, else scikit-learn. "sklearn": always scikit-learn.
    /admin/status and the V2 model metadata say which runtime serves and why."""

    onnx_threads: Optional[int] = Field(default=None, ge=1, le=1024)
    """ONNX Runtime threads per model. Unset: the replica's CPUs, i.e. floor of
    `ray_actor_options.num_cpus` (at least 1), which Ray passes as OMP_NUM_THREADS."""

    @field_validator("runtime", mode="before")
    @classmethod
    def _runtime_choice(cls, value: object) -> object:
        if value not in RUNTIME_CHOICES:
            raise ValueError(
                f"runtime must be 'auto' (the verified compiled model where a version has one, else "
                f"scikit-learn) or 'sklearn' (always scikit-learn), got {value!r}"
            )
        return value

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError(
                f"model {value!r} is not a valid name: use lowercase letters, digits, '.', '_', '-'"
            )
        return value

    @field_validator("store")
    @classmethod
    def _store_path(cls, value: str) -> str:
        # Resolved here, in the process that reads the YAML, so replicas started
        # elsewhere with another working directory still find the same store.
        return str(Path(value).expanduser().resolve())

    @field_validator("api_key_file")
    @classmethod
    def _key_file_path(cls, value: Optional[str]) -> Optional[str]:
        return str(Path(value).expanduser().resolve()) if value else None  # as `store`

    @field_validator("trusted_keys")
    @classmethod
    def _key_paths(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        return [str(Path(p).expanduser().resolve()) for p in value] if value else None  # as `store`

    @model_validator(mode="after")
    def _one_key_source(self) -> "AppSettings":
        if self.api_key_env and self.api_key_file:
            raise ValueError("set api_key_env or api_key_file, not both")
        return self


def _version_text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"version must be a number or an alias such as 'production', got {value!r}")
    return str(value)


class CanarySettings(BaseModel):
    """Send a share of the default traffic to a candidate version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    """Version number or alias of the candidate."""

    weight: float = Field(ge=0.0, le=1.0)
    """Share of requests (0..1) that the candidate answers, e.g. 0.1 for 90/10."""

    sticky_header: Optional[str] = None
    """Request header (e.g. x-user-id) whose value pins a caller to one side of the split;
    requests without it are split at random."""

    _text = field_validator("version", mode="before")(_version_text)


class ShadowSettings(BaseModel):
    """Mirror a fraction of traffic to a candidate whose answers are compared, never returned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    """Version number or alias of the shadow candidate."""

    fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    """Share of requests mirrored to the shadow."""

    _text = field_validator("version", mode="before")(_version_text)


class RuntimeSettings(BaseModel):
    """The `user_config` of the model deployment; changing it reconfigures replicas live."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = DEFAULT_ALIAS
    """Version number or alias of the model to serve (e.g. "3" or "production")."""

    max_batch_size: int = Field(default=256, ge=1, le=100_000)
    """Most rows predicted in one call across concurrent requests."""

    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=1.0)
    """How long a batch waits for more requests once the first arrived. 0 takes whatever
    is queued right now: no added latency when idle, full batches under load."""

    batcher: Literal["micro", "serve"] = "micro"
    """Which batcher groups requests: "micro" (serve_app/serving/batching.py, a few µs a request)
    or "serve" (Ray Serve's `@serve.batch`, 300-900 µs a request measured here). Both size
    batches in rows and take the two settings above live."""

    canary: Optional[CanarySettings] = None
    """Split traffic between `version` and a candidate by weight (applied live)."""

    shadow: Optional[ShadowSettings] = None
    """Mirror traffic to a candidate and record how often it agrees (applied live)."""

    _text = field_validator("version", mode="before")(_version_text)


class ConfigError(ValueError):
    """The application's `args` or `user_config` in the YAML cannot be used as they are."""


def validated(model: type[SettingsT], values: object, where: str) -> SettingsT:
    """`model` from the YAML's `values`; ConfigError naming each bad key and the allowed ones."""
    try:
        return model.model_validate(dict(values or {}))  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        if not isinstance(exc, ValidationError):
            raise ConfigError(f"invalid serve_app {where}: expected a mapping of keys, got {values!r}") from None
        key = where.rsplit(" ", 1)[-1]
        problems = "; ".join(f"{key}.{'.'.join(map(str, e['loc'])) or '?'}: {e['msg']}" for e in exc.errors())
        allowed = ", ".join(model.model_fields)
        raise ConfigError(f"invalid serve_app {where}: {problems} (allowed keys: {allowed})") from None


def runtime_settings(user_config: object) -> RuntimeSettings:
    """The deployment's `user_config`, validated (ConfigError says which key is wrong)."""
    return validated(RuntimeSettings, user_config, "deployment user_config")


def user_config_fingerprint(user_config: Mapping[str, Any] | None) -> str:
    """A short hash of a `user_config` as deployed: a replica reports the one it last handled
    (GET /admin/status `user_config`), so a rollout judges each replica only once it has seen
    the config just deployed, never by what it said about an earlier one."""
    canonical = json.dumps(dict(user_config or {}), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
