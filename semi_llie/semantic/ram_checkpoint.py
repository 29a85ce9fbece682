"""Load the official RAM checkpoint (`ram_swin_large_14m.pth`) into `RAMExtractor`, strictly.

The file is `{"model": state_dict, ...}` with the public RAM code's key names. It also holds modules
Semi-LLIE does not use (the captioning `tag_encoder`, `text_decoder`, ...): those are skipped. Every key
of the extractor must be present, and every key under the extractor's modules must be known, otherwise
loading fails with the list: a truncated or mismatched checkpoint never gives a half-random RAM.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from semi_llie.errors import UserError
from semi_llie.semantic.ram import RAMExtractor

log = logging.getLogger(__name__)

# Buffers recomputed from the window geometry; the reference loader drops them as well.
DERIVED_KEY_PARTS = ("relative_position_index", "attn_mask")
# Older RAM/Tag2Text checkpoints name the tagging head `vision_multi`.
LEGACY_RENAMES = {"vision_multi.": "tagging_head."}
MAX_LISTED_KEYS = 20


@dataclass(frozen=True)
class RAMLoadReport:
    loaded: int  # tensors copied into the extractor
    skipped: int  # checkpoint tensors of modules Semi-LLIE does not use
    interpolated: list[str]  # relative-position tables resized to another window


def interpolate_relative_position_table(table: Tensor, window: int) -> Tensor:
    """((2w'-1)², heads) -> ((2·window-1)², heads), bicubic over the 2D grid of relative offsets."""
    source = round(table.shape[0] ** 0.5)
    target = 2 * window - 1
    grid = table.T.reshape(1, table.shape[1], source, source).float()
    resized = F.interpolate(grid, size=(target, target), mode="bicubic", align_corners=True)
    return resized.reshape(table.shape[1], target * target).T.to(table.dtype)


def read_checkpoint(path: str | Path) -> Mapping[str, Tensor]:
    """The state dict inside a RAM checkpoint file (the `model` entry, or the file itself if flat)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"RAM checkpoint {path} does not exist; download ram_swin_large_14m.pth and set its path"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise UserError(
            f"RAM checkpoint {path} is not plain tensors ({error.__class__.__name__}); re-save its "
            f"'model' entry with torch.save({{'model': sd}}, path) or re-download it"
        ) from error
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise UserError(f"RAM checkpoint {path} holds no state dict (expected a dict with a 'model' entry)")
    return state


def load_ram_checkpoint(
    model: RAMExtractor, source: str | Path | Mapping[str, Tensor], where: str = "state dict"
) -> RAMLoadReport:
    """Copy the weights of `source` (a checkpoint path or a state dict) into `model`, strictly."""
    if not isinstance(source, Mapping):
        where = str(source)
        source = read_checkpoint(source)
    expected = model.state_dict()
    prefixes = tuple(sorted({key.split(".")[0] for key in expected}))

    state: dict[str, Tensor] = {}
    skipped = 0
    for key, value in source.items():
        for old, new in LEGACY_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        if any(part in key for part in DERIVED_KEY_PARTS):
            continue
        if key.split(".")[0] in prefixes:
            state[key] = value
        else:
            skipped += 1

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"RAM checkpoint {where} does not match the {model.config.image_size}px RAM extractor: "
            f"missing keys {_listed(missing)}; unexpected keys {_listed(unexpected)}; "
            f"use the official ram_swin_large_14m.pth with size: large"
        )

    interpolated = []
    for key, value in state.items():
        target_shape = expected[key].shape
        if value.shape == target_shape:
            continue
        if key.endswith("relative_position_bias_table") and value.shape[1] == target_shape[1]:
            window = (round(target_shape[0] ** 0.5) + 1) // 2
            state[key] = interpolate_relative_position_table(value, window)
            interpolated.append(key)
        else:
            raise UserError(
                f"RAM checkpoint {where}: {key} has shape {tuple(value.shape)}, the extractor expects "
                f"{tuple(target_shape)}; the checkpoint is for another RAM size"
            )
    if interpolated:
        log.info("RAM: resized %d relative-position tables to the configured window", len(interpolated))
    model.load_state_dict(state, strict=True)
    return RAMLoadReport(loaded=len(state), skipped=skipped, interpolated=interpolated)


def _listed(keys: list[str]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = len(keys) - MAX_LISTED_KEYS
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"
