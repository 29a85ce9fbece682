"""`semi-llie train --config configs/X.yaml [key.sub=value ...]`: the mean-teacher loop (METHOD §2-4).

Runs the same under `python -m semi_llie train`, `accelerate launch`, `torchrun` and `srun`: Accelerate reads
the rank layout from the environment. The student goes through `accelerator.prepare` (DDP or DeepSpeed
ZeRO-1/2); the EMA teacher, the frozen semantic extractor and the bank's scorer do not, so they stay plain
replicated modules that every rank updates identically (checked by checksum at each validation).

Exit codes (semi_llie.distributed): 0 done, 2 user error, 3 diverged (non-finite losses), 4 ranks diverged,
75 preempted by SIGTERM/SIGUSR1 after saving a checkpoint (`--resume latest` continues).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from semi_llie import checkpointing
from semi_llie.bank import ReliableBank
from semi_llie.config import Schedule, flatten, load_config
from semi_llie.data.manifest import Manifest
from semi_llie.data.streams import eval_loader, labeled_loader, owner_ranks, unlabeled_loader
from semi_llie.distributed import (
    PREEMPTED_EXIT_CODE,
    PreemptionSignal,
    TrainingDiverged,
    any_rank,
    check_ranks_agree,
    configure_deepspeed,
    make_accelerator,
    reduce_sums,
    to_device,
)
from semi_llie.errors import UserError
from semi_llie.losses import build_objective
from semi_llie.metrics import FullReferenceMetrics
from semi_llie.modelio import Enhancer
from semi_llie.models import build_model
from semi_llie.scoring import PyiqaScorer
from semi_llie.teacher import EMATeacher
from semi_llie.tracking import Tracker, git_commit, manifest_sha256
from semi_llie.validation import validate

logger = logging.getLogger(__name__)


def gather_skipped(skipped: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every rank's skipped samples, merged per stream (a collective call)."""
    merged: dict[str, set[str]] = {}
    for per_rank in gather_object([skipped]):
        for stream, names in per_rank.items():
            merged.setdefault(stream, set()).update(names)
    return {stream: sorted(names) for stream, names in merged.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="experiment YAML (configs/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=1e-4"
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", metavar="latest|PATH", help="continue from OUTPUT_DIR's latest or a step dir"
    )
    start.add_argument(
        "--overwrite", action="store_true", help="delete OUTPUT_DIR's checkpoints, bank and run.json"
    )


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    config_yaml = cfg.to_yaml()
    output_dir = Path(cfg.train.output_dir)
    accelerator = make_accelerator(cfg.train.gradient_accumulation_steps, cfg.train.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes

    # Bad input first, before anything slow: shards, output folder, checkpoint compatibility.
    manifest = Manifest.open(cfg.data.shards)
    for split in ("labeled", "val") + (("unlabeled",) if cfg.data.batch_size_unlabeled else ()):
        if not manifest.shards_of(split):
            raise UserError(f"{cfg.data.shards} has no {split} shards; rebuild them with {split} data")
    resume_dir = checkpointing.resolve_resume(output_dir, args.resume) if args.resume else None
    if resume_dir is not None:
        checkpointing.check_compatible(resume_dir, cfg.model)
    elif checkpointing.step_dirs(output_dir) and not args.overwrite:
        raise UserError(
            f"{output_dir} already holds another run's checkpoints; pass --resume latest to continue it, "
            "--overwrite to replace it, or set train.output_dir to a new folder"
        )
    if accelerator.is_main_process:
        if args.overwrite:
            shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)  # the bank's segments too
            (output_dir / "run.json").unlink(missing_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_stale_staging(output_dir)
        checkpointing.write_text_atomic(output_dir / "config.yaml", config_yaml)
    accelerator.wait_for_everyone()

    # Models. The same seed on every rank makes the student (and so the teacher copy) identical everywhere.
    set_seed(cfg.data.seed)
    student = build_model(cfg.model)
    teacher = EMATeacher(student, decay=cfg.teacher.decay)
    teacher.to(accelerator.device)
    objective = build_objective(cfg.losses).to(accelerator.device)  # holds the frozen semantic extractor
    use_unlabeled = objective.needs_unlabeled and cfg.data.batch_size_unlabeled > 0
    bank = None
    if use_unlabeled and cfg.bank.enabled:
        scorer = PyiqaScorer(cfg.bank.metric, device=accelerator.device, batch_size=cfg.bank.score_batch_size)
        bank = ReliableBank(scorer, rank=rank)
    metrics = FullReferenceMetrics()
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

    run_file = output_dir / "run.json"
    previous_run = json.loads(run_file.read_text()).get("mlflow_run_id") if run_file.is_file() else None
    tracker = Tracker(cfg.tracking, accelerator.is_main_process)
    run_id = tracker.start(previous_run if resume_dir else None, flatten(cfg), config_yaml)
    if accelerator.is_main_process:
        run_info = {
            "mlflow_run_id": run_id,
            "experiment": cfg.tracking.experiment,
            "tracking_uri": tracker.uri,
        }
        checkpointing.write_text_atomic(run_file, json.dumps(run_info, indent=1))
    champion_tags = {
        "git_commit": git_commit(),
        "dataset_manifest_sha256": manifest_sha256(manifest),
        "metric_settings": json.dumps(metrics.settings, sort_keys=True),
    }

    # Streams resume at the number of batches this rank consumed; every rank consumes the same number.
    micro_batches = state.stream_positions.get("micro_batches", 0)
    stream_args = dict(
        seed=cfg.data.seed,
        rank=rank,
        world_size=world,
        num_workers=cfg.data.num_workers,
        start_batch=micro_batches,
        skip_bad=cfg.data.skip_bad_samples,
    )
    labeled_batches = iter(
        labeled_loader(
            manifest,
            cfg.data.batch_size_labeled,
            cfg.data.crop_size,
            cache_decoded=cfg.data.cache_labeled,
            known_bad=frozenset(state.skipped_samples.get("labeled", ())),
            **stream_args,
        )
    )
    unlabeled_batches = (
        iter(
            unlabeled_loader(
                manifest,
                cfg.data.batch_size_unlabeled,
                cfg.data.unlabeled_size,
                strong_augment=cfg.data.strong_augment,
                known_bad=frozenset(state.skipped_samples.get("unlabeled", ())),
                **stream_args,
            )
        )
        if use_unlabeled
        else None
    )
    images_per_micro_batch = (cfg.data.batch_size_labeled + cfg.data.batch_size_unlabeled) * world

    preemption = PreemptionSignal()
    progress = tqdm(
        total=schedule.max_steps,
        initial=state.step,
        desc="train",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    window_skipped = stop_requested = False
    term_sums: dict[str, float] = {}
    bank_accepted = bank_seen = 0
    log_started, log_images = time.perf_counter(), 0
    run_started, run_start_step = time.perf_counter(), state.step
    student.train()

    while state.step < schedule.max_steps:
        labeled = to_device(next(labeled_batches), accelerator.device)
        unlabeled = (
            to_device(next(unlabeled_batches), accelerator.device) if unlabeled_batches is not None else None
        )
        micro_batches += 1
        for stream, batch in (("labeled", labeled), ("unlabeled", unlabeled)):
            if batch is not None and batch["skipped"]:
                known = set(state.skipped_samples.get(stream, ()))
                state.skipped_samples[stream] = sorted(known | set(batch["skipped"]))
                logger.warning("skipped unreadable %s samples: %s", stream, ", ".join(batch["skipped"]))
        with accelerator.accumulate(student):
            with accelerator.autocast():
                # Supervised: the student on the labeled crop, against the ground truth.
                output, output_grad = student(labeled["low"], labeled["illum"])  # B×3×crop×crop each
                strong_output = positive = None
                if unlabeled is not None:
                    # Unsupervised: the teacher's pseudo-label of the weak view (or the bank's better one)
                    # is the positive for the student's output on the strong view.
                    pseudo = teacher(unlabeled["weak"], unlabeled["illum"])[0].float().clamp(0, 1)  # B×3×S×S
                    strong_output, _ = student(unlabeled["strong"], unlabeled["illum"])  # B×3×S×S
                    positive = pseudo
                    if bank is not None:
                        bank_update = bank.update(
                            unlabeled["key"], unlabeled["index"], pseudo, strong_output, state.step + 1
                        )
                        positive = bank_update.positives
                        bank_accepted += bank_update.accepted.sum().item()
                        bank_seen += len(unlabeled["key"])
                loss_value, terms = objective(
                    pred=output,
                    pred_grad=output_grad,
                    target=labeled["high"],
                    unsup_pred=strong_output,
                    positive=positive,
                    unsup_input=None if unlabeled is None else unlabeled["strong"],
                    epoch=state.step / schedule.steps_per_epoch,
                    step=state.step,
                )
            nonfinite, preempted = any_rank(
                accelerator, not bool(torch.isfinite(loss_value)), preemption.requested
            )
            window_skipped |= nonfinite
            stop_requested |= preempted
            if not window_skipped:
                accelerator.backward(loss_value)
            if accelerator.sync_gradients:
                if not window_skipped:
                    if cfg.optim.grad_clip is not None:
                        accelerator.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        log_images += images_per_micro_batch
        if not window_skipped:
            for name, value in {"loss": loss_value.detach(), **terms}.items():
                term_sums[name] = term_sums.get(name, 0.0) + float(value)
            term_sums["count"] = term_sums.get("count", 0.0) + 1
        if not accelerator.sync_gradients:
            continue

        # One optimizer step is complete (or was skipped for a non-finite loss on some rank).
        if window_skipped:
            window_skipped = False
            state.nonfinite_total += 1
            state.nonfinite_in_a_row += 1
            logger.warning(
                "non-finite loss at step %d: step skipped (%d in a row, %d in total)",
                state.step + 1,
                state.nonfinite_in_a_row,
                state.nonfinite_total,
            )
            if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                tracker.end("FAILED")
                raise TrainingDiverged(
                    f"{state.nonfinite_in_a_row} non-finite losses in a row at step {state.step + 1}; lower "
                    "optim.lr or set optim.grad_clip, then resume from the last good checkpoint "
                    f"({checkpointing.latest_checkpoint(output_dir)})"
                )
        else:
            state.nonfinite_in_a_row = 0
            lr_scheduler.step()
            teacher.update(accelerator.unwrap_model(student), state.step + 1)
            state.step += 1
            progress.update(1)
        state.stream_positions = {"micro_batches": micro_batches}
        last_step = state.step >= schedule.max_steps

        if state.step % cfg.train.log_every == 0 or last_step:
            sums = reduce_sums(
                accelerator, {**term_sums, "bank_accepted": bank_accepted, "bank_seen": bank_seen}
            )
            count = max(sums.pop("count", 0.0), 1.0)
            accepted, seen = sums.pop("bank_accepted"), sums.pop("bank_seen")
            elapsed = time.perf_counter() - log_started
            logged = {f"train/{name}": value / count for name, value in sums.items()}
            if seen:
                logged["train/bank_acceptance"] = accepted / seen
            logged["train/lr"] = lr_scheduler.get_last_lr()[0]
            logged["train/images_per_s"] = log_images / max(elapsed, 1e-9)
            logged["train/nonfinite_total"] = state.nonfinite_total
            if cfg.data.skip_bad_samples:
                state.skipped_samples = gather_skipped(state.skipped_samples)
                logged["train/skipped_samples"] = sum(map(len, state.skipped_samples.values()))
            tracker.log_metrics(logged, state.step)
            progress.set_postfix(
                loss=f"{logged.get('train/loss', float('nan')):.4f}",
                img_s=f"{logged['train/images_per_s']:.1f}",
            )
            term_sums, log_started, log_images = {}, time.perf_counter(), 0
            bank_accepted = bank_seen = 0

        if state.step % schedule.validate_every == 0 or last_step:
            checksum = check_ranks_agree(accelerator, teacher.model, "teacher")
            logger.info(
                "step %d: teacher checksum %016x identical on all %d ranks", state.step, checksum, world
            )
            result = validate(
                accelerator,
                teacher.model,
                accelerator.unwrap_model(student),
                eval_loader(manifest, "val", rank=rank, world_size=world),
                metrics,
                cfg.train.val_max_samples,
                cfg.train.val_grid_samples,
            )
            tracker.log_metrics(result.metrics, state.step)
            for key, grid in result.grids.items():
                tracker.log_image(grid, f"val/step-{state.step:06d}/{key}.png")
            score = result.metrics["val/psnr"]
            if state.best_score is None or score > state.best_score:
                state.best_score, state.best_step = score, state.step
                if accelerator.is_main_process:
                    enhancer = Enhancer(copy.deepcopy(teacher.model)).to("cpu").eval()  # what users load
                    scores = {"psnr": score, "ssim": result.metrics["val/ssim"]}
                    version = tracker.log_champion(
                        enhancer, result.example, state.step, champion_tags, scores
                    )
                    logger.info(
                        "new best val/psnr %.3f dB at step %d (model version %s)", score, state.step, version
                    )

        if state.step % schedule.checkpoint_every == 0 or last_step or stop_requested:
            state.skipped_samples = gather_skipped(state.skipped_samples)  # rank 0 writes the state
            checkpointing.save_checkpoint(
                accelerator,
                output_dir,
                state,
                student,
                teacher.model,
                config_yaml,
                cfg.train.checkpoints_total_limit,
                bank,
            )
        if stop_requested:
            progress.close()
            preemption.restore()
            tracker.end("KILLED")
            print(
                f"semi-llie: preempted at step {state.step}; checkpoint saved, rerun with --resume latest",
                file=sys.stderr,
            )
            return PREEMPTED_EXIT_CODE

    progress.close()
    preemption.restore()
    tracker.end()
    elapsed = time.perf_counter() - run_started
    steps_done = state.step - run_start_step
    images_per_s = steps_done * cfg.train.gradient_accumulation_steps * images_per_micro_batch / elapsed
    if accelerator.is_main_process:
        best = (
            f"{state.best_score:.2f} dB at step {state.best_step}" if state.best_step is not None else "n/a"
        )
        print(
            f"trained {steps_done} steps to step {state.step} in {elapsed:.0f} s ({images_per_s:.1f} img/s); "
            f"best val/psnr {best}; {state.nonfinite_total} non-finite steps skipped; "
            f"checkpoint {checkpointing.latest_checkpoint(output_dir)}; MLflow run {run_id or 'off'}"
        )
    accelerator.end_training()
    return 0
