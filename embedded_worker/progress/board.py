"""ProgressBoard: every live session's and batch's progress in one fixed numpy array.

Design notes
- A .NET host takes this array's buffer once and then reads progress with
  no GIL and no call into Python: polling from hundreds of request threads
  costs nothing however busy the device keeps the interpreter.
- One row (slot) per live session or batch, int64 fields (`FIELDS`). The
  execute replies name each one's `board_slot`; `id_hash` (FNV-1a 64 of the
  id's UTF-8 bytes) lets a reader check the slot still belongs to its id.
- Torn reads are detected with a sequence lock: the writer makes `sequence`
  odd, writes the row, makes it even again. A reader copies the row between
  two reads of `sequence` and retries if they differ or are odd. Writers
  serialise on `_lock`. Store order is what x86-64 guarantees (TSO); on
  weaker memory models a reader may need to retry more, never less.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..lifecycle.state import ALL_STATUSES

FIELDS = (
    "sequence", "kind", "state", "progress_bp", "current_step", "total_steps", "denoise_step", "denoise_total",
    "items_done", "items_failed", "items_total", "eta_ms", "updated_unix_ms", "id_hash", "attempt", "reserved",
)
FIELD = {name: index for index, name in enumerate(FIELDS)}
KINDS = {"free": 0, "session": 1, "batch": 2}
STATE_CODES = {status: code for code, status in enumerate(ALL_STATUSES)}
_FNV_OFFSET, _FNV_PRIME, _MASK = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


def id_hash(record_id: str) -> int:
    """FNV-1a 64 of the UTF-8 bytes, as a signed int64 (what C# computes the same way)."""
    value = _FNV_OFFSET
    for byte in record_id.encode("utf-8"):
        value = ((value ^ byte) * _FNV_PRIME) & _MASK
    return value - (1 << 64) if value >= 1 << 63 else value


class ProgressBoard:
    def __init__(self, slots: int):
        self.array = np.zeros((slots, len(FIELDS)), dtype=np.int64)
        self._lock = threading.Lock()  # guards writes to `array` and the slot maps
        self._free = list(range(slots - 1, -1, -1))
        self._slots: dict[str, int] = {}

    def view(self) -> np.ndarray:
        """The board for a reader: the same memory, read-only."""
        view = self.array.view()
        view.setflags(write=False)
        return view

    def claim(self, kind: str, record_id: str) -> int:
        """A slot for `record_id`, or -1 when the board is full (the record still works, unboarded)."""
        with self._lock:
            if record_id in self._slots:
                return self._slots[record_id]
            if not self._free:
                return -1
            slot = self._free.pop()
            self._slots[record_id] = slot
            self._write(slot, {"kind": KINDS[kind], "id_hash": id_hash(record_id), "eta_ms": -1})
            return slot

    def release(self, record_id: str) -> None:
        with self._lock:
            slot = self._slots.pop(record_id, None)
            if slot is not None:
                self._write(slot, {name: 0 for name in FIELDS[1:]})
                self._free.append(slot)

    def publish(self, slot: int, values: dict) -> None:
        if slot < 0:
            return
        with self._lock:
            self._write(slot, values)

    def _write(self, slot: int, values: dict) -> None:
        row = self.array[slot]
        row[0] += 1  # odd: a write is under way
        for name, value in values.items():
            row[FIELD[name]] = value
        row[FIELD["updated_unix_ms"]] = int(time.time() * 1000)
        row[0] += 1  # even: consistent again

    def read(self, slot: int) -> dict:
        """A consistent copy of one row (the reader's protocol, as a host implements it)."""
        while True:
            before = int(self.array[slot, 0])
            row = self.array[slot].copy()
            if before % 2 == 0 and int(self.array[slot, 0]) == before:
                return dict(zip(FIELDS, (int(v) for v in row)))

    def layout(self) -> dict:
        return {"slots": int(self.array.shape[0]), "fields": list(FIELDS), "dtype": "int64",
                "row_bytes": int(self.array.strides[0]), "kinds": dict(KINDS), "state_codes": dict(STATE_CODES),
                "progress_scale": 10000, "id_hash": "fnv1a64-utf8"}


def state_code(status: str) -> int:
    return STATE_CODES[status]
