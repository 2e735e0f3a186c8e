"""Output files: encoded with their metadata, synced, then renamed into place.

A file either exists complete or not at all, and it is on disk before the
work that made it is reported completed.
"""

from __future__ import annotations

import os
from pathlib import Path

from .outputs import OutputBuffer
from .postprocess import encode

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def write_output_file(buffer: OutputBuffer, folder: Path, image_format: str = "png", quality: int = 90) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{buffer.output_id}.{EXTENSIONS[image_format]}"
    data = encode(buffer.pixels, image_format, buffer.metadata, quality)
    staging = path.with_name(path.name + ".partial")
    with open(staging, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    return path
