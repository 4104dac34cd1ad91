"""Mask R-CNN / Cascade Mask R-CNN construction (official settings), cascade forward/backward/eval, optimizer
groups and schedule."""

import pytest
import torch

from elsa.dense.detection import build_detector
from elsa.dense.detection.cascade import CascadeRoIHeads
from elsa.dense.detection.models import MMDetRoIHeads
from elsa.dense.detection.rpn import MMDetRPN
from elsa.dense.detection.engine import lr_factor, param_groups, schedule
from elsa.dense.recipes_det import RECIPES, get_recipe
from synthetic_coco import tiny_recipe


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch():
    masks = torch.zeros(2, 80, 96, dtype=torch.uint8)
    masks[0, 10:40, 10:30] = 1
    masks[1, 50:70, 40:90] = 1
    images = [torch.rand(3, 80, 96), torch.rand(3, 64, 72)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 30, 40], [40, 50, 90, 70]]), "labels": torch.tensor([1, 2]),
                "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),  # a negative image
                "masks": torch.zeros(0, 64, 72, dtype=torch.uint8)}]
    return images, targets


def test_official_mask_rcnn_settings():
    r = get_recipe("mask_rcnn_elsa_swin_tiny_1x", backbone_kwargs=dict(depths=(1, 1, 1, 1)))
    m = build_detector(r)
    assert m.backbone.out_channels == 256 and m.backbone.body.out_channels == [96, 192, 384, 768]
    ag = m.rpn.anchor_generator
    assert ag.sizes == ((32,), (64,), (128,), (256,), (512,)) and ag.aspect_ratios[0] == (0.5, 1.0, 2.0)
    assert ag.strides == (4, 8, 16, 32, 64)
    assert m.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert m.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert m.rpn.nms_thresh == 0.7 and m.rpn.fg_bg_sampler.batch_size_per_image == 256
    rh = m.roi_heads
    assert rh.fg_bg_sampler.batch_size_per_image == 512 and rh.fg_bg_sampler.positive_fraction == 0.25
    assert (rh.score_thresh, rh.nms_thresh, rh.detections_per_img) == (0.05, 0.5, 100)
    assert rh.box_coder.weights == (10.0, 10.0, 5.0, 5.0)  # mmdet target_stds 0.1, 0.1, 0.2, 0.2
    assert rh.box_head.fc6.out_features == 1024 and rh.box_predictor.cls_score.out_features == 81
    assert len(rh.mask_head) == 4 and rh.box_roi_pool.sampling_ratio == 0
    assert (m.transform.min_size, m.transform.max_size) == ((800,), 1333)
    assert isinstance(m.rpn, MMDetRPN) and isinstance(rh, MMDetRoIHeads)
    assert m.rpn.box_loss == "l1" and rh.box_loss == "l1"  # config: L1Loss for both
    assert (m.rpn.allowed_border, m.rpn.min_pos_iou) == (-1, 0.3)
    c = build_detector(get_recipe("cascade_mask_rcnn_elsa_swin_tiny_1x", backbone_kwargs=dict(depths=(1, 1, 1, 1))))
    assert c.rpn.box_loss == "smooth_l1"  # cascade config: SmoothL1Loss(beta=1/9)
    assert c.rpn.allowed_border == 0  # cascade config: train_cfg.rpn.allowed_border=0
    assert c.rpn._post_nms_top_n == {"training": 2000, "testing": 1000}


def test_mask_rcnn_l1_losses_match_hand_computation():
    """With the box predictor's deltas fixed to zero, the RoI box loss is sum |targets| of the positives / sampled."""
    torch.manual_seed(0)
    m = build_detector(tiny_recipe()).train()
    images, targets = _batch()
    m.roi_heads.box_predictor.bbox_pred.weight.data.zero_()
    m.roi_heads.box_predictor.bbox_pred.bias.data.zero_()
    captured = {}
    orig = m.roi_heads.select_training_samples

    def spy(proposals, targets):
        out = orig(proposals, targets)
        captured["labels"], captured["targets"] = out[2], out[3]
        return out

    m.roi_heads.select_training_samples = spy
    losses = m(images, targets)
    labels, regs = torch.cat(captured["labels"]), torch.cat(captured["targets"])
    expected = regs[labels > 0].abs().sum() / labels.numel()
    assert losses["loss_box_reg"].item() == pytest.approx(expected.item(), rel=1e-5)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in m.roi_heads.mask_head.parameters())


