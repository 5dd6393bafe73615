"""POST /predict/stream (through HAProxy) and the generator APIs over a handle.

The HTTP test drives HTTP/1.1 by hand with h11 (the protocol library under httpx) over a
socket, because httpx, like most clients, sends the whole request body before it reads
the response: it cannot show an answer arriving before the body is complete. Here the
client sends one chunk (one row), reads that row's prediction, and only then sends the next.
"""

from __future__ import annotations

import itertools
import socket
from typing import Any, Iterator
from urllib.parse import urlsplit

import h11
import httpx
import numpy as np
import orjson
import pytest

from serve_app.errors import InvalidInput, PayloadTooLarge
from serve_app.model.predictor import Predictor
from serve_app.protocol.ndjson import decode_line, split_lines

from .conftest import IRIS_ROWS

# ---- unit: framing and decoding -----------------------------------------------------------


def test_split_lines_keeps_the_partial_line() -> None:
    buffer = bytearray()
    assert split_lines(buffer, b'[1,2,3,4]\n[5,6', 100) == [b"[1,2,3,4]"]
    assert split_lines(buffer, b",7,8]\n", 100) == [b"[5,6,7,8]"]
    assert buffer == b""


def test_split_lines_bounds_memory() -> None:
    buffer = bytearray()
    with pytest.raises(PayloadTooLarge):
        split_lines(buffer, b"1" * 101, 100)


@pytest.mark.parametrize(
    "line, message",
    [
        (b"[1,2,3]", "4 numbers"),
        (b'{"features": [1,"x",3,4]}', "numbers only"),
        (b"[1,2,3,NaN]", "not valid JSON"),
        (b'{"rows": [1,2,3,4]}', "features"),
        (b"[1e999,2,3,4]", "infinity"),
    ],
)
def test_decode_line_refuses_bad_rows(line: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_line(line, 4)


def test_decode_line_accepts_both_forms() -> None:
    assert decode_line(b"[5.1,3.5,1.4,0.2]", 4).tolist() == [[5.1, 3.5, 1.4, 0.2]]
    assert decode_line(b'{"features": [5, 3, 1, 0]}', 4).dtype == np.float64


# ---- over HTTP, through HAProxy -----------------------------------------------------------


class ChunkedClient:
    """One HTTP/1.1 request with a chunked body, reading the response as it comes."""

    def __init__(self, base_url: str, path: str, headers: dict[str, str] | None = None) -> None:
        url = urlsplit(base_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=30)
        self.conn = h11.Connection(h11.CLIENT)
        self.response: h11.Response | None = None
        self.buffer = b""
        self.finished = False
        head = [("host", url.netloc), ("transfer-encoding", "chunked"), ("content-type", "application/x-ndjson")]
        head += list((headers or {}).items())
        self.sock.sendall(self.conn.send(h11.Request(method="POST", target=path, headers=head)))

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.conn.send(h11.Data(data=data)))

    def end(self) -> None:
        self.sock.sendall(self.conn.send(h11.EndOfMessage()))

    def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
                continue
            return event

    def read_line(self) -> bytes:
        """The next NDJSON line of the response; blocks until it arrives (or times out)."""
        while b"\n" not in self.buffer:
            event = self._next_event()
            if isinstance(event, h11.Response):
                self.response = event
            elif isinstance(event, h11.Data):
                self.buffer += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.finished = True
                raise EOFError("response ended")
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def labels(served: dict[str, Any]) -> list[Any]:
    model = Predictor.load(served["store"], "iris", "production").model
    return model.predict(np.array(IRIS_ROWS)).tolist()


@pytest.mark.ray
def test_each_prediction_arrives_before_the_body_is_complete(served: dict[str, Any], labels: list[Any]) -> None:
    client = ChunkedClient(served["base_url"], "/predict/stream")
    try:
        for row, label in zip(IRIS_ROWS * 3, labels * 3):
            client.send(orjson.dumps({"features": row}) + b"\n")
            # The body is still open (no final chunk sent): the answer must come anyway.
            assert orjson.loads(client.read_line()) == {"prediction": label}
            assert not client.finished
        assert client.response is not None and client.response.status_code == 200
        headers = dict(client.response.headers)
        assert headers[b"content-type"].startswith(b"application/x-ndjson")
        assert headers[b"x-model-version"] == b"1"
        client.end()
        with pytest.raises(EOFError):
            client.read_line()
    finally:
        client.close()


