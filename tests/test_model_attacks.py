"""Issue 15: model files must never run code. One test per attack class, each with a real
crafted file put in the store as someone who can write to it would, and a payload that
writes a marker file if any of its code runs. Every attempt must be refused before that.

Each crafted version is tried twice: as the attacker leaves it (no valid signature), and
signed by the trusted publisher key, as if the key had leaked or the publisher had been
fooled into signing it: the allow-list behind the signature must refuse it on its own.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Callable

import joblib
import numpy as np
import pytest
import skops.io

from serve_app.model import formats as artefacts
from serve_app.errors import ModelLoadError
from serve_app.model.manifest import MANIFEST_FILENAME
from serve_app.model.predictor import Predictor
from serve_app.model.store import ModelStore
from serve_app.model.training import save_fitted

from .conftest import fit_dummy

ROWS = np.arange(8, dtype=float).reshape(2, 4)
SIGNED = pytest.mark.parametrize("signed", [False, True], ids=["as-left-by-the-attacker", "signed-by-a-leaked-key"])


# ---- putting a crafted file in the store ------------------------------------------------------


def _writable(path: Path) -> Path:
    os.chmod(path, 0o644)
    return path


def plant(store: ModelStore, data: bytes, fmt: str, signed: bool) -> str:
    """A new version of `evil` whose model file is `data`, its manifest's hash and size updated."""
    manifest = save_fitted(store, fit_dummy(), name="evil", fmt=fmt)  # type: ignore[arg-type]
    directory = store.version_dir("evil", manifest.version)
    _writable(directory / manifest.model_file).write_bytes(data)
    path = _writable(directory / MANIFEST_FILENAME)
    fields = json.loads(path.read_text())
    fields.update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    path.write_text(json.dumps(fields, indent=2, sort_keys=True))
    signature = directory / "signature.json"
    if signature.exists() and not signed:
        signature.unlink()  # the attacker has no key: the best they can do is no signature
    if signed and hasattr(store, "sign_version"):
        store.sign_version("evil", manifest.version, check=False)
    return manifest.version


def refused(load: Callable[[], Any], marker: Path) -> ModelLoadError:
    """`load` raised a ModelLoadError, and the payload's marker file was never written."""
    outcome: BaseException | None = None
    try:
        load()
    except Exception as exc:  # what the old code raised, if anything, is reported below
        outcome = exc
    assert not marker.exists(), f"the payload ran: {marker.name} was written (load outcome: {outcome!r})"
    assert isinstance(outcome, ModelLoadError), f"not refused: {outcome!r}"
    return outcome


def check_refusal(error: ModelLoadError, signed: bool, *fragments: str) -> None:
    if not signed:
        assert "is not signed" in error.message and "serve-app models sign" in error.message, error.message
    else:
        assert all(f in error.message for f in fragments), error.message
    assert error.status_code == 500


# ---- pickle building blocks -----------------------------------------------------------------


def _body(value: Any) -> bytes:
    """Opcodes that push `value` (protocol 2, no memo, no PROTO or STOP)."""
    ops = pickletools.optimize(pickle.dumps(value, protocol=2))
    return ops[2:-1]


def _global(module: str, name: str, proto4: bool) -> bytes:
    if not proto4:
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    return _body(module) + _body(name) + pickle.STACK_GLOBAL


def _prefixed(payload: bytes, protocol: int) -> bytes:
    """A real joblib file of a working model, with `payload` (net stack effect 0) run first."""
    buffer = io.BytesIO()
    joblib.dump(fit_dummy(), buffer, protocol=protocol)
    data = buffer.getvalue()
    assert data[:2] == b"\x80" + bytes([protocol])
    return data[:2] + payload + data[2:]


# ---- 1. joblib, dotted names ------------------------------------------------------------------


def dotted_name_payload(marker: Path) -> bytes:
    """`numpy._core.numeric` + `builtins.__dict__.get` -> exec, resolved attribute by attribute."""
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    get = _global("numpy._core.numeric", "builtins.__dict__.get", proto4=True)
    exec_ = get + _body(("exec",)) + pickle.REDUCE
    return _prefixed(exec_ + _body((code,)) + pickle.REDUCE + pickle.POP, protocol=4)


