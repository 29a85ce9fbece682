"""`manifest.json`: the index of a shard folder (format in shards/README.md).

A shard *location* is where manifest.json and the shards live:
- a local folder (or the path of a manifest file in it),
- a URL webdataset can open (`https://host/shards`, `gs://bucket/shards`, ...): names are joined with "/",
- a `pipe:` command with `{}` where the file name goes, e.g. `pipe:aws s3 cp s3://bucket/shards/{} -`.
Shard URLs in the manifest are names relative to the location, so a folder can be moved or uploaded as is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semi_llie.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT = "semi-llie-shards"
VERSION = 1


def part_manifest_name(index: int, count: int) -> str:
    return f"manifest.part-{index}-of-{count}.json"


@dataclass(frozen=True)
class ShardEntry:
    name: str  # file name relative to the location
    split: str
    subset: str  # the test set name for test shards, "" otherwise
    samples: int
    bytes: int
    sha256: str
    has_high: bool


class Manifest:
    """A loaded manifest plus the location it came from; resolves shard names to readable URLs."""

    def __init__(self, data: dict[str, Any], location: str) -> None:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise UserError(
                f"{location} is not a {FORMAT} v{VERSION} manifest; rebuild it with `semi-llie shards build`"
            )
        self.data = data
        self.location = location
        self.shards = [ShardEntry(**entry) for entry in data["shards"]]

    @classmethod
    def open(cls, location: str | os.PathLike[str]) -> Manifest:
        """Read the manifest of a shard location (see the module docstring for the accepted forms)."""
        location = str(location)
        if _is_local(location) and Path(location).is_file():
            location = str(Path(location).parent)
        url = resolve(location, MANIFEST_NAME)
        # Imported here: webdataset imports torch, which the shard builder's processes do not need.
        from webdataset.gopen import gopen

        try:
            with gopen(url, "rb") as stream:
                data = json.loads(stream.read())
        except FileNotFoundError as err:
            parts = sorted(Path(location).glob("manifest.part-*.json")) if _is_local(location) else []
            hint = " (part manifests found: run `semi-llie shards merge`)" if parts else ""
            raise UserError(f"no {MANIFEST_NAME} at {location}{hint}; build shards first") from err
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {url}: {err}; check the shard location") from err
        return cls(data, location)

    def url(self, shard: ShardEntry) -> str:
        return resolve(self.location, shard.name)

    def shards_of(self, split: str, subset: str | None = None) -> list[ShardEntry]:
        """Shards of a split (and test subset), in manifest order (sorted by name)."""
        return [s for s in self.shards if s.split == split and (subset is None or s.subset == subset)]

    def num_samples(self, split: str, subset: str | None = None) -> int:
        return sum(s.samples for s in self.shards_of(split, subset))


def input_statistics(samples: list[dict[str, Any]]) -> tuple[list[float], list[float]] | None:
    """Per-channel mean and std of the labeled low images: the values for the model's `input_mean` /
    `input_std`. None for manifests written before the builder recorded per-sample moments.

    Labeled only: the supervised loss and the val metrics see these inputs, while unlabeled photos may come
    from other cameras and exposures. Each image weighs the same, as the training stream samples images,
    not pixels (a random crop of each).
    """
    labeled = [s for s in samples if s["split"] == "labeled"]
    if not labeled or any("low_moments" not in s for s in labeled):
        return None
    means, squares = (np.array([s["low_moments"][i] for s in labeled]).mean(0) for i in (0, 1))  # (3,)
    std = np.sqrt(np.maximum(squares - means**2, 0.0))
    return np.round(means, 4).tolist(), np.round(std, 4).tolist()


@dataclass(frozen=True)
class BrightnessCheck:
    """How the unlabeled images' exposure compares with the labeled lows' (mean brightness in [0, 1]).

    Where the unlabeled images come from decides whether they help (docs/results/label_efficiency.md), and
    exposure is the plainest sign of another camera or scene: the builder reports how far the unlabeled set
    lies from the labeled lows, the images the model is trained and judged on.
    """

    band: tuple[float, float]  # exp(mean ± 2 std) of the labeled lows' log brightness
    labeled_median: float
    unlabeled_median: float
    outside: list[str]  # keys of unlabeled samples outside the band
    unlabeled: int

    @property
    def median_ratio(self) -> float:
        return self.unlabeled_median / self.labeled_median


def unlabeled_brightness_check(samples: list[dict[str, Any]]) -> BrightnessCheck | None:
    """Compare each unlabeled image's mean brightness with the labeled lows' (log-normal band of ±2 std).

    Log scale: exposure is multiplicative, so a photo twice as bright is as far above the band as one half as
    bright is below it. None without per-sample moments, without unlabeled images or with under 2 labeled.
    """
    labeled = [s for s in samples if s["split"] == "labeled"]
    unlabeled = [s for s in samples if s["split"] == "unlabeled"]
    if len(labeled) < 2 or not unlabeled or any("low_moments" not in s for s in labeled + unlabeled):
        return None
    labeled_brightness = [_brightness(s) for s in labeled]
    log_labeled = np.log(labeled_brightness)
    centre, spread = log_labeled.mean(), log_labeled.std(ddof=1)
    low, high = float(np.exp(centre - 2 * spread)), float(np.exp(centre + 2 * spread))
    brightness = {s["key"]: _brightness(s) for s in unlabeled}
    return BrightnessCheck(
        band=(low, high),
        labeled_median=float(np.median(labeled_brightness)),
        unlabeled_median=float(np.median(list(brightness.values()))),
        outside=sorted(key for key, value in brightness.items() if not low <= value <= high),
        unlabeled=len(unlabeled),
    )


def _brightness(sample: dict[str, Any]) -> float:
    """Mean over pixels and channels of the low image, floored at half an 8-bit level (log of black)."""
    return max(float(np.mean(sample["low_moments"][0])), 0.5 / 255)


def resolve(location: str, name: str) -> str:
    """URL of file `name` at `location` (local folder, URL, or `pipe:` command with `{}`)."""
    if location.startswith("pipe:"):
        if "{}" not in location:
            raise UserError(f"pipe: location {location!r} needs '{{}}' where the file name goes")
        return location.replace("{}", name)
    if _is_local(location):
        return str(Path(location) / name)
    return location.rstrip("/") + "/" + name


def _is_local(location: str) -> bool:
    return "://" not in location and not location.startswith("pipe:")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read manifest {path}: {err}") from err
