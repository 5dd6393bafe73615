"""`serve-app batch`: offline predictions over a CSV or Parquet file on Ray Data.

    serve-app batch --model iris:2 --input data.csv --output preds.parquet

The input is cut into chunks the driver plans from the file alone (CSV: byte ranges ending
at a newline, with the line number each starts at; Parquet: row groups), so any number of
tasks parse in parallel, each holding one chunk at a time: a file larger than memory streams
through with bounded memory. Each chunk is parsed by Arrow, checked row by row, predicted by
the same `Predictor` the server uses, and written; rows that cannot be predicted (wrong
number of fields, not a number, empty, NaN or infinite) go to the error output with their
row number, text and reason. No row is dropped: predictions + errors = input rows.

A model with named, typed columns (manifest `input_schema`) reads its columns by name (a CSV
needs a header naming them; other columns are ignored). CSV fields are read as text and
given their column's kind: strings stay strings, an empty field is a null, `true`/`false`
(`True`, `TRUE`, ...) are booleans, integers stay integers; Parquet columns are taken as
stored. Each row is then checked like a request (`columns.column_array`): a wrong type, a
forbidden null or an unknown category sends the row to the error output with a reason naming
the column, and the other rows are predicted.

Outputs are Parquet datasets (directories of part files, as Ray Data writes them):
`<output>` has `row` (0-based data row, header excluded) and `prediction`; the error output
(`<output>.errors` unless given) has `row`, `line` (1-based line in a CSV), `text`, `error`.
"""

from __future__ import annotations

import functools
import io
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serve_app.errors import InvalidInput, ServeAppError
from serve_app.model.predictor import Predictor
from serve_app.model.schema import Column, InputSchema
from serve_app.model.store import DEFAULT_ALIAS, ModelStore
from serve_app.settings import RuntimeChoice
from serve_app.protocol.columns import ColumnTable, column_array

