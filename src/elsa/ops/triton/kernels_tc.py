"""Tensor-core Triton kernels for ELSA aggregation at stride 1 (row-band products). Only ``@triton.jit`` here.

Notation as in ``kernels.py``: N = B * G samples n = b * G + g of C channels, v (B, G*C, H, W), logits/attention
a (B, G*K*K, H, W), additive ghost d (G, C, K, K) or (B, G, C, K, K), all addressed through their strides
(``kernels._sample``); neighbour k = i*K + j of pixel (y, x) reads v at (y + (i - K//2)*R, x + (j - K//2)*R),
zero outside the image.

A program owns a TILE_H x TILE_W tile of pixels and a block of channels. For each neighbour row i the tile's
pixel row ty reads one source row, and its pixels read K columns of the same ``SPAN``-wide window of it
(the window starts _pad(K, DIL, VEC) columns left of the tile; SPAN, a power of two, covers the tile and
K//2 * DIL columns either side): the attention of the row to that window is a band matrix A_i
(TILE_W x SPAN), and the aggregation is the batched product A_i (TILE_H, TILE_W, SPAN) @ V_i (TILE_H, SPAN,
BLOCK_C) on tensor cores. The K logits of each pixel's neighbour row are loaded compactly (KP slots, the
spare ones zero), turned into probabilities from per-pixel float32 softmax statistics of a first pass, and
spread onto the band with ``tl.gather``.

The additive ghost does not depend on the pixel: for channel c it is a Toeplitz band T_i[c] (SPAN x TILE_W)
with T_i[c][s, tx] = d[c, i, (s - tx)/R], and its term is the batched product
V_i^T (BLOCK_C, TILE_H, SPAN) @ T_i (BLOCK_C, SPAN, TILE_W). T_i is spread from the ghost's row i once per
program and neighbour row, the same way. The multiplicative ghost (m * a) is not a product of two matrices;
it stays on the CUDA-core kernels.

Costs (SASS instructions per element-neighbour, whole kernels) are counted by benchmarks/kernel_sass.py.

``TRANSPOSED`` turns the same kernel into the v-gradient: gv[c, y, x] = sum_k g[c, q] * (a[k, q] + d[c, k])
with q = (y - (i - K//2)*R, x - (j - K//2)*R), i.e. neighbour rows and columns reflected and the attention
read at the source position q (with the softmax, from the base-2 log-sum-exp the attention-gradient kernel wrote).

Products run in the storage dtype (float16/bfloat16) with float32 accumulation; float32 inputs use the
CUDA-core kernels (tl.dot would default to TF32). ``UPCAST_DOT`` is for Triton's CPU interpreter only, whose
bfloat16 ``tl.dot`` multiplies raw bit patterns: the operands are rounded to the storage dtype and then
upcast, which is what the tensor cores compute (exact products, float32 sums).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .kernels import LOG2E, _log2_sum_exp, _sample

_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _tile_pid(H, W, C, BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """(n as int64, first channel, first row, first column) of this program; 1-D grid, tiles fastest."""
    tiles_w = tl.cdiv(W, TILE_W)
    tiles = tl.cdiv(H, TILE_H) * tiles_w
    pid = tl.program_id(0)
    t = pid % tiles
    nc = pid // tiles
    num_cb = tl.cdiv(C, BLOCK_C)
    return (nc // num_cb).to(tl.int64), (nc % num_cb) * BLOCK_C, (t // tiles_w) * TILE_H, (t % tiles_w) * TILE_W


@triton.jit
def _band_index(TILE_W: tl.constexpr, SPAN: tl.constexpr, K: tl.constexpr, DIL: tl.constexpr,
                TRANSPOSED: tl.constexpr, VEC: tl.constexpr):
    """(1, TILE_W, SPAN): the neighbour column j that links pixel column tx to window column s (source
    column x0 - _pad(K, DIL, VEC) + s), or K where none does: the spare slot of the compact rows, which holds
    zero, so the gathered band needs no select. Independent of the neighbour row: computed once per program."""
    tx = tl.arange(0, TILE_W)[None, :, None]
    s = tl.arange(0, SPAN)[None, None, :]
    off = s - tx - (_pad(K, DIL, VEC) - (K // 2) * DIL)
    jo = off // DIL
    valid = (off >= 0) & (off % DIL == 0) & (jo < K)
    if TRANSPOSED:
        j = K - 1 - jo
    else:
        j = jo
    return tl.where(valid, j, K)


@triton.jit
def _pad(K: tl.constexpr, DIL: tl.constexpr, VEC: tl.constexpr):
    """Columns the source window starts left of the tile: K//2 * DIL rounded up to VEC, so that the window is
    whole vectors of VEC columns."""
    return ((K // 2) * DIL + VEC - 1) // VEC * VEC


@triton.jit
def _window_columns(x0, W, VEC: tl.constexpr, SPAN: tl.constexpr, PAD: tl.constexpr):
    """(source columns, inside the image) of the window. With VEC > 1 (W % VEC == 0) the test is made per
    chunk of VEC columns, which gives the same answer and lets the compiler see the mask constant over a
    vector: v loads become vector loads."""
    sw = tl.arange(0, SPAN)
    xs = x0 - PAD + sw
    if VEC > 1:
        chunk = x0 - PAD + (sw // VEC) * VEC
        return xs, (chunk >= 0) & (chunk < W)
    else:
        return xs, (xs >= 0) & (xs < W)


@triton.jit
def _load_g(g_base, y, x, offs_c, sg_c, sg_h, sg_w, mask, G_VEC: tl.constexpr):
    """The (TILE_H, TILE_W, BLOCK_C) tile of the output gradient."""
    ptrs = g_base + (y * sg_h)[:, None, None] + (x * sg_w)[None, :, None] + (offs_c * sg_c)[None, None, :]
    if G_VEC > 1:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [1, 2 * G_VEC, 1]), [1, G_VEC, 1])
        mask = tl.max_constancy(mask, [1, G_VEC, 1])
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _dot(a, b, acc, UPCAST_DOT: tl.constexpr):
    """acc + a @ b on tensor cores; a and b are already in the storage dtype."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def elsa_band_kernel(
    src_ptr, a_ptr, d_ptr, lse_ptr, out_ptr,
    C, H, W, G,
    ss_b, ss_c, ss_h, ss_w,
    sa_b, sa_k, sa_h, sa_w,
    sd_b, sd_g, sd_c, sd_i, sd_j,
    so_b, so_c, so_h, so_w,
    K: tl.constexpr, DIL: tl.constexpr,
    HAS_ADD: tl.constexpr, SOFTMAX: tl.constexpr, TRANSPOSED: tl.constexpr, UPCAST_DOT: tl.constexpr,
    EVEN_C: tl.constexpr, VEC: tl.constexpr,
    BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, SPAN: tl.constexpr, KP: tl.constexpr,
):
    """Forward (src = v) or, with TRANSPOSED, v-gradient (src = grad of out). out (B, G*C, H, W) by its strides.

    Grid: (N * channel blocks * pixel tiles,), tiles fastest. lse (N, H, W) float32, base 2, is read only when
    TRANSPOSED and SOFTMAX. The K logits of a neighbour row are loaded compactly (KP slots per pixel, a
    quarter of the band's entries, slots K.. zero), turned into probabilities there, and spread onto the band
    with ``tl.gather``; the ghost row is spread onto its Toeplitz band the same way. EVEN_C: C % BLOCK_C == 0.
    VEC: the widest vector (1, 2, 4 or 8 columns) with W, the src strides and address multiples of it (unit
    column stride); the window then starts VEC-aligned and its loads are vectors.
    """
    n, c0, y0, x0 = _tile_pid(H, W, C, BLOCK_C, TILE_H, TILE_W)
    KK: tl.constexpr = K * K
    HALF: tl.constexpr = (K // 2) * DIL
    if VEC > 1:
        ss_b = tl.multiple_of(ss_b, VEC)
        ss_c = tl.multiple_of(ss_c, VEC)
        ss_h = tl.multiple_of(ss_h, VEC)

    ty = tl.arange(0, TILE_H)
    tx = tl.arange(0, TILE_W)
    jk = tl.arange(0, KP)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    if EVEN_C:
        mask_c = tl.full([BLOCK_C], 1, tl.int1)
    else:
        mask_c = offs_c < C
    y = y0 + ty
    x = x0 + tx
    xs, in_xs = _window_columns(x0, W, VEC, SPAN, _pad(K, DIL, VEC))
    in_p = (y < H)[:, None] & (x < W)[None, :]

    src_base = src_ptr + _sample(n, G, ss_b, C * ss_c)
    a_base = a_ptr + _sample(n, G, sa_b, KK * sa_k)
    d_base = d_ptr + _sample(n, G, sd_b, sd_g)
    j = _band_index(TILE_W, SPAN, K, DIL, TRANSPOSED, VEC)  # (1, TILE_W, SPAN)
    j_t = tl.permute(j, (0, 2, 1))  # (1, SPAN, TILE_W)

    if SOFTMAX and not TRANSPOSED:
        lse2 = _log2_sum_exp(a_base, y[:, None] * sa_h + x[None, :] * sa_w, in_p, sa_k, K, True)

    acc = tl.zeros([TILE_H, TILE_W, BLOCK_C], tl.float32)
    if HAS_ADD:
        gacc = tl.zeros([BLOCK_C, TILE_H, TILE_W], tl.float32)
    for ii in range(K):
        if TRANSPOSED:
            i = K - 1 - ii
        else:
            i = ii
        ys = y + (ii * DIL - HALF)  # source row of each tile row
        in_ys = (ys >= 0) & (ys < H)
        # V_i (TILE_H, SPAN, BLOCK_C), zero outside the image and past C.
        v_mask = in_ys[:, None, None] & in_xs[None, :, None] & mask_c[None, None, :]
        v_ptrs = (src_base + (ys * ss_h)[:, None, None] + (xs * ss_w)[None, :, None]
                  + (offs_c * ss_c)[None, None, :])
        if VEC > 1:  # what the compiler cannot prove: chunks of VEC columns, aligned, masked as a whole
            v_ptrs = tl.max_contiguous(tl.multiple_of(v_ptrs, [1, 2 * VEC, 1]), [1, VEC, 1])
            v_mask = tl.max_constancy(v_mask, [1, VEC, 1])
        vt = tl.load(v_ptrs, mask=v_mask, other=0.0)

        # A_i (TILE_H, TILE_W, SPAN): the band of attention, spread from the compact logits of the row.
        k = i * K + jk
        if TRANSPOSED:  # attention at the source pixel (ys, xs): compact (TILE_H, SPAN, KP)
            src_in = in_ys[:, None] & in_xs[None, :]
            lg = tl.load(a_base + (ys * sa_h)[:, None, None] + (xs * sa_w)[None, :, None] + (k * sa_k)[None, None, :],
                         mask=src_in[:, :, None] & (jk < K)[None, None, :], other=0.0).to(tl.float32)
            if SOFTMAX:
                lse = tl.load(lse_ptr + n * H * W + (ys * W)[:, None] + xs[None, :], mask=src_in, other=0.0)
                lg = tl.where((jk < K)[None, None, :], tl.exp2(lg * LOG2E - lse[:, :, None]), 0.0)
            att = tl.permute(tl.gather(lg, tl.broadcast_to(j_t, [TILE_H, SPAN, TILE_W]), 2), (0, 2, 1))
        else:  # attention at the output pixel (y, x): compact (TILE_H, TILE_W, KP)
            lg = tl.load(a_base + (y * sa_h)[:, None, None] + (x * sa_w)[None, :, None] + (k * sa_k)[None, None, :],
                         mask=in_p[:, :, None] & (jk < K)[None, None, :], other=0.0).to(tl.float32)
            if SOFTMAX:
                lg = tl.where((jk < K)[None, None, :], tl.exp2(lg * LOG2E - lse2[:, :, None]), 0.0)
            att = tl.gather(lg, tl.broadcast_to(j, [TILE_H, TILE_W, SPAN]), 2)
        acc = _dot(att.to(vt.dtype), vt, acc, UPCAST_DOT)

        if HAS_ADD:
            # T_i (BLOCK_C, SPAN, TILE_W): per-channel Toeplitz band of the ghost row i.
            drow = tl.load(d_base + (offs_c * sd_c)[:, None] + i * sd_i + (jk * sd_j)[None, :],
                           mask=mask_c[:, None] & (jk < K)[None, :], other=0.0)
            ghost = tl.gather(tl.broadcast_to(drow[:, None, :], [BLOCK_C, SPAN, KP]),
                              tl.broadcast_to(j_t, [BLOCK_C, SPAN, TILE_W]), 2)
            gacc = _dot(tl.permute(vt, (2, 0, 1)), ghost.to(vt.dtype), gacc, UPCAST_DOT)

    if HAS_ADD:
        acc += tl.permute(gacc, (1, 2, 0))
    out_ptrs = (out_ptr + _sample(n, G, so_b, C * so_c) + (offs_c * so_c)[None, None, :]
                + (y * so_h)[:, None, None] + (x * so_w)[None, :, None])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_p[:, :, None] & mask_c[None, None, :])


