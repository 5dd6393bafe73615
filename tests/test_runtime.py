"""The compiled runtime chosen per version: stored and signed at publish, verified at load, the
fallback and its reason shown everywhere, one evaluation for predict + predict_proba."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

from serve_app.errors import ModelLoadError
from serve_app.model import compiled
from serve_app.model.compiled import PROBA_ATOL, UnsafeGraph
from serve_app.model.manifest import COMPILED_FILENAME, MANIFEST_FILENAME, NOT_COMPILED_REASON, Manifest
from serve_app.model.predictor import PREDICT, PREDICT_PROBA, Predictor
from serve_app.model.signing import SIGNATURE_FILENAME
from serve_app.model.store import ModelStore
from serve_app.model.training import DATASETS, ESTIMATORS, save_fitted
from serve_app.settings import AppSettings, ConfigError, validated

N_FEATURES = 6


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_classification(900, N_FEATURES, n_informative=4, n_classes=3, random_state=0)


@pytest.fixture(scope="module")
def forest(data: tuple[np.ndarray, np.ndarray]) -> RandomForestClassifier:
    X, y = data
    return RandomForestClassifier(n_estimators=10, random_state=0).fit(X[:400], y[:400])


def publish(store: ModelStore, model: Any, X: np.ndarray, name: str = "forest") -> Manifest:
    """Verified on 400 training rows and 200 held-out ones; rows 600+ are never checked."""
    return save_fitted(store, model, name=name, reference=X[:400], held_out=X[400:600])


@pytest.fixture
def compiled_store(store: ModelStore, forest: RandomForestClassifier, data: tuple[np.ndarray, np.ndarray]) -> ModelStore:
    publish(store, forest, data[0])
    return store


def never_run(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Makes ONNX Runtime fail the test if it is ever asked to open a graph."""
    opened: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        opened.append(args)
        raise AssertionError("ONNX Runtime was given a graph that should have been refused")

    monkeypatch.setattr(compiled.onnxruntime, "InferenceSession", refuse)
    return opened


def rewrite(path: Path, data: bytes) -> None:
    os.chmod(path, 0o644)
    path.write_bytes(data)


# ---- publish -------------------------------------------------------------------------------


def test_convertible_version_stores_a_signed_compiled_model_that_serves(
    compiled_store: ModelStore, forest: RandomForestClassifier, data: tuple[np.ndarray, np.ndarray]
) -> None:
    manifest = compiled_store.manifest("forest", "1")
    directory = compiled_store.version_dir("forest", "1")
    onnx_bytes = (directory / COMPILED_FILENAME).read_bytes()
    assert manifest.runtime == "onnxruntime"
    assert manifest.runtime_reason.startswith("verified on 600 rows: labels identical, max |proba diff| ")
    assert (manifest.compiled_file, manifest.compiled_size_bytes) == (COMPILED_FILENAME, len(onnx_bytes))
    assert manifest.compiled_sha256 == hashlib.sha256(onnx_bytes).hexdigest()
    assert manifest.verification is not None and manifest.verification["rows_checked"] == 600
    assert manifest.verification["label_mismatches"] == 0
    signed = json.loads((directory / SIGNATURE_FILENAME).read_bytes())["payload"]["files"]
    assert signed[COMPILED_FILENAME] == manifest.compiled_sha256

    predictor = Predictor.load(compiled_store, "forest", "1")
    assert predictor.runtime == "onnxruntime" and predictor.runtime_reason == manifest.runtime_reason
    unseen = predictor.validate(data[0][600:])
    assert np.array_equal(predictor.predict(unseen), forest.predict(unseen))
    assert np.allclose(predictor.predict_proba(unseen), forest.predict_proba(unseen), rtol=0, atol=PROBA_ATOL["float32"])
    both = predictor.run(unseen, (PREDICT_PROBA, PREDICT))
    assert list(both) == [PREDICT_PROBA, PREDICT] and np.array_equal(both[PREDICT], forest.predict(unseen))
    predictor.check_health()


