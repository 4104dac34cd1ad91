"""``frozen_stages`` freezes exactly what the official det/seg ELSA-Swin backbone's ``_freeze_stages`` freezes
(det/mmdet/models/backbones/elsa_swin.py and seg/mmseg/models/backbones/elsa_swin.py, identical)."""
import pytest

from elsa.dense.backbone import ELSASwinBackbone

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), group_width=4, elsa_kernel=3, window_size=4,
            drop_path_rate=0.0)


def _official_frozen(model, k):
    """The official rule, transcribed: k >= 0 patch_embed; k >= 1 (and ape) absolute_pos_embed; k >= 2 pos_drop in
    eval and layers[0 .. k-2] (``for i in range(0, k - 1)``)."""
    names, eval_modules = set(), set()
    if k >= 0:
        names |= {f"patch_embed.{n}" for n, _ in model.patch_embed.named_parameters()}
        eval_modules |= {"patch_embed"} | {f"patch_embed.{n}" for n, _ in model.patch_embed.named_modules() if n}
    if k >= 1 and getattr(model, "ape", False):
        names.add("absolute_pos_embed")
    if k >= 2:
        eval_modules.add("pos_drop")
        for i in range(0, k - 1):
            names |= {f"layers.{i}.{n}" for n, _ in model.layers[i].named_parameters()}
            eval_modules |= {f"layers.{i}"} | {f"layers.{i}.{n}" for n, _ in model.layers[i].named_modules() if n}
    return names, eval_modules


@pytest.mark.parametrize("k", [-1, 0, 1, 2, 3, 4, 5])
def test_frozen_stages_match_official(k):
    model = ELSASwinBackbone(frozen_stages=k, **TINY)
    model.train()
    names, eval_modules = _official_frozen(model, k)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == names
    in_eval = {n for n, m in model.named_modules() if n and not m.training}
    assert in_eval == eval_modules
    if k == 1:  # the difference from "freeze stages 0..k-1": stage 0 still trains at k = 1
        assert all(p.requires_grad for p in model.layers[0].parameters())


def test_frozen_stages_out_of_range_names_the_argument():
    with pytest.raises(ValueError, match="frozen_stages"):
        ELSASwinBackbone(frozen_stages=6, **TINY)
    with pytest.raises(ValueError, match="frozen_stages"):
        ELSASwinBackbone(frozen_stages=-2, **TINY)
