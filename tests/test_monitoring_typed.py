"""Monitoring a model with named, typed columns: the replica monitor fed `ColumnTable`s, the
hub summing two replicas, the drift report, metrics, dashboard and prediction log (no Ray)."""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from serve_app.model.churn import TARGET, churn_frame, fit_churn
from serve_app.model.manifest import Manifest
from serve_app.model.predictor import Predictor
from serve_app.model.publish import publish
from serve_app.model.schema import Column, InputSchema, column_stats
from serve_app.model.store import ModelStore
from serve_app.monitoring import metrics as m
from serve_app.monitoring.dashboard import figure, render_html
from serve_app.monitoring.drift import DriftReference, RowWindow, Thresholds, WindowCounts, score
from serve_app.monitoring.hub import MonitorHub
from serve_app.monitoring.monitor import LocalHub, Monitor
from serve_app.protocol.columns import ColumnTable, decode_frame
from serve_app.serving.ledger import Prediction, RequestRecord
from serve_app.settings import MonitoringSettings

from .test_monitoring import Recorder

WINDOW = 600  # rows per replica's window; two replicas make 1200 rows at the hub


@pytest.fixture(scope="module")
def churn_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, Predictor]:
    """churn v1 in a store (the hub reads its manifest there): a Pipeline fitted on 2000 rows."""
    frame = churn_frame(2000, seed=0)
    features = frame.drop(columns=[TARGET])
    model = fit_churn(frame)
    store = ModelStore(tmp_path_factory.mktemp("typed") / "models")
    manifest = publish(model, name="churn", sample=features, store=store)
    assert manifest.typed
    return store, Predictor.load(store, "churn")


def traffic(rows: int = 2 * WINDOW, seed: int = 1) -> pd.DataFrame:
    """Requests drawn from the training distribution (the same generator, another seed)."""
    return churn_frame(rows, seed=seed).drop(columns=[TARGET])


def replicas(store: ModelStore, settings: MonitoringSettings, recorders: Any) -> tuple[MonitorHub, list[Monitor]]:
    hub = MonitorHub("app", str(store.root), settings.model_dump(), emit_metrics=False)
    return hub, [Monitor(settings, replica=f"r{i}", hub=LocalHub(hub), metrics=recorders, start=False) for i in range(2)]


def serve(monitor: Monitor, model: Predictor, frame: pd.DataFrame, request_id: str = "") -> None:
    """What the ledger hands the monitor for one typed request: its ColumnTable and outputs."""
    table = decode_frame(frame, model.manifest.schema)
    request = RequestRecord("/predict", model.name, model.version, request_id=request_id)
    outputs = {"predict": model.predict(table)}
    monitor.put(Prediction(request, model, table, outputs, at=request.started + 0.002, ts=time.time()))  # type: ignore[arg-type]


def drift_of(store: ModelStore, model: Predictor, frame: pd.DataFrame, recorders: Any) -> tuple[MonitorHub, dict[str, Any]]:
    """`frame` served half by each of two replicas, in requests of 30 rows; the hub's verdict."""
    settings = MonitoringSettings(drift_window=WINDOW, drift_min_rows=500)
    hub, monitors = replicas(store, settings, recorders)
    for i, monitor in enumerate(monitors):
        half = frame.iloc[i * WINDOW : (i + 1) * WINDOW]
        for start in range(0, len(half), 30):
            serve(monitor, model, half.iloc[start : start + 30])
        monitor.flush()
    report = hub.drift("churn")
    version = report["versions"]["1"]
    assert version["rows"] == 2 * WINDOW and version["replicas"] == 2  # both windows, summed
    return hub, report


@pytest.fixture
def recorders() -> dict[str, Recorder]:
    return defaultdict(Recorder)


