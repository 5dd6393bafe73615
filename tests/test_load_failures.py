"""Models that cannot be loaded: refused with a message that says why, both in the
runtime and in `serve status` (control.app_status); and a bad version pushed to a running
app leaves the good one serving."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from serve_app.ops import control
from serve_app.errors import ModelLoadError
from serve_app.model.manifest import MANIFEST_FILENAME, sha256_of
from serve_app.model.predictor import Predictor
from serve_app.model.store import ModelStore
from serve_app.model.training import save_fitted

from .conftest import IRIS_ROWS, app_config, fit_dummy, wait_for


def _writable(path: Path) -> Path:
    os.chmod(path, 0o644)  # the store makes artefacts and manifests read-only
    return path


def _edit_manifest(store: ModelStore, version: str, **changes: Any) -> None:
    path = _writable(store.version_dir("iris", version) / MANIFEST_FILENAME)
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))
    store.sign_version("iris", version, check=False)  # signed by the publisher: only the fault is tested


def missing_file(store: ModelStore, version: str) -> None:
    store.model_path(store.manifest("iris", version)).unlink()


def corrupt_file(store: ModelStore, version: str) -> None:
    """Garbage whose hash the manifest records: only the reader can tell it is broken."""
    path = _writable(store.model_path(store.manifest("iris", version)))
    path.write_bytes(b"PK\x03\x04 this is not a skops archive")
    _edit_manifest(store, version, sha256=sha256_of(path), size_bytes=path.stat().st_size)


def changed_file(store: ModelStore, version: str) -> None:
    path = _writable(store.model_path(store.manifest("iris", version)))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def old_sklearn(store: ModelStore, version: str) -> None:
    manifest = store.manifest("iris", version)
    _edit_manifest(store, version, versions={**manifest.versions, "sklearn": "0.24.2"})


# (how the store is broken, app args, what the refusal must say)
BROKEN: dict[str, tuple[Callable[[ModelStore, str], None] | None, dict[str, Any], str]] = {
    "missing-file": (missing_file, {}, "is missing"),
    "corrupt-file": (corrupt_file, {}, "cannot read skops file"),
    "hash-mismatch": (changed_file, {}, "the file was changed after it was stored"),
    "sklearn-mismatch": (old_sklearn, {}, "was saved with scikit-learn 0.24.2"),
    "feature-count": (None, {"expected_features": 7}, "the config expects 7 features"),
}


def _store_with_good_v1(root: Path) -> ModelStore:
    store = ModelStore(root)
    save_fitted(store, fit_dummy(), name="iris")  # v1, production
    return store


@pytest.mark.parametrize("case", list(BROKEN))
def test_runtime_refuses_with_a_reason(tmp_path: Path, case: str) -> None:
    breaks, args, says = BROKEN[case]
    store = _store_with_good_v1(tmp_path / "models")
    if breaks is not None:
        breaks(store, "1")
    with pytest.raises(ModelLoadError) as refused:
        Predictor.load(store, "iris", "production", expected_features=args.get("expected_features"))
    assert says in refused.value.message


@pytest.fixture(scope="module")
def broken_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelStore]:
    stores = {}
    for case, (breaks, _, _) in BROKEN.items():
        store = _store_with_good_v1(tmp_path_factory.mktemp(case) / "models")
        if breaks is not None:
            breaks(store, "1")
        stores[case] = store
    return stores


def _app_name(case: str) -> str:
    return "bad-" + case


@pytest.mark.ray
def test_deployments_refuse_bad_models_visibly_in_serve_status(served: dict[str, Any], broken_stores: dict[str, ModelStore]) -> None:
    """All five broken apps deployed at once (one config, like `serve deploy`)."""
    cluster = served["cluster"]
    names = [_app_name(case) for case in BROKEN]
    try:
        for case, (_, args, _) in BROKEN.items():
            cluster.apps[_app_name(case)] = app_config(
                broken_stores[case], name=_app_name(case), route_prefix=f"/{_app_name(case)}",
                # One try: Ray retries a failing constructor 3 times by default, ~1 minute here.
                deployment={"ray_actor_options": {"num_cpus": 0.1}, "max_constructor_retry_count": 1},
                monitoring={"enabled": False}, **args,
            )
        control.deploy(cluster.config(), cluster.dashboard)

        def all_failed() -> dict[str, dict[str, Any]]:
            statuses = {name: control.app_status(name, cluster.dashboard) for name in names}
            return statuses if all(s["status"] == "DEPLOY_FAILED" for s in statuses.values()) else {}

        statuses = wait_for(all_failed, timeout_s=240, interval_s=1.0, what="every broken app to be DEPLOY_FAILED")
        for case, (_, _, says) in BROKEN.items():
            status = statuses[_app_name(case)]
            # Ray's app message is generic ("Failed to update the deployments ['ModelServer']");
            # the reason is the deployment's message, shown under it by `serve status`.
            deployment = status["deployments"]["ModelServer"]
            assert deployment["status"] == "DEPLOY_FAILED", deployment
            assert says in deployment["message"], f"{case}: {deployment['message'][-600:]}"
            print(f"REFUSED {case}: {deployment['message'].strip().splitlines()[-1][:300]}")
        # The healthy app next to them kept serving throughout.
        reply = httpx.post(f"{served['base_url']}/predict", json={"features": IRIS_ROWS[0]}, timeout=10)
        assert reply.status_code == 200
    finally:
        for name in names:
            cluster.apps.pop(name, None)
        control.deploy(cluster.config(), cluster.dashboard)


@pytest.fixture
def good_then_bad(served: dict[str, Any], tmp_path: Path) -> Iterator[tuple[str, ModelStore]]:
    store = _store_with_good_v1(tmp_path / "models")
    save_fitted(store, fit_dummy(classes=(0, 1, 2)), name="iris")  # v2
    changed_file(store, "2")
    cluster = served["cluster"]
    cluster.apply(app_config(store, name="pushbad", route_prefix="/pushbad", num_replicas=2,
                             deployment={"ray_actor_options": {"num_cpus": 0.1}}, monitoring={"enabled": False}))
    yield f"{served['base_url']}/pushbad", store
    cluster.remove("pushbad")


@pytest.mark.ray
def test_bad_version_pushed_to_running_app_keeps_the_good_one(served: dict[str, Any], good_then_bad: tuple[str, ModelStore]) -> None:
    url, store = good_then_bad
    cluster = served["cluster"]
    assert httpx.post(f"{url}/predict", json={"features": IRIS_ROWS[0]}).headers["x-model-version"] == "1"

    cluster.apply(app_config(store, name="pushbad", route_prefix="/pushbad", num_replicas=2, user_config={"version": "2"},
                             deployment={"ray_actor_options": {"num_cpus": 0.1}}, monitoring={"enabled": False}), wait=False)

    def refused_everywhere() -> list[dict[str, Any]]:
        seen = {s["pid"]: s for s in (httpx.get(f"{url}/admin/status", timeout=10).json() for _ in range(16))}
        errors = [s.get("last_reconfigure_error") for s in seen.values()]
        return list(seen.values()) if len(seen) == 2 and all(errors) else []

    statuses = wait_for(refused_everywhere, timeout_s=90, what="both replicas to refuse v2")
    for status in statuses:
        assert "sha256" in status["last_reconfigure_error"] and "'2'" in status["last_reconfigure_error"], status
        assert status["version"] == "1"
    for _ in range(10):
        reply = httpx.post(f"{url}/predict", json={"features": IRIS_ROWS}, timeout=10)
        assert reply.status_code == 200 and reply.headers["x-model-version"] == "1", reply.text
    assert control.app_status("pushbad", cluster.dashboard)["status"] == "RUNNING"
