"""serve_app's own `/predict` API: `{"features": [..]}` (one row) or `{"features": [[..], ..]}`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve_app.protocol.json import FEATURES_EXAMPLE, loads, numeric_array, require_key, require_object


@dataclass(frozen=True)
class PredictRequest:
    rows: np.ndarray
    single: bool  # `{"features": [..]}` answers `{"prediction": x}`; a list of rows answers a list


def decode_request(body: bytes) -> PredictRequest:
    payload = require_object(loads(body), FEATURES_EXAMPLE)
    features = require_key(payload, "features", FEATURES_EXAMPLE + ' or {"features": [[...], [...]]}')
    array = numeric_array(features, "features", body)
    if array.ndim == 1:
        return PredictRequest(array.reshape(1, -1), single=True)
    return PredictRequest(array, single=False)
