"""The plain sequential selective scan: short, obviously correct, autograd does the backward.

It is the ground truth the fast backends are tested against, not something to train with: it walks L one
step at a time and keeps the whole (B, D, L, N) discretised system alive for autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t + D u_t;  out = y * silu(z).

    u, delta, z: (B, D, L); A: (D, N); B, C: (B, G, N, L); D, delta_bias: (D,).
    Returns out (B, D, L) in u's dtype, and the last state (B, D, N) in fp32 if `return_last_state`.
    """
    dtype_out = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    channels_per_group = u.shape[1] // B.shape[1]
    B = B.repeat_interleave(channels_per_group, dim=1)  # (B, D, N, L)
    C = C.repeat_interleave(channels_per_group, dim=1)  # (B, D, N, L)

    decay = torch.exp(torch.einsum("bdl,dn->bldn", delta, A))  # (B, L, D, N)
    drive = torch.einsum("bdl,bdnl->bldn", delta * u, B)  # (B, L, D, N)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (B, D, N)
    ys = []
    for decay_t, drive_t, C_t in zip(decay.unbind(1), drive.unbind(1), C.unbind(3), strict=True):
        state = decay_t * state + drive_t
        ys.append(torch.einsum("bdn,bdn->bd", state, C_t))
    y = torch.stack(ys, dim=2)  # (B, D, L)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(dtype_out)
    return (out, state) if return_last_state else out