@SIGNED
def test_dotted_global_names_are_refused(store: ModelStore, tmp_path: Path, signed: bool) -> None:
    marker = tmp_path / "marker-dotted"
    version = plant(store, dotted_name_payload(marker), "joblib", signed)
    error = refused(lambda: Predictor.load(store, "evil", version), marker)
    check_refusal(error, signed, "numpy._core.numeric.builtins.__dict__.get", "not on the allow-list")


# ---- 2. joblib, plain functions inside the allowed packages -----------------------------------


def plain_function_payload(marker: Path) -> bytes:
    """numpy.savetxt writes any file (protocol 2, no dots): the marker, here."""
    call = _global("numpy", "savetxt", proto4=False) + _body((str(marker), ["pwned"], "%s")) + pickle.REDUCE
    return _prefixed(call + pickle.POP, protocol=2)


@SIGNED
def test_plain_functions_in_allowed_packages_are_refused(store: ModelStore, tmp_path: Path, signed: bool) -> None:
    marker = tmp_path / "marker-function"
    version = plant(store, plain_function_payload(marker), "joblib", signed)
    error = refused(lambda: Predictor.load(store, "evil", version), marker)
    check_refusal(error, signed, "numpy.savetxt", "not on the allow-list")


# ---- 3. skops, a function the file itself declares trusted ------------------------------------


def skops_payload(marker: Path) -> bytes:
    """A real skops file of a working model, with an attribute rebuilt by calling numpy.savetxt."""
    original = zipfile.ZipFile(io.BytesIO(skops.io.dumps(fit_dummy())))
    schema = json.loads(original.read("schema.json"))
    args = json.loads(zipfile.ZipFile(io.BytesIO(skops.io.dumps((str(marker), ["pwned"], "%s")))).read("schema.json"))
    for key in ("protocol", "_skops_version"):
        args.pop(key)
    attributes = schema["content"]
    attributes["key_types"]["content"].append(attributes["key_types"]["content"][0])  # one more str key
    attributes["content"]["evil_"] = {
        "__class__": "savetxt", "__module__": "numpy", "__loader__": "ConstructorFromReduceNode", "content": args,
    }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as crafted:
        for name in original.namelist():
            crafted.writestr(name, json.dumps(schema) if name == "schema.json" else original.read(name))
    return out.getvalue()


@SIGNED
def test_skops_file_cannot_trust_its_own_types(store: ModelStore, tmp_path: Path, signed: bool) -> None:
    marker = tmp_path / "marker-skops"
    version = plant(store, skops_payload(marker), "skops", signed)
    error = refused(lambda: Predictor.load(store, "evil", version), marker)
    check_refusal(error, signed, "numpy.savetxt", "outside the allow-list")


# ---- 4. the scan and the loader disagree on where array bytes end -----------------------------


def _dtype(name: str, state: tuple[Any, ...]) -> bytes:
    return (_global("numpy", "dtype", proto4=False) + _body((name, False, True)) + pickle.REDUCE
            + _body(state) + pickle.BUILD)


def _wrapper(items: bytes) -> bytes:
    """A joblib NumpyArrayWrapper built from `items` (SETITEMS pairs of its state)."""
    return (_global("joblib.numpy_pickle", "NumpyArrayWrapper", proto4=False) + pickle.EMPTY_TUPLE + pickle.NEWOBJ
            + pickle.EMPTY_DICT + pickle.MARK + items + pickle.SETITEMS + pickle.BUILD)


def _bytes(data: bytes) -> bytes:
    """SHORT_BINBYTES: bytes without protocol 2's _codecs.encode call."""
    assert len(data) < 256
    return b"C" + bytes([len(data)]) + data


def _padded(ops: bytes, size: int) -> bytes:
    """`ops`, then a string literal that is popped again, `size` bytes in all."""
    filler = size - len(ops) - 5 - 1  # BINUNICODE: opcode and 4-byte length, then POP
    assert filler >= 0
    return ops + b"X" + filler.to_bytes(4, "little") + b"x" * filler + pickle.POP


def _hidden_system(marker: Path, size: int) -> bytes:
    """A whole pickle of `size` bytes that runs os.system."""
    call = b"\x80\x02" + _global("os", "system", proto4=False) + _body((f"touch {marker}",)) + pickle.REDUCE + pickle.POP
    return _padded(call, size - 2) + pickle.NONE + pickle.STOP


