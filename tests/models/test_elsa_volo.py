"""ELSA-VOLO: registry-driven checks for every variant, the model contract on D1, loading VOLO weights."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import elsa.models  # noqa: F401  (registers the models)
from elsa.layers import ELSABlock
from elsa.models import CheckpointError
from elsa.models.elsa_volo import ELSA_VOLO_SETTINGS, ELSAVOLO, load_volo_weights

ELSA_VOLO = timm.list_models("elsa_volo_*")
SIZE = 32  # smallest input VOLO allows (a 2x2 token grid); ELSA runs on the 4x4 stage-1 map


def _meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_mirrors_timm_volo():
    assert sorted(ELSA_VOLO) == sorted(f"elsa_{n}" for n in timm.list_models("volo_*"))
    assert len(ELSA_VOLO) == 11


@pytest.mark.parametrize("name", ELSA_VOLO)
def test_every_variant_is_volo_with_elsa_stage_one(name):
    model = _meta(name)
    volo_name = name[len("elsa_"):]
    volo = _meta(volo_name)
    assert isinstance(model, ELSAVOLO)
    stage1 = model.network[0]
    assert all(isinstance(b, ELSABlock) for b in stage1) and len(stage1) == len(volo.network[0])
    assert stage1[0].attn.kernel_size == ELSA_VOLO_SETTINGS["elsa_kernel"]
    assert stage1[0].mlp.fc1.out_features == volo.network[0][0].mlp.fc1.out_features
    # every other tensor is VOLO's, with VOLO's name and shape
    ours = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("network.0.")}
    theirs = {k: v.shape for k, v in volo.state_dict().items() if not k.startswith("network.0.")}
    assert ours == theirs
    assert 1.0 < _count(model) / _count(volo) < 1.03
    cfg, volo_cfg = model.pretrained_cfg, volo.pretrained_cfg
    assert cfg["input_size"] == volo_cfg["input_size"] and cfg["crop_pct"] == volo_cfg["crop_pct"]


@pytest.fixture(scope="module")
def d1():
    torch.manual_seed(0)
    return timm.create_model("elsa_volo_d1_224", img_size=SIZE, num_classes=5)


def test_d1_forward_backward_every_parameter_gets_a_gradient(d1):
    d1.train()
    x = torch.randn(2, 3, SIZE, SIZE)
    out = d1(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in d1.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert d1.network[0][0].attn.ghost_head.grad.abs().sum() > 0
    d1.zero_grad(set_to_none=True)


def test_d1_token_labeling_outputs(d1):
    x = torch.randn(2, 3, SIZE, SIZE)
    d1.train()
    logits, aux, bbox = d1.forward_train(x)
    assert logits.shape == (2, 5) and aux.shape == (2, 4, 5) and bbox == (0, 0, 0, 0)
    d1.mix_token, d1.beta = True, 1.0
    try:
        torch.manual_seed(3)
        logits, aux, bbox = d1.forward_train(x)
        assert aux.shape == (2, 4, 5) and len(bbox) == 4 and all(0 <= c <= 2 for c in bbox)
    finally:
        d1.mix_token = False
    d1.eval()
    with torch.no_grad():
        # eval: class logits plus half the strongest token logit per class (token labeling's inference rule)
        feats = d1.forward_features(x)
        expected = d1.head(feats[:, 0]) + 0.5 * d1.aux_head(feats[:, 1:]).max(1)[0]
        torch.testing.assert_close(d1(x), expected)
        torch.testing.assert_close(d1.forward_train(x), expected)


def test_d1_intermediates_and_grad_checkpointing(d1):
    d1.eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        final, inter = d1.forward_intermediates(x)
        assert [tuple(t.shape) for t in inter] == [(1, 192, 4, 4), (1, 384, 2, 2), (1, 384, 2, 2), (1, 384, 2, 2)]
        assert final.shape == (1, 5, 384)  # class token + 4 tokens
        ref = d1(x)
        d1.set_grad_checkpointing(True)
        try:
            torch.testing.assert_close(d1(x), ref)
        finally:
            d1.set_grad_checkpointing(False)


def test_d1_features_only():
    model = timm.create_model("elsa_volo_d1_224", img_size=SIZE, features_only=True, out_indices=(0, 1, 3))
    feats = model(torch.randn(1, 3, SIZE, SIZE))
    assert [f.shape[1] for f in feats] == model.feature_info.channels() == [192, 384, 384]
    assert model.feature_info.reduction() == [8, 16, 16]


def test_load_volo_weights_initialises_everything_but_elsa_attention(tmp_path, d1):
    torch.manual_seed(1)
    volo = timm.create_model("volo_d1_224", img_size=64, num_classes=5)  # other resolution: pos_embed resampled
    path = tmp_path / "volo.safetensors"
    save_file({k: v.contiguous() for k, v in volo.state_dict().items()}, str(path))
    report = load_volo_weights(d1, path)
    assert report.resampled == ["pos_embed"]
    assert report.new and all(k.startswith("network.0.") and ".attn." in k for k in report.new)
    assert all(k.startswith("network.0.") and ".attn." in k for k in report.unused)
    own = d1.state_dict()
    for k in ("patch_embed.conv.0.weight", "network.2.0.attn.qkv.weight", "head.weight",
              "network.0.3.mlp.fc2.weight", "post_network.1.mlp.fc1.bias"):
        assert k in report.loaded
        torch.testing.assert_close(own[k], volo.state_dict()[k])

    # a training checkpoint (.pth, weights under "state_dict", DDP prefix) with another class count
    ckpt = {"state_dict": {"module." + k: v for k, v in volo.state_dict().items()}, "epoch": 3}
    ckpt["state_dict"]["module.head.weight"] = torch.zeros(7, 384)
    torch.save(ckpt, tmp_path / "volo.pth")
    report = load_volo_weights(d1, tmp_path / "volo.pth")
    assert "head.weight" in report.new and "module.head.weight" not in report.unused


def test_load_volo_weights_rejects_other_variants_and_bad_files(tmp_path, d1):
    state = {k: v.clone() for k, v in d1.state_dict().items() if not k.startswith("network.0.")}
    state["network.2.0.attn.qkv.weight"] = torch.zeros(3 * 512, 512)  # a D2/D3-width tensor
    with pytest.raises(CheckpointError, match="network.2.0.attn.qkv.weight"):
        load_volo_weights(d1, state)
    with pytest.raises(CheckpointError, match="no tensor"):
        load_volo_weights(d1, {"foo": torch.zeros(2)})
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_volo_weights(d1, bad)


def test_fine_tune_start_resamples_pos_embed_through_timm_pretrained_loading(tmp_path, d1):
    # the recipes' --pretrained-path route: a checkpoint trained at one size loads into the model at another
    path = tmp_path / "d1_32.pth"
    torch.save({"state_dict": d1.state_dict(), "epoch": 1}, path)
    bigger = timm.create_model("elsa_volo_d1_224", img_size=64, num_classes=5, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert bigger.pos_embed.shape[1:3] == (4, 4)
    torch.testing.assert_close(bigger.network[0][1].attn.ghost_head, d1.network[0][1].attn.ghost_head)


def test_volo_recipes_load_and_name_registered_models():
    from elsa.train.config import TrainConfig, list_recipes, load_recipe

    recipes = [r for r in list_recipes() if r.startswith("elsa_volo_")]
    assert {f"elsa_volo_d{i}_in1k" for i in range(1, 6)} <= set(recipes)
    for name in recipes:
        values = load_recipe(name)
        cfg = TrainConfig(**values)
        assert timm.is_model(cfg.model) and cfg.opt == "adamw" and cfg.drop_path is not None
        assert cfg.img_size == timm.get_pretrained_cfg(cfg.model).input_size[-1]
