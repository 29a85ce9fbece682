"""The table's pyiqa metrics (LPIPS, NIQE, MUSIQ, PIQE, BRISQUE) for evaluation, skipping unavailable ones.

`PyiqaMetrics(names)` loads the metrics whose files are local (semi_llie.metrics.table) and lists the others
in `.skipped` with the line that says which file is missing, so `semi-llie evaluate` runs offline.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from semi_llie.metrics.table import METRICS, create_pyiqa_metric, library_versions, metric_spec

DEFAULT_NAMES = tuple(name for name, spec in METRICS.items() if spec.pyiqa_name is not None)


class PyiqaMetrics:
    """The metrics of `names` whose weights are in the local caches; the others are listed in `.skipped`."""

    def __init__(self, names: tuple[str, ...] = DEFAULT_NAMES, device: str | torch.device = "cpu") -> None:
        specs = [metric_spec(name) for name in names]  # unknown names are a ConfigError
        self.skipped: dict[str, str] = {}
        self._metrics: dict[str, nn.Module] = {}
        self._files: dict[str, list[str]] = {}
        for spec in specs:
            reason = spec.unavailable_reason()
            if reason is not None:
                self.skipped[spec.name] = reason
                continue
            self._metrics[spec.name] = create_pyiqa_metric(spec.name, device)
            self._files[spec.name] = [str(path) for path in spec.required_files()]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._metrics)

    @torch.no_grad()
    def __call__(self, pred: Tensor, gt: Tensor | None = None) -> dict[str, float]:
        """pred (and gt): 1×3×H×W in [0, 1]; full-reference metrics are computed only when gt is given."""
        pred = pred.float().clamp(0, 1)
        scores = {}
        for name, metric in self._metrics.items():
            if not METRICS[name].full_reference:
                scores[name] = float(metric(pred))
            elif gt is not None:
                scores[name] = float(metric(pred, gt.float().to(pred.device)))
        return scores

    @property
    def settings(self) -> dict[str, Any]:
        return {
            name: {
                "pyiqa_metric": METRICS[name].pyiqa_name,
                "full_reference": METRICS[name].full_reference,
                "lower_better": METRICS[name].lower_better,
                "weights": self._files[name],
            }
            for name in self._metrics
        } | {"skipped": dict(self.skipped), "libraries": library_versions()}
