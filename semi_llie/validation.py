"""Validation pass of the trainer: teacher and student on the val split at full resolution (METHOD §8).

Each rank scores its disjoint share of the val split; per-metric sums and the sample count are reduced over
ranks, so the means are those of the whole split whatever the world size.
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

from semi_llie.distributed import reduce_sums


@dataclass
class ValidationResult:
    metrics: dict[str, float]  # MLflow names: val/psnr, val/ssim (teacher), val/student_psnr, ...
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
    metrics: Any,
    max_samples: int | None,
    grid_samples: int,
    example_size: int = 32,
) -> ValidationResult:
    """Score `teacher` and `student` (unwrapped, any mode; eval inside) on this rank's val batches.

    batches: `{"key": [str], "low", "high", "illum": 1×3×H×W}`;
    metrics: a semi_llie.metrics.FullReferenceMetrics.
    A collective call: every rank must call it at the same step.
    """
    was_training = student.training
    student.eval()
    teacher.eval()
    if max_samples is not None:
        batches = itertools.islice(batches, math.ceil(max_samples / accelerator.num_processes))
    sums: dict[str, float] = {}
    count = 0
    grids: dict[str, np.ndarray] = {}
    example = None
    for batch in batches:
        low, high, illum = (batch[name].to(accelerator.device) for name in ("low", "high", "illum"))
        with accelerator.autocast():
            teacher_out = teacher(low, illum)[0].float().clamp(0, 1)  # 1×3×H×W
            student_out = student(low, illum)[0].float().clamp(0, 1)
        for prefix, output in (("", teacher_out), ("student_", student_out)):
            for name, value in metrics(output, high).items():
                sums[f"val/{prefix}{name}"] = sums.get(f"val/{prefix}{name}", 0.0) + float(value)
        count += 1
        if accelerator.is_main_process and len(grids) < grid_samples:
            grids[batch["key"][0]] = _grid([low, student_out, teacher_out, high])
        if example is None:
            example = low[..., :example_size, :example_size].float().cpu().contiguous().numpy()
    # Every rank must reduce the same keys: a rank with no val sample contributes zeros.
    names = sorted(set(sums) | {f"val/{p}{n}" for p in ("", "student_") for n in metrics.names})
    totals = reduce_sums(accelerator, {**{n: sums.get(n, 0.0) for n in names}, "count": count})
    total_count = int(totals.pop("count"))
    student.train(was_training)
    means = {name: value / max(total_count, 1) for name, value in totals.items()}
    return ValidationResult(means, total_count, grids, example)


def _grid(images: list[Tensor]) -> np.ndarray:
    """[1×3×H×W in [0, 1]] -> H×(n·W)×3 uint8, side by side."""
    row = torch.cat([image[0].float().clamp(0, 1).cpu() for image in images], dim=2)  # 3×H×nW
    return (row.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
