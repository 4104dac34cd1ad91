// ELSA aggregation on the CPU: one pass over each output pixel with the K*K loop inside (spec section 1).
//
//   out[b,g,c,y,x] = sum_k v[b,g,c, y*s+(i-K/2)*r, x*s+(j-K/2)*r] * (m[g,c,k] * a[b,g,k,y,x] + d[g,c,k])
//
// Layout. Channels are innermost everywhere, so the inner loop is a contiguous run of C channels that the
// compiler vectorises: v is read through its strides with channel stride 1 (a channels-last projection output),
// the attention through its strides with the K*K neighbours of a pixel contiguous, the ghosts as (G, K*K, C),
// and out / grad_v / grad_attn are written channels-last: (B, H, W, G, C) and (B, H, W, G, K*K).
//
// Plain C ABI (no torch headers): the file builds in about a second and is loaded with ctypes. Threads are
// OpenMP's; torch's own libgomp is already loaded when this library is, so both share one thread pool.
//
// Backward: pass 1 walks output pixels and produces the attention gradient (the softmax backward fused) and the
// ghost gradients (partial sums per block of rows, summed by the caller in a fixed order: deterministic for any
// thread count); it also stores the probabilities P so that pass 2 need not recompute the softmax K*K times.
// Pass 2 walks input pixels and gathers grad_v from the output pixels that read them (no atomics). For float32
// with 32 channels per head (every ELSA-Swin and ELSA-VOLO layer) pass 1 scatters grad_v itself instead, in two
// phases of non-overlapping row blocks (pass 3): at ELSA-Swin-T stage 1 (batch 4, one thread) the backward took
// 14.8 ms instead of 22.4, and the probabilities need not be stored.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

struct bf16 { uint16_t bits; };

template <typename T> struct Io;
template <> struct Io<float> {
    using acc = float;
    static inline float load(const float* p) { return *p; }
    static inline void store(float* p, float x) { *p = x; }
};
template <> struct Io<double> {
    using acc = double;
    static inline double load(const double* p) { return *p; }
    static inline void store(double* p, double x) { *p = x; }
};
template <> struct Io<bf16> {
    using acc = float;
    static inline float load(const bf16* p) {
        uint32_t u = static_cast<uint32_t>(p->bits) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    static inline void store(bf16* p, float x) {  // round to nearest even, NaN kept NaN
        uint32_t u;
        std::memcpy(&u, &x, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) { p->bits = static_cast<uint16_t>((u >> 16) | 0x40u); return; }
        u += 0x7fffu + ((u >> 16) & 1u);
        p->bits = static_cast<uint16_t>(u >> 16);
    }
};

// Eight float lanes (GCC/Clang vector extension: AVX/AVX-512 on x86, NEON pairs on Arm). The hot case (32
// channels per head, float32 or bfloat16 storage) keeps a head's 32 accumulators in four of these, in registers;
// left to the auto-vectoriser, the same loops kept them in memory or vectorised the wrong loop (gathers).
typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));

inline v8f vload(const float* p) { v8f r; std::memcpy(&r, p, sizeof r); return r; }
inline v8f vload(const bf16* p) {
    v8u16 h;
    std::memcpy(&h, p, sizeof h);
    v8u32 u = __builtin_convertvector(h, v8u32) << 16;
    v8f r;
    std::memcpy(&r, &u, sizeof r);
    return r;
}
inline void vstore(float* p, v8f x) { std::memcpy(p, &x, sizeof x); }
inline void vstore(bf16* p, v8f x) { for (int i = 0; i < 8; ++i) Io<bf16>::store(p + i, x[i]); }
typedef float v4f __attribute__((vector_size(16)));
inline float hsum(v8f x) {  // halves, then a shuffle tree: three adds instead of seven
    v4f lo, hi;
    std::memcpy(&lo, &x, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof lo, sizeof hi);
    v4f s = lo + hi;
#ifdef __clang__
    s += __builtin_shufflevector(s, s, 2, 3, 0, 1);
    s += __builtin_shufflevector(s, s, 1, 0, 3, 2);
#else
    typedef int32_t v4i __attribute__((vector_size(16)));
    s += __builtin_shuffle(s, v4i{2, 3, 0, 1});
    s += __builtin_shuffle(s, v4i{1, 0, 3, 2});
#endif
    return s[0];
}

// Whether (T, CT) takes the register-blocked path.
template <typename T, int CT>
constexpr bool kFast = CT == 32 && !std::is_same<T, double>::value;