def test_store_re_signs_the_compiled_model_and_checks_its_graph(compiled_store: ModelStore) -> None:
    compiled_store.sign_version("forest", "1")
    assert Predictor.load(compiled_store, "forest", "1").runtime == "onnxruntime"
    directory = compiled_store.version_dir("forest", "1")
    original = (directory / COMPILED_FILENAME).read_bytes()
    rewrite(directory / COMPILED_FILENAME, original + b"\x00")
    with pytest.raises(ModelLoadError, match="sha256 of forest/1/model.onnx"):
        compiled_store.sign_version("forest", "1")
    replace_compiled(directory, unsafe_graph(original))  # manifest rewritten to match: the graph check refuses
    with pytest.raises(UnsafeGraph, match="com.example.custom"):
        compiled_store.sign_version("forest", "1")


def unsafe_graph(onnx_bytes: bytes) -> bytes:
    """The same model importing a foreign operator domain (where custom-op code would come from)."""
    import onnx

    model = onnx.load_model_from_string(onnx_bytes)
    model.opset_import.add(domain="com.example.custom", version=1)
    return bytes(model.SerializeToString())


def replace_compiled(directory: Path, data: bytes) -> None:
    """model.onnx replaced, and the manifest's hash of it with it (the signature is left alone)."""
    rewrite(directory / COMPILED_FILENAME, data)
    manifest = json.loads((directory / MANIFEST_FILENAME).read_bytes())
    manifest["compiled_sha256"] = hashlib.sha256(data).hexdigest()
    rewrite(directory / MANIFEST_FILENAME, json.dumps(manifest, indent=2, sort_keys=True).encode())


def test_non_convertible_estimator_falls_back_with_its_reason_everywhere(store: ModelStore) -> None:
    from serve_app.serving.http.oip_v2 import metadata

    rows = np.arange(40, dtype=float).reshape(-1, 4)
    model = DummyClassifier(strategy="most_frequent").fit(rows, [0, 1] * 5)
    manifest = save_fitted(store, model, name="dummy", reference=rows, held_out=rows)
    assert manifest.runtime == "sklearn" and manifest.compiled_file is None and manifest.verification is None
    assert manifest.runtime_reason.startswith("served by scikit-learn (unsupported): skl2onnx")
    assert "DummyClassifier" in manifest.runtime_reason
    assert not (store.version_dir("dummy", "1") / COMPILED_FILENAME).exists()

    predictor = Predictor.load(store, "dummy", "1")
    assert (predictor.runtime, predictor.runtime_reason) == ("sklearn", manifest.runtime_reason)
    meta = metadata(predictor, ["1"])
    assert meta["platform"] == "sklearn"
    assert (meta["parameters"]["runtime"], meta["parameters"]["runtime_reason"]) == ("sklearn", manifest.runtime_reason)
    assert predictor.metadata()["runtime_reason"] == manifest.runtime_reason

    status = replica_status(store, "dummy")
    assert (status["runtime"], status["runtime_reason"]) == ("sklearn", manifest.runtime_reason)


def replica_status(store: ModelStore, model: str, **args: Any) -> dict[str, Any]:
    """ModelServer.status of a replica built in this process (no Ray), serving `model`."""
    from serve_app.serving.deployment import ModelServer

    # ModelServer as written, without the wrapper @serve.ingress puts around it (as test_service.py).
    replica = next(c for c in ModelServer.func_or_class.__mro__ if "reconfigure" in vars(c))
    server = replica({"store": str(store.root), "model": model, "monitoring": {"enabled": False}, **args})
    try:
        server.reconfigure({"version": "1"})
        return dict(server.status())
    finally:
        server._shadow_runner.shutdown()


