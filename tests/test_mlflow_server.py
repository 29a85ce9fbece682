"""mlflow/serve.sh end to end: a tracking server on a free loopback port receives a 2-step training run, which
`semi-llie runs compare` reads back through it; a second server on the same port and a server that never
answers /health in time both make the script exit non-zero."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import pytest
from conftest import TINY_CONFIG, cli_env, run_cli

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "mlflow" / "serve.sh"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(store: Path, port: int, *options: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # One web worker: the default four take minutes to import on a busy 2-core CI machine.
    command = ["bash", str(SERVE), "--port", str(port), "--workers", "1", "--log-dir", str(store)]
    command += ["--backend-store-uri", f"sqlite:///{store}/mlflow.db"]
    command += ["--artifacts-destination", str(store / "artifacts"), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=cli_env())


def answers(url: str) -> bool:
    try:
        return urlopen(f"{url}/health", timeout=5).read() == b"OK"
    except (URLError, ConnectionError):
        return False


def test_server_tracks_a_run_that_runs_compare_reads_back(tiny_shards: Path, tmp_path: Path) -> None:
    port, store = free_port(), tmp_path / "server"
    url = f"http://127.0.0.1:{port}"
    started = serve(store, port, "--detach")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "--host 127.0.0.1" in started.stdout  # loopback unless told otherwise
        assert f"export MLFLOW_TRACKING_URI={url}" in started.stdout
        assert answers(url)

        clash = serve(tmp_path / "clash", port, "--detach")
        assert clash.returncode != 0 and "already answers" in clash.stderr

        env = cli_env(MLFLOW_TRACKING_URI=url)
        overrides = [
            f"data.shards={tiny_shards}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
        ]
        trained = run_cli("train", "--config", str(TINY_CONFIG), *overrides, cwd=tmp_path, env=env)
        assert trained.returncode == 0, trained.stderr[-3000:]
        run_id = json.loads((tmp_path / "run" / "run.json").read_text())["mlflow_run_id"]
        assert (store / "mlflow.db").is_file()
        # artifacts (the validation grid, the registered teacher) were uploaded through the server
        assert any(path.is_file() for path in (store / "artifacts").rglob("*"))

        report = tmp_path / "compare"
        compared = run_cli(
            "runs", "compare", "--experiment", "semi-llie-tests", "--out", str(report), cwd=tmp_path, env=env
        )
        assert compared.returncode == 0, compared.stderr[-3000:]
        with report.with_suffix(".csv").open() as stream:
            (row,) = list(csv.DictReader(stream))
        assert run_id.startswith(row["run"])
        assert row["status"] == "FINISHED" and row["train.max_steps"] == "2"
        assert float(row["val/psnr (max)"]) > 0 and row["val/psnr step"] == "2"
    finally:
        stopped = serve(store, port, "--stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not answers(url)


def test_server_that_never_answers_health_in_time_exits_nonzero(tmp_path: Path) -> None:
    port = free_port()
    result = serve(tmp_path, port, "--detach", "--health-timeout", "1")
    assert result.returncode == 1
    assert "no answer" in result.stderr or "exited before answering" in result.stderr
    assert not answers(f"http://127.0.0.1:{port}")
    assert not (tmp_path / f"server-{port}.pid").exists()