@triton.jit
def elsa_band_bwd_attn_kernel(
    g_ptr, v_ptr, a_ptr, ga_ptr, dp_ptr, gd_ptr, lse_ptr,
    C, H, W, G,
    sg_b, sg_c, sg_h, sg_w,
    sv_b, sv_c, sv_h, sv_w,
    sa_b, sa_k, sa_h, sa_w,
    sga_b, sga_k, sga_h, sga_w,
    sgd_b,
    K: tl.constexpr, DIL: tl.constexpr,
    SOFTMAX: tl.constexpr, WRITE_LSE: tl.constexpr, NEED_ATTN: tl.constexpr, NEED_ADD: tl.constexpr,
    UPCAST_DOT: tl.constexpr, ALL_C: tl.constexpr, VEC: tl.constexpr, G_VEC: tl.constexpr,
    BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, SPAN: tl.constexpr, KP: tl.constexpr,
):
    """Gradients of the attention (or logits) and of the additive ghost. Grid: (N * pixel tiles,).

    For neighbour row i, the products of the tile's gradient rows with the v window,
    GV_i = G (TILE_H, TILE_W, C) @ V_i^T (TILE_H, C, SPAN), hold dp[k, p] = sum_c g[c, p] v[c, q_k(p)] on
    their band (gathered out with ``tl.gather``); per channel, M_i[c] = G[c]^T (TILE_W, TILE_H) @ V_i[c]
    (TILE_H, SPAN) holds the ghost gradient sum_p g[c, p] v[c, q_k(p)] on its band, summed over the tile's
    columns and added atomically (float32) to gd (Bg, G, C, K*K) (Bg = 1, batch stride sgd_b = 0, for a ghost
    shared by the batch). ga (B, G*K*K, H, W) is addressed through its strides (sga). With SOFTMAX, dp goes
    first to the float32 scratch dp, laid out as ga: the softmax backward
    d logit_k = p_k (dp_k - sum_k' p_k' dp_k') reads it back in float32 (rounded to bfloat16 it would cost more
    than the bfloat16 tolerance) and writes ga in its own dtype. VEC, G_VEC: as the forward's VEC, of v
    and of g (whose tile starts at a multiple of TILE_W >= G_VEC columns: W % G_VEC == 0 makes its
    mask whole chunks).
    """
    n, _, y0, x0 = _tile_pid(H, W, 1, 1, TILE_H, TILE_W)
    KK: tl.constexpr = K * K
    HALF: tl.constexpr = (K // 2) * DIL
    PAD: tl.constexpr = _pad(K, DIL, VEC)
    if VEC > 1:
        sv_b = tl.multiple_of(sv_b, VEC)
        sv_c = tl.multiple_of(sv_c, VEC)
        sv_h = tl.multiple_of(sv_h, VEC)

    ty = tl.arange(0, TILE_H)
    tx = tl.arange(0, TILE_W)
    y = y0 + ty
    x = x0 + tx
    xs, in_xs = _window_columns(x0, W, VEC, SPAN, PAD)
    in_p = (y < H)[:, None] & (x < W)[None, :]
    jk = tl.arange(0, KP)
    # Window column of neighbour column j of pixel column tx (clamped where j >= K: never stored).
    band_idx = tl.minimum(tx[:, None] + (PAD - HALF) + jk[None, :] * DIL, SPAN - 1)
    store_mask = in_p[:, :, None] & (jk < K)[None, None, :]

    g_base = g_ptr + _sample(n, G, sg_b, C * sg_c)
    v_base = v_ptr + _sample(n, G, sv_b, C * sv_c)
    a_base = a_ptr + _sample(n, G, sa_b, KK * sa_k)
    p_off = (y * sa_h)[:, None] + (x * sa_w)[None, :]
    pix = _sample(n, G, sga_b, KK * sga_k) + (y * sga_h)[:, None] + (x * sga_w)[None, :]
    gd_base = gd_ptr + _sample(n, G, sgd_b, C * KK)
    if SOFTMAX:
        dp_base = dp_ptr + pix
    else:
        dp_base = ga_ptr + pix
    if SOFTMAX:
        lse2 = _log2_sum_exp(a_base, y[:, None] * sa_h + x[None, :] * sa_w, in_p, sa_k, K, False)
        if WRITE_LSE:
            tl.store(lse_ptr + n * H * W + (y * W)[:, None] + x[None, :], lse2, mask=in_p)
        pdp = tl.zeros([TILE_H, TILE_W], tl.float32)

    if ALL_C:  # one channel block: the gradient tile is loaded once
        offs_c = tl.arange(0, BLOCK_C)
        g_all = _load_g(g_base, y, x, offs_c, sg_c, sg_h, sg_w, in_p[:, :, None] & (offs_c < C)[None, None, :],
                        G_VEC)
    for i in range(K):
        ys = y + (i * DIL - HALF)
        in_ys = (ys >= 0) & (ys < H)
        gv = tl.zeros([TILE_H, TILE_W, SPAN], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            if ALL_C:
                gt = g_all
            else:
                gt = _load_g(g_base, y, x, offs_c, sg_c, sg_h, sg_w, in_p[:, :, None] & mask_c[None, None, :],
                             G_VEC)
            v_ptrs = (v_base + (ys * sv_h)[:, None, None] + (xs * sv_w)[None, None, :]
                      + (offs_c * sv_c)[None, :, None])
            v_mask = in_ys[:, None, None] & mask_c[None, :, None] & in_xs[None, None, :]
            if VEC > 1:  # as in the forward
                v_ptrs = tl.max_contiguous(tl.multiple_of(v_ptrs, [1, 1, 2 * VEC]), [1, 1, VEC])
                v_mask = tl.max_constancy(v_mask, [1, 1, VEC])
            vt = tl.load(v_ptrs, mask=v_mask, other=0.0)
            if NEED_ATTN:
                gv = _dot(gt, vt, gv, UPCAST_DOT)
            if NEED_ADD:
                m = _dot(tl.permute(gt, (2, 1, 0)), tl.permute(vt, (1, 0, 2)),
                         tl.zeros([BLOCK_C, TILE_W, SPAN], tl.float32), UPCAST_DOT)
                idx = tl.broadcast_to(band_idx[None, :, :], [BLOCK_C, TILE_W, KP])
                gd = tl.sum(tl.gather(m, idx, 2), axis=1)  # (BLOCK_C, KP)
                tl.atomic_add(gd_base + offs_c[:, None] * KK + i * K + jk[None, :], gd,
                              mask=mask_c[:, None] & (jk < K)[None, :], sem="relaxed")
        if NEED_ATTN:
            dp = tl.gather(gv, tl.broadcast_to(band_idx[None, :, :], [TILE_H, TILE_W, KP]), 2)
            k = i * K + jk[None, None, :]
            tl.store(dp_base[:, :, None] + k * sga_k, dp.to(dp_base.dtype.element_ty), mask=store_mask)
            if SOFTMAX:
                lg = tl.load(a_base + k * sa_k + p_off[:, :, None], mask=store_mask, other=0.0).to(tl.float32)
                prob = tl.where(store_mask, tl.exp2(lg * LOG2E - lse2[:, :, None]), 0.0)
                pdp += tl.sum(prob * dp, axis=2)

    if SOFTMAX and NEED_ATTN:
        # Read back what this program wrote (through L1/L2); the barrier orders every thread's stores first.
        tl.debug_barrier()
        for k in tl.static_range(KK):  # unrolled: one pixel per thread, the loop control would cost a third
            lg = tl.load(a_base + k * sa_k + p_off, mask=in_p, other=0.0).to(tl.float32)
            dp = tl.load(dp_base + k * sga_k, mask=in_p, other=0.0)
            tl.store(ga_ptr + pix + k * sga_k, (tl.exp2(lg * LOG2E - lse2) * (dp - pdp)).to(ga_ptr.dtype.element_ty),
                     mask=in_p)
