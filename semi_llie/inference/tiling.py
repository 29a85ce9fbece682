"""Memory-bounded full-resolution inference: the whole image if it fits, else overlapping, blended tiles.

A tile's output is weighted by a window that falls off towards the tile's inner edges, and every pixel is the
weighted mean of the tiles covering it, so seams vanish (METHOD §8: no resize, ever). The model sees each
tile whole; tiles are placed so that they never leave the image (the last one is flush with the border), so no
padding is needed unless the image itself is smaller than a tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from semi_llie.models.enhancer import Enhancer, illumination_maps

# Peak activation memory of a MambaLowlight forward pass (no grad, fp32, CPU) per input pixel and per channel
# of its widest projection (SS2D's in_proj: 2 · expand · embed_dim outputs): the largest value measured
# (docs/results/inference_memory.md) plus ~15 %, so that tiled runs stay just under the budget.
BYTES_PER_PIXEL_PER_CHANNEL = 60.0
DEFAULT_MAX_MEMORY_MB = 4096
DEFAULT_OVERLAP = 32
MIN_TILE = 64


def activation_bytes_per_pixel(enhancer: Enhancer) -> float:
    """Estimated peak inference memory per input pixel of `enhancer`'s network, in bytes."""
    widths = [m.out_features for m in enhancer.modules() if isinstance(m, nn.Linear)]
    widths += [m.out_channels for m in enhancer.modules() if isinstance(m, nn.Conv2d)]
    return BYTES_PER_PIXEL_PER_CHANNEL * max(widths, default=64)


@dataclass(frozen=True)
class TilePlan:
    """How to run one image: `tile` None = whole image, else square tiles of that side with `overlap`."""

    tile: int | None
    overlap: int

    @classmethod
    def for_image(
        cls,
        height: int,
        width: int,
        bytes_per_pixel: float,
        max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
        tile: int | None = None,
        overlap: int = DEFAULT_OVERLAP,
    ) -> TilePlan:
        """A user `tile` is used whenever the image exceeds it; otherwise tiles only when over the budget."""
        if tile is not None:
            if overlap >= tile:
                raise ValueError(f"overlap {overlap} must be smaller than tile {tile}")
            return cls(tile if max(height, width) > tile else None, overlap)
        budget_pixels = max_memory_mb * 2**20 / bytes_per_pixel
        if height * width <= budget_pixels:
            return cls(None, overlap)
        side = max(MIN_TILE, int(math.isqrt(int(budget_pixels))) // 32 * 32)
        return cls(side, min(overlap, side // 4))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of side `tile` covering [0, length) with at least `overlap` shared pixels."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    # Spread the tiles evenly so every overlap is >= `overlap` and the last tile ends at the border.
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def blend_window(height: int, width: int, overlap: int, device: torch.device | None = None) -> Tensor:
    """1×1×h×w weights: raised-cosine ramps over `overlap` pixels at each edge, 1 inside, never 0."""

    def ramp(length: int) -> Tensor:
        weights = torch.ones(length, device=device)
        span = min(overlap, length // 2)
        if span > 0:
            # Half-pixel offsets keep the outermost weight above zero: a pixel on the image border is covered
            # by one tile only, and its weight must not vanish.
            steps = (torch.arange(span, device=device) + 0.5) / span
            rise = 0.5 - 0.5 * torch.cos(math.pi * steps)
            weights[:span] = rise
            weights[length - span :] = rise.flip(0)
        return weights

    return (ramp(height)[:, None] * ramp(width)[None, :])[None, None]


@torch.no_grad()
def enhance_image(enhancer: Enhancer, x: Tensor, plan: TilePlan, illum: Tensor | None = None) -> Tensor:
    """x: B×3×H×W in [0, 1] on the model's device -> B×3×H×W enhanced, whole or tiled per `plan`.

    For a model with a precomputed illumination map, the map of the whole image is computed once and tiled
    alongside, so a tile sees the same map as it would inside the whole image; likewise a model's exposure
    gain is the whole image's, so that a dark tile is not brightened more than its neighbours.
    """
    if plan.tile is None:
        return enhancer(x, illum)
    if enhancer.needs_illumination and illum is None:
        illum = illumination_maps(x)
    gain = enhancer.exposure_gain(x)  # B×3×1×1 or None
    batch, _, height, width = x.shape
    tile_h, tile_w = min(plan.tile, height), min(plan.tile, width)
    window = blend_window(tile_h, tile_w, plan.overlap, x.device)  # 1×1×th×tw
    total = torch.zeros(batch, 3, height, width, device=x.device)
    weight = torch.zeros(1, 1, height, width, device=x.device)
    for top in tile_starts(height, tile_h, plan.overlap):
        for left in tile_starts(width, tile_w, plan.overlap):
            rows, cols = slice(top, top + tile_h), slice(left, left + tile_w)
            tile_illum = illum[..., rows, cols] if illum is not None else None
            total[..., rows, cols] += enhancer(x[..., rows, cols], tile_illum, gain).float() * window
            weight[..., rows, cols] += window
    return total / weight