// acc += src * (p_k * m_k + d_k) over a head's channels: the step the forward and grad_v share (grad_v with the
// output gradient as src). m and d point at neighbour k's row of C values (unused when MUL / ADD is off).
template <bool MUL, bool ADD, typename T>
inline void accumulate32(v8f* r, float pk, const float* m, const float* d, const T* src) {
    const v8f p = v8f{} + pk;
    for (int q = 0; q < 4; ++q) {
        v8f w = MUL ? p * vload(m + 8 * q) : p;
        if (ADD) w += vload(d + 8 * q);
        r[q] += vload(src + 8 * q) * w;
    }
}
template <bool MUL, bool ADD, typename T, typename A>
inline void accumulate(A* __restrict acc, int64_t C, A pk, const A* m, const A* d, const T* __restrict src) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
        A w = MUL ? pk * m[c] : pk;
        if (ADD) w += d[c];
        acc[c] += Io<T>::load(src + c) * w;
    }
}

// Geometry and strides (in elements), filled from the int64 array the caller passes.
struct Geo {
    int64_t B, G, C, H, W, Ho, Wo, K, dil, stride;
    int64_t svb, svg, svh, svw;  // v: channel stride 1
    int64_t sab, sag, sah, saw;  // attention: neighbour stride 1
    int64_t ghost_batch;         // ghosts hold one (G, KK, C) block per sample (1) or one for the batch (0)
    int64_t softmax, has_mul, has_add;
    int64_t need_v, need_attn, need_mul, need_add;
    int64_t rows_per_block;      // backward ghost partial sums: one per (b, block of rows)

    // Offset of pixel (y, x)'s K*K attention values of head h in sample b.
    int64_t attn_at(int64_t b, int64_t h, int64_t y, int64_t x) const { return b * sab + h * sag + y * sah + x * saw; }
    // Offset of head h's (K*K, C) ghost rows for sample b (one block per sample, or one for the batch).
    int64_t ghost_at(int64_t b, int64_t h, int64_t kkc) const { return (ghost_batch ? b * G + h : h) * kkc; }
};

Geo read_geo(const int64_t* p) {
    Geo g;
    int64_t* f = &g.B;
    for (int i = 0; i < 27; ++i) f[i] = p[i];
    return g;
}

