"""ModelDefaults: what a request that leaves a knob empty gets, as the model's own pipeline would give it.

SD-shaped defaults (20 steps at guidance 7.5) are wrong for the others: a
guidance-distilled Flux draws at an embedded 3.5 in 28 steps, a timestep-
distilled one in 4 steps without guidance, SD3 at 7.0 and Chroma at 5.0.
Each family reads its own from the model folder (`defaults(folder)`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDefaults:
    steps: int
    guidance_scale: float
    width: int
    height: int
    max_sequence_length: int | None  # T5 tokens per prompt; None where the family has CLIP's fixed 77 only

    def describe(self) -> dict:
        return {"steps": self.steps, "guidance_scale": self.guidance_scale, "width": self.width,
                "height": self.height, "max_sequence_length": self.max_sequence_length}
