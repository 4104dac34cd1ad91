"""The timm model contract on the ELSA models, checked directly: factory device/dtype, torch.fx feature extraction,
features_only, forward_intermediates / pruning, heads and pooling, channels_last. (timm's own test_models.py runs
on them in test_timm_contract.py.)"""
import copy

import pytest
import timm
import torch
from timm.models import create_feature_extractor

import elsa.models  # noqa: F401  (registers the models)
from elsa.layers import ELSA
from elsa.models._features import FeatureGetterNet

VOLO_SIZE = 32  # the smallest input VOLO takes; ELSA runs on its 4x4 stage-1 map


def _pico(**kwargs):
    return timm.create_model("elsa_swin_pico", **kwargs)


def _volo(**kwargs):
    return timm.create_model("elsa_volo_d1_224", img_size=VOLO_SIZE, **kwargs)


def _tensors(model):
    return [*model.named_parameters(), *model.named_buffers()]


# --- item 3: timm.create_model(device=, dtype=) ---------------------------------------------------------------

@pytest.mark.parametrize("make,size", [(_pico, 32), (_volo, VOLO_SIZE)])
def test_bfloat16_model_has_only_bfloat16_parameters_and_runs(make, size):
    torch.manual_seed(0)
    model = make(dtype=torch.bfloat16).eval()
    wrong = [n for n, p in model.named_parameters() if p.dtype != torch.bfloat16]
    assert not wrong, wrong
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("make", [_pico, _volo])
def test_meta_device_places_every_tensor_on_meta(make):
    model = make(device="meta")
    misplaced = [n for n, t in _tensors(model) if t.device.type != "meta"]
    assert not misplaced, misplaced


def test_float64_model_matches_float32_with_the_same_weights():
    torch.manual_seed(0)
    m32 = _pico().eval()
    m64 = _pico(dtype=torch.float64).eval()
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    m64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in m32.state_dict().items()})
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m64(x).float(), m32(x.float()), atol=1e-4, rtol=1e-4)


def test_elsa_layer_builds_on_the_requested_device_and_dtype():
    layer = ELSA(24, 3, kernel_size=5, device="meta", dtype=torch.float16)
    assert {(p.device.type, p.dtype) for p in layer.parameters()} == {("meta", torch.float16)}


# --- item 4: torch.fx (timm's feature extraction) -------------------------------------------------------------

def test_fx_feature_extractor_on_elsa_swin_matches_eager():
    torch.manual_seed(0)
    model = _pico().eval()
    x = torch.randn(2, 3, 32, 40)
    fx = create_feature_extractor(model, return_nodes={"layers.0.blocks": "s0", "layers.1.blocks": "s1",
                                                       "head": "logits"})
    with torch.no_grad():
        out = fx(x)
        taps = model.forward_intermediates(x, indices=[0, 1], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(out["s0"], taps[0])
        torch.testing.assert_close(out["s1"], taps[1])
        torch.testing.assert_close(out["logits"], model(x))


def test_fx_feature_extractor_on_elsa_volo_trains():
    torch.manual_seed(0)
    model = _volo(num_classes=5).train()
    fx = create_feature_extractor(model, return_nodes={"network.0": "elsa_stage", "head": "logits"})
    out = fx(torch.randn(2, 3, VOLO_SIZE, VOLO_SIZE))
    assert out["elsa_stage"].shape == (2, 4, 4, 192)
    (out["logits"].sum() + out["elsa_stage"].sum()).backward()
    attn = model.network[0][0].attn
    assert attn.ghost_head.grad is not None and attn.pre_proj.weight.grad.abs().sum() > 0


# --- item 5: the rest of the contract -------------------------------------------------------------------------

def test_features_only_pico_has_its_three_stages_and_grad_checkpointing():
    torch.manual_seed(0)
    model = _pico(features_only=True)
    assert model.feature_info.channels() == [32, 64, 128] and model.feature_info.reduction() == [2, 4, 8]
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        outs = model(x)
        assert [o.shape[1:] for o in outs] == [(32, 16, 16), (64, 8, 8), (128, 4, 4)]
        sum(o.pow(2).mean() for o in outs).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0)


