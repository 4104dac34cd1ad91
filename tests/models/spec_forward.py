"""ELSA-Swin's classification forward written directly from the spec (sections 1-3), as functions of an
official-layout state dict. It shares no code with elsa.models, so agreement checks parity with the official
model given the same weights."""
import math

import torch
import torch.nn.functional as F

from elsa.ops import reference


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)


def _linear(x, sd, p, bias=True):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"] if bias else None)


def relative_index(window=7):
    """Swin's relative position index, from its definition."""
    idx = torch.empty(window ** 2, window ** 2, dtype=torch.long)
    for a in range(window ** 2):
        for b in range(window ** 2):
            dy = a // window - b // window + window - 1
            dx = a % window - b % window + window - 1
            idx[a, b] = dy * (2 * window - 1) + dx
    return idx.flatten()


def elsa_attention(x, sd, p, heads, group_width, k=7):
    b, h, w, c = x.shape
    dqk = math.ceil((c // 3 * 2) / group_width) * group_width
    t = F.conv2d(x.permute(0, 3, 1, 2), sd[p + "pre_proj.weight"], sd[p + "pre_proj.bias"])
    q, kk, v = t[:, :dqk], t[:, dqk:2 * dqk], t[:, 2 * dqk:]
    hadamard = q * kk  # qk_scale = 1 in ELSA-Swin
    a = F.conv2d(hadamard, sd[p + "attn.0.weight"], sd[p + "attn.0.bias"], padding=k // 2, groups=dqk // group_width)
    a = F.conv2d(F.gelu(a), sd[p + "attn.2.weight"], sd[p + "attn.2.bias"])
    a = a.reshape(b * heads, k * k, h, w).softmax(1)
    d = sd[p + "ghost_head"].expand(b, c, k, k).reshape(b * heads, c // heads, k, k)  # lam=0, gamma=1
    out = reference.aggregate(v.reshape(b * heads, c // heads, h, w), a, None, d, k, 1, 1)
    return _linear(out.reshape(b, c, h, w).permute(0, 2, 3, 1), sd, p + "post_proj")


def window_attention_single_window(x, sd, p, heads):
    """The 7x7 map at 224 input is one window; no shift."""
    b, h, w, c = x.shape
    n, hd = h * w, c // heads
    t = _linear(x.reshape(b, n, c), sd, p + "pre_proj").reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    v, q, k = t[0], t[1], t[2]  # official order: v, q, k
    bias = sd[p + "rb"][:, relative_index(h)].reshape(heads, n, n)
    attn = (q @ k.transpose(-2, -1) * hd ** -0.5 + bias).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(b, h, w, c)
    return _linear(out, sd, p + "post_proj")


def spec_forward(sd, x, depths, heads, group_width):
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4).permute(0, 2, 3, 1)
    x = _ln(x, sd, "patch_embed.norm")
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            y = _ln(x, sd, p + "norm1")
            if i < len(depths) - 1:
                x = x + elsa_attention(y, sd, p + "attn.", heads[i], group_width)
            else:
                x = x + window_attention_single_window(y, sd, p + "attn.", heads[i])
            y = _ln(x, sd, p + "norm2")
            x = x + _linear(F.gelu(_linear(y, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
        if i < len(depths) - 1:
            q = f"layers.{i}.downsample."
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
            x = _linear(_ln(x, sd, q + "norm"), sd, q + "reduction", bias=False)
    x = _ln(x, sd, "norm").mean((1, 2))
    return _linear(x, sd, "head")
