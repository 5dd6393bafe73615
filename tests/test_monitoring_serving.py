"""Monitoring on the real Ray session: metrics on Ray's export port, the Grafana dashboard,
request ids, the prediction log across a graceful shutdown, live accuracy and drift."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_iris

from serve_app.model.predictor import Predictor

from .conftest import IRIS_ROWS, app_config, wait_for

pytestmark = pytest.mark.ray

APP, PREFIX = "monitored", "/mon"
WINDOW = 300  # rows per replica
DASHBOARD = Path(__file__).resolve().parent.parent / "configs" / "grafana-dashboard.json"
IRIS = load_iris()


@pytest.fixture(scope="module")
def monitored(ray_session: Any, session_store: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    log_dir = tmp_path_factory.mktemp("predlog")
    monitoring = {"log_dir": str(log_dir), "flush_interval_s": 0.2, "drift_window": WINDOW, "drift_min_rows": 400}
    ray_session.apply(app_config(session_store, name=APP, route_prefix=PREFIX, num_replicas=2, monitoring=monitoring))
    url = f"{ray_session.base_url}{PREFIX}"
    wait_for(lambda: httpx.post(f"{url}/predict", json={"features": IRIS_ROWS[0]}, timeout=5).status_code == 200, what="the monitored app")
    yield {"url": url, "log_dir": log_dir, "store": session_store}
    ray_session.remove(APP)


def _predict(url: str, rows: Any, request_id: str | None = None) -> httpx.Response:
    headers = {"x-request-id": request_id} if request_id else {}
    reply = httpx.post(f"{url}/predict", json={"features": rows}, headers=headers, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply


def test_request_id_is_echoed(monitored: dict[str, Any]) -> None:
    assert _predict(monitored["url"], IRIS_ROWS[0], "client-chosen-id").headers["x-request-id"] == "client-chosen-id"
    generated = _predict(monitored["url"], IRIS_ROWS[0]).headers.get("x-request-id")
    assert generated and re.fullmatch(r"[0-9a-f-]{16,}", generated), generated


def _accuracy(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v2/models/iris/accuracy", timeout=10).json()["versions"]  # type: ignore[no-any-return]


def test_feedback_gives_the_accuracy_over_replicas(monitored: dict[str, Any]) -> None:
    url = monitored["url"]
    rows, truth = IRIS.data[::3], IRIS.target[::3]  # 50 rows, one request each
    predicted = {}
    for i, row in enumerate(rows):
        predicted[f"acc-{i}"] = _predict(url, row.tolist(), f"acc-{i}").json()["prediction"]
    # Labels: the truth for most, a deliberately wrong one for every fifth request.
    labels = {rid: (int(truth[i]) if i % 5 else (predicted[rid] + 1) % 3) for i, rid in enumerate(predicted)}
    right = sum(labels[rid] == predicted[rid] for rid in predicted)
    assert 25 < right < 48
    # Other tests may have labelled v1 already: the window (1,000 rows) holds theirs and ours.
    before = _accuracy(url).get("1") or {"labelled_rows": 0, "accuracy": 0.0}
    expected = (before["accuracy"] * before["labelled_rows"] + right) / (before["labelled_rows"] + 50)
    ids = list(predicted)
    # One by one on the seed-style route (each lands on whichever replica HAProxy picks) ...
    for rid in ids[:25]:
        reply = httpx.post(f"{url}/feedback", json={"request_id": rid, "label": labels[rid]}, timeout=10)
        assert reply.status_code == 200 and not reply.json()["rejected"], reply.text
    # ... and as one list on the V2 route.
    reply = httpx.post(f"{url}/v2/models/iris/feedback", json=[{"request_id": r, "labels": [labels[r]]} for r in ids[25:]], timeout=10)
    assert reply.status_code == 200 and not reply.json()["rejected"], reply.text

    def accuracy() -> dict[str, Any] | None:
        v1 = _accuracy(url).get("1")
        return v1 if v1 and v1["labelled_rows"] == before["labelled_rows"] + 50 else None

    try:
        v1 = wait_for(accuracy, timeout_s=30, what="all 50 labels joined")
    except AssertionError:
        state = httpx.get(f"{url}/v2/models/iris/monitoring", timeout=10).json()
        raise AssertionError(f"accuracy {state['accuracy']}, replica {state['replica']}, dropped {state['dropped']}") from None
    assert v1["accuracy"] == pytest.approx(expected)
    again = httpx.post(f"{url}/feedback", json={"request_id": ids[0], "label": 0}, timeout=10).json()
    assert "already" in again["rejected"][0]["error"]


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"not json", 400), (b'{"request_id": "x"}', 422), (b'{"request_id": 5, "label": 1}', 422)],
)
def test_bad_feedback(monitored: dict[str, Any], body: bytes, status: int) -> None:
    reply = httpx.post(f"{monitored['url']}/feedback", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status and set(reply.json()) == {"error"}


def _drift(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v2/models/iris/drift", timeout=10).json()["versions"]["1"]


def _send_rows(url: str, rows: np.ndarray, per_request: int = 10) -> None:
    for chunk in np.array_split(rows, len(rows) // per_request):
        _predict(url, chunk.tolist())


def test_drift_ok_then_detected_on_exactly_the_shifted_features(monitored: dict[str, Any]) -> None:
    url = monitored["url"]
    rng = np.random.default_rng(3)
    # Three windows' worth over the two replicas: every replica's window is replaced.
    _send_rows(url, IRIS.data[rng.integers(0, 150, 3 * WINDOW)])
    calm = wait_for(lambda: (d := _drift(url))["rows"] == 2 * WINDOW and d, timeout_s=30, what="both windows full")
    assert calm["replicas"] == 2
    assert calm["status"] == "ok", calm
    shifted = IRIS.data[rng.integers(0, 150, 2 * WINDOW)].copy()
    shifted[:, 0] += 1.2  # sepal length
    shifted[:, 3] *= 1.7  # petal width
    _send_rows(url, shifted)  # one window per replica

    def drifted() -> dict[str, Any] | None:
        result = _drift(url)
        return result if result["status"] == "drift" else None

    result = wait_for(drifted, timeout_s=30, what="drift to be detected")
    names = IRIS.feature_names
    assert {n for n, f in result["features"].items() if f["status"] == "drift"} == {names[0], names[3]}, result
    assert result["features"][names[1]]["status"] == "ok" and result["features"][names[2]]["status"] == "ok"


def test_metrics_endpoint_has_every_dashboard_metric(monitored: dict[str, Any]) -> None:
    import ray

    from serve_app.monitoring.metrics import DRIFT_STATUS_VALUES

    url = monitored["url"]
    ids = [f"metrics-{i}" for i in range(20)]
    for rid in ids:
        _predict(url, IRIS_ROWS, rid)
    assert httpx.post(f"{url}/predict", json={"features": [1, 2]}).status_code == 422  # counted too
    # Labels of its own (one row in three wrong), so the accuracy gauges exist whatever ran before.
    labels = [{"request_id": rid, "labels": [0, 2, 1] if i % 3 else [1, 2, 1]} for i, rid in enumerate(ids)]
    assert not httpx.post(f"{url}/v2/models/iris/feedback", json=labels, timeout=10).json()["rejected"]
    port = ray.nodes()[0]["MetricsExportPort"]
    dashboard = json.loads(DASHBOARD.read_text())
    wanted = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(ray_serve_app_[a-z_]+?)(?:_bucket)?\b[{\[]", target["expr"])
    }
    assert len(wanted) >= 14, wanted

    def values(name: str, text: str, **labels: str) -> list[float]:
        return [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
        ]

    def disagreements(text: str) -> list[str]:
        """Where the exported gauges differ from what the app's JSON endpoints say now."""
        found = []
        accuracy = _accuracy(url).get("1") or {}
        if values("ray_serve_app_live_accuracy", text, app=APP, version="1") != [pytest.approx(accuracy.get("accuracy"))]:
            found.append(f"live accuracy: JSON {accuracy}")
        if values("ray_serve_app_live_accuracy_labels", text, app=APP, version="1") != [accuracy.get("labelled_rows")]:
            found.append(f"labels: JSON {accuracy}")
        for feature, result in _drift(url)["features"].items():
            if values("ray_serve_app_drift_status", text, app=APP, feature=feature) != [DRIFT_STATUS_VALUES[result["status"]]]:
                found.append(f"drift status of {feature}: JSON {result['status']}")
        return found

    last: dict[str, Any] = {}

    def scrape() -> str | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        present = {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line.startswith("ray_serve_app_")}
        present |= {n[: -len("_bucket")] for n in present if n.endswith("_bucket")}
        counted = {
            "ok": sum(values("ray_serve_app_requests_total", text, application=APP, route="/predict", status="200")),
            "refused": sum(values("ray_serve_app_requests_total", text, application=APP, route="/predict", status="422")),
            "rows": sum(values("ray_serve_app_rows_predicted_total", text, application=APP, version="1")),
        }
        last.update(missing=sorted(wanted - present), disagree=disagreements(text), counted=counted)
        # Each replica exports on its own clock: wait until both have sent this test's requests.
        fresh = counted["ok"] >= 20 and counted["refused"] >= 1 and counted["rows"] >= 60
        return text if not last["missing"] and not last["disagree"] and fresh else None

    try:
        wait_for(scrape, timeout_s=90, interval_s=2, what="Ray's metrics port to export every dashboard metric")
    except AssertionError as timeout:
        raise AssertionError(f"{timeout}; last scrape: {last}") from None


