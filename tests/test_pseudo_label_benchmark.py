"""benchmarks/pseudo_labels.py: does the 8 symmetries' disagreement mark where the pseudo-label is wrong?"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import PROJECT


@pytest.fixture(scope="module")
def benchmark():
    path = PROJECT / "benchmarks" / "pseudo_labels.py"
    spec = importlib.util.spec_from_file_location("pseudo_labels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agreement_split_matches_a_direct_computation(benchmark):
    generator = torch.Generator().manual_seed(0)
    views = torch.rand(8, 3, 6, 6, generator=generator)  # 8 symmetries × C×S×S
    gt = torch.rand(3, 6, 6, generator=generator)
    result = benchmark.agreement_split(views, gt)

    # Reference: numpy, pixel by pixel.
    v, g = views.double().numpy(), gt.double().numpy()
    spread, squared_error = [], []
    for y in range(6):
        for x in range(6):
            spread.append(np.mean([np.std(v[:, c, y, x], ddof=1) for c in range(3)]))
            squared_error.append(np.mean([(v[:, c, y, x].mean() - g[c, y, x]) ** 2 for c in range(3)]))
    order = np.argsort(spread)
    sure, unsure = order[:18], order[18:]
    assert result["spearman"] == pytest.approx(scipy.stats.spearmanr(spread, np.sqrt(squared_error))[0])
    assert result["psnr_sure"] == pytest.approx(-10 * np.log10(np.mean(np.array(squared_error)[sure])))
    assert result["psnr_unsure"] == pytest.approx(-10 * np.log10(np.mean(np.array(squared_error)[unsure])))


def test_agreement_split_finds_errors_where_the_views_disagree(benchmark):
    # The views agree (spread 0) on the top half and scatter by ±0.2 on the bottom half, where the mean is
    # also 0.1 off: the spread ranks the errors and the sure half is the exact one.
    gt = torch.full((3, 4, 4), 0.5)
    views = gt.repeat(8, 1, 1, 1)
    views[:, :, 2:] += torch.tensor([0.2, -0.2] * 4).view(8, 1, 1, 1) + 0.1
    result = benchmark.agreement_split(views, gt)
    assert result["spearman"] > 0.8
    assert result["psnr_unsure"] == pytest.approx(20.0)  # |error| 0.1 -> 20 dB
    assert result["psnr_sure"] > 100  # exact: no error where the views agree


def test_one_gain_psnr_scales_every_label_by_the_same_factor(benchmark):
    # Two grey labels at 0.2 and 0.4 (average 0.3); level 0.45 asks for a gain of 1.5 on both: 0.3 and 0.6.
    labels = [torch.full((1, 3, 2, 2), 0.2), torch.full((1, 3, 2, 2), 0.4)]
    gts = [torch.full((1, 3, 2, 2), 0.4), torch.full((1, 3, 2, 2), 0.6)]
    result = benchmark.one_gain_psnr(labels, gts, level=0.45)
    assert result == pytest.approx([10 * np.log10(1 / 0.1**2), float("inf")])
