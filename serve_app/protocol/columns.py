"""Named, typed columns on the wire: requests in, one validated `ColumnTable` out.

For models with an `InputSchema` of typed columns (strings, booleans, integers, nulls), every
wire format decodes here, and every value is checked against its column before anything
reaches the model; a problem is a 422 naming the column and what was expected:

- `/predict`: `{"features": {"col": value, ...}}` (one record) or a list of records;
- KServe V1: `{"instances": [records]}`, or `{"inputs": {"col": [values], ...}}` (columnar);
- OIP V2: one named input per column (FP64/FP32/INT64/BOOL/BYTES, and the other numeric
  datatypes where they fit), as JSON `data` or binary data; BYTES binary data is the V2 format
  (each element a 4-byte little-endian length, then that many UTF-8 bytes);
- a pandas DataFrame or records (Ray handles, batch jobs): `decode_frame`, `decode_records`.

Decisions:
- booleans are JSON `true`/`false` (V2: BOOL) only; `1`/`0` and `"true"` are refused, since
  a number or a string in a boolean column usually means columns were mixed up;
- integers accept whole numbers, `3.0` included (some JSON writers add the `.0`), not `3.5`;
- numbers accept integers; strings accept only strings (`3` in a string column is refused:
  send `"3"` if that is the category);
- null (JSON null, None, NaN) is allowed only in `nullable` columns; a number column refuses
  infinities; V2 JSON may also carry the bare tokens NaN/Infinity (tritonclient's JSON mode
  writes a float NaN so), read as NaN (null) and infinity (refused);
- a category never seen in training is refused, naming the known ones, unless the column's
  `unknown_categories` is "allowed" (the model handles it).

The all-numeric fast path (`predict_api`, `kserve_v1`, `oip_v2`) does not come through here.
No pandas at import time: only `ColumnTable.to_dataframe` imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from serve_app.errors import BadRequest, InvalidInput
from serve_app.model.schema import Column, InputSchema
from serve_app.protocol.json import loads, loads_allowing_nan, require_key, require_object
from serve_app.protocol.oip_v2 import DATATYPES, RequestedOutput, request_parameters, requested_outputs, shape_of, split_body

if TYPE_CHECKING:
    import pandas as pd

# How many known categories or column names an error message lists before "and N more".
SHOWN = 10
# V2 datatypes each kind accepts: integers are numbers too; the other kinds take their own.
_INT_DATATYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
ACCEPTED_DATATYPES: dict[str, tuple[str, ...]] = {
    "number": ("FP64", "FP32", "FP16", *_INT_DATATYPES),
    "integer": _INT_DATATYPES,
    "boolean": ("BOOL",),
    "string": ("BYTES",),
}
# Training dtypes held as numpy arrays (the rest become pandas extension arrays).
_NUMPY_DTYPES = frozenset(
    ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool")
)
_INT64 = np.iinfo(np.int64)
# Integer dtypes (numpy, and pandas' nullable ones lower-cased) narrower than int64.
_NARROW_INTS = frozenset(("int8", "int16", "int32", "uint8", "uint16", "uint32", "uint64"))


@dataclass(frozen=True)
class ColumnTable:
    """Validated rows as one numpy array per column, in schema order.

    number: float64 (NaN for nulls); integer: int64, or an object array of int/None when
    nullable; boolean: bool, or an object array of True/False/None when nullable; string: an
    object array of str/None.
    """

    schema: InputSchema
    columns: Mapping[str, np.ndarray]
    n_rows: int

    def __len__(self) -> int:  # rows, as for a matrix: counted alike in the ledger and batches
        return self.n_rows

    def to_dataframe(self) -> "pd.DataFrame":
        """The rows as a DataFrame with the columns in schema order, each with the dtype the
        model was fitted with (`Column.pandas_dtype`); nulls become that dtype's missing value
        (NaN in object columns, as pandas' readers give)."""
        import pandas as pd

        data = {column.name: _as_dtype(column, self.columns[column.name], pd) for column in self.schema.columns}
        return pd.DataFrame(data, index=pd.RangeIndex(self.n_rows))


def concat(tables: Sequence[ColumnTable]) -> ColumnTable:
    """One table of the rows of `tables` (same schema), in order: a batch across requests."""
    if not tables:
        raise ValueError("concat needs at least one table")
    schema = tables[0].schema
    for table in tables[1:]:
        if table.schema is not schema and table.schema != schema:
            raise ValueError("cannot concatenate tables of different schemas")
    if len(tables) == 1:
        return tables[0]
    return ColumnTable(
        schema,
        {name: np.concatenate([t.columns[name] for t in tables]) for name in schema.names},
        sum(t.n_rows for t in tables),
    )


# --- JSON formats ------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedPredictRequest:
    table: ColumnTable
    single: bool  # `{"features": {..}}` answers `{"prediction": x}`; a list of records, a list


def decode_predict(body: bytes, schema: InputSchema) -> NamedPredictRequest:
    """`/predict`: `{"features": {"col": value, ...}}` or `{"features": [{...}, ...]}`."""
    example = _record_example(schema)
    payload = require_object(loads(body), '{"features": ' + example + "}")
    features = require_key(payload, "features", '{"features": ' + example + "} or a list of such records")
    if isinstance(features, dict):
        return NamedPredictRequest(decode_records([features], schema, "features", single=True), single=True)
    return NamedPredictRequest(decode_records(features, schema, "features"), single=False)


def decode_kserve_v1(body: bytes, schema: InputSchema) -> ColumnTable:
    """KServe V1: `{"instances": [records]}`, or `{"inputs": {"col": [values]}}` (columnar;
    `inputs` may also hold records)."""
    example = '{"instances": [' + _record_example(schema) + "]}"
    payload = require_object(loads(body), example)
    if "instances" in payload:
        return decode_records(payload["instances"], schema, "instances")
    if "inputs" not in payload:
        raise InvalidInput(f"missing key 'instances' (or 'inputs'); expected {example}")
    inputs = payload["inputs"]
    if isinstance(inputs, dict):
        return decode_columnar(inputs, schema, "inputs")
    return decode_records(inputs, schema, "inputs")


def decode_records(records: Any, schema: InputSchema, where: str = "records", single: bool = False) -> ColumnTable:
    """A list of records (objects of column: value), every column present, none unknown."""
    if not isinstance(records, list) or (records and not all(isinstance(r, dict) for r in records)):
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), 0) if isinstance(records, list) else None
        shown = where if bad is None else f"{where}[{bad}]"
        got = _json_type(records if bad is None else records[bad])
        raise InvalidInput(
            f"{shown} must be {'a record' if bad is not None else 'a list of records'} of named columns "
            f"such as {_record_example(schema)}, got {got}; this model takes named columns"
        )
    if not records:
        raise InvalidInput(f"{where} is an empty list; send at least one record")
    names = schema.names
    expected = set(names)
    for index, record in enumerate(records):
        if record.keys() != expected:
            at = where if single else f"{where}[{index}]"
            _key_problem(record.keys(), schema, at)
    return ColumnTable(
        schema,
        {
            column.name: column_array(
                column, [r[column.name] for r in records], _locator(where, column.name, single, records=True)
            )
            for column in schema.columns
        },
        len(records),
    )


