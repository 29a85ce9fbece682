"""benchmarks/paired_images.py: per-image differences of two sweep arms and their bootstrap interval."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import PROJECT

SCRIPT = PROJECT / "benchmarks" / "paired_images.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("paired_images", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def write_arm(folder, scores: dict[int, dict[str, float]] | list, split: str = "val") -> None:
    """A sweep folder as `semi-llie sweep` leaves it: a child per (seed, images) with its per-image table."""
    children = list(scores.items()) if isinstance(scores, dict) else scores
    for index, (seed, images) in enumerate(children):
        child = folder / "children" / f"{index:03d}-seed{index}"
        (child / f"eval-{split}").mkdir(parents=True)
        (child / "sweep_done.json").write_text(json.dumps({"seed": seed}))
        rows = ["key,psnr,ssim"] + [f"{key},{value},0.5" for key, value in images.items()]
        (child / f"eval-{split}" / "per_image.csv").write_text("\n".join(rows) + "\n")


def test_differences_use_the_common_seeds_and_the_interval_brackets_the_mean(benchmark, tmp_path):
    keys = [f"img{i}" for i in range(5)]
    a = {seed: {k: 20.0 + seed + i for i, k in enumerate(keys)} for seed in (2022, 2023, 2024)}
    b = {seed: {k: 19.0 + 2 * i for i, k in enumerate(keys)} for seed in (2023, 2024, 2025)}
    write_arm(tmp_path / "a", a)
    write_arm(tmp_path / "b", b)
    (tmp_path / "a" / "children" / "000-seed0" / "eval-val" / "per_image.csv").unlink()  # an unscored child
    scores = [benchmark.per_image_scores(tmp_path / arm, "val", "psnr") for arm in ("a", "b")]
    result = benchmark.paired_difference(*scores)
    # by hand: seeds 2023 and 2024 only; image i: (20 + 2023.5 + i) - (19 + 2i)
    assert result.seeds == [2023, 2024]
    np.testing.assert_allclose(result.differences, [2024.5 - i for i in range(5)])
    assert result.mean == pytest.approx(2022.5) and result.wins == 5
    assert result.low < result.mean < result.high
    assert result.low >= 2020.5 and result.high <= 2024.5  # within the smallest and largest difference

    constant = benchmark.paired_difference({1: {"x": 1.5, "y": 3.0}}, {1: {"x": 1.0, "y": 2.5}})
    assert constant.mean == constant.low == constant.high == pytest.approx(0.5)


def test_folds_of_one_seed_are_joined_and_a_seed_still_running_is_left_out(benchmark, tmp_path):
    # Two folds per seed (children 0-1 seed 1, children 2-3 seed 2); seed 2 of arm b has only its first fold.
    fold1, fold2 = {"p": 10.0, "q": 12.0}, {"r": 14.0}
    a = [(1, fold1), (1, fold2), (2, {"p": 11.0, "q": 13.0}), (2, {"r": 15.0})]
    b = [(1, {"p": 9.0, "q": 12.5}), (1, {"r": 13.0}), (2, {"p": 10.0, "q": 12.0})]
    write_arm(tmp_path / "a", a)
    write_arm(tmp_path / "b", b)
    scores = [benchmark.per_image_scores(tmp_path / arm, "val", "psnr") for arm in ("a", "b")]
    assert scores[0] == {1: {"p": 10.0, "q": 12.0, "r": 14.0}, 2: {"p": 11.0, "q": 13.0, "r": 15.0}}
    result = benchmark.paired_difference(*scores)
    assert result.seeds == [1]  # seed 2 did not score r in arm b
    np.testing.assert_allclose(result.differences, [1.0, -0.5, 1.0])  # p, q, r by hand

    write_arm(tmp_path / "twice", [(1, fold1), (1, {"q": 11.0})])
    with pytest.raises(ValueError, match="scored by two children of seed 1"):
        benchmark.per_image_scores(tmp_path / "twice", "val", "psnr")


def test_bootstrap_interval_matches_the_normal_approximation_on_many_images(benchmark):
    rng = np.random.default_rng(1)
    diffs = rng.normal(0.3, 1.0, 2000)
    a = {0: {f"k{i}": float(d) for i, d in enumerate(diffs)}}
    b = {0: {f"k{i}": 0.0 for i in range(2000)}}
    result = benchmark.paired_difference(a, b, resamples=4000)
    half_width = 1.96 * diffs.std(ddof=1) / np.sqrt(len(diffs))  # the textbook interval of a mean
    assert result.low == pytest.approx(diffs.mean() - half_width, abs=0.01)
    assert result.high == pytest.approx(diffs.mean() + half_width, abs=0.01)


def test_arms_on_different_images_or_seeds_are_refused(benchmark):
    with pytest.raises(ValueError, match="different images"):
        benchmark.paired_difference({1: {"x": 1.0}}, {1: {"y": 1.0}})
    with pytest.raises(ValueError, match="no seed in common"):
        benchmark.paired_difference({1: {"x": 1.0}}, {2: {"x": 1.0}})


def test_command_line_prints_the_comparison(tmp_path):
    write_arm(tmp_path / "rule", {7: {"a": 21.0, "b": 18.0}}, split="test")
    write_arm(tmp_path / "file", {7: {"a": 20.0, "b": 18.5}}, split="test")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--a", str(tmp_path / "rule"), "--b", str(tmp_path / "file")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "rule - file, test psnr: +0.25" in out and "A ahead on 1/2 images" in out and "seeds [7]" in out
