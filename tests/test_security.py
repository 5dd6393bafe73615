"""Unsafe artefacts and exposure: hash before load, no path escapes, no code run from a
pickle, skops allow-list, the optional API key, and what the deployment listens on."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Iterator

import joblib
import numpy as np
import orjson
import pytest

from serve_app.model import formats as artefacts
from serve_app.errors import ModelLoadError, NotFound, StoreError
from serve_app.serving.http.app import build_http_app
from serve_app.model.manifest import MANIFEST_FILENAME, sha256_of
from serve_app.model.predictor import Predictor
from serve_app.model.store import ModelStore
from serve_app.model.training import save_fitted

from .conftest import fit_dummy
from .test_service import TestClient, replica_class


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


@pytest.mark.parametrize("how", ["top-level", "attribute", "object-array"])
def test_restricted_unpickler_is_a_second_line(tmp_path: Path, how: str) -> None:
    """Even if the scan were bypassed, the loader's own unpickler refuses the global."""
    import io

    marker = tmp_path / "marker"
    joblib.dump(_evil_model(marker, how), tmp_path / "m.joblib")
    with pytest.raises(artefacts.UnsafeArtefact, match="not on the allow-list"):
        artefacts._RestrictedUnpickler(io.BytesIO((tmp_path / "m.joblib").read_bytes()), "m.joblib").load_all()
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
    from sklearn.preprocessing import StandardScaler

    features, target = load_iris(return_X_y=True)
    labels = np.array(["setosa", "versicolor", "virginica"])[target]  # object/unicode arrays
    models = [
        RandomForestClassifier(n_estimators=3, random_state=0).fit(features, labels),
        make_pipeline(StandardScaler(), RandomForestClassifier(3)).fit(features, target),
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
        ("numpy", "savetxt", False),  # a plain function inside an allowed package
        ("numpy", "lib._datasource.os.popen", False),  # a dotted name resolved attribute by attribute
        ("numpy.lib._datasource", "os.popen", False),
        ("sklearn.linear_model._logistic", "LogisticRegression.__init__", False),
        ("sklearn.linear_model", "LogisticRegression", False),  # exact module.qualname only
        ("numpy.f2py", "compile", False),
        ("numpy.testing", "assert_equal", False),
        ("builtins", "eval", False),
        ("builtins", "getattr", False),
        ("builtins", "slice", True),  # ColumnTransformer column ranges; only through a wrapper taking ints or None (test_model_attacks)
        ("os", "system", False),
        ("sklearnx", "Thing", False),
    ],
)
def test_allow_list(module: str, name: str, trusted: bool) -> None:
    assert artefacts.is_allowed_global(module, name) is trusted


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
    from serve_app.model.training import train

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


# ---- store errors as an HTTP caller sees them ---------------------------------------------------


@pytest.fixture
def damaged(store: ModelStore, tmp_path: Path) -> Iterator[tuple[TestClient, ModelStore]]:
    """A replica (the real ModelServer class and routes, no Ray) over a store whose v1 is
    sound and whose later versions were each damaged one way after they were stored."""
    import shutil

    for _ in range(5):
        save_fitted(store, fit_dummy(), name="dummy", fmt="joblib")
    tampered = store.version_dir("dummy", "2") / "model.joblib"
    os.chmod(tampered, 0o644)
    tampered.write_bytes(tampered.read_bytes() + b"\0")  # sha256 no longer matches
    linked = store.version_dir("dummy", "3") / "model.joblib"
    (tmp_path / "outside.joblib").write_bytes(linked.read_bytes())
    os.chmod(linked, 0o644)
    linked.unlink()
    linked.symlink_to(tmp_path / "outside.joblib")  # the model file is a link out of the store
    manifest = store.version_dir("dummy", "4") / MANIFEST_FILENAME
    os.chmod(manifest, 0o644)
    manifest.write_text(manifest.read_text().replace('"model.joblib"', '"../../../../etc/passwd"'))
    version_dir = store.version_dir("dummy", "5")
    shutil.move(version_dir, tmp_path / "outside-5")
    version_dir.symlink_to(tmp_path / "outside-5", target_is_directory=True)  # the version is a link out
    server = replica_class()({"store": str(store.root), "model": "dummy", "monitoring": {"enabled": False}})
    server.reconfigure({"version": "1"})
    with TestClient(build_http_app(server), raise_server_exceptions=False) as client:
        yield client, store


