"""The Semi-LLIE backbone: MambaLowlight and its parts (METHOD §1)."""

from semi_llie.models.build import MODELS, TINY_MODEL_CONFIG, build_model
from semi_llie.models.gradient import image_gradient
from semi_llie.models.mambalowlight import MambaLowlight
from semi_llie.models.ss2d import SS2D

__all__ = ["MODELS", "SS2D", "TINY_MODEL_CONFIG", "MambaLowlight", "build_model", "image_gradient"]
