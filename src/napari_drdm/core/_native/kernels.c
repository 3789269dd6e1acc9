/* Native CPU kernels for the DRDM network's full- and half-resolution levels (2D and 3D).
 *
 * Compiled on first use by napari_drdm/core/native_build.py (C compiler + OpenMP; AVX-512F
 * convolution tiles where PyTorch runs AVX512 kernels, AVX2/FMA intrinsics where it runs AVX2,
 * plain C loops elsewhere) and called through ctypes from napari_drdm/core/native.py.
 *
 * Layout ("padded planes"): one float32 plane (2D) or volume (3D) per (sample, channel), each
 * with a zero border of P pixels on every side of every spatial axis: row stride RS = W + 2P,
 * slice stride SS = (H + 2P) * RS, plane stride PS = (D + 2PZ) * SS with PZ = P in 3D and D = 1,
 * PZ = 0 in 2D; pixel (z, y, x) at offset (z + PZ) * SS + (y + P) * RS + (x + P).  Borders are
 * never written, so a 3x3(x3) convolution with dilation d <= P needs no edge cases.  Buffers carry
 * 16 floats of slack after the last plane (vector loads of the last row may run past it).  P = 0
 * means a dense NCHW / NCDHW tensor.
 *
 * Why: the network's level-1 layers have 10 channels.  oneDNN's NHWC kernels compute output
 * channels in blocks of 8 (AVX2), so 10 channels cost 16; these kernels vectorise over the
 * width instead (8 pixels per register, 5 output channels x 16 pixels per tile), so every FMA
 * is useful, and they apply bias, LeakyReLU and the residual add on the way out.  The AVX-512
 * build (tile16) computes 5 output channels x 64 pixels per tile in 20 of the 32 zmm registers;
 * on issue 15's AVX-512 Xeon (one thread, the other core busy, interleaved medians) it took a
 * 10->10 convolution at 256^2 from 2.66 to 1.62 ms and a cmr2d network pass at 2D 256 from
 * 251 to 175 ms (2D 128: 64 -> 52 ms; 3D 64: 1.50 -> 1.08 s); tiles of 32 pixels were 10-20 %
 * slower than 64.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DRDM_AVX2 1
#else
#define DRDM_AVX2 0
#endif
#if DRDM_AVX2 && defined(__AVX512F__)
#define DRDM_AVX512 1
#else
#define DRDM_AVX512 0
#endif

#define AI static inline __attribute__((always_inline))

enum { MODE_STORE = 0, MODE_LEAKY = 1, MODE_RES_LEAKY = 2, MODE_STORE_AND_LEAKY = 3 };

int drdm_kernels_abi(void) { return 2; }
/* 0: plain C, 1: AVX2/FMA, 2: AVX-512F convolution tiles (AVX2 elsewhere) */
int drdm_kernels_simd(void) { return DRDM_AVX512 ? 2 : DRDM_AVX2; }

static inline float leakyf(float v, float s) { return v > 0.0f ? v : v * s; }

#if DRDM_AVX2
AI __m256 leaky8(__m256 v, __m256 s) { return _mm256_max_ps(v, _mm256_mul_ps(v, s)); }

/* mask with the first n (0..8) lanes set */
AI __m256i lane_mask(int n) {
    static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i *)(m + 8 - n));
}

/* The taps of a tile, in the packed weights' order [ci][kz][ky][kx]: BODY reads the input at `q`
 * (the tap's shifted row) and the NB weights at `wb` (the body: the macro's arguments). */
