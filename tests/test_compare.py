"""`semi-llie runs compare` over runs created in a temporary SQLite MLflow store."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from semi_llie import cli
from semi_llie.compare import RunSummary, group_runs, group_table, shown_params
from semi_llie.metrics.table import lower_is_better

CURVES = {"slow": ("0.0001", [10.0, 14.0, 13.0], 0.5), "fast": ("0.0002", [12.0, 15.5, 16.0], 0.0)}


def _make_runs(store: str, artifacts: Path) -> list[str]:
    import mlflow

    client = mlflow.MlflowClient(store)
    experiment = client.create_experiment("cmp", artifact_location=artifacts.as_uri())
    run_ids = []
    for name, (lr, psnr_curve, loss_offset) in CURVES.items():
        run_id = client.create_run(experiment, run_name=name).info.run_id
        for key, value in {"optim.lr": lr, "model.embed_dim": "16", "data.seed": "2022"}.items():
            client.log_param(run_id, key, value)
        for index, value in enumerate(psnr_curve):
            client.log_metric(run_id, "val/psnr", value, step=index * 10)
            client.log_metric(run_id, "train/loss", 1.0 / (index + 1) + loss_offset, step=index * 10)
        client.set_terminated(run_id)
        run_ids.append(run_id)
    return run_ids


@pytest.mark.slow
def test_compare_two_runs_writes_table_and_plot(tmp_path: Path, capsys) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_ids = _make_runs(store, tmp_path / "artifacts")

    prefix = tmp_path / "report" / "cmp"
    args = ["runs", "compare", "--experiment", "cmp", "--tracking-uri", store, "--out", str(prefix)]
    assert cli.main([*args, "--metric", "val/psnr", "--metric", "train/loss"]) == 0

    with prefix.with_suffix(".csv").open() as stream:
        rows = {row["name"]: row for row in csv.DictReader(stream)}
    assert rows["slow"]["val/psnr (max)"] == "14.0000" and rows["slow"]["val/psnr step"] == "10"
    assert rows["fast"]["val/psnr (max)"] == "16.0000" and rows["fast"]["val/psnr step"] == "20"
    assert rows["fast"]["train/loss (min)"] == f"{1 / 3:.4f}"
    assert rows["slow"]["optim.lr"] == "0.0001" and rows["fast"]["model.embed_dim"] == "16"
    assert "data.seed" not in rows["slow"]  # equal in both runs and not a key parameter
    markdown = prefix.with_suffix(".md").read_text()
    assert markdown.startswith("| run | name |") and "| fast |" in markdown
    assert "| fast |" in capsys.readouterr().out
    with Image.open(prefix.with_suffix(".png")) as plot:
        assert plot.size[0] > 500 and plot.size[1] > 200

    one = tmp_path / "one"
    assert (
        cli.main(["runs", "compare", "--run-ids", run_ids[1], "--tracking-uri", store, "--out", str(one)])
        == 0
    )
    table = one.with_suffix(".md").read_text()
    assert "fast" in table and "slow" not in table
    missing = ["runs", "compare", "--experiment", "nope", "--tracking-uri", store, "--out", str(one)]
    assert cli.main(missing) == 2


def test_metric_direction_follows_the_name() -> None:
    assert lower_is_better("train/loss") and lower_is_better("eval/test/lpips")
    assert not lower_is_better("val/psnr") and not lower_is_better("val/student_ssim")


def test_shown_params_are_chosen_then_differing() -> None:
    runs = [
        RunSummary("a", "", "FINISHED", {"optim.lr": "1", "seed": "0", "crop": "256"}),
        RunSummary("b", "", "FINISHED", {"optim.lr": "1", "seed": "1", "crop": "256"}),
    ]
    assert shown_params(runs, ["optim.lr", "train.max_steps"]) == ["optim.lr", "seed"]


def test_runs_are_grouped_by_sweep_cell_and_by_sweep_when_there_are_several() -> None:
    def run(sweep: str, cell: str, seed: str, psnr: float) -> RunSummary:
        tags = {"sweep.name": sweep, "sweep.group": cell, "sweep.seed": seed}
        return RunSummary(f"{sweep}{cell}{seed}", "", "FINISHED", {}, {"m": (psnr, 1)}, tags=tags)

    one_sweep = [run("a", "lr=1", "0", 20.0), run("a", "lr=2", "0", 19.0), run("a", "lr=1", "1", 22.0)]
    untagged = RunSummary("parent", "", "FINISHED", {})
    groups = group_runs([*one_sweep, untagged])
    assert list(groups) == ["lr=1", "lr=2"] and len(groups["lr=1"]) == 2
    header, rows = group_table(groups, ["m"])
    assert rows[0] == ["lr=1", "2", f"21.000 ± {2**0.5:.3f} (n=2)", "20.000 – 22.000"]

    both = group_runs([*one_sweep, run("b", "lr=1", "0", 18.0)])
    assert list(both) == ["a | lr=1", "a | lr=2", "b | lr=1"]
