/* lmloss native CPU kernels: the softmax row sums and the gradient of token_nll, one pass over the logits; then
the causal attention's softmax rows and output division (cpu_attention.py), a Llama layer's RMSNorm, SiLU x up
and RoPE (cpu_layers.py), and the fused linear head's fold of a tile of logits (linear.py).

Built by lmloss/ops/native.py with the machine's C compiler (-O3 -march=native -ffp-contract=off, no
-ffast-math: NaN and infinity must survive, and products round as torch's do) and loaded with ctypes. Each
loop works on a range of rows; the *_all drivers hand the rows out to the calling thread's OpenMP team (built
with -fopenmp where that team is torch's own), else Python worker threads split the ranges (the GIL is
released during a ctypes call).

Per row i, with y_j = fma(x_j, L, c_i) computed in float32 (L = log2(e) in float32):
    row_sums   s_i = sum_j 2^(y_j), accumulated in float32 lanes over 512 columns, those partial sums in
               double; +inf when some y_j >= 127.5 (2^y overflows: the caller redoes the row max-shifted),
               NaN when some y_j is NaN or infinite (a NaN or infinite logit: redone as well)
    row_grads  out_ij = (2^(y_j) - s_i [j == t_i]) * (g_i / s_i), rounded once to out's dtype; s_i is the
               row's own sum, so each row is renormalized as a softmax is
2^y is a degree-7 Taylor polynomial of 2^f on f = y - rint(y) in [-1/2, 1/2] times 2^rint(y) built in the
exponent bits: relative error below 2e-7 (one float32 rounding of the polynomial's terms); y below -126.5
gives 0 (such a term is below 2^-126 of a sum that is at least ~1), -inf included.
dtype codes: 0 float32, 1 bfloat16, 2 float16.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define COLS_PER_PARTIAL 512

static inline float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* 2^f = sum_k (f ln 2)^k / k!, k <= 7, on f in [-1/2, 1/2]: EXP2_C7 f^7 + ... + EXP2_C1 f + 1 (Horner) */
#define EXP2_C7 1.5252733804059841e-05f
#define EXP2_C6 1.5403530393381609e-04f
#define EXP2_C5 1.3333558146428443e-03f
#define EXP2_C4 9.6181291076284772e-03f
#define EXP2_C3 5.5504108664821580e-02f
#define EXP2_C2 2.4022650695910072e-01f
#define EXP2_C1 6.9314718055994531e-01f

static inline float exp2_poly(float y) {
    /* clamp to [-127, 128] (one maxps and one minps; a NaN y becomes a number here, so the callers detect NaN
       and inf apart): y >= 127.5 rounds to n = 128, whose scale is +inf, so the row sum overflows */
    y = y > -127.0f ? y : -127.0f;
    y = y < 128.0f ? y : 128.0f;
    float n = rintf(y);
    float f = y - n;                        /* exact, in [-1/2, 1/2] */
    float p = EXP2_C7;
    p = fmaf(p, f, EXP2_C6);
    p = fmaf(p, f, EXP2_C5);
    p = fmaf(p, f, EXP2_C4);
    p = fmaf(p, f, EXP2_C3);
    p = fmaf(p, f, EXP2_C2);
    p = fmaf(p, f, EXP2_C1);
    p = fmaf(p, f, 1.0f);
    int32_t e = (int32_t)n + 127;           /* 0 for n = -127: the term is 0; 255 for n = 128: +inf */
    return p * bits_to_float((uint32_t)e << 23);
}

