"""serve_app: production serving of scikit-learn models on Ray Serve."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serve_app.errors import ServeAppError
from serve_app.model.store import ModelStore

if TYPE_CHECKING:
    from serve_app.model.predictor import Predictor
    from serve_app.model.publish import publish

__all__ = ["ModelStore", "Predictor", "ServeAppError", "publish"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Predictor and publish import scikit-learn (~2 s here); commands that never predict
    # (`serve-app --help`, `models list`, the load generator) should not pay for it.
    if name == "Predictor":
        from serve_app.model.predictor import Predictor

        return Predictor
    if name == "publish":
        from serve_app.model.publish import publish

        return publish
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