#define FOR_TAPS(...)                                                                       \
    for (int ci = 0; ci < Cin; ci++) {                                                      \
        for (int kz = 0; kz < KZ; kz++) {                                                   \
            const float *p = in + ci * PS + (KZ == 3 ? (long)(kz - 1) * dil * SS : 0);      \
            _Pragma("GCC unroll 3") for (int ky = 0; ky < 3; ky++) {                        \
                const float *row = p + (long)(ky - 1) * dil * RS;                           \
                _Pragma("GCC unroll 3") for (int kx = 0; kx < 3; kx++) {                    \
                    const float *q = row + (kx - 1) * dil;                                  \
                    __VA_ARGS__                                                             \
                    wb += NB;                                                               \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }

/* One tile: NB output channels x NV vectors of 8 pixels of one output row.  `nlast` < 8 makes
 * the last vector partial (masked stores). */
AI void tile(const float *in, long PS, long SS, long RS, int Cin, int dil, const float *wb, const float *bias,
             const int KZ, const int NB, const int NV, int nlast, float *out, long OPS, int mode,
             const float *res, float *out2, __m256 slope)
{
    __m256 a0[5], a1[5];
#pragma GCC unroll 5
    for (int j = 0; j < NB; j++) { a0[j] = _mm256_set1_ps(bias[j]); a1[j] = a0[j]; }
    FOR_TAPS({
        __m256 x0 = _mm256_loadu_ps(q);
        __m256 x1 = NV > 1 ? _mm256_loadu_ps(q + 8) : x0;
        _Pragma("GCC unroll 5")
        for (int j = 0; j < NB; j++) {
            __m256 w = _mm256_broadcast_ss(wb + j);
            a0[j] = _mm256_fmadd_ps(w, x0, a0[j]);
            if (NV > 1) a1[j] = _mm256_fmadd_ps(w, x1, a1[j]);
        }
    })
    __m256i mk = lane_mask(nlast);
#pragma GCC unroll 5
    for (int j = 0; j < NB; j++) {
        float *o = out + j * OPS;
        __m256 v0 = a0[j], v1 = a1[j];
        if (mode == MODE_RES_LEAKY) {
            const float *r = res + j * OPS;
            v0 = leaky8(_mm256_add_ps(v0, _mm256_loadu_ps(r)), slope);
            if (NV > 1) v1 = leaky8(_mm256_add_ps(v1, _mm256_loadu_ps(r + 8)), slope);
        } else if (mode == MODE_LEAKY) {
            v0 = leaky8(v0, slope);
            if (NV > 1) v1 = leaky8(v1, slope);
        }
        if (NV > 1) { _mm256_storeu_ps(o, v0); _mm256_storeu_ps(o + 8, v1); }
        else if (nlast == 8) _mm256_storeu_ps(o, v0);
        else _mm256_maskstore_ps(o, mk, v0);
        if (mode == MODE_STORE_AND_LEAKY) {
            float *o2 = out2 + j * OPS;
            if (NV > 1) { _mm256_storeu_ps(o2, leaky8(v0, slope)); _mm256_storeu_ps(o2 + 8, leaky8(v1, slope)); }
            else if (nlast == 8) _mm256_storeu_ps(o2, leaky8(v0, slope));
            else _mm256_maskstore_ps(o2, mk, leaky8(v0, slope));
        }
    }
}

#define ROW_FOR(KZ, NB)                                                                            \
    {                                                                                              \
        int x = 0;                                                                                 \
        for (; x + 16 <= W; x += 16)                                                               \
            tile(ib + x, PS, SS, RS, Cin, dil, wb, bb, KZ, NB, 2, 8, ob + x, OPS, mode,            \
                 rb ? rb + x : 0, o2 ? o2 + x : 0, slope);                                         \
        for (; x < W; x += 8)                                                                      \
            tile(ib + x, PS, SS, RS, Cin, dil, wb, bb, KZ, NB, 1, W - x < 8 ? W - x : 8, ob + x,   \
                 OPS, mode, rb ? rb + x : 0, o2 ? o2 + x : 0, slope);                              \
    }
/* one output row of nb (1..5) channels, by the row macro ROW (ROW_FOR or ROW16_FOR) */
#define ROW_NB(ROW, KZ)        \
    switch (nb) {              \
    case 5: ROW(KZ, 5) break;  \
    case 4: ROW(KZ, 4) break;  \
    case 3: ROW(KZ, 3) break;  \
    case 2: ROW(KZ, 2) break;  \
    default: ROW(KZ, 1) break; \
    }

#if DRDM_AVX512
AI __m512 leaky16(__m512 v, __m512 s) { return _mm512_max_ps(v, _mm512_mul_ps(v, s)); }

/* The AVX-512 tile: NB output channels x NV vectors of 16 pixels of one output row (up to
 * 5 x 4 = 20 accumulators of the 32 registers; per tap NV loads and NB broadcasts feed NB x NV
 * FMAs).  The last vector covers the lanes of mask `ml` (loads and stores masked, so a partial
 * vector touches no memory past the row).  Same summation order per pixel as `tile`. */
AI void tile16(const float *in, long PS, long SS, long RS, int Cin, int dil, const float *wb, const float *bias,
               const int KZ, const int NB, const int NV, __mmask16 ml, float *out, long OPS, int mode,
               const float *res, float *out2, __m512 slope)
{
    __m512 a[5][4];
#pragma GCC unroll 5
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) a[j][v] = _mm512_set1_ps(bias[j]);
    FOR_TAPS({
        __m512 xv[4];
        _Pragma("GCC unroll 4")
        for (int v = 0; v < NV; v++)
            xv[v] = v < NV - 1 ? _mm512_loadu_ps(q + 16 * v) : _mm512_maskz_loadu_ps(ml, q + 16 * v);
        _Pragma("GCC unroll 5")
        for (int j = 0; j < NB; j++) {
            __m512 w = _mm512_set1_ps(wb[j]);
            _Pragma("GCC unroll 4")
            for (int v = 0; v < NV; v++) a[j][v] = _mm512_fmadd_ps(w, xv[v], a[j][v]);
        }
    })
#pragma GCC unroll 5
    for (int j = 0; j < NB; j++) {
        float *o = out + j * OPS;
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            const __mmask16 m = v < NV - 1 ? (__mmask16)0xFFFF : ml;
            __m512 r = a[j][v];
            if (mode == MODE_RES_LEAKY)
                r = leaky16(_mm512_add_ps(r, _mm512_maskz_loadu_ps(m, res + j * OPS + 16 * v)), slope);
            else if (mode == MODE_LEAKY)
                r = leaky16(r, slope);
            _mm512_mask_storeu_ps(o + 16 * v, m, r);
            if (mode == MODE_STORE_AND_LEAKY) _mm512_mask_storeu_ps(out2 + j * OPS + 16 * v, m, leaky16(r, slope));
        }
    }
}

#define TILE16(KZ, NB, NV, ML)                                                                      \
    tile16(ib + x, PS, SS, RS, Cin, dil, wb, bb, KZ, NB, NV, ML, ob + x, OPS, mode, rb ? rb + x : 0, \
           o2 ? o2 + x : 0, slope16)
/* full tiles of 64 pixels, then one tile of 1-4 vectors for the rest of the row */
#define ROW16_FOR(KZ, NB)                                                              \
    {                                                                                  \
        int x = 0;                                                                     \
        for (; x + 64 <= W; x += 64) TILE16(KZ, NB, 4, (__mmask16)0xFFFF);             \
        const int rem = W - x;                                                         \
        if (rem > 0) {                                                                 \
            const int nv = (rem + 15) >> 4;                                            \
            const __mmask16 ml = (__mmask16)((1u << (rem - 16 * (nv - 1))) - 1u);      \
            switch (nv) {                                                              \
            case 1: TILE16(KZ, NB, 1, ml); break;                                      \
            case 2: TILE16(KZ, NB, 2, ml); break;                                      \
            case 3: TILE16(KZ, NB, 3, ml); break;                                      \
            default: TILE16(KZ, NB, 4, ml); break;                                     \
            }                                                                          \
        }                                                                              \
    }
#define ROW_KIND ROW16_FOR
#else
#define ROW_KIND ROW_FOR
#endif
#endif

/* Strides of a padded buffer (see the layout above); nd = 2 or 3, D = 1 in 2D. */
typedef struct { long RS, SS, PS; int P, PZ; } geom_t;
static geom_t geom(int nd, int P, int D, int H, int W)
{
    geom_t g;
    g.P = P;
    g.PZ = nd == 3 ? P : 0;
    g.RS = W + 2 * P;
    g.SS = (long)(H + 2 * P) * g.RS;
    g.PS = (long)(D + 2 * g.PZ) * g.SS;
    return g;
}
static inline long at(const geom_t *g, int z, int y) { return (z + g->PZ) * g->SS + (y + g->P) * g->RS + g->P; }

/* 3x3 (2D) or 3x3x3 (3D) convolution, stride 1, padding = dilation (<= P_in), on padded planes.
 * in: B x Cin planes (border P_in); out, res, out2: B x Cout planes (border P_out; P_out may be 0
 * for a dense output).  wpk: weights packed in blocks of 5 output channels, each block
 * [ci][kz][ky][kx][j] (see native.py: pack_conv).  mode: MODE_*.  res may alias out. */
void drdm_conv(int nd, const float *in, int B, int Cin, int P_in, float *out, int Cout, int P_out, int D, int H,
               int W, int dil, const float *wpk, const float *bias, int mode, const float *res, float *out2,
               float slope_f, int nthreads)
{
    const geom_t gi = geom(nd, P_in, D, H, W), go = geom(nd, P_out, D, H, W);
    const long PS = gi.PS, SS = gi.SS, RS = gi.RS, OPS = go.PS;
    const int ncob = (Cout + 4) / 5, KZ = nd == 3 ? 3 : 1, taps = 9 * KZ;
#if DRDM_AVX2
    const __m256 slope = _mm256_set1_ps(slope_f);
#endif
#if DRDM_AVX512
    const __m512 slope16 = _mm512_set1_ps(slope_f);
    (void)slope;
#endif
    /* Output-channel blocks innermost: a thread's band of rows reads its 3 (x3) input rows per
     * channel once from memory and reuses them, from L1/L2, for every block of 5 output channels.
     * (Blocks outermost, each thread streamed the whole input once per block: 2-4x the L3
     * traffic, 1.2-2.3x slower per convolution in noisy microbenchmarks on a loaded 2-core
     * EPYC; issue 15.)  The
     * arithmetic per output pixel is unchanged. */
#pragma omp parallel for num_threads(nthreads) collapse(4) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int z = 0; z < D; z++) {
            for (int y = 0; y < H; y++) {
                for (int cob = 0; cob < ncob; cob++) {
                    int nb = Cout - cob * 5;
                    if (nb > 5) nb = 5;
                    const float *wb = wpk + (long)cob * 5 * Cin * taps;
                    const float *bb = bias + cob * 5;
                    const float *ib = in + (long)b * Cin * PS + at(&gi, z, y);
                    long oo = ((long)b * Cout + cob * 5) * OPS + at(&go, z, y);
                    float *ob = out + oo;
                    const float *rb = res ? res + oo : 0;
                    float *o2 = out2 ? out2 + oo : 0;
#if DRDM_AVX2
                    if (KZ == 3) { ROW_NB(ROW_KIND, 3) } else { ROW_NB(ROW_KIND, 1) }
#else
                    float acc[W];
                    for (int j = 0; j < nb; j++) {
                        for (int x = 0; x < W; x++) acc[x] = bb[j];
                        const float *w = wb + j;
                        for (int ci = 0; ci < Cin; ci++)
                            for (int kz = 0; kz < KZ; kz++)
                                for (int ky = 0; ky < 3; ky++)
                                    for (int kx = 0; kx < 3; kx++) {
                                        const float wv = *w;
                                        w += nb;
                                        const float *q = ib + ci * PS + (KZ == 3 ? (long)(kz - 1) * dil * SS : 0)
                                                         + (long)(ky - 1) * dil * RS + (kx - 1) * dil;
                                        for (int x = 0; x < W; x++) acc[x] += wv * q[x];
                                    }
                        float *orow = ob + j * OPS;
                        for (int x = 0; x < W; x++) {
                            float v = acc[x];
                            if (mode == MODE_RES_LEAKY) v = leakyf(v + rb[j * OPS + x], slope_f);
                            else if (mode == MODE_LEAKY) v = leakyf(v, slope_f);
                            orow[x] = v;
                            if (mode == MODE_STORE_AND_LEAKY) o2[j * OPS + x] = leakyf(v, slope_f);
                        }
                    }
#endif
                }
            }
        }
    }
}