/* float32 -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN */
static inline uint16_t to_bf16(float f) {
    uint32_t u = float_to_bits(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (f != f) ? (uint16_t)((u >> 16) | 0x40u) : (uint16_t)r;
}

/* One row's y_j = fma(LOAD, L, c) and e_j = 2^(y_j), summed (float32 lanes per 512 columns, double across);
   EACH(y, e) runs per element inside the vectorized loop. row_sum: EACH accumulates y * 0, NaN for a NaN or
   infinite y, and the row's sum becomes NaN; row_exp: EACH stores e (a -inf logit must give 0 there, not NaN). */
#define ROW_LOOP(LOAD, EACH)                                                      \
    double total = 0.0;                                                           \
    float bad = 0.0f;                                                             \
    for (int64_t j0 = 0; j0 < V; j0 += COLS_PER_PARTIAL) {                        \
        int64_t j1 = j0 + COLS_PER_PARTIAL < V ? j0 + COLS_PER_PARTIAL : V;       \
        float acc = 0.0f;                                                         \
        _Pragma("omp simd reduction(+:acc) reduction(+:bad)")                     \
        for (int64_t j = j0; j < j1; ++j) {                                       \
            float y = fmaf(LOAD, L, c);                                           \
            float e = exp2_poly(y);                                               \
            EACH;                                                                 \
            acc += e;                                                             \
        }                                                                         \
        total += (double)acc;                                                     \
    }

#define ROW_SUM_BODY(LOAD)                                                        \
    ROW_LOOP(LOAD, bad = fmaf(y, 0.0f, bad))                                      \
    return bad == 0.0f ? total : (double)NAN;

static double row_sum_f32(const float *x, int64_t V, float L, float c) {
    ROW_SUM_BODY(x[j])
}

static double row_sum_bf16(const uint16_t *x, int64_t V, float L, float c) {
    ROW_SUM_BODY(bits_to_float((uint32_t)x[j] << 16))
}

static double row_sum_f16(const _Float16 *x, int64_t V, float L, float c) {
    ROW_SUM_BODY((float)x[j])
}

static double row_sum(const void *row, int dtype, int64_t V, float L, float c) {
    if (dtype == 1)
        return row_sum_bf16((const uint16_t *)row, V, L, c);
    if (dtype == 2)
        return row_sum_f16((const _Float16 *)row, V, L, c);
    return row_sum_f32((const float *)row, V, L, c);
}

/* sums[i] = s_i (see the top) for rows [r0, r1) of x (row i at x + i * row_stride elements) */
void lmloss_row_sums(const void *x, int dtype, int64_t row_stride, int64_t V, float L, const float *c,
                     int64_t r0, int64_t r1, double *sums) {
    const int64_t item = dtype == 0 ? 4 : 2;
    for (int64_t i = r0; i < r1; ++i)
        sums[i] = row_sum((const char *)x + i * row_stride * item, dtype, V, L, c[i]);
}

/* the exponentials of one row into buf (float32, V), returning their sum */
#define ROW_EXP_BODY(LOAD)                                                        \
    ROW_LOOP(LOAD, buf[j] = e)                                                    \
    (void)bad;                                                                    \
    return total;

static double row_exp_f32(const float *x, int64_t V, float L, float c, float *buf) {
    ROW_EXP_BODY(x[j])
}

static double row_exp_bf16(const uint16_t *x, int64_t V, float L, float c, float *buf) {
    ROW_EXP_BODY(bits_to_float((uint32_t)x[j] << 16))
}

static double row_exp_f16(const _Float16 *x, int64_t V, float L, float c, float *buf) {
    ROW_EXP_BODY((float)x[j])
}

/* out[i, j] = (2^(fma(x_ij, L, c_i)) - s_i [j == t_i]) * (g_i / s_i) for rows [r0, r1); out has x's dtype,
   is contiguous (row i at out + i * V), and t_i outside [0, V) means no one-hot. Returns 0, or -1 when the
   float32 row buffer could not be allocated. */
int lmloss_row_grads(const void *x, int dtype, int64_t row_stride, int64_t V, float L, const float *c,
                     const int64_t *targets, const float *g, int64_t r0, int64_t r1, void *out) {
    const int64_t item = dtype == 0 ? 4 : 2;
    float *own = NULL;
    if (dtype != 0) {
        own = (float *)malloc((size_t)V * sizeof(float));
        if (own == NULL)
            return -1;
    }
    for (int64_t i = r0; i < r1; ++i) {
        const void *row = (const char *)x + i * row_stride * item;
        float *buf = dtype == 0 ? (float *)out + i * V : own;  /* float32: the exponentials go straight to out */
        double s;
        if (dtype == 1)
            s = row_exp_bf16((const uint16_t *)row, V, L, c[i], buf);
        else if (dtype == 2)
            s = row_exp_f16((const _Float16 *)row, V, L, c[i], buf);
        else
            s = row_exp_f32((const float *)row, V, L, c[i], buf);
        const float sf = (float)s;
        const float k = g[i] / sf;
        const int64_t t = targets[i];
        const int onehot = t >= 0 && t < V;
        const float bt = onehot ? buf[t] - sf : 0.0f;  /* the target's term, before buf[t] is scaled */
        if (dtype == 0) {
            float *o = (float *)out + i * V;
            _Pragma("omp simd")
            for (int64_t j = 0; j < V; ++j)
                o[j] = buf[j] * k;
            if (onehot)
                o[t] = bt * k;
        } else if (dtype == 1) {
            uint16_t *o = (uint16_t *)out + i * V;
            _Pragma("omp simd")
            for (int64_t j = 0; j < V; ++j)
                o[j] = to_bf16(buf[j] * k);
            if (onehot)
                o[t] = to_bf16(bt * k);
        } else {
            _Float16 *o = (_Float16 *)out + i * V;
            _Pragma("omp simd")
            for (int64_t j = 0; j < V; ++j)
                o[j] = (_Float16)(buf[j] * k);
            if (onehot)
                o[t] = (_Float16)(bt * k);
        }
    }
    free(own);
    return 0;
}

/* Causal attention's probabilities, unnormalized, in place on rows [r0, r1) of a float32 score block s (row i
   at s + i * n) whose row i sees the columns j < k_i = min(n, first + i mod period) (period: the rows of one
   head, where the block stacks several heads' rows):
       m_i = max_{j < k_i} s_ij,   s_ij <- 2^(fma(s_ij, c, -m_i c)) for j < k_i, 0 for j >= k_i,
       sums[i] = sum_{j < k_i} s_ij   (float32 lanes per 512 columns, double across, then float32)
   with c = scale * log2(e) > 0, so 2^(c (s - m)) = exp(scale (s - m)) up to the rounding of m c, a factor common
   to the row that the normalization by sums[i] cancels. Returns the number of rows whose sum is not a positive
   finite number (a NaN or infinite score in the row): the caller recomputes those blocks another way. */
int64_t lmloss_causal_probs(float *s, int64_t n, int64_t first, int64_t period, float c, int64_t r0, int64_t r1,
                            float *sums) {
    int64_t bad_rows = 0;
    for (int64_t i = r0; i < r1; ++i) {
        float *row = s + i * n;
        const int64_t seen = first + i % period;
        int64_t k = seen < n ? seen : n;
        float m = -INFINITY;
        _Pragma("omp simd reduction(max:m)")
        for (int64_t j = 0; j < k; ++j)
            m = row[j] > m ? row[j] : m;
        const float L = c, cm = -m * c;
        double total = 0.0;
        float bad = 0.0f;
        for (int64_t j0 = 0; j0 < k; j0 += COLS_PER_PARTIAL) {
            int64_t j1 = j0 + COLS_PER_PARTIAL < k ? j0 + COLS_PER_PARTIAL : k;
            float acc = 0.0f;
            _Pragma("omp simd reduction(+:acc) reduction(+:bad)")
            for (int64_t j = j0; j < j1; ++j) {
                float y = fmaf(row[j], L, cm);
                float e = exp2_poly(y);
                bad = fmaf(y, 0.0f, bad);   /* NaN for a NaN or infinite y */
                row[j] = e;
                acc += e;
            }
            total += (double)acc;
        }
        if (k < n)
            memset(row + k, 0, (size_t)(n - k) * sizeof(float));
        sums[i] = (float)total;
        if (bad != 0.0f || !(total > 0.0) || !isfinite(sums[i]))
            ++bad_rows;
    }
    return bad_rows;
}

/* The same three loops over all rows [0, n_rows) on the calling thread's OpenMP team of n_threads threads, each
   thread taking the next `chunk` rows when it is free (an atomic counter: a thread whose core is busy does less
   of the work). Built with -fopenmp only where torch's own OpenMP runtime (libgomp) is loaded, so these run
   on the threads torch's parallel ops use: no second set of threads competing with them for the cores.
   lmloss_omp_threads() is 0 in a build without OpenMP (then native.py splits rows between Python threads). */
#ifdef _OPENMP
#include <omp.h>
int lmloss_omp_threads(void) { return omp_get_max_threads(); }
#else
int lmloss_omp_threads(void) { return 0; }
#endif

#define FOR_CHUNKS(...)                                                           \
    int64_t next = 0;                                                             \
    _Pragma("omp parallel num_threads(n_threads)")                               \
    for (;;) {                                                                    \
        int64_t r0 = __atomic_fetch_add(&next, chunk, __ATOMIC_RELAXED);          \
        if (r0 >= n_rows)                                                         \
            break;                                                                \
        int64_t r1 = r0 + chunk < n_rows ? r0 + chunk : n_rows;                   \
        __VA_ARGS__;                                                              \
    }

void lmloss_row_sums_all(const void *x, int dtype, int64_t row_stride, int64_t V, float L, const float *c,
                         int64_t n_rows, int64_t chunk, int n_threads, double *sums) {
    FOR_CHUNKS(lmloss_row_sums(x, dtype, row_stride, V, L, c, r0, r1, sums))
}

int lmloss_row_grads_all(const void *x, int dtype, int64_t row_stride, int64_t V, float L, const float *c,
                         const int64_t *targets, const float *g, int64_t n_rows, int64_t chunk, int n_threads,
                         void *out) {
    int failed = 0;
    FOR_CHUNKS(if (lmloss_row_grads(x, dtype, row_stride, V, L, c, targets, g, r0, r1, out))
                   __atomic_store_n(&failed, 1, __ATOMIC_RELAXED))
    return failed ? -1 : 0;
}

int64_t lmloss_causal_probs_all(float *s, int64_t n, int64_t first, int64_t period, float c, int64_t n_rows,
                                int64_t chunk, int n_threads, float *sums) {
    int64_t bad_rows = 0;
    FOR_CHUNKS(__atomic_fetch_add(&bad_rows, lmloss_causal_probs(s, n, first, period, c, r0, r1, sums),
                                  __ATOMIC_RELAXED))
    return bad_rows;
}

/* The attention's output rows divided by their probability sums, into the (T, heads, Dv) layout the output
   projection reads: out[r * out_row + g * out_head + d] = o[(g * rows + r) * Dv + d] / sums[g * rows + r]
   for g < group, r < rows, d < Dv (one division each: torch.div's numbers). */
void lmloss_divide_rows_all(const float *o, const float *sums, int64_t group, int64_t rows, int64_t Dv,
                            int64_t out_row, int64_t out_head, int64_t chunk, int n_threads, float *out) {
    const int64_t n_rows = group * rows;
    FOR_CHUNKS({
        for (int64_t i = r0; i < r1; ++i) {
            const int64_t g = i / rows, r = i % rows;
            const float *src = o + i * Dv;
            float *dst = out + r * out_row + g * out_head;
            const float sum = sums[i];
            _Pragma("omp simd")
            for (int64_t d = 0; d < Dv; ++d)
                dst[d] = src[d] / sum;
        }
    })
}

/* Elementwise layers of a Llama-family forward, float32, each in one pass (lmloss/ops/cpu_layers.py):
       rms_norm  out_i = w * (x_i * (1 / sqrt(mean(x_i^2) + eps)))   per row of n, the products rounded as torch's
                 LlamaRMSNorm rounds them; the mean's sum in float32 lanes over 512 columns, double across
       silu_mul  out = (g / (1 + exp(-g))) * u
       rope      out[b,h,t,:] = x * cos[b,t,:] + rotate_half(x) * sin[b,t,:], rotate_half(x) = (-x[D/2:], x[:D/2]),
                 x read through its strides (a transposed projection), out contiguous (B, H, T, D) */
static void rms_norm_rows(const float *x, const float *w, float eps, int64_t n, int64_t r0, int64_t r1, float *out) {
    for (int64_t i = r0; i < r1; ++i) {
        const float *row = x + i * n;
        float *o = out + i * n;
        double total = 0.0;
        for (int64_t j0 = 0; j0 < n; j0 += COLS_PER_PARTIAL) {
            int64_t j1 = j0 + COLS_PER_PARTIAL < n ? j0 + COLS_PER_PARTIAL : n;
            float acc = 0.0f;
            _Pragma("omp simd reduction(+:acc)")
            for (int64_t j = j0; j < j1; ++j)
                acc += row[j] * row[j];
            total += (double)acc;
        }
        const float r = 1.0f / sqrtf((float)(total / (double)n) + eps);
        _Pragma("omp simd")
        for (int64_t j = 0; j < n; ++j) {
            o[j] = w[j] * (row[j] * r);  /* two roundings, as torch's two products */
        }
    }
}

void lmloss_rms_norm_all(const float *x, const float *w, float eps, int64_t n, int64_t n_rows, int64_t chunk,
                         int n_threads, float *out) {
    FOR_CHUNKS(rms_norm_rows(x, w, eps, n, r0, r1, out))
}

#define SILU_BLOCK 4096
void lmloss_silu_mul_all(const float *g, const float *u, int64_t n, int64_t chunk, int n_threads, float *out) {
    const int64_t n_rows = (n + SILU_BLOCK - 1) / SILU_BLOCK;  /* blocks of SILU_BLOCK elements */
    FOR_CHUNKS({
        int64_t j1 = r1 * SILU_BLOCK < n ? r1 * SILU_BLOCK : n;
        _Pragma("omp simd")
        for (int64_t j = r0 * SILU_BLOCK; j < j1; ++j) {
            /* exp(-g) = 2^(y + y_lo): y = -g log2(e) rounded, y_lo its rounding error and log2(e)'s, so that
               the product's rounding (~|y| 2^-24) does not grow with |g| */
            const float m = -g[j], y = m * 1.4426950408889634f;
            const float y_lo = fmaf(m, 1.4426950408889634f, -y) + m * 1.9259629911e-08f;
            float e = exp2_poly(y);
            e = fmaf(e, y_lo * 0.69314718056f, e);
            out[j] = (g[j] / (1.0f + e)) * u[j];
        }
    })
}

/* rows (b, h, t) in that order; x element (b, h, t, d) at x + b*sb + h*sh + t*st + d (unit stride over d);
   cos and sin (Bc, T, D) contiguous with Bc = B or 1 (broadcast over the batch) */
void lmloss_rope_all(const float *x, int64_t sb, int64_t sh, int64_t st, const float *cs, const float *sn,
                     int64_t Bc, int64_t B, int64_t H, int64_t T, int64_t D, int64_t chunk, int n_threads,
                     float *out) {
    const int64_t n_rows = B * H * T, half = D / 2;
    FOR_CHUNKS({
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / (H * T), h = (r / T) % H, t = r % T;
            const float *xr = x + b * sb + h * sh + t * st;
            const int64_t cb = Bc == 1 ? 0 : b;
            const float *c = cs + (cb * T + t) * D, *s = sn + (cb * T + t) * D;
            float *o = out + r * D;
            _Pragma("omp simd")
            for (int64_t d = 0; d < half; ++d) {
                o[d] = xr[d] * c[d] + (-xr[d + half]) * s[d];  /* no fma (-ffp-contract=off): torch's roundings */
            }
            _Pragma("omp simd")
            for (int64_t d = half; d < D; ++d) {
                o[d] = xr[d] * c[d] + xr[d - half] * s[d];
            }
        }
    })
}