CSV_SUFFIXES = (".csv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
# A typed chunk is checked and predicted this many rows at a time: its values become Python
# objects while they are checked (tens of bytes each), so a slice bounds that, not the chunk.
TYPED_SLICE_ROWS = 65536
# CSV text a boolean column takes (pandas' read_csv reads the same); anything else is refused.
CSV_TRUE = frozenset(("true", "True", "TRUE"))
CSV_FALSE = frozenset(("false", "False", "FALSE"))


class BatchError(ServeAppError):
    """The job cannot start or finish as asked (bad arguments, unreadable input)."""

    status_code = 400


def parse_model_ref(text: str) -> tuple[str, str]:
    """`iris` -> ("iris", "production"); `iris:2` or `iris:staging` -> a version or alias."""
    name, _, ref = text.partition(":")
    return name, ref or DEFAULT_ALIAS


# ---- planning (driver) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    index: int
    path: str
    kind: str  # "csv" or "parquet"
    start: int  # CSV: byte offset; Parquet: row group
    end: int  # CSV: byte offset (exclusive); Parquet: unused
    first_row: int  # 0-based data row of the chunk's first row
    first_line: int  # CSV: 1-based line of the chunk's first row; Parquet: 0


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def csv_header(path: Path) -> list[str] | None:
    """The first line's fields if it is a header (not every field a number), else None."""
    with open(path, "rb") as handle:
        first = handle.readline().decode("utf-8", errors="replace").strip()
    fields = [f.strip().strip('"') for f in first.split(",")]
    return None if first and all(_is_number(f) for f in fields) else fields


def plan_csv(path: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[list[str] | None, list[Chunk]]:
    """Byte ranges that end at a newline, with the row and line each starts at.

    One sequential pass counting newlines (about 1 GB/s): cheap next to parsing, and it
    gives every row its number without any task having to know about the others.
    """
    header = csv_header(path)
    size = path.stat().st_size
    chunks: list[Chunk] = []
    with open(path, "rb") as handle:
        offset = len(handle.readline()) if header is not None else 0
        line = 2 if header is not None else 1
        row = 0
        while offset < size:
            handle.seek(offset)
            block = handle.read(chunk_bytes)
            end = offset + len(block)
            if end < size and not block.endswith(b"\n"):
                rest = handle.readline()  # finish the line the block cut
                block += rest
                end += len(rest)
            lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
            chunks.append(Chunk(len(chunks), str(path), "csv", offset, end, row, line))
            offset, row, line = end, row + lines, line + lines
    return header, chunks


def plan_parquet(path: Path) -> tuple[list[str], list[Chunk]]:
    import pyarrow.parquet as pq

    chunks: list[Chunk] = []
    row = 0
    for file in sorted(path.rglob("*.parquet")) if path.is_dir() else [path]:
        metadata = pq.ParquetFile(file).metadata
        for group in range(metadata.num_row_groups):
            chunks.append(Chunk(len(chunks), str(file), "parquet", group, 0, row, 0))
            row += metadata.row_group(group).num_rows
    if not chunks:
        raise BatchError(f"no Parquet files under {path}")
    columns = pq.ParquetFile(chunks[0].path).schema_arrow.names
    return columns, chunks


def column_order(columns: list[str] | None, features: list[str], source: Path) -> list[int] | None:
    """Which input column feeds each model feature: by name when the input names its columns."""
    if columns is None:
        return None
    if all(name in columns for name in features):
        return [columns.index(name) for name in features]
    if len(columns) == len(features) and not set(columns) & set(features):
        return list(range(len(features)))  # unrelated names (e.g. c0..c3): take them in order
    missing = [name for name in features if name not in columns]
    raise BatchError(
        f"{source} has columns {columns} but the model needs {features}; missing {missing}. "
        "Name the columns like the model's features, or give a file without a header row."
    )


def typed_column_order(columns: list[str] | None, names: list[str], source: Path) -> list[int] | None:
    """Which input column holds each schema column: by name (a typed model's columns are
    named; other columns are ignored). No header (every field of the first line a number):
    the columns in the schema's order."""
    if columns is None:
        return None
    missing = [name for name in names if name not in columns]
    if missing:
        raise BatchError(
            f"{source} has columns {columns} but the model needs {names}; missing {missing}. "
            "Name the columns like the model's (a CSV needs a header row)."
        )
    return [columns.index(name) for name in names]


# ---- one chunk (a Ray task; also callable directly) ----------------------------------------

_PREDICTORS: dict[tuple[str, str, str, str], Predictor] = {}


def _predictor(store: str, name: str, version: str, runtime: RuntimeChoice = "auto") -> Predictor:
    key = (store, name, version, runtime)
    if key not in _PREDICTORS:  # once per worker process, then reused by every chunk
        _PREDICTORS[key] = Predictor.load(store, name, version, max_rows=2**62, runtime=runtime)
    return _PREDICTORS[key]


# Rows per call the runtimes are timed on: a chunk's scale (a batch job predicts whole chunks),
# where ONNX Runtime's flat cost per row can lose to scikit-learn's (docs/performance-notes.md).
RUNTIME_PROBE_ROWS = 16384


@dataclass(frozen=True)
class BatchRuntime:
    """Which runtime a job's tasks predict with, and why (measured at the job's start)."""

    choice: RuntimeChoice
    reason: str


def choose_batch_runtime(store: str, name: str, version: str, probe_rows: int = RUNTIME_PROBE_ROWS) -> BatchRuntime:
    """For a version with a compiled model, times both runtimes on `probe_rows` rows drawn from
    its training statistics, one thread each (a task has one CPU), and keeps the faster: the
    compiled model's cost per row is flat, scikit-learn's falls with the batch, and whole
    chunks are large batches. Both give the same labels (verified at publish)."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    manifest = ModelStore(store).manifest(name, version)
    if manifest.runtime != "onnxruntime" or manifest.typed or not manifest.training_stats:
        return BatchRuntime("auto", f"the version's runtime ({manifest.runtime}): {manifest.runtime_reason}")
    rng = np.random.default_rng(0)
    rows = np.column_stack([
        rng.choice(np.asarray(manifest.training_stats[f].sample), size=probe_rows) if f in manifest.training_stats
        else np.zeros(probe_rows) for f in manifest.feature_names
    ])
    costs = {}
    with threadpool_limits(1):
        for choice in ("auto", "sklearn"):
            predictor = Predictor.load(store, name, version, max_rows=2**62, runtime=choice, threads=1)
            checked = predictor.validate(rows)
            predictor.predict(checked[:64])  # warm
            started = time.perf_counter()
            predictor.predict(checked)
            costs[choice] = (time.perf_counter() - started) / probe_rows * 1e6
    compiled, sklearn = costs["auto"], costs["sklearn"]
    measured = f"{probe_rows:,} rows a call, one thread: ONNX Runtime {compiled:.1f} µs a row, scikit-learn {sklearn:.1f}"
    if sklearn < compiled:
        return BatchRuntime("sklearn", f"scikit-learn ({measured})")
    return BatchRuntime("auto", f"ONNX Runtime, the compiled model ({measured})")


def _read_csv_chunk(
    chunk: Chunk, n_columns: int, *, as_text: bool = False
) -> tuple[Any, np.ndarray, list[dict[str, Any]], bytes]:
    """Arrow table of the chunk's well-formed rows (strings or doubles; with `as_text`,
    strings with empty fields as nulls), their row numbers, the rows Arrow refused (wrong
    number of fields), and the chunk's bytes."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    with open(chunk.path, "rb") as handle:
        handle.seek(chunk.start)
        data = handle.read(chunk.end - chunk.start)
    bad: list[dict[str, Any]] = []

    def refuse(invalid: Any) -> str:
        local = invalid.number - 1  # 1-based within the chunk (single-threaded parse)
        fields = "no fields" if not invalid.text else f"{invalid.actual_columns} fields"
        bad.append({
            "row": chunk.first_row + local,
            "line": chunk.first_line + local,
            "text": invalid.text,
            "error": f"expected {invalid.expected_columns} fields, got {fields}",
        })
        return "skip"

    names = [f"c{i}" for i in range(n_columns)]
    read = pa_csv.ReadOptions(column_names=names, use_threads=False, block_size=max(len(data), 1) + 1)
    # Empty lines are rows too (reported, not skipped), so row numbers stay those of the file.
    parse = pa_csv.ParseOptions(invalid_row_handler=refuse, ignore_empty_lines=False)
    table = None
    # Numbers: strings only when some value is not a number. Typed columns: always text,
    # given their kinds per column afterwards (a bad value must not fail the whole chunk).
    for column_type in (pa.string(),) if as_text else (pa.float64(), pa.string()):
        bad.clear()
        # Only an empty field is missing; "nan" stays NaN (and is reported as not finite).
        convert = pa_csv.ConvertOptions(
            column_types={n: column_type for n in names}, null_values=[""], strings_can_be_null=as_text
        )
        try:
            table = pa_csv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse, convert_options=convert)
            break
        except pa.ArrowInvalid as exc:
            if column_type == pa.string() or "conversion error" not in str(exc):
                raise BatchError(f"{chunk.path}: cannot parse lines {chunk.first_line}+ ({exc})") from None
    assert table is not None
    refused = {b["row"] - chunk.first_row for b in bad}
    total = table.num_rows + len(refused)
    rows = np.delete(np.arange(total, dtype=np.int64), sorted(refused)) + chunk.first_row
    return table, rows, bad, data