def test_status_and_v2_metadata_show_the_compiled_runtime(compiled_store: ModelStore) -> None:
    from serve_app.serving.http.oip_v2 import metadata

    reason = compiled_store.manifest("forest", "1").runtime_reason
    status = replica_status(compiled_store, "forest")
    assert (status["runtime"], status["runtime_reason"]) == ("onnxruntime", reason)
    meta = metadata(Predictor.load(compiled_store, "forest", "1"), ["1"])
    assert meta["platform"] == "onnxruntime_onnx"
    assert (meta["parameters"]["runtime"], meta["parameters"]["runtime_reason"]) == ("onnxruntime", reason)


def test_logistic_regression_keeps_its_direct_arithmetic(store: ModelStore, data: tuple[np.ndarray, np.ndarray]) -> None:
    from sklearn.linear_model import LogisticRegression

    X, y = data
    manifest = publish(store, LogisticRegression(max_iter=500).fit(X[:400], y[:400]), X, name="linear")
    assert manifest.runtime == "sklearn" and "own arithmetic in numpy" in manifest.runtime_reason


def test_manifest_written_before_compiled_inference_still_loads() -> None:
    old = {
        "name": "iris", "version": "1", "created_at": "2024-01-01T00:00:00+00:00", "format": "skops",
        "model_file": "model.skops", "sha256": "0" * 64, "size_bytes": 1, "estimator": "x", "task": "classification",
        "feature_names": ["a"], "n_features": 1, "outputs": ["predict"], "dataset": "iris",
    }
    manifest = Manifest.model_validate(old)
    assert (manifest.runtime, manifest.runtime_reason, manifest.compiled_file) == ("sklearn", NOT_COMPILED_REASON, None)
    with pytest.raises(ValueError, match="runtime onnxruntime needs compiled_file"):
        Manifest.model_validate({**old, "runtime": "onnxruntime"})


# ---- load: what is refused before ONNX Runtime sees it --------------------------------------