/* The fused linear head's online log-sum-exp (lmloss/ops/linear.py), one (rows, cols) float32 tile of logits z
   for the vocabulary columns [c0, c0 + cols) at a time, per row i, L_i in double:
       first tile:  shift = max_j z_ij,  L_i = shift + log(s)
       later tiles: shift = (float)L_i,  L_i = shift + log(exp(L_i - shift) + s)
   with s = sum_j 2^(fma(z_ij, log2 e, -shift log2 e)) (float32 lanes over 512 columns, double across), and
   target_logit_i = z_i,(t_i - c0) where the row's target is in the tile. A row whose s is not a positive finite
   number (a logit ~88 nats above the shift, or a NaN or infinite one) takes the exact path: the tile's own
   max and sum in double, NaN for a NaN or +inf logit (as F.cross_entropy), nothing for a tile of -inf only,
   combined with L by log-add-exp. */
static double logaddexp_d(double a, double b) {
    if (a == -INFINITY) return b;
    if (b == -INFINITY) return a;
    if (a == INFINITY || b == INFINITY) return INFINITY;
    double m = a > b ? a : b;
    return m + log(exp(a - m) + exp(b - m));
}

static void fold_rows(const float *z, int64_t cols, int64_t c0, const int64_t *targets, int first, int64_t r0,
                      int64_t r1, double *Ls, float *target_logit) {
    const float L2E = 1.4426950408889634f;
    for (int64_t i = r0; i < r1; ++i) {
        const float *row = z + i * cols;
        const int64_t t = targets[i] - c0;
        if (t >= 0 && t < cols)
            target_logit[i] = row[t];
        float shift;
        if (first) {
            float m = -INFINITY;
            _Pragma("omp simd reduction(max:m)")
            for (int64_t j = 0; j < cols; ++j)
                m = row[j] > m ? row[j] : m;
            shift = m;
        } else {
            shift = (float)Ls[i];
        }
        const float c = -shift * L2E;
        const int64_t V = cols;
        const float L = L2E;
        ROW_LOOP(row[j], bad = fmaf(y, 0.0f, bad))
        if (bad == 0.0f && total > 0.0 && total < INFINITY) {
            Ls[i] = first ? (double)shift + log(total) : (double)shift + log(exp(Ls[i] - (double)shift) + total);
            continue;
        }
        /* exact path */
        int nan = 0;
        double m = -INFINITY;
        for (int64_t j = 0; j < cols; ++j) {
            if (row[j] != row[j]) nan = 1;
            else if (row[j] > m) m = row[j];
        }
        double tile;
        if (nan || m == INFINITY) tile = NAN;  /* F.cross_entropy's NaN for a +inf logit (inf - inf) */
        else if (m == -INFINITY) tile = m;      /* every logit of the tile -inf: it adds nothing */
        else {
            double s = 0.0;
            for (int64_t j = 0; j < cols; ++j)
                s += exp((double)row[j] - m);
            tile = m + log(s);
        }
        Ls[i] = first ? tile : (tile != tile || Ls[i] != Ls[i] ? (double)NAN : logaddexp_d(Ls[i], tile));
    }
}

