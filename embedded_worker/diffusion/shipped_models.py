"""The models shipped inside the package, by id: a folder each, loaded like any local model.

`builtin:shapes` was trained here (`toy_model/` holds its dataset and recipe,
and the weights it produced); the model catalog and the configuration's
default only need its id, its folder and its guidance, so they read them here
and never import the training code.
"""

from pathlib import Path

SHAPES_MODEL_ID = "builtin:shapes"
SHAPES_FOLDER = Path(__file__).resolve().parent.parent / "toy_model" / "shapes"
# its guidance when a request names none: it followed 48 of 48 random captions at 2-3 and 35 at 7.5,
# SD's usual scale, which over-steers a model this small (README, "The built-in model")
SHAPES_GUIDANCE = 3.0
SHIPPED_MODELS = {SHAPES_MODEL_ID: SHAPES_FOLDER}
SHIPPED_GUIDANCE = {SHAPES_MODEL_ID: SHAPES_GUIDANCE}  # what our own trained model draws best at
