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
// Pass 2 walks input pixels and gathers grad_v from the output pixels that read them (no atomics).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// Geometry and strides (in elements), filled from the int64 array the caller passes.
struct Geo {
    int64_t B, G, C, H, W, Ho, Wo, K, dil, stride;
    int64_t svb, svg, svh, svw;  // v: channel stride 1
    int64_t sab, sag, sah, saw;  // attention: neighbour stride 1
    int64_t ghost_batch;         // ghosts hold one (G, KK, C) block per sample (1) or one for the batch (0)
    int64_t softmax, has_mul, has_add;
    int64_t need_v, need_attn, need_mul, need_add;
    int64_t rows_per_block;      // backward ghost partial sums: one per (b, block of rows)
};

Geo read_geo(const int64_t* p) {
    Geo g;
    int64_t* f = &g.B;
    for (int i = 0; i < 27; ++i) f[i] = p[i];
    return g;
}

// The K*K probabilities (or attention values) of one pixel and head, in the accumulation type.
template <typename T, typename A>
inline void load_probs(const T* a, int64_t kk, bool softmax, A* p) {
    for (int64_t k = 0; k < kk; ++k) p[k] = static_cast<A>(Io<T>::load(a + k));
    if (!softmax) return;
    A mx = p[0];
    for (int64_t k = 1; k < kk; ++k) mx = p[k] > mx ? p[k] : mx;
    A sum = 0;
    for (int64_t k = 0; k < kk; ++k) { p[k] = std::exp(p[k] - mx); sum += p[k]; }
    const A inv = A(1) / sum;
    for (int64_t k = 0; k < kk; ++k) p[k] *= inv;
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
        std::vector<A> p(KK), accbuf(C);
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
                    load_probs(attn + b * g.sab + h * g.sag + y * g.sah + x * g.saw, KK, g.softmax != 0, p.data());
                    const int64_t gofs = (g.ghost_batch ? b * g.G + h : h) * KK * C;
                    const A* m = MUL ? mul + gofs : nullptr;
                    const A* d = ADD ? add + gofs : nullptr;
                    for (int64_t c = 0; c < C; ++c) acc[c] = 0;
                    const T* vbase = v + b * g.svb + h * g.svg;
                    for (int64_t i = ilo; i < ihi; ++i) {
                        const T* vrow = vbase + (ys + (i - half) * g.dil) * g.svh;
                        for (int64_t j = jlo; j < jhi; ++j) {
                            const int64_t k = i * g.K + j;
                            const T* pv = vrow + (xs + (j - half) * g.dil) * g.svw;
                            const A pk = p[k];
#pragma omp simd
                            for (int64_t c = 0; c < C; ++c) {
                                A w = MUL ? pk * m[k * C + c] : pk;
                                if (ADD) w += d[k * C + c];
                                acc[c] += Io<T>::load(pv + c) * w;
                            }
                        }
                    }
                    T* po = out + ((b * g.Ho + y) * g.Wo + x) * GC + h * C;
                    for (int64_t c = 0; c < C; ++c) Io<T>::store(po + c, acc[c]);
                }
            }
        }
    }
}

// Pass 1 of the backward: probabilities, attention gradient, ghost-gradient partial sums.
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
        std::vector<A> p(KK), dp(KK), gobuf(C), tbuf(C);
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
                        load_probs(attn + b * g.sab + h * g.sag + y * g.sah + x * g.saw, KK, g.softmax != 0,
                                   p.data());
                        if (g.need_v) std::copy(p.begin(), p.end(), probs + pix * KK);
                        if (!(g.need_attn || ghosts)) continue;
                        const T* pg = gout + pix * C;
                        for (int64_t c = 0; c < C; ++c) go[c] = Io<T>::load(pg + c);
                        const int64_t gofs = (g.ghost_batch ? b * g.G + h : h) * KK * C;
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