/* Row reductions in 8 explicit lanes (vectorised without reassociation flags), lanes then
 * added up in double: the sum of row[x], and the sum of (row[x] - m)^2.  The SIMD builds keep
 * four vectors of 8 lanes (32 pixels a step), added into one before the lanes: one chain of
 * dependent adds per row made the instance normalisation of 10 x 256^2 take 1.2-2.0 ms instead of
 * 0.8-1.1 (one thread, loaded machine). */
#if DRDM_AVX2
#define ROW_REDUCE(STEP)                                                                      \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                               \
    int x = 0;                                                                                \
    for (; x + 32 <= W; x += 32) {                                                            \
        a0 = STEP(a0, x);                                                                     \
        a1 = STEP(a1, x + 8);                                                                 \
        a2 = STEP(a2, x + 16);                                                                \
        a3 = STEP(a3, x + 24);                                                                \
    }                                                                                         \
    for (; x + 8 <= W; x += 8) a0 = STEP(a0, x);                                              \
    float acc[8];                                                                             \
    _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));       \
    double s = 0.0;                                                                           \
    for (int l = 0; l < 8; l++) s += acc[l];
#define SUM_STEP(a, i) _mm256_add_ps(a, _mm256_loadu_ps(row + (i)))
#define SQDEV_STEP(a, i) _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(row + (i)), vm), \
                                         _mm256_sub_ps(_mm256_loadu_ps(row + (i)), vm), a)
