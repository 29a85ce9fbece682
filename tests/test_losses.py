"""The Semi-LLIE objective: values of each term, switches, ramp, and gradients reaching the student."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from semi_llie.errors import ConfigError
from semi_llie.losses import (
    ConsistencyLoss,
    FidelityLoss,
    GradientLoss,
    RampedWeight,
    SemanticContrastiveLoss,
    build_objective,
)
from semi_llie.models import TINY_MODEL_CONFIG, build_model, image_gradient
from semi_llie.semantic import FrozenExtractor, build_semantic

torch.set_num_threads(1)

ALL_OFF = {
    slot: {"loss_weight": 0.0}
    for slot in ("fidelity", "ram_perceptual", "gradient", "consistency", "contrastive")
}
TINY_RAM = {"type": "RAM", "size": "tiny"}
NO_RAMP = {"weight": 1.0, "ramp_length": 0}


def only(slot: str, **extra: dict) -> dict:
    """A loss config with every term off except `slot` (at its paper weight)."""
    cfg = {**ALL_OFF, "semantic": TINY_RAM, "unsup_weight": NO_RAMP, **extra}
    cfg[slot] = {}
    return cfg


class CountingIdentity(FrozenExtractor):
    """A stand-in extractor whose features are the image itself; counts its calls."""

    supports_perceptual = True

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def perceptual_features(self, images: Tensor) -> list[Tensor]:
        self.calls += 1
        return [images]

    def contrastive_features(self, images: Tensor) -> list[Tensor]:
        self.calls += 1
        return [images, images.mean(dim=(2, 3))]


@pytest.fixture(scope="module")
def tiny_ram() -> FrozenExtractor:
    return build_semantic(TINY_RAM)


def student_step(objective, seed: int = 0):
    """One student forward on a labeled and an unlabeled batch; returns (student, total, terms)."""
    torch.manual_seed(seed)
    student = build_model(TINY_MODEL_CONFIG)
    low, high = torch.rand(2, 3, 32, 32) * 0.3, torch.rand(2, 3, 32, 32)
    strong, positive = torch.rand(2, 3, 32, 32) * 0.3, torch.rand(2, 3, 32, 32)
    pred, pred_grad = student(low)
    unsup_pred, _ = student(strong)
    total, terms = objective(
        pred=pred,
        pred_grad=pred_grad,
        target=high,
        unsup_pred=unsup_pred,
        positive=positive,
        unsup_input=strong,
        epoch=3.0,
        step=30,
    )
    return student, total, terms


def assert_reaches_student(student: torch.nn.Module) -> None:
    grads = {name: p.grad for name, p in student.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the input convolution is the deepest point from the loss: a gradient there crossed the whole network
    first = next(name for name in grads if name.endswith("weight"))
    assert grads[first].abs().sum() > 0, first


@pytest.mark.parametrize(
    ("slot", "name"), [("ram_perceptual", "sup/ram_perc"), ("contrastive", "unsup/contrast")]
)
def test_semantic_loss_gradient_reaches_student(tiny_ram, slot, name):
    objective = build_objective(only(slot), semantic=tiny_ram)
    student, total, terms = student_step(objective)
    assert set(terms) - {"unsup/weight"} == {name}
    total.backward()
    assert_reaches_student(student)
    assert all(p.grad is None for p in tiny_ram.parameters())  # the extractor stays frozen


def test_sam_contrastive_gradient_reaches_student():
    sam = build_semantic({"type": "SAM", "size": "tiny"})
    objective = build_objective(only("contrastive"), semantic=sam)
    student, total, terms = student_step(objective)
    assert "unsup/contrast" in terms
    total.backward()
    assert_reaches_student(student)


@pytest.mark.parametrize("slot", ["ram_perceptual", "contrastive"])
@pytest.mark.parametrize("switch", [{"loss_weight": 0.0}, {"enabled": False}])
def test_switched_off_semantic_loss_costs_nothing(slot, switch):
    extractor = CountingIdentity()
    cfg = {**ALL_OFF, "unsup_weight": NO_RAMP, slot: switch, "fidelity": {}}
    objective = build_objective(cfg, semantic=extractor)
    student, total, terms = student_step(objective)
    assert extractor.calls == 0
    assert set(terms) == {"sup/l1mse"}


def test_all_terms_off_sends_no_gradient():
    # The default `semantic` block is a large RAM without a checkpoint: building it would raise, so this
    # also proves that no extractor is built when no term needs one.
    objective = build_objective(ALL_OFF)
    student, total, terms = student_step(objective)
    assert terms == {} and not total.requires_grad
    assert all(p.grad is None for p in student.parameters())
    assert not objective.needs_unlabeled


def test_objective_combines_terms_with_ramped_weight():
    cfg = {
        "fidelity": {},
        "gradient": {},
        "ram_perceptual": {"loss_weight": 0.5},
        "consistency": {},
        "contrastive": {"loss_weight": 2.0},
        "unsup_weight": {"weight": 0.1, "ramp_length": 10, "unit": "epoch"},
    }
    objective = build_objective(cfg, semantic=CountingIdentity())
    _, total, terms = student_step(objective)
    assert set(terms) == {
        "sup/l1mse",
        "sup/ram_perc",
        "sup/grad",
        "unsup/consistency",
        "unsup/contrast",
        "unsup/weight",
    }
    weight = 0.1 * math.exp(-5 * (1 - 3 / 10) ** 2)  # epoch 3 of 10
    assert terms["unsup/weight"].item() == pytest.approx(weight)
    supervised = terms["sup/l1mse"] + terms["sup/ram_perc"] + terms["sup/grad"]
    expected = supervised + weight * (terms["unsup/consistency"] + terms["unsup/contrast"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_past_until_the_objective_is_the_supervised_one_and_needs_no_unlabeled_inputs():
    cfg = {**ALL_OFF, "fidelity": {}, "consistency": {}}
    objective = build_objective({**cfg, "unsup_weight": {"ramp_length": 0, "unit": "step", "until": 5}})
    torch.manual_seed(0)
    pred, target = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    assert objective.needs_unlabeled and objective.unlabeled_active(epoch=0, step=4)
    assert not objective.unlabeled_active(epoch=0, step=5)
    total, terms = objective(pred=pred, pred_grad=pred, target=target, step=5)
    assert set(terms) == {"sup/l1mse"}
    expected = 0.8 * (pred - target).abs().mean() + 0.2 * ((pred - target) ** 2).mean()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="unsup_pred"):
        objective(pred=pred, pred_grad=pred, target=target, step=4)


def test_missing_unlabeled_inputs_are_an_error():
    objective = build_objective({**ALL_OFF, "consistency": {}})
    pred = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="unsup_pred"):
        objective(pred=pred, pred_grad=pred, target=pred)


def test_fidelity_gradient_consistency_values():
    torch.manual_seed(0)
    y, g = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    expected = 0.8 * (y - g).abs().mean() + 0.2 * ((y - g) ** 2).mean()
    assert FidelityLoss(loss_weight=2.0)(y, g).item() == pytest.approx(2 * expected.item(), rel=1e-6)
    grad_y = image_gradient(y)
    assert GradientLoss(loss_weight=0.1)(grad_y, g).item() == pytest.approx(
        0.1 * F.l1_loss(grad_y, image_gradient(g)).item(), rel=1e-6
    )
    positive = torch.rand(2, 3, 16, 16, requires_grad=True)
    ConsistencyLoss()(y.requires_grad_(), positive).backward()
    assert positive.grad is None and y.grad is not None


def test_contrastive_is_a_ratio_with_detached_positive_and_negative():
    anchor = torch.rand(2, 3, 8, 8, requires_grad=True)
    positive = torch.rand(2, 3, 8, 8, requires_grad=True)
    negative = torch.rand(2, 3, 8, 8, requires_grad=True)
    loss = SemanticContrastiveLoss(CountingIdentity(), loss_weight=1.0, eps=1e-7)(anchor, positive, negative)
    expected = F.l1_loss(anchor, positive) / (F.l1_loss(anchor, negative) + 1e-7)
    pooled = [t.mean(dim=(2, 3)) for t in (anchor, positive, negative)]
    expected = expected + F.l1_loss(pooled[0], pooled[1]) / (F.l1_loss(pooled[0], pooled[2]) + 1e-7)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert anchor.grad is not None and positive.grad is None and negative.grad is None


def test_ramp_shape_and_units():
    by_epoch = RampedWeight(weight=0.1, ramp_length=100, unit="epoch")
    assert by_epoch(epoch=0, step=10**6) == pytest.approx(0.1 * math.exp(-5))
    assert by_epoch(epoch=50, step=0) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert by_epoch(epoch=100, step=0) == by_epoch(epoch=250, step=0) == pytest.approx(0.1)
    by_step = RampedWeight(weight=1.0, ramp_length=1000, unit="step")
    assert by_step(epoch=999, step=500) == pytest.approx(math.exp(-5 * 0.25))
    assert RampedWeight(weight=0.3, ramp_length=0)(epoch=0, step=0) == 0.3
    stops = RampedWeight(weight=1.0, ramp_length=1000, unit="step", until=600)
    assert stops(epoch=0, step=500) == pytest.approx(math.exp(-5 * 0.25))
    assert stops.active(epoch=0, step=599) and not stops.active(epoch=0, step=600)
    assert stops(epoch=0, step=600) == stops(epoch=0, step=10**6) == 0.0
    by_epochs = RampedWeight(until=2.5)  # unit epoch: `until` counts epochs, the step is ignored
    assert by_epochs.active(epoch=2.4, step=10**6) and by_epochs(epoch=2.5, step=0) == 0.0
    with pytest.raises(ConfigError, match="until"):
        RampedWeight(until=0)
    with pytest.raises(ConfigError, match="unit"):
        RampedWeight(unit="iteration")


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="fidelty"):
        build_objective({"fidelty": {}})
    with pytest.raises(ConfigError, match="random"):
        build_objective({})  # paper defaults need RAM weights
    with pytest.raises(ConfigError, match="loss_weigth"):
        build_objective({**ALL_OFF, "fidelity": {"loss_weigth": 1.0}})
    with pytest.raises(ConfigError, match="perceptive|RAM"):
        build_objective(only("ram_perceptual", semantic={"type": "SAM", "size": "tiny"}))
