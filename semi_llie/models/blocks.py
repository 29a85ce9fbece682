"""VSS block, its channel-attention conv branch, the guided fusion, and the residual group (METHOD §1).

Inside the body, tokens are laid out (B, H, W, C) so LayerNorm and Linear act on the channel axis; the
conv branches convert to (B, C, H, W) and back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from semi_llie.models.ss2d import SS2D, ScanFn

CAB_COMPRESS = 3  # CAB hidden width C // 3 (64 → 21)
ATTENTION_SQUEEZE = 30  # channel-attention bottleneck C // 30 (64 → 2)


def to_image(x: Tensor) -> Tensor:
    """(B, H, W, C) → (B, C, H, W)."""
    return rearrange(x, "b h w c -> b c h w")


def to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) → (B, H, W, C)."""
    return rearrange(x, "b c h w -> b h w c")


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability `p`, scale the rest."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: x · sigmoid(1×1(ReLU(1×1(GAP(x)))))."""

    def __init__(self, channels: int, squeeze: int = ATTENTION_SQUEEZE) -> None:
        super().__init__()
        hidden = max(1, channels // squeeze)
        self.squeeze = nn.Conv2d(channels, hidden, 1)
        self.excite = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        weights = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        weights = torch.sigmoid(self.excite(F.relu(self.squeeze(weights))))
        return x * weights


class CAB(nn.Module):
    """Channel-attention block: Conv3×3 C→C/3 → GELU → Conv3×3 C/3→C → channel attention."""

    def __init__(self, channels: int, compress: int = CAB_COMPRESS) -> None:
        super().__init__()
        hidden = max(1, channels // compress)
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, channels, 3, padding=1),
            ChannelAttention(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        return self.body(x)


class GatedFusion(nn.Module):
    """Fuse block tokens with illumination features (guided variant, 48,000 parameters at C=64).

    cat[x, illu_fea] → 1×1 2C→4C → DW3×3 (reflect) → split a, b → GELU(a)·b → 1×1 2C→C → + x → 1×1 C→C.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(2 * channels, 4 * channels, 1)
        self.dwconv = nn.Conv2d(
            4 * channels, 4 * channels, 3, padding=1, padding_mode="reflect", groups=4 * channels
        )
        self.reduce = nn.Conv2d(2 * channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, illu_fea: Tensor) -> Tensor:
        """x (B, C, H, W), illu_fea (B, C, H, W) → (B, C, H, W)."""
        a, b = self.dwconv(self.expand(torch.cat([x, illu_fea], dim=1))).chunk(2, dim=1)  # (B, 2C, H, W) each
        return self.out(self.reduce(F.gelu(a) * b) + x)


class VSSBlock(nn.Module):
    """h = x·s1 + DropPath(SS2D(LN1(x'))), out = h·s2 + CAB(LN2(h)); x' = x, or GatedFusion(x, illu_fea).

    Only the SS2D branch sees the fused tensor: the residual path keeps the unfused input.
    """

    def __init__(
        self,
        dim: int,
        d_state: int,
        expand: int,
        dt_rank: int | str,
        drop_path: float,
        guided: bool,
        scan_backend: str,
        scan_fn: ScanFn | None = None,
    ) -> None:
        super().__init__()
        self.fusion = GatedFusion(dim) if guided else None
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = SS2D(dim, d_state, expand, dt_rank, scan_backend=scan_backend, scan_fn=scan_fn)
        self.drop_path = DropPath(drop_path)
        self.skip_scale1 = nn.Parameter(torch.ones(dim))  # s1
        self.norm2 = nn.LayerNorm(dim)
        self.cab = CAB(dim)
        self.skip_scale2 = nn.Parameter(torch.ones(dim))  # s2

    def forward(self, x: Tensor, illu_fea: Tensor | None = None) -> Tensor:
        """x (B, H, W, C), illu_fea (B, C, H, W) when guided → (B, H, W, C)."""
        mixer_in = x if self.fusion is None else to_tokens(self.fusion(to_image(x), illu_fea))
        h = x * self.skip_scale1 + self.drop_path(self.mixer(self.norm1(mixer_in)))
        return h * self.skip_scale2 + to_tokens(self.cab(to_image(self.norm2(h))))


class ResidualGroup(nn.Module):
    """out = tokens(Conv3×3(image(Block(...Block(x))))) + x."""

    def __init__(self, blocks: list[VSSBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        dim = blocks[0].norm1.normalized_shape[0]
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor, illu_fea: Tensor | None = None) -> Tensor:
        """x (B, H, W, C), illu_fea (B, C, H, W) when guided → (B, H, W, C)."""
        out = x
        for block in self.blocks:
            out = block(out, illu_fea)
        return to_tokens(self.conv(to_image(out))) + x
