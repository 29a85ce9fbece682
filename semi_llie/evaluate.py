"""`semi-llie evaluate`: score a checkpoint or a registered model at full resolution (METHOD §8).

Data: a shard folder's val/test split (`--data DIR --split test`), a pair of folders matched by file stem
(`--pairs LOW HIGH`), or a folder without ground truth (`--unpaired DIR`, no-reference metrics only).
Writes OUT/per_image.csv, OUT/summary.json (means, metric settings, model and data sources), optionally the
enhanced images (OUT/images/) and the metrics to an MLflow run; prints a summary table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from semi_llie.enhance import (
    IMAGE_SUFFIXES,
    UnreadableImageError,
    add_model_arguments,
    model_from_args,
    read_image,
    write_image,
)
from semi_llie.errors import UserError
from semi_llie.metrics import WEIGHTED_METRICS, FullReferenceMetrics, WeightedMetrics
from semi_llie.modelio import Enhancer
from semi_llie.tiling import TilePlan, activation_bytes_per_pixel, enhance_image

PER_IMAGE_CSV = "per_image.csv"
SUMMARY_JSON = "summary.json"


@dataclass
class EvalSample:
    key: str
    low: Tensor  # 1×3×H×W in [0, 1]
    high: Tensor | None  # 1×3×H×W, None without ground truth
    illum: Tensor | None = None  # 1×3×H×W precomputed map from the shards, None elsewhere


@dataclass
class DataSource:
    description: dict[str, Any]  # stored in summary.json
    count: int
    samples: Iterator[EvalSample]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="shard folder or URL (with --split)")
    data.add_argument("--pairs", nargs=2, type=Path, metavar=("LOW", "HIGH"), help="folders matched by stem")
    data.add_argument("--unpaired", type=Path, metavar="DIR", help="folder without ground truth")
    parser.add_argument(
        "--split", choices=("val", "test"), default="test", help="shard split (default: test)"
    )
    parser.add_argument("--subset", help="test set name inside the test split (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="folder for per_image.csv and summary.json")
    add_model_arguments(parser)
    parser.add_argument("--save-images", action="store_true", help="also write the enhanced images")
    parser.add_argument(
        "--crop-border", type=int, default=0, help="pixels ignored at each border by PSNR/SSIM"
    )
    mlflow_target = parser.add_mutually_exclusive_group()
    mlflow_target.add_argument("--mlflow-run-id", help="log the metrics and reports into this MLflow run")
    mlflow_target.add_argument("--mlflow-experiment", help="log them into a new run of this experiment")


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    source = open_data(args)
    enhancer, model_source = model_from_args(args)
    full_reference = (
        FullReferenceMetrics(crop_border=args.crop_border) if source.description["paired"] else None
    )
    weighted = WeightedMetrics(device=args.device)
    for line in weighted.skipped.values():
        print(line, file=sys.stderr)
    images_dir = args.out / "images" if args.save_images else None
    plan_options = {"max_memory_mb": args.max_memory, "tile": args.tile, "overlap": args.overlap}
    rows = []
    for sample in tqdm(source.samples, total=source.count, desc="evaluate", unit="img", disable=None):
        rows.append(
            score_sample(enhancer, sample, full_reference, weighted, plan_options, args.device, images_dir)
        )
    if not rows:
        raise UserError(
            f"{source.description['location']} holds no images to evaluate; check the data options"
        )
    means = mean_metrics(rows)
    summary = {
        "model": model_source,
        "data": source.description,
        "num_images": len(rows),
        "metrics": means,
        "lower_better": {name: lower_better(name) for name in means},
        "metric_settings": {
            "full_reference": full_reference.settings if full_reference else None,
            "weighted": weighted.settings,
        },
        "inference": {"device": str(args.device), "resolution": "full (tiles blended if over budget)"}
        | plan_options,
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_per_image_csv(args.out / PER_IMAGE_CSV, rows)
    (args.out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if args.mlflow_run_id or args.mlflow_experiment:
        run_id = log_to_mlflow(args, summary, metric_prefix(source.description))
        print(f"logged to MLflow run {run_id}")
    print(summary_table(means, len(rows), model_source))
    print(f"wrote {args.out / PER_IMAGE_CSV} and {args.out / SUMMARY_JSON}")
    return 0


def open_data(args: argparse.Namespace) -> DataSource:
    if args.data:
        return shard_source(args.data, args.split, args.subset)
    if args.pairs:
        return pair_source(*args.pairs)
    return unpaired_source(args.unpaired)


def shard_source(location: str, split: str, subset: str | None) -> DataSource:
    from semi_llie.data import Manifest, eval_loader

    manifest = Manifest.open(location)
    shards = manifest.shards_of(split, subset)
    paired = bool(shards) and all(shard.has_high for shard in shards)

    def samples() -> Iterator[EvalSample]:
        for batch in eval_loader(manifest, split, subset=subset):
            high = batch.get("high") if paired else None
            yield EvalSample(batch["key"][0], batch["low"], high, batch.get("illum"))

    description = {
        "kind": "shards",
        "location": str(location),
        "split": split,
        "subset": subset,
        "paired": paired,
    }
    return DataSource(description, manifest.num_samples(split, subset), samples())


def pair_source(low_dir: Path, high_dir: Path) -> DataSource:
    lows, highs = image_files(low_dir), image_files(high_dir)
    missing_high, missing_low = sorted(set(lows) - set(highs)), sorted(set(highs) - set(lows))
    if missing_high or missing_low:
        example = (missing_high or missing_low)[0]
        raise UserError(
            f"--pairs {low_dir} {high_dir}: {len(missing_high)} low image(s) without a high one and "
            f"{len(missing_low)} high image(s) without a low one (e.g. {example!r}); pair every file by stem"
        )
    stems = sorted(lows)

    def samples() -> Iterator[EvalSample]:
        for stem in stems:
            low, high = load_tensor(lows[stem]), load_tensor(highs[stem])
            if low.shape != high.shape:
                raise UserError(
                    f"{lows[stem]} is {tuple(low.shape[-2:])} but {highs[stem]} is {tuple(high.shape[-2:])}; "
                    "a pair must have one size"
                )
            yield EvalSample(stem, low, high)

    description = {
        "kind": "pairs",
        "location": f"{low_dir} {high_dir}",
        "low": str(low_dir),
        "high": str(high_dir),
    }
    return DataSource(description | {"paired": True}, len(stems), samples())


def unpaired_source(folder: Path) -> DataSource:
    files = image_files(folder)
    stems = sorted(files)

    def samples() -> Iterator[EvalSample]:
        for stem in stems:
            yield EvalSample(stem, load_tensor(files[stem]), None)

    return DataSource({"kind": "unpaired", "location": str(folder), "paired": False}, len(stems), samples())


def image_files(folder: Path) -> dict[str, Path]:
    """stem -> image file of `folder`; two files with one stem are ambiguous and refused."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass a folder of images")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in files:
                raise UserError(
                    f"{files[path.stem]} and {path} share the stem {path.stem!r}; keep one of them"
                )
            files[path.stem] = path
    return files


