"""StateStore: the worker's records and outputs in SQLite, so a restart loses nothing.

Design notes
- WAL journal with synchronous=NORMAL: a commit survives the process dying
  (kill -9, the host crashing), which is what an embedded worker meets. After
  an operating-system crash or power loss the last commits may be lost.
- The StateBook calls `record_event` for every change, first of its
  listeners, right after its lock is released and before `transition()`
  returns to the thread that made the change.
- `mark_on_device` is the one write a device thread makes: one statement
  for every record whose images start (on) and whose images left since the
  last start (off), before the first forward of the starting ones.
- One process per state file: an exclusive lock on `<file>.lock`. A second
  worker on the same file is refused instead of corrupting the first.
- Records are JSON rows of their dataclass fields; outputs a table of their
  own, written (after their files are synced) before their owner completes.
- A row this version cannot read (damaged JSON, a newer version's fields)
  is moved to `quarantined_records` with the reason, kept for a person to
  look at, and reported; it never stops a start.
- Checkpoints (`checkpoints.Checkpoints`) are files beside the state file,
  each named by a row here (written after its file is whole), one per image
  of unfinished work: the row is what makes a checkpoint count.
- The file says which format it is (PRAGMA user_version, FORMAT_VERSION).
  A start checks it and the tables' columns before anything is accepted: a
  newer or unknown format, a missing table or a column this version does
  not write is refused with the reason, instead of starting with an empty
  history or failing every piece of work at its first write. A file made
  before the stamp (version 0) is this format and gets stamped.
- A start that finds the last process ended without closing (its
  `<file>.running` marker is still there) checks that process's
  write-ahead log: missing, or with frames SQLite could not read, means its
  last commits are lost; the worker says so (`journal_loss`).
- New work is written in one transaction before it joins the book
  (`add_records`): a submit the store cannot take is refused whole.
- A change of work already accepted that the disk refuses (full) is kept
  and written with the next write that succeeds, in order: the work goes
  on in memory, a status reply never waits for space, and a crash
  meanwhile resumes from what was stored last. Raising into the threads
  that run the work would leave it running for ever.
- ":memory:" keeps everything in memory: one switch for tests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from ..errors import Unavailable
from .state import ALL_STATUSES, FINAL, REMOVED, BatchRecord, ItemRecord, SessionRecord

if TYPE_CHECKING:
    from .state import Record

log = logging.getLogger("embedded_worker.store")
MEMORY = ":memory:"
KINDS: dict[str, type[Record]] = {"session": SessionRecord, "batch": BatchRecord, "item": ItemRecord}
FORMAT_VERSION = 2  # PRAGMA user_version this version writes; 0 is version 1, made before the stamp
SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, completed_at REAL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outputs (
    output_id TEXT PRIMARY KEY, owner_id TEXT NOT NULL, item_id TEXT, seed INTEGER,
    raw_path TEXT, file_path TEXT, metadata TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS outputs_by_owner ON outputs (owner_id);
CREATE TABLE IF NOT EXISTS quarantined_records (
    id TEXT, kind TEXT, data TEXT, reason TEXT NOT NULL, found_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    record_id TEXT NOT NULL, image TEXT NOT NULL, step INTEGER NOT NULL, path TEXT NOT NULL, bytes INTEGER NOT NULL,
    written_at REAL NOT NULL, PRIMARY KEY (record_id, image));
"""
COLUMNS = {  # every table this version reads and writes, with its columns in order: checked at each start
    "records": ("id", "kind", "status", "completed_at", "data"),
    "outputs": ("output_id", "owner_id", "item_id", "seed", "raw_path", "file_path", "metadata"),
    "quarantined_records": ("id", "kind", "data", "reason", "found_at"),
    "checkpoints": ("record_id", "image", "step", "path", "bytes", "written_at"),
}
TABLES_SINCE = {0: {"records", "outputs"}, 1: {"records", "outputs", "quarantined_records"}, 2: set(COLUMNS)}
UPSERT_RECORD = ("INSERT INTO records (id, kind, status, completed_at, data) VALUES (?, ?, ?, ?, ?) "
                 "ON CONFLICT(id) DO UPDATE SET status = excluded.status, completed_at = excluded.completed_at, "
                 "data = excluded.data")
