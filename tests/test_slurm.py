"""slurm/*.sbatch on a real single-host SLURM cluster (tests/slurm_cluster.py): shards as an array job plus a
dependent merge+verify job, and two-node CPU training that is preempted twice (by `scontrol requeue` and by
the USR1 warning signal) and resumes each time from its checkpoint into the same MLflow run."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, start_cluster, unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
PARTS = 2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or ""),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()


def job_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    """The submission environment: this interpreter's `semi-llie` first on PATH, one thread per process."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**cluster.env, "PATH": path, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def shards(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Shards of a tiny synthetic dataset, built by `slurm/shards.sbatch` as PARTS array tasks + merge job."""
    from semi_llie.data.synthetic import make_dataset

    work = tmp_path_factory.mktemp("shards")
    make_dataset(work / "synthetic", n_labeled=6, n_unlabeled=4, n_val=2, size=48)
    out, logs = work / "shards", work / "logs"
    build_args = ["--root", str(work / "synthetic"), "--out", str(out)]
    build_args += ["--crop-size", "32", "--max-count", "3"]
    script = str(ROOT / "slurm" / "shards.sbatch")
    env = job_env(cluster, LOG_DIR=str(logs))
    submitted = cluster.run("bash", script, str(PARTS), *build_args, env=env, cwd=ROOT)
    ids = dict(re.findall(r"(build_job|merge_job)=(\d+)", submitted))
    merge = cluster.wait_finished(ids["merge_job"], timeout=150)
    return {"out": out, "logs": logs, "merge": merge, "build": cluster.jobs(ids["build_job"])}


