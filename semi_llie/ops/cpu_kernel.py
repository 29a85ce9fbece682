"""The C++ CPU selective scan (csrc/selective_scan_cpu.cpp), compiled on first use.

`torch.utils.cpp_extension.load` builds it with the machine's C++ compiler and ninja into torch's extension
cache (``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``): once (tens of seconds), then
a cached load. The build targets AVX2+FMA when this CPU has them and baseline x86-64/ARM otherwise; the
instruction set is part of the extension's name so that a cache shared between machines never hands one
CPU code for another. If the build fails, or ``SEMI_LLIE_CPU_KERNEL=0``, `load_kernel` returns None and
the torch backend uses the chunked pure-torch scan instead (with one warning saying why).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.cpp"
# Steps per tile; the backward recomputes each tile from its saved entry state: (B, D, L / CHUNK, N) floats.
CHUNK = 64
DISABLE_ENV = "SEMI_LLIE_CPU_KERNEL"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()[2:]}


def _instruction_set() -> tuple[str, list[str]]:
    """(name, compiler flags) of the vector instructions to build for."""
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; a venv used without activation has the pip package's binary only
    in its own bin folder."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


@functools.cache
def load_kernel() -> ModuleType | None:
    """The compiled extension, or None when it is disabled or cannot be built here (warned once)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    isa, isa_flags = _instruction_set()
    _put_ninja_on_path()
    # Importing cpp_extension warns when a CUDA toolkit is installed but no GPU is present: irrelevant here.
    cpp_extension_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension_logger.level
    cpp_extension_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=f"semi_llie_selective_scan_cpu_{isa}",
            sources=[str(SOURCE)],
            # -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers; without it the kernel runs
            # on one thread.
            extra_cflags=["-O3", "-fopenmp", "-Wno-psabi", *isa_flags],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a read-only cache: all mean "use the fallback"
        warnings.warn(
            f"The C++ CPU selective-scan kernel could not be built ({type(error).__name__}: {error}); "
            "using the slower chunked torch scan. It needs a C++ compiler (g++ or clang) and ninja; "
            f"set {DISABLE_ENV}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    finally:
        cpp_extension_logger.setLevel(level)


def _fp32(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach().float().contiguous()


def _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, positions) -> tuple[Tensor | None, ...]:
    """The scan's inputs as the kernel reads them: fp32, contiguous, B and C transposed to (B, G, L, N) so
    that the N values of one step are adjacent, and gathered into scan order (row t is step t)."""
    B_t, C_t = (_step_major(x, positions) for x in (B, C))
    return _fp32(u), _fp32(delta), _fp32(A), B_t, C_t, _fp32(D), _fp32(z), _fp32(delta_bias)


def _step_major(x: Tensor, positions: Tensor | None) -> Tensor:
    """(B, G, N, L) → contiguous fp32 (B, G, L, N) with row t the scan's step t."""
    x = x.detach().float().transpose(-1, -2)
    return (x if positions is None else x.index_select(-2, positions)).contiguous()


def _memory_order(grad_t: Tensor, positions: Tensor | None) -> Tensor:
    """A gradient of B or C from the kernel, (B, G, L, N) in scan order → (B, G, N, L) in memory order."""
    if positions is not None:
        grad_t = torch.empty_like(grad_t).index_copy_(-2, positions, grad_t)
    return grad_t.transpose(-1, -2)


class _CpuScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, positions):
        inputs = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, positions)
        out, last, starts = load_kernel().forward(*inputs, delta_softplus, positions, CHUNK, True)
        ctx.save_for_backward(*inputs, positions, starts)
        ctx.delta_softplus = delta_softplus
        ctx.dtypes = [None if x is None else x.dtype for x in (u, delta, A, B, C, D, z, delta_bias)]
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, Bt, Ct, D, z, bias, positions, starts = ctx.saved_tensors
        grads = load_kernel().backward(
            u,
            delta,
            A,
            Bt,
            Ct,
            D,
            z,
            bias,
            ctx.delta_softplus,
            positions,
            starts,
            CHUNK,
            _fp32(dout),
            _fp32(dlast),
        )
        du, d_delta, dA, dBt, dCt, dD, dz, d_bias = grads
        dB, dC = (_memory_order(grad, positions) for grad in (dBt, dCt))
        grads = (du, d_delta, dA, dB, dC, dD, dz, d_bias)
        return (
            *(None if dtype is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)),
            None,
            None,
        )


def _check_permutation(positions: Tensor, length: int) -> None:
    """Every index of 0..length-1 exactly once (an out-of-range index lands in the extra bin, so another
    index is then missing). The kernel checks again before it indexes memory with them."""
    if positions.shape == (length,):
        counts = torch.bincount(positions.clamp(0, length), minlength=length + 1)[:length]
        if bool((counts == 1).all()):
            return
    raise ValueError(f"positions must be a permutation of 0..{length - 1}; got {positions[:8].tolist()}...")


def selective_scan_cpu(
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
    positions: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as `selective_scan_reference`, on CPU tensors; needs `load_kernel()` to succeed.

    u, delta, z: (B, D, L); A: (D, N); B, C: (B, G, N, L); D, delta_bias: (D,). Returns out (B, D, L) in
    u's dtype, and the last state (B, D, N) in fp32 if `return_last_state`. `positions` (L,), a permutation
    of range(L): step t of the recurrence is position positions[t] of every L axis, read and written in place.
    """
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    if positions is not None:
        positions = positions.to(device="cpu", dtype=torch.int64).contiguous()
        _check_permutation(positions, u.shape[-1])
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        out, last = _CpuScan.apply(*inputs, delta_softplus, positions)
    else:  # inference: no chunk-entry states to save
        kernel_inputs = _kernel_inputs(*inputs, positions)
        out, last, _ = load_kernel().forward(*kernel_inputs, delta_softplus, positions, CHUNK, False)
        out = out.to(u.dtype)
    return (out, last) if return_last_state else out
