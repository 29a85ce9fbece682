"""MambaLowlight (METHOD §1): parameter counts, shapes, gradient flow, scan orders, variants, config."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import Tensor

from semi_llie.errors import ConfigError, UserError
from semi_llie.models import SS2D, TINY_MODEL_CONFIG, MambaLowlight, build_model, image_gradient
from semi_llie.models.blocks import ChannelAttention, DropPath, VSSBlock
from semi_llie.models.mambalowlight import MEAN_RGB, set_border_padding
from semi_llie.models.ss2d import scan_positions
from semi_llie.ops import selective_scan_reference

torch.set_num_threads(1)


def tiny(**overrides) -> MambaLowlight:
    return build_model({**TINY_MODEL_CONFIG, **overrides})


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 610_530),
        ({"guided": True}, 802_530),
        ({"exposure": True}, 610_530 + 12),  # a 3×3 linear map and its bias
        ({"illumination": "precomputed"}, 610_530 - 26_179),  # no estimator at all
        (
            {"illumination": "precomputed", "guided": True},
            802_530 - 195,
        ),  # estimator without its illu_map head
    ],
)
def test_paper_parameter_counts(kwargs: dict, expected: int) -> None:
    assert n_params(MambaLowlight(**kwargs)) == expected


@pytest.mark.parametrize("size", [(37, 53), (64, 64)])
def test_output_shapes_any_size(size: tuple[int, int]) -> None:
    model = tiny()
    x = torch.rand(2, 3, *size)
    y, grad_y = model(x)
    assert y.shape == grad_y.shape == x.shape
    # Each image is enhanced on its own: the batch's first output is the first image's alone.
    torch.testing.assert_close(model(x[:1])[0], y[:1], rtol=1e-4, atol=1e-5)
    # The second output is the gradient magnitude of the first, by central differences with zero padding
    # (METHOD §1.6), written out here: (below − above, right − left) per channel.
    padded = np.pad(y.detach().double().numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    vertical = padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]
    horizontal = padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]
    expected = np.sqrt(vertical**2 + horizontal**2 + 1e-6)
    np.testing.assert_allclose(grad_y.detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"guided": True}, {"illumination": "precomputed", "guided": True}, {"exposure": True}],
    ids=str,
)
def test_gradients_reach_every_parameter(kwargs: dict) -> None:
    torch.manual_seed(0)
    # The paper widths: at the tiny width the channel attention has a single ReLU unit that may be dead.
    model = MambaLowlight(drop_path_rate=0.0, **kwargs)
    # The paper's channel attention squeezes 64 channels into 2 ReLU units, which at init may both be off for
    # every input, blocking the gradient of their inputs; open them so this test checks wiring, not luck.
    for module in model.modules():
        if isinstance(module, ChannelAttention):
            torch.nn.init.constant_(module.squeeze.bias, 1.0)
    x, illum = torch.rand(2, 3, 6, 7), torch.rand(2, 3, 6, 7)
    y, grad_y = model(x, illum)
    (y.square().mean() + grad_y.mean()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


class CumsumScan:
    """Stands in for the selective scan: y = cumsum of u along L. Records the shapes it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Size, torch.Size]] = []

    def __call__(
        self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *args, positions: Tensor, **kwargs
    ) -> Tensor:
        self.calls.append((u.shape, B.shape))
        return u[..., positions].cumsum(dim=-1)[..., torch.argsort(positions)]


def test_four_scan_orders_are_distinct_and_undone() -> None:
    height, width, d_model, d_state = 3, 4, 4, 2
    scan = CumsumScan()
    mixer = SS2D(d_model, d_state=d_state, expand=2, scan_fn=scan).double()
    x = torch.randn(1, mixer.d_inner, height, width, dtype=torch.float64)
    out = mixer.scan_2d(x)

    # One scan call per direction: (B, Di, L) with B and C in G = 1 group.
    assert (
        scan.calls == [(torch.Size([1, mixer.d_inner, height * width]), torch.Size([1, 1, d_state, 12]))] * 4
    )

    # By hand: the cumsum at pixel p in an order sums every pixel q that order visits no later than p.
    positions = [(i, j) for i in range(height) for j in range(width)]
    orders = {
        "row-major": lambda i, j: i * width + j,
        "column-major": lambda i, j: j * height + i,
        "reversed row-major": lambda i, j: -(i * width + j),
        "reversed column-major": lambda i, j: -(j * height + i),
    }
    expected = torch.zeros_like(x)
    for rank in orders.values():
        for i, j in positions:
            expected[..., i, j] += sum(x[..., q, r] for q, r in positions if rank(q, r) <= rank(i, j))
    torch.testing.assert_close(out, expected)

    # Each order alone gives a different result, so dropping or repeating one would be caught.
    per_order = [
        torch.stack(
            [sum(x[0, :, q, r] for q, r in positions if rank(q, r) <= rank(i, j)) for i, j in positions]
        )
        for rank in orders.values()
    ]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(per_order[a], per_order[b])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_each_direction_scans_with_its_own_projections(backend: str) -> None:
    torch.manual_seed(0)
    mixer = SS2D(8, d_state=4, expand=2, scan_backend=backend)
    di, rank, n = mixer.d_inner, mixer.dt_rank, mixer.d_state
    x = torch.randn(2, di, 5, 6)
    with torch.no_grad():
        out = mixer.scan_2d(x)
        # Direction by direction, with that direction's x_proj, dt_proj, A, D and dt bias only.
        expected = torch.zeros_like(x)
        for k, positions in enumerate(scan_positions(5, 6)):
            u = x.flatten(2)[..., positions]  # (B, Di, L) in scan order
            own = slice(k * di, (k + 1) * di)
            proj = torch.einsum("cd,bdl->bcl", mixer.x_proj_weight[k], u)  # (B, R+2N, L)
            dt = torch.einsum("dr,brl->bdl", mixer.dt_proj_weight[k], proj[:, :rank])
            B, C = proj[:, None, rank : rank + n], proj[:, None, rank + n :]  # (B, 1, N, L)
            A = -torch.exp(mixer.A_log[own])
            y = selective_scan_reference(
                u, dt, A, B, C, mixer.D[own], delta_bias=mixer.dt_proj_bias[k], delta_softplus=True
            )
            expected += y[..., torch.argsort(positions)].unflatten(-1, (5, 6))
    torch.testing.assert_close(out, expected, rtol=6e-4, atol=2e-5)


