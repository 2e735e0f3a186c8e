"""The built-in shapes model: a synthetic dataset, its training recipe, and the weights it produced.

`builtin:tiny-sd` has random weights: it proves the worker mirrors diffusers,
but draws noise. `builtin:shapes` is the same kind of pipeline trained here on
scenes drawn by code ("a red circle on a blue background"), so the demo shows
pictures and tests can check that prompts, guidance and img2img mean something.
"""

from ..diffusion.shipped_models import SHAPES_FOLDER, SHAPES_GUIDANCE, SHAPES_MODEL_ID

__all__ = ["SHAPES_FOLDER", "SHAPES_GUIDANCE", "SHAPES_MODEL_ID"]
