"""The built-in shapes model: a synthetic dataset, its training recipe, and the weights it produced.

`builtin:tiny-sd` has random weights: it proves the worker mirrors diffusers,
but draws noise. `builtin:shapes` is the same kind of pipeline trained here on
scenes drawn by code ("a red circle on a blue background"), so the demo shows
pictures and tests can check that prompts, guidance and img2img mean something.
"""

from pathlib import Path

SHAPES_MODEL_ID = "builtin:shapes"
SHAPES_FOLDER = Path(__file__).parent / "shapes"  # a diffusers folder, loaded like any local model
# its guidance when a request names none: it followed 48 of 48 random captions at 2-3 and 35 at 7.5,
# SD's usual scale, which over-steers a model this small (README, "The built-in model")
SHAPES_GUIDANCE = 3.0