def duplicated_key_payload(marker: Path) -> bytes:
    """The wrapper's state says dtype float64 to the scan, then a second `dtype` key built as a
    numpy.str_ (invisible to a scan that only tracks literal keys) makes it object to joblib,
    which unpickles the bytes the scan skipped as a nested pickle."""
    count = 64
    f8 = _dtype("f8", (3, "<", None, None, None, -1, -1, 0))
    obj = _dtype("O8", (3, "|", None, None, None, -1, -1, 63))
    u5 = _dtype("U5", (3, "<", None, None, None, 20, 4, 8))
    key = _global("numpy._core.multiarray", "scalar", proto4=False) + u5 + _bytes("dtype".encode("utf-32-le")) \
        + pickle.TUPLE2 + pickle.REDUCE
    items = (_body("subclass") + _global("numpy", "ndarray", proto4=False) + _body("shape") + _body((count,))
             + _body("order") + _body("C") + _body("dtype") + f8 + _body("allow_mmap") + pickle.NEWFALSE
             + key + obj)
    hidden = _hidden_system(marker, count * 8)
    assert len(hidden) == count * 8
    return b"\x80\x02" + _wrapper(items) + hidden + pickle.POP + _prefixed(b"", 2)[2:]


def false_itemsize_payload(marker: Path) -> bytes:
    """A float64 dtype whose state claims 16-byte items: a scan that believes it skips twice
    what the loader reads, and the loader runs the rest as opcodes."""
    count = 64
    f8 = _dtype("f8", (3, "<", None, None, None, 16, 8, 0))
    items = (_body("subclass") + _global("numpy", "ndarray", proto4=False) + _body("shape") + _body((count,))
             + _body("order") + _body("C") + _body("dtype") + f8 + _body("allow_mmap") + pickle.NEWFALSE)
    data = bytes(count * 8)
    call = _global("numpy", "savetxt", proto4=False) + _body((str(marker), ["pwned"], "%s")) + pickle.REDUCE + pickle.POP
    hidden = _padded(call, count * 8)  # read as opcodes by the loader, skipped as array bytes by the scan
    return b"\x80\x02" + _wrapper(items) + data + hidden + pickle.POP + _prefixed(b"", 2)[2:]


@pytest.mark.parametrize("craft", [duplicated_key_payload, false_itemsize_payload], ids=["duplicated-key", "false-itemsize"])
@SIGNED
def test_scan_and_loader_cannot_be_made_to_disagree(store: ModelStore, tmp_path: Path, signed: bool,
                                                     craft: Callable[[Path], bytes]) -> None:
    marker = tmp_path / "marker-dtype"
    version = plant(store, craft(marker), "joblib", signed)
    error = refused(lambda: Predictor.load(store, "evil", version), marker)
    check_refusal(error, signed, "refusing it")


@pytest.mark.parametrize("craft", [duplicated_key_payload, false_itemsize_payload], ids=["duplicated-key", "false-itemsize"])
def test_the_loader_alone_also_refuses_them(tmp_path: Path, craft: Callable[[Path], bytes]) -> None:
    """Defence in depth: even with the scan skipped, the loader's own unpickler holds."""
    marker = tmp_path / "marker-loader"
    data = craft(marker)
    refused(lambda: artefacts._RestrictedUnpickler(io.BytesIO(data), "crafted").load_all(), marker)


# ---- 5. time of check vs time of use ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["joblib", "skops"])
def test_the_model_file_is_read_once(store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """The file is swapped for a payload the moment it is opened a second time: the store
    must hash, check and load the bytes of the first read, so the swap never reaches it."""
    marker = tmp_path / "marker-swap"
    evil = plain_function_payload(marker) if fmt == "joblib" else skops_payload(marker)
    manifest = save_fitted(store, fit_dummy(), name="swapped", fmt=fmt)  # type: ignore[arg-type]
    path = store.version_dir("swapped", manifest.version) / manifest.model_file
    manifest_before = (path.parent / MANIFEST_FILENAME).read_bytes()
    opens: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def swap_on_second_open(file: Any) -> None:
        if str(file) == str(path):
            opens.append(str(file))
            if len(opens) == 2:
                staged = tmp_path / "staged"
                staged.write_bytes(evil)
                os.replace(staged, path)

    def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        swap_on_second_open(file)
        return real_open(file, *args, **kwargs)

    def spy_os_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        swap_on_second_open(file)
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)  # zipfile (skops) opens through io.open
    monkeypatch.setattr(os, "open", spy_os_open)
    try:
        predictor = Predictor.load(store, "swapped", manifest.version)
    finally:
        monkeypatch.undo()
    assert not marker.exists(), "the payload ran"
    assert len(opens) == 1, f"the model file was opened {len(opens)} times"
    assert predictor.predict(ROWS).tolist() == fit_dummy().predict(ROWS).tolist()
    assert (path.parent / MANIFEST_FILENAME).read_bytes() == manifest_before


