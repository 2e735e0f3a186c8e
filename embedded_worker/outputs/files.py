"""Output files: encoded with their metadata (or raw, for mapping back), synced, then renamed into place.

A file either exists complete or not at all, and it is on disk before the
work that made it is reported completed. A write that fails (a full disk)
removes its staging file: nothing half-written is left behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from .postprocess import encode

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
STAGING_SUFFIX = ".partial"


def write_output_file(output_id: str, pixels: np.ndarray, metadata: dict, folder: Path, image_format: str = "png",
                      quality: int = 90) -> Path:
    path = folder / f"{output_id}.{EXTENSIONS[image_format]}"
    data = encode(pixels, image_format, metadata, quality)
    return _write_synced(path, lambda handle: handle.write(data))


def write_raw_pixels(output_id: str, pixels: np.ndarray, folder: Path) -> Path:
    """The pixels as an .npy file, which np.load maps straight back into a read-only array."""
    return _write_synced(folder / f"{output_id}.npy", lambda handle: np.save(handle, pixels, allow_pickle=False))


def map_raw_pixels(path: Path) -> np.ndarray:
    """The pixels mapped read-only; ValueError when the file is not what `write_raw_pixels` wrote."""
    pixels = np.load(path, mmap_mode="r", allow_pickle=False)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise ValueError(f"not uint8 HxWxC pixels: {pixels.dtype} {pixels.shape}")
    return pixels


def _write_synced(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + STAGING_SUFFIX)
    try:
        with open(staging, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return path
