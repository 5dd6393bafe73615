"""Settings from the Ray Serve YAML, validated when the application is built.

`AppSettings` is the application's `args` (fixed for a deployment's life);
`BatchSettings` and the model version are its `user_config` (applied live in
`reconfigure`, without restarting replicas). Unknown keys are refused, so a typo fails
at `serve run`/`serve deploy` time with a message that says what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.predictor import DEFAULT_MAX_ROWS
from serve_app.store import DEFAULT_ALIAS, NAME_PATTERN

STORE_ENV = "SERVE_APP_STORE"
DEFAULT_STORE = "models"


def default_store() -> str:
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


class AppSettings(BaseModel):
    """The `args` of the application in a Ray Serve config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "iris"
    """Name of the model in the store."""

    store: str = Field(default_factory=default_store)
    """Model store directory: a path every node can read (a shared mount on a cluster).
    Defaults to $SERVE_APP_STORE, else ./models. Relative paths are relative to the
    directory `serve run`/`serve deploy` was started in."""

    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    """Requests with a larger body get 413."""

    max_rows: int = Field(default=DEFAULT_MAX_ROWS, gt=0)
    """Requests with more rows get 413."""

    expected_features: Optional[int] = Field(default=None, gt=0)
    """If set, a model version with another feature count is refused at load time."""

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

    canary: Optional[CanarySettings] = None
    """Split traffic between `version` and a candidate by weight (applied live)."""

    shadow: Optional[ShadowSettings] = None
    """Mirror traffic to a candidate and record how often it agrees (applied live)."""

    _text = field_validator("version", mode="before")(_version_text)
