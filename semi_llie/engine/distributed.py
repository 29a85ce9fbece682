"""What the loop needs beyond Accelerate to run on many ranks: agreement on flags, checksums, reductions,
preemption signals and the DeepSpeed values Accelerate cannot infer.

Exit codes of `semi-llie train` (SLURM requeue scripts rely on them):
    0   finished (max_steps reached)
    2   user error: bad config key or value, missing shards, foreign output folder, incompatible checkpoint
    3   training diverged: `train.max_nonfinite_steps` non-finite losses in a row
    4   ranks diverged: the teacher's checksum differs between ranks at a validation
    75  preempted: SIGTERM or SIGUSR1 arrived, a checkpoint was saved; rerun with `--resume latest`
        (75 = EX_TEMPFAIL, "try again later"; 143 would be ambiguous with a plain kill by SIGTERM)
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import Mapping
from types import FrameType
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import nn

from semi_llie.errors import UserError

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingDiverged(UserError):
    """Too many non-finite losses in a row."""

    exit_code = 3


class RanksDiverged(UserError):
    """Ranks hold different teachers: their updates were not identical."""

    exit_code = 4


class PreemptionSignal:
    """SIGTERM / SIGUSR1 set a flag the loop polls at step boundaries (saving inside a handler is unsafe)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in PREEMPTION_SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_accelerator(gradient_accumulation_steps: int, mixed_precision: str) -> Accelerator:
    """An Accelerator for whichever launcher started us (plain python, accelerate launch, torchrun, srun).

    Without a GPU it runs on CPU even under a `--multi_gpu` launch (DDP over gloo); `cpu=True` would also
    switch DeepSpeed off, so it is not passed under a DeepSpeed launch (which then runs on CPU by itself).
    The backend is named only in a multi-process launch: DeepSpeed defaults to NCCL even on CPU, while naming
    one in a single process makes Accelerate look for a process group that does not exist.
    """
    on_cpu = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo" if on_cpu else "nccl"))
    return Accelerator(
        cpu=on_cpu and not deepspeed,
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        step_scheduler_with_optimizer=False,  # the schedule is in optimizer steps: the loop steps it
        kwargs_handlers=handlers,
    )


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch's tensors to `device` (keys and other values as they are)."""
    return {
        name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for name, value in batch.items()
    }


def any_rank(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """For each flag: is it set on at least one rank? (one all-reduce for all flags; a collective call)."""
    local = torch.tensor([float(flag) for flag in flags], device=accelerator.device)
    return [bool(value) for value in accelerator.reduce(local, reduction="sum").tolist()]


def reduce_sums(accelerator: Accelerator, values: Mapping[str, float]) -> dict[str, float]:
    """Sum each value over ranks (a collective call; every rank must pass the same keys in the same order)."""
    names = list(values)
    local = torch.tensor(
        [float(values[name]) for name in names], dtype=torch.float64, device=accelerator.device
    )
    return dict(zip(names, accelerator.reduce(local, reduction="sum").tolist(), strict=True))


def state_checksum(module: nn.Module) -> int:
    """A 63-bit digest of every parameter and buffer, bit for bit (sha256 of the raw bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1  # fits a signed int64 tensor


def check_ranks_agree(accelerator: Accelerator, module: nn.Module, what: str) -> int:
    """Raise RanksDiverged unless `module` is bitwise identical on every rank; return its checksum."""
    local = state_checksum(module)
    gathered = accelerator.gather(torch.tensor([local], dtype=torch.int64, device=accelerator.device))
    checksums = [int(value) for value in gathered.tolist()]
    if len(set(checksums)) > 1:
        per_rank = ", ".join(f"rank {rank}: {value:016x}" for rank, value in enumerate(checksums))
        raise RanksDiverged(
            f"the {what} differs between ranks ({per_rank}); their updates were not identical, so stop and "
            "resume from the last checkpoint (check for nondeterministic kernels or a rank-local code path)"
        )
    return local


def configure_deepspeed(accelerator: Accelerator, micro_batch_size: int, grad_clip: float | None) -> None:
    """Fill the DeepSpeed values Accelerate infers from a prepared DataLoader, which this loop does not have.

    The config file says "auto" for them (configs/deepspeed/zero2.json); values set to a number stay.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    values = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "train_batch_size": micro_batch_size
        * accelerator.gradient_accumulation_steps
        * accelerator.num_processes,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "gradient_clipping": grad_clip if grad_clip is not None else 0.0,
    }
    for key, value in values.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
