"""Pixel work that runs on the CPU pool: resampling, enhancement, encoding with metadata.

Pillow does the pixel math (Lanczos resampling, unsharp mask); every function
takes and returns a uint8 HWC array, so steps chain without conversions in
the workflow code.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from PIL.PngImagePlugin import PngInfo

from .pixels import as_output_pixels

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
EXIF_IMAGE_DESCRIPTION = 0x010E


def _image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)


def _pixels(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image)
    return as_output_pixels(pixels[:, :, None] if pixels.ndim == 2 else pixels)


def resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    return _pixels(_image(pixels).resize((width, height), Image.Resampling.LANCZOS))


def upscale(pixels: np.ndarray, factor: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    return resize(pixels, width * factor, height * factor)


def enhance(pixels: np.ndarray, sharpness: float, contrast: float, color: float) -> np.ndarray:
    """Unsharp mask then contrast and saturation; 1.0 leaves an aspect unchanged."""
    image = _image(pixels)
    if sharpness > 0:
        image = image.filter(ImageFilter.UnsharpMask(radius=2, percent=int(sharpness * 100), threshold=2))
    if contrast != 1.0:
        image = ImageEnhance.Contrast(image).enhance(contrast)
    if color != 1.0 and image.mode in ("RGB", "RGBA"):
        image = ImageEnhance.Color(image).enhance(color)
    return _pixels(image)


def encode(pixels: np.ndarray, image_format: str, metadata: dict, quality: int = 90) -> bytes:
    """Encoded bytes with `metadata`: PNG text chunks, or an EXIF description for JPEG and WebP."""
    pil_format = FORMATS[image_format.lower()]
    image = _image(pixels)
    buffer = io.BytesIO()
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    if pil_format == "PNG":
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        image.save(buffer, "PNG", pnginfo=info)
    else:
        if pil_format == "JPEG" and image.mode == "RGBA":
            image = image.convert("RGB")
        exif = Image.Exif()
        exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(text)
        image.save(buffer, pil_format, quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def decode(data: bytes) -> tuple[np.ndarray, dict]:
    """Pixels and text metadata back from encoded bytes."""
    image = Image.open(io.BytesIO(data))
    image.load()
    metadata = dict(getattr(image, "text", {}) or {})
    description = image.getexif().get(EXIF_IMAGE_DESCRIPTION)
    if description:
        metadata.update(json.loads(description))
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    return _pixels(image), metadata
