"""Exactness with the reliable bank on: resumes from older checkpoints and from a save killed mid-write,
one owner rank per unlabeled key over several epochs, re-partitioning to one process, and DDP equivalence.
Real processes and the real CLI throughout; tests/train_probe.py only records what the test checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, cli_env

from semi_llie.data import Manifest
from semi_llie.data.streams import owner_ranks
from semi_llie.engine import bank_store, checkpointing
from semi_llie.method.bank import ReliableBank
from semi_llie.metrics.scorers import FunctionScorer

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("train_probe.py")
# 12 steps, a checkpoint every 3, every checkpoint kept, the bank on (tiny config), ramp and lr schedule
# inside the run so that every part of the state matters.
COMMON = (
    "train.max_steps=12",
    "train.checkpoint_every=3",
    "train.validate_every=12",
    "train.checkpoints_total_limit=null",
    "tracking.enabled=false",
    "optim.milestones=[4, 10]",
    "losses.unsup_weight.ramp_length=12",
)


def train(shards: Path, output_dir: Path, *args: str, resume: str | None = None, env=None, check=True):
    command = [sys.executable, "-m", "semi_llie", "train", "--config", str(TINY_CONFIG)]
    command += ["--resume", resume] if resume else []
    command += [*args, f"data.shards={shards}", f"train.output_dir={output_dir}"]
    result = subprocess.run(
        command, cwd=output_dir.parent, capture_output=True, text=True, timeout=300, env=env or cli_env()
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def launch(nproc: int, shards: Path, output_dir: Path, probe_dir: Path, *args: str, resume=None, **env: str):
    port = str(29400 + (os.getpid() + nproc) % 1000)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(nproc),
    ]
    command += ["--main_process_port", port, str(PROBE), "--config", str(TINY_CONFIG)]
    command += [*(["--resume", resume] if resume else []), *args]
    command += [f"data.shards={shards}", f"train.output_dir={output_dir}"]
    if nproc == 1:
        command = [sys.executable, str(PROBE), *command[command.index("--config") :]]
    probe_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        command,
        cwd=output_dir.parent,
        capture_output=True,
        text=True,
        timeout=400,
        env=cli_env(ACCELERATE_USE_CPU="true", PROBE_DIR=str(probe_dir), **env),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((probe_dir / f"rank-{r}.json").read_text()) for r in range(nproc)]


def bank_at(step_dir: Path, metric: str = "piqe") -> dict:
    bank = ReliableBank(FunctionScorer(lambda x: x, metric))
    bank_store.load(bank, step_dir, 1, owns=lambda indices: torch.ones_like(indices, dtype=torch.bool))
    return {k: (e.pixels, e.score, e.step, e.index, e.writer) for k, e in bank.items()}


def assert_same_run(a: Path, b: Path) -> None:
    """Student, teacher and bank of two step dirs are bitwise equal."""
    for name in ("student.pt", "teacher.pt"):
        x, y = (torch.load(d / name, weights_only=True) for d in (a, b))
        assert x.keys() == y.keys()
        different = [key for key in x if not torch.equal(x[key], y[key])]
        assert not different, f"{name}: {len(different)} of {len(x)} tensors differ, e.g. {different[:3]}"
    x, y = bank_at(a), bank_at(b)
    assert x, "the bank is empty: the test would not exercise it"
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key][0], y[key][0]) and x[key][1:] == y[key][1:], key


@pytest.fixture(scope="module")
def straight(tiny_shards, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_shards, output_dir, *COMMON)
    return output_dir / "checkpoints"


def test_resume_from_an_older_checkpoint_after_the_run_went_on_is_exact(tiny_shards, straight, tmp_path):
    output_dir = tmp_path / "run"
    train(tiny_shards, output_dir, *COMMON[1:], "train.max_steps=9")  # the bank moves on past step 3
    train(tiny_shards, output_dir, *COMMON, resume=str(output_dir / "checkpoints" / "step-3"))
    assert_same_run(straight / "step-12", output_dir / "checkpoints" / "step-12")
    assert_same_run(straight / "step-6", output_dir / "checkpoints" / "step-6")


def test_kill_during_a_checkpoint_write_then_resume_is_exact(tiny_shards, straight, tmp_path):
    output_dir = tmp_path / "run"
    env = cli_env(SEMI_LLIE_TEST_SAVE_DELAY="30")  # every save sleeps before its rename: kill it there
    command = [sys.executable, "-m", "semi_llie", "train", "--config", str(TINY_CONFIG), *COMMON]
    command += [f"data.shards={tiny_shards}", f"train.output_dir={output_dir}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    root = output_dir / "checkpoints"
    # Let the step-3 save finish (30 s), then kill the step-6 save while its staging dir and its bank
    # segments are on disk but not yet referenced.
    from test_train import wait_for

    wait_for(lambda: (root / "step-3").is_dir() and (root / ".tmp-step-6" / "bank.json").is_file(), process)
    process.kill()
    process.communicate()
    assert checkpointing.latest_checkpoint(output_dir).name == "step-3"
    orphans = set(p.name for p in (root / bank_store.SEGMENTS).iterdir())
    orphans -= bank_store.referenced_segments([root / "step-3"])
    assert orphans, "the kill should leave the step-6 segments behind"

    train(tiny_shards, output_dir, *COMMON, resume="latest")
    assert not orphans & {p.name for p in (root / bank_store.SEGMENTS).iterdir()}  # collected
    assert_same_run(straight / "step-12", root / "step-12")


def test_until_freezes_the_bank_and_then_trains_exactly_as_supervised_only(tiny_shards, straight, tmp_path):
    # losses.unsup_weight.until=6: the same run as without it up to step 6, bank included; then the bank
    # stops changing, and the rest is the supervised-only trainer (the unlabeled stream, teacher pseudo-labels
    # and bank off) resumed from the same step-6 checkpoint, bitwise.
    until = tmp_path / "until"
    train(tiny_shards, until, *COMMON, "losses.unsup_weight.until=6")
    root = until / "checkpoints"
    assert_same_run(straight / "step-6", root / "step-6")
    frozen, later = bank_at(root / "step-6"), bank_at(root / "step-12")
    assert frozen.keys() == later.keys()
    assert all(torch.equal(frozen[k][0], later[k][0]) and frozen[k][1:] == later[k][1:] for k in frozen)
    control = bank_at(straight / "step-12")
    assert any(entry[2] > 6 for entry in control.values()), "without until the bank should go on changing"

    supervised = tmp_path / "supervised"
    off = ("data.batch_size_unlabeled=0", "losses.unsup_weight.weight=0", "bank.enabled=false")
    train(tiny_shards, supervised, *COMMON, *off, resume=str(root / "step-6"))
    for name in ("student.pt", "teacher.pt"):
        x, y = (torch.load(d / "checkpoints/step-12" / name, weights_only=True) for d in (until, supervised))
        assert all(torch.equal(x[key], y[key]) for key in x), name
    x = torch.load(root / "step-12" / "student.pt", weights_only=True)
    y = torch.load(straight / "step-12" / "student.pt", weights_only=True)
    assert any(not torch.equal(x[key], y[key]) for key in x), "until changed nothing after step 6"


@pytest.mark.slow
def test_a_resume_on_another_thread_count_is_tagged_on_the_same_mlflow_run(tiny_shards, tmp_path):
    import mlflow

    # A seed repeats a run bitwise only at one thread count, and MLflow params are write-once: the resume that
    # changed the count (and the schedule) must say so on the run it continues.
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    tracking = (f"tracking.tracking_uri={uri}", "tracking.log_model=false")
    train(tiny_shards, output_dir, "train.max_steps=2", *tracking, env=cli_env(OMP_NUM_THREADS="1"))
    first = json.loads((output_dir / "run.json").read_text())["mlflow_run_id"]
    result = train(
        tiny_shards,
        output_dir,
        "train.max_steps=3",
        *tracking,
        resume="latest",
        env=cli_env(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2"),
    )
    assert json.loads((output_dir / "run.json").read_text())["mlflow_run_id"] == first
    mlflow.set_tracking_uri(uri)
    run = mlflow.get_run(first)
    assert run.data.params["runtime.torch_threads"] == "1" and run.data.params["train.max_steps"] == "2"
    changed = "runtime.torch_threads: 1 -> 2; train.max_steps: 2 -> 3"
    assert run.data.tags["resumed.step_2.changed_params"] == changed
    assert changed in result.stderr


def unlabeled_keys(shards: Path) -> set[str]:
    keys = set()
    for tar in sorted(shards.glob("unlabeled-*.tar")):
        with tarfile.open(tar) as archive:
            keys |= {name.split(".")[0] for name in archive.getnames()}
    return keys


def test_two_ranks_own_their_keys_over_epochs_and_one_process_resumes_the_bank(tiny_shards, tmp_path):
    # 8 unlabeled samples in 2 shards, 2 per rank per step: one epoch of a rank's 4 samples is 2 steps. The
    # probe's "newest" scorer makes every teacher output win, so every step rewrites entries (on both ranks,
    # and after the resume): ownership is tested under the most writes, independently of how training goes.
    output_dir = tmp_path / "run"
    steps = (
        "train.max_steps=10",
        "train.checkpoint_every=2",
        "train.checkpoints_total_limit=null",
        "bank.metric=newest",
    )
    ranks = launch(2, tiny_shards, output_dir, tmp_path / "probe2", *steps, "tracking.enabled=false")
    assert ranks[0]["teacher_sha256"] == ranks[1]["teacher_sha256"]  # computed by each rank, compared here

    manifest = Manifest.open(tiny_shards)
    shards = manifest.shards_of("unlabeled")
    root = output_dir / "checkpoints"
    writers: dict[str, set[int]] = {}
    for step_dir in checkpointing.step_dirs(output_dir):  # every checkpoint of the 5 epochs
        for key, (_, _, _, index, writer) in bank_at(step_dir, "newest").items():
            writers.setdefault(key, set()).add(writer)
            assert writer == int(owner_ranks(shards, 2, torch.tensor([index]))), key
    assert all(len(w) == 1 for w in writers.values())  # each key written by exactly one rank, ever
    assert {w for ws in writers.values() for w in ws} == {0, 1}
    final = bank_at(root / "step-10", "newest")
    assert set(final) == set(writers) == unlabeled_keys(tiny_shards)  # every key written, none lost

    # Resume the two-process run with one process: it owns every key now and continues the bank.
    ones = launch(
        1,
        tiny_shards,
        output_dir,
        tmp_path / "probe1",
        "train.max_steps=20",
        *steps[1:],
        "tracking.enabled=false",
        resume="latest",
    )
    assert ones[0]["exit_code"] == 0
    resumed = bank_at(root / "step-20", "newest")
    assert set(resumed) == unlabeled_keys(tiny_shards)  # every key, those of both former ranks
    assert all(
        entry[4] == 0 and entry[2] > 10 for entry in resumed.values()
    )  # all rewritten after the resume


def test_one_ddp_step_on_two_halves_equals_one_step_on_the_whole_batch(tmp_path, tiny_shards):
    common = ("train.max_steps=1", "tracking.enabled=false", "optim.grad_clip=null", "data.num_workers=0")
    students = {}
    for nproc in (1, 2):
        output_dir = tmp_path / f"ddp{nproc}"
        launch(
            nproc,
            tiny_shards,
            output_dir,
            tmp_path / f"probe{nproc}",
            *common,
            f"data.batch_size_labeled={4 // nproc}",
            f"data.batch_size_unlabeled={4 // nproc}",
            PROBE_FIXED_BATCH="4",
        )
        students[nproc] = torch.load(output_dir / "checkpoints/step-1/student.pt", weights_only=True)
    for key, whole in students[1].items():
        torch.testing.assert_close(students[2][key], whole, rtol=1e-5, atol=1e-6, msg=key)
    # The step moved the weights (the comparison is not of two untouched initialisations).
    reference = torch.load(tmp_path / "ddp1/checkpoints/step-1/teacher.pt", weights_only=True)
    assert any(not torch.equal(reference[k], students[1][k]) for k in reference)


def test_a_two_process_run_frees_its_ddp_student_before_the_process_group(tmp_path, tiny_shards):
    # A DDP reducer that outlives its gloo process group can abort the process at exit (SIGABRT): exit code
    # 134 instead of 0 (or 75 when preempted), and SLURM marks a finished job FAILED.
    ranks = launch(
        2, tiny_shards, tmp_path / "run", tmp_path / "probe", "train.max_steps=2", "tracking.enabled=false"
    )
    for record in ranks:
        assert record["exit_code"] == 0
        assert record["ddp_at_destroy"] == [0]  # destroyed once, with no wrapped student left
        assert record["ddp_after"] == 0