def decode_columnar(columns: Any, schema: InputSchema, where: str = "inputs") -> ColumnTable:
    """Columns as lists of values: `{"col": [values], ...}`, all of one length."""
    if not isinstance(columns, dict):
        raise InvalidInput(f"{where} must be an object of column: [values], got {_json_type(columns)}")
    _key_problem(columns.keys(), schema, where)
    lengths = {}
    for name in schema.names:
        values = columns[name]
        if not isinstance(values, list):
            raise InvalidInput(f"{where}.{name} must be a list of values (one per row), got {_json_type(values)}")
        lengths[name] = len(values)
    if len(set(lengths.values())) > 1:
        raise InvalidInput(f"{where}: the columns have different lengths ({_shown_dict(lengths)}); every column needs one value per row")
    n_rows = next(iter(lengths.values()), 0)
    if n_rows == 0:
        raise InvalidInput(f"{where} has no rows; send at least one value per column")
    return ColumnTable(
        schema,
        {c.name: column_array(c, columns[c.name], _locator(where, c.name, False, records=False)) for c in schema.columns},
        n_rows,
    )


def decode_frame(frame: Any, schema: InputSchema) -> ColumnTable:
    """A pandas DataFrame (from a Ray handle or a batch job), checked like any request: the
    same columns, values of each column's kind, NaN/None/NA as null. Needs no pandas import."""
    _key_problem([str(c) for c in frame.columns], schema, "the DataFrame")
    if len(frame) == 0:
        raise InvalidInput("the DataFrame has no rows")
    arrays = {}
    for column in schema.columns:
        series = frame[column.name]
        values = series.astype(object).where(series.notna(), None).tolist()
        arrays[column.name] = column_array(column, values, _frame_locator())
    return ColumnTable(schema, arrays, len(frame))


