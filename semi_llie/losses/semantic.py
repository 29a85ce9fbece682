"""Losses computed through a frozen semantic extractor (METHOD §3), with gradients into the student.

The reference code ran RAM under `torch.no_grad()` for the student's prediction too, so these terms
trained nothing. Here only the *targets* (ground truth, positive, negative) are computed without
graph; the prediction's features keep theirs, and the extractor's frozen weights pass the gradient on
to the image and from there to the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from semi_llie.errors import ConfigError
from semi_llie.losses.pixel import WeightedLoss
from semi_llie.semantic import FrozenExtractor


class RAMPerceptualLoss(WeightedLoss):
    """loss_weight · mean over Swin stages 1–3 of MSE(f_i(y), f_i(g))."""

    def __init__(self, extractor: FrozenExtractor, loss_weight: float = 0.1, enabled: bool = True) -> None:
        super().__init__(loss_weight, enabled)
        if self.enabled and not extractor.supports_perceptual:
            raise ConfigError(
                f"ram_perceptual needs RAM features, the semantic extractor is {type(extractor).__name__}; "
                f"use semantic.type: RAM or set ram_perceptual.loss_weight: 0"
            )
        self.extractor = extractor

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            target_features = self.extractor.perceptual_features(target)
        pred_features = self.extractor.perceptual_features(pred)
        per_stage = [F.mse_loss(p, t) for p, t in zip(pred_features, target_features, strict=True)]
        return self.loss_weight * torch.stack(per_stage).mean()


class SemanticContrastiveLoss(WeightedLoss):
    """Ratio-form contrastive loss in the extractor's embedding spaces, one negative.

    For each feature kind k (RAM: image embeddings e and tag logits t; SAM: encoder features):
        L1(k(anchor), k(positive)) / (L1(k(anchor), k(negative)) + eps)
    summed over kinds. Anchor = student's strong-view output, positive = pseudo-label or bank entry,
    negative = the strong low-light input. Positive and negative are detached.
    """

    def __init__(
        self, extractor: FrozenExtractor, loss_weight: float = 1.0, eps: float = 1e-7, enabled: bool = True
    ) -> None:
        super().__init__(loss_weight, enabled)
        self.extractor = extractor
        self.eps = eps

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        with torch.no_grad():
            # one extractor pass for both targets: (2B, 3, H, W)
            targets = self.extractor.contrastive_features(torch.cat([positive, negative]))
        anchor_features = self.extractor.contrastive_features(anchor)
        ratios = []
        for a, both in zip(anchor_features, targets, strict=True):
            p, n = both.chunk(2)
            ratios.append(F.l1_loss(a, p) / (F.l1_loss(a, n) + self.eps))
        return self.loss_weight * torch.stack(ratios).sum()
