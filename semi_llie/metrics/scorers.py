"""No-reference scorers for the reliable bank (METHOD §4), chosen by name through a registry.

A scorer maps a batch (B, 3, H, W) in [0, 1] to scores (B,) on the CPU, and says its metric `name` and
whether a lower score is better. `build_scorer(name)` looks the name up in `SCORERS`: every no-reference
metric of the table (semi_llie.metrics.table; MUSIQ as in the paper, PIQE and NIQE-with-local-parameters
need no download) is registered as a pyiqa scorer, and `register_scorer` adds any other (a function of
the images, a new network) for `bank.metric` to name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from semi_llie.errors import ConfigError
from semi_llie.metrics.table import METRICS, NO_REFERENCE, create_pyiqa_metric


class Scorer(Protocol):
    name: str
    lower_better: bool

    def __call__(self, images: Tensor) -> Tensor: ...


class PyiqaScorer:
    """A no-reference metric of the table through pyiqa, without gradients, `batch_size` images at a time."""

    def __init__(
        self, metric: str = "musiq", device: str | torch.device = "cpu", batch_size: int = 16
    ) -> None:
        if metric not in NO_REFERENCE:
            raise ConfigError(
                f"bank.metric {metric!r} is not a no-reference metric; use one of {', '.join(NO_REFERENCE)}"
            )
        self.metric = create_pyiqa_metric(metric, device)
        self.name = metric
        self.lower_better = METRICS[metric].lower_better
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


ScorerFactory = Callable[..., Scorer]  # (device=..., batch_size=...) -> Scorer
SCORERS: dict[str, ScorerFactory] = {
    name: (lambda device="cpu", batch_size=16, _name=name: PyiqaScorer(_name, device, batch_size))
    for name in NO_REFERENCE
}


def register_scorer(name: str, factory: ScorerFactory) -> None:
    """Make `bank.metric: NAME` build `factory(device=..., batch_size=...)`."""
    if name in SCORERS:
        raise ValueError(f"scorer {name!r} is registered twice")
    SCORERS[name] = factory


def build_scorer(name: str, device: str | torch.device = "cpu", batch_size: int = 16) -> Scorer:
    if name not in SCORERS:
        raise ConfigError(
            f"bank.metric {name!r} is not a registered scorer; known: {', '.join(sorted(SCORERS))}"
        )
    return SCORERS[name](device=device, batch_size=batch_size)
