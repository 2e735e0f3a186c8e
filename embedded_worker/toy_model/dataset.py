"""The shapes dataset: scenes drawn by code, each with the caption that describes it.

Nothing is downloaded: a scene is a coloured circle, square or triangle on a
plain background of another colour, slightly moved and resized, rendered
anti-aliased at 64 px. The same seed gives the same scenes on every machine,
so a training run and the tests that check meaning agree on what a caption
should look like.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: smooth edges the autoencoder can learn
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
CENTRE_JITTER = 3  # pixels; the centre of the image always lies inside the shape
SIZE_RANGE = (12, 18)  # the shape's radius in pixels; its corners stay clear of a 4-pixel border


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    dx: int = 0
    dy: int = 0
    radius: int = 15

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_captions() -> list[str]:
    """Every caption the dataset can produce, in a fixed order."""
    return [caption(shape, colour, background)
            for shape in SHAPES for colour in COLOURS for background in COLOURS if background != colour]


def random_scene(rng: random.Random) -> Scene:
    colour, background = rng.sample(list(COLOURS), 2)
    return Scene(
        shape=rng.choice(SHAPES),
        colour=colour,
        background=background,
        dx=rng.randint(-CENTRE_JITTER, CENTRE_JITTER),
        dy=rng.randint(-CENTRE_JITTER, CENTRE_JITTER),
        radius=rng.randint(*SIZE_RANGE),
    )


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 (64, 64, 3) image."""
    big = SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy = (SIZE / 2 + scene.dx) * SUPERSAMPLE, (SIZE / 2 + scene.dy) * SUPERSAMPLE
    r = scene.radius * SUPERSAMPLE
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        half = 0.9 * r
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:  # pointing up, centred on its centroid; larger so that its middle is as wide as the others'
        outer = 1.3 * r
        draw.polygon([(cx, cy - outer), (cx - 0.866 * outer, cy + outer / 2), (cx + 0.866 * outer, cy + outer / 2)],
                     fill=fill)
    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX))


def make_scenes(count: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(count)]


def render_all(scenes: list[Scene]) -> np.ndarray:
    """Images as one uint8 (N, 64, 64, 3) array."""
    return np.stack([render(scene) for scene in scenes])
