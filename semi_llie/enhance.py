"""`semi-llie enhance INPUT... --out DIR`: enhance files, folders or globs with a trained model.

Any size, never resized: images are padded only if the model needs it, and images whose activations would
not fit `--max-memory` run in overlapping tiles blended smoothly (semi_llie.inference.tiling). Images are
read by semi_llie.data.images (EXIF orientation applied, grayscale and 16-bit at full precision; 16-bit
PNG/TIFF inputs give 16-bit outputs).
Files that cannot be read are reported at the end and make the exit status non-zero; the others are written.
Inputs are never overwritten.
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from semi_llie.data.images import IMAGE_SUFFIXES, BadImageError, LoadedImage, read_image, write_image
from semi_llie.errors import UserError
from semi_llie.inference.cli_args import add_model_arguments, model_from_args
from semi_llie.inference.tiling import TilePlan, activation_bytes_per_pixel, enhance_image


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    add_model_arguments(parser)
    parser.add_argument("--suffix", default="", help="appended to each output file's stem, e.g. _enhanced")
    parser.add_argument(
        "--format", choices=("same", "png", "jpg", "tif", "webp"), default="same", help="output file format"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images of one size enhanced together")


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    inputs, problems = collect_inputs(args.inputs)
    if not inputs and not problems:
        raise UserError(f"no image files in {' '.join(args.inputs)}; pass image files, folders or globs")
    targets = output_paths(inputs, args.out, args.suffix, args.format)
    args.out.mkdir(parents=True, exist_ok=True)
    enhancer, source = model_from_args(args)
    bytes_per_pixel = activation_bytes_per_pixel(enhancer)
    tiled = 0
    progress = tqdm(total=len(inputs), desc="enhance", unit="img", disable=None)
    for batch, failures in same_size_batches(inputs, args.batch_size, args.max_memory, bytes_per_pixel):
        problems.extend(failures)
        progress.update(len(failures))
        if not batch:
            continue
        height, width = batch[0][1].pixels.shape[:2]
        plan = TilePlan.for_image(height, width, bytes_per_pixel, args.max_memory, args.tile, args.overlap)
        tiled += len(batch) if plan.tile else 0
        x = torch.from_numpy(np.stack([image.to_float() for _, image in batch])).permute(
            0, 3, 1, 2
        )  # B×3×H×W
        y = enhance_image(enhancer, x.to(args.device), plan).cpu()
        for (path, image), output in zip(batch, y, strict=True):
            write_image(targets[path], output.permute(1, 2, 0).numpy(), image.bit_depth)
        progress.update(len(batch))
    progress.close()
    written = len(inputs) - sum(1 for path, _ in problems if path in targets)
    print(
        f"enhanced {written} image(s) ({tiled} tiled) with {source} into {args.out} "
        f"in {time.perf_counter() - started:.1f}s"
    )
    for path, reason in problems:
        print(f"semi-llie enhance: skipped {path}: {reason}", file=sys.stderr)
    return 1 if problems else 0


def collect_inputs(patterns: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files named, the image files of folders named, and glob matches, in order, without duplicates.

    Returns the inputs and (path, reason) for each pattern that matched nothing.
    """
    found: dict[Path, None] = {}
    problems: list[tuple[Path, str]] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                problems.append((path, "no such file, and no file matches it as a glob pattern"))
        for match in matches:
            found.setdefault(match, None)
    return list(found), problems


def output_paths(inputs: list[Path], out: Path, suffix: str, fmt: str) -> dict[Path, Path]:
    """Input -> output path, keeping names; refuses outputs that would replace an input or each other."""
    resolved_inputs = {path.resolve() for path in inputs}
    targets: dict[Path, Path] = {}
    claimed: dict[Path, Path] = {}
    for path in inputs:
        extension = path.suffix if fmt == "same" else f".{fmt}"
        target = out / f"{path.stem}{suffix}{extension}"
        if target.resolve() in resolved_inputs:
            raise UserError(
                f"--out {out} would overwrite the input {path}; choose another --out folder or set --suffix"
            )
        if target.resolve() in claimed:
            raise UserError(
                f"{path} and {claimed[target.resolve()]} would both be written to {target}; "
                "enhance them into separate --out folders"
            )
        claimed[target.resolve()] = path
        targets[path] = target
    return targets


def same_size_batches(
    inputs: list[Path], batch_size: int, max_memory_mb: float, bytes_per_pixel: float
) -> Iterator[tuple[list[tuple[Path, LoadedImage]], list[tuple[Path, str]]]]:
    """Consecutive readable images of one size, up to `batch_size` and within the memory budget.

    Yields (batch, unreadable files met since the previous batch); the batch is empty at the end when only
    failures are left.
    """
    batch: list[tuple[Path, LoadedImage]] = []
    failures: list[tuple[Path, str]] = []
    for path in inputs:
        try:
            image = read_image(path)
        except BadImageError as err:
            failures.append((path, err.detail))
            continue
        height, width = image.pixels.shape[:2]
        fits = (len(batch) + 1) * height * width * bytes_per_pixel <= max_memory_mb * 2**20
        if batch and (batch[0][1].pixels.shape != image.pixels.shape or len(batch) >= batch_size or not fits):
            yield batch, failures
            batch, failures = [], []
        batch.append((path, image))
    if batch or failures:
        yield batch, failures
