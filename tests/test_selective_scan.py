"""Every selective-scan backend agrees with the step-by-step reference, in the output and in the gradients.

Tolerances: fp32 rtol 6e-4 / atol 2e-3 (mamba_ssm's own kernel tests). For bf16 and fp16 inputs both sides
accumulate in fp32 and only the rounding of the inputs' dtype remains: bf16 (8 mantissa bits) rtol 2e-2 /
atol 5e-2, fp16 (11 bits) rtol 5e-3 / atol 1e-2.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import pytest
import torch

from semi_llie.errors import ConfigError
from semi_llie.ops import cpu_kernel, selective_scan, selective_scan_chunked, selective_scan_reference
from semi_llie.ops.cpu_kernel import selective_scan_cpu

# the dispatch module itself (the package attribute of the same name is the function)
dispatch = importlib.import_module("semi_llie.ops.selective_scan")

CHANNELS, STATE = 8, 4
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TOLERANCES = {
    torch.float32: dict(rtol=6e-4, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=5e-2),
    torch.float16: dict(rtol=5e-3, atol=1e-2),
}

# The torch backend as the dispatcher runs it (on CPU: the C++ kernel), the C++ kernel itself, and the
# chunked pure-torch fallback as shipped and with short chunks and a workspace of 3 chunks (B·D·N = 64 here)
# so that the carries across chunks and across chunk groups, and a last group with fewer chunks, are
# exercised.
TORCH_VARIANTS = {
    "torch-auto": functools.partial(selective_scan, backend="torch"),
    "cpu-kernel": selective_scan_cpu,
    "chunked-4-groups": functools.partial(selective_scan_chunked, chunk_len=4, workspace_elements=3 * 4 * 64),
    "chunked-16": functools.partial(selective_scan_chunked, chunk_len=16),
}


def cuda_kernel_ready() -> bool:
    return torch.cuda.is_available() and dispatch.kernel_available()


def make_inputs(
    length: int,
    groups: int,
    *,
    with_d: bool,
    with_z: bool,
    with_bias: bool,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels: int = CHANNELS,
    state: int = STATE,
) -> dict[str, torch.Tensor | None]:
    """Inputs distributed like mamba_ssm's kernel tests; A is fp32, as in the Mamba block."""
    generator = torch.Generator().manual_seed(length * 10 + groups)

    def rand(*shape, scale=1.0, normal=True):
        x = torch.randn(*shape, generator=generator) if normal else torch.rand(*shape, generator=generator)
        return x * scale

    inputs = {
        "u": rand(2, channels, length).to(dtype),
        "delta": rand(2, channels, length, scale=0.5, normal=False).to(dtype),
        "A": rand(channels, state, scale=-0.5, normal=False),
        "B": rand(2, groups, state, length).to(dtype),
        "C": rand(2, groups, state, length).to(dtype),
        "D": rand(channels) if with_d else None,
        "z": rand(2, channels, length).to(dtype) if with_z else None,
        "delta_bias": rand(channels, scale=0.5, normal=False) if with_bias else None,
    }
    return {k: None if v is None else v.to(device).requires_grad_() for k, v in inputs.items()}


def run_with_grads(scan, inputs, *, softplus: bool, last_state: bool) -> list[torch.Tensor | None]:
    """Outputs and the gradients of all inputs under a fixed random weighting of the outputs."""
    inputs = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    result = scan(**inputs, delta_softplus=softplus, return_last_state=last_state)
    out, state = result if last_state else (result, None)
    generator = torch.Generator().manual_seed(0)
    loss = (out.float() * torch.randn(out.shape, generator=generator).to(out.device)).sum()
    if state is not None:
        loss = loss + (state * torch.randn(state.shape, generator=generator).to(state.device)).sum()
    loss.backward()
    return [out, state] + [None if inputs[k] is None else inputs[k].grad for k in INPUT_NAMES]


