"""The EMA mean teacher: starts as the student, follows the formula, unwraps wrappers, round-trips."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from semi_llie.data.augment import dihedral, undo_dihedral
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


def numpy_dihedral(image: np.ndarray, index: int) -> np.ndarray:
    """Written independently of augment.dihedral: quarter turns counter-clockwise, then a left-right flip."""
    image = np.rot90(image, index % 4, axes=(-2, -1))
    return np.flip(image, -1) if index >= 4 else image


def test_dihedral_transforms_are_the_eight_symmetries_and_undo_inverts_them():
    image = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(1, 2, 5, 5)
    seen = set()
    for k in range(8):
        transformed = dihedral(image, k)
        np.testing.assert_array_equal(transformed.numpy(), numpy_dihedral(image.numpy(), k))
        assert torch.equal(undo_dihedral(transformed, k), image)
        seen.add(transformed.numpy().tobytes())
    assert len(seen) == 8


def test_dihedral_pseudo_label_is_the_mean_of_the_eight_undone_teacher_outputs():
    torch.manual_seed(0)
    teacher = EMATeacher(build_model(TINY_MODEL_CONFIG))
    weak, illum = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 12, 12)
    expected = np.zeros((2, 3, 12, 12))
    for k in range(8):  # one view at a time, transforms from numpy, inverse by transforming back k's inverse
        view = torch.from_numpy(numpy_dihedral(weak.numpy(), k).copy())
        view_illum = torch.from_numpy(numpy_dihedral(illum.numpy(), k).copy())
        output = teacher.model(view, view_illum)[0].numpy()
        inverse = {1: 3, 3: 1}.get(k, k)  # flips and the half turn are their own inverses
        expected += numpy_dihedral(output, inverse) / 8
    averaged = teacher.pseudo_label(weak, illum, symmetries=8)
    np.testing.assert_allclose(averaged.numpy(), np.clip(expected, 0, 1), atol=1e-5)
    single = teacher.pseudo_label(weak, illum)
    torch.testing.assert_close(single, teacher.model(weak, illum)[0].clamp(0, 1))
    assert (
        averaged - single
    ).abs().max() > 1e-4  # the scans are not equivariant: the average is not one view
    with pytest.raises(ValueError, match="square"):
        teacher.pseudo_label(torch.rand(1, 3, 8, 12), None, symmetries=8)