static double row_sum(const float *row, int W)
{
    ROW_REDUCE(SUM_STEP)
    for (; x < W; x++) s += row[x];
    return s;
}

static double row_sqdev(const float *row, int W, float m)
{
    const __m256 vm = _mm256_set1_ps(m);
    ROW_REDUCE(SQDEV_STEP)
    for (; x < W; x++) { float d = row[x] - m; s += (double)d * d; }
    return s;
}
#else
static double row_sum(const float *row, int W)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int x = 0;
    for (; x + 8 <= W; x += 8)
        for (int l = 0; l < 8; l++) acc[l] += row[x + l];
    double s = 0.0;
    for (int l = 0; l < 8; l++) s += acc[l];
    for (; x < W; x++) s += row[x];
    return s;
}

static double row_sqdev(const float *row, int W, float m)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int x = 0;
    for (; x + 8 <= W; x += 8)
        for (int l = 0; l < 8; l++) { float d = row[x + l] - m; acc[l] += d * d; }
    double s = 0.0;
    for (int l = 0; l < 8; l++) s += acc[l];
    for (; x < W; x++) { float d = row[x] - m; s += (double)d * d; }
    return s;
}
#endif

/* row <- (row - m) * scale + shift; out <- LeakyReLU(row) (branch-free: a data-dependent branch
 * per pixel kept the compiler from vectorising and cost 25x) */
