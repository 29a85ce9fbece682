"""The trainer: checkpoint/tracking/distributed helpers (fast), then the real CLI end to end (slow)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import PROJECT, TINY_CONFIG, cli_env, run_cli
from torch import nn

from semi_llie.config import TrackingConfig
from semi_llie.data import Manifest
from semi_llie.engine import checkpointing
from semi_llie.engine.distributed import RanksDiverged, check_ranks_agree, state_checksum
from semi_llie.engine.tracking import Tracker
from semi_llie.errors import ConfigError, UserError
from semi_llie.fileio import write_text_atomic

# -- checkpoints ----------------------------------------------------------------------------------------


def make_step_dir(output_dir: Path, step: int, model: dict | None = None) -> Path:
    path = checkpointing.checkpoints_root(output_dir) / f"step-{step}"
    path.mkdir(parents=True)
    (path / checkpointing.STATE_FILE).write_text(checkpointing.TrainerState(step=step).to_json())
    (path / "config.yaml").write_text(yaml.safe_dump({"model": model or {"type": "MambaLowlight"}}))
    return path


def test_latest_pointer_wins_and_rotation_keeps_it(tmp_path):
    for step in (2, 4, 6, 10):
        make_step_dir(tmp_path, step)
    write_text_atomic(checkpointing.checkpoints_root(tmp_path) / "latest", "step-4\n")
    assert checkpointing.latest_checkpoint(tmp_path).name == "step-4"
    deleted = checkpointing.rotate(tmp_path, total_limit=2)
    # The newest other dir survives beside the one `latest` names; numeric order, not string order.
    assert [p.name for p in deleted] == ["step-2", "step-6"]
    assert [p.name for p in checkpointing.step_dirs(tmp_path)] == ["step-4", "step-10"]


def test_resolve_resume_accepts_latest_step_dirs_and_output_dirs(tmp_path):
    step = make_step_dir(tmp_path, 3)
    (checkpointing.checkpoints_root(tmp_path) / ".tmp-step-4").mkdir()  # an interrupted save is ignored
    assert checkpointing.resolve_resume(tmp_path, "latest") == step
    assert checkpointing.resolve_resume(tmp_path / "elsewhere", str(step)) == step
    assert checkpointing.resolve_resume(tmp_path / "elsewhere", str(tmp_path)) == step
    checkpointing.remove_stale_staging(tmp_path)
    assert not (checkpointing.checkpoints_root(tmp_path) / ".tmp-step-4").exists()
    with pytest.raises(UserError, match="holds no checkpoint"):
        checkpointing.resolve_resume(tmp_path / "empty", "latest")


def test_incompatible_model_config_is_refused(tmp_path):
    step = make_step_dir(tmp_path, 1, model={"type": "MambaLowlight", "embed_dim": 8})
    checkpointing.check_compatible(step, {"type": "MambaLowlight", "embed_dim": 8})
    with pytest.raises(UserError, match=r"model.embed_dim=8 but the config has 16"):
        checkpointing.check_compatible(step, {"type": "MambaLowlight", "embed_dim": 16})


def test_save_and_load_round_trip_in_one_process(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.1)
    student, optimizer = accelerator.prepare(student, optimizer)
    student(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = checkpointing.TrainerState(step=7, stream_positions={"micro_batches": 7}, best_score=12.5)
    path = checkpointing.save_checkpoint(accelerator, tmp_path, state, student, teacher, "model: {}\n", 3)
    assert path.name == "step-7" and checkpointing.latest_checkpoint(tmp_path) == path
    assert not list(checkpointing.checkpoints_root(tmp_path).glob(".tmp-*"))
    saved = torch.load(path / "student.pt", weights_only=True)
    assert torch.equal(saved["weight"], accelerator.unwrap_model(student).weight.detach())

    expected_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        teacher.weight.zero_()
        accelerator.unwrap_model(student).weight.zero_()
    loaded = checkpointing.load_checkpoint(accelerator, path, teacher)
    assert loaded == state
    assert torch.equal(teacher.weight, expected_teacher["weight"])
    assert torch.equal(accelerator.unwrap_model(student).weight.detach(), saved["weight"])


# -- distributed helpers --------------------------------------------------------------------------------


def test_checksum_sees_a_single_bit():
    model = nn.Linear(4, 4)
    before = state_checksum(model)
    with torch.no_grad():
        model.weight.view(-1)[3] = torch.nextafter(model.weight.view(-1)[3], torch.tensor(1.0))
    assert state_checksum(model) != before


def test_diverged_ranks_stop_with_a_clear_error():
    model = nn.Linear(2, 2)
    local = state_checksum(model)

    def gather(tensor):  # what rank 0 would see if rank 1 held another teacher
        return torch.cat([tensor, tensor + 1])

    fake = SimpleNamespace(device=torch.device("cpu"), gather=gather)
    with pytest.raises(RanksDiverged, match="differs between ranks") as raised:
        check_ranks_agree(fake, model, "teacher")
    assert raised.value.exit_code == 4
    agreeing = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: torch.cat([t, t]))
    assert check_ranks_agree(agreeing, model, "teacher") == local


# -- tracking -------------------------------------------------------------------------------------------


def test_unreachable_tracking_server_is_reported_once_and_training_goes_on(caplog):
    tracker = Tracker(TrackingConfig(tracking_uri="http://127.0.0.1:9"), is_main_process=True)
    assert tracker.start(None, {"a": "1"}, "a: 1\n") is None
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    tracker.log_image(torch.zeros(4, 4, 3, dtype=torch.uint8).numpy(), "x.png")
    tracker.end()
    warnings = [r for r in caplog.records if "training goes on without MLflow" in r.getMessage()]
    assert len(warnings) == 1


def test_only_rank_zero_tracks():
    tracker = Tracker(TrackingConfig(), is_main_process=False)
    assert tracker.start(None, {}, "") is None and not tracker.active


# -- bad input through the real command -----------------------------------------------------------------


def train_args(*overrides: str, resume: str | None = None, overwrite: bool = False) -> argparse.Namespace:
    return argparse.Namespace(
        config=TINY_CONFIG, overrides=list(overrides), resume=resume, overwrite=overwrite
    )


def test_unknown_key_exits_2_naming_it(tmp_path):
    result = run_cli("train", "--config", str(TINY_CONFIG), "optim.learning_rate=1", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown key 'optim.learning_rate'" in result.stderr and "Traceback" not in result.stderr


def test_missing_shards_are_named(tmp_path):
    from semi_llie import train

    with pytest.raises(UserError, match="no manifest.json"):
        train.main(train_args(f"data.shards={tmp_path / 'nowhere'}", f"train.output_dir={tmp_path / 'out'}"))


def test_foreign_output_folder_is_refused(tmp_path, tiny_shards):
    from semi_llie import train

    make_step_dir(tmp_path / "out", 5)
    with pytest.raises(UserError, match="already holds another run's checkpoints; pass --resume latest"):
        train.main(train_args(f"data.shards={tiny_shards}", f"train.output_dir={tmp_path / 'out'}"))


def test_mistyped_value_is_a_config_error(tmp_path):
    from semi_llie import train

    with pytest.raises(ConfigError, match="train.max_steps"):
        train.main(train_args("train.max_steps=-1"))


# -- end to end -----------------------------------------------------------------------------------------


def tiny_overrides(shards: Path, output_dir: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"train.output_dir={output_dir}", *extra]


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "semi_llie", "train", "--config", str(TINY_CONFIG), *args]


def launch_cmd(accelerate_config: str | None, *args: str) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        launcher += ["--config_file", str(PROJECT / accelerate_config)]
    else:
        launcher += ["--multi_gpu", "--num_processes", "2"]
    port = str(29500 + os.getpid() % 1000)
    return [
        *launcher,
        "--main_process_port",
        port,
        "-m",
        "semi_llie",
        "train",
        "--config",
        str(TINY_CONFIG),
        *args,
    ]


def unlabeled_keys_per_shard(shards: Path) -> list[set[str]]:
    keys = []
    for tar in sorted(shards.glob("unlabeled-*.tar")):
        with tarfile.open(tar) as archive:
            keys.append({name.split(".")[0] for name in archive.getnames()})
    return keys


@pytest.mark.slow
def test_ddp_two_cpu_processes_track_register_and_share_the_bank(tmp_path, tiny_shards):
    import mlflow

    output_dir = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_shards,
        output_dir,
        "losses.ram_perceptual.loss_weight=0.1",
        "losses.contrastive.loss_weight=1.0",  # every term on
    )
    result = subprocess.run(
        launch_cmd(None, *overrides),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="2", MKL_NUM_THREADS="2"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher checksum" in result.stderr and "identical on all 2 ranks" in result.stderr

    # Checkpoints: every 2 steps, 2 kept, latest written last.
    assert [p.name for p in checkpointing.step_dirs(output_dir)] == ["step-2", "step-4"]
    latest = checkpointing.latest_checkpoint(output_dir)
    state = checkpointing.TrainerState.from_json((latest / "trainer_state.json").read_text())
    assert state.step == 4 and state.world_size == 2
    assert (latest / "accelerate" / "random_states_1.pkl").is_file()  # each rank saved its RNG

    # Each rank streams its own unlabeled shard and writes only those keys: both shards are in the bank,
    # each entry written by the rank that owns its shard.
    from semi_llie.engine import bank_store
    from semi_llie.method.bank import ReliableBank
    from semi_llie.metrics.scorers import FunctionScorer

    bank = ReliableBank(FunctionScorer(lambda x: x, "piqe"))
    bank_store.load(bank, latest, 1, owns=lambda indices: torch.ones_like(indices, dtype=torch.bool))
    for rank, shard_keys in enumerate(unlabeled_keys_per_shard(tiny_shards)):
        assert shard_keys & set(bank.keys())
        assert all(entry.writer == rank for key, entry in bank.items() if key in shard_keys)

    # MLflow: metrics, an image grid, the champion alias on a version that loads with pyfunc.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run_id = yaml.safe_load((output_dir / "run.json").read_text())["mlflow_run_id"]
    run = mlflow.get_run(run_id)
    assert {
        "train/loss",
        "train/sup/l1mse",
        "train/unsup/contrast",
        "train/lr",
        "train/images_per_s",
        "train/bank_acceptance",
        "val/psnr",
        "val/ssim",
        "val/student_psnr",
    } <= set(run.data.metrics)
    assert run.data.params["optim.lr"] == "0.0002"
    # What a seed does not fix: the threads each process ran with (the environment above) and the processes.
    assert run.data.params["runtime.torch_threads"] == "2" and run.data.params["runtime.processes"] == "2"
    artifacts = mlflow.artifacts.list_artifacts(run_id=run_id, artifact_path="val/step-000004")
    assert any(a.path.endswith(".png") for a in artifacts)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("semi-llie-teacher", "champion")
    assert version.tags["run_id"] == run_id and len(version.tags["dataset_manifest_sha256"]) == 64
    assert "git_commit" in version.tags and "psnr_eps" in version.tags["metric_settings"]
    model = mlflow.pyfunc.load_model("models:/semi-llie-teacher@champion")
    prediction = model.predict(torch.rand(1, 3, 24, 40).numpy())
    assert prediction.shape == (1, 3, 24, 40)


@pytest.mark.slow
def test_deepspeed_zero2_two_cpu_processes(tmp_path, tiny_shards):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
    output_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, output_dir, "train.max_steps=2", "tracking.enabled=false")
    result = subprocess.run(
        launch_cmd("configs/accelerate/deepspeed_zero2.yaml", *overrides),
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(DS_ACCELERATOR="cpu"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical on all 2 ranks" in result.stderr
    latest = checkpointing.latest_checkpoint(output_dir)
    assert latest.name == "step-2"
    assert (latest / "accelerate" / "pytorch_model").is_dir()  # DeepSpeed's own (sharded) checkpoint format


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_75_and_resumes(tmp_path, tiny_shards):
    output_dir = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_shards,
        output_dir,
        "train.max_steps=1000",
        "train.checkpoint_every=1000",
        "train.validate_every=1000",
        "tracking.enabled=false",
    )
    process = subprocess.Popen(
        train_cmd(*overrides),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    wait_for(lambda: (output_dir / "run.json").is_file(), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 75, stderr[-3000:]
    assert "preempted at step" in stderr
    step = checkpointing.latest_checkpoint(output_dir)
    done = checkpointing.TrainerState.from_json((step / "trainer_state.json").read_text()).step
    assert done >= 1

    resume = tiny_overrides(tiny_shards, output_dir, f"train.max_steps={done + 1}", "tracking.enabled=false")
    result = subprocess.run(
        train_cmd("--resume", "latest", *resume),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpointing.latest_checkpoint(output_dir).name == f"step-{done + 1}"


@pytest.mark.slow
def test_dihedral_pseudo_labels_reach_the_bank(tmp_path, tiny_shards):
    # Same seed and data; only teacher.pseudo_label differs, so the bank's stored positives must differ.
    from test_resume_and_ranks import bank_at

    banks = {}
    for kind in ("weak", "dihedral8"):
        overrides = tiny_overrides(
            tiny_shards,
            tmp_path / kind,
            f"teacher.pseudo_label={kind}",
            "train.max_steps=2",
            "train.checkpoint_every=2",
            "train.validate_every=2",
            "tracking.enabled=false",
        )
        result = run_cli("train", "--config", str(TINY_CONFIG), *overrides, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        banks[kind] = bank_at(checkpointing.checkpoints_root(tmp_path / kind) / "step-2")
    assert banks["weak"] and banks["weak"].keys() == banks["dihedral8"].keys()
    for key, (pixels, *_) in banks["weak"].items():
        assert (pixels.float() - banks["dihedral8"][key][0].float()).abs().max() > 1e-3, key


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, tiny_shards):
    # lr 1e30 blows the weights up after the first step: every later loss is infinite.
    overrides = tiny_overrides(
        tiny_shards,
        tmp_path / "run",
        "optim.lr=1e30",
        "optim.grad_clip=null",
        "train.max_nonfinite_steps=2",
        "tracking.enabled=false",
        "train.max_steps=20",
    )
    result = run_cli("train", "--config", str(TINY_CONFIG), *overrides, cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "non-finite loss at step" in result.stderr
    assert "2 non-finite losses in a row" in result.stderr and "Traceback" not in result.stderr


def test_sqlite_store_keeps_its_artifacts_beside_it(tmp_path):
    from semi_llie.engine.tracking import artifact_location

    assert artifact_location(f"sqlite:///{tmp_path}/db/mlflow.db") == (tmp_path / "db" / "artifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None  # a server decides for itself


@pytest.mark.slow
def test_an_undecodable_sample_mid_training_is_named_or_skipped_and_logged(tmp_path, tiny_shards):
    from test_streams import corrupt_first_png, damaged_copy

    import mlflow

    broken, shard = damaged_copy(tiny_shards, tmp_path / "broken", corrupt_first_png)
    overrides = tiny_overrides(broken, tmp_path / "run", "train.max_steps=4", "tracking.enabled=false")
    result = run_cli("train", "--config", str(TINY_CONFIG), *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"of shard {broken / shard}" in result.stderr and "data.skip_bad_samples=true" in result.stderr
    assert "Traceback" not in result.stderr

    overrides = tiny_overrides(broken, tmp_path / "skip", "train.max_steps=4", "data.skip_bad_samples=true")
    result = run_cli("train", "--config", str(TINY_CONFIG), *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped unreadable unlabeled samples: {shard}/" in result.stderr
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run_id = yaml.safe_load((tmp_path / "skip" / "run.json").read_text())["mlflow_run_id"]
    damaged = Manifest.open(broken).shards_of("unlabeled")[0].samples  # every sample of the shard
    assert mlflow.get_run(run_id).data.metrics["train/skipped_samples"] == damaged
    state = checkpointing.TrainerState.from_json(
        (checkpointing.latest_checkpoint(tmp_path / "skip") / "trainer_state.json").read_text()
    )
    assert len(state.skipped_samples["unlabeled"]) == damaged
    assert all(name.startswith(f"{shard}/") for name in state.skipped_samples["unlabeled"])


def test_the_champion_alias_goes_to_the_better_version_whatever_the_order(tmp_path):
    import mlflow
    from semi_llie.models import build_model
    from semi_llie.models.enhancer import Enhancer

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    enhancer = Enhancer(build_model({"type": "MambaLowlight", "embed_dim": 4, "depths": [1], "d_state": 2}))
    example = torch.rand(1, 3, 8, 8).numpy()
    same = {"dataset_manifest_sha256": "a" * 64, "metric_settings": '{"psnr_eps": 1e-10}'}

    def register(model_name: str, psnr: float, tags=same) -> str:
        tracker = Tracker(TrackingConfig(tracking_uri=uri, registered_model_name=model_name), True)
        tracker.start(None, {}, "model: {}\n")
        version = tracker.log_champion(enhancer, example, 10, tags, {"psnr": psnr, "ssim": 0.5})
        tracker.end()
        return version

    client = mlflow.MlflowClient(tracking_uri=uri)
    for name, order in (("better-first", (21.0, 19.0)), ("worse-first", (19.0, 21.0))):
        versions = {psnr: register(name, psnr) for psnr in order}
        champion = client.get_model_version_by_alias(name, "champion")
        assert str(champion.version) == versions[21.0], name
        assert champion.tags["val_psnr"] == "21.0000" and "21.00 dB" in champion.description
        loser = client.get_model_version(name, versions[19.0])
        assert loser.tags["run_best"] == "true"  # the best of its own run, visible in the registry
        if name == "better-first":
            assert "stays on version" in loser.description
    # A version scored on other val data never takes the alias, even with a higher PSNR.
    other = register("worse-first", 30.0, tags={**same, "dataset_manifest_sha256": "b" * 64})
    assert str(client.get_model_version_by_alias("worse-first", "champion").version) == versions[21.0]
    assert "other val data" in client.get_model_version("worse-first", other).description
