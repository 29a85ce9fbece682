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

import torch
from torch import Tensor
from tqdm import tqdm

from semi_llie.data.images import BadImageError, is_image_file, read_image, write_image
from semi_llie.data.problems import SkippableInputError
from semi_llie.data.sources import images_by_stem, pairs_by_stem
from semi_llie.errors import UserError
from semi_llie.fileio import atomic_write, write_text_atomic
from semi_llie.inference.cli_args import add_model_arguments, model_from_args
from semi_llie.inference.tiling import TilePlan, activation_bytes_per_pixel, enhance_image
from semi_llie.metrics.evaluation import EvalSample, means, metric_names, samples_of, score_split
from semi_llie.metrics.full_reference import FullReferenceMetrics
from semi_llie.metrics.pyiqa_metrics import PyiqaMetrics
from semi_llie.metrics.table import lower_is_better
from semi_llie.models.enhancer import Enhancer

PER_IMAGE_CSV = "per_image.csv"
SUMMARY_JSON = "summary.json"


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
    learned = PyiqaMetrics(device=args.device)
    for line in learned.skipped.values():
        print(line, file=sys.stderr)
    plan_options = {"max_memory_mb": args.max_memory, "tile": args.tile, "overlap": args.overlap}
    images_dir = args.out / "images" if args.save_images else None

    def metrics(output: Tensor, high: Tensor | None) -> dict[str, float]:
        scores = full_reference(output, high) if full_reference is not None and high is not None else {}
        return scores | learned(output, high)

    sizes: dict[str, tuple[int, int]] = {}

    def save(_: str, sample: EvalSample, output: Tensor) -> None:
        sizes[sample.key] = tuple(sample.low.shape[-2:])
        if images_dir is not None:
            path = images_dir / f"{sample.key}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_image(path, output[0].permute(1, 2, 0).cpu().numpy())

    samples = tqdm(source.samples, total=source.count, desc="evaluate", unit="img", disable=None)
    enhance = model_enhancer(enhancer, plan_options, args.device)
    per_image = score_split(samples, {"model": enhance}, metrics, save)["model"]
    if not per_image:
        raise UserError(
            f"{source.description['location']} holds no images to evaluate; check the data options"
        )
    mean_scores = means(per_image)
    summary = {
        "model": model_source,
        "data": source.description,
        "num_images": len(per_image),
        "metrics": mean_scores,
        "lower_better": {name: lower_is_better(name) for name in mean_scores},
        "metric_settings": {
            "full_reference": full_reference.settings if full_reference else None,
            "weighted": learned.settings,
        },
        "inference": {"device": str(args.device), "resolution": "full (tiles blended if over budget)"}
        | plan_options,
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_per_image_csv(args.out / PER_IMAGE_CSV, per_image, sizes)
    write_text_atomic(args.out / SUMMARY_JSON, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if args.mlflow_run_id or args.mlflow_experiment:
        run_id = log_to_mlflow(args, summary, metric_prefix(source.description))
        print(f"logged to MLflow run {run_id}")
    print(summary_table(mean_scores, len(per_image), model_source))
    print(f"wrote {args.out / PER_IMAGE_CSV} and {args.out / SUMMARY_JSON}")
    return 0


def model_enhancer(enhancer: Enhancer, plan_options: dict[str, Any], device: str | torch.device):
    """The evaluation loop's view of a model: a sample enhanced at full resolution, tiled if over budget."""
    bytes_per_pixel = activation_bytes_per_pixel(enhancer)

    def enhance(sample: EvalSample) -> Tensor:
        height, width = sample.low.shape[-2:]
        plan = TilePlan.for_image(height, width, bytes_per_pixel, **plan_options)
        illum = sample.illum.to(device) if sample.illum is not None and enhancer.needs_illumination else None
        return enhance_image(enhancer, sample.low.to(device), plan, illum)  # 1×3×H×W

    return enhance


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

    samples = samples_of(eval_loader(manifest, split, subset=subset), paired)

    description = {
        "kind": "shards",
        "location": str(location),
        "split": split,
        "subset": subset,
        "paired": paired,
    }
    return DataSource(description, manifest.num_samples(split, subset), samples)


def pair_source(low_dir: Path, high_dir: Path) -> DataSource:
    pairs = pairs_by_stem(low_dir, high_dir, on_problem=refuse_unpaired)

    def samples() -> Iterator[EvalSample]:
        for stem, low_path, high_path in pairs:
            low, high = load_tensor(low_path), load_tensor(high_path)
            if low.shape != high.shape:
                raise UserError(
                    f"{low_path} is {tuple(low.shape[-2:])} but {high_path} is {tuple(high.shape[-2:])}; "
                    "a pair must have one size"
                )
            yield EvalSample(stem, low, high)

    description = {
        "kind": "pairs",
        "location": f"{low_dir} {high_dir}",
        "low": str(low_dir),
        "high": str(high_dir),
    }
    return DataSource(description | {"paired": True}, len(pairs), samples())


def refuse_unpaired(problem: SkippableInputError) -> None:
    """Files that are not images are left out; an image without its partner stops the evaluation."""
    if not is_image_file(Path(problem.paths[0])):
        return
    raise UserError(f"{problem.reason}; pair every file by stem (evaluation never skips an image)")


def unpaired_source(folder: Path) -> DataSource:
    files = images_by_stem(folder, on_problem=refuse_unpaired)

    def samples() -> Iterator[EvalSample]:
        for stem, path in files.items():
            yield EvalSample(stem, load_tensor(path), None)

    return DataSource({"kind": "unpaired", "location": str(folder), "paired": False}, len(files), samples())


def load_tensor(path: Path) -> Tensor:
    """Image file -> 1×3×H×W float32 in [0, 1]; an unreadable file is an error, never skipped."""
    try:
        pixels = read_image(path).to_float()
    except BadImageError as err:
        raise UserError(f"{path}: {err.detail}; remove or replace it") from err
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def write_per_image_csv(
    path: Path, per_image: dict[str, dict[str, float]], sizes: dict[str, tuple[int, int]]
) -> None:
    with atomic_write(path, "w") as stream:
        writer = csv.DictWriter(stream, fieldnames=["key", "height", "width", *metric_names(per_image)])
        writer.writeheader()
        for key, row in per_image.items():
            writer.writerow({"key": key, "height": sizes[key][0], "width": sizes[key][1], **row})


def summary_table(means: dict[str, float], count: int, model_source: str) -> str:
    lines = [f"{model_source}: {count} image(s)", f"{'metric':<14}{'mean':>12}  better"]
    for name, value in means.items():
        shown = f"{value:.4f}" if math.isfinite(value) else str(value)
        lines.append(f"{name:<14}{shown:>12}  {'lower' if lower_is_better(name) else 'higher'}")
    return "\n".join(lines)


def metric_prefix(description: dict[str, Any]) -> str:
    """MLflow metric prefix, e.g. eval/test/psnr for shards, eval/pairs/psnr for folders."""
    return (
        f"eval/{description['split']}" if description["kind"] == "shards" else f"eval/{description['kind']}"
    )


def log_to_mlflow(args: argparse.Namespace, summary: dict[str, Any], prefix: str) -> str:
    from mlflow.exceptions import MlflowException

    import mlflow
    from semi_llie.engine.tracking import artifact_location, resolve_tracking_uri

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
