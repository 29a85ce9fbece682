"""Atomic, rotated training checkpoints (layout in ARCHITECTURE.md, "Run outputs").

    OUTPUT_DIR/checkpoints/step-N/
        config.yaml            the run config (a step dir is self-contained)
        student.pt, teacher.pt plain state_dicts of the unwrapped model (torch.load(..., weights_only=True))
        trainer_state.json     step, stream positions, best score, non-finite counters, skipped samples
        bank.json              the reliable bank after step N: segments under checkpoints/bank/ (bank_store)
        accelerate/            optimizer, scheduler, GradScaler, per-rank RNG states (accelerator.save_state)
    OUTPUT_DIR/checkpoints/bank/    immutable bank segments, shared by the checkpoints that reference them
    OUTPUT_DIR/checkpoints/latest   text file naming the newest complete step dir, written last

A step dir is first written as `.tmp-step-N` by every rank (accelerate writes one RNG file per rank, DeepSpeed
one optimizer shard per rank), then rank 0 adds the model files, fsyncs the tree and renames it: a reader
never sees a half-written `step-N`, and `latest` only ever names complete ones. The output folder must be on
a file system every rank sees (as on any SLURM cluster); nothing else is shared between ranks on disk.
`SEMI_LLIE_TEST_SAVE_DELAY` (seconds, tests only) sleeps before the rename, so a test can kill a save.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from torch import nn

from semi_llie.engine import bank_store
from semi_llie.errors import UserError
from semi_llie.fileio import fsync_dir, write_text_atomic
from semi_llie.method.bank import ReliableBank

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """What the loop needs, beyond model/optimizer/RNG, to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done
    world_size: int = 1
    # Batches each rank consumed from each training stream (the same count on every rank).
    stream_positions: dict[str, int] = field(default_factory=dict)
    best_score: float | None = None  # teacher val/psnr of the registered champion
    best_step: int | None = None
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    # Unreadable samples skipped so far ("shard/key", "shard/*" for a shard that broke off), per stream.
    skipped_samples: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        data = json.loads(text)
        if data.pop("bank_marker", None) is not None:  # written before the bank was checkpointed
            logger.warning("this checkpoint predates checkpointed banks: the reliable bank starts empty")
        return cls(**data)


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_dirs(output_dir: str | Path) -> list[Path]:
    """Complete step dirs, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The step dir `latest` names (or the newest complete one if the pointer is missing), else None."""
    root = checkpoints_root(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / STATE_FILE).is_file():
            return target
    dirs = step_dirs(output_dir)
    return dirs[-1] if dirs else None


def resolve_resume(output_dir: str | Path, resume: str) -> Path:
    """`--resume latest` (in OUTPUT_DIR) or `--resume PATH` (a step dir, or an output dir's latest)."""
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise UserError(
                f"--resume latest: {checkpoints_root(output_dir)} holds no checkpoint; drop --resume"
            )
        return found
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise UserError(f"--resume {resume}: not a checkpoint step dir or an output dir holding one")
    return found


def check_compatible(step_dir: Path, model_cfg: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose model block differs from the config's (shapes would not match)."""
    saved = yaml.safe_load((step_dir / "config.yaml").read_text())["model"]
    current = yaml.safe_load(yaml.safe_dump(dict(model_cfg)))  # same normalisation (tuples -> lists)
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        key = differing[0]
        raise UserError(
            f"checkpoint {step_dir} was trained with model.{key}={saved.get(key)!r} but the config has "
            f"{current.get(key)!r}; resume with the checkpoint's model config or start a new output_dir"
        )


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    state: TrainerState,
    student: nn.Module,
    teacher: nn.Module,
    config_yaml: str,
    total_limit: int | None,
    bank: ReliableBank | None = None,
) -> Path:
    """Write `step-{state.step}` atomically on all ranks (a collective call), point `latest` at it, rotate.

    With a `bank`, every rank writes its bank changes and the step dir references the bank after this step.
    """
    root = checkpoints_root(output_dir)
    final = root / f"step-{state.step}"
    staging = root / f".tmp-step-{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging / "accelerate"))  # every rank writes its RNG state (+ DS shards)
    student_state = accelerator.get_state_dict(student)  # collective under DeepSpeed ZeRO-3
    if bank is not None:
        bank_store.save(accelerator, bank, root, state.step, staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(_cpu(student_state), staging / "student.pt")
        torch.save(_cpu(teacher.state_dict()), staging / "teacher.pt")
        (staging / STATE_FILE).write_text(state.to_json())
        (staging / "config.yaml").write_text(config_yaml)
        _fsync_tree(staging)
        if (root / bank_store.SEGMENTS).is_dir():
            fsync_dir(root / bank_store.SEGMENTS)
        time.sleep(float(os.environ.get("SEMI_LLIE_TEST_SAVE_DELAY", "0")))
        shutil.rmtree(final, ignore_errors=True)  # a previous attempt at this step (resumed before it)
        os.replace(staging, final)
        fsync_dir(root)
        write_text_atomic(root / LATEST, final.name + "\n")
        rotate(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Accelerator,
    step_dir: Path,
    teacher: nn.Module,
    bank: ReliableBank | None = None,
    owns: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TrainerState:
    """Restore student/optimizer/scheduler/RNG (prepared objects), the teacher and this rank's part of the
    bank (`owns(split indices)` -> mask of this rank's samples); return the loop state."""
    accelerator.load_state(str(step_dir / "accelerate"))
    teacher.load_state_dict(torch.load(step_dir / "teacher.pt", map_location="cpu", weights_only=True))
    if bank is not None:
        assert owns is not None, "loading a bank needs the ownership of the current world size"
        bank_store.load(bank, step_dir, accelerator.num_processes, owns)
    return TrainerState.from_json((step_dir / STATE_FILE).read_text())


def rotate(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest step dirs beyond `total_limit`, never the one `latest` names, then the bank
    segments no remaining step dir references; return the deleted step dirs."""
    doomed: list[Path] = []
    if total_limit is not None:
        keep = latest_checkpoint(output_dir)
        dirs = [d for d in step_dirs(output_dir) if d != keep]
        doomed = dirs[: max(0, len(dirs) + 1 - total_limit)]
        for path in doomed:
            shutil.rmtree(path)
    bank_store.collect_garbage(checkpoints_root(output_dir), step_dirs(output_dir))
    return doomed


def remove_stale_staging(output_dir: str | Path) -> None:
    """Drop what a run killed while saving left: `.tmp-step-*` dirs (never complete) and bank segments
    that no complete checkpoint references."""
    for path in checkpoints_root(output_dir).glob(".tmp-step-*"):
        shutil.rmtree(path, ignore_errors=True)
    bank_store.collect_garbage(checkpoints_root(output_dir), step_dirs(output_dir))


def _cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(folder))
