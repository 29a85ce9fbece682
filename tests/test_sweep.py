"""`semi-llie sweep` and `runs compare --sweep`: grid expansion, then a 2 × 2 sweep end to end (CLI)."""

from __future__ import annotations

import argparse
import csv
import fcntl
import json

import pytest
from conftest import TINY_CONFIG, run_cli

from semi_llie.compare import mean_std
from semi_llie.errors import ConfigError, UserError
from semi_llie.sweep import (
    DONE_FILE,
    LOCK_FILE,
    SweepPlan,
    child_dir,
    expand,
    parse_grid_item,
    resolve_plan,
    run_child,
)


def test_grid_values_split_on_top_level_commas_only():
    assert parse_grid_item("optim.lr=1e-3,5e-4") == ("optim.lr", ["1e-3", "5e-4"])
    assert parse_grid_item("optim.milestones=[10, 20],[30, 40]") == (
        "optim.milestones",
        ["[10, 20]", "[30, 40]"],
    )
    with pytest.raises(UserError, match="empty or repeated"):
        parse_grid_item("optim.lr=1e-3,,2e-3")
    with pytest.raises(UserError, match="key.sub=v1,v2"):
        parse_grid_item("optim.lr")


def test_children_are_the_grid_product_times_the_seeds_in_order():
    plan = SweepPlan(config="c.yaml", grid={"a": ["1", "2"], "b.c": ["x", "y", "z"]}, seeds=2)
    children = expand(plan)
    assert len(children) == 2 * 3 * 2
    assert [c.index for c in children] == list(range(12))
    # Seeds vary fastest, then the last grid key.
    assert [(c.cell, c.seed_offset) for c in children[:3]] == [
        ((("a", "1"), ("b.c", "x")), 0),
        ((("a", "1"), ("b.c", "x")), 1),
        ((("a", "1"), ("b.c", "y")), 0),
    ]
    assert children[0].group() == "a=1, b.c=x"
    assert len({c.folder_name() for c in children}) == 12


def test_a_spec_file_plans_the_same_sweep_as_flags_and_the_folder_alone_continues_it(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"config: {TINY_CONFIG}\nout: {tmp_path / 'out'}\nseeds: 2\n"
        "grid: {optim.lr: [0.001, 0.0002], optim.milestones: [[1, 2], [3]]}\nset: [train.max_steps=3]\n"
    )
    empty = dict(
        out=None, config=None, spec=None, grid=[], seeds=None, set=[], evaluate_split=None, launcher=None
    )
    out, plan = resolve_plan(argparse.Namespace(**{**empty, "spec": spec}))
    assert plan.grid == {"optim.lr": ["0.001", "0.0002"], "optim.milestones": ["[1, 2]", "[3]"]}
    assert len(expand(plan)) == 2 * 2 * 2 and plan.overrides == ["train.max_steps=3"]
    flags = argparse.Namespace(**{
        **empty, "out": tmp_path / "out", "config": TINY_CONFIG, "seeds": 2, "set": ["train.max_steps=3"],
        "grid": ["optim.lr=0.001,0.0002", "optim.milestones=[1, 2],[3]"],
    })  # fmt: skip
    assert resolve_plan(flags)[1] == plan  # the same plan: accepted for the same folder
    assert resolve_plan(argparse.Namespace(**{**empty, "out": out}))[1] == plan
    with pytest.raises(UserError, match="differs in seeds"):
        resolve_plan(argparse.Namespace(**{**vars(flags), "seeds": 3}))
    with pytest.raises(ConfigError, match="optim.lr"):  # every child's config is validated before any runs
        resolve_plan(argparse.Namespace(**{**vars(flags), "out": tmp_path / "bad", "grid": ["optim.lr=-1"]}))


def _one_child_plan(tmp_path):
    plan = SweepPlan(config=str(TINY_CONFIG), grid={"optim.lr": ["1e-3"]}, seeds=1,
                     overrides=["tracking.enabled=false"])  # fmt: skip
    return tmp_path / "sweep", plan, expand(plan)[0]