# ---- 7. the store: links, and manifests that name another version ------------------------------


@pytest.mark.parametrize("which", ["manifest.json", "model.joblib", "signature.json"])
@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_linked_files_are_refused(store: ModelStore, tmp_path: Path, which: str, link: str) -> None:
    manifest = save_fitted(store, fit_dummy(), name="linked", fmt="joblib")
    path = store.version_dir("linked", manifest.version) / which
    outside = tmp_path / f"outside-{which}"
    outside.write_bytes(path.read_bytes())  # the same bytes: only the link itself is wrong
    _writable(path).unlink()
    if link == "symbolic":
        path.symlink_to(outside)
    else:
        os.link(outside, path)
    with pytest.raises(ModelLoadError, match="is a link") as info:
        store.load_verified("linked", manifest.version)
    assert str(tmp_path) not in info.value.message and str(store.root) not in info.value.message


def test_a_fifo_in_place_of_the_model_file_is_refused_without_hanging(store: ModelStore) -> None:
    manifest = save_fitted(store, fit_dummy(), name="fifo")
    path = store.version_dir("fifo", manifest.version) / manifest.model_file
    _writable(path).unlink()
    os.mkfifo(path)  # opening it for reading would wait for a writer forever
    with pytest.raises(ModelLoadError, match="not a regular file"):
        store.load_verified("fifo", manifest.version)


def test_a_manifest_must_name_its_own_directory(store: ModelStore) -> None:
    import shutil

    save_fitted(store, fit_dummy(), name="dummy")
    # A copy of a signed version under another number: its signature names version 1.
    copy = store.model_dir("dummy") / "7"
    shutil.copytree(store.version_dir("dummy", "1"), copy)
    with pytest.raises(ModelLoadError, match="carries a signature made for dummy v1"):
        store.load_verified("dummy", "7")
    # Even signed for version 7, a manifest that says version 1 is refused.
    store.sign_version("dummy", "7", check=False)
    with pytest.raises(ModelLoadError, match="the manifest in dummy/7 describes dummy v1"):
        store.load_verified("dummy", "7")


def test_unsigned_versions_are_refused_with_how_to_sign(store: ModelStore) -> None:
    manifest = save_fitted(store, fit_dummy(), name="dummy")
    _writable(store.version_dir("dummy", "1") / "signature.json").unlink()
    with pytest.raises(ModelLoadError, match=r"dummy v1 is not signed .*serve-app models sign dummy 1") as info:
        Predictor.load(store, "dummy")
    assert info.value.status_code == 500
    assert store.sign_version("dummy", "1") == manifest.version  # the publisher signs it
    assert Predictor.load(store, "dummy").version == "1"


def test_a_signature_by_an_untrusted_key_is_refused(store: ModelStore, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    save_fitted(store, fit_dummy(), name="dummy")
    store.sign_version("dummy", "1", key=Ed25519PrivateKey.generate())  # someone else's key
    with pytest.raises(ModelLoadError, match="which this process does not trust"):
        Predictor.load(store, "dummy")


# ---- every estimator the project trains still loads, in both formats ---------------------------


@pytest.mark.parametrize("fmt", ["skops", "joblib"])
def test_every_trained_estimator_loads(store: ModelStore, fmt: str) -> None:
    from serve_app.model.training import DATASETS, ESTIMATORS, train

    for task, dataset in (("classification", "iris"), ("regression", "diabetes")):
        for estimator in ESTIMATORS[task]:
            manifest = train(store, name=f"{dataset}-{estimator.replace('_', '-')}", dataset=dataset,
                             estimator=estimator, fmt=fmt)  # type: ignore[arg-type]
            predictor = Predictor.load(store, manifest.name, manifest.version)
            data = DATASETS[dataset]()
            assert predictor.predict(predictor.validate(data.features[:20])).shape == (20,)


def test_joblib_floor_is_what_the_tests_run_against() -> None:
    import tomllib

    from packaging.version import Version

    dependencies = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in dependencies if d.split(">=")[0].strip() == "joblib")
    floor = Version(spec.split(">=")[1].split(",")[0].split("#")[0].strip())
    # 1.4.x: joblib.load(ensure_native_byte_order=...) is a TypeError; 1.5.x unpickles an object
    # array's nested pickle without the caller's find_class. The floor is the version tested here.
    assert floor >= Version("1.6")
    assert Version(joblib.__version__) >= floor


