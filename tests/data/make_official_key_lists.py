"""Write the state-dict layout (key and shape) of the official RAM and SAM ViT-B checkpoints.

    python tests/data/make_official_key_lists.py      # rewrites the two .txt files next to this script

Outputs, one `key<TAB>shape` line per tensor (shape as comma-separated ints), in `state_dict()` order:

    ram_swin_large_14m_keys.txt   `ram_swin_large_14m.pth["model"]`: RAM(vit="swin_l", image_size=384)
    sam_vit_b_keys.txt            `sam_vit_b_01ec64.pth`: build_sam_vit_b()

The lists are derived from the official model definitions only (not from Semi-LLIE's extractors): the
functions below re-create, module by module, the parameters and persistent buffers those definitions
register, with the hyperparameters their builders pass. Line numbers cite these commits:

    RAM  github.com/xinyu1205/recognize-anything @ 7cb804a8609e9f4b1a50b7f31436d2df40bb9481
         ram/models/ram.py, ram/models/swin_transformer.py, ram/models/bert.py, ram/models/utils.py,
         ram/configs/swin/config_swinL_384.json, ram/configs/med_config.json, ram/configs/q2l_config.json,
         ram/data/ram_tag_list.txt (4585 lines)
    SAM  github.com/facebookresearch/segment-anything @ dca509fe793f601edb92606367a655c15ac00fdf
         segment_anything/build_sam.py, segment_anything/modeling/{sam,image_encoder,prompt_encoder,
         mask_decoder,transformer,common}.py

Order follows torch's `Module.state_dict`: a module's own parameters, then its own persistent buffers
(None buffers are skipped), then its submodules in registration order.

Caveats. RAM's own loader (utils.py:241-276, `load_checkpoint_swinlarge`) loads with strict=False and drops
`relative_position_index` / `attn_mask`, so that code does not pin the released file's keys exactly;
this list is what `RAM.state_dict()` saves, as the training scripts do (`model_without_ddp.state_dict()`,
pretrain.py:265-266). The tag_encoder <-> tagging_head weight tying
(ram.py:187, utils.py:21-96) and the text_decoder's decoder <-> word-embedding tying share tensors but
keep both names in a state dict. SAM's builder loads strictly (build_sam.py:106), so its list is exactly
the file's keys. All tensors are float32 but the int64 buffers `relative_position_index` and `position_ids`.

Checked when written: the state_dict() of the official classes at those commits, built on the meta device
(RAM with a stub tokenizer of 30524 tokens), has the same keys, shapes and order as these lists.
"""

from __future__ import annotations

from pathlib import Path

Entry = tuple[str, tuple[int, ...]]
HERE = Path(__file__).resolve().parent


# -- torch.nn leaf modules ---------------------------------------------------------------------------


def linear(prefix: str, in_features: int, out_features: int, bias: bool = True) -> list[Entry]:
    entries = [(f"{prefix}.weight", (out_features, in_features))]
    return entries + [(f"{prefix}.bias", (out_features,))] if bias else entries


def layer_norm(prefix: str, dim: int) -> list[Entry]:
    return [(f"{prefix}.weight", (dim,)), (f"{prefix}.bias", (dim,))]


def conv2d(prefix: str, in_ch: int, out_ch: int, kernel: int, bias: bool = True) -> list[Entry]:
    entries = [(f"{prefix}.weight", (out_ch, in_ch, kernel, kernel))]
    return entries + [(f"{prefix}.bias", (out_ch,))] if bias else entries


def conv_transpose2d(prefix: str, in_ch: int, out_ch: int, kernel: int) -> list[Entry]:
    return [(f"{prefix}.weight", (in_ch, out_ch, kernel, kernel)), (f"{prefix}.bias", (out_ch,))]


def embedding(prefix: str, num: int, dim: int) -> list[Entry]:
    return [(f"{prefix}.weight", (num, dim))]


# -- RAM: Swin-L image encoder (ram/models/swin_transformer.py) --------------------------------------

