"""UPerNet/FCN heads, the segmentor's loss, inference modes, optimizer groups and the poly/warm-up schedule."""
import pytest
import torch
import torch.nn as nn

from elsa.dense.segmentation.engine import build_optimizer, poly_warmup_factor
from elsa.dense.segmentation.heads import FCNHead, UPerHead
from elsa.dense.segmentation.recipes import RECIPES, get_recipe
from elsa.dense.segmentation.segmentor import build_segmentor
from elsa.engine.optim import param_groups
from elsa.dense.segmentation.segmentor import (predict_probs, rescale_size, seg_cross_entropy, slide_inference,
                                               whole_inference)

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), group_width=4, elsa_kernel=3,
            window_size=4, patch_size=4, drop_path_rate=0.0)


def tiny_recipe(**kw):
    return get_recipe("upernet_elsa_swin_tiny_160k").replace(
        backbone="custom", backbone_kwargs=TINY, num_classes=5, channels=16, aux_channels=8, **kw)


def test_official_head_shapes_and_mmseg_names():
    """Full-size heads as the official config (512 / 256 channels, PPM 1,2,3,6); mmseg tensor names."""
    chans = [96, 192, 384, 768]
    head = UPerHead(chans, 150)
    sd = head.state_dict()
    assert sd["bottleneck.conv.weight"].shape == (512, 768 + 4 * 512, 3, 3)
    assert sd["fpn_bottleneck.conv.weight"].shape == (512, 4 * 512, 3, 3)
    assert sd["psp_modules.3.1.conv.weight"].shape == (512, 768, 1, 1)
    assert sd["lateral_convs.2.conv.weight"].shape == (512, 384, 1, 1)
    assert sd["fpn_convs.0.conv.weight"].shape == (512, 512, 3, 3) and "fpn_convs.0.conv.bias" not in sd
    assert sd["conv_seg.weight"].shape == (150, 512, 1, 1) and "lateral_convs.0.bn.running_var" in sd
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
    aux = FCNHead(384, 150)
    assert aux.state_dict()["convs.0.conv.weight"].shape == (256, 384, 3, 3) and aux.in_index == 2
    feats = [torch.randn(1, c, 32 // 2 ** i, 40 // 2 ** i) for i, c in enumerate(chans)]
    head.eval()
    assert head(feats).shape == (1, 150, 32, 40)
    assert aux.eval()(feats).shape == (1, 150, 8, 10)


def test_recipes_follow_official_configs():
    t, s = RECIPES["upernet_elsa_swin_tiny_160k"], RECIPES["upernet_elsa_swin_small_160k"]
    for r in (t, s):
        assert (r.lr, r.betas, r.weight_decay, r.iters, r.warmup_iters, r.warmup_ratio) == \
            (6e-5, (0.9, 0.999), 0.01, 160_000, 1500, 1e-6)
        assert (r.poly_power, r.min_lr, r.batch_per_gpu, r.crop_size, r.img_scale) == \
            (1.0, 0.0, 2, (512, 512), (2048, 512))
        assert (r.channels, r.aux_channels, r.aux_weight, r.pool_scales, r.num_classes) == (512, 256, 0.4,
                                                                                           (1, 2, 3, 6), 150)
        assert r.backbone_kwargs["drop_path_rate"] == 0.3
        assert r.amp is False  # the official configs have no fp16: float32 training
    assert (t.backbone, s.backbone) == ("elsa_swin_tiny", "elsa_swin_small")
    with pytest.raises(ValueError, match="--recipe"):
        get_recipe("nope")


def test_amp_is_an_option_of_the_cli():
    import argparse

    from elsa.cli.seg import _recipe, add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    base = ["seg", "train", "--recipe", "upernet_elsa_swin_tiny_160k", "--data", "x"]
    assert _recipe(parser.parse_args(base))[0].amp is False
    assert _recipe(parser.parse_args(base + ["--amp"]))[0].amp is True


def test_loss_ignores_255_and_averages_over_all_pixels():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, :2] = 255
    loss = seg_cross_entropy(logits, target)
    per_pixel = nn.functional.cross_entropy(logits, target, ignore_index=255, reduction="none")
    assert per_pixel[0, :2].abs().sum() == 0
    assert loss == pytest.approx(per_pixel.sum().item() / target.numel(), rel=1e-6)  # mmseg 0.x mean


def test_segmentor_train_losses_and_backward():
    torch.manual_seed(0)
    model = build_segmentor(tiny_recipe())
    img, target = torch.randn(2, 3, 40, 48), torch.randint(0, 5, (2, 40, 48))
    target[:, :4] = 255
    losses = model(img, target)
    assert set(losses) == {"loss", "loss_decode", "loss_aux"}
    assert losses["loss"].item() == pytest.approx((losses["loss_decode"] + losses["loss_aux"]).item())
    losses["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad
    model.eval()
    assert model(img).shape == (2, 5, 40, 48)


class PointwiseNet(nn.Module):
    """Per-pixel linear classifier: exactly translation- and flip-equivariant."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def encode_decode(self, img):
        return self.conv(img)


def test_slide_and_ms_flip_inference():
    torch.manual_seed(0)
    # a smooth image (bilinear upsampling of 5x6 noise), so resizing barely changes it
    img = nn.functional.interpolate(torch.randn(1, 3, 5, 6), size=(37, 50), mode="bilinear", align_corners=False)
    net = PointwiseNet()
    whole = whole_inference(net, img)
    # overlapping windows (incl. the shifted-back last one) of an equivariant model reproduce whole-image logits
    slide = slide_inference(net, img, crop_size=(16, 20), stride=(11, 13))
    assert slide.shape == whole.shape == (1, 4, 37, 50)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
    # flip of a flip-equivariant model changes nothing; ratio 1 at the image's own scale means no resize
    scale = (50, 37)
    p_whole = predict_probs(net, img, img_scale=scale)
    p_flip = predict_probs(net, img, img_scale=scale, flip=True)
    torch.testing.assert_close(p_flip, p_whole, rtol=1e-5, atol=1e-6)
    p_ms = predict_probs(net, img, img_scale=scale, ratios=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True,
                         mode="slide", crop_size=(16, 16), stride=(11, 11))
    assert p_ms.shape == (1, 4, 37, 50)
    torch.testing.assert_close(p_ms.sum(1), torch.ones(1, 37, 50))
    agree = (p_ms.argmax(1) == p_whole.argmax(1)).float().mean()
    assert agree > 0.95  # resizing a smooth image changes it only a little


def test_slide_equals_whole_for_a_real_model_when_crop_covers_image():
    torch.manual_seed(0)
    model = build_segmentor(tiny_recipe()).eval()
    img = torch.randn(1, 3, 45, 61)
    whole = whole_inference(model, img)
    slide = slide_inference(model, img, crop_size=(64, 64), stride=(42, 42))
    torch.testing.assert_close(slide, whole)
    p = predict_probs(model, img, img_scale=(61, 45), mode="slide", crop_size=(64, 64), stride=(42, 42))
    torch.testing.assert_close(p, whole.softmax(1))
    # real multi-scale + flip: right shape, a distribution per pixel
    p_ms = predict_probs(model, img, img_scale=(61, 45), ratios=(0.5, 1.0, 1.5), flip=True)
    assert p_ms.shape == (1, 5, 45, 61)
    torch.testing.assert_close(p_ms.sum(1), torch.ones(1, 45, 61))
    with pytest.raises(ValueError, match="mode"):
        predict_probs(model, img, mode="tiles")


def test_rescale_size_is_mmcv_keep_ratio():
    assert rescale_size((683, 512), (2048, 512)) == (683, 512)
    assert rescale_size((375, 500), (2048, 512)) == (512, 683)     # short side to 512
    assert rescale_size((100, 3000), (2048, 512)) == (68, 2048)    # long side capped at 2048


def test_param_groups_follow_official_paramwise_cfg():
    model = build_segmentor(tiny_recipe())
    recipe = tiny_recipe()
    decay, no_decay = param_groups(model, recipe.weight_decay, recipe.no_decay_keys)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "backbone.norm0.weight" in nd and "backbone.layers.0.blocks.0.norm1.bias" in nd
    assert "backbone.patch_embed.norm.weight" in nd
    assert "decode_head.bottleneck.bn.weight" in d        # mmcv's ConvModule norm is 'bn': not matched by 'norm'
    assert "backbone.layers.3.blocks.0.attn.rb" in d      # official key 'relative_position_bias_table' misses 'rb'
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
    excluded = param_groups(model, recipe.weight_decay, recipe.no_decay_keys + (".rb",))[1]
    assert "backbone.layers.3.blocks.0.attn.rb" in {names[id(p)] for p in excluded["params"]}


def test_poly_schedule_with_linear_warmup():
    r = get_recipe("upernet_elsa_swin_tiny_160k")
    f = poly_warmup_factor(r)
    assert f(0) == pytest.approx(1e-6)
    mid = (1 - 750 / 160000) * (1 - (1 - 750 / 1500) * (1 - 1e-6))
    assert f(750) == pytest.approx(mid)
    assert f(1500) == pytest.approx(1 - 1500 / 160000)
    assert f(80000) == pytest.approx(0.5) and f(160000) == 0.0
    model = nn.Linear(2, 2)
    opt, sched = build_optimizer(model, r)
    assert opt.param_groups[0]["lr"] == pytest.approx(6e-5 * 1e-6)
    for _ in range(1500):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(6e-5 * (1 - 1500 / 160000))


def test_load_official_mmseg_style_checkpoint(tmp_path):
    """An mmseg checkpoint ({'meta', 'state_dict'} with backbone./decode_head./auxiliary_head. keys and shift-mask
    buffers) loads through the recipe; a file that does not fit is refused with the missing names."""
    from elsa.dense.segmentation.engine import load_segmentor
    from elsa.models import CheckpointError

    torch.manual_seed(0)
    recipe = tiny_recipe()
    src = build_segmentor(recipe)
    state = dict(src.state_dict())
    state["backbone.layers.3.blocks.1.attn_mask"] = torch.zeros(1, 49, 49)
    torch.save({"meta": {"iter": 160000}, "state_dict": state}, tmp_path / "official.pth")
    model, used = load_segmentor(tmp_path / "official.pth", recipe)
    assert used == recipe
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    del state["decode_head.conv_seg.weight"]
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="conv_seg"):
        load_segmentor(tmp_path / "bad.pth", recipe)
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        load_segmentor(tmp_path / "missing.pth", recipe)
