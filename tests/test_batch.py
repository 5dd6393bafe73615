"""`serve-app batch`: the same predictions as in-process `Predictor.predict`, bad rows reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_app.ops.batch import BatchError, Chunk, plan_csv, predict_chunk, read_output, run_batch
from serve_app.ops.cli import main
from serve_app.model.predictor import Predictor
from serve_app.model.store import ModelStore

FEATURES = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
# (line text, expected error fragment) planted among good rows
BAD_LINES = {
    3: ("6.7,3.0,5.2", "expected 4 fields, got 3 fields"),
    10: ("1,x,3,4", "feature sepal width (cm) is 'x', not a number"),
    11: ("", "empty line"),
    57: ("5.9,3.0,4.2,1.5,9", "expected 4 fields, got 5 fields"),
    120: ("1,nan,1,1", "feature sepal width (cm) is nan; features must be finite numbers"),
    121: ("1,,2,3", "feature sepal width (cm) is empty"),
    299: ("inf,1,2,3", "feature sepal length (cm) is inf"),
}


def write_csv(path: Path, n_rows: int, *, header: bool = True, seed: int = 0) -> np.ndarray:
    """n_rows data rows, BAD_LINES planted at those data-row indexes; returns the good rows."""
    rows = np.random.default_rng(seed).uniform(0.1, 7.0, size=(n_rows, 4)).round(2)
    with open(path, "w") as handle:
        if header:
            handle.write(",".join(FEATURES) + "\n")
        for index, row in enumerate(rows):
            handle.write((BAD_LINES[index][0] if index in BAD_LINES else ",".join(map(str, row))) + "\n")
    return rows


# ---- unit: planning and one chunk, no Ray ---------------------------------------------------


def test_plan_numbers_rows_and_lines_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    write_csv(path, 300)
    header, chunks = plan_csv(path, chunk_bytes=200)
    assert header == FEATURES
    assert len(chunks) > 10
    assert chunks[0].first_row == 0 and chunks[0].first_line == 2
    lines = path.read_bytes().split(b"\n")
    for chunk in chunks:  # each chunk starts exactly at its row's line
        with open(path, "rb") as handle:
            handle.seek(chunk.start)
            assert handle.readline().rstrip(b"\n") == lines[chunk.first_line - 1]
    last = chunks[-1]
    assert last.end == path.stat().st_size


def test_predict_chunk_matches_predictor_and_reports_each_bad_row(tmp_path: Path, iris_store: ModelStore) -> None:
    path = tmp_path / "in.csv"
    rows = write_csv(path, 300)
    header, chunks = plan_csv(path, chunk_bytes=1 << 20)
    (tmp_path / "errors").mkdir()
    table = predict_chunk(
        chunks[0], store=str(iris_store.root), model="iris", version="1", order=[0, 1, 2, 3],
        n_columns=4, errors_dir=str(tmp_path / "errors"),
    )
    good = [i for i in range(300) if i not in BAD_LINES]
    assert table.column("row").to_pylist() == good
    expected = Predictor.load(iris_store, "iris", "1").predict(rows[good])
    assert table.column("prediction").to_pylist() == expected.tolist()
    errors = pq.read_table(tmp_path / "errors" / "part-000000.parquet").to_pylist()
    assert [e["row"] for e in errors] == sorted(BAD_LINES)
    for error in errors:
        text, reason = BAD_LINES[error["row"]]
        assert error["text"] == text and reason in error["error"]
        assert error["line"] == error["row"] + 2  # 1-based, after the header


def test_parquet_row_group_with_nulls(tmp_path: Path, iris_store: ModelStore) -> None:
    values = [[5.1, 3.5, 1.4, 0.2], [None, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
    table = pa.table({name: [row[j] for row in values] for j, name in enumerate(FEATURES)})
    pq.write_table(table, tmp_path / "in.parquet")
    (tmp_path / "errors").mkdir()
    chunk = Chunk(0, str(tmp_path / "in.parquet"), "parquet", 0, 0, 0, 0)
    out = predict_chunk(chunk, store=str(iris_store.root), model="iris", version="1", order=[0, 1, 2, 3],
                        n_columns=4, errors_dir=str(tmp_path / "errors"))
    assert out.column("row").to_pylist() == [0, 2]
    errors = pq.read_table(tmp_path / "errors" / "part-000000.parquet").to_pylist()
    assert errors[0]["row"] == 1 and errors[0]["error"] == "feature sepal length (cm) is empty"


def test_header_that_does_not_name_the_features_is_refused(tmp_path: Path, iris_store: ModelStore) -> None:
    path = tmp_path / "in.csv"
    path.write_text("sepal length (cm),colour\n1,red\n")
    with pytest.raises(BatchError, match="missing"):
        run_batch("iris", path, tmp_path / "out.parquet", store=iris_store.root)


# ---- the job on Ray Data (the session's Ray) -------------------------------------------------


@pytest.mark.ray
def test_csv_job_equals_in_process_predict(ray_session: Any, session_store: ModelStore, tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    rows = write_csv(path, 3000, seed=1)
    result = run_batch("iris", path, tmp_path / "out.parquet", store=session_store.root, chunk_bytes=4096, progress=False)
    good = [i for i in range(3000) if i not in BAD_LINES]
    assert (result.rows, result.predicted, result.errors) == (3000, len(good), len(BAD_LINES))
    assert result.version == "1"  # production, resolved once for the whole job
    out = read_output(result.output)
    assert out.column("row").to_pylist() == good
    expected = Predictor.load(session_store, "iris", "production").predict(rows[good])
    assert out.column("prediction").to_pylist() == expected.tolist()
    errors = read_output(result.errors_output).to_pylist()
    assert {e["row"]: (e["text"], e["error"]) for e in errors}.keys() == BAD_LINES.keys()
    assert all(BAD_LINES[e["row"]][1] in e["error"] for e in errors)


@pytest.mark.ray
def test_parquet_job_with_a_named_version(ray_session: Any, session_store: ModelStore, tmp_path: Path) -> None:
    rows = np.random.default_rng(2).uniform(0.1, 7.0, size=(5000, 4)).round(2)
    # Columns in another order than the model's, and several row groups.
    table = pa.table({name: rows[:, j] for j, name in reversed(list(enumerate(FEATURES)))})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=1000)
    result = run_batch("iris:2", tmp_path / "in.parquet", tmp_path / "out.parquet", store=session_store.root, progress=False)
    assert (result.version, result.rows, result.predicted, result.errors) == ("2", 5000, 5000, 0)
    out = read_output(result.output)
    model = Predictor.load(session_store, "iris", "2").model  # the RandomForest, plain sklearn
    assert out.column("prediction").to_pylist() == model.predict(rows).tolist()


@pytest.mark.ray
def test_cli_batch(ray_session: Any, session_store: ModelStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "in.csv"
    write_csv(path, 400, header=False)
    args = ["batch", "--store", str(session_store.root), "--input", str(path), "--output", str(tmp_path / "p.parquet"), "--no-progress"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "iris v1: 400 rows" in said and f"{len(BAD_LINES)} bad rows" in said
    assert main(args) == 2  # the output exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
