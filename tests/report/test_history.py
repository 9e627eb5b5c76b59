"""The SQLite history: append (idempotent), query, and plain-SQL access for CI."""

from __future__ import annotations

import json
import sqlite3

import pytest

from builder.errors import UserError
from builder.report.history import History, append_records
from builder.report.records import RecordKind


def test_append_query_and_sql(tmp_path, records):
    bench, verify = records
    db = tmp_path / "runs" / "history.sqlite"
    rows = [
        bench(concurrency=1),
        bench(concurrency=4),
        bench("trtllm-fp8", "b" * 64),
        verify("trtllm-fp8", "b" * 64, 0.01),
    ]
    ids = append_records(db, rows)
    assert ids == [1, 2, 3, 4]
    assert append_records(db, rows[:1]) == [1]  # the same record again: no second row
    with History(db) as history:
        assert len(history.query()) == 4
        assert [r.settings["concurrency"] for r in history.query(artifact="aaaa")] == [1, 4]
        assert len(history.query(artifact="/art/trtllm-fp8")) == 2
        assert [r.kind for r in history.query(kind="verify")] == [RecordKind.VERIFY]
        assert (
            len(
                history.query(
                    model="smollm2", runtime="executor", workload="isl=128,osl=128,concurrency=4"
                )
            )
            == 1
        )
        assert history.query(model="other") == []
        assert history.query()[0].to_json() == rows[0].to_json()  # the whole record round-trips
    sql = sqlite3.connect(db)
    value, repeats = sql.execute(
        "SELECT m.value, m.repeats FROM metrics m JOIN runs r ON r.id = m.run_id "
        "WHERE r.artifact_sha256 = ? AND r.workload LIKE '%concurrency=4' AND m.name = "
        "'output_token_throughput'",
        ("a" * 64,),
    ).fetchone()
    assert value == pytest.approx(400.0) and len(json.loads(repeats)) == 3
    assert sql.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)


def test_not_a_history(tmp_path):
    path = tmp_path / "x.sqlite"
    path.write_text("not sqlite at all, just text " * 100)
    with pytest.raises(UserError, match="not a builder history database"):
        History(path)