def test_scan_positions_are_the_four_orders() -> None:
    orders = scan_positions(5, 7)
    assert orders.shape == (4, 35) and orders.dtype == torch.int64
    for order in orders:  # each visits every pixel once
        assert sorted(order.tolist()) == list(range(35))
    assert orders[0, :3].tolist() == [0, 1, 2]  # row-major
    assert orders[1, :6].tolist() == [0, 7, 14, 21, 28, 1]  # column-major
    assert orders[2, :2].tolist() == [34, 33]  # reversed row-major
    assert orders[3, :6].tolist() == [34, 27, 20, 13, 6, 33]  # reversed column-major


def test_precomputed_illumination_replaces_the_learned_map() -> None:
    torch.manual_seed(0)
    model = tiny(illumination="precomputed").eval()
    assert model.estimator is None
    x = torch.rand(1, 3, 9, 11)
    bright, dark = torch.ones(1, 3, 9, 11), torch.zeros(1, 3, 9, 11)
    with torch.no_grad():
        assert not torch.allclose(model(x, bright)[0], model(x, dark)[0])
    with pytest.raises(UserError, match="precomputed"):
        model(x)
    with pytest.raises(UserError, match="shape"):
        model(x, torch.ones(1, 3, 8, 11))


def test_input_normalisation_feeds_the_layers_and_the_residual_adds_the_raw_input() -> None:
    assert torch.equal(tiny().input_mean.flatten(), torch.tensor(MEAN_RGB))  # the paper's default
    assert torch.equal(tiny().input_std.flatten(), torch.ones(3))
    mean, std = (0.06, 0.05, 0.04), (0.1, 0.2, 0.4)
    model = tiny(input_mean=mean, input_std=std).eval()
    seen = []
    model.estimator.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    torch.nn.init.zeros_(model.conv_last.weight)
    torch.nn.init.zeros_(model.conv_last.bias)
    x = torch.rand(2, 3, 7, 9)
    with torch.no_grad():
        y, _ = model(x)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], expected)
    assert torch.equal(y, x)  # the network's contribution is zero: y is the raw input, not the normalised one


def test_exposure_gain_starts_at_one_and_can_bring_each_image_to_the_reference_mean() -> None:
    torch.manual_seed(0)
    mean = (0.06, 0.05, 0.04)
    model = tiny(exposure=True, input_mean=mean).eval()
    plain = tiny(input_mean=mean).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("exposure.")})
    x = torch.rand(2, 3, 8, 10) * torch.tensor([0.1, 0.4]).view(2, 1, 1, 1)  # a dark and a dim image
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], plain(x)[0])  # gain 1: the paper's model

        model.exposure.linear.weight.copy_(-torch.eye(3))  # gain = reference / mean: full normalisation
        gain = model.exposure_gain(x)
        assert gain.shape == (2, 3, 1, 1)
        torch.testing.assert_close((gain * x).mean(dim=(2, 3)), torch.tensor([mean, mean]))
        seen = []
        model.estimator.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        model(x)
        torch.testing.assert_close(seen[0], (x * gain - model.input_mean) / model.input_std)
        # A given gain replaces the computed one (tiled inference passes the whole image's).
        torch.testing.assert_close(model(x, gain=torch.ones(2, 3, 1, 1))[0], plain(x)[0])


