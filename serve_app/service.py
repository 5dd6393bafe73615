"""Which model versions a replica holds, and which one answers by default.

Versions are loaded on demand, verified, and kept in a small LRU so one replica can
answer several versions side by side. Swapping the default loads and checks the new
version first: if it cannot load, the old one keeps serving and the error says why.
"""

from __future__ import annotations

import logging
import random
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, replace

from serve_app.errors import NotFound
from serve_app.predictor import Predictor
from serve_app.settings import AppSettings, RuntimeSettings
from serve_app.store import ModelStore, is_version

logger = logging.getLogger("serve_app")
MAX_LOADED_VERSIONS = 4


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

    def by_version(self, version: str) -> Predictor:
        return next(p for p in (self.default, self.canary, self.shadow) if p is not None and p.version == version)

    def describe(self) -> dict[str, object]:
        return {
            "default": self.default.version,
            "canary": {"version": self.canary.version, "weight": self.canary_weight, "sticky_header": self.sticky_header}
            if self.canary
            else None,
            "shadow": {"version": self.shadow.version, "fraction": self.shadow_fraction} if self.shadow else None,
        }


class ModelService:
    def __init__(self, settings: AppSettings, *, max_loaded: int = MAX_LOADED_VERSIONS) -> None:
        self.settings = settings
        self.store = ModelStore(settings.store, trusted_keys=getattr(settings, "trusted_keys", None))
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, Predictor] = OrderedDict()
        self._lock = threading.Lock()
        self.routing: Routing | None = None
        self.default_ref: str | None = None

    @property
    def name(self) -> str:
        return self.settings.model

    @property
    def default(self) -> Predictor:
        if self.routing is None:
            raise NotFound(f"model {self.name!r} is not loaded yet")
        return self.routing.default

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
        )
        predictor.check_health()
        with self._lock:
            self._loaded[version] = predictor
            while len(self._loaded) > self.max_loaded:
                evicted, _ = self._loaded.popitem(last=False)
                if self.routing is not None and evicted in self.routing.versions():
                    # Never evict a version that takes traffic; put it back at the recent end.
                    self._loaded[evicted] = self.routing.by_version(evicted)
        logger.info("loaded %s v%s from %s", self.name, version, self.store.root)
        return predictor

    def configure(self, runtime: RuntimeSettings) -> Routing:
        """Loads and checks every version `runtime` names, then switches to them at once.

        If any of them cannot be loaded this raises and the current routing stays as it was.
        """
        default = self._load(self.store.resolve(self.name, runtime.version))
        routing = Routing(default)
        if runtime.canary is not None and runtime.canary.weight > 0:
            canary = self._load(self.store.resolve(self.name, runtime.canary.version))
            if canary is not default:
                routing = replace(routing, canary=canary, canary_weight=runtime.canary.weight, sticky_header=runtime.canary.sticky_header)
        if runtime.shadow is not None:
            shadow = self._load(self.store.resolve(self.name, runtime.shadow.version))
            if shadow is not default:
                routing = replace(routing, shadow=shadow, shadow_fraction=runtime.shadow.fraction)
        self.routing = routing  # one assignment: requests see the old routing or the new one
        self.default_ref = runtime.version
        return routing

    def set_default(self, ref: str) -> Predictor:
        """Serves `ref` alone (no canary, no shadow)."""
        return self.configure(RuntimeSettings(version=ref)).default

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

    def predictor(self, ref: str | None = None, model: str | None = None, route_key: str | None = None) -> Predictor:
        """The predictor for a request: default/canary routing, or a named version or alias."""
        if model is not None and model != self.name:
            raise NotFound(f"unknown model {model!r}; this server serves {self.name!r}")
        if ref is None or ref == "":
            return self.choose(route_key)
        if ref == self.default_ref:
            return self.default
        if is_version(ref):
            loaded = self._loaded.get(str(int(ref)))  # no disk access for a loaded version
            if loaded is not None:
                return loaded
        return self._load(self.store.resolve(self.name, ref))

    def loaded_predictor(self, ref: str | None = None, model: str | None = None) -> Predictor:
        """A version this replica already holds (routed or loaded), never read from disk.

        For readiness probes, which need no API key: an unknown or unloaded version is a
        404 that names only what was asked, not the versions or aliases in the store.
        """
        if model is not None and model != self.name:
            raise NotFound(f"unknown model {model[:64]!r}; this server serves {self.name!r}")
        routing = self.routing
        if routing is None:
            raise NotFound(f"model {self.name!r} is not loaded yet")
        if ref is None or ref == "":
            return routing.default
        if is_version(ref):
            version = str(int(ref))
            with self._lock:
                loaded = self._loaded.get(version)
            if loaded is not None:
                return loaded
            if version in routing.versions():
                return routing.by_version(version)
        raise NotFound(f"version {ref[:64]!r} of {self.name!r} is not loaded on this replica")

    def loaded_versions(self) -> list[str]:
        with self._lock:
            return list(self._loaded)
