"""The EMA mean teacher: starts as the student, follows the formula, unwraps wrappers, round-trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from semi_llie.method.teacher import EMATeacher, ema_decay
from semi_llie.models import TINY_MODEL_CONFIG, build_model

torch.set_num_threads(1)


class Wrapped(nn.Module):
    """Stands in for DistributedDataParallel / a DeepSpeed engine: the model sits at `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def small_student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1))


def perturb(model: nn.Module, seed: int) -> None:
    """Mimic an optimizer step and a training forward: new weights, new BatchNorm statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(torch.rand(b.shape, generator=generator))
            else:
                b.add_(1)


def test_teacher_starts_as_an_exact_copy_in_eval_mode():
    student = build_model(TINY_MODEL_CONFIG)
    teacher = EMATeacher(Wrapped(student))
    for (name, a), (_, b) in zip(
        student.state_dict().items(), teacher.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    assert teacher.model is not student
    x = torch.rand(1, 3, 16, 16)
    student.eval()
    y_teacher, _ = teacher(x)
    torch.testing.assert_close(y_teacher, student(x)[0])
    assert not y_teacher.requires_grad


def test_ema_follows_the_formula_over_several_steps():
    student = small_student()
    teacher = EMATeacher(Wrapped(Wrapped(student)), decay=0.9)
    expected = {k: v.clone() for k, v in student.named_parameters()}
    for step in range(6):
        perturb(student, seed=step)
        alpha = teacher.update(Wrapped(student), step=step)
        assert alpha == pytest.approx(min(1 - 1 / (step + 1), 0.9))
        for name, param in student.named_parameters():
            expected[name] = alpha * expected[name] + (1 - alpha) * param.detach()
        for name, param in teacher.model.named_parameters():
            torch.testing.assert_close(param, expected[name], rtol=1e-6, atol=1e-6)
        for (name, b_student), (_, b_teacher) in zip(
            student.named_buffers(), teacher.model.named_buffers(), strict=True
        ):
            assert torch.equal(b_student, b_teacher), name  # buffers are copied, not averaged
    assert teacher.step == 5


def test_decay_schedule():
    assert ema_decay(0, 0.996) == 0.0  # the first update copies the student
    assert ema_decay(9, 0.996) == pytest.approx(0.9)
    assert ema_decay(10**6, 0.996) == 0.996


def test_state_dict_round_trip_keeps_weights_and_step():
    student = small_student()
    teacher = EMATeacher(student, decay=0.99)
    for step in range(3):
        perturb(student, seed=step)
        teacher.update(student, step=step)
    state = copy.deepcopy(teacher.state_dict())
    assert set(state["model"]) == set(student.state_dict())  # plain model keys: loadable into a bare model

    restored = EMATeacher(small_student(), decay=0.5)
    restored.load_state_dict(state)
    assert restored.step == 2 and restored.decay == 0.99
    for (name, a), (_, b) in zip(
        teacher.model.state_dict().items(), restored.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
