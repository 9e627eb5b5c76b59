"""The run history: every bench and verify record appended to one SQLite file.

Tables (documented in docs/records.md):
- `meta(key, value)`: `schema_version` of these tables;
- `runs`: one row per record, the fields queries filter on as columns, the whole record as
  JSON in `record` (what `read` returns); `record_sha256` makes appending idempotent;
- `metrics(run_id, name, value, unit, better, spread, repeats)`: one row per metric, so CI
  can chart a metric with plain SQL.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Self

from builder.errors import UserError
from builder.report.records import RunRecord

DEFAULT_HISTORY = Path("runs/history.sqlite")
TABLES_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    record_sha256 TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    artifact_path TEXT NOT NULL,
    artifact_kind TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL,
    runtime TEXT NOT NULL,
    target TEXT NOT NULL,
    device TEXT NOT NULL,
    workload TEXT NOT NULL,
    git_commit TEXT NOT NULL,
    verdict TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_lookup ON runs (model, artifact_sha256, kind, runtime);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    unit TEXT NOT NULL,
    better TEXT NOT NULL,
    spread REAL NOT NULL,
    repeats TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);
"""


def workload_of(record: RunRecord) -> str:
    """The workload key two records must share to be compared (bench: ISL/OSL/concurrency)."""
    return str(record.settings.get("workload", ""))


def record_digest(record: RunRecord) -> str:
    return hashlib.sha256(json.dumps(record.to_json(), sort_keys=True).encode()).hexdigest()


class History:
    """An SQLite history file (created on first use). Use as a context manager."""

    def __init__(self, path: str | Path = DEFAULT_HISTORY):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path)
            self.db.executescript(SCHEMA)
            self._check_version()
        except sqlite3.DatabaseError as err:
            raise UserError(f"{self.path}: not a builder history database ({err})") from None

    def _check_version(self) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            with self.db:
                self.db.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (str(TABLES_VERSION),)
                )
        elif int(row[0]) != TABLES_VERSION:
            raise UserError(
                f"{self.path}: history tables version {row[0]}, this builder reads {TABLES_VERSION}"
            )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def append(self, record: RunRecord) -> int:
        """Adds `record` (again: no-op) and returns its run id."""
        digest = record_digest(record)
        existing = self.db.execute(
            "SELECT id FROM runs WHERE record_sha256 = ?", (digest,)
        ).fetchone()
        if existing:
            return int(existing[0])
        a = record.artifact
        with self.db:
            cursor = self.db.execute(
                "INSERT INTO runs (record_sha256, created, kind, model, artifact_path, "
                "artifact_kind,"
                " artifact_sha256, runtime, target, device, workload, git_commit, verdict, record)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    digest,
                    record.created,
                    str(record.kind),
                    record.model,
                    a.path,
                    a.kind,
                    a.sha256,
                    record.runtime,
                    record.target,
                    record.device,
                    workload_of(record),
                    str(record.environment.get("git_commit", "")),
                    str(record.verdict),
                    json.dumps(record.to_json()),
                ),
            )
            run_id = int(cursor.lastrowid)
            self.db.executemany(
                "INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (run_id, name, m.value, m.unit, m.better, m.spread, json.dumps(list(m.repeats)))
                    for name, m in record.metrics.items()
                ],
            )
        return run_id

    def query(
        self,
        model: str | None = None,
        artifact: str | None = None,
        kind: str | None = None,
        runtime: str | None = None,
        workload: str | None = None,
    ) -> list[RunRecord]:
        """Records in insertion order; `artifact` matches its sha256 (or a prefix) or its path."""
        clauses, params = [], []
        for column, value in (
            ("model", model),
            ("kind", kind),
            ("runtime", runtime),
            ("workload", workload),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if artifact is not None:
            clauses.append("(artifact_sha256 LIKE ? OR artifact_path = ?)")
            params += [artifact + "%", artifact]
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.db.execute(f"SELECT id, record FROM runs{where} ORDER BY id", params).fetchall()
        return [
            RunRecord.from_json(json.loads(text), source=f"{self.path} run {rid}")
            for rid, text in rows
        ]


def append_records(path: str | Path, records: list[RunRecord]) -> list[int]:
    with History(path) as history:
        return [history.append(r) for r in records]