static void norm_leaky_row(float *restrict row, float *restrict out, int W, float m, float scale, float shift,
                           float slope)
{
    int x = 0;
#if DRDM_AVX2
    const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(scale), vb = _mm256_set1_ps(shift);
    const __m256 vl = _mm256_set1_ps(slope);
    for (; x + 8 <= W; x += 8) {
        __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(row + x), vm), vs), vb);
        _mm256_storeu_ps(row + x, v);
        _mm256_storeu_ps(out + x, leaky8(v, vl));
    }
#endif
    for (; x < W; x++) {
        float v = (row[x] - m) * scale + shift;
        row[x] = v;
        out[x] = leakyf(v, slope);
    }
}

/* Instance normalisation in place on B x C padded planes, then a <- LeakyReLU(r) (if a).
 * Statistics in double: mean, then the biased variance of (x - mean); y = (x - mean) * scale + beta
 * with scale = gamma / sqrt(var + eps) (gamma, beta per channel; NULL = 1, 0). */
void drdm_instnorm_leaky(int nd, float *r, int B, int C, int P, int D, int H, int W, const float *gamma,
                         const float *beta, float eps, float *a, float slope, int nthreads)
{
    const geom_t g = geom(nd, P, D, H, W);
    const double n = (double)D * H * W;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int pl = 0; pl < B * C; pl++) {
        int c = pl % C;
        float *base = r + (long)pl * g.PS;
        double s = 0.0;
        for (int z = 0; z < D; z++)
            for (int y = 0; y < H; y++) s += row_sum(base + at(&g, z, y), W);
        const double mean = s / n;
        const float mf = (float)mean;
        double v = 0.0;
        for (int z = 0; z < D; z++)
            for (int y = 0; y < H; y++) v += row_sqdev(base + at(&g, z, y), W, mf);
        const double var = v / n;
        const float scale = (float)((gamma ? gamma[c] : 1.0) / sqrt(var + (double)eps));
        const float shift = beta ? beta[c] : 0.0f;
        float *abase = a ? a + (long)pl * g.PS : 0;
        for (int z = 0; z < D; z++) {
            for (int y = 0; y < H; y++) {
                float *restrict row = base + at(&g, z, y);
                if (abase) norm_leaky_row(row, abase + at(&g, z, y), W, mf, scale, shift, slope);
                else
                    for (int x = 0; x < W; x++) row[x] = (row[x] - mf) * scale + shift;
            }
        }
    }
}

