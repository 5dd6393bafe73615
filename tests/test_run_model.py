"""`serve-app run --model NAME` / `make run MODEL=NAME`: any stored model served with the
config's every other setting, from a copy of the config; a missing model refused by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.errors import ServeAppError
from serve_app.model.store import ModelStore
from serve_app.model.training import train
from serve_app.ops import launcher, processes
from serve_app.ops.cli import main
from serve_app.settings import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = ROOT / "configs" / "local.yaml"


def without_models(config: dict[str, Any]) -> dict[str, Any]:
    for app in config["applications"]:
        (app.get("args") or {}).pop("model", None)
    return config


# ---- the config rewrite (a pure function) ----------------------------------------------------


def test_model_replaced_and_nothing_else() -> None:
    text = LOCAL_CONFIG.read_text()
    changed = yaml.safe_load(launcher.config_text_with_model(text, "churn"))
    original = yaml.safe_load(text)
    assert original["applications"][0]["args"]["model"] == "iris"
    assert changed["applications"][0]["args"]["model"] == "churn"
    assert without_models(changed) == without_models(original)


def test_every_serve_app_application_and_no_other() -> None:
    text = yaml.safe_dump({"applications": [
        {"name": "a", "import_path": "serve_app.app:build_app", "args": {"model": "iris", "max_rows": 10}},
        {"name": "b", "import_path": "serve_app.app:build_app"},  # no args: the model is set all the same
        {"name": "c", "import_path": "other.app:build", "args": {"model": "iris"}},
    ]})
    apps = yaml.safe_load(launcher.config_text_with_model(text, "churn"))["applications"]
    assert apps[0]["args"] == {"model": "churn", "max_rows": 10}
    assert apps[1]["args"] == {"model": "churn"}
    assert apps[2]["args"] == {"model": "iris"}


def test_config_without_serve_app_or_with_a_bad_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="no serve_app application"):
        launcher.config_text_with_model(yaml.safe_dump({"applications": [{"import_path": "x:y"}]}), "churn")
    with pytest.raises(ConfigError, match="not a Ray Serve config"):
        launcher.config_text_with_model("just: text", "churn")
    with pytest.raises(ServeAppError, match="invalid model name"):
        launcher.config_text_with_model(LOCAL_CONFIG.read_text(), "../churn")


# ---- a model the store has not got ----------------------------------------------------------


def config_file(tmp_path: Path, store: ModelStore, model: str = "iris") -> Path:
    """configs/local.yaml with this test's store and a free port."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["http_options"]["port"] = processes.free_port()
    config["applications"][0]["args"].update(store=str(store.root), model=model)
    config["applications"][0]["args"]["monitoring"].pop("log_dir", None)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_missing_model_message_lists_the_store_and_how_to_add_one(iris_store: ModelStore) -> None:
    message = launcher.missing_model_message(iris_store, "churn")
    assert f"the model store {iris_store.root} has no model 'churn' (it has: iris)" in message
    assert "serve-app train" in message and "--dataset churn" in message
    assert "serve-app models import MODEL_FILE --name churn" in message


def test_run_refuses_a_missing_model_with_exit_1_and_leaves_the_config_alone(
    tmp_path: Path, iris_store: ModelStore, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_file(tmp_path, iris_store)
    before = path.read_bytes()
    assert main(["run", "--config", str(path), "--model", "churn"]) == 1
    err = capsys.readouterr().err
    assert "has no model 'churn' (it has: iris)" in err and "serve-app models import" in err
    assert path.read_bytes() == before
    assert iris_store.names() == ["iris"]  # nothing trained under the name


def test_the_default_model_is_still_trained_when_missing(store: ModelStore) -> None:
    store.root.mkdir(parents=True)  # an empty store: only ./models may be missing altogether
    config = yaml.safe_load(config_file(store.root.parent, store).read_text())
    said: list[str] = []
    launcher.ensure_models(config, log=said.append)
    assert store.versions("iris") == ["1"] and "training the default one" in said[0]


def test_serve_run_gets_a_copy_with_the_model(
    tmp_path: Path, iris_store: ModelStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve run` is handed the rewritten copy (read here as it starts); it is stood in for
    by a process that exits at once, so no Ray starts."""
    train(iris_store, name="other")
    path = config_file(tmp_path, iris_store)
    before = path.read_bytes()
    seen: dict[str, Any] = {}
    real_popen = subprocess.Popen

    def fake_popen(command: list[str], **kwargs: Any) -> Any:
        seen["command"] = command
        seen["config"] = yaml.safe_load(Path(command[-1]).read_text())
        return real_popen([sys.executable, "-c", "raise SystemExit(3)"], **kwargs)

    monkeypatch.setattr(launcher.subprocess, "Popen", fake_popen)
    assert launcher.run(path, model="other") == 3
    assert "serve run" in capsys.readouterr().out
    assert Path(seen["command"][-1]) != path and not Path(seen["command"][-1]).exists()  # gone with the run
    assert seen["config"]["applications"][0]["args"]["model"] == "other"
    assert without_models(seen["config"]) == without_models(yaml.safe_load(before))
    assert path.read_bytes() == before
    # Without --model, the user's own file.
    assert launcher.run(path) == 3
    assert Path(seen["command"][-1]) == path


# ---- make run MODEL=NAME --------------------------------------------------------------------


def make_run_commands(*variables: str) -> list[str]:
    out = subprocess.run(["make", "-n", "run", *variables], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "serve-app run" in line]


def test_make_run_passes_model() -> None:
    assert make_run_commands("MODEL=churn") == [".venv/bin/serve-app run --config configs/local.yaml --model churn"]
    assert make_run_commands() == [".venv/bin/serve-app run --config configs/local.yaml"]
