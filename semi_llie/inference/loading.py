"""Loading the deployable `Enhancer` from a checkpoint, a run's output dir or MLflow.

enhancer = load_enhancer("runs/lol_v1")                              # OUTPUT_DIR: its latest checkpoint
enhancer = load_enhancer("runs/lol_v1/checkpoints/step-2000", which="student")
enhancer = load_enhancer("models:/semi-llie-teacher@champion")       # the registered champion
y = enhancer(x)                                                      # B×3×H×W in [0, 1] -> same shape
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from semi_llie.errors import UserError
from semi_llie.models.enhancer import Enhancer

MLFLOW_URI_SCHEMES = ("models:/", "runs:/")
WHICH = ("teacher", "student")


def load_enhancer(
    source: str | Path,
    which: str = "teacher",
    device: str | torch.device = "cpu",
    tracking_uri: str | None = None,
) -> Enhancer:
    """The Enhancer of a checkpoint step dir, of an OUTPUT_DIR's latest checkpoint, or of an MLflow model URI.

    `which` picks teacher.pt or student.pt of a checkpoint; an MLflow URI names one logged model already.
    `tracking_uri` (else $MLFLOW_TRACKING_URI, else the project's SQLite default) resolves MLflow URIs.
    Returned in eval mode on `device`.
    """
    if which not in WHICH:
        raise UserError(f"which={which!r} is not a model of a checkpoint; use one of {', '.join(WHICH)}")
    text = str(source)
    if text.startswith(MLFLOW_URI_SCHEMES):
        if which != "teacher":
            raise UserError(
                f"{text} names one logged model; --which applies to checkpoint dirs only, drop it"
            )
        enhancer = _load_mlflow(text, device, tracking_uri)
    else:
        enhancer = Enhancer(_load_checkpoint_model(find_step_dir(Path(text), which), which, device))
    return enhancer.to(device).eval()


def find_step_dir(path: Path, which: str = "teacher") -> Path:
    """`path` itself if it is a checkpoint step dir, else the latest checkpoint of the output dir `path`."""
    if not path.exists():
        raise UserError(
            f"checkpoint {path} does not exist; pass a checkpoint step dir or a training output dir"
        )
    if (path / "config.yaml").is_file() and (path / f"{which}.pt").is_file():
        return path
    from semi_llie.engine.checkpointing import latest_checkpoint

    step_dir = latest_checkpoint(path) if path.is_dir() else None
    if step_dir is None:
        raise UserError(
            f"{path} is neither a checkpoint step dir (config.yaml + {which}.pt) nor a training output dir "
            "with checkpoints/; pass OUTPUT_DIR or OUTPUT_DIR/checkpoints/step-N"
        )
    return step_dir


def _load_checkpoint_model(step_dir: Path, which: str, device: str | torch.device) -> nn.Module:
    from semi_llie.models import build_model

    config_path, weights_path = step_dir / "config.yaml", step_dir / f"{which}.pt"
    if not weights_path.is_file():
        raise UserError(f"{weights_path} is missing; the checkpoint is incomplete, use an earlier step dir")
    model_cfg = _model_block(config_path)
    if torch.device(device).type != "cuda" and model_cfg.get("scan_backend") == "cuda":
        # Trained with the CUDA scan kernel; the torch scan computes the same function on other devices.
        model_cfg["scan_backend"] = "auto"
    model = build_model(model_cfg)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(
            f"{weights_path} cannot be read as a state dict ({err}); use another checkpoint"
        ) from err
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0]
        raise UserError(
            f"{weights_path} does not match the model block of {config_path} ({first_line}); "
            "the checkpoint and its config.yaml come from different models"
        ) from err
    return model


def _model_block(config_path: Path) -> dict[str, Any]:
    if not config_path.is_file():
        raise UserError(f"{config_path} is missing; a checkpoint step dir must hold the run's config.yaml")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as err:
        raise UserError(
            f"{config_path} is not valid YAML ({err}); restore it from the run's output dir"
        ) from err
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"{config_path} has no 'model:' block; it is not a semi-llie run config")
    return dict(config["model"])


def _load_mlflow(uri: str, device: str | torch.device, tracking_uri: str | None) -> Enhancer:
    import mlflow.pytorch
    import mlflow.tracking._model_registry.utils as registry_utils
    from mlflow.exceptions import MlflowException

    import mlflow
    from semi_llie.engine.tracking import resolve_tracking_uri

    store = resolve_tracking_uri(tracking_uri)
    # `models:/` URIs resolve through the registry URI, `runs:/` through the tracking URI: point both at
    # the store for this call only, so loading a model leaves the caller's MLflow settings as they were.
    # Restore the caller's raw settings, not their resolved values: an unset registry must keep following
    # the tracking URI. mlflow's setters also export MLFLOW_*_URI to the environment, so restore that too.
    saved_env = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = mlflow.get_tracking_uri(), registry_utils._registry_uri
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    try:
        model = mlflow.pytorch.load_model(uri, map_location=torch.device(device))
    except MlflowException as err:
        raise UserError(f"cannot load {uri} from the MLflow store {store}: {err.message}") from err
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if not isinstance(model, Enhancer):
        # e.g. a torch.export graph (mlflow's "pt2" format): it is fixed to the logged example's image size.
        raise UserError(
            f"{uri} holds a {type(model).__name__}, not a semi_llie Enhancer; log the Enhancer with "
            "mlflow.pytorch.log_model(..., serialization_format='pickle') so it accepts any image size"
        )
    return model
