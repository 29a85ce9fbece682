"""Build the backbone from a `{type: MambaLowlight, ...}` config block."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from semi_llie.models.mambalowlight import MambaLowlight
from semi_llie.registry import Registry

MODELS = Registry("model")
MODELS.register()(MambaLowlight)

# The same class at a size that runs in milliseconds on a CPU: for tests and the quickstart.
TINY_MODEL_CONFIG: dict[str, Any] = {
    "type": "MambaLowlight",
    "embed_dim": 16,
    "depths": (1, 1),
    "d_state": 4,
    "expand": 2,
    "drop_path_rate": 0.0,
}


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build a model from its config block; unknown `type:` values or keys raise ConfigError naming them."""
    return MODELS.build(cfg)
