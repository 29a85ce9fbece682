"""The one image reader and writer: files in, upright RGB arrays out, and back.

Every image the platform reads goes through `read_image`: the shard builder (which stores 8-bit PNGs,
`load_rgb8`), `evaluate` and `enhance` (which keep 16-bit precision). So a photo is decoded the same way
wherever it enters: EXIF orientation applied, grayscale repeated to three channels, alpha dropped (the photo
underneath is what the model sees), 16-bit samples kept as 16 bits. Files that cannot be decoded raise
`BadImageError` naming the file. `write_image` writes atomically (semi_llie.fileio), 16-bit where the format
allows it. Shard members are PNG bytes from `encode_png`, deterministic so that rebuilds are byte-identical.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from semi_llie.data.problems import SkippableInputError
from semi_llie.errors import UserError
from semi_llie.fileio import atomic_write

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
SIXTEEN_BIT_SUFFIXES = frozenset({".png", ".tif", ".tiff"})
JPEG_QUALITY = 95
EXIF_ORIENTATION = 0x0112

# PNG settings fixed so the same pixels always give the same bytes (byte-identical rebuilds). zlib level 3:
# encoding is most of a shard build's cost, and level 6 buys little (docs/results/design_measurements.md).
PNG_COMPRESS_LEVEL = 3


class BadImageError(SkippableInputError):
    """An image file that exists but cannot be decoded (corrupt, truncated, not really an image)."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__([path], f"cannot read image {path}: {detail}")
        self.detail = detail  # what is wrong with the file, without its name


@dataclass(frozen=True)
class LoadedImage:
    pixels: np.ndarray  # H×W×3 RGB, upright: uint8, or uint16 for a 16-bit source

    @property
    def bit_depth(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    def to_float(self) -> np.ndarray:
        """H×W×3 float32 in [0, 1]."""
        return self.pixels.astype(np.float32) / (65535.0 if self.bit_depth == 16 else 255.0)

    def to_rgb8(self) -> np.ndarray:
        """H×W×3 uint8 (16-bit samples rounded to the nearest 8-bit level)."""
        if self.bit_depth == 8:
            return self.pixels
        return np.round(self.pixels.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: Path) -> LoadedImage:
    """Decode `path` fully to an upright RGB array, keeping 16-bit precision."""
    # OpenCV decodes 16-bit colour PNG/TIFF, which Pillow truncates to 8 bits; with IMREAD_UNCHANGED it leaves
    # the EXIF orientation alone, which we apply from the tag Pillow reads (without decoding the pixels).
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise BadImageError(path, str(err)) from err
    pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if pixels is None:
        raise BadImageError(path, "not a readable image (empty, truncated or an unsupported format)")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise BadImageError(path, f"unsupported sample type {pixels.dtype}; convert it to 8 or 16 bits")
    if pixels.ndim == 2:
        rgb = np.repeat(pixels[:, :, None], 3, axis=2)
    elif pixels.shape[2] == 1:
        rgb = np.repeat(pixels, 3, axis=2)
    else:
        rgb = pixels[:, :, 2::-1]  # BGR(A) -> RGB, alpha dropped
    if path.suffix.lower() not in (".tif", ".tiff"):  # OpenCV's TIFF decoder applies the tag itself
        rgb = apply_exif_orientation(rgb, exif_orientation(path))
    return LoadedImage(np.ascontiguousarray(rgb))


def load_rgb8(path: Path) -> np.ndarray:
    """Decode `path` to an upright H×W×3 uint8 RGB array (what the shards store)."""
    return read_image(path).to_rgb8()


def exif_orientation(path: Path) -> int:
    """The EXIF orientation tag (1 when absent), read from the header without decoding any pixel."""
    try:
        with Image.open(path) as image:
            # Not image.getexif(): for a PNG without an eXIf chunk before its pixels it decodes the image.
            data = image.info.get("exif")
            if not data:
                return 1
            exif = Image.Exif()
            exif.load(data)
            return int(exif.get(EXIF_ORIENTATION, 1))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return 1  # decodable by OpenCV but not Pillow (or no EXIF): nothing to rotate


def apply_exif_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """H×W×C as stored -> upright, for EXIF orientations 1-8 (as Pillow's ImageOps.exif_transpose)."""
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }
    return transforms[orientation](pixels) if orientation in transforms else pixels


def write_image(path: Path, pixels: np.ndarray, bit_depth: int = 8) -> None:
    """H×W×3 float RGB in [0, 1] -> `path` (format from its suffix), atomically; 16-bit where it can be."""
    depth = 16 if bit_depth == 16 and path.suffix.lower() in SIXTEEN_BIT_SUFFIXES else 8
    top = 65535.0 if depth == 16 else 255.0
    values = np.round(np.clip(pixels, 0.0, 1.0) * top).astype(np.uint16 if depth == 16 else np.uint8)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if path.suffix.lower() in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(path.suffix, np.ascontiguousarray(values[:, :, ::-1]), params)
    if not ok:
        raise UserError(f"cannot encode {path} as {path.suffix}; choose another --format")
    with atomic_write(path) as handle:
        handle.write(encoded.tobytes())


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless, deterministic PNG bytes of an H×W×3 uint8 array (no metadata chunks)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """H×W×3 uint8 array from PNG bytes written by `encode_png`."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy, so torch can wrap it
