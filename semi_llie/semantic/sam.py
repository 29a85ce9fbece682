"""The Segment Anything (SAM) ViT image encoder as a frozen, differentiable contrastive feature extractor.

Built from segment_anything's own `ImageEncoderViT`, held as `image_encoder` so the official checkpoint
(`sam_vit_b_01ec64.pth`: a flat state dict, encoder keys under `image_encoder.`) loads by name. The
prompt encoder and mask decoder in that file are skipped. At an input size other than 1024, the absolute
position embedding (2D, bicubic) and the global-attention relative position tables (1D, linear) are resized.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from semi_llie.errors import ConfigError, UserError
from semi_llie.semantic.extractor import IMAGENET_MEAN, IMAGENET_STD, FrozenExtractor

ENCODER_PREFIX = "image_encoder."


@dataclass(frozen=True)
class SAMConfig:
    image_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    out_chans: int = 256
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)


SAM_VIT_B = SAMConfig()
SAM_TINY = SAMConfig(
    image_size=64, embed_dim=32, depth=2, num_heads=2, out_chans=16, window_size=2, global_attn_indexes=(1,)
)
SAM_SIZES = {"large": SAM_VIT_B, "vit_b": SAM_VIT_B, "tiny": SAM_TINY}


def sam_config(size: str, input_size: int | None = None) -> SAMConfig:
    if size not in SAM_SIZES:
        raise ConfigError(f"unknown SAM size {size!r} in the semantic block; use one of {sorted(SAM_SIZES)}")
    cfg = dataclasses.replace(SAM_SIZES[size], image_size=input_size or SAM_SIZES[size].image_size)
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"semantic input_size {cfg.image_size} must be a multiple of SAM's patch size 16")
    return cfg


class SAMExtractor(FrozenExtractor):
    """contrastive_features(x) -> [(B, out_chans, S/16, S/16)]: the encoder's neck output."""

    def __init__(self, config: SAMConfig = SAM_VIT_B, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.input_size = config.image_size
        self.grad_checkpointing = grad_checkpointing
        self._register_normalisation(IMAGENET_MEAN, IMAGENET_STD)  # SAM's pixel mean/std, on a [0, 1] scale
        self.image_encoder = ImageEncoderViT(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            out_chans=config.out_chans,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=config.window_size,
            global_attn_indexes=config.global_attn_indexes,
        )
        self.freeze()

    def contrastive_features(self, images: Tensor) -> list[Tensor]:
        encoder = self.image_encoder
        x = encoder.patch_embed(self.preprocess(images)) + encoder.pos_embed  # (B, S/16, S/16, C)
        for block in encoder.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return [encoder.neck(x.permute(0, 3, 1, 2))]


def load_sam_checkpoint(model: SAMExtractor, source: str | Path | Mapping[str, Tensor]) -> int:
    """Copy the `image_encoder.*` weights of a SAM checkpoint (path or state dict) into `model`, strictly.

    Returns the number of tensors loaded; raises UserError listing missing/unexpected encoder keys.
    """
    where = "state dict"
    if not isinstance(source, Mapping):
        where = str(source)
        if not Path(source).is_file():
            raise UserError(
                f"SAM checkpoint {source} does not exist; download sam_vit_b_01ec64.pth and set its path"
            )
        source = torch.load(source, map_location="cpu", weights_only=True)
        source = source.get("model", source)
    expected = model.state_dict()
    state = {key: value for key, value in source.items() if key.startswith(ENCODER_PREFIX)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"SAM checkpoint {where} does not match the SAM encoder: missing keys {missing or 'none'}; "
            f"unexpected keys {unexpected or 'none'}; use sam_vit_b_01ec64.pth with size: large"
        )
    for key, value in state.items():
        target = expected[key].shape
        if value.shape == target:
            continue
        if key.endswith("pos_embed"):
            grid = value.permute(0, 3, 1, 2)  # (1, C, G, G)
            state[key] = F.interpolate(grid, size=target[1:3], mode="bicubic", align_corners=False).permute(
                0, 2, 3, 1
            )
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.shape[1] == target[1]:
            table = value.T.unsqueeze(0)  # (1, head_dim, 2G-1)
            state[key] = F.interpolate(table, size=target[0], mode="linear", align_corners=True)[0].T
        else:
            raise UserError(
                f"SAM checkpoint {where}: {key} has shape {tuple(value.shape)}, expected {tuple(target)}"
            )
    model.load_state_dict(state, strict=True)
    return len(state)