def test_a_child_another_process_holds_is_skipped_and_an_interrupted_one_resumes(tmp_path, monkeypatch):
    from semi_llie import sweep
    from semi_llie.engine import checkpointing

    out, plan, child = _one_child_plan(tmp_path)
    commands = []

    def record(argv, log):  # stands in for the training subprocess
        commands.append(argv)
        return 1

    monkeypatch.setattr(sweep, "_run_logged", record)
    folder = child_dir(out, child)
    folder.mkdir(parents=True)
    with (folder / LOCK_FILE).open("w") as held:  # another array task is training this child
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run_child(out, plan, child, 1) == 0
    assert commands == []  # nothing was started beside it

    assert run_child(out, plan, child, 1) == 1  # the lock is free: it trains (here: a failing stand-in)
    assert "--resume" not in commands[-1]
    step = checkpointing.checkpoints_root(folder) / "step-2"  # it was interrupted after a checkpoint
    step.mkdir(parents=True)
    (step / checkpointing.STATE_FILE).write_text(checkpointing.TrainerState(step=2).to_json())
    run_child(out, plan, child, 1)
    assert commands[-1][commands[-1].index("--resume") + 1] == "latest"
    assert not (folder / DONE_FILE).exists()


def test_mean_std_is_the_sample_standard_deviation():
    mean, std = mean_std([20.0, 21.0, 23.0])
    assert mean == pytest.approx(64 / 3)
    # By hand: deviations -4/3, -1/3, 5/3; squares sum to 42/9; divided by n - 1 = 2.
    assert std == pytest.approx((42 / 9 / 2) ** 0.5)
    assert mean_std([5.0]) == (5.0, 0.0)


@pytest.mark.slow
def test_sweep_runs_four_children_under_one_parent_skips_them_on_rerun_and_compare_groups_them(
    tmp_path, tiny_shards
):
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "sweep"
    args = [
        "sweep", "--config", str(TINY_CONFIG), "--out", str(out), "--seeds", "1",
        "--grid", "optim.lr=1e-3,2e-4", "--grid", "bank.enabled=true,false",
        "--set", f"data.shards={tiny_shards}", "--set", "train.max_steps=2",
        "--set", "train.validate_every=2", "--set", "train.checkpoint_every=2",
        "--set", f"tracking.tracking_uri={store}", "--set", "tracking.log_model=false",
        "--evaluate-split", "val",
    ]  # fmt: skip
    first = run_cli(*args, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("done in") == 4

    plan = json.loads((out / "sweep.json").read_text())
    client = mlflow.MlflowClient(store)
    parent = client.get_run(plan["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    groups = sorted(run.data.tags["sweep.group"] for run in children)
    assert groups == sorted(
        f"optim.lr={lr}, bank.enabled={bank}" for lr in ("1e-3", "2e-4") for bank in ("true", "false")
    )
    for run in children:  # each child trained what its cell says, and was scored on the val split
        lr, bank = (part.split("=")[1] for part in run.data.tags["sweep.group"].split(", "))
        assert float(run.data.params["optim.lr"]) == float(lr)
        assert run.data.params["bank.enabled"] == {"true": "True", "false": "False"}[bank]
        assert run.data.params["train.max_steps"] == "2"
        assert "eval/val/psnr" in run.data.metrics

    # A rerun (only --out: the saved plan) trains nothing and keeps the four runs.
    second = run_cli("sweep", "--out", str(out), cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("finished earlier, skipped") == 4
    assert "done in" not in second.stdout
    assert len(client.search_runs([parent.info.experiment_id], filter_string="tags.`sweep.seed` = '0'")) == 4

    # Another plan in the same folder is refused, naming what differs.
    third = run_cli(*args[:-2], cwd=tmp_path, timeout=120)
    assert third.returncode != 0 and "evaluate_split" in third.stderr

    compare = run_cli(
        "runs", "compare", "--sweep", str(out), "--metric", "eval/val/psnr",
        "--out", str(tmp_path / "cmp"), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert compare.returncode == 0, compare.stderr
    with (tmp_path / "cmp-groups.csv").open() as stream:
        header, *rows = list(csv.reader(stream))
    assert header[:3] == ["group", "runs", "eval/val/psnr mean ± std"]
    by_group = {row[0]: row for row in rows}
    assert len(by_group) == 4
    for run in children:
        value = run.data.metrics["eval/val/psnr"]
        assert by_group[run.data.tags["sweep.group"]][1:3] == ["1", f"{value:.3f} ± 0.000 (n=1)"]
    assert (tmp_path / "cmp.png").stat().st_size > 0
