"""KServe's V1 protocol: `{"instances": [[..], ..]}` (or `"inputs"`) in."""

from __future__ import annotations

import numpy as np

from serve_app.errors import InvalidInput
from serve_app.protocol.json import loads, numeric_array, require_object

_EXAMPLE = '{"instances": [[5.1, 3.5, 1.4, 0.2]]}'


def decode_request(body: bytes) -> np.ndarray:
    payload = require_object(loads(body), _EXAMPLE)
    key = "instances" if "instances" in payload else "inputs"
    if key not in payload:
        raise InvalidInput(f"missing key 'instances' (or 'inputs'); expected {_EXAMPLE}")
    return numeric_array(payload[key], key, body)
