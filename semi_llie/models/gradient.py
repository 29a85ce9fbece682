"""The fixed image-gradient magnitude (METHOD §1.6): the model's second output, the gradient loss's target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

GRADIENT_EPS = 1e-6  # keeps sqrt differentiable where the image is flat

# Central differences, zero padding: vertical (below − above), horizontal (right − left).
_CENTRAL_DIFFERENCES = torch.tensor(
    [
        [[0.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
        [[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]],
    ]
)


def image_gradient(x: Tensor) -> Tensor:
    """(B, C, H, W) → (B, C, H, W): per-channel sqrt(gv² + gh² + 1e-6), differentiable w.r.t. x."""
    channels = x.shape[1]
    # Depthwise: each channel meets both kernels, giving channels in (c, direction) order.
    kernels = _CENTRAL_DIFFERENCES.to(device=x.device, dtype=x.dtype).repeat(channels, 1, 1).unsqueeze(1)
    grads = F.conv2d(x, kernels, padding=1, groups=channels)  # (B, 2C, H, W)
    vertical, horizontal = rearrange(grads, "b (c two) h w -> two b c h w", two=2)
    return torch.sqrt(vertical**2 + horizontal**2 + GRADIENT_EPS)
