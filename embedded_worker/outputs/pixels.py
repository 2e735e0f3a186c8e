"""The one shape pixels have between steps and across the boundary: uint8 HxWxC, C-contiguous, read-only."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidRequest


def as_output_pixels(pixels: np.ndarray) -> np.ndarray:
    """The array itself when it already is C-contiguous uint8 HWC, else one copy into such an array."""
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise InvalidRequest(f"image must be HxWxC with 1, 3 or 4 channels, got shape {pixels.shape}")
    if pixels.dtype != np.uint8 or not pixels.flags["C_CONTIGUOUS"]:
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    pixels.setflags(write=False)
    return pixels
