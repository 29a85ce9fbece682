"""Throughput of one mean-teacher training step on CPU: steps/s, images/s and peak RSS, 1 vs 2 processes.

    python benchmarks/train_step.py [--steps 3] [--batch 2] [--crops 64 128] [--threads 1]

The step is the trainer's: student on the labeled crop and on the strong unlabeled view, teacher on the weak
view, the objective of METHOD §3, backward, AdamW, EMA update. With 2 processes the student is wrapped in DDP
(gloo) and each process runs the same per-process batch, so ideal scaling doubles images/s. Data loading and
the bank's IQA scoring are excluded (they are the stream's and the bank's cost, not the step's).

Models: `tiny` = configs/tiny_test.yaml's model with the tiny RAM semantic terms on; `paper` = MambaLowlight
defaults (610,530 parameters) with the semantic terms off (the 5.6 GB RAM checkpoint is not available here).
Prints a table and the 2-process/1-process images/s ratio per row.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch.nn.parallel import DistributedDataParallel

from semi_llie.losses import build_objective
from semi_llie.method.teacher import EMATeacher
from semi_llie.models import build_model

PROJECT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((PROJECT / "configs" / "tiny_test.yaml").read_text())
SETUPS = {
    "tiny": (TINY["model"], {"semantic": TINY["losses"]["semantic"]}),
    "paper": (
        {"type": "MambaLowlight"},
        {"ram_perceptual": {"loss_weight": 0}, "contrastive": {"loss_weight": 0}},
    ),
}


def mean_teacher_step(student, teacher, objective, optimizer, images, index: int, bf16: bool = False) -> None:
    """One step as the trainer runs it: student on the labeled crop and the strong view, teacher on the weak
    view, the objective, backward, AdamW, EMA. images: (low, high, weak, strong), each B×3×S×S."""
    low, high, weak, strong = images
    with torch.autocast(low.device.type, dtype=torch.bfloat16, enabled=bf16):
        output, output_grad = student(low)
        pseudo = teacher.pseudo_label(weak, None)
        strong_output, _ = student(strong)
        loss, _ = objective(
            pred=output,
            pred_grad=output_grad,
            target=high,
            unsup_pred=strong_output,
            positive=pseudo,
            unsup_input=strong,
            epoch=100.0,
            step=index,
        )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    teacher.update(student, index + 1)


def run_steps(
    rank: int,
    world: int,
    setup: str,
    crop: int,
    batch: int,
    steps: int,
    threads: int,
    port: int,
    results: dict,
) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model_cfg, loss_cfg = SETUPS[setup]
    student = build_model(model_cfg)
    teacher = EMATeacher(student)
    objective = build_objective(loss_cfg)
    if world > 1:
        student = DistributedDataParallel(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-4, weight_decay=1e-4)
    low, high, weak, strong = (torch.rand(batch, 3, crop, crop) for _ in range(4))  # B×3×crop×crop

    def step(index: int) -> None:
        mean_teacher_step(student, teacher, objective, optimizer, (low, high, weak, strong), index)

    step(0)  # warm-up: allocator, DDP buckets
    if world > 1:
        dist.barrier()
    started = time.perf_counter()
    for index in range(1, steps + 1):
        step(index)
    if world > 1:
        dist.barrier()
    elapsed = time.perf_counter() - started
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    results[rank] = (elapsed, peak_rss_mb)
    if world > 1:
        dist.destroy_process_group()


def measure(
    world: int, setup: str, crop: int, batch: int, steps: int, threads: int
) -> tuple[float, float, float]:
    """-> (steps/s, images/s over all processes, peak RSS of the largest process in MB)."""
    with mp.Manager() as manager:
        results = manager.dict()
        port = 29000 + os.getpid() % 1000
        mp.spawn(run_steps, args=(world, setup, crop, batch, steps, threads, port, results), nprocs=world)
        elapsed = max(r[0] for r in results.values())
        peak = max(r[1] for r in results.values())
    images_per_step = 2 * batch * world  # labeled + unlabeled per process
    return steps / elapsed, steps * images_per_step / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--batch", type=int, default=2, help="labeled and unlabeled images per process")
    parser.add_argument("--crops", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()

    print(
        f"CPU, {os.cpu_count()} cores (shared machine: absolute numbers are noisy), {args.threads} thread(s) "
        f"per process, batch {args.batch}+{args.batch} per process, {args.steps} timed steps"
    )
    header = "setup   crop procs  steps/s  images/s  peak RSS MB  2p/1p"
    print(header)
    print("-" * len(header))
    for setup in args.setups:
        for crop in args.crops:
            single = None
            for world in (1, 2):
                steps_per_s, images_per_s, peak = measure(
                    world, setup, crop, args.batch, args.steps, args.threads
                )
                single = single or images_per_s
                ratio = f"{images_per_s / single:.2f}" if world == 2 else ""
                row = (
                    f"{setup:<6} {crop:>5} {world:>5} {steps_per_s:>8.3f} {images_per_s:>9.2f} {peak:>12.0f}"
                )
                print(f"{row} {ratio:>6}", flush=True)


if __name__ == "__main__":
    main()
