"""benchmarks/gpu_check.sh is run only when a GPU is lent: its CPU dry run keeps it from rotting meanwhile."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import PROJECT, cli_env


@pytest.mark.slow
def test_gpu_check_dry_run_measures_every_section(tmp_path):
    env = cli_env(OUT=str(tmp_path))
    env["PATH"] = f"{PROJECT / '.venv' / 'bin'}:{os.environ['PATH']}"
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"],
        cwd=PROJECT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run" and report["device"] == "cpu"
    for section in ("scan", "train_step", "inference", "ddp"):
        assert "error" not in report[section], report[section]
    assert report["scan"]["torch/L=256"]["seconds"] > 0
    assert set(report["train_step"]) >= {"fp32", "bf16"}
    assert report["train_step"]["fp32"]["images_per_s"] > 0
    assert report["inference"]["60x40"]["seconds"] > 0 and report["ddp"]["backend"] == "gloo"
