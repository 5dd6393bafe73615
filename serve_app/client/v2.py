"""The client side of the Open Inference Protocol V2, for the benchmark, load generator and tests.

`encode_request` builds what `serve_app.protocol.oip_v2.decode_request` reads (JSON or
Triton's binary form); `decode_response` reads what `encode_response` writes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import orjson

from serve_app.protocol.json import dumps
from serve_app.protocol.oip_v2 import BINARY_CONTENT_TYPE, BINARY_HEADER, DATATYPES, datatype_of, little_endian, split_body


def encode_request(
    rows: np.ndarray,
    *,
    binary: bool,
    outputs: Sequence[str] = (),
    binary_outputs: bool = False,
    input_name: str = "input-0",
) -> tuple[bytes, dict[str, str]]:
    """An infer request body for `rows` and its headers."""
    tensor: dict[str, Any] = {"name": input_name, "shape": list(rows.shape), "datatype": datatype_of(rows)}
    payload: dict[str, Any] = {"inputs": [tensor]}
    if outputs:
        payload["outputs"] = [{"name": o, "parameters": {"binary_data": binary_outputs}} for o in outputs]
    if not binary:
        tensor["data"] = rows.ravel()
        return dumps(payload), {"content-type": "application/json"}
    data = little_endian(rows)
    tensor["parameters"] = {"binary_data_size": data.nbytes}
    header = dumps(payload)
    return b"".join([header, data.data]), {"content-type": BINARY_CONTENT_TYPE, BINARY_HEADER: str(len(header))}


def decode_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """Output tensors of a V2 response (JSON or binary) by name; binary ones are views of `body`."""
    json_part, offset = split_body(body, header_length)
    payload = orjson.loads(json_part)
    tensors: dict[str, np.ndarray] = {}
    for out in payload["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            dtype = DATATYPES[out["datatype"]]
            count = size // dtype.itemsize
            tensors[out["name"]] = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(out["shape"])
            offset += size
        else:
            # null (a NaN on the server) becomes NaN again in a float datatype.
            numeric = DATATYPES.get(out["datatype"])  # None for BYTES: numpy picks str
            tensors[out["name"]] = np.asarray(out["data"], dtype=numeric).reshape(out["shape"])
    return tensors
