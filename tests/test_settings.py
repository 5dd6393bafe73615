"""Settings from the Ray Serve YAML, and the application builder's refusals (no Ray needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from serve_app.settings import STORE_ENV, AppSettings, RuntimeSettings
from serve_app.model.store import ModelStore
from serve_app.model.training import save_fitted

from .conftest import fit_dummy

ROOT = Path(__file__).resolve().parents[1]


# ---- AppSettings / RuntimeSettings ------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "values", "key"),
    [
        (AppSettings, {"modle": "iris"}, "modle"),
        (AppSettings, {"max_body_byte": 10}, "max_body_byte"),
        (RuntimeSettings, {"versoin": "2"}, "versoin"),
        (RuntimeSettings, {"max_batch": 8}, "max_batch"),
    ],
)
def test_unknown_keys_are_refused_by_name(model: Any, values: dict[str, Any], key: str) -> None:
    with pytest.raises(ValidationError) as info:
        model.model_validate(values)
    errors = info.value.errors()
    assert [(e["loc"], e["type"]) for e in errors] == [((key,), "extra_forbidden")]
    assert key in str(info.value) and "Extra inputs are not permitted" in str(info.value)


def test_version_from_yaml() -> None:
    assert RuntimeSettings.model_validate(yaml.safe_load("version: 3")).version == "3"
    assert RuntimeSettings.model_validate(yaml.safe_load("version: '3'")).version == "3"
    assert RuntimeSettings.model_validate(yaml.safe_load("version: staging")).version == "staging"
    assert RuntimeSettings().version == "production"


@pytest.mark.parametrize("text", ["version: true", "version: no", "version: 1.5", "version: [1]", "version: null"])
def test_bad_versions_are_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="version must be a number or an alias such as 'production'"):
        RuntimeSettings.model_validate(yaml.safe_load(text))


@pytest.mark.parametrize(
    "values",
    [{"max_batch_size": 0}, {"max_batch_size": 100_001}, {"batch_wait_timeout_s": -0.1}, {"batch_wait_timeout_s": 2}],
)
def test_batch_settings_bounds(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=next(iter(values))):
        RuntimeSettings.model_validate(values)


def test_store_path_is_resolved_to_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert AppSettings(store="models").store == str(tmp_path / "models")
    assert AppSettings(store="a/../b").store == str(tmp_path / "b")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert AppSettings(store="~/models").store == str(tmp_path / "home" / "models")
    monkeypatch.delenv(STORE_ENV, raising=False)
    assert AppSettings().store == str(tmp_path / "models")
    monkeypatch.setenv(STORE_ENV, "from-env")
    assert AppSettings().store == str(tmp_path / "from-env")


@pytest.mark.parametrize("values", [{"model": "Iris"}, {"model": "../iris"}, {"model": "iris\n"}, {"max_rows": 0},
                                    {"max_body_bytes": -1}, {"expected_features": 0}])
def test_app_settings_refuse_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=next(iter(values))):
        AppSettings.model_validate(values)


def test_settings_are_frozen() -> None:
    with pytest.raises(ValidationError, match="frozen"):
        AppSettings().model = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        RuntimeSettings().version = "2"  # type: ignore[misc]


@pytest.mark.parametrize("config", ["configs/local.yaml", "configs/cluster.yaml"])
def test_shipped_configs_validate(config: str) -> None:
    from serve_app.app import settings_from_args

    document = yaml.safe_load((ROOT / config).read_text())
    for app in document["applications"]:
        assert app["import_path"] == "serve_app.app:build_app"
        settings = settings_from_args(app.get("args"))
        assert Path(settings.store).is_absolute()
        for deployment in app.get("deployments", []):
            RuntimeSettings.model_validate(deployment.get("user_config") or {})


# ---- serve_app.app: settings_from_args and build_app -------------------------------------------


def test_settings_from_args_names_the_key() -> None:
    from serve_app.app import ConfigError, settings_from_args

    with pytest.raises(ConfigError) as info:
        settings_from_args({"modle": "iris"})
    message = str(info.value)
    assert "args.modle: Extra inputs are not permitted" in message
    assert "allowed keys: model, store, max_body_bytes, max_rows" in message
    with pytest.raises(ConfigError, match=r"args\.max_rows: .*integer"):
        settings_from_args({"max_rows": "many"})
    with pytest.raises(ConfigError, match=r"args\.model: Value error, model 'Iris' is not a valid name"):
        settings_from_args({"model": "Iris"})
    assert settings_from_args(None) == AppSettings()
    assert issubclass(ConfigError, ValueError)  # `serve run` shows ValueErrors without a traceback


def test_build_app_refuses_a_store_without_the_model(store: ModelStore) -> None:
    from serve_app.app import ConfigError, build_app

    with pytest.raises(ConfigError) as info:
        build_app({"store": str(store.root), "model": "iris"})
    assert str(info.value) == (
        f"the model store {store.root} has no model 'iris'; train one with: "
        f"serve-app train --store {store.root} --name iris"
    )


def test_build_app_needs_no_running_ray(store: ModelStore, tmp_path: Path) -> None:
    # In a fresh interpreter: an unreachable RAY_ADDRESS makes any attempt to reach Ray fail.
    save_fitted(store, fit_dummy(), name="dummy")
    script = textwrap.dedent(
        f"""
        import ray
        from ray.serve import Application
        from serve_app.app import ConfigError, build_app

        try:
            build_app({{"store": {str(store.root)!r}, "model": "iris"}})
        except ConfigError as exc:
            assert "has no model 'iris'; train one with: serve-app train" in str(exc), exc
        else:
            raise AssertionError("build_app accepted a store without the model")
        app = build_app({{"store": {str(store.root)!r}, "model": "dummy"}})
        assert isinstance(app, Application), type(app)
        assert not ray.is_initialized()
        print("no ray")
        """
    )
    # PYTHONPATH: this checkout's serve_app, whatever the venv's editable install points at.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "no ray"
