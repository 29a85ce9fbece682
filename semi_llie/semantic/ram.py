"""The Recognize Anything Model (RAM) as a frozen, differentiable feature extractor.

Only the parts Semi-LLIE uses: the Swin image encoder, `image_proj` and the Query2Label-style tagging
head (label queries cross-attending to the image embeddings, then `fc` to one logit per tag). Module
names follow the public RAM code so `ram_swin_large_14m.pth` loads by name (see `ram_checkpoint`):

    visual_encoder.*                      Swin (semi_llie.semantic.swin)
    image_proj.{weight,bias}              Linear vision_width -> 512
    label_embed                           (num_labels, 512) frozen tag text embeddings
    wordvec_proj.{weight,bias}            Linear 512 -> 768 (Identity when the head width is 512)
    tagging_head.encoder.layer.{i}.crossattention.self.{query,key,value}
    tagging_head.encoder.layer.{i}.crossattention.output.{dense,LayerNorm}
    tagging_head.encoder.layer.{i}.{intermediate.dense,output.dense,output.LayerNorm}
    fc.{weight,bias}                      Linear 768 -> 1

The tagging head's BERT layers have no self-attention (RAM deletes it): each label query attends to the
image tokens, then goes through the BERT feed-forward. The feed-forward and residual-norm blocks are
transformers' own `BertSelfOutput`, `BertIntermediate`, `BertOutput`; the cross-attention is written
here because transformers' version projects keys from `hidden_size` while RAM's come from 512.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput, BertSelfOutput

from semi_llie.errors import ConfigError
from semi_llie.semantic.extractor import IMAGENET_MEAN, IMAGENET_STD, FrozenExtractor
from semi_llie.semantic.swin import SwinTransformer


@dataclass(frozen=True)
class RAMConfig:
    image_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    embedding_dim: int = 512  # image_proj output = label embedding width = cross-attention key width
    num_labels: int = 4585
    head_hidden: int = 768
    head_layers: int = 2
    head_heads: int = 4
    head_intermediate: int = 3072

    @property
    def vision_width(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def stage_resolutions(self) -> list[int]:
        return [self.image_size // self.patch_size // 2**i for i in range(len(self.depths))]


RAM_LARGE = RAMConfig()
# The same classes at a size that runs in milliseconds: tests, benchmarks, the quickstart.
RAM_TINY = RAMConfig(
    image_size=64,
    embed_dim=8,
    depths=(2, 2, 2, 2),
    num_heads=(1, 1, 2, 2),
    window_size=4,
    embedding_dim=16,
    num_labels=12,
    head_hidden=32,
    head_layers=2,
    head_heads=2,
    head_intermediate=64,
)
RAM_SIZES = {"large": RAM_LARGE, "tiny": RAM_TINY}


def ram_config(size: str, input_size: int | None = None, window_size: int | None = None) -> RAMConfig:
    """The named RAM size, optionally at another input size / window, validated against Swin's geometry."""
    if size not in RAM_SIZES:
        raise ConfigError(f"unknown RAM size {size!r} in the semantic block; use one of {sorted(RAM_SIZES)}")
    cfg = RAM_SIZES[size]
    cfg = dataclasses.replace(
        cfg, image_size=input_size or cfg.image_size, window_size=window_size or cfg.window_size
    )
    for resolution in cfg.stage_resolutions():
        if resolution > cfg.window_size and resolution % cfg.window_size:
            raise ConfigError(
                f"semantic input_size {cfg.image_size} gives a {resolution}x{resolution} Swin stage that "
                f"window_size {cfg.window_size} does not tile; pick an input_size whose stages "
                f"(input_size/4, /8, /16, /32) are multiples of the window (e.g. 384 or 192 with window 12, "
                f"256 with window 8, 224 with window 7)"
            )
    return cfg


