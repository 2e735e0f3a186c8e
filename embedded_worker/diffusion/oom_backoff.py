"""One denoiser forward and one VAE decode on a device, each with out-of-memory back-off.

A forward covers every active image, in chunks of at most the capacity. Out
of memory: the step is retried in smaller chunks (latents change only once
every chunk succeeded, `predict_noise`), so no image is lost or run twice;
at a chunk of one image it gives up. A decode halves its chunk the same way.
The device worker decides what the back-off means for its capacity and
frees memory (`shrink`, `on_out_of_memory`); these only run and time.
"""

from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..errors import ResourceExhausted, is_out_of_memory
from .denoise import decode_pixels, predict_noise

if TYPE_CHECKING:
    from .denoise import Cohort, CompiledChoice
    from .memory import MemoryMonitor


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def forward(pipe, cohorts: list[Cohort], chunk: int, key: tuple, monitor: MemoryMonitor, stream,
            shrink: Callable[[int], int], compiled: CompiledChoice | None = None) -> tuple[float, int]:
    """One denoising step of `cohorts`: (seconds the forward took, the chunk it ran at). `shrink(chunk)`
    hears every out-of-memory (and frees what it can) and gives the next chunk; ResourceExhausted at a
    chunk of one. `compiled`: see `predict_noise`."""
    rows_per_image = 2 if cohorts[0].classifier_free else 1
    while True:
        try:
            measured = monitor.due(key, chunk)
            used_before = monitor.begin() if measured else 0
            started = time.perf_counter()
            predict_noise(pipe, cohorts, chunk * rows_per_image, compiled)
            if stream is not None:
                stream.synchronize()
            elapsed = time.perf_counter() - started
            if measured:
                monitor.end(key, chunk, used_before)
            return elapsed, chunk
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            smaller = shrink(chunk)
            if chunk == 1:
                raise ResourceExhausted("out of device memory at batch size 1") from error
            chunk = smaller


def decode(pipe, cohort: Cohort, chunk: int, on_out_of_memory: Callable[[], None]) -> tuple[list[np.ndarray], float]:
    """The cohort's pixels, uint8 HWC, and the seconds per image the decode took."""
    while True:
        try:
            started = time.perf_counter()
            images = decode_pixels(pipe, cohort, chunk)
            return images, (time.perf_counter() - started) / cohort.size
        except Exception as error:
            if not is_out_of_memory(error) or chunk == 1:
                raise
            on_out_of_memory()
            chunk //= 2