# ram/configs/swin/config_swinL_384.json; ram.py:100-114 passes patch_size=4, mlp_ratio=4., qkv_bias=True,
# ape=False (no absolute_pos_embed, swin_transformer.py:512-514), patch_norm=True.
SWIN_L_384 = {"image_res": 384, "embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)}
SWIN_WINDOW = 12
SWIN_PATCH = 4
SWIN_MLP_RATIO = 4


def swin_block(prefix: str, dim: int, resolution: int, heads: int, window: int, shift: int) -> list[Entry]:
    # SwinTransformerBlock, swin_transformer.py:185-234
    if resolution <= window:  # :195-198, a stage no larger than the window: one window, no shift
        shift, window = 0, resolution
    entries: list[Entry] = []
    if shift > 0:  # :211-232: mask (nW, ws², ws²) from window_partition (:36); else None (:231-232)
        entries.append(
            (f"{prefix}.attn_mask", ((resolution // window) ** 2, window * window, window * window))
        )
    entries += layer_norm(f"{prefix}.norm1", dim)  # :201
    # WindowAttention, :82-114: own parameter, own buffer, then qkv (:108) and proj (:110)
    entries.append((f"{prefix}.attn.relative_position_bias_table", ((2 * window - 1) ** 2, heads)))  # :92-93
    entries.append((f"{prefix}.attn.relative_position_index", (window * window, window * window)))  # :106
    entries += linear(f"{prefix}.attn.qkv", dim, 3 * dim)
    entries += linear(f"{prefix}.attn.proj", dim, dim)
    entries += layer_norm(f"{prefix}.norm2", dim)  # :207
    entries += linear(f"{prefix}.mlp.fc1", dim, dim * SWIN_MLP_RATIO)  # Mlp, :22, :208-209
    entries += linear(f"{prefix}.mlp.fc2", dim * SWIN_MLP_RATIO, dim)  # :24
    return entries


def swin_transformer(prefix: str) -> list[Entry]:
    # SwinTransformer, swin_transformer.py:487-541
    cfg = SWIN_L_384
    embed_dim = cfg["embed_dim"]
    entries = conv2d(f"{prefix}.patch_embed.proj", 3, embed_dim, SWIN_PATCH)  # PatchEmbed, :437
    entries += layer_norm(f"{prefix}.patch_embed.norm", embed_dim)  # :439 (patch_norm=True)
    resolution = cfg["image_res"] // SWIN_PATCH
    depths, heads = cfg["depths"], cfg["num_heads"]
    for i, (depth, num_heads) in enumerate(zip(depths, heads, strict=True)):  # BasicLayer per stage, :523-537
        dim, stage_resolution = embed_dim * 2**i, resolution // 2**i
        for j in range(depth):  # BasicLayer.blocks, :374-383; shift = window // 2 on odd blocks (:377)
            shift = 0 if j % 2 == 0 else SWIN_WINDOW // 2
            block = f"{prefix}.layers.{i}.blocks.{j}"
            entries += swin_block(block, dim, stage_resolution, num_heads, SWIN_WINDOW, shift)
        if i < len(depths) - 1:  # PatchMerging on all but the last stage (:535), reduction before norm
            entries += linear(
                f"{prefix}.layers.{i}.downsample.reduction", 4 * dim, 2 * dim, bias=False
            )  # :307
            entries += layer_norm(f"{prefix}.layers.{i}.downsample.norm", 4 * dim)  # :308
    entries += layer_norm(f"{prefix}.norm", embed_dim * 2 ** (len(depths) - 1))  # :539 (avgpool: no params)
    return entries


# -- RAM: BERT modules (ram/models/bert.py) ----------------------------------------------------------

# ram/configs/med_config.json (tag_encoder, text_decoder) and ram/configs/q2l_config.json (tagging_head)
MED = {"hidden": 768, "intermediate": 3072, "layers": 12, "vocab": 30524, "max_positions": 512}
Q2L = {"hidden": 768, "intermediate": 3072, "layers": 2}


def bert_attention(prefix: str, hidden: int, key_width: int) -> list[Entry]:
    # BertAttention, bert.py:298-302: self = BertSelfAttention (:160-166), output = BertSelfOutput (:287-288)
    entries = linear(f"{prefix}.self.query", hidden, hidden)
    entries += linear(f"{prefix}.self.key", key_width, hidden)  # encoder_width when cross-attention
    entries += linear(f"{prefix}.self.value", key_width, hidden)
    entries += linear(f"{prefix}.output.dense", hidden, hidden)
    return entries + layer_norm(f"{prefix}.output.LayerNorm", hidden)


def bert_layer(prefix: str, hidden: int, intermediate: int, encoder_width: int, self_attention: bool):
    # BertLayer, bert.py:376-387 (add_cross_attention is true in both json configs)
    entries = bert_attention(f"{prefix}.attention", hidden, hidden) if self_attention else []
    entries += bert_attention(f"{prefix}.crossattention", hidden, encoder_width)  # :385
    entries += linear(f"{prefix}.intermediate.dense", hidden, intermediate)  # :350
    entries += linear(f"{prefix}.output.dense", intermediate, hidden)  # :365
    return entries + layer_norm(f"{prefix}.output.LayerNorm", hidden)  # :366


def bert_embeddings(prefix: str) -> list[Entry]:
    # BertEmbeddings, bert.py:103-114: persistent buffer position_ids (1, max_position_embeddings) first
    hidden = MED["hidden"]
    return [
        (f"{prefix}.position_ids", (1, MED["max_positions"])),
        *embedding(f"{prefix}.word_embeddings", MED["vocab"], hidden),
        *embedding(f"{prefix}.position_embeddings", MED["max_positions"], hidden),
        *layer_norm(f"{prefix}.LayerNorm", hidden),
    ]


def med_bert_model(prefix: str, encoder_width: int) -> list[Entry]:
    # BertModel(add_pooling_layer=False), bert.py:656-666: embeddings, encoder.layer.{i}; no pooler
    entries = bert_embeddings(f"{prefix}.embeddings")
    for i in range(MED["layers"]):
        layer = f"{prefix}.encoder.layer.{i}"
        entries += bert_layer(layer, MED["hidden"], MED["intermediate"], encoder_width, self_attention=True)
    return entries


def text_decoder(prefix: str) -> list[Entry]:
    # BertLMHeadModel, bert.py:890-896: bert (no pooler), cls = BertOnlyMLMHead
    entries = med_bert_model(
        f"{prefix}.bert", encoder_width=768
    )  # ram.py:147-148: med_config's encoder_width
    hidden, vocab = MED["hidden"], MED["vocab"]
    head = f"{prefix}.cls.predictions"  # BertLMPredictionHead, :593-605
    entries.append((f"{head}.bias", (vocab,)))  # own parameter (:602) first
    entries += linear(f"{head}.transform.dense", hidden, hidden)  # BertPredictionHeadTransform, :579
    entries += layer_norm(f"{head}.transform.LayerNorm", hidden)  # :584
    entries += linear(f"{head}.decoder", hidden, vocab, bias=False)  # :600
    entries.append((f"{head}.decoder.bias", (vocab,)))  # :605 `self.decoder.bias = self.bias`
    return entries


def tagging_head(prefix: str) -> list[Entry]:
    # BertModel(q2l_config, add_pooling_layer=False), ram.py:161-165; RAM.del_selfattention (ram.py:207-210)
    # then deletes `embeddings` and every layer's `attention`; encoder_width = 512 (ram.py:162)
    entries: list[Entry] = []
    for i in range(Q2L["layers"]):
        layer = f"{prefix}.encoder.layer.{i}"
        entries += bert_layer(layer, Q2L["hidden"], Q2L["intermediate"], 512, self_attention=False)
    return entries


def ram_swin_large_384() -> list[Entry]:
    """`RAM(vit="swin_l", image_size=384).state_dict()` (ram.py:20-198)."""
    num_tags = 4585  # len(ram_tag_list.txt), ram.py:155,160
    vision_width = 1536  # config_swinL_384.json "vision_width"
    entries: list[Entry] = [("label_embed", (num_tags, 512))]  # ram.py:171, RAM's only own parameter
    # submodules in registration order (ram.py): visual_encoder :100, tag_encoder :143, text_decoder :148,
    # tagging_head :163, wordvec_proj :174, fc :178, (tagging_loss_function :182: no tensors), image_proj :189
    entries += swin_transformer("visual_encoder")
    entries += med_bert_model("tag_encoder", encoder_width=512)  # ram.py:141-144
    entries += text_decoder("text_decoder")
    entries += tagging_head("tagging_head")
    entries += linear("wordvec_proj", 512, Q2L["hidden"])  # q2l hidden 768 != 512, ram.py:173-174
    entries += linear("fc", Q2L["hidden"], 1)
    entries += linear("image_proj", vision_width, 512)
    return entries


# -- SAM ViT-B (segment_anything) --------------------------------------------------------------------

# build_sam.py:37-44 and _build_sam :55-101
SAM_B = {"embed_dim": 768, "depth": 12, "heads": 12, "global_attn_indexes": (2, 5, 8, 11)}
SAM_IMAGE, SAM_PATCH, SAM_WINDOW, SAM_PROMPT_DIM = 1024, 16, 14, 256


def sam_image_encoder(prefix: str) -> list[Entry]:
    # ImageEncoderViT, modeling/image_encoder.py:18-104 (use_abs_pos=True, use_rel_pos=True, mlp_ratio=4)
    dim, grid = SAM_B["embed_dim"], SAM_IMAGE // SAM_PATCH
    head_dim = dim // SAM_B["heads"]
    entries: list[Entry] = [(f"{prefix}.pos_embed", (1, grid, grid, dim))]  # :68-70, own parameter first
    entries += conv2d(f"{prefix}.patch_embed.proj", 3, dim, SAM_PATCH)  # PatchEmbed, :387-389
    for i in range(SAM_B["depth"]):  # Block, :122-164
        block = f"{prefix}.blocks.{i}"
        # window attention blocks use (14, 14), global ones the full grid (:83, :158)
        size = grid if i in SAM_B["global_attn_indexes"] else SAM_WINDOW
        entries += layer_norm(f"{block}.norm1", dim)
        # Attention, :188-222: own parameters rel_pos_h / rel_pos_w (2·size-1, head_dim), then qkv, proj
        entries += [(f"{block}.attn.rel_pos_h", (2 * size - 1, head_dim))]
        entries += [(f"{block}.attn.rel_pos_w", (2 * size - 1, head_dim))]
        entries += linear(f"{block}.attn.qkv", dim, 3 * dim)
        entries += linear(f"{block}.attn.proj", dim, dim)
        entries += layer_norm(f"{block}.norm2", dim)
        entries += linear(f"{block}.mlp.lin1", dim, 4 * dim)  # MLPBlock, common.py:21-22
        entries += linear(f"{block}.mlp.lin2", 4 * dim, dim)
    # neck, :88-104: Conv2d 1x1 (no bias), LayerNorm2d, Conv2d 3x3 (no bias), LayerNorm2d (common.py:34-35)
    entries += conv2d(f"{prefix}.neck.0", dim, SAM_PROMPT_DIM, 1, bias=False)
    entries += layer_norm(f"{prefix}.neck.1", SAM_PROMPT_DIM)
    entries += conv2d(f"{prefix}.neck.2", SAM_PROMPT_DIM, SAM_PROMPT_DIM, 3, bias=False)
    return entries + layer_norm(f"{prefix}.neck.3", SAM_PROMPT_DIM)


def sam_prompt_encoder(prefix: str) -> list[Entry]:
    # PromptEncoder, modeling/prompt_encoder.py:17-60 (embed_dim 256, mask_in_chans 16, build_sam.py:81-86)
    d, m = SAM_PROMPT_DIM, 16
    # PositionEmbeddingRandom(d // 2), :43, :176-183: persistent buffer (2, num_pos_feats)
    entries: list[Entry] = [(f"{prefix}.pe_layer.positional_encoding_gaussian_matrix", (2, d // 2))]
    for i in range(4):  # :45-47, num_point_embeddings = 4
        entries += embedding(f"{prefix}.point_embeddings.{i}", 1, d)
    entries += embedding(f"{prefix}.not_a_point_embed", 1, d)  # :48
    # mask_downscaling, :51-59: Conv, LN2d, act, Conv, LN2d, act, Conv
    entries += conv2d(f"{prefix}.mask_downscaling.0", 1, m // 4, 2)
    entries += layer_norm(f"{prefix}.mask_downscaling.1", m // 4)
    entries += conv2d(f"{prefix}.mask_downscaling.3", m // 4, m, 2)
    entries += layer_norm(f"{prefix}.mask_downscaling.4", m)
    entries += conv2d(f"{prefix}.mask_downscaling.6", m, d, 1)
    return entries + embedding(f"{prefix}.no_mask_embed", 1, d)  # :60


def two_way_attention(prefix: str, dim: int, downsample_rate: int) -> list[Entry]:
    # Attention, modeling/transformer.py:191-206
    internal = dim // downsample_rate
    entries = linear(f"{prefix}.q_proj", dim, internal)
    entries += linear(f"{prefix}.k_proj", dim, internal)
    entries += linear(f"{prefix}.v_proj", dim, internal)
    return entries + linear(f"{prefix}.out_proj", internal, dim)


def sam_mask_decoder(prefix: str) -> list[Entry]:
    # MaskDecoder, modeling/mask_decoder.py:17-70 with build_sam.py:87-98
    d, mlp_dim, depth, masks = SAM_PROMPT_DIM, 2048, 2, 3 + 1  # num_multimask_outputs + 1 (:50)
    entries: list[Entry] = []
    for i in range(depth):  # TwoWayTransformer (:45, transformer.py:17-60), TwoWayAttentionBlock (:110-147)
        layer = f"{prefix}.transformer.layers.{i}"
        entries += two_way_attention(f"{layer}.self_attn", d, 1)
        entries += layer_norm(f"{layer}.norm1", d)
        entries += two_way_attention(
            f"{layer}.cross_attn_token_to_image", d, 2
        )  # attention_downsample_rate 2
        entries += layer_norm(f"{layer}.norm2", d)
        entries += linear(f"{layer}.mlp.lin1", d, mlp_dim)  # MLPBlock
        entries += linear(f"{layer}.mlp.lin2", mlp_dim, d)
        entries += layer_norm(f"{layer}.norm3", d)
        entries += layer_norm(f"{layer}.norm4", d)
        entries += two_way_attention(f"{layer}.cross_attn_image_to_token", d, 2)
    entries += two_way_attention(f"{prefix}.transformer.final_attn_token_to_image", d, 2)  # transformer.py:57
    entries += layer_norm(f"{prefix}.transformer.norm_final_attn", d)  # :60
    entries += embedding(f"{prefix}.iou_token", 1, d)  # mask_decoder.py:49
    entries += embedding(f"{prefix}.mask_tokens", masks, d)  # :51
    # output_upscaling, :53-59: ConvT, LN2d, act, ConvT, act
    entries += conv_transpose2d(f"{prefix}.output_upscaling.0", d, d // 4, 2)
    entries += layer_norm(f"{prefix}.output_upscaling.1", d // 4)
    entries += conv_transpose2d(f"{prefix}.output_upscaling.3", d // 4, d // 8, 2)
    for i in range(masks):  # :60-65, MLP(d, d, d // 8, 3) (MLP: :155-168)
        mlp = f"{prefix}.output_hypernetworks_mlps.{i}.layers"
        entries += linear(f"{mlp}.0", d, d) + linear(f"{mlp}.1", d, d) + linear(f"{mlp}.2", d, d // 8)
    head = f"{prefix}.iou_prediction_head.layers"  # :67-69, MLP(d, 256, masks, iou_head_depth=3)
    return (
        entries
        + linear(f"{head}.0", d, 256)
        + linear(f"{head}.1", 256, 256)
        + linear(f"{head}.2", 256, masks)
    )


def sam_vit_b() -> list[Entry]:
    """`build_sam_vit_b().state_dict()`; Sam's pixel_mean / pixel_std are non-persistent (sam.py:46-47)."""
    return (
        sam_image_encoder("image_encoder")
        + sam_prompt_encoder("prompt_encoder")
        + sam_mask_decoder("mask_decoder")
    )


# -- files ---------------------------------------------------------------------------------------------

OUTPUTS = {"ram_swin_large_14m_keys.txt": ram_swin_large_384, "sam_vit_b_keys.txt": sam_vit_b}


def render(entries: list[Entry]) -> str:
    keys = [key for key, _ in entries]
    assert len(keys) == len(set(keys)), "duplicate keys"
    return "".join(f"{key}\t{','.join(map(str, shape))}\n" for key, shape in entries)


def main() -> None:
    for name, make in OUTPUTS.items():
        entries = make()
        (HERE / name).write_text(render(entries))
        print(f"{name}: {len(entries)} keys")


if __name__ == "__main__":
    main()