WAL_HEADER, WAL_FRAME_HEADER = 32, 24  # bytes, from SQLite's WAL file format


class StateStore:
    def __init__(self, path: str | Path):
        self.path = str(path)
        self.durable = self.path != MEMORY
        self.journal_loss: str | None = None  # what a start found lost with the last process's log, if anything
        self._lock = threading.Lock()  # guards the connection and the unsaved changes: one write at a time
        self._unsaved: dict[str, Record | None] = {}  # record id -> the record to write again (None: delete it)
        self._unsaved_deletes: list[tuple[str, tuple]] = []  # output rows to delete, in order
        self._refusing = False  # the last write failed: said once in the log, until one succeeds
        self._lock_file = self._take_process_lock() if self.durable else None
        self._running = Path(self.path + ".running") if self.durable else None  # there while a process has it
        self._db = None
        try:
            ended_unclosed = self._running is not None and self._running.exists()
            wal = Path(self.path + "-wal")
            wal_bytes = wal.stat().st_size if self.durable and wal.exists() else None  # before SQLite reads it
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            version = self._check_format()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA journal_size_limit=0")  # a log reused after a checkpoint holds no stale frames
            if ended_unclosed:
                self.journal_loss = self._journal_loss(wal_bytes)
            if self.journal_loss:
                log.error("%s", self.journal_loss)
            if version != FORMAT_VERSION:
                self._db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {FORMAT_VERSION}; COMMIT;")
            self._mark_running()
        except sqlite3.Error as error:
            self._abandon()
            raise Unavailable(f"the state file {self.path} cannot be opened: {error}") from None
        except BaseException:
            self._abandon()  # a failed start must not leave the file looking in use
            raise

    def _mark_running(self) -> None:
        if self._running is None:
            return
        try:
            self._running.write_text(str(os.getpid()))
        except OSError as error:  # a full disk must not stop a start; only the next start's check is lost
            log.warning("cannot write %s (%s): the next start cannot check this process's log", self._running, error)

    def _check_format(self) -> int:
        """The file's format version; Unavailable, with the reason, for a file this version must not use."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if not 0 <= version <= FORMAT_VERSION:
            raise Unavailable(f"the state file {self.path} has format version {version}; this worker reads "
                              f"versions up to {FORMAT_VERSION} (a newer worker wrote it?): start that version, "
                              f"or move the file aside to start empty")
        tables = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and not tables:
            return version  # a new file
        required = TABLES_SINCE[version]  # what each version's files have; a start adds the later ones
        missing = sorted(required - tables)
        if missing:
            raise Unavailable(f"the state file {self.path} has no table {', '.join(missing)} (tables: "
                              f"{', '.join(sorted(tables)) or 'none'}): not a state file this worker can use "
                              f"without losing its history; move it aside to start empty")
        for table, expected in COLUMNS.items():
            found = tuple(row[1] for row in self._db.execute(f"PRAGMA table_info({table})"))
            if found and found != expected:
                raise Unavailable(f"the state file {self.path}: table {table} has columns ({', '.join(found)}), "
                                  f"this worker writes ({', '.join(expected)}): a different format; start the "
                                  f"version that wrote it, or move the file aside")
        return version

    def _journal_loss(self, wal_bytes: int | None) -> str | None:
        """The last process ended without closing: did its write-ahead log survive whole?"""
        wal = f"{self.path}-wal"
        if wal_bytes is None:
            return (f"the last worker process ended without closing the state file and its write-ahead log "
                    f"({wal}) is missing: what it stored after its last checkpoint is lost")
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        in_file = max(0, wal_bytes - WAL_HEADER) // (WAL_FRAME_HEADER + page_size)
        _, read, _ = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if read >= in_file:
            return None
        return (f"the last worker process ended without closing the state file and its write-ahead log ({wal}) "
                f"is damaged: {in_file - read} of its {in_file} frames could not be read; what they held is lost")

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
        """The StateBook listener: write (or delete) the record before the change is reported; kept for the
        next write when the disk refuses it."""
        with self._lock:
            self._unsaved[record.id] = None if event == REMOVED else record
            self._write()

    def _write(self, *statements: tuple[str, list | tuple]) -> sqlite3.Error | None:
        """Call with the lock held: the unsaved changes, then `statements`, in one transaction. The error
        when the disk refused it: then nothing of it was written, and the unsaved changes stay."""
        try:
            self._db.execute("BEGIN")
            for record_id, record in self._unsaved.items():
                if record is None:
                    self._db.execute("DELETE FROM records WHERE id = ?", (record_id,))
                else:
                    self._db.execute(UPSERT_RECORD, _row(record))
            for statement, arguments in [*self._unsaved_deletes, *statements]:
                self._db.execute(statement, arguments)
            self._db.execute("COMMIT")
        except sqlite3.Error as error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if not self._refusing:
                log.error("the state file refuses writes (%s): changes are kept in memory until a write "
                          "succeeds", error)
            self._refusing = True
            return error
        if self._refusing:
            log.warning("the state file takes writes again: %d kept change(s) stored", self.unsaved_changes())
        self._unsaved.clear()
        self._unsaved_deletes.clear()
        self._refusing = False
        return None

    def unsaved_changes(self) -> int:
        """Changes kept in memory because the disk refused them."""
        return len(self._unsaved) + len(self._unsaved_deletes)

    def add_records(self, records: list[Record]) -> None:
        """New work, written whole or not at all before it joins the book; Unavailable when the store
        cannot take it (a full disk): the submit is refused and nothing of it stays."""
        with self._lock:
            error = self._write(*[(UPSERT_RECORD, _row(record)) for record in records])
        if error is not None:
            raise Unavailable(f"the state store cannot take new work now ({error}); nothing was accepted, "
                              f"send it again later")

    def mark_on_device(self, on: list[str], off: list[str] = ()) -> None:
        """Records `on` stored as on the device and `off` as off it, in one statement: a crash from now on
        names exactly the `on` ones (and any still marked)."""
        ids = [*on, *off]
        flags = ",".join("?" * len(on)) or "NULL"
        with self._lock:  # refused, it is not kept: each record's next write carries its flag
            self._write((f"UPDATE records SET data = json_set(data, '$.on_device', json(CASE WHEN id IN ({flags}) "
                         f"THEN 'true' ELSE 'false' END)) WHERE id IN ({','.join('?' * len(ids))})", [*on, *ids]))

    def forget_starts(self) -> None:
        """A close that stopped every thread: the unfinished records did not end this process, so the starts
        they saw no longer count toward the restart limit (five deploys must not quarantine suspended work)."""
        with self._lock:
            self._write(("UPDATE records SET data = json_set(data, '$.restarts', 0) WHERE status NOT IN (?, ?, ?)",
                         sorted(FINAL)))

    def load_records(self) -> list[Record]:
        """Every readable record; the unreadable ones are moved to quarantine."""
        with self._lock:
            rows = self._db.execute("SELECT rowid, id, kind, data FROM records ORDER BY rowid").fetchall()
        records = []
        for rowid, record_id, kind, data in rows:
            try:
                record = _record_from_row(kind, data)
            except (TypeError, ValueError) as error:
                self._quarantine(rowid, record_id, kind, data, f"{type(error).__name__}: {error}")
                continue
            records.append(record)
        return records

    def _quarantine(self, rowid: int, record_id, kind, data, reason: str) -> None:
        log.error("state row %r (%s) cannot be read and is quarantined: %s", record_id, kind, reason)
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO quarantined_records VALUES (?, ?, ?, ?, ?)",
                             (record_id, kind, data, reason[:1000], time.time()))
            self._db.execute("DELETE FROM records WHERE rowid = ?", (rowid,))
            self._db.execute("COMMIT")

    def quarantined(self) -> list[dict]:
        """The rows no start could read: kept, with why, for a person to look at."""
        with self._lock:
            rows = self._db.execute("SELECT id, kind, reason, found_at FROM quarantined_records").fetchall()
        return [{"id": record_id, "kind": kind, "reason": reason, "found_at": found_at}
                for record_id, kind, reason, found_at in rows]

    # ---- checkpoints ----------------------------------------------------------------------------

    def put_checkpoint(self, record_id: str, image: str, step: int, path: str, size: int) -> None:
        """An image's newest checkpoint, replacing its last; the error when the disk refuses it."""
        with self._lock:
            error = self._write(("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                                 (record_id, image, step, path, size, time.time())))
        if error is not None:
            raise error

    def checkpoint_rows(self) -> list[tuple[str, str, int, str]]:
        """(record id, image, step, path) of every stored checkpoint."""
        with self._lock:
            return self._db.execute("SELECT record_id, image, step, path FROM checkpoints").fetchall()

    def remove_checkpoints(self, record_ids: list[str]) -> None:
        """Forget the records' checkpoints (kept for the next write when the disk refuses it)."""
        with self._lock:
            self._unsaved_deletes += [("DELETE FROM checkpoints WHERE record_id = ?", (record_id,))
                                      for record_id in record_ids]
            self._write()

    # ---- outputs --------------------------------------------------------------------------------

    def add_output(self, output_id: str, owner_id: str, item_id: str | None, seed: int | None,
                   raw_path: str | None, file_path: str | None, metadata: dict) -> None:
        """A new output's row, after the deletes kept before it; the error when the disk refuses it."""
        with self._lock:
            error = self._write(("INSERT OR REPLACE INTO outputs VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (output_id, owner_id, item_id, seed, raw_path, file_path,
                                  json.dumps(metadata, default=str))))
        if error is not None:
            raise error

    def find_output(self, output_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM outputs WHERE output_id = ?", (output_id,)).fetchone()
        if row is None:
            return None
        names = ("output_id", "owner_id", "item_id", "seed", "raw_path", "file_path", "metadata")
        found = dict(zip(names, row))
        found["metadata"] = json.loads(found["metadata"])
        return found

    def output_paths(self) -> set[str]:
        """Every file a stored output row names."""
        with self._lock:
            rows = self._db.execute("SELECT raw_path, file_path FROM outputs").fetchall()
        return {os.path.abspath(path) for row in rows for path in row if path}

    def stored_outputs(self) -> int:
        """How many output rows are stored: what a check that nothing was left behind counts."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outputs").fetchone()[0]

    def remove_outputs(self, owner_id: str, item_id: str | None = None) -> list[dict]:
        """Forget an owner's (or one item's) outputs; their rows come back so the files can go too."""
        clause, arguments = ("owner_id = ?", (owner_id,)) if item_id is None else \
            ("owner_id = ? AND item_id = ?", (owner_id, item_id))
        with self._lock:
            rows = self._db.execute(f"SELECT raw_path, file_path FROM outputs WHERE {clause}", arguments).fetchall()
            self._unsaved_deletes.append((f"DELETE FROM outputs WHERE {clause}", arguments))
            self._write()
        return [{"raw_path": raw, "file_path": file} for raw, file in rows]

    def remove_output_ids(self, output_ids: list[str]) -> list[dict]:
        """Forget outputs one by one (an owner's others stay); their rows come back so the files can go too."""
        rows = []
        with self._lock:
            for output_id in output_ids:
                rows += self._db.execute("SELECT raw_path, file_path FROM outputs WHERE output_id = ?",
                                         (output_id,)).fetchall()
                self._db.execute("DELETE FROM outputs WHERE output_id = ?", (output_id,))
        return [{"raw_path": raw, "file_path": file} for raw, file in rows]

    def close(self) -> None:
        with self._lock:
            if self.unsaved_changes() and self._write() is not None:
                log.error("%d change(s) could not be stored: the next start resumes from what was",
                          self.unsaved_changes())
            self._db.close()
        if self._running is not None:
            self._running.unlink(missing_ok=True)  # closed: the next start has no log to doubt
        self._release_process_lock()

    def _abandon(self) -> None:
        """A start that failed: nothing written, the file free for the next one."""
        if self._db is not None:
            self._db.close()
        self._release_process_lock()

    def _release_process_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.release(force=True)
            self._lock_file = None


def _record_from_row(kind: str, data: str) -> Record:
    """A stored row as its record; ValueError or TypeError when this version cannot read it."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    fields = json.loads(data)
    if not isinstance(fields, dict):
        raise ValueError("the row's data is not an object")
    record = KINDS[kind](**fields)
    if not isinstance(record.id, str) or record.status not in ALL_STATUSES:
        raise ValueError(f"bad id or status {record.status!r}")
    return record


def _row(record: Record) -> tuple:
    return record.id, record.kind, record.status, record.completed_at, json.dumps(_fields(record), default=str)


def _fields(record: Record) -> dict:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.metadata.get("stored", True)}
