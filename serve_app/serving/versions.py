"""Which versions of one model a replica holds, and which of them answer by default.

One map holds the loaded versions (`_loaded`, least recently used first); the routing
(default, canary, shadow) names versions in it, and those are never evicted. Nothing on
a request's path reads the disk:

- version numbers and aliases resolve against a `Catalog` of the store read when the
  routing changes (`configure`, which Ray Serve runs in a worker thread) and refreshed by
  the health check every few seconds (also off the event loop);
- a request for a version not loaded yet awaits a load that runs in a loader thread, one
  per version however many requests wait for it, while the event loop serves the rest.

Swapping the routing loads and checks every version it names first: if one cannot load,
the old routing keeps serving and the error says why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, replace

from serve_app.errors import NotFound
from serve_app.model.predictor import Predictor
from serve_app.model.store import Catalog, ModelStore, is_version
from serve_app.settings import AppSettings, RuntimeSettings

logger = logging.getLogger("serve_app")
MAX_LOADED_VERSIONS = 4
CATALOG_REFRESH_S = 5.0  # how stale an alias moved by `serve-app models promote` can be here


@dataclass(frozen=True)
class Routing:
    """Which loaded versions answer requests that name no version."""

    default: Predictor
    canary: Predictor | None = None
    canary_weight: float = 0.0
    sticky_header: str | None = None
    shadow: Predictor | None = None
    shadow_fraction: float = 0.0

    def versions(self) -> list[str]:
        return [p.version for p in (self.default, self.canary, self.shadow) if p is not None]

    def describe(self) -> dict[str, object]:
        return {
            "default": self.default.version,
            "canary": {"version": self.canary.version, "weight": self.canary_weight, "sticky_header": self.sticky_header}
            if self.canary
            else None,
            "shadow": {"version": self.shadow.version, "fraction": self.shadow_fraction} if self.shadow else None,
        }


class ModelVersions:
    def __init__(self, settings: AppSettings, *, max_loaded: int = MAX_LOADED_VERSIONS) -> None:
        self.settings = settings
        self.store = ModelStore(settings.store, trusted_keys=settings.trusted_keys)
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, Predictor] = OrderedDict()
        self._loading: dict[str, concurrent.futures.Future[Predictor]] = {}
        self._pinned: frozenset[str] = frozenset()  # versions a routing being built has loaded
        self._lock = threading.Lock()
        self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="serve_app-load")
        self.routing: Routing | None = None
        self.default_ref: str | None = None
        self.catalog = Catalog(settings.model, (), {})
        self._catalog_read_at = 0.0

    @property
    def name(self) -> str:
        return self.settings.model

    @property
    def default(self) -> Predictor:
        if self.routing is None:
            raise NotFound(f"model {self.name!r} is not loaded yet")
        return self.routing.default

    # ---- off the event loop: configure, refresh, load --------------------------------

    def refresh_catalog(self) -> Catalog:
        """Reads the store's versions and aliases (disk: call it off the event loop)."""
        self.catalog = self.store.catalog(self.name)
        self._catalog_read_at = time.monotonic()
        return self.catalog

    def refresh_catalog_if_stale(self) -> None:
        if time.monotonic() - self._catalog_read_at >= CATALOG_REFRESH_S:
            self.refresh_catalog()

    def _load(self, version: str) -> Predictor:
        with self._lock:
            predictor = self._loaded.get(version)
            if predictor is not None:
                self._loaded.move_to_end(version)
                return predictor
        predictor = Predictor.load(
            self.store,
            self.name,
            version,
            max_rows=self.settings.max_rows,
            expected_features=self.settings.expected_features,
            runtime=self.settings.runtime,
            threads=self.settings.onnx_threads,
        )
        predictor.check_health()
        with self._lock:
            self._loaded[version] = predictor
            self._evict()
        logger.info("loaded %s v%s from %s", self.name, version, self.store.root)
        return predictor

    def _evict(self) -> None:
        """Drops the least recently used versions past `max_loaded`, never a routed one."""
        protected = set(self._pinned)
        if self.routing is not None:
            protected.update(self.routing.versions())
        for version in list(self._loaded):
            if len(self._loaded) <= self.max_loaded:
                break
            if version not in protected:
                del self._loaded[version]

    def configure(self, runtime: RuntimeSettings) -> Routing:
        """Loads and checks every version `runtime` names, then switches to them at once.

        If any of them cannot be loaded this raises and the current routing stays as it was.
        Reads the disk: Ray Serve calls `reconfigure` in a worker thread, not on the loop.
        """
        catalog = self.refresh_catalog()
        wanted = [runtime.version]
        if runtime.canary is not None and runtime.canary.weight > 0:
            wanted.append(runtime.canary.version)
        if runtime.shadow is not None:
            wanted.append(runtime.shadow.version)
        versions = [catalog.resolve(ref) for ref in wanted]
        try:
            self._pinned = frozenset(versions)
            predictors = [self._load(version) for version in versions]
        finally:
            self._pinned = frozenset()
        default = predictors[0]
        routing = Routing(default)
        rest = iter(predictors[1:])
        if runtime.canary is not None and runtime.canary.weight > 0:
            canary = next(rest)
            if canary is not default:
                routing = replace(routing, canary=canary, canary_weight=runtime.canary.weight, sticky_header=runtime.canary.sticky_header)
        if runtime.shadow is not None:
            shadow = next(rest)
            if shadow is not default:
                routing = replace(routing, shadow=shadow, shadow_fraction=runtime.shadow.fraction)
        with self._lock:
            self.routing = routing  # one assignment: requests see the old routing or the new one
            self.default_ref = runtime.version
            self._evict()  # the old routing's versions may go now, least recently used first
        return routing

    def set_default(self, ref: str) -> Predictor:
        """Serves `ref` alone (no canary, no shadow)."""
        return self.configure(RuntimeSettings(version=ref)).default

    # ---- on the event loop: memory only ------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise NotFound(f"unknown model {model[:64]!r}; this server serves {self.name!r}")

    def choose(self, route_key: str | None = None) -> Predictor:
        """The version that answers a request that named none: the default or the canary."""
        routing = self.routing
        if routing is None:
            raise NotFound(f"model {self.name!r} is not loaded yet")
        if routing.canary is None:
            return routing.default
        if route_key is None:
            draw = random.random()
        else:  # the same key always lands on the same side of the split
            draw = zlib.crc32(route_key.encode()) / 2**32
        return routing.canary if draw < routing.canary_weight else routing.default

    def _cached(self, version: str) -> Predictor | None:
        with self._lock:
            predictor = self._loaded.get(version)
            if predictor is not None:
                self._loaded.move_to_end(version)  # answering is using: not the next evicted
            return predictor

    async def resolve(self, ref: str | None = None, model: str | None = None, route_key: str | None = None) -> Predictor:
        """The predictor for a request: default/canary routing, or a named version or alias.

        A version not loaded yet is loaded in the loader thread; this awaits it without
        holding up the event loop.
        """
        self.check_model(model)
        if ref is None or ref == "":
            return self.choose(route_key)
        if ref == self.default_ref:
            return self.default
        version = self.catalog.resolve(ref)
        cached = self._cached(version)
        if cached is not None:
            return cached
        return await asyncio.wrap_future(self._load_in_background(version))

    def _load_in_background(self, version: str) -> concurrent.futures.Future[Predictor]:
        with self._lock:
            pending = self._loading.get(version)
            if pending is None:
                pending = self._loader.submit(self._load, version)
                self._loading[version] = pending
                pending.add_done_callback(lambda _: self._loading.pop(version, None))
            return pending

    def loaded_predictor(self, ref: str | None = None, model: str | None = None) -> Predictor:
        """A version this replica already holds (routed or loaded), never read from disk.

        For readiness probes, which need no API key: an unknown or unloaded version is a
        404 that names only what was asked, not the versions or aliases in the store.
        """
        self.check_model(model)
        routing = self.routing
        if routing is None:
            raise NotFound(f"model {self.name!r} is not loaded yet")
        if ref is None or ref == "":
            return routing.default
        if is_version(ref):
            with self._lock:
                loaded = self._loaded.get(str(int(ref)))
            if loaded is not None:
                return loaded
        raise NotFound(f"version {ref[:64]!r} of {self.name!r} is not loaded on this replica")

    def loaded_versions(self) -> list[str]:
        with self._lock:
            return list(self._loaded)
