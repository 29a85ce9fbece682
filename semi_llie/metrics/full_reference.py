"""Full-reference metrics of one output/ground-truth pair at full resolution (METHOD §8): PSNR and SSIM in
RGB and on Y, and GT-mean PSNR. They need no learned weights, so they always run (validation uses them).

Every `settings` dict is meant to be stored beside the scores it produced.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from semi_llie.metrics.table import library_versions

# BT.601 luma as in MATLAB's rgb2ycbcr (Y in [16, 235]/255): the convention of BasicSR and the LLIE papers.
Y_COLOR_SPACE = "ycbcr"
# OpenCV's RGB2GRAY weights, which the GT-mean PSNR of LLFlow/Retinexformer uses for the brightness ratio.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
PSNR_EPS = 1e-8  # pyiqa's default: identical images score 10·log10(1/1e-8) = 80 dB instead of infinity
FULL_REFERENCE_NAMES = ("psnr", "ssim", "psnr_y", "ssim_y", "psnr_gtmean")


class FullReferenceMetrics:
    """PSNR/SSIM (RGB and Y) and GT-mean PSNR of one image pair; higher is better for all of them.

    `quantize_output` rounds the output to 8 bits first, so the scores equal those of the saved PNGs.
    """

    names = FULL_REFERENCE_NAMES

    def __init__(self, crop_border: int = 0, quantize_output: bool = True) -> None:
        from pyiqa.archs.psnr_arch import PSNR

        self.crop_border = crop_border
        self.quantize_output = quantize_output
        # pyiqa's metric modules hold no weights and follow the device of their inputs.
        self._psnr = PSNR(test_y_channel=False, crop_border=crop_border, eps=PSNR_EPS)
        self._psnr_y = PSNR(
            test_y_channel=True, crop_border=crop_border, eps=PSNR_EPS, color_space=Y_COLOR_SPACE
        )
        self._ssim = SeparableSSIM(test_y_channel=False, crop_border=crop_border)
        self._ssim_y = SeparableSSIM(test_y_channel=True, crop_border=crop_border)

    @torch.no_grad()
    def __call__(self, pred: Tensor, gt: Tensor) -> dict[str, float]:
        """pred, gt: 1×3×H×W in [0, 1] (same size) -> {name: score}."""
        if pred.shape != gt.shape or pred.dim() != 4 or pred.shape[:2] != (1, 3):
            raise ValueError(
                f"expected two 1×3×H×W images of one size, got {tuple(pred.shape)} and {tuple(gt.shape)}"
            )
        pred = pred.float().clamp(0, 1)
        gt = gt.float().to(pred.device)
        if self.quantize_output:
            pred = torch.round(pred * 255.0) / 255.0
        return {
            "psnr": float(self._psnr(pred, gt)),
            "ssim": float(self._ssim(pred, gt)),
            "psnr_y": float(self._psnr_y(pred, gt)),
            "ssim_y": float(self._ssim_y(pred, gt)),
            "psnr_gtmean": float(self._psnr(gt_mean_scaled(pred, gt), gt)),
        }

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "data_range": 1.0,
            "resolution": "full (no resize)",
            "crop_border": self.crop_border,
            "output_quantized_to_8bit": self.quantize_output,
            "y_channel": f"{Y_COLOR_SPACE} (ITU-R BT.601 luma, [16, 235]/255)",
            "psnr_eps": PSNR_EPS,
            "ssim": (
                "pyiqa SSIM: gaussian window 11x11, sigma 1.5, no downsampling, inputs rounded to 8 bits "
                "and computed in float64 (as MATLAB); RGB = mean over the 3 channels"
            ),
            "psnr_gtmean": (
                f"RGB PSNR of clamp(pred * mean(gray(gt)) / mean(gray(pred))), gray = {GRAY_WEIGHTS}"
            ),
            "libraries": library_versions(),
        }


class SeparableSSIM:
    """pyiqa's SSIM (`pyiqa.archs.ssim_arch.SSIM`, downsample=False: its 8-bit rounding, Y conversion,
    float64, 11×11 Gaussian of σ 1.5 over the 'valid' region, negative contrast-structure clipped to 0)
    computed with the Gaussian as two 1-D passes and the five local statistics in one grouped convolution:
    the same values (tests/test_metrics.py: within 1e-8 of pyiqa) at a fraction of the cost of pyiqa's five
    2-D float64 convolutions, which dominated evaluation.
    """

    WINDOW, SIGMA, DATA_RANGE = 11, 1.5, 255.0

    def __init__(self, test_y_channel: bool, crop_border: int = 0) -> None:
        self.test_y_channel, self.crop_border = test_y_channel, crop_border
        taps = torch.arange(self.WINDOW, dtype=torch.float64) - (self.WINDOW - 1) / 2
        gaussian = torch.exp(-(taps**2) / (2 * self.SIGMA**2))
        self.gaussian = gaussian / gaussian.sum()  # outer(g, g) is fspecial's normalised 2-D window

    def __call__(self, pred: Tensor, gt: Tensor) -> Tensor:
        """B×3×H×W in [0, 1] -> (B,) SSIM."""
        from pyiqa.archs.func_util import preprocess_rgb

        if self.crop_border:
            border = self.crop_border
            pred, gt = (t[..., border:-border, border:-border] for t in (pred, gt))
        x, y = (
            preprocess_rgb(t, self.test_y_channel, self.DATA_RANGE, Y_COLOR_SPACE).to(torch.float64)
            for t in (pred, gt)
        )
        channels = x.shape[1]
        stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # B×5C×H×W
        g = self.gaussian.to(x.device)
        stats = F.conv2d(stats, g.view(1, 1, 1, -1).expand(5 * channels, 1, 1, -1), groups=5 * channels)
        stats = F.conv2d(stats, g.view(1, 1, -1, 1).expand(5 * channels, 1, -1, 1), groups=5 * channels)
        mu_x, mu_y, xx, yy, xy = stats.split(channels, dim=1)  # each B×C×(H-10)×(W-10)
        c1, c2 = (0.01 * self.DATA_RANGE) ** 2, (0.03 * self.DATA_RANGE) ** 2
        mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
        contrast_structure = F.relu((2 * (xy - mu_xy) + c2) / ((xx - mu_xx) + (yy - mu_yy) + c2))
        ssim_map = ((2 * mu_xy + c1) / (mu_xx + mu_yy + c1)) * contrast_structure
        return ssim_map.mean(dim=(1, 2, 3))


def grey_mean(images: Tensor) -> Tensor:
    """B×3×H×W -> (B,): each image's mean grey level (GRAY_WEIGHTS), the brightness GT-mean matches."""
    return (images * images.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)).sum(1).mean(dim=(1, 2))


def scaled_to_grey(images: Tensor, level: Tensor | float) -> Tensor:
    """B×3×H×W images, each scaled by one gain to mean grey level `level` ((B,) or one for all), then
    clamped to [0, 1] (so a bright image can end a little below its level)."""
    target = torch.as_tensor(level, dtype=images.dtype, device=images.device)
    gain = target / grey_mean(images).clamp_min(1e-8)
    return (images * gain.view(-1, 1, 1, 1)).clamp(0, 1)


def gt_mean_scaled(pred: Tensor, gt: Tensor) -> Tensor:
    """B×3×H×W output with its brightness matched to the ground truth's (the 'GT-mean' protocol)."""
    return scaled_to_grey(pred, grey_mean(gt))
