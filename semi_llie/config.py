"""The training config: typed blocks validated from YAML plus dotted command-line overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=10", "optim.lr=1e-4"])

Every block forbids unknown keys, so a typo (`optim.lr_rate`) is a ConfigError naming the key instead of a
silently ignored setting. Blocks that are built by a registry (`model`, the loss slots and their `semantic`
extractor) are free mappings here; the registry rejects their unknown keys when the trainer builds them,
before the first step. Loss slot names are checked here.

Units: schedule lengths (`train.max_steps`, `validate_every`, `checkpoint_every`, `optim.milestones`) are
optimizer steps when given as integers (one step = `gradient_accumulation_steps` micro-batches on every rank),
or epochs when given as "N epochs" (N may be fractional), so a recipe keeps its length on any number of GPUs.
One epoch is one pass over the unlabeled split, as in the official trainer (it iterates over its unlabeled
loader and cycles the labeled one), or over the labeled split when no unlabeled batches are drawn:
ceil(samples / (batch size × processes × gradient_accumulation_steps)) steps (`epoch_steps`). The trainer
converts epochs to steps at start (`Schedule.resolve`) and logs the result. The unsupervised ramp
(`losses.unsup_weight.unit`) counts the same epochs.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from semi_llie.errors import ConfigError

# The paper's objective (METHOD §3), slot by slot: a `losses:` slot left out of a config takes this block
# (semi_llie.losses.build_objective). It lives on the ground floor: validating a config needs no model code.
DEFAULT_LOSS_CONFIG: dict[str, dict[str, Any]] = {
    "semantic": {"type": "RAM", "checkpoint": None, "size": "large"},
    "fidelity": {"type": "FidelityLoss", "loss_weight": 1.0, "l1_weight": 0.8, "mse_weight": 0.2},
    "ram_perceptual": {"type": "RAMPerceptualLoss", "loss_weight": 0.1},
    "gradient": {"type": "GradientLoss", "loss_weight": 0.1},
    "consistency": {"type": "ConsistencyLoss", "loss_weight": 1.0},
    "contrastive": {"type": "SemanticContrastiveLoss", "loss_weight": 1.0},
    "unsup_weight": {"weight": 0.1, "ramp_length": 100, "unit": "epoch", "until": None},
}


class Block(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_EPOCHS = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*epochs?\s*$")
Length = int | str  # optimizer steps, or "N epochs"


def check_length(value: Length) -> Length:
    """Validate a schedule length: an integer >= 1 (steps) or "N epochs" with N > 0."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a number of steps or 'N epochs'")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{value} steps: a length must be at least 1 step")
        return value
    match = _EPOCHS.match(value)
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"{value!r} is neither a number of steps nor 'N epochs' (e.g. 200 or '10 epochs')")
    return value


def to_steps(value: Length, steps_per_epoch: int) -> int:
    """A schedule length in optimizer steps: epochs are rounded up to whole steps (at least 1)."""
    if isinstance(value, int):
        return value
    return max(1, math.ceil(float(_EPOCHS.match(value)[1]) * steps_per_epoch - 1e-9))


def epoch_steps(samples: int, batch_size: int, world_size: int, accumulation: int) -> int:
    """Optimizer steps in one pass over `samples` with `batch_size` per process (the last one partial)."""
    return max(1, math.ceil(samples / (batch_size * world_size * accumulation)))


class DataConfig(Block):
    shards: str  # shard location: folder, manifest path, URL or `pipe:` command (semi_llie.data.manifest)
    batch_size_labeled: int = Field(8, ge=1)  # per process
    batch_size_unlabeled: int = Field(8, ge=0)  # per process; 0 trains on labeled pairs only
    crop_size: int = Field(256, ge=8)  # labeled random crop
    # Keep decoded labeled pairs in RAM (9 bytes per pixel per pair, per data reader): for small labeled sets
    # trained with small crops and large batches, where PNG decoding would bound the step.
    cache_labeled: bool = False
    unlabeled_size: int = Field(256, ge=8)  # weak/strong views are resized to this square size
    # The strong view: METHOD §2's colour jitter, grayscale and blur ("paper"), or exposure, sensor noise and
    # blur ("lowlight", semi_llie.data.augment.lowlight_strong_view).
    strong_augment: Literal["paper", "lowlight"] = "paper"
    # The labeled low crop as decoded ("none", the paper) or retaken at ×U(0.5, 1.5) exposure ("exposure",
    # semi_llie.data.augment.random_exposure): the lowlight strong view's exposure change on labeled pairs.
    labeled_augment: Literal["none", "exposure"] = "none"
    num_workers: int = Field(2, ge=0)
    seed: int = 2022
    # An undecodable sample or a truncated shard stops training with an error naming it (false), or is
    # skipped, counted and logged as train/skipped_samples (true).
    skip_bad_samples: bool = False


