"""Shard building, verifying and merging speed.

1. `shards build` on the shared LOL pairs and unpaired photos: the previous path (Pillow decode, the
   illumination map blurred at full resolution with scipy, PNG zlib level 6, one process; written out here)
   against the current default (OpenCV decode, OpenCV blurs on a 3x coarser grid, level 3, one worker per
   CPU), in one run; prints samples/s of each and the ratio.
2. 10,000 small (40x40) synthetic unlabeled images built as 2 parts, merged, verified: seconds, samples/s.

    python benchmarks/shards.py [--limit 60] [--synthetic 10000] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from semi_llie.cli import main as cli
from semi_llie.data import build
from semi_llie.data import images as image_io
from semi_llie.data.build import BuildConfig, build_shards
from semi_llie.data.illumination import RETINEX_SIGMAS

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def linked_subset(out: Path, limit: int) -> tuple[Path, Path, Path]:
    """Links to the first `limit` LOL pairs and `limit` unpaired photos (the data stays where it is)."""
    low, high, unpaired = out / "low", out / "high", out / "unpaired"
    for folder in (low, high, unpaired):
        folder.mkdir(parents=True)
    for path in sorted((SHARED / "lol_v1_train115" / "low").glob("*.png"))[:limit]:
        (low / path.name).symlink_to(path)
        (high / path.name).symlink_to(SHARED / "lol_v1_train115" / "high" / path.name)
    photos = sorted(
        p for p in (SHARED / "unpaired").rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"}
    )
    for i, path in enumerate(photos[:limit]):
        (unpaired / f"{i:04d}{path.suffix.lower()}").symlink_to(path)
    return low, high, unpaired


def previous_illumination_map(rgb: np.ndarray) -> np.ndarray:
    """The map as the builder first computed it: scipy Gaussian blurs of the full-resolution image."""
    image = rgb.astype(np.float32)
    logs = [
        np.maximum(np.log10(ndimage.gaussian_filter(image, (s, s, 0), mode="mirror") + 1e-8), 0.0)
        for s in RETINEX_SIGMAS
    ]
    mean = sum(logs) / len(logs)
    low, high = float(mean.min()), float(mean.max())
    normalised = (mean - low) / (high - low) if high > low else np.zeros_like(mean)
    return np.round(normalised * 255.0).astype(np.uint8)


def previous_load_rgb8(path: Path) -> np.ndarray:
    """The builder's first reader: Pillow, EXIF transpose, RGB."""
    with Image.open(path) as image:
        image.load()
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)


def timed_build(config: BuildConfig) -> tuple[float, int]:
    started = time.perf_counter()
    manifest = build_shards(config)
    return time.perf_counter() - started, len(manifest["samples"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=60, help="LOL pairs and unpaired photos to build")
    parser.add_argument("--synthetic", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        low, high, unpaired = linked_subset(root / "data", args.limit)
        common = dict(pairs=((str(low), str(high)),), unlabeled=(str(unpaired),), seed=0, allow_overlap=True)
        current = build.illumination_map, build.load_rgb8, image_io.PNG_COMPRESS_LEVEL
        build.illumination_map, build.load_rgb8 = previous_illumination_map, previous_load_rgb8
        image_io.PNG_COMPRESS_LEVEL = 6  # the previous PNG level
        try:
            old_seconds, samples = timed_build(BuildConfig(out=root / "old", workers=0, **common))
        finally:
            build.illumination_map, build.load_rgb8, image_io.PNG_COMPRESS_LEVEL = current
        new_seconds, _ = timed_build(BuildConfig(out=root / "new", workers=args.workers, **common))
        print(f"1. shards build, {samples} samples (LOL 600x400 pairs and unpaired photos)")
        print(
            f"   full-resolution map, level 6, 1 process: {samples / old_seconds:6.2f} samples/s; "
            f"coarse-grid map, level 3, {args.workers} workers: {samples / new_seconds:6.2f} samples/s; "
            f"ratio {old_seconds / new_seconds:.1f}x",
            flush=True,
        )
        if not args.synthetic:
            return

        images = root / "synthetic"
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.synthetic):
            Image.fromarray(rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)).save(images / f"s{i:05d}.png")
        out = root / "parts"
        started = time.perf_counter()
        for part in (1, 2):
            build_shards(
                BuildConfig(
                    out=out,
                    unlabeled=(str(images),),
                    part=(part, 2),
                    workers=args.workers,
                    crop_size=16,
                    max_count=1000,
                    allow_overlap=True,
                )
            )
        built = time.perf_counter() - started
        started = time.perf_counter()
        assert cli(["shards", "merge", str(out)]) == 0
        merged = time.perf_counter() - started
        started = time.perf_counter()
        assert cli(["shards", "verify", str(out)]) == 0
        verified = time.perf_counter() - started
        n = args.synthetic
        print(f"2. {n} synthetic 40x40 unlabeled images, 2 parts")
        print(
            f"   build {built:.1f} s ({n / built:.0f}/s), merge {merged:.1f} s ({n / merged:.0f}/s), "
            f"verify {verified:.1f} s ({n / verified:.0f}/s)"
        )


if __name__ == "__main__":
    main()
