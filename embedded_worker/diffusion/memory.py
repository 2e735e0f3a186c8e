"""Device memory, the learned memory cost of an image, and the batch size that follows.

Design notes
- A bare usage ratio says nothing about the next batch. What matters is how
  much one more image costs for this (model, size, guidance) and how much
  room is left, so each forward is measured: the peak above the level before
  it, divided by the images in it. On CUDA torch's allocator keeps the peak;
  on Linux CPUs the kernel's VmHWM does, reset through /proc/self/clear_refs.
- `BatchSizer` turns that into a size for the next forward, clamped by the
  configuration, shrunk by half after an out-of-memory error and grown back
  one image at a time after a run of clean forwards, never again to the size
  that failed.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psutil

from .smoothing import smoothed

if TYPE_CHECKING:
    import torch

GROW_AFTER_CLEAN_FORWARDS = 20
MEASURE_FIRST = 2  # forwards of a size whose memory is always measured
MEASURE_EVERY = 32  # then one in this many
READING_MAX_AGE_S = 0.25  # a memory reading this fresh still says what the next forward may fill


@dataclass(frozen=True)
class MemoryReading:
    used: int
    total: int

    @property
    def free(self) -> int:
        return max(0, self.total - self.used)


class MemoryProbe(Protocol):
    def read(self) -> MemoryReading: ...

    def reset_peak(self) -> None: ...

    def peak_used(self) -> int: ...


class CudaProbe:
    def __init__(self, device: torch.device):
        import torch  # made on the device side's start thread, which imports torch anyway

        self.cuda = torch.cuda
        self.device = device
        self._base_allocated = 0
        self._base_used = 0

    def read(self) -> MemoryReading:
        free, total = self.cuda.mem_get_info(self.device)
        return MemoryReading(total - free, total)

    def reset_peak(self) -> None:
        self.cuda.reset_peak_memory_stats(self.device)
        self._base_allocated = self.cuda.memory_allocated(self.device)
        self._base_used = self.read().used

    def peak_used(self) -> int:
        return self._base_used + self.cuda.max_memory_allocated(self.device) - self._base_allocated


class ProcessProbe:
    """System memory for room, this process's resident peak for cost (Linux VmHWM)."""

    _status = Path("/proc/self/status")
    _clear_refs = Path("/proc/self/clear_refs")

    def __init__(self):
        self._base_rss = 0
        self._base_used = 0
        self._can_reset = self._clear_refs.exists() and self._status.exists()

    def read(self) -> MemoryReading:
        memory = psutil.virtual_memory()
        return MemoryReading(memory.total - memory.available, memory.total)

    def reset_peak(self) -> None:
        self._base_used = self.read().used
        if self._can_reset:
            try:
                self._clear_refs.write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                self._can_reset = False
        self._base_rss = psutil.Process().memory_info().rss

    def peak_used(self) -> int:
        if not self._can_reset:
            return self.read().used
        for line in self._status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return self._base_used + int(line.split()[1]) * 1024 - self._base_rss
        return self.read().used


def probe_for(device: torch.device) -> MemoryProbe:
    return CudaProbe(device) if device.type == "cuda" else ProcessProbe()


class MemoryMonitor:
    """Reads one device's memory and learns what an image in a forward costs there."""

    def __init__(self, probe: MemoryProbe):
        self.probe = probe
        self._lock = threading.Lock()  # guards `_cost` and `peak_used`
        self._cost: dict[tuple, float] = {}
        self._forwards: dict[tuple, int] = {}  # (key, images) -> forwards seen; the device thread's only
        self._reading: tuple[MemoryProbe, float, MemoryReading] | None = None  # the last reading, and when
        self.peak_used = 0
        self.parked_host_bytes = 0  # paused images' states moved off this device into host memory

    def due(self, key: tuple, images: int) -> bool:
        """Measure this forward's memory? Its first forwards of each size, then every MEASURE_EVERY-th:
        reading a process's memory costs a few hundred microseconds on a CPU, a step's whole budget."""
        seen = self._forwards.get((key, images), 0) + 1
        self._forwards[(key, images)] = seen
        return seen <= MEASURE_FIRST or seen % MEASURE_EVERY == 0

    def reading(self) -> MemoryReading:
        """What the device has in use now, read at most every READING_MAX_AGE_S."""
        now = time.monotonic()
        last = self._reading
        if last is None or last[0] is not self.probe or now - last[1] > READING_MAX_AGE_S:
            last = self._reading = (self.probe, now, self.probe.read())
        return last[2]

    def begin(self) -> int:
        self.probe.reset_peak()
        reading = self.probe.read()
        self._reading = (self.probe, time.monotonic(), reading)
        return reading.used

    def end(self, key: tuple, images: int, used_before: int) -> None:
        peak = self.probe.peak_used()
        per_image = max(0, peak - used_before) / max(1, images)
        with self._lock:
            self.peak_used = max(self.peak_used, peak)
            if per_image > 0:
                old = self._cost.get(key)
                self._cost[key] = per_image if old is None else max(per_image, 0.8 * old + 0.2 * per_image)

    def cost_per_image(self, key: tuple) -> float | None:
        with self._lock:
            return self._cost.get(key)

    def recommend(self, key: tuple, threshold: float) -> int | None:
        """Images that fit under `threshold` x total memory; None until a cost is known."""
        cost = self.cost_per_image(key)
        if not cost:
            return None
        reading = self.reading()
        room = threshold * reading.total - reading.used
        return max(0, math.floor(room / cost))

    def snapshot(self) -> dict:
        reading = self.probe.read()
        return {"used_bytes": int(reading.used), "total_bytes": int(reading.total), "free_bytes": int(reading.free),
                "peak_used_bytes": int(self.peak_used), "parked_host_bytes": int(self.parked_host_bytes)}


