"""Classic enhancers: gamma correction and luminance histogram equalisation."""

from __future__ import annotations

import pytest
import torch

from semi_llie.inference.classic import BASELINES, gamma_correction, histogram_equalization, luminance


def _dark_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 24, 32, generator=generator) * torch.tensor([0.1, 0.25]).view(2, 1, 1, 1)


def test_adaptive_gamma_maps_a_flat_image_to_the_target_mean():
    flat = torch.full((1, 3, 8, 8), 0.05)
    out = gamma_correction(flat, target_mean=0.45)
    assert luminance(out).mean().item() == pytest.approx(0.45, abs=1e-3)


def test_adaptive_gamma_brightens_each_image_towards_the_target():
    out = gamma_correction(_dark_batch(), target_mean=0.4)
    means = luminance(out).mean(dim=(1, 2, 3))
    assert torch.all((means > 0.3) & (means < 0.5))


def test_fixed_gamma_is_a_plain_power():
    images = _dark_batch()
    torch.testing.assert_close(gamma_correction(images, gamma=0.5), images.sqrt())


def test_histogram_equalization_spreads_luminance_over_the_range():
    out = histogram_equalization(_dark_batch())
    luma = luminance(out)
    for image in luma:
        assert image.min().item() < 0.05 and image.max().item() > 0.9
        assert image.mean().item() == pytest.approx(0.5, abs=0.08)  # an equalised histogram is ~uniform


def test_histogram_equalization_is_monotone_and_keeps_colour_ratios():
    images = _dark_batch()[:1]
    out = histogram_equalization(images)
    # Pixels where no channel clipped at 1 carry the equalised luminance exactly.
    unclipped = ((out < 0.999).all(dim=1) & (images > 0.01).all(dim=1)).flatten()
    before, after = luminance(images).flatten()[unclipped], luminance(out).flatten()[unclipped]
    order = before.argsort()
    assert torch.all(after[order].diff() >= -1e-3)  # brighter input pixel -> not darker output pixel
    mask = unclipped.view(1, 1, *images.shape[2:])
    ratio_in = (images[:, 0:1] / images[:, 1:2])[mask]
    ratio_out = (out[:, 0:1] / out[:, 1:2])[mask]
    torch.testing.assert_close(ratio_out, ratio_in, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_keeps_shape_and_range(name):
    images = _dark_batch()
    out = BASELINES[name](images)
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1
    assert out.mean() > images.mean()


def test_score_baselines_on_a_shard_split(tiny_shards):
    from semi_llie.inference.classic import score_baselines

    scores = score_baselines(tiny_shards, "val")
    assert set(scores) == {"input", "gamma", "histeq", "settings"}
    for name in ("input", "gamma", "histeq"):
        assert len(scores[name]["per_image"]) == 2
        assert set(scores[name]["metrics"]) >= {"psnr", "ssim", "psnr_y", "ssim_y", "psnr_gtmean"}
    # The synthetic inputs are dark: brightening them brings them closer to the ground truth.
    assert scores["gamma"]["metrics"]["psnr"] > scores["input"]["metrics"]["psnr"] + 3
    assert scores["settings"]["resolution"].startswith("full")