// exp(x) for x <= 0 (softmax after subtracting the maximum), eight lanes at a time: libm's scalar expf took two
// thirds of the forward (12.6 of 19.6 ms at ELSA-Swin-T stage 1, batch 4, one thread). Cephes' expf: Cody-Waite
// reduction by ln 2 (rounding by the 1.5 * 2^23 trick), degree-6 polynomial, about 1e-7 relative error.
// NaN stays NaN.
typedef int32_t v8i __attribute__((vector_size(32)));
inline v8f vexp_nonpositive(v8f x) {
    x = x < -87.0f ? v8f{} - 87.0f : x;  // exp(-87) ~ 1.6e-38: still a normal float, negligible next to exp(0)
    const v8f n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const v8f r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8f p = v8f{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8f scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// The K*K probabilities (or attention values) of one pixel and head; p holds K*K rounded up to 8 entries.
template <typename T>
inline void load_probs(const T* __restrict a, int64_t kk, bool softmax, float* __restrict p) {
    for (int64_t k = 0; k < kk; ++k) p[k] = Io<T>::load(a + k);
    if (!softmax) return;
    const int64_t n8 = (kk + 7) / 8;
    for (int64_t k = kk; k < n8 * 8; ++k) p[k] = p[0];  // padding that cannot change the maximum
    v8f mx = vload(p);
    for (int64_t q = 1; q < n8; ++q) {
        const v8f x = vload(p + 8 * q);
        mx = x > mx ? x : mx;
    }
    float m = mx[0];
    for (int i = 1; i < 8; ++i) m = mx[i] > m ? mx[i] : m;
    for (int64_t q = 0; q < n8; ++q) vstore(p + 8 * q, vexp_nonpositive(vload(p + 8 * q) - m));
    for (int64_t k = kk; k < n8 * 8; ++k) p[k] = 0;
    v8f sum = {};
    for (int64_t q = 0; q < n8; ++q) sum += vload(p + 8 * q);
    const v8f inv = v8f{} + 1.0f / hsum(sum);
    for (int64_t q = 0; q < n8; ++q) vstore(p + 8 * q, vload(p + 8 * q) * inv);
}
// float32 with K*K <= 56 (K <= 7): the same softmax with the K*K values held in N8 registers, loaded as vectors and
// reduced with shuffles (the loops above went through memory and scalar code: half of the backward's softmax time).
template <int N8>
inline void softmax_regs(const float* __restrict a, int64_t kk, float* __restrict p) {
    v8f x[N8];
    const int64_t tail = kk - (N8 - 1) * 8;  // 1..8 values in the last vector
    for (int q = 0; q < N8 - 1; ++q) x[q] = vload(a + 8 * q);
    x[N8 - 1] = v8f{} + a[0];  // padding that cannot change the maximum
    for (int64_t e = 0; e < tail; ++e) x[N8 - 1][e] = a[(N8 - 1) * 8 + e];
    v8f mx = x[0];
    for (int q = 1; q < N8; ++q) mx = x[q] > mx ? x[q] : mx;
    v4f lo, hi;
    std::memcpy(&lo, &mx, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&mx) + sizeof lo, sizeof hi);
    v4f m4 = lo > hi ? lo : hi;
    float m = m4[0];
    for (int i = 1; i < 4; ++i) m = m4[i] > m ? m4[i] : m;
    v8f sum = {};
    for (int q = 0; q < N8; ++q) {
        x[q] = vexp_nonpositive(x[q] - m);
        if (q == N8 - 1)
            for (int64_t e = tail; e < 8; ++e) x[q][e] = 0.0f;
        sum += x[q];
    }
    const v8f inv = v8f{} + 1.0f / hsum(sum);
    for (int q = 0; q < N8; ++q) vstore(p + 8 * q, x[q] * inv);
}
inline void load_probs(const float* __restrict a, int64_t kk, bool softmax, float* __restrict p) {
    if (softmax) switch ((kk + 7) / 8) {
        case 1: return softmax_regs<1>(a, kk, p);
        case 2: return softmax_regs<2>(a, kk, p);
        case 4: return softmax_regs<4>(a, kk, p);
        case 7: return softmax_regs<7>(a, kk, p);
        default: break;
    }
    load_probs<float>(a, kk, softmax, p);
}
inline void load_probs(const double* __restrict a, int64_t kk, bool softmax, double* __restrict p) {
    for (int64_t k = 0; k < kk; ++k) p[k] = a[k];
    if (!softmax) return;
    double mx = p[0];
    for (int64_t k = 1; k < kk; ++k) mx = p[k] > mx ? p[k] : mx;
    double sum = 0;
    for (int64_t k = 0; k < kk; ++k) { p[k] = std::exp(p[k] - mx); sum += p[k]; }
    for (int64_t k = 0; k < kk; ++k) p[k] /= sum;
}

// First and one-past-last neighbour row (or column) index i for which y*s + (i - K/2)*r lies in [0, size).
inline void valid_range(int64_t pos, int64_t half, int64_t dil, int64_t size, int64_t K, int64_t& lo, int64_t& hi) {
    lo = 0;
    hi = K;
    while (lo < K && pos + (lo - half) * dil < 0) ++lo;
    while (hi > lo && pos + (hi - 1 - half) * dil >= size) --hi;
}

// CT > 0: the channel count known at compile time (32 in every ELSA-Swin and ELSA-VOLO head), so the
// accumulator lives in registers; CT == 0: any C.
template <typename T, int CT, bool MUL, bool ADD>
void forward(const Geo& g, const T* v, const T* attn, const typename Io<T>::acc* mul,
             const typename Io<T>::acc* add, T* out, int nthreads) {
    using A = typename Io<T>::acc;
    const int64_t C = CT > 0 ? CT : g.C, KK = g.K * g.K, half = g.K / 2, GC = g.G * C;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<A> p(KK + 8), accbuf(C);
        A* acc = accbuf.data();
#pragma omp for schedule(static)
        for (int64_t row = 0; row < g.B * g.Ho; ++row) {
            const int64_t b = row / g.Ho, y = row % g.Ho, ys = y * g.stride;
            int64_t ilo, ihi;
            valid_range(ys, half, g.dil, g.H, g.K, ilo, ihi);
            for (int64_t x = 0; x < g.Wo; ++x) {
                const int64_t xs = x * g.stride;
                int64_t jlo, jhi;
                valid_range(xs, half, g.dil, g.W, g.K, jlo, jhi);
                for (int64_t h = 0; h < g.G; ++h) {
                    load_probs(attn + g.attn_at(b, h, y, x), KK, g.softmax != 0, p.data());
                    const int64_t gofs = g.ghost_at(b, h, KK * C);
                    const A* m = MUL ? mul + gofs : nullptr;
                    const A* d = ADD ? add + gofs : nullptr;
                    const T* vbase = v + b * g.svb + h * g.svg;
                    T* po = out + ((b * g.Ho + y) * g.Wo + x) * GC + h * C;
                    if constexpr (kFast<T, CT>) {
                        // two sets of accumulators (even and odd neighbours): eight independent FMA chains
                        // instead of four, which the FMA latency otherwise caps
                        v8f r[4] = {}, r2[4] = {};
                        for (int64_t i = ilo; i < ihi; ++i) {
                            const T* vrow = vbase + (ys + (i - half) * g.dil) * g.svh;
                            int64_t j = jlo;
                            for (; j + 1 < jhi; j += 2) {
                                const int64_t k = i * g.K + j;
                                accumulate32<MUL, ADD>(r, p[k], MUL ? m + k * 32 : m, ADD ? d + k * 32 : d,
                                                       vrow + (xs + (j - half) * g.dil) * g.svw);
                                accumulate32<MUL, ADD>(r2, p[k + 1], MUL ? m + k * 32 + 32 : m,
                                                       ADD ? d + k * 32 + 32 : d,
                                                       vrow + (xs + (j + 1 - half) * g.dil) * g.svw);
                            }
                            if (j < jhi) {
                                const int64_t k = i * g.K + j;
                                accumulate32<MUL, ADD>(r, p[k], MUL ? m + k * 32 : m, ADD ? d + k * 32 : d,
                                                       vrow + (xs + (j - half) * g.dil) * g.svw);
                            }
                        }
                        for (int q = 0; q < 4; ++q) vstore(po + 8 * q, r[q] + r2[q]);
                        continue;
                    }
                    for (int64_t c = 0; c < C; ++c) acc[c] = 0;
                    for (int64_t i = ilo; i < ihi; ++i) {
                        const T* vrow = vbase + (ys + (i - half) * g.dil) * g.svh;
                        for (int64_t j = jlo; j < jhi; ++j) {
                            const int64_t k = i * g.K + j;
                            accumulate<MUL, ADD>(acc, C, p[k], MUL ? m + k * C : m, ADD ? d + k * C : d,
                                                 vrow + (xs + (j - half) * g.dil) * g.svw);
                        }
                    }
                    for (int64_t c = 0; c < C; ++c) Io<T>::store(po + c, acc[c]);
                }
            }
        }
    }
}

