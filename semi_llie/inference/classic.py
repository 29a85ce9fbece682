"""Classic, training-free low-light enhancers: the floor a learned model has to clear, and their scores.

Both map a batch `B×3×H×W` in [0, 1] to an enhanced batch of the same shape, image by image, so they can
be scored by the same code as a trained `Enhancer`.

- `gamma_correction`: out = x ** gamma. With `gamma=None` (the default) gamma is chosen per image so the
  mean luminance lands on `target_mean`: mean(Y) ** gamma = target_mean gives
  gamma = log(target_mean) / log(mean(Y)) (exact for the mean of a flat image, close for real ones).
- `histogram_equalization`: equalise the luminance Y (BT.601 weights) over 256 bins, then scale R, G, B by
  the same per-pixel ratio Y_eq / Y, which keeps hue and saturation; equalising R, G, B separately would
  shift colours, and replacing Y in YCbCr would grey out dark images, whose chroma is near zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from semi_llie.data.streams import eval_loader
from semi_llie.errors import UserError
from semi_llie.metrics.evaluation import means, samples_of, score_split
from semi_llie.metrics.full_reference import FullReferenceMetrics

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601
_EPS = 1e-4


def luminance(images: torch.Tensor) -> torch.Tensor:
    """B×3×H×W -> B×1×H×W."""
    weights = images.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def gamma_correction(
    images: torch.Tensor, gamma: float | None = None, target_mean: float = 0.45
) -> torch.Tensor:
    """B×3×H×W in [0, 1] -> B×3×H×W. A fixed `gamma`, or per image the gamma that maps mean Y to target."""
    images = images.clamp(0.0, 1.0)
    if gamma is not None:
        return images.pow(gamma)
    if not 0.0 < target_mean < 1.0:
        raise ValueError(f"target_mean must be in (0, 1), got {target_mean}")
    mean = luminance(images).mean(dim=(1, 2, 3)).clamp(_EPS, 1.0 - _EPS)  # (B,)
    gammas = math.log(target_mean) / mean.log()  # (B,)
    return images.clamp_min(_EPS).pow(gammas.view(-1, 1, 1, 1)).clamp(0.0, 1.0)


def histogram_equalization(images: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """B×3×H×W in [0, 1] -> B×3×H×W, luminance equalised per image, colour ratios kept."""
    images = images.clamp(0.0, 1.0)
    luma = luminance(images)  # (B, 1, H, W)
    levels = (luma * (bins - 1)).round().long().flatten(1)  # (B, H*W)
    equalized = torch.empty_like(luma)
    for index in range(images.shape[0]):
        counts = torch.bincount(levels[index], minlength=bins).to(images.dtype)
        cdf = counts.cumsum(0)
        # Classic mapping: the lowest occupied level goes to 0 and the highest to 1.
        cdf_min = cdf[counts > 0][0]
        lookup = ((cdf - cdf_min) / (cdf[-1] - cdf_min).clamp_min(1.0)).clamp(0.0, 1.0)
        equalized[index] = lookup[levels[index]].view_as(luma[index])
    ratio = (equalized + _EPS) / (luma + _EPS)
    return (images * ratio).clamp(0.0, 1.0)


BASELINES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gamma": gamma_correction,
    "histeq": histogram_equalization,
}


def score_baselines(
    shards: str | Path, split: str = "val", names: Sequence[str] = tuple(BASELINES)
) -> dict[str, dict[str, Any]]:
    """Score the named baselines (and the untouched input, as "input") on a shard split at full resolution.

    Returns {name: {"metrics": {metric: mean}, "per_image": {key: {metric: value}}}}, with the metrics of
    `semi_llie.metrics.full_reference.FullReferenceMetrics` (the ones `semi-llie evaluate` and validation
    report), plus "settings": the metric settings.
    """
    enhancers = {"input": lambda sample: sample.low}
    enhancers |= {name: (lambda sample, fn=BASELINES[name]: fn(sample.low)) for name in names}
    metrics = FullReferenceMetrics()
    rows = score_split(samples_of(eval_loader(str(shards), split)), enhancers, metrics)
    if not rows["input"]:
        raise UserError(f"the {split} split of {shards} holds no samples; build shards with a {split} split")
    results: dict[str, dict[str, Any]] = {
        name: {"metrics": means(per_image), "per_image": per_image} for name, per_image in rows.items()
    }
    results["settings"] = metrics.settings
    return results
