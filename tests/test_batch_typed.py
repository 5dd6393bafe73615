"""`serve-app batch` for a model with named, typed columns: CSV text given each column's kind,
Parquet as stored, a bad row reported with its column, every other row predicted exactly as
the model's own `predict` would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_app.model.churn import TARGET, churn_frame, fit_churn
from serve_app.model.publish import publish
from serve_app.model.schema import Column, InputSchema
from serve_app.model.store import ModelStore
from serve_app.ops.batch import BatchError, check_typed, plan, plan_csv, predict_chunk, read_output, run_batch
from serve_app.ops.cli import main

N_ROWS = 400
# data row -> (column, CSV text planted there, fragment of the reason). One row per failure kind.
BAD_CELLS = {
    7: ("tenure_months", "abc", "column 'tenure_months': the value is 'abc' (a string); expected an integer"),
    19: ("tenure_months", "3.5", "column 'tenure_months': the value is 3.5 (a number); expected an integer"),
    42: ("paperless_billing", "yes", "column 'paperless_billing': the value is 'yes' (a string); expected true or false"),
    77: ("contract", "", "column 'contract': the value is null; this column does not take nulls"),
    150: ("monthly_charges", "cheap", "column 'monthly_charges': the value is 'cheap' (a string); expected a number"),
    151: ("monthly_charges", "inf", "column 'monthly_charges': the value is infinite"),
    300: ("support_calls", "", "column 'support_calls': the value is null"),
}
# Booleans as people write them: pandas writes True/False; these rows get the lower case.
LOWER_CASE_BOOLEAN_ROWS = range(0, N_ROWS, 3)


def publish_churn(store: ModelStore) -> Any:
    """The churn Pipeline published as a typed model, returned fitted."""
    frame = churn_frame(1500)
    model = fit_churn(frame)
    publish(model, name="churn", sample=frame.drop(columns=[TARGET]), store=store)
    return model


@pytest.fixture(scope="module")
def churn_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, Any]:
    store = ModelStore(tmp_path_factory.mktemp("typed") / "models")
    return store, publish_churn(store)


def requests_frame(seed: int = 1) -> pd.DataFrame:
    """Rows to predict, columns shuffled and one extra column the model ignores."""
    features = churn_frame(N_ROWS, seed=seed).drop(columns=[TARGET])
    assert features["monthly_charges"].isna().any()  # empty cells in a nullable column
    features = features[list(reversed(features.columns))]
    features.insert(2, "customer_id", [f"c{i}" for i in range(N_ROWS)])
    return features


def write_typed_csv(path: Path, frame: pd.DataFrame) -> list[str]:
    """The frame as CSV (header, NaN as empty), BAD_CELLS planted; returns the data lines."""
    lines = frame.to_csv(index=False).splitlines()
    header, data = lines[0].split(","), lines[1:]
    for row in LOWER_CASE_BOOLEAN_ROWS:
        data[row] = ",".join(f.lower() if f in ("True", "False") else f for f in data[row].split(","))
    for row, (column, text, _) in BAD_CELLS.items():
        fields = data[row].split(",")
        fields[header.index(column)] = text
        data[row] = ",".join(fields)
    path.write_text("\n".join([lines[0], *data]) + "\n")
    return data


def good_rows() -> list[int]:
    return [i for i in range(N_ROWS) if i not in BAD_CELLS]


def check_errors(errors: list[dict[str, Any]], lines: list[str] | None) -> None:
    assert [e["row"] for e in errors] == sorted(BAD_CELLS)
    for error in errors:
        assert BAD_CELLS[error["row"]][2] in error["error"], error
        if lines is not None:
            assert error["text"] == lines[error["row"]] and error["line"] == error["row"] + 2


# ---- unit: one chunk, no Ray ----------------------------------------------------------------


def test_csv_chunk_predicts_good_rows_and_names_the_column_of_each_bad_one(
    tmp_path: Path, churn_store: tuple[ModelStore, Any]
) -> None:
    store, model = churn_store
    frame = requests_frame()
    path = tmp_path / "in.csv"
    lines = write_typed_csv(path, frame)
    manifest = store.manifest("churn", "1")
    assert manifest.typed
    chunks, order, n_columns = plan(path, manifest.feature_names, 1 << 20, typed=True)
    (tmp_path / "errors").mkdir()
    out = predict_chunk(chunks[0], store=str(store.root), model="churn", version="1", order=order,
                        n_columns=n_columns, errors_dir=str(tmp_path / "errors"))
    good = good_rows()
    assert out.column("row").to_pylist() == good
    expected = model.predict(frame.iloc[good][manifest.feature_names])
    assert out.column("prediction").to_pylist() == expected.tolist()
    check_errors(pq.read_table(tmp_path / "errors" / "part-000000.parquet").to_pylist(), lines)


def test_parquet_chunk_takes_values_as_stored(tmp_path: Path, churn_store: tuple[ModelStore, Any]) -> None:
    store, model = churn_store
    frame = requests_frame()
    manifest = store.manifest("churn", "1")
    # Nulls where the schema forbids them, in an integer, a boolean and a string column.
    bad = {3: "tenure_months", 5: "paperless_billing", 8: "region"}
    table = pa.Table.from_pandas(frame, preserve_index=False)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    for row, column in bad.items():
        columns[column][row] = None
    table = pa.table({name: pa.array(values, type=table.schema.field(name).type) for name, values in columns.items()})
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=150)
    (tmp_path / "errors").mkdir()
    chunks, order, n_columns = plan(path, manifest.feature_names, 1 << 20, typed=True)
    assert len(chunks) == 3
    out = predict_chunk(chunks[0], store=str(store.root), model="churn", version="1", order=order,
                        n_columns=n_columns, errors_dir=str(tmp_path / "errors"))
    good = [i for i in range(150) if i not in bad]
    assert out.column("row").to_pylist() == good
    assert out.column("prediction").to_pylist() == model.predict(frame.iloc[good][manifest.feature_names]).tolist()
    errors = pq.read_table(tmp_path / "errors" / "part-000000.parquet").to_pylist()
    assert [e["row"] for e in errors] == sorted(bad)
    for error in errors:
        assert error["error"].startswith(f"column {bad[error['row']]!r}: the value is null; this column does not take nulls")
        assert error["line"] == 0 and "None" in error["text"]


def test_parquet_text_is_not_parsed_as_another_kind() -> None:
    """CSV fields are text given their column's kind; a Parquet string column is strings."""
    schema = InputSchema(columns=(Column(name="size", kind="integer"), Column(name="ok", kind="boolean")))
    table = pa.table({"size": ["12", "3"], "ok": ["true", "False"]})
    good, ok, reasons = check_typed(table, None, schema, from_text=False)
    assert good is None and ok.tolist() == [False, False]
    assert reasons[0] is not None and reasons[0].startswith("column 'size': the value is '12' (a string); expected an integer")
    good, ok, reasons = check_typed(table, None, schema, from_text=True)
    assert good is not None and good.columns["size"].tolist() == [12, 3] and good.columns["ok"].tolist() == [True, False]


