"""A request is recorded once: the ledger's per-version counts (/admin/status), the
Prometheus metrics and the hub's traffic all come from the same one record.

The replica is the real ModelServer class and routes (no Ray), with a monitor whose
metrics are recorders and whose hub is in this process.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, Iterator

import numpy as np
import orjson
import pytest

from serve_app.monitoring import metrics as m
from serve_app.monitoring.hub import MonitorHub
from serve_app.monitoring.monitor import LocalHub, Monitor
from serve_app.model.store import ModelStore
from serve_app.serving.http.app import build_http_app
from serve_app.serving.ledger import RequestLedger, RequestRecord
from serve_app.settings import MonitoringSettings

from .conftest import IRIS_ROWS
from .test_monitoring import Recorder
from .test_service import TestClient, replica_class


class Replica:
    def __init__(self, store: ModelStore) -> None:
        self.server = replica_class()({"store": str(store.root), "model": "iris", "monitoring": {"enabled": False}})
        self.server.reconfigure({"version": "1"})
        settings = MonitoringSettings()
        self.hub = MonitorHub("app", str(store.root), settings.model_dump(), emit_metrics=False)
        self.metrics: dict[str, Recorder] = defaultdict(Recorder)
        self.monitor = Monitor(settings, replica="r1", hub=LocalHub(self.hub), metrics=self.metrics, start=False)
        self.server.monitor = self.monitor
        self.server.ledger = RequestLedger(self.monitor)
        self.app = build_http_app(self.server)

    def traffic(self, version: str = "1") -> dict[str, Any]:
        versions: dict[str, Any] = self.server.status()["traffic"]["versions"]
        return versions.get(version, {})

    def hub_requests(self) -> list[dict[str, Any]]:
        self.monitor.flush()
        requests: list[dict[str, Any]] = self.hub.summary("iris")["requests"]
        return requests


@pytest.fixture
def replica(iris_store: ModelStore) -> Iterator[Replica]:
    replica = Replica(iris_store)
    yield replica
    replica.monitor.close()


@pytest.fixture
def client(replica: Replica) -> Iterator[TestClient]:
    with TestClient(replica.app, raise_server_exceptions=False) as client:
        yield client


def test_one_predict_is_one_request_everywhere(replica: Replica, client: TestClient) -> None:
    reply = client.post("/predict", json={"features": IRIS_ROWS[:2]})
    assert reply.status_code == 200, reply.text

    traffic = replica.traffic()
    assert (traffic["requests"], traffic["rows"], traffic["errors"]) == (1, 2, 0)
    assert replica.server.status()["batches"] == {"batches": 1, "requests": 1}
    assert replica.hub_requests() == [{"route": "/predict", "status": "200", "count": 1}]
    metrics = replica.metrics
    assert metrics[m.REQUESTS].calls == [(1, {"route": "/predict", "model": "iris", "version": "1", "status": "200"})]
    assert metrics[m.ROWS_PREDICTED].total(model="iris", version="1") == 2
    assert metrics[m.BATCH_ROWS].calls == [(2, {"model": "iris", "version": "1"})]
    # One latency, measured once: the histogram has exactly the ledger's value.
    [(latency_ms, tags)] = metrics[m.REQUEST_LATENCY].calls
    assert tags == {"route": "/predict", "model": "iris", "version": "1"}
    assert latency_ms == pytest.approx(traffic["mean_latency_ms"])


def test_an_error_is_counted_once_as_an_error(replica: Replica, client: TestClient) -> None:
    reply = client.post("/predict", json={"features": [1.0, 2.0, 3.0]})  # 3 features of 4
    assert reply.status_code == 422, reply.text

    traffic = replica.traffic()
    assert (traffic["requests"], traffic["rows"], traffic["errors"]) == (1, 0, 1)
    assert replica.hub_requests() == [{"route": "/predict", "status": "422", "count": 1}]
    assert replica.metrics[m.REQUESTS].total() == 1
    assert replica.metrics[m.REQUESTS].total(status="422", version="1") == 1
    assert replica.hub.summary("iris")["series"][-1]["errors_per_s"] > 0


def test_every_route_is_counted_once_by_its_template(replica: Replica, client: TestClient) -> None:
    assert client.get("/v2/models/iris/ready").status_code == 200
    assert client.get("/v2/models/wine/ready").status_code == 404
    assert client.get("/nope").status_code == 404  # no route: nothing to count
    assert replica.hub_requests() == [
        {"route": "/v2/models/{name}/ready", "status": "200", "count": 1},
        {"route": "/v2/models/{name}/ready", "status": "404", "count": 1},
    ]
    assert replica.server.status()["traffic"]["versions"] == {}  # no model answered


def _asgi_stream(app: Any, lines: list[bytes], pause_s: float) -> bytes:
    """POSTs NDJSON lines one chunk each, `pause_s` apart, straight to the ASGI app."""
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        queue = list(lines)

        async def receive() -> dict[str, Any]:
            if not queue:
                return {"type": "http.disconnect"}
            await asyncio.sleep(pause_s)
            return {"type": "http.request", "body": queue.pop(0), "more_body": bool(queue)}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/predict/stream", "raw_path": b"/predict/stream", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/x-ndjson")], "client": ("127.0.0.1", 1), "server": ("t", 80),
                 "state": {}}
        await app(scope, receive, send)

    asyncio.run(run())
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_a_stream_is_one_request_timed_to_the_end_of_its_body(replica: Replica) -> None:
    lines = [orjson.dumps(row) + b"\n" for row in IRIS_ROWS] + [b"[1, 2]\n"]
    body = _asgi_stream(replica.app, lines, pause_s=0.05)
    answers = [orjson.loads(line) for line in body.splitlines()]
    assert [("prediction" in a) for a in answers] == [True, True, True, False]

    traffic = replica.traffic()
    assert (traffic["requests"], traffic["rows"], traffic["errors"]) == (1, 3, 0)
    # Four chunks 50 ms apart: the request lasted until its body ended, not its headers.
    assert traffic["mean_latency_ms"] >= 4 * 50
    assert replica.hub_requests() == [{"route": "/predict/stream", "status": "200", "count": 1}]
    assert replica.metrics[m.ROWS_PREDICTED].total() == 3


def test_a_handle_call_is_one_request(replica: Replica) -> None:
    labels = asyncio.run(replica.server.predict(np.array(IRIS_ROWS)))
    assert len(labels) == 3
    traffic = replica.traffic()
    assert (traffic["requests"], traffic["rows"], traffic["errors"]) == (1, 3, 0)
    assert replica.hub_requests() == [{"route": "handle:predict", "status": "200", "count": 1}]


def test_a_handle_infer_names_its_version_and_is_one_request(replica: Replica) -> None:
    result = asyncio.run(replica.server.infer(IRIS_ROWS, ["predict", "predict_proba"]))
    assert (result.model, result.version, sorted(result.outputs)) == ("iris", "1", ["predict", "predict_proba"])
    assert result.outputs["predict_proba"].shape == (3, 3)
    traffic = replica.traffic()
    assert (traffic["requests"], traffic["rows"], traffic["errors"]) == (1, 3, 0)
    assert replica.hub_requests() == [{"route": "handle:infer", "status": "200", "count": 1}]


def test_the_ledger_counts_what_it_is_given() -> None:
    ledger = RequestLedger()
    answered = RequestRecord("/predict", "iris", "2", status=200, rows=5, latency_s=0.004)
    failed = RequestRecord("/predict", "iris", "2", status=500, latency_s=0.002)
    unrouted = RequestRecord("/predict", status=404, latency_s=0.001)  # no version was chosen
    for record in (answered, failed, unrouted):
        ledger.record(record)
    assert ledger.traffic() == {
        "versions": {"2": {"requests": 2, "rows": 5, "errors": 1, "mean_latency_ms": pytest.approx(3.0)}},
        "shadow": {},
    }