void lmloss_fold_tile_all(const float *z, int64_t n_rows, int64_t cols, int64_t c0, const int64_t *targets,
                          int first, double *Ls, float *target_logit, int64_t chunk, int n_threads) {
    FOR_CHUNKS(fold_rows(z, cols, c0, targets, first, r0, r1, Ls, target_logit))
}

/* Causal attention for a whole layer in one call (cpu_attention.py), where the library is built with AVX-512:
       out[b, t, h, :] = sum_{j in J_t} p_tj v[b, hk, j, :] / sum_{j in J_t} p_tj,   J_t = {t - window < j <= t}
       p_tj = 2^(c (s_tj - max_{j' in J_t} s_tj')),  s_tj = q[b, h, t, :] . k[b, hk, j, :],  hk = h / group
   (window 0: all j <= t).
   The work items are (b, hk, tile of ATT_TILE query rows, head of the group), in that order (the heads that share
   a key/value head one after the other, so their keys and values stay in the core's cache), handed to the
   OpenMP team by an atomic counter. Per item, in a scratch of ATT_TILE rows of the tile's keys (from the first
   row's first key, rounded down to 32, to t1) per thread:
       scores   s = q_tile @ k[keys].T   register tiles of 12 rows x 32 keys over d, the keys in panels of 32
                transposed (kt (B, Hk, T / 32, D, 32), T padded to a multiple of 32: each panel 8 KiB at D = 64,
                contiguous), only the keys some row of the 12 sees
       softmax  att_softmax_row: lmloss_causal_probs's formula in AVX-512 registers (the exact row max, the same
                2^y polynomial, float32 lanes over 512 columns and double across, 0 outside J_t)
       values   o = p @ v[keys], register tiles of 6 rows x 64 values over j up to the 6 rows' last key, then
                divided by the row sums into out (one division each, torch.div's numbers)
   Every product is a float32 fused multiply-add chain over d or j (summation order is the only difference from
   torch's). Rows whose scores hold a NaN or infinity are flagged in bad[(b * H + h) * T + t] for the caller to
   recompute; the return value counts them, -1 if a scratch could not be allocated. */
