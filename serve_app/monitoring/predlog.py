"""The prediction log: one JSON line per sampled request, one file per replica, rotated by size.

    {"ts": 1764103000.123, "request_id": "6f1c...", "model": "iris", "version": "1",
     "inputs": [[5.1, 3.5, 1.4, 0.2]], "outputs": {"predict": [0]}, "latency_ms": 0.41}

A model with named, typed columns logs its rows as records, null as null:

     "inputs": [{"tenure_months": 12, "contract": "two-year", "monthly_charges": null, ...}]

Only the monitor thread writes (never the request path). The file is `predictions-
<replica>.jsonl` under the configured directory; when it would pass `max_bytes` it becomes
`.1.jsonl` (older ones shift up, the oldest past `backups` is deleted), so a directory
holds at most (backups + 1) * max_bytes per replica.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import IO, Any, Iterable, Mapping

import numpy as np
import orjson

from serve_app.protocol.columns import ColumnTable

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def encode(record: Mapping[str, Any]) -> bytes:
    return orjson.dumps(record, option=_OPTIONS)


def logged_inputs(inputs: np.ndarray | ColumnTable) -> Any:
    """The matrix as it is (orjson writes numpy), or a ColumnTable as one record per row."""
    if not isinstance(inputs, ColumnTable):
        return inputs
    names = inputs.schema.names
    values = [_json_values(inputs.columns[name]) for name in names]
    return [dict(zip(names, row)) for row in zip(*values)]


def _json_values(column: np.ndarray) -> list[Any]:
    # Nulls are NaN in number columns and None elsewhere; JSON has only null for both.
    return [None if isinstance(v, float) and v != v else v for v in column.tolist()]


class PredictionLog:
    def __init__(self, directory: str | os.PathLike[str], replica: str, *, max_bytes: int, backups: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stem = f"predictions-{_UNSAFE.sub('_', replica)}"
        self.path = self.directory / f"{self.stem}.jsonl"
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: IO[bytes] = open(self.path, "ab")
        self._size = self._file.tell()

    def _rotated(self, index: int) -> Path:
        return self.directory / f"{self.stem}.{index}.jsonl"

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            self._rotated(self.backups).unlink(missing_ok=True)
            for index in range(self.backups - 1, 0, -1):
                if self._rotated(index).exists():
                    os.replace(self._rotated(index), self._rotated(index + 1))
            os.replace(self.path, self._rotated(1))
        self._file = open(self.path, "ab")
        self._size = 0

    def write(self, lines: Iterable[bytes]) -> int:
        written = 0
        for line in lines:
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._size += len(line)
            written += 1
        return written

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def files(self) -> list[Path]:
        return sorted(self.directory.glob(f"{self.stem}*.jsonl"))
