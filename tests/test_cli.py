"""`serve-app` train / models ..., through cli.main and once through the real console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.ops import processes
from serve_app.ops.cli import main
from serve_app.model.store import ModelStore
from serve_app.model.training import save_fitted, train

from .conftest import fit_dummy

ROOT = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2
    assert out == ""
    assert err.startswith("serve-app: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


# ---- train ----------------------------------------------------------------------------------


def test_train_default(capsys: pytest.CaptureFixture[str], store: ModelStore) -> None:
    code, out, err = run(capsys, "train", "--store", str(store.root))
    assert code == 0 and err.startswith("fitting logistic_regression on iris")  # progress goes to stderr
    first, second, runtime = out.splitlines()
    assert runtime.strip().startswith("runtime: scikit-learn; ")
    assert first.startswith("stored iris v1 (LogisticRegression on iris, skops; accuracy=")
    assert first.endswith(") aliases: production, latest")
    assert second.strip() == str(store.root / "iris" / "1")
    manifest = store.manifest("iris")
    assert f"accuracy={manifest.metrics['accuracy']:.4f}" in first
    assert store.versions("iris") == ["1"]


def test_train_wine_random_forest_joblib(capsys: pytest.CaptureFixture[str], store: ModelStore) -> None:
    code, out, _ = run(capsys, "train", "--store", str(store.root), "--name", "wine", "--dataset", "wine",
                       "--estimator", "random_forest", "--format", "joblib")
    assert code == 0
    assert out.startswith("stored wine v1 (RandomForestClassifier on wine, joblib; accuracy=")
    manifest = store.manifest("wine")
    assert (manifest.format, manifest.n_features, manifest.model_file) == ("joblib", 13, "model.joblib")
    store.load_verified("wine")


def test_train_uses_the_store_from_the_environment(capsys: pytest.CaptureFixture[str], store: ModelStore,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVE_APP_STORE", str(store.root))
    code, out, _ = run(capsys, "train", "--name", "from-env", "--dataset", "wine", "--estimator", "random_forest")
    assert code == 0 and store.versions("from-env") == ["1"]


def test_train_refuses_a_mismatched_estimator(capsys: pytest.CaptureFixture[str], store: ModelStore) -> None:
    code, out, err = run(capsys, "train", "--store", str(store.root), "--estimator", "linear_regression")
    assert_one_line_error(code, out, err, "estimator 'linear_regression' does not fit the classification dataset 'iris'",
                          "logistic_regression, random_forest")
    assert store.names() == []


def test_train_refuses_an_invalid_name(capsys: pytest.CaptureFixture[str], store: ModelStore) -> None:
    code, out, err = run(capsys, "train", "--store", str(store.root), "--name", "../escape")
    assert_one_line_error(code, out, err, "invalid model name '../escape'")


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str], store: ModelStore) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--store", str(store.root), "--dataset", "mnist"])
    assert info.value.code == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


# ---- models list / show ---------------------------------------------------------------------


def test_models_list_table(capsys: pytest.CaptureFixture[str], iris_store: ModelStore) -> None:
    save_fitted(iris_store, fit_dummy(), name="iris", metrics={"accuracy": 0.5})
    code, out, _ = run(capsys, "models", "list", "--store", str(iris_store.root))
    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == ["NAME", "VERSION", "ALIASES", "ESTIMATOR", "DATASET", "FORMAT", "METRICS", "CREATED"]
    accuracy = iris_store.manifest("iris", "1").metrics["accuracy"]
    assert first.split()[:7] == ["iris", "1", "production", "LogisticRegression", "iris", "skops", f"accuracy={accuracy:.3f}"]
    assert second.split()[:7] == ["iris", "2", "latest", "DummyClassifier", "custom", "skops", "accuracy=0.500"]
    # Columns line up.
    assert header.index("ALIASES") == first.index("production") == second.index("latest")


def test_models_list_json(capsys: pytest.CaptureFixture[str], iris_store: ModelStore) -> None:
    code, out, _ = run(capsys, "models", "list", "--store", str(iris_store.root), "--json")
    assert code == 0
    entries = json.loads(out)
    manifest = iris_store.manifest("iris")
    assert entries == [{
        "name": "iris", "version": "1", "aliases": ["latest", "production"], "estimator": "LogisticRegression",
        "dataset": "iris", "format": "skops", "metrics": manifest.metrics, "created_at": manifest.created_at,
    }]


def test_models_list_empty_store(capsys: pytest.CaptureFixture[str], store: ModelStore) -> None:
    code, out, _ = run(capsys, "models", "list", "--store", str(store.root))
    assert code == 0
    assert out == f"no models in {store.root}; train one with: serve-app train --store {store.root}\n"
    assert run(capsys, "models", "list", "--store", str(store.root), "--json")[1] == "[]\n"


def test_models_show(capsys: pytest.CaptureFixture[str], iris_store: ModelStore) -> None:
    code, out, _ = run(capsys, "models", "show", "iris", "--store", str(iris_store.root))
    assert code == 0
    assert json.loads(out) == iris_store.manifest("iris").model_dump(mode="json")
    code, out, _ = run(capsys, "models", "show", "iris", "latest", "--store", str(iris_store.root))
    assert json.loads(out)["version"] == "1"


# ---- promote / rollback / history -------------------------------------------------------------


def test_promote_rollback_history(capsys: pytest.CaptureFixture[str], iris_store: ModelStore) -> None:
    save_fitted(iris_store, fit_dummy(), name="iris")
    store_args = ("--store", str(iris_store.root), "--store-only")
    code, out, _ = run(capsys, "models", "promote", "iris", "2", "--reason", "better", *store_args)
    assert code == 0 and out == "iris: production -> v2 (was v1)\n"
    assert iris_store.aliases("iris")["production"] == "2"

    code, out, _ = run(capsys, "models", "promote", "iris", "1", "--alias", "staging", *store_args)
    assert code == 0 and out == "iris: staging -> v1 (was unset)\n"

    code, out, _ = run(capsys, "models", "rollback", "iris", *store_args)
    assert code == 0 and out == "iris: production rolled back v2 -> v1\n"
    assert iris_store.aliases("iris") == {"production": "1", "staging": "1", "latest": "2"}

    code, out, _ = run(capsys, "models", "history", "iris", "--store", str(iris_store.root))
    assert code == 0
    moves = [json.loads(line) for line in out.splitlines()]
    assert [(m["alias"], m["version"], m["previous"], m["reason"]) for m in moves] == [
        ("production", "1", None, "first version"),
        ("production", "2", "1", "better"),
        ("staging", "1", None, ""),
        ("production", "1", "2", "rollback"),
    ]


def test_promote_without_a_running_cluster_changes_the_store(capsys: pytest.CaptureFixture[str], iris_store: ModelStore) -> None:
    save_fitted(iris_store, fit_dummy(), name="iris")
    address = f"http://127.0.0.1:{processes.free_port()}"  # nothing listens there
    code, out, _ = run(capsys, "models", "promote", "iris", "2", "--store", str(iris_store.root), "--address", address)
    assert code == 0
    assert f"no running cluster at {address}: only the store changed" in out
    assert out.rstrip().endswith("iris: production -> v2 (was v1)")
    assert iris_store.aliases("iris")["production"] == "2"


def test_promote_refuses_a_tampered_version(capsys: pytest.CaptureFixture[str], iris_store: ModelStore) -> None:
    save_fitted(iris_store, fit_dummy(), name="iris")
    path = iris_store.version_dir("iris", "2") / "model.skops"
    os.chmod(path, 0o644)
    path.write_bytes(path.read_bytes() + b"\0")
    code, out, err = run(capsys, "models", "promote", "iris", "2", "--store", str(iris_store.root), "--store-only")
    assert_one_line_error(code, out, err, "sha256 of iris/2/model.skops")
    assert iris_store.aliases("iris")["production"] == "1"


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (("models", "show", "wine"), ["no model named 'wine'", "(models: iris)"]),
        (("models", "show", "iris", "7"), ["model 'iris' has no version 7 (versions: 1)"]),
        (("models", "show", "iris", "canary"), ["has no alias 'canary'", "serve-app models promote iris <version> --alias canary"]),
        (("models", "promote", "wine", "1", "--store-only"), ["no model named 'wine'"]),
        (("models", "promote", "iris", "9", "--store-only"), ["has no version 9"]),
        (("models", "promote", "iris", "1", "--alias", "latest", "--store-only"), ["invalid alias 'latest'"]),
        (("models", "rollback", "iris", "--store-only"), ["alias 'production' of 'iris' has no earlier version to roll back to"]),
        (("models", "rollback", "wine", "--store-only"), ["'wine'"]),
        (("models", "show", "../etc"), ["invalid model name '../etc'"]),
    ],
)
def test_model_errors_are_one_line(capsys: pytest.CaptureFixture[str], iris_store: ModelStore,
                                   argv: tuple[str, ...], fragments: list[str]) -> None:
    code, out, err = run(capsys, *argv, "--store", str(iris_store.root))
    assert_one_line_error(code, out, err, *fragments)
    assert iris_store.aliases("iris") == {"production": "1", "latest": "1"}


# ---- the real console script ------------------------------------------------------------------


def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "serve-app"
    assert script.is_file(), "the serve-app console script is not installed in the venv"
    store = tmp_path / "models"
    # PYTHONPATH: this checkout's serve_app, whatever the venv's editable install points at.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def serve_app(*argv: str) -> subprocess.CompletedProcess[str]:
        # Through this interpreter rather than the script's #! line, which names the venv's python.
        return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)

    trained = serve_app("train", "--store", str(store))
    assert trained.returncode == 0, trained.stderr
    assert trained.stdout.startswith("stored iris v1 (LogisticRegression on iris, skops; accuracy=")
    assert ModelStore(store).aliases("iris") == {"production": "1", "latest": "1"}
    missing = serve_app("models", "show", "wine", "--store", str(store))
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("serve-app: error: no model named 'wine'") and missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr
