"""Precomputed illumination map (METHOD §5) and the perceptual hash used by the leak guard."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.fft import dctn

RETINEX_SIGMAS = (15.0, 60.0, 90.0)


def illumination_map(rgb: np.ndarray, sigmas: tuple[float, ...] = RETINEX_SIGMAS) -> np.ndarray:
    """Multi-scale retinex illumination estimate of an H×W×3 uint8 image, as H×W×3 uint8.

    For each σ: log10(GaussianBlur(img, σ) + 1e-8) clipped at 0; the mean over σ is min-max
    normalised over the whole image (all channels) to [0, 1] and quantised to 8 bits.
    """
    image = rgb.astype(np.float32)
    total = np.zeros_like(image)
    for sigma in sigmas:
        # "mirror" is OpenCV's default BORDER_REFLECT_101, the usual border of retinex code.
        blurred = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="mirror")
        total += np.maximum(np.log10(blurred + 1e-8), 0.0)
    mean = total / len(sigmas)
    low, high = float(mean.min()), float(mean.max())
    # A constant image (e.g. all black) has no range: its map is all zeros rather than NaN.
    normalised = (mean - low) / (high - low) if high > low else np.zeros_like(mean)
    return np.round(normalised * 255.0).astype(np.uint8)


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


def hamming_distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


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
