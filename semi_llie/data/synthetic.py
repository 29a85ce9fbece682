"""A small synthetic low-light dataset, made from the photos scikit-image ships (no network needed).

Low-light model (applied per image, parameters drawn from the ranges in `LowLightModel`):

    x_lin = srgb_to_linear(gt)                       undo the sRGB transfer curve: noise lives in linear light
    x_lin = x_lin ** gamma                           gamma >= 1 darkens mid-tones more than highlights, the
                                                     way a camera's tone curve collapses under low light
    x_lin = x_lin * exposure * cast                  exposure: linear scale (shorter exposure / less light);
                                                     cast: per-channel gains (white-balance error), mean 1
    y_lin = Poisson(x_lin * photons) / photons       shot noise: photons = photon count at full scale, so the
          + Normal(0, read_noise)                    variance is x_lin / photons + read_noise**2
                                                     (the Poisson-Gaussian sensor model of Foi et al. 2008)
    low   = quantise8(linear_to_srgb(clip(y_lin)))   back to an 8-bit sRGB file like a camera's output

Every sample draws its own crop, flip and low-light parameters from `numpy.random.default_rng((seed,
split, index))`, so a dataset is a pure function of its arguments and any one sample can be regenerated
alone. Val samples come from source photos that no training sample uses.

Layout written (the `--root` layout `semi-llie shards build` reads; the same file name pairs input and GT):

    ROOT/labeled/{input,GT}/*.png   ROOT/unlabeled/input/*.png   ROOT/val/{input,GT}/*.png
    ROOT/synthesis.json             the arguments and the per-sample parameters, for provenance
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from semi_llie.data.images import write_image
from semi_llie.errors import UserError


def _skimage_photos() -> dict[str, Callable[[], np.ndarray]]:
    # Only images bundled in the scikit-image wheel: the others are fetched over the network by pooch.
    from skimage import data

    return {
        "astronaut": data.astronaut,
        "chelsea": data.chelsea,
        "coffee": data.coffee,
        "rocket": data.rocket,
        "motorcycle_left": lambda: data.stereo_motorcycle()[0],
        "motorcycle_right": lambda: data.stereo_motorcycle()[1],
        "immunohistochemistry": data.immunohistochemistry,
        "colorwheel": data.colorwheel,
    }


# Held out for validation: no training sample is cut from these photos.
VAL_SOURCES: tuple[str, ...] = ("coffee", "chelsea")


def load_source_photos() -> dict[str, np.ndarray]:
    """The bundled RGB photos as float arrays H×W×3 in [0, 1] (sRGB), by name."""
    return {
        name: np.asarray(load(), dtype=np.float64)[..., :3] / 255.0
        for name, load in _skimage_photos().items()
    }


def srgb_to_linear(srgb: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 sRGB decoding, elementwise on [0, 1]."""
    return np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 sRGB encoding, elementwise on [0, 1]."""
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055)


@dataclass(frozen=True)
class LowLightParams:
    """The parameters drawn for one image."""

    exposure: float
    gamma: float
    cast: tuple[float, float, float]
    photons: float
    read_noise: float


@dataclass(frozen=True)
class LowLightModel:
    """Ranges of the low-light model in the module docstring. Scales are drawn log-uniformly.

    The defaults give 8-bit inputs with a mean around 0.05-0.15 (LOL-v1's low images average ~0.07) and
    visible chroma noise in the shadows, while keeping enough signal that an enhancer can recover the scene.
    """

    exposure: tuple[float, float] = (0.04, 0.2)
    gamma: tuple[float, float] = (1.0, 1.4)
    color_cast: float = 0.08  # each channel gain within 1 ± color_cast before renormalising to mean 1
    photons: tuple[float, float] = (300.0, 3000.0)
    read_noise: tuple[float, float] = (0.0005, 0.004)

    def sample(self, rng: np.random.Generator) -> LowLightParams:
        gains = 1.0 + rng.uniform(-self.color_cast, self.color_cast, size=3)
        gains = gains / gains.mean()
        return LowLightParams(
            exposure=_log_uniform(rng, self.exposure),
            gamma=float(rng.uniform(*self.gamma)),
            cast=(float(gains[0]), float(gains[1]), float(gains[2])),
            photons=_log_uniform(rng, self.photons),
            read_noise=_log_uniform(rng, self.read_noise),
        )

    def darken(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, LowLightParams]:
        """image: H×W×3 float sRGB in [0, 1] -> (H×W×3 float sRGB in [0, 1] on the 8-bit grid, params)."""
        params = self.sample(rng)
        linear = srgb_to_linear(image) ** params.gamma
        linear = linear * params.exposure * np.asarray(params.cast)
        noisy = rng.poisson(linear * params.photons) / params.photons
        noisy = noisy + rng.normal(0.0, params.read_noise, size=linear.shape)
        low = linear_to_srgb(np.clip(noisy, 0.0, 1.0))
        return np.round(low * 255.0) / 255.0, params


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def random_view(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (50-100 % of the short side), resized to size×size, randomly flipped.

    photo: H×W×3 float in [0, 1] -> size×size×3 float in [0, 1] on the 8-bit grid (it is the GT file).
    """
    height, width = photo.shape[:2]
    side = int(rng.uniform(0.5, 1.0) * min(height, width))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(np.round(photo[top : top + side, left : left + side] * 255).astype(np.uint8))
    view = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    if rng.random() < 0.5:
        view = view[:, ::-1]
    return view


@dataclass
class SyntheticDataset:
    """What `make_dataset` wrote: the root and the file names per split."""

    root: Path
    files: dict[str, list[str]] = field(default_factory=dict)

    def count(self, split: str) -> int:
        return len(self.files.get(split, []))


_SPLIT_IDS = {"labeled": 0, "unlabeled": 1, "val": 2}


def make_dataset(
    root: str | Path,
    *,
    n_labeled: int = 24,
    n_unlabeled: int = 24,
    n_val: int = 6,
    size: int = 160,
    seed: int = 0,
    model: LowLightModel | None = None,
) -> SyntheticDataset:
    """Write a synthetic low-light dataset in the `--root` layout (see module docstring) and return it."""
    if size < 32:
        raise UserError(f"synthetic image size {size} is too small; use at least 32 pixels")
    if min(n_labeled, n_val) < 1 or n_unlabeled < 0:
        raise UserError(
            "a synthetic dataset needs at least 1 labeled and 1 val sample and no negative counts"
        )
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"synthetic dataset folder {root} is not empty; pass an empty or new folder")
    model = model or LowLightModel()
    photos = load_source_photos()
    train_names = [name for name in photos if name not in VAL_SOURCES]
    plan = {
        "labeled": (n_labeled, train_names),
        "unlabeled": (n_unlabeled, train_names),
        "val": (n_val, list(VAL_SOURCES)),
    }
    dataset = SyntheticDataset(root=root)
    provenance: dict[str, dict] = {}
    for split, (count, names) in plan.items():
        folders = {"input": root / split / "input"}
        if split != "unlabeled":
            folders["GT"] = root / split / "GT"
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        dataset.files[split] = []
        for index in range(count):
            rng = np.random.default_rng((seed, _SPLIT_IDS[split], index))
            source = names[index % len(names)]  # round-robin keeps every photo represented
            gt = random_view(photos[source], size, rng)
            low, params = model.darken(gt, rng)
            name = f"{split}-{index:04d}-{source}.png"
            _save_png(low, folders["input"] / name)
            if "GT" in folders:
                _save_png(gt, folders["GT"] / name)
            dataset.files[split].append(name)
            provenance[f"{split}/{name}"] = dataclasses.asdict(params)
    record = {
        "generator": "semi_llie.data.synthetic.make_dataset",
        "arguments": {
            "n_labeled": n_labeled,
            "n_unlabeled": n_unlabeled,
            "n_val": n_val,
            "size": size,
            "seed": seed,
        },
        "model": dataclasses.asdict(model),
        "val_sources": list(VAL_SOURCES),
        "samples": provenance,
    }
    (root / "synthesis.json").write_text(json.dumps(record, indent=1))
    return dataset


def _save_png(image: np.ndarray, path: Path) -> None:
    """image: H×W×3 float in [0, 1]."""
    write_image(path, image)