def test_recipes_match_official_table():
    assert len([n for n in RECIPES if "elsa_swin" in n]) == 8
    for name, r in RECIPES.items():
        if "elsa_swin" not in name:
            continue
        assert (r.lr, r.weight_decay, r.batch_size) == (1e-4, 0.05, 2)
        assert (r.epochs, r.lr_steps) == ((12, (8, 11)) if name.endswith("1x") else (36, (27, 33)))
        assert r.train_scales == tuple(range(480, 801, 32)) and r.max_size == 1333 and r.detr_crop
        assert r.backbone == ("elsa_swin_tiny" if "tiny" in name else "elsa_swin_small")
    assert RECIPES["mask_rcnn_elsa_swin_tiny_1x"].drop_path_rate == 0.1
    assert RECIPES["mask_rcnn_elsa_swin_small_1x"].drop_path_rate == 0.2
    c = RECIPES["cascade_mask_rcnn_elsa_swin_tiny_3x"]
    assert c.cascade_ious == (0.5, 0.6, 0.7) and c.cascade_stage_weights == (1.0, 0.5, 0.25)
    assert c.box_head == "4conv1fc" and c.cascade_box_loss == "giou" and c.cascade_box_loss_weight == 10.0


@pytest.mark.parametrize("arch", ["cascade_mask_rcnn_tiny_test"])
def test_cascade_forward_backward_and_eval(arch):
    torch.manual_seed(0)
    r = tiny_recipe(arch)
    m = build_detector(r)
    assert isinstance(m.roi_heads, CascadeRoIHeads) and m.roi_heads.num_stages == 3
    assert [c.weights for c in m.roi_heads.box_coders] == [
        (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067)]
    images, targets = _batch()
    m.train()
    losses = m(images, targets)
    assert {f"s{s}.{k}" for s in range(3) for k in ("loss_cls", "loss_box", "loss_mask")} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for s in range(3):  # every stage's box and mask heads learn
        for part in (m.roi_heads.box_heads[s], m.roi_heads.box_predictors[s], m.roi_heads.mask_heads[s],
                     m.roi_heads.mask_predictors[s]):
            grads = [p.grad for p in part.parameters()]
            assert all(g is not None for g in grads)
            assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is not None for p in m.backbone.body.parameters())
    m.eval()
    with torch.no_grad():
        out = m(images)
    assert len(out) == 2
    for o, im in zip(out, images):
        n = len(o["boxes"])
        assert o["scores"].shape == (n,) and o["labels"].shape == (n,)
        assert o["masks"].shape == (n, 1, *im.shape[1:])
        if n:
            assert o["labels"].min() >= 1 and o["labels"].max() <= r.num_classes
            assert (o["boxes"][:, 2] <= im.shape[2]).all() and (o["boxes"][:, 3] <= im.shape[1]).all()
            assert 0 <= o["masks"].min() and o["masks"].max() <= 1


def test_cascade_test_averages_stage_scores():
    """With stages 2 and 3 predicting 'class 1' with certainty and stage 1 'background', the averaged logits
    give class 1 a softmax probability computed from the mean of the three stages' logits."""
    torch.manual_seed(0)
    r = tiny_recipe("cascade_mask_rcnn_tiny_test", box_score_thresh=0.0)
    m = build_detector(r).eval()
    heads = m.roi_heads
    biases = [(5.0, 0.0, 0.0), (0.0, 5.0, 0.0), (0.0, 5.0, 0.0)]
    for s, b in enumerate(biases):
        heads.box_predictors[s].cls_score.weight.data.zero_()
        heads.box_predictors[s].cls_score.bias.data = torch.tensor(b)
        heads.box_predictors[s].bbox_pred.weight.data.zero_()
        heads.box_predictors[s].bbox_pred.bias.data.zero_()
    with torch.no_grad():
        out = m([torch.rand(3, 80, 96)])[0]
    mean = torch.tensor(biases).mean(0)
    expected = torch.softmax(mean, 0)
    assert out["scores"].max().item() == pytest.approx(expected[1].item(), rel=1e-5)
    assert (out["labels"][out["scores"] > expected[2] + 1e-4] == 1).all()


