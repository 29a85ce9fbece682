"""One step of the mean-teacher loop (METHOD §2-4) and what happens at its boundaries.

`forward_backward` runs one micro-batch: the student on the labeled crop against the ground truth, and, with
unlabeled data, the student on the strong view against the positive (the teacher's pseudo-label of the weak
view, or the bank's better one). `finish_step` completes an optimizer step (or skips it when some rank saw a
non-finite loss), moves the teacher, and advances the step. `LogWindow` accumulates what `log_window` reports;
`validate_and_register` scores the teacher and registers it when it is the run's best so far.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from semi_llie.data.streams import eval_loader
from semi_llie.engine.checkpointing import latest_checkpoint
from semi_llie.engine.distributed import TrainingDiverged, any_rank, check_ranks_agree, reduce_sums
from semi_llie.engine.run import Run, gather_skipped
from semi_llie.engine.validation import validate
from semi_llie.models.enhancer import Enhancer

logger = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    loss: Tensor  # scalar
    terms: dict[str, Tensor]  # the objective's named terms, detached
    nonfinite: bool  # some rank's loss was not finite: the whole optimizer step is skipped
    preempted: bool  # some rank received SIGTERM/SIGUSR1


def forward_backward(
    run: Run,
    labeled: dict[str, Any],
    unlabeled: dict[str, Any] | None,
    preemption_requested: bool,
    skip: bool,
) -> MicroBatch:
    """One micro-batch, forward and backward (and the optimizer step when it completes one).

    labeled: {"low", "high", "illum": B×3×crop×crop}; unlabeled: {"key", "index", "weak", "strong",
    "illum": B×3×S×S} or None. `skip`: an earlier micro-batch of this accumulation window was non-finite.
    """
    student, teacher, bank, state = run.student, run.teacher, run.bank, run.state
    with run.accelerator.accumulate(student):
        with run.accelerator.autocast():
            output, output_grad = student(labeled["low"], labeled["illum"])  # B×3×crop×crop each
            strong_output = positive = None
            if unlabeled is not None:
                symmetries = 8 if run.cfg.teacher.pseudo_label == "dihedral8" else 1
                pseudo = teacher.pseudo_label(unlabeled["weak"], unlabeled["illum"], symmetries)  # B×3×S×S
                strong_output, _ = student(unlabeled["strong"], unlabeled["illum"])  # B×3×S×S
                positive = pseudo
                if bank is not None:
                    positive = bank.update(
                        unlabeled["key"], unlabeled["index"], pseudo, strong_output, state.step + 1
                    ).positives
            loss, terms = run.objective(
                pred=output,
                pred_grad=output_grad,
                target=labeled["high"],
                unsup_pred=strong_output,
                positive=positive,
                unsup_input=None if unlabeled is None else unlabeled["strong"],
                epoch=run.epoch,
                step=state.step,
            )
        nonfinite, preempted = any_rank(run.accelerator, not bool(torch.isfinite(loss)), preemption_requested)
        skip |= nonfinite
        if not skip:
            run.accelerator.backward(loss)
        if run.accelerator.sync_gradients:
            if not skip:
                if run.cfg.optim.grad_clip is not None:
                    run.accelerator.clip_grad_norm_(student.parameters(), run.cfg.optim.grad_clip)
                run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    return MicroBatch(loss.detach(), terms, skip, preempted)


def finish_step(run: Run, skipped: bool) -> None:
    """After the last micro-batch of an optimizer step: count a skipped step, or advance lr, teacher, step."""
    state = run.state
    if skipped:
        state.nonfinite_total += 1
        state.nonfinite_in_a_row += 1
        logger.warning(
            "non-finite loss at step %d: step skipped (%d in a row, %d in total)",
            state.step + 1,
            state.nonfinite_in_a_row,
            state.nonfinite_total,
        )
        if state.nonfinite_in_a_row >= run.cfg.train.max_nonfinite_steps:
            run.tracker.end("FAILED")
            raise TrainingDiverged(
                f"{state.nonfinite_in_a_row} non-finite losses in a row at step {state.step + 1}; lower "
                "optim.lr or set optim.grad_clip, then resume from the last good checkpoint "
                f"({latest_checkpoint(run.output_dir)})"
            )
        return
    state.nonfinite_in_a_row = 0
    run.lr_scheduler.step()
    run.teacher.update(run.accelerator.unwrap_model(run.student), state.step + 1)
    state.step += 1


@dataclass
class LogWindow:
    """Sums of the loss terms of the finite micro-batches and the images seen since the last log."""

    sums: dict[str, float] = field(default_factory=dict)
    images: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, micro_batch: MicroBatch, images: int) -> None:
        self.images += images
        if micro_batch.nonfinite:
            return
        for name, value in {"loss": micro_batch.loss, **micro_batch.terms}.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.sums["count"] = self.sums.get("count", 0.0) + 1


def log_window(run: Run, window: LogWindow) -> dict[str, float]:
    """Reduce the window over ranks and log it as train/* (a collective call); returns what was logged."""
    bank_counts = run.bank.take_window() if run.bank is not None else {"bank_seen": 0.0, "bank_accepted": 0.0}
    sums = reduce_sums(run.accelerator, {**window.sums, **bank_counts})
    count = max(sums.pop("count", 0.0), 1.0)
    accepted, seen = sums.pop("bank_accepted"), sums.pop("bank_seen")
    elapsed = time.perf_counter() - window.started
    logged = {f"train/{name}": value / count for name, value in sums.items()}
    if seen:
        logged["train/bank_acceptance"] = accepted / seen
    logged["train/lr"] = run.lr_scheduler.get_last_lr()[0]
    logged["train/images_per_s"] = window.images / max(elapsed, 1e-9)
    logged["train/nonfinite_total"] = run.state.nonfinite_total
    if run.cfg.data.skip_bad_samples:
        run.state.skipped_samples = gather_skipped(run.state.skipped_samples)
        logged["train/skipped_samples"] = sum(map(len, run.state.skipped_samples.values()))
    run.tracker.log_metrics(logged, run.state.step)
    return logged


def validate_and_register(run: Run) -> None:
    """Check the teacher is identical on all ranks, score it on val, and register it if it is the best."""
    accelerator, state = run.accelerator, run.state
    checksum = check_ranks_agree(accelerator, run.teacher.model, "teacher")
    logger.info("step %d: teacher checksum %016x identical on all %d ranks", state.step, checksum, run.world)
    result = validate(
        accelerator,
        run.teacher.model,
        accelerator.unwrap_model(run.student),
        eval_loader(run.manifest, "val", rank=run.rank, world_size=run.world),
        run.metrics,
        run.cfg.train.val_max_samples,
        run.cfg.train.val_grid_samples,
    )
    run.tracker.log_metrics(result.metrics, state.step)
    for key, grid in result.grids.items():
        run.tracker.log_image(grid, f"val/step-{state.step:06d}/{key}.png")
    score = result.metrics["val/psnr"]
    if not math.isfinite(score) or (state.best_score is not None and score <= state.best_score):
        return  # a NaN score (a diverged teacher) is never the best
    state.best_score, state.best_step = score, state.step
    if accelerator.is_main_process:
        enhancer = Enhancer(copy.deepcopy(run.teacher.model)).to("cpu").eval()  # what users load
        scores = {"psnr": score, "ssim": result.metrics["val/ssim"]}
        version = run.tracker.log_champion(enhancer, result.example, state.step, run.champion_tags, scores)
        logger.info("new best val/psnr %.3f dB at step %d (model version %s)", score, state.step, version)
