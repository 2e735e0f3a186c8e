"""Output and input pixel buffers, shared with the host without copies.

An output is the uint8 HWC array the VAE decode was written into: C-contiguous
and read-only, so a .NET host can read it through the buffer protocol and
nobody can change it underneath. `get(output_id)` returns that very object.
It lives until its owner (a session or batch) is deleted.

With a durable state file, every output is also written before its owner can
complete: an image file with its metadata (the user's artifact) and its raw
pixels, which after a restart are mapped straight back into a read-only
array (np.load with mmap), no decoding, no copy.

Caller ids never decide where a file lands: an owner's folder is named by
`owner_folder` (a slug of the id plus a hash of it), so an id like
"../../x" or "C:\\x" writes inside the output folder like any other.

At a start, before any work runs, files a write never finished and raw
pixel files no stored row owns are removed (`sweep_unowned`): a process
that died between a file and its row, or a state log lost after a crash,
leaves them. Image files no row owns are only counted: a delete with
`force_cleanup: false` keeps them on purpose.

An input is the reverse: the worker allocates a writable array, the host
fills it in place, then names its `input_id` as an image parameter.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidRequest, NotFound, Unavailable
from .files import STAGING_SUFFIX, map_raw_pixels, write_output_file, write_raw_pixels
from .pixels import as_output_pixels

OUTPUT_PREFIX = "out_"
INPUT_PREFIX = "in_"
_NOT_SLUG = re.compile(r"[^A-Za-z0-9_-]+")
log = logging.getLogger("embedded_worker.outputs")


def owner_folder(owner_id: str) -> str:
    """A folder name for an owner's files: readable, unique per id, never a path of its own."""
    slug = _NOT_SLUG.sub("_", owner_id)[:48].strip("_") or "owner"
    return f"{slug}-{hashlib.sha256(owner_id.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


@dataclass
class OutputBuffer:
    output_id: str
    owner_id: str
    pixels: np.ndarray
    item_id: str | None = None
    seed: int | None = None
    path: str | None = None
    metadata: dict = field(default_factory=dict)

    def reference(self) -> dict:
        height, width, channels = self.pixels.shape
        reference = {
            "output_id": self.output_id,
            "item_id": self.item_id,
            "seed": self.seed,
            "width": int(width),
            "height": int(height),
            "channels": int(channels),
            "dtype": "uint8",
        }
        if self.path is not None:
            reference["path"] = self.path
        return reference


