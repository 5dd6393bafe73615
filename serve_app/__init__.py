"""serve_app: production serving of scikit-learn models on Ray Serve."""

from serve_app.errors import ServeAppError
from serve_app.predictor import Predictor
from serve_app.store import ModelStore

__all__ = ["ModelStore", "Predictor", "ServeAppError"]
__version__ = "0.1.0"
