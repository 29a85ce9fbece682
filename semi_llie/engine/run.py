"""Run setup for `semi-llie train`: everything the loop needs, built in the order that fails fastest.

`setup_run` checks the user's input first (shards, output folder, checkpoint compatibility), then builds the
models, the optimizer, the bank, restores a checkpoint, starts MLflow and opens the data streams. The result,
a `Run`, is what the loop in semi_llie.train reads from and what `save` writes.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn

from semi_llie.config import Config, Schedule, flatten
from semi_llie.data.manifest import Manifest
from semi_llie.data.streams import (
    labeled_loader,
    owner_ranks,
    unlabeled_loader,
)
from semi_llie.engine import checkpointing
from semi_llie.engine.distributed import configure_deepspeed, make_accelerator, to_device
from semi_llie.engine.tracking import Tracker, git_commit, manifest_sha256
from semi_llie.errors import UserError
from semi_llie.fileio import write_text_atomic
from semi_llie.losses import SemiLLIEObjective, build_objective
from semi_llie.method.bank import ReliableBank
from semi_llie.method.teacher import EMATeacher
from semi_llie.metrics.full_reference import FullReferenceMetrics
from semi_llie.models import build_model

logger = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: Config
    config_yaml: str
    output_dir: Path
    accelerator: Accelerator
    manifest: Manifest
    schedule: Schedule
    student: nn.Module  # prepared by Accelerate (DDP / DeepSpeed)
    teacher: EMATeacher
    objective: SemiLLIEObjective
    bank: ReliableBank | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    state: checkpointing.TrainerState
    tracker: Tracker
    run_id: str | None
    champion_tags: dict[str, str]
    metrics: FullReferenceMetrics
    streams: Streams

    @property
    def epoch(self) -> float:
        """Fractional epochs done; what `losses.unsup_weight` counts when its unit is "epoch"."""
        return self.state.step / self.schedule.steps_per_epoch

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


class Streams:
    """The labeled and (optional) unlabeled batch streams of this rank, counted in micro-batches.

    They resume at the number of micro-batches this rank consumed; every rank consumes the same number.
    """

    def __init__(
        self,
        cfg: Config,
        manifest: Manifest,
        rank: int,
        world: int,
        state: checkpointing.TrainerState,
        use_unlabeled: bool,
    ) -> None:
        self.micro_batches = state.stream_positions.get("micro_batches", 0)
        common = dict(
            seed=cfg.data.seed,
            rank=rank,
            world_size=world,
            num_workers=cfg.data.num_workers,
            start_batch=self.micro_batches,
            skip_bad=cfg.data.skip_bad_samples,
        )
        known_bad = {
            stream: frozenset(state.skipped_samples.get(stream, ())) for stream in ("labeled", "unlabeled")
        }
        self._labeled = iter(
            labeled_loader(
                manifest,
                cfg.data.batch_size_labeled,
                cfg.data.crop_size,
                cache_decoded=cfg.data.cache_labeled,
                augment=cfg.data.labeled_augment,
                known_bad=known_bad["labeled"],
                **common,
            )
        )
        self._unlabeled = (
            iter(
                unlabeled_loader(
                    manifest,
                    cfg.data.batch_size_unlabeled,
                    cfg.data.unlabeled_size,
                    strong_augment=cfg.data.strong_augment,
                    known_bad=known_bad["unlabeled"],
                    **common,
                )
            )
            if use_unlabeled
            else None
        )
        self._batch_sizes = (cfg.data.batch_size_labeled, cfg.data.batch_size_unlabeled)
        self._world = world

    @property
    def images_per_micro_batch(self) -> int:
        """Images one micro-batch draws over all ranks (the unlabeled ones only while that stream runs)."""
        labeled, unlabeled = self._batch_sizes
        return (labeled + (unlabeled if self._unlabeled is not None else 0)) * self._world

    def next(
        self, device: torch.device, state: checkpointing.TrainerState, with_unlabeled: bool = True
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The next labeled and unlabeled (or None) batch on `device`; unreadable samples join the state.

        `with_unlabeled` False ends the unlabeled stream for the rest of the run (`losses.unsup_weight.until`
        only ever goes from on to off), so its loader stops decoding.
        """
        if not with_unlabeled:
            self._unlabeled = None
        labeled = to_device(next(self._labeled), device)
        unlabeled = to_device(next(self._unlabeled), device) if self._unlabeled is not None else None
        self.micro_batches += 1
        state.stream_positions = {"micro_batches": self.micro_batches}
        for stream, batch in (("labeled", labeled), ("unlabeled", unlabeled)):
            if batch is not None and batch["skipped"]:
                known = set(state.skipped_samples.get(stream, ()))
                state.skipped_samples[stream] = sorted(known | set(batch["skipped"]))
                logger.warning("skipped unreadable %s samples: %s", stream, ", ".join(batch["skipped"]))
        return labeled, unlabeled


