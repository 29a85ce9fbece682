"""Cost of the full-reference metrics at 600×400 (a LOL image) against the enhancement they score.

Times, per image: our `FullReferenceMetrics` (PSNR/SSIM in RGB and on Y, GT-mean PSNR), the same five
numbers through pyiqa's own modules (the path evaluation used before: five 2-D float64 convolutions per SSIM),
the classic enhancers, and the paper model's CPU inference; prints the metric cost as a fraction of each
enhancement and the largest difference between the two metric paths (they must agree to 1e-6).

    python benchmarks/metrics.py [--repeats 3] [--skip-model]
"""

from __future__ import annotations

import argparse
import time

import torch

from semi_llie.inference.classic import BASELINES
from semi_llie.metrics.full_reference import PSNR_EPS, Y_COLOR_SPACE, FullReferenceMetrics, gt_mean_scaled


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def pyiqa_scores(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """The five numbers through pyiqa's PSNR and SSIM modules (outputs rounded to 8 bits first, as ours)."""
    from pyiqa.archs.psnr_arch import PSNR
    from pyiqa.archs.ssim_arch import SSIM

    pred = torch.round(pred.clamp(0, 1) * 255.0) / 255.0
    psnr, psnr_y = PSNR(eps=PSNR_EPS), PSNR(test_y_channel=True, eps=PSNR_EPS, color_space=Y_COLOR_SPACE)
    ssim = SSIM(downsample=False, test_y_channel=False)
    ssim_y = SSIM(downsample=False, test_y_channel=True, color_space=Y_COLOR_SPACE)
    return {
        "psnr": float(psnr(pred, gt)),
        "ssim": float(ssim(pred, gt)),
        "psnr_y": float(psnr_y(pred, gt)),
        "ssim_y": float(ssim_y(pred, gt)),
        "psnr_gtmean": float(psnr(gt_mean_scaled(pred, gt), gt)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-model", action="store_true", help="do not time the paper model's inference")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    gt = torch.rand(1, 3, 400, 600, generator=generator)
    low = (gt * 0.15 + 0.02 * torch.rand(1, 3, 400, 600, generator=generator)).clamp(0, 1)
    metrics = FullReferenceMetrics()
    ours = seconds(lambda: metrics(low, gt), args.repeats)
    theirs = seconds(lambda: pyiqa_scores(low, gt), args.repeats)
    difference = max(abs(metrics(low, gt)[k] - v) for k, v in pyiqa_scores(low, gt).items())
    print("per 600x400 image:")
    print(
        f"  metrics, ours: {ours * 1000:8.1f} ms | through pyiqa: {theirs * 1000:8.1f} ms | "
        f"ratio {theirs / ours:.1f}x"
    )
    print(f"  largest difference between the two: {difference:.2e} (must be < 1e-6)")
    for name, enhance in BASELINES.items():
        cost = seconds(lambda enhance=enhance: enhance(low), args.repeats)
        print(f"  {name:<8} enhancement {cost * 1000:8.1f} ms; metrics are {ours / cost:.0f}x that")
    if not args.skip_model:
        from semi_llie.engine.allocator import keep_freed_memory
        from semi_llie.models import build_model
        from semi_llie.models.enhancer import Enhancer

        keep_freed_memory()
        model = Enhancer(build_model({"type": "MambaLowlight"})).eval()
        with torch.no_grad():
            cost = seconds(lambda: model(low), 1)
        print(f"  paper model inference {cost:8.2f} s; metrics are {100 * ours / cost:.1f} % of it")
    assert difference < 1e-6, difference


if __name__ == "__main__":
    main()