def test_dashboard_page_and_report_png(monitored: dict[str, Any], tmp_path: Path) -> None:
    from serve_app.ops.cli import main

    url = monitored["url"]
    _send_rows(url, IRIS.data[::3])  # its own traffic: the page draws plots once the hub has rows
    wait_for(lambda: _drift(url)["rows"] >= 50, timeout_s=30, what="the rows to reach the monitor hub")
    page = httpx.get(f"{url}/dashboard", timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "data:image/png;base64," in page.text and "petal width (cm)" in page.text
    assert main(["report", "--url", url, "--out", str(tmp_path / "r.html"), "--png", str(tmp_path / "r.png")]) == 0
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "r.png")
    assert image.shape[0] >= 900 and image.shape[1] >= 1200
    assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.scenario
def test_dashboard_renders_in_headless_chromium(monitored: dict[str, Any], tmp_path: Path) -> None:
    """The page a person looks at, drawn by a real browser (Debian's chromium: `make test-scenarios` installs it)."""
    import os
    import shutil
    import signal
    import subprocess

    import matplotlib.image

    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: `make test-scenarios` installs it (apt-get install chromium)"
    url = monitored["url"]
    _send_rows(url, IRIS.data[np.random.default_rng(5).integers(0, 150, 2 * WINDOW)])
    ids = [f"render-{i}" for i in range(10)]
    for rid in ids:
        _predict(url, IRIS_ROWS, rid)
    truth = [0, 2, 1]  # IRIS_ROWS: setosa, virginica, versicolor
    reply = httpx.post(f"{url}/v2/models/iris/feedback", json=[{"request_id": r, "labels": truth} for r in ids], timeout=10)
    assert reply.status_code == 200 and not reply.json()["rejected"], reply.text
    wait_for(lambda: _drift(url)["rows"] >= 400, timeout_s=30, what="drift windows with enough rows")

    page = httpx.get(f"{url}/dashboard", timeout=60)  # the fixture's app has no API key
    assert page.status_code == 200 and "data:image/png;base64," in page.text
    (tmp_path / "dashboard.html").write_text(page.text, encoding="utf-8")
    shot = tmp_path / "page.png"
    width, height = 1280, 2000
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", f"--window-size={width},{height}",
        (tmp_path / "dashboard.html").as_uri(),
    ]
    # Its own session, so whatever chromium leaves in its process group ends with it.
    browser = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = browser.communicate(timeout=120)  # --screenshot exits by itself
    finally:
        try:
            os.killpg(browser.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        browser.communicate()
    assert browser.returncode == 0, stderr.decode(errors="replace")[-2000:]  # stderr: dbus warnings even on success

    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(shot)[..., :3]
    assert image.shape == (height, width, 3)
    colours = np.unique((image * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 100, f"{len(colours)} distinct colours: a blank page"
    # The embedded plots drew, not just the text around them (measured: ~9% coloured pixels
    # and ~58% of rows inked with the plots; 0.01% and 12% with the image left out).
    coloured = (image.max(axis=2) - image.min(axis=2)) > 0.3
    assert coloured.mean() > 0.02, f"{coloured.mean():.2%} of the pixels coloured: the plots are missing"
    inked_rows = (image < 0.9).any(axis=(1, 2))
    assert inked_rows.mean() > 0.4, f"{inked_rows.mean():.0%} of the rows inked: the plots are missing"


def test_prediction_log_has_every_request_after_a_graceful_shutdown(ray_session: Any, session_store: Any, tmp_path: Path) -> None:
    # Flushes only every 60 s: the lines can only be on disk because shutdown wrote them.
    monitoring = {"log_dir": str(tmp_path), "flush_interval_s": 60}
    ray_session.apply(app_config(session_store, name="logged", route_prefix="/logged", num_replicas=2, monitoring=monitoring))
    url = f"{ray_session.base_url}/logged"
    wait_for(lambda: httpx.post(f"{url}/predict", json={"features": IRIS_ROWS[0]}, timeout=5).status_code == 200, what="the logged app")
    ids = [f"log-{i}" for i in range(40)]
    for rid in ids:
        _predict(url, IRIS_ROWS, rid)
    ray_session.remove("logged")

    def logged() -> list[dict[str, Any]]:
        return [json.loads(line) for path in tmp_path.glob("*.jsonl") for line in path.read_text().splitlines()]

    lines = wait_for(lambda: (found := logged()) and {r["request_id"] for r in found} >= set(ids) and found, timeout_s=60, what="the log written at shutdown")
    ours = [r for r in lines if r["request_id"] in ids]
    assert sorted(r["request_id"] for r in ours) == sorted(ids)  # one line each, none lost
    assert len({p.name for p in tmp_path.glob("*.jsonl")}) == 2  # one file per replica
    record = ours[0]
    expected = Predictor.load(session_store, "iris", "1").model.predict(np.array(IRIS_ROWS)).tolist()
    assert record["inputs"] == IRIS_ROWS and record["outputs"] == {"predict": expected}
    assert record["model"] == "iris" and record["version"] == "1" and record["latency_ms"] > 0
