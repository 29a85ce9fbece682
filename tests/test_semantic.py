"""Frozen semantic extractors: architecture, differentiability, official-checkpoint loading (tiny models)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT

from semi_llie.errors import ConfigError, UserError
from semi_llie.semantic import (
    RAM_LARGE,
    RAM_TINY,
    SAM_TINY,
    SAM_VIT_B,
    RAMExtractor,
    SAMExtractor,
    build_semantic,
    load_ram_checkpoint,
    load_sam_checkpoint,
)
from semi_llie.semantic.ram_checkpoint import interpolate_relative_position_table
from semi_llie.semantic.swin import SwinTransformer

torch.set_num_threads(1)


def official_ram_checkpoint(model: RAMExtractor) -> dict:
    """A checkpoint as the public RAM code writes it: derived buffers included, plus unused modules."""
    state = dict(model.state_dict())
    for name, module in model.visual_encoder.named_modules():
        for buffer in ("relative_position_index", "attn_mask"):
            value = getattr(module, buffer, None)
            if value is not None:
                state[f"visual_encoder.{name}.{buffer}"] = value
    state["tag_encoder.encoder.layer.0.attention.self.query.weight"] = torch.zeros(4, 4)
    state["text_decoder.cls.predictions.bias"] = torch.zeros(4)
    return {"model": state}


def test_swin_matches_timm_on_the_same_weights():
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    geometry = {"embed_dim": 8, "depths": (2, 2, 2, 2), "num_heads": (1, 1, 2, 2), "window_size": 4}
    reference = timm_swin.SwinTransformer(img_size=64, num_classes=0, **geometry).eval()
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = SwinTransformer(img_size=64, **geometry).eval()
    state = {}
    for key, value in reference.state_dict().items():
        if "relative_position_index" in key or "attn_mask" in key:
            continue
        if ".downsample." in key:  # timm merges at the start of the next stage, RAM at the end of this one
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        state[key] = value
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    expected = reference.forward_features(x).flatten(1, 2)  # (B, L, C)
    got = ours(x)
    torch.testing.assert_close(got[:, 1:], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[:, 0], expected.mean(dim=1), rtol=1e-4, atol=1e-5)


def test_ram_outputs_and_frozen_but_differentiable():
    ram = build_semantic({"type": "RAM", "size": "tiny"})
    ram.train()  # a parent's .train() must not unfreeze it
    assert not ram.training and not any(p.requires_grad for p in ram.parameters())
    x = torch.rand(2, 3, 40, 40, requires_grad=True)  # resized to the 64 px input inside
    stages = ram.perceptual_features(x)
    assert [tuple(s.shape) for s in stages] == [(2, 256, 8), (2, 64, 16), (2, 16, 32)]
    embeds, logits = ram.contrastive_features(x)
    assert embeds.shape == (2, 1 + 4, RAM_TINY.embedding_dim) and logits.shape == (2, RAM_TINY.num_labels)
    (sum(s.square().mean() for s in stages) + embeds.mean() + logits.mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_large_ram_geometry_is_the_papers():
    assert RAM_LARGE.vision_width == 1536 and RAM_LARGE.num_labels == 4585
    assert RAM_LARGE.stage_resolutions() == [96, 48, 24, 12]  # 12 x 12 = 144 tokens + the average token = 145


def test_gradient_checkpointing_gives_the_same_input_gradient():
    torch.manual_seed(0)
    plain = RAMExtractor(RAM_TINY)
    checkpointed = RAMExtractor(RAM_TINY, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, checkpointed):
        x = torch.linspace(0, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64).requires_grad_()
        embeds, logits = model.contrastive_features(x)
        (embeds.square().mean() + logits.mean()).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("legacy_head_name", [False, True])
def test_ram_loader_maps_official_key_names(tmp_path, legacy_head_name):
    torch.manual_seed(0)
    source = RAMExtractor(RAM_TINY)
    checkpoint = official_ram_checkpoint(source)
    if legacy_head_name:
        state = checkpoint["model"]
        for key in [k for k in state if k.startswith("tagging_head.")]:
            state[key.replace("tagging_head.", "vision_multi.", 1)] = state.pop(key)
    path = tmp_path / "ram_swin_large_14m.pth"
    torch.save(checkpoint, path)

    torch.manual_seed(1)
    target = build_semantic({"type": "RAM", "size": "tiny"})
    report = load_ram_checkpoint(target, path)
    assert report.loaded == len(source.state_dict()) and report.skipped == 2 and report.interpolated == []
    x = torch.rand(1, 3, 64, 64)
    for got, expected in zip(target.contrastive_features(x), source.contrastive_features(x), strict=True):
        torch.testing.assert_close(got, expected)


def test_ram_loader_names_a_missing_encoder_block(tmp_path):
    state = official_ram_checkpoint(RAMExtractor(RAM_TINY))["model"]
    removed = sorted(
        k for k in state if k.startswith("visual_encoder.layers.2.blocks.1.") and "attn_mask" not in k
    )
    for key in removed:
        del state[key]
    state["visual_encoder.layers.2.blocks.2.norm1.weight"] = torch.ones(32)  # a block the model doesn't have
    with pytest.raises(UserError) as error:
        load_ram_checkpoint(RAMExtractor(RAM_TINY), state)
    message = str(error.value)
    assert all(key in message for key in removed if "relative_position_index" not in key)
    assert "visual_encoder.layers.2.blocks.2.norm1.weight" in message


def test_ram_loader_interpolates_relative_position_tables_to_another_window():
    source = RAMExtractor(RAM_TINY)  # window 4
    target = RAMExtractor(dataclasses.replace(RAM_TINY, window_size=8))
    report = load_ram_checkpoint(target, official_ram_checkpoint(source)["model"])
    # stages at 16 and 8 px change window (4 -> 8); the 4 and 2 px stages attend globally in both
    assert sorted({key.split(".blocks")[0] for key in report.interpolated}) == [
        "visual_encoder.layers.0",
        "visual_encoder.layers.1",
    ]
    table = target.visual_encoder.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == ((2 * 8 - 1) ** 2, 1)
    embeds, logits = target.contrastive_features(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(embeds).all() and torch.isfinite(logits).all()


def test_relative_position_interpolation_keeps_the_grid():
    table = torch.randn(7 * 7, 3)
    torch.testing.assert_close(interpolate_relative_position_table(table, window=4), table)  # same size
    constant = torch.full((7 * 7, 2), 0.5)
    torch.testing.assert_close(
        interpolate_relative_position_table(constant, window=8), torch.full((15 * 15, 2), 0.5)
    )
    source = table.T.reshape(3, 7, 7)
    grid = interpolate_relative_position_table(table, window=8).T.reshape(3, 15, 15)
    # zero offset and the extreme offsets keep their values; the rest is stretched between them
    torch.testing.assert_close(grid[:, 7, 7], source[:, 3, 3])
    torch.testing.assert_close(
        grid[:, [0, 0, -1, -1], [0, -1, 0, -1]], source[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    )


def test_build_semantic_refuses_random_large_weights_and_bad_geometry():
    with pytest.raises(ConfigError, match="random"):
        build_semantic({"type": "RAM", "size": "large"})
    with pytest.raises(ConfigError, match="random"):
        build_semantic({"type": "SAM"})
    with pytest.raises(ConfigError, match="window"):
        build_semantic({"type": "RAM", "size": "large", "input_size": 288, "allow_random_weights": True})
    with pytest.raises(ConfigError, match="chekpoint"):
        build_semantic({"type": "RAM", "chekpoint": "x.pth"})
    with pytest.raises(UserError, match="does not exist"):
        build_semantic({"type": "RAM", "size": "tiny", "checkpoint": "/nonexistent/ram.pth"})


def sam_checkpoint_state(encoder: ImageEncoderViT) -> dict:
    """A state dict in segment_anything's `Sam` layout: encoder under image_encoder., plus other modules."""
    state = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.zeros(2, 8)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 8)
    return state