def assert_match(actual: list, expected: list, dtype: torch.dtype) -> None:
    for name, a, e in zip(("out", "last_state", *INPUT_NAMES), actual, expected, strict=True):
        assert (a is None) == (e is None), name
        if e is not None:
            assert a.dtype == e.dtype, name
            torch.testing.assert_close(
                a.float(), e.float(), **TOLERANCES[dtype], msg=lambda m, n=name: f"{n}: {m}"
            )


FLAG_SETS = [  # (with_d, with_z, with_bias, softplus, last_state)
    (True, True, True, True, True),
    (False, False, False, False, False),
    (True, False, True, False, True),
    (False, True, False, True, False),
]
SHAPES = [(1, 1), (7, 4), (65, 1), (65, 4), (300, 4)]  # (L, G): L not a multiple of any chunk length


@pytest.mark.parametrize("variant", list(TORCH_VARIANTS))
@pytest.mark.parametrize("length,groups", SHAPES)
@pytest.mark.parametrize(
    "flags", FLAG_SETS, ids=lambda f: "".join("DzbsL"[i] if on else "-" for i, on in enumerate(f))
)
def test_torch_backend_matches_reference(variant, length, groups, flags):
    with_d, with_z, with_bias, softplus, last_state = flags
    inputs = make_inputs(length, groups, with_d=with_d, with_z=with_z, with_bias=with_bias)
    kwargs = dict(softplus=softplus, last_state=last_state)
    expected = run_with_grads(selective_scan_reference, inputs, **kwargs)
    assert_match(run_with_grads(TORCH_VARIANTS[variant], inputs, **kwargs), expected, torch.float32)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("channels,groups", [(36, 4), (40, 1), (8, 2)])
