"""Official detection and segmentation checkpoints as they really are, read with ``weights_only=True``.

The official det/ and seg/ forks save through their ``mmcv_custom`` ``save_checkpoint``: ``{'meta', 'state_dict',
'optimizer'}`` plus ``'amp': apex.amp.state_dict()`` in the detection fork. ``meta`` is the runner's (``epoch``,
``iter``, ``hook_msgs``) updated with tools/train.py's (``env_info``, ``config`` (the config's text), ``seed``,
``exp_name``) and by save_checkpoint with ``mmcv_version``, ``time`` and the dataset's ``CLASSES`` (mmseg also
``PALETTE``). The files here are built with exactly that structure."""
from __future__ import annotations

import time
from collections import OrderedDict

import pytest
import torch

from elsa.dense.detection import build_detector
from elsa.dense.segmentation.segmentor import build_segmentor
from synthetic_coco import tiny_recipe as tiny_det_recipe
from test_det_models import _mmdet_state_dict
from test_seg_model import tiny_recipe

ENV_INFO = ("sys.platform: linux\nPython: 3.7.10 (default, Feb 26 2021, 18:47:35) [GCC 7.3.0]\nCUDA available: True\n"
            "GPU 0,1,2,3,4,5,6,7: Tesla V100-SXM2-32GB\nPyTorch: 1.8.1\nTorchVision: 0.9.1\nOpenCV: 4.5.1\n"
            "MMCV: 1.3.1\nMMCV Compiler: GCC 7.3\nMMCV CUDA Compiler: 10.2\nMMDetection: 2.11.0+")
CONFIG_TEXT = ("model = dict(\n    type='MaskRCNN',\n    pretrained=None,\n    backbone=dict(type='ELSASwin', "
               "embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, ape=False, "
               "drop_path_rate=0.1, patch_norm=True, use_checkpoint=False),\n)\noptimizer = dict(type='AdamW', "
               "lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05,\n    paramwise_cfg=dict(custom_keys=dict("
               "absolute_pos_embed=dict(decay_mult=0.), relative_position_bias_table=dict(decay_mult=0.), "
               "norm=dict(decay_mult=0.))))\nfp16 = None\noptimizer_config = dict(type='DistOptimizerHook', "
               "update_interval=1, grad_clip=None, coalesce=True, bucket_size_mb=-1, use_fp16=True)\n")


def _optimizer_state(named_tensors) -> dict:
    """A real AdamW state after one step on these tensors (copies), as mmcv's runner saves it."""
    params = [torch.nn.Parameter(v.detach().float().clone()) for k, v in named_tensors if v.is_floating_point()]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt.state_dict()


def _meta(classes, **extra) -> dict:
    meta = {"epoch": 36, "iter": 263952, "hook_msgs": {"last_ckpt": "/work_dirs/elsa/epoch_36.pth"},
            "env_info": ENV_INFO, "config": CONFIG_TEXT, "seed": None, "exp_name": "elsa_config.py",
            "mmcv_version": "1.3.1", "time": time.asctime(), "CLASSES": tuple(classes)}
    meta.update(extra)
    return meta


@pytest.mark.parametrize("name", ["mask_rcnn_tiny_test", "cascade_mask_rcnn_tiny_test"])
def test_official_mmdet_file_loads_with_weights_only(tmp_path, name):
    from elsa.dense.detection.engine import load_model_checkpoint

    r = tiny_det_recipe(name)
    model = build_detector(r)
    sd = OrderedDict(_mmdet_state_dict(model, r.arch))
    path = tmp_path / "epoch_36.pth"
    torch.save({"meta": _meta(("box", "disc")), "state_dict": sd, "optimizer": _optimizer_state(sd.items()),
                "amp": OrderedDict(loss_scaler0={"loss_scale": 512.0, "unskipped": 1337})}, path)
    fresh = build_detector(r)
    meta = load_model_checkpoint(fresh, path)  # weights_only=True; raises if a parameter is left out
    assert meta["classes"] == ["box", "disc"]
    assert torch.equal(fresh.state_dict()["rpn.head.conv.0.0.weight"], sd["rpn_head.rpn_conv.weight"])


def test_official_mmseg_file_loads_with_weights_only(tmp_path):
    from elsa.dense.segmentation.engine import load_segmentor

    torch.manual_seed(0)
    recipe = tiny_recipe()
    src = build_segmentor(recipe)
    sd = OrderedDict(src.state_dict())
    classes = [f"class{i}" for i in range(recipe.num_classes)]
    palette = [[i * 7 % 256, i * 13 % 256, i * 29 % 256] for i in range(recipe.num_classes)]
    path = tmp_path / "iter_160000.pth"
    torch.save({"meta": _meta(classes, iter=160000, epoch=8, PALETTE=palette), "state_dict": sd,
                "optimizer": _optimizer_state(sd.items())}, path)
    model, used = load_segmentor(path, recipe)
    assert used == recipe
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