def test_models_pickled_before_input_normalisation_still_load() -> None:
    model = tiny().eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)[0]
    # The buffers as a model registered before input_mean/input_std existed held them.
    model._buffers = {"mean_rgb": model._buffers.pop("input_mean")}
    model._non_persistent_buffers_set = {"mean_rgb"}
    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        torch.testing.assert_close(restored(x)[0], expected)
    assert set(restored.state_dict()) == set(tiny().state_dict())


def test_learned_illumination_ignores_a_given_map() -> None:
    model = tiny().eval()
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model(x, torch.rand(1, 3, 9, 11))[0])


def test_guided_fusion_only_feeds_the_scan_branch() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 5, 6, 16)  # (B, H, W, C) tokens
    fea_a, fea_b = torch.randn(1, 16, 5, 6), torch.randn(1, 16, 5, 6)

    def block_output(scan_fn) -> tuple[Tensor, Tensor]:
        torch.manual_seed(1)
        block = VSSBlock(16, 4, 2, "auto", 0.0, guided=True, scan_backend="auto", scan_fn=scan_fn).eval()
        with torch.no_grad():
            return block(x, fea_a), block(x, fea_b)

    # With the scan silenced, the SS2D branch outputs zero: the illumination features must not matter.
    silent_a, silent_b = block_output(lambda u, *args, **kwargs: torch.zeros_like(u))
    torch.testing.assert_close(silent_a, silent_b)
    real_a, real_b = block_output(None)
    assert not torch.allclose(real_a, real_b)


def test_same_seed_same_model_same_output() -> None:
    x = torch.rand(2, 3, 12, 10)

    def run() -> Tensor:
        torch.manual_seed(2022)
        model = tiny(drop_path_rate=0.2)  # train mode: drop path draws from the RNG too
        return model(x)[0]

    torch.testing.assert_close(run(), run(), rtol=0, atol=0)


def test_build_model_rejects_unknown_keys_and_values() -> None:
    with pytest.raises(ConfigError, match="'embed_dims'"):
        build_model({**TINY_MODEL_CONFIG, "embed_dims": 32})
    with pytest.raises(ConfigError, match="illumination"):
        build_model({**TINY_MODEL_CONFIG, "illumination": "retinex"})
    with pytest.raises(ConfigError, match="input_std"):
        build_model({**TINY_MODEL_CONFIG, "input_std": [0.1, 0.0, 0.1]})
    with pytest.raises(ConfigError, match="input_mean"):
        build_model({**TINY_MODEL_CONFIG, "input_mean": [0.5]})
    with pytest.raises(ConfigError, match="scan_backend"):
        build_model({**TINY_MODEL_CONFIG, "scan_backend": "triton"})
    assert isinstance(build_model({**TINY_MODEL_CONFIG, "depths": [1, 2]}), MambaLowlight)


def test_image_gradient_central_differences() -> None:
    ramp = torch.arange(5.0).expand(1, 2, 4, 5)  # value = column index, in 2 channels
    grad = image_gradient(ramp)
    # Interior: horizontal difference right − left = 2, vertical 0.
    torch.testing.assert_close(grad[..., 1:-1, 1:-1], torch.full((1, 2, 2, 3), (4 + 1e-6) ** 0.5))
    # Zero padding: at the left border the difference is 1 − 0; at the top, vertically it is the value below.
    torch.testing.assert_close(grad[0, 0, 1, 0], torch.tensor((1.0 + 1e-6) ** 0.5))
    torch.testing.assert_close(grad[0, 0, 0, 2], torch.tensor((2.0**2 + 2.0**2 + 1e-6) ** 0.5))


def test_drop_path_drops_whole_samples_only_in_training() -> None:
    torch.manual_seed(0)
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 2, 2)
    out = drop(x)
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(dim=1) | (per_sample == 2).all(dim=1)).all()
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    torch.testing.assert_close(drop.eval()(x), x)


def test_padding_is_not_in_the_state_dict_and_a_pickled_model_keeps_its_own():
    torch.manual_seed(0)
    zeros, reflect = tiny(padding="zeros"), tiny(padding="reflect")
    # Weights load into either mode (the padding is not part of the state dict), and the padding is then the
    # only difference: the zero-padded model switched to reflection computes what the reflect model does.
    reflect.load_state_dict(zeros.state_dict())
    switched = pickle.loads(pickle.dumps(zeros))
    set_border_padding(switched, "reflect")
    x = torch.rand(1, 3, 24, 20)
    with torch.no_grad():
        torch.testing.assert_close(switched(x)[0], reflect(x)[0], rtol=0, atol=0)
        assert not torch.allclose(reflect(x)[0], zeros(x)[0])
    # A model pickled with zero padding (as MLflow stored models before `padding` existed) keeps it.
    restored = pickle.loads(pickle.dumps(zeros))
    convs = [m for m in restored.modules() if isinstance(m, torch.nn.Conv2d) and max(m.padding) > 0]
    assert convs and all(conv.padding_mode == "zeros" for conv in convs)
    with torch.no_grad():
        torch.testing.assert_close(restored(x)[0], zeros(x)[0])