#if defined(__AVX512F__)
#include <immintrin.h>

#define ATT_TILE 24

static inline __mmask16 lanes_below(int64_t n) {  /* the first n of 16 lanes, n clamped to [0, 16] */
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

static inline void value_lanes(int64_t nv, __mmask16 m[4]) {  /* the 4 x 16 lanes of nv <= 64 values */
    for (int k = 0; k < 4; ++k)
        m[k] = lanes_below(nv - 16 * k);
}

/* s[r][0 .. 32) = sum_d q[r][d] panel[d][0 .. 32) for r < 12: 32 keys, transposed (D x 32, contiguous) */
static inline void att_scores_12x32(const float *const *q, const float *panel, int64_t D, float *s, int64_t lds) {
    __m512 a[12][2];
    _Pragma("GCC unroll 12")
    for (int r = 0; r < 12; ++r)
        a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
        const __m512 k0 = _mm512_loadu_ps(panel + 32 * d), k1 = _mm512_loadu_ps(panel + 32 * d + 16);
        _Pragma("GCC unroll 12")
        for (int r = 0; r < 12; ++r) {
            const __m512 x = _mm512_set1_ps(q[r][d]);
            a[r][0] = _mm512_fmadd_ps(x, k0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(x, k1, a[r][1]);
        }
    }
    _Pragma("GCC unroll 12")
    for (int r = 0; r < 12; ++r) {
        _mm512_storeu_ps(s + r * lds, a[r][0]);
        _mm512_storeu_ps(s + r * lds + 16, a[r][1]);
    }
}

/* o[r][0 .. 64) = sum_{j < n} p[r][j] v[j][0 .. 64) for r < 6, the lanes past nv (< 64) left 0 */
static inline void att_values_6x64(const float *const *p, const float *v, int64_t ldv, int64_t n, int64_t nv,
                                   __m512 o[6][4]) {
    __mmask16 m[4];
    value_lanes(nv, m);
    __m512 a[6][4];  /* in registers: accumulating into o itself would store them on every step */
    _Pragma("GCC unroll 6")
    for (int r = 0; r < 6; ++r)
        a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
        const float *vj = v + j * ldv;
        const __m512 v0 = _mm512_maskz_loadu_ps(m[0], vj), v1 = _mm512_maskz_loadu_ps(m[1], vj + 16);
        const __m512 v2 = _mm512_maskz_loadu_ps(m[2], vj + 32), v3 = _mm512_maskz_loadu_ps(m[3], vj + 48);
        _Pragma("GCC unroll 6")
        for (int r = 0; r < 6; ++r) {
            const __m512 x = _mm512_set1_ps(p[r][j]);
            a[r][0] = _mm512_fmadd_ps(x, v0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(x, v1, a[r][1]);
            a[r][2] = _mm512_fmadd_ps(x, v2, a[r][2]);
            a[r][3] = _mm512_fmadd_ps(x, v3, a[r][3]);
        }
    }
    _Pragma("GCC unroll 6")
    for (int r = 0; r < 6; ++r)
        for (int k = 0; k < 4; ++k)
            o[r][k] = a[r][k];
}

/* 2^y for 16 lanes: exp2_poly's operations, vectorized (the same numbers lane by lane) */
static inline __m512 att_exp2(__m512 y) {
    y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(128.0f));
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, n);
    __m512 p = _mm512_set1_ps(EXP2_C7);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* lmloss_causal_probs for one row of a tile, in registers: row[j] <- 2^(c (row[j] - max_{lo <= j' < k} row[j']))
   for lo <= j < k, 0 for the other j < n; returns the sum (float32 lanes over 512 columns, double across), or
   NaN where some exponent is NaN or infinite (a NaN or infinite score: the caller flags the row) */
