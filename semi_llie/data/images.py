"""Image files in, 8-bit RGB arrays out; deterministic lossless PNG bytes for the shards.

Every image that enters a shard goes through `load_rgb8`, so the shards hold one representation only:
upright (EXIF orientation applied), 8-bit, 3-channel RGB, whatever the file was (grayscale, RGBA,
palette, 16-bit). Files that cannot be decoded raise `BadImageError` naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from semi_llie.data.problems import SkippableInputError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

# PNG settings fixed so the same pixels always give the same bytes (byte-identical rebuilds). zlib level 3:
# encoding is most of a shard build's cost, and level 6 buys only about 10 % smaller files for it.
PNG_COMPRESS_LEVEL = 3


class BadImageError(SkippableInputError):
    """An image file that exists but cannot be decoded (corrupt, truncated, not really an image)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__([path], f"cannot read image {path}: {reason}")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def load_rgb8(path: Path) -> np.ndarray:
    """Decode `path` fully and return an upright H×W×3 uint8 RGB array."""
    try:
        with Image.open(path) as image:
            image.load()  # full decode here, so truncated files fail now (Pillow raises OSError)
            return to_rgb8(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImageError(path, str(err) or type(err).__name__) from err


def to_rgb8(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode to H×W×3 uint8 RGB; high bit depths are scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit grayscale (or 32-bit integer/float holding 16-bit data): scale the range to 0..255.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    # Palette, grayscale, CMYK, RGBA (alpha dropped: the photo underneath is what the model sees).
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless, deterministic PNG bytes of an H×W×3 uint8 array (no metadata chunks)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """H×W×3 uint8 array from PNG bytes written by `encode_png`."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy, so torch can wrap it