def _to_matrix(table: Any, order: list[int] | None, features: list[str]) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """float64 [rows, features], and per row the reason it cannot be predicted (or None)."""
    import pyarrow as pa

    columns = [table.column(i) for i in (order if order is not None else range(len(features)))]
    n = table.num_rows
    matrix = np.empty((n, len(features)), dtype=np.float64)
    reasons: list[str | None] = [None] * n
    ok = np.ones(n, dtype=bool)
    for j, column in enumerate(columns):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            raw = column.to_numpy(zero_copy_only=False)
            values = np.array([_as_float(v) for v in raw], dtype=np.float64)
            for i in np.flatnonzero(np.isnan(values) & np.array([not _is_nan_text(v) for v in raw])):
                if ok[i]:
                    shown = str(raw[i])
                    reasons[i] = f"feature {features[j]} is empty" if not shown.strip() else (
                        f"feature {features[j]} is {shown[:40]!r}, not a number"
                    )
                    ok[i] = False
        else:
            if column.null_count:
                for i in np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)):
                    if ok[i]:
                        reasons[i] = f"feature {features[j]} is empty"
                        ok[i] = False
            values = column.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
        matrix[:, j] = values
    finite = np.isfinite(matrix)
    for i in np.flatnonzero(ok & ~finite.all(axis=1)):
        j = int(np.argmin(finite[i]))
        reasons[i] = f"feature {features[j]} is {matrix[i, j]}; features must be finite numbers"
        ok[i] = False
    return matrix, ok, reasons


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _is_nan_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("nan", "+nan", "-nan")


