"""No-reference image quality scorers for the reliable bank (METHOD §4).

A scorer maps a batch (B, 3, H, W) in [0, 1] to scores (B,), and says its metric `name` and whether a
lower score is better. `PyiqaScorer` wraps any pyiqa no-reference metric by name (MUSIQ as in the
paper; PIQE and NIQE need no downloaded weights); `FunctionScorer` wraps any function (tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from semi_llie.errors import ConfigError


class Scorer(Protocol):
    name: str
    lower_better: bool

    def __call__(self, images: Tensor) -> Tensor: ...


class PyiqaScorer:
    """A pyiqa no-reference metric, without gradients, scoring `batch_size` images at a time."""

    def __init__(
        self, metric: str = "musiq", device: str | torch.device = "cpu", batch_size: int = 16
    ) -> None:
        import pyiqa  # heavy import, only when a bank is used

        try:
            self.metric = pyiqa.create_metric(metric, as_loss=False, device=torch.device(device))
        except Exception as error:  # pyiqa raises bare errors for unknown names and missing weights
            raise ConfigError(
                f"bank.metric {metric!r} cannot be created ({error}); use a pyiqa no-reference metric whose "
                f"weights are in the local cache, or 'piqe' / 'niqe', which need none"
            ) from error
        if self.metric.metric_mode != "NR":
            raise ConfigError(f"bank.metric {metric!r} needs a reference image; use a no-reference metric")
        self.name = metric
        self.lower_better = bool(self.metric.lower_better)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B,) float32 scores."""
        images = images.clamp(0, 1).to(self.metric.device)
        scores = [self.metric(chunk).reshape(-1) for chunk in images.split(self.batch_size)]
        return torch.cat(scores).float().cpu()


class FunctionScorer:
    """Any function (B, 3, H, W) -> (B,) as a scorer."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str, lower_better: bool = False) -> None:
        self.fn = fn
        self.name = name
        self.lower_better = lower_better

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.fn(images).reshape(-1).float().cpu()