class BankConfig(Block):
    enabled: bool = True
    # A scorer of semi_llie.metrics.scorers.SCORERS: a no-reference metric of semi_llie.metrics.table
    # (musiq as in the paper; piqe needs no file, niqe basicsr's parameter file) or one added by
    # register_scorer.
    metric: str = "musiq"
    score_batch_size: int = Field(16, ge=1)


class TeacherConfig(Block):
    decay: float = Field(0.996, gt=0, lt=1)  # upper bound of α_t = min(1 - 1/(t+1), decay)
    # Pseudo-label: the teacher on the weak view (the paper), or averaged over the view's 8 dihedral
    # symmetries (docs/results/label_efficiency.md measures both).
    pseudo_label: Literal["weak", "dihedral8"] = "weak"


class OptimConfig(Block):
    type: Literal["AdamW"] = "AdamW"  # the paper's AdamP is not implemented (METHOD §7 allows AdamW)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    milestones: list[Length] = Field(default_factory=list)  # lengths (steps or "N epochs") where lr *= gamma
    gamma: float = Field(0.1, gt=0)
    grad_clip: float | None = Field(None, gt=0)  # max global L2 norm; None = no clipping

    @field_validator("milestones")
    @classmethod
    def _lengths(cls, milestones: list[Length]) -> list[Length]:
        milestones = [check_length(m) for m in milestones]
        steps = [m for m in milestones if isinstance(m, int)]
        if len(steps) == len(milestones) and any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError("milestones must be strictly increasing")
        return milestones


class TrainConfig(Block):
    output_dir: str = "runs/semi-llie"
    max_steps: Length  # optimizer steps, or "N epochs"
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    validate_every: Length = 500  # steps or "N epochs"; also at the last step
    val_max_samples: int | None = Field(None, ge=1)  # cap the val split (None = all of it)
    val_grid_samples: int = Field(2, ge=0)  # val images shown in the MLflow grid
    checkpoint_every: Length = 1000  # steps or "N epochs"; also at the last step
    checkpoints_total_limit: int | None = Field(3, ge=1)  # keep the newest N step dirs; None = keep all
    max_nonfinite_steps: int = Field(5, ge=1)  # stop after this many non-finite losses in a row
    log_every: int = Field(10, ge=1)  # MLflow train/* metrics every N optimizer steps

    @field_validator("max_steps", "validate_every", "checkpoint_every")
    @classmethod
    def _length(cls, value: Length) -> Length:
        return check_length(value)


class TrackingConfig(Block):
    enabled: bool = True
    experiment: str = "semi-llie"
    run_name: str | None = None
    # None: $MLFLOW_TRACKING_URI if set, else the embedded SQLite store below (relative to the working dir).
    tracking_uri: str | None = None
    registered_model_name: str = "semi-llie-teacher"
    alias: str = "champion"
    log_model: bool = True  # log + register the teacher on each new best val/psnr
    # Set by `semi-llie sweep` for its child runs: the sweep's MLflow parent run and tags naming the child's
    # grid cell (sweep.group) and seed, which `runs compare --sweep` groups by.
    parent_run_id: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)