def _at_value(_: int) -> str:
    return "the value"


def csv_value(text: str | None, column: Column) -> Any:
    """A CSV field (None: empty) as the Python value its column's kind reads it as; text
    that is not of that kind stays text, which the column check then refuses by name."""
    if text is None or column.kind == "string":
        return text
    if column.kind == "boolean":
        return True if text.strip() in CSV_TRUE else False if text.strip() in CSV_FALSE else text
    if column.kind == "integer":
        try:
            return int(text)
        except ValueError:
            pass  # "3.0" is a whole number too; "3.5" is refused as not one
    try:
        return float(text)
    except ValueError:
        return text


def column_values(values: Any, column: Column, *, from_text: bool) -> list[Any]:
    """An Arrow column's values as Python values for `column_array`: CSV text (`from_text`)
    given its column's kind (`csv_value`); Parquet values as stored (a string in a Parquet
    integer column is refused, not parsed)."""
    if from_text and column.kind != "string":
        return [csv_value(text, column) for text in values.to_pylist()]
    return list(values.to_pylist())


def check_typed(
    table: Any, order: list[int] | None, schema: InputSchema, *, from_text: bool
) -> tuple[ColumnTable | None, np.ndarray, list[str | None]]:
    """The rows that pass their columns' checks as a `ColumnTable`, which rows those are, and
    for each other row the first column's reason (a 422's message: it names the column).

    A column is checked whole; only a column with a bad value is checked value by value."""
    n = table.num_rows
    ok = np.ones(n, dtype=bool)
    reasons: list[str | None] = [None] * n
    values: dict[str, list[Any]] = {}
    checked: dict[str, np.ndarray | None] = {}
    for j, column in enumerate(schema.columns):
        values[column.name] = column_values(table.column(order[j] if order is not None else j), column, from_text=from_text)
        try:
            checked[column.name] = column_array(column, values[column.name], _at_value)
        except InvalidInput:
            checked[column.name] = None
            for i, value in enumerate(values[column.name]):
                try:
                    column_array(column, [value], _at_value)
                except InvalidInput as exc:
                    if ok[i]:
                        reasons[i], ok[i] = exc.message, False
    good = np.flatnonzero(ok)
    if not len(good):
        return None, ok, reasons
    columns = {}
    for column in schema.columns:
        array = checked[column.name]
        columns[column.name] = array[good] if array is not None else column_array(
            column, [values[column.name][i] for i in good], _at_value
        )
    return ColumnTable(schema, columns, len(good)), ok, reasons


def _predict_typed(
    predictor: Predictor, table: Any, order: list[int] | None, *, from_text: bool
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Predictions for the rows that pass their checks, which rows those are, the others' reasons."""
    labels: list[np.ndarray] = []
    oks: list[np.ndarray] = []
    reasons: list[str | None] = []
    for start in range(0, table.num_rows, TYPED_SLICE_ROWS):
        good, ok, why = check_typed(table.slice(start, TYPED_SLICE_ROWS), order, predictor.schema, from_text=from_text)
        if good is not None:
            labels.append(predictor.predict(predictor.validate(good)))
        oks.append(ok)
        reasons.extend(why)
    ok_all = np.concatenate(oks) if oks else np.ones(0, dtype=bool)
    return (np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)), ok_all, reasons


