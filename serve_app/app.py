"""The application builder named by `import_path: serve_app.app:build_app` in configs/.

    serve run configs/local.yaml          # a laptop
    serve deploy configs/cluster.yaml     # a running Ray cluster

`args` become `AppSettings`; each deployment's `user_config` becomes `RuntimeSettings`.
"""

from __future__ import annotations

from typing import Any, Mapping, cast

from ray.serve import Application, Deployment

from serve_app.serving.deployment import ModelServer
from serve_app.settings import AppSettings, ConfigError, RuntimeSettings, validated
from serve_app.model.store import ModelStore

__all__ = ["ConfigError", "build_app", "settings_from_args"]


def settings_from_args(args: Mapping[str, Any] | None) -> AppSettings:
    return validated(AppSettings, args, "application args")


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    settings = settings_from_args(args)
    store = ModelStore(settings.store)
    if not store.versions(settings.model):
        raise ConfigError(
            f"the model store {store.root} has no model {settings.model!r}; train one with: "
            f"serve-app train --store {store.root} --name {settings.model}"
        )
    # @serve.deployment makes ModelServer a Deployment; its type hints do not say so.
    return cast(Deployment, ModelServer).options(user_config=RuntimeSettings().model_dump()).bind(settings.model_dump())
