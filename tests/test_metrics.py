"""Full-reference metrics on inputs with known scores, and the offline availability of weighted metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from skimage.metrics import structural_similarity

from semi_llie.metrics.full_reference import FullReferenceMetrics, gt_mean_scaled, scaled_to_grey
from semi_llie.metrics.pyiqa_metrics import PyiqaMetrics

torch.set_num_threads(1)


def _gt(seed: int = 0, size: tuple[int, int] = (40, 48)) -> torch.Tensor:
    """1×3×H×W smooth-ish image on the 8-bit grid, in [0, 0.8] so offsets never clip."""
    rng = np.random.default_rng(seed)
    pixels = np.round(rng.uniform(0, 0.8, (1, 3, *size)) * 255) / 255
    return torch.from_numpy(pixels).float()


def test_identical_images_score_the_maximum() -> None:
    gt = _gt()
    scores = FullReferenceMetrics()(gt, gt)
    assert scores["psnr"] == pytest.approx(80.0) and scores["psnr_y"] == pytest.approx(80.0)
    assert scores["ssim"] == pytest.approx(1.0) and scores["ssim_y"] == pytest.approx(1.0)


def test_psnr_of_a_constant_offset_in_rgb_and_on_y() -> None:
    gt = _gt()
    scores = FullReferenceMetrics(quantize_output=False)(gt + 0.1, gt)
    assert scores["psnr"] == pytest.approx(20.0, abs=1e-3)
    # BT.601 luma of a gray offset d is d·(65.481 + 128.553 + 24.966)/255 = d·219/255.
    assert scores["psnr_y"] == pytest.approx(20.0 - 20 * math.log10(219 / 255), abs=1e-3)


def test_gt_mean_psnr_undoes_a_global_brightness_error() -> None:
    gt = _gt()
    metrics = FullReferenceMetrics(quantize_output=False)
    scores = metrics(gt * 0.5, gt)
    assert scores["psnr"] < 15 and scores["psnr_gtmean"] > 70
    torch.testing.assert_close(gt_mean_scaled(gt * 0.5, gt), gt)


def test_ssim_in_rgb_and_on_y_matches_scikit_image() -> None:
    gt = _gt(1)
    pred = (gt + torch.from_numpy(np.random.default_rng(2).normal(0, 0.05, gt.shape)).float()).clamp(0, 1)
    ours = FullReferenceMetrics()(pred, gt)

    def rgb8(image: torch.Tensor) -> np.ndarray:  # the 8-bit values MATLAB and pyiqa score
        return np.round(image[0].numpy().transpose(1, 2, 0) * 255)

    def luma(image: torch.Tensor) -> np.ndarray:
        return np.round(16 + rgb8(image) / 255 @ np.array([65.481, 128.553, 24.966]))

    options = dict(data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ours["ssim"] == pytest.approx(
        structural_similarity(rgb8(pred), rgb8(gt), channel_axis=-1, **options), abs=1e-4
    )
    assert ours["ssim_y"] == pytest.approx(structural_similarity(luma(pred), luma(gt), **options), abs=1e-4)


@pytest.mark.parametrize("y_channel", [False, True])
def test_separable_ssim_equals_pyiqas_two_dimensional_one(y_channel: bool) -> None:
    from pyiqa.archs.ssim_arch import SSIM

    from semi_llie.metrics.full_reference import Y_COLOR_SPACE, SeparableSSIM

    generator = torch.Generator().manual_seed(3)
    gt = torch.rand(2, 3, 70, 90, generator=generator)
    pred = (0.7 * gt + 0.3 * torch.rand(2, 3, 70, 90, generator=generator)).round_()  # some flat regions
    pred = (0.5 * pred + 0.5 * gt).clamp(0, 1)
    reference = SSIM(test_y_channel=y_channel, downsample=False, color_space=Y_COLOR_SPACE, crop_border=2)
    ours = SeparableSSIM(test_y_channel=y_channel, crop_border=2)
    torch.testing.assert_close(ours(pred, gt), reference(pred, gt), atol=1e-8, rtol=0)


def test_crop_border_ignores_the_border_and_is_recorded() -> None:
    gt = _gt()
    pred = gt.clone()
    pred[..., :3, :] = 1.0
    assert FullReferenceMetrics()(pred, gt)["psnr"] < 40
    metrics = FullReferenceMetrics(crop_border=4)
    assert metrics(pred, gt)["psnr"] == pytest.approx(80.0)
    assert metrics.settings["crop_border"] == 4 and "pyiqa" in metrics.settings["libraries"]


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="1×3×H×W"):
        FullReferenceMetrics()(_gt(size=(40, 48)), _gt(size=(40, 40)))


@pytest.fixture
def empty_weight_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import pyiqa.utils.download_util as download_util

    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(tmp_path / "pyiqa"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path


def test_metrics_without_local_weights_are_skipped_with_a_reason(empty_weight_caches: Path) -> None:
    metrics = PyiqaMetrics(("lpips", "niqe", "musiq", "piqe"))
    assert metrics.names == ("piqe",)
    assert set(metrics.skipped) == {"lpips", "niqe", "musiq"}
    assert "LPIPS_v0.1_alex" in metrics.skipped["lpips"] and "alexnet" in metrics.skipped["lpips"]
    assert str(empty_weight_caches / "pyiqa" / "niqe_modelparameters.mat") in metrics.skipped["niqe"]
    scores = metrics(_gt(size=(64, 64)))
    assert set(scores) == {"piqe"} and math.isfinite(scores["piqe"])
    assert metrics.settings["skipped"] == metrics.skipped


def test_a_metric_whose_weights_are_cached_is_loaded_from_the_cache(empty_weight_caches: Path) -> None:
    # NIQE's "weights" are a pristine-image Gaussian (36 features): a valid stand-in exercises the loader.
    cache = empty_weight_caches / "pyiqa"
    cache.mkdir()
    scipy.io.savemat(
        cache / "niqe_modelparameters.mat", {"mu_prisparam": np.zeros((1, 36)), "cov_prisparam": np.eye(36)}
    )
    metrics = PyiqaMetrics(("niqe",))
    assert metrics.names == ("niqe",) and not metrics.skipped
    assert metrics.settings["niqe"]["lower_better"] is True
    image = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (1, 3, 128, 128))).float()
    assert math.isfinite(metrics(image)["niqe"])


def test_score_split_matches_a_loop_written_here_and_means_skip_missing_metrics():
    from semi_llie.metrics.evaluation import EvalSample, means, score_split

    samples = [
        EvalSample(f"k{i}", torch.full((1, 3, 4, 4), 0.1 * i), torch.full((1, 3, 4, 4), 0.5))
        for i in range(3)
    ]

    def metrics(output, high):
        scores = {"abs": float((output - high).abs().mean())}
        if output.mean() > 0.05:
            scores["log"] = float(output.mean().log())
        return scores

    seen = []
    rows = score_split(
        samples,
        {"x": lambda s: s.low, "double": lambda s: s.low * 2},
        metrics,
        on_output=lambda name, sample, output: seen.append((name, sample.key)),
    )
    assert seen == [(n, k) for k in ("k0", "k1", "k2") for n in ("x", "double")]
    for i, key in enumerate(("k0", "k1", "k2")):
        assert rows["x"][key]["abs"] == pytest.approx(abs(0.1 * i - 0.5))
        assert rows["double"][key]["abs"] == pytest.approx(abs(0.2 * i - 0.5))
    assert "log" not in rows["x"]["k0"]
    assert means(rows["x"]) == pytest.approx(
        {"abs": (0.5 + 0.4 + 0.3) / 3, "log": (math.log(0.1) + math.log(0.2)) / 2}
    )


def test_the_metric_table_decides_directions_and_never_downloads(empty_weight_caches: Path) -> None:
    from semi_llie.errors import ConfigError
    from semi_llie.metrics.table import METRICS, create_pyiqa_metric, lower_is_better

    assert [name for name, spec in METRICS.items() if spec.lower_better] == [
        "lpips",
        "niqe",
        "piqe",
        "brisque",
    ]
    assert lower_is_better("eval/test/niqe") and lower_is_better("train/loss_unsup")
    assert not lower_is_better("val/student_psnr") and not lower_is_better("eval/unpaired/musiq")
    for name in ("lpips", "niqe", "musiq", "brisque"):
        with pytest.raises(ConfigError, match="not available locally"):
            create_pyiqa_metric(name)
    assert not list(empty_weight_caches.rglob("*.pth")) and not list(empty_weight_caches.rglob("*.mat"))


def test_scaled_to_grey_reaches_each_level_by_one_gain_per_image():
    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.4  # no clipping below
    scaled = scaled_to_grey(images, torch.tensor([0.1, 0.3]))
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # OpenCV's RGB2GRAY, by hand
    torch.testing.assert_close((scaled * weights).sum(1).mean(dim=(1, 2)), torch.tensor([0.1, 0.3]))
    gains = scaled.flatten(1) / images.flatten(1)
    torch.testing.assert_close(gains, gains[:, :1].expand_as(gains))
    torch.testing.assert_close(scaled_to_grey(images, 0.2), scaled_to_grey(images, torch.tensor([0.2, 0.2])))
