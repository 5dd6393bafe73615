"""Streaming predictions: NDJSON rows in, NDJSON predictions out, as they are computed.

Over HTTP, `POST /predict/stream` takes a (chunked) body of one row per line, either
`{"features": [5.1, 3.5, 1.4, 0.2]}` or `[5.1, 3.5, 1.4, 0.2]`, and answers one line per
input line, in order: `{"prediction": 0}`, or `{"error": "...", "line": 7}` for a line that
cannot be predicted (the stream goes on). Whatever complete lines have arrived are predicted
at once (one batched call), without waiting for more, so each answer leaves before the
client has sent the rest; memory holds one chunk and one partial line (at most
`max_body_bytes`), so the input may be unbounded.

From Python in the cluster, `predict_iter(handle, rows)` does the same over a deployment
handle for any iterable of rows, lazily, with a bounded number of calls in flight.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, AsyncIterator, Deque, Iterable, Iterator

import numpy as np
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serve_app.protocol import codec
from serve_app.errors import InvalidInput, PayloadTooLarge, ServeAppError, UnsupportedMediaType
from serve_app.model.predictor import PREDICT

NDJSON = "application/x-ndjson"
_ACCEPTED_TYPES = (NDJSON, "application/jsonl", "application/json", "text/plain", "application/x-www-form-urlencoded")


class DuplexStreamingResponse(StreamingResponse):
    """A StreamingResponse that answers while the request body is still arriving.

    Starlette's own one (ASGI < 2.4) reads `receive()` in a second task to notice a client
    going away, which would steal the body chunks the generator is reading. Here the
    generator reads the body itself and sees the disconnect there (ClientDisconnect).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.stream_response(send)
        except (ClientDisconnect, OSError):
            pass


def check_content_type(content_type: str | None) -> None:
    if not content_type:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in _ACCEPTED_TYPES and not media_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"unsupported Content-Type {media_type!r}; send NDJSON rows with 'Content-Type: {NDJSON}'"
        )


def decode_line(line: bytes, n_features: int) -> np.ndarray:
    """One NDJSON line as a [1, n_features] float row, or InvalidInput saying why not."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"not valid JSON ({exc})") from None
    if isinstance(value, dict):
        if "features" not in value:
            raise InvalidInput('expected {"features": [...]} or a JSON list of numbers')
        value = value["features"]
    row = codec.numeric_array(value, "features", line)
    if row.ndim != 1 or row.size != n_features:
        raise InvalidInput(f"expected one row of {n_features} numbers, got shape {list(row.shape)}")
    row = row.astype(np.float64).reshape(1, -1)
    if not np.isfinite(row).all():
        raise InvalidInput("features must be finite numbers")
    return row


def split_lines(buffer: bytearray, chunk: bytes, limit: int) -> list[bytes]:
    """Appends `chunk` to `buffer` and removes and returns every complete line in it."""
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


async def predict_lines(backend: Any, predictor: Any, lines: list[bytes], first_line: int) -> bytes:
    """NDJSON answers for `lines`: the good ones predicted in one batched call."""
    answers: list[Any] = [None] * len(lines)
    rows: list[np.ndarray] = []
    where: list[int] = []
    for index, line in enumerate(lines):
        if not line.strip():
            answers[index] = b""  # blank lines (keep-alives) get no answer
            continue
        try:
            rows.append(decode_line(line, predictor.n_features))
            where.append(index)
        except ServeAppError as exc:
            answers[index] = {"error": exc.message, "line": first_line + index}
    if rows:
        result = await backend.infer(predictor, np.concatenate(rows), (PREDICT,))
        for index, label in zip(where, result.outputs[PREDICT].tolist()):
            answers[index] = {"prediction": label}
    return b"".join(a if isinstance(a, bytes) else codec.dumps(a) + b"\n" for a in answers)


async def stream_predictions(request: Request, backend: Any, predictor: Any, limit: int) -> AsyncIterator[bytes]:
    buffer = bytearray()
    line_number = 1
    try:
        async for chunk in request.stream():
            lines = split_lines(buffer, chunk, limit)
            if lines:
                yield await predict_lines(backend, predictor, lines, line_number)
                line_number += len(lines)
        if buffer.strip():  # a last line without a newline
            yield await predict_lines(backend, predictor, [bytes(buffer)], line_number)
    except ServeAppError as exc:  # the status is sent already: the error is the last line
        yield codec.dumps({"error": exc.message, "line": line_number}) + b"\n"


def stream_route(backend: Any) -> Any:
    """The `/predict/stream` handler for `http.build_http_app` (wrapped by its `endpoint`)."""

    async def predict_stream(request: Request) -> Any:
        check_content_type(request.headers.get("content-type"))
        predictor = await backend.versions.resolve(request.headers.get("x-model-version"))
        headers = {"x-model-name": predictor.name, "x-model-version": predictor.version}
        body = stream_predictions(request, backend, predictor, backend.settings.max_body_bytes)
        return DuplexStreamingResponse(body, media_type=NDJSON, headers=headers)

    return predict_stream


# ---- over a deployment handle ----------------------------------------------------------------


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


async def apredict_iter(
    handle: Any, rows: Any, *, chunk_rows: int = 256, in_flight: int = 4, version: str | None = None
) -> AsyncIterator[Any]:
    """`predict_iter` for async code; `rows` may be an iterable or an async iterable."""
    pending: Deque[Any] = collections.deque()
    chunk: list[Any] = []

    async def rows_of() -> AsyncIterator[Any]:
        if hasattr(rows, "__aiter__"):
            async for row in rows:
                yield row
        else:
            for row in rows:
                yield row

    async for row in rows_of():
        chunk.append(row)
        if len(chunk) == chunk_rows:
            pending.append(asyncio.ensure_future(_awaited(handle.predict.remote(chunk, version))))
            chunk = []
            if len(pending) >= in_flight:
                for label in (await pending.popleft()).tolist():
                    yield label
    if chunk:
        pending.append(asyncio.ensure_future(_awaited(handle.predict.remote(chunk, version))))
    while pending:
        for label in (await pending.popleft()).tolist():
            yield label


async def _awaited(response: Any) -> Any:
    return await response
