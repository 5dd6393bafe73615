"""Nothing on a request's path reads the disk, loads a model or runs the shadow on the event loop
(serve_app/serving/versions.py, serving/deployment.py).

The replica is the real ModelServer class (monitoring off, no Ray) behind the real HTTP
routes, driven through httpx's ASGI transport so that many requests share one event loop,
as they do in a replica. A load of version 2 is held in the loader thread on a
`threading.Event`; the other requests must all be answered while it is held. If a load ran
on the loop, none of them could be, and the test fails when the watchdog lets the load go.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

import httpx
import pytest

from serve_app.model.predictor import Predictor
from serve_app.model.store import ModelStore
from serve_app.model.training import save_fitted
from serve_app.serving.deployment import ModelServer
from serve_app.serving.http.app import build_http_app

from .conftest import fit_dummy

ROW = [0.0, 1.0, 2.0, 3.0]
SLOW_VERSION = "2"
WATCHDOG_S = 60.0  # only ever reached when the event loop is blocked: the test then fails


def replica_class() -> Any:
    return next(c for c in ModelServer.func_or_class.__mro__ if "reconfigure" in vars(c))


class HeldLoad:
    """Makes `Predictor.load` of SLOW_VERSION wait until released; records every disk read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: ModelStore) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.loads: list[str] = []
        self.disk_reads: list[tuple[str, str]] = []  # (store method, thread that called it)
        real_load = Predictor.load.__func__  # type: ignore[attr-defined]

        def load(cls: type[Predictor], store_: Any, name: str, ref: Any = "production", **kwargs: Any) -> Predictor:
            self.loads.append(str(ref))
            if str(ref) == SLOW_VERSION:
                self.started.set()
                self.release.wait(WATCHDOG_S)
            result: Predictor = real_load(cls, store_, name, ref, **kwargs)
            return result

        monkeypatch.setattr(Predictor, "load", classmethod(load))
        for method in ("versions", "aliases", "names", "catalog", "resolve", "manifest", "load_verified"):
            monkeypatch.setattr(store, method, self._recording(method, getattr(store, method)))

    def forget(self) -> None:
        self.loads.clear()
        self.disk_reads.clear()

    def on_thread(self, name: str) -> list[str]:
        return [method for method, thread in self.disk_reads if thread == name]

    def _recording(self, method: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.disk_reads.append((method, threading.current_thread().name))
            return real(*args, **kwargs)

        return recorded


@pytest.fixture
def replica(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, HeldLoad]:
    for _ in range(3):
        save_fitted(store, fit_dummy(), name="dummy")
    store.promote("dummy", 3, alias="staging")
    server = replica_class()({"store": str(store.root), "model": "dummy", "monitoring": {"enabled": False}})
    held = HeldLoad(monkeypatch, server.versions.store)
    server.reconfigure({"version": "1"})
    return server, held


async def ask(client: httpx.AsyncClient, version: str | None = None) -> httpx.Response:
    headers = {} if version is None else {"x-model-version": version}
    return await client.post("/predict", json={"features": ROW}, headers=headers)


def test_a_slow_load_holds_up_only_the_requests_that_wait_for_it(replica: tuple[Any, HeldLoad]) -> None:
    server, held = replica

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=build_http_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            assert (await ask(client, "3")).json()["version"] == "3"  # loaded before the slow one
            held.forget()
            watchdog = threading.Timer(WATCHDOG_S, held.release.set)
            watchdog.start()
            try:
                waiting = [asyncio.ensure_future(ask(client, SLOW_VERSION)) for _ in range(3)]
                assert await asyncio.to_thread(held.started.wait, WATCHDOG_S), "the load of v2 never started"
                others = await asyncio.gather(
                    *[ask(client) for _ in range(10)],
                    *[ask(client, "staging") for _ in range(5)],  # an alias: resolved in memory
                    *[ask(client, "production") for _ in range(5)],
                    *[ask(client, "3") for _ in range(5)],
                    ask(client, "no-such-alias"),
                    ask(client, "99"),
                )
                # Every one answered while v2 was still loading.
                assert not held.release.is_set(), "the other requests only finished once the load was let go"
                assert not any(task.done() for task in waiting)
                answered = [reply.json().get("version") for reply in others[:-2]]
                assert answered == ["1"] * 10 + ["3"] * 5 + ["1"] * 5 + ["3"] * 5
                assert [reply.status_code for reply in others[-2:]] == [404, 404]
                assert "staging" in others[-2].json()["error"] and "versions: 1, 2, 3" in others[-1].json()["error"]
            finally:
                held.release.set()
                watchdog.cancel()
            replies = await asyncio.gather(*waiting)
            assert [(r.status_code, r.json()["version"]) for r in replies] == [(200, SLOW_VERSION)] * 3

    asyncio.run(scenario())
    assert held.loads == [SLOW_VERSION]  # three requests waited on one load
    # The only disk access while serving was that load, in the loader thread.
    assert held.on_thread(threading.current_thread().name) == [], held.disk_reads
    assert {thread for _, thread in held.disk_reads} == {"serve_app-load_0"}
    assert "load_verified" in held.on_thread("serve_app-load_0")


def test_aliases_are_read_when_the_routing_changes_not_per_request(replica: tuple[Any, HeldLoad]) -> None:
    server, held = replica
    store = server.versions.store
    store.promote("dummy", 1, alias="staging")  # moved on disk, behind the replica's back
    held.forget()

    async def staging_version() -> str:
        transport = httpx.ASGITransport(app=build_http_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            reply = await ask(client, "staging")
            assert reply.status_code == 200, reply.text
            version: str = reply.json()["version"]
            return version

    assert asyncio.run(staging_version()) == "3"  # the catalog read at the last routing change
    assert held.loads == ["3"] and held.on_thread(threading.current_thread().name) == [], held.disk_reads
    server.reconfigure({"version": "1"})  # a routing change reads the store again
    assert asyncio.run(staging_version()) == "1"


def test_the_shadow_predicts_off_the_event_loop(replica: tuple[Any, HeldLoad]) -> None:
    server, _ = replica
    server.reconfigure({"version": "1", "shadow": {"version": "3", "fraction": 1.0}})
    shadow = server.versions.routing.shadow
    started, release = threading.Event(), threading.Event()
    threads: list[str] = []
    real_predict = shadow.predict

    def held_predict(rows: Any) -> Any:
        threads.append(threading.current_thread().name)
        started.set()
        release.wait(WATCHDOG_S)
        return real_predict(rows)

    shadow.predict = held_predict

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=build_http_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            watchdog = threading.Timer(WATCHDOG_S, release.set)
            watchdog.start()
            try:
                first = await ask(client)
                assert first.json()["version"] == "1"
                assert await asyncio.to_thread(started.wait, WATCHDOG_S), "the shadow never ran"
                replies = await asyncio.gather(*[ask(client) for _ in range(10)])  # while the shadow is held
                assert not release.is_set(), "requests were only answered once the shadow was let go"
                assert [r.json()["version"] for r in replies] == ["1"] * 10
            finally:
                release.set()
                watchdog.cancel()
            for _ in range(200):  # the comparisons come back to the loop as the shadow catches up
                compared = server.status()["traffic"]["shadow"].get("3", {})
                if compared.get("requests", 0) + compared.get("skipped", 0) == 11:
                    break
                await asyncio.sleep(0.05)
            assert compared["requests"] == 11 and compared["agreement"] == 1.0, compared

    asyncio.run(scenario())
    assert threads and set(threads) == {"serve_app-shadow_0"}
