"""The model options shared by `semi-llie enhance` and `semi-llie evaluate`, and the model they name."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from semi_llie.inference.loading import load_enhancer
from semi_llie.inference.tiling import DEFAULT_MAX_MEMORY_MB, DEFAULT_OVERLAP
from semi_llie.models.enhancer import Enhancer


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


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_from_args(args: argparse.Namespace) -> tuple[Enhancer, str]:
    """The Enhancer the arguments name, and a description of its source for reports."""
    source = args.model_uri or str(args.checkpoint)
    enhancer = load_enhancer(source, which=args.which, device=args.device, tracking_uri=args.tracking_uri)
    return enhancer, source if args.model_uri else f"{source} ({args.which})"