def test_stop_early_and_norm_apply_the_final_norm_to_the_last_stage_only():
    torch.manual_seed(0)
    model = _pico().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        final, taps = model.forward_intermediates(x, output_fmt="NHWC")
        early, early_taps = model.forward_intermediates(x, indices=[1], norm=True, stop_early=True, output_fmt="NHWC")
        torch.testing.assert_close(early_taps[0], taps[1])  # no norm: stage 1 is not the last
        torch.testing.assert_close(early, taps[1])  # the stage's own map, neither downsampled nor normalised
        normed = model.forward_intermediates(x, indices=[2], norm=True, output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(normed[0], model.norm(taps[2]))
        torch.testing.assert_close(final, model.forward_features(x))


@pytest.mark.parametrize("norm", [False, True])
def test_feature_getter_on_fewer_stages(norm):
    torch.manual_seed(0)
    ref = _pico().eval()
    model = FeatureGetterNet(copy.deepcopy(ref), out_indices=(0, 1), norm=norm).eval()  # prunes the copy
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        outs = model(x)
        taps = ref.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for o, t in zip(outs, taps):
        torch.testing.assert_close(o, t)


def test_pruning_updates_num_features_and_the_model_still_runs():
    torch.manual_seed(0)
    model = _pico().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        model.prune_intermediate_layers([1])
        assert model.num_features == model.head_hidden_size == 64 and isinstance(model.norm, torch.nn.Identity)
        assert model(x).shape == (1, 8, 8, 64)  # the head and pooling go too (timm), leaving the NHWC map
        torch.testing.assert_close(model.forward_intermediates(x, indices=[1], intermediates_only=True)[0], taps[1])


def test_in_chans():
    model = _pico(in_chans=1)
    assert model.in_chans == 1 and model(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    assert _volo(in_chans=1, device="meta").in_chans == 1


def test_reset_classifier_builds_on_the_model_device_and_dtype():
    model = _pico(dtype=torch.bfloat16).eval()
    model.reset_classifier(7)
    assert model.head.weight.dtype == torch.bfloat16 and not model.head.training
    model = _pico(device="meta")
    model.reset_classifier(3, "max")
    assert model.head.weight.device.type == "meta" and model.head.in_features == model.num_features


def test_unknown_pooling_fails_like_timm_swin():
    with pytest.raises(Exception) as timm_error:
        timm.create_model("swin_tiny_patch4_window7_224", global_pool="median", device="meta")
    with pytest.raises(Exception) as ours:
        _pico(global_pool="median", device="meta")
    assert type(ours.value) is type(timm_error.value)
    model = _pico(device="meta")
    with pytest.raises(type(timm_error.value)):
        model.reset_classifier(2, "median")


def test_catavgmax_pools_mean_and_max():
    torch.manual_seed(0)
    model = _pico(global_pool="catavgmax").eval()
    assert model.head_hidden_size == 2 * model.num_features == model.head.in_features
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)  # NHWC
        expected = torch.cat([feats.mean(dim=(1, 2)), feats.amax(dim=(1, 2))], dim=1)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), expected)
        torch.testing.assert_close(model(x), model.head(expected))


def test_channels_last_on_elsa_volo_keeps_outputs_and_the_official_ghost_layout():
    torch.manual_seed(0)
    model = _volo().eval()
    x = torch.randn(2, 3, VOLO_SIZE, VOLO_SIZE)
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5, rtol=1e-5)
    ghost = model.network[0][0].attn.ghost_head
    shape = (2, 1, 192, model.elsa_kernel, model.elsa_kernel)  # the official shape of the two ghosts
    assert ghost.shape == model.state_dict()["network.0.0.attn.ghost_head"].shape == shape
    copy = _volo().eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(copy(x), ref, atol=1e-5, rtol=1e-5)
    model.train()
    model(x).sum().backward()
    assert ghost.grad.shape == shape and ghost.grad.abs().sum() > 0


@pytest.mark.parametrize("lam,gamma", [(1, 1), (0, 1)])
def test_elsa_layer_conversions_keep_the_ghosts(lam, gamma):
    torch.manual_seed(0)
    layer = ELSA(24, 3, kernel_size=5, lam=lam, gamma=gamma)
    ghost = layer.ghost_head.detach().clone()
    x = torch.randn(2, 9, 7, 24, dtype=torch.float64)
    ref = copy.deepcopy(layer).double()(x)
    layer.to(memory_format=torch.channels_last).to(torch.float64)
    assert layer.ghost_head.shape == ghost.shape and layer.ghost_head.dtype == torch.float64
    torch.testing.assert_close(layer.ghost_head, ghost.double())
    torch.testing.assert_close(layer(x), ref)
