"""ImageSpec: what decides one image's pixels.

Its own module, apart from the loop (`denoise`), because requests are
planned into specs before torch is imported: the worker's start leaves torch
to the device side's start thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .schedulers import DEFAULT_SCHEDULER

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True, eq=False)
class ImageSpec:
    """Everything that decides one image's pixels."""

    model_id: str
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    scheduler: str = DEFAULT_SCHEDULER
    strength: float = 1.0
    init_image: np.ndarray | None = field(default=None, repr=False)  # uint8 HWC, for img2img

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    def forward_key(self) -> tuple:
        """What must match for two images to share one denoiser forward."""
        return (self.model_id, self.height, self.width, self.uses_guidance)

    def schedule_key(self) -> tuple:
        """What must match for two images to share one scheduler (a cohort)."""
        strength = self.strength if self.init_image is not None else 1.0
        return (*self.forward_key(), self.steps, self.scheduler, self.guidance_scale, strength)
