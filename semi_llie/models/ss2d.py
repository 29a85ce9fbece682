"""SS2D: the multi-scale 2D selective-scan token mixer of the VSS block (METHOD §1, "SS2D").

    x_in, z = in_proj(x)                                 (B, H, W, C) → 2 × (B, H, W, Di)
    y = 2D selective scan(multi-scale depthwise(x_in))   (B, Di, H, W)
    out = out_proj(LayerNorm(y) * SiLU(z))               (B, H, W, C)

The 2D selective scan reads the image as four sequences of length L = H·W (row-major, column-major and
the reverse of each), scans each with its own projections, A, D and dt bias, and sums the four outputs per
pixel. Every pixel therefore sees context from all four sides.

The four directions are four selective-scan calls of Di channels (G = 1), not one call over K·Di channels:
only one direction's (B, Di, L) tensors are alive at a time, which halves the peak memory of inference at
600×400. Every tensor stays in row-major order; each call gets its order as `positions` (see
`scan_positions`), which the C++ CPU kernel follows in place, so no direction copies, flips or transposes
its inputs. The parameters are stored stacked over the K directions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from semi_llie.errors import ConfigError
from semi_llie.ops import BACKENDS, selective_scan

# Four scan orders: row-major, column-major, reversed row-major, reversed column-major.
DIRECTIONS = 4

ScanFn = Callable[..., Tensor]


def scan_positions(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(DIRECTIONS, H·W) int64: row k lists the row-major pixel indices in the order direction k visits them.

    The scans take these as `positions` and leave every tensor in row-major order; reordering copies
    (transposes and flips of (B, Di, L) tensors) cost about a fifth of a CPU training step.
    """
    grid = torch.arange(height * width, device=device).view(height, width)
    row_major, column_major = grid.flatten(), grid.t().flatten()
    return torch.stack([row_major, column_major, row_major.flip(0), column_major.flip(0)])


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous, once.

    The scan output is summed over the four directions and then transposed to tokens, so its gradient
    arrives transposed; each direction's scan would otherwise copy that same gradient to (B, Di, L) itself.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


class MultiScaleDepthwise(nn.Module):
    """Local mixing at two receptive fields: a = DW3×3(x), b = DW5×5(a), out = 1×1(cat[SiLU a, SiLU b]).

    The 5×5 conv is cascaded on the pre-activation `a`, so `b` covers a 7×7 neighbourhood.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv3 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.dwconv5 = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.fuse = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, D, H, W) → (B, D, H, W)."""
        a = self.dwconv3(x)
        b = self.dwconv5(a)
        return self.fuse(torch.cat([F.silu(a), F.silu(b)], dim=1))


class SS2D(nn.Module):
    """The 2D selective-scan mixer. `scan_fn` replaces the selective scan (tests inject simple scans).

    `scan_fn` must follow `semi_llie.ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
    positions=...)` (mamba_ssm's `selective_scan_fn` plus the scan order); by default it is that function
    with `backend=scan_backend`.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 2,
        dt_rank: int | str = "auto",
        scan_backend: str = "auto",
        scan_fn: ScanFn | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        if scan_backend not in BACKENDS:
            raise ConfigError(
                f"unknown scan_backend {scan_backend!r}; set it to one of {', '.join(BACKENDS)}"
            )
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = resolve_dt_rank(dt_rank, d_model)
        self.scan_fn = scan_fn or functools.partial(selective_scan, backend=scan_backend)
        k, d_inner, rank = DIRECTIONS, self.d_inner, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.local = MultiScaleDepthwise(d_inner)
        # Per-direction projections, stored stacked (one tensor per kind, indexed by direction).
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, d_inner))  # x_proj[k]: Di → R+2N
        self.dt_proj_weight = nn.Parameter(torch.empty(k, d_inner, rank))  # dt_proj[k]: R → Di
        self.dt_proj_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_log = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.D = nn.Parameter(torch.empty(k * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self._reset_ssm_parameters(dt_min, dt_max, dt_floor)

    @torch.no_grad()
    def _reset_ssm_parameters(self, dt_min: float, dt_max: float, dt_floor: float) -> None:
        """Standard Mamba init (Linear layers are initialised by the model's `init_weights`)."""
        nn.init.trunc_normal_(self.x_proj_weight, std=0.02)
        nn.init.uniform_(self.dt_proj_weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        # softplus(dt_proj_bias) is log-uniform in [dt_min, dt_max]: start with a spread of time scales.
        dt = torch.exp(torch.rand_like(self.dt_proj_bias) * math.log(dt_max / dt_min) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        # S4D-real: A = -(1..N) for every channel of every direction.
        self.A_log.copy_(
            torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log)
        )
        self.D.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) → (B, H, W, C)."""
        x_in, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, Di) each
        x_in = self.local(rearrange(x_in, "b h w d -> b d h w"))  # (B, Di, H, W)
        y = rearrange(self.scan_2d(x_in), "b d h w -> b h w d")
        return self.out_proj(self.out_norm(y) * F.silu(z))

    def scan_2d(self, x: Tensor) -> Tensor:
        """(B, Di, H, W) → (B, Di, H, W): selective scans in the four orders, summed per pixel."""
        _, _, height, width = x.shape
        A = -torch.exp(self.A_log.float()).view(DIRECTIONS, self.d_inner, self.d_state)  # (K, Di, N)
        skip = self.D.float().view(DIRECTIONS, self.d_inner)  # (K, Di)
        orders = scan_positions(height, width, x.device)  # (K, L)
        # (B, Di, L), row-major for every direction. The convs leave x channels-last; one copy here instead
        # of one in each direction's projection and scan.
        u = x.flatten(2).contiguous()
        batch = u.shape[0]
        merged = None
        for k in range(DIRECTIONS):
            # bmm with the weight expanded over the batch, not einsum or matmul: those fold the batch into
            # the L axis and copy (B, Di, L) tensors to (B·L, Di) and back, forward and backward.
            x_dbl = torch.bmm(self.x_proj_weight[k].expand(batch, -1, -1), u)  # (B, R+2N, L)
            dts, Bs, Cs = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
            y = self.scan_fn(
                u,
                torch.bmm(self.dt_proj_weight[k].expand(batch, -1, -1), dts),  # delta: (B, Di, L)
                A[k],  # (Di, N)
                Bs.unsqueeze(1).contiguous(),  # B: (B, G=1, N, L)
                Cs.unsqueeze(1).contiguous(),  # C: (B, G=1, N, L)
                skip[k],
                delta_bias=self.dt_proj_bias[k].float(),
                delta_softplus=True,
                positions=orders[k],
            )
            merged = y if merged is None else merged + y
        return _ContiguousGradient.apply(merged).unflatten(-1, (height, width))


def resolve_dt_rank(dt_rank: int | str, d_model: int) -> int:
    """`"auto"` → ceil(d_model / 16), as in Mamba; otherwise a positive int."""
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1:
        raise ConfigError(f"dt_rank must be a positive integer or 'auto', got {dt_rank!r}")
    return dt_rank
