"""cli/sql_shell.py without a terminal or a store: the `csr sql` shell and result writers
over an in-memory DuckDB, fed and read through string streams."""

from __future__ import annotations

import io
import json
from pathlib import Path

import duckdb
import pytest

from csr.cli import sql_shell
from csr.cli.vocabulary import SqlFormat
from csr.storage import StoreError


@pytest.fixture
def con():
    con = duckdb.connect()
    con.execute("CREATE TABLE prompts (id INTEGER, text VARCHAR, done BOOLEAN, day DATE, params JSON, score DOUBLE)")
    con.execute("""INSERT INTO prompts VALUES
        (1, 'a cat', true, DATE '2024-05-01', '{"rule": "sum"}', 0.5),
        (2, NULL, false, NULL, NULL, 'nan'::DOUBLE),
        (3, 'a dog', true, DATE '2024-05-03', '[1, 2]', 2.25)""")
    yield con
    con.close()


def shell(con, text: str, max_rows: int = 1000) -> str:
    stdout = io.StringIO()
    sql_shell.run_shell(con, stdin=io.StringIO(text), stdout=stdout, max_rows=max_rows)
    return stdout.getvalue()


def test_shell_runs_reads_and_refuses_writes(con):
    out = shell(con, "\n".join([
        "SELECT count(*) AS n_prompts",   # a statement over two lines
        "FROM prompts;",
        "",
        "DELETE FROM prompts;",
        "SELECT nope FROM prompts;",
        "SELECT 'first' AS a; SELECT 'second' AS b;",
        ".quit",
        "SELECT 'after quit' AS c;",
    ]) + "\n")
    assert out.startswith("csr sql (read-only DuckDB over the store)")
    assert "n_prompts" in out and "│ 3 " in out
    assert "...> " in out  # the continuation prompt while the first statement is open
    assert "error: the analytics connection is read-only: DELETE statements are refused" in out
    assert "error: query failed:" in out and "nope" in out
    assert "first" in out and "second" in out
    assert "after quit" not in out
    assert con.execute("SELECT count(*) FROM prompts").fetchone() == (3,)


def test_shell_ends_at_end_of_input(con):
    # An unfinished statement (no ';') is not run when input ends.
    out = shell(con, "SELECT 'done' AS x;\nSELECT 'unfinished' AS y")
    assert "done" in out and "unfinished" not in out
    assert out.endswith("...> \n")


def test_shell_table_shows_max_rows_and_counts_all(con):
    out = shell(con, "SELECT id FROM prompts ORDER BY id;\n", max_rows=2)
    assert "3 rows (2 shown; --max-rows 0 or --format csv for all)" in out
    cells = [line.strip("│ ") for line in out.splitlines() if line.startswith("│")]
    assert cells == ["1", "2"]


def test_write_result_csv_and_json(con):
    statement = "SELECT id, text, done, day, params, score FROM prompts ORDER BY id"
    csv_out = io.StringIO()
    sql_shell.write_result(con, statement, "csv", stdout=csv_out)
    assert csv_out.getvalue().splitlines() == [
        "id,text,done,day,params,score",
        '1,a cat,true,2024-05-01,"{""rule"": ""sum""}",0.5',
        "2,,false,,,",
        "3,a dog,true,2024-05-03,\"[1, 2]\",2.25",
    ]
    json_out = io.StringIO()
    sql_shell.write_result(con, statement, "json", stdout=json_out)
    records = json.loads(json_out.getvalue())
    # JSON columns embedded, NaN as null, dates in ISO form.
    assert records[0] == {"id": 1, "text": "a cat", "done": True, "day": "2024-05-01",
                          "params": {"rule": "sum"}, "score": 0.5}
    assert records[1]["score"] is None and records[1]["params"] is None
    assert records[2]["params"] == [1, 2]


def test_write_result_to_files(con, tmp_path: Path):
    statement = "SELECT id, score FROM prompts WHERE id <> 2 ORDER BY id"
    sql_shell.write_result(con, statement, "parquet", out=tmp_path / "out.parquet")
    assert duckdb.sql(f"SELECT * FROM '{tmp_path / 'out.parquet'}' ORDER BY id").fetchall() == [(1, 0.5), (3, 2.25)]
    sql_shell.write_result(con, statement, "table", out=tmp_path / "out.txt")
    text = (tmp_path / "out.txt").read_text()
    assert "2.25" in text and text.rstrip().endswith("2 rows")
    with pytest.raises(StoreError, match="query failed"):
        sql_shell.write_result(con, "SELECT nope", "csv", stdout=io.StringIO())


def test_formats_match_the_cli_choices():
    assert [f.value for f in SqlFormat] == list(sql_shell.FORMATS)
