"""Where a replica counts what it serves: each request once, each model call once.

A request is a `RequestRecord`: the route wrapper (serving/http/endpoint.py) or a handle
method (deployment.py) opens it, `infer` notes the model and version that answer it and
the rows predicted, and the wrapper finishes it with its status and latency and hands it
to `RequestLedger.record`, once. From that one record the ledger derives

- the per-version counts of `/admin/status` ("traffic", what rollouts judge a canary by),
  updated in place on the event loop (a few dict operations, no lock, no I/O);
- everything the monitor derives (Prometheus metrics, the hub's traffic), by passing the
  same record object to the monitor's bounded queue (monitoring/monitor.py), whose thread
  does the metric calls.

Two other facts are recorded beside requests, each once: a `Prediction` (the rows and
outputs of one model answer, for drift, the prediction log and live accuracy; only when
monitoring is on) and a `ModelCall` (one call of the model on a batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Union

import numpy as np

from serve_app.model.predictor import Predictor


@dataclass(slots=True)
class RequestRecord:
    """One request, filled in as it is served; `finish` sets its outcome."""

    route: str  # the route template ("/v2/models/{name}/infer") or "handle:<method>"
    model: str = ""  # the model and version that answered; "" until `infer` chose one
    version: str = ""
    status: int = 0
    rows: int = 0  # rows predicted for it
    latency_s: float = 0.0
    request_id: str = ""  # Ray Serve's request id, taken when a prediction is recorded
    started: float = field(default_factory=time.perf_counter)

    def finish(self, status: int) -> None:
        self.status = status
        self.latency_s = time.perf_counter() - self.started


@dataclass(frozen=True, slots=True)
class Prediction:
    """The inputs and outputs of one model answer for `request` (monitoring only)."""

    request: RequestRecord
    predictor: Predictor
    inputs: np.ndarray
    outputs: Mapping[str, np.ndarray]
    at: float  # time.perf_counter() when answered: latency = at - request.started
    ts: float  # wall clock, for the prediction log


@dataclass(frozen=True, slots=True)
class ModelCall:
    """One call of a model on a batch of `requests` requests holding `rows` rows."""

    model: str
    version: str
    requests: int
    rows: int
    seconds: float


Record = Union[RequestRecord, Prediction, ModelCall]


class Sink(Protocol):
    """Where records go after the ledger counted them (the replica's monitor)."""

    def put(self, record: Record) -> None: ...


@dataclass(slots=True)
class VersionTraffic:
    requests: int = 0
    rows: int = 0
    errors: int = 0
    latency_s_total: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        mean_ms = 1000 * self.latency_s_total / self.requests if self.requests else None
        return {"requests": self.requests, "rows": self.rows, "errors": self.errors, "mean_latency_ms": mean_ms}


@dataclass(slots=True)
class ShadowComparison:
    requests: int = 0
    rows: int = 0
    agreeing_rows: int = 0
    failures: int = 0
    skipped: int = 0  # sampled while the shadow was still busy with earlier rows

    def as_dict(self) -> dict[str, Any]:
        rate = self.agreeing_rows / self.rows if self.rows else None
        return {"requests": self.requests, "rows": self.rows, "agreeing_rows": self.agreeing_rows, "agreement": rate,
                "failures": self.failures, "skipped": self.skipped}


class RequestLedger:
    """The replica's one record of requests, model calls and shadow comparisons."""

    def __init__(self, sink: Sink | None = None, clock: Any = time.time) -> None:
        self.sink = sink  # None when monitoring is off
        self.clock = clock
        self.by_version: dict[str, VersionTraffic] = {}
        self.shadow: dict[str, ShadowComparison] = {}
        self.model_calls = 0
        self.batched_requests = 0

    # ---- the request path: called on the event loop ------------------------------------

    def record(self, request: RequestRecord) -> None:
        """Counts a finished request: the one place a request's facts are recorded."""
        if request.version:  # a request that reached a model version
            entry = self.by_version.get(request.version)
            if entry is None:
                entry = self.by_version[request.version] = VersionTraffic()
            entry.requests += 1
            entry.rows += request.rows
            entry.latency_s_total += request.latency_s
            if request.status >= 400:
                entry.errors += 1
        if self.sink is not None:
            self.sink.put(request)

    def predicted(self, request: RequestRecord, predictor: Predictor, inputs: np.ndarray, outputs: Mapping[str, np.ndarray]) -> None:
        """`predictor` answered `inputs` for `request` (it may do so several times: a stream)."""
        request.rows += len(inputs)
        if self.sink is not None:
            if not request.request_id:
                request.request_id = current_request_id()
            self.sink.put(Prediction(request, predictor, inputs, outputs, time.perf_counter(), self.clock()))

    def model_call(self, predictor: Predictor, requests: int, rows: int, seconds: float) -> None:
        self.model_calls += 1
        self.batched_requests += requests
        if self.sink is not None:
            self.sink.put(ModelCall(predictor.name, predictor.version, requests, rows, seconds))

    def _shadow_entry(self, shadow_version: str) -> ShadowComparison:
        entry = self.shadow.get(shadow_version)
        if entry is None:
            entry = self.shadow[shadow_version] = ShadowComparison()
        return entry

    def shadow_skipped(self, shadow_version: str) -> None:
        self._shadow_entry(shadow_version).skipped += 1

    def compared(self, shadow_version: str, served: np.ndarray, shadowed: np.ndarray | None) -> None:
        entry = self._shadow_entry(shadow_version)
        entry.requests += 1
        if shadowed is None:
            entry.failures += 1
            return
        entry.rows += len(served)
        entry.agreeing_rows += int(np.count_nonzero(served == shadowed))

    # ---- for /admin/status ---------------------------------------------------------------

    def traffic(self) -> dict[str, Any]:
        return {
            "versions": {v: t.as_dict() for v, t in self.by_version.items()},
            "shadow": {v: s.as_dict() for v, s in self.shadow.items()},
        }

    def batches(self) -> dict[str, int]:
        """How well requests are grouped: model calls, and the requests they answered."""
        return {"batches": self.model_calls, "requests": self.batched_requests}


def current_request_id() -> str:
    """Ray Serve's id of the request being served (the x-request-id header, or one it made)."""
    try:
        from ray.serve.context import _get_serve_request_context  # private; no public accessor in 2.60

        return _get_serve_request_context().request_id
    except Exception:  # pragma: no cover - outside Ray Serve
        return ""