// Pass 1, register-blocked for 32 channels: one output row and head at a time, neighbour k outermost, so that
// the ghost-gradient accumulators of k stay in registers across the row (read and written once per row, not once
// per pixel) and each pixel's output gradient is loaded once per row into a row buffer.
//
// FUSE_V (float32): the same walk also scatters grad_v (gv, zero on entry, channels-last) from each output pixel
// to the K*K input pixels it read, so that pass 2 and the stored probabilities are not needed. Blocks of rows run
// in two phases, even blocks then odd ones: two blocks of one phase write disjoint input rows (the caller checks
// (R + 1) * stride > 2 * (K / 2) * dilation), so no atomics, and the summation order is fixed (thread-count
// independent).
template <typename T, bool MUL, bool ADD, bool FUSE_V>
void backward_attn_rows(const Geo& g, const T* gout, const T* v, const T* attn, const float* mul, const float* add,
                        float* probs, T* gattn, float* gmul_part, float* gadd_part, float* gv, int nthreads) {
    const int64_t KK = g.K * g.K, KK8 = (KK + 7) / 8 * 8, half = g.K / 2, Wo = g.Wo, GC = g.G * 32;
    const int64_t R = g.rows_per_block, nblocks = (g.Ho + R - 1) / R;
    const bool scatter_v = FUSE_V && g.need_v;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> P(Wo * KK8), DP(Wo * KK);
        std::vector<v8f> GO(Wo * 4);
        for (int phase = 0; phase < (FUSE_V ? 2 : 1); ++phase) {
        const int64_t per_b = FUSE_V ? (nblocks - phase + 1) / 2 : nblocks;
#pragma omp for schedule(static)
        for (int64_t idx = 0; idx < g.B * per_b; ++idx) {
            const int64_t b = idx / per_b, blk = FUSE_V ? 2 * (idx % per_b) + phase : idx % per_b;
            const int64_t unit = b * nblocks + blk;
            float* gm = g.need_mul ? gmul_part + unit * g.G * KK * 32 : nullptr;
            float* gd = g.need_add ? gadd_part + unit * g.G * KK * 32 : nullptr;
            if (gm) std::fill(gm, gm + g.G * KK * 32, 0.0f);
            if (gd) std::fill(gd, gd + g.G * KK * 32, 0.0f);
            for (int64_t y = blk * R; y < std::min(g.Ho, (blk + 1) * R); ++y) {
                const int64_t ys = y * g.stride;
                for (int64_t h = 0; h < g.G; ++h) {
                    for (int64_t x = 0; x < Wo; ++x) {
                        const int64_t pix = ((b * g.Ho + y) * Wo + x) * g.G + h;
                        load_probs(attn + g.attn_at(b, h, y, x), KK, g.softmax != 0,
                                   &P[x * KK8]);
                        if (!FUSE_V && g.need_v) std::copy(&P[x * KK8], &P[x * KK8] + KK, probs + pix * KK);
                        for (int q = 0; q < 4; ++q) GO[x * 4 + q] = vload(gout + pix * 32 + 8 * q);
                    }
                    const bool need_dp = g.need_attn || gm || gd;
                    if (!(need_dp || scatter_v)) continue;  // only the probabilities were needed
                    std::fill(DP.begin(), DP.end(), 0.0f);
                    const int64_t gofs = g.ghost_at(b, h, KK * 32);
                    const float* m = MUL ? mul + gofs : nullptr;
                    const float* d = ADD ? add + gofs : nullptr;
                    float* gmh = gm ? gm + h * KK * 32 : nullptr;
                    float* gdh = gd ? gd + h * KK * 32 : nullptr;
                    const T* vbase = v + b * g.svb + h * g.svg;
                    for (int64_t i = 0; i < g.K; ++i) {
                        const int64_t yy = ys + (i - half) * g.dil;
                        if (yy < 0 || yy >= g.H) continue;
                        const T* vrow = vbase + yy * g.svh;
                        for (int64_t j = 0; j < g.K; ++j) {
                            const int64_t k = i * g.K + j, dx = (j - half) * g.dil;
                            int64_t xlo = 0, xhi = Wo;  // output columns whose neighbour column is inside the map
                            while (xlo < Wo && xlo * g.stride + dx < 0) ++xlo;
                            while (xhi > xlo && (xhi - 1) * g.stride + dx >= g.W) --xhi;
                            v8f mk[4], dk[4], am[4] = {}, ad[4] = {};
                            if (MUL)
                                for (int q = 0; q < 4; ++q) mk[q] = vload(m + k * 32 + 8 * q);
                            if (ADD)
                                for (int q = 0; q < 4; ++q) dk[q] = vload(d + k * 32 + 8 * q);
                            if (scatter_v) {  // grad_v[input pixel] += grad_out * (p_k * m_k + d_k)
                                float* gvrow = gv + (b * g.H + yy) * g.W * GC + h * 32;
                                for (int64_t x = xlo; x < xhi; ++x) {
                                    float* pg = gvrow + (x * g.stride + dx) * GC;
                                    const v8f pk = v8f{} + P[x * KK8 + k];
                                    for (int q = 0; q < 4; ++q) {
                                        v8f w = MUL ? pk * mk[q] : pk;
                                        if (ADD) w += dk[q];
                                        vstore(pg + 8 * q, vload(pg + 8 * q) + GO[x * 4 + q] * w);
                                    }
                                }
                            }
                            if (!need_dp) continue;
                            for (int64_t x = xlo; x < xhi; ++x) {
                                const T* pv = vrow + (x * g.stride + dx) * g.svw;
                                v8f t[4], s = {};
                                for (int q = 0; q < 4; ++q) {
                                    t[q] = GO[x * 4 + q] * vload(pv + 8 * q);
                                    s += MUL ? t[q] * mk[q] : t[q];
                                }
                                DP[x * KK + k] = hsum(s);
                                if (gmh) {
                                    const v8f pk = v8f{} + P[x * KK8 + k];
                                    for (int q = 0; q < 4; ++q) am[q] += t[q] * pk;
                                }
                                if (gdh)
                                    for (int q = 0; q < 4; ++q) ad[q] += t[q];
                            }
                            if (gmh)
                                for (int q = 0; q < 4; ++q)
                                    vstore(gmh + k * 32 + 8 * q, vload(gmh + k * 32 + 8 * q) + am[q]);
                            if (gdh)
                                for (int q = 0; q < 4; ++q)
                                    vstore(gdh + k * 32 + 8 * q, vload(gdh + k * 32 + 8 * q) + ad[q]);
                        }
                    }
                    if (!g.need_attn) continue;
                    for (int64_t x = 0; x < Wo; ++x) {
                        const float* px = &P[x * KK8];
                        const float* dpx = &DP[x * KK];
                        T* pa = gattn + (((b * g.Ho + y) * Wo + x) * g.G + h) * KK;
                        if (g.softmax) {
                            float dot = 0;
                            for (int64_t k = 0; k < KK; ++k) dot += px[k] * dpx[k];
                            for (int64_t k = 0; k < KK; ++k) Io<T>::store(pa + k, px[k] * (dpx[k] - dot));
                        } else {
                            for (int64_t k = 0; k < KK; ++k) Io<T>::store(pa + k, dpx[k]);
                        }
                    }
                }
            }
        }
        }  // phase
    }
}

