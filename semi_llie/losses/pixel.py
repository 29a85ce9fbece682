"""Pixel-space losses (METHOD §3): fidelity, gradient and consistency. Images are (B, 3, H, W) in [0, 1]."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from semi_llie.models import image_gradient


class WeightedLoss(nn.Module):
    """A loss term scaled by `loss_weight`; a weight of 0 or `enabled=False` switches it off.

    The objective never calls a switched-off term, so it costs no compute and sends no gradient.
    """

    def __init__(self, loss_weight: float, enabled: bool = True) -> None:
        super().__init__()
        if loss_weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {loss_weight}")
        self.loss_weight = float(loss_weight)
        self.enabled = bool(enabled) and self.loss_weight > 0

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}, enabled={self.enabled}"


class FidelityLoss(WeightedLoss):
    """loss_weight · (l1_weight · L1(y, g) + mse_weight · MSE(y, g)); 0.8 / 0.2 as in the paper."""

    def __init__(
        self, loss_weight: float = 1.0, l1_weight: float = 0.8, mse_weight: float = 0.2, enabled: bool = True
    ) -> None:
        super().__init__(loss_weight, enabled)
        self.l1_weight = l1_weight
        self.mse_weight = mse_weight

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        mixed = self.l1_weight * F.l1_loss(pred, target) + self.mse_weight * F.mse_loss(pred, target)
        return self.loss_weight * mixed


class GradientLoss(WeightedLoss):
    """loss_weight · L1(grad(y), image_gradient(g)): `pred_grad` is the model's second output."""

    def __init__(self, loss_weight: float = 0.1, enabled: bool = True) -> None:
        super().__init__(loss_weight, enabled)

    def forward(self, pred_grad: Tensor, target: Tensor) -> Tensor:
        return self.loss_weight * F.l1_loss(pred_grad, image_gradient(target))


class ConsistencyLoss(WeightedLoss):
    """loss_weight · L1(y_s, p): the student's strong-view output against the (detached) positive."""

    def __init__(self, loss_weight: float = 1.0, enabled: bool = True) -> None:
        super().__init__(loss_weight, enabled)

    def forward(self, pred: Tensor, positive: Tensor) -> Tensor:
        return self.loss_weight * F.l1_loss(pred, positive.detach())