/* dst[b, c0 + c] = src[b, c] + add[b * add_bstride + c]  (planes; P_src 0 = dense source) */
void drdm_planes_add(int nd, const float *src, int P_src, int Cs, float *dst, int P_dst, int Cd, int c0, int B,
                     int D, int H, int W, const float *add, int add_bstride, int nthreads)
{
    const geom_t gs = geom(nd, P_src, D, H, W), gd = geom(nd, P_dst, D, H, W);
#pragma omp parallel for num_threads(nthreads) collapse(3) schedule(static)
    for (int pl = 0; pl < B * Cs; pl++) {
        for (int z = 0; z < D; z++) {
            for (int y = 0; y < H; y++) {
                int b = pl / Cs, c = pl % Cs;
                const float e = add ? add[(long)b * add_bstride + c] : 0.0f;
                const float *s = src + (long)pl * gs.PS + at(&gs, z, y);
                float *d = dst + ((long)b * Cd + c0 + c) * gd.PS + at(&gd, z, y);
                for (int x = 0; x < W; x++) d[x] = s[x] + e;
            }
        }
    }
}

/* channels-last (B, [D,] H, W, Cs) -> planes dst[b, c0 + c] (+ add[b * add_bstride + c]) */
void drdm_nhwc_to_planes(int nd, const float *src, int Cs, float *dst, int P_dst, int Cd, int c0, int B, int D,
                         int H, int W, const float *add, int add_bstride, int nthreads)
{
    const geom_t gd = geom(nd, P_dst, D, H, W);
#pragma omp parallel for num_threads(nthreads) collapse(3) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int z = 0; z < D; z++) {
            for (int y = 0; y < H; y++) {
                const float *s = src + ((((long)b * D + z) * H + y) * W) * Cs;
                for (int c = 0; c < Cs; c++) {
                    const float e = add ? add[(long)b * add_bstride + c] : 0.0f;
                    float *d = dst + ((long)b * Cd + c0 + c) * gd.PS + at(&gd, z, y);
                    for (int x = 0; x < W; x++) d[x] = s[(long)x * Cs + c] + e;
                }
            }
        }
    }
}

/* planes (B, C, border P_src) -> channels-last (B, [D,] H, W, C) */
void drdm_planes_to_nhwc(int nd, const float *src, int P_src, int C, float *dst, int B, int D, int H, int W,
                         int nthreads)
{
    const geom_t gs = geom(nd, P_src, D, H, W);
#pragma omp parallel for num_threads(nthreads) collapse(3) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int z = 0; z < D; z++) {
            for (int y = 0; y < H; y++) {
                float *d = dst + ((((long)b * D + z) * H + y) * W) * C;
                for (int c = 0; c < C; c++) {
                    const float *s = src + ((long)b * C + c) * gs.PS + at(&gs, z, y);
                    for (int x = 0; x < W; x++) d[(long)x * C + c] = s[x];
                }
            }
        }
    }
}
