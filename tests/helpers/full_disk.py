"""A full disk under the state store, on demand: its writes fail as SQLite's do when the disk is full.

The store's connection is swapped for one whose writing statements raise
sqlite3.OperationalError("database or disk is full") while the disk is
full (or for the next `writes` of them, after the first `after` passed);
reads and transaction control pass through, as they do on a real full disk.
"""

from __future__ import annotations

import sqlite3
import threading

WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE")


class FullDisk:
    def __init__(self, store, writes: int | None = None, after: int = 0):
        self.store, self.real = store, store._db
        self.left = writes  # None: every write fails until `free`
        self.passing = after  # writes that still pass first
        self.refused = 0  # writes that failed
        self._lock = threading.Lock()
        store._db = self

    def free(self) -> None:
        """Space returns."""
        self.store._db = self.real

    def __enter__(self) -> "FullDisk":
        return self

    def __exit__(self, *_exc) -> None:
        self.free()

    def _fails(self, sql: str) -> bool:
        if not sql.lstrip().upper().startswith(WRITES):
            return False
        with self._lock:
            if self.passing:
                self.passing -= 1
                return False
            if self.left == 0:
                return False
            if self.left is not None:
                self.left -= 1
            self.refused += 1
            return True

    def execute(self, sql: str, *args):
        if self._fails(sql):
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)

    def executemany(self, sql: str, *args):
        if self._fails(sql):
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.executemany(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.real, name)