def test_changed_compiled_model_is_refused_before_onnxruntime(compiled_store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = never_run(monkeypatch)
    path = compiled_store.version_dir("forest", "1") / COMPILED_FILENAME
    original = path.read_bytes()
    rewrite(path, original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ModelLoadError, match="sha256 of forest/1/model.onnx .* refusing to load it"):
        Predictor.load(compiled_store, "forest", "1")
    assert opened == []


def test_compiled_model_and_manifest_changed_together_are_refused(
    compiled_store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can write the store rewrites the manifest to match: the signature still disagrees."""
    opened = never_run(monkeypatch)
    directory = compiled_store.version_dir("forest", "1")
    replace_compiled(directory, (directory / COMPILED_FILENAME).read_bytes() + b"\x00")
    with pytest.raises(ModelLoadError, match="sha256 of forest/1/manifest.json"):
        Predictor.load(compiled_store, "forest", "1")
    assert opened == []


def test_signed_but_unsafe_graph_is_refused_before_onnxruntime(
    compiled_store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a graph the publisher signed goes through parse_safe (here: a foreign operator domain)."""
    directory = compiled_store.version_dir("forest", "1")
    replace_compiled(directory, unsafe_graph((directory / COMPILED_FILENAME).read_bytes()))
    compiled_store.sign_version("forest", "1", check=False)
    opened = never_run(monkeypatch)
    with pytest.raises(UnsafeGraph, match="com.example.custom"):
        Predictor.load(compiled_store, "forest", "1")
    assert opened == []


def test_compiled_model_verified_with_another_onnxruntime_falls_back(
    compiled_store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = never_run(monkeypatch)
    monkeypatch.setattr(compiled.onnxruntime, "__version__", "0.0.1")
    predictor = Predictor.load(compiled_store, "forest", "1")
    assert predictor.runtime == "sklearn" and "onnxruntime 1." in predictor.runtime_reason
    assert "0.0.1 is installed" in predictor.runtime_reason
    assert opened == []


# ---- forcing scikit-learn ---------------------------------------------------------------------


def test_runtime_setting_forces_sklearn(compiled_store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = never_run(monkeypatch)
    predictor = Predictor.load(compiled_store, "forest", "1", runtime="sklearn")
    assert predictor.runtime == "sklearn" and predictor.compiled is None
    assert predictor.runtime_reason.startswith("scikit-learn forced by the runtime setting")
    # A replica takes it from its settings (serving/versions.py passes AppSettings.runtime).
    status = replica_status(compiled_store, "forest", runtime="sklearn")
    assert status["runtime"] == "sklearn" and "forced" in status["runtime_reason"]
    assert opened == []


def test_runtime_setting_is_validated_with_a_clear_message() -> None:
    assert AppSettings(runtime="sklearn").runtime == "sklearn" and AppSettings().runtime == "auto"
    with pytest.raises(ConfigError, match=r"runtime must be 'auto' .* or 'sklearn' .*got 'onnx'"):
        validated(AppSettings, {"runtime": "onnx"}, "application args")
    with pytest.raises(ConfigError, match="onnx_threads"):
        validated(AppSettings, {"onnx_threads": 0}, "application args")


def test_threads_follow_the_cpus_ray_gives_the_replica(compiled_store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets for num_cpus 0.5 or 1
    assert compiled.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert compiled.default_threads() == cpus  # never more than the process may run on
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert compiled.default_threads() == cpus
    seen: list[int] = []
    real = compiled.session_options
    monkeypatch.setattr(compiled, "session_options", lambda threads: seen.append(threads) or real(threads))
    Predictor.load(compiled_store, "forest", "1", threads=3)
    assert seen == [3]


# ---- one evaluation for predict + predict_proba ----------------------------------------------


def counting(monkeypatch: pytest.MonkeyPatch, target: Any, *names: str) -> dict[str, int]:
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(target, name)

        def wrapped(*args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(target, name, wrapped)
    return calls


def both_outputs_through_the_replica(predictor: Predictor, rows: np.ndarray) -> dict[str, np.ndarray]:
    """What a V2 request without `outputs` asks the replica's model call for, in a batch of two."""
    from serve_app.serving.deployment import _BatchItem, _run_timed

    items = [_BatchItem(predictor, rows[:3], (PREDICT, PREDICT_PROBA)), _BatchItem(predictor, rows[3:], (PREDICT,))]
    results, _ = _run_timed(predictor, items)
    return {name: np.concatenate([results[0][name], results[1][name]]) if name == PREDICT else results[0][name]
            for name in (PREDICT, PREDICT_PROBA)}


def test_compiled_model_evaluates_once_for_both_outputs(
    compiled_store: ModelStore, forest: RandomForestClassifier, data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = Predictor.load(compiled_store, "forest", "1")
    assert predictor.compiled is not None
    calls = counting(monkeypatch, predictor.compiled.session, "run")
    rows = predictor.validate(data[0][600:610])
    answers = both_outputs_through_the_replica(predictor, rows)
    assert calls["run"] == 1
    assert np.array_equal(answers[PREDICT], forest.predict(rows))


@pytest.mark.parametrize("make", [
    lambda: RandomForestClassifier(n_estimators=5, random_state=0),
    lambda: HistGradientBoostingClassifier(max_iter=10, random_state=0),
], ids=["random_forest", "hist_gradient_boosting"])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_sklearn_evaluates_once_for_both_outputs_with_identical_answers(
    make: Any, n_classes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    X, y = make_classification(300, N_FEATURES, n_informative=4, n_classes=n_classes, random_state=1)
    model = make().fit(X[:200], y[:200])
    rows = np.ascontiguousarray(X[200:])
    expected = (model.predict(rows), model.predict_proba(rows))
    predictor = Predictor(model, manifest_for(model))
    assert predictor.runtime == "sklearn" and predictor.one_evaluation
    # A forest's trees are summed by the predictor itself (predictor.forest_proba): each tree once.
    evaluated, evaluations = (model.estimators_[0], "predict_proba") if isinstance(model, RandomForestClassifier) else (model, "_raw_predict")
    calls = counting(monkeypatch, evaluated, "predict", evaluations)
    answers = both_outputs_through_the_replica(predictor, rows)
    assert calls == {"predict": 0, evaluations: 1}
    assert np.array_equal(answers[PREDICT], expected[0])
    assert np.array_equal(answers[PREDICT_PROBA], expected[1][:3])  # bit-identical, not merely close


def test_other_estimators_still_answer_both_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = np.arange(40, dtype=float).reshape(-1, 4)
    model = DummyClassifier(strategy="prior").fit(rows, [0, 1] * 5)
    predictor = Predictor(model, manifest_for(model))
    assert not predictor.one_evaluation
    both = predictor.run(rows, (PREDICT, PREDICT_PROBA))
    assert np.array_equal(both[PREDICT], model.predict(rows)) and np.array_equal(both[PREDICT_PROBA], model.predict_proba(rows))


def manifest_for(model: Any) -> Manifest:
    n = int(model.n_features_in_)
    return Manifest(
        name="m", version="1", created_at="now", format="skops", model_file="model.skops", sha256="0" * 64,
        size_bytes=1, estimator=type(model).__name__, task="classification", feature_names=[f"x{i}" for i in range(n)],
        n_features=n, classes=model.classes_.tolist(), outputs=[PREDICT, PREDICT_PROBA], dataset="test",
    )


# ---- the batch job ----------------------------------------------------------------------------


def test_batch_job_uses_the_compiled_runtime(
    tmp_path: Path, compiled_store: ModelStore, forest: RandomForestClassifier, data: tuple[np.ndarray, np.ndarray]
) -> None:
    from serve_app.ops import batch

    rows = data[0][600:700]
    path = tmp_path / "in.csv"
    path.write_text("\n".join(",".join(repr(float(v)) for v in row) for row in rows) + "\n")
    header, chunks = batch.plan_csv(path)
    (tmp_path / "errors").mkdir()
    table = batch.predict_chunk(
        chunks[0], store=str(compiled_store.root), model="forest", version="1", order=None,
        n_columns=N_FEATURES, errors_dir=str(tmp_path / "errors"),
    )
    predictor = batch._PREDICTORS[(str(compiled_store.root), "forest", "1", "auto")]
    batch._PREDICTORS.clear()
    assert predictor.runtime == "onnxruntime"
    assert table.column("prediction").to_pylist() == forest.predict(rows).tolist()


# ---- the built-in heavy models ------------------------------------------------------------------


def test_heavy_benchmark_models_are_built_in() -> None:
    dataset = DATASETS["synthetic30"]()
    assert dataset.features.shape == (10_000, 30) and dataset.task == "classification"
    forest = ESTIMATORS["classification"]["random_forest_200"]()
    boosting = ESTIMATORS["classification"]["hist_gradient_boosting"]()
    assert (type(forest).__name__, forest.n_estimators) == ("RandomForestClassifier", 200)
    assert (type(boosting).__name__, boosting.max_iter, boosting.early_stopping) == ("HistGradientBoostingClassifier", 200, False)


def test_train_prints_which_runtime_serves_and_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serve_app.ops.cli import main

    assert main(["train", "--store", str(tmp_path / "models"), "--estimator", "random_forest"]) == 0
    out, progress = capsys.readouterr()
    assert "converting RandomForestClassifier to ONNX and verifying it against scikit-learn on 150 rows" in progress
    assert out.splitlines()[0].startswith("stored iris v1 (RandomForestClassifier on iris")
    assert out.splitlines()[2].startswith("  runtime: ONNX Runtime (compiled model.onnx); verified on 150 rows: labels identical")
