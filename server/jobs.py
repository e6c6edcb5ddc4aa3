"""Audit job persistence: one SQLite database (stdlib ``sqlite3``) in ``--state-dir``.

Rows hold the normalized request, state, last progress, summary and the report folder. At open,
jobs left ``queued``/``running`` by a previous process are marked ``interrupted`` with a reason:
never silently lost. Reports live in ``<state-dir>/reports/<job>/report.{json,html}``.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, INTERRUPTED = (
    "queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, INTERRUPTED})
ACTIVE = frozenset({QUEUED, RUNNING})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    provider TEXT NOT NULL DEFAULT '',
    suite TEXT NOT NULL,
    request_json TEXT NOT NULL,
    progress_json TEXT NOT NULL DEFAULT '{}',
    summary_json TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    report_dir TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    started REAL NOT NULL DEFAULT 0,
    finished REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created);
"""


@dataclass(frozen=True)
class JobRow:
    id: str
    state: str
    model: str
    version: int
    sha256: str
    provider: str
    suite: str
    request: dict[str, Any]
    progress: dict[str, Any]
    summary: dict[str, Any]
    error: str
    report_dir: str
    created: float
    started: float
    finished: float


class JobStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.reports_dir = self.state_dir / "reports"
        self.reports_dir.mkdir(exist_ok=True)
        self.uploads_dir = self.state_dir / "uploads"
        self.uploads_dir.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.state_dir / "audits.sqlite3", check_same_thread=False,
                                   isolation_level=None, timeout=10)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def mark_interrupted(self, reason: str) -> int:
        """Jobs a previous process left active become ``interrupted``; returns how many."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET state=?, error=?, finished=? WHERE state IN (?, ?)",
                (INTERRUPTED, reason, time.time(), QUEUED, RUNNING))
            return cur.rowcount

    def insert(self, *, job_id: str, model: str, version: int, sha256: str, provider: str,
               suite: str, request: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, state, model, version, sha256, provider, suite, request_json,"
                " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, QUEUED, model, version, sha256, provider, suite,
                 json.dumps(request, sort_keys=True), time.time()))

    def update(self, job_id: str, **fields: Any) -> None:
        cols, vals = [], []
        for key, value in fields.items():
            if key in ("progress", "summary"):
                key, value = f"{key}_json", json.dumps(value, sort_keys=True)
            cols.append(f"{key}=?")
            vals.append(value)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id=?", (*vals, job_id))

    def get(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _row(row) if row else None

    def list(self, limit: int = 100, state: str | None = None) -> list[JobRow]:
        q = f"SELECT {_COLS} FROM jobs"
        args: tuple = ()
        if state:
            q += " WHERE state=?"
            args = (state,)
        q += " ORDER BY created DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(q, (*args, int(limit))).fetchall()
        return [_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {s: int(n) for s, n in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


_COLS = ("id, state, model, version, sha256, provider, suite, request_json, progress_json, "
         "summary_json, error, report_dir, created, started, finished")


def _row(r) -> JobRow:
    return JobRow(id=r[0], state=r[1], model=r[2], version=int(r[3]), sha256=r[4], provider=r[5],
                  suite=r[6], request=json.loads(r[7]), progress=json.loads(r[8] or "{}"),
                  summary=json.loads(r[9]) if r[9] else {}, error=r[10], report_dir=r[11],
                  created=r[12], started=r[13], finished=r[14])
