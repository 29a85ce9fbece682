"""The one evaluation loop: enhance every sample of a split with each enhancer and score each output.

Used by the trainer's validation (teacher and student, per rank, sums reduced over ranks), by the classic
baselines (input, gamma, histogram equalisation) and by `semi-llie evaluate` (a model, tiled if large).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class EvalSample:
    key: str
    low: Tensor  # 1×3×H×W in [0, 1]
    high: Tensor | None  # 1×3×H×W, None without ground truth
    illum: Tensor | None = None  # 1×3×H×W precomputed map from the shards, None elsewhere


def samples_of(batches: Iterable[Mapping[str, Any]], paired: bool = True) -> Iterator[EvalSample]:
    """`eval_loader` batches ({"key": [str], "low", "high", "illum": 1×3×H×W}) as EvalSamples."""
    for batch in batches:
        high = batch.get("high") if paired else None
        yield EvalSample(batch["key"][0], batch["low"], high, batch.get("illum"))


Enhance = Callable[[EvalSample], Tensor]  # sample -> 1×3×H×W output in [0, 1]
Metrics = Callable[[Tensor, Tensor | None], dict[str, float]]  # (output, ground truth or None) -> scores
Rows = dict[str, dict[str, float]]  # sample key -> metric -> value


@torch.no_grad()
def score_split(
    samples: Iterable[EvalSample],
    enhancers: Mapping[str, Enhance],
    metrics: Metrics,
    on_output: Callable[[str, EvalSample, Tensor], None] | None = None,
) -> dict[str, Rows]:
    """{enhancer name: {sample key: {metric: value}}} over `samples`, in their order.

    `on_output(name, sample, output)` sees every output (to save images, draw grids) before the next one.
    """
    rows: dict[str, Rows] = {name: {} for name in enhancers}
    for sample in samples:
        for name, enhance in enhancers.items():
            output = enhance(sample).float().clamp(0, 1)
            high = sample.high.to(output.device) if sample.high is not None else None
            rows[name][sample.key] = metrics(output, high)
            if on_output is not None:
                on_output(name, sample, output)
    return rows


def metric_names(rows: Rows) -> list[str]:
    """Every metric of `rows`, in first-seen order."""
    names: dict[str, None] = {}
    for row in rows.values():
        names.update(dict.fromkeys(row))
    return list(names)


def sums(rows: Rows) -> dict[str, float]:
    return {name: sum(row[name] for row in rows.values() if name in row) for name in metric_names(rows)}


def means(rows: Rows) -> dict[str, float]:
    """Per metric, the mean over the samples that have it."""
    return {
        name: sum(row[name] for row in rows.values() if name in row)
        / sum(name in row for row in rows.values())
        for name in metric_names(rows)
    }
