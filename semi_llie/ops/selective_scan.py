"""`selective_scan`: one entry point, three implementations (METHOD §6).

- ``cuda``: mamba_ssm's fused kernel (`selective_scan_fn`), imported only when asked for.
- ``torch``: our own implementation. On CPU tensors `selective_scan_cpu`, a C++ kernel compiled on first use
  (`cpu_kernel.py`); on other devices, or where that kernel cannot be built, `selective_scan_chunked`, a
  chunked pure-torch scan with a recomputing backward.
- ``reference``: the step-by-step recurrence the other two are tested against.
- ``auto``: the kernel for CUDA tensors when mamba_ssm imports, else ``torch`` (with a one-time warning on
  CUDA, where the missing kernel costs real speed; CPU tensors use ``torch`` silently).

`positions` (our addition to mamba_ssm's signature) sets the order in which the recurrence visits the L axis
while every tensor stays in its memory order. The C++ CPU kernel follows it natively; the other
implementations get inputs gathered into scan order and the output scattered back.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from semi_llie.errors import ConfigError
from semi_llie.ops.chunked import selective_scan_chunked
from semi_llie.ops.cpu_kernel import load_kernel, selective_scan_cpu
from semi_llie.ops.reference import selective_scan_reference

BACKENDS = ("auto", "cuda", "torch", "reference")
INSTALL_HINT = 'pip install --no-build-isolation "semi-llie[cuda]"'

_warned_kernel_missing = False


@functools.cache
def _import_kernel() -> tuple[Callable[..., Tensor | tuple[Tensor, Tensor]] | None, str]:
    """mamba_ssm's `selective_scan_fn`, or None and why it did not import (tried once per process)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as error:  # absent, or built against another torch
        return None, str(error)
    return selective_scan_fn, ""


def kernel_available() -> bool:
    """Whether mamba_ssm's CUDA selective-scan kernel imports."""
    return _import_kernel()[0] is not None


def resolve_backend(backend: str, device_type: str) -> str:
    """The concrete backend ("cuda" | "torch" | "reference") for `backend` and tensors on `device_type`."""
    global _warned_kernel_missing
    if backend not in BACKENDS:
        raise ConfigError(
            f"Unknown selective-scan backend {backend!r}: set scan_backend to one of {BACKENDS}."
        )
    if backend != "auto":
        return backend
    if device_type != "cuda":
        return "torch"
    if kernel_available():
        return "cuda"
    if not _warned_kernel_missing:
        _warned_kernel_missing = True
        warnings.warn(
            "mamba_ssm's CUDA selective-scan kernel is not available; using the slower torch scan. "
            f"Install it with: {INSTALL_HINT}",
            RuntimeWarning,
            stacklevel=3,
        )
    return "torch"


def _cuda_kernel() -> Callable[..., Tensor | tuple[Tensor, Tensor]]:
    kernel, why = _import_kernel()
    if kernel is None:
        raise ImportError(
            f"The 'cuda' selective-scan backend needs mamba_ssm ({why}); install it with: {INSTALL_HINT}"
        )
    return kernel


def _torch_implementation(device_type: str) -> Callable[..., Tensor | tuple[Tensor, Tensor]]:
    """The C++ kernel for CPU tensors when it builds, else the chunked torch scan."""
    if device_type == "cpu" and load_kernel() is not None:
        return selective_scan_cpu
    return selective_scan_chunked


def selective_scan(
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
    backend: str = "auto",
    positions: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba_ssm `selective_scan_fn` semantics.

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t + D u_t;  out = y * silu(z), where
    delta is first shifted by `delta_bias` and passed through softplus if `delta_softplus`.

    u, delta, z: (B, D, L); A: (D, N) real; B, C: (B, G, N, L), channel d reads group d // (D / G);
    D, delta_bias: (D,). Returns out (B, D, L) in u's dtype, and with `return_last_state` also the final
    state (B, D, N) in fp32. `positions` (L,) int64, a permutation of range(L): step t of the recurrence is
    position positions[t] of every L axis (default: t), so the last state is the one after positions[-1].
    """
    if u.shape[1] % B.shape[1] or B.shape != C.shape:
        raise ValueError(
            f"B and C must be (B, G, N, L) with D divisible by G; got u {tuple(u.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    implementation = {
        "cuda": _cuda_kernel,
        "torch": lambda: _torch_implementation(u.device.type),
        "reference": lambda: selective_scan_reference,
    }[resolve_backend(backend, u.device.type)]()
    if positions is None:
        return implementation(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if implementation is selective_scan_cpu:
        return implementation(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, positions=positions
        )
    return _scan_gathered(
        implementation, positions, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )


def _scan_gathered(
    implementation, positions, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
) -> Tensor | tuple[Tensor, Tensor]:
    """`positions` for implementations that scan in memory order: gather the L axes into scan order, scan,
    scatter the output back."""
    if positions.shape != (u.shape[-1],):
        raise ValueError(f"positions must be (L,) = ({u.shape[-1]},); got {tuple(positions.shape)}")
    positions = positions.to(device=u.device, dtype=torch.int64)
    u, delta, B, C = (x.index_select(-1, positions) for x in (u, delta, B, C))
    z = None if z is None else z.index_select(-1, positions)
    result = implementation(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    out, last = result if return_last_state else (result, None)
    out = out.index_select(-1, torch.argsort(positions))  # back to memory order
    return (out, last) if return_last_state else out