// Pass 1 of the backward: probabilities, attention gradient, ghost-gradient partial sums (any C and dtype; the
// 32-channel float32/bfloat16 case runs backward_attn_rows).
template <typename T, int CT, bool MUL, bool ADD>
void backward_attn(const Geo& g, const T* gout, const T* v, const T* attn, const typename Io<T>::acc* mul,
                   typename Io<T>::acc* probs, T* gattn, typename Io<T>::acc* gmul_part,
                   typename Io<T>::acc* gadd_part, int nthreads) {
    using A = typename Io<T>::acc;
    const int64_t C = CT > 0 ? CT : g.C, KK = g.K * g.K, half = g.K / 2;
    const int64_t R = g.rows_per_block, nblocks = (g.Ho + R - 1) / R;
    const bool ghosts = g.need_mul || g.need_add;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<A> p(KK + 8), dp(KK), gobuf(C), tbuf(C);
        A* go = gobuf.data();
        A* t = tbuf.data();
#pragma omp for schedule(static)
        for (int64_t unit = 0; unit < g.B * nblocks; ++unit) {
            const int64_t b = unit / nblocks, blk = unit % nblocks;
            A* gm = g.need_mul ? gmul_part + unit * g.G * KK * C : nullptr;
            A* gd = g.need_add ? gadd_part + unit * g.G * KK * C : nullptr;
            if (gm) std::fill(gm, gm + g.G * KK * C, A(0));
            if (gd) std::fill(gd, gd + g.G * KK * C, A(0));
            for (int64_t y = blk * R; y < std::min(g.Ho, (blk + 1) * R); ++y) {
                const int64_t ys = y * g.stride;
                int64_t ilo, ihi;
                valid_range(ys, half, g.dil, g.H, g.K, ilo, ihi);
                for (int64_t x = 0; x < g.Wo; ++x) {
                    const int64_t xs = x * g.stride;
                    int64_t jlo, jhi;
                    valid_range(xs, half, g.dil, g.W, g.K, jlo, jhi);
                    for (int64_t h = 0; h < g.G; ++h) {
                        const int64_t pix = ((b * g.Ho + y) * g.Wo + x) * g.G + h;
                        load_probs(attn + g.attn_at(b, h, y, x), KK, g.softmax != 0, p.data());
                        if (g.need_v) std::copy(p.begin(), p.begin() + KK, probs + pix * KK);
                        if (!(g.need_attn || ghosts)) continue;
                        const T* pg = gout + pix * C;
                        for (int64_t c = 0; c < C; ++c) go[c] = Io<T>::load(pg + c);
                        const int64_t gofs = g.ghost_at(b, h, KK * C);
                        const A* m = MUL ? mul + gofs : nullptr;
                        A* gmh = gm ? gm + h * KK * C : nullptr;
                        A* gdh = gd ? gd + h * KK * C : nullptr;
                        std::fill(dp.begin(), dp.end(), A(0));
                        const T* vbase = v + b * g.svb + h * g.svg;
                        for (int64_t i = ilo; i < ihi; ++i) {
                            const T* vrow = vbase + (ys + (i - half) * g.dil) * g.svh;
                            for (int64_t j = jlo; j < jhi; ++j) {
                                const int64_t k = i * g.K + j;
                                const T* pv = vrow + (xs + (j - half) * g.dil) * g.svw;
                                A s = 0;
#pragma omp simd reduction(+ : s)
                                for (int64_t c = 0; c < C; ++c) {
                                    t[c] = go[c] * Io<T>::load(pv + c);
                                    s += MUL ? t[c] * m[k * C + c] : t[c];
                                }
                                dp[k] = s;
                                if (gmh) {
                                    const A pk = p[k];
#pragma omp simd
                                    for (int64_t c = 0; c < C; ++c) gmh[k * C + c] += t[c] * pk;
                                }
                                if (gdh) {
#pragma omp simd
                                    for (int64_t c = 0; c < C; ++c) gdh[k * C + c] += t[c];
                                }
                            }
                        }
                        if (!g.need_attn) continue;
                        T* pa = gattn + pix * KK;
                        if (g.softmax) {
                            A dot = 0;
                            for (int64_t k = 0; k < KK; ++k) dot += p[k] * dp[k];
                            for (int64_t k = 0; k < KK; ++k) Io<T>::store(pa + k, p[k] * (dp[k] - dot));
                        } else {
                            for (int64_t k = 0; k < KK; ++k) Io<T>::store(pa + k, dp[k]);
                        }
                    }
                }
            }
        }
    }
}

