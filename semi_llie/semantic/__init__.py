"""Frozen semantic feature extractors for the Semi-LLIE losses (METHOD §3): RAM and SAM.

    build_semantic({"type": "RAM", "checkpoint": "weights/ram_swin_large_14m.pth", "size": "large",
                    "input_size": 384, "grad_checkpointing": True})
    build_semantic({"type": "SAM", "checkpoint": "weights/sam_vit_b_01ec64.pth", "input_size": 512})
    build_semantic({"type": "RAM", "size": "tiny", "allow_random_weights": True})   # tests, quickstart

Both are frozen, always in eval mode and differentiable with respect to their input image.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from semi_llie.errors import ConfigError
from semi_llie.registry import Registry
from semi_llie.semantic.extractor import FrozenExtractor
from semi_llie.semantic.ram import RAM_LARGE, RAM_TINY, RAMConfig, RAMExtractor, ram_config
from semi_llie.semantic.ram_checkpoint import load_ram_checkpoint
from semi_llie.semantic.sam import (
    SAM_TINY,
    SAM_VIT_B,
    SAMConfig,
    SAMExtractor,
    load_sam_checkpoint,
    sam_config,
)

log = logging.getLogger(__name__)

SEMANTIC = Registry("semantic extractor")


def _check_weights(kind: str, size: str, checkpoint: str | None, allow_random_weights: bool) -> None:
    if checkpoint is None and size != "tiny" and not allow_random_weights:
        raise ConfigError(
            f"the {kind} semantic extractor (size {size}) has no checkpoint: a random {kind} gives "
            f"meaningless semantic losses; set semantic.checkpoint to the official weights file, or set "
            f"allow_random_weights: true for benchmarks and tests only"
        )
    if checkpoint is None:
        log.warning("%s semantic extractor (size %s) runs with random weights", kind, size)


@SEMANTIC.register("RAM")
def build_ram(
    checkpoint: str | None = None,
    size: str = "large",
    input_size: int | None = None,
    window_size: int | None = None,
    grad_checkpointing: bool = False,
    allow_random_weights: bool = False,
) -> RAMExtractor:
    _check_weights("RAM", size, checkpoint, allow_random_weights)
    model = RAMExtractor(ram_config(size, input_size, window_size), grad_checkpointing=grad_checkpointing)
    if checkpoint is not None:
        load_ram_checkpoint(model, checkpoint)
    return model


@SEMANTIC.register("SAM")
def build_sam(
    checkpoint: str | None = None,
    size: str = "large",
    input_size: int | None = None,
    grad_checkpointing: bool = False,
    allow_random_weights: bool = False,
) -> SAMExtractor:
    _check_weights("SAM", size, checkpoint, allow_random_weights)
    model = SAMExtractor(sam_config(size, input_size), grad_checkpointing=grad_checkpointing)
    if checkpoint is not None:
        load_sam_checkpoint(model, checkpoint)
    return model


def build_semantic(cfg: Mapping[str, Any]) -> FrozenExtractor:
    """Build a frozen extractor from its config block (`type: RAM | SAM`); unknown keys raise ConfigError."""
    return SEMANTIC.build(cfg)


__all__ = [
    "RAM_LARGE",
    "RAM_TINY",
    "SAM_TINY",
    "SAM_VIT_B",
    "SEMANTIC",
    "FrozenExtractor",
    "RAMConfig",
    "RAMExtractor",
    "SAMConfig",
    "SAMExtractor",
    "build_semantic",
    "load_ram_checkpoint",
    "load_sam_checkpoint",
]
