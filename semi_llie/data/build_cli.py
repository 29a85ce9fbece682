"""`semi-llie shards build`: pack image folders into WebDataset shards (format: shards/README.md)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from semi_llie.data.build import BuildConfig, build_shards
from semi_llie.data.manifest import BrightnessCheck, input_statistics, unlabeled_brightness_check
from semi_llie.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    inputs = parser.add_argument_group("inputs (at least one)")
    inputs.add_argument(
        "--pairs",
        nargs=2,
        action="append",
        default=[],
        metavar=("LOW_DIR", "HIGH_DIR"),
        help="paired folders, matched by file stem (repeatable)",
    )
    inputs.add_argument(
        "--unlabeled",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of unpaired low-light images (repeatable)",
    )
    inputs.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="DIR",
        help="seed layout: labeled/{input,GT}, unlabeled/input, val/{input,GT}, "
        "test/<name>/input[+GT] (repeatable)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder for shards and manifest.json")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="fraction of pairs held out for validation when no val/ split exists (default 0.1)",
    )
    parser.add_argument(
        "--test-fraction", type=float, default=None, help="fraction of pairs held out for test"
    )
    parser.add_argument(
        "--test-fold",
        type=_index_of("--test-fold", "3/5"),
        default=None,
        metavar="I/K",
        help="hold out fold I of K of the pairs for test instead of --test-fraction; builds 1/K .. K/K "
        "with one --seed test every pair once (cross-validation)",
    )
    parser.add_argument(
        "--labeled-fraction",
        type=float,
        default=1.0,
        help="keep this seeded fraction of the training pairs labeled; the others' low images become "
        "unlabeled (label-efficiency studies; val/test stay the same for every fraction)",
    )
    parser.add_argument(
        "--drop-unused-pairs",
        action="store_true",
        help="with --labeled-fraction: leave the other pairs out instead of adding their lows as unlabeled",
    )
    parser.add_argument(
        "--labeled-lows-as-unlabeled",
        action="store_true",
        help="also add every labeled pair's low image to the unlabeled split (in-domain unlabeled images "
        "when all pairs are labeled; docs/results/label_efficiency.md)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the labeled/val/test split")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--max-size", type=float, default=1024.0, metavar="MB", help="shard size at most")
    parser.add_argument(
        "--crop-size",
        type=int,
        default=256,
        help="training crop; smaller images are kept and flagged in the manifest",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="processes encoding images in parallel (default: one per CPU; 0 or 1: in this process)",
    )
    parser.add_argument(
        "--part",
        type=_index_of("--part", "2/8"),
        default=None,
        metavar="I/N",
        help="build part I of N (1-based) into OUT; join the parts with `semi-llie shards merge`",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable, unmatched and non-image files (listed in the manifest)",
    )
    parser.add_argument(
        "--allow-overlap", action="store_true", help="allow unlabeled images that duplicate val/test images"
    )
    parser.add_argument(
        "--overlap-distance",
        type=int,
        default=6,
        help="pHash Hamming distance (of 64 bits) at or below which images count as duplicates (the leak "
        "guard; near-duplicate pairs share one split when the split is drawn)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing build (or part) in OUT")


def main(args: argparse.Namespace) -> int:
    if not (args.pairs or args.unlabeled or args.root):
        raise UserError("nothing to build; pass --pairs LOW_DIR HIGH_DIR, --unlabeled DIR or --root DIR")
    if args.max_count < 1 or args.max_size <= 0:
        raise UserError("--max-count and --max-size must be positive")
    config = BuildConfig(
        out=args.out,
        pairs=tuple((str(low), str(high)) for low, high in args.pairs),
        unlabeled=tuple(args.unlabeled),
        roots=tuple(args.root),
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        test_fold=args.test_fold,
        labeled_fraction=args.labeled_fraction,
        drop_unused_pairs=args.drop_unused_pairs,
        labeled_lows_as_unlabeled=args.labeled_lows_as_unlabeled,
        seed=args.seed,
        max_count=args.max_count,
        max_size_mb=args.max_size,
        crop_size=args.crop_size,
        skip_bad=args.skip_bad,
        allow_overlap=args.allow_overlap,
        overlap_distance=args.overlap_distance,
        part=args.part,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    manifest = build_shards(config)
    print(summary(manifest, args.out))
    return 0


def summary(manifest: dict, out: Path) -> str:
    splits = ", ".join(
        f"{split} {info['samples']}" for split, info in manifest["splits"].items() if info["samples"]
    )
    megabytes = sum(s["bytes"] for s in manifest["shards"]) / 2**20
    lines = [
        f"wrote {len(manifest['samples'])} samples ({splits}) in {len(manifest['shards'])} shards "
        f"({megabytes:.1f} MB) to {out}"
    ]
    if not manifest["builder"]["part"]:
        lines += statistics_lines(manifest)
    small = manifest["flags"]["smaller_than_crop"]
    if small:
        lines.append(f"{len(small)} image(s) smaller than the crop (flagged): {', '.join(small)}")
    for record in manifest["skipped"]:
        lines.append(f"skipped {', '.join(record['paths'])}: {record['reason']}")
    part = manifest["builder"]["part"]
    if part:
        lines.append(
            f"part {part['index']} of {part['count']} done; when all parts are, run "
            f"`semi-llie shards merge {out}`"
        )
    return "\n".join(lines)


def statistics_lines(manifest: dict) -> list[str]:
    """The labeled inputs' per-channel statistics, for the model config, and how the unlabeled images'
    brightness compares with the labeled lows' (nothing for manifests without per-sample moments)."""
    lines = []
    statistics = input_statistics(manifest["samples"])
    if statistics is not None:
        mean, std = statistics
        lines.append(f"labeled inputs per channel: mean {mean}, std {std} (model.input_mean / input_std)")
    check = unlabeled_brightness_check(manifest["samples"])
    if check is not None:
        lines += _brightness_lines(check)
    return lines


def _brightness_lines(check: BrightnessCheck) -> list[str]:
    low, high = check.band
    lines = [
        f"unlabeled brightness: median {check.unlabeled_median:.3f} against the labeled lows' "
        f"{check.labeled_median:.3f} (x{check.median_ratio:.2f}); {len(check.outside)} of "
        f"{check.unlabeled} outside their band {low:.3f}-{high:.3f} (flags.unlabeled_unlike_labeled)"
    ]
    if not 0.5 <= check.median_ratio <= 2:
        lines.append(
            "warning: the unlabeled images are exposed unlike the labeled lows; unlabeled photos from "
            "other cameras made the teacher worse in docs/results/label_efficiency.md: prefer images "
            "like the ones you will enhance"
        )
    return lines


def _index_of(flag: str, example: str) -> Callable[[str], tuple[int, int]]:
    """A parser of "I/N" (1-based) for `flag`."""

    def parse(text: str) -> tuple[int, int]:
        try:
            index, count = (int(x) for x in text.split("/"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects I/N, e.g. {example}, got {text!r}") from None
        if not 1 <= index <= count:
            raise argparse.ArgumentTypeError(f"{flag} {text}: I must be between 1 and N")
        return index, count

    return parse
