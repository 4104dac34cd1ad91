"""Options of the official ELSA, ELSABlock and ELSASwin (damo-cv/ELSA ``cls/models``): positional order, the
official meaning of ``drop_rate``, ``ape``/``patch_norm``/``use_checkpoint`` and the block arguments passed through,
and the parameters the official optimizer decays. The official rules are written out here from the official source,
independently of the library's code."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from elsa import ELSA, ELSABlock
from elsa.dense.backbone import ELSASwinBackbone


# ---------------------------------------------------------------------------------------------------------------
# item 12: signatures and options


def test_elsa_positional_order_is_the_official_one():
    # official: ELSA(dim, num_heads, dim_qk, dim_v, kernel_size, stride, dilation, qkv_bias, qk_scale, attn_drop,
    #                proj_drop, group_width, groups, lam, gamma)
    layer = ELSA(32, 4, 24, 16, 5, 1, 2, True, 0.5, 0.1, 0.2, 4, 2, 0, 1)
    assert (layer.dim, layer.num_heads, layer.dim_qk, layer.dim_v, layer.kernel_size) == (32, 4, 24, 16, 5)
    assert (layer.stride, layer.dilation, layer.scale, layer.group_width) == (1, 2, 0.5, 4)
    assert layer.pre_proj.bias is not None and layer.attn[2].groups == 2
    assert (layer.attn_drop.p, layer.proj_drop.p, layer.lam, layer.gamma) == (0.1, 0.2, 0, 1)
    assert layer.post_proj.in_features == 16 and layer.post_proj.out_features == 32


def test_block_positional_order_is_the_official_one():
    # official: ELSABlock(dim, kernel_size, stride, num_heads, mlp_ratio, drop, attn_drop, drop_path, act_layer,
    #                     norm_layer, qkv_bias, qk_scale, dim_qk, dim_v, lam, gamma, dilation, group_width, groups)
    block = ELSABlock(32, 5, 1, 4, 2.0, 0.3, 0.1, 0.2, nn.GELU, nn.LayerNorm, True, 0.5, 24, 16, 0, 1, 2, 4, 2)
    a = block.attn
    assert (a.kernel_size, a.stride, a.num_heads, a.dim_qk, a.dim_v) == (5, 1, 4, 24, 16)
    assert (a.scale, a.lam, a.gamma, a.dilation, a.group_width, a.attn[2].groups) == (0.5, 0, 1, 2, 4, 2)
    assert a.pre_proj.bias is not None and a.attn_drop.p == 0.1
    assert block.mlp.fc1.out_features == 64 and block.drop_path.drop_prob == 0.2
    # the official block's dropout sits in the MLP only, never on the ELSA output projection
    assert block.mlp.drop1.p == block.mlp.drop2.p == 0.3 and a.proj_drop.p == 0.0
    # official defaults: one head, MLP ratio 3, qk_scale 1, lam = gamma = 1
    default = ELSABlock(24)
    assert (default.attn.num_heads, default.attn.kernel_size, default.attn.scale) == (1, 5, 1.0)
    assert default.mlp.fc1.out_features == 72 and (default.attn.lam, default.attn.gamma) == (1, 1)


def test_official_stage_keywords_are_accepted_and_others_refused():
    # the official Swin stage hands window_size/shift_size (and input_resolution) to every block
    ELSABlock(16, kernel_size=3, num_heads=2, group_width=4, window_size=7, shift_size=3, input_resolution=(8, 8))
    ELSA(16, 2, kernel_size=3, group_width=4, window_size=7)
    with pytest.raises(TypeError, match="kernel_sise"):
        ELSABlock(16, kernel_sise=3)
    with pytest.raises(TypeError, match="num_head"):
        ELSA(16, 2, num_head=2)
    with pytest.raises(ValueError, match="stride must be 1"):
        ELSABlock(16, 3, 2, 2)


def _official_elsa_cpu(layer: ELSA, x: torch.Tensor, attn_drop: float = 0.0) -> torch.Tensor:
    """The official ELSA.forward with its CPU ``elsa_op`` branch (F.unfold), for stride 1; ``attn_drop``: its
    ``self.attn_drop`` in training mode, on the softmaxed (B*G, K*K, H, W) attention."""
    b, h, w, _ = x.shape
    c, ks, g = layer.dim_v, layer.kernel_size, layer.num_heads
    q, k, v = torch.split(layer.pre_proj(x.permute(0, 3, 1, 2)), (layer.dim_qk, layer.dim_qk, c), dim=1)
    h_attn = layer.attn(q * k * layer.scale)
    v = v.reshape(b * g, c // g, h, w)
    h_attn = F.dropout(h_attn.reshape(b * g, -1, h, w).softmax(1), attn_drop, training=attn_drop > 0)
    gh = layer.ghost_head
    if layer.lam != 0 and layer.gamma != 0:
        gh = gh.expand(2, b, c, ks, ks).reshape(2, b * g, c // g, ks, ks)
        mul, add = gh[0] ** layer.lam, gh[1] * layer.gamma
    elif layer.gamma != 0:
        mul = torch.ones(b * g, c // g, ks, ks)
        add = gh.expand(b, c, ks, ks).reshape(b * g, c // g, ks, ks) * layer.gamma
    else:
        mul = gh.expand(b, c, ks, ks).reshape(b * g, c // g, ks, ks) ** layer.lam
        add = torch.zeros(b * g, c // g, ks, ks)
    pad = ks // 2 * layer.dilation
    feats = F.unfold(v, ks, dilation=layer.dilation, padding=pad).reshape(b * g, c // g, ks * ks, h * w)
    filters = mul.reshape(b * g, c // g, ks * ks, 1) * h_attn.reshape(b * g, 1, ks * ks, h * w) \
        + add.reshape(b * g, c // g, ks * ks, 1)
    out = (feats * filters).sum(2).reshape(b, c, h, w)
    return layer.post_proj(out.permute(0, 2, 3, 1))


@pytest.mark.parametrize("dim_qk,dim_v,groups,lam,dilation", [(None, 24, 2, 1, 1), (16, 16, 1, 0, 2),
                                                              (8, 32, 4, 1, 1)])
def test_dim_qk_dim_v_groups_dilation_equal_the_official_layer(dim_qk, dim_v, groups, lam, dilation):
    torch.manual_seed(0)
    layer = ELSA(24, 4, dim_qk, dim_v, 3, dilation=dilation, qkv_bias=True, group_width=4, groups=groups,
                 lam=lam, gamma=1).eval()
    x = torch.randn(2, 9, 11, 24)
    torch.testing.assert_close(layer(x), _official_elsa_cpu(layer, x), atol=1e-5, rtol=1e-5)


def test_elsa_swin_passes_the_block_arguments_through():
    model = timm.create_model("elsa_swin_pico", dim_qk=16, dim_v=64, groups=2, dilation=2)
    for stage in model.layers[:2]:
        for block in stage.blocks:
            a = block.attn
            assert (a.dim_qk, a.dim_v, a.attn[2].groups, a.dilation) == (16, 64, 2, 2)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_patch_norm_and_use_checkpoint():
    plain = timm.create_model("elsa_swin_pico", patch_norm=False)
    assert not any(k.startswith("patch_embed.norm") for k in plain.state_dict())
    assert any(k.startswith("patch_embed.norm") for k in timm.create_model("elsa_swin_pico").state_dict())
    torch.manual_seed(0)
    ckpt = timm.create_model("elsa_swin_pico", use_checkpoint=True)
    assert ckpt.grad_checkpointing and all(s.grad_checkpointing for s in ckpt.layers)
    ref = timm.create_model("elsa_swin_pico")
    ref.load_state_dict(ckpt.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ckpt.train(), ref.train()
    torch.testing.assert_close(ckpt(x), ref(x))


def test_ape_is_the_official_parameter_added_after_the_patch_embedding():
    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_tiny", ape=True, num_classes=0)
    pos = model.absolute_pos_embed
    assert tuple(pos.shape) == (1, 56 * 56, 96)  # official: (1, num_patches, embed_dim), trunc_normal std .02
    assert 0.015 < pos.std() < 0.025 and pos.abs().max() <= 2.0
    small = timm.create_model("elsa_swin_pico", ape=True).eval()
    x = torch.randn(2, 3, 32, 32)
    # at the model's own size: x + pos, as the official forward_features
    expected = small.patch_embed(x) + small.absolute_pos_embed.reshape(1, 16, 16, -1)
    torch.testing.assert_close(small._embed(x), expected)
    # at another size the table is resized bicubically (the official detection backbone's rule)
    x = torch.randn(1, 3, 40, 24)
    table = small.absolute_pos_embed.transpose(1, 2).reshape(1, -1, 16, 16)
    resized = F.interpolate(table, size=(20, 12), mode="bicubic")
    torch.testing.assert_close(small._embed(x), small.patch_embed(x) + resized.permute(0, 2, 3, 1))
    assert small(x).shape == (1, 10)


def test_backbone_ape_layout_and_classifier_weights(tmp_path):
    cls = timm.create_model("elsa_swin_pico", ape=True)
    backbone = ELSASwinBackbone.from_name("elsa_swin_pico", ape=True, out_indices=(0, 1, 2))
    # the official detection backbone keeps the table as (1, C, Wh, Ww) and interpolates it to each input
    assert tuple(backbone.absolute_pos_embed.shape) == (1, 32, 16, 16)
    torch.save({"state_dict": cls.state_dict()}, tmp_path / "cls.pth")
    backbone.load_pretrained(tmp_path / "cls.pth")
    table = cls.absolute_pos_embed.detach().transpose(1, 2).reshape(1, 32, 16, 16)
    torch.testing.assert_close(backbone.absolute_pos_embed.detach(), table)
    backbone.eval()
    x = torch.randn(1, 3, 44, 36)
    wh, ww = math.ceil(44 / 2), math.ceil(36 / 2)
    expected = backbone.patch_embed(x) + F.interpolate(table, size=(wh, ww), mode="bicubic").permute(0, 2, 3, 1)
    torch.testing.assert_close(backbone._embed(x), expected)
    assert [o.shape[-2:] for o in backbone(x)] == [(22, 18), (11, 9), (6, 5)]
    frozen = ELSASwinBackbone.from_name("elsa_swin_pico", ape=True, out_indices=(0, 1, 2), frozen_stages=1)
    assert not frozen.absolute_pos_embed.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# item 11: what drop_rate drops


def _official_dropout_sites(depths, p_drop, p_attn):
    """The official ELSASwin(drop_rate=p_drop, attn_drop_rate=p_attn) dropout sites (module path -> p): pos_drop;
    in every block the MLP's dropout (timm 0.4's Mlp: one module used after the activation and after fc2); in the
    window stage (the last) the attention's proj_drop and attn_drop; in the ELSA stages ELSA's attn_drop, while
    ELSABlock never passes ``drop`` to ELSA (its proj_drop stays 0). No dropout before the head."""
    sites = {"pos_drop": p_drop}
    last = len(depths) - 1
    for i, depth in enumerate(depths):
        for j in range(depth):
            sites[f"layers.{i}.blocks.{j}.mlp.drop"] = p_drop
            sites[f"layers.{i}.blocks.{j}.attn.attn_drop"] = p_attn
            if i == last:
                sites[f"layers.{i}.blocks.{j}.attn.proj_drop"] = p_drop
    return {k: v for k, v in sites.items() if v > 0}


def _our_dropout_sites(model):
    sites = {}
    for name, m in model.named_modules():
        p = m.p if isinstance(m, nn.Dropout) else None
        if p is None and isinstance(getattr(m, "attn_drop", None), float):
            p_attn = m.attn_drop  # window attention: the dropout of scaled_dot_product_attention
            if p_attn:
                sites[name + ".attn_drop"] = p_attn
            continue
        if p:
            sites[name.replace(".drop1", ".drop").replace(".drop2", ".drop")] = p
    return sites


@pytest.mark.parametrize("p_drop,p_attn", [(0.3, 0.0), (0.25, 0.1)])
def test_drop_rate_has_the_official_meaning(p_drop, p_attn):
    model = timm.create_model("elsa_swin_pico", drop_rate=p_drop, attn_drop_rate=p_attn)
    assert _our_dropout_sites(model) == _official_dropout_sites((2, 2, 2), p_drop, p_attn)
    assert model.head_drop.p == 0.0
    tiny = timm.create_model("elsa_swin_tiny", drop_rate=p_drop, attn_drop_rate=p_attn, num_classes=0)
    assert _our_dropout_sites(tiny) == _official_dropout_sites((2, 2, 6, 2), p_drop, p_attn)


def test_head_dropout_is_a_separate_option():
    model = timm.create_model("elsa_swin_pico", head_drop_rate=0.4)
    assert model.head_drop.p == 0.4 and _our_dropout_sites(model) == {"head_drop": 0.4}


def test_elsa_projection_is_never_dropped_in_training():
    """With drop_rate the ELSA branch of an ELSA block is deterministic in training (no dropout on its
    projection), the MLP branch is not."""
    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_pico", drop_rate=0.5).train()
    block = model.layers[0].blocks[0]
    x = torch.randn(2, 8, 8, 32)
    y = block.norm1(x)
    torch.testing.assert_close(block.attn(y), block.attn(y))
    assert not torch.allclose(block.mlp(y), block.mlp(y))


def test_block_in_training_equals_the_official_block_with_the_same_random_stream():
    """The official ELSABlock.forward in training (drop_path 0): x + ELSA(norm1(x)) with attention dropout and no
    projection dropout, then x + Mlp(norm2(x)) with timm 0.4's Mlp (fc1, act, drop, fc2, drop). Same seed, same
    dropout masks: the outputs agree, so our dropouts sit where the official ones do and draw in the same order."""
    torch.manual_seed(0)
    block = ELSABlock(16, 3, 1, 2, 2.0, 0.3, 0.2, 0.0, group_width=4, qkv_bias=True).train()
    x = torch.randn(2, 7, 9, 16)

    def official(x):
        x = x + _official_elsa_cpu(block.attn, block.norm1(x), attn_drop=0.2)
        m = block.mlp
        y = F.dropout(m.act(m.fc1(block.norm2(x))), 0.3, training=True)
        return x + F.dropout(m.fc2(y), 0.3, training=True)

    torch.manual_seed(5)
    ours = block(x)
    torch.manual_seed(5)
    torch.testing.assert_close(ours, official(x), atol=1e-5, rtol=1e-5)
    torch.manual_seed(6)
    assert not torch.allclose(ours, block(x))  # the dropouts are active


# ---------------------------------------------------------------------------------------------------------------
# item 9: the decayed parameters


def _official_decay_split(model):
    """timm 0.4.9 ``create_optimizer`` -> ``add_weight_decay(model, wd, skip=model.no_weight_decay())`` with the
    official ``no_weight_decay() == {'absolute_pos_embed'}``: a parameter is not decayed when it is 1-d, a bias, or
    named exactly in that set (the official ``no_weight_decay_keywords`` is never read by timm 0.4)."""
    skip = {"absolute_pos_embed"}
    decay, no_decay = set(), set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip:
            no_decay.add(name)
        else:
            decay.add(name)
    return decay, no_decay


@pytest.mark.parametrize("variant,kwargs", [("elsa_swin_tiny", {}), ("elsa_swin_pico", {"ape": True})])
def test_decay_sets_equal_the_official_run(variant, kwargs):
    from timm.optim import create_optimizer_v2  # what `elsa train` builds its optimizer with

    model = timm.create_model(variant, **kwargs)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert (decay, no_decay) == _official_decay_split(model)
    assert any(n.endswith("attn.rb") for n in decay) and any(n.endswith("ghost_head") for n in decay)
    assert ("absolute_pos_embed" in no_decay) == bool(kwargs.get("ape"))
