"""The mean teacher (METHOD §2): an exponential moving average of the student's weights.

    teacher = EMATeacher(student, decay=0.996)       # exact copy of the (unwrapped) student
    ...optimizer.step()...
    teacher.update(student, step=global_step)        # α_t = min(1 - 1/(t+1), decay)
    pseudo_label = teacher.pseudo_label(weak, illum)  # eval mode, no grad; symmetries=8 averages 8 views

The teacher is kept out of `accelerator.prepare` (like diffusers' EMA): it is never trained, wrapped
or sharded, so every rank holds the same full copy and updates it from the same all-reduced student.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from semi_llie.data.augment import dihedral, undo_dihedral


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def ema_decay(step: int, decay: float) -> float:
    """α_t = min(1 - 1/(t+1), decay): small early (the teacher follows the student), then `decay`."""
    return min(1.0 - 1.0 / (step + 1), decay)


class EMATeacher:
    """EMA copy of a student. `model` is always in eval mode and has no trainable parameters.

    A plain object, not an nn.Module, so no parent module picks it up as trainable or saves it under
    its own keys; `state_dict()` is the teacher's checkpoint format.
    """

    def __init__(self, student: nn.Module, decay: float = 0.996) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(unwrap(student))
        self.model.requires_grad_(False)
        self.model.eval()
        self.step = -1  # step of the last update; -1: still the initial copy

    def to(self, *args: Any, **kwargs: Any) -> EMATeacher:
        self.model.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """θ_T ← α θ_T + (1-α) θ_S over parameters; buffers are copied. Returns α."""
        alpha = ema_decay(step, self.decay)
        student = unwrap(student)
        teacher_params = dict(self.model.named_parameters())
        for name, param in student.named_parameters():
            teacher_params[name].lerp_(param.detach().to(teacher_params[name].dtype), 1.0 - alpha)
        teacher_buffers = dict(self.model.named_buffers())
        for name, buffer in student.named_buffers():
            teacher_buffers[name].copy_(buffer)
        self.step = step
        return alpha

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The teacher's prediction, e.g. (y, grad_y) for MambaLowlight; never builds a graph."""
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def pseudo_label(self, weak: Tensor, illum: Tensor | None, symmetries: int = 1) -> Tensor:
        """The teacher's pseudo-label of B×3×S×S weak views (illumination maps or None), fp32 in [0, 1].

        symmetries=8 averages the teacher over the 8 dihedral transforms of each view, each undone on its
        output: the scan directions make the model not equivariant, so the 8 outputs differ and their mean
        is a better target than any one of them. The 8 transforms run as one 8B batch.
        """
        if symmetries == 1:
            return self.model(weak, illum)[0].float().clamp(0, 1)
        if symmetries != 8:
            raise ValueError(f"symmetries must be 1 or 8, got {symmetries}")
        if weak.shape[-1] != weak.shape[-2]:
            raise ValueError(f"dihedral pseudo-labels need square views, got {tuple(weak.shape[-2:])}")
        batch = weak.shape[0]
        views = torch.cat([dihedral(weak, k) for k in range(8)])  # 8B×3×S×S, transform k at [kB, (k+1)B)
        illums = None if illum is None else torch.cat([dihedral(illum, k) for k in range(8)])
        outputs = self.model(views, illums)[0].float()
        undone = [undo_dihedral(outputs[k * batch : (k + 1) * batch], k) for k in range(8)]
        return torch.stack(undone).mean(0).clamp(0, 1)

    def state_dict(self) -> dict[str, Any]:
        """{"model": teacher weights (plain model keys), "step": last update step, "decay": decay}."""
        return {"model": self.model.state_dict(), "step": self.step, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.step = int(state["step"])
        self.decay = float(state["decay"])
