"""Enhancement cost on CPU with the paper model (random init: the weights do not change the cost).

1. latency of one whole image (default 600×400, LOL size), in seconds and megapixels/s;
2. peak RSS of a large image (default 2000×1500) enhanced in tiles under a `--max-memory` budget, against the
   process's RSS before inference and against the activation memory the whole image would need.

Each measurement runs in its own process, so peak RSS (ru_maxrss) belongs to that measurement alone.

    python benchmarks/enhance.py [--latency-size 600x400] [--memory-size 2000x1500] [--max-memory 1024]
                                 [--threads 2] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from semi_llie.engine.allocator import keep_freed_memory
from semi_llie.inference.tiling import TilePlan, activation_bytes_per_pixel, enhance_image
from semi_llie.models import TINY_MODEL_CONFIG, MambaLowlight, build_model
from semi_llie.models.enhancer import Enhancer


def size(text: str) -> tuple[int, int]:
    width, height = (int(part) for part in text.lower().split("x"))
    return width, height


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(width: int, height: int, max_memory_mb: float, threads: int, tiny: bool) -> dict[str, float]:
    """In this process: enhance one random width×height image; time, plan and peak RSS."""
    keep_freed_memory()  # as the CLI does
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(TINY_MODEL_CONFIG) if tiny else MambaLowlight()
    enhancer = Enhancer(model).eval()
    enhancer(torch.rand(1, 3, 32, 32))  # warm-up: allocator and lazy initialisation outside the measurement
    before = peak_rss_mb()
    bytes_per_pixel = activation_bytes_per_pixel(enhancer)
    plan = TilePlan.for_image(height, width, bytes_per_pixel, max_memory_mb)
    x = torch.rand(1, 3, height, width) * 0.3
    started = time.perf_counter()
    enhance_image(enhancer, x, plan)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "tile": plan.tile or 0,
        "rss_before_mb": before,
        "peak_rss_mb": peak_rss_mb(),
        "whole_image_estimate_mb": bytes_per_pixel * width * height / 2**20,
    }


def in_subprocess(width: int, height: int, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", f"{width}x{height}", "--max-memory", str(args.max_memory)]
    command += ["--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-size", type=size, default=(600, 400), help="WxH of the latency image")
    parser.add_argument("--memory-size", type=size, default=(2000, 1500), help="WxH of the tiled image")
    parser.add_argument("--max-memory", type=float, default=1024, help="activation budget in MB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="TINY_MODEL_CONFIG instead of the paper model")
    parser.add_argument("--child", type=size, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.max_memory, args.threads, args.tiny)))
        return

    model = "TINY_MODEL_CONFIG" if args.tiny else "paper MambaLowlight (embed 64, depths 2,2, d_state 16)"
    print(f"model: {model}, random init; CPU, {args.threads} thread(s); budget {args.max_memory:.0f} MB")
    width, height = args.latency_size
    latency = in_subprocess(width, height, args)
    megapixels = width * height / 1e6
    print(
        f"latency {width}x{height}: {latency['seconds']:.2f} s "
        f"({megapixels / latency['seconds']:.3f} Mpx/s), "
        f"tile {latency['tile'] or 'none'}, peak RSS {latency['peak_rss_mb']:.0f} MB"
    )
    width, height = args.memory_size
    large = in_subprocess(width, height, args)
    growth = large["peak_rss_mb"] - large["rss_before_mb"]
    print(
        f"tiled {width}x{height}: tile {large['tile'] or 'none'}, {large['seconds']:.1f} s, "
        f"peak RSS {large['peak_rss_mb']:.0f} MB (+{growth:.0f} MB during inference)"
    )
    print(
        f"ratios: inference growth / budget = {growth / args.max_memory:.2f}; "
        f"inference growth / whole-image estimate ({large['whole_image_estimate_mb']:.0f} MB) = "
        f"{growth / large['whole_image_estimate_mb']:.3f}; "
        f"time per pixel tiled / whole = "
        f"{(large['seconds'] / (width * height)) / (latency['seconds'] / megapixels / 1e6):.2f}"
    )


if __name__ == "__main__":
    main()