def test_shards_array_job_builds_parts_then_merges_and_verifies(shards: dict) -> None:
    logs = {path.name: path.read_text() for path in shards["logs"].iterdir()}
    assert [task["JobState"] for task in shards["build"]] == ["COMPLETED"] * PARTS, logs
    assert shards["merge"]["JobState"] == "COMPLETED", logs
    # afterok: the merge job started only once every part had ended (ISO timestamps sort as strings)
    assert shards["merge"]["StartTime"] >= max(task["EndTime"] for task in shards["build"])

    out: Path = shards["out"]
    for index in range(1, PARTS + 1):
        assert (out / f"manifest.part-{index}-of-{PARTS}.json").is_file()
        assert f"part {index}/{PARTS}" in "".join(logs.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["builder"]["merged_parts"] == PARTS
    counts = {split: info["samples"] for split, info in manifest["splits"].items()}
    assert counts["labeled"] + counts.get("val", 0) + counts.get("test", 0) == 6 + 2
    assert counts["unlabeled"] == 4
    assert all((out / shard["name"]).is_file() for shard in manifest["shards"])
    merge_log = next(text for name, text in logs.items() if "merge" in name)
    assert "all shards OK" in merge_log


# Enough steps that the USR1 sent after the first post-resume checkpoint lands well before the last step:
# with the C++ CPU scan a tiny step takes a fraction of a second, and 16 steps were sometimes all done first.
TRAIN_STEPS = 48
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


def resumed_steps(log: Path) -> list[int]:
    """The steps the trainer resumed at, ascending (every rank logs the line; one step per start)."""
    return sorted({int(step) for _, step in RESUMED.findall(log.read_text())}) if log.exists() else []


def test_train_two_nodes_resumes_after_requeue_and_usr1_into_one_mlflow_run(
    cluster: SlurmCluster, shards: dict, tmp_path: Path
) -> None:
    import mlflow

    run_dir, log, tracking_uri = tmp_path / "run", tmp_path / "train.out", f"sqlite:///{tmp_path}/mlflow.db"
    # The job runs in the project root: give the experiment an artifact folder here, not ./mlruns there.
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment("semi-llie-tests", (tmp_path / "artifacts").as_uri())
    config = ["--config", str(ROOT / "configs" / "tiny_test.yaml"), f"data.shards={shards['out']}"]
    config += [f"train.output_dir={run_dir}", f"train.max_steps={TRAIN_STEPS}", "train.checkpoint_every=2"]
    config += ["train.validate_every=8", "train.checkpoints_total_limit=null"]
    env = job_env(cluster, DEVICE="cpu", MLFLOW_TRACKING_URI=tracking_uri)
    script = str(ROOT / "slurm" / "train.sbatch")
    submitted = cluster.run("sbatch", "--parsable", f"--output={log}", script, *config, env=env, cwd=ROOT)
    job = submitted.strip().split(";")[0]  # "id;cluster" on federated setups
    latest = run_dir / "checkpoints" / "latest"

    # 1. Once the loop has written a checkpoint, requeue the job as an administrator or the scheduler would:
    #    SIGTERM to every process, the trainer saves and exits, SLURM restarts the job.
    cluster.wait_for("the first checkpoint", latest.exists, timeout=240)
    cluster.run("scontrol", "requeue", job)
    cluster.wait_for("the restart to resume", lambda: len(resumed_steps(log)) == 1, timeout=240)
    first_resume = resumed_steps(log)[0]

    # 2. Once the restart has trained on, send the time-limit warning (what --signal=B:USR1@120 sends):
    #    the batch script forwards it, the trainer saves, the script requeues the job itself.
    def checkpointed_after_resume() -> bool:
        return latest.exists() and int(latest.read_text().strip().removeprefix("step-")) > first_resume

    cluster.wait_for("a checkpoint after the resume", checkpointed_after_resume, timeout=120)
    cluster.run("scancel", "--batch", "--signal=USR1", job)

    def finished() -> dict[str, str] | None:
        fields = cluster.job(job)
        return fields if fields["JobState"] in {"COMPLETED", "FAILED", "CANCELLED"} else None

    final = cluster.wait_for("the job to finish after two restarts", finished, timeout=300)

    text = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "2", text
    starts = re.findall(rf"job {job} start (\d+) on node1 node2", text)
    assert starts == ["0", "1", "2"], text
    # one launcher per node, each with its own rank, meeting at the first node's rendezvous
    for rank in (0, 1):
        assert f"--machine_rank {rank} --rdzv_conf is_host={int(rank == 0)}" in text
    assert "SIGTERM: waiting for the training step" in text and "SIGUSR1: asking the training step" in text
    assert f"requeueing job {job}" in text

    first, second = resumed_steps(log)
    assert first < second < TRAIN_STEPS
    for step in (first, second, TRAIN_STEPS):
        assert (run_dir / "checkpoints" / f"step-{step}" / "trainer_state.json").is_file()
    assert latest.read_text().strip() == f"step-{TRAIN_STEPS}"

    # Every start wrote to the same MLflow run, which holds each step's training loss exactly once.
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    runs = client.search_runs([experiment_id])
    assert [run.info.run_id for run in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    logged_steps = sorted(metric.step for metric in client.get_metric_history(run_id, "train/loss"))
    assert logged_steps == list(range(1, TRAIN_STEPS + 1))


def test_sweep_array_job_trains_one_child_per_task_under_one_parent_run(
    cluster: SlurmCluster, shards: dict, tmp_path: Path
) -> None:
    import mlflow

    out, store = tmp_path / "sweep", f"sqlite:///{tmp_path}/mlflow.db"
    plan = [
        sys.executable, "-m", "semi_llie", "sweep", "--config", str(ROOT / "configs" / "tiny_test.yaml"),
        "--out", str(out), "--grid", "optim.lr=1e-3,2e-4", "--set", f"data.shards={shards['out']}",
        "--set", "train.max_steps=2", "--set", "train.validate_every=2", "--set", "train.checkpoint_every=2",
        "--set", f"tracking.tracking_uri={store}", "--set", "tracking.log_model=false", "--plan-only",
    ]  # fmt: skip
    printed = cluster.run(*plan, env=job_env(cluster), cwd=tmp_path)
    submission = re.search(r"sbatch (--array=0-1) slurm/sweep.sbatch (\S+)", printed)
    assert submission is not None, printed
    log = tmp_path / "task-%a.out"
    job = cluster.run(
        "sbatch", "--parsable", submission.group(1), f"--output={log}", str(ROOT / "slurm" / "sweep.sbatch"),
        submission.group(2), env=job_env(cluster), cwd=ROOT,
    ).strip().split(";")[0]  # fmt: skip
    cluster.wait_finished(job, timeout=300)
    logs = "".join(path.read_text() for path in tmp_path.glob("task-*.out"))
    assert [task["JobState"] for task in cluster.jobs(job)] == ["COMPLETED"] * 2, logs

    done = sorted(json.loads(path.read_text())["group"] for path in out.glob("children/*/sweep_done.json"))
    assert done == ["optim.lr=1e-3", "optim.lr=2e-4"]
    parent_id = json.loads((out / "sweep.json").read_text())["parent_run_id"]
    client = mlflow.MlflowClient(store)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"  # ended by whichever task finished the last child
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert sorted(float(run.data.params["optim.lr"]) for run in children) == [2e-4, 1e-3]