static inline float att_softmax_row(float *row, int64_t lo, int64_t k, int64_t n, float c) {
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    int64_t j = lo;
    for (; j + 32 <= k; j += 32) {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(row + j));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(row + j + 16));
    }
    for (; j < k; j += 16)  /* lanes past k read as -inf */
        m0 = _mm512_max_ps(m0, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes_below(k - j), row + j));
    const float m = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    const __m512 L = _mm512_set1_ps(c), cm = _mm512_set1_ps(-m * c);
    __mmask16 bad = 0;
    double total = 0.0;
    for (int64_t j0 = lo; j0 < k; j0 += COLS_PER_PARTIAL) {
        const int64_t j1 = j0 + COLS_PER_PARTIAL < k ? j0 + COLS_PER_PARTIAL : k;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (j = j0; j < j1; j += 32) {
            const __mmask16 k0 = lanes_below(j1 - j), k1 = lanes_below(j1 - j - 16);
            const __m512 y0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k0, row + j), L, cm);
            const __m512 y1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k1, row + j + 16), L, cm);
            bad |= (_mm512_fpclass_ps_mask(y0, 0x99) & k0) | (_mm512_fpclass_ps_mask(y1, 0x99) & k1);
            const __m512 e0 = _mm512_maskz_mov_ps(k0, att_exp2(y0)), e1 = _mm512_maskz_mov_ps(k1, att_exp2(y1));
            _mm512_mask_storeu_ps(row + j, k0, e0);
            _mm512_mask_storeu_ps(row + j + 16, k1, e1);
            a0 = _mm512_add_ps(a0, e0);
            a1 = _mm512_add_ps(a1, e1);
        }
        total += (double)_mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
    memset(row, 0, (size_t)lo * sizeof(float));
    if (k < n)
        memset(row + k, 0, (size_t)(n - k) * sizeof(float));
    return bad ? NAN : (float)total;
}

