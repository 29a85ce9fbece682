"""Tiny datasets for the shard and stream tests: a few real LOL pairs downscaled, plus synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
LOL = DATASETS / "lol_v1_train115"
UNPAIRED = DATASETS / "unpaired" / "sice_samples"
SMALL = (96, 64)  # (width, height) of the downscaled real images


def require_datasets() -> None:
    if not (LOL / "low").is_dir() or not UNPAIRED.is_dir():
        pytest.skip(f"real datasets not found under {DATASETS}")


def smooth_image(seed: int, size: tuple[int, int] = SMALL) -> np.ndarray:
    """A random but smooth H×W×3 uint8 image (distinct pHash per seed)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC))


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_dataset(root: Path, n_lol: int = 4, n_synthetic: int = 4, n_unlabeled: int = 3) -> dict[str, Path]:
    """low/ + high/ (real LOL pairs downscaled, then synthetic pairs with high = 255 - low) and unlabeled/."""
    require_datasets()
    low, high, unlabeled = root / "low", root / "high", root / "unlabeled"
    for path in sorted((LOL / "low").glob("*.png"))[:n_lol]:
        save(low / path.name, np.asarray(Image.open(path).convert("RGB").resize(SMALL)))
        save(high / path.name, np.asarray(Image.open(LOL / "high" / path.name).convert("RGB").resize(SMALL)))
    for i in range(n_synthetic):
        pixels = smooth_image(i)
        save(low / f"syn{i}.png", pixels)
        save(high / f"syn{i}.png", 255 - pixels)
    for path in sorted(UNPAIRED.glob("*.JPG"))[:n_unlabeled]:
        save(unlabeled / f"{path.stem}.png", np.asarray(Image.open(path).convert("RGB").resize(SMALL)))
    return {"low": low, "high": high, "unlabeled": unlabeled}
