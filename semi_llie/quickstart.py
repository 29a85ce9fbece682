"""`semi-llie quickstart`: the whole job on a tiny synthetic dataset, on CPU, in minutes.

Stages, each the same command a user would run on real data (the summary lists them):

1. synthesise a low-light dataset from scikit-image's bundled photos   (semi_llie.data.synthetic)
2. pack it into WebDataset shards                                     (semi-llie shards build)
3. train configs/quickstart.yaml with every part of the method on      (semi-llie train, in a subprocess)
4. evaluate the registered champion on the val split                  (semi-llie evaluate --model-uri ...)
5. score the classic baselines on the same split                       (semi_llie.inference.classic)
6. enhance the val inputs with the champion                            (semi-llie enhance --model-uri ...)
7. draw a before/after grid, write summary.json, print where everything is

Everything lands in `--out` (default ./quickstart-out), MLflow included: the tracking store is
`OUT/mlruns/mlflow.db` with artifacts under `OUT/mlruns/`, so a quickstart never writes into another
project's store; open it with `mlflow ui --backend-store-uri sqlite:///ABS/OUT/mlruns/mlflow.db`.

Training runs as `python -m semi_llie train` in a subprocess, exactly as a user launches it (its own
Accelerate state, seeds and MLflow run), with its working directory in OUT so relative paths stay there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semi_llie.data.images import read_image
from semi_llie.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
DEFAULT_STEPS = 80
GRID_ROWS = 4
# The synthetic set: small images so CPU training, validation and bank scoring stay fast.
IMAGE_SIZE = 128
COUNTS = {"n_labeled": 24, "n_unlabeled": 24, "n_val": 6}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("quickstart-out"), help="output folder (new or empty)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help="training steps (default: %(default)s; CI uses fewer)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data, split and training")
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="training config (default: configs/quickstart.yaml)",
    )


def main(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if not args.config.is_file():
        raise UserError(
            f"training config {args.config} does not exist; run from a source checkout or pass --config"
        )
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} is not empty; remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    layout = QuickstartLayout(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    commands: dict[str, list[str]] = {}

    def stage(name: str, work: Callable[[], Any]) -> Any:
        print(f"\n== quickstart: {name} ==", flush=True)
        begin = time.perf_counter()
        result = work()
        timings[name] = round(time.perf_counter() - begin, 1)
        return result

    from semi_llie.config import load_config
    from semi_llie.data.synthetic import make_dataset

    config = load_config(args.config)
    model_uri = f"models:/{config.tracking.registered_model_name}@{config.tracking.alias}"

    stage("synthesise", lambda: make_dataset(layout.data, seed=args.seed, size=IMAGE_SIZE, **COUNTS))
    commands["shards"] = [
        "shards", "build", "--root", str(layout.data), "--out", str(layout.shards),
        "--crop-size", str(config.data.crop_size), "--seed", str(args.seed),
    ]  # fmt: skip
    stage("shards", lambda: _run_command(commands["shards"]))
    commands["train"] = ["train", "--config", str(args.config.resolve()), *train_overrides(layout, args)]
    stage("train", lambda: _train(commands["train"], layout))
    model_args = ["--model-uri", model_uri, "--tracking-uri", layout.tracking_uri, "--device", "cpu"]
    run_id = json.loads((layout.run / "run.json").read_text()).get("mlflow_run_id")
    commands["evaluate"] = [
        "evaluate", "--data", str(layout.shards), "--split", "val", "--out", str(layout.evaluation),
        *model_args, *(["--mlflow-run-id", run_id] if run_id else []),
    ]  # fmt: skip
    stage("evaluate", lambda: _run_command(commands["evaluate"]))
    baselines = stage("baselines", lambda: _score_baselines(layout))
    commands["enhance"] = [
        "enhance",
        str(layout.data / "val" / "input"),
        "--out",
        str(layout.enhanced),
        *model_args,
    ]
    stage("enhance", lambda: _run_command(commands["enhance"]))
    stage("grid", lambda: write_grid(layout))
    champion = champion_version(
        layout.tracking_uri, config.tracking.registered_model_name, config.tracking.alias
    )

    teacher = json.loads((layout.evaluation / "summary.json").read_text())["metrics"]
    summary = {
        "output_dir": str(out),
        "steps": args.steps,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - started, 1),
        "stage_seconds": timings,
        "val_psnr": {"semi-llie": teacher["psnr"], **{k: v["psnr"] for k, v in baselines.items()}},
        "val_ssim": {"semi-llie": teacher["ssim"], **{k: v["ssim"] for k, v in baselines.items()}},
        "champion": {"model_uri": model_uri, **champion},
        "paths": layout.paths(),
        "commands": {name: " ".join(["semi-llie", *argv]) for name, argv in commands.items()},
        "mlflow_ui": f"mlflow ui --backend-store-uri {layout.tracking_uri}",
    }
    layout.summary.write_text(json.dumps(summary, indent=2) + "\n")
    print(summary_text(summary))
    return 0


class QuickstartLayout:
    """Where each stage writes, all under one output folder."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.data = out / "data"  # synthetic --root layout
        self.shards = out / "shards"
        self.run = out / "run"  # training OUTPUT_DIR
        self.evaluation = out / "eval"  # summary.json, per_image.csv of the champion
        self.enhanced = out / "enhanced"
        self.grid = out / "before_after.png"
        self.baselines = out / "baselines.json"
        self.summary = out / "summary.json"
        self.tracking_db = out / "mlruns" / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.tracking_db}"

    def paths(self) -> dict[str, str]:
        names = ("data", "shards", "run", "evaluation", "enhanced", "grid", "baselines", "tracking_db")
        return {name: str(getattr(self, name)) for name in names}