ROW = [0.0, 1.0, 2.0, 3.0]
V2_BODY = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROW}]}
# (version asked for, status, what the error says); each asked by the x-model-version header
# on /predict and in the path of /v2/models/dummy/versions/{version}/infer.
STORE_ERRORS = [
    ("9", 404, "model 'dummy' has no version 9 (versions: 1, 2, 3, 4, 5)"),
    ("canary", 404, "model 'dummy' has no alias 'canary'"),
    ("..", 404, "model 'dummy' has no alias '..'"),
    ("2", 500, "the file was changed after it was stored, refusing to load it"),
    ("3", 500, "is a link or lies outside its version directory"),
    # The manifest was edited after it was signed: refused before it is parsed.
    ("4", 500, "sha256 of dummy/4/manifest.json is"),
    ("5", 500, "dummy/5 resolves outside the model store"),  # store damage: a 500, like the others
]


def _ask(client: TestClient, route: str, version: str) -> Any:
    if route == "predict":
        return client.post("/predict", json={"features": ROW}, headers={"x-model-version": version})
    # Dots escaped: the client would otherwise resolve "/versions/../infer" to "/infer" itself.
    return client.post(f"/v2/models/dummy/versions/{version.replace('.', '%2E')}/infer", json=V2_BODY)


@pytest.mark.parametrize("route", ["predict", "v2"])
@pytest.mark.parametrize(("version", "status", "message"), STORE_ERRORS, ids=[v for v, _, _ in STORE_ERRORS])
def test_store_errors_reach_the_caller_as_json_errors(damaged: tuple[TestClient, ModelStore], route: str,
                                                      version: str, status: int, message: str) -> None:
    client, _ = damaged
    reply = _ask(client, route, version)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert list(body) == ["error"] and message in body["error"], body
    assert "Traceback" not in reply.text
    # The sound version still answers: a damaged one never becomes the one that serves.
    assert client.post("/predict", json={"features": ROW}).json()["version"] == "1"


@pytest.mark.parametrize("version", [v for v, _, _ in STORE_ERRORS])
def test_store_errors_do_not_show_the_store_path(damaged: tuple[TestClient, ModelStore], tmp_path: Path, version: str) -> None:
    client, store = damaged
    for route in ("predict", "v2"):
        text = _ask(client, route, version).text
        assert str(store.root) not in text and str(tmp_path) not in text, text


# ---- the optional API key --------------------------------------------------------------------


def _request(authorization: str | None) -> Any:
    from starlette.requests import Request

    headers = [] if authorization is None else [(b"authorization", authorization.encode("latin-1"))]
    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers})


def test_api_key_from_a_secret_file(tmp_path: Path) -> None:
    from serve_app.serving import auth

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
    from serve_app.serving import auth

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
    ("POST", "/predict/stream", b"[5.1, 3.5, 1.4, 0.2]\n[6.7, 3.0, 5.2, 2.3]\n"),  # NDJSON
    # The monitoring routes (serve_app/serving/http/monitoring.py); the app has monitoring on.
    ("POST", "/feedback", {"request_id": "no-such-request", "label": 0}),
    ("POST", "/v2/models/iris/feedback", {"request_id": "no-such-request", "label": 0}),
    ("GET", "/v2/models/iris/drift", None),
    ("GET", "/v2/models/iris/accuracy", None),
    ("GET", "/v2/models/iris/monitoring", None),
    ("GET", "/dashboard", None),
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

    def call(headers: dict[str, str]) -> httpx.Response:
        if isinstance(body, bytes):
            headers = {**headers, "content-type": "application/x-ndjson"}
            return httpx.request(method, secured_app + path, content=body, headers=headers, timeout=30)
        return httpx.request(method, secured_app + path, json=body, headers=headers, timeout=30)

    for authorization in (None, "Bearer wrong-key-0123456789abcdef", f"Basic {API_KEY}"):
        reply = call({} if authorization is None else {"authorization": authorization})
        assert reply.status_code == 401, (authorization, reply.text)
        assert set(reply.json()) == {"error"} and "Bearer" in reply.json()["error"]
        assert reply.headers["www-authenticate"].startswith("Bearer")
    reply = call({"authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 200, reply.text
    if path == "/predict/stream":  # a 200 whose lines were errors would not be a prediction
        assert [orjson.loads(line) for line in reply.text.splitlines()] == [{"prediction": 0}, {"prediction": 2}]


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
    """Listening TCP sockets owned by `pids` (address, port, process name, command), read
    from /proc as `ss -ltnp` would, so no package is needed for it."""
    import ipaddress

    inodes: dict[str, tuple[str, int]] = {}  # socket inode -> (address, port)
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(address_hex)
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            address = str(ipaddress.ip_address(packed))
            inodes[fields[9]] = (address, int(port_hex, 16))
    rows = []
    for pid in sorted(pids):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except OSError:
            continue
        for link in links:
            inode = link[len("socket:[") : -1] if link.startswith("socket:[") else None
            if inode in inodes:
                address, port = inodes[inode]
                rows.append({"address": address, "port": port, "process": name, "pid": pid, "command": command})
    return rows


@pytest.mark.ray
def test_listening_ports_of_the_deployment(served: dict[str, Any]) -> None:
    from serve_app.ops import processes

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
