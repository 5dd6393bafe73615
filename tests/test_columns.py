"""Named, typed columns on every wire format (protocol/columns.py): decoding, per-column 422s,
the DataFrame the model gets, and batching across requests."""

from __future__ import annotations

import struct
import subprocess
import sys
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from sklearn.pipeline import Pipeline

from serve_app.errors import BadRequest, InvalidInput
from serve_app.model.churn import TARGET, churn_frame, fit_churn
from serve_app.model.schema import Column, InputSchema, infer_schema
from serve_app.protocol import columns
from serve_app.protocol.columns import ColumnTable, concat

SCHEMA = InputSchema(
    columns=(
        Column(name="tenure", kind="integer"),
        Column(name="charges", kind="number", nullable=True),
        Column(name="contract", kind="string", categories=("monthly", "yearly"), dtype="str"),
        Column(name="region", kind="string", categories=tuple(f"r{i:02d}" for i in range(15)), unknown_categories="allowed", nullable=True),
        Column(name="paperless", kind="boolean"),
    )
)
RECORD: dict[str, Any] = {"tenure": 3, "charges": 20.5, "contract": "monthly", "region": "r01", "paperless": True}
RECORD_2: dict[str, Any] = {"tenure": 40, "charges": None, "contract": "yearly", "region": "elsewhere", "paperless": False}


def _body(payload: Any) -> bytes:
    return orjson.dumps(payload)


def _expected_table(table: ColumnTable) -> None:
    assert table.n_rows == 2 and list(table.columns) == SCHEMA.names
    assert table.columns["tenure"].dtype == np.int64 and table.columns["tenure"].tolist() == [3, 40]
    assert table.columns["charges"].dtype == np.float64
    assert table.columns["charges"][0] == 20.5 and np.isnan(table.columns["charges"][1])
    assert table.columns["contract"].tolist() == ["monthly", "yearly"]
    assert table.columns["region"].tolist() == ["r01", "elsewhere"]  # unknown, but allowed
    assert table.columns["paperless"].dtype == bool and table.columns["paperless"].tolist() == [True, False]


def test_predict_records_one_or_many() -> None:
    one = columns.decode_predict(_body({"features": RECORD}), SCHEMA)
    assert one.single and one.table.n_rows == 1
    many = columns.decode_predict(_body({"features": [RECORD, RECORD_2]}), SCHEMA)
    assert not many.single
    _expected_table(many.table)


def test_kserve_v1_instances_and_columnar_inputs() -> None:
    _expected_table(columns.decode_kserve_v1(_body({"instances": [RECORD, RECORD_2]}), SCHEMA))
    columnar = {name: [RECORD[name], RECORD_2[name]] for name in SCHEMA.names}
    _expected_table(columns.decode_kserve_v1(_body({"inputs": columnar}), SCHEMA))
    with pytest.raises(InvalidInput, match=r"different lengths \(tenure: 2, charges: 1"):
        columns.decode_kserve_v1(_body({"inputs": {**columnar, "charges": [1.0]}}), SCHEMA)