class Config(Block):
    model: dict[str, Any]  # `type: MambaLowlight` block passed to semi_llie.models.build_model
    data: DataConfig
    # The objective (semi_llie.losses.build_objective): slots fidelity, ram_perceptual, gradient, consistency,
    # contrastive (loss blocks with `type:` and `loss_weight`), semantic (the frozen RAM/SAM extractor
    # block) and unsup_weight (weight, ramp_length, unit: epoch|step, until). A slot left out takes the
    # paper's block.
    losses: dict[str, dict[str, Any]] = Field(default_factory=dict)
    bank: BankConfig = Field(default_factory=BankConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _model_has_a_type(self) -> Config:
        if "type" not in self.model:
            raise ValueError("the model block needs a `type:` key (e.g. type: MambaLowlight)")
        return self

    @field_validator("losses")
    @classmethod
    def _known_loss_slots(cls, losses: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for slot in losses:
            if slot not in DEFAULT_LOSS_CONFIG:
                hint = difflib.get_close_matches(slot, DEFAULT_LOSS_CONFIG, n=1)
                suggestion = f" (did you mean 'losses.{hint[0]}'?)" if hint else ""
                raise ValueError(
                    f"unknown key 'losses.{slot}'{suggestion}; known slots: {', '.join(DEFAULT_LOSS_CONFIG)}"
                )
        return losses

    def epoch_length(self, samples: dict[str, int], world_size: int) -> int:
        """Optimizer steps per epoch (module docstring), from the splits' sample counts."""
        if self.data.batch_size_unlabeled > 0 and samples.get("unlabeled", 0) > 0:
            split, batch = "unlabeled", self.data.batch_size_unlabeled
        else:
            split, batch = "labeled", self.data.batch_size_labeled
        return epoch_steps(samples[split], batch, world_size, self.train.gradient_accumulation_steps)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


@dataclass(frozen=True)
class Schedule:
    """The schedule lengths of a config in optimizer steps, for one world size."""

    steps_per_epoch: int
    max_steps: int
    validate_every: int
    checkpoint_every: int
    milestones: list[int]

    @classmethod
    def resolve(cls, cfg: Config, steps_per_epoch: int) -> Schedule:
        milestones = [to_steps(m, steps_per_epoch) for m in cfg.optim.milestones]
        if any(b <= a for a, b in zip(milestones, milestones[1:], strict=False)):
            raise ConfigError(f"optim.milestones must increase; in steps they are {milestones}")
        return cls(
            steps_per_epoch=steps_per_epoch,
            max_steps=to_steps(cfg.train.max_steps, steps_per_epoch),
            validate_every=to_steps(cfg.train.validate_every, steps_per_epoch),
            checkpoint_every=to_steps(cfg.train.checkpoint_every, steps_per_epoch),
            milestones=milestones,
        )

    def describe(self) -> str:
        return (
            f"one epoch = {self.steps_per_epoch} steps; max_steps {self.max_steps}, milestones "
            f"{self.milestones}, validate every {self.validate_every}, "
            f"checkpoint every {self.checkpoint_every}"
        )


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `key.sub=value` overrides (values parsed as YAML) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML ({err}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of blocks (model:, data:, train:, ...)")
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw, source=str(path))


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict in place; the value is parsed as YAML (`3`, `1e-4`, `[1, 2]`)."""
    dotted, sep, text = override.partition("=")
    if not sep or not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = raw
    *parents, leaf = dotted.split(".")
    for depth, key in enumerate(parents):
        child = node.setdefault(key, {})
        if child is None:  # e.g. `semantic: null` in the file, now being filled in
            child = node[key] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(
                f"override {override!r}: {where} is a value, not a block, so it has no sub-keys"
            )
        node = child
    node[leaf] = value


def validate_config(raw: Mapping[str, Any], source: str = "config") -> Config:
    """Validate a nested dict into a Config; the first problem becomes a ConfigError naming its dotted key."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err.errors()[0], raw, source)) from None


def _describe(error: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> str:
    location = [str(part) for part in error["loc"]]
    key = ".".join(location) or "(top level)"
    if error["type"] == "extra_forbidden":
        known = _known_keys(location[:-1])
        hint = difflib.get_close_matches(location[-1], known, n=1)
        suggestion = f" (did you mean {'.'.join([*location[:-1], hint[0]])!r}?)" if hint else ""
        return f"{source}: unknown key {key!r}{suggestion}; known keys here: {', '.join(known)}"
    if error["type"] == "missing":
        return f"{source}: required key {key!r} is missing; add it to the YAML or pass {key}=VALUE"
    if error["type"] == "value_error":  # our own validators' messages are whole sentences
        return f"{source}: {key}: {error['ctx']['error']}"
    return f"{source}: {key}: {error['msg']} (got {error.get('input')!r})"


def _known_keys(path: list[str]) -> list[str]:
    """Field names of the typed block at `path` (e.g. ["optim"] -> lr, weight_decay, ...)."""
    block: type[BaseModel] = Config
    for name in path:
        field = block.model_fields.get(name)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        block = annotation
    return list(block.model_fields)


def flatten(cfg: Config) -> dict[str, str]:
    """Dotted key -> value string, for MLflow params (`optim.lr` -> "0.0002")."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        else:
            flat[prefix] = str(value)

    walk("", cfg.model_dump(mode="json"))
    return flat
