"""The launch configs and launch/train.sh's choice of them (DRY_RUN prints the command it would run)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
OURS = ("single_gpu", "multi_gpu", "multi_node", "deepspeed_zero1")


@pytest.mark.parametrize("name", OURS)
def test_accelerate_config_loads_and_says_what_it_is(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().startswith("# ")  # a one-line description
    config = load_config_from_file(str(path))  # rejects unknown keys and bad values
    assert config.compute_environment.value == "LOCAL_MACHINE"


def test_multi_node_config_uses_a_c10d_rendezvous() -> None:
    config = yaml.safe_load((CONFIGS / "multi_node.yaml").read_text())
    assert config["rdzv_backend"] == "c10d" and config["same_network"] is False


def test_deepspeed_zero1_config_is_stage_1_with_values_filled_at_run_time() -> None:
    accelerate_config = yaml.safe_load((CONFIGS / "deepspeed_zero1.yaml").read_text())
    settings = accelerate_config["deepspeed_config"]
    assert settings["deepspeed_multinode_launcher"] == "standard"  # torchrun per node, as srun starts it
    ds_config = json.loads((ROOT / settings["deepspeed_config_file"]).read_text())
    assert ds_config["zero_optimization"]["stage"] == 1
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        assert ds_config[key] == "auto"  # semi_llie.engine.distributed.configure_deepspeed fills them


def test_deepspeed_accepts_the_zero1_config() -> None:
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=str(ROOT / "configs" / "deepspeed" / "zero1.json"))
    assert plugin.zero_stage == 1


def dry_run(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_", "NUM_", "MACHINE_", "MAIN_"))}
    clean.pop("ACCELERATE_CONFIG", None)
    clean.pop("DEVICE", None)
    command = ["bash", str(ROOT / "launch" / "train.sh"), "--config", "configs/tiny_test.yaml", "a.b=1"]
    return subprocess.run(
        command, env={**clean, "DRY_RUN": "1", **env}, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CUDA_VISIBLE_DEVICES": ""}, "--config_file configs/accelerate/single_gpu.yaml -m semi_llie"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "configs/accelerate/multi_gpu.yaml --num_processes 3 -m"),
        ({"DEVICE": "cpu", "NUM_PROCESSES": "2", "ACCELERATE_CONFIG": "multi_gpu"}, "--num_processes 2 -m"),
        (
            {"DEVICE": "cpu", "NUM_MACHINES": "2", "MACHINE_RANK": "1", "MAIN_PROCESS_IP": "10.0.0.1"},
            "multi_node.yaml --num_processes 2 --num_machines 2 --machine_rank 1 --rdzv_conf is_host=0 "
            "--main_process_ip 10.0.0.1 --main_process_port 29500 -m semi_llie train --config "
            "configs/tiny_test.yaml a.b=1",
        ),
        (
            {"ACCELERATE_CONFIG": "deepspeed_zero1", "CUDA_VISIBLE_DEVICES": "0,1"},
            "deepspeed_zero1.yaml --num",
        ),
    ],
)
def test_train_sh_picks_the_config_and_process_counts(env: dict[str, str], expected: str) -> None:
    result = dry_run(**env)
    assert result.returncode == 0, result.stderr
    assert expected in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACCELERATE_CONFIG": "nope"}, "configs/accelerate/nope.yaml not found"),
        ({"NUM_MACHINES": "2", "DEVICE": "cpu"}, "needs MACHINE_RANK"),
        ({"DEVICE": "gpu"}, "DEVICE must be cpu or unset"),
    ],
)
def test_train_sh_rejects_incomplete_settings(env: dict[str, str], message: str) -> None:
    result = dry_run(**env)
    assert result.returncode != 0 and message in result.stderr


STUBS = {
    # Just enough SLURM for the batch script to run outside a cluster: two nodes, the first at 10.1.1.1.
    "scontrol": '[[ $2 == hostnames ]] && printf "node1\\nnode2\\n" || echo "NodeName=$3 NodeAddr=10.1.1.1"',
    "srun": 'printf "%s\\n" "$@" > "$SRUN_ARGS"',
}


def sbatch_start(tmp_path: Path, *args: str, restart: int = 0, checkpoint: bool = False) -> list[str]:
    """Run slurm/train.sbatch's start logic with stub srun/scontrol; return the arguments srun received."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (stubs / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (stubs / name).chmod(0o755)
    run_dir = tmp_path / "run"
    if checkpoint:
        (run_dir / "checkpoints" / "step-4").mkdir(parents=True)
        (run_dir / "checkpoints" / "step-4" / "trainer_state.json").write_text("{}")
    env = {
        **os.environ,
        "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "SRUN_ARGS": str(tmp_path / "srun"),
    }
    env.update(SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NUM_NODES="2")
    env["SLURM_RESTART_COUNT"] = str(restart)
    config = ["--config", "configs/tiny_test.yaml", f"train.output_dir={run_dir}"]
    command = ["bash", str(ROOT / "slurm" / "train.sbatch"), *config, *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rendezvous 10.1.1.1:21234" in result.stdout  # first node's address, port from the job id
    return (tmp_path / "srun").read_text().splitlines()


@pytest.mark.parametrize(
    ("args", "restart", "checkpoint", "start"),
    [
        ((), 0, False, []),  # a new run
        ((), 0, True, ["--resume", "latest"]),  # resubmitted: continue
        (("--overwrite",), 0, True, ["--overwrite"]),  # the user's choice on the first start
        (("--overwrite",), 1, True, ["--resume", "latest"]),  # a restart never wipes its own progress
        (("--resume", "/old/step-9"), 1, False, ["--resume", "/old/step-9"]),  # preempted before a checkpoint
        (("--resume", "/old/step-9"), 1, True, ["--resume", "latest"]),
    ],
)
def test_train_sbatch_resumes_from_the_runs_own_checkpoints(
    tmp_path: Path, args: tuple[str, ...], restart: int, checkpoint: bool, start: list[str]
) -> None:
    srun_args = sbatch_start(tmp_path, *args, restart=restart, checkpoint=checkpoint)
    # srun ... bash -c SCRIPT launch/train.sh TRAIN_ARGS...: the training arguments follow launch/train.sh
    train_args = srun_args[srun_args.index("launch/train.sh") + 1 :]
    assert train_args[:2] == ["--config", "configs/tiny_test.yaml"]
    assert train_args[3:] == start
    assert "MACHINE_RANK=$SLURM_NODEID" in " ".join(srun_args)  # evaluated inside each task
