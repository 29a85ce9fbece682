"""`semi-llie train --config configs/X.yaml [key.sub=value ...]`: the mean-teacher loop (METHOD §2-4).

Runs the same under `python -m semi_llie train`, `accelerate launch`, `torchrun` and `srun`: Accelerate reads
the rank layout from the environment. The student goes through `accelerator.prepare` (DDP or DeepSpeed
ZeRO-1/2); the EMA teacher, the frozen semantic extractor and the bank's scorer do not, so they stay plain
replicated modules that every rank updates identically (checked by checksum at each validation).

Exit codes (semi_llie.engine.distributed): 0 done, 2 user error, 3 diverged (non-finite losses), 4 ranks
diverged, 75 preempted by SIGTERM/SIGUSR1 after saving a checkpoint (`--resume latest` continues). The
signal handler is installed before setup, so a signal during setup (loading a large semantic checkpoint,
waiting for the other ranks) stops the run after its first step, with that step's checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from semi_llie.config import load_config
from semi_llie.engine.checkpointing import latest_checkpoint
from semi_llie.engine.distributed import PREEMPTED_EXIT_CODE, PreemptionSignal
from semi_llie.engine.run import Run, release_student, save, setup_run
from semi_llie.engine.step import LogWindow, finish_step, forward_backward, log_window, validate_and_register


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
    preemption = PreemptionSignal()  # from the start: a SIGTERM during setup stops after the first step
    try:
        run = setup_run(load_config(args.config, args.overrides), args.resume, args.overwrite)
    except BaseException:
        preemption.restore()
        raise
    try:
        code = train_loop(run, preemption)
    finally:
        release_student(run)  # before the process group goes, on every way out
    if code == 0:
        run.accelerator.end_training()
    return code


def train_loop(run: Run, preemption: PreemptionSignal) -> int:
    """Steps until `train.max_steps` (0) or a preemption signal (PREEMPTED_EXIT_CODE, checkpoint saved)."""
    cfg, state, schedule, accelerator = run.cfg, run.state, run.schedule, run.accelerator
    progress = tqdm(
        total=schedule.max_steps,
        initial=state.step,
        desc="train",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    window, skipped, stop = LogWindow(), False, False
    started, start_step, images = time.perf_counter(), state.step, 0
    run.student.train()

    while state.step < schedule.max_steps:
        with_unlabeled = run.objective.unlabeled_active(epoch=run.epoch, step=state.step)
        labeled, unlabeled = run.streams.next(accelerator.device, state, with_unlabeled)
        micro_batch = forward_backward(run, labeled, unlabeled, preemption.requested, skipped)
        window.add(micro_batch, run.streams.images_per_micro_batch)
        images += run.streams.images_per_micro_batch
        skipped, stop = micro_batch.nonfinite, stop or micro_batch.preempted
        if not accelerator.sync_gradients:
            continue  # gradient accumulation: the optimizer step is not complete yet

        finish_step(run, skipped)
        skipped = False
        progress.update(state.step - progress.n)
        last_step = state.step >= schedule.max_steps
        if state.step % cfg.train.log_every == 0 or last_step:
            logged = log_window(run, window)
            progress.set_postfix(
                loss=f"{logged.get('train/loss', float('nan')):.4f}",
                img_s=f"{logged['train/images_per_s']:.1f}",
            )
            window = LogWindow()
        if state.step % schedule.validate_every == 0 or last_step:
            validate_and_register(run)
        if state.step % schedule.checkpoint_every == 0 or last_step or stop:
            save(run)
        if stop:
            progress.close()
            preemption.restore()
            run.tracker.end("KILLED")
            print(f"semi-llie: preempted at step {state.step}; checkpoint saved, rerun with --resume latest",
                  file=sys.stderr)  # fmt: skip
            return PREEMPTED_EXIT_CODE

    progress.close()
    preemption.restore()
    run.tracker.end()
    elapsed = time.perf_counter() - started
    steps = state.step - start_step
    images_per_s = images / elapsed
    if accelerator.is_main_process:
        best = (
            f"{state.best_score:.2f} dB at step {state.best_step}" if state.best_step is not None else "n/a"
        )
        print(
            f"trained {steps} steps to step {state.step} in {elapsed:.0f} s ({images_per_s:.1f} img/s); "
            f"best val/psnr {best}; {state.nonfinite_total} non-finite steps skipped; "
            f"checkpoint {latest_checkpoint(run.output_dir)}; MLflow run {run.run_id or 'off'}"
        )
    return 0