def train_overrides(layout: QuickstartLayout, args: argparse.Namespace) -> list[str]:
    """Config overrides that point the run at the quickstart's data and store and fit it to `--steps`."""
    steps = args.steps
    overrides = [
        f"data.shards={layout.shards}",
        f"data.seed={args.seed}",
        f"train.output_dir={layout.run}",
        f"train.max_steps={steps}",
        # Validate (and register a champion) halfway and at the end; checkpoint at the same steps.
        f"train.validate_every={max(steps // 2, 1)}",
        f"train.checkpoint_every={max(steps // 2, 1)}",
        f"tracking.tracking_uri={layout.tracking_uri}",
        "tracking.run_name=quickstart",
    ]
    # The config's learning-rate milestones (75 % and 90 % of the run) scaled to --steps.
    milestones = [steps * 3 // 4, steps * 9 // 10] if steps >= 4 else []
    overrides.append(f"optim.milestones={milestones}")
    return overrides


def _run_command(argv: list[str]) -> None:
    """Run a `semi-llie` command in this process; a non-zero exit stops the quickstart."""
    from semi_llie.cli import main as cli_main

    code = cli_main(argv)
    if code:
        raise UserError(f"`semi-llie {argv[0]}` failed (exit {code}); see its message above")


def _train(argv: list[str], layout: QuickstartLayout) -> None:
    layout.tracking_db.parent.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        [sys.executable, "-m", "semi_llie", *argv], cwd=layout.out, env=os.environ.copy()
    )
    if completed.returncode:
        raise UserError(f"`semi-llie train` failed (exit {completed.returncode}); see its output above")


def _score_baselines(layout: QuickstartLayout) -> dict[str, dict[str, float]]:
    from semi_llie.inference.classic import score_baselines

    scores = score_baselines(layout.shards, "val")
    layout.baselines.write_text(json.dumps(scores, indent=2) + "\n")
    return {name: result["metrics"] for name, result in scores.items() if name != "settings"}


def write_grid(layout: QuickstartLayout, rows: int = GRID_ROWS) -> None:
    """before_after.png: per val image, input | gamma | hist. eq. | Semi-LLIE | ground truth."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from semi_llie.inference.classic import gamma_correction, histogram_equalization

    names = sorted(p.name for p in (layout.data / "val" / "input").iterdir())[:rows]
    titles = ("low-light input", "gamma correction", "histogram eq.", "Semi-LLIE (champion)", "ground truth")
    figure, axes = plt.subplots(
        len(names), len(titles), figsize=(2.2 * len(titles), 2.3 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        low = _read(layout.data / "val" / "input" / name)
        low_tensor = torch.from_numpy(low).permute(2, 0, 1)[None]  # 1×3×H×W
        panels = (
            low,
            gamma_correction(low_tensor)[0].permute(1, 2, 0).numpy(),
            histogram_equalization(low_tensor)[0].permute(1, 2, 0).numpy(),
            _read(_enhanced_path(layout.enhanced, name)),
            _read(layout.data / "val" / "GT" / name),
        )
        for column, (panel, title) in enumerate(zip(panels, titles, strict=True)):
            axis = axes[row][column]
            axis.imshow(np.clip(panel, 0.0, 1.0))
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(layout.grid, dpi=100)
    plt.close(figure)


def _enhanced_path(folder: Path, name: str) -> Path:
    matches = sorted(folder.glob(f"{Path(name).stem}*"))
    if not matches:
        raise UserError(f"`semi-llie enhance` wrote no output for {name} into {folder}")
    return matches[0]


def _read(path: Path) -> np.ndarray:
    """H×W×3 float32 in [0, 1]."""
    return read_image(path).to_float()


def champion_version(tracking_uri: str, model_name: str, alias: str) -> dict[str, str]:
    """The registered model version that holds `alias`; UserError if training registered none."""
    import mlflow

    try:
        # Name the registry explicitly: MlflowClient would otherwise use the global one (./mlflow.db).
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        version = client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException as err:
        raise UserError(
            f"no {model_name}@{alias} in {tracking_uri} ({err.message}); did training validate?"
        ) from None
    return {"name": model_name, "version": str(version.version), "run_id": version.run_id}


def summary_text(summary: dict[str, Any]) -> str:
    psnr, ssim, paths = summary["val_psnr"], summary["val_ssim"], summary["paths"]
    champion = summary["champion"]
    lines = [
        "",
        f"quickstart done in {summary['seconds']:.0f} s ({summary['steps']} training steps); "
        f"everything is in {summary['output_dir']}",
        "",
        "val split (synthetic, held-out photos)   PSNR (dB)   SSIM",
    ]
    for name in psnr:
        lines.append(f"  {name:38s} {psnr[name]:8.2f}   {ssim[name]:.3f}")
    baselines = {name: value for name, value in psnr.items() if name not in ("semi-llie", "input")}
    if baselines:
        best = max(baselines, key=baselines.get)
        margin = psnr["semi-llie"] - psnr[best]
        lines.append(f"  Semi-LLIE - best classic baseline ({best}): {margin:+.2f} dB")
    lines += [
        "",
        f"  champion     {champion['model_uri']} = version {champion['version']} (run {champion['run_id']})",
        f"  checkpoints  {paths['run']}/checkpoints/",
        f"  metrics      {paths['evaluation']}/summary.json, baselines in {paths['baselines']}",
        f"  enhanced     {paths['enhanced']}/",
        f"  grid         {paths['grid']}",
        f"  summary      {summary['output_dir']}/summary.json",
        "",
        "Browse the run, its metrics, validation grids and the registered model:",
        f"  {summary['mlflow_ui']}",
    ]
    return "\n".join(lines)
