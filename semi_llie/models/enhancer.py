"""The deployable model: a backbone wrapped so that it maps B×3×H×W in [0, 1] to the enhanced image.

`Enhancer` is what the trainer logs to MLflow (mlflow.pytorch pickles the module by reference to this class),
so it holds nothing but the network and returns a single tensor. Registered models from before the package
was split into rooms reference `semi_llie.modelio.Enhancer`, which `semi_llie/modelio.py` keeps importable.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Enhancer(nn.Module):
    """B×3×H×W in [0, 1] -> enhanced B×3×H×W, clamped to [0, 1], at the input's resolution.

    Wraps a network with the MambaLowlight interface, `forward(x, illum=None) -> (y, grad_y)`. For a model
    with `illumination="precomputed"` the illumination map is computed here exactly as the shards store it
    (METHOD §5), unless the caller passes one (tiled inference passes the map of the whole image), and so is
    the exposure gain of a model with `exposure_gain` (tiled inference passes the whole image's). A model
    attribute `size_multiple` (> 1) makes the input reflect-padded to a multiple of it and the output
    cropped back, never resized (METHOD §8).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def needs_illumination(self) -> bool:
        return getattr(self.model, "illumination", "learned") == "precomputed"

    def exposure_gain(self, x: Tensor) -> Tensor | None:
        """x: B×3×H×W -> the model's per-image gain B×3×1×1 for it, or None for a model without one."""
        gain = getattr(self.model, "exposure_gain", None)
        return gain(x) if gain is not None else None

    def forward(self, x: Tensor, illum: Tensor | None = None, gain: Tensor | None = None) -> Tensor:
        """x, illum: B×3×H×W in [0, 1], gain: B×3×1×1 -> B×3×H×W in [0, 1]."""
        if self.needs_illumination and illum is None:
            illum = illumination_maps(x)
        if gain is None:
            gain = self.exposure_gain(x)  # before padding: the padded border must not move the image's mean
        height, width = x.shape[-2:]
        multiple = int(getattr(self.model, "size_multiple", 1))
        x = reflect_pad_to_multiple(x, multiple)
        if illum is not None:
            illum = reflect_pad_to_multiple(illum.to(x), multiple)
        y, _ = self.model(x, illum) if gain is None else self.model(x, illum, gain)
        return y[..., :height, :width].clamp(0, 1)


def reflect_pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """B×C×H×W -> B×C×H'×W' with H', W' the next multiples of `multiple`, padded at the bottom/right."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    # Reflection needs the pad to be smaller than the side; tiny images fall back to repeating the edge.
    mode = "reflect" if pad_h < x.shape[-2] and pad_w < x.shape[-1] else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def illumination_maps(x: Tensor) -> Tensor:
    """B×3×H×W in [0, 1] -> B×3×H×W illumination maps in [0, 1], from the 8-bit image like the shards'."""
    from semi_llie.data.illumination import illumination_map

    images = (
        (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    maps = np.stack([illumination_map(image) for image in images])  # B×H×W×3 uint8
    return torch.from_numpy(maps).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255.0
