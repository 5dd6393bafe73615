"""`POST /predict/stream`: NDJSON rows in, NDJSON predictions out, as they are computed.

The body is one row per line (serve_app/protocol/ndjson.py), chunked or not; for a model with
named, typed columns, one record `{"col": value, ...}` per line. Each answer
is one line per input line, in order: `{"prediction": 0}`, or `{"error": "...", "line": 7}`
for a line that cannot be predicted (the stream goes on). Whatever complete lines have
arrived are predicted at once (one batched call), without waiting for more, so each answer
leaves before the client has sent the rest; memory holds one chunk and one partial line
(at most `max_body_bytes`), so the input may be unbounded. The request is recorded once,
when its body ends (serving/http/endpoint.py).

Over a deployment handle, see `serve_app.client.predict_iter`.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from serve_app.errors import ServeAppError
from serve_app.model.predictor import PREDICT, Predictor
from serve_app.protocol import columns, ndjson
from serve_app.protocol.json import dumps, loads
from serve_app.serving.http.endpoint import VERSION_HEADER, Endpoint, InferenceBackend, answered_by
from serve_app.serving.ledger import RequestRecord


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


async def predict_lines(
    backend: InferenceBackend, predictor: Predictor, lines: list[bytes], first_line: int, record: RequestRecord
) -> bytes:
    """NDJSON answers for `lines`: the good ones predicted in one batched call."""
    answers: list[Any] = [None] * len(lines)
    rows: list[Any] = []
    where: list[int] = []
    for index, line in enumerate(lines):
        if not line.strip():
            answers[index] = b""  # blank lines (keep-alives) get no answer
            continue
        try:
            rows.append(_decode_line(line, predictor, first_line + index))
            where.append(index)
        except ServeAppError as exc:
            answers[index] = {"error": exc.message, "line": first_line + index}
    if rows:
        joined = columns.concat(rows) if predictor.typed else np.concatenate(rows)
        result = await backend.infer_with(predictor, joined, (PREDICT,), record)
        for index, label in zip(where, result.outputs[PREDICT].tolist()):
            answers[index] = {"prediction": label}
    return b"".join(a if isinstance(a, bytes) else dumps(a) + b"\n" for a in answers)


def _decode_line(line: bytes, predictor: Predictor, number: int) -> Any:
    if predictor.typed:  # one record per line, every column checked
        return columns.decode_records([loads(line)], predictor.schema, f"line {number}", single=True)
    return ndjson.decode_line(line, predictor.n_features)


async def stream_predictions(
    request: Request, backend: InferenceBackend, predictor: Predictor, limit: int, record: RequestRecord
) -> AsyncIterator[bytes]:
    buffer = bytearray()
    line_number = 1
    try:
        async for chunk in request.stream():
            lines = ndjson.split_lines(buffer, chunk, limit)
            if lines:
                yield await predict_lines(backend, predictor, lines, line_number, record)
                line_number += len(lines)
        if buffer.strip():  # a last line without a newline
            yield await predict_lines(backend, predictor, [bytes(buffer)], line_number, record)
    except ServeAppError as exc:  # the status is sent already: the error is the last line
        yield dumps({"error": exc.message, "line": line_number}) + b"\n"


def endpoints(backend: InferenceBackend) -> list[Endpoint]:
    limit = backend.settings.max_body_bytes

    async def predict_stream(request: Request, record: RequestRecord) -> Response:
        ndjson.check_content_type(request.headers.get("content-type"))
        predictor = await backend.versions.resolve(request.headers.get(VERSION_HEADER))  # once for the whole stream
        body = stream_predictions(request, backend, predictor, limit, record)
        return DuplexStreamingResponse(body, media_type=ndjson.NDJSON, headers=answered_by(predictor.name, predictor.version))

    return [Endpoint("/predict/stream", predict_stream, ("POST",))]