def test_training_like_traffic_is_no_drift(churn_store: tuple[ModelStore, Predictor], recorders: dict[str, Recorder]) -> None:
    store, model = churn_store
    _, report = drift_of(store, model, traffic(), recorders)
    features = report["versions"]["1"]["features"]
    assert list(features) == model.manifest.schema.names  # every column, in schema order
    assert report["status"] == "ok", features
    assert {name: f["status"] for name, f in features.items()} == {name: "ok" for name in features}
    contract, charges = features["contract"], features["monthly_charges"]
    assert contract["kind"] == "categorical" and "ks" not in contract and contract["unseen_share"] == 0.0
    assert features["paperless_billing"]["kind"] == "categorical"  # booleans are categories
    assert charges["kind"] == "numeric" and 0.01 < charges["null_share"] < 0.08  # 4% missing by construction
    shares = {c["category"]: c for c in contract["categories"]}
    assert shares["month-to-month"]["training"] == pytest.approx(0.55, abs=0.03)
    assert shares["month-to-month"]["live"] == pytest.approx(0.55, abs=0.04)


def test_one_shifted_categorical_column_drifts_there_only(
    churn_store: tuple[ModelStore, Predictor], recorders: dict[str, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, model = churn_store
    shifted = traffic()
    shifted["contract"] = "two-year"
    hub, report = drift_of(store, model, shifted, recorders)
    features = report["versions"]["1"]["features"]
    assert {name for name, f in features.items() if f["status"] != "ok"} == {"contract"}, features
    assert features["contract"]["status"] == "drift" and report["status"] == "drift"
    live = {c["category"]: c["live"] for c in features["contract"]["categories"]}
    assert live["two-year"] == 1.0 and live["month-to-month"] == 0.0

    # The hub's gauges: the same metric names and labels as numeric features, no KS for categories.
    gauges: dict[str, Recorder] = defaultdict(Recorder)
    monkeypatch.setattr(m, "hub_metrics", lambda: gauges)
    hub._emit_drift()
    contract = {"app": "app", "model": "churn", "version": "1", "feature": "contract"}
    assert gauges[m.DRIFT_STATUS].calls.count((2, contract)) == 1
    assert gauges[m.DRIFT_PSI].total(feature="contract") == features["contract"]["psi"] > 0.25
    assert gauges[m.DRIFT_UNSEEN].calls.count((0.0, contract)) == 1
    assert not gauges[m.DRIFT_KS].total(feature="contract") and not any(t["feature"] == "contract" for _, t in gauges[m.DRIFT_KS].calls)
    assert {t["feature"] for _, t in gauges[m.DRIFT_STATUS].calls} == set(model.manifest.schema.names)
    assert {t["feature"] for v, t in gauges[m.DRIFT_STATUS].calls if v != 0} == {"contract"}

    # The dashboard (and `serve-app report`, which renders the same) shows the categories.
    page = render_html(hub.summary("churn"))
    assert "Categorical columns: training vs recent share" in page and "two-year" in page
    assert re.search(r"<td>contract</td><td>[0-9.]+</td><td>-</td><td>categorical</td><td>0.0%</td>.*>drift</td>", page)

    # Its plots: a panel of the drifted column's category shares, training beside recent.
    panels = {ax.get_title(): ax for ax in figure(hub.summary("churn")).axes}
    title = next(t for t in panels if t.startswith("Categorical column 'contract'"))
    assert "drift" in title
    ax = panels[title]
    categories = [label.get_text() for label in ax.get_xticklabels()]
    training_bars, recent_bars = ax.containers
    drawn = {c: (t.get_height(), r.get_height()) for c, t, r in zip(categories, training_bars, recent_bars)}
    expected = {c["category"]: (c["training"], c["live"]) for c in features["contract"]["categories"] if c["training"] or c["live"]}
    assert drawn == expected and drawn["two-year"][1] == 1.0


def test_unseen_categories_raise_the_unseen_share(churn_store: tuple[ModelStore, Predictor], recorders: dict[str, Recorder]) -> None:
    store, model = churn_store
    region = model.manifest.schema.column("region")
    assert region is not None and region.unknown_categories == "allowed"  # OneHotEncoder(handle_unknown="ignore")
    frame = traffic()
    # 10% of all rows never seen in training, all served by the second replica (20% of its
    # window): only the sum of both replicas' counts gives 10%.
    frame.loc[frame.index[WINDOW::5], "region"] = "region-99"
    _, report = drift_of(store, model, frame, recorders)
    features = report["versions"]["1"]["features"]
    assert features["region"]["unseen_share"] == pytest.approx(0.1)
    assert features["region"]["status"] == "drift"  # unseen values count in PSI: 10% is drift
    assert {name for name, f in features.items() if f["status"] != "ok"} == {"region"}
    assert all(f.get("unseen_share", 0.0) == 0.0 for name, f in features.items() if name != "region")


def test_prediction_log_records_named_columns(tmp_path: Path, churn_store: tuple[ModelStore, Predictor], recorders: dict[str, Recorder]) -> None:
    store, model = churn_store
    frame = traffic(40, seed=3)
    missing = int(np.flatnonzero(frame["monthly_charges"].isna().to_numpy())[0])
    settings = MonitoringSettings(log_dir=str(tmp_path))
    _, (monitor, _) = replicas(store, settings, recorders)
    serve(monitor, model, frame, "typed-1")
    monitor.close()
    (line,) = [json.loads(text) for text in (tmp_path / "predictions-r0.jsonl").read_text().splitlines()]
    assert line["request_id"] == "typed-1" and len(line["inputs"]) == 40
    expected = json.loads(frame.astype(object).where(frame.notna(), None).to_json(orient="records"))
    assert line["inputs"] == expected  # {column: value} per row, typed as JSON: ints, strings, booleans
    assert list(line["inputs"][0]) == model.manifest.schema.names
    assert line["inputs"][missing]["monthly_charges"] is None
    assert isinstance(line["inputs"][0]["paperless_billing"], bool) and isinstance(line["inputs"][0]["tenure_months"], int)
    assert line["outputs"]["predict"] == model.predict(decode_frame(frame, model.manifest.schema)).tolist()


def test_nullable_integer_and_boolean_columns() -> None:
    """Object arrays with None (nullable integers and booleans) are windowed: nulls counted, not binned."""
    rng = np.random.default_rng(5)
    sample = pd.DataFrame({
        "calls": pd.array(np.where(rng.random(1000) < 0.1, None, rng.poisson(2, 1000)), dtype="Int64"),
        "flag": pd.array(np.where(rng.random(1000) < 0.2, None, rng.random(1000) < 0.3), dtype="boolean"),
    })
    schema = InputSchema(columns=(
        Column(name="calls", kind="integer", nullable=True), Column(name="flag", kind="boolean", nullable=True),
    ))
    stats = column_stats(sample, schema)
    manifest = Manifest(
        name="m", version="1", created_at="now", format="joblib", model_file="model.joblib", sha256="0" * 64,
        size_bytes=1, estimator="x", task="classification", feature_names=schema.names, n_features=2,
        outputs=["predict"], dataset="test", input_schema=schema,
        training_stats={"calls": stats["calls"]}, category_stats={"flag": stats["flag"]},  # type: ignore[dict-item]
    )
    reference = DriftReference.from_manifest(manifest)
    assert reference is not None and reference.features == ("calls",) and reference.categories == ("flag",)
    table = decode_frame(sample, schema)
    assert table.columns["calls"].dtype == object and table.columns["flag"].dtype == object
    window = RowWindow(1000, reference.width)
    window.add(reference.window_rows(table))
    thresholds = Thresholds.from_settings(MonitoringSettings().model_dump())
    result = score(reference, WindowCounts.of(reference, window.rows()), thresholds)
    calls, flag = result["features"]["calls"], result["features"]["flag"]
    assert calls["null_share"] == pytest.approx(sample["calls"].isna().mean())
    assert flag["null_share"] == pytest.approx(sample["flag"].isna().mean()) and flag["unseen_share"] == 0.0
    assert result["status"] == "ok" and calls["psi"] < 1e-9 and flag["psi"] < 1e-9  # the training rows themselves

    # A bare matrix for a typed model is refused (and the monitor logs it, monitoring the rest).
    with pytest.raises(TypeError, match="ColumnTable"):
        reference.window_rows(np.zeros((2, 2)))
