"""Output and input pixel buffers, shared with the host without copies.

An output is the uint8 HWC array the VAE decode was written into: C-contiguous
and read-only, so a .NET host can read it through the buffer protocol and
nobody can change it underneath. `get(output_id)` returns that very object.
It lives until its owner (a session or batch) is deleted.

An input is the reverse: the worker allocates a writable array, the host
fills it in place, then names its `input_id` as an image parameter.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidRequest, NotFound

OUTPUT_PREFIX = "out_"
INPUT_PREFIX = "in_"


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


def as_output_pixels(pixels: np.ndarray) -> np.ndarray:
    """The array itself when it already is C-contiguous uint8 HWC, else one copy into such an array."""
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise InvalidRequest(f"image must be HxWxC with 1, 3 or 4 channels, got shape {pixels.shape}")
    if pixels.dtype != np.uint8 or not pixels.flags["C_CONTIGUOUS"]:
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    pixels.setflags(write=False)
    return pixels


class OutputStore:
    """Every live output and input buffer, by id."""

    def __init__(self, max_input_side: int):
        self.max_input_side = max_input_side
        self._lock = threading.Lock()  # guards both maps
        self._outputs: dict[str, OutputBuffer] = {}
        self._inputs: dict[str, np.ndarray] = {}

    def add(self, owner_id: str, pixels: np.ndarray, **fields) -> OutputBuffer:
        buffer = OutputBuffer(OUTPUT_PREFIX + uuid.uuid4().hex, owner_id, as_output_pixels(pixels), **fields)
        with self._lock:
            self._outputs[buffer.output_id] = buffer
        return buffer

    def restore(self, buffer: OutputBuffer) -> None:
        with self._lock:
            self._outputs[buffer.output_id] = buffer

    def get(self, output_id: str) -> OutputBuffer:
        with self._lock:
            buffer = self._outputs.get(output_id)
        if buffer is None:
            raise NotFound(f"Output '{output_id}' not found")
        return buffer

    def release(self, owner_id: str, item_id: str | None = None) -> list[OutputBuffer]:
        """Forget the outputs of an owner (or of one of its items); the host's views stay valid."""
        with self._lock:
            released = [
                b for b in self._outputs.values()
                if b.owner_id == owner_id and (item_id is None or b.item_id == item_id)
            ]
            for buffer in released:
                del self._outputs[buffer.output_id]
        return released

    def count(self) -> int:
        with self._lock:
            return len(self._outputs)

    def allocate_input(self, height: int, width: int, channels: int = 3) -> tuple[str, np.ndarray]:
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.max_input_side:
                raise InvalidRequest(f"{name}: must be an integer from 1 to {self.max_input_side}, got {value!r}")
        if channels not in (1, 3, 4):
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