# --- OIP V2 ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedInferRequest:
    table: ColumnTable
    outputs: tuple[RequestedOutput, ...] | None  # None: the client named none, send all
    binary_default: bool
    id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


def decode_v2(body: bytes, schema: InputSchema, header_length: str | None = None) -> NamedInferRequest:
    """An OIP V2 infer request with one named input per column (shape [rows] or [rows, 1]),
    as JSON `data` or, with `header_length`, Triton's binary form."""
    example = _v2_example(schema)
    json_part, data_start = split_body(body, header_length)
    payload = require_object(loads_allowing_nan(json_part), example)
    inputs = require_key(payload, "inputs", example)
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise InvalidInput(f"inputs must be a list of named inputs, one per column; expected {example}")
    parameters, binary_default = request_parameters(payload)
    names = [spec.get("name") for spec in inputs]
    duplicated = sorted({str(n) for n in names if names.count(n) > 1})
    if duplicated:
        raise InvalidInput(f"inputs name column {duplicated[0]!r} more than once")
    _key_problem([n if isinstance(n, str) else repr(n) for n in names], schema, "inputs")
    arrays: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    offset = data_start
    for index, spec in enumerate(inputs):
        column = schema.column(spec["name"])
        assert column is not None  # _key_problem checked every name
        arrays[column.name], offset = _v2_input(column, spec, f"inputs[{index}] ({column.name!r})", body, offset)
        rows[column.name] = len(arrays[column.name])
    if offset != len(body):
        raise BadRequest(f"the body has {len(body) - offset} bytes after the declared tensor data; check binary_data_size")
    if len(set(rows.values())) > 1:
        raise InvalidInput(f"inputs have different numbers of rows ({_shown_dict(rows)}); every column needs one value per row")
    n_rows = next(iter(rows.values()), 0)
    if n_rows == 0:
        raise InvalidInput("inputs have no rows")
    request_id = payload.get("id")
    return NamedInferRequest(
        table=ColumnTable(schema, {name: arrays[name] for name in schema.names}, n_rows),
        outputs=requested_outputs(payload, binary_default),
        binary_default=binary_default,
        id=str(request_id) if request_id is not None else None,
        parameters=parameters,
    )


def _v2_input(column: Column, spec: Mapping[str, Any], where: str, body: bytes, offset: int) -> tuple[np.ndarray, int]:
    datatype = spec.get("datatype")
    accepted = ACCEPTED_DATATYPES[column.kind]
    if datatype not in accepted:
        raise InvalidInput(
            f"column {column.name!r} is {_kind_phrase(column)}: send datatype {column.v2_datatype}"
            f"{' (or ' + ', '.join(d for d in accepted if d != column.v2_datatype) + ')' if len(accepted) > 1 else ''}"
            f", got {datatype!r}"
        )
    shape = shape_of(spec, where)
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInput(f"{where}.shape must be [rows] or [rows, 1] (one column), got {list(shape)}")
    count = shape[0]
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{where}.parameters must be an object")
    size = parameters.get("binary_data_size")
    locate = _locator(where + ".data", column.name, False, records=False, prefix=False)
    if size is None:
        if "data" not in spec:
            raise InvalidInput(f"{where} needs 'data' (or parameters.binary_data_size with binary data)")
        values = _flat(spec["data"], where)
        if len(values) != count:
            raise InvalidInput(f"{where}.data has {len(values)} values but shape {list(shape)} needs {count}")
        if datatype in ("FP32", "FP16"):  # rounded to the declared type, as binary data is
            values = [_rounded(v, DATATYPES[datatype]) for v in values]
        return column_array(column, values, locate), offset
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"{where}.parameters.binary_data_size must be a byte count")
    if len(body) - offset < size:
        raise BadRequest(f"{where}: the body holds {len(body) - offset} bytes of tensor data after the previous ones, {size} were declared")
    if datatype == "BYTES":
        return column_array(column, _bytes_elements(body, offset, size, count, where), locate), offset + size
    dtype = DATATYPES[datatype]
    if size != count * dtype.itemsize:
        raise BadRequest(f"{where}: binary_data_size is {size} bytes but shape {list(shape)} of {datatype} needs {count * dtype.itemsize}")
    tensor = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return _typed_array(column, tensor, datatype, locate), offset + size


