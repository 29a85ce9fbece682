"""Semi-LLIE losses (METHOD §3) and the objective that combines them for the trainer."""

from semi_llie.config import DEFAULT_LOSS_CONFIG
from semi_llie.losses.build import (
    LOSSES,
    TERM_NAMES,
    ObjectiveOutput,
    SemiLLIEObjective,
    build_objective,
)
from semi_llie.losses.pixel import ConsistencyLoss, FidelityLoss, GradientLoss, WeightedLoss
from semi_llie.losses.ramp import RampedWeight
from semi_llie.losses.semantic import RAMPerceptualLoss, SemanticContrastiveLoss

__all__ = [
    "DEFAULT_LOSS_CONFIG",
    "LOSSES",
    "TERM_NAMES",
    "ConsistencyLoss",
    "FidelityLoss",
    "GradientLoss",
    "ObjectiveOutput",
    "RAMPerceptualLoss",
    "RampedWeight",
    "SemanticContrastiveLoss",
    "SemiLLIEObjective",
    "WeightedLoss",
    "build_objective",
]
