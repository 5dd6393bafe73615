"""Unsafe artefacts and exposure: hash before load, no path escapes, no code run from a
pickle, skops allow-list, the optional API key, and what the deployment listens on."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest

from serve_app import artefacts
from serve_app.errors import ModelLoadError, NotFound, ServeAppError, StoreError
from serve_app.manifest import sha256_of
from serve_app.predictor import Predictor
from serve_app.store import ModelStore
from serve_app.training import save_fitted

from .conftest import fit_dummy


class WritesMarker:
    """Pickles to `exec(...)`: unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class HidesInObjectArray:
    """The same payload, hidden in an object-dtype numpy array (a nested pickle in joblib)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _evil_model(marker: Path, how: str) -> Any:
    model = fit_dummy()
    if how == "top-level":
        return WritesMarker(marker)
    if how == "attribute":  # a real sklearn model carrying the payload in its __dict__
        model.extra_ = WritesMarker(marker)
    elif how == "object-array":
        model.extra_ = np.array([HidesInObjectArray(marker), 1], dtype=object)
    return model


def _store_joblib(store: ModelStore, model: Any) -> str:
    """Stores `model` through the store itself, so the manifest hash matches the file."""
    template = save_fitted(store, fit_dummy(), name="template", fmt="joblib")
    automatic = {"version", "created_at", "created_by", "format", "model_file", "sha256", "size_bytes"}
    fields = {k: v for k, v in template.model_dump().items() if k not in automatic}
    return store.save(model, {**fields, "name": "evil"}, fmt="joblib").version


# ---- pickle payloads -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["top-level", "attribute", "object-array"])
def test_payload_really_runs_under_plain_joblib(tmp_path: Path, how: str) -> None:
    """Proof the payloads are live: plain joblib.load writes the marker."""
    marker = tmp_path / "marker"
    joblib.dump(_evil_model(marker, how), tmp_path / "m.joblib")
    joblib.load(tmp_path / "m.joblib")
    assert marker.exists()


@pytest.mark.parametrize("how", ["top-level", "attribute", "object-array"])
def test_crafted_pickle_refused_before_unpickling_even_with_matching_hash(store: ModelStore, tmp_path: Path, how: str) -> None:
    marker = tmp_path / "marker"
    version = _store_joblib(store, _evil_model(marker, how))
    # The manifest's hash matches the file: only the opcode scan stands between it and exec.
    manifest = store.manifest("evil", version)
    assert sha256_of(store.model_path(manifest)) == manifest.sha256
    with pytest.raises(artefacts.UnsafeArtefact) as refused:
        store.load_verified("evil", version)
    assert "not on the allow-list" in refused.value.message
    assert ("builtins.exec" if how != "object-array" else "posix.system") in refused.value.message
    with pytest.raises(ModelLoadError):
        Predictor.load(store, "evil", version)
    assert not marker.exists()


def test_restricted_unpickler_is_a_second_line(tmp_path: Path) -> None:
    """Even if the scan were bypassed, joblib's reader with our find_class refuses the global."""
    marker = tmp_path / "marker"
    joblib.dump(_evil_model(marker, "attribute"), tmp_path / "m.joblib")
    with pytest.raises(artefacts.UnsafeArtefact):
        artefacts._load_joblib_restricted(tmp_path / "m.joblib")
    assert not marker.exists()


