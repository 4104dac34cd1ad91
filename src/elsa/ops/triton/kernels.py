"""Triton kernels for ELSA aggregation (spec section 1). Only ``@triton.jit`` functions live here.

Notation: the kernels work on N = B * G samples, one (batch element b, head g) each, n = b * G + g, with C
channels per head. v (B, G*C, H, W), attention a (B, G*K*K, Ho, Wo), ghosts m, d (G, C, K, K) shared by the
batch or (B, G, C, K, K) per sample, out and its gradient g (B, G*C, Ho, Wo). Neighbour k = i*K + j of output
pixel (y, x) reads v at (y*S + (i - K//2)*R, x*S + (j - K//2)*R), zero outside the image. Every tensor is
addressed through its strides (``_sample``: sample n of a tensor with batch stride s_b and head stride s_g),
so the channels-last maps a projection writes, head slices and expanded gradients need no copy; a ghost shared
by the batch has batch stride 0.

All arithmetic is float32 whatever the storage dtype; results are cast on store.

With ``SOFTMAX`` the attention pointer holds logits and the softmax over the K*K neighbours is done in
registers: a first pass over k computes the running max and sum for the pixel tile, later passes turn each
logit into a probability as it is loaded. The softmaxed map is never written.

Every kernel reads each input from DRAM about once and keeps the K*K loop inside the program: the re-reads of
v at shifted positions (and of g in the backward) hit L1/L2. What bounds the kernels is then instruction
issue (49 gather-multiply-adds per element at K = 7), so the loops keep per-element work to a load, an address
and two FMAs: masks and zeroing are done per pixel or per channel, not per element
(benchmarks/kernel_sass.py counts the instructions).
"""
from __future__ import annotations

import triton
import triton.language as tl

