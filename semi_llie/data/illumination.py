"""Precomputed illumination map (METHOD §5) and the perceptual hash used by the leak guard."""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy.fft import dctn

RETINEX_SIGMAS = (15.0, 60.0, 90.0)


def illumination_map(
    rgb: np.ndarray, sigmas: tuple[float, ...] = RETINEX_SIGMAS, reduction: int | None = None
) -> np.ndarray:
    """Multi-scale retinex illumination estimate of an H×W×3 uint8 image, as H×W×3 uint8.

    For each σ: log10(GaussianBlur(img, σ) + 1e-8) clipped at 0; the mean over σ is min-max
    normalised over the whole image (all channels) to [0, 1] and quantised to 8 bits.

    The blurs run on a grid `reduction` times coarser (default: smallest σ / 5, so 3 for the paper's σ = 15):
    a Gaussian of σ >= 15 passes almost nothing above that grid's Nyquist limit, so block-averaging first,
    blurring with the remaining width and interpolating back changes the map by well under one 8-bit level
    on average (tests/test_shards_build.py states the bound) at a fraction of the cost. `reduction=1` is the
    definition at full resolution.
    """
    factor = max(1, int(min(sigmas) // 5)) if reduction is None else reduction
    image = rgb.astype(np.float32)
    height, width = image.shape[:2]
    if factor > 1:
        image = _block_mean(image, factor)
    total = np.zeros_like(image)
    for sigma in sigmas:
        # On the coarse grid the block average has already blurred by variance (k² - 1) / 12 and the
        # interpolation back adds about k² / 6: blur by what remains of σ², in coarse pixels.
        remaining = math.sqrt(max(sigma**2 - (factor**2 - 1) / 12 - factor**2 / 6, 0.0)) / factor
        # BORDER_REFLECT_101 (scipy's "mirror") is the usual border of retinex code. OpenCV's kernel spans
        # ±4σ like scipy's default; its separable float32 filter computes every pixel with the same code
        # whatever the thread split, so the map stays byte-reproducible.
        blurred = cv2.GaussianBlur(
            image, (0, 0), sigmaX=remaining, sigmaY=remaining, borderType=cv2.BORDER_REFLECT_101
        )
        total += np.maximum(np.log10(blurred + 1e-8), 0.0)
    mean = total / len(sigmas)
    if factor > 1:
        mean = _upsample(mean, factor, height, width)
    low, high = float(mean.min()), float(mean.max())
    # A constant image (e.g. all black) has no range: its map is all zeros rather than NaN.
    normalised = (mean - low) / (high - low) if high > low else np.zeros_like(mean)
    return np.round(normalised * 255.0).astype(np.uint8)


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """H×W×3 -> ceil(H/k)×ceil(W/k)×3 means of k×k blocks (the image mirrored to a multiple of k first)."""
    height, width = image.shape[:2]
    pad_h, pad_w = -height % factor, -width % factor
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    h, w = image.shape[0] // factor, image.shape[1] // factor
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)  # an integer factor: exact block means


def _upsample(image: np.ndarray, factor: int, height: int, width: int) -> np.ndarray:
    """Bilinear ×factor of a block-mean grid (block centres land on their pixels), cropped to height×width.

    OpenCV maps output pixel x to input (x + 0.5) / k - 0.5 and repeats the edge, in float32 for float input.
    """
    h, w = image.shape[:2]
    return cv2.resize(image, (w * factor, h * factor), interpolation=cv2.INTER_LINEAR)[:height, :width]


def perceptual_hash(rgb: np.ndarray) -> int:
    """64-bit DCT pHash of an H×W×3 uint8 image.

    Grayscale, area-resized to 32×32, 2-D DCT, the 8×8 lowest frequencies without the DC term compared
    with their median. Robust to resizing, re-encoding, mild noise and brightness changes.
    """
    gray = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    small = _area_resize(gray, 32)
    coefficients = dctn(small, norm="ortho")[:8, :8].ravel()[1:]
    bits = coefficients > np.median(coefficients)
    return int("".join("1" if b else "0" for b in bits), 2)


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def close_hashes(a: list[int], b: list[int], max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j) of the 64-bit hashes a[i], b[j] at most `max_distance` bits apart, in row order.

    Computed in blocks of 256 rows, so memory stays at about 5 KB × len(b) whatever len(a) is.
    """
    left, right = np.array(a, dtype=np.uint64), np.array(b, dtype=np.uint64)
    rows, cols = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(left), 256):
        xor = left[start : start + 256, None] ^ right[None, :]  # (block, len(b)) uint64
        distances = _POPCOUNT[xor[..., None].view(np.uint8)].sum(axis=-1, dtype=np.int32)
        found_rows, found_cols = np.nonzero(distances <= max_distance)
        rows.append(found_rows + start)
        cols.append(found_cols)
    return np.concatenate(rows), np.concatenate(cols)


def _area_resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize H×W to size×size by averaging over the input pixels each output pixel covers."""
    rows = np.linspace(0, gray.shape[0], size + 1).astype(int)
    cols = np.linspace(0, gray.shape[1], size + 1).astype(int)
    # Images smaller than `size` repeat pixels instead of averaging empty ranges.
    rows[1:] = np.maximum(rows[1:], rows[:-1] + 1)
    cols[1:] = np.maximum(cols[1:], cols[:-1] + 1)
    gray = np.pad(
        gray, ((0, max(0, rows[-1] - gray.shape[0])), (0, max(0, cols[-1] - gray.shape[1]))), "edge"
    )
    row_sums = np.add.reduceat(gray, rows[:-1], axis=0) / np.diff(rows)[:, None]
    return np.add.reduceat(row_sums, cols[:-1], axis=1) / np.diff(cols)[None, :]
