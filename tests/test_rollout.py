"""Model version control under steady load: canary, promote, rollback, shadow, a refused v3.

Every step goes through the CLI an operator would use, against the session's real Ray
cluster, while a client thread keeps sending requests; no request may fail, and every
answer must come from a version that was live at the time.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import Counter
from typing import Any, Iterator

import httpx
import pytest

from serve_app.ops import rollout
from serve_app.ops.cli import main
from serve_app.model.store import ModelStore
from serve_app.model.training import train

from .conftest import IRIS_ROWS, ServeCluster, app_config, wait_for

pytestmark = pytest.mark.ray
APP = "rollout"


class SteadyLoad:
    """A client sending requests in a loop, recording (time, status, version) of each."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.records: list[tuple[float, int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                # Stamped when sent: a request sent before a switch may rightly be answered
                # by the old version after the switch completes.
                sent = time.monotonic()
                try:
                    reply = client.post(self.url, json={"features": IRIS_ROWS[1]}, headers=self.headers)
                    version = reply.json().get("version") if reply.status_code == 200 else None
                    self.records.append((sent, reply.status_code, version))
                except httpx.HTTPError as exc:
                    self.records.append((sent, 0, repr(exc)))

    def __enter__(self) -> "SteadyLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def since(self, start: float) -> list[tuple[float, int, str | None]]:
        return [r for r in self.records if r[0] >= start]


@pytest.fixture(scope="module")
def rollout_app(ray_session: ServeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    store = ModelStore(tmp_path_factory.mktemp("rollout") / "models")
    train(store)  # v1 LogisticRegression, production
    train(store, estimator="random_forest")  # v2
    broken = train(store, seed=3)  # v3, then tampered with: it must fail verification
    path = store.model_path(broken)
    os.chmod(path, 0o644)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    ray_session.apply(app_config(store, name=APP, route_prefix=f"/{APP}", num_replicas=2))
    base = f"{ray_session.base_url}/{APP}"
    wait_for(lambda: httpx.post(f"{base}/predict", json={"features": IRIS_ROWS[0]}).status_code == 200, what="rollout app")
    try:
        yield {"store": store, "base": base, "dashboard": ray_session.dashboard}
    finally:
        ray_session.remove(APP)
        shutil.rmtree(store.root, ignore_errors=True)


def cli(app: dict[str, Any], *args: str) -> int:
    return main(["models", *args, "--store", str(app["store"].root), "--address", app["dashboard"], "--app", APP])


def versions_answering(load: SteadyLoad, start: float, at_least: int = 60) -> Counter[str | None]:
    wait_for(lambda: len(load.since(start)) >= at_least, what=f"{at_least} answers")
    return Counter(version for _, _, version in load.since(start))


def test_canary_promote_rollback_under_load(rollout_app: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    store: ModelStore = rollout_app["store"]
    with SteadyLoad(f"{rollout_app['base']}/predict") as load:
        time.sleep(1)
        assert set(versions_answering(load, 0)) == {"1"}

        assert cli(rollout_app, "canary", "iris", "2", "--weight", "0.1") == 0
        ten = versions_answering(load, time.monotonic(), at_least=400)
        assert set(ten) == {"1", "2"}
        assert 0.03 < ten["2"] / sum(ten.values()) < 0.2, ten
        capsys.readouterr()
        assert cli(rollout_app, "list") == 0
        listing = {tuple(line.split()[:4]) for line in capsys.readouterr().out.splitlines()}
        assert ("iris", "1", "production", "90%") in listing and ("iris", "2", "10%", "RandomForestClassifier") in listing, listing

        assert cli(rollout_app, "canary", "iris", "2", "--weight", "0.5") == 0
        half = versions_answering(load, time.monotonic(), at_least=400)
        assert 0.4 < half["2"] / sum(half.values()) < 0.6, half

        assert cli(rollout_app, "promote", "iris", "2") == 0
        assert store.aliases("iris")["production"] == "2"
        assert set(versions_answering(load, time.monotonic())) == {"2"}

        assert cli(rollout_app, "rollback", "iris") == 0
        assert store.aliases("iris")["production"] == "1"
        assert set(versions_answering(load, time.monotonic())) == {"1"}

    statuses = [code for _, code, _ in load.records]
    assert statuses and all(code == 200 for code in statuses), Counter(statuses)
    assert {v for _, _, v in load.records} <= {"1", "2"}
    history = [(e["action"], e.get("version")) for e in store.history("iris")]
    assert ("canary", "2") in history and ("promote", "2") in history and history[-1] == ("promote", "1")


def test_sticky_canary_pins_each_caller(rollout_app: dict[str, Any]) -> None:
    assert cli(rollout_app, "canary", "iris", "2", "--weight", "0.5", "--sticky-header", "x-user-id") == 0
    try:
        seen: dict[str, set[str]] = {}
        with httpx.Client() as client:
            for user in range(20):
                for _ in range(5):
                    reply = client.post(f"{rollout_app['base']}/predict", json={"features": IRIS_ROWS[0]}, headers={"x-user-id": f"user-{user}"})
                    seen.setdefault(f"user-{user}", set()).add(reply.json()["version"])
        assert all(len(v) == 1 for v in seen.values()), seen
        assert {next(iter(v)) for v in seen.values()} == {"1", "2"}  # both sides get callers
    finally:
        assert cli(rollout_app, "canary", "iris", "2", "--weight", "0") == 0


def test_shadow_compares_but_never_answers(rollout_app: dict[str, Any]) -> None:
    assert cli(rollout_app, "shadow", "iris", "2", "--fraction", "1.0") == 0
    try:
        with httpx.Client() as client:
            versions = {client.post(f"{rollout_app['base']}/predict", json={"features": IRIS_ROWS}).json()["version"] for _ in range(40)}
            assert versions == {"1"}

            def compared() -> list[dict[str, Any]]:
                statuses = [client.get(f"{rollout_app['base']}/admin/status").json() for _ in range(10)]
                return [s["traffic"]["shadow"]["2"] for s in statuses if "2" in s["traffic"]["shadow"]]

            shadow = wait_for(compared, what="shadow comparisons")
        assert all(s["rows"] > 0 and 0.0 <= s["agreement"] <= 1.0 for s in shadow)
        # v1 and v2 agree on these well-separated iris rows.
        assert any(s["agreement"] == 1.0 for s in shadow)
    finally:
        assert cli(rollout_app, "shadow", "iris", "--off") == 0


def test_broken_v3_is_refused_while_current_keeps_serving(rollout_app: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    with SteadyLoad(f"{rollout_app['base']}/predict") as load:
        # The CLI verifies the version before touching anything.
        assert cli(rollout_app, "promote", "iris", "3") == 2
        assert "sha256" in capsys.readouterr().err
        assert rollout_app["store"].aliases("iris")["production"] == "1"
        # Pushed straight to the replicas, they refuse it too and keep serving v1.
        with pytest.raises(rollout.RolloutRefused, match="sha256"):
            rollout.serve_version("3", rollout.Target(address=rollout_app["dashboard"], app=APP))
        after = time.monotonic()
        assert set(versions_answering(load, after)) == {"1"}  # v1 never stopped serving
    assert all(code == 200 for _, code, _ in load.records)
    # Put the app back on a clean user_config for other tests.
    rollout.serve_version("1", rollout.Target(address=rollout_app["dashboard"], app=APP))