def test_tampered_file_refused_by_hash_before_anything_is_read(store: ModelStore, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    manifest = save_fitted(store, fit_dummy(), name="tampered", fmt="joblib")
    path = store.model_path(manifest)
    os.chmod(path, 0o644)
    joblib.dump(_evil_model(marker, "top-level"), path)
    with pytest.raises(ModelLoadError, match="sha256 .* the file was changed"):
        store.load_verified("tampered", manifest.version)
    assert not marker.exists()


@pytest.mark.parametrize(
    "raw",
    [
        pickle.dumps(os.getcwd, protocol=2),  # GLOBAL opcode, protocol 2
        pickle.dumps(WritesMarker(Path("/tmp/x")), protocol=5),
        b"cos\nsystem\n(S'true'\ntR.",  # protocol 0: no \x80 header
        b"\x80\x04\x95",  # truncated
        pickle.dumps([1, 2], protocol=5) + b"trailing",
        b"\x80\x02cnumpy.testing\nassert_equal\n.",
        b"\x80\x02cnumpy\nload\n.",
        b"\x80\x02K\x01Q.",  # BINPERSID: persistent ids
        b"\x80\x02\x82\x01.",  # EXT1: the extension registry
    ],
    ids=["getcwd", "exec", "proto0", "truncated", "trailing", "numpy.testing", "numpy.load", "persid", "ext1"],
)
def test_scan_refuses(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "m.joblib"
    path.write_bytes(raw)
    with pytest.raises(artefacts.UnsafeArtefact):
        artefacts.scan_pickle_file(path)


def test_scan_accepts_real_models_and_they_load(tmp_path: Path) -> None:
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    features, target = load_iris(return_X_y=True)
    labels = np.array(["setosa", "versicolor", "virginica"])[target]  # object/unicode arrays
    models = [
        RandomForestClassifier(n_estimators=3, random_state=0).fit(features, labels),
        make_pipeline(FunctionTransformer(np.log1p), StandardScaler(), RandomForestClassifier(3)).fit(features, target),
    ]
    for index, model in enumerate(models):
        path = tmp_path / f"{index}.joblib"
        joblib.dump(model, path)
        seen = artefacts.scan_pickle_file(path)
        assert "joblib.numpy_pickle.NumpyArrayWrapper" in seen
        loaded = artefacts.load(path, "joblib")
        assert (loaded.predict(features) == model.predict(features)).all()


@pytest.mark.parametrize(
    ("module", "name", "trusted"),
    [
        ("sklearn.linear_model._logistic", "LogisticRegression", True),
        ("numpy", "dtype", True),
        ("numpy", "load", False),
        ("numpy.f2py", "compile", False),
        ("numpy.testing", "assert_equal", False),
        ("builtins", "eval", False),
        ("builtins", "getattr", False),
        ("builtins", "slice", True),
        ("os", "system", False),
        ("sklearnx", "Thing", False),
    ],
)
def test_allow_list(module: str, name: str, trusted: bool) -> None:
    assert artefacts.is_trusted_global(module, name) is trusted


# ---- skops -----------------------------------------------------------------------------------


def test_skops_is_the_default_format(iris_store: ModelStore) -> None:
    manifest = iris_store.manifest("iris")
    assert manifest.format == "skops" and manifest.model_file == "model.skops"


def test_skops_refuses_types_outside_the_allow_list(store: ModelStore) -> None:
    from sklearn.preprocessing import FunctionTransformer

    # A FunctionTransformer that would call eval on every request, stored the normal way.
    model = FunctionTransformer(eval).fit(np.zeros((2, 1)))
    directory = store.root / "x"
    directory.mkdir(parents=True)
    artefacts.dump(model, directory / "model.skops", "skops")
    assert "builtins.eval" in artefacts.untrusted_types(directory / "model.skops")
    with pytest.raises(ModelLoadError, match="builtins.eval"):
        artefacts.load(directory / "model.skops", "skops")


def test_skops_random_forest_loads(store: ModelStore) -> None:
    from sklearn.ensemble import RandomForestClassifier

    rows = np.arange(40, dtype=float).reshape(10, 4)
    model = RandomForestClassifier(n_estimators=3, random_state=0).fit(rows, [0, 1] * 5)
    manifest = save_fitted(store, model, name="forest")
    loaded, _ = store.load_verified("forest", manifest.version)
    assert (loaded.predict(rows) == model.predict(rows)).all()


# ---- paths outside the store ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_iris(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """One trained iris store for the read-only path checks (training costs ~1 s each)."""
    from serve_app.training import train

    store = ModelStore(tmp_path_factory.mktemp("paths") / "models")
    train(store)
    return store


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/../../b", "..", "iris/../..", "IRIS\x00"])
def test_model_names_cannot_leave_the_store(shared_iris: ModelStore, name: str) -> None:
    with pytest.raises(StoreError):
        shared_iris.model_dir(name)


@pytest.mark.parametrize("version", ["../1", "/1", "1/../../x", "-1", "1e3", "²"])
def test_versions_cannot_leave_the_store(shared_iris: ModelStore, version: str) -> None:
    with pytest.raises((StoreError, NotFound)):
        shared_iris.version_dir("iris", version)
    with pytest.raises((StoreError, NotFound)):
        shared_iris.load_verified("iris", version)


@pytest.mark.parametrize("model_file", ["../../../../etc/passwd", "/etc/passwd", "model.pkl"])
def test_manifest_cannot_point_outside_its_version(shared_iris: ModelStore, model_file: str) -> None:
    manifest = shared_iris.manifest("iris")
    forged = manifest.model_copy(update={"model_file": model_file})
    with pytest.raises(ModelLoadError, match="only model.skops, model.joblib"):
        shared_iris.model_path(forged)


def test_symlink_escapes_are_refused(store: ModelStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    manifest = save_fitted(store, fit_dummy(), name="linkfile", fmt="joblib")
    # A model directory that is a link out of the store.
    (store.root / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError, match="outside the model store"):
        store.model_dir("linked")
    # A model file that is a link.
    path = store.model_path(manifest)
    target = outside / "model.joblib"
    target.write_bytes(path.read_bytes())
    os.chmod(path, 0o644)
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(ModelLoadError, match="is a link"):
        store.load_verified("linkfile", manifest.version)


def test_store_errors_are_client_safe() -> None:
    assert issubclass(StoreError, ServeAppError) and issubclass(artefacts.UnsafeArtefact, ModelLoadError)


# ---- the optional API key --------------------------------------------------------------------


def _request(authorization: str | None) -> Any:
    from starlette.requests import Request

    headers = [] if authorization is None else [(b"authorization", authorization.encode("latin-1"))]
    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers})


def test_api_key_from_a_secret_file(tmp_path: Path) -> None:
    from serve_app import auth

    secret = tmp_path / "key"
    secret.write_text("s3cret-key-of-enough-length\n")
    key = auth.load_api_key(None, str(secret))
    assert key == b"s3cret-key-of-enough-length"
    guard = auth.bearer_guard(key)
    guard(_request("Bearer s3cret-key-of-enough-length"))
    guard(_request("bearer s3cret-key-of-enough-length"))
    for header in (None, "", "Bearer", "Bearer wrong", "Basic s3cret-key-of-enough-length", "s3cret-key-of-enough-length",
                   "Bearer s3cret-key-of-enough-lengt", "Bearer s3cret-key-of-enough-length2", "Bearer é"):
        with pytest.raises(auth.MissingApiKey) as refused:
            guard(_request(header))
        assert refused.value.status_code == 401


def test_api_key_misconfiguration_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serve_app import auth

    assert auth.load_api_key(None, None) is None  # off: no check at all
    monkeypatch.delenv("SERVE_APP_TEST_UNSET", raising=False)
    with pytest.raises(auth.ApiKeyConfigError, match="missing"):
        auth.load_api_key("SERVE_APP_TEST_UNSET", None)
    monkeypatch.setenv("SERVE_APP_TEST_SHORT", "short")
    with pytest.raises(auth.ApiKeyConfigError, match="too short"):
        auth.load_api_key("SERVE_APP_TEST_SHORT", None)
    with pytest.raises(auth.ApiKeyConfigError, match="cannot be read"):
        auth.load_api_key(None, str(tmp_path / "absent"))


API_KEY = "test-key-0123456789abcdef"
PROTECTED = [
    ("POST", "/predict", {"features": [5.1, 3.5, 1.4, 0.2]}),
    ("POST", "/v1/models/iris:predict", {"instances": [[5.1, 3.5, 1.4, 0.2]]}),
    ("POST", "/v2/models/iris/infer", {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}),
    ("POST", "/v2/models/iris/versions/1/infer", {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}),
    ("GET", "/v2/models/iris", None),
    ("GET", "/v2/models/iris/versions/1", None),
    ("GET", "/admin/status", None),
]
OPEN = ["/v2/health/live", "/v2/health/ready", "/v2/models/iris/ready", "/v2/models/iris/versions/1/ready", "/v1/models/iris", "/v2", "/openapi.json"]


@pytest.fixture(scope="module")
def secured_app(served: dict[str, Any]) -> Any:
    """A separate app whose replicas get the key as an environment variable (runtime_env)."""
    from .conftest import app_config, wait_for

    cluster = served["cluster"]
    config = app_config(served["store"], name="secured", route_prefix="/secured", api_key_env="SERVE_APP_TEST_API_KEY",
                        deployment={"ray_actor_options": {"num_cpus": 0.1}})
    config["runtime_env"] = {"env_vars": {"SERVE_APP_TEST_API_KEY": API_KEY}}
    cluster.apply(config)
    url = f"{served['base_url']}/secured"
    import httpx

    wait_for(lambda: httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200, what="secured app")
    yield url
    cluster.remove("secured")


@pytest.mark.ray
@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_protected_routes_need_the_key(secured_app: str, method: str, path: str, body: Any) -> None:
    import httpx

    for authorization in (None, "Bearer wrong-key-0123456789abcdef", f"Basic {API_KEY}"):
        headers = {} if authorization is None else {"authorization": authorization}
        reply = httpx.request(method, secured_app + path, json=body, headers=headers, timeout=10)
        assert reply.status_code == 401, (authorization, reply.text)
        assert set(reply.json()) == {"error"} and "Bearer" in reply.json()["error"]
        assert reply.headers["www-authenticate"].startswith("Bearer")
    reply = httpx.request(method, secured_app + path, json=body, headers={"authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert reply.status_code == 200, reply.text


@pytest.mark.ray
def test_probes_stay_open_without_the_key(secured_app: str) -> None:
    import httpx

    for path in OPEN:
        reply = httpx.get(secured_app + path, timeout=10)
        assert reply.status_code == 200, (path, reply.text)


@pytest.mark.ray
def test_no_key_configured_means_open(served: dict[str, Any]) -> None:
    import httpx

    assert httpx.post(f"{served['base_url']}/predict", json={"features": [5.1, 3.5, 1.4, 0.2]}).status_code == 200


# ---- what the deployment listens on ----------------------------------------------------------


def listening_sockets(pids: set[int]) -> list[dict[str, Any]]:
    """`ss -ltnp` rows owned by `pids`: address, port, process name and command."""
    import re
    import subprocess

    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        local = line.split()[3]
        address, _, port = local.rpartition(":")
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in pids:
                try:
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
                except OSError:
                    command = ""
                rows.append({"address": address, "port": int(port), "process": name, "pid": int(pid), "command": command})
                break
    return rows


@pytest.mark.ray
def test_listening_ports_of_the_deployment(served: dict[str, Any]) -> None:
    from serve_app import processes

    ours = {pid for pid, _ in processes.descendants(os.getpid())} | {os.getpid()}
    rows = listening_sockets(ours)
    wildcard = [r for r in rows if r["address"] in ("*", "0.0.0.0", "[::]", "::")]
    for row in sorted(rows, key=lambda r: (r["process"], r["port"])):
        print(f"LISTEN {row['address']}:{row['port']} {row['process']} ({row['command']})")
    http_port = served["cluster"].port
    serving = [r for r in rows if r["port"] == http_port]
    assert serving and all(r["address"] == "127.0.0.1" for r in serving), serving
    # HAProxy's stats and metrics frontends are hard-coded `bind *:PORT` in Ray's template;
    # they are the only HAProxy listeners on all interfaces.
    haproxy_wildcard = {r["port"] for r in wildcard if r["process"] == "haproxy"}
    configured = {int(os.environ["RAY_SERVE_HAPROXY_STATS_PORT"]), int(os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"])}
    assert haproxy_wildcard == configured, (haproxy_wildcard, configured)
    # Replicas serve HTTP (the ports HAProxy forwards to) on loopback only, as
    # http_options.host says; their Ray gRPC ports are Ray's and bind all interfaces.
    import glob
    import re

    config_text = "".join(Path(f).read_text() for f in glob.glob(f"{_haproxy_state_dir()}/**/haproxy.cfg", recursive=True))
    replica_ports = {int(port) for port in re.findall(r"server SERVE_REPLICA\S* [\d.]+:(\d+)", config_text)}
    assert replica_ports, "no replica in HAProxy's config"
    for row in rows:
        if row["port"] in replica_ports:
            assert row["address"] == "127.0.0.1", row
    print(f"WILDCARD {sorted((r['process'], r['port']) for r in wildcard)}")


def _haproxy_state_dir() -> str:
    return str(Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent)