def test_unknown_category_refused_where_the_schema_refuses_it() -> None:
    schema = InputSchema(columns=(
        Column(name="colour", kind="string", categories=("blue", "red")),
        Column(name="size", kind="integer"),
        Column(name="ok", kind="boolean", nullable=True),
    ))
    table = pa.table({"colour": ["red", "green", "blue", None], "size": ["1", "2", "x", "4"], "ok": ["True", "", "false", "FALSE"]})
    good, ok, reasons = check_typed(table, None, schema, from_text=True)
    assert ok.tolist() == [True, False, False, False]
    assert reasons[1] is not None and reasons[1].startswith("column 'colour': the value is 'green', a category never seen")
    assert reasons[2] is not None and reasons[2].startswith("column 'size': the value is 'x'")
    assert reasons[3] is not None and reasons[3].startswith("column 'colour': the value is null")
    assert good is not None and good.n_rows == 1
    assert good.columns["size"].tolist() == [1] and good.columns["ok"].tolist() == [True]


def test_csv_without_the_models_columns_is_refused(tmp_path: Path, churn_store: tuple[ModelStore, Any]) -> None:
    store, _ = churn_store
    path = tmp_path / "in.csv"
    path.write_text("tenure_months,contract\n3,one-year\n")
    with pytest.raises(BatchError, match=r"missing \['monthly_charges'"):
        run_batch("churn", path, tmp_path / "out.parquet", store=store.root)
    # As many columns as the model's, under other names: not taken in order as for numbers.
    path.write_text(",".join(f"c{i}" for i in range(8)) + "\n" + ",".join(["1"] * 7 + ["x"]) + "\n")
    with pytest.raises(BatchError, match="missing"):
        run_batch("churn", path, tmp_path / "out.parquet", store=store.root)


def test_plan_reads_a_typed_csv_header_by_name(tmp_path: Path, churn_store: tuple[ModelStore, Any]) -> None:
    store, _ = churn_store
    path = tmp_path / "in.csv"
    write_typed_csv(path, requests_frame())
    header, _ = plan_csv(path)
    manifest = store.manifest("churn", "1")
    _, order, n_columns = plan(path, manifest.feature_names, 1 << 20, typed=True)
    assert header is not None and n_columns == len(header) == len(manifest.feature_names) + 1
    assert order is not None and [header[i] for i in order] == manifest.feature_names


# ---- the job on Ray Data (the session's Ray) -------------------------------------------------


@pytest.mark.ray
def test_typed_csv_job_equals_the_models_predict(
    ray_session: Any, churn_store: tuple[ModelStore, Any], tmp_path: Path
) -> None:
    store, model = churn_store
    frame = requests_frame(seed=2)
    path = tmp_path / "in.csv"
    lines = write_typed_csv(path, frame)
    result = run_batch("churn", path, tmp_path / "out.parquet", store=store.root, chunk_bytes=4096, progress=False)
    good = good_rows()
    assert (result.rows, result.predicted, result.errors) == (N_ROWS, len(good), len(BAD_CELLS))
    out = read_output(result.output)
    assert out.column("row").to_pylist() == good
    features = store.manifest("churn", "1").feature_names
    assert out.column("prediction").to_pylist() == model.predict(frame.iloc[good][features]).tolist()
    check_errors(read_output(result.errors_output).to_pylist(), lines)


@pytest.mark.ray
def test_typed_parquet_job_and_cli(
    ray_session: Any, churn_store: tuple[ModelStore, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, model = churn_store
    frame = requests_frame(seed=3)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "in.parquet", row_group_size=100)
    args = ["batch", "--model", "churn", "--store", str(store.root), "--input", str(tmp_path / "in.parquet"),
            "--output", str(tmp_path / "out.parquet"), "--no-progress"]
    assert main(args) == 0
    assert f"churn v1: {N_ROWS} rows" in capsys.readouterr().out
    out = read_output(tmp_path / "out.parquet")
    features = store.manifest("churn", "1").feature_names
    assert out.column("row").to_pylist() == list(range(N_ROWS))
    assert out.column("prediction").to_pylist() == model.predict(frame[features]).tolist()
    assert np.array_equal(out.column("prediction").to_numpy(), model.predict(frame[features]))
