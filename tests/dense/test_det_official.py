"""Detection pieces against mmdetection 2.11 / mmcv 1.3 (the official ELSA det/ fork): each rule is re-derived
here in numpy from the official source (file named in each test), independently of the library code, and compared
numerically at several sizes. Each test also checks that torchvision's own rule differs where the issue says so,
so the comparison can fail."""
import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from elsa.dense.detection import build_detector
from elsa.dense.detection.masks import mask_targets, paste_masks
from elsa.dense.detection.models import rescaled_size
from elsa.dense.detection.rpn import FixedStrideAnchorGenerator, max_iou_assign
from synthetic_coco import tiny_recipe

STRIDES = (4, 8, 16, 32, 64)
SIZES = (32, 64, 128, 256, 512)
RATIOS = (0.5, 1.0, 2.0)
# padded batch sizes (multiples of 32): COCO test sizes with odd and even (side / 32), and small ones
PADDED = [(800, 1216), (800, 1088), (1344, 800), (608, 1088), (96, 64), (160, 224)]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _feature_sizes(h, w):
    """FPN map sizes of an (h, w) padded batch: strides 4..32, then max_pool2d(1, stride 2) for P6."""
    sizes = [(h // s, w // s) for s in (4, 8, 16, 32)]
    p5 = sizes[-1]
    return sizes + [((p5[0] - 1) // 2 + 1, (p5[1] - 1) // 2 + 1)]


# ------------------------------------------------------------------ mmdet/core/anchor/anchor_generator.py
def _mmdet_anchors(strides, scales, ratios, feature_sizes):
    """AnchorGenerator(strides, ratios, scales) with center_offset 0, scale_major: gen_single_level_base_anchors
    + single_level_grid_anchors, in float32 as mmdet's torch.Tensor arithmetic."""
    f32 = np.float32
    out = []
    ratios = np.asarray(ratios, f32)
    for stride, scale, (fh, fw) in zip(strides, scales, feature_sizes):
        h_r = np.sqrt(ratios)
        w_r = f32(1) / h_r
        scales_t = np.array([scale], f32)
        ws = (f32(stride) * w_r[:, None] * scales_t[None, :]).reshape(-1)
        hs = (f32(stride) * h_r[:, None] * scales_t[None, :]).reshape(-1)
        base = np.stack([f32(-0.5) * ws, f32(-0.5) * hs, f32(0.5) * ws, f32(0.5) * hs], -1)
        sx = np.arange(fw) * stride
        sy = np.arange(fh) * stride
        xx = np.tile(sx, fh)
        yy = np.repeat(sy, fw)
        shifts = np.stack([xx, yy, xx, yy], -1).astype(f32)
        out.append((base[None] + shifts[:, None]).reshape(-1, 4))
    return out


def _mmdet_valid_flags(strides, num_base, feature_sizes, pad_shape):
    """AnchorGenerator.valid_flags: anchors of grid cells beyond ceil(pad / stride) are invalid."""
    flags = []
    for stride, a, (fh, fw) in zip(strides, num_base, feature_sizes):
        vh = min(int(np.ceil(pad_shape[0] / stride)), fh)
        vw = min(int(np.ceil(pad_shape[1] / stride)), fw)
        vx = np.zeros(fw, bool)
        vy = np.zeros(fh, bool)
        vx[:vw] = True
        vy[:vh] = True
        valid = np.tile(vx, fh) & np.repeat(vy, fw)
        flags.append(np.repeat(valid, a))
    return np.concatenate(flags)


def _mmdet_inside_flags(anchors, valid, img_shape, allowed_border):
    """mmdet/core/anchor/utils.py anchor_inside_flags."""
    h, w = img_shape
    if allowed_border < 0:
        return valid
    b = allowed_border
    return valid & (anchors[:, 0] >= -b) & (anchors[:, 1] >= -b) & (anchors[:, 2] < w + b) & (anchors[:, 3] < h + b)


@pytest.mark.parametrize("padded", PADDED)
def test_anchors_equal_mmdet_at_every_level(padded):
    fs = _feature_sizes(*padded)
    ref = _mmdet_anchors(STRIDES, [s / t for s, t in zip(SIZES, STRIDES)], RATIOS, fs)
    ours = FixedStrideAnchorGenerator(STRIDES, SIZES, RATIOS).grid_anchors_fixed(fs, torch.device("cpu"))
    for level, (r, o) in enumerate(zip(ref, ours)):
        assert o.shape == r.shape, level
        np.testing.assert_array_equal(o.numpy(), r, err_msg=f"level {level}")  # bit for bit
    # and through the model: the RPN's generator on an ImageList of that padded size
    feats = [torch.zeros(1, 1, *s) for s in fs]
    images = ImageList(torch.zeros(2, 3, *padded), [padded, padded])
    model_anchors = build_detector(tiny_recipe("mask_rcnn_tiny_test", anchor_sizes=SIZES)).rpn.anchor_generator(
        images, feats)
    assert len(model_anchors) == 2
    np.testing.assert_array_equal(model_anchors[1].numpy(), np.concatenate(ref))


def test_torchvision_anchors_drift_where_the_issue_says():
    """The reason for FixedStrideAnchorGenerator: at a padded 800 x 1216 batch torchvision's P6 stride is
    1216 // 19 = 64 wide but 800 // 13 = 61 high, and its base anchors are rounded."""
    padded = (800, 1216)
    fs = _feature_sizes(*padded)
    ref = _mmdet_anchors(STRIDES, [8.0] * 5, RATIOS, fs)
    tv = AnchorGenerator(tuple((s,) for s in SIZES), (RATIOS,) * 5)(
        ImageList(torch.zeros(1, 3, *padded), [padded]), [torch.zeros(1, 1, *s) for s in fs])[0]
    tv = tv.numpy()
    err = [np.abs(t - r).max() for t, r in zip(np.split(tv, np.cumsum([len(r) for r in ref])[:-1]), ref)]
    assert err[4] > 30  # P6: up to 36 px
    assert 0.4 < max(err[:4]) < 0.5  # P2-P5: rounding of the base anchors


# ------------------------------------------------------------------ mmdet/core/bbox/assigners/max_iou_assigner.py
def _mmdet_assign(overlaps, pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality=True):
    """assign_wrt_overlaps, transcribed (numpy, a loop over gts as in the source)."""
    num_gts, num_bboxes = overlaps.shape
    assigned = np.full(num_bboxes, -1, np.int64)
    if num_gts == 0 or num_bboxes == 0:
        if num_gts == 0:
            assigned[:] = 0
        return assigned
    max_overlaps = overlaps.max(0)
    argmax_overlaps = overlaps.argmax(0)
    gt_max_overlaps = overlaps.max(1)
    assigned[(max_overlaps >= 0) & (max_overlaps < neg_iou_thr)] = 0
    pos = max_overlaps >= pos_iou_thr
    assigned[pos] = argmax_overlaps[pos] + 1
    if match_low_quality:
        for i in range(num_gts):
            if gt_max_overlaps[i] >= min_pos_iou:
                assigned[overlaps[i] == gt_max_overlaps[i]] = i + 1
    return assigned


def test_max_iou_assigner_equals_mmdet_with_ties_and_the_floor():
    rng = np.random.default_rng(0)
    for trial in range(30):
        g, n = rng.integers(1, 8), rng.integers(1, 200)
        iou = rng.choice([0.0, 0.1, 0.25, 0.3, 0.45, 0.6, 0.7, 0.8], size=(g, n)) * rng.uniform(0.5, 1.0)
        iou = iou.astype(np.float32)
        if trial % 3 == 0:
            iou[0] = np.minimum(iou[0], 0.2)  # a gt whose best anchor is below the 0.3 floor: no forced match
        ref = _mmdet_assign(iou, 0.7, 0.3, 0.3)
        ours = max_iou_assign(torch.from_numpy(iou), 0.7, 0.3, 0.3).numpy()
        np.testing.assert_array_equal(ours, ref)
    assert (max_iou_assign(torch.zeros(0, 5), 0.7, 0.3, 0.3) == 0).all()


def _boxes(rng, n, h, w, min_side=4.0):
    x0, y0 = rng.uniform(-10, w, n), rng.uniform(-10, h, n)
    bw, bh = rng.uniform(min_side, w / 2, n), rng.uniform(min_side, h / 2, n)
    return np.stack([x0, y0, x0 + bw, y0 + bh], 1).astype(np.float32)


def _iou(a, b):
    """mmdet/core/bbox/iou_calculators bbox_overlaps (mode 'iou'), float32 as in mmdet: exact ties matter to the
    low-quality matches."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, np.float32(1e-6))


@pytest.mark.parametrize("recipe", ["mask_rcnn_tiny_test", "cascade_mask_rcnn_tiny_test"])
def test_rpn_targets_equal_mmdet_anchor_head(recipe):
    """AnchorHead._get_targets_single: anchors on the image's padded grid (valid_flags with its own pad_shape) and
    inside the unpadded image by allowed_border (-1: all; cascade: 0) are assigned; the rest get no target."""
    rng = np.random.default_rng(1)
    r = tiny_recipe(recipe)
    rpn = build_detector(r).rpn
    border = -1 if recipe.startswith("mask") else 0
    assert rpn.allowed_border == border
    gen = rpn.anchor_generator
    batch = (160, 224)  # padded batch; the images are smaller and pad to smaller grids themselves
    fs = _feature_sizes(*batch)
    image_sizes = [(150, 217), (97, 130), (160, 224)]
    anchors = gen(ImageList(torch.zeros(len(image_sizes), 3, *batch), image_sizes), [torch.zeros(1, 1, *s) for s in fs])
    ref_anchors = np.concatenate(_mmdet_anchors(gen.strides, [s / t for s, t in zip(r.anchor_sizes, gen.strides)],
                                                RATIOS, fs))
    targets = []
    for h, w in image_sizes:
        n = int(rng.integers(1, 6))
        targets.append({"boxes": torch.from_numpy(np.clip(_boxes(rng, n, h, w), 0, [w, h, w, h]))})
    targets.append({"boxes": torch.zeros(0, 4)})
    image_sizes.append((64, 96))
    anchors.append(anchors[0])
    labels, matched = rpn.assign_targets_to_anchors(anchors, targets, image_sizes, fs)
    for (h, w), t, lab, mat in zip(image_sizes, targets, labels, matched):
        pad = (math.ceil(h / 32) * 32, math.ceil(w / 32) * 32)
        valid = _mmdet_valid_flags(gen.strides, [3] * 5, fs, pad)
        inside = _mmdet_inside_flags(ref_anchors, valid, (h, w), border)
        gt = t["boxes"].numpy()
        ref = np.full(len(ref_anchors), -1.0)
        if len(gt):
            assigned = _mmdet_assign(_iou(gt, ref_anchors[inside]), 0.7, 0.3, 0.3)
        else:
            assigned = np.zeros(inside.sum(), np.int64)
        ref[inside] = np.where(assigned > 0, 1.0, np.where(assigned == 0, 0.0, -1.0))
        np.testing.assert_array_equal(lab.numpy(), ref)
        pos = assigned > 0
        if pos.any():
            np.testing.assert_allclose(mat.numpy()[inside][pos], gt[assigned[pos] - 1], atol=1e-5)
        if border == 0:
            assert (~inside & valid).any()  # the border rule really removes anchors here
        assert (~valid).any() or pad == batch


# ------------------------------------------------------------------ mmcv/ops/csrc roi_align (aligned) + mask_target
def _bilinear(img, y, x):
    """mmcv roi_align bilinear_interpolate (CPU/CUDA kernels)."""
    h, w = img.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_high = y_low = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_high = x_low = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * img[y_low, x_low] + hy * lx * img[y_low, x_high] + ly * hx * img[y_high, x_low] \
        + ly * lx * img[y_high, x_high]


def _mmcv_roi_align_aligned(img, box, out):
    """roi_align(spatial_scale=1, sampling_ratio=0, pool 'avg', aligned=True) of one RoI on one channel."""
    x0, y0, x1, y1 = (float(v) - 0.5 for v in box)
    rh, rw = y1 - y0, x1 - x0
    bh, bw = rh / out, rw / out
    gh, gw = int(math.ceil(rh / out)), int(math.ceil(rw / out))
    count = max(gh * gw, 1)
    res = np.zeros((out, out))
    for ph in range(out):
        for pw in range(out):
            acc = 0.0
            for iy in range(gh):
                y = y0 + ph * bh + (iy + 0.5) * bh / gh
                for ix in range(gw):
                    x = x0 + pw * bw + (ix + 0.5) * bw / gw
                    acc += _bilinear(img, y, x)
            res[ph, pw] = acc / count
    return res


def _mmdet_mask_target(boxes, gt_masks, inds, size):
    """mask_target_single + BitmapMasks.crop_and_resize on masks padded to 32 (mmdet Pad pads the masks too):
    clip to the padded mask, aligned RoIAlign, >= 0.5."""
    g, h, w = gt_masks.shape
    ph, pw = int(np.ceil(h / 32) * 32), int(np.ceil(w / 32) * 32)
    padded = np.zeros((g, ph, pw), np.float64)
    padded[:, :h, :w] = gt_masks
    boxes = boxes.astype(np.float64).copy()
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, pw)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, ph)
    return np.stack([_mmcv_roi_align_aligned(padded[i], b, size) >= 0.5 for b, i in zip(boxes, inds)])


@pytest.mark.parametrize("hw", [(50, 70), (64, 96), (33, 40)])
def test_mask_targets_equal_mmdet(hw):
    h, w = hw
    rng = np.random.default_rng(h)
    yy, xx = np.mgrid[0:h, 0:w]
    masks = []
    for _ in range(3):  # ellipses, one touching the bottom-right border where the padding decides the values
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, h / 2), rng.uniform(4, w / 2)
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
    masks.append((yy >= h - 12) & (xx >= w - 15))
    gt = np.stack(masks).astype(np.uint8)
    boxes = np.concatenate([_boxes(rng, 12, h, w, min_side=2.0),
                            np.array([[w - 15.3, h - 12.7, w + 3.0, h + 5.0], [w - 9.5, h - 9.5, w, h]], np.float32)])
    inds = np.concatenate([rng.integers(0, 4, 12), [3, 3]])
    size = 7
    ref = _mmdet_mask_target(boxes, gt, inds, size)
    ours = mask_targets(torch.from_numpy(boxes), torch.from_numpy(gt), torch.from_numpy(inds), size)
    np.testing.assert_array_equal(ours.numpy(), ref.astype(np.float32))
    # torchvision's maskrcnn_loss targets (unaligned, soft) are not these
    from torchvision.models.detection.roi_heads import project_masks_on_boxes

    tv = project_masks_on_boxes(torch.from_numpy(gt), torch.from_numpy(boxes), torch.from_numpy(inds), size)
    assert not torch.equal(tv, ours)


# ------------------------------------------------------------------ mmdet fcn_mask_head.py _do_paste_mask
def _grid_sample_zeros(img, gx, gy):
    """F.grid_sample(bilinear, zeros padding, align_corners=False) of one (H, W) map at normalised (gx, gy)."""
    h, w = img.shape
    ix, iy = ((gx + 1) * w - 1) / 2, ((gy + 1) * h - 1) / 2
    x0, y0 = math.floor(ix), math.floor(iy)
    val = 0.0
    for yy, wy in ((y0, 1 - (iy - y0)), (y0 + 1, iy - y0)):
        for xx, wx in ((x0, 1 - (ix - x0)), (x0 + 1, ix - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                val += wy * wx * img[yy, xx]
    return val


def _mmdet_paste(mask, box, img_h, img_w):
    """_do_paste_mask of one mask on the whole image (the GPU path), in float64."""
    x0, y0, x1, y1 = (float(v) for v in box)
    out = np.zeros((img_h, img_w))
    for y in range(img_h):
        gy = (y + 0.5 - y0) / (y1 - y0) * 2 - 1
        for x in range(img_w):
            gx = (x + 0.5 - x0) / (x1 - x0) * 2 - 1
            out[y, x] = _grid_sample_zeros(mask, gx, gy)
    return out


def test_mask_paste_equals_mmdet():
    rng = np.random.default_rng(3)
    img_h, img_w = 37, 45
    probs = rng.uniform(0, 1, (6, 1, 7, 7)).astype(np.float32)
    probs[0] = 1.0 - 1e-3  # a full mask: the pasted box edge decides
    boxes = np.array([[3.3, 4.6, 20.2, 17.9], [-4.0, -2.5, 10.7, 12.2], [30.4, 25.1, 47.0, 39.3],
                      [10.0, 10.0, 11.2, 30.0], [5.5, 5.5, 35.5, 30.5], [0.2, 0.7, 44.6, 36.4]], np.float32)
    ours = paste_masks(torch.from_numpy(probs), torch.from_numpy(boxes), img_h, img_w)
    assert ours.shape == (6, 1, img_h, img_w)
    for i in range(len(boxes)):
        ref = _mmdet_paste(probs[i, 0].astype(np.float64), boxes[i], img_h, img_w)
        np.testing.assert_array_equal(ours[i, 0].numpy() >= 0.5, ref >= 0.5)  # mmdet keeps >= mask_thr_binary
        near = ours[i, 0].numpy() > 0
        np.testing.assert_allclose(ours[i, 0].numpy()[near], ref[near], atol=1e-5)
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    tv = paste_masks_in_image(torch.from_numpy(probs), torch.from_numpy(boxes), (img_h, img_w))
    assert not torch.equal(tv >= 0.5, ours >= 0.5)


# ------------------------------------------------------------------ mmcv/image/geometric.py rescale_size
def _mmcv_rescale_size(h, w, scale=(1333, 800)):
    max_long, max_short = max(scale), min(scale)
    factor = min(max_long / max(h, w), max_short / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def test_test_resize_rounds_half_up_as_mmcv_and_maps_back():
    sizes = [(h, w) for h in range(200, 700, 7) for w in range(300, 700, 11)]
    differ = [(h, w) for h, w in sizes
              if _mmcv_rescale_size(h, w) != tuple(int(v * min(800 / min(h, w), 1333 / max(h, w))) for v in (h, w))]
    assert differ  # sizes where flooring (torchvision) and mmcv disagree
    for h, w in sizes:
        assert rescaled_size(h, w, 800, 1333) == _mmcv_rescale_size(h, w)
    model = build_detector(tiny_recipe("mask_rcnn_tiny_test", test_size=(800, 1333))).eval()
    h, w = differ[0]
    images, _ = model.transform([torch.rand(3, h, w)])
    assert tuple(images.image_sizes[0]) == _mmcv_rescale_size(h, w)
    nh, nw = images.image_sizes[0]
    boxes = torch.tensor([[10.0, 20.0, 300.0, 400.0]])
    probs = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = model.transform.postprocess([{"boxes": boxes.clone(), "masks": probs}], [(nh, nw)], [(h, w)])[0]
    ref = boxes / torch.tensor([nw / w, nh / h, nw / w, nh / h])  # mmdet: bboxes / scale_factor
    torch.testing.assert_close(out["boxes"], ref, rtol=0, atol=0)
    # get_seg_masks(rescale=True): pasted at the original size on the rescaled box, kept if >= 0.5
    assert out["masks"].shape == (1, 1, h, w)
    ref_mask = _mmdet_paste(probs[0, 0].double().numpy(), ref[0].numpy(), h, w) >= 0.5
    np.testing.assert_array_equal(out["masks"][0, 0].numpy() >= 0.5, ref_mask)


# ------------------------------------------------------------------ mmdet bbox_head.py / convfc_bbox_head.py init
@pytest.mark.parametrize("name", ["mask_rcnn_tiny_test", "cascade_mask_rcnn_tiny_test"])
def test_box_heads_initialised_as_mmdet(name):
    torch.manual_seed(0)
    r = tiny_recipe(name, num_classes=40, representation_size=256)
    rh = build_detector(r).roi_heads
    if name.startswith("mask"):
        pairs = [(rh.box_head, rh.box_predictor)]
        mask_predictors = [rh.mask_predictor]
    else:
        pairs = list(zip(rh.box_heads, rh.box_predictors))
        mask_predictors = list(rh.mask_predictors)
    for head, pred in pairs:
        fcs = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
        assert len(fcs) == (2 if name.startswith("mask") else 1)
        for fc in fcs:  # xavier_uniform: U(-b, b), b = sqrt(6 / (fan_in + fan_out)); zero bias
            b = math.sqrt(6 / (fc.in_features + fc.out_features))
            assert fc.weight.abs().max() <= b
            assert fc.weight.std().item() == pytest.approx(b / math.sqrt(3), rel=0.05)
            assert not fc.bias.any()
        assert pred.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert pred.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)
        assert not pred.cls_score.bias.any() and not pred.bbox_pred.bias.any()
    for mp in mask_predictors:  # FCNMaskHead.init_weights: upsample and conv_logits with zero bias
        assert not mp.conv5_mask.bias.any() and not mp.mask_fcn_logits.bias.any()
    for head, _ in pairs:  # mmcv ConvModule: kaiming_init(mode='fan_out', nonlinearity='relu', normal), BN 1 / 0
        for conv in [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]:
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
            assert conv.bias is None
        for bn in [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            assert (bn.weight == 1).all() and not bn.bias.any()


def test_rpn_loss_is_zero_not_nan_without_usable_anchors():
    """allowed_border=0 on an image smaller than every anchor leaves nothing to sample (mmdet skips the image)."""
    r = tiny_recipe("cascade_mask_rcnn_tiny_test", anchor_sizes=(64, 128, 256, 512, 1024))
    model = build_detector(r).train()
    images = [torch.rand(3, 40, 48)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, 40, 48, dtype=torch.uint8)}]
    targets[0]["masks"][0, 5:30, 5:30] = 1
    losses = model(images, targets)
    assert losses["loss_objectness"].item() == 0 and losses["loss_rpn_box_reg"].item() == 0
    assert all(torch.isfinite(v) for v in losses.values())


def _train_batch():
    masks = torch.zeros(2, 80, 96, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(80), torch.arange(96), indexing="ij")
    masks[0] = ((yy - 25) ** 2 / 15 ** 2 + (xx - 20) ** 2 / 10 ** 2 <= 1).to(torch.uint8)
    masks[1, 50:79, 40:95] = 1  # touches the bottom and right borders: the 32-padding decides there
    images = [torch.rand(3, 80, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 30, 40], [40, 50, 95, 79]]), "labels": torch.tensor([1, 2]),
                "masks": masks}]
    return images, targets


def test_mask_rcnn_mask_loss_uses_mmdet_targets():
    """The training mask loss is mean BCE of the positives' class masks against mmdet's targets (re-derived)."""
    torch.manual_seed(0)
    m = build_detector(tiny_recipe("mask_rcnn_tiny_test")).train()
    images, targets = _train_batch()
    seen = {}
    orig = m.roi_heads.select_training_samples

    def spy(proposals, t):
        out = orig(proposals, t)
        seen["props"], seen["matched"], seen["labels"] = out[0], out[1], out[2]
        return out

    m.roi_heads.select_training_samples = spy
    m.roi_heads.mask_predictor.register_forward_hook(lambda mod, i, o: seen.__setitem__("logits", o))
    losses = m(images, targets)
    lab, props, matched = seen["labels"][0], seen["props"][0], seen["matched"][0]
    pos = lab > 0
    assert pos.sum() >= 2
    ref = _mmdet_mask_target(props[pos].detach().numpy(), targets[0]["masks"].numpy(), matched[pos].numpy(), 28)
    logits = seen["logits"][torch.arange(int(pos.sum())), lab[pos]]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(ref).float())
    assert losses["loss_mask"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_cascade_mask_loss_uses_mmdet_targets():
    torch.manual_seed(0)
    m = build_detector(tiny_recipe("cascade_mask_rcnn_tiny_test")).train()
    images, targets = _train_batch()
    rh = m.roi_heads
    seen = {}
    orig_sample, orig_logits = rh._sample, rh._mask_logits

    def sample(s, *a):
        out = orig_sample(s, *a)
        seen.setdefault(("sample", s), out)
        return out

    def mask_logits(s, *a):
        out = orig_logits(s, *a)
        seen.setdefault(("logits", s), out)
        return out

    rh._sample, rh._mask_logits = sample, mask_logits
    losses = m(images, targets)
    for s, w in enumerate(rh.stage_weights):
        rois, labels, matched, _ = seen[("sample", s)]
        pos = labels[0] > 0
        ref = _mmdet_mask_target(rois[0][pos].detach().numpy(), targets[0]["masks"].numpy(),
                                 matched[0][pos].numpy(), 28)
        logits = seen[("logits", s)][torch.arange(int(pos.sum())), labels[0][pos]]
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(ref).float())
        assert losses[f"s{s}.loss_mask"].item() == pytest.approx(w * expected.item(), rel=1e-6)


def test_mask_rcnn_rcnn_assigner_equals_mmdet():
    """train_cfg.rcnn.assigner: MaxIoUAssigner(pos 0.5, neg 0.5, min_pos_iou 0.5, match_low_quality=True)."""
    rh = build_detector(tiny_recipe("mask_rcnn_tiny_test")).roi_heads
    # P overlaps B (85 / 115) more than A (75 / 125 = 0.6) but is A's best proposal (Q = B overlaps A by 0.43):
    # mmdet's low-quality step gives P to A; torchvision's Matcher (no low-quality matches) gives it to B
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 14.0, 10.0]])
    props = torch.tensor([[2.5, 0.0, 12.5, 10.0], [4.0, 0.0, 14.0, 10.0]])
    matched, labels = rh.assign_targets_to_proposals([props], [gt], [torch.tensor([1, 2])])
    assert matched[0].tolist() == [0, 1] and labels[0].tolist() == [1, 2]
    rng = np.random.default_rng(5)
    for _ in range(10):
        h, w = 80, 96
        gtb = _boxes(rng, int(rng.integers(1, 6)), h, w)
        props = np.concatenate([_boxes(rng, 60, h, w), gtb + rng.normal(0, 2, gtb.shape).astype(np.float32)])
        gl = rng.integers(1, 3, len(gtb))
        matched, labels = rh.assign_targets_to_proposals([torch.from_numpy(props)], [torch.from_numpy(gtb)],
                                                         [torch.from_numpy(gl)])
        ref = _mmdet_assign(_iou(gtb, props), 0.5, 0.5, 0.5)
        ref_labels = np.where(ref > 0, gl[np.clip(ref - 1, 0, None)], np.where(ref == 0, 0, -1))
        np.testing.assert_array_equal(labels[0].numpy(), ref_labels)
        np.testing.assert_array_equal(matched[0].numpy()[ref > 0], ref[ref > 0] - 1)
