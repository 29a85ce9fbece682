from pathlib import Path

import pytest
import yaml

from semi_llie.config import Config, Schedule, apply_override, flatten, load_config, to_steps, validate_config
from semi_llie.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MINIMAL = {
    "model": {"type": "MambaLowlight", "embed_dim": 16},
    "data": {"shards": "shards/demo"},
    "train": {"max_steps": 10},
}


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_minimal_config_fills_the_paper_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.optim.lr == 2e-4 and cfg.optim.weight_decay == 1e-4 and cfg.optim.gamma == 0.1
    assert cfg.teacher.decay == 0.996
    assert cfg.data.seed == 2022 and cfg.data.crop_size == 256
    assert cfg.losses == {}  # every loss slot takes the paper's block (semi_llie.losses.DEFAULT_LOSS_CONFIG)
    assert cfg.tracking.registered_model_name == "semi-llie-teacher" and cfg.tracking.alias == "champion"


def test_overrides_are_parsed_as_yaml_values(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        [
            "train.max_steps=3",
            "optim.lr=1e-3",
            "optim.milestones=[2, 5]",
            "model.depths=[1, 1]",
            "losses.contrastive.loss_weight=0",
        ],
    )
    assert cfg.train.max_steps == 3
    assert cfg.optim.lr == 1e-3
    assert cfg.optim.milestones == [2, 5]
    assert cfg.model["depths"] == [1, 1]
    assert cfg.losses == {"contrastive": {"loss_weight": 0}}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.lr_rate=1", "optim.lr_rate"),
        ("trian.max_steps=3", "trian"),
        ("train.checkpoint_evry=5", "train.checkpoint_evry"),
    ],
)
def test_unknown_key_is_named_with_a_suggestion(tmp_path, override, named):
    with pytest.raises(ConfigError, match=rf"unknown key '{named}'"):
        load_config(write(tmp_path, MINIMAL), [override])


def test_unknown_key_in_the_file_suggests_the_close_match(tmp_path):
    raw = {**MINIMAL, "optim": {"weight_decy": 0.0}}
    with pytest.raises(ConfigError, match=r"did you mean 'optim.weight_decay'"):
        load_config(write(tmp_path, raw))


def test_mistyped_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.max_steps"):
        load_config(write(tmp_path, MINIMAL), ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"train.mixed_precision"):
        load_config(write(tmp_path, MINIMAL), ["train.mixed_precision=fp64"])


def test_missing_required_block_is_named(tmp_path):
    raw = {k: v for k, v in MINIMAL.items() if k != "data"}
    with pytest.raises(ConfigError, match=r"required key 'data' is missing"):
        load_config(write(tmp_path, raw))


def test_bad_override_syntax_and_value_paths():
    raw = {"train": {"max_steps": 3}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_override(raw, "train.max_steps")
    with pytest.raises(ConfigError, match="train.max_steps is a value"):
        apply_override(raw, "train.max_steps.deeper=1")


def test_milestones_must_increase():
    with pytest.raises(ConfigError, match="optim.milestones"):
        validate_config({**MINIMAL, "optim": {"milestones": [5, 2]}})


def test_unknown_loss_slot_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'losses.fidelty' \(did you mean 'losses.fidelity'"):
        validate_config({**MINIMAL, "losses": {"fidelty": {"loss_weight": 1.0}}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_round_trip_through_yaml_and_flat_params(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["optim.betas=[0.8, 0.9]"])
    again = validate_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["optim.lr"] == "0.0002"
    assert flat["model.type"] == "MambaLowlight"
    assert flat["optim.betas"] == "[0.8, 0.9]"


@pytest.mark.parametrize("name", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config)
    assert Schedule.resolve(cfg, steps_per_epoch=7).max_steps >= 1


def test_the_few_labels_recipe_is_the_measured_256_step_arm_of_lol_cpu():
    # Its header quotes docs/results/label_efficiency.md's 256-step arm, run as lol_cpu.yaml with these
    # overrides: the numbers stay its own while the two files differ by exactly them (and by names and paths).
    measured_arm = [
        "data.batch_size_labeled=16",
        "data.unlabeled_size=64",
        "data.strong_augment=lowlight",
        "data.labeled_augment=exposure",
        "train.max_steps=256",
        "optim.milestones=[180, 230]",
        "losses.unsup_weight.ramp_length=100",
        "losses.unsup_weight.weight=0.1",
        "teacher.decay=0.95",
        "train.validate_every=256",
        "train.checkpoint_every=256",
        "train.val_max_samples=null",
    ]
    names = ["data.shards", "train.output_dir", "tracking.experiment", "tracking.run_name"]
    few = flatten(load_config(CONFIGS / "lol_cpu_few_labels.yaml"))
    arm = flatten(load_config(CONFIGS / "lol_cpu.yaml", measured_arm))
    for name in names:
        few.pop(name), arm.pop(name)
    assert few == arm


# -- schedules in epochs --------------------------------------------------------------------------------


def test_epoch_lengths_become_steps_for_each_world_size():
    cfg = validate_config(
        {
            **MINIMAL,
            "data": {"shards": "s", "batch_size_labeled": 8, "batch_size_unlabeled": 8},
            "optim": {"milestones": ["100 epochs", "150 epochs"]},
            "train": {"max_steps": "200 epochs", "validate_every": "10 epochs", "checkpoint_every": 5},
        }
    )
    samples = {"labeled": 485, "unlabeled": 1000}
    # One epoch = one pass over the unlabeled split (the official trainer): ceil(1000 / 8) = 125 steps.
    one = Schedule.resolve(cfg, cfg.epoch_length(samples, world_size=1))
    assert (one.steps_per_epoch, one.max_steps, one.milestones) == (125, 25000, [12500, 18750])
    assert (one.validate_every, one.checkpoint_every) == (1250, 5)  # integers stay steps
    # Eight processes read 8x the images per step: the same epochs in an eighth of the steps.
    eight = Schedule.resolve(cfg, cfg.epoch_length(samples, world_size=8))
    assert (eight.steps_per_epoch, eight.max_steps, eight.milestones) == (16, 3200, [1600, 2400])
    # Without unlabeled batches an epoch is a pass over the labeled pairs: ceil(485 / 8) = 61 steps;
    # fractional epochs round up to whole steps.
    labeled_only = cfg.epoch_length({"labeled": 485}, world_size=1)
    assert labeled_only == 61 and to_steps("0.5 epochs", labeled_only) == 31


@pytest.mark.parametrize("value", ["10 epoch", "10epochs", " 2.5 epochs", ".5 epochs", 3])
def test_schedule_lengths_accept_steps_and_epochs(value):
    assert validate_config({**MINIMAL, "train": {"max_steps": value}}).train.max_steps == value


@pytest.mark.parametrize("value", ["10 steps", "0 epochs", "-1 epochs", 0, "ten epochs", 2.5])
def test_bad_schedule_lengths_are_named(value):
    with pytest.raises(ConfigError, match="train.max_steps"):
        validate_config({**MINIMAL, "train": {"max_steps": value}})


def test_milestones_in_epochs_must_increase_once_converted():
    cfg = validate_config({**MINIMAL, "optim": {"milestones": ["2 epochs", 10]}})
    assert Schedule.resolve(cfg, steps_per_epoch=3).milestones == [6, 10]
    with pytest.raises(ConfigError, match=r"must increase; in steps they are \[12, 10\]"):
        Schedule.resolve(cfg, steps_per_epoch=6)