@pytest.mark.ray
def test_bad_lines_answer_an_error_and_the_stream_goes_on(served: dict[str, Any], labels: list[Any]) -> None:
    client = ChunkedClient(served["base_url"], "/predict/stream")
    try:
        client.send(b"[1,2,3]\n")
        assert orjson.loads(client.read_line()) == {"error": "expected one row of 4 numbers, got shape [3]", "line": 1}
        client.send(b'{"features": [1, "x", 3, 4]}\nnot json\n' + orjson.dumps(IRIS_ROWS[1]) + b"\n")
        second, third, fourth = (orjson.loads(client.read_line()) for _ in range(3))
        assert second["line"] == 2 and "numbers only" in second["error"]
        assert third["line"] == 3 and "not valid JSON" in third["error"]
        assert fourth == {"prediction": labels[1]}
        client.end()
    finally:
        client.close()


@pytest.mark.ray
def test_many_rows_in_one_streamed_body_with_httpx(served: dict[str, Any]) -> None:
    """httpx with a generator body (chunked): all answers, in order, for 2000 rows."""
    rows = np.random.default_rng(1).uniform(0.1, 7.0, size=(2000, 4)).round(2)
    expected = Predictor.load(served["store"], "iris", "production").model.predict(rows).tolist()

    def body() -> Iterator[bytes]:
        for start in range(0, len(rows), 100):
            yield b"".join(orjson.dumps(r.tolist()) + b"\n" for r in rows[start : start + 100])

    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{served['base_url']}/predict/stream", content=body(),
                         headers={"content-type": "application/x-ndjson"}) as reply:
            assert reply.status_code == 200
            assert reply.headers.get("transfer-encoding") == "chunked"
            got = [orjson.loads(line)["prediction"] for line in reply.iter_lines() if line]
    assert got == expected


@pytest.mark.ray
def test_stream_refuses_other_content_types(served: dict[str, Any]) -> None:
    reply = httpx.post(f"{served['base_url']}/predict/stream", content=b"<rows/>", headers={"content-type": "application/xml"})
    assert reply.status_code == 415
    assert "x-ndjson" in reply.json()["error"]


# ---- over a deployment handle -------------------------------------------------------------


@pytest.mark.ray
def test_predict_iter_over_an_endless_generator(served: dict[str, Any]) -> None:
    from serve_app.client import predict_iter

    model = Predictor.load(served["store"], "iris", "production").model
    rng = np.random.default_rng(2)

    def endless() -> Iterator[list[float]]:
        while True:
            yield rng.uniform(0.1, 7.0, size=4).round(2).tolist()

    sent: list[list[float]] = []

    def recorded() -> Iterator[list[float]]:
        for row in endless():
            sent.append(row)
            yield row

    got = list(itertools.islice(predict_iter(served["handle"], recorded(), chunk_rows=64, in_flight=3), 1000))
    assert got == model.predict(np.array(sent[:1000])).tolist()
    # Lazy and bounded: it read at most `in_flight` chunks beyond what it returned.
    assert len(sent) <= 1000 + 3 * 64


@pytest.mark.ray
def test_handle_stream_yields_chunks_as_computed(served: dict[str, Any]) -> None:
    rows = np.random.default_rng(3).uniform(0.1, 7.0, size=(1000, 4)).round(2)
    model = Predictor.load(served["store"], "iris", "production").model
    chunks = list(served["handle"].options(stream=True).predict_stream.remote(rows, 300))
    assert [len(c) for c in chunks] == [300, 300, 300, 100]
    assert np.concatenate(chunks).tolist() == model.predict(rows).tolist()