def test_param_groups_follow_official_paramwise_cfg():
    m = build_detector(tiny_recipe())
    groups = param_groups(m, 0.05, ("absolute_pos_embed", "relative_position_bias_table", "norm"))
    names = {id(p): n for n, p in m.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    decay = {names[id(p)] for p in groups[0]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.05
    assert all("norm" in n for n in no_decay) and any(n.endswith("norm0.weight") for n in no_decay)
    # the official names decide: biases, ELSA's ghost head and the window stage's relative table ('rb') decay
    assert any(n.endswith("attn.rb") for n in decay) and any(n.endswith("ghost_head") for n in decay)
    assert any(n.endswith(".bias") for n in decay)
    assert len(no_decay) + len(decay) == len(list(m.parameters()))


def test_lr_schedule_warmup_and_steps():
    assert lr_factor(0, [8, 11], 500, 0.001, 0.1) == pytest.approx(0.001)
    assert lr_factor(250, [8000, 11000], 500, 0.001, 0.1) == pytest.approx(1 - 0.5 * 0.999)
    assert lr_factor(500, [8000, 11000], 500, 0.001, 0.1) == 1.0
    assert lr_factor(8000, [8000, 11000], 500, 0.001, 0.1) == pytest.approx(0.1)
    assert lr_factor(11000, [8000, 11000], 500, 0.001, 0.1) == pytest.approx(0.01)
    total, steps = schedule(get_recipe("mask_rcnn_elsa_swin_tiny_3x"), iters_per_epoch=7330)
    assert total == 36 * 7330 and steps == [27 * 7330, 33 * 7330]
    total, steps = schedule(get_recipe("mask_rcnn_elsa_swin_tiny_1x", max_iters=120), iters_per_epoch=3)
    assert total == 120 and steps == [80, 110]


def test_bad_recipe_values_name_the_argument():
    with pytest.raises(ValueError, match="recipe must be one of"):
        get_recipe("nope")
    with pytest.raises(ValueError, match="unknown DetRecipe field"):
        tiny_recipe(num_clases=3)
    with pytest.raises(ValueError, match="box_head"):
        build_detector(tiny_recipe(box_head="3fc"))


def test_pretrained_classifier_loads_into_detector_backbone(tmp_path):
    """`elsa det train --pretrained CLS_CKPT` path: the classifier's weights land in the detector's backbone."""
    import timm

    import elsa.models  # noqa: F401  (registers the ELSA-Swin models)

    r = tiny_recipe()
    cls = timm.create_model(r.backbone, num_classes=5, **r.backbone_kwargs)
    path = tmp_path / "cls.pth"
    torch.save({"state_dict": cls.state_dict()}, path)
    det = build_detector(r)
    report = det.backbone.body.load_pretrained(path)
    assert not [k for k in report.missing if not k.startswith("norm")]  # only the per-stage output norms are new
    body = det.backbone.body.state_dict()
    for k, v in cls.state_dict().items():
        if k in body:
            assert torch.equal(body[k], v), k
    assert "layers.0.blocks.0.attn.ghost_head" in body


def test_roi_align_is_aligned_per_level():
    """Each RoI is pooled from its level (mmdet's rule) with aligned=True (mmcv's RoIAlign default)."""
    from collections import OrderedDict

    from torchvision.ops import roi_align

    from elsa.dense.detection.models import AlignedMultiScaleRoIAlign

    torch.manual_seed(0)
    feats = OrderedDict((str(i), torch.rand(2, 3, 256 // 2 ** (i + 2), 256 // 2 ** (i + 2))) for i in range(4))
    feats["pool"] = torch.rand(2, 3, 4, 4)
    pool = AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=0)
    small = torch.tensor([[10.0, 10, 40, 40]])  # sqrt(area) 30 < 112 -> level 0 (stride 4)
    large = torch.tensor([[0.0, 0, 200, 230]])  # sqrt(area) ~214 in [112, 224) -> level 1 (stride 8)
    out = pool(feats, [small, large], [(256, 256), (256, 256)])
    ref0 = roi_align(feats["0"], [small, large[:0]], 7, spatial_scale=1 / 4, sampling_ratio=0, aligned=True)
    ref1 = roi_align(feats["1"], [small[:0], large], 7, spatial_scale=1 / 8, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(out[0], ref0[0])
    torch.testing.assert_close(out[1], ref1[0])
    not_aligned = roi_align(feats["0"], [small, large[:0]], 7, spatial_scale=1 / 4, sampling_ratio=0)
    assert not torch.allclose(out[0], not_aligned[0])


def _mmdet_state_dict(model, arch):
    """An official-format (mmdetection 2.x names, background-last class layout) state dict with the shapes of
    ``model``, written from mmdet's module names, filled with random values."""
    g = torch.Generator().manual_seed(0)
    ours = model.state_dict()
    c = 2  # classes in the tiny recipes
    sd = {}

    def put(key, shape):
        sd[key] = torch.randn(*shape, generator=g)

    for k, v in ours.items():
        if k.startswith("backbone.body."):
            sd["backbone." + k[len("backbone.body."):]] = v.clone()
    for i in range(4):
        for kind, ours_name in (("lateral_convs", "inner_blocks"), ("fpn_convs", "layer_blocks")):
            for p in ("weight", "bias"):
                put(f"neck.{kind}.{i}.conv.{p}", ours[f"backbone.fpn.{ours_name}.{i}.0.{p}"].shape)
    for mm, tv in (("rpn_conv", "conv.0.0"), ("rpn_cls", "cls_logits"), ("rpn_reg", "bbox_pred")):
        for p in ("weight", "bias"):
            put(f"rpn_head.{mm}.{p}", ours[f"rpn.head.{tv}.{p}"].shape)
    rep, mch, fpn = 128, 32, 32
    stages = [""] if arch == "mask_rcnn" else [f"{s}." for s in range(3)]
    for st in stages:
        b, m = f"roi_head.bbox_head.{st}", f"roi_head.mask_head.{st}"
        if arch == "mask_rcnn":
            put(b + "shared_fcs.0.weight", (rep, fpn * 49)), put(b + "shared_fcs.0.bias", (rep,))
            put(b + "shared_fcs.1.weight", (rep, rep)), put(b + "shared_fcs.1.bias", (rep,))
        else:
            for i in range(4):
                put(b + f"shared_convs.{i}.conv.weight", (fpn, fpn, 3, 3))
                for p in ("weight", "bias", "running_mean", "running_var"):
                    put(b + f"shared_convs.{i}.bn.{p}", (fpn,))
                sd[b + f"shared_convs.{i}.bn.num_batches_tracked"] = torch.tensor(7)
            put(b + "shared_fcs.0.weight", (rep, fpn * 49)), put(b + "shared_fcs.0.bias", (rep,))
        put(b + "fc_cls.weight", (c + 1, rep)), put(b + "fc_cls.bias", (c + 1,))
        put(b + "fc_reg.weight", (4 * c, rep)), put(b + "fc_reg.bias", (4 * c,))
        for i in range(2):
            put(m + f"convs.{i}.conv.weight", (mch, fpn if i == 0 else mch, 3, 3))
            put(m + f"convs.{i}.conv.bias", (mch,))
        put(m + "upsample.weight", (mch, mch, 2, 2)), put(m + "upsample.bias", (mch,))
        put(m + "conv_logits.weight", (c, mch, 1, 1)), put(m + "conv_logits.bias", (c,))
    return sd


@pytest.mark.parametrize("name", ["mask_rcnn_tiny_test", "cascade_mask_rcnn_tiny_test"])
def test_official_mmdet_checkpoint_converts_and_loads(tmp_path, name):
    from elsa.dense.detection.engine import load_model_checkpoint

    r = tiny_recipe(name)
    model = build_detector(r)
    sd = _mmdet_state_dict(model, r.arch)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": sd, "meta": {"CLASSES": ("box", "disc")}}, path)
    fresh = build_detector(r)
    meta = load_model_checkpoint(fresh, path)  # raises if any parameter is left out
    assert meta["classes"] == ["box", "disc"] and meta["converted_from"] == "mmdetection"
    got = fresh.state_dict()
    if r.arch == "mask_rcnn":
        pre, cls, reg, mask, fc = ("roi_head.bbox_head.", "roi_heads.box_predictor.", "roi_heads.box_predictor.",
                                   "roi_heads.mask_predictor.", "roi_heads.box_head.fc6.weight")
        mpre = "roi_head.mask_head."
    else:
        pre, cls, reg, mask, fc = ("roi_head.bbox_head.2.", "roi_heads.box_predictors.2.",
                                   "roi_heads.box_predictors.2.", "roi_heads.mask_predictors.2.",
                                   "roi_heads.box_heads.2.5.weight")
        mpre = "roi_head.mask_head.2."
        assert torch.equal(got["roi_heads.box_heads.1.3.1.running_var"],
                           sd["roi_head.bbox_head.1.shared_convs.3.bn.running_var"])
    # background: mmdet's last logit becomes torchvision's first; class k keeps its weights at index k
    assert torch.equal(got[cls + "cls_score.weight"][0], sd[pre + "fc_cls.weight"][-1])
    assert torch.equal(got[cls + "cls_score.weight"][1:], sd[pre + "fc_cls.weight"][:-1])
    assert torch.equal(got[reg + "bbox_pred.weight"][4:], sd[pre + "fc_reg.weight"])
    assert not got[reg + "bbox_pred.weight"][:4].any()
    assert torch.equal(got[mask + "mask_fcn_logits.weight"][1:], sd[mpre + "conv_logits.weight"])
    assert torch.equal(got[fc], sd[pre + "shared_fcs.0.weight"])
    assert torch.equal(got["rpn.head.conv.0.0.weight"], sd["rpn_head.rpn_conv.weight"])
    assert torch.equal(got["backbone.fpn.inner_blocks.2.0.bias"], sd["neck.lateral_convs.2.conv.bias"])


def test_checkpoint_for_another_recipe_is_a_clear_error(tmp_path):
    from elsa.dense.detection.engine import load_model_checkpoint

    model = build_detector(tiny_recipe())
    path = tmp_path / "mrcnn.pth"
    torch.save({"state_dict": _mmdet_state_dict(model, "mask_rcnn")}, path)
    with pytest.raises(ValueError, match="does not fit the model.*--recipe"):
        load_model_checkpoint(build_detector(tiny_recipe("cascade_mask_rcnn_tiny_test")), path)
