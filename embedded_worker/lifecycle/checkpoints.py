"""Checkpoints: the newest denoise state of each image of unfinished work, on disk, so a process that dies
costs at most the steps since.

Design notes
- One file per image (`<state file>.checkpoints/<record digest>/<image>.<step>.state`,
  `DenoiseState` bytes) and one row naming it in the state store. The file
  is written whole under a temporary name and renamed, then the row is
  written: a torn file is never named, and a row names a whole file or the
  previous one stays. Reading checks the bytes' checksum anyway. No fsync:
  like the store's commits, a checkpoint survives the process dying, not
  the machine losing power.
- Writes run on one thread of their own (`ew-checkpoint`), never on a device
  thread: the device hands the state over (`save`) and steps on. One
  thread keeps them in order with forgets: a record's checkpoints are
  forgotten once it ends, is deleted or restarted, and a write that comes
  after that is dropped (`_open`).
- What a write costs is measured here (`seconds_per_image`); the device
  side's cadence (`checkpoint_cadence`) reads it to keep checkpoints within
  their share of the step time.
- An image of a recovered record resumes from its checkpoint (`name_images`),
  read on the device thread that takes it; an unreadable one restarts the
  image from step 0 with the reason logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..diffusion.resume_points import StoredState
from ..diffusion.smoothing import smoothed
from .state import FINAL, REMOVED

if TYPE_CHECKING:
    from ..diffusion.denoise_state import DenoiseState
    from ..diffusion.task import DenoiseTask
    from .state import Record
    from .store import StateStore

log = logging.getLogger("embedded_worker.checkpoints")


class Checkpoints:
    def __init__(self, store: StateStore, enabled: bool):
        self.store = store
        self.enabled = enabled and store.durable
        self.folder = Path(store.path + ".checkpoints")
        self._lock = threading.Lock()  # guards the index and the open records
        self._index: dict[str, dict[str, StoredState]] = {}  # record id -> image -> its newest checkpoint
        self._open: set[str] = set()  # records whose images may be checkpointed now
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ew-checkpoint")
        self.seconds_per_image: float | None = None  # a write's cost, smoothed
        self.written = 0
        self.bytes_written = 0
        self.failed = 0
        if self.enabled:
            for record_id, image, step, path in store.checkpoint_rows():
                self._index.setdefault(record_id, {})[image] = StoredState(Path(path), step)

    def folder_of(self, record_id: str) -> Path:
        """A record's checkpoint folder, named by a digest: record ids come from requests (a session id may
        hold '/' or '..'), and a path must never come from one."""
        return self.folder / hashlib.sha256(record_id.encode()).hexdigest()[:32]

    # ---- on the lifecycle loop ---------------------------------------------------------------------

    def name_images(self, record_id: str, step_order: int, tasks: list[DenoiseTask]) -> None:
        """A run's images of one step, named by step and place (the same after a restart): checkpointed
        under that name from now on, and continuing from their checkpoint if they have one."""
        if not self.enabled:
            return
        with self._lock:
            self._open.add(record_id)
            stored = self._index.get(record_id, {})
            for index, task in enumerate(tasks):
                task.checkpoint_key = f"{step_order}.{index}"
                task.resume_from = stored.get(task.checkpoint_key)

    def record_event(self, record: Record, event: str) -> None:
        """The StateBook listener: a record that ended or went needs its checkpoints no more."""
        if event == REMOVED or record.status in FINAL:
            self.forget(record.id)

    def forget(self, record_id: str) -> None:
        """Its checkpoints go, and writes still on their way for it are dropped."""
        with self._lock:
            self._open.discard(record_id)
            known = self._index.pop(record_id, None)
        if known is not None:  # a write under way now removes its own (`_write`)
            self._submit(self._remove, [record_id])

    def keep_only(self, unfinished: set[str]) -> int:
        """At a start: checkpoints of records that are not unfinished now go (they ended, or were quarantined,
        just before the last process died), and so do files no row names. How many records' went."""
        if not self.enabled:
            return 0
        with self._lock:
            stale = [record_id for record_id in self._index if record_id not in unfinished]
            for record_id in stale:
                del self._index[record_id]
            named = {state.path for images in self._index.values() for state in images.values()}
        self.store.remove_checkpoints(stale)
        if self.folder.exists():
            for path in self.folder.glob("*/*.*"):
                if path not in named:
                    path.unlink(missing_ok=True)
        return len(stale)

    # ---- from a device thread (or a close) -------------------------------------------------------

    def save(self, record_id: str, image: str, state: DenoiseState) -> None:
        """Hand `state` over to be written; the caller goes on at once."""
        if self.enabled:
            self._submit(self._write, record_id, image, state)

    def _submit(self, fn, *args) -> None:
        try:
            self._writer.submit(fn, *args)
        except RuntimeError:  # closed: the process keeps what it wrote before
            pass

    # ---- on the writer thread --------------------------------------------------------------------

    def _write(self, record_id: str, image: str, state: DenoiseState) -> None:
        started = time.perf_counter()
        with self._lock:
            if record_id not in self._open:
                return  # it ended (or restarted) since the state was taken
        folder = self.folder_of(record_id)
        path = folder / f"{image}.{state.step_index}.state"
        partial = path.with_suffix(".partial")
        try:
            data = state.to_bytes()
            folder.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(data)
            os.replace(partial, path)
            self.store.put_checkpoint(record_id, image, state.step_index, str(path), len(data))
        except Exception as error:  # a full disk: the previous checkpoint (or step 0) stays the resume point
            self.failed += 1
            log.warning("checkpoint of %s image %s at step %d not written: %s", record_id, image,
                        state.step_index, error)
            partial.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
            path.unlink(missing_ok=True)
            return
        with self._lock:
            still_open = record_id in self._open
            if still_open:
                images = self._index.setdefault(record_id, {})
                previous = images.get(image)
                images[image] = StoredState(path, state.step_index)
        if not still_open:  # forgotten while it was written
            self._remove([record_id])
            return
        if previous is not None and previous.path != path:
            previous.path.unlink(missing_ok=True)
        self.seconds_per_image = smoothed(self.seconds_per_image, time.perf_counter() - started)
        self.written += 1
        self.bytes_written += len(data)

    def _remove(self, record_ids: list[str]) -> None:
        try:
            self.store.remove_checkpoints(record_ids)
        except Exception:
            log.exception("checkpoint rows of %s could not be removed", record_ids)
        for record_id in record_ids:
            shutil.rmtree(self.folder_of(record_id), ignore_errors=True)

    # ---- status and close --------------------------------------------------------------------------

    def status(self) -> dict:
        with self._lock:
            stored = sum(len(images) for images in self._index.values())
        return {"enabled": self.enabled, "stored": stored, "written": self.written,
                "bytes_written": self.bytes_written, "failed_writes": self.failed,
                "seconds_per_image": self.seconds_per_image}

    def flush(self) -> None:
        """Wait for every write handed over so far."""
        try:
            self._writer.submit(lambda: None).result()
        except RuntimeError:  # closed: every write was done before
            pass

    def close(self) -> None:
        """Every write handed over is done (before the store closes)."""
        self._writer.shutdown(wait=True)
