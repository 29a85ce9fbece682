"""Swin Transformer image encoder, laid out like the Microsoft/RAM code so its checkpoints load by name.

Parameter names (relative to the encoder): `patch_embed.proj`, `patch_embed.norm`,
`layers.{i}.blocks.{j}.{norm1,attn.qkv,attn.proj,attn.relative_position_bias_table,norm2,mlp.fc1,mlp.fc2}`,
`layers.{i}.downsample.{norm,reduction}`, `norm`. The relative-position index and the shifted-window
mask are derived from the geometry, so they are non-persistent buffers (the RAM loader drops them too).

Differences from the reference: no dropout or stochastic depth (the encoder is frozen and always in
eval mode), attention through `scaled_dot_product_attention`, optional activation checkpointing per block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# The reference masks cross-region attention in shifted windows with -100 (not -inf): keep it identical.
SHIFTED_WINDOW_MASK_VALUE = -100.0


def relative_position_index(window: int) -> Tensor:
    """(window², window²) index into the (2·window-1)² relative-position table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def shifted_window_mask(resolution: int, window: int, shift: int) -> Tensor:
    """(num_windows, window², window²) additive mask keeping attention inside each pre-shift region."""
    regions = torch.zeros(resolution, resolution)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in bounds for c in bounds):
        regions[rows, cols] = label
    windows = rearrange(regions, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=window, ww=window)
    different = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, SHIFTED_WINDOW_MASK_VALUE)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x (B·nW, N, C) with N = window²; mask (nW, N, N) or None."""
        num_windows = 1 if mask is None else mask.shape[0]
        # windows are batch-major, (B·nW): split them so the per-window mask broadcasts over the batch
        q, k, v = rearrange(
            self.qkv(x), "(b nw) n (three h d) -> three b nw h n d", nw=num_windows, three=3, h=self.num_heads
        )
        bias = self.relative_position_bias_table[self.relative_position_index]  # (N, N, heads)
        bias = rearrange(bias, "n m h -> h n m")
        if mask is not None:
            bias = bias + mask[:, None]  # (nW, heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, nW, heads, N, d)
        return self.proj(rearrange(out, "b nw h n d -> (b nw) n (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        # As in the reference: a stage no larger than the window attends globally, without shift.
        if resolution <= window:
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, H·W, C) -> (B, H·W, C)."""
        h = w = self.resolution
        y = rearrange(self.norm1(x), "b (h w) c -> b h w c", h=h, w=w)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = rearrange(y, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=self.window, ww=self.window)
        y = self.attn(y, self.attn_mask)
        y = rearrange(
            y,
            "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c",
            nh=h // self.window,
            nw=w // self.window,
            wh=self.window,
        )
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + rearrange(y, "b h w c -> b (h w) c")
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H·W, C) -> (B, H/2·W/2, 2C); the 2×2 neighbours concatenated in the reference's order."""
        x = rearrange(x, "b (h dh w dw) c -> b (h w) (dw dh c)", h=self.resolution // 2, dh=2, dw=2)
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(rearrange(self.proj(x), "b c h w -> b (h w) c"))


class SwinStage(nn.Module):
    def __init__(self, dim: int, resolution: int, depth: int, num_heads: int, window: int, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim, resolution, num_heads, window, shift=0 if j % 2 == 0 else window // 2, mlp_ratio=4.0
            )
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim, resolution) if downsample else None


class SwinTransformer(nn.Module):
    """Swin encoder for square `img_size` inputs (already resized and normalised).

    `forward` returns (B, 1 + L, C_last): the average token followed by the L final tokens, after the
    final LayerNorm, as RAM's image encoder does. `stage_features` returns the output of the last
    block of each requested stage, before its patch merging: (B, H_i·W_i, C_i).
    """

    def __init__(
        self,
        img_size: int = 384,
        patch_size: int = 4,
        embed_dim: int = 192,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (6, 12, 24, 48),
        window_size: int = 12,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        resolution = img_size // patch_size
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            stage_resolution = resolution // 2**i
            self.layers.append(
                SwinStage(
                    embed_dim * 2**i,
                    stage_resolution,
                    depth,
                    heads,
                    window_size,
                    downsample=i < len(depths) - 1,
                )
            )
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def _run_block(self, block: SwinBlock, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # Recompute the block in backward: the frozen weights need no grads, only the activations.
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _stages(self, x: Tensor, num_stages: int) -> list[Tensor]:
        """Run patch embedding and the first `num_stages` stages; return each stage's pre-merge output."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"Swin expects {self.img_size}x{self.img_size} inputs, got {tuple(x.shape[-2:])}"
            )
        x = self.patch_embed(x)
        outputs = []
        for i, stage in enumerate(self.layers[:num_stages]):
            for block in stage.blocks:
                x = self._run_block(block, x)
            outputs.append(x)
            if stage.downsample is not None and i < num_stages - 1:
                x = stage.downsample(x)
        return outputs

    def stage_features(self, x: Tensor, stages: Sequence[int]) -> list[Tensor]:
        """x (B, 3, S, S) -> [(B, H_i·W_i, C_i) for i in stages] (0-based stage indices)."""
        outputs = self._stages(x, max(stages) + 1)
        return [outputs[i] for i in stages]

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, S, S) -> (B, 1 + L, C_last)."""
        tokens = self.norm(self._stages(x, len(self.layers))[-1])
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