typedef struct {
    const float *q, *kt, *v;
    int64_t B, H, Hk, T, D, Dv;
    int64_t qsb, qsh, qst, vsb, vsh, vst;  /* element strides of q (B, H, T, D) and v (B, Hk, T, Dv) */
    int64_t window;                       /* row t sees the keys t - window < j <= t */
    float c;
    float *out;                           /* (B, T, H, Dv) contiguous */
    unsigned char *bad;                   /* (B, H, T) */
} att_args;

static int64_t att_item(const att_args *a, int64_t item, float *S, float *sums) {
    const int64_t group = a->H / a->Hk, tiles = (a->T + ATT_TILE - 1) / ATT_TILE;
    const int64_t g = item % group, tile = (item / group) % tiles, bhk = item / (group * tiles);
    const int64_t b = bhk / a->Hk, hk = bhk % a->Hk, h = hk * group + g;
    const int64_t t0 = tile * ATT_TILE, t1 = t0 + ATT_TILE < a->T ? t0 + ATT_TILE : a->T, rows = t1 - t0;
    const int64_t W = a->window;
#define FIRST_KEY(t) ((t) - W + 1 > 0 ? (t) - W + 1 : 0)
    const int64_t j_lo = FIRST_KEY(t0) / 32 * 32;  /* S's column c is key j_lo + c */
    const int64_t n = (t1 - j_lo + 31) / 32 * 32;
    const int64_t lds = n + 16;  /* rows 64 bytes off a 4 KiB stride: no cache-set aliasing */
    const float *qrow[ATT_TILE];
    for (int64_t r = 0; r < ATT_TILE; ++r)  /* rows past the tile repeat its last row: computed, never stored */
        qrow[r] = a->q + b * a->qsb + h * a->qsh + (t0 + (r < rows ? r : rows - 1)) * a->qst;
    const int64_t Tp = (a->T + 31) / 32 * 32;
    const float *kt = a->kt + (b * a->Hk + hk) * a->D * Tp;
    for (int64_t half = 0; half < ATT_TILE / 12; ++half) {
        const int64_t r_last = 12 * half + 11 < rows ? 12 * half + 11 : rows - 1;
        const int64_t seen = t0 + r_last + 1;  /* the keys the 12 rows see: FIRST_KEY(their first row) .. seen */
        for (int64_t j0 = FIRST_KEY(t0 + 12 * half) / 32 * 32; j0 < seen; j0 += 32)
            att_scores_12x32(qrow + 12 * half, kt + j0 * a->D, a->D, S + 12 * half * lds + (j0 - j_lo), lds);
    }
    int64_t bad_rows = 0;
    for (int64_t r = 0; r < rows; ++r) {
        sums[r] = att_softmax_row(S + r * lds, FIRST_KEY(t0 + r) - j_lo, t0 + r + 1 - j_lo, n, a->c);
        if (!(sums[r] > 0.0f && sums[r] < INFINITY)) {
            a->bad[(b * a->H + h) * a->T + t0 + r] = 1;
            ++bad_rows;
        }
    }
    const float *v = a->v + b * a->vsb + hk * a->vsh;
    const int64_t out_row = a->H * a->Dv;
    float *out = a->out + b * a->T * out_row + h * a->Dv;
    for (int64_t r0 = 0; r0 < rows; r0 += 6) {
        const int64_t r1 = r0 + 6 < rows ? r0 + 6 : rows;  /* rows r0 .. r1 - 1 see the keys j0 .. t0 + r1 - 1 */
        const int64_t j0 = FIRST_KEY(t0 + r0) - j_lo;
        const float *prow[6];
        for (int64_t r = 0; r < 6; ++r)
            prow[r] = S + (r0 + r < r1 ? r0 + r : r1 - 1) * lds + j0;
        for (int64_t d0 = 0; d0 < a->Dv; d0 += 64) {
            const int64_t nv = a->Dv - d0 < 64 ? a->Dv - d0 : 64;
            __m512 o[6][4];
            att_values_6x64(prow, v + (j_lo + j0) * a->vst + d0, a->vst, t0 + r1 - j_lo - j0, nv, o);
            __mmask16 m[4];
            value_lanes(nv, m);
            for (int64_t r = r0; r < r1; ++r) {
                const __m512 sum = _mm512_set1_ps(sums[r]);
                float *dst = out + (t0 + r) * out_row + d0;
                for (int k = 0; k < 4; ++k)
                    _mm512_mask_storeu_ps(dst + 16 * k, m[k], _mm512_div_ps(o[r - r0][k], sum));
            }
        }
    }
#undef FIRST_KEY
    return bad_rows;
}

