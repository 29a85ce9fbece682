"""Cost of one training step with the RAM losses on: tiny RAM vs the full-size Swin-L RAM (random weights).

    python benchmarks/semantic_step.py                       # batch 2, crop 256, both RAM sizes, CPU
    python benchmarks/semantic_step.py --sizes tiny --steps 5
    python benchmarks/semantic_step.py --grad-checkpointing  # recompute Swin blocks in backward

One step = student forward on the labeled batch and on the strong unlabeled view, the full objective
(fidelity, gradient, RAM perceptive, consistency, semantic contrastive), backward. Each RAM size runs
in its own process so its peak resident memory (ru_maxrss) is its own. The student is the tiny
MambaLowlight by default: this measures what the semantic losses cost, not the backbone's scan.
Prints one line per configuration and its ratios to the baseline without semantic losses.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GIB = 2**30
SIZES = ("none", "tiny", "large")  # none: no semantic losses (the baseline the others are compared with)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from semi_llie.losses import build_objective
    from semi_llie.models import TINY_MODEL_CONFIG, build_model
    from semi_llie.semantic import build_semantic

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.run == "none":  # the baseline: the same step with both semantic terms switched off
        semantic = None
        switched_off = {"ram_perceptual": {"loss_weight": 0}, "contrastive": {"loss_weight": 0}}
        objective = build_objective({"unsup_weight": {"weight": 0.1, "ramp_length": 0}, **switched_off})
    else:
        semantic = build_semantic(
            {
                "type": "RAM",
                "size": args.run,
                "grad_checkpointing": args.grad_checkpointing,
                "allow_random_weights": True,
            }
        )
        objective = build_objective({"unsup_weight": {"weight": 0.1, "ramp_length": 0}}, semantic=semantic)
    student = build_model(TINY_MODEL_CONFIG if args.student == "tiny" else {"type": "MambaLowlight"})
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-4)
    shape = (args.batch, 3, args.crop, args.crop)
    low, high, strong, positive = (torch.rand(shape) for _ in range(4))
    rss_after_build = peak_rss_bytes()

    def step() -> float:
        start = time.perf_counter()
        pred, pred_grad = student(low)
        unsup_pred, _ = student(strong)
        total, _ = objective(
            pred=pred,
            pred_grad=pred_grad,
            target=high,
            unsup_pred=unsup_pred,
            positive=positive,
            unsup_input=strong,
        )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    return {
        "ram": args.run,
        "ram_params_m": sum(p.numel() for p in semantic.parameters()) / 1e6 if semantic else 0.0,
        "step_s": min(times),
        "peak_rss_gib": peak_rss_bytes() / GIB,
        "rss_after_build_gib": rss_after_build / GIB,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--student", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps before the timed ones")
    parser.add_argument("--steps", type=int, default=1, help="timed steps (the fastest is reported)")
    parser.add_argument("--run", choices=SIZES, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()

    if args.run:
        print(json.dumps(run_one(args)))
        return 0

    passthrough = sys.argv[1:]
    results = {}
    print(
        f"batch {args.batch}, crop {args.crop}, student {args.student}, threads {args.threads}, "
        f"grad checkpointing {args.grad_checkpointing}, CPU"
    )
    for size in args.sizes:
        child = subprocess.run(
            [sys.executable, __file__, *passthrough, "--run", size],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            print(f"RAM {size}: failed (exit {child.returncode}) {child.stderr.strip()[-500:]}")
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        results[size] = result
        print(
            f"RAM {size:5s} ({result['ram_params_m']:6.1f} M params): step {result['step_s']:.2f} s, "
            f"peak RSS {result['peak_rss_gib']:.2f} GiB (built: {result['rss_after_build_gib']:.2f} GiB)"
        )
    if "none" in results:
        base = results["none"]
        for size in ("tiny", "large"):
            if size in results:
                print(
                    f"RAM {size} / no semantic losses: time x{results[size]['step_s'] / base['step_s']:.1f}, "
                    f"peak memory x{results[size]['peak_rss_gib'] / base['peak_rss_gib']:.1f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
