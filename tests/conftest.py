"""Fixtures shared by the end-to-end tests: tiny shards built through the real CLI, and a way to run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
TINY_CONFIG = PROJECT / "configs" / "tiny_test.yaml"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Shards of a synthetic 48 px dataset: 8 labeled (2 shards), 8 unlabeled (2 shards), 2 val.

    Two shards per training split so that two ranks read disjoint shards, as on a cluster.
    """
    from semi_llie.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("tiny-dataset")
    make_dataset(root / "images", n_labeled=8, n_unlabeled=8, n_val=2, size=48)
    out = root / "shards"
    result = run_cli(
        "shards",
        "build",
        "--root",
        str(root / "images"),
        "--out",
        str(out),
        "--crop-size",
        "32",
        "--max-count",
        "4",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr
    return out


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a child training process: CPU only, one thread, no stray tracking server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 240, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "semi_llie", *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
