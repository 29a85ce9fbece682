"""A fast selective scan in plain torch: chunked recurrence with a hand-derived, recomputing backward.

The sequence is cut into chunks of `chunk_len` steps. A *group* of consecutive chunks is scanned at once:
every chunk of the group advances one step per torch call, so the Python loop runs `chunk_len` times per
group on tensors of `chunks × B × D × N` elements instead of L times on `B × D × N`. Chunks start from a
zero state; the true state entering each chunk is then carried across the group on (B, D, N) tensors and
added back with the running product of the decays. The only exponentials are the per-step decays
exp(delta_t·A) (in (0, 1] for the usual A < 0); no cumulative sum is exponentiated, so nothing overflows that
the recurrence itself would not.

Memory: the forward keeps the fp32 inputs in chunk layout (O(B·D·L)) and the state entering every chunk
(O(B·D·N·L/chunk_len)); the (B, D, L, N) states are never stored. The backward recomputes them one group at
a time in four (T, B, D, N, K) workspace buffers of a fixed size, independent of L, runs the adjoint
recurrence dh_t = C_t·dy_t + a_{t+1}·dh_{t+1} the same chunked way, and reduces each group into the input
gradients.

Inner layouts, with K chunks in a group, T = chunk_len, Dg = D / G channels per group of B/C:
    per channel quantities (delta, u, y)     (T, B, G, chunks, Dg)
    per state-group quantities (B, C)        (T, B, G, chunks, N)
    workspace (decays, drives, states)       (T, B, G, K, Dg, N)    the [t] slice is contiguous
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Tuned on 2 CPU cores at B=1, D=512, N=16 (benchmarks/scan.py). Idle, chunk lengths 8-32 and workspaces of
# 2^20-2^23 elements run within 15% of each other; under CPU contention every parallel torch op pays for
# its slowest thread, so the defaults minimise the number of per-step ops: L·chunk_len·B·D·N / workspace.
# Four workspace buffers of 2^23 fp32 elements make 128 MiB at most, whatever L.
DEFAULT_CHUNK_LEN = 16
DEFAULT_WORKSPACE_ELEMENTS = 1 << 23


def to_chunks(x: Tensor, groups: int, chunk_len: int) -> Tensor:
    """(B, G × per_group, L) → (T, B, G, chunks, per_group) in fp32, zero-padded to whole chunks."""
    batch, channels, length = x.shape
    chunks = -(-length // chunk_len)
    x = F.pad(x.float(), (0, chunks * chunk_len - length))
    x = x.view(batch, groups, channels // groups, chunks, chunk_len)
    return x.permute(4, 0, 1, 3, 2).contiguous()


def from_chunks(x: Tensor, length: int) -> Tensor:
    """(T, B, G, chunks, per_group) → (B, G × per_group, L): the inverse of `to_chunks`."""
    chunk_len, batch, groups, chunks, per_group = x.shape
    x = x.permute(1, 2, 4, 3, 0).reshape(batch, groups * per_group, chunks * chunk_len)
    return x[..., :length]


def _group_size(chunk_len: int, batch: int, channels: int, state: int, workspace: int) -> int:
    """Chunks scanned together: as many as fit one (T, B, D, N) workspace buffer of `workspace` elements."""
    return max(1, workspace // (chunk_len * batch * channels * state))


def _workspace(like: Tensor, group_size: int, state: int) -> Tensor:
    """One (T, B, G, K, Dg, N) buffer, allocated once per call and reused by every chunk group."""
    chunk_len, batch, groups, chunks, per_group = like.shape
    return like.new_empty(chunk_len, batch, groups, min(group_size, chunks), per_group, state)


def _decays(delta: Tensor, A: Tensor, out: Tensor) -> Tensor:
    """exp(delta·A): (T, B, G, K, Dg) × (G, Dg, N) → (T, B, G, K, Dg, N).

    With the per-step delta this is the decay a_t; with a sum of deltas over steps, the product of their
    decays, in one parallel op instead of a loop of `chunk_len` multiplications.
    """
    return torch.mul(delta.unsqueeze(-1), A[:, None], out=out).exp_()


def _drives(delta_u: Tensor, B: Tensor, out: Tensor) -> Tensor:
    """x = delta·u·B: (T, B, G, K, Dg) × (T, B, G, K, N) → (T, B, G, K, Dg, N)."""
    return torch.mul(delta_u.unsqueeze(-1), B.unsqueeze(-2), out=out)


class _ChunkedScan(torch.autograd.Function):
    """(u, delta, A, B, C) in chunk layout → (y in chunk layout, last state (B, G, Dg, N)), all fp32."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, group_size: int):
        chunk_len, batch, groups, chunks, per_group = u.shape
        delta_u = delta * u
        y = torch.empty_like(u)
        chunk_starts = u.new_empty(chunks, batch, groups, per_group, A.shape[-1])  # state entering each chunk
        state = u.new_zeros(batch, groups, per_group, A.shape[-1])
        decay_buffer, states_buffer = (_workspace(u, group_size, A.shape[-1]) for _ in range(2))
        for k0 in range(0, chunks, group_size):
            ks = slice(k0, min(k0 + group_size, chunks))
            in_group = slice(0, ks.stop - k0)  # the last group may hold fewer chunks
            decay = _decays(delta[:, :, :, ks], A, out=decay_buffer[:, :, :, in_group])  # (T, B, G, K, Dg, N)
            states = _drives(delta_u[:, :, :, ks], B[:, :, :, ks], out=states_buffer[:, :, :, in_group])
            for t in range(1, chunk_len):  # every chunk of the group from a zero state
                states[t].addcmul_(decay[t], states[t - 1])
            decay = _decays(delta[:, :, :, ks].cumsum(0), A, out=decay)  # a_0···a_t: chunk start to t
            for k in range(states.shape[3]):  # carry the true state across the chunks of the group
                chunk_starts[k0 + k] = state
                state = torch.addcmul(states[-1, :, :, k], decay[-1, :, :, k], state)
            states.addcmul_(decay, chunk_starts[ks].permute(1, 2, 0, 3, 4))
            y[:, :, :, ks] = torch.einsum("tbgkdn,tbgkn->tbgkd", states, C[:, :, :, ks])
        ctx.save_for_backward(u, delta, A, B, C, chunk_starts)
        ctx.group_size = group_size
        ctx.set_materialize_grads(False)
        return y, state

    @staticmethod
    def backward(ctx, dy: Tensor | None, dlast: Tensor | None):
        u, delta, A, B, C, chunk_starts = ctx.saved_tensors
        chunk_len, batch, groups, chunks, per_group = u.shape
        if dy is None:
            dy = torch.zeros_like(u)
        delta_u = delta * u
        dA = torch.zeros_like(A)
        d_delta_decay = torch.empty_like(u)  # sum_n dL/d(log a_t)·A, per channel and step
        g_B = torch.empty_like(u)  # sum_n dh_t·B_t
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        # adjoint of the last state of the current group arriving from the steps after it
        adjoint = dlast.float().clone() if dlast is not None else u.new_zeros(chunk_starts.shape[1:])
        buffers = [_workspace(u, ctx.group_size, A.shape[-1]) for _ in range(4)]
        for k0 in reversed(range(0, chunks, ctx.group_size)):
            ks = slice(k0, min(k0 + ctx.group_size, chunks))
            decay, drive, states, adj = (buffer[:, :, :, : ks.stop - k0] for buffer in buffers)
            d_ks, du_ks, dy_ks = delta[:, :, :, ks], delta_u[:, :, :, ks], dy[:, :, :, ks]
            B_ks, C_ks = B[:, :, :, ks], C[:, :, :, ks]
            _decays(d_ks, A, out=decay)  # (T, B, G, K, Dg, N)
            _drives(du_ks, B_ks, out=drive)
            torch.addcmul(drive[0], decay[0], chunk_starts[ks].permute(1, 2, 0, 3, 4), out=states[0])
            for t in range(1, chunk_len):
                torch.addcmul(drive[t], decay[t], states[t - 1], out=states[t])

            # adjoint dh_t = C_t·dy_t + a_{t+1}·dh_{t+1}, from a zero adjoint at every chunk end
            torch.mul(dy_ks.unsqueeze(-1), C_ks.unsqueeze(-2), out=adj)
            for t in range(chunk_len - 2, -1, -1):
                adj[t].addcmul_(decay[t + 1], adj[t + 1])
            first_decay = decay[0].clone()  # (B, G, K, Dg, N)
            # a_{t+1}···a_{T-1}: what carries the adjoint of the chunk's last state back to step t
            delta_sum = d_ks.cumsum(0)
            after = _decays(delta_sum[-1] - delta_sum, A, out=decay)
            chunk_end_adjoint = torch.empty_like(first_decay)
            for k in reversed(range(adj.shape[3])):
                chunk_end_adjoint[:, :, k] = adjoint
                adjoint = first_decay[:, :, k] * (adj[0, :, :, k] + after[0, :, :, k] * adjoint)
            adj.addcmul_(after, chunk_end_adjoint)

            # dL/d(log a_t) = dh_t ⊙ a_t h_{t-1} = dh_t ⊙ (h_t - x_t)
            d_log_decay = torch.sub(states, drive, out=drive).mul_(adj)
            d_delta_decay[:, :, :, ks] = torch.einsum("tbgkdn,gdn->tbgkd", d_log_decay, A)
            dA += d_log_decay.mul_(d_ks.unsqueeze(-1)).sum(dim=0).sum(dim=(0, 2))  # summing T first is faster
            g_B[:, :, :, ks] = torch.einsum("tbgkdn,tbgkn->tbgkd", adj, B_ks)
            dB[:, :, :, ks] = torch.einsum("tbgkdn,tbgkd->tbgkn", adj, du_ks)
            dC[:, :, :, ks] = torch.einsum("tbgkdn,tbgkd->tbgkn", states, dy_ks)
        du = delta * g_B
        d_delta = u * g_B + d_delta_decay
        return du, d_delta, dA, dB, dC, None


def selective_scan_chunked(
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
    *,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    workspace_elements: int = DEFAULT_WORKSPACE_ELEMENTS,
) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as `selective_scan_reference`; fp32 accumulation for every input dtype.

    u, delta, z: (B, D, L); A: (D, N); B, C: (B, G, N, L); D, delta_bias: (D,).
    Returns out (B, D, L) in u's dtype, and the last state (B, D, N) in fp32 if `return_last_state`.
    """
    batch, channels, length = u.shape
    groups, state_dim = B.shape[1], A.shape[1]
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    chunk_len = max(1, min(chunk_len, length))
    group_size = _group_size(chunk_len, batch, channels, state_dim, workspace_elements)
    y, last_state = _ChunkedScan.apply(
        to_chunks(u, groups, chunk_len),
        to_chunks(delta, groups, chunk_len),  # padded steps have delta = 0: the state passes unchanged
        A.float().view(groups, channels // groups, state_dim),
        to_chunks(B.flatten(1, 2), groups, chunk_len),
        to_chunks(C.flatten(1, 2), groups, chunk_len),
        group_size,
    )
    y = from_chunks(y, length)  # (B, D, L)
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(u.dtype)
    return (out, last_state.reshape(batch, channels, state_dim)) if return_last_state else out