# A finite "minus infinity" for the running max: a -inf start would make exp(-inf - -inf) = nan when a
# logit is itself -inf (a masked neighbour).
_NEG_BIG = tl.constexpr(-1.0e30)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _sample(n, G, s_b, s_g):
    """Offset of sample n = b * G + g (int64) in a tensor whose batch and head strides are s_b and s_g."""
    return (n // G) * s_b + (n % G) * s_g


@triton.jit
def _split_pid(num_pixels, BLOCK_P: tl.constexpr):
    """(outer index, pixel tile) of this program in a 1-D grid with pixel tiles varying fastest.

    A 1-D grid has no 65535 limit (the y axis has: N * channel blocks reaches it at large batch), and
    consecutive programs work on neighbouring tiles of one image, which share their shifted v rows in L2.
    """
    num_tiles = tl.cdiv(num_pixels, BLOCK_P)
    pid = tl.program_id(0)
    return pid // num_tiles, pid % num_tiles


@triton.jit
def _channel_mask(offs_c, C, EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr):
    """offs_c < C; a constant all-true mask when C is a multiple of BLOCK_C, so the compiler drops the
    per-element channel predicates (on a GPU they cost about as many instructions as the loads they guard)."""
    if EVEN_C:
        return tl.full([BLOCK_C], 1, tl.int1)
    else:
        return offs_c < C


@triton.jit
def _clamp_channels(offs_c, C, EVEN_C: tl.constexpr):
    """Channel indices safe to load unmasked: a partial block re-reads channel C - 1 (never stored)."""
    if EVEN_C:
        return offs_c
    else:
        return tl.minimum(offs_c, C - 1)


@triton.jit
def _clamp(idx, size):
    """idx clamped to [0, size): a valid address to load from, whose value the caller weights by zero."""
    return tl.minimum(tl.maximum(idx, 0), size - 1)


@triton.jit
def _channel_block(pid_nc, C, EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr):
    """(n as int64, channel offsets, their store mask, their clamped load indices) of a program whose outer
    grid index ``pid_nc`` runs over (n, channel block), channel blocks fastest."""
    num_cb = tl.cdiv(C, BLOCK_C)
    offs_c = (pid_nc % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    return ((pid_nc // num_cb).to(tl.int64), offs_c, _channel_mask(offs_c, C, EVEN_C, BLOCK_C),
            _clamp_channels(offs_c, C, EVEN_C))


@triton.jit
def _neighbour_weight(a, inside, m_ptrs, d_ptrs, HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr):
    """(BLOCK_C, BLOCK_P) weight m * a + d of one neighbour, zero where ``inside`` (per pixel) is false.

    The value it weights was loaded unmasked at a clamped position: zeroing the weight once per pixel is
    cheaper than a predicate and a zero fill per element."""
    inside = inside.to(tl.float32)
    a = a * inside
    if HAS_MUL:
        f = tl.load(m_ptrs).to(tl.float32)[:, None] * a[None, :]
    else:
        f = a[None, :]
    if HAS_ADD:
        f = f + tl.load(d_ptrs).to(tl.float32)[:, None] * inside[None, :]
    return f


@triton.jit
def _log2_sum_exp(a_base, off, inside, sa_k, K: tl.constexpr, ROW_LOOP: tl.constexpr):
    """log2 sum_k 2^(logit_k * log2 e) over the K*K logits of each pixel (logit k at a_base + k * sa_k + off,
    any shape of pixels): the base-2 log-sum-exp, so that a probability is one FFMA and one ex2,
    ``exp2(logit * LOG2E - lse2)``. Used by these kernels and the tensor-core ones (kernels_tc.py).

    ``tl.exp2`` is a bare MUFU.EX2 on sm_90 where ``tl.exp`` adds a denormal fix-up around it. Every logit loads
    at a constant offset and costs a max, an FFMA, an ex2 and an add. Without ROW_LOOP it is unrolled whole, in
    two passes (max, then sum). With it, a loop runs over the K neighbour rows, each unrolled, with an online
    rescaling (one more ex2 per row): for a tensor-core tile of fewer pixels than threads, where the unrolled
    form lets the compiler lay the statistics out as the products want them and repeat each pixel in up to
    eight threads."""
    mx2 = tl.full(off.shape, _NEG_BIG, tl.float32)
    sm = tl.zeros(off.shape, tl.float32)
    if ROW_LOOP:
        for i in range(K):
            row_mx = tl.full(off.shape, _NEG_BIG, tl.float32)
            for j in tl.static_range(K):
                lg = tl.load(a_base + (i * K + j) * sa_k + off, mask=inside, other=0.0).to(tl.float32)
                row_mx = tl.maximum(row_mx, lg)
            new_mx2 = tl.maximum(mx2, row_mx * LOG2E)
            sm = sm * tl.exp2(mx2 - new_mx2)
            for j in tl.static_range(K):
                lg = tl.load(a_base + (i * K + j) * sa_k + off, mask=inside, other=0.0).to(tl.float32)
                sm += tl.exp2(lg * LOG2E - new_mx2)
            mx2 = new_mx2
    else:
        for k in tl.static_range(K * K):
            mx2 = tl.maximum(mx2, tl.load(a_base + k * sa_k + off, mask=inside, other=0.0).to(tl.float32))
        mx2 = mx2 * LOG2E
        for k in tl.static_range(K * K):
            lg = tl.load(a_base + k * sa_k + off, mask=inside, other=0.0).to(tl.float32)
            sm += tl.exp2(lg * LOG2E - mx2)
    return mx2 + tl.log2(sm)


@triton.jit
def elsa_fwd_kernel(
    v_ptr, a_ptr, m_ptr, d_ptr, out_ptr,
    C, H, W, Ho, Wo, G,
    sv_b, sv_c, sv_h, sv_w,
    sa_b, sa_k, sa_h, sa_w,
    sm_b, sm_g, sm_c, sm_i, sm_j,
    sd_b, sd_g, sd_c, sd_i, sd_j,
    so_b, so_c, so_h, so_w,
    K: tl.constexpr, DIL: tl.constexpr, STRIDE: tl.constexpr,
    HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr, SOFTMAX: tl.constexpr,
    EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """out (B, G*C, Ho, Wo) through its strides. Grid: (N * channel blocks * pixel tiles,), pixel tiles fastest."""
    pid_nc, pid_p = _split_pid(Ho * Wo, BLOCK_P)
    n, offs_c, mask_c, load_c = _channel_block(pid_nc, C, EVEN_C, BLOCK_C)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < Ho * Wo
    y = offs_p // Wo
    x = offs_p % Wo

    a_base = a_ptr + _sample(n, G, sa_b, K * K * sa_k)
    a_off = y * sa_h + x * sa_w
    if SOFTMAX:
        lse2 = _log2_sum_exp(a_base, a_off, mask_p, sa_k, K, False)

    # Index arithmetic is hoisted out of the K*K loop by hand: the compiler would do it on a GPU, the CPU
    # interpreter (where the tests run) pays for every integer op.
    a_ptrs = a_base + a_off
    v_base = v_ptr + _sample(n, G, sv_b, C * sv_c) + load_c[:, None] * sv_c
    m_base = m_ptr + _sample(n, G, sm_b, sm_g) + load_c * sm_c
    d_base = d_ptr + _sample(n, G, sd_b, sd_g) + load_c * sd_c
    y0 = y * STRIDE - (K // 2) * DIL
    x0 = x * STRIDE - (K // 2) * DIL
    acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for i in range(K):
        yy = y0 + i * DIL
        in_y = mask_p & (yy >= 0) & (yy < H)
        v_row = v_base + (_clamp(yy, H) * sv_h)[None, :]
        m_row = m_base + i * sm_i
        d_row = d_base + i * sd_i
        for j in range(K):
            xx = x0 + j * DIL
            # v is read unmasked at the clamped position; _neighbour_weight zeroes the weight of a neighbour
            # outside the image.
            inside = in_y & (xx >= 0) & (xx < W)
            a = tl.load(a_ptrs, mask=mask_p, other=0.0).to(tl.float32)
            a_ptrs += sa_k
            if SOFTMAX:
                a = tl.exp2(a * LOG2E - lse2)
            vv = tl.load(v_row + (_clamp(xx, W) * sv_w)[None, :]).to(tl.float32)
            acc += vv * _neighbour_weight(a, inside, m_row + j * sm_j, d_row + j * sd_j, HAS_MUL, HAS_ADD)

    out_ptrs = (out_ptr + _sample(n, G, so_b, C * so_c) + offs_c[:, None] * so_c
                + (y * so_h + x * so_w)[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


@triton.jit
def elsa_bwd_attn_kernel(
    g_ptr, v_ptr, a_ptr, m_ptr, ga_ptr, gm_ptr, gd_ptr, lse_ptr,
    C, H, W, Ho, Wo, G,
    sg_b, sg_c, sg_h, sg_w,
    sv_b, sv_c, sv_h, sv_w,
    sa_b, sa_k, sa_h, sa_w,
    sm_b, sm_g, sm_c, sm_i, sm_j,
    sga_b, sga_k, sga_h, sga_w,
    sgm_b,
    K: tl.constexpr, DIL: tl.constexpr, STRIDE: tl.constexpr,
    HAS_MUL: tl.constexpr, SOFTMAX: tl.constexpr, WRITE_LSE: tl.constexpr,
    NEED_ATTN: tl.constexpr, NEED_MUL: tl.constexpr, NEED_ADD: tl.constexpr,
    ALL_C: tl.constexpr, EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Gradients of attention (or logits), m and d. Grid: (N * pixel tiles,), pixel tiles fastest.

    With prod[c, p] = g[n,c,p] * v_k[n,c,p] (v_k: v shifted to neighbour k):
      ga[n,k,p] = sum_c prod * m[n,c,k]      (dp; with SOFTMAX, then p * (dp - sum_k p*dp))
      gm[n,c,k] += sum_p prod * a[n,k,p]     (float32, atomically across pixel tiles and, for a ghost
      gd[n,c,k] += sum_p prod                 shared by the batch, across the batch)
    ga (B, G*K*K, Ho, Wo) is addressed through its strides. The float32 gm/gd buffers are (Bg, G, C, K*K)
    contiguous, Bg = B for per-sample ghosts (batch stride sgm_b = G*C*K*K) or 1 for shared ones (sgm_b = 0:
    every sample adds into its head's row). With SOFTMAX and WRITE_LSE, lse (N, Ho*Wo) float32 receives
    the base-2 log-sum-exp log2 sum 2^(logit * log2 e) for the v-gradient kernel, and ga first holds dp, then is
    overwritten in place by the logit gradient (the same program reads back what it wrote).
    """
    n, pid_p = _split_pid(Ho * Wo, BLOCK_P)
    n = n.to(tl.int64)
    KK: tl.constexpr = K * K

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < Ho * Wo
    # Pixels past the end of the map stand in for the last one: every load from them is valid, and their
    # products are zero because v is masked with mask_p. So g and the ghosts load without masks.
    p_safe = tl.minimum(offs_p, Ho * Wo - 1)
    y = p_safe // Wo
    x = p_safe % Wo

    a_base = a_ptr + _sample(n, G, sa_b, KK * sa_k)
    a_off = y * sa_h + x * sa_w
    g_base = g_ptr + _sample(n, G, sg_b, C * sg_c) + (y * sg_h + x * sg_w)[None, :]
    v_base = v_ptr + _sample(n, G, sv_b, C * sv_c)
    m_base = m_ptr + _sample(n, G, sm_b, sm_g)
    ga_base = ga_ptr + _sample(n, G, sga_b, KK * sga_k) + y * sga_h + x * sga_w
    gmd_base = _sample(n, G, sgm_b, C * KK)
    if SOFTMAX:
        lse2 = _log2_sum_exp(a_base, a_off, mask_p, sa_k, K, False)
        if WRITE_LSE:
            tl.store(lse_ptr + n * Ho * Wo + offs_p, lse2, mask=mask_p)
        pdp = tl.zeros([BLOCK_P], tl.float32)

    if NEED_ATTN or NEED_MUL or NEED_ADD:
        y0 = y * STRIDE - (K // 2) * DIL
        x0 = x * STRIDE - (K // 2) * DIL
        a_ptrs = a_base + a_off
        ga_ptrs = ga_base
        if ALL_C:  # one channel block (C <= BLOCK_C): g is loaded once, not once per neighbour
            g_all = tl.load(g_base + _clamp_channels(tl.arange(0, BLOCK_C), C, EVEN_C)[:, None] * sg_c).to(tl.float32)
        for i in range(K):
            yy = y0 + i * DIL
            in_y = mask_p & (yy >= 0) & (yy < H)
            v_row = v_base + yy * sv_h
            m_row = m_base + i * sm_i
            for j in range(K):
                xx = x0 + j * DIL
                inside = (in_y & (xx >= 0) & (xx < W))[None, :]
                v_off = (v_row + xx * sv_w)[None, :]
                if NEED_MUL or (NEED_ATTN and SOFTMAX):
                    a = tl.load(a_ptrs, mask=mask_p, other=0.0).to(tl.float32)
                    if SOFTMAX:
                        a = tl.exp2(a * LOG2E - lse2)
                a_ptrs += sa_k
                dp = tl.zeros([BLOCK_P], tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    mask_c = _channel_mask(offs_c, C, EVEN_C, BLOCK_C)
                    load_c = _clamp_channels(offs_c, C, EVEN_C)
                    if ALL_C:
                        gg = g_all
                    else:
                        gg = tl.load(g_base + load_c[:, None] * sg_c).to(tl.float32)
                    vv = tl.load(v_off + offs_c[:, None] * sv_c, mask=mask_c[:, None] & inside, other=0.0).to(tl.float32)
                    prod = gg * vv  # zero for channels >= C, neighbours outside the image, pixels past the end
                    if NEED_ATTN:
                        if HAS_MUL:
                            mm = tl.load(m_row + j * sm_j + load_c * sm_c).to(tl.float32)
                            dp += tl.sum(prod * mm[:, None], axis=0)
                        else:
                            dp += tl.sum(prod, axis=0)
                    if NEED_MUL or NEED_ADD:
                        gmd_off = gmd_base + offs_c * KK + (i * K + j)
                    if NEED_MUL:
                        tl.atomic_add(gm_ptr + gmd_off, tl.sum(prod * a[None, :], axis=1), mask=mask_c,
                                      sem="relaxed")
                    if NEED_ADD:
                        tl.atomic_add(gd_ptr + gmd_off, tl.sum(prod, axis=1), mask=mask_c, sem="relaxed")
                if NEED_ATTN:
                    tl.store(ga_ptrs, dp.to(ga_ptr.dtype.element_ty), mask=mask_p)
                    if SOFTMAX:
                        pdp += a * dp
                ga_ptrs += sga_k

    if SOFTMAX and NEED_ATTN:
        # Softmax backward: d logit_k = p_k * (dp_k - sum_k' p_k' dp_k'), with dp read back from ga, where
        # this program wrote it above (through L1/L2). The barrier makes every thread's stores visible to the
        # threads that read them back, whatever layouts the compiler gave the two accesses.
        tl.debug_barrier()
        a_ptrs = a_base + a_off
        ga_ptrs = ga_base
        for k in range(KK):
            a = tl.load(a_ptrs, mask=mask_p, other=0.0).to(tl.float32)
            a = tl.exp2(a * LOG2E - lse2)
            dp = tl.load(ga_ptrs, mask=mask_p, other=0.0).to(tl.float32)
            tl.store(ga_ptrs, (a * (dp - pdp)).to(ga_ptr.dtype.element_ty), mask=mask_p)
            a_ptrs += sa_k
            ga_ptrs += sga_k


@triton.jit
def elsa_bwd_v_kernel(
    g_ptr, a_ptr, m_ptr, d_ptr, lse_ptr, gv_ptr,
    C, H, W, Ho, Wo, G,
    sg_b, sg_c, sg_h, sg_w,
    sa_b, sa_k, sa_h, sa_w,
    sm_b, sm_g, sm_c, sm_i, sm_j,
    sd_b, sd_g, sd_c, sd_i, sd_j,
    sgv_b, sgv_c, sgv_h, sgv_w,
    K: tl.constexpr, DIL: tl.constexpr, STRIDE: tl.constexpr,
    HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr, SOFTMAX: tl.constexpr,
    EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Gradient of v, gathered (no atomics). Grid: (N * channel blocks * input pixel tiles,), pixel tiles fastest.

    Input pixel (py, px) is neighbour k = (i, j) of output q = ((py - (i-K//2)*R) / S, (px - (j-K//2)*R) / S)
    when both divisions are exact and q lies in the output map:
      gv[n,c,p] = sum_k g[n,c,q] * (m[n,c,k] * a[n,k,q] + d[n,c,k]).
    gv (B, G*C, H, W) is addressed through its strides.
    """
    pid_nc, pid_p = _split_pid(H * W, BLOCK_P)
    n, offs_c, mask_c, load_c = _channel_block(pid_nc, C, EVEN_C, BLOCK_C)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < H * W
    py = offs_p // W
    px = offs_p % W

    a_base = a_ptr + _sample(n, G, sa_b, K * K * sa_k)
    g_base = g_ptr + _sample(n, G, sg_b, C * sg_c) + load_c[:, None] * sg_c
    m_base = m_ptr + _sample(n, G, sm_b, sm_g) + load_c * sm_c
    d_base = d_ptr + _sample(n, G, sd_b, sd_g) + load_c * sd_c
    lse_base = lse_ptr + n * Ho * Wo
    # ty = py - (i - K//2)*R: the output row (times S) that sees this pixel as neighbour row i.
    ty0 = py + (K // 2) * DIL
    tx0 = px + (K // 2) * DIL
    acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for i in range(K):
        ty = ty0 - i * DIL
        qy = ty // STRIDE
        ok_y = mask_p & (ty >= 0) & (qy < Ho)
        if STRIDE > 1:
            ok_y = ok_y & (ty % STRIDE == 0)
        a_row = a_base + (i * K) * sa_k + qy * sa_h
        g_row = g_base + (_clamp(qy, Ho) * sg_h)[None, :]
        lse_row = lse_base + qy * Wo
        m_row = m_base + i * sm_i
        d_row = d_base + i * sd_i
        for j in range(K):
            tx = tx0 - j * DIL
            qx = tx // STRIDE
            ok = ok_y & (tx >= 0) & (qx < Wo)
            if STRIDE > 1:
                ok = ok & (tx % STRIDE == 0)
            a = tl.load(a_row + j * sa_k + qx * sa_w, mask=ok, other=0.0).to(tl.float32)
            if SOFTMAX:
                a = tl.exp2(a * LOG2E - tl.load(lse_row + qx, mask=ok, other=0.0))
            # As in the forward: g is read unmasked at the clamped position and the weight is zeroed per pixel.
            gg = tl.load(g_row + (_clamp(qx, Wo) * sg_w)[None, :]).to(tl.float32)
            acc += gg * _neighbour_weight(a, ok, m_row + j * sm_j, d_row + j * sd_j, HAS_MUL, HAS_ADD)

    gv_ptrs = (gv_ptr + _sample(n, G, sgv_b, C * sgv_c) + offs_c[:, None] * sgv_c
               + (py * sgv_h + px * sgv_w)[None, :])
    tl.store(gv_ptrs, acc.to(gv_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])
