"""Which model versions a replica holds, and which one answers by default.

Versions are loaded on demand, verified, and kept in a small LRU so one replica can
answer several versions side by side. Swapping the default loads and checks the new
version first: if it cannot load, the old one keeps serving and the error says why.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from serve_app.errors import NotFound
from serve_app.predictor import Predictor
from serve_app.settings import AppSettings
from serve_app.store import ModelStore

logger = logging.getLogger("serve_app")
MAX_LOADED_VERSIONS = 4


class ModelService:
    def __init__(self, settings: AppSettings, *, max_loaded: int = MAX_LOADED_VERSIONS) -> None:
        self.settings = settings
        self.store = ModelStore(settings.store)
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, Predictor] = OrderedDict()
        self._lock = threading.Lock()
        self._default: Predictor | None = None
        self.default_ref: str | None = None

    @property
    def name(self) -> str:
        return self.settings.model

    @property
    def default(self) -> Predictor:
        if self._default is None:
            raise NotFound(f"model {self.name!r} is not loaded yet")
        return self._default

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
                if self._default is not None and evicted == self._default.version:
                    # Never evict the default; put it back at the recent end.
                    self._loaded[evicted] = self._default
        logger.info("loaded %s v%s from %s", self.name, version, self.store.root)
        return predictor

    def set_default(self, ref: str) -> Predictor:
        """Loads and checks `ref`, then makes it the version that answers by default."""
        version = self.store.resolve(self.name, ref)
        predictor = self._load(version)
        self._default = predictor
        self.default_ref = ref
        return predictor

    def predictor(self, ref: str | None = None, model: str | None = None) -> Predictor:
        """The predictor for a request: the default, or a named version or alias."""
        if model is not None and model != self.name:
            raise NotFound(f"unknown model {model!r}; this server serves {self.name!r}")
        if ref is None or ref == "" or ref == self.default_ref:
            return self.default
        if ref.isdigit():
            loaded = self._loaded.get(str(int(ref)))  # no disk access for a loaded version
            if loaded is not None:
                return loaded
        return self._load(self.store.resolve(self.name, ref))

    def loaded_versions(self) -> list[str]:
        with self._lock:
            return list(self._loaded)