class BatchSizer:
    """The size of the next forward for a forward key: memory, configuration and OOM history."""

    def __init__(self, monitor: MemoryMonitor, max_batch_size: int, threshold: float = 0.9):
        self.monitor = monitor
        self.max_batch_size = max_batch_size
        self.threshold = threshold
        self._lock = threading.Lock()  # guards the two OOM maps
        self._failed_at: dict[tuple, int] = {}
        self._limit: dict[tuple, int] = {}
        self._clean: dict[tuple, int] = {}

    def size(self, key: tuple, minimum: int = 1, threshold: float | None = None) -> tuple[int, str]:
        """How many images the next forward may hold, and what bounds it.

        A forward's activations are transient, so the room measured between
        forwards is what the next forward's images may fill; the latents of
        images in flight are already counted in it.
        """
        size, reason = self.max_batch_size, "configured"
        recommended = self.monitor.recommend(key, threshold or self.threshold)
        if recommended is not None and recommended < size:
            size, reason = max(minimum, recommended), "memory"
        with self._lock:
            if key in self._limit and self._limit[key] < size:
                size, reason = self._limit[key], "out_of_memory"
        return max(1, size), reason

    def explain(self, key: tuple, minimum: int = 1, threshold: float | None = None) -> dict:
        """`size` as a reply: the size it would pick now, what bounds it, and the figures behind it."""
        size, reason = self.size(key, minimum, threshold)
        threshold = threshold or self.threshold
        cost = self.monitor.cost_per_image(key)
        reading = self.monitor.probe.read()
        with self._lock:
            limit, failed_at = self._limit.get(key), self._failed_at.get(key)
        if reason == "out_of_memory":
            why = f"a forward of {failed_at} images ran out of memory; at most {limit} until it grows back"
        elif reason == "memory":
            why = (f"{size} images of {cost / 2**20:.1f} MiB each fit under {threshold:.0%} of "
                   f"{reading.total / 2**30:.1f} GiB with {reading.used / 2**30:.1f} GiB in use")
        elif cost:
            why = f"the configured maximum of {self.max_batch_size}: memory allows more"
        else:
            why = (f"the configured maximum of {self.max_batch_size}: what one image costs here is not "
                   "measured yet (it is, from the first forward)")
        return {"batch_size": size, "reason": reason, "why": why, "memory_threshold": threshold,
                "bytes_per_image": None if cost is None else int(cost), "used_bytes": int(reading.used),
                "total_bytes": int(reading.total), "configured_max_batch_size": self.max_batch_size,
                "out_of_memory_limit": limit}

    def out_of_memory(self, key: tuple, size: int) -> int:
        """Record a failure at `size`; the new limit is half of it."""
        with self._lock:
            self._failed_at[key] = min(size, self._failed_at.get(key, size))
            self._limit[key] = max(1, size // 2)
            self._clean[key] = 0
            return self._limit[key]

    def clean_forward(self, key: tuple) -> None:
        """Grow the limit back by one after enough clean forwards, short of the size that failed."""
        with self._lock:
            if key not in self._limit:
                return
            self._clean[key] = self._clean.get(key, 0) + 1
            if self._clean[key] >= GROW_AFTER_CLEAN_FORWARDS and self._limit[key] + 1 < self._failed_at[key]:
                self._limit[key] += 1
                self._clean[key] = 0

    def forget(self) -> None:
        """After models unload the old failures no longer describe the device."""
        with self._lock:
            self._failed_at.clear()
            self._limit.clear()
            self._clean.clear()


class ForwardTimes:
    """Learned seconds per UNet forward against the number of images in it, per forward key.

    What one more image costs differs by device (on a GPU a forward of 9
    costs about what 8 cost; on a CPU about 9/8 of it), so it is measured,
    not configured. A size never run is estimated on the line between the
    nearest measured sizes (through zero below the smallest), and beyond the
    largest in proportion to it: a guess that errs towards "companions cost",
    so the size gets run and measured, and the next decision uses the truth.
    """

    def __init__(self):
        self._lock = threading.Lock()  # guards `_seconds`: written by the device thread, read by status calls
        self._seconds: dict[tuple, dict[int, float]] = {}

    def record(self, key: tuple, images: int, seconds: float) -> None:
        with self._lock:
            sizes = self._seconds.setdefault(key, {})
            sizes[images] = smoothed(sizes.get(images), seconds)

    def estimate(self, key: tuple, images: int) -> float | None:
        with self._lock:
            sizes = dict(self._seconds.get(key, {}))
        if not sizes:
            return None
        if images in sizes:
            return sizes[images]
        below = max((n for n in sizes if n < images), default=0)
        above = min((n for n in sizes if n > images), default=None)
        low = sizes.get(below, 0.0)
        if above is None:
            return low * images / below
        return low + (sizes[above] - low) * (images - below) / (above - below)

    def snapshot(self, key: tuple) -> dict[int, float]:
        with self._lock:
            return dict(sorted(self._seconds.get(key, {}).items()))
