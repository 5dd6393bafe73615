"""Predictions for a stream of rows over a deployment handle, lazily and in order."""

from __future__ import annotations

import collections
from typing import Any, Deque, Iterable, Iterator


def predict_iter(
    handle: Any, rows: Iterable[Any], *, chunk_rows: int = 256, in_flight: int = 4, version: str | None = None
) -> Iterator[Any]:
    """Predictions for `rows` (any iterable of feature rows, even endless), in order.

    Rows are sent in chunks of `chunk_rows` through `handle.predict` with at most
    `in_flight` calls outstanding, so memory stays bounded however long `rows` is.
    """
    pending: Deque[Any] = collections.deque()
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == chunk_rows:
            pending.append(handle.predict.remote(chunk, version))
            chunk = []
            if len(pending) >= in_flight:
                yield from pending.popleft().result().tolist()
    if chunk:
        pending.append(handle.predict.remote(chunk, version))
    while pending:
        yield from pending.popleft().result().tolist()
