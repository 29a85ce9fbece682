"""The common shape of the frozen semantic feature extractors (RAM, SAM) that the losses call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrozenExtractor(nn.Module):
    """A pretrained network used as a fixed feature map: frozen weights, always in eval mode.

    Gradients still flow through it to its *input*, which is what lets the semantic losses train the
    student. Subclasses call `freeze()` at the end of `__init__` and implement the feature methods.
    """

    supports_perceptual: bool = False  # whether `perceptual_features` exists (RAM: yes, SAM: no)
    input_size: int
    pixel_mean: Tensor
    pixel_std: Tensor

    def _register_normalisation(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenExtractor:
        # A parent's `.train()` must not switch on dropout in a frozen pretrained network.
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) resized (bilinear) to the input size and normalised."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return (images - self.pixel_mean) / self.pixel_std

    def perceptual_features(self, images: Tensor) -> list[Tensor]:
        """Intermediate feature maps compared by the perceptive loss (only where `supports_perceptual`)."""
        raise NotImplementedError(
            f"{type(self).__name__} provides no perceptive features; use the RAM extractor"
        )

    def contrastive_features(self, images: Tensor) -> list[Tensor]:
        """Embeddings compared by the semantic contrastive loss, one ratio term per tensor."""
        raise NotImplementedError
