"""JSON request bodies shared by every JSON wire format: parsing, content types, numbers.

`numeric_array` is where a JSON value becomes numbers: every decoder built on it hands on
an int or float array, never booleans, strings or nulls, and never a NaN or an infinity
(the parser refuses `NaN`, `Infinity` and numbers beyond float64, so JSON numbers are finite).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import orjson

from serve_app.errors import BadRequest, InvalidInput, UnsupportedMediaType

# Shown when a body is empty, whichever route it was sent to: the simplest request there is.
FEATURES_EXAMPLE = '{"features": [5.1, 3.5, 1.4, 0.2]}'

# curl -d sends form-urlencoded and many clients send text/plain; the body is still JSON.
_JSON_CONTENT_TYPES = ("application/json", "application/x-www-form-urlencoded", "text/plain")


def _to_builtin(value: Any) -> Any:
    # orjson serialises numeric numpy arrays itself; string or object arrays (class labels
    # such as "setosa") and numpy scalars come here.
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(payload: Any) -> bytes:
    """Strict JSON: NaN and infinities become null, numpy values serialise natively."""
    return orjson.dumps(payload, default=_to_builtin, option=orjson.OPT_SERIALIZE_NUMPY)


def check_json_content_type(content_type: str | None) -> None:
    if not content_type:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type in _JSON_CONTENT_TYPES or media_type.endswith("+json") or media_type == "*/*":
        return
    raise UnsupportedMediaType(
        f"unsupported Content-Type {media_type!r}; send JSON with 'Content-Type: application/json'"
    )


def loads(body: bytes) -> Any:
    if not body:
        raise BadRequest(f"request body is empty; expected JSON such as {FEATURES_EXAMPLE}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"request body is not valid JSON ({exc}); NaN and Infinity are not JSON numbers"
        ) from None


def loads_allowing_nan(body: bytes) -> Any:
    """`loads`, but a body that is JSON apart from the NaN/Infinity tokens is read too (as
    floats): tritonclient's JSON mode writes a float NaN that way, and for a typed model's
    nullable number column NaN is how a missing value travels. The column checks then take
    NaN as null and refuse infinities, naming the column."""
    try:
        return loads(body)
    except BadRequest as strict:
        if b"NaN" not in body and b"Infinity" not in body:
            raise  # not what the second reader is for: no second parse of a broken body
        import json

        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # nesting orjson refused too deep
            raise strict from None


def require_object(payload: Any, expected: str) -> Mapping[str, Any]:
    if not isinstance(payload, dict):
        raise InvalidInput(f"expected a JSON object such as {expected}, got {type(payload).__name__}")
    return payload


def require_key(payload: Mapping[str, Any], key: str, expected: str) -> Any:
    try:
        return payload[key]
    except KeyError:
        raise InvalidInput(f"missing key {key!r}; expected {expected}") from None


def numeric_array(value: Any, where: str, body: bytes = b"") -> np.ndarray:
    """A JSON (nested) list of numbers as an int or float array; anything else is a 422.

    `body` lets the check for booleans run only when the raw JSON contains one, because
    numpy silently turns `true` into 1 and that scan costs more than the decode itself.
    """
    if not isinstance(value, list):
        raise InvalidInput(f"{where} must be a list of numbers, got {_json_type(value)}")
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):
        depth = _depth(value)
        if depth > 2:
            raise InvalidInput(
                f"{where} is nested {depth} levels deep; expected a row of numbers or a list of rows"
            ) from None
        raise InvalidInput(
            f"{where}: rows have different lengths; every row needs the same number of features"
        ) from None
    may_hold_non_numbers = array.dtype.kind not in "iuf" or b"true" in body or b"false" in body
    if may_hold_non_numbers:
        problem = _first_non_number(value, where)
        if problem:
            raise InvalidInput(f"{problem}; expected numbers only")
        if array.dtype.kind not in "iuf":  # numbers only, but ints beyond int64 mixed with negatives
            array = np.asarray(value, dtype=np.float64)
    return array


def has_float(value: Any) -> bool:
    """Whether a (nested) JSON list holds a float anywhere."""
    return isinstance(value, float) or (isinstance(value, list) and any(has_float(v) for v in value))


def _first_non_number(value: Any, path: str) -> str | None:
    """Where the first element that is not a JSON number sits, for error messages."""
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_non_number(item, f"{path}[{index}]")
            if found:
                return found
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = "null" if value is None else orjson.dumps(value).decode()[:40]
        return f"{path} is {shown} ({'null' if value is None else type(value).__name__})"
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return f"{path} is {value}, out of range for a 64-bit number"
    return None


def _depth(value: Any) -> int:
    """How deeply lists nest in `value` (iteratively: the JSON parser allows 1024 levels)."""
    depth, level = 0, [value]
    while True:
        lists = [v for v in level if isinstance(v, list)]
        if not lists:
            return depth
        depth += 1
        level = [item for v in lists for item in v]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)
