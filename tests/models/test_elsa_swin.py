"""ELSA-Swin: official layout and parity, the timm model contract, any input size."""
import pytest
import timm
import torch

import elsa  # noqa: F401  (registers the models)
from elsa.models.elsa_swin import MODEL_ARGS

from .spec_forward import relative_index, spec_forward

OFFICIAL_VARIANTS = ["elsa_swin_tiny", "elsa_swin_small", "elsa_swin_base"]


def official_keys(embed=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), gw=4, classes=1000):
    """Every key and shape of an official checkpoint, as listed in the spec (section 3)."""
    import math

    keys = {"patch_embed.proj.weight": (embed, 3, 4, 4), "patch_embed.proj.bias": (embed,),
            "patch_embed.norm.weight": (embed,), "patch_embed.norm.bias": (embed,)}
    for i, (depth, g) in enumerate(zip(depths, heads)):
        c = embed * 2 ** i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            for n in ("norm1", "norm2"):
                keys[p + n + ".weight"] = keys[p + n + ".bias"] = (c,)
            keys.update({p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                         p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,),
                         p + "attn.post_proj.weight": (c, c), p + "attn.post_proj.bias": (c,)})
            if i < 3:
                dqk = math.ceil((c // 3 * 2) / gw) * gw
                keys.update({p + "attn.ghost_head": (1, c, 7, 7),
                             p + "attn.pre_proj.weight": (2 * dqk + c, c, 1, 1), p + "attn.pre_proj.bias": (2 * dqk + c,),
                             p + "attn.attn.0.weight": (dqk, gw, 7, 7), p + "attn.attn.0.bias": (dqk,),
                             p + "attn.attn.2.weight": (49 * g, dqk, 1, 1), p + "attn.attn.2.bias": (49 * g,)})
            else:
                keys.update({p + "attn.rb": (g, 169), p + "attn.relative_id": (2401,),
                             p + "attn.pre_proj.weight": (3 * c, c), p + "attn.pre_proj.bias": (3 * c,)})
        if i < 3:
            keys.update({f"layers.{i}.downsample.reduction.weight": (2 * c, 4 * c),
                         f"layers.{i}.downsample.norm.weight": (4 * c,), f"layers.{i}.downsample.norm.bias": (4 * c,)})
    c = embed * 8
    keys.update({"norm.weight": (c,), "norm.bias": (c,), "head.weight": (classes, c), "head.bias": (classes,)})
    return keys


def meta_model(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name", OFFICIAL_VARIANTS)
def test_state_dict_is_the_official_layout(name):
    args = MODEL_ARGS[name]
    expected = official_keys(args["embed_dim"], args["depths"], args["num_heads"], args["group_width"])
    got = {k: tuple(v.shape) for k, v in meta_model(name).state_dict().items()}
    assert got == expected


@pytest.mark.parametrize("name,params", [("elsa_swin_tiny", 29.14e6), ("elsa_swin_small", 53e6), ("elsa_swin_base", 93e6)])
def test_parameter_counts(name, params):
    n = sum(p.numel() for p in meta_model(name).parameters())
    tol = 0.005e6 if name == "elsa_swin_tiny" else 0.5e6  # the spec gives T to 0.01 M, S and B to 1 M
    assert abs(n - params) <= tol, n


@pytest.mark.parametrize("name,batch", [("elsa_swin_tiny", 2), ("elsa_swin_small", 1), ("elsa_swin_base", 1)])
def test_logits_equal_the_spec_forward_at_224(name, batch):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    with torch.no_grad():  # random, non-trivial weights everywhere (norms and biases too)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = model.state_dict()
    assert torch.equal(sd["layers.3.blocks.0.attn.relative_id"], relative_index(7))
    x = torch.randn(batch, 3, 224, 224)
    args = MODEL_ARGS[name]
    with torch.no_grad():
        got = model(x)
        expected = spec_forward(sd, x, args["depths"], args["num_heads"], args["group_width"])
    assert (got - expected).abs().max() < 1e-4


def test_pretrained_cfg():
    cfg = timm.create_model("elsa_swin_tiny", pretrained=False).pretrained_cfg
    assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert "82.7" in cfg["description"] and cfg["origin_url"].startswith("https://drive.google.com/")


@pytest.mark.parametrize("name", ["elsa_swin_tiny", "elsa_swin_pico"])  # S and B differ from T only in widths/depths
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.0, in_chans=2)
    size = 32 if name == "elsa_swin_pico" else 64
    out = model(torch.randn(2, 2, size, size + 8))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_features_only_on_a_non_square_odd_input():
    model = timm.create_model("elsa_swin_tiny", features_only=True, out_indices=(0, 1, 2, 3))
    x = torch.randn(1, 3, 100, 150)  # neither square nor a multiple of 32
    feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(1, 96, 25, 38), (1, 192, 13, 19), (1, 384, 7, 10), (1, 768, 4, 5)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [96, 192, 384, 768]
    two = timm.create_model("elsa_swin_tiny", features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in two(x)] == [192, 768]


def test_forward_intermediates_agree_with_forward_features():
    model = timm.create_model("elsa_swin_pico").eval()
    x = torch.randn(2, 3, 36, 28)
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert [t.shape[-2:] for t in inter] == [(18, 14), (9, 7), (5, 4)]


@pytest.mark.parametrize("size", [(224, 224), (256, 320), (160, 96)])
def test_any_input_size(size):
    model = timm.create_model("elsa_swin_tiny", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 5)


def test_window_stage_shifts_only_when_the_map_exceeds_a_window():
    block = timm.create_model("elsa_swin_tiny").layers[3].blocks[1]
    assert block.shift_size == 3
    x = torch.randn(1, 7, 7, 768)
    block.shift_size = 0
    no_shift = block(x)
    block.shift_size = 3
    torch.testing.assert_close(block(x), no_shift)  # 7x7 fits one window: shift ignored, as the official model
    big = torch.randn(1, 14, 14, 768)
    assert not torch.allclose(block(big), (setattr(block, "shift_size", 0), block(big))[1])


def test_drop_path_rate_reaches_the_blocks():
    model = timm.create_model("elsa_swin_pico", drop_path_rate=0.3)
    rates = [b.drop_path.drop_prob for stage in model.layers for b in stage.blocks if hasattr(b.drop_path, "drop_prob")]
    assert rates[-1] == pytest.approx(0.3) and rates == sorted(rates)


def test_reset_classifier_and_head():
    model = timm.create_model("elsa_swin_pico")
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)
    x = model.forward_features(torch.randn(1, 3, 32, 32))
    assert model.forward_head(x, pre_logits=True).shape == (1, model.num_features)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_pico")
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, b in zip(reference, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(b, a)


def test_no_weight_decay_is_the_official_set():
    # the official model's no_weight_decay(); its bias tables `rb` are decayed (tests/models/test_official_options.py)
    assert timm.create_model("elsa_swin_pico").no_weight_decay() == {"absolute_pos_embed"}


def test_torch_compile_fullgraph_model():
    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_pico")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    out, out_c = model(x), compiled(x)
    torch.testing.assert_close(out_c, out)
    g_eager = torch.autograd.grad(out.sum(), list(model.parameters()))
    g_comp = torch.autograd.grad(out_c.sum(), list(model.parameters()))
    for a, b in zip(g_eager, g_comp):
        torch.testing.assert_close(b, a)