def test_sam_tiny_loads_official_layout_and_is_differentiable(tmp_path):
    torch.manual_seed(0)
    reference = SAMExtractor(SAM_TINY)
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.1)  # SAM zero-inits rel_pos: make every tensor matter
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sam_checkpoint_state(reference.image_encoder), path)

    sam = build_semantic({"type": "SAM", "size": "tiny", "checkpoint": str(path)})
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    (features,) = sam.contrastive_features(x)
    assert features.shape == (2, SAM_TINY.out_chans, 4, 4)
    torch.testing.assert_close(features, reference.image_encoder(sam.preprocess(x)))
    features.square().mean().backward()
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in sam.parameters())


def test_sam_loader_resizes_to_another_input_size_and_names_missing_keys():
    state = sam_checkpoint_state(SAMExtractor(SAM_TINY).image_encoder)
    larger = SAMExtractor(dataclasses.replace(SAM_TINY, image_size=96))
    assert load_sam_checkpoint(larger, state) == len(larger.state_dict())
    assert larger.image_encoder.pos_embed.shape[1:3] == (6, 6)
    del state["image_encoder.blocks.1.attn.qkv.weight"]
    with pytest.raises(UserError, match=r"image_encoder\.blocks\.1\.attn\.qkv\.weight"):
        load_sam_checkpoint(SAMExtractor(SAM_TINY), state)


