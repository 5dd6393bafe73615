"""The versions a replica keeps loaded (serve_app/serving/versions.py): up to four, the routed ones
never evicted, and /admin/status saying which.

The replica here is the real ModelServer class (monitoring off, so no Ray is needed)
behind the real HTTP routes; only Ray Serve's ASGI wrapper is left out.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import pytest
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    # Starlette >= 1.10 prefers the httpx2 package for its TestClient; httpx still works.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

from serve_app.serving.deployment import ModelServer
from serve_app.serving.http.app import build_http_app
from serve_app.serving.versions import MAX_LOADED_VERSIONS
from serve_app.model.store import ModelStore
from serve_app.model.training import save_fitted

from .conftest import fit_dummy

ROW = [0.0, 1.0, 2.0, 3.0]
CANARY_AND_SHADOW_1_2_3 = {"version": "1", "canary": {"version": "2", "weight": 0.5}, "shadow": {"version": "3", "fraction": 0.5}}
CANARY_AND_SHADOW_4_5_6 = {"version": "4", "canary": {"version": "5", "weight": 0.5}, "shadow": {"version": "6", "fraction": 0.5}}


def replica_class() -> Any:
    """ModelServer as written, without the wrapper @serve.ingress puts around it (whose
    __init__ needs a running Ray Serve replica)."""
    return next(c for c in ModelServer.func_or_class.__mro__ if "reconfigure" in vars(c))


class Replica:
    """A ModelServer, its HTTP app, and the versions it read from disk, in order."""

    def __init__(self, store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.server = replica_class()({"store": str(store.root), "model": "dummy", "monitoring": {"enabled": False}})
        self.disk_reads: list[str] = []
        read = self.server.versions.store.load_verified

        def counted(name: str, ref: str | int = "production", *rest: Any) -> Any:
            self.disk_reads.append(str(ref))
            return read(name, ref, *rest)

        monkeypatch.setattr(self.server.versions.store, "load_verified", counted)
        self.client = TestClient(build_http_app(self.server), raise_server_exceptions=False)

    def ask(self, version: str | None = None) -> str:
        """Predicts one row with `x-model-version: version` (or none); the version that answered."""
        headers = {} if version is None else {"x-model-version": version}
        reply = self.client.post("/predict", json={"features": ROW}, headers=headers)
        assert reply.status_code == 200, reply.text
        answered: str = reply.json()["version"]
        return answered

    def status(self) -> dict[str, Any]:
        reply = self.client.get("/admin/status")
        assert reply.status_code == 200, reply.text
        status: dict[str, Any] = reply.json()
        return status

    def loaded(self) -> set[str]:
        return set(self.status()["loaded_versions"])


@pytest.fixture
def six_versions(store: ModelStore) -> ModelStore:
    for _ in range(6):
        save_fitted(store, fit_dummy(), name="dummy")
    assert store.versions("dummy") == ["1", "2", "3", "4", "5", "6"]
    return store


@pytest.fixture
def replica(six_versions: ModelStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[Replica]:
    replica = Replica(six_versions, monkeypatch)
    with replica.client:
        yield replica


def test_four_versions_stay_loaded_and_the_default_is_never_evicted(replica: Replica) -> None:
    assert MAX_LOADED_VERSIONS == 4  # what the README promises
    replica.server.reconfigure({"version": "1"})
    assert replica.loaded() == {"1"} and replica.disk_reads == ["1"]
    for version in ("2", "3", "4"):
        assert replica.ask(version) == version
    assert replica.loaded() == {"1", "2", "3", "4"}
    # A fifth: the least recently loaded version goes, but never the default (v1, loaded first).
    assert replica.ask("5") == "5"
    assert replica.loaded() == {"1", "3", "4", "5"}
    assert replica.ask("6") == "6"
    assert replica.loaded() == {"1", "4", "5", "6"}
    assert replica.disk_reads == ["1", "2", "3", "4", "5", "6"]
    # The cached ones answer without reading the disk again; an evicted one is read again.
    for version in ("4", "5", "6", None, "1"):
        replica.ask(version)
    assert replica.disk_reads == ["1", "2", "3", "4", "5", "6"]
    assert replica.ask("2") == "2" and replica.disk_reads[-1] == "2"
    status = replica.status()
    assert "1" in status["loaded_versions"] and len(status["loaded_versions"]) == 4
    assert (status["version"], status["routing"]) == ("1", {"default": "1", "canary": None, "shadow": None})
    assert replica.ask() == "1"


def test_canary_and_shadow_versions_are_never_evicted_either(replica: Replica) -> None:
    replica.server.reconfigure(CANARY_AND_SHADOW_1_2_3)
    assert replica.loaded() == {"1", "2", "3"}
    # Only one slot is left for versions asked by number: each new one takes it.
    for version in ("4", "5", "6"):
        assert replica.ask(version) == version
        assert replica.loaded() == {"1", "2", "3", version}
    assert replica.status()["routing"] == {
        "default": "1",
        "canary": {"version": "2", "weight": 0.5, "sticky_header": None},
        "shadow": {"version": "3", "fraction": 0.5},
    }


def test_after_a_routing_switch_the_new_routed_versions_are_the_cached_ones(replica: Replica) -> None:
    replica.server.reconfigure(CANARY_AND_SHADOW_1_2_3)
    replica.server.reconfigure(CANARY_AND_SHADOW_4_5_6)
    status = replica.status()
    assert status["routing"]["default"] == "4" and status["routing"]["canary"]["version"] == "5"
    assert status["routing"]["shadow"]["version"] == "6"
    reads = list(replica.disk_reads)
    assert {"4", "5", "6"} <= set(status["loaded_versions"]), status["loaded_versions"]
    # Asking for a routed version by number reads nothing from disk.
    for version in ("4", "5", "6"):
        assert replica.ask(version) == version
    assert replica.disk_reads == reads


def test_a_version_in_use_is_not_the_next_evicted(replica: Replica) -> None:
    replica.server.reconfigure({"version": "1"})
    for version in ("2", "3", "4"):
        replica.ask(version)
    replica.ask("2")  # 2 was loaded before 3 and 4 but used after them
    assert replica.ask("5") == "5"
    assert replica.loaded() == {"1", "2", "4", "5"}
