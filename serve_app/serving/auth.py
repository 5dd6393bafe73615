"""The optional API key: `Authorization: Bearer <key>` on predict, model and admin routes.

Off unless the application's `args` name where the key lives:

    args:
      api_key_env: SERVE_APP_API_KEY             # an environment variable of the replicas
      # or
      api_key_file: /run/secrets/serve_app_key   # a mounted secret file

The key is read once, when a replica starts; if it is named but missing, too short or
unreadable the replica refuses to start (fail closed, never silently open). Probes
(`/v2/health/*`, model readiness, `/v1/models/{name}`) and `/openapi.json` stay open so
load balancers and orchestrators need no secret; they answer from the versions a replica
already holds and never read the model store. Every route that reveals or loads stored
versions (metadata, version lists, inference on a named version) needs the key. Keys are compared with
`hmac.compare_digest`, in time independent of where they differ.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any, Callable, Optional

from starlette.requests import Request

from serve_app.errors import ServeAppError, Unauthorized

MIN_KEY_LENGTH = 16

Guard = Callable[[Request], None]


class ApiKeyConfigError(ServeAppError):
    """The configured API key cannot be read: the replica must not start without it."""

    status_code = 500


class MissingApiKey(Unauthorized):
    headers = {"www-authenticate": 'Bearer realm="serve_app"'}


def load_api_key(api_key_env: Optional[str], api_key_file: Optional[str]) -> Optional[bytes]:
    """The configured key, None when none is configured; ApiKeyConfigError if unusable."""
    if api_key_env and api_key_file:
        raise ApiKeyConfigError("set api_key_env or api_key_file, not both")
    if api_key_env:
        value = os.environ.get(api_key_env, "").strip()
        where = f"environment variable {api_key_env} (of the replica processes)"
    elif api_key_file:
        try:
            value = Path(api_key_file).read_text().strip()
        except OSError as exc:
            raise ApiKeyConfigError(f"api_key_file {api_key_file} cannot be read: {exc.strerror}") from None
        where = f"api_key_file {api_key_file}"
    else:
        return None
    if len(value) < MIN_KEY_LENGTH:
        raise ApiKeyConfigError(
            f"the API key in {where} is {'missing' if not value else 'too short'}: "
            f"it needs at least {MIN_KEY_LENGTH} characters (e.g. `openssl rand -hex 32`)"
        )
    return value.encode()


def bearer_guard(key: bytes) -> Guard:
    """A check that raises 401 unless the request carries `Authorization: Bearer <key>`."""

    def check(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest runs even for a wrong scheme, so timing tells nothing either way.
        matches = hmac.compare_digest(token.strip().encode(), key)
        if not (matches and scheme.lower() == "bearer"):
            raise MissingApiKey(
                "missing or wrong API key; send 'Authorization: Bearer <key>'"
                if header
                else "this route needs an API key; send 'Authorization: Bearer <key>'"
            )

    return check


def guard_for(settings: Any) -> Optional[Guard]:
    """The guard the application's settings ask for, or None (no check at all)."""
    key = load_api_key(getattr(settings, "api_key_env", None), getattr(settings, "api_key_file", None))
    return bearer_guard(key) if key is not None else None
