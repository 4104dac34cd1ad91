"""ELSA-Swin: Swin Transformer with ELSA blocks in stages 1-3 and window attention in stage 4.

Paper: "ELSA: Enhanced Local Self-Attention for Vision Transformer", Zhou et al., arXiv:2112.12786.
Official release: https://github.com/damo-cv/ELSA (this is an independent implementation of it).

Parameter names and shapes equal the official checkpoints' (spec section 3), so official files load as they
are. Unlike the official code, the models take any input size: the ELSA stages are convolutional, and the
window-attention stage pads its map to whole 7x7 windows. At 224 input the last map is exactly one window
and the blocks do not shift (the official classification semantics); larger maps shift odd blocks by 3 as
Swin does. ``always_shift=True`` gives the detection backbone's rule (shift in odd blocks always).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor

from ..layers import ELSABlock
from ..layers.cpu_fused import Mlp  # timm's Mlp, with oneDNN's fused linear + GELU in CPU float32 inference
from ._checkpoint import unwrap_state_dict

__all__ = ["ELSASwin"]


def _relative_position_index(window: int) -> Tensor:
    """Swin's relative index: (window**2 * window**2,) into a ((2*window-1)**2)-entry bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten()


def _window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def _window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """(B * H/w * W/w, w*w, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def _shift_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> Tensor:
    """Additive mask (nW, w*w, w*w) that keeps shifted windows from mixing regions (Swin's -100 rule)."""
    region = torch.zeros((1, h, w, 1), device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            region[:, hs, ws, :] = label
            label += 1
    ids = _window_partition(region, window).squeeze(-1)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Window self-attention in the official layout: ``pre_proj`` yields v, q, k (in that order), ``rb`` is the
    relative-position bias table indexed by the ``relative_id`` buffer, ``post_proj`` projects back."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.rb = nn.Parameter(torch.zeros(num_heads, (2 * window_size - 1) ** 2))
        trunc_normal_(self.rb, std=0.02)
        self.register_buffer("relative_id", _relative_position_index(window_size))
        self.pre_proj = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.post_proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_bias(self) -> Tensor:
        n = self.window_size ** 2
        return self.rb[:, self.relative_id].view(1, self.num_heads, n, n)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (B*nW, N, C); mask: (nW, N, N) or None."""
        b, n, c = x.shape
        g = self.num_heads
        v, q, k = self.pre_proj(x).view(b, n, 3, g, c // g).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_bias().to(q.dtype)
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.to(q.dtype)[None, :, None]).expand(b // nw, -1, -1, -1, -1)
            bias = bias.reshape(b, g, n, n)
        if torch.onnx.is_in_onnx_export():
            # Spelled out for the ONNX exporters: the dynamo exporter's decomposition of
            # scaled_dot_product_attention gives its output other strides than it traced, and the reshape below
            # then fails as an invalid view ("Cannot view a tensor with shape ...").
            attn = (q * (c // g) ** -0.5) @ k.transpose(-2, -1) + bias
            out = attn.softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                 dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.post_proj(out.transpose(1, 2).reshape(b, n, c)))


class SwinBlock(nn.Module):
    """Swin block on (B, H, W, C): pads to whole windows; ``shift`` is applied only when the map is larger
    than one window, unless ``always_shift`` (the detection backbone's rule)."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift: bool = False, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, always_shift: bool = False) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.always_shift = always_shift
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def _attend(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        shift = self.shift_size
        if not self.always_shift and min(h, w) <= ws:
            shift = 0  # one window covers the short side: the official classification model does not shift
        pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        mask = None
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = _shift_mask(hp, wp, ws, shift, x.device)
        x = _window_reverse(self.attn(_window_partition(x, ws), mask), ws, hp, wp)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :h, :w].contiguous()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self._attend(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x downsampling: concatenate 2x2 neighbours in the order (0,0), (1,0), (0,1), (1,1), LayerNorm(4C),
    Linear(4C, 2C). Odd maps are zero-padded at the bottom/right."""

    def __init__(self, dim: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


def _resized_pos_embed(pos: Tensor, grid: Tuple[int, int], size: Tuple[int, int]) -> Tensor:
    """An absolute position embedding as a (1, H, W, C) map of ``size``: ``pos`` is (1, grid_h * grid_w, C) (the
    classifier's layout) or (1, C, grid_h, grid_w) (the detection backbone's); resized bicubically, as the official
    detection backbone does, when the grid differs from ``size``."""
    if pos.dim() == 3:
        pos = pos.transpose(1, 2).reshape(1, -1, grid[0], grid[1])
    if tuple(pos.shape[2:]) != tuple(size):
        pos = F.interpolate(pos, size=tuple(size), mode="bicubic", align_corners=False)
    return pos.permute(0, 2, 3, 1)


class ELSASwinStage(nn.Module):
    """One stage: ``blocks`` then the optional ``downsample`` (the official order, so the keys match)."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample
        self.grad_checkpointing = False

    def forward_blocks(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x


class ELSASwin(nn.Module):
    """ELSA-Swin. Input (B, in_chans, H, W) of any size; stage maps are (B, H/4, W/4, C) ... (B, H/32, W/32, 8C)."""

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        elsa_kernel: int = 7,
        group_width: int = 8,
        lam: float = 0.0,
        gamma: float = 1.0,
        qk_scale: Optional[float] = 1.0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        head_drop_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        dilation: int = 1,
        dim_qk: Optional[int] = None,
        dim_v: Optional[int] = None,
        groups: int = 1,
        always_shift: bool = False,
        elsa_backend: Optional[str] = None,
        elsa_stages: Optional[int] = None,
    ) -> None:
        """Options as the official ``ELSASwin`` (same names and meanings), plus:

        head_drop_rate: dropout before the classifier (not in the official model; default 0 as there).
        always_shift, elsa_backend, elsa_stages: see the module docstring, ``ELSA`` and the stage layout.

        ``drop_rate`` is the official dropout: after the patch (and position) embedding, in every block's MLP and
        in the window attention's output projection, never on the ELSA projection nor before the head. ``ape``
        adds a learned absolute position embedding (trunc-normal, std 0.02) after the patch embedding, resized
        bicubically when the input grid differs from ``img_size``'s; ``patch_norm=False`` drops the patch
        embedding's LayerNorm; ``use_checkpoint`` turns on gradient checkpointing; ``dilation``, ``dim_qk``,
        ``dim_v`` and ``groups`` go to every ELSA block (the official model passes them through to its blocks).
        """
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        num_stages = len(depths)
        elsa_stages = num_stages - 1 if elsa_stages is None else elsa_stages
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (num_stages - 1))
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, norm_layer=norm_layer if patch_norm else None,
                                      output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True)
        self.ape = ape
        self.absolute_pos_embed: Optional[nn.Parameter] = None
        if ape:  # the official classifier's layout: (1, patches, C)
            grid = self.patch_embed.grid_size
            self.absolute_pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, grid[0] * grid[1], embed_dim),
                                                                 std=0.02))
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, self.feature_info = [], []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2 ** i
            rates = dpr[sum(depths[:i]):sum(depths[:i + 1])]
            if i < elsa_stages:
                blocks = [ELSABlock(dim, kernel_size=elsa_kernel, num_heads=heads, mlp_ratio=mlp_ratio,
                                    drop=drop_rate, attn_drop=attn_drop_rate, drop_path=r, norm_layer=norm_layer,
                                    qkv_bias=qkv_bias, qk_scale=qk_scale, dim_qk=dim_qk, dim_v=dim_v, lam=lam,
                                    gamma=gamma, dilation=dilation, group_width=group_width, groups=groups,
                                    backend=elsa_backend) for r in rates]
            else:
                blocks = [SwinBlock(dim, heads, window_size, shift=j % 2 == 1, mlp_ratio=mlp_ratio,
                                    qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                                    drop_path=r, norm_layer=norm_layer, always_shift=always_shift)
                          for j, r in enumerate(rates)]
            downsample = PatchMerging(dim, norm_layer) if i < num_stages - 1 else None
            stages.append(ELSASwinStage(blocks, downsample))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"layers.{i}"))
        self.layers = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if use_checkpoint:
            self.set_grad_checkpointing(True)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The official set, ``{'absolute_pos_embed'}``: timm's optimizer factory also exempts biases and 1-d
        parameters (norms), and everything else decays, the window stage's bias tables ``rb`` and the ghost heads
        included. The official model also lists the keyword ``relative_position_bias_table``, which matches no
        parameter (its tables are named ``rb``) and which timm 0.4's factory never read, so its run decayed them."""
        return {"absolute_pos_embed"}

    def _embed(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> patch embedding (+ absolute position embedding), after position dropout."""
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            x = x + _resized_pos_embed(self.absolute_pos_embed, self.patch_embed.grid_size, x.shape[1:3])
        return self.pos_drop(x)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^absolute_pos_embed|^patch_embed", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+).downsample", (0,)), (r"^layers\.(\d+)\.\w+\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Stage outputs (before each stage's downsampling) at strides 4, 8, 16, 32, as NCHW (or NHWC) maps.

        ``norm`` applies the final norm to the last stage's map (timm's convention)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        intermediates = []
        x = self._embed(x)
        last = len(self.layers) - 1
        stages = self.layers[:max_index + 1] if stop_early else self.layers
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if i in take:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
            if stage.downsample is not None:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> normalised last-stage map (B, H/32, W/32, num_features)."""
        x = self._embed(x)
        x = self.layers(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: ELSASwin) -> dict:
    """The one place that adapts foreign checkpoints: unwraps training checkpoints, strips ``module.``, drops the
    shift-mask buffers that official models built at other sizes carry (ours computes masks on the fly)."""
    state_dict = unwrap_state_dict(state_dict)
    return {k: v for k, v in state_dict.items() if not k.endswith("attn_mask")}


def _create_elsa_swin(variant: str, pretrained: bool = False, **kwargs) -> ELSASwin:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        ELSASwin, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


# Official results and download pages (README of damo-cv/ELSA); the single source for cfgs and `elsa models`.
OFFICIAL = {
    "elsa_swin_tiny": dict(top1=82.7, origin_url="https://drive.google.com/file/d/1eM0FsRNEDX-NncIEfvl4yXOAJawy2Ls0"),
    "elsa_swin_small": dict(top1=83.5, origin_url="https://drive.google.com/file/d/186PDbqrt2hEg8r5aH45D5D6bO-EWJgcO"),
    "elsa_swin_base": dict(top1=84.0, origin_url="https://drive.google.com/file/d/1J42asBqLb6iiKaYQaeoS2UpT7kUSjBr9"),
}


def _cfg(variant: str = "", **kwargs) -> dict:
    official = OFFICIAL.get(variant)
    extra = {}
    if official:
        extra = dict(origin_url=official["origin_url"],
                     description=f"ImageNet-1k, official top-1 {official['top1']} @224 (damo-cv/ELSA); "
                                 f"download the file and pass pretrained_cfg_overlay=dict(file=PATH)")
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        "paper_ids": "arXiv:2112.12786", "paper_name": "ELSA: Enhanced Local Self-Attention for Vision Transformer",
        **extra, **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "elsa_swin_tiny.in1k": _cfg("elsa_swin_tiny"),
    "elsa_swin_small.in1k": _cfg("elsa_swin_small"),
    "elsa_swin_base.in1k": _cfg("elsa_swin_base"),
    "elsa_swin_pico.untrained": _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0,
                                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
})