def predict_chunk(
    chunk: Chunk, *, store: str, model: str, version: str, order: list[int] | None, n_columns: int, errors_dir: str,
    runtime: RuntimeChoice = "auto",
) -> Any:
    """Predictions for one chunk as an Arrow table; its bad rows go to `errors_dir`.

    The error part is named by the chunk, so a retried task rewrites the same file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    predictor = _predictor(store, model, version, runtime)
    features = list(predictor.manifest.feature_names)
    data = b""
    if chunk.kind == "csv":
        table, rows, bad, data = _read_csv_chunk(chunk, n_columns, as_text=predictor.typed)
    else:
        table = pq.ParquetFile(chunk.path).read_row_group(chunk.start)
        rows, bad = np.arange(table.num_rows, dtype=np.int64) + chunk.first_row, []
    if predictor.typed:
        labels, ok, reasons = _predict_typed(predictor, table, order, from_text=chunk.kind == "csv")
    else:
        matrix, ok, reasons = _to_matrix(table, order, features)
    refused = np.flatnonzero(~ok)
    lines = data.split(b"\n") if len(refused) and data else []
    for i in refused:
        local = int(rows[i] - chunk.first_row)
        if lines:
            text = lines[local].decode("utf-8", errors="replace").rstrip("\r")
        else:  # Parquet: the row's values as read
            text = ",".join(str(v) for v in table.slice(int(i), 1).to_pylist()[0].values())
        line = chunk.first_line + local if chunk.kind == "csv" else 0
        reason = reasons[i] if text.strip() or chunk.kind != "csv" else f"empty line; expected {n_columns} fields"
        bad.append({"row": int(rows[i]), "line": line, "text": text, "error": reason})
    if bad:
        bad.sort(key=lambda b: b["row"])
        path = Path(errors_dir) / f"part-{chunk.index:06d}.parquet"
        pq.write_table(pa.Table.from_pylist(bad, schema=error_schema()), path)
    if not predictor.typed:
        good = matrix[ok]
        labels = predictor.predict(predictor.validate(good)) if len(good) else np.empty(0, dtype=np.int64)
    return pa.table({"row": rows[ok], "prediction": labels})


def error_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("row", pa.int64()), ("line", pa.int64()), ("text", pa.string()), ("error", pa.string())])


# ---- the job ---------------------------------------------------------------------------------


@dataclass
class BatchResult:
    model: str
    version: str
    rows: int
    predicted: int
    errors: int
    seconds: float
    output: Path
    errors_output: Path
    runtime: str = ""  # which runtime predicted, and why (BatchRuntime.reason)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def _prepare_output(path: Path, overwrite: bool) -> None:
    if path.exists():
        if not overwrite:
            raise BatchError(f"{path} exists; remove it or pass --overwrite")
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def plan(
    input_path: Path, features: list[str], chunk_bytes: int, *, typed: bool = False
) -> tuple[list[Chunk], list[int] | None, int]:
    """The chunks, which input column feeds each feature (None: in order), and the input's
    column count. `typed`: the model's columns are named, and found by name."""
    order_of = typed_column_order if typed else column_order
    suffix = input_path.suffix.lower()
    if input_path.is_dir() or suffix in PARQUET_SUFFIXES:
        columns, chunks = plan_parquet(input_path)
        order = order_of(columns, features, input_path)
        if order is None or len(columns) < len(features):
            raise BatchError(f"{input_path} has {len(columns)} columns; the model needs {len(features)}: {features}")
        return chunks, order, len(columns)
    if suffix in CSV_SUFFIXES:
        header, chunks = plan_csv(input_path, chunk_bytes)
        order = order_of(header, features, input_path)
        return chunks, order, len(header) if header is not None else len(features)
    raise BatchError(f"{input_path}: use a .csv or .parquet file (or a directory of Parquet files)")


