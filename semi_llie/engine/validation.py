"""Validation pass of the trainer: teacher and student on the val split at full resolution (METHOD §8).

Each rank scores its disjoint share of the val split through `semi_llie.metrics.evaluation.score_split`;
per-metric sums and the sample count are reduced over ranks, so the means are those of the whole split
whatever the world size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from semi_llie.engine.distributed import reduce_sums
from semi_llie.metrics.evaluation import EvalSample, samples_of, score_split, sums
from semi_llie.metrics.full_reference import FullReferenceMetrics

PREFIXES = {"teacher": "val/", "student": "val/student_"}  # MLflow names: val/psnr, val/student_psnr, ...


@dataclass
class ValidationResult:
    metrics: dict[str, float]  # val/psnr, val/ssim (teacher), val/student_psnr, ...
    num_samples: int
    grids: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # key -> H×4W×3 uint8: input|student|teacher|GT
    example: np.ndarray | None = None  # 1×3×h×w float32 crop of the first input, the logged model's example


@torch.no_grad()
def validate(
    accelerator: Accelerator,
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[dict[str, Any]],
    metrics: FullReferenceMetrics,
    max_samples: int | None,
    grid_samples: int,
    example_size: int = 32,
) -> ValidationResult:
    """Score `teacher` and `student` (unwrapped, any mode; eval inside) on this rank's val batches.

    batches: `eval_loader` batches `{"key": [str], "low", "high", "illum": 1×3×H×W}`.
    A collective call: every rank must call it at the same step.
    """
    was_training = student.training
    student.eval()
    teacher.eval()
    if max_samples is not None:
        batches = itertools.islice(batches, math.ceil(max_samples / accelerator.num_processes))

    def run(model: nn.Module):
        def enhance(sample: EvalSample) -> Tensor:
            low, illum = sample.low.to(accelerator.device), sample.illum.to(accelerator.device)
            with accelerator.autocast():
                return model(low, illum)[0]  # 1×3×H×W

        return enhance

    outputs: dict[str, Tensor] = {}
    grids: dict[str, np.ndarray] = {}
    example: list[np.ndarray] = []

    def keep_visuals(name: str, sample: EvalSample, output: Tensor) -> None:
        if not example:
            example.append(sample.low[..., :example_size, :example_size].float().cpu().contiguous().numpy())
        outputs[name] = output
        if name == "teacher" and accelerator.is_main_process and len(grids) < grid_samples:
            grids[sample.key] = _grid([sample.low, outputs["student"], output, sample.high])

    # The student first, so that the grid of a sample is drawn when its teacher output arrives.
    rows = score_split(
        samples_of(batches), {"student": run(student), "teacher": run(teacher)}, metrics, keep_visuals
    )
    count = len(rows["teacher"])
    local = {f"{PREFIXES[who]}{name}": value for who in rows for name, value in sums(rows[who]).items()}
    # Every rank must reduce the same keys: a rank with no val sample contributes zeros.
    names = sorted(f"{prefix}{name}" for prefix in PREFIXES.values() for name in metrics.names)
    totals = reduce_sums(accelerator, {**{n: local.get(n, 0.0) for n in names}, "count": count})
    total_count = int(totals.pop("count"))
    student.train(was_training)
    means = {name: value / max(total_count, 1) for name, value in totals.items()}
    return ValidationResult(means, total_count, grids, example[0] if example else None)


def _grid(images: list[Tensor]) -> np.ndarray:
    """[1×3×H×W in [0, 1]] -> H×(n·W)×3 uint8, side by side."""
    row = torch.cat([image[0].float().clamp(0, 1).cpu() for image in images], dim=2)  # 3×H×nW
    return (row.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
