"""Augmentations of METHOD §2, driven by an explicit `torch.Generator` so streams are reproducible.

Images are CHW tensors; crops and flips run on uint8 (cheap), photometric changes on float in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _chance(generator: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=generator).item() < p


def pad_to_size(image: Tensor, size: int) -> Tensor:
    """Reflect-pad a C×H×W image on the bottom/right so both sides are at least `size`.

    Reflection needs pad < side; images smaller than half the crop fall back to edge replication.
    """
    height, width = image.shape[-2:]
    pad_h, pad_w = max(0, size - height), max(0, size - width)
    if pad_h == 0 and pad_w == 0:
        return image
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    # F.pad's reflect/replicate modes need a float batch: (1, C, H, W).
    padded = F.pad(image[None].float(), (0, pad_w, 0, pad_h), mode=mode)[0]
    return padded.to(image.dtype)


def dihedral(image: Tensor, index: int) -> Tensor:
    """One of the 8 symmetries of the square: `index % 4` quarter turns, then a flip when `index >= 4`."""
    image = torch.rot90(image, index % 4, dims=(-2, -1))
    return image.flip(-1) if index >= 4 else image


def undo_dihedral(image: Tensor, index: int) -> Tensor:
    """The inverse of `dihedral(·, index)`: undo the flip, then the quarter turns."""
    image = image.flip(-1) if index >= 4 else image
    return torch.rot90(image, -(index % 4), dims=(-2, -1))


def paired_crop(images: dict[str, Tensor], crop_size: int, generator: torch.Generator) -> dict[str, Tensor]:
    """The same random crop and dihedral transform of every C×H×W image (all the same size).

    Returns crop_size×crop_size images; smaller inputs are padded first (`pad_to_size`).
    """
    images = {name: pad_to_size(image, crop_size) for name, image in images.items()}
    height, width = next(iter(images.values())).shape[-2:]
    top = int(torch.randint(0, height - crop_size + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop_size + 1, (), generator=generator))
    transform = int(torch.randint(0, 8, (), generator=generator))
    return {
        name: dihedral(image[:, top : top + crop_size, left : left + crop_size], transform)
        for name, image in images.items()
    }


def resize_square(image: Tensor, size: int) -> Tensor:
    """C×H×W uint8 -> C×size×size float in [0, 1] (bilinear, antialiased; aspect ratio not kept)."""
    resized = F.interpolate(
        image[None].float() / 255.0, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0].clamp_(0.0, 1.0)


def strong_view(weak: Tensor, generator: torch.Generator, kind: str = "paper") -> Tensor:
    """The strong view of a 3×S×S float image in [0, 1]: `paper_strong_view` or `lowlight_strong_view`."""
    if kind == "lowlight":
        return lowlight_strong_view(weak, generator)
    return paper_strong_view(weak, generator)


def random_exposure(image: Tensor, generator: torch.Generator) -> Tensor:
    """The image taken with ×U(0.5, 1.5) the light: the gain applies in linear light (sRGB ≈ gamma 2.2
    decoded, scaled, clipped to [0, 1] as a sensor saturates, re-encoded). C×H×W float in [0, 1] -> same."""
    linear = image.clamp(0.0, 1.0) ** 2.2
    return (linear * _uniform(generator, 0.5, 1.5)).clamp(0.0, 1.0) ** (1 / 2.2)


def lowlight_strong_view(weak: Tensor, generator: torch.Generator) -> Tensor:
    """A strong view whose enhanced image should equal the weak view's (our addition, `strong_augment:
    lowlight`): the same scene taken darker or brighter and noisier, so the consistency loss asks for what
    an enhancer must do anyway.

    Exposure ×U(0.5, 1.5) in linear light (sRGB decoded, scaled, re-encoded), then with p=0.8 heteroscedastic
    sensor noise (std sqrt(a·x + b²), a ∈ U(0, 0.004), b ∈ U(0, 0.02), in sRGB), then the paper's blur
    (p=0.5, σ∈[0.1, 2]). The paper's hue, saturation and contrast jitter and its grayscale change what the
    enhanced image should look like; asking the student to map a grey or hue-shifted input to the teacher's
    colour output teaches it to wash colours out (docs/results/label_efficiency.md).
    """
    image = random_exposure(weak, generator)
    if _chance(generator, 0.8):
        shot, read = _uniform(generator, 0.0, 0.004), _uniform(generator, 0.0, 0.02)
        noise = torch.randn(image.shape, generator=generator)
        image = image + noise * (shot * image + read**2).sqrt()
    if _chance(generator, 0.5):
        image = _paper_blur(image.clamp(0.0, 1.0), generator)
    return image.clamp(0.0, 1.0)


def _paper_blur(image: Tensor, generator: torch.Generator) -> Tensor:
    sigma = _uniform(generator, 0.1, 2.0)
    kernel = 2 * int(3.0 * sigma + 0.5) + 1  # covers ±3σ
    return TF.gaussian_blur(image, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


def paper_strong_view(weak: Tensor, generator: torch.Generator) -> Tensor:
    """METHOD §2 strong view of a 3×S×S float image: photometric only, so it stays pixel-aligned.

    ColorJitter(0.5, 0.5, 0.5, 0.25) with p=0.8 (its four changes in random order, as torchvision does),
    RandomGrayscale p=0.2, GaussianBlur σ∈[0.1, 2] with p=0.5.
    """
    image = weak
    if _chance(generator, 0.8):
        jitters = [
            (TF.adjust_brightness, _uniform(generator, 0.5, 1.5)),
            (TF.adjust_contrast, _uniform(generator, 0.5, 1.5)),
            (TF.adjust_saturation, _uniform(generator, 0.5, 1.5)),
            (TF.adjust_hue, _uniform(generator, -0.25, 0.25)),
        ]
        for index in torch.randperm(4, generator=generator).tolist():
            adjust, factor = jitters[index]
            image = adjust(image, factor)
    if _chance(generator, 0.2):
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if _chance(generator, 0.5):
        image = _paper_blur(image, generator)
    return image.clamp(0.0, 1.0)
