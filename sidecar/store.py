"""The evidence store: every final report, persisted before it is acknowledged, surviving restarts, and the
audit trail of labels attached to requests later (feedback).

Embedded SQLite in WAL mode in the configured directory; reports are stored as their protobuf bytes with the
columns the list queries filter on.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from circuitwatch.proto import circuitwatch_pb2 as pb

PRUNE_BATCH = 5000

SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    request_id TEXT PRIMARY KEY,
    finalized_ns INTEGER NOT NULL,
    status INTEGER NOT NULL,
    max_severity INTEGER NOT NULL,
    flagged INTEGER NOT NULL,
    report BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_by_time ON reports (finalized_ns);
-- response_id (contract revision 3) is added by _migrate() to stores written before it
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT NOT NULL,
    unix_nanos INTEGER NOT NULL,
    operation TEXT NOT NULL,
    label TEXT NOT NULL,
    author TEXT NOT NULL,
    note TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_by_request ON feedback (request_id);
"""


class EvidenceStore:
    """Final reports and the label audit trail in one SQLite file; every call is one short transaction under a
    lock, so the store can be shared by the RPC threads and the maintenance thread."""

    def __init__(self, directory: Path, synchronous: str = "NORMAL") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "evidence.sqlite3"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(SCHEMA)
        self._migrate()
        # Requests with label changes: reading a report looks for feedback in SQLite only for these.
        self._relabelled = {row[0] for row in self._db.execute("SELECT DISTINCT request_id FROM feedback")}

    def _migrate(self) -> None:
        """Bring a store written by an earlier release up to this schema (additive changes only)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(reports)")}
        if "response_id" not in columns:
            self._db.execute("ALTER TABLE reports ADD COLUMN response_id TEXT NOT NULL DEFAULT ''")
        self._db.execute("CREATE INDEX IF NOT EXISTS reports_by_response ON reports (response_id)")

    def put(self, report: pb.Report) -> None:
        """Commit the report; returns only once it is durable (per the synchronous setting)."""
        row = (
            report.request_id,
            report.finalized_unix_nanos,
            report.status,
            report.max_severity,
            int(len(report.flags) > 0),
            report.SerializeToString(),
            report.response_id,
        )
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO reports (request_id, finalized_ns, status, max_severity, flagged, report, "
                "response_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )

    def get(self, request_id: str) -> pb.Report | None:
        with self._lock:
            row = self._db.execute("SELECT report FROM reports WHERE request_id = ?", (request_id,)).fetchone()
        return pb.Report.FromString(row[0]) if row else None

    def keys_for_response(self, response_id: str) -> list[str]:
        """The request ids (keys) of the final reports a response id names."""
        with self._lock:
            rows = self._db.execute("SELECT request_id FROM reports WHERE response_id = ?", (response_id,)).fetchall()
        return [row[0] for row in rows]

    def list(
        self,
        start_ns: int = 0,
        end_ns: int = 0,
        request_ids: list[str] | None = None,
        flagged_only: bool = False,
        limit: int = 100,
        response_ids: list[str] | None = None,
    ) -> list[pb.Report]:
        """Last finalised first; reports finalised in [start_ns, end_ns] that any of the ids names (request ids or
        response ids: either kind)."""
        where, args = ["finalized_ns >= ?"], [start_ns]
        if end_ns:
            where.append("finalized_ns <= ?")
            args.append(end_ns)
        named = []  # a report either kind of id names
        if request_ids:
            named.append(f"request_id IN ({','.join('?' * len(request_ids))})")
            args.extend(request_ids)
        if response_ids:
            named.append(f"response_id IN ({','.join('?' * len(response_ids))})")
            args.extend(response_ids)
        if named:
            where.append(f"({' OR '.join(named)})")
        if flagged_only:
            where.append("flagged = 1")
        query = f"SELECT report FROM reports WHERE {' AND '.join(where)} ORDER BY finalized_ns DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*args, limit)).fetchall()
        return [pb.Report.FromString(r[0]) for r in rows]

    def add_feedback(self, rows: list[tuple[str, int, str, str, str, str]]) -> None:
        """Label changes (request_id, unix_nanos, 'add' | 'remove', label, author, note): an audit trail, never
        rewritten, so a report's evidence stays as it was finalised. One transaction: all rows or none."""
        with self._lock:
            with self._db:  # a transaction (the connection autocommits otherwise)
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._relabelled.update(row[0] for row in rows)

    def feedback_count(self, request_id: str) -> int:
        if request_id not in self._relabelled:
            return 0
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM feedback WHERE request_id = ?", (request_id,)).fetchone()[0]

    def prune(self, before_ns: int, max_reports: int) -> int:
        """Delete reports finalised before `before_ns`, then the oldest past `max_reports`, with their feedback,
        a batch per transaction (readers wait at most one batch). Returns how many reports went."""
        deleted = 0
        while True:
            with self._lock, self._db:
                self._db.execute("BEGIN")
                rows = self._db.execute(
                    "SELECT request_id FROM reports WHERE finalized_ns < ? ORDER BY finalized_ns LIMIT ?",
                    (before_ns, PRUNE_BATCH),
                ).fetchall()
                if not rows:
                    excess = self._db.execute("SELECT COUNT(*) FROM reports").fetchone()[0] - max_reports
                    if excess > 0:
                        rows = self._db.execute(
                            "SELECT request_id FROM reports ORDER BY finalized_ns LIMIT ?", (min(excess, PRUNE_BATCH),)
                        ).fetchall()
                if not rows:
                    return deleted
                ids = [(r[0],) for r in rows]
                self._db.executemany("DELETE FROM reports WHERE request_id = ?", ids)
                self._db.executemany("DELETE FROM feedback WHERE request_id = ?", ids)
                self._relabelled.difference_update(r[0] for r in rows)
            deleted += len(rows)

    def feedback(self, request_id: str) -> list[tuple[int, str, str, str, str]]:
        """(unix_nanos, operation, label, author, note), oldest first."""
        if request_id not in self._relabelled:
            return []
        with self._lock:
            return self._db.execute(
                "SELECT unix_nanos, operation, label, author, note FROM feedback WHERE request_id = ? "
                "ORDER BY unix_nanos, rowid",
                (request_id,),
            ).fetchall()

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM reports").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