class TagCrossAttention(nn.Module):
    """Label queries (B, K, hidden) attend to image embeddings (B, L, embedding_dim)."""

    def __init__(self, hidden: int, key_width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(key_width, hidden)
        self.value = nn.Linear(key_width, hidden)

    def forward(self, queries: Tensor, image_embeds: Tensor) -> Tensor:
        q, k, v = (
            rearrange(t, "b n (h d) -> b h n d", h=self.num_heads)
            for t in (self.query(queries), self.key(image_embeds), self.value(image_embeds))
        )
        return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")


class TagCrossAttentionBlock(nn.Module):
    def __init__(self, bert: BertConfig, key_width: int) -> None:
        super().__init__()
        self.self = TagCrossAttention(bert.hidden_size, key_width, bert.num_attention_heads)
        self.output = BertSelfOutput(bert)  # dense, residual, LayerNorm


class TagLayer(nn.Module):
    def __init__(self, bert: BertConfig, key_width: int) -> None:
        super().__init__()
        self.crossattention = TagCrossAttentionBlock(bert, key_width)
        self.intermediate = BertIntermediate(bert)
        self.output = BertOutput(bert)

    def forward(self, queries: Tensor, image_embeds: Tensor) -> Tensor:
        attended = self.crossattention.output(self.crossattention.self(queries, image_embeds), queries)
        return self.output(self.intermediate(attended), attended)


class TagEncoder(nn.Module):
    def __init__(self, bert: BertConfig, key_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(TagLayer(bert, key_width) for _ in range(bert.num_hidden_layers))


class TaggingHead(nn.Module):
    """RAM's `tagging_head`: a BERT encoder without embeddings or self-attention (names kept for loading)."""

    def __init__(self, bert: BertConfig, key_width: int) -> None:
        super().__init__()
        self.encoder = TagEncoder(bert, key_width)

    def forward(self, queries: Tensor, image_embeds: Tensor) -> Tensor:
        for layer in self.encoder.layer:
            queries = layer(queries, image_embeds)
        return queries


class RAMExtractor(FrozenExtractor):
    """Frozen RAM, differentiable w.r.t. its input image.

    perceptual_features(x): outputs of the last block of Swin stages 1, 2, 3 (before patch merging).
    contrastive_features(x): [e (B, 1 + L, 512), tag logits (B, num_labels)]; L = 144 at 384 px.
    """

    PERCEPTUAL_STAGES = (0, 1, 2)
    supports_perceptual = True

    def __init__(self, config: RAMConfig = RAM_LARGE, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.input_size = config.image_size
        self._register_normalisation(IMAGENET_MEAN, IMAGENET_STD)
        self.visual_encoder = SwinTransformer(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depths=config.depths,
            num_heads=config.num_heads,
            window_size=config.window_size,
            grad_checkpointing=grad_checkpointing,
        )
        self.image_proj = nn.Linear(config.vision_width, config.embedding_dim)
        bert = BertConfig(
            hidden_size=config.head_hidden,
            num_hidden_layers=config.head_layers,
            num_attention_heads=config.head_heads,
            intermediate_size=config.head_intermediate,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
        )
        self.label_embed = nn.Parameter(torch.randn(config.num_labels, config.embedding_dim) * 0.02)
        self.wordvec_proj = (
            nn.Linear(config.embedding_dim, config.head_hidden)
            if config.head_hidden != config.embedding_dim
            else nn.Identity()
        )
        self.tagging_head = TaggingHead(bert, key_width=config.embedding_dim)
        self.fc = nn.Linear(config.head_hidden, 1)
        self.freeze()

    def perceptual_features(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) in [0, 1] -> [(B, H_i·W_i, C_i)] for Swin stages 1, 2, 3."""
        return self.visual_encoder.stage_features(self.preprocess(images), self.PERCEPTUAL_STAGES)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> e = image_proj(Swin(x)): (B, 1 + L, embedding_dim)."""
        return self.image_proj(self.visual_encoder(self.preprocess(images)))

    def tag_logits(self, image_embeds: Tensor) -> Tensor:
        """(B, 1 + L, embedding_dim) -> (B, num_labels)."""
        queries = F.relu(self.wordvec_proj(self.label_embed))  # (K, hidden)
        queries = queries.unsqueeze(0).expand(image_embeds.shape[0], -1, -1)
        return self.fc(self.tagging_head(queries, image_embeds)).squeeze(-1)

    def contrastive_features(self, images: Tensor) -> list[Tensor]:
        embeds = self.image_embeddings(images)
        return [embeds, self.tag_logits(embeds)]