def run_batch(
    model: str,
    input_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    store: str | os.PathLike[str],
    errors_output: str | os.PathLike[str] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    address: str | None = None,
) -> BatchResult:
    """Runs the job on the Ray cluster this process is connected to (or a new local one)."""
    import ray
    import ray.data

    name, ref = parse_model_ref(model)
    model_store = ModelStore(store)
    source = Path(input_path).expanduser().resolve()
    if not source.exists():
        raise BatchError(f"input {source} does not exist")
    target = Path(output).expanduser().resolve()
    errors_target = Path(errors_output).expanduser().resolve() if errors_output else target.with_name(target.name + ".errors")
    # A version number, fixed now: every task predicts with the same version even if the
    # alias moves while the job runs.
    version = model_store.resolve(name, ref)
    manifest = model_store.manifest(name, version)
    chunks, order, n_columns = plan(source, list(manifest.feature_names), chunk_bytes, typed=manifest.typed)
    _prepare_output(target, overwrite)
    _prepare_output(errors_target, overwrite)
    errors_target.mkdir(parents=True)

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # a laptop: a local Ray just for this job; it needs no dashboard (nor its port)
            ray.init(include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    started = time.perf_counter()  # the runtime's timing counts as the job's
    runtime = choose_batch_runtime(str(model_store.root), name, version)
    predict = functools.partial(
        predict_chunk, store=str(model_store.root), model=name, version=version, order=order,
        n_columns=n_columns, errors_dir=str(errors_target), runtime=runtime.choice,
    )

    target.mkdir(parents=True)

    def predict_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        written = []
        for i in range(len(batch["index"])):
            chunk = Chunk(**{k: _plain(batch[k][i]) for k in batch})
            table = predict(chunk)
            # Named by the chunk: a retried task rewrites the same file.
            pq.write_table(table, target / f"part-{chunk.index:06d}.parquet")
            written.append(table.num_rows)
        return {"index": batch["index"], "predicted": np.asarray(written, dtype=np.int64)}

    items = [chunk.__dict__ for chunk in chunks]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    # Tasks (not an actor pool): read, predict and write happen in one task per chunk, and
    # nothing holds a CPU idle that reads would need (on 2 cores a full pool starves them).
    # Each task writes its own part file and hands Ray Data only a count: moving the
    # predictions through the object store to a separate write stage costs far more
    # (docs/performance-notes.md).
    summary = dataset.map_batches(predict_batch, batch_size=1, batch_format="numpy").take_all()
    seconds = time.perf_counter() - started
    if len(summary) != len(chunks):
        raise BatchError(f"{len(summary)} of {len(chunks)} chunks reported back")
    predicted = _count_rows(target)
    errors = _count_rows(errors_target)
    total = planned_rows(chunks)
    if predicted + errors != total:
        raise BatchError(f"{predicted} predictions + {errors} errors != {total} input rows")
    return BatchResult(name, version, total, predicted, errors, seconds, target, errors_target, runtime.reason)


def planned_rows(chunks: list[Chunk]) -> int:
    """Input rows known from planning alone: CSV line counts, Parquet metadata."""
    if not chunks:
        return 0
    if chunks[0].kind == "parquet":
        import pyarrow.parquet as pq

        last = chunks[-1]
        return last.first_row + pq.ParquetFile(last.path).metadata.row_group(last.start).num_rows
    # For a CSV, the last chunk's line count comes from the planner too.
    last = chunks[-1]
    with open(last.path, "rb") as handle:
        handle.seek(last.start)
        block = handle.read(last.end - last.start)
    return last.first_row + block.count(b"\n") + (0 if block.endswith(b"\n") or not block else 1)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _count_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    if not path.exists():
        return 0
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def read_output(path: str | os.PathLike[str]) -> Any:
    """A job's output (or error output) as one Arrow table sorted by row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(path).rglob("*.parquet"))
    if not files:
        return pa.table({})
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return table.sort_by("row")


