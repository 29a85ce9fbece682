"""Runs `semi-llie train ARGS` through the real entry point in this process (plain python or under
`accelerate launch`) and writes what the tests check for themselves to $PROBE_DIR/rank-<r>.json:
the sha256 of this rank's teacher after training, computed here, not taken from the trainer's own log, and
how many DDP-wrapped modules were alive when the process group was destroyed and after the trainer returned.

It also registers the bank scorer "newest" (`bank.metric=newest`), under which every teacher output beats
the student's and every entry stored before it, across a resume too: the bank is rewritten at every step.

With PROBE_FIXED_BATCH=N the data streams are replaced by one fixed batch of N labeled and N unlabeled
samples, of which rank r of W gets the r-th of W equal slices (every step): the DDP-equivalence test.
Only the data is replaced; the model, the objective, the bank, DDP and the optimizer are the trainer's own.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from semi_llie.cli import main
from semi_llie.engine import run as engine_run
from semi_llie.metrics.scorers import register_scorer

teachers = []


class RecordingTeacher(engine_run.EMATeacher):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        teachers.append(self)


class NewestWins:
    """Scores the teacher's candidates by wall-clock time and the student's outputs -1. The bank scores the
    candidates first, then the student outputs, at every update; float64 keeps microseconds."""

    name, lower_better = "newest", False

    def __init__(self) -> None:
        self.teacher_next = True

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        value = time.time() if self.teacher_next else -1.0
        self.teacher_next = not self.teacher_next
        return torch.full((images.shape[0],), value, dtype=torch.float64)


register_scorer("newest", lambda device, batch_size: NewestWins())


def sha256_of(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def fixed_batch(total: int, size: int, rank: int, world_size: int, labeled: bool) -> dict:
    """The same `total` samples on every rank (seeded), sliced for `rank`."""
    generator = torch.Generator().manual_seed(11 if labeled else 12)
    images = {
        name: torch.rand(total, 3, size, size, generator=generator)
        for name in (("low", "high", "illum") if labeled else ("weak", "strong", "illum"))
    }
    share = slice(rank * total // world_size, (rank + 1) * total // world_size)
    keys = [f"{'l' if labeled else 'u'}{i}" for i in range(total)]
    return {
        "key": keys[share],
        "index": torch.arange(total)[share],
        **{name: tensor[share] for name, tensor in images.items()},
        "skipped": [],
    }


def live_ddp_modules() -> int:
    return sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())


ddp_at_destroy = []
destroy_process_group = torch.distributed.destroy_process_group


def recording_destroy(*args, **kwargs):
    ddp_at_destroy.append(live_ddp_modules())
    return destroy_process_group(*args, **kwargs)


def forever(batch: dict):
    while True:
        yield batch


if __name__ == "__main__":
    engine_run.EMATeacher = RecordingTeacher
    if "PROBE_FIXED_BATCH" in os.environ:
        total = int(os.environ["PROBE_FIXED_BATCH"])
        engine_run.labeled_loader = lambda location, batch_size, crop_size, *, rank, world_size, **_: forever(
            fixed_batch(total, crop_size, rank, world_size, labeled=True)
        )
        engine_run.unlabeled_loader = lambda location, batch_size, size, *, rank, world_size, **_: forever(
            fixed_batch(total, size, rank, world_size, labeled=False)
        )
    torch.distributed.destroy_process_group = recording_destroy
    code = main(["train", *sys.argv[1:]])
    rank = int(os.environ.get("RANK", "0"))
    record = {"exit_code": code, "teacher_sha256": sha256_of(teachers[0].model)}
    record |= {"ddp_at_destroy": ddp_at_destroy, "ddp_after": live_ddp_modules()}
    Path(os.environ["PROBE_DIR"], f"rank-{rank}.json").write_text(json.dumps(record))
    raise SystemExit(code)