// The output positions o (and their neighbour index i) that read input position `in` along one axis:
// o*s + (i - K/2)*r == in, 0 <= o < out_size. Returns how many, in idx[] and pos[].
inline int64_t readers(int64_t in, int64_t K, int64_t half, int64_t dil, int64_t stride, int64_t out_size,
                       int64_t* idx, int64_t* pos) {
    int64_t n = 0;
    for (int64_t i = 0; i < K; ++i) {
        const int64_t num = in - (i - half) * dil;
        if (num < 0) break;  // num falls as i grows
        const int64_t o = stride == 1 ? num : num / stride;
        if (o * stride != num || o >= out_size) continue;
        idx[n] = i;
        pos[n++] = o;
    }
    return n;
}

// Pass 2 of the backward: grad_v gathered from the output pixels whose neighbour k is the input pixel.
template <typename T, int CT, bool MUL, bool ADD>
void backward_v(const Geo& g, const T* gout, const typename Io<T>::acc* mul, const typename Io<T>::acc* add,
                const typename Io<T>::acc* probs, T* gv, int nthreads) {
    using A = typename Io<T>::acc;
    const int64_t C = CT > 0 ? CT : g.C, KK = g.K * g.K, half = g.K / 2, GC = g.G * C;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<A> accbuf(C);
        std::vector<int64_t> iy(2 * g.K), jx(2 * g.K);
        A* acc = accbuf.data();
#pragma omp for schedule(static)
        for (int64_t row = 0; row < g.B * g.H; ++row) {
            const int64_t b = row / g.H, yy = row % g.H;
            const int64_t ni = readers(yy, g.K, half, g.dil, g.stride, g.Ho, iy.data(), iy.data() + g.K);
            for (int64_t xx = 0; xx < g.W; ++xx) {
                const int64_t nj = readers(xx, g.K, half, g.dil, g.stride, g.Wo, jx.data(), jx.data() + g.K);
                for (int64_t h = 0; h < g.G; ++h) {
                    const int64_t gofs = g.ghost_at(b, h, KK * C);
                    const A* m = MUL ? mul + gofs : nullptr;
                    const A* d = ADD ? add + gofs : nullptr;
                    T* pv = gv + ((b * g.H + yy) * g.W + xx) * GC + h * C;
                    if constexpr (kFast<T, CT>) {
                        v8f r[4] = {};
                        for (int64_t a = 0; a < ni; ++a) {
                            const int64_t i = iy[a];
                            const int64_t row_pix = (b * g.Ho + iy[g.K + a]) * g.Wo * g.G + h;  // pixel (y, 0), head h
                            const T* grow = gout + row_pix * 32;
                            const float* prow = probs + row_pix * KK + i * g.K;
                            for (int64_t e = 0; e < nj; ++e) {
                                const int64_t j = jx[e], xg = jx[g.K + e] * g.G, k = i * g.K + j;
                                accumulate32<MUL, ADD>(r, prow[xg * KK + j], MUL ? m + k * 32 : m,
                                                       ADD ? d + k * 32 : d, grow + xg * 32);
                            }
                        }
                        for (int q = 0; q < 4; ++q) vstore(pv + 8 * q, r[q]);
                        continue;
                    }
                    for (int64_t c = 0; c < C; ++c) acc[c] = 0;
                    for (int64_t a = 0; a < ni; ++a) {
                        const int64_t i = iy[a], y = iy[g.K + a];
                        for (int64_t e = 0; e < nj; ++e) {
                            const int64_t j = jx[e], x = jx[g.K + e];
                            const int64_t k = i * g.K + j, pix = ((b * g.Ho + y) * g.Wo + x) * g.G + h;
                            accumulate<MUL, ADD>(acc, C, probs[pix * KK + k], MUL ? m + k * C : m,
                                                 ADD ? d + k * C : d, gout + pix * C);
                        }
                    }
                    for (int64_t c = 0; c < C; ++c) Io<T>::store(pv + c, acc[c]);
                }
            }
        }
    }
}