def load_tensor(path: Path) -> Tensor:
    """Image file -> 1×3×H×W float32 in [0, 1]; an unreadable file is an error, never skipped."""
    try:
        pixels = read_image(path).pixels
    except UnreadableImageError as err:
        raise UserError(f"{path}: {err}; remove or replace it") from err
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def score_sample(
    enhancer: Enhancer,
    sample: EvalSample,
    full_reference: FullReferenceMetrics | None,
    weighted: WeightedMetrics,
    plan_options: dict[str, Any],
    device: str | torch.device,
    images_dir: Path | None,
) -> dict[str, Any]:
    """Enhance one sample at full resolution and score it -> one CSV row."""
    height, width = sample.low.shape[-2:]
    plan = TilePlan.for_image(height, width, activation_bytes_per_pixel(enhancer), **plan_options)
    illum = sample.illum.to(device) if sample.illum is not None and enhancer.needs_illumination else None
    output = enhance_image(enhancer, sample.low.to(device), plan, illum).float()  # 1×3×H×W
    high = sample.high.to(output.device) if sample.high is not None else None
    row: dict[str, Any] = {"key": sample.key, "height": height, "width": width}
    if full_reference is not None and high is not None:
        row |= full_reference(output, high)
    row |= weighted(output, high)
    if images_dir is not None:
        images_dir.mkdir(parents=True, exist_ok=True)
        write_image(images_dir / f"{sample.key}.png", output[0].permute(1, 2, 0).cpu().numpy())
    return row


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(k for k in row if k not in ("key", "height", "width")))
    return list(names)


def mean_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {name: float(np.mean([row[name] for row in rows if name in row])) for name in metric_names(rows)}


def lower_better(name: str) -> bool:
    return name in WEIGHTED_METRICS and WEIGHTED_METRICS[name].lower_better


def write_per_image_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["key", "height", "width", *metric_names(rows)])
        writer.writeheader()
        writer.writerows(rows)


def summary_table(means: dict[str, float], count: int, model_source: str) -> str:
    lines = [f"{model_source}: {count} image(s)", f"{'metric':<14}{'mean':>12}  better"]
    for name, value in means.items():
        shown = f"{value:.4f}" if math.isfinite(value) else str(value)
        lines.append(f"{name:<14}{shown:>12}  {'lower' if lower_better(name) else 'higher'}")
    return "\n".join(lines)


def metric_prefix(description: dict[str, Any]) -> str:
    """MLflow metric prefix, e.g. eval/test/psnr for shards, eval/pairs/psnr for folders."""
    return (
        f"eval/{description['split']}" if description["kind"] == "shards" else f"eval/{description['kind']}"
    )


def log_to_mlflow(args: argparse.Namespace, summary: dict[str, Any], prefix: str) -> str:
    from mlflow.exceptions import MlflowException

    import mlflow
    from semi_llie.tracking import artifact_location, resolve_tracking_uri

    store = resolve_tracking_uri(args.tracking_uri)
    client = mlflow.MlflowClient(store)
    try:
        run_id = args.mlflow_run_id
        if run_id is None:
            experiment = client.get_experiment_by_name(args.mlflow_experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment
                else client.create_experiment(args.mlflow_experiment, artifact_location(store))
            )
            run = client.create_run(experiment_id, run_name=f"evaluate {summary['data']['kind']}")
            run_id = run.info.run_id
            client.log_param(run_id, "model", summary["model"])
            client.log_param(run_id, "data", summary["data"]["location"])
        timestamp = int(time.time() * 1000)
        metrics = [
            mlflow.entities.Metric(f"{prefix}/{name}", value, timestamp, 0)
            for name, value in summary["metrics"].items()
        ]
        client.log_batch(run_id, metrics=metrics)
        for name in (PER_IMAGE_CSV, SUMMARY_JSON):
            client.log_artifact(run_id, str(args.out / name), artifact_path=prefix)
        if args.mlflow_experiment:
            client.set_terminated(run_id)
    except MlflowException as err:
        raise UserError(f"cannot log to the MLflow store {store}: {err.message}") from err
    return run_id
