"""`semi-llie evaluate` on pairs, unpaired folders and shards, with an identity model scored independently."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_helpers import make_dataset, smooth_image
from test_enhance import identity_mambalowlight, psnr_numpy, write_checkpoint

from semi_llie import cli


def _pairs(root: Path, count: int = 3) -> tuple[Path, Path]:
    low, high = root / "low", root / "high"
    low.mkdir(parents=True)
    high.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        clean = smooth_image(index, size=(40, 32))
        dark = np.clip(clean * 0.3 + rng.normal(0, 3, clean.shape), 0, 255).astype(np.uint8)
        Image.fromarray(dark).save(low / f"p{index}.png")
        Image.fromarray(clean).save(high / f"p{index}.png")
    return low, high


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as stream:
        return list(csv.DictReader(stream))


@pytest.fixture
def identity_checkpoint(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "run" / "checkpoints" / "step-2", identity_mambalowlight())


def test_identity_model_scores_match_numpy_psnr(tmp_path: Path, identity_checkpoint: Path, capsys) -> None:
    low, high = _pairs(tmp_path / "data")
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--pairs",
        str(low),
        str(high),
        "--out",
        str(out),
        "--checkpoint",
        str(identity_checkpoint),
    ]
    assert cli.main([*args, "--device", "cpu", "--save-images"]) == 0

    rows = _rows(out / "per_image.csv")
    assert [row["key"] for row in rows] == ["p0", "p1", "p2"]
    for row in rows:
        dark = np.asarray(Image.open(low / f"{row['key']}.png")) / 255.0
        clean = np.asarray(Image.open(high / f"{row['key']}.png")) / 255.0
        assert float(row["psnr"]) == pytest.approx(psnr_numpy(dark, clean), abs=1e-3)
        assert float(row["psnr_gtmean"]) > float(row["psnr"])  # brightness matched: much closer
        assert 0 < float(row["ssim"]) < 1 and 0 < float(row["ssim_y"]) < 1
        saved = np.asarray(Image.open(out / "images" / f"{row['key']}.png"))
        np.testing.assert_array_equal(saved, np.asarray(Image.open(low / f"{row['key']}.png")))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 3 and summary["data"]["kind"] == "pairs"
    assert summary["metrics"]["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]))
    assert summary["metric_settings"]["full_reference"]["crop_border"] == 0
    assert "pyiqa" in summary["metric_settings"]["full_reference"]["libraries"]
    assert str(identity_checkpoint) in summary["model"]
    assert "psnr_gtmean" in capsys.readouterr().out


def test_unpaired_mode_uses_no_reference_metrics_only(tmp_path: Path, identity_checkpoint: Path) -> None:
    low, _ = _pairs(tmp_path / "data", count=2)
    (low / "desktop.ini").write_text("[.ShellClassInfo]\n")  # a stray non-image file is left out
    out = tmp_path / "eval"
    args = ["evaluate", "--unpaired", str(low), "--out", str(out), "--checkpoint", str(identity_checkpoint)]
    assert cli.main([*args, "--device", "cpu"]) == 0
    rows = _rows(out / "per_image.csv")
    assert len(rows) == 2 and "piqe" in rows[0] and "psnr" not in rows[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == {"kind": "unpaired", "location": str(low), "paired": False}
    assert summary["metric_settings"]["full_reference"] is None
    assert summary["lower_better"]["piqe"] is True


def test_unmatched_pairs_are_an_error(tmp_path: Path, identity_checkpoint: Path, capsys) -> None:
    low, high = _pairs(tmp_path / "data")
    (high / "p1.png").unlink()
    args = ["evaluate", "--pairs", str(low), str(high), "--out", str(tmp_path / "e"), "--checkpoint"]
    assert cli.main([*args, str(identity_checkpoint)]) == 2
    assert "'p1'" in capsys.readouterr().err


@pytest.mark.slow
def test_shards_split_and_mlflow_logging(tmp_path: Path, identity_checkpoint: Path) -> None:
    import mlflow

    data = make_dataset(tmp_path / "data", n_lol=0, n_synthetic=6, n_unlabeled=0)
    shards = tmp_path / "shards"
    build = ["shards", "build", "--pairs", str(data["low"]), str(data["high"]), "--out", str(shards)]
    assert cli.main([*build, "--val-fraction", "0.25", "--test-fraction", "0.25"]) == 0
    test_samples = json.loads((shards / "manifest.json").read_text())
    expected = sum(s["samples"] for s in test_samples["shards"] if s["split"] == "test")

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "eval"
    args = ["evaluate", "--data", str(shards), "--split", "test", "--out", str(out)]
    args += ["--checkpoint", str(identity_checkpoint.parents[1]), "--device", "cpu"]
    assert cli.main([*args, "--tracking-uri", store, "--mlflow-experiment", "eval-test"]) == 0

    rows = _rows(out / "per_image.csv")
    assert len(rows) == expected > 0
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id])
    summary = json.loads((out / "summary.json").read_text())
    assert run.data.metrics["eval/test/psnr"] == pytest.approx(summary["metrics"]["psnr"])
    assert summary["data"]["split"] == "test"