// Pass 2 of the backward: grad_v gathered from the output pixels whose neighbour k is the input pixel.
template <typename T, int CT, bool MUL, bool ADD>
void backward_v(const Geo& g, const T* gout, const typename Io<T>::acc* mul, const typename Io<T>::acc* add,
                const typename Io<T>::acc* probs, T* gv, int nthreads) {
    using A = typename Io<T>::acc;
    const int64_t C = CT > 0 ? CT : g.C, KK = g.K * g.K, half = g.K / 2, GC = g.G * C;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<A> accbuf(C);
        A* acc = accbuf.data();
#pragma omp for schedule(static)
        for (int64_t row = 0; row < g.B * g.H; ++row) {
            const int64_t b = row / g.H, yy = row % g.H;
            for (int64_t xx = 0; xx < g.W; ++xx) {
                for (int64_t h = 0; h < g.G; ++h) {
                    const int64_t gofs = (g.ghost_batch ? b * g.G + h : h) * KK * C;
                    const A* m = MUL ? mul + gofs : nullptr;
                    const A* d = ADD ? add + gofs : nullptr;
                    for (int64_t c = 0; c < C; ++c) acc[c] = 0;
                    for (int64_t i = 0; i < g.K; ++i) {
                        const int64_t ny = yy - (i - half) * g.dil;
                        if (ny % g.stride) continue;
                        const int64_t y = ny / g.stride;
                        if (y < 0 || y >= g.Ho) continue;
                        for (int64_t j = 0; j < g.K; ++j) {
                            const int64_t nx = xx - (j - half) * g.dil;
                            if (nx % g.stride) continue;
                            const int64_t x = nx / g.stride;
                            if (x < 0 || x >= g.Wo) continue;
                            const int64_t k = i * g.K + j, pix = ((b * g.Ho + y) * g.Wo + x) * g.G + h;
                            const A pk = probs[pix * KK + k];
                            const T* pg = gout + pix * C;
#pragma omp simd
                            for (int64_t c = 0; c < C; ++c) {
                                A w = MUL ? pk * m[k * C + c] : pk;
                                if (ADD) w += d[k * C + c];
                                acc[c] += Io<T>::load(pg + c) * w;
                            }
                        }
                    }
                    T* pv = gv + ((b * g.H + yy) * g.W + xx) * GC + h * C;
                    for (int64_t c = 0; c < C; ++c) Io<T>::store(pv + c, acc[c]);
                }
            }
        }
    }
}

// Dispatch on the ghost variant and on the compile-time channel count.
template <typename T, int CT>
void run_c(const Geo& g, const void* const* ptr, int pass, int nthreads) {
    using A = typename Io<T>::acc;
    auto in = [&](int i) { return static_cast<const T*>(ptr[i]); };
    auto out = [&](int i) { return static_cast<T*>(const_cast<void*>(ptr[i])); };
    auto ain = [&](int i) { return static_cast<const A*>(ptr[i]); };
    auto aout = [&](int i) { return static_cast<A*>(const_cast<void*>(ptr[i])); };
#define ELSA_VARIANT(MUL, ADD)                                                                                  \
    if (pass == 0) forward<T, CT, MUL, ADD>(g, in(0), in(1), ain(2), ain(3), out(4), nthreads);                 \
    else if (pass == 1)                                                                                         \
        backward_attn<T, CT, MUL, ADD>(g, in(0), in(1), in(2), ain(3), aout(4), out(5), aout(6), aout(7),       \
                                       nthreads);                                                               \
    else backward_v<T, CT, MUL, ADD>(g, in(0), ain(1), ain(2), ain(3), out(4), nthreads);
    if (g.has_mul && g.has_add) { ELSA_VARIANT(true, true) }
    else if (g.has_mul) { ELSA_VARIANT(true, false) }
    else if (g.has_add) { ELSA_VARIANT(false, true) }
    else { ELSA_VARIANT(false, false) }
#undef ELSA_VARIANT
}

template <typename T>
void run(const int64_t* params, const void* const* ptr, int pass, int nthreads) {
    const Geo g = read_geo(params);
    if (g.C == 32) run_c<T, 32>(g, ptr, pass, nthreads);
    else run_c<T, 0>(g, ptr, pass, nthreads);
}

}  // namespace

// pass 0: forward      ptr = v, attn, mul, add, out
// pass 1: grad attn    ptr = gout, v, attn, mul, probs, gattn, gmul_part, gadd_part
// pass 2: grad v       ptr = gout, mul, add, probs, gv
// dtype: 0 float32, 1 float64, 2 bfloat16. Pointers that are not needed may be null.
extern "C" int elsa_cpu_run(int dtype, int pass, const int64_t* params, const void* const* ptr, int nthreads) {
    switch (dtype) {
        case 0: run<float>(params, ptr, pass, nthreads); return 0;
        case 1: run<double>(params, ptr, pass, nthreads); return 0;
        case 2: run<bf16>(params, ptr, pass, nthreads); return 0;
        default: return 1;
    }
}

extern "C" int elsa_cpu_abi_version() { return 1; }