int lmloss_attention_ready(void) { return 1; }

int64_t lmloss_attention_all(const float *q, const float *kt, const float *v, int64_t B, int64_t H, int64_t Hk,
                             int64_t T, int64_t D, int64_t Dv, int64_t qsb, int64_t qsh, int64_t qst, int64_t vsb,
                             int64_t vsh, int64_t vst, int64_t window, float c, int n_threads, float *out,
                             unsigned char *bad) {
    const int64_t w = window < 1 || window > T ? T : window;  /* 0: no window (causal) */
    const att_args a = {q, kt, v, B, H, Hk, T, D, Dv, qsb, qsh, qst, vsb, vsh, vst, w, c, out, bad};
    const int64_t n_items = B * H * ((T + ATT_TILE - 1) / ATT_TILE);
    const size_t scratch = (size_t)ATT_TILE * (size_t)((T + 31) / 32 * 32 + 16) * sizeof(float);
    int64_t next = 0, bad_rows = 0;
    int failed = 0;
    _Pragma("omp parallel num_threads(n_threads)")
    {
        float *S = aligned_alloc(64, (scratch + 63) / 64 * 64);
        float sums[ATT_TILE];
        if (!S)
            __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
        else
            for (;;) {
                const int64_t item = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
                if (item >= n_items)
                    break;
                __atomic_fetch_add(&bad_rows, att_item(&a, item, S, sums), __ATOMIC_RELAXED);
            }
        free(S);
    }
    return failed ? -1 : bad_rows;
}
#else
int lmloss_attention_ready(void) { return 0; }

int64_t lmloss_attention_all(const float *q, const float *kt, const float *v, int64_t B, int64_t H, int64_t Hk,
                             int64_t T, int64_t D, int64_t Dv, int64_t qsb, int64_t qsh, int64_t qst, int64_t vsb,
                             int64_t vsh, int64_t vst, int64_t window, float c, int n_threads, float *out,
                             unsigned char *bad) {
    return -2;  /* not built: lmloss_attention_ready() is 0 */
}
#endif