# ---- 6. routes: readiness never loads from disk for a caller without the key ------------------


API_KEY = "attack-test-key-0123456789"


def test_open_routes_load_nothing_and_reveal_nothing(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from serve_app.serving.http.app import build_http_app

    from .test_service import TestClient, replica_class

    for _ in range(3):
        save_fitted(store, fit_dummy(), name="dummy")
    store.promote("dummy", "3", "staging")
    monkeypatch.setenv("SERVE_APP_ATTACK_TEST_KEY", API_KEY)
    server = replica_class()({"store": str(store.root), "model": "dummy", "monitoring": {"enabled": False},
                              "api_key_env": "SERVE_APP_ATTACK_TEST_KEY"})
    server.reconfigure({"version": "1"})
    reads: list[str] = []
    real = server.versions.store.load_verified
    monkeypatch.setattr(server.versions.store, "load_verified", lambda *a: reads.append(str(a[1])) or real(*a))
    with TestClient(build_http_app(server), raise_server_exceptions=False) as client:
        assert client.get("/v2/models/dummy/versions/1/ready").json() == {"name": "dummy", "version": "1", "ready": True}
        assert client.get("/v1/models/dummy").status_code == 200
        for ref in ("2", "3", "staging", "9", "9" * 5000, "..%2F..%2Fetc"):
            reply = client.get(f"/v2/models/dummy/versions/{ref}/ready")
            assert reply.status_code == 404, (ref[:20], reply.text)
            text = reply.text
            assert "versions:" not in text and "aliases" not in text and str(store.root) not in text, text
            assert len(text) < 300
        assert reads == [], "a probe read a version from disk"
        # The routes that load or reveal stored versions want the key.
        for path in ("/v2/models/dummy/versions/2", "/v2/models/dummy"):
            assert client.get(path).status_code == 401
        assert client.post("/v2/models/dummy/versions/2/infer", json={}).status_code == 401
        assert reads == []
        authorized = {"authorization": f"Bearer {API_KEY}"}
        assert client.get("/v2/models/dummy/versions/2", headers=authorized).json()["versions"] == ["1", "2", "3"]
        assert reads == ["2"]
        # Now loaded, v2 is ready; a 5,000-digit version is a 404 for the key holder too, not a 500.
        assert client.get("/v2/models/dummy/versions/2/ready").status_code == 200
        assert client.get(f"/v2/models/dummy/versions/{'9' * 5000}", headers=authorized).status_code == 404


# ---- 8. the classes gradient boosting and tabular pipelines need (#16, #17) carry data only -----


class WritesMarker:
    """A custom object that writes its marker the moment a loader rebuilds or calls it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict[str, Any]) -> None:
        Path(state["marker"]).write_text("pwned")

    def __call__(self, *args: Any) -> Any:
        Path(self.marker).write_text("pwned")
        return ["spend"]


def _frame() -> Any:
    from .test_artefacts import tabular_frame

    return tabular_frame()


def _pipeline() -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    from .test_artefacts import tabular_pipeline

    return tabular_pipeline(HistGradientBoostingClassifier(max_iter=3)).fit(_frame(), np.arange(60) % 2)


def _dumped(model: Any, fmt: str) -> bytes:
    if fmt == "skops":
        return skops.io.dumps(model)
    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    return buffer.getvalue()


def _load_and_predict(data: bytes, fmt: str) -> Callable[[], Any]:
    """Loads, then predicts: a selector or link that got through would be called here."""
    return lambda: artefacts.loads(data, fmt, "crafted").predict(_frame())  # type: ignore[arg-type]


def _layer_alone(data: bytes, fmt: str) -> Callable[[], Any]:
    """The check before the post-load walk: skops's audit alone, or our unpickler alone."""
    if fmt == "skops":
        return lambda: artefacts.check(data, "skops", "crafted")
    return lambda: artefacts._RestrictedUnpickler(io.BytesIO(data), "crafted").load_all()


FORMATS = pytest.mark.parametrize("fmt", ["skops", "joblib"])


@FORMATS
def test_object_arrays_hold_plain_values_only(tmp_path: Path, fmt: str) -> None:
    from sklearn.preprocessing import StandardScaler

    marker = tmp_path / "marker-object-array"
    for item, named in ((WritesMarker(marker), "WritesMarker"), (StandardScaler(), "object array"),
                        (np.float64, "object array")):
        model = _pipeline()
        names = model.named_steps["columns"].feature_names_in_.copy()
        names[0] = item
        model.named_steps["columns"].feature_names_in_ = names
        data = _dumped(model, fmt)
        error = refused(_load_and_predict(data, fmt), marker)
        assert named in error.message or "holding something other than" in error.message, error.message
        if named == "object array":  # allowed classes: refused before the post-load walk too
            layer = refused(_layer_alone(data, fmt), marker)
            assert "other than str, int, float, bool or None" in layer.message, layer.message


@FORMATS
def test_column_selectors_and_links_cannot_be_callables(tmp_path: Path, fmt: str) -> None:
    """A column selector or a loss's link swapped for a function, a custom callable, an allowed
    class or (joblib) one of the loader's own checked reconstructors: refused before predict."""
    from sklearn._loss.link import LogitLink
    from sklearn._loss.loss import HalfBinomialLoss
    from sklearn.preprocessing import StandardScaler

    marker = tmp_path / "marker-selector"
    smuggled: list[tuple[Any, str]] = [(os.system, "system"), (WritesMarker(marker), "WritesMarker"),
                                       (StandardScaler, "callable sklearn.preprocessing._data.StandardScaler"),
                                       (LogitLink, "callable sklearn._loss.link.LogitLink"),
                                       (HalfBinomialLoss(), "a callable sklearn._loss.loss.HalfBinomialLoss")]
    if fmt == "joblib":
        smuggled.append((np._core.multiarray.scalar, "never code"))  # an allowed reconstructor, as a value
    for value, named in smuggled:
        for where in ("selector", "link"):
            model = _pipeline()
            columns = model.named_steps["columns"]
            if where == "selector":
                name, transformer, _ = columns.transformers_[4]
                columns.transformers_[4] = (name, transformer, value)
                columns._columns[4] = value
            else:
                model.named_steps["model"]._loss.link = value
            error = refused(_load_and_predict(_dumped(model, fmt), fmt), marker)
            assert named in error.message, (where, value, error.message)


def test_structured_dtype_with_an_object_field_is_refused(tmp_path: Path) -> None:
    """joblib: an ndarray rebuilt by _reconstruct whose structured dtype has an object field."""
    from sklearn.preprocessing import StandardScaler

    model = _pipeline()
    model.named_steps["columns"].output_indices_["evil"] = np.array([(1.0, StandardScaler())],
                                                                    dtype=[("a", "f8"), ("b", "O")])
    data = pickle.dumps(model, protocol=4)  # plain pickle: the array goes through _reconstruct
    marker = tmp_path / "marker-structured"
    error = refused(lambda: artefacts.loads(data, "joblib", "crafted"), marker)
    assert "structured dtype with an object field" in error.message, error.message
    # joblib's own writer puts it behind an array wrapper, which the scan refuses by its dtype.
    error = refused(lambda: artefacts.loads(_dumped(model, "joblib"), "joblib", "crafted"), marker)
    assert "structured dtype 'V16'" in error.message, error.message


def _skops_archive(model: Any, change: Callable[[dict[str, Any], zipfile.ZipFile, zipfile.ZipFile], None]) -> bytes:
    original = zipfile.ZipFile(io.BytesIO(skops.io.dumps(model)))
    schema = json.loads(original.read("schema.json"))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        change(schema, original, archive)
        archive.writestr("schema.json", json.dumps(schema))
        for name in original.namelist():
            if name not in archive.namelist() and name != "schema.json":
                archive.writestr(name, original.read(name))
    return out.getvalue()


def _find(node: Any, test: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    if isinstance(node, dict):
        if test(node):
            return node
        children = list(node.values())
    elif isinstance(node, list):
        children = node
    else:
        children = []
    for child in children:
        found = _find(child, test) if isinstance(child, (dict, list)) else None
        if found is not None:
            return found
    return None  # type: ignore[return-value]


def test_skops_array_whose_stored_dtype_holds_objects_is_refused(tmp_path: Path) -> None:
    """A .npy inside the archive with a structured dtype whose object field is a pickle."""
    marker = tmp_path / "marker-npy"
    evil = np.array([(1.0, WritesMarker(marker))], dtype=[("a", "f8"), ("b", "O")])

    def change(schema: dict[str, Any], original: zipfile.ZipFile, archive: zipfile.ZipFile) -> None:
        node = _find(schema, lambda n: n.get("__loader__") == "NdArrayNode" and n.get("type") == "numpy")
        buffer = io.BytesIO()
        np.save(buffer, evil, allow_pickle=True)
        archive.writestr(node["file"], buffer.getvalue())

    data = _skops_archive(_pipeline(), change)
    error = refused(lambda: artefacts.check(data, "skops", "crafted"), marker)
    assert "stored dtype holds Python objects" in error.message, error.message
    refused(lambda: artefacts.loads(data, "skops", "crafted"), marker)


def test_skops_loss_node_built_by_calling_a_function_is_refused(tmp_path: Path) -> None:
    """skops builds a loss by calling its class with the node's arguments: swapped for
    os.system with a command, or for an allowed class, or given non-plain arguments."""
    marker = tmp_path / "marker-loss"
    command = {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode",
               "content": [{"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode",
                            "content": json.dumps(f"touch {marker}")}]}

    def as_system(schema: dict[str, Any], *_: Any) -> None:
        node = _find(schema, lambda n: n.get("__loader__") == "LossNode")
        node.update({"__module__": os.system.__module__, "__class__": "system"})
        node["__reduce__"]["args"] = command

    def as_pipeline(schema: dict[str, Any], *_: Any) -> None:
        _find(schema, lambda n: n.get("__loader__") == "LossNode").update(
            {"__module__": "sklearn.pipeline", "__class__": "Pipeline"})

    def with_a_type_argument(schema: dict[str, Any], *_: Any) -> None:
        node = _find(schema, lambda n: n.get("__loader__") == "LossNode")
        node["__reduce__"]["args"] = {**command, "content": [
            {"__class__": "Pipeline", "__module__": "sklearn.pipeline", "__loader__": "TypeNode"}]}

    for change, named in ((as_system, "system"), (as_pipeline, "sklearn.pipeline.Pipeline (as LossNode)"),
                          (with_a_type_argument, "not plain numbers")):
        data = _skops_archive(_pipeline(), change)
        error = refused(lambda: artefacts.loads(data, "skops", "crafted"), marker)
        assert named in error.message, error.message


def test_checked_reconstructors_refuse_other_arguments() -> None:
    """The pickle reconstructors gradient boosting needs, each called only with its own data."""
    from numpy.random import SeedSequence
    from sklearn._loss._loss import CyHalfMultinomialLoss
    from sklearn.preprocessing import StandardScaler

    wrappers = artefacts._RECONSTRUCTOR_WRAPPERS
    calls = [
        ("builtins.slice", ("a", None)),
        ("numpy.random._pickle.__bit_generator_ctor", ("MT19937",)),
        ("numpy.random._pickle.__bit_generator_ctor", (StandardScaler,)),
        ("numpy.random._pickle.__generator_ctor", ("PCG64", StandardScaler)),  # numpy would call the 2nd
        ("numpy.random.bit_generator.__pyx_unpickle_SeedSequence", (StandardScaler, 1, None)),
        ("sklearn._loss._loss.__pyx_unpickle_CyHalfMultinomialLoss", (CyHalfMultinomialLoss, 1, ({"x": 1},))),
    ]
    for name, args in calls:
        with pytest.raises(artefacts.UnsafeArtefact):
            wrappers[name](*args)
    assert wrappers["builtins.slice"](1, 4) == slice(1, 4)
    assert type(wrappers["numpy.random.bit_generator.__pyx_unpickle_SeedSequence"](SeedSequence, 65708578, None)) \
        is SeedSequence
