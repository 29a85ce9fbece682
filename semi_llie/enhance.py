"""`semi-llie enhance INPUT... --out DIR`: enhance files, folders or globs with a trained model.

Any size, never resized: images are padded only if the model needs it, and images whose activations would
not fit `--max-memory` run in overlapping tiles blended smoothly (semi_llie.tiling). EXIF orientation is
applied, grayscale and 16-bit inputs are read at full precision (16-bit PNG/TIFF inputs give 16-bit outputs).
Files that cannot be read are reported at the end and make the exit status non-zero; the others are written.
Inputs are never overwritten.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from semi_llie.errors import UserError
from semi_llie.modelio import Enhancer, load_enhancer
from semi_llie.tiling import (
    DEFAULT_MAX_MEMORY_MB,
    DEFAULT_OVERLAP,
    TilePlan,
    activation_bytes_per_pixel,
    enhance_image,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_SUFFIXES = (".png", ".tif", ".tiff")
JPEG_QUALITY = 95
EXIF_ORIENTATION = 0x0112


class UnreadableImageError(Exception):
    """An input file that is not a decodable image; reported and skipped, never fatal for the others."""


@dataclass
class LoadedImage:
    pixels: np.ndarray  # H×W×3 float32 RGB in [0, 1], upright
    bit_depth: int  # 8 or 16: the precision of the source


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options shared by `enhance` and `evaluate`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", type=Path, help="checkpoint step dir or training OUTPUT_DIR (its latest)"
    )
    source.add_argument("--model-uri", help="MLflow model URI, e.g. models:/semi-llie-teacher@champion")
    parser.add_argument(
        "--which", choices=("teacher", "student"), default="teacher", help="model of a checkpoint"
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow store for --model-uri (default: $MLFLOW_TRACKING_URI or sqlite)"
    )
    parser.add_argument("--device", default=default_device(), help="torch device (default: %(default)s)")
    parser.add_argument(
        "--tile", type=int, help="tile side in pixels for images larger than it (default: automatic)"
    )
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="tile overlap in pixels")
    parser.add_argument(
        "--max-memory",
        type=float,
        default=DEFAULT_MAX_MEMORY_MB,
        help="activation memory budget in MB; larger images are tiled automatically (default: %(default)s)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    add_model_arguments(parser)
    parser.add_argument("--suffix", default="", help="appended to each output file's stem, e.g. _enhanced")
    parser.add_argument(
        "--format", choices=("same", "png", "jpg", "tif", "webp"), default="same", help="output file format"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images of one size enhanced together")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_from_args(args: argparse.Namespace) -> tuple[Enhancer, str]:
    """The Enhancer the arguments name, and a description of its source for reports."""
    source = args.model_uri or str(args.checkpoint)
    enhancer = load_enhancer(source, which=args.which, device=args.device, tracking_uri=args.tracking_uri)
    return enhancer, source if args.model_uri else f"{source} ({args.which})"


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
        x = torch.from_numpy(np.stack([image.pixels for _, image in batch])).permute(0, 3, 1, 2)  # B×3×H×W
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
        except UnreadableImageError as err:
            failures.append((path, str(err)))
            continue
        height, width = image.pixels.shape[:2]
        fits = (len(batch) + 1) * height * width * bytes_per_pixel <= max_memory_mb * 2**20
        if batch and (batch[0][1].pixels.shape != image.pixels.shape or len(batch) >= batch_size or not fits):
            yield batch, failures
            batch, failures = [], []
        batch.append((path, image))
    if batch or failures:
        yield batch, failures


def read_image(path: Path) -> LoadedImage:
    """Decode `path` to an upright H×W×3 float32 RGB array in [0, 1], keeping 16-bit precision."""
    # OpenCV decodes 16-bit colour PNG/TIFF, which Pillow truncates to 8 bits; with IMREAD_UNCHANGED it leaves
    # the EXIF orientation alone, which we apply from the tag Pillow reads.
    data = np.fromfile(path, dtype=np.uint8)
    pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if pixels is None:
        raise UnreadableImageError("not a readable image (empty, truncated or an unsupported format)")
    if pixels.dtype == np.uint8:
        bit_depth, scaled = 8, pixels.astype(np.float32) / 255.0
    elif pixels.dtype == np.uint16:
        bit_depth, scaled = 16, pixels.astype(np.float32) / 65535.0
    else:
        raise UnreadableImageError(f"unsupported sample type {pixels.dtype}; convert it to 8 or 16 bits")
    if scaled.ndim == 2:
        rgb = np.repeat(scaled[:, :, None], 3, axis=2)
    elif scaled.shape[2] == 1:
        rgb = np.repeat(scaled, 3, axis=2)
    else:
        rgb = scaled[:, :, 2::-1]  # BGR(A) -> RGB, alpha dropped: the model enhances the photo underneath
    return LoadedImage(np.ascontiguousarray(apply_exif_orientation(rgb, exif_orientation(path))), bit_depth)


def exif_orientation(path: Path) -> int:
    try:
        with Image.open(path) as image:
            return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except (UnidentifiedImageError, OSError, ValueError):
        return 1  # decodable by OpenCV but not Pillow (or no EXIF): nothing to rotate


def apply_exif_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """H×W×C as stored -> upright, for EXIF orientations 1-8 (as Pillow's ImageOps.exif_transpose)."""
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }
    return transforms[orientation](pixels) if orientation in transforms else pixels


def write_image(path: Path, pixels: np.ndarray, bit_depth: int = 8) -> None:
    """H×W×3 float RGB in [0, 1] -> `path` (format from its suffix), atomically; 16-bit where it can be."""
    depth = 16 if bit_depth == 16 and path.suffix.lower() in SIXTEEN_BIT_SUFFIXES else 8
    top = 65535.0 if depth == 16 else 255.0
    values = np.round(np.clip(pixels, 0.0, 1.0) * top).astype(np.uint16 if depth == 16 else np.uint8)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if path.suffix.lower() in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(path.suffix, np.ascontiguousarray(values[:, :, ::-1]), params)
    if not ok:
        raise UserError(f"cannot encode {path} as {path.suffix}; choose another --format")
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(encoded.tobytes())
    os.replace(partial, path)
