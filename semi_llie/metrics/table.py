"""The one table of image quality metrics: name, direction, reference, the weights it needs, availability.

Read by the bank (which no-reference metrics can score candidates), `semi-llie evaluate` (which metrics run
offline, which way each is better) and `semi-llie runs compare` (whether a logged metric is minimised).
Learned metrics need files that pyiqa would download on first use. We never download: a metric whose files are
not in the local caches is unavailable, with one line naming the missing file, so everything works offline and
nothing hangs on the network. PSNR, SSIM and PIQE need no files, so every split always gets a score.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from semi_llie.errors import ConfigError

if TYPE_CHECKING:  # torch is imported when a metric is created, so `runs compare` starts fast
    import torch
    from torch import nn


@dataclass(frozen=True)
class MetricSpec:
    name: str
    full_reference: bool
    lower_better: bool
    pyiqa_name: str | None  # None: computed by semi_llie.metrics.full_reference, not through pyiqa
    required_files: Callable[[], list[Path]] = list  # local files it loads; empty = needs no weights

    def missing_files(self) -> list[Path]:
        return [path for path in self.required_files() if not path.is_file()]

    def unavailable_reason(self) -> str | None:
        """None when the metric runs offline, else one line naming the missing files and where they go."""
        missing = self.missing_files()
        if not missing:
            return None
        return (
            f"{self.name} skipped: its weights are not available locally ({', '.join(map(str, missing))}); "
            "copy them there to enable it (nothing is downloaded)"
        )


def pyiqa_cache_dir() -> Path:
    from pyiqa.utils.download_util import DEFAULT_CACHE_DIR

    return Path(DEFAULT_CACHE_DIR)


def torch_checkpoint_dir() -> Path:
    import torch

    # Where torchvision's `weights=` loader looks (and would download to): $TORCH_HOME/hub/checkpoints.
    return Path(torch.hub.get_dir()) / "checkpoints"


def _file_name(url: str) -> str:
    return Path(urlparse(url).path).name


def _lpips_files() -> list[Path]:
    import torchvision
    from pyiqa.archs.lpips_arch import default_model_urls

    return [
        pyiqa_cache_dir() / _file_name(default_model_urls["0.1_alex"]),
        torch_checkpoint_dir() / _file_name(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url),
    ]


def _niqe_files() -> list[Path]:
    from pyiqa.archs.niqe_arch import default_model_urls

    return [pyiqa_cache_dir() / _file_name(default_model_urls["niqe"])]


def _musiq_files() -> list[Path]:
    from pyiqa.archs.musiq_arch import default_model_urls

    return [pyiqa_cache_dir() / _file_name(default_model_urls["koniq10k"])]


def _brisque_files() -> list[Path]:
    from pyiqa.archs.brisque_arch import default_model_urls

    return [pyiqa_cache_dir() / _file_name(default_model_urls["url"])]


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("psnr", full_reference=True, lower_better=False, pyiqa_name=None),
        MetricSpec("ssim", full_reference=True, lower_better=False, pyiqa_name=None),
        MetricSpec("psnr_y", full_reference=True, lower_better=False, pyiqa_name=None),
        MetricSpec("ssim_y", full_reference=True, lower_better=False, pyiqa_name=None),
        MetricSpec("psnr_gtmean", full_reference=True, lower_better=False, pyiqa_name=None),
        MetricSpec(
            "lpips", full_reference=True, lower_better=True, pyiqa_name="lpips", required_files=_lpips_files
        ),
        MetricSpec(
            "niqe", full_reference=False, lower_better=True, pyiqa_name="niqe", required_files=_niqe_files
        ),
        MetricSpec(
            "musiq", full_reference=False, lower_better=False, pyiqa_name="musiq", required_files=_musiq_files
        ),
        MetricSpec("piqe", full_reference=False, lower_better=True, pyiqa_name="piqe"),
        MetricSpec(
            "brisque",
            full_reference=False,
            lower_better=True,
            pyiqa_name="brisque",
            required_files=_brisque_files,
        ),
    )
}
NO_REFERENCE = tuple(name for name, spec in METRICS.items() if not spec.full_reference)


def metric_spec(name: str) -> MetricSpec:
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
    return METRICS[name]


def lower_is_better(key: str) -> bool:
    """Whether a logged metric is minimised: `val/psnr`, `eval/test/lpips`, `val/student_ssim`, `train/loss`.

    The table decides for image metrics (the last path part, without a `student_` prefix); any other name is
    maximised unless it is a loss.
    """
    name = key.rsplit("/", 1)[-1].lower().removeprefix("student_")
    if name in METRICS:
        return METRICS[name].lower_better
    return "loss" in name


def create_pyiqa_metric(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """The pyiqa module of a table metric whose files are local (ConfigError otherwise, never a download)."""
    spec = metric_spec(name)
    if spec.pyiqa_name is None:
        raise ConfigError(f"{name} is computed by semi_llie.metrics.full_reference, not by pyiqa")
    reason = spec.unavailable_reason()
    if reason is not None:
        raise ConfigError(reason)
    import pyiqa  # heavy imports, only when a learned or no-reference metric is used
    import torch

    # The required files are in the caches, so pyiqa's loaders find them there and do not download.
    return pyiqa.create_metric(spec.pyiqa_name, device=torch.device(device), as_loss=False)


def library_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("pyiqa", "torch")}
