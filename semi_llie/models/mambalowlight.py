"""MambaLowlight: the Semi-LLIE backbone (METHOD §1), a single-resolution residual Mamba network.

    x ← g·x (exposure: true only; g (B,3,1,1) from mean_hw(x), see ExposureGain)
    n = (x − mean)/std ─┬─ IlluminationEstimator ─┬─ illu_map (B,3,H,W) (or the precomputed map) ─┐
                        │                         └─ illu_fea (B,C,H,W) ─ guided blocks only      │
                        └─────────────────────────────── cat[n, illu_map] ─────────┴─ conv_first = f0
    f0 ─ LN ─ ResidualGroups ─ LN ─ conv_body ─ + f0 ─ conv_last ─ + x = y
    returns (y, image_gradient(y))

Input normalisation (our addition): the paper subtracts the mean of well-lit images (MEAN_RGB, std 1), and
`y = (x − mean) + conv_last(res) + mean` is the same as `y = x + conv_last(res)`. Low-light inputs sit far
below that mean with a tenth of its spread, so the first layers see a nearly constant input and learn the
per-pixel gain slowly. `input_mean`/`input_std` set to the labeled inputs' own statistics (`shards build`
prints them) centre and scale them (docs/results/design_measurements.md has the gain). The global
residual always adds the raw x (after the exposure gain, when there is one).

Exposure gain (our addition, `exposure: true`): on LOL the ground truth's brightness is unrelated to the
input's (their mean brightnesses are uncorrelated), so the best guess for a dark input is a brighter image
than for a dim one. The network's receptive field is local and sees only how dark its neighbourhood is:
without the gain it brightened the darkest images least (its outputs' mean followed the input's). The gain
sees the whole input and starts at 1 (its measured effect: docs/results/design_measurements.md).

Parameter counts at the defaults (embed_dim 64, depths (2, 2), d_state 16, expand 2):
    illumination="learned":      610,530 (guided: 802,530); exposure adds 12
    illumination="precomputed":  the estimator is built only as far as it is used: without guidance it is
                                 not built at all (584,351); guided blocks still need illu_fea, so only its
                                 illu_map head (195) is dropped (802,335). No parameter is ever unused, which
                                 keeps DDP happy and every registered parameter trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from semi_llie.errors import ConfigError, UserError
from semi_llie.models.blocks import ResidualGroup, VSSBlock
from semi_llie.models.gradient import image_gradient

ILLUMINATION_MODES = ("learned", "precomputed")
PADDING_MODES = ("reflect", "replicate", "zeros")
MEAN_RGB = (0.4488, 0.4371, 0.4040)


class IlluminationEstimator(nn.Module):
    """cat[x, mean_c(x)] → 1×1 4→C → 5×5 (groups 4) = illu_fea → 1×1 C→3 = illu_map. No activations.

    With `with_map=False` only illu_fea is computed (the precomputed map replaces illu_map).
    """

    def __init__(self, channels: int, with_map: bool = True) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, channels, 1)
        self.depthwise = nn.Conv2d(channels, channels, 5, padding=2, groups=4)
        self.conv_map = nn.Conv2d(channels, 3, 1) if with_map else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """x (B, 3, H, W) → illu_fea (B, C, H, W), illu_map (B, 3, H, W) or None."""
        illu_fea = self.depthwise(self.conv_in(torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1)))
        illu_map = self.conv_map(illu_fea) if self.conv_map is not None else None
        return illu_fea, illu_map


class ExposureGain(nn.Module):
    """x (B, 3, H, W) → per-image RGB gain (B, 3, 1, 1): log g = W · log(mean_hw(x) / reference) + b.

    W and b start at zero (g = 1, the paper's model). W = −I, b = 0 would bring every image's mean to
    `reference` (the model's input_mean); training finds how far towards that to go.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, reference: Tensor) -> Tensor:
        """x (B, 3, H, W), reference (1, 3, 1, 1) → gain (B, 3, 1, 1)."""
        log_ratio = x.mean(dim=(2, 3)).clamp_min(1e-4).log() - reference.flatten().log()  # (B, 3)
        return self.linear(log_ratio).exp()[:, :, None, None]


class MambaLowlight(nn.Module):
    """forward(x, illum=None, gain=None) → (y, grad_y), all B×3×H×W, for any H×W.

    `illum` (B×3×H×W in [0, 1]) is required with illumination="precomputed" and replaces the learned
    illu_map; with "learned" it is ignored, so a trainer may always pass the batch's map.
    `gain` (B×3×1×1) replaces the exposure gain computed from x: tiled inference passes the whole image's
    (`exposure_gain`), so that every tile is brightened alike. Ignored without `exposure`.
    """

    def __init__(
        self,
        embed_dim: int = 64,
        depths: Sequence[int] = (2, 2),
        d_state: int = 16,
        expand: int = 2,
        dt_rank: int | str = "auto",
        drop_path_rate: float = 0.1,
        guided: bool = False,
        illumination: str = "learned",
        scan_backend: str = "auto",
        input_mean: Sequence[float] = MEAN_RGB,
        input_std: Sequence[float] = (1.0, 1.0, 1.0),
        exposure: bool = False,
        padding: str = "reflect",
    ) -> None:
        super().__init__()
        if padding not in PADDING_MODES:
            raise ConfigError(
                f"unknown model padding {padding!r}; set it to one of {', '.join(PADDING_MODES)}"
            )
        if illumination not in ILLUMINATION_MODES:
            modes = ", ".join(ILLUMINATION_MODES)
            raise ConfigError(f"unknown model illumination {illumination!r}; set it to one of {modes}")
        if not depths or any(not isinstance(d, int) or d < 1 for d in depths):
            raise ConfigError(f"model depths must be a non-empty list of positive integers, got {depths!r}")
        if len(input_mean) != 3 or len(input_std) != 3 or min(input_std) <= 0:
            raise ConfigError(
                f"model input_mean and input_std must be 3 numbers each (RGB), the std positive; got "
                f"{list(input_mean)!r} and {list(input_std)!r}"
            )
        self.guided = guided
        self.illumination = illumination
        # Not in the state dict: the config rebuilds them, so weights stay interchangeable across settings.
        self.register_buffer("input_mean", torch.tensor(input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(input_std).view(1, 3, 1, 1), persistent=False)

        learned_map = illumination == "learned"
        self.estimator = (
            IlluminationEstimator(embed_dim, with_map=learned_map) if learned_map or guided else None
        )
        self.conv_first = nn.Conv2d(6, embed_dim, 3, padding=1)  # cat[x, illu_map] → f0

        # Stochastic depth grows linearly over all blocks of all groups.
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.norm_in = nn.LayerNorm(embed_dim)
        self.groups = nn.ModuleList()
        for group, depth in enumerate(depths):
            start = sum(depths[:group])
            blocks = [
                VSSBlock(embed_dim, d_state, expand, dt_rank, rates[start + i], guided, scan_backend)
                for i in range(depth)
            ]
            self.groups.append(ResidualGroup(blocks))
        self.norm_out = nn.LayerNorm(embed_dim)
        self.conv_body = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
        self.conv_last = nn.Conv2d(embed_dim, 3, 3, padding=1)
        self.exposure = ExposureGain() if exposure else None
        self.apply(_init_linear_and_norm)
        set_border_padding(self, padding)
        if self.exposure is not None:
            self.exposure.reset_parameters()

    def exposure_gain(self, x: Tensor) -> Tensor | None:
        """x (B, 3, H, W) → the gain (B, 3, 1, 1) forward applies to it; None without `exposure`."""
        return self.exposure(x, self.input_mean) if self.exposure is not None else None

    def forward(
        self, x: Tensor, illum: Tensor | None = None, gain: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x (B, 3, H, W) in [0, 1], illum (B, 3, H, W) or None, gain (B, 3, 1, 1) or None → y (B, 3, H, W),
        grad_y (B, 3, H, W)."""
        if self.exposure is not None:
            x = x * (self.exposure_gain(x) if gain is None else gain)
        normalised = (x - self.input_mean) / self.input_std
        illu_fea, illu_map = self.estimator(normalised) if self.estimator is not None else (None, None)
        if self.illumination == "precomputed":
            illu_map = self._check_illum(illum, x)

        f0 = self.conv_first(torch.cat([normalised, illu_map], dim=1))  # (B, C, H, W)
        _, _, height, width = f0.shape
        tokens = self.norm_in(rearrange(f0, "b c h w -> b h w c"))  # (B, H, W, C)
        for group in self.groups:
            tokens = group(tokens, illu_fea if self.guided else None)
        body = rearrange(self.norm_out(tokens), "b h w c -> b c h w", h=height, w=width)
        res = self.conv_body(body) + f0

        y = x + self.conv_last(res)  # global residual; no output activation
        return y, image_gradient(y)

    def __setstate__(self, state: dict) -> None:
        """Unpickle models registered before input normalisation: their `mean_rgb` buffer is the input mean
        at std 1, and their `y = (x − mean) + conv_last(res) + mean` is today's `y = x + conv_last(res)`."""
        buffers = state["_buffers"]
        if "mean_rgb" in buffers:
            buffers["input_mean"] = buffers.pop("mean_rgb")
            buffers["input_std"] = torch.ones_like(buffers["input_mean"])
            state["_non_persistent_buffers_set"] = {"input_mean", "input_std"}
        super().__setstate__(state)

    @staticmethod
    def _check_illum(illum: Tensor | None, x: Tensor) -> Tensor:
        if illum is None:
            raise UserError(
                "model.illumination is 'precomputed' but no illumination map was given; pass the shard's "
                "'illum' tensor to the model or set model.illumination to 'learned'"
            )
        if illum.shape != x.shape:
            raise UserError(
                f"the precomputed illumination map has shape {tuple(illum.shape)} but the image has "
                f"{tuple(x.shape)}; rebuild the shards so illum.png matches low.png"
            )
        return illum.to(x.dtype)


def set_border_padding(model: nn.Module, mode: str) -> None:
    """Pad every spatial convolution of `model` (kernel > 1) with `mode` instead of zeros.

    Zero padding shows every border pixel a black frame, which a training crop (cut from inside an image)
    never has at the same place at test time; on a flat grey input the zero-padded paper model drew a dark
    line one to four pixels deep along the edges, mostly the bottom and right ones, which the body's
    LayerNorms amplified (docs/results/border_line.md). Reflection extends the image instead, so a flat
    input stays flat through every convolution. The padding is not in the state dict: weights load into
    either mode.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and any(side > 0 for side in module.padding):
            module.padding_mode = mode


def _init_linear_and_norm(module: nn.Module) -> None:
    """Linear: trunc_normal(std 0.02), bias 0; LayerNorm: weight 1, bias 0. Convs keep PyTorch's init."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
