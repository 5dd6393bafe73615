"""The versioned model store: versions, aliases, history, and what it refuses."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from serve_app.errors import ModelLoadError, NotFound, StoreError
from serve_app.model.manifest import MANIFEST_FILENAME, library_versions
from serve_app.model.store import ALIASES_FILENAME, HISTORY_FILENAME, ModelStore
from serve_app.model.training import save_fitted

from .conftest import fit_dummy


def save_dummy(store: ModelStore, name: str = "dummy", **kwargs: object) -> str:
    return save_fitted(store, fit_dummy(), name=name, **kwargs).version  # type: ignore[arg-type]


# ---- versions ------------------------------------------------------------------------------


def test_versions_are_whole_numbers_in_order(store: ModelStore) -> None:
    assert [save_dummy(store) for _ in range(3)] == ["1", "2", "3"]
    assert store.versions("dummy") == ["1", "2", "3"]
    assert store.names() == ["dummy"]
    # Ordering is numeric, not lexical: v10 comes after v9.
    for _ in range(7):
        save_dummy(store)
    assert store.versions("dummy")[-2:] == ["9", "10"]
    assert store.aliases("dummy")["latest"] == "10"


def test_saved_files_are_read_only_and_never_overwritten(store: ModelStore) -> None:
    first = save_fitted(store, fit_dummy(), name="dummy")
    directory = store.version_dir("dummy", "1")
    for path in (directory / first.model_file, directory / MANIFEST_FILENAME):
        assert stat.S_IMODE(path.stat().st_mode) == 0o444, path
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    second = save_fitted(store, fit_dummy(classes=(0, 1, 2)), name="dummy")
    assert second.version == "2"
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert store.manifest("dummy", "1").sha256 == first.sha256 != second.sha256


def test_a_version_without_manifest_is_ignored(store: ModelStore) -> None:
    save_dummy(store)
    # A writer that died before its manifest: the directory exists but is incomplete.
    (store.model_dir("dummy") / "2").mkdir()
    (store.model_dir("dummy") / "2" / "model.skops").write_bytes(b"half written")
    assert store.versions("dummy") == ["1"]
    assert store.aliases("dummy")["latest"] == "1"
    with pytest.raises(NotFound, match=r"has no version 2 \(versions: 1\)"):
        store.resolve("dummy", "2")
    # The next save does not reuse the incomplete number.
    assert save_dummy(store) == "3"
    # Stray non-version entries are not versions either.
    (store.model_dir("dummy") / "notes").mkdir()
    (store.model_dir("dummy") / "²").mkdir()  # str.isdigit() is true for it, int() fails
    assert store.versions("dummy") == ["1", "3"]
    assert save_dummy(store) == "4"


def test_failed_save_leaves_no_version(store: ModelStore) -> None:
    with pytest.raises(Exception):
        store.save(fit_dummy(), {"name": "dummy"})  # manifest fields missing
    assert store.versions("dummy") == []
    assert list(store.model_dir("dummy").iterdir()) == []


def test_manifest_and_model_round_trip(store: ModelStore) -> None:
    model = fit_dummy(classes=(3, 7))
    manifest = save_fitted(store, model, name="dummy", reference=np.ones((4, 4)))
    loaded, stored = store.load_verified("dummy", "1")
    assert stored == manifest
    rows = np.arange(8, dtype=float).reshape(2, 4)
    assert np.array_equal(loaded.predict(rows), model.predict(rows))


@pytest.mark.parametrize("fmt", ["skops", "joblib"])
def test_both_formats_load(store: ModelStore, fmt: str) -> None:
    manifest = save_fitted(store, fit_dummy(), name="dummy", fmt=fmt)  # type: ignore[arg-type]
    assert manifest.model_file == f"model.{fmt}"
    model, _ = store.load_verified("dummy")
    assert type(model).__name__ == "DummyClassifier"


# ---- aliases, promote, rollback, history ------------------------------------------------------


def test_production_is_set_on_the_first_save_only(store: ModelStore) -> None:
    save_dummy(store)
    assert store.aliases("dummy") == {"production": "1", "latest": "1"}
    save_dummy(store)
    assert store.aliases("dummy") == {"production": "1", "latest": "2"}
    assert store.resolve("dummy") == "1"  # the default reference is production
    assert store.resolve("dummy", "latest") == "2"
    assert store.resolve("dummy", 2) == "2"
    assert store.resolve("dummy", "02") == "2"
    # `latest` is computed, never stored.
    stored = json.loads((store.model_dir("dummy") / ALIASES_FILENAME).read_text())
    assert stored == {"production": "1"}


def test_save_without_promote_first(store: ModelStore) -> None:
    save_fitted(store, fit_dummy(), name="dummy", promote_first=False)
    assert store.aliases("dummy") == {"latest": "1"}
    with pytest.raises(NotFound, match="has no alias 'production'.*serve-app models promote dummy"):
        store.resolve("dummy")


def test_promote_rollback_and_history(store: ModelStore) -> None:
    for _ in range(3):
        save_dummy(store)
    assert store.promote("dummy", "3", reason="better") == "3"
    assert store.promote("dummy", "latest", "staging") == "3"
    assert store.promote("dummy", "2") == "2"
    assert store.aliases("dummy") == {"production": "2", "staging": "3", "latest": "3"}

    assert store.rollback("dummy") == "3"  # production: 2 -> back to 3
    assert store.aliases("dummy")["production"] == "3"
    with pytest.raises(StoreError, match="no earlier version"):  # staging moved only once
        store.rollback("dummy", "staging")
    history = store.history("dummy")
    moves = [(e["action"], e["alias"], e["version"], e["previous"], e["reason"]) for e in history]
    assert moves == [
        ("promote", "production", "1", None, "first version"),
        ("promote", "production", "3", "1", "better"),
        ("promote", "staging", "3", None, ""),
        ("promote", "production", "2", "3", ""),
        ("promote", "production", "3", "2", "rollback"),
    ]
    assert all(e["at"] and e["by"] for e in history)


def test_history_is_append_only(store: ModelStore) -> None:
    save_dummy(store)
    save_dummy(store)
    path = store.model_dir("dummy") / HISTORY_FILENAME
    before = path.read_bytes()
    store.promote("dummy", "2")
    after = path.read_bytes()
    assert after.startswith(before) and len(after.splitlines()) == len(before.splitlines()) + 1
    assert all(json.loads(line) for line in after.splitlines())


def test_rollback_without_an_earlier_version_is_refused(store: ModelStore) -> None:
    save_dummy(store)
    with pytest.raises(StoreError, match="'production' of 'dummy' has no earlier version"):
        store.rollback("dummy")
    with pytest.raises(StoreError, match="'staging'"):
        store.rollback("dummy", "staging")


def test_rollback_walks_back_through_earlier_moves(store: ModelStore) -> None:
    for _ in range(3):
        save_dummy(store)
    store.promote("dummy", "2")
    store.promote("dummy", "3")
    assert store.rollback("dummy") == "2"
    assert store.aliases("dummy")["production"] == "2"


@pytest.mark.parametrize("alias", ["latest", "Prod", "1abc", "", "a/b", "../x", "prod\n", "x" * 33])
def test_invalid_aliases_are_refused(store: ModelStore, alias: str) -> None:
    save_dummy(store)
    with pytest.raises(StoreError, match="invalid alias"):
        store.promote("dummy", "1", alias)
    assert store.aliases("dummy") == {"production": "1", "latest": "1"}


def test_promote_to_a_missing_version_is_refused(store: ModelStore) -> None:
    save_dummy(store)
    with pytest.raises(NotFound, match=r"model 'dummy' has no version 5 \(versions: 1\)"):
        store.promote("dummy", "5")
    assert len(store.history("dummy")) == 1


# ---- resolve errors and refused names ---------------------------------------------------------


def test_resolve_errors_list_what_exists(store: ModelStore) -> None:
    save_dummy(store, "alpha")
    save_dummy(store, "beta")
    with pytest.raises(NotFound, match=r"no model named 'gamma' in .* \(models: alpha, beta\)") as info:
        store.resolve("gamma")
    assert info.value.status_code == 404
    with pytest.raises(NotFound, match=r"has no version 9 \(versions: 1\)"):
        store.resolve("alpha", 9)
    with pytest.raises(NotFound, match=r"has no alias 'canary' \(aliases: latest, production\)"):
        store.resolve("alpha", "canary")


def test_resolve_in_an_empty_store(store: ModelStore) -> None:
    assert store.names() == []
    with pytest.raises(NotFound, match=r"\(models: none\)"):
        store.resolve("iris")


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "/etc", "Iris", "", ".hidden", "x" * 65, "iris\n", "a b"])
def test_invalid_names_are_refused(store: ModelStore, name: str) -> None:
    with pytest.raises(StoreError, match="invalid model name") as info:
        store.model_dir(name)
    assert info.value.status_code == 400
    with pytest.raises(StoreError):
        save_dummy(store, name)
    assert not (store.root.parent / "x").exists()


@pytest.mark.parametrize("version", ["-1", "1.0", "../1", "²", "one", ""])
def test_invalid_versions_are_refused(store: ModelStore, version: str) -> None:
    save_dummy(store)
    with pytest.raises(StoreError, match="invalid version"):
        store.version_dir("dummy", version)
    with pytest.raises(NotFound):  # not a number, so looked up (and not found) as an alias
        store.resolve("dummy", version)


def test_symlinked_version_dir_outside_the_store_is_refused(store: ModelStore, tmp_path: Path) -> None:
    save_dummy(store)
    outside = tmp_path / "outside"
    shutil.copytree(store.version_dir("dummy", "1"), outside)
    os.symlink(outside, store.model_dir("dummy") / "2")
    with pytest.raises(StoreError, match="outside the model store"):
        store.load_verified("dummy", "2")
    with pytest.raises(StoreError, match="outside the model store"):
        store.version_dir("dummy", "2")


def test_symlinked_model_dir_outside_the_store_is_refused(store: ModelStore, tmp_path: Path) -> None:
    other = ModelStore(tmp_path / "elsewhere")
    save_dummy(other)
    store.root.mkdir(parents=True)
    os.symlink(other.model_dir("dummy"), store.root / "dummy")
    with pytest.raises(StoreError, match="outside the model store"):
        store.load_verified("dummy", "1")


def test_symlinked_model_file_is_refused(store: ModelStore, tmp_path: Path) -> None:
    manifest = save_fitted(store, fit_dummy(), name="dummy")
    path = store.version_dir("dummy", "1") / manifest.model_file
    outside = tmp_path / "evil.skops"
    shutil.copy(path, outside)  # same bytes, so the hash would even match
    path.unlink()
    os.symlink(outside, path)
    with pytest.raises(ModelLoadError, match="is a link or lies outside its version directory"):
        store.load_verified("dummy", "1")


def test_manifest_naming_another_file_is_refused(store: ModelStore) -> None:
    save_dummy(store)
    path = store.version_dir("dummy", "1") / MANIFEST_FILENAME
    os.chmod(path, 0o644)
    data = json.loads(path.read_text())
    data["model_file"] = "../../../../etc/passwd"
    path.write_text(json.dumps(data))
    store.sign_version("dummy", "1", check=False)  # even signed, the name is refused
    with pytest.raises(ModelLoadError, match="names model file '../../../../etc/passwd'; only model.skops"):
        store.load_verified("dummy", "1")


def test_unreadable_manifest_is_a_load_error(store: ModelStore) -> None:
    save_dummy(store)
    path = store.version_dir("dummy", "1") / MANIFEST_FILENAME
    os.chmod(path, 0o644)
    path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="manifest .* is unreadable or invalid"):
        store.manifest("dummy", "1")


def test_store_path_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = ModelStore("relative/models")
    assert store.root == tmp_path / "relative" / "models"
    assert store.root.is_absolute()


# ---- concurrency ----------------------------------------------------------------------------


def test_concurrent_saves_get_distinct_versions(store: ModelStore) -> None:
    writers = 6
    barrier = threading.Barrier(writers)
    results: list[str] = []
    errors: list[BaseException] = []
    model = fit_dummy()
    fields = {
        "name": "dummy", "estimator": "sklearn.dummy.DummyClassifier", "task": "classification",
        "feature_names": ["a", "b", "c", "d"], "n_features": 4, "classes": [0, 1],
        "outputs": ["predict", "predict_proba"], "dataset": "custom", "versions": library_versions(),
    }

    def write() -> None:
        try:
            barrier.wait(timeout=30)
            results.append(store.save(model, dict(fields)).version)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sorted(results, key=int) == [str(i) for i in range(1, writers + 1)]
    assert store.versions("dummy") == [str(i) for i in range(1, writers + 1)]
    # Exactly one writer set production, to the version it saved.
    firsts = [e for e in store.history("dummy") if e["reason"] == "first version"]
    assert len(firsts) == 1
    assert store.aliases("dummy")["production"] == firsts[0]["version"]
    for version in store.versions("dummy"):
        store.load_verified("dummy", version)  # every version is complete and intact