def test_cpu_kernel_blocks_and_slices_match_reference(channels, groups, threads):
    """Channel blocks of 8 with a partial last block per group (36 / 4 = 9 channels), one group split into
    slices with their own dB/dC partial sums (3 threads > B·G), several tiles of 64 steps (L = 150)."""
    inputs = make_inputs(150, groups, with_d=True, with_z=True, with_bias=True, channels=channels)
    expected = run_with_grads(selective_scan_reference, inputs, softplus=True, last_state=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = run_with_grads(selective_scan_cpu, inputs, softplus=True, last_state=True)
    finally:
        torch.set_num_threads(previous)
    assert_match(actual, expected, torch.float32)


def test_cpu_kernel_softplus_and_exp_hold_across_their_range():
    """Large positive and negative pre-activations: softplus's threshold, underflowing decays, exp of ~88."""
    inputs = make_inputs(70, 1, with_d=True, with_z=True, with_bias=False)
    with torch.no_grad():
        inputs["delta"].copy_(torch.linspace(-30, 30, 70).expand_as(inputs["delta"]))
        inputs["z"].copy_(torch.linspace(-90, 90, 70).expand_as(inputs["z"]))
    expected = run_with_grads(selective_scan_reference, inputs, softplus=True, last_state=True)
    actual = run_with_grads(selective_scan_cpu, inputs, softplus=True, last_state=True)
    assert all(t is None or torch.isfinite(t).all() for t in actual)
    assert_match(actual, expected, torch.float32)


def test_cpu_kernel_lets_a_nan_through_like_the_reference():
    """A NaN in delta must reach the output, not be clamped into a zero decay: the trainer's non-finite
    checks depend on seeing it. The kernel's exponential clamps its argument, and a careless min/max order
    turns NaN into the clamp bound."""
    inputs = {
        k: None if v is None else v.detach()
        for k, v in make_inputs(70, 1, with_d=True, with_z=False, with_bias=False).items()
    }
    inputs["delta"][0, 3, 20] = float("nan")
    expected = selective_scan_reference(**inputs, delta_softplus=True)
    actual = selective_scan_cpu(**inputs, delta_softplus=True)
    assert torch.isnan(expected[0, 3, 20:]).all()  # the state carries it to every later step
    torch.testing.assert_close(torch.isnan(actual), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(actual[finite], expected[finite], **TOLERANCES[torch.float32])


def test_torch_backend_on_cpu_runs_the_cpp_kernel_and_falls_back_without_it(monkeypatch):
    inputs = make_inputs(65, 4, with_d=True, with_z=True, with_bias=True)
    assert cpu_kernel.load_kernel() is not None, "the C++ kernel should build on a machine with g++ and ninja"
    assert dispatch._torch_implementation("cpu") is selective_scan_cpu
    monkeypatch.setenv(cpu_kernel.DISABLE_ENV, "0")
    cpu_kernel.load_kernel.cache_clear()
    try:
        assert cpu_kernel.load_kernel() is None
        assert dispatch._torch_implementation("cpu") is selective_scan_chunked
        fallback = run_with_grads(
            functools.partial(selective_scan, backend="torch"), inputs, softplus=True, last_state=True
        )
    finally:
        cpu_kernel.load_kernel.cache_clear()
    expected = run_with_grads(selective_scan_reference, inputs, softplus=True, last_state=True)
    assert_match(fallback, expected, torch.float32)


def test_failed_kernel_build_warns_and_returns_none(monkeypatch):
    def broken_load(**kwargs):
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setattr("torch.utils.cpp_extension.load", broken_load)
    cpu_kernel.load_kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="chunked torch scan.*C\\+\\+ compiler"):
            assert cpu_kernel.load_kernel() is None
    finally:
        cpu_kernel.load_kernel.cache_clear()


def scan_in_order(scan, positions: torch.Tensor):
    """`scan` on inputs gathered into the order `positions`, its output scattered back: what `positions`
    means, built from flips and indexing only."""

    def ordered(u, delta, A, B, C, D=None, z=None, delta_bias=None, **kwargs):
        gather = lambda x: None if x is None else x[..., positions]  # noqa: E731
        result = scan(gather(u), gather(delta), A, gather(B), gather(C), D, gather(z), delta_bias, **kwargs)
        out, last = result if kwargs.get("return_last_state") else (result, None)
        back = out[..., torch.argsort(positions)]  # step t's output belongs at position positions[t]
        return (back, last) if last is not None else back

    return ordered


@pytest.mark.parametrize(
    "variant",
    ["cpu-kernel", "torch-dispatch", "reference-dispatch", "chunked-dispatch"],
)
@pytest.mark.parametrize("order", ["reversed", "column-major", "random"])
def test_positions_set_the_scan_order(variant, order, monkeypatch):
    """Step t visits position positions[t]; inputs and output stay in memory order. The C++ kernel follows
    positions natively (150 steps: several tiles), the other implementations through gather and scatter."""
    length = 150
    positions = {
        "reversed": torch.arange(length).flip(0),
        "column-major": torch.arange(length).view(10, 15).t().flatten(),
        "random": torch.randperm(length, generator=torch.Generator().manual_seed(3)),
    }[order]
    if variant == "chunked-dispatch":  # a CPU without a compiler
        monkeypatch.setattr(dispatch, "load_kernel", lambda: None)
    scan = {
        "cpu-kernel": functools.partial(selective_scan_cpu, positions=positions),
        "torch-dispatch": functools.partial(selective_scan, backend="torch", positions=positions),
        "reference-dispatch": functools.partial(selective_scan, backend="reference", positions=positions),
        "chunked-dispatch": functools.partial(selective_scan, backend="torch", positions=positions),
    }[variant]
    inputs = make_inputs(length, 2, with_d=True, with_z=True, with_bias=True)
    expected = run_with_grads(
        scan_in_order(selective_scan_reference, positions), inputs, softplus=True, last_state=True
    )
    assert_match(run_with_grads(scan, inputs, softplus=True, last_state=True), expected, torch.float32)
    # The order matters: the same inputs in memory order give another output.
    plain = run_with_grads(selective_scan_reference, inputs, softplus=True, last_state=True)
    assert not torch.allclose(plain[0], expected[0], rtol=1e-2, atol=1e-2)


def test_cpu_kernel_rejects_positions_that_are_not_a_permutation():
    inputs = {
        k: None if v is None else v.detach()
        for k, v in make_inputs(6, 1, with_d=True, with_z=False, with_bias=False).items()
    }
    for bad in (torch.tensor([0, 1, 2, 3, 4, 4]), torch.tensor([0, 1, 2, 3, 4, 6]), torch.arange(5)):
        with pytest.raises(ValueError, match="positions must be"):
            selective_scan_cpu(**inputs, positions=bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["torch-auto", "cpu-kernel", "chunked-4-groups"])
def test_torch_backend_half_precision_matches_reference(dtype, variant):
    inputs = make_inputs(65, 4, with_d=True, with_z=True, with_bias=True, dtype=dtype)
    expected = run_with_grads(selective_scan_reference, inputs, softplus=True, last_state=True)
    actual = run_with_grads(TORCH_VARIANTS[variant], inputs, softplus=True, last_state=True)
    assert actual[0].dtype == dtype and actual[1].dtype == torch.float32
    assert_match(actual, expected, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("length,groups", [(65, 1), (300, 4)])
def test_torch_backend_on_cuda_matches_reference(length, groups):
    inputs = make_inputs(length, groups, with_d=True, with_z=True, with_bias=True, device="cuda")
    expected = run_with_grads(selective_scan_reference, inputs, softplus=True, last_state=True)
    actual = run_with_grads(TORCH_VARIANTS["chunked-4-groups"], inputs, softplus=True, last_state=True)
    assert_match(actual, expected, torch.float32)


@pytest.mark.skipif(not cuda_kernel_ready(), reason="needs a CUDA device and mamba_ssm")
@pytest.mark.parametrize("length,groups", SHAPES)
@pytest.mark.parametrize("flags", FLAG_SETS[:2])
def test_cuda_backend_matches_reference(length, groups, flags):
    with_d, with_z, with_bias, softplus, last_state = flags
    inputs = make_inputs(length, groups, with_d=with_d, with_z=with_z, with_bias=with_bias, device="cuda")
    expected = run_with_grads(selective_scan_reference, inputs, softplus=softplus, last_state=last_state)
    actual = run_with_grads(
        functools.partial(selective_scan, backend="cuda"), inputs, softplus=softplus, last_state=last_state
    )
    if last_state:  # mamba_ssm's kernel returns the last state but does not backpropagate through it
        without_state_grad = run_with_grads(
            selective_scan_reference, inputs, softplus=softplus, last_state=False
        )
        expected = expected[:2] + without_state_grad[2:]
    assert_match(actual, expected, torch.float32)


def saved_for_backward_bytes(scan, inputs) -> int:
    saved = 0

    def count(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        scan(**inputs, delta_softplus=True)
    return saved


@pytest.mark.parametrize(
    "scan",
    [functools.partial(selective_scan, backend="torch"), selective_scan_chunked],
    ids=["cpu-kernel", "chunked"],
)
def test_torch_backend_saves_no_per_step_state(scan):
    """Autograd keeps O(B·D·L + B·G·N·L + B·D·N·L/chunk) bytes, never the (B, D, L, N) states: doubling N
    grows what is saved by far less than one more (B, D, L, ΔN) tensor would."""
    channels, length = 256, 512

    def saved_bytes(state: int) -> int:
        inputs = make_inputs(
            length, 4, with_d=True, with_z=True, with_bias=True, channels=channels, state=state
        )
        return saved_for_backward_bytes(scan, inputs)

    growth = saved_bytes(32) - saved_bytes(16)
    per_step_state_growth = 2 * channels * length * 16 * 4
    assert 0 < growth < per_step_state_growth / 4


def test_auto_uses_torch_silently_on_cpu(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned_kernel_missing", False)
    inputs = make_inputs(7, 1, with_d=False, with_z=False, with_bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = selective_scan(**inputs)
    torch.testing.assert_close(out, selective_scan_cpu(**inputs), rtol=0, atol=0)
    assert dispatch.resolve_backend("auto", "cpu") == "torch"


def test_auto_on_cuda_without_kernel_warns_once_and_uses_torch(monkeypatch):
    monkeypatch.setattr(dispatch, "_import_kernel", lambda: (None, "No module named 'mamba_ssm'"))
    monkeypatch.setattr(dispatch, "_warned_kernel_missing", False)
    with pytest.warns(
        RuntimeWarning, match='pip install --no-build-isolation "semi-llie\\[cuda\\]"'
    ) as record:
        assert dispatch.resolve_backend("auto", "cuda") == "torch"
        assert dispatch.resolve_backend("auto", "cuda") == "torch"
    assert len(record) == 1


def test_auto_on_cuda_with_kernel_picks_it_and_forwards_every_argument(monkeypatch):
    calls = []

    def fake_kernel(*args):
        calls.append(args)
        return args[0]

    monkeypatch.setattr(dispatch, "_import_kernel", lambda: (fake_kernel, ""))
    assert dispatch.resolve_backend("auto", "cuda") == "cuda"
    inputs = make_inputs(7, 1, with_d=True, with_z=True, with_bias=True)
    selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="cuda")
    assert calls[0][:8] == tuple(inputs[k] for k in INPUT_NAMES) and calls[0][8:] == (True, True)


def test_explicit_cuda_backend_without_kernel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(dispatch, "_import_kernel", lambda: (None, "No module named 'mamba_ssm'"))
    inputs = make_inputs(7, 1, with_d=False, with_z=False, with_bias=False)
    with pytest.raises(ImportError, match='pip install --no-build-isolation "semi-llie\\[cuda\\]"'):
        selective_scan(**inputs, backend="cuda")


def test_unknown_backend_is_a_config_error():
    inputs = make_inputs(7, 1, with_d=False, with_z=False, with_bias=False)
    with pytest.raises(ConfigError, match="scan_backend"):
        selective_scan(**inputs, backend="triton")


def test_mismatched_groups_are_rejected():
    inputs = make_inputs(7, 4, with_d=False, with_z=False, with_bias=False)
    inputs["B"] = inputs["B"][:, :3]
    with pytest.raises(ValueError, match="divisible"):
        selective_scan(**inputs)


def naive_scan(u, delta, A, B, C, D, z, delta_bias, softplus: bool) -> torch.Tensor:
    """METHOD §6 written out step by step, independently of semi_llie.ops (float64, autograd-able).

    u, delta, z: (Bt, Dc, L); A: (Dc, N); B, C: (Bt, G, N, L); D, delta_bias: (Dc,). Channel d uses group
    d // (Dc / G). h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t; y_t = C_t h_t + D u_t; y *= silu(z).
    """
    batch, channels, length = u.shape
    per_group = channels // B.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if softplus:
        delta = torch.nn.functional.softplus(delta)
    B = B.repeat_interleave(per_group, dim=1)  # (Bt, Dc, N, L)
    C = C.repeat_interleave(per_group, dim=1)
    h = torch.zeros(batch, channels, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[None, :, None] * u
    return y * torch.nn.functional.silu(z) if z is not None else y


@pytest.mark.parametrize("variant", list(TORCH_VARIANTS))
@pytest.mark.parametrize("length,groups", [(65, 4), (300, 1)])
def test_fp32_scan_matches_a_naive_float64_loop_closely(variant, length, groups):
    # Measured fp32 error against float64: outputs at most 1.7e-5 (L = 300), gradients at most 1e-6 of the
    # largest gradient. The bounds sit just above that, far tighter than the kernel-test tolerances above.
    inputs = make_inputs(length, groups, with_d=True, with_z=True, with_bias=True)
    exact_inputs = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    expected = naive_scan(**exact_inputs, softplus=True)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (expected * weights).sum().backward()

    ours_inputs = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = TORCH_VARIANTS[variant](**ours_inputs, delta_softplus=True)
    (out * weights.float()).sum().backward()
    torch.testing.assert_close(out.double(), expected.detach(), rtol=2e-5, atol=2e-5)
    for name in INPUT_NAMES:
        scale = exact_inputs[name].grad.abs().max().item()
        torch.testing.assert_close(
            ours_inputs[name].grad.double(), exact_inputs[name].grad, rtol=1e-4, atol=1e-5 * max(scale, 1.0),
            msg=lambda m, n=name: f"grad {n}: {m}",
        )  # fmt: skip