template <typename T, int CT, bool MUL, bool ADD>
void pass1(const Geo& g, const T* gout, const T* v, const T* attn, const typename Io<T>::acc* mul,
           typename Io<T>::acc* probs, T* gattn, typename Io<T>::acc* gm, typename Io<T>::acc* gd, int nthreads) {
    if constexpr (kFast<T, CT>)
        backward_attn_rows<T, MUL, ADD, false>(g, gout, v, attn, mul, nullptr, probs, gattn, gm, gd, nullptr,
                                               nthreads);
    else backward_attn<T, CT, MUL, ADD>(g, gout, v, attn, mul, probs, gattn, gm, gd, nthreads);
}

// The fused backward (pass 3): float32, 32 channels; grad_v scattered in the same walk (see backward_attn_rows).
template <typename T, int CT, bool MUL, bool ADD>
int fused(const Geo& g, const void* const* ptr, int nthreads) {
    if constexpr (kFast<T, CT> && std::is_same<T, float>::value) {
        auto in = [&](int i) { return static_cast<const float*>(ptr[i]); };
        auto out = [&](int i) { return static_cast<float*>(const_cast<void*>(ptr[i])); };
        if ((g.rows_per_block + 1) * g.stride <= 2 * (g.K / 2) * g.dil) return 3;
        backward_attn_rows<float, MUL, ADD, true>(g, in(0), in(1), in(2), in(3), in(4), nullptr, out(5), out(6),
                                                  out(7), out(8), nthreads);
        return 0;
    } else {
        return 3;
    }
}

