"""The GPU measurements of `benchmarks/gpu_check.sh`, written as one JSON file.

    python benchmarks/gpu_check.py --out gpu_check.json [--quick] [--dry-run]

Sections (each records its error instead of stopping the others):
  scan        selective scan forward+backward at L = 4096 and 65,536 (B=1, D=512, N=16, 4 directions):
              the mamba_ssm CUDA kernel (when it imports) and the platform's chunked torch scan
  train_step  one mean-teacher step of the paper model at lol_v1.yaml settings (8 labeled crops of 256 and
              8 unlabeled views of 256; RAM terms off, since their weights are not here), fp32 and bf16
              autocast: images/s and torch's peak allocated memory
  inference   the paper model (Enhancer, fp32, no_grad) on 600x400 and 2000x1500 images: seconds, peak
  ddp         a 2-process DDP step (NCCL) on one GPU, if NCCL allows two ranks on one device
--quick shrinks the repeats and skips L = 65,536 and 2000x1500. --dry-run runs every section on the CPU at
toy sizes (what CI runs, so the script cannot rot); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ as a folder of scripts
from scan import measure as measure_scan  # noqa: E402
from train_step import mean_teacher_step  # noqa: E402

from semi_llie.losses import build_objective  # noqa: E402
from semi_llie.method.teacher import EMATeacher  # noqa: E402
from semi_llie.models import build_model  # noqa: E402
from semi_llie.models.enhancer import Enhancer  # noqa: E402
from semi_llie.ops import kernel_available  # noqa: E402

PAPER_MODEL = {"type": "MambaLowlight"}  # METHOD §1 defaults, as lol_v1.yaml
NO_RAM = {"ram_perceptual": {"loss_weight": 0}, "contrastive": {"loss_weight": 0}}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def scan_section(device: str, lengths: list[int], repeats: int) -> dict:
    backends = (["cuda"] if device == "cuda" and kernel_available() else []) + ["torch"]
    results = {}
    for length in lengths:
        for backend in backends:
            measured = measure_scan(backend, length, "forward+backward", device, repeats)
            results[f"{backend}/L={length}"] = {
                "seconds": measured["seconds"],
                "peak_gib": measured["peak_bytes"] / 2**30,
            }
        if "cuda" in backends:
            results[f"torch_over_cuda/L={length}"] = (
                results[f"torch/L={length}"]["seconds"] / results[f"cuda/L={length}"]["seconds"]
            )
    return results


def make_step(device: str, batch: int, crop: int, bf16: bool) -> Callable[[int], None]:
    """One mean-teacher step as the trainer runs it (student on labeled and strong views, teacher on weak)."""
    torch.manual_seed(0)
    student = build_model(PAPER_MODEL).to(device)
    teacher = EMATeacher(student)
    teacher.to(device)
    objective = build_objective(NO_RAM).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-4, weight_decay=1e-4)
    images = tuple(
        torch.rand(batch, 3, crop, crop, device=device) for _ in range(4)
    )  # low, high, weak, strong

    def step(index: int) -> None:
        mean_teacher_step(student, teacher, objective, optimizer, images, index, bf16)

    return step


def train_step_section(device: str, batch: int, crop: int, steps: int) -> dict:
    results = {}
    for precision in ("fp32", "bf16"):
        reset_peak(device)
        step = make_step(device, batch, crop, bf16=precision == "bf16")
        step(0)  # warm-up: kernels, allocator
        synchronize(device)
        started = time.perf_counter()
        for index in range(1, steps + 1):
            step(index)
        synchronize(device)
        elapsed = time.perf_counter() - started
        results[precision] = {
            "seconds_per_step": elapsed / steps,
            "images_per_s": 2 * batch * steps / elapsed,  # labeled + unlabeled
            "peak_gib": peak_gib(device),
            "batch": f"{batch} labeled crops of {crop} + {batch} unlabeled views of {crop}",
        }
    return results


def inference_section(device: str, sizes: list[tuple[int, int]], repeats: int) -> dict:
    torch.manual_seed(0)
    enhancer = Enhancer(build_model(PAPER_MODEL)).to(device).eval()
    results = {}
    for height, width in sizes:
        image = torch.rand(1, 3, height, width, device=device)
        reset_peak(device)
        with torch.no_grad():
            enhancer(image)  # warm-up
            synchronize(device)
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                enhancer(image)
                synchronize(device)
                seconds.append(time.perf_counter() - started)
        results[f"{width}x{height}"] = {"seconds": min(seconds), "peak_gib": peak_gib(device)}
    return results


def _ddp_worker(rank: int, world: int, device: str, port: int, batch: int, crop: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(build_model(PAPER_MODEL).to(device))
        x = torch.rand(batch, 3, crop, crop, device=device)
        for _ in range(2):  # the second step is timed
            synchronize(device)
            started = time.perf_counter()
            model(x)[0].mean().backward()
            synchronize(device)
        results[rank] = time.perf_counter() - started
    finally:
        dist.destroy_process_group()


def ddp_section(device: str, batch: int, crop: int) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        port = 29000 + os.getpid() % 1000
        mp.spawn(_ddp_worker, args=(2, device, port, batch, crop, results), nprocs=2)
        return {"seconds_per_step": max(results.values()), "backend": "nccl" if device == "cuda" else "gloo"}


def run(name: str, section: Callable[[], dict], report: dict) -> None:
    started = time.perf_counter()
    try:
        report[name] = section()
    except Exception as error:  # noqa: BLE001 - one failing section must not hide the others
        report[name] = {
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc()[-2000:],
        }
    report[name]["wall_s"] = round(time.perf_counter() - started, 2)
    print(f"{name}: {json.dumps(report[name])[:400]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, toy sizes: checks the script, not the GPU"
    )
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to check the script on the CPU")

    report: dict = {
        "mode": "dry-run" if args.dry_run else "quick" if args.quick else "full",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "mamba_ssm_kernel": kernel_available(),
    }
    if args.dry_run:
        plan = dict(lengths=[256], scan_repeats=1, batch=1, crop=32, steps=1, sizes=[(40, 60)], repeats=1)
    elif args.quick:
        plan = dict(lengths=[4096], scan_repeats=2, batch=8, crop=256, steps=3, sizes=[(400, 600)], repeats=2)
    else:
        plan = dict(
            lengths=[4096, 65536], scan_repeats=3, batch=8, crop=256, steps=10,
            sizes=[(400, 600), (1500, 2000)], repeats=3,
        )  # fmt: skip
    run("scan", lambda: scan_section(device, plan["lengths"], plan["scan_repeats"]), report)
    run("train_step", lambda: train_step_section(device, plan["batch"], plan["crop"], plan["steps"]), report)
    run("inference", lambda: inference_section(device, plan["sizes"], plan["repeats"]), report)
    run("ddp", lambda: ddp_section(device, plan["batch"], plan["crop"]), report)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