def _v2_input(name: str, datatype: str, data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": [len(data), 1], "data": data}


V2_JSON = {
    "inputs": [
        _v2_input("tenure", "INT64", [3, 40]),
        _v2_input("charges", "FP64", [20.5, None]),
        _v2_input("contract", "BYTES", ["monthly", "yearly"]),
        _v2_input("region", "BYTES", ["r01", "elsewhere"]),
        _v2_input("paperless", "BOOL", [True, False]),
    ],
    "outputs": [{"name": "predict"}],
    "id": "7",
}


def test_v2_one_named_input_per_column_as_json() -> None:
    request = columns.decode_v2(_body(V2_JSON), SCHEMA)
    _expected_table(request.table)
    assert request.id == "7" and request.outputs is not None and request.outputs[0].name == "predict"


def test_v2_json_nan_tokens_are_nulls_as_tritonclient_writes_them() -> None:
    # tritonclient's JSON mode writes a float NaN as the bare token NaN (not JSON).
    body = _body(V2_JSON).replace(b"null", b"NaN")
    assert b"NaN" in body
    _expected_table(columns.decode_v2(body, SCHEMA).table)
    not_nullable = _body(V2_JSON).replace(b"[3,40]", b"[3,NaN]").replace(b'"INT64"', b'"FP64"')
    with pytest.raises(InvalidInput, match="tenure"):
        columns.decode_v2(not_nullable, SCHEMA)
    with pytest.raises(InvalidInput, match="charges"):
        columns.decode_v2(_body(V2_JSON).replace(b"null", b"Infinity"), SCHEMA)
    with pytest.raises(BadRequest, match="not valid JSON"):
        columns.decode_v2(_body(V2_JSON).replace(b"null", b"nope"), SCHEMA)
    # An attack on the lenient reader: nesting past orjson's limit (and Python's recursion
    # limit), with a NaN to reach the second reader, is a 400 like any invalid JSON.
    with pytest.raises(BadRequest, match="not valid JSON"):
        columns.decode_v2(b"[" * 100_000 + b"NaN" + b"]" * 100_000, SCHEMA)


def _bytes_tensor(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


def _binary_v2(tensors: list[tuple[str, str, bytes, int]]) -> tuple[bytes, str]:
    inputs = [
        {"name": name, "datatype": datatype, "shape": [rows], "parameters": {"binary_data_size": len(data)}}
        for name, datatype, data, rows in tensors
    ]
    header = _body({"inputs": inputs})
    return header + b"".join(data for _, _, data, _ in tensors), str(len(header))


BINARY_TENSORS = [
    ("tenure", "INT32", np.array([3, 40], dtype="<i4").tobytes(), 2),
    ("charges", "FP32", np.array([20.5, np.nan], dtype="<f4").tobytes(), 2),  # NaN: null
    ("contract", "BYTES", _bytes_tensor(["monthly", "yearly"]), 2),
    ("region", "BYTES", _bytes_tensor(["r01", "elsewhere"]), 2),
    ("paperless", "BOOL", np.array([True, False]).tobytes(), 2),
]


def test_v2_binary_tensors_with_length_prefixed_bytes() -> None:
    body, header_length = _binary_v2(BINARY_TENSORS)
    _expected_table(columns.decode_v2(body, SCHEMA, header_length).table)


def test_v2_broken_bytes_framing_is_a_400() -> None:
    broken = [*BINARY_TENSORS[:2], ("contract", "BYTES", struct.pack("<I", 99) + b"monthly", 2), *BINARY_TENSORS[3:]]
    body, header_length = _binary_v2(broken)
    with pytest.raises(BadRequest, match=r"inputs\[2\] \('contract'\): BYTES element 0 declares 99 bytes"):
        columns.decode_v2(body, SCHEMA, header_length)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tenure": "3"}, r"column 'tenure': features\[1\]\.tenure is '3' \(a string\); expected an integer"),
        ({"tenure": 3.5}, r"column 'tenure': .* is 3.5 \(a number\); expected an integer \(a whole number\)"),
        ({"charges": "cheap"}, r"column 'charges': .* expected a number"),
        ({"contract": 1}, r"column 'contract': .* is 1 \(a number\); expected a string \(send \"1\""),
        ({"paperless": 1}, r"column 'paperless': .* is 1 \(a number\); expected true or false \(1/0 and strings"),
        ({"paperless": "true"}, r"column 'paperless': .* expected true or false"),
        ({"paperless": None}, r"column 'paperless': features\[1\]\.paperless is null; this column does not take nulls"),
        ({"contract": "weekly"}, r"column 'contract': .* 'weekly', a category never seen in training; expected one of 'monthly', 'yearly'"),
        ({"tenure": 2**63}, r"column 'tenure': .* beyond the int64 range"),
    ],
)
def test_a_bad_value_is_a_422_naming_the_column_and_what_was_expected(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        columns.decode_predict(_body({"features": [RECORD, {**RECORD, **change}]}), SCHEMA)
    assert caught.value.status_code == 422


def test_missing_and_unknown_columns_are_named() -> None:
    without = {k: v for k, v in RECORD.items() if k != "region"}
    with pytest.raises(InvalidInput, match=r"features is missing column 'region' \(string\); the model needs the columns tenure, charges"):
        columns.decode_predict(_body({"features": without}), SCHEMA)
    with pytest.raises(InvalidInput, match=r"instances\[0\] has unknown column 'colour'"):
        columns.decode_kserve_v1(_body({"instances": [{**RECORD, "colour": "red"}]}), SCHEMA)
    with pytest.raises(InvalidInput, match=r"features\[0\] must be a record of named columns such as \{\"tenure\": 3, .*got a number; this model takes named columns"):
        columns.decode_predict(_body({"features": [1, 2, 3]}), SCHEMA)


def test_unknown_category_lists_the_known_ones_truncated() -> None:
    schema = InputSchema(columns=(Column(name="code", kind="string", categories=tuple(f"c{i:02d}" for i in range(25))),))
    with pytest.raises(InvalidInput, match=r"expected one of 'c00', .*'c09', and 15 more$"):
        columns.decode_records([{"code": "zz"}], schema)


def test_v2_datatype_must_fit_the_column() -> None:
    bad = {"inputs": [*V2_JSON["inputs"][:4], _v2_input("paperless", "INT64", [1, 0])]}
    with pytest.raises(InvalidInput, match=r"column 'paperless' is a boolean column: send datatype BOOL, got 'INT64'"):
        columns.decode_v2(_body(bad), SCHEMA)
    bad = {"inputs": [_v2_input("tenure", "FP64", [3.0, 40.0]), *V2_JSON["inputs"][1:]]}
    with pytest.raises(InvalidInput, match=r"column 'tenure' is an integer column: send datatype INT64 \(or INT8"):
        columns.decode_v2(_body(bad), SCHEMA)
    nan_tensors = [("tenure", "INT64", np.array([3, 40], dtype="<i8").tobytes(), 2), *BINARY_TENSORS[1:]]
    nan_tensors[1] = ("charges", "FP64", np.array([1.0, np.inf]).tobytes(), 2)
    body, header_length = _binary_v2(nan_tensors)
    with pytest.raises(InvalidInput, match=r"column 'charges': inputs\[1\] \('charges'\)\.data\[1\] is infinite"):
        columns.decode_v2(body, SCHEMA, header_length)


def test_to_dataframe_gives_the_training_dtypes() -> None:
    schema = InputSchema(
        columns=(
            Column(name="n", kind="integer", nullable=True, dtype="Int64"),
            Column(name="small", kind="integer", dtype="int32"),
            Column(name="f", kind="boolean", nullable=True, dtype="boolean"),
            Column(name="c", kind="string", categories=("a", "b"), dtype="category", unknown_categories="allowed"),
            Column(name="o", kind="string", nullable=True, categories=("a",), dtype="object"),
            Column(name="s", kind="string", nullable=True, categories=("a",), dtype="string"),
        )
    )
    table = columns.decode_records([{"n": 1, "small": 2, "f": True, "c": "z", "o": None, "s": None}, {"n": None, "small": 5, "f": None, "c": "a", "o": "a", "s": "a"}], schema)
    frame = table.to_dataframe()
    assert [str(t) for t in frame.dtypes] == ["Int64", "int32", "boolean", "category", "object", "string"]
    assert frame["n"].isna().tolist() == [False, True] and frame["f"].isna().tolist() == [False, True]
    assert list(frame["c"].cat.categories) == ["a", "b", "z"] and frame["c"].tolist() == ["z", "a"]
    assert np.isnan(frame["o"][0]) and frame["s"].isna().tolist() == [True, False]
    with pytest.raises(InvalidInput, match=r"column 'small': records\[0\]\.small is 4294967296, outside -2147483648..2147483647, the range of its dtype int32"):
        columns.decode_records([{**table_row(table, 0), "small": 2**32}], schema)


def table_row(table: ColumnTable, index: int) -> dict[str, Any]:
    return {name: (None if array[index] is None else array[index].item() if hasattr(array[index], "item") else array[index]) for name, array in table.columns.items()}


def test_concat_batches_tables_in_order() -> None:
    a = columns.decode_records([RECORD], SCHEMA)
    b = columns.decode_records([RECORD_2, RECORD], SCHEMA)
    both = concat([a, b])
    assert both.n_rows == 3
    assert both.columns["tenure"].tolist() == [3, 40, 3] and both.columns["contract"].tolist() == ["monthly", "yearly", "monthly"]
    with pytest.raises(ValueError, match="different schemas"):
        concat([a, columns.decode_records([{"x": 1.0}], InputSchema.numeric(["x"]))])


@pytest.fixture(scope="module")
def churn() -> tuple[Pipeline, pd.DataFrame, InputSchema]:
    frame = churn_frame(n_rows=600, seed=3)
    features = frame.drop(columns=[TARGET])
    model = fit_churn(frame)
    return model, features, infer_schema(model, features)


def _binary_column(column: Column, values: pd.Series) -> tuple[str, str, bytes, int]:
    if column.kind == "string":
        data = _bytes_tensor([str(v) for v in values])
    else:
        data = values.to_numpy(dtype={"number": "<f8", "integer": "<i8", "boolean": "?"}[column.kind]).tobytes()
    return column.name, column.v2_datatype, data, len(values)


def _records(features: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in features.to_dict("records")]


def test_every_format_predicts_what_the_model_predicts_on_the_frame(churn: tuple[Pipeline, pd.DataFrame, InputSchema]) -> None:
    model, features, schema = churn
    rows = features.iloc[:40].reset_index(drop=True)
    assert rows["monthly_charges"].isna().any()  # nulls travel too
    expected = model.predict_proba(rows)
    records = _records(rows)
    v2 = {"inputs": [_v2_input(c.name, c.v2_datatype, [r[c.name] for r in records]) for c in schema.columns]}
    binary_body, header_length = _binary_v2([_binary_column(c, rows[c.name]) for c in schema.columns])
    tables = {
        "predict": columns.decode_predict(_body({"features": records}), schema).table,
        "kserve-records": columns.decode_kserve_v1(_body({"instances": records}), schema),
        "kserve-columnar": columns.decode_kserve_v1(_body({"inputs": {c: [r[c] for r in records] for c in schema.names}}), schema),
        "v2-json": columns.decode_v2(_body(v2), schema).table,
        "v2-binary": columns.decode_v2(binary_body, schema, header_length).table,
        "frame": columns.decode_frame(rows, schema),
        "batched": concat([columns.decode_records(records[:15], schema), columns.decode_records(records[15:], schema)]),
    }
    for name, table in tables.items():
        frame = table.to_dataframe()
        assert list(frame.dtypes) == list(rows.dtypes), name
        np.testing.assert_array_equal(model.predict_proba(frame), expected, err_msg=name)


def test_importing_columns_does_not_import_pandas() -> None:
    code = "import sys, serve_app.protocol.columns; assert 'pandas' not in sys.modules, 'pandas imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
