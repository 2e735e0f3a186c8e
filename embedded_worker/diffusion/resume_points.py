"""Where an image continues from instead of step 0: its denoise state's bytes (`denoise_state`), kept on disk
(a checkpoint), in this process's memory (the head's copy of an image out on an actor) or moved off an
accelerator into host memory (a paused image).

One protocol (`ResumePoint`), so what takes, cancels or suspends an image never asks which kind it holds.
No torch here: the lifecycle side and a cluster head hold resume points without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol


class ResumePoint(Protocol):
    step: int
    # only in this process's memory: a suspending close writes it as a checkpoint, or it dies with the process
    in_memory_only: ClassVar[bool]

    def read(self) -> bytes: ...

    def release(self) -> None:
        """No longer needed (the image resumed or ended): whatever counted its memory stops counting it."""


@dataclass(frozen=True)
class StoredState:
    """A checkpoint on disk (`lifecycle.checkpoints`), read when a device takes the image."""

    path: Path
    step: int
    in_memory_only: ClassVar[bool] = False

    def read(self) -> bytes:
        return self.path.read_bytes()

    def release(self) -> None:
        pass  # the file is the checkpoints' to remove, with its record


@dataclass(frozen=True)
class HeldState:
    """A state's bytes held in memory: resumable like a checkpoint file, and written as one (`step_index`,
    `to_bytes`: what `Checkpoints.save` asks of a state)."""

    step: int
    data: bytes
    in_memory_only: ClassVar[bool] = True

    @property
    def step_index(self) -> int:
        return self.step

    def read(self) -> bytes:
        return self.data

    def to_bytes(self) -> bytes:
        return self.data

    def release(self) -> None:
        pass


@dataclass(frozen=True)
class OffloadedState(HeldState):
    """A paused image's state moved off its accelerator into host memory (`ActiveSet`), counted by the device's
    memory monitor until it is restored or dropped."""

    monitor: object = None  # the MemoryMonitor counting it

    def release(self) -> None:
        self.monitor.parked_host_bytes -= len(self.data)