class OutputStore:
    """Every live output and input buffer, by id; outputs also on disk when configured."""

    def __init__(self, max_input_side: int, files_dir: Path | None = None, raw_dir: Path | None = None,
                 store=None):
        self.max_input_side = max_input_side
        self.files_dir = files_dir  # image files with metadata, one folder per owner
        self.raw_dir = raw_dir  # raw pixels for mapping back after a restart
        self.store = store  # the StateStore rows that find them again
        self._lock = threading.Lock()  # guards both maps
        self._outputs: dict[str, OutputBuffer] = {}
        self._inputs: dict[str, np.ndarray] = {}

    def add(self, owner_id: str, pixels: np.ndarray, item_id: str | None = None, seed: int | None = None,
            metadata: dict | None = None, image_format: str = "png", quality: int = 90) -> OutputBuffer:
        """Keep an output; its files are written and synced before this returns."""
        buffer = OutputBuffer(OUTPUT_PREFIX + uuid.uuid4().hex, owner_id, as_output_pixels(pixels), item_id, seed,
                              metadata=dict(metadata or {}))
        raw_path = None
        folder = owner_folder(owner_id)
        try:
            if self.raw_dir is not None:
                raw_path = str(write_raw_pixels(buffer.output_id, buffer.pixels, self.raw_dir / folder))
            if self.files_dir is not None:
                buffer.path = str(write_output_file(buffer.output_id, buffer.pixels, buffer.metadata,
                                                    self.files_dir / folder, image_format, quality))
            if self.store is not None:
                self.store.add_output(buffer.output_id, owner_id, item_id, seed, raw_path, buffer.path,
                                      buffer.metadata)
        except BaseException:  # a full disk: what was written of it has no row, so nobody would remove it
            for path in (raw_path, buffer.path):
                if path:
                    Path(path).unlink(missing_ok=True)
            raise
        with self._lock:
            self._outputs[buffer.output_id] = buffer
        return buffer

    def get(self, output_id: str) -> OutputBuffer:
        with self._lock:
            buffer = self._outputs.get(output_id)
        if buffer is None:
            buffer = self._map_back(output_id)
        if buffer is None:
            raise NotFound(f"Output '{output_id}' not found")
        return buffer

    def _map_back(self, output_id: str) -> OutputBuffer | None:
        """An output kept by an earlier process: its raw pixels mapped read-only from disk."""
        found = self.store.find_output(output_id) if self.store is not None else None
        if found is None or not found["raw_path"]:
            return None
        try:
            pixels = map_raw_pixels(Path(found["raw_path"]))
        except FileNotFoundError:
            raise NotFound(f"Output '{output_id}' is missing on disk: {found['raw_path']}") from None
        except (OSError, ValueError) as error:  # a damaged file: numpy says why
            raise Unavailable(f"Output '{output_id}' cannot be read from disk ({found['raw_path']}): "
                              f"{error}") from None
        buffer = OutputBuffer(output_id, found["owner_id"], pixels, found["item_id"], found["seed"],
                              found["file_path"], found["metadata"])
        with self._lock:
            return self._outputs.setdefault(output_id, buffer)

    def release(self, owner_id: str, item_id: str | None = None, delete_files: bool = True) -> list[OutputBuffer]:
        """Forget the outputs of an owner (or of one of its items); the host's views stay valid.

        Raw pixel files always go; image files too unless `delete_files` is false.
        """
        with self._lock:
            released = [
                b for b in self._outputs.values()
                if b.owner_id == owner_id and (item_id is None or b.item_id == item_id)
            ]
            for buffer in released:
                del self._outputs[buffer.output_id]
        rows = self.store.remove_outputs(owner_id, item_id) if self.store is not None else []
        _remove_files(rows, released, delete_files)
        return released

    def discard(self, buffers: list[OutputBuffer]) -> None:
        """Forget outputs written for work that did not keep them (replaced, cancelled or deleted meanwhile):
        their rows and files go; the owner's other outputs stay."""
        with self._lock:
            for buffer in buffers:
                self._outputs.pop(buffer.output_id, None)
        ids = [buffer.output_id for buffer in buffers]
        rows = self.store.remove_output_ids(ids) if self.store is not None and ids else []
        _remove_files(rows, buffers, delete_files=True)

    def sweep_unowned(self) -> dict:
        """Call at a start, before any work runs: what no stored row owns goes (see the module notes)."""
        found = {"swept_files": 0, "unowned_image_files": 0}
        if self.store is None:
            return found  # nothing is stored, so nothing says what is owned
        sharing = [p for p in Path(self.store.path).parent.glob("*.lock") if str(p) != self.store.path + ".lock"]
        if sharing:
            log.warning("not sweeping output files: another state file uses the same folder (%s)", sharing[0])
            return found
        owned = self.store.output_paths()
        for folder in (self.raw_dir, self.files_dir):
            for path in folder.glob(f"*/{OUTPUT_PREFIX}*") if folder is not None else ():
                if os.path.abspath(path) in owned:
                    continue
                if folder == self.raw_dir or path.name.endswith(STAGING_SUFFIX):
                    path.unlink(missing_ok=True)
                    found["swept_files"] += 1
                else:
                    found["unowned_image_files"] += 1
        if found["swept_files"] or found["unowned_image_files"]:
            log.warning("output files no stored row owns: %d removed (raw pixels, unfinished writes), %d image "
                        "files kept", found["swept_files"], found["unowned_image_files"])
        return found

    def count(self) -> int:
        with self._lock:
            return len(self._outputs)

    def allocate_input(self, height: int, width: int, channels: int = 3) -> tuple[str, np.ndarray]:
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.max_input_side:
                raise InvalidRequest(f"{name}: must be an integer from 1 to {self.max_input_side}, got {value!r}")
        if not isinstance(channels, int) or isinstance(channels, bool) or channels not in (1, 3, 4):
            raise InvalidRequest(f"channels: must be 1, 3 or 4, got {channels!r}")
        input_id = INPUT_PREFIX + uuid.uuid4().hex
        pixels = np.zeros((height, width, channels), dtype=np.uint8)
        with self._lock:
            self._inputs[input_id] = pixels
        return input_id, pixels

    def get_input(self, input_id: str) -> np.ndarray:
        with self._lock:
            pixels = self._inputs.get(input_id)
        if pixels is None:
            raise NotFound(f"Input '{input_id}' not found")
        return pixels

    def release_input(self, input_id: str) -> bool:
        with self._lock:
            return self._inputs.pop(input_id, None) is not None


def _remove_files(rows: list[dict], buffers: list[OutputBuffer], delete_files: bool) -> None:
    """The files of forgotten outputs: raw pixels always, image files unless `delete_files` is false."""
    paths = [row["raw_path"] for row in rows]
    if delete_files:
        paths += [row["file_path"] for row in rows] + [buffer.path for buffer in buffers]
    for path in {p for p in paths if p}:
        Path(path).unlink(missing_ok=True)
