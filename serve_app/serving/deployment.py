"""The Ray Serve deployment: one replica holds the models, batches requests and serves HTTP.

HTTP is served by the replica itself (see `serving/http/`), so a request costs one hop from
the ingress (HAProxy or Ray's proxy) and no handle call. Python code in the cluster calls the
same batched path through a deployment handle:

    handle = serve.get_app_handle("serve_app")
    handle.predict.remote([[5.1, 3.5, 1.4, 0.2]]).result()   # -> array([0])

Every request, over HTTP or a handle, is one `RequestRecord` counted once by `self.ledger`
(serving/ledger.py), which also feeds the monitor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

import numpy as np
from ray import serve

from serve_app.errors import ServeAppError
from serve_app.serving.batching import BATCHERS
from serve_app.monitoring import replica_monitor
from serve_app.model.predictor import PREDICT, PREDICT_PROBA, Predictor
from serve_app.protocol.columns import ColumnTable, concat
from serve_app.serving.versions import ModelVersions
from serve_app.settings import AppSettings, RuntimeSettings, runtime_settings, user_config_fingerprint
from serve_app.serving.ledger import RequestLedger, RequestRecord

logger = logging.getLogger("ray.serve")
MAX_SHADOW_BACKLOG = 64  # shadow calls waiting for the shadow thread; more are skipped and counted


@dataclass(frozen=True)
class InferenceResult:
    model: str
    version: str
    outputs: dict[str, np.ndarray]


Rows = np.ndarray | ColumnTable  # validated: a float64 matrix, or a typed model's columns


@dataclass(frozen=True)
class _BatchItem:
    predictor: Predictor
    rows: Rows
    outputs: tuple[str, ...]


def _item_rows(item: _BatchItem) -> int:
    return len(item.rows)


def _rows_in(items: Sequence[_BatchItem]) -> int:
    return sum(len(item.rows) for item in items)


def _joined(items: Sequence[_BatchItem]) -> Rows:
    if len(items) == 1:
        return items[0].rows
    if isinstance(items[0].rows, ColumnTable):  # typed requests batch like numeric ones
        return concat([item.rows for item in items])  # type: ignore[misc]
    return np.concatenate([item.rows for item in items])


def _run_timed(predictor: Predictor, items: Sequence[_BatchItem]) -> tuple[list[dict[str, np.ndarray]], float]:
    """The model's answers for `items` in one call, and how long the call took."""
    started = time.perf_counter()
    rows = _joined(items)
    wanted = {name for item in items for name in item.outputs}
    # One evaluation when both outputs are wanted (Predictor.predict_with_proba).
    computed = predictor.run(rows, [name for name in (PREDICT, PREDICT_PROBA) if name in wanted])
    results = []
    start = 0
    for item in items:
        stop = start + len(item.rows)
        results.append({name: computed[name][start:stop] for name in item.outputs})
        start = stop
    return results, time.perf_counter() - started


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
        self.last_reconfigure_error: str | None = None
        self.user_config: str | None = None  # user_config_fingerprint of the last user_config handled
        self.monitor = replica_monitor(self.settings)  # None when args.monitoring.enabled is false
        self.ledger = RequestLedger(self.monitor)  # each request and model call, counted once
        self._shadow_runner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="serve_app-shadow")
        self._shadow_backlog = 0
        # MicroBatcher by default, not @serve.batch (see serve_app/serving/batching.py);
        # `user_config.batcher: serve` selects it.
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
        finally:
            self.user_config = user_config_fingerprint(user_config)
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
        first = items[0].predictor
        if all(item.predictor is first for item in items):
            return self._run_recorded(first, items)
        results: list[dict[str, np.ndarray]] = [{} for _ in items]
        by_predictor: dict[int, list[int]] = {}
        for index, item in enumerate(items):
            by_predictor.setdefault(id(item.predictor), []).append(index)
        for indices in by_predictor.values():
            group = [items[i] for i in indices]
            for index, result in zip(indices, self._run_recorded(group[0].predictor, group)):
                results[index] = result
        return results

    def _run_recorded(self, predictor: Predictor, items: Sequence[_BatchItem]) -> list[dict[str, np.ndarray]]:
        results, seconds = _run_timed(predictor, items)
        self.ledger.model_call(predictor, len(items), _rows_in(items), seconds)
        return results

    async def infer_with(
        self, predictor: Predictor, rows: Any, outputs: Sequence[str], request: RequestRecord
    ) -> InferenceResult:
        """The data plane every route and handle method goes through: validates `rows` and
        predicts them with `predictor` (already resolved by `versions.resolve`), in a batch
        with other concurrent requests; `request` is the record of the request it answers."""
        request.model, request.version = predictor.name, predictor.version
        outputs = tuple(outputs)
        predictor.check_outputs(outputs)
        array = predictor.validate(rows)
        item = _BatchItem(predictor, array, outputs)
        if len(array) > self.runtime.max_batch_size:
            # Already a full batch on its own. Off the event loop: there it would keep
            # every other request waiting uncounted (Ray Serve counts a direct-ingress
            # request as ongoing only once the loop gets to it), so the autoscaler never
            # saw the load and never scaled up.
            results, seconds = await asyncio.to_thread(_run_timed, predictor, [item])
            self.ledger.model_call(predictor, 1, len(array), seconds)
            result = results[0]
        else:
            result = await self._batcher.submit(item)
        self.ledger.predicted(request, predictor, array, result)
        routing = self.versions.routing
        if routing is not None and routing.shadow is not None and predictor is routing.default and PREDICT in result:
            if random.random() < routing.shadow_fraction:
                self._shadow(routing.shadow, array, result[PREDICT])
        return InferenceResult(predictor.name, predictor.version, result)

    def _shadow(self, shadow: Predictor, rows: Rows, served: np.ndarray) -> None:
        """Predicts `rows` with the shadow in its own thread: it never delays or changes an answer,
        nor holds up the event loop; past MAX_SHADOW_BACKLOG waiting calls a sample is skipped."""
        if self._shadow_backlog >= MAX_SHADOW_BACKLOG:
            self.ledger.shadow_skipped(shadow.version)
            return
        self._shadow_backlog += 1
        loop = asyncio.get_running_loop()

        def run() -> None:
            try:
                shadowed: np.ndarray | None = shadow.predict(rows)
            except Exception:
                logger.exception("shadow v%s failed", shadow.version)
                shadowed = None
            loop.call_soon_threadsafe(self._shadow_done, shadow.version, served, shadowed)

        self._shadow_runner.submit(run)

    def _shadow_done(self, version: str, served: np.ndarray, shadowed: np.ndarray | None) -> None:
        self._shadow_backlog -= 1
        self.ledger.compared(version, served, shadowed)

    @contextlib.contextmanager
    def _recording(self, route: str) -> Iterator[RequestRecord]:
        """One request of a handle method, recorded once in the ledger whatever its outcome."""
        record = RequestRecord(route)
        status = 500
        try:
            yield record
            status = 200
        except ServeAppError as exc:
            status = exc.status_code
            raise
        finally:
            record.finish(status)
            self.ledger.record(record)

    async def infer(self, rows: Any, outputs: Sequence[str] = (PREDICT,), version: str | None = None) -> InferenceResult:
        """For `handle.infer.remote(rows, ["predict", "predict_proba"], "2")`: the outputs named,
        and which model and version produced them."""
        with self._recording("handle:infer") as record:
            return await self.infer_with(await self.versions.resolve(version), rows, outputs, record)

    async def _predict(self, route: str, rows: Any, version: str | None, output: str) -> np.ndarray:
        with self._recording(route) as record:
            result = await self.infer_with(await self.versions.resolve(version), rows, (output,), record)
            return result.outputs[output]

    async def predict(self, rows: Any, version: str | None = None) -> np.ndarray:
        return await self._predict("handle:predict", rows, version, PREDICT)

    async def predict_proba(self, rows: Any, version: str | None = None) -> np.ndarray:
        return await self._predict("handle:predict_proba", rows, version, PREDICT_PROBA)

    async def predict_stream(
        self, rows: Any, chunk_rows: int = 1024, version: str | None = None
    ) -> AsyncIterator[np.ndarray]:
        """Predictions for many rows, chunk by chunk as they are computed, for
        `handle.options(stream=True).predict_stream.remote(rows)`: one request, one
        version. For an input that is itself a stream, see `serve_app.client.predict_iter`."""
        with self._recording("handle:predict_stream") as record:
            predictor = await self.versions.resolve(version)
            if predictor.typed:  # a DataFrame or records: sliced as given, each chunk checked
                total = len(rows)
                chunk = (lambda a, b: rows.iloc[a:b]) if hasattr(rows, "iloc") else (lambda a, b: rows[a:b])
            else:
                array = np.asarray(rows)
                total, chunk = len(array), (lambda a, b: array[a:b])
            for start in range(0, total, chunk_rows):
                yield (await self.infer_with(predictor, chunk(start, start + chunk_rows), (PREDICT,), record)).outputs[PREDICT]

    def status(self) -> dict[str, Any]:
        """What this replica serves right now (for operators and tests)."""
        return {
            "pid": os.getpid(),
            "model": self.versions.name,
            "version": self.versions.default.version,
            # Which runtime answers the default version, and why (compiled model or scikit-learn).
            "runtime": self.versions.default.runtime,
            "runtime_reason": self.versions.default.runtime_reason,
            "column_encoder": self.versions.default.encoder_reason or None,
            "routing": self.versions.routing.describe() if self.versions.routing else None,
            "traffic": self.ledger.traffic(),
            "requested_version": self.runtime.version,
            "loaded_versions": self.versions.loaded_versions(),
            "max_batch_size": self.runtime.max_batch_size,
            "batch_wait_timeout_s": self.runtime.batch_wait_timeout_s,
            "batcher": self.runtime.batcher,
            "batches": self.ledger.batches(),
            "last_reconfigure_error": self.last_reconfigure_error,
            # Which user_config the error (or its absence) is about: rollouts wait for theirs.
            "user_config": self.user_config,
            "monitor": self.monitor.stats() if self.monitor is not None else None,
        }

    def __del__(self) -> None:
        # Ray Serve calls this on graceful shutdown, after in-flight requests are done:
        # write the rest of the prediction log and send the hub the last update.
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.close()

    def __serve_build_asgi_app__(self) -> Any:
        from serve_app.serving.http.app import build_http_app

        return build_http_app(self)