# Architecture of each registered variant; the dense-prediction backbones build from the same table.
MODEL_ARGS = {
    "elsa_swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), group_width=4),
    "elsa_swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), group_width=8),
    "elsa_swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), group_width=8),
    "elsa_swin_pico": dict(patch_size=2, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), group_width=4,
                           elsa_kernel=5, window_size=4, img_size=32, num_classes=10, drop_path_rate=0.0),
}


@register_model
def elsa_swin_tiny(pretrained: bool = False, **kwargs) -> ELSASwin:
    """ELSA-Swin-T @ 224 (29.1 M params, 4.8 GFLOPs, 82.7 top-1)."""
    return _create_elsa_swin("elsa_swin_tiny", pretrained=pretrained, **dict(MODEL_ARGS["elsa_swin_tiny"], **kwargs))


@register_model
def elsa_swin_small(pretrained: bool = False, **kwargs) -> ELSASwin:
    """ELSA-Swin-S @ 224 (53 M params, 83.5 top-1)."""
    return _create_elsa_swin("elsa_swin_small", pretrained=pretrained, **dict(MODEL_ARGS["elsa_swin_small"], **kwargs))


@register_model
def elsa_swin_base(pretrained: bool = False, **kwargs) -> ELSASwin:
    """ELSA-Swin-B @ 224 (93 M params, 84.0 top-1 with EMA weights)."""
    return _create_elsa_swin("elsa_swin_base", pretrained=pretrained, **dict(MODEL_ARGS["elsa_swin_base"], **kwargs))


@register_model
def elsa_swin_pico(pretrained: bool = False, **kwargs) -> ELSASwin:
    """A small ELSA-Swin for small images (32x32, patch 2) and laptops: not an official model.

    Two ELSA stages and one window stage, ~0.6 M params; used by ``elsa train``'s built-in digits recipe and tests.
    """
    return _create_elsa_swin("elsa_swin_pico", pretrained=pretrained, **dict(MODEL_ARGS["elsa_swin_pico"], **kwargs))