// Dispatch on the ghost variant and on the compile-time channel count.
template <typename T, int CT>
int run_c(const Geo& g, const void* const* ptr, int pass, int nthreads) {
    using A = typename Io<T>::acc;
    auto in = [&](int i) { return static_cast<const T*>(ptr[i]); };
    auto out = [&](int i) { return static_cast<T*>(const_cast<void*>(ptr[i])); };
    auto ain = [&](int i) { return static_cast<const A*>(ptr[i]); };
    auto aout = [&](int i) { return static_cast<A*>(const_cast<void*>(ptr[i])); };
#define ELSA_VARIANT(MUL, ADD)                                                                                  \
    if (pass == 3) return fused<T, CT, MUL, ADD>(g, ptr, nthreads);                                           \
    if (pass == 0) forward<T, CT, MUL, ADD>(g, in(0), in(1), ain(2), ain(3), out(4), nthreads);                 \
    else if (pass == 1)                                                                                         \
        pass1<T, CT, MUL, ADD>(g, in(0), in(1), in(2), ain(3), aout(4), out(5), aout(6), aout(7), nthreads);    \
    else backward_v<T, CT, MUL, ADD>(g, in(0), ain(1), ain(2), ain(3), out(4), nthreads);
    if (g.has_mul && g.has_add) { ELSA_VARIANT(true, true) }
    else if (g.has_mul) { ELSA_VARIANT(true, false) }
    else if (g.has_add) { ELSA_VARIANT(false, true) }
    else { ELSA_VARIANT(false, false) }
#undef ELSA_VARIANT
    return 0;
}

template <typename T>
int run(const int64_t* params, const void* const* ptr, int pass, int nthreads) {
    const Geo g = read_geo(params);
    if (kFast<T, 32> && g.C == 32) return run_c<T, kFast<T, 32> ? 32 : 0>(g, ptr, pass, nthreads);
    return run_c<T, 0>(g, ptr, pass, nthreads);
}

}  // namespace

// pass 0: forward      ptr = v, attn, mul, add, out
// pass 1: grad attn    ptr = gout, v, attn, mul, probs, gattn, gmul_part, gadd_part
// pass 2: grad v       ptr = gout, mul, add, probs, gv
// pass 3: passes 1 and 2 fused (float32, 32 channels per head, (R + 1) * stride > 2 * (K / 2) * dilation)
//                      ptr = gout, v, attn, mul, add, gattn, gmul_part, gadd_part, gv (zeros)
// dtype: 0 float32, 1 float64, 2 bfloat16. Pointers that are not needed may be null.
// Returns 0, 1 for an unknown dtype, 3 when pass 3 does not apply (nothing written: run passes 1 and 2).
extern "C" int elsa_cpu_run(int dtype, int pass, const int64_t* params, const void* const* ptr, int nthreads) {
    switch (dtype) {
        case 0: return run<float>(params, ptr, pass, nthreads);
        case 1: return run<double>(params, ptr, pass, nthreads);
        case 2: return run<bf16>(params, ptr, pass, nthreads);
        default: return 1;
    }
}

extern "C" int elsa_cpu_abi_version() { return 2; }
