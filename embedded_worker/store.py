"""StateStore: the worker's records and outputs in SQLite, so a restart loses nothing.

Design notes
- WAL journal with synchronous=NORMAL: a commit survives the process dying
  (kill -9, the host crashing), which is what an embedded worker meets. After
  an operating-system crash or power loss the last commits may be lost.
- The StateBook calls `record_event` inside its lock for every change, so a
  status is on disk before `transition()` returns and before anyone reports it.
- One process per state file: an exclusive lock on `<file>.lock`. A second
  worker on the same file is refused instead of corrupting the first.
- Records are JSON rows of their dataclass fields; outputs a table of their
  own, written (after their files are synced) before their owner completes.
- ":memory:" keeps everything in memory: one switch for tests.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import Unavailable
from .state import FINAL, REMOVED, BatchRecord, ItemRecord, Record, SessionRecord

MEMORY = ":memory:"
KINDS: dict[str, type[Record]] = {"session": SessionRecord, "batch": BatchRecord, "item": ItemRecord}
SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, completed_at REAL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outputs (
    output_id TEXT PRIMARY KEY, owner_id TEXT NOT NULL, item_id TEXT, seed INTEGER,
    raw_path TEXT, file_path TEXT, metadata TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS outputs_by_owner ON outputs (owner_id);
"""


class StateStore:
    def __init__(self, path: str | Path):
        self.path = str(path)
        self.durable = self.path != MEMORY
        self._lock = threading.Lock()  # guards the connection: one statement at a time
        self._lock_file = self._take_process_lock() if self.durable else None
        if self.durable:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def _take_process_lock(self) -> FileLock:
        """flock on POSIX, LockFileEx on Windows (filelock): held until close, or until the process dies."""
        lock_path = Path(self.path + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise Unavailable(f"the state file {self.path} is in use by another worker process") from None
        return lock

    # ---- records -------------------------------------------------------------------------------

    def record_event(self, record: Record, event: str) -> None:
        """The StateBook listener: write (or delete) the record before the change is reported."""
        with self._lock:
            if event == REMOVED:
                self._db.execute("DELETE FROM records WHERE id = ?", (record.id,))
                return
            self._db.execute(
                "INSERT INTO records (id, kind, status, completed_at, data) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET status = excluded.status, completed_at = excluded.completed_at, "
                "data = excluded.data",
                (record.id, record.kind, record.status, record.completed_at, json.dumps(_fields(record), default=str)),
            )

    def load_records(self) -> list[Record]:
        with self._lock:
            rows = self._db.execute("SELECT kind, data FROM records ORDER BY rowid").fetchall()
        records = []
        for kind, data in rows:
            record = KINDS[kind](**json.loads(data))
            if record.status in FINAL:
                record.finished.set()
            records.append(record)
        return records

    # ---- outputs --------------------------------------------------------------------------------

    def add_output(self, output_id: str, owner_id: str, item_id: str | None, seed: int | None,
                   raw_path: str | None, file_path: str | None, metadata: dict) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO outputs VALUES (?, ?, ?, ?, ?, ?, ?)",
                (output_id, owner_id, item_id, seed, raw_path, file_path, json.dumps(metadata, default=str)),
            )

    def find_output(self, output_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM outputs WHERE output_id = ?", (output_id,)).fetchone()
        if row is None:
            return None
        names = ("output_id", "owner_id", "item_id", "seed", "raw_path", "file_path", "metadata")
        found = dict(zip(names, row))
        found["metadata"] = json.loads(found["metadata"])
        return found

    def remove_outputs(self, owner_id: str, item_id: str | None = None) -> list[dict]:
        """Forget an owner's (or one item's) outputs; their rows come back so the files can go too."""
        clause, arguments = ("owner_id = ?", (owner_id,)) if item_id is None else \
            ("owner_id = ? AND item_id = ?", (owner_id, item_id))
        with self._lock:
            rows = self._db.execute(f"SELECT raw_path, file_path FROM outputs WHERE {clause}", arguments).fetchall()
            self._db.execute(f"DELETE FROM outputs WHERE {clause}", arguments)
        return [{"raw_path": raw, "file_path": file} for raw, file in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._lock_file is not None:
            self._lock_file.release(force=True)


def _fields(record: Record) -> dict:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != "finished"}
