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
from timm.layers import (DropPath, PatchEmbed, SelectAdaptivePool2d, get_device_dtype, register_notrace_function,
                         register_notrace_module, trunc_normal_)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor

from ..layers import ELSABlock
from ..layers.cpu_fused import Mlp  # timm's Mlp, with oneDNN's fused linear + GELU in CPU float32 inference
from ._checkpoint import unwrap_state_dict
from ._features import FeatureGetterNet

__all__ = ["ELSASwin"]


def _relative_position_index(window: int, device: Optional[torch.device] = None) -> Tensor:
    """Swin's relative index: (window**2 * window**2,) into a ((2*window-1)**2)-entry bias table."""
    ar = torch.arange(window, device=device)
    coords = torch.stack(torch.meshgrid(ar, ar, indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten()


def _mod(a: Tensor, n) -> Tensor:
    """``a % n`` for a >= 0 and n > 0 that may be a symbolic int: the dynamo ONNX exporter cannot lower
    ``remainder`` by a symbolic scalar, but it can divide and multiply by one (a >= 0: the TorchScript-based
    exporter's division truncates)."""
    return a - a // n * n


def _windowed_pixels(nh, nw, window: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Row and column in the padded (nh * window, nw * window) map of each pixel in window order (window by window,
    row-major inside each), computed from one arange: no view or permute whose sizes a symbolic shape would guard."""
    p = torch.arange(nh * nw * window * window, device=device)
    win, inner = p // (window * window), p % (window * window)
    return win // nw * window + inner // window, _mod(win, nw) * window + inner % window


def _window_indices(h, w, window: int, shift, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Gather indices between an (h, w) map and its windows after Swin's padding and cyclic shift.

    ``part`` ((nh * nw * w*w,)): for each windowed pixel, the flat pixel of the map it reads, ``h * w`` for the
    padding (a zero pixel appended to the map); ``back`` ((h * w,)): for each pixel, its place among the windowed
    pixels. Two gathers replace pad, roll, partition, reverse, roll and crop: fewer copies, and index arithmetic
    that symbolic shapes keep small (torch.compile's code generator stalls in sympy on the fused modulo indexing of
    the six-step form at a second size). ``h``, ``w`` and ``shift`` may be ints, symbolic ints or (under
    ``torch.jit.trace``) 0-dim tensors, so that a trace at one size stays right at another.
    """
    nh, nw = (h + window - 1) // window, (w + window - 1) // window
    hp, wp = nh * window, nw * window
    y, x = _windowed_pixels(nh, nw, window, device)
    rows, cols = _mod(y + shift, hp), _mod(x + shift, wp)  # torch.roll(-shift): padded pixel y reads y + shift
    part = torch.where((rows < h) & (cols < w), rows * w + cols, h * w)
    rows = _mod(torch.arange(h, device=device) - shift + hp, hp)  # where each pixel went
    cols = _mod(torch.arange(w, device=device) - shift + wp, wp)
    back = ((rows // window * nw)[:, None] + (cols // window)[None, :]) * window ** 2 \
        + (rows % window * window)[:, None] + (cols % window)[None, :]
    return part, back.reshape(-1)


def _shift_mask(nh, nw, window: int, shift, device: torch.device) -> Tensor:
    """Additive mask (nh * nw, w*w, w*w) that keeps shifted windows from mixing regions (Swin's -100 rule).

    Regions of the padded, shifted map: 0 before the last window, 1 in it up to the ``shift`` rows (columns)
    rolled in from the top (left), 2 in those. Written as comparisons of pixel coordinates, not as slice
    assignments bounded by the map's size, so that symbolic sizes (and traced ones) stay cheap and general."""
    y, x = _windowed_pixels(nh, nw, window, device)

    def region(i: Tensor, n) -> Tensor:
        return (i >= (n - 1) * window).long() + (i >= n * window - shift).long()

    ids = (region(y, nh) * 3 + region(x, nw)).view(-1, window * window)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0)


class WindowAttention(nn.Module):
    """Window self-attention in the official layout: ``pre_proj`` yields v, q, k (in that order), ``rb`` is the
    relative-position bias table indexed by the ``relative_id`` buffer, ``post_proj`` projects back."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.window_size = window_size
        self.rb = nn.Parameter(torch.zeros(num_heads, (2 * window_size - 1) ** 2, **dd))
        trunc_normal_(self.rb, std=0.02)
        self.register_buffer("relative_id", _relative_position_index(window_size, device))
        self.pre_proj = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = attn_drop
        self.post_proj = nn.Linear(dim, dim, **dd)
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


# A leaf for torch.fx (timm's feature extraction): the shift and window padding depend on the map size.
@register_notrace_module
class SwinBlock(nn.Module):
    """Swin block on (B, H, W, C): pads to whole windows; ``shift`` is applied only when the map is larger
    than one window, unless ``always_shift`` (the detection backbone's rule)."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift: bool = False, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, always_shift: bool = False,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.always_shift = always_shift
        self.norm1 = norm_layer(dim, **dd)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop,
                       **dd)

    def _attend(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        shift = self.shift_size
        if shift and not self.always_shift:
            # one window covers the short side: the official classification model does not shift. Under
            # torch.jit.trace the sizes are 0-dim tensors and so is this decision (a Python branch would be frozen
            # at the traced size; a zero shift gives an all-zero mask)
            if torch.jit.is_tracing():
                shift = (torch.stack([h, w]).min() > ws).long() * shift
            elif min(h, w) <= ws:
                shift = 0
        nh, nw = (h + ws - 1) // ws, (w + ws - 1) // ws
        part, back = _window_indices(h, w, ws, shift, x.device)
        pixels = torch.cat([x.reshape(b, h * w, c), x.new_zeros(b, 1, c)], 1)  # + the zero padding pixel
        windows = pixels.index_select(1, part).view(-1, ws * ws, c)
        mask = _shift_mask(nh, nw, ws, shift, x.device) if isinstance(shift, Tensor) or shift else None
        return self.attn(windows, mask).reshape(b, -1, c).index_select(1, back).view(b, h, w, c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self._attend(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x downsampling: concatenate 2x2 neighbours in the order (0,0), (1,0), (0,1), (1,1), LayerNorm(4C),
    Linear(4C, 2C). Odd maps are zero-padded at the bottom/right."""

    def __init__(self, dim: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.norm = norm_layer(4 * dim, device=device, dtype=dtype)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        hh, hw = (h + 1) // 2, (w + 1) // 2  # output size, as in SwinBlock: no nested modulo for symbolic shapes
        x = F.pad(x, (0, 0, 0, 2 * hw - w, 0, 2 * hh - h))
        x = x.reshape(b, hh, 2, hw, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


@register_notrace_function  # resizes only when the grid differs: a shape test torch.fx cannot trace
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
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Options as the official ``ELSASwin`` (same names and meanings), plus:

        head_drop_rate: dropout before the classifier (not in the official model; default 0 as there).
        always_shift, elsa_backend, elsa_stages: see the module docstring, ``ELSA`` and the stage layout.
        global_pool: timm's pooling types for NHWC maps (``avg``, ``max``, ``avgmax``, ``catavgmax``, or ``''``
            for none); another type fails as in timm's Swin (an AssertionError).
        device, dtype: where and in which dtype the parameters are created (timm's factory arguments).

        ``drop_rate`` is the official dropout: after the patch (and position) embedding, in every block's MLP and
        in the window attention's output projection, never on the ELSA projection nor before the head. ``ape``
        adds a learned absolute position embedding (trunc-normal, std 0.02) after the patch embedding, resized
        bicubically when the input grid differs from ``img_size``'s; ``patch_norm=False`` drops the patch
        embedding's LayerNorm; ``use_checkpoint`` turns on gradient checkpointing; ``dilation``, ``dim_qk``,
        ``dim_v`` and ``groups`` go to every ELSA block (the official model passes them through to its blocks).
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        num_stages = len(depths)
        elsa_stages = num_stages - 1 if elsa_stages is None else elsa_stages
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_features = int(embed_dim * 2 ** (num_stages - 1))
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, norm_layer=norm_layer if patch_norm else None,
                                      output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True, **dd)
        self.ape = ape
        self.absolute_pos_embed: Optional[nn.Parameter] = None
        if ape:  # the official classifier's layout: (1, patches, C)
            grid = self.patch_embed.grid_size
            self.absolute_pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, grid[0] * grid[1], embed_dim, **dd),
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
                                    backend=elsa_backend, **dd) for r in rates]
            else:
                blocks = [SwinBlock(dim, heads, window_size, shift=j % 2 == 1, mlp_ratio=mlp_ratio,
                                    qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                                    drop_path=r, norm_layer=norm_layer, always_shift=always_shift, **dd)
                          for j, r in enumerate(rates)]
            downsample = PatchMerging(dim, norm_layer, **dd) if i < num_stages - 1 else None
            stages.append(ELSASwinStage(blocks, downsample))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"layers.{i}"))
        self.layers = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features, **dd)
        self.global_pool = global_pool
        self.head_pool = self._pool(global_pool)
        self.head_hidden_size = self.num_features * self.head_pool.feat_mult()
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if use_checkpoint:
            self.set_grad_checkpointing(True)

    @staticmethod
    def _pool(global_pool: str) -> SelectAdaptivePool2d:
        """timm's global pooling of the NHWC map (asserts on an unknown type, as timm's Swin does)."""
        return SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool), input_fmt="NHWC")

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
        # pad to whole patches here, as the window stage does (ceil division), so that the patch embedding's own
        # padding, (p - H % p) % p, is zero; with symbolic sizes that nested modulo would run through every later
        # stage's size expression, and torch.compile's code generator stalls in sympy on them
        (ph, pw), (h, w) = self.patch_embed.patch_size, x.shape[-2:]
        x = self.patch_embed(F.pad(x, (0, (w + pw - 1) // pw * pw - w, 0, (h + ph - 1) // ph * ph - h)))
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
        """A new head (on the model's device and dtype) for ``num_classes``; ``global_pool`` None keeps the pooling."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            self.head_pool = self._pool(global_pool)
            self.global_pool = global_pool
        self.head_hidden_size = self.num_features * self.head_pool.feat_mult()
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head_pool.train(self.training)  # new modules follow the model's mode
        self.head.train(self.training)

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

        ``norm`` applies the final norm to the last stage's map only (it is sized for it; timm's Swin convention);
        with ``stop_early`` before the last stage the returned final map is that stage's, unnormalised."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        intermediates = []
        x = self._embed(x)
        last = len(self.layers) - 1
        stages = self.layers[:max_index + 1] if stop_early else self.layers
        i = 0
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if i in take:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
            if stage.downsample is not None and i < len(stages) - 1:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if i == last else x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last of ``indices`` (timm's contract). Cutting before the last stage also drops
        the final norm (sized for the last stage) and the head, and ``num_features`` becomes the kept stage's."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> normalised last-stage map (B, H/32, W/32, num_features)."""
        x = self._embed(x)
        x = self.layers(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_pool(x)
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
    default_indices = tuple(range(len(kwargs.get("depths", (2, 2, 6, 2)))))  # every stage (pico has 3)
    out_indices = kwargs.pop("out_indices", default_indices)
    if kwargs.get("feature_cls") == "getter":
        kwargs["feature_cls"] = FeatureGetterNet  # timm's getter, with set_grad_checkpointing
    return build_model_with_cfg(
        ELSASwin, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls=FeatureGetterNet, out_indices=out_indices),
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
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
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
    "elsa_swin_pico.untrained": _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0,
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
