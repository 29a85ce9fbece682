"""The synthetic low-light dataset: layout, darkness, noise, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semi_llie.data.synthetic import (
    VAL_SOURCES,
    LowLightModel,
    linear_to_srgb,
    load_source_photos,
    make_dataset,
    srgb_to_linear,
)
from semi_llie.errors import UserError


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64) / 255.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(
        tmp_path_factory.mktemp("syn") / "root", n_labeled=6, n_unlabeled=4, n_val=2, size=48, seed=3
    )


def test_layout_pairs_inputs_with_ground_truth(dataset):
    root = dataset.root
    assert (dataset.count("labeled"), dataset.count("unlabeled"), dataset.count("val")) == (6, 4, 2)
    for split in ("labeled", "val"):
        assert sorted(p.name for p in (root / split / "input").iterdir()) == sorted(dataset.files[split])
        assert sorted(p.name for p in (root / split / "GT").iterdir()) == sorted(dataset.files[split])
    assert not (root / "unlabeled" / "GT").exists()
    assert (root / "synthesis.json").is_file()
    image = Image.open(root / "labeled" / "input" / dataset.files["labeled"][0])
    assert image.mode == "RGB" and image.size == (48, 48)


def test_val_photos_are_held_out_of_training(dataset):
    train_sources = {
        name.split("-", 2)[2] for split in ("labeled", "unlabeled") for name in dataset.files[split]
    }
    val_sources = {name.split("-", 2)[2] for name in dataset.files["val"]}
    assert val_sources <= {f"{s}.png" for s in VAL_SOURCES}
    assert not train_sources & val_sources


def test_inputs_are_much_darker_than_ground_truth(dataset):
    for name in dataset.files["labeled"]:
        low = _read(dataset.root / "labeled" / "input" / name)
        high = _read(dataset.root / "labeled" / "GT" / name)
        assert low.mean() < 0.5 * high.mean()


def test_darkening_adds_signal_dependent_noise():
    # A flat grey patch: without noise every pixel would map to the same value.
    rng = np.random.default_rng(0)
    flat = np.full((64, 64, 3), 0.6)
    model = LowLightModel(exposure=(0.1, 0.1), gamma=(1.0, 1.0), color_cast=0.0)
    low, params = model.darken(flat, rng)
    assert params.exposure == pytest.approx(0.1)
    assert low.std() > 2 / 255
    noiseless = linear_to_srgb(srgb_to_linear(flat) * 0.1)
    assert abs(low.mean() - noiseless.mean()) < 0.02  # Poisson-Gaussian noise is zero-mean in linear light
    bright, _ = LowLightModel(exposure=(0.5, 0.5), gamma=(1.0, 1.0), color_cast=0.0).darken(flat, rng)
    # Shot noise grows with the signal: the brighter exposure is noisier in linear light.
    assert srgb_to_linear(bright).std() > srgb_to_linear(low).std()


def test_color_cast_gains_average_to_one():
    params = LowLightModel(color_cast=0.2).sample(np.random.default_rng(1))
    assert np.mean(params.cast) == pytest.approx(1.0)
    assert max(params.cast) - min(params.cast) > 0.01


def test_srgb_transfer_round_trips():
    values = np.linspace(0, 1, 101)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(values)), values, atol=1e-9)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = make_dataset(tmp_path / "a", n_labeled=2, n_unlabeled=1, n_val=1, size=32, seed=7)
    b = make_dataset(tmp_path / "b", n_labeled=2, n_unlabeled=1, n_val=1, size=32, seed=7)
    c = make_dataset(tmp_path / "c", n_labeled=2, n_unlabeled=1, n_val=1, size=32, seed=8)
    for relative in ("labeled/input", "labeled/GT", "unlabeled/input", "val/input"):
        for name in a.files[relative.split("/")[0]]:
            assert (a.root / relative / name).read_bytes() == (b.root / relative / name).read_bytes()
    name = a.files["labeled"][0]
    assert (a.root / "labeled/input" / name).read_bytes() != (c.root / "labeled/input" / name).read_bytes()


def test_source_photos_are_bundled_rgb():
    photos = load_source_photos()
    assert len(photos) >= 8
    for photo in photos.values():
        assert photo.ndim == 3 and photo.shape[2] == 3 and 0.0 <= photo.min() and photo.max() <= 1.0


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        make_dataset(tmp_path, n_labeled=1, n_unlabeled=0, n_val=1, size=32)
