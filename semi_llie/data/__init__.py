"""Shards and streams: `semi-llie shards build|verify|merge` and the training/evaluation data pipelines.

Python API used by the trainer (and `evaluate`):

    Manifest.open(location) -> Manifest
        location: a shard folder, a URL (https://..., gs://...), or `pipe:CMD {}` ({} = file name).
        .shards_of(split, subset=None), .num_samples(split), .data (the manifest.json dict).
    labeled_loader(location, batch_size, crop_size=256, *, seed, rank, world_size, num_workers,
                   start_batch=0, augment="none"|"exposure") -> infinite DataLoader of
        {"key": [str], "low", "high", "illum": B×3×crop×crop float in [0, 1]}
    unlabeled_loader(location, batch_size, unlabeled_size=256, *, seed, rank, world_size, num_workers,
                     start_batch=0) -> infinite DataLoader of
        {"key": [str], "weak", "strong", "illum": B×3×S×S}
    eval_loader(location, split="val", *, subset=None, rank, world_size, num_workers) -> finite DataLoader of
        {"key": [str], "low", "high", "illum": 1×3×H×W} (no "high" for test sets without ground truth);
        each sample once across all ranks and workers.

Rules for the trainer:
- Pass `rank` / `world_size` from Accelerate (`accelerator.process_index`, `accelerator.num_processes`) and
  do NOT pass these loaders to `accelerator.prepare`: they already split the data across ranks.
- Resume: store the number of batches this rank consumed from each training loader and pass it back as
  `start_batch`; the resumed stream yields exactly the batches the uninterrupted one would have. Keep
  `seed`, `world_size`, `num_workers` and `batch_size` unchanged across the resume.
- Fewer shards than world_size × num_workers is handled (readers then stride over samples instead of
  shards, correct but slower); fewer *samples* than that is a UserError.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy: the shard builder's worker processes import semi_llie.data.build and must not pay for torch.
_EXPORTS = {
    "BuildConfig": "semi_llie.data.build",
    "build_shards": "semi_llie.data.build",
    "Manifest": "semi_llie.data.manifest",
    "ShardEntry": "semi_llie.data.manifest",
    "eval_loader": "semi_llie.data.streams",
    "labeled_loader": "semi_llie.data.streams",
    "unlabeled_loader": "semi_llie.data.streams",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