def setup_run(cfg: Config, resume: str | None, overwrite: bool) -> Run:
    config_yaml = cfg.to_yaml()
    output_dir = Path(cfg.train.output_dir)
    accelerator = make_accelerator(cfg.train.gradient_accumulation_steps, cfg.train.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes

    # Bad input first, before anything slow: shards, output folder, checkpoint compatibility.
    manifest = Manifest.open(cfg.data.shards)
    for split in ("labeled", "val") + (("unlabeled",) if cfg.data.batch_size_unlabeled else ()):
        if not manifest.shards_of(split):
            raise UserError(f"{cfg.data.shards} has no {split} shards; rebuild them with {split} data")
    resume_dir = checkpointing.resolve_resume(output_dir, resume) if resume else None
    if resume_dir is not None:
        checkpointing.check_compatible(resume_dir, cfg.model)
    elif checkpointing.step_dirs(output_dir) and not overwrite:
        raise UserError(
            f"{output_dir} already holds another run's checkpoints; pass --resume latest to continue it, "
            "--overwrite to replace it, or set train.output_dir to a new folder"
        )
    if accelerator.is_main_process:
        if overwrite:
            shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)  # the bank's segments too
            (output_dir / "run.json").unlink(missing_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_stale_staging(output_dir)
        write_text_atomic(output_dir / "config.yaml", config_yaml)
    accelerator.wait_for_everyone()

    # Models. The same seed on every rank makes the student (and so the teacher copy) identical everywhere.
    set_seed(cfg.data.seed)
    student = build_model(cfg.model)
    teacher = EMATeacher(student, decay=cfg.teacher.decay).to(accelerator.device)
    objective = build_objective(cfg.losses).to(accelerator.device)  # holds the frozen semantic extractor
    use_unlabeled = objective.needs_unlabeled and cfg.data.batch_size_unlabeled > 0
    bank = (
        ReliableBank.from_config(cfg.bank, accelerator.device, rank)
        if use_unlabeled and cfg.bank.enabled
        else None
    )
    # Schedule lengths given in epochs become steps for this world size (config module docstring).
    samples = {split: manifest.num_samples(split) for split in ("labeled", "unlabeled")}
    schedule = Schedule.resolve(
        cfg, cfg.epoch_length(samples if use_unlabeled else {"labeled": samples["labeled"]}, world)
    )
    logger.info("schedule for %d process(es): %s", world, schedule.describe())

    optimizer = torch.optim.AdamW(
        student.parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, schedule.milestones, gamma=cfg.optim.gamma)
    configure_deepspeed(accelerator, cfg.data.batch_size_labeled, cfg.optim.grad_clip)
    student, optimizer = accelerator.prepare(student, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    set_seed(cfg.data.seed, device_specific=True)  # per-rank randomness (DropPath) from here on

    state = checkpointing.TrainerState(world_size=world)
    if resume_dir is not None:
        state = restore(accelerator, resume_dir, manifest, teacher, bank)

    tracker, run_id = start_tracking(
        cfg, config_yaml, output_dir, accelerator, resumed_at=state.step if resume_dir is not None else None
    )
    metrics = FullReferenceMetrics()
    champion_tags = {
        "git_commit": git_commit(),
        "dataset_manifest_sha256": manifest_sha256(manifest),
        "metric_settings": json.dumps(metrics.settings, sort_keys=True),
    }
    streams = Streams(cfg, manifest, rank, world, state, use_unlabeled)
    return Run(
        cfg, config_yaml, output_dir, accelerator, manifest, schedule, student, teacher, objective, bank,
        optimizer, lr_scheduler, state, tracker, run_id, champion_tags, metrics, streams,
    )  # fmt: skip


def release_student(run: Run) -> None:
    """Free the DDP/DeepSpeed-wrapped student now, while its process group still exists.

    A DDP reducer that outlives its gloo process group (destroyed by `end_training`, or torn down as the
    interpreter exits) can abort the process on its way out ("terminate called without an active exception",
    SIGABRT): a finished run then exits 134 instead of 0, a preempted one 134 instead of 75, and SLURM marks
    the job FAILED instead of requeueing it (seen once in CI, on the two-node SLURM test). In a 2-process
    gloo DDP script 8 of 12 runs aborted with the process group destroyed first, 0 of 12 with the wrapper
    freed first.
    """
    run.student = None  # type: ignore[assignment]  # the run is over
    run.accelerator.free_memory()  # Accelerate's references to the prepared model (and a DeepSpeed engine)
    gc.collect()  # the wrapper's hooks hold it in reference cycles


def restore(
    accelerator: Accelerator,
    resume_dir: Path,
    manifest: Manifest,
    teacher: EMATeacher,
    bank: ReliableBank | None,
) -> checkpointing.TrainerState:
    """Load a checkpoint into the prepared models; this rank takes the bank entries it owns."""
    rank, world = accelerator.process_index, accelerator.num_processes
    unlabeled_shards = manifest.shards_of("unlabeled")
    state = checkpointing.load_checkpoint(
        accelerator,
        resume_dir,
        teacher.model,
        bank,
        owns=lambda indices: owner_ranks(unlabeled_shards, world, indices) == rank,
    )
    teacher.step = state.step
    logger.info(
        "resumed from %s at step %d%s",
        resume_dir,
        state.step,
        f"; {len(bank)} bank entries on this rank" if bank is not None else "",
    )
    if state.world_size != world:
        logger.warning(
            "checkpoint written by %d processes, resuming with %d: data order changes",
            state.world_size,
            world,
        )
    return state


def start_tracking(
    cfg: Config, config_yaml: str, output_dir: Path, accelerator: Accelerator, resumed_at: int | None
) -> tuple[Tracker, str | None]:
    """Start (or, on a resume at step RESUMED_AT, continue) the MLflow run; OUTPUT_DIR/run.json keeps its id.

    A resume whose params differ from the first start's (the thread count included) tags the run with them.
    """
    run_file = output_dir / "run.json"
    previous_run = json.loads(run_file.read_text()).get("mlflow_run_id") if run_file.is_file() else None
    tracker = Tracker(cfg.tracking, accelerator.is_main_process)
    # The intra-op thread count changes float reductions: a seed repeats a run bitwise only at one count.
    runtime = {
        "runtime.torch_threads": str(torch.get_num_threads()),  # what OMP_/MKL_NUM_THREADS left in effect
        "runtime.processes": str(accelerator.num_processes),
    }
    params = flatten(cfg) | runtime
    if resumed_at is None:
        run_id = tracker.start(None, params, config_yaml)
    else:
        run_id = tracker.start(previous_run, params, config_yaml, at_step=resumed_at)
    if accelerator.is_main_process:
        run_info = {
            "mlflow_run_id": run_id,
            "experiment": cfg.tracking.experiment,
            "tracking_uri": tracker.uri,
        }
        write_text_atomic(run_file, json.dumps(run_info, indent=1))
    return tracker, run_id


def gather_skipped(skipped: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every rank's skipped samples, merged per stream (a collective call)."""
    merged: dict[str, set[str]] = {}
    for per_rank in gather_object([skipped]):
        for stream, names in per_rank.items():
            merged.setdefault(stream, set()).update(names)
    return {stream: sorted(names) for stream, names in merged.items()}


def save(run: Run) -> None:
    """A checkpoint of the step just completed (collective: every rank writes its part)."""
    run.state.skipped_samples = gather_skipped(run.state.skipped_samples)  # rank 0 writes the state
    checkpointing.save_checkpoint(
        run.accelerator,
        run.output_dir,
        run.state,
        run.student,
        run.teacher.model,
        run.config_yaml,
        run.cfg.train.checkpoints_total_limit,
        run.bank,
    )
