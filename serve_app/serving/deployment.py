"""The Ray Serve deployment: one replica holds the models, batches requests and serves HTTP.

HTTP is served by the replica itself (see `http.py`), so a request costs one hop from the
ingress (HAProxy or Ray's proxy) and no handle call. Python code in the cluster calls the
same batched path through a deployment handle:

    handle = serve.get_app_handle("serve_app")
    handle.predict.remote([[5.1, 3.5, 1.4, 0.2]]).result()   # -> array([0])
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Sequence

import numpy as np
from ray import serve

from serve_app.errors import ServeAppError
from serve_app.serving.batching import BATCHERS
from serve_app.monitoring import replica_monitor
from serve_app.model.predictor import PREDICT, PREDICT_PROBA, Predictor
from serve_app.serving.versions import ModelVersions
from serve_app.settings import AppSettings, RuntimeSettings, runtime_settings
from serve_app.serving.ledger import TrafficLedger

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class InferenceResult:
    model: str
    version: str
    outputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class _BatchItem:
    predictor: Predictor
    rows: np.ndarray
    outputs: tuple[str, ...]


def _item_rows(item: _BatchItem) -> int:
    return len(item.rows)


def _rows_in(items: Sequence[_BatchItem]) -> int:
    return sum(len(item.rows) for item in items)


def _run_group(predictor: Predictor, items: Sequence[_BatchItem]) -> list[dict[str, np.ndarray]]:
    rows = items[0].rows if len(items) == 1 else np.concatenate([item.rows for item in items])
    wanted = {name for item in items for name in item.outputs}
    computed = {name: getattr(predictor, name)(rows) for name in (PREDICT, PREDICT_PROBA) if name in wanted}
    results = []
    start = 0
    for item in items:
        stop = start + len(item.rows)
        results.append({name: computed[name][start:stop] for name in item.outputs})
        start = stop
    return results


@serve.deployment(
    max_ongoing_requests=512,
    max_queued_requests=2048,
    health_check_period_s=5,
    health_check_timeout_s=10,
    graceful_shutdown_wait_loop_s=1,
    graceful_shutdown_timeout_s=20,
)
@serve.ingress()
class ModelServer:
    """Serves one model name; the version is chosen by `user_config.version`."""

    def __init__(self, settings: Mapping[str, Any] | AppSettings) -> None:
        self.settings = AppSettings.model_validate(settings)
        self.versions = ModelVersions(self.settings)
        self.runtime = RuntimeSettings()
        self.traffic = TrafficLedger()
        self.last_reconfigure_error: str | None = None
        self.batches = {"batches": 0, "requests": 0}  # how well requests are grouped (status)
        self.monitor = replica_monitor(self.settings)  # None when args.monitoring.enabled is false
        # MicroBatcher by default, not @serve.batch: that cost 300-900 µs a request here
        # (see serve_app/serving/batching.py); `user_config.batcher: serve` selects it.
        self._batcher: Any = self._new_batcher(self.runtime)

    def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        runtime = runtime_settings(user_config)  # ConfigError naming the bad key, not pydantic's traceback
        try:
            self.versions.configure(runtime)
        except ServeAppError as exc:
            if self.versions.routing is None:
                raise  # nothing to fall back to: the replica must not start
            # A bad version pushed to a running replica: keep serving what it serves now.
            self.last_reconfigure_error = f"user_config {runtime.model_dump(exclude_defaults=True)} refused: {exc.message}"
            logger.error("%s; still serving %s", self.last_reconfigure_error, self.versions.routing.describe())
            runtime = runtime.model_copy(update={"version": self.runtime.version, "canary": self.runtime.canary, "shadow": self.runtime.shadow})
        else:
            self.last_reconfigure_error = None
        if runtime.batcher != self.runtime.batcher:
            self._batcher = self._new_batcher(runtime)  # a batch already queued in the old one still runs
        else:
            self._batcher.configure(max_rows=runtime.max_batch_size, wait_s=runtime.batch_wait_timeout_s)
        self.runtime = runtime

    def _new_batcher(self, runtime: RuntimeSettings) -> Any:
        return BATCHERS[runtime.batcher](
            self._predict_batch, _item_rows, max_rows=runtime.max_batch_size, wait_s=runtime.batch_wait_timeout_s
        )

    def check_health(self) -> None:
        # Ray Serve runs a sync check_health in a worker thread: the disk read is off the loop.
        self.versions.refresh_catalog_if_stale()
        self.versions.default.check_health()

    def _predict_batch(self, items: Sequence[_BatchItem]) -> list[dict[str, np.ndarray]]:
        self.batches["batches"] += 1
        self.batches["requests"] += len(items)
        first = items[0].predictor
        if all(item.predictor is first for item in items):
            return self._run_timed(first, items)
        results: list[dict[str, np.ndarray]] = [{} for _ in items]
        by_predictor: dict[int, list[int]] = {}
        for index, item in enumerate(items):
            by_predictor.setdefault(id(item.predictor), []).append(index)
        for indices in by_predictor.values():
            group = [items[i] for i in indices]
            for index, result in zip(indices, self._run_timed(group[0].predictor, group)):
                results[index] = result
        return results

    def _run_timed(self, predictor: Predictor, items: Sequence[_BatchItem]) -> list[dict[str, np.ndarray]]:
        if self.monitor is None:
            return _run_group(predictor, items)
        started = time.perf_counter()
        results = _run_group(predictor, items)
        self.monitor.observe_batch(predictor, _rows_in(items), time.perf_counter() - started)
        return results

    async def infer(self, predictor: Predictor, rows: Any, outputs: Sequence[str] = (PREDICT,)) -> InferenceResult:
        """Validates `rows` and predicts them with `predictor` (from `versions.resolve`), in a
        batch with other concurrent requests."""
        started = time.perf_counter()
        try:
            outputs = tuple(outputs)
            predictor.check_outputs(outputs)
            array = predictor.validate(rows)
            item = _BatchItem(predictor, array, outputs)
            if len(array) > self.runtime.max_batch_size:
                # Already a full batch on its own. Off the event loop: there it would keep
                # every other request waiting uncounted (Ray Serve counts a direct-ingress
                # request as ongoing only once the loop gets to it), so the autoscaler saw
                # ~0 ongoing requests under heavy load and never scaled up.
                result = (await asyncio.to_thread(self._run_timed, predictor, [item]))[0]
            else:
                result = await self._batcher.submit(item)
        except ServeAppError:
            self.traffic.failed(predictor.version)
            raise
        self.traffic.answered(predictor.version, len(array), time.perf_counter() - started)
        if self.monitor is not None:
            self.monitor.observe(predictor, array, result, time.perf_counter() - started)
        routing = self.versions.routing
        if routing is not None and routing.shadow is not None and predictor is routing.default and PREDICT in result:
            if random.random() < routing.shadow_fraction:
                # After the answer is on its way: the shadow never delays or changes it.
                asyncio.get_running_loop().call_soon(self._compare_shadow, routing.shadow, array, result[PREDICT])
        return InferenceResult(predictor.name, predictor.version, result)

    def _compare_shadow(self, shadow: Predictor, rows: np.ndarray, served: np.ndarray) -> None:
        try:
            shadowed = shadow.predict(rows)
        except Exception:
            logger.exception("shadow v%s failed", shadow.version)
            shadowed = None
        self.traffic.compared(shadow.version, served, shadowed)

    async def predict(self, rows: Any, version: str | None = None) -> np.ndarray:
        return (await self.infer(await self.versions.resolve(version), rows, (PREDICT,))).outputs[PREDICT]

    async def predict_proba(self, rows: Any, version: str | None = None) -> np.ndarray:
        return (await self.infer(await self.versions.resolve(version), rows, (PREDICT_PROBA,))).outputs[PREDICT_PROBA]

    async def predict_stream(
        self, rows: Any, chunk_rows: int = 1024, version: str | None = None
    ) -> AsyncIterator[np.ndarray]:
        """Predictions for many rows, chunk by chunk as they are computed, for
        `handle.options(stream=True).predict_stream.remote(rows)`; for an input that is
        itself a stream, see `serve_app.serving.http.streaming.predict_iter`."""
        array = np.asarray(rows)
        for start in range(0, len(array), chunk_rows):
            yield await self.predict(array[start : start + chunk_rows], version)

    def status(self) -> dict[str, Any]:
        """What this replica serves right now (for operators and tests)."""
        return {
            "pid": os.getpid(),
            "model": self.versions.name,
            "version": self.versions.default.version,
            "routing": self.versions.routing.describe() if self.versions.routing else None,
            "traffic": self.traffic.as_dict(),
            "requested_version": self.runtime.version,
            "loaded_versions": self.versions.loaded_versions(),
            "max_batch_size": self.runtime.max_batch_size,
            "batch_wait_timeout_s": self.runtime.batch_wait_timeout_s,
            "batcher": self.runtime.batcher,
            "batches": dict(self.batches),
            "last_reconfigure_error": self.last_reconfigure_error,
            "monitor": self.monitor.stats() if self.monitor is not None else None,
        }

    def __del__(self) -> None:
        # Ray Serve calls this on graceful shutdown, after in-flight requests are done:
        # write the rest of the prediction log and send the hub the last report.
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.close()

    def __serve_build_asgi_app__(self) -> Any:
        from serve_app.serving.http.app import build_http_app

        return build_http_app(self)