# -- the official checkpoints' layouts (tests/data/*_keys.txt, from the official model definitions) ----

DATA = Path(__file__).parent / "data"
RAM_KEYS = DATA / "ram_swin_large_14m_keys.txt"
SAM_KEYS = DATA / "sam_vit_b_keys.txt"
# int64 in the official code (Swin's relative-position index, BERT's position ids); the rest is float32
INTEGER_BUFFERS = ("relative_position_index", "position_ids")


def official_key_list_generator():
    spec = importlib.util.spec_from_file_location(
        "make_official_key_lists", DATA / "make_official_key_lists.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_key_list(path: Path) -> dict[str, tuple[int, ...]]:
    rows = (line.split("\t") for line in path.read_text().splitlines())
    return {key: tuple(int(n) for n in shape.split(",")) for key, shape in rows}


def zeros_in_layout(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Zero tensors of the listed shapes and dtypes, all views of one storage per dtype.

    torch.save writes a shared storage once, so the 2 GB RAM layout costs ~100 MB in memory and on disk.
    """
    dtypes = {key: torch.int64 if key.endswith(INTEGER_BUFFERS) else torch.float32 for key in shapes}
    pools = {
        dtype: torch.zeros(max(math.prod(shapes[key]) for key in shapes if dtypes[key] == dtype), dtype=dtype)
        for dtype in set(dtypes.values())
    }
    return {key: pools[dtypes[key]][: math.prod(shape)].view(shape) for key, shape in shapes.items()}


def poison(model: torch.nn.Module) -> None:
    """NaN (or -1) in every saved tensor, so a tensor the loader does not overwrite with zeros shows."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(float("nan") if tensor.is_floating_point() else -1)


def test_official_key_lists_are_what_their_generator_writes():
    generator = official_key_list_generator()
    for name, make in generator.OUTPUTS.items():
        assert (DATA / name).read_text() == generator.render(make()), f"regenerate tests/data/{name}"
    ram, sam = read_key_list(RAM_KEYS), read_key_list(SAM_KEYS)
    assert len(ram) == 1042 and len(sam) == 314
    assert ram["visual_encoder.layers.2.blocks.17.attn_mask"] == (4, 144, 144)  # 24² stage, 12² windows
    assert "visual_encoder.layers.3.blocks.1.attn_mask" not in ram  # 12² stage: one window, no shift
    assert ram["tagging_head.encoder.layer.1.crossattention.self.key.weight"] == (768, 512)
    assert sam["image_encoder.blocks.2.attn.rel_pos_h"] == (127, 64)  # a global-attention block


@pytest.mark.slow
def test_official_ram_swin_large_layout_loads_into_the_large_extractor(tmp_path):
    shapes = read_key_list(RAM_KEYS)
    path = tmp_path / "ram_swin_large_14m.pth"
    torch.save({"model": zeros_in_layout(shapes)}, path)
    ram = RAMExtractor(RAM_LARGE)
    poison(ram)

    report = load_ram_checkpoint(ram, path)  # raises on any missing / unexpected key or shape mismatch

    loaded = ram.state_dict()
    derived = [key for key in shapes if key.endswith(("relative_position_index", "attn_mask"))]
    captioning = [key for key in shapes if key.startswith(("tag_encoder.", "text_decoder."))]
    assert len(derived) == 24 + 11 and len(captioning) == 641
    assert set(loaded) == set(shapes) - set(derived) - set(captioning)
    assert report.loaded == len(loaded) and report.skipped == len(captioning) and report.interpolated == []
    assert all(tuple(loaded[key].shape) == shapes[key] for key in loaded)
    not_loaded = [key for key, tensor in loaded.items() if not tensor.eq(0).all()]
    assert not_loaded == []


@pytest.mark.slow
def test_official_sam_vit_b_layout_loads_into_the_encoder(tmp_path):
    shapes = read_key_list(SAM_KEYS)
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(zeros_in_layout(shapes), path)  # the official file is a flat state dict
    sam = SAMExtractor(SAM_VIT_B)
    poison(sam)

    assert load_sam_checkpoint(sam, path) == len(sam.state_dict())

    loaded = sam.state_dict()
    assert set(loaded) == {key for key in shapes if key.startswith("image_encoder.")}
    assert all(tuple(loaded[key].shape) == shapes[key] for key in loaded)
    not_loaded = [key for key, tensor in loaded.items() if not tensor.eq(0).all()]
    assert not_loaded == []
