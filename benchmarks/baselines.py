"""Score the classic enhancers (gamma correction, histogram equalisation) on a shard split.

The floor a trained model must clear, measured with the metrics `semi-llie evaluate` reports (full
resolution, outputs rounded to 8 bits), on the same samples:

    python benchmarks/baselines.py --shards shards/lol_cpu --split val [--json baselines.json]

Prints one markdown row per method, with the gain over the untouched input in dB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from semi_llie.errors import UserError
from semi_llie.inference.classic import BASELINES, score_baselines

COLUMNS = ("psnr", "ssim", "psnr_y", "ssim_y", "psnr_gtmean")


def table(results: dict[str, dict], count: int) -> str:
    reference = results["input"]["metrics"]["psnr"]
    lines = [
        f"| method ({count} images) | " + " | ".join(COLUMNS) + " | PSNR gain over input (dB) |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for name in ("input", *BASELINES):
        metrics = results[name]["metrics"]
        values = " | ".join(
            f"{metrics[column]:.4f}" if "ssim" in column else f"{metrics[column]:.2f}" for column in COLUMNS
        )
        lines.append(f"| {name} | {values} | {metrics['psnr'] - reference:+.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shards", type=Path, required=True, help="shard folder (semi-llie shards build --out)"
    )
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument(
        "--json", type=Path, help="also write the scores, per image, with the metric settings"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        results = score_baselines(args.shards, args.split)
    except UserError as err:
        print(f"baselines: error: {err}", file=sys.stderr)
        return 2
    count = len(results["input"]["per_image"])
    print(table(results, count))
    print(f"\nscored {count} {args.split} images of {args.shards} in {time.perf_counter() - started:.1f}s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
