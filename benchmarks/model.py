"""MambaLowlight (paper config) on CPU: time and peak RSS per case, each case in a fresh subprocess.

    python benchmarks/model.py [--threads 2] [--repeats 2] [--warmup 1] [--backend auto] [--cases ...]
    python benchmarks/model.py --device cuda    # GPU: peak is torch's max allocated bytes, base the model's

Cases: training step (forward + backward, batch 1) at 64², 128², 256², and inference (no_grad) at 600×400
(a LOL-v1 image). A fresh process per case makes peak RSS the cost of that case alone (plus the torch
runtime, reported separately as "base"). CPU seconds are reported next to wall time because on a
shared machine the wall time mostly measures the other users' load.
Targets for inference at 600×400 on 2 cores: < 15 s, < 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = {
    "train 64x64": ("train", 64, 64),
    "train 128x128": ("train", 128, 128),
    "train 256x256": ("train", 256, 256),
    "infer 600x400": ("infer", 400, 600),
}
INFER_TARGET_S = 15.0
INFER_TARGET_GIB = 4.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def run_case(
    mode: str, height: int, width: int, repeats: int, warmup: int, backend: str, device: str
) -> dict[str, float]:
    """In the child process: build, warm up, time `repeats` runs; return seconds per run and peak memory
    (RSS on CPU; on CUDA torch's peak allocated bytes during the timed runs, and the model's as "base")."""
    import torch

    from semi_llie.models import MambaLowlight

    torch.manual_seed(0)
    model = MambaLowlight(scan_backend=backend).to(device)
    x = torch.rand(1, 3, height, width).to(device)
    cuda = device == "cuda"
    base_gib = torch.cuda.memory_allocated() / 2**30 if cuda else peak_rss_gib()

    def step() -> None:
        if mode == "train":
            model.train()
            y, grad_y = model(x)
            (y.mean() + grad_y.mean()).backward()
            model.zero_grad(set_to_none=True)
        else:
            model.eval()
            with torch.no_grad():
                model(x)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):  # allocator and oneDNN kernel selection
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start, start_cpu = time.perf_counter(), cpu_seconds()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - start) / repeats
    cpu = (cpu_seconds() - start_cpu) / repeats
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else peak_rss_gib()
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_gib": peak_gib, "base_gib": base_gib}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--backend", default="auto", help="selective-scan backend (auto | torch | reference)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--glibc-malloc",
        action="store_true",
        help="leave glibc's allocator at its defaults instead of keeping freed memory as the CLI does",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import torch

        from semi_llie.engine.allocator import keep_freed_memory

        if not args.glibc_malloc:
            keep_freed_memory()
        torch.set_num_threads(args.threads)
        print(json.dumps(run_case(*CASES[args.child], args.repeats, args.warmup, args.backend, args.device)))
        return 0

    print(
        f"MambaLowlight paper config on {args.device}, {args.threads} threads, "
        f"scan backend {args.backend!r}, "
        f"{args.repeats} timed runs after {args.warmup} warm-up, "
        f"{'glibc default malloc' if args.glibc_malloc else 'freed memory kept (as the CLI)'}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    # On a shared machine wall time depends on the others' load; CPU seconds / threads estimates the wall
    # time on idle cores (an underestimate where the threads cannot all be kept busy).
    print(f"{'case':<16}{'s/run':>9}{'CPU s/run':>11}{'peak RSS GiB':>14}{'base GiB':>10}{'load':>7}")
    for name in args.cases:
        load = os.getloadavg()[0]
        command = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
            "--warmup",
            str(args.warmup),
            "--backend",
            args.backend,
            "--device",
            args.device,
            *(["--glibc-malloc"] if args.glibc_malloc else []),
        ]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        times = f"{result['seconds']:>9.2f}{result['cpu_seconds']:>11.2f}"
        print(
            f"{name:<16}{times}{result['peak_gib']:>14.2f}{result['base_gib']:>10.2f}{load:>7.2f}", flush=True
        )
        if name.startswith("infer"):
            print(
                f"  inference / target: time {result['seconds'] / INFER_TARGET_S:.2f} (wall) "
                f"{result['cpu_seconds'] / args.threads / INFER_TARGET_S:.2f} (CPU s / threads) "
                f"(of {INFER_TARGET_S:.0f} s), memory {result['peak_gib'] / INFER_TARGET_GIB:.2f} "
                f"(of {INFER_TARGET_GIB:.0f} GiB)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
