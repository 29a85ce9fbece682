"""MLflow tracking for the trainer: rank 0 only, never fatal.

Tracking URI: `tracking.tracking_uri` if set, else `$MLFLOW_TRACKING_URI`, else the embedded SQLite store
`sqlite:///mlruns/mlflow.db` with artifacts in `mlruns/artifacts` (both relative to the working directory).
If the store cannot be reached, or any MLflow call fails later, the Tracker says so once on stderr and turns
into a no-op: losing the tracking must never lose the training.

Model logging is the only expensive call; the trainer makes it only on a new best validation score.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import subprocess
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from torch import nn
from webdataset import gopen

import semi_llie
from semi_llie.config import TrackingConfig
from semi_llie.data.manifest import MANIFEST_NAME, Manifest, resolve

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
MODEL_ARTIFACT = "teacher"
# Packages the logged Enhancer imports at load time (semi_llie itself travels as code_paths).
MODEL_REQUIREMENTS = ("torch", "numpy", "einops", "pyyaml", "pydantic")

T = TypeVar("T")

# Tags of `semi-llie sweep` runs: the sweep's name on every child and the parent, and on each child its
# grid cell (`key=value, key=value`) and seed offset; `runs compare` groups children by sweep and cell.
SWEEP_TAG = "sweep.name"
GROUP_TAG = "sweep.group"
SEED_TAG = "sweep.seed"


def resolve_tracking_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for a new experiment: `artifacts/` beside an embedded SQLite store.

    MLflow would otherwise put a SQLite store's artifacts under ./mlruns of whatever the working directory
    is; a server decides its own artifact location (None).
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "artifacts").as_uri()


def pinned_requirements() -> list[str]:
    """`name==version` of the installed model dependencies (local build tags like `+cpu` dropped)."""
    pins = []
    for name in MODEL_REQUIREMENTS:
        version = importlib.metadata.version(name).split("+")[0]
        pins.append(f"{name}=={version}")
    return pins


def manifest_sha256(manifest: Manifest) -> str:
    """sha256 of the shard folder's manifest.json bytes: it pins every shard's sha256 in turn."""
    with gopen(resolve(manifest.location, MANIFEST_NAME), "rb") as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def git_commit() -> str:
    """The commit of the semi_llie source tree, or "unknown" outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(semi_llie.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """One MLflow run. Every method is a no-op on ranks other than 0, when disabled, or after a failure."""

    def __init__(self, cfg: TrackingConfig, is_main_process: bool) -> None:
        self.cfg = cfg
        self.uri = resolve_tracking_uri(cfg.tracking_uri)
        self.active = cfg.enabled and is_main_process
        self.run_id: str | None = None
        self._run_best: str | None = None  # the version this process last registered as the run's best

    def start(
        self, run_id: str | None, params: Mapping[str, str], config_yaml: str, at_step: int = 0
    ) -> str | None:
        """Open the run, or reopen a resumed one (RUN_ID) at step AT_STEP; its id (None if inactive)."""
        if not self.active:
            return None
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        if not self._reachable():
            return None
        return self._guard("start the run", lambda: self._start(run_id, params, config_yaml, at_step))

    def _reachable(self) -> bool:
        if not self.uri.startswith(("http://", "https://")):
            return True
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5):
                return True
        except OSError as err:
            self._disable(f"the MLflow server {self.uri} is unreachable ({err})")
            return False

    def _start(self, run_id: str | None, params: Mapping[str, str], config_yaml: str, at_step: int) -> str:
        import mlflow

        if self.uri.startswith("sqlite:///"):  # SQLite creates the file but not its folder
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        if run_id is not None and self._run_exists(run_id):
            mlflow.start_run(run_id=run_id)
            self.run_id = run_id
            self._record_changed_params(run_id, params, at_step)
            return run_id
        experiment = mlflow.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            mlflow.create_experiment(self.cfg.experiment, artifact_location=artifact_location(self.uri))
        mlflow.set_experiment(self.cfg.experiment)
        run = mlflow.start_run(
            run_name=self.cfg.run_name, parent_run_id=self.cfg.parent_run_id, tags=self.cfg.tags or None
        )
        items = list(params.items())
        for start in range(0, len(items), 100):  # MLflow's batch limit
            mlflow.log_params(dict(items[start : start + 100]))
        mlflow.log_text(config_yaml, "config.yaml")
        self.run_id = run.info.run_id
        return self.run_id

    @staticmethod
    def _record_changed_params(run_id: str, params: Mapping[str, str], at_step: int) -> None:
        """Tag the params a resume changed (thread count, a longer schedule): MLflow params are write-once."""
        import mlflow

        logged = mlflow.get_run(run_id).data.params
        changed = {key: (logged.get(key), value) for key, value in params.items() if logged.get(key) != value}
        if not changed:
            return
        text = "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in sorted(changed.items()))
        mlflow.set_tag(f"resumed.step_{at_step}.changed_params", text[:5000])  # MLflow's tag value limit
        logger.warning(
            "resumed at step %d with params that differ from the run's first start: %s", at_step, text
        )

    def _run_exists(self, run_id: str) -> bool:
        import mlflow

        try:
            mlflow.get_run(run_id)
            return True
        except mlflow.exceptions.MlflowException:
            logger.warning("MLflow run %s (from run.json) is not in %s; starting a new run", run_id, self.uri)
            return False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.active and metrics:
            import mlflow

            self._guard("log metrics", lambda: mlflow.log_metrics(dict(metrics), step=step))

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """image: H×W×3 uint8."""
        if self.active:
            import mlflow

            self._guard("log an image", lambda: mlflow.log_image(image, artifact_file=artifact_file))

    def log_champion(
        self,
        enhancer: nn.Module,
        example: np.ndarray,
        step: int,
        tags: Mapping[str, str],
        scores: Mapping[str, float],
    ) -> str | None:
        """Log and register this run's new best teacher; move the alias to it only if it has earned it.

        example: 1×3×H×W float32 in [0, 1], used for the signature and as the input example. scores: the
        version's val metrics ("psnr", "ssim"), written as tags and into its description. `tags` must hold
        `dataset_manifest_sha256` and `metric_settings`: the alias moves only when there is no champion
        yet, or the champion was scored on the same val data with the same settings and the new version's
        val PSNR is higher. Otherwise the version is only tagged `run_best` (an ablation or a sweep child
        started later never takes the alias from a better model). Returns the new version.
        """
        if not (self.active and self.cfg.log_model and self.run_id):
            return None
        return self._guard(
            "log and register the teacher",
            lambda: self._log_champion(enhancer, example, step, tags, scores),
        )

    def _log_champion(
        self,
        enhancer: nn.Module,
        example: np.ndarray,
        step: int,
        tags: Mapping[str, str],
        scores: Mapping[str, float],
    ) -> str:
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        import mlflow

        # Any batch and any H×W: the network is fully convolutional at input resolution.
        images = Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))])
        info = mlflow.pytorch.log_model(
            enhancer,
            name=MODEL_ARTIFACT,
            signature=ModelSignature(inputs=images, outputs=images),
            input_example=example,
            pip_requirements=pinned_requirements(),
            code_paths=[str(Path(semi_llie.__file__).parent)],
            registered_model_name=self.cfg.registered_model_name,
            step=step,
            serialization_format="pickle",  # the whole module, any H×W (pt2 export would fix the shapes)
        )
        name, version = self.cfg.registered_model_name, str(info.registered_model_version)
        client = mlflow.MlflowClient()
        version_tags = {
            "run_id": self.run_id,
            "step": str(step),
            **tags,
            **{f"val_{metric}": f"{value:.4f}" for metric, value in scores.items()},
            "run_best": "true",
        }
        for key, value in version_tags.items():
            client.set_model_version_tag(name, version, key, str(value))
        if self._run_best is not None:  # this run's previous best is no longer its best
            client.delete_model_version_tag(name, self._run_best, "run_best")
        self._run_best = version
        earned, reason = self._earns_alias(client, version_tags)
        client.update_model_version(
            name,
            version,
            description=f"teacher of run {self.run_id} at step {step}: val PSNR {scores['psnr']:.2f} dB, "
            f"SSIM {scores['ssim']:.4f} on dataset {tags['dataset_manifest_sha256'][:12]}; {reason}",
        )
        if earned:
            client.set_registered_model_alias(name, self.cfg.alias, version)
        logger.info("model version %s: %s", version, reason)
        return version

    def _earns_alias(self, client: Any, candidate: Mapping[str, str]) -> tuple[bool, str]:
        """(whether the candidate version takes the alias, why) against the current alias holder."""
        name, alias = self.cfg.registered_model_name, self.cfg.alias
        try:
            champion = client.get_model_version_by_alias(name, alias)
        except Exception:  # noqa: BLE001 - MLflow raises a generic error when the alias does not exist
            return True, f"the first @{alias}"
        same_data = all(
            champion.tags.get(key) == candidate[key] for key in ("dataset_manifest_sha256", "metric_settings")
        )
        if not same_data:
            return False, (
                f"@{alias} (version {champion.version}) was scored on other val data or metric settings, so "
                "the alias stays; register to another tracking.registered_model_name to compare afresh"
            )
        held = float(champion.tags.get("val_psnr", "-inf"))
        if float(candidate["val_psnr"]) > held:
            return True, f"@{alias}: beats version {champion.version} ({held:.2f} dB)"
        return False, f"@{alias} stays on version {champion.version} ({held:.2f} dB), which scores higher"

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            import mlflow

            self._guard("end the run", lambda: mlflow.end_run(status=status))

    def _guard(self, what: str, call: Callable[[], T]) -> T | None:
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - any tracking failure must leave training running
            self._disable(f"could not {what} in MLflow at {self.uri} ({type(err).__name__}: {err})")
            return None

    def _disable(self, reason: str) -> None:
        self.active = False
        logger.warning("%s; training goes on without MLflow tracking", reason)
