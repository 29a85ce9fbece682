"""The Semi-LLIE objective: L = L_sup + w(e) · L_unsup (METHOD §3), built from a config block.

    loss:
      semantic:       {type: RAM, checkpoint: weights/ram_swin_large_14m.pth, size: large}
      fidelity:       {type: FidelityLoss, loss_weight: 1.0, l1_weight: 0.8, mse_weight: 0.2}
      ram_perceptual: {type: RAMPerceptualLoss, loss_weight: 0.1}
      gradient:       {type: GradientLoss, loss_weight: 0.1}
      consistency:    {type: ConsistencyLoss, loss_weight: 1.0}
      contrastive:    {type: SemanticContrastiveLoss, loss_weight: 1.0}
      unsup_weight:   {weight: 0.1, ramp_length: 100, unit: epoch, until: null}

A slot left out takes the paper's block above (`semi_llie.config.DEFAULT_LOSS_CONFIG`); a term is switched
off with `loss_weight: 0` or `enabled: false`. The semantic extractor is built only when a term uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from semi_llie.config import DEFAULT_LOSS_CONFIG
from semi_llie.errors import ConfigError
from semi_llie.losses.pixel import ConsistencyLoss, FidelityLoss, GradientLoss, WeightedLoss
from semi_llie.losses.ramp import RampedWeight
from semi_llie.losses.semantic import RAMPerceptualLoss, SemanticContrastiveLoss
from semi_llie.registry import Registry, check_kwargs
from semi_llie.semantic import FrozenExtractor, build_semantic

LOSSES = Registry("loss")
for _loss in (FidelityLoss, GradientLoss, ConsistencyLoss, RAMPerceptualLoss, SemanticContrastiveLoss):
    LOSSES.register()(_loss)

# Slot -> name under which the term is logged (MLflow: train/<name>).
TERM_NAMES = {
    "fidelity": "sup/l1mse",
    "ram_perceptual": "sup/ram_perc",
    "gradient": "sup/grad",
    "consistency": "unsup/consistency",
    "contrastive": "unsup/contrast",
}
SEMANTIC_SLOTS = ("ram_perceptual", "contrastive")


class ObjectiveOutput(NamedTuple):
    total: Tensor  # scalar with graph: backward() this
    terms: dict[str, Tensor]  # detached scalars for logging, only the terms that were computed


class SemiLLIEObjective(nn.Module):
    """Combines the loss terms; holds the (shared) frozen semantic extractor, so `.to(device)` moves it."""

    def __init__(
        self,
        fidelity: WeightedLoss,
        gradient: WeightedLoss,
        ram_perceptual: WeightedLoss | None,
        consistency: WeightedLoss,
        contrastive: WeightedLoss | None,
        unsup_weight: RampedWeight,
    ) -> None:
        super().__init__()
        # Switched-off terms are not kept at all: nothing can compute them by accident.
        self.supervised = nn.ModuleDict(
            {
                slot: loss
                for slot, loss in (
                    ("fidelity", fidelity),
                    ("ram_perceptual", ram_perceptual),
                    ("gradient", gradient),
                )
                if loss is not None and loss.enabled
            }
        )
        self.unsupervised = nn.ModuleDict(
            {
                slot: loss
                for slot, loss in (("consistency", consistency), ("contrastive", contrastive))
                if loss is not None and loss.enabled
            }
        )
        self.unsup_weight = unsup_weight

    @property
    def needs_unlabeled(self) -> bool:
        """Whether the unlabeled branch (teacher, bank, strong-view student pass) contributes anything."""
        return self.unsup_weight.weight > 0 and len(self.unsupervised) > 0

    def unlabeled_active(self, *, epoch: float, step: int) -> bool:
        """Whether this step needs the unlabeled batch: the branch is on, `unsup_weight.until` not reached."""
        return self.needs_unlabeled and self.unsup_weight.active(epoch=epoch, step=step)

    def forward(
        self,
        *,
        pred: Tensor,
        pred_grad: Tensor,
        target: Tensor,
        unsup_pred: Tensor | None = None,
        positive: Tensor | None = None,
        unsup_input: Tensor | None = None,
        epoch: float = 0.0,
        step: int = 0,
    ) -> ObjectiveOutput:
        """Labeled: pred, pred_grad = student(low) (B, 3, H, W); target = high (B, 3, H, W).

        Unlabeled (required when `unlabeled_active` at this epoch and step): unsup_pred =
        student(strong)[0], positive = teacher pseudo-label or bank entry, unsup_input = the strong
        low-light view; all (B_u, 3, S, S).
        epoch (fractional) and step place the unsupervised ramp; its `unit` picks which one counts.
        """
        terms: dict[str, Tensor] = {}
        total = pred.new_zeros(())
        supervised_inputs = {
            "fidelity": (pred, target),
            "ram_perceptual": (pred, target),
            "gradient": (pred_grad, target),
        }
        for slot, loss in self.supervised.items():
            terms[TERM_NAMES[slot]] = value = loss(*supervised_inputs[slot])
            total = total + value

        if self.unlabeled_active(epoch=epoch, step=step):
            if unsup_pred is None or positive is None or unsup_input is None:
                raise ValueError("the unsupervised terms are on: pass unsup_pred, positive and unsup_input")
            positive, unsup_input = positive.detach(), unsup_input.detach()
            unsupervised_inputs = {
                "consistency": (unsup_pred, positive),
                "contrastive": (unsup_pred, positive, unsup_input),
            }
            unsupervised = pred.new_zeros(())
            for slot, loss in self.unsupervised.items():
                terms[TERM_NAMES[slot]] = value = loss(*unsupervised_inputs[slot])
                unsupervised = unsupervised + value
            weight = self.unsup_weight(epoch=epoch, step=step)
            terms["unsup/weight"] = torch.tensor(weight)
            total = total + weight * unsupervised
        return ObjectiveOutput(total, {name: value.detach() for name, value in terms.items()})


def build_objective(
    cfg: Mapping[str, Any] | None = None, semantic: FrozenExtractor | None = None
) -> SemiLLIEObjective:
    """Build the objective from a `loss:` block (slots as in the module docstring).

    `semantic` injects an already built extractor (tests, or sharing one across objectives); otherwise
    the `semantic` block is built, and only if an enabled term needs it.
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULT_LOSS_CONFIG))
    if unknown:
        raise ConfigError(f"unknown loss slot(s) {unknown}; known slots: {', '.join(DEFAULT_LOSS_CONFIG)}")
    blocks = {slot: _with_defaults(cfg.get(slot), default) for slot, default in DEFAULT_LOSS_CONFIG.items()}
    ramp_block = blocks["unsup_weight"]
    check_kwargs(RampedWeight, ramp_block, where="loss slot 'unsup_weight'")
    unsup_weight = RampedWeight(**ramp_block)

    def switched_on(block: Mapping[str, Any]) -> bool:
        return block.get("enabled", True) and block.get("loss_weight", 1.0) > 0

    if semantic is None and any(switched_on(blocks[slot]) for slot in SEMANTIC_SLOTS):
        semantic = build_semantic(blocks["semantic"])

    def build(slot: str) -> WeightedLoss | None:
        block = blocks[slot]
        if slot in SEMANTIC_SLOTS:
            if not switched_on(block):
                return None
            return LOSSES.build(block, extractor=semantic)
        return LOSSES.build(block)

    return SemiLLIEObjective(
        fidelity=build("fidelity"),
        gradient=build("gradient"),
        ram_perceptual=build("ram_perceptual"),
        consistency=build("consistency"),
        contrastive=build("contrastive"),
        unsup_weight=unsup_weight,
    )


def _with_defaults(block: Mapping[str, Any] | None, default: Mapping[str, Any]) -> dict[str, Any]:
    """The user's block over the default one when it keeps the default `type` (so `{loss_weight: 0}` works);
    a block naming another `type` stands alone, so no default argument leaks into another class."""
    block = dict(block or {})
    if block.get("type", default.get("type")) == default.get("type"):
        return {**default, **block}
    return block
