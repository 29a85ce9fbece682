"""`semi-llie quickstart`: the overrides it passes to training, its refusals, and one real end-to-end run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from semi_llie.config import load_config
from semi_llie.errors import UserError
from semi_llie.quickstart import DEFAULT_CONFIG, QuickstartLayout, main, train_overrides


def _args(tmp_path: Path, **changes) -> argparse.Namespace:
    values = {"out": tmp_path / "qs", "steps": 12, "seed": 3, "config": DEFAULT_CONFIG} | changes
    return argparse.Namespace(**values)


def test_train_overrides_fit_the_config_schema_and_the_step_budget(tmp_path):
    layout = QuickstartLayout(tmp_path)
    cfg = load_config(DEFAULT_CONFIG, train_overrides(layout, _args(tmp_path)))
    assert cfg.train.max_steps == 12
    assert cfg.optim.milestones == [9, 10]  # 75 % and 90 % of the schedule
    assert cfg.train.validate_every == 6
    assert cfg.data.shards == str(layout.shards) and cfg.train.output_dir == str(layout.run)
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert cfg.data.seed == 3
    tiny = load_config(DEFAULT_CONFIG, train_overrides(layout, _args(tmp_path, steps=2)))
    assert tiny.optim.milestones == [] and tiny.train.validate_every == 1


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "qs").mkdir()
    (tmp_path / "qs" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        main(_args(tmp_path))


def test_refuses_zero_steps(tmp_path):
    with pytest.raises(UserError, match="--steps"):
        main(_args(tmp_path, steps=0))


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    completed = run_cli(
        "quickstart", "--out", str(out), "--steps", "2", "--seed", "1", cwd=tmp_path, timeout=900
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in completed.stdout

    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["labeled"]["samples"] == 24 and manifest["splits"]["val"]["samples"] == 6
    step_dir = out / "run" / "checkpoints" / (out / "run" / "checkpoints" / "latest").read_text().strip()
    assert (step_dir / "teacher.pt").is_file() and (step_dir / "student.pt").is_file()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["champion"]["model_uri"] == "models:/semi-llie-teacher@champion"
    import mlflow

    store = f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version_by_alias("semi-llie-teacher", "champion")
    assert str(version.version) == summary["champion"]["version"]

    evaluation = json.loads((out / "eval" / "summary.json").read_text())
    assert evaluation["num_images"] == 6
    assert evaluation["metrics"]["psnr"] == pytest.approx(summary["val_psnr"]["semi-llie"])
    assert set(summary["val_psnr"]) == {"semi-llie", "input", "gamma", "histeq"}
    assert summary["val_psnr"]["gamma"] > summary["val_psnr"]["input"]  # the synthetic inputs are dark

    assert len(list((out / "enhanced").iterdir())) == 6
    grid = Image.open(out / "before_after.png")
    assert grid.width > grid.height  # 5 columns (input, gamma, hist. eq., Semi-LLIE, GT) by 4 rows