def _bytes_elements(body: bytes, offset: int, size: int, count: int, where: str) -> list[Any]:
    """The strings of a binary BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    values: list[Any] = []
    position, end = offset, offset + size
    view = memoryview(body)
    for index in range(count):
        if position + 4 > end:
            raise BadRequest(f"{where}: binary BYTES data ends before element {index} of {count} (each is a 4-byte length, then the bytes)")
        length = int.from_bytes(view[position : position + 4], "little")
        position += 4
        if position + length > end:
            raise BadRequest(f"{where}: BYTES element {index} declares {length} bytes, beyond binary_data_size")
        try:
            values.append(bytes(view[position : position + length]).decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"{where}: BYTES element {index} is not UTF-8 text") from None
        position += length
    if position != end:
        raise BadRequest(f"{where}: binary_data_size is {size} bytes but the {count} BYTES elements take {position - offset}")
    return values


def _typed_array(column: Column, tensor: np.ndarray, datatype: str, locate: Callable[[int], str]) -> np.ndarray:
    """A binary numeric or BOOL tensor checked against its column (datatype already fits)."""
    if column.kind == "boolean":
        return tensor.astype(bool) if not column.nullable else tensor.astype(object)
    if column.kind == "number":
        values = tensor.astype(np.float64)
        nan = np.isnan(values)
        if nan.any() and not column.nullable:
            raise InvalidInput(_null_message(column, locate(int(np.argmax(nan)))))
        if np.isinf(values).any():
            raise InvalidInput(f"column {column.name!r}: {locate(int(np.argmax(np.isinf(values))))} is infinite; expected a finite number")
        return values
    # integer
    if datatype == "UINT64" and tensor.size and int(tensor.max()) > _INT64.max:
        raise InvalidInput(f"column {column.name!r}: {locate(int(np.argmax(tensor > _INT64.max)))} is beyond the int64 range")
    values = tensor.astype(np.int64)
    _check_dtype_range(column, values, locate)
    return values if not column.nullable else values.astype(object)


# --- per-column checks -------------------------------------------------------------------


def column_array(column: Column, values: Sequence[Any], locate: Callable[[int], str]) -> np.ndarray:
    """Python values (JSON-decoded, or from a DataFrame) as the column's array; a 422 naming
    the column and the value's place for anything of the wrong kind, a forbidden null, or an
    unknown category the model does not accept."""
    n = len(values)
    if column.kind == "number":
        out = np.empty(n, dtype=np.float64)
        for i, value in enumerate(values):
            kind = type(value)
            if kind is float or kind is int or isinstance(value, (np.floating, np.integer)) and kind is not np.bool_:
                number = float(value)
                if number != number:
                    if not column.nullable:
                        raise InvalidInput(_null_message(column, locate(i)))
                elif math.isinf(number):
                    raise InvalidInput(f"column {column.name!r}: {locate(i)} is infinite; expected a finite number")
                out[i] = number
            elif value is None:
                if not column.nullable:
                    raise InvalidInput(_null_message(column, locate(i)))
                out[i] = np.nan
            else:
                raise InvalidInput(_type_message(column, value, locate(i)))
        return out
    if column.kind == "integer":
        ints: list[Any] = [None] * n
        for i, value in enumerate(values):
            if value is None or (isinstance(value, float) and value != value):
                if not column.nullable:
                    raise InvalidInput(_null_message(column, locate(i)))
                continue
            if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
                whole = int(value)
            elif isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
                whole = int(value)
            else:
                raise InvalidInput(_type_message(column, value, locate(i)))
            if not _INT64.min <= whole <= _INT64.max:
                raise InvalidInput(f"column {column.name!r}: {locate(i)} is {whole}, beyond the int64 range")
            ints[i] = whole
        if column.nullable:
            return np.array(ints + [None], dtype=object)[:n]  # (the None keeps numpy from making ints)
        array = np.array(ints, dtype=np.int64)
        _check_dtype_range(column, array, locate)
        return array
    if column.kind == "boolean":
        flags: list[Any] = [None] * n
        for i, value in enumerate(values):
            if value is None or (isinstance(value, float) and value != value):
                if not column.nullable:
                    raise InvalidInput(_null_message(column, locate(i)))
            elif isinstance(value, (bool, np.bool_)):
                flags[i] = bool(value)
            else:
                raise InvalidInput(_type_message(column, value, locate(i)))
        if column.nullable:
            return np.array(flags + [None], dtype=object)[:n]
        return np.array(flags, dtype=bool)
    # string
    known = _known_categories(column)
    strings = np.empty(n, dtype=object)
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and value != value):
            if not column.nullable:
                raise InvalidInput(_null_message(column, locate(i)))
        elif isinstance(value, str):
            if known is not None and value not in known:
                raise InvalidInput(_category_message(column, value, locate(i)))
            strings[i] = value
        else:
            raise InvalidInput(_type_message(column, value, locate(i)))
    return strings


_CATEGORY_SETS: dict[int, tuple[tuple[str, ...], frozenset[str]]] = {}


def _known_categories(column: Column) -> frozenset[str] | None:
    """The categories a `refused` column accepts (a set built once per schema), else None."""
    if column.unknown_categories == "allowed" or column.categories is None:
        return None
    cached = _CATEGORY_SETS.get(id(column.categories))
    if cached is None or cached[0] is not column.categories:
        if len(_CATEGORY_SETS) > 256:
            _CATEGORY_SETS.clear()
        cached = (column.categories, frozenset(column.categories))
        _CATEGORY_SETS[id(column.categories)] = cached
    return cached[1]


def _check_dtype_range(column: Column, values: np.ndarray, locate: Callable[[int], str]) -> None:
    """Integers must fit the integer dtype the model was fitted with (int32 ...), not wrap."""
    dtype = column.pandas_dtype.lower()
    if dtype not in _NARROW_INTS or not values.size:
        return
    limits = np.iinfo(np.dtype(dtype))
    outside = (values < limits.min) | (values > limits.max)
    if outside.any():
        index = int(np.argmax(outside))
        raise InvalidInput(
            f"column {column.name!r}: {locate(index)} is {int(values[index])}, outside "
            f"{limits.min}..{limits.max}, the range of its dtype {column.pandas_dtype}"
        )


def _as_dtype(column: Column, values: np.ndarray, pd: Any) -> Any:
    dtype = column.pandas_dtype
    if dtype in _NUMPY_DTYPES:
        return values.astype(dtype, copy=False)
    if dtype == "category":
        seen = {v for v in values if v is not None}
        categories = sorted(set(column.categories or ()) | seen)
        return pd.Categorical(values, categories=categories)
    if dtype == "object":
        out = values.astype(object, copy=True)
        out[pd.isna(out)] = np.nan
        return pd.Series(out, dtype=object)  # (a bare array of str would become pandas' str dtype)
    return pd.array(values, dtype=dtype)


# --- messages ----------------------------------------------------------------------------

_KIND_PHRASES = {"number": "a number", "integer": "an integer", "boolean": "true or false", "string": "a string"}


def _kind_phrase(column: Column) -> str:
    return {"number": "a number column", "integer": "an integer column", "boolean": "a boolean column", "string": "a string column"}[column.kind]


def _type_message(column: Column, value: Any, at: str) -> str:
    hint = ""
    if column.kind == "boolean" and isinstance(value, (int, float, str)):
        hint = " (1/0 and strings are not booleans)"
    elif column.kind == "string" and isinstance(value, (int, float)) and not isinstance(value, bool):
        hint = f' (send "{value}" if that is the category)'
    elif column.kind == "integer" and isinstance(value, float):
        hint = " (a whole number)"
    return f"column {column.name!r}: {at} is {_shown(value)}; expected {_KIND_PHRASES[column.kind]}{hint}"


def _null_message(column: Column, at: str) -> str:
    return (
        f"column {column.name!r}: {at} is null; this column does not take nulls "
        f"(expected {_KIND_PHRASES[column.kind]}: the model was not trained with missing values there)"
    )


def _category_message(column: Column, value: str, at: str) -> str:
    known = column.categories or ()
    listed = ", ".join(repr(c) for c in known[:SHOWN])
    more = f", and {len(known) - SHOWN} more" if len(known) > SHOWN else ""
    return (
        f"column {column.name!r}: {at} is {value[:60]!r}, a category never seen in training; "
        f"expected one of {listed}{more}"
    )


def _key_problem(keys: Any, schema: InputSchema, at: str) -> None:
    """Raises for the first missing or unknown column among `keys`; returns if they match."""
    present = set(keys)
    expected = schema.names
    missing = [name for name in expected if name not in present]
    if missing:
        column = schema.column(missing[0])
        assert column is not None
        raise InvalidInput(
            f"{at} is missing column {missing[0]!r} ({column.kind}); the model needs the columns {_listed(expected)}"
        )
    unknown = sorted(str(k) for k in present if k not in set(expected))
    if unknown:
        raise InvalidInput(f"{at} has unknown column {unknown[0]!r}; the model's columns are {_listed(expected)}")


def _locator(where: str, name: str, single: bool, records: bool, prefix: bool = True) -> Callable[[int], str]:
    if records:
        if single:
            return lambda i: f"{where}.{name}"
        return lambda i: f"{where}[{i}].{name}"
    if prefix:
        return lambda i: f"{where}.{name}[{i}]"
    return lambda i: f"{where}[{i}]"


def _frame_locator() -> Callable[[int], str]:
    return lambda i: f"the DataFrame's row {i}"


def _listed(names: Sequence[str]) -> str:
    more = f", and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return f"{str(bool(value)).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{value[:40]!r} (a string)"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return f"{value} (a number)"
    return f"{_json_type(value)}"


def _shown_dict(lengths: Mapping[str, int]) -> str:
    items = list(lengths.items())
    return ", ".join(f"{k}: {v}" for k, v in items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _flat(data: Any, where: str) -> list[Any]:
    """V2 JSON `data`, flat or nested as the shape ([[a], [b]] for [rows, 1])."""
    if not isinstance(data, list):
        raise InvalidInput(f"{where}.data must be a list, got {_json_type(data)}")
    if any(isinstance(v, list) for v in data):
        flat: list[Any] = []
        for v in data:
            flat.extend(_flat(v, where) if isinstance(v, list) else [v])
        return flat
    return data


def _rounded(value: Any, dtype: np.dtype[Any]) -> Any:
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        with np.errstate(over="ignore"):
            return float(dtype.type(value))
    return value


def _record_example(schema: InputSchema) -> str:
    examples = {"number": "1.5", "integer": "3", "boolean": "true", "string": '"a"'}
    parts = []
    for column in schema.columns[:4]:
        value = examples[column.kind]
        if column.kind == "string" and column.categories:
            value = '"' + column.categories[0][:20] + '"'
        parts.append(f'"{column.name}": {value}')
    return "{" + ", ".join(parts) + (", ..." if len(schema.columns) > 4 else "") + "}"


def _v2_example(schema: InputSchema) -> str:
    column = schema.columns[0]
    return (
        '{"inputs": [{"name": "' + column.name + '", "shape": [1], "datatype": "' + column.v2_datatype
        + '", "data": [...]}, ...]} (one input per column)'
    )
