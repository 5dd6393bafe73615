"""Newline-delimited JSON rows, as `/predict/stream` reads them: framing and one row per line.

A line is `{"features": [5.1, 3.5, 1.4, 0.2]}` or `[5.1, 3.5, 1.4, 0.2]`. Lines are decoded
one by one so that a bad line is answered with its own error while the others are predicted.
"""

from __future__ import annotations

import numpy as np
import orjson

from serve_app.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from serve_app.protocol.json import numeric_array

NDJSON = "application/x-ndjson"
_ACCEPTED_TYPES = (NDJSON, "application/jsonl", "application/json", "text/plain", "application/x-www-form-urlencoded")


def check_content_type(content_type: str | None) -> None:
    if not content_type:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in _ACCEPTED_TYPES and not media_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"unsupported Content-Type {media_type!r}; send NDJSON rows with 'Content-Type: {NDJSON}'"
        )


def decode_line(line: bytes, n_features: int) -> np.ndarray:
    """One NDJSON line as a [1, n_features] float row, or InvalidInput saying why not.

    The row is finite: the JSON parser refuses NaN, Infinity and numbers beyond float64.
    """
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"not valid JSON ({exc})") from None
    if isinstance(value, dict):
        if "features" not in value:
            raise InvalidInput('expected {"features": [...]} or a JSON list of numbers')
        value = value["features"]
    row = numeric_array(value, "features", line)
    if row.ndim != 1 or row.size != n_features:
        raise InvalidInput(f"expected one row of {n_features} numbers, got shape {list(row.shape)}")
    return row.astype(np.float64).reshape(1, -1)


def split_lines(buffer: bytearray, chunk: bytes, limit: int) -> list[bytes]:
    """Appends `chunk` to `buffer` and removes and returns every complete line in it.

    `buffer` never holds more than one partial line of at most `limit` bytes.
    """
    buffer += chunk
    end = buffer.rfind(b"\n")
    if end < 0:
        if len(buffer) > limit:
            raise PayloadTooLarge(f"a line is over {limit} bytes; send one row per line")
        return []
    lines = bytes(buffer[:end]).split(b"\n")
    del buffer[: end + 1]
    if len(buffer) > limit:
        raise PayloadTooLarge(f"a line is over {limit} bytes; send one row per line")
    return lines
