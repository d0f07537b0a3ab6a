/* Memory-bound passes over channels_last data as plain loops: optimize_for_inference's clamps and
 * pools, and memory-efficient training's batch statistics, BN-ReLU, batch-norm backward sums and
 * input gradient in float and bf16 (bf16 with AVX-512 where the compiler targets AVX512_BF16);
 * and, where it targets AVX-512 or AVX2 (float32), AVX512_BF16 or AMX (bf16), the dense layers' and
 * transitions' convolutions, each fused with the clamp (or a plain layer's BN-ReLU) before it,
 * and a dense block's layers in one call (the last three sections).
 *
 * Pixels hold `channels` contiguous values; pixel r of an input starts at x + r * pixel_stride
 * (a channels_last slice of a wider block tensor has pixel_stride > channels); outputs are dense
 * unless a stride says otherwise.
 * A bf16 value widens to float exactly by a 16-bit shift, and a clamp or max returns one of its
 * operands, all bf16 values, so narrowing it back by a shift is exact as well: no rounding, unlike
 * a convert. Averages round to nearest even, as PyTorch's conversion does. NaN passes through
 * clamps (both comparisons are false), as in torch.clamp, and wins a max, as in max_pool2d.
 *
 * Each kernel splits its rows across `threads` OpenMP threads. Built with -fopenmp, this library
 * needs libgomp.so.1, which PyTorch's Linux wheels have already loaded under that name: the kernels
 * then share PyTorch's own OpenMP threads, still awake after its last operation, where threads of
 * our own would first have to be woken (on a 2-vCPU VM that cost more than a split saved).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ROUND_UP_32(v) (((v) + 31) / 32 * 32)

#define PARALLEL_ROWS _Pragma("omp parallel for num_threads(threads) if (threads > 1) schedule(static)")
#define PARALLEL_REGION _Pragma("omp parallel num_threads(threads) if (threads > 1)")
#define PARALLEL_FOR _Pragma("omp for schedule(static)")

static inline float widen(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t narrow_exact(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)(bits >> 16);
}

static inline uint16_t narrow_rounded(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (f != f) return (uint16_t)((bits >> 16) | 0x40); /* a quiet NaN stays NaN */
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline float clamp(float v, float low, float high) {
    v = v < low ? low : v;
    return v > high ? high : v;
}

/* clamp(x, low, high) per channel, for `rows` pixels. */
void clamp_bf16(const uint16_t *x, int64_t pixel_stride, uint16_t *out, int64_t rows,
                int64_t channels, const float *low, const float *high, int threads) {
    PARALLEL_ROWS
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *in = x + r * pixel_stride;
        uint16_t *dst = out + r * channels;
        for (int64_t c = 0; c < channels; c++)
            dst[c] = narrow_exact(clamp(widen(in[c]), low[c], high[c]));
    }
}

/* avg_pool2d(clamp(x, low, high), 2) for n images of height x width pixels (an odd last row or
 * column is dropped, as PyTorch does). */
void clamp_avg_pool2_bf16(const uint16_t *x, int64_t pixel_stride, uint16_t *out, int64_t n,
                          int64_t height, int64_t width, int64_t channels, const float *low,
                          const float *high, int threads) {
    int64_t out_height = height / 2, out_width = width / 2;
    PARALLEL_ROWS
    for (int64_t row = 0; row < n * out_height; row++) {
        int64_t image = row / out_height, y = row % out_height;
        for (int64_t x_out = 0; x_out < out_width; x_out++) {
            const uint16_t *p00 = x + ((image * height + 2 * y) * width + 2 * x_out) * pixel_stride;
            const uint16_t *p01 = p00 + pixel_stride;
            const uint16_t *p10 = p00 + width * pixel_stride;
            const uint16_t *p11 = p10 + pixel_stride;
            uint16_t *dst = out + (row * out_width + x_out) * channels;
            for (int64_t c = 0; c < channels; c++) {
                /* PyTorch's order: the window row by row, summed in float, then divided by 4. */
                float sum = clamp(widen(p00[c]), low[c], high[c]);
                sum += clamp(widen(p01[c]), low[c], high[c]);
                sum += clamp(widen(p10[c]), low[c], high[c]);
                sum += clamp(widen(p11[c]), low[c], high[c]);
                dst[c] = narrow_rounded(sum / 4.0f);
            }
        }
    }
}

/* max_pool2d(x, 3, stride=2, padding=1) of n dense channels_last bf16 or float images: each value
 * read as a key of type K that orders as the values do (NaN above all, so that it wins the max,
 * as in max_pool2d; `key != key` is NaN's test for float keys and never true for integer ones). */
#define MAX_POOL_3X3S2(NAME, T, K, KEY, VALUE, LOWEST)                                          \
    void NAME(const T *x, T *out, int64_t n, int64_t height, int64_t width, int64_t channels, \
              int threads) {                                                                  \
        int64_t out_height = (height - 1) / 2 + 1, out_width = (width - 1) / 2 + 1;            \
        PARALLEL_ROWS                                                                         \
        for (int64_t row = 0; row < n * out_height; row++) {                                  \
            K window[channels];                                                               \
            int64_t image = row / out_height, y = row % out_height;                           \
            for (int64_t x_out = 0; x_out < out_width; x_out++) {                             \
                for (int64_t c = 0; c < channels; c++) window[c] = LOWEST;                    \
                for (int64_t iy = 2 * y - 1; iy <= 2 * y + 1; iy++) {                         \
                    if (iy < 0 || iy >= height) continue;                                     \
                    for (int64_t ix = 2 * x_out - 1; ix <= 2 * x_out + 1; ix++) {             \
                        if (ix < 0 || ix >= width) continue;                                  \
                        const T *in = x + ((image * height + iy) * width + ix) * channels;    \
                        for (int64_t c = 0; c < channels; c++) {                              \
                            K key = KEY(in[c]);                                               \
                            window[c] = (key > window[c] || key != key) ? key : window[c];    \
                        }                                                                     \
                    }                                                                         \
                }                                                                             \
                T *dst = out + (row * out_width + x_out) * channels;                          \
                for (int64_t c = 0; c < channels; c++) dst[c] = VALUE(window[c]);             \
            }                                                                                 \
        }                                                                                     \
    }

/* bf16 bits as int16 keys: a negative value's magnitude bits flipped, which orders all values
 * (+0 above -0), then turned by 127 on the circle of 65,536 keys, where NaN of either sign sits
 * between +inf and -inf: NaN comes last, -inf first. Integer maxima on 32 lanes cost less than
 * widening to float. */
static inline int16_t max_key(uint16_t bits) {
    uint16_t ordered = bits ^ (uint16_t)((int16_t)bits >> 15 & 0x7FFF);
    return (int16_t)(uint16_t)(ordered - 127);
}

static inline uint16_t key_bits(int16_t key) {
    uint16_t ordered = (uint16_t)((uint16_t)key + 127);
    return ordered ^ (uint16_t)((int16_t)ordered >> 15 & 0x7FFF);
}

static inline float same_float(float v) { return v; }
MAX_POOL_3X3S2(max_pool_3x3s2_bf16, uint16_t, int16_t, max_key, key_bits, INT16_MIN)
MAX_POOL_3X3S2(max_pool_3x3s2_float, float, float, same_float, same_float, -INFINITY)

/* The ReLU after a BN, in the backward passes: its gradient goes through where the ReLU's output
 * z is positive or NaN, as threshold_backward decides. z is read from `output` (dense), or where
 * there is none recomputed from the BN's input x as relu(x * scale + shift), exactly as norm_relu
 * rounds it (and stored into `written`, dense, if set): the pass that needs it then reads x
 * once for both. Neither: no ReLU. */
#define RELU_SOURCE(T)                                                                           \
    struct {                                                                                    \
        const T *output;                                                                        \
        const float *scale, *shift;                                                             \
        T *written;                                                                             \
    }
typedef RELU_SOURCE(float) relu_float;
typedef RELU_SOURCE(uint16_t) relu_bf16;

/* The BN passes' work on one pixel of T values, widened to float and narrowed back (see
 * NORM_PASSES below): plain loops, which the compiler vectorizes for the CPU it targets. */
#define NORM_PIXELS(SUFFIX, T, WIDEN, NARROW)                                                    \
    static inline T norm_relu_value_##SUFFIX(T in, float scale, float shift) {                  \
        float value = WIDEN(in) * scale + shift;                                                \
        return NARROW(value < 0.0f ? 0.0f : value);                                             \
    }                                                                                           \
    static inline void norm_relu_pixel_##SUFFIX(const T *in, T *dst, int64_t channels,          \
                                                const float *scale, const float *shift) {       \
        for (int64_t c = 0; c < channels; c++)                                                  \
            dst[c] = norm_relu_value_##SUFFIX(in[c], scale[c], shift[c]);                       \
    }                                                                                           \
    /* g through the ReLU (see RELU_SOURCE) at channel c of a pixel whose BN input is in. */    \
    static inline float relu_gradient_##SUFFIX(float g, relu_##SUFFIX relu, const T *in,        \
                                               int64_t c) {                                     \
        T z;                                                                                    \
        if (relu.output) {                                                                      \
            z = relu.output[c];                                                                 \
        } else if (relu.scale) {                                                                \
            z = norm_relu_value_##SUFFIX(in[c], relu.scale[c], relu.shift[c]);                  \
            if (relu.written) relu.written[c] = z;                                              \
        } else {                                                                                \
            return g;                                                                           \
        }                                                                                       \
        return WIDEN(z) <= 0.0f ? 0.0f : g;                                                     \
    }                                                                                           \
    static inline void norm_input_gradient_pixel_##SUFFIX(                                      \
        T *dst, const T *g, relu_##SUFFIX relu, const T *in, int64_t channels,                  \
        const float *scale_grad, const float *scale_x, const float *shift, int accumulate) {    \
        for (int64_t c = 0; c < channels; c++) {                                                \
            float from_x = scale_x[c] * WIDEN(in[c]) + shift[c];                                \
            float from_grad = scale_grad[c] * relu_gradient_##SUFFIX(WIDEN(g[c]), relu, in, c); \
            dst[c] = NARROW((accumulate ? WIDEN(dst[c]) + from_grad : from_grad) + from_x);     \
        }                                                                                       \
    }                                                                                           \
    static inline void norm_sums_pixel_##SUFFIX(const T *g, relu_##SUFFIX relu, const T *in,    \
                                                int64_t channels, const float *mean,            \
                                                float *sum_grad, float *sum_grad_centred) {     \
        for (int64_t c = 0; c < channels; c++) {                                                \
            float grad = relu_gradient_##SUFFIX(WIDEN(g[c]), relu, in, c);                      \
            sum_grad[c] += grad;                                                                \
            sum_grad_centred[c] += grad * (WIDEN(in[c]) - mean[c]);                             \
        }                                                                                       \
    }

NORM_PIXELS(float, float, same_float, same_float)
#if !defined(__AVX512BF16__) /* else with AVX-512 instructions, further down */
NORM_PIXELS(bf16, uint16_t, widen, narrow_rounded)
#endif

/* For the `pixels` output pixels of a 1x1 convolution from pixel `first` on: where each one's input
 * starts (src, in elements from x) and where its output goes (at). The input is n images of
 * height x width pixels, pixel_stride apart; with `pool`, each output pixel averages a 2x2 window
 * of them (an odd last row or column dropped, as PyTorch does). Outputs go to pixel (image, y, x)
 * of images with a border of `border` pixels around them, out_stride apart. Found once per tile:
 * divisions cost more than a pass's multiplies. */
static inline void locate_pixels(int64_t first, int64_t pixels, int64_t height, int64_t width,
                                 int64_t pixel_stride, int64_t pool, int64_t border,
                                 int64_t out_stride, int64_t *src, int64_t *at) {
    int64_t out_height = pool ? height / 2 : height, out_width = pool ? width / 2 : width;
    int64_t image = first / (out_height * out_width);
    int64_t y = first / out_width % out_height, x = first % out_width;
    for (int64_t i = 0; i < pixels; i++) {
        src[i] = ((image * height + (y << pool)) * width + (x << pool)) * pixel_stride;
        at[i] = ((image * (out_height + 2 * border) + y + border) * (out_width + 2 * border) + x +
                 border) * out_stride;
        if (++x == out_width) {
            x = 0;
            if (++y == out_height) y = 0, image++;
        }
    }
}

/* For a 3x3 convolution's input held with a zero border (rows of width + 2 pixels): where the
 * output of each of the `pixels` bordered positions from `start` of an image goes, or -1 for
 * positions on the border or past `last` (the image's last inside position), whose results are
 * computed and dropped. */
static inline void locate_bordered(int64_t image, int64_t start, int64_t last, int64_t pixels,
                                   int64_t height, int64_t width, int64_t out_stride,
                                   int64_t *at) {
    int64_t y = start / (width + 2) - 1, x = start % (width + 2) - 1;
    for (int64_t i = 0; i < pixels; i++) {
        int inside = start + i <= last && x >= 0 && x < width;
        at[i] = inside ? ((image * height + y) * width + x) * out_stride : -1;
        if (++x == width + 1) x = -1, y++;
    }
}

/* A dense block's first `layers` bottleneck layers, in place: layer l reads the block's first
 * in_channels + l * growth channels (block's pixels are block_channels apart) and writes the
 * next `growth`, through the zero-bordered buffer of `bottleneck` channels (on AMX rounded up to
 * 32, the tiles' width). One call for the whole block: Python's overhead per kernel call is
 * larger than a small layer. Each kernel reads the next one's weights ahead into the cache while
 * it computes. */
#define DENSE_BLOCK(NAME, T, W, ONE_BY_ONE, THREE_BY_THREE, BORDERED_CHANNELS)                   \
    void NAME(T *block, int64_t n, int64_t height, int64_t width, int64_t block_channels,       \
              int64_t in_channels, int64_t growth, int64_t layers, const float *const *low,     \
              const float *const *high, const W *const *packed_1x1, const float *const *bias,   \
              int64_t bottleneck, const W *const *packed_3x3, T *bordered, int threads) {       \
        int64_t bordered_channels = BORDERED_CHANNELS(bottleneck);                              \
        int64_t bytes_3x3 = ROUND_UP_32(growth) * 9 * bordered_channels * (int64_t)sizeof(W);   \
        for (int64_t l = 0; l < layers; l++) {                                                  \
            int64_t k = in_channels + l * growth;                                               \
            const W *next = l + 1 < layers ? packed_1x1[l + 1] : NULL;                          \
            int64_t bytes_next = ROUND_UP_32(bottleneck) * ROUND_UP_32(k + growth) * sizeof(W); \
            ONE_BY_ONE(block, block_channels, n, height, width, k, low[l], high[l],             \
                       packed_1x1[l], bias[l], bottleneck, bordered, bordered_channels, 1, 0, 1, \
                       packed_3x3[l], bytes_3x3, threads);                                      \
            THREE_BY_THREE(bordered, n, height, width, bordered_channels, packed_3x3[l],        \
                           growth, block + k, block_channels, next, next ? bytes_next : 0,      \
                           threads);                                                            \
        }                                                                                       \
    }

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
/* On CPUs with AVX-512 or AVX2, a float32 bottleneck layer in two passes, as the AMX kernels below
 * do it in bf16 (see there): its clamp, 1x1 convolution, bias and ReLU, written inside a
 * zero-bordered buffer, and its 3x3 convolution read from that buffer and written into the block
 * tensor. Each computes PIXELS pixels x 16 * PANELS output channels at a time, every input value
 * broadcast once against the weights of all of them: with AVX-512, 12 pixels x 32 outputs in 24
 * of its 32 registers (two fused multiply-adds per load); with AVX2, whose 16 registers hold 8
 * lanes, 6 pixels x 16 outputs in 12. Sums run in float32 over the input channels in order, tap
 * by tap, with the same fused multiply-adds on both: the same sums, bit for bit. */
#include <immintrin.h>

/* Part `part` of `parts` of the `bytes` at `next` (the next kernel's weights), asked into L2 while
 * this kernel computes: at small batches a layer's weights come from memory, and DenseNet-121's
 * are 8 million numbers. Spread over the tiles, the requests don't queue up at once. */
static inline void prefetch_part(const void *next, int64_t bytes, int64_t part, int64_t parts) {
    int64_t lines = (bytes + 63) / 64, per_part = (lines + parts - 1) / parts;
    int64_t end = (part + 1) * per_part < lines ? (part + 1) * per_part : lines;
    for (int64_t line = part * per_part; line < end; line++)
        _mm_prefetch((const char *)next + line * 64, _MM_HINT_T1);
}

#if defined(__AVX512F__)
#define PIXELS 12 /* the float32 and vdpbf16ps layer kernels' pixels at a time */
#define PANELS 2  /* and their panels of 16 output channels */

typedef __m512 vec16; /* 16 float lanes */

static inline vec16 zeros16(void) { return _mm512_setzero_ps(); }

static inline __mmask16 first_lanes(int64_t lanes) {
    return lanes >= 16 ? 0xFFFF : lanes <= 0 ? 0 : (__mmask16)((1u << lanes) - 1);
}

static inline __mmask32 first_channels(int64_t channels) {
    return channels >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << channels) - 1);
}

/* 16 bf16 values (the lanes of mask; zeros elsewhere) widened to float, exactly. */
static inline __m512 widen_16(const uint16_t *in, __mmask16 mask) {
    __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, in));
    return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

/* acc0[p] += sum over c < k of a[p * a_stride + c] * w0[c][0:16], and the same for acc1 and w1
 * if `both` (32 output channels; 16 where fewer are left, as in DenseNet-BC's k = 12). Called with
 * a constant `both`, so that each use compiles to the loop it needs. */
static inline void multiply_float(__m512 acc0[PIXELS], __m512 acc1[PIXELS], const float *a,
                                  int64_t a_stride, const float *w0, const float *w1, int64_t k,
                                  int both) {
    for (int64_t c = 0; c < k; c++) {
        __m512 v0 = _mm512_loadu_ps(w0 + c * 16);
        __m512 v1 = both ? _mm512_loadu_ps(w1 + c * 16) : _mm512_setzero_ps();
        for (int p = 0; p < PIXELS; p++) {
            __m512 v = _mm512_set1_ps(a[p * a_stride + c]);
            acc0[p] = _mm512_fmadd_ps(v, v0, acc0[p]);
            if (both) acc1[p] = _mm512_fmadd_ps(v, v1, acc1[p]);
        }
    }
}

/* clamp(x, low, high) per channel, or with `pool` its 2x2 average (summed row by row, then divided
 * by 4, as PyTorch's avg_pool2d does), for k channels from in; the window's rows row_stride apart.
 * max(low, v) and min(high, v): the same as clamp() above, NaN included. */
static inline void clamp_pixel_float(const float *in, int64_t pool, int64_t pixel_stride,
                                     int64_t row_stride, float *dst, int64_t k, const float *low,
                                     const float *high) {
    for (int64_t c = 0; c < k; c += 16) {
        __mmask16 mask = first_lanes(k - c);
        __m512 lo = _mm512_maskz_loadu_ps(mask, low + c);
        __m512 hi = _mm512_maskz_loadu_ps(mask, high + c);
        __m512 v = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_maskz_loadu_ps(mask, in + c)));
        if (pool) {
            const float *next[3] = {in + pixel_stride, in + row_stride,
                                    in + row_stride + pixel_stride};
            for (int w = 0; w < 3; w++) {
                __m512 u = _mm512_maskz_loadu_ps(mask, next[w] + c);
                v = _mm512_add_ps(v, _mm512_min_ps(hi, _mm512_max_ps(lo, u)));
            }
            v = _mm512_div_ps(v, _mm512_set1_ps(4.0f));
        }
        _mm512_mask_storeu_ps(dst + c, mask, v);
    }
}

/* The bias of 32 output channels from nb (zeros past n_out, and without a bias). */
static inline void load_bias(const float *bias, int64_t nb, int64_t n_out, __m512 *low,
                             __m512 *high) {
    *low = bias ? _mm512_maskz_loadu_ps(first_lanes(n_out - nb), bias + nb) : _mm512_setzero_ps();
    *high = bias ? _mm512_maskz_loadu_ps(first_lanes(n_out - nb - 16), bias + nb + 16)
                 : _mm512_setzero_ps();
}

/* Sums of 32 output channels, + their bias if `biased`, then ReLU if `relu`. max(0, v) keeps a
 * NaN v, as v < 0 ? 0 : v does. */
static inline void finish_sums(__m512 *low, __m512 *high, int biased, __m512 bias_low,
                               __m512 bias_high, int64_t relu) {
    if (biased) {
        *low = _mm512_add_ps(*low, bias_low);
        *high = _mm512_add_ps(*high, bias_high);
    }
    if (relu) {
        *low = _mm512_max_ps(_mm512_setzero_ps(), *low);
        *high = _mm512_max_ps(_mm512_setzero_ps(), *high);
    }
}

/* The first `channels` of 32 sums into dst. */
static inline void write_float(float *dst, int64_t channels, __m512 low, __m512 high) {
    _mm512_mask_storeu_ps(dst, first_lanes(channels), low);
    _mm512_mask_storeu_ps(dst + 16, first_lanes(channels - 16), high);
}

#else /* AVX2: the same functions on pairs of 8-lane registers, for one panel of 16 outputs */
#define PIXELS 6
#define PANELS 1

typedef struct {
    __m256 low, high;
} vec16;

static inline vec16 zeros16(void) { return (vec16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }

/* Lanes below `lanes` set (AVX2's masked loads and stores skip the others: no fault past them). */
static inline __m256i first_lanes_8(int64_t lanes) {
    int count = lanes >= 8 ? 8 : lanes <= 0 ? 0 : (int)lanes;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* The first `lanes` of 8 floats at p (zeros past them), and the first `lanes` of v into p. */
static inline __m256 load_8(const float *p, int64_t lanes) {
    return lanes >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes_8(lanes));
}

static inline void store_8(float *p, int64_t lanes, __m256 v) {
    if (lanes >= 8)
        _mm256_storeu_ps(p, v);
    else
        _mm256_maskstore_ps(p, first_lanes_8(lanes), v);
}

static inline vec16 load_16(const float *p, int64_t lanes) {
    return (vec16){load_8(p, lanes), load_8(p + 8, lanes - 8)};
}

static inline void store_16(float *p, int64_t lanes, vec16 v) {
    store_8(p, lanes, v.low);
    if (lanes > 8) store_8(p + 8, lanes - 8, v.high);
}

static inline vec16 add_16(vec16 a, vec16 b) {
    return (vec16){_mm256_add_ps(a.low, b.low), _mm256_add_ps(a.high, b.high)};
}

/* max(0, v) per lane, keeping a NaN v. */
static inline vec16 relu_16(vec16 v) {
    __m256 zero = _mm256_setzero_ps();
    return (vec16){_mm256_max_ps(zero, v.low), _mm256_max_ps(zero, v.high)};
}

/* As the AVX-512 multiply_float for one panel: acc0[p] += sum over c < k of
 * a[p * a_stride + c] * w0[c][0:16]. With PANELS 1 the kernels never ask for a second one (acc1,
 * w1, both). The sums live in a local array of 8-lane vectors meanwhile: GCC keeps that in
 * registers, where it would store the array of vec16 back to memory at every step. */
static inline void multiply_float(vec16 acc0[PIXELS], vec16 acc1[PIXELS], const float *a,
                                  int64_t a_stride, const float *w0, const float *w1, int64_t k,
                                  int both) {
    (void)acc1, (void)w1, (void)both;
    __m256 sums[PIXELS][2];
    for (int p = 0; p < PIXELS; p++) sums[p][0] = acc0[p].low, sums[p][1] = acc0[p].high;
    for (int64_t c = 0; c < k; c++) {
        __m256 low = _mm256_loadu_ps(w0 + c * 16), high = _mm256_loadu_ps(w0 + c * 16 + 8);
        for (int p = 0; p < PIXELS; p++) {
            __m256 v = _mm256_broadcast_ss(a + p * a_stride + c);
            sums[p][0] = _mm256_fmadd_ps(v, low, sums[p][0]);
            sums[p][1] = _mm256_fmadd_ps(v, high, sums[p][1]);
        }
    }
    for (int p = 0; p < PIXELS; p++) acc0[p] = (vec16){sums[p][0], sums[p][1]};
}

/* As the AVX-512 clamp_pixel_float, 8 channels at a time. */
static inline void clamp_pixel_float(const float *in, int64_t pool, int64_t pixel_stride,
                                     int64_t row_stride, float *dst, int64_t k, const float *low,
                                     const float *high) {
    for (int64_t c = 0; c < k; c += 8) {
        __m256 lo = load_8(low + c, k - c), hi = load_8(high + c, k - c);
        __m256 v = _mm256_min_ps(hi, _mm256_max_ps(lo, load_8(in + c, k - c)));
        if (pool) {
            const float *next[3] = {in + pixel_stride, in + row_stride,
                                    in + row_stride + pixel_stride};
            for (int w = 0; w < 3; w++) {
                __m256 u = load_8(next[w] + c, k - c);
                v = _mm256_add_ps(v, _mm256_min_ps(hi, _mm256_max_ps(lo, u)));
            }
            v = _mm256_div_ps(v, _mm256_set1_ps(4.0f));
        }
        store_8(dst + c, k - c, v);
    }
}

/* As the AVX-512 load_bias, finish_sums and write_float, for the one panel (low; high unused). */
static inline void load_bias(const float *bias, int64_t nb, int64_t n_out, vec16 *low,
                             vec16 *high) {
    *low = bias ? load_16(bias + nb, n_out - nb) : zeros16();
    *high = zeros16();
}

static inline void finish_sums(vec16 *low, vec16 *high, int biased, vec16 bias_low,
                               vec16 bias_high, int64_t relu) {
    (void)high, (void)bias_high;
    if (biased) *low = add_16(*low, bias_low);
    if (relu) *low = relu_16(*low);
}

/* The first `channels` (at most 16: OUTPUTS_FROM below) of the sums into dst. */
static inline void write_float(float *dst, int64_t channels, vec16 low, vec16 high) {
    (void)high;
    store_16(dst, channels, low);
}
#endif

/* The float kernels' clamp needs no more than the bounds themselves. */
static inline void prepare_bounds_float(const float *low, const float *high, int64_t k,
                                        int64_t k_padded, uint16_t *bounds) {
    (void)low, (void)high, (void)k, (void)k_padded, (void)bounds;
}

static inline void clamp_into_float(const float *in, int64_t pool, int64_t pixel_stride,
                                    int64_t row_stride, float *dst, int64_t k, int64_t k_padded,
                                    const float *low, const float *high, const uint16_t *bounds) {
    (void)k_padded, (void)bounds;
    clamp_pixel_float(in, pool, pixel_stride, row_stride, dst, k, low, high);
}

/* The pixels' sums for the 16 * PANELS output channels from nb (those below n_out), finished,
 * written at out + at[p] + nb by WRITE; pixels with at[p] < 0 dropped. The bias is loaded once
 * for all of them. */
#define OUTPUTS_FROM(nb, n_out) ((n_out) - (nb) < 16 * PANELS ? (n_out) - (nb) : 16 * PANELS)
#define STORE_PIXELS(WRITE, acc0, acc1, bias, relu, nb, n_out, at, pixels, out)                   \
    {                                                                                           \
        vec16 bias_low, bias_high;                                                              \
        load_bias(bias, nb, n_out, &bias_low, &bias_high);                                      \
        for (int64_t p = 0; p < (pixels); p++) {                                                \
            if ((at)[p] < 0) continue;                                                          \
            vec16 low = (acc0)[p], high = (acc1)[p];                                            \
            finish_sums(&low, &high, (bias) != NULL, bias_low, bias_high, relu);                \
            WRITE((out) + (at)[p] + (nb), OUTPUTS_FROM(nb, n_out), low, high);                  \
        }                                                                                       \
    }

/* The bounds of the clamp on bf16 bits, by kind (see clamp_pixel_bits). */
enum { LOW_IF_POSITIVE, LOW_IF_NEGATIVE, HIGH_IF_POSITIVE, HIGH_IF_NEGATIVE, BOUND_KINDS };

/* A bottleneck layer's two passes, PIXELS pixels x 16 * PANELS output channels at a time, for
 * T = float (SUFFIX float) and bf16 (SUFFIX dpbf16): clamp_into_SUFFIX clamps a pixel,
 * multiply_SUFFIX adds a run of STEP-channel steps of inputs times PANELS panels of 16 outputs'
 * weights to the sums,
 * write_SUFFIX writes them; STEP input channels per step, weights in panels of 16 outputs,
 * [n_out rounded up to 16 / 16][steps][16 x STEP]. BORDERED_CHANNELS: the 3x3's input channels.
 *
 * clamp_conv1x1_SUFFIX: clamp(x, low, high) @ W^T + bias, then ReLU if `relu`, for n images of
 * height x width pixels, k channels each, x's pixels pixel_stride apart; with `pool`,
 * avg_pool2d(clamp(x), 2) instead of clamp(x) (a transition). Outputs as locate_pixels says:
 * border 1 writes the inside of a zero-bordered buffer for conv3x3_SUFFIX. The clamped pixels
 * (k rounded up to 32 channels, zeros past k) stay in the thread's cache.
 * conv3x3_SUFFIX: conv2d(x, w, stride 1, padding 1) for x held inside a zero border, as for
 * conv3x3_amx, weights as w's [n_out][9 taps][k]. */
#define PIXEL_LAYER_KERNELS(SUFFIX, T, STEP, BORDERED_CHANNELS)                                  \
    void clamp_conv1x1_##SUFFIX(const T *x, int64_t pixel_stride, int64_t n, int64_t height,   \
                                int64_t width, int64_t k, const float *low, const float *high, \
                                const T *packed, const float *bias, int64_t n_out, T *out,     \
                                int64_t out_stride, int64_t border, int64_t pool,              \
                                int64_t relu, const void *prefetch, int64_t prefetch_bytes,    \
                                int threads) {                                                 \
        int64_t rows = n * (pool ? height / 2 * (width / 2) : height * width);                  \
        int64_t k_padded = ROUND_UP_32(k), steps = (k + STEP - 1) / STEP;                       \
        PARALLEL_REGION                                                                         \
        {                                                                                       \
            T clamped[PIXELS * k_padded] __attribute__((aligned(64)));                          \
            uint16_t bounds[BOUND_KINDS * k_padded] __attribute__((aligned(64)));               \
            if (!pool) prepare_bounds_##SUFFIX(low, high, k, k_padded, bounds);                 \
            memset(clamped, 0, sizeof clamped);                                                 \
            PARALLEL_FOR                                                                        \
            for (int64_t first = 0; first < rows; first += PIXELS) {                            \
                int64_t pixels = rows - first < PIXELS ? rows - first : PIXELS;                 \
                prefetch_part(prefetch, prefetch_bytes, first / PIXELS,                         \
                              (rows + PIXELS - 1) / PIXELS);                                    \
                int64_t src[PIXELS], at[PIXELS];                                                \
                locate_pixels(first, pixels, height, width, pixel_stride, pool, border,         \
                              out_stride, src, at);                                             \
                for (int64_t i = 0; i < pixels; i++)                                            \
                    clamp_into_##SUFFIX(x + src[i], pool, pixel_stride, width * pixel_stride,   \
                                        clamped + i * k_padded, k, k_padded, low, high,         \
                                        bounds);                                                \
                for (int64_t nb = 0; nb < n_out; nb += 16 * PANELS) {                           \
                    vec16 acc0[PIXELS], acc1[PIXELS];                                           \
                    for (int p = 0; p < PIXELS; p++) acc0[p] = acc1[p] = zeros16();             \
                    const T *w = packed + nb * STEP * steps;                                    \
                    if (PANELS == 2 && n_out - nb > 16)                                         \
                        multiply_##SUFFIX(acc0, acc1, clamped, k_padded, w,                     \
                                          w + 16 * STEP * steps, steps, 1);                     \
                    else                                                                        \
                        multiply_##SUFFIX(acc0, acc1, clamped, k_padded, w, NULL, steps, 0);    \
                    STORE_PIXELS(write_##SUFFIX, acc0, acc1, bias, relu, nb, n_out, at, pixels, \
                                 out)                                                           \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
                                                                                                \
    void conv3x3_##SUFFIX(const T *bordered, int64_t n, int64_t height, int64_t width,         \
                          int64_t k, const T *packed, int64_t n_out, T *out, int64_t out_stride, \
                          const void *prefetch, int64_t prefetch_bytes, int threads) {         \
        int64_t row = width + 2, image_pixels = (height + 2) * row;                             \
        int64_t first = row + 1, last = height * row + width; /* first, last inside pixel */    \
        int64_t tiles = (last - first) / PIXELS + 1;                                            \
        PARALLEL_REGION                                                                         \
        {                                                                                       \
            PARALLEL_FOR                                                                        \
            for (int64_t item = 0; item < n * tiles; item++) {                                  \
                prefetch_part(prefetch, prefetch_bytes, item, n * tiles);                       \
                int64_t image = item / tiles, start = first + item % tiles * PIXELS;            \
                const T *centre = bordered + (image * image_pixels + start) * k;                \
                int64_t at[PIXELS];                                                             \
                locate_bordered(image, start, last, PIXELS, height, width, out_stride, at);     \
                for (int64_t nb = 0; nb < n_out; nb += 16 * PANELS) {                           \
                    vec16 acc0[PIXELS], acc1[PIXELS];                                           \
                    for (int p = 0; p < PIXELS; p++) acc0[p] = acc1[p] = zeros16();             \
                    for (int tap = 0; tap < 9; tap++) {                                         \
                        const T *a = centre + ((tap / 3 - 1) * row + tap % 3 - 1) * k;          \
                        const T *w = packed + (nb * 9 + tap * 16) * k;                          \
                        if (PANELS == 2 && n_out - nb > 16)                                     \
                            multiply_##SUFFIX(acc0, acc1, a, k, w, w + 9 * 16 * k, k / STEP,    \
                                              1);                                               \
                        else                                                                    \
                            multiply_##SUFFIX(acc0, acc1, a, k, w, NULL, k / STEP, 0);          \
                    }                                                                           \
                    STORE_PIXELS(write_##SUFFIX, acc0, acc1, NULL, 0, nb, n_out, at, PIXELS,    \
                                 out)                                                           \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    DENSE_BLOCK(dense_block_##SUFFIX, T, T, clamp_conv1x1_##SUFFIX, conv3x3_##SUFFIX,           \
                BORDERED_CHANNELS)

#define FLOAT_BORDERED_CHANNELS(channels) (channels)
PIXEL_LAYER_KERNELS(float, float, 1, FLOAT_BORDERED_CHANNELS)
#endif

#if defined(__AVX512BF16__)
/* Memory-efficient training's bf16 passes above, with AVX-512 (and a plain layer's BN-ReLU for
 * the AMX kernels): 32 channels at a time, computed in float as there and rounded by the CPU's
 * conversion instruction (to nearest even, NaN kept quiet; it reads float denormals as zero, as
 * oneDNN's conversions do). */

/* 32 float sums, the lanes of mask, rounded to bf16 into dst. */
static inline void store_rounded(uint16_t *dst, __mmask32 mask, __m512 low, __m512 high) {
    _mm512_mask_storeu_epi16(dst, mask, (__m512i)_mm512_cvtne2ps_pbh(high, low));
}

/* relu(x * scale + shift) in float for the 16 values at in (the lanes of mask; zeros elsewhere). */
static inline __m512 norm_relu_16(const uint16_t *in, const float *scale, const float *shift,
                                  __mmask16 mask) {
    __m512 v = _mm512_fmadd_ps(widen_16(in, mask), _mm512_maskz_loadu_ps(mask, scale),
                               _mm512_maskz_loadu_ps(mask, shift));
    return _mm512_max_ps(_mm512_setzero_ps(), v); /* keeps a NaN v */
}

/* relu(x * scale + shift) for the `channels` values of one pixel at in, into `width` channels
 * at dst: zeros past `channels`. */
static inline void norm_relu_padded(const uint16_t *in, uint16_t *dst, int64_t channels,
                                    int64_t width, const float *scale, const float *shift) {
    for (int64_t c = 0; c < width; c += 32) {
        __m512 half[2];
        for (int h = 0; h < 2; h++) {
            int64_t at = c + 16 * h;
            half[h] = norm_relu_16(in + at, scale + at, shift + at, first_lanes(channels - at));
        }
        store_rounded(dst + c, first_channels(width - c), half[0], half[1]);
    }
}

static inline void norm_relu_pixel_bf16(const uint16_t *in, uint16_t *dst, int64_t channels,
                                        const float *scale, const float *shift) {
    norm_relu_padded(in, dst, channels, channels, scale, shift);
}

/* A plain dense layer's BN-ReLU, as norm_relu_bf16, written inside a zero-bordered buffer for
 * conv3x3_amx below, as the bottleneck's 1x1 kernel writes its own: [n][height + 2][width + 2]
 * [bordered_channels], then `spare` pixels. Every element is written, the border and padding
 * channels as zeros, so the buffer needs no zeroing first. x's pixels are pixel_stride apart (a
 * slice of the block tensor). */
void norm_relu_bordered_bf16(const uint16_t *x, int64_t pixel_stride, int64_t n, int64_t height,
                             int64_t width, int64_t channels, const float *scale,
                             const float *shift, uint16_t *bordered, int64_t bordered_channels,
                             int64_t spare, int threads) {
    int64_t row_values = (width + 2) * bordered_channels, pixel_bytes = bordered_channels * 2;
    PARALLEL_ROWS
    for (int64_t row = 0; row < n * (height + 2); row++) {
        int64_t image = row / (height + 2), y = row % (height + 2) - 1;
        uint16_t *dst = bordered + row * row_values;
        if (y < 0 || y == height) {
            memset(dst, 0, row_values * sizeof(uint16_t));
            continue;
        }
        memset(dst, 0, pixel_bytes);
        for (int64_t x_in = 0; x_in < width; x_in++)
            norm_relu_padded(x + ((image * height + y) * width + x_in) * pixel_stride,
                             dst + (x_in + 1) * bordered_channels, channels, bordered_channels,
                             scale, shift);
        memset(dst + (width + 1) * bordered_channels, 0, pixel_bytes);
    }
    memset(bordered + n * (height + 2) * row_values, 0, spare * pixel_bytes);
}

/* 16 values of g (the lanes of mask) through the ReLU (see RELU_SOURCE), at channel `at` of a
 * pixel whose BN input is in; z recomputed is rounded by the same conversion as in norm_relu. */
static inline __m512 relu_gradient_16(const uint16_t *g, relu_bf16 relu, const uint16_t *in,
                                      int64_t at, __mmask16 mask) {
    __m512 z;
    if (relu.output) {
        z = widen_16(relu.output + at, mask);
    } else if (relu.scale) {
        __m256i rounded = (__m256i)_mm512_cvtneps_pbh(
            norm_relu_16(in + at, relu.scale + at, relu.shift + at, mask));
        if (relu.written) _mm256_mask_storeu_epi16(relu.written + at, mask, rounded);
        z = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16));
    } else {
        return widen_16(g + at, mask);
    }
    mask = _mm512_mask_cmp_ps_mask(mask, z, _mm512_setzero_ps(), _CMP_NLE_UQ);
    return widen_16(g + at, mask);
}

static inline void norm_input_gradient_pixel_bf16(uint16_t *dst, const uint16_t *g,
                                                  relu_bf16 relu, const uint16_t *in,
                                                  int64_t channels, const float *scale_grad,
                                                  const float *scale_x, const float *shift,
                                                  int accumulate) {
    for (int64_t c = 0; c < channels; c += 32) {
        __m512 half[2];
        for (int h = 0; h < 2; h++) {
            int64_t at = c + 16 * h;
            __mmask16 mask = first_lanes(channels - at);
            __m512 from_x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, scale_x + at),
                                            widen_16(in + at, mask),
                                            _mm512_maskz_loadu_ps(mask, shift + at));
            __m512 factor = _mm512_maskz_loadu_ps(mask, scale_grad + at);
            __m512 grad = relu_gradient_16(g, relu, in, at, mask);
            if (accumulate)
                half[h] = _mm512_add_ps(_mm512_fmadd_ps(factor, grad, widen_16(dst + at, mask)),
                                        from_x);
            else
                half[h] = _mm512_fmadd_ps(factor, grad, from_x);
        }
        store_rounded(dst + c, first_channels(channels - c), half[0], half[1]);
    }
}

static inline void norm_sums_pixel_bf16(const uint16_t *g, relu_bf16 relu, const uint16_t *in,
                                        int64_t channels, const float *mean, float *sum_grad,
                                        float *sum_grad_centred) {
    for (int64_t c = 0; c < channels; c += 16) {
        __mmask16 mask = first_lanes(channels - c);
        __m512 grad = relu_gradient_16(g, relu, in, c, mask);
        __m512 centred =
            _mm512_sub_ps(widen_16(in + c, mask), _mm512_maskz_loadu_ps(mask, mean + c));
        __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, sum_grad + c), grad);
        __m512 sum_centred = _mm512_fmadd_ps(grad, centred,
                                             _mm512_maskz_loadu_ps(mask, sum_grad_centred + c));
        _mm512_mask_storeu_ps(sum_grad + c, mask, sum);
        _mm512_mask_storeu_ps(sum_grad_centred + c, mask, sum_centred);
    }
}
#endif

#define SUM_BLOCK_PIXELS 256

/* Memory-efficient training's BN passes, for `rows` pixels of T (bf16 or float) tensors, each
 * computed per channel in float (and rounded once to bf16):
 * - norm_relu: out = relu(x * scale + shift), batch norm with given statistics, then ReLU (NaN
 *   passes, as in torch.relu). x's pixels are x_stride apart (a channel slice of a block tensor);
 *   out's are dense.
 * - norm_input_gradient: target = [target +] scale_grad * grad + scale_x * x + shift, batch
 *   norm's input gradient in training mode, added to a gradient accumulator when `accumulate` is
 *   set, else written (target may then be grad itself). With a ReLU (relu_out, BN-ReLU's output
 *   z, or relu_scale and relu_shift to recompute it: see RELU_SOURCE), grad is z's gradient,
 *   taken through the ReLU first. target's and x's pixels are target_stride and x_stride apart
 *   (channel slices of a block's gradient and of its tensor); grad's and relu_out's are dense.
 * - norm_sums: batch norm's backward sums, of the gradient g of its output (grad taken through
 *   the ReLU, as in norm_input_gradient; a recomputed z also goes to relu_written if given) and
 *   of g * (x - mean): its bias's gradient and, times 1 / std, its weight's. Thread t sums the
 *   t-th of `threads` equal runs of pixels in blocks of SUM_BLOCK_PIXELS into partial[t]
 *   ([threads][2][channels]); sums ([2][channels]) is their total, added in order: the same
 *   result every time for a given thread count. */
#define NORM_PASSES(SUFFIX, T)                                                                   \
    void norm_relu_##SUFFIX(const T *restrict x, int64_t x_stride, T *restrict out,             \
                            int64_t rows, int64_t channels, const float *restrict scale,        \
                            const float *restrict shift, int threads) {                         \
        PARALLEL_ROWS                                                                           \
        for (int64_t r = 0; r < rows; r++)                                                      \
            norm_relu_pixel_##SUFFIX(x + r * x_stride, out + r * channels, channels, scale,     \
                                     shift);                                                    \
    }                                                                                           \
    /* The ReLU at pixel r: z's dense pixels offset, its factors as they are. */                \
    static inline relu_##SUFFIX relu_pixel_##SUFFIX(relu_##SUFFIX relu, int64_t r,              \
                                                    int64_t channels) {                         \
        if (relu.output) relu.output += r * channels;                                           \
        if (relu.written) relu.written += r * channels;                                         \
        return relu;                                                                            \
    }                                                                                           \
    void norm_input_gradient_##SUFFIX(T *target, int64_t target_stride, const T *grad,          \
                                      const T *relu_out, const float *relu_scale,               \
                                      const float *relu_shift, const T *x, int64_t x_stride,    \
                                      int64_t rows, int64_t channels, const float *scale_grad,  \
                                      const float *scale_x, const float *shift, int accumulate, \
                                      int threads) {                                            \
        relu_##SUFFIX relu = {relu_out, relu_scale, relu_shift, NULL};                          \
        PARALLEL_ROWS                                                                           \
        for (int64_t r = 0; r < rows; r++)                                                      \
            norm_input_gradient_pixel_##SUFFIX(                                                 \
                target + r * target_stride, grad + r * channels,                                \
                relu_pixel_##SUFFIX(relu, r, channels), x + r * x_stride, channels, scale_grad, \
                scale_x, shift, accumulate);                                                    \
    }                                                                                           \
    void norm_sums_##SUFFIX(const T *grad, const T *relu_out, const float *relu_scale,          \
                            const float *relu_shift, T *relu_written, const T *x,               \
                            int64_t x_stride, int64_t rows, int64_t channels, const float *mean, \
                            float *partial, float *sums, int threads) {                         \
        relu_##SUFFIX relu = {relu_out, relu_scale, relu_shift, relu_written};                  \
        PARALLEL_ROWS                                                                           \
        for (int t = 0; t < threads; t++) {                                                     \
            float *total = partial + t * 2 * channels, block[2 * channels];                     \
            memset(total, 0, sizeof block);                                                     \
            int64_t end = rows * (t + 1) / threads;                                             \
            for (int64_t first = rows * t / threads; first < end; first += SUM_BLOCK_PIXELS) {  \
                memset(block, 0, sizeof block);                                                 \
                int64_t last = first + SUM_BLOCK_PIXELS < end ? first + SUM_BLOCK_PIXELS : end; \
                for (int64_t r = first; r < last; r++)                                          \
                    norm_sums_pixel_##SUFFIX(grad + r * channels,                               \
                                             relu_pixel_##SUFFIX(relu, r, channels),            \
                                             x + r * x_stride, channels, mean, block,           \
                                             block + channels);                                 \
                for (int64_t c = 0; c < 2 * channels; c++) total[c] += block[c];                \
            }                                                                                   \
        }                                                                                       \
        memset(sums, 0, 2 * channels * sizeof(float));                                          \
        for (int t = 0; t < threads; t++)                                                       \
            for (int64_t c = 0; c < 2 * channels; c++)                                          \
                sums[c] += partial[t * 2 * channels + c];                                       \
    }
NORM_PASSES(bf16, uint16_t)
NORM_PASSES(float, float)

/* Batch statistics for training: norm_stats gives the per-channel mean and biased variance of x's
 * `rows` pixels (x_stride apart) in two passes, the sum of x, then the sum of (x - mean)^2, which
 * keeps the variance of values far from zero exact where a one-pass sum of squares cancels. It
 * only reads x, where BN's own training kernel also writes a normalised copy. Each pass sums in
 * float over blocks of SUM_BLOCK_PIXELS pixels (plain loops the compiler vectorizes across
 * channels), adds the blocks up in double on each thread (partial: [threads][channels]) and the
 * threads' totals in order: the same result every time for a given thread count. */
#define NORM_STATS(SUFFIX, T, WIDEN)                                                             \
    static void channel_sums_##SUFFIX(const T *restrict x, int64_t x_stride, int64_t rows,     \
                                      int64_t channels, const float *restrict centre,           \
                                      double *restrict partial, double *restrict sums,          \
                                      int threads) {                                            \
        PARALLEL_ROWS                                                                           \
        for (int t = 0; t < threads; t++) {                                                     \
            double *total = partial + t * channels;                                             \
            float block[channels];                                                              \
            memset(total, 0, channels * sizeof(double));                                        \
            int64_t end = rows * (t + 1) / threads;                                             \
            for (int64_t first = rows * t / threads; first < end; first += SUM_BLOCK_PIXELS) {  \
                memset(block, 0, sizeof block);                                                 \
                int64_t last = first + SUM_BLOCK_PIXELS < end ? first + SUM_BLOCK_PIXELS : end; \
                for (int64_t r = first; r < last; r++) {                                        \
                    const T *in = x + r * x_stride;                                             \
                    if (centre)                                                                 \
                        for (int64_t c = 0; c < channels; c++) {                                \
                            float d = WIDEN(in[c]) - centre[c];                                 \
                            block[c] += d * d;                                                  \
                        }                                                                       \
                    else                                                                        \
                        for (int64_t c = 0; c < channels; c++) block[c] += WIDEN(in[c]);        \
                }                                                                               \
                for (int64_t c = 0; c < channels; c++) total[c] += block[c];                    \
            }                                                                                   \
        }                                                                                       \
        memset(sums, 0, channels * sizeof(double));                                             \
        for (int t = 0; t < threads; t++)                                                       \
            for (int64_t c = 0; c < channels; c++) sums[c] += partial[t * channels + c];        \
    }                                                                                           \
    void norm_stats_##SUFFIX(const T *x, int64_t x_stride, int64_t rows, int64_t channels,      \
                             double *partial, double *sums, float *mean, float *var,            \
                             int threads) {                                                     \
        channel_sums_##SUFFIX(x, x_stride, rows, channels, NULL, partial, sums, threads);       \
        for (int64_t c = 0; c < channels; c++) mean[c] = (float)(sums[c] / rows);               \
        channel_sums_##SUFFIX(x, x_stride, rows, channels, mean, partial, sums, threads);       \
        for (int64_t c = 0; c < channels; c++) var[c] = (float)(sums[c] / rows);                \
    }
NORM_STATS(bf16, uint16_t, widen)
NORM_STATS(float, float, same_float)

#if defined(__AVX512BF16__)
/* On CPUs with AVX512_BF16, bf16 bottleneck layers as the float32 kernels above run them, 12
 * pixels x 32 output channels at a time, with vdpbf16ps: each instruction multiplies a pair of
 * input channels (broadcast) by 16 output channels' pairs of weights and adds both products to
 * float sums, so a pass over the inputs takes half the steps. Sums are float, rounded once. AMX
 * CPUs run the tile kernels below instead; these are for those without tiles (AMD's Zen 4). The
 * clamp helpers here serve both. */

/* avg_pool2d(clamp(x, low, high), 2) rounded to bf16, for k channels of the 2x2 window at in (its
 * pixels pixel_stride apart, its rows row_stride), in float as clamp_pixel_float computes it. */
static inline void clamp_pool_pixel_bf16(const uint16_t *in, int64_t pixel_stride,
                                         int64_t row_stride, uint16_t *dst, int64_t k,
                                         const float *low, const float *high) {
    const uint16_t *window[4] = {in, in + pixel_stride, in + row_stride,
                                 in + row_stride + pixel_stride};
    for (int64_t c = 0; c < k; c += 16) {
        __mmask16 mask = first_lanes(k - c);
        __m512 lo = _mm512_maskz_loadu_ps(mask, low + c);
        __m512 hi = _mm512_maskz_loadu_ps(mask, high + c);
        __m512 sum = _mm512_setzero_ps();
        for (int w = 0; w < 4; w++) {
            __m512 v = widen_16(window[w] + c, mask);
            sum = _mm512_add_ps(sum, _mm512_min_ps(hi, _mm512_max_ps(lo, v)));
        }
        __m256bh rounded = _mm512_cvtneps_pbh(_mm512_div_ps(sum, _mm512_set1_ps(4.0f)));
        _mm256_mask_storeu_epi16(dst + c, mask, (__m256i)rounded);
    }
}

/* The clamp on bf16 bits, without widening them to float. Read as signed int16, the bits of
 * non-negative bf16 values order as the values do; read as unsigned, those of negative values
 * order by magnitude. So max(x, low) is a signed max for low >= 0 and an unsigned min for
 * low < 0, and min(x, high) a signed min for high >= 0 and an unsigned max for high < 0. Each
 * channel's bounds are given for both signs, the one that doesn't apply a no-op, so that 32
 * channels take four instructions whatever their bounds: half the work of widening to float. */

/* bounds: [BOUND_KINDS][k_padded], from float bounds rounded to bf16 (a bf16 model's bounds are
 * bf16 numbers). The channels from k on get bounds that let everything through (NaN bits). */
static void split_bounds(const float *low, const float *high, int64_t k, int64_t k_padded,
                         uint16_t *bounds) {
    for (int64_t c = 0; c < k_padded; c++) {
        uint16_t lo = c < k ? narrow_rounded(low[c]) : 0xFFFF;
        uint16_t hi = c < k ? narrow_rounded(high[c]) : 0x7FFF;
        bounds[LOW_IF_POSITIVE * k_padded + c] = lo & 0x8000 ? 0x8000 : lo;
        bounds[LOW_IF_NEGATIVE * k_padded + c] = lo & 0x8000 ? lo : 0xFFFF;
        bounds[HIGH_IF_POSITIVE * k_padded + c] = hi & 0x8000 ? 0x7FFF : hi;
        bounds[HIGH_IF_NEGATIVE * k_padded + c] = hi & 0x8000 ? hi : 0;
    }
}

/* clamp(x, low, high) for k channels from in, bounds from split_bounds, into k_padded channels
 * at dst (zeros past k). NaN passes, as in torch.clamp: its lanes skip the four steps. */
static inline void clamp_pixel_bits(const uint16_t *in, uint16_t *dst, int64_t k,
                                    int64_t k_padded, const uint16_t *bounds) {
    for (int64_t c = 0; c < k_padded; c += 32) {
        __m512i x = k - c >= 32 ? _mm512_loadu_si512(in + c)
                                : _mm512_maskz_loadu_epi16(first_channels(k - c), in + c);
        __m512i magnitude = _mm512_and_si512(x, _mm512_set1_epi16(0x7FFF));
        __mmask32 number = _mm512_cmple_epu16_mask(magnitude, _mm512_set1_epi16(0x7F80));
        const uint16_t *b = bounds + c;
        x = _mm512_mask_max_epi16(x, number, x, _mm512_load_si512(b + LOW_IF_POSITIVE * k_padded));
        x = _mm512_mask_min_epu16(x, number, x, _mm512_load_si512(b + LOW_IF_NEGATIVE * k_padded));
        x = _mm512_mask_min_epi16(x, number, x, _mm512_load_si512(b + HIGH_IF_POSITIVE * k_padded));
        x = _mm512_mask_max_epu16(x, number, x, _mm512_load_si512(b + HIGH_IF_NEGATIVE * k_padded));
        _mm512_store_si512(dst + c, x);
    }
}

#define ROUND_UP_2(v) (((v) + 1) / 2 * 2)

/* w: [n_out][k] bf16 -> panels of 16 output channels, [n_out rounded up to 16 / 16][k / 2][16][2]:
 * step c of a panel holds inputs 2c and 2c + 1 of each of its channels, as vdpbf16ps pairs them.
 * k is even (a 3x3 convolution's weights: k = 9 taps x channels, tap-major, channels even);
 * outputs past n_out are zeros. */
void pack_weights_dpbf16(const uint16_t *w, int64_t n_out, int64_t k, uint16_t *packed) {
    for (int64_t o = 0; o < (n_out + 15) / 16 * 16; o++)
        for (int64_t c = 0; c < k; c++)
            packed[((o / 16 * (k / 2) + c / 2) * 16 + o % 16) * 2 + c % 2] =
                o < n_out ? w[o * k + c] : 0;
}

/* As multiply_float, for `pairs` steps of two input channels: each pair of pixel p broadcast
 * against panel w0's (and w1's) pairs, both products added to the float sums by vdpbf16ps. */
static inline void multiply_dpbf16(__m512 acc0[PIXELS], __m512 acc1[PIXELS], const uint16_t *a,
                                   int64_t a_stride, const uint16_t *w0, const uint16_t *w1,
                                   int64_t pairs, int both) {
    for (int64_t c = 0; c < pairs; c++) {
        __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + c * 32);
        __m512bh v1 = both ? (__m512bh)_mm512_loadu_si512(w1 + c * 32) : v0;
        for (int p = 0; p < PIXELS; p++) {
            uint32_t pair;
            memcpy(&pair, a + p * a_stride + 2 * c, sizeof pair);
            __m512bh v = (__m512bh)_mm512_set1_epi32((int)pair);
            acc0[p] = _mm512_dpbf16_ps(acc0[p], v, v0);
            if (both) acc1[p] = _mm512_dpbf16_ps(acc1[p], v, v1);
        }
    }
}

static inline void prepare_bounds_dpbf16(const float *low, const float *high, int64_t k,
                                         int64_t k_padded, uint16_t *bounds) {
    split_bounds(low, high, k, k_padded, bounds);
}

/* A bottleneck's clamp on the bits, a transition's in float with its pooling, rounded once. */
static inline void clamp_into_dpbf16(const uint16_t *in, int64_t pool, int64_t pixel_stride,
                                     int64_t row_stride, uint16_t *dst, int64_t k,
                                     int64_t k_padded, const float *low, const float *high,
                                     const uint16_t *bounds) {
    if (pool)
        clamp_pool_pixel_bf16(in, pixel_stride, row_stride, dst, k, low, high);
    else
        clamp_pixel_bits(in, dst, k, k_padded, bounds);
}

/* As write_float, rounding the sums to bf16. */
static inline void write_dpbf16(uint16_t *dst, int64_t channels, __m512 low, __m512 high) {
    store_rounded(dst, first_channels(channels), low, high);
}

PIXEL_LAYER_KERNELS(dpbf16, uint16_t, 2, ROUND_UP_2)
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
/* On CPUs with AMX, a bottleneck layer on the tile unit, in float, rounding once:
 * - relu(clamp(x, low, high) @ W^T + bias), the layer's clamp and 1x1 convolution in one pass.
 *   Each thread clamps 32 pixels at a time into a small buffer that stays in its cache; the
 *   clamped input never goes to memory.
 * - its 3x3 convolution, reading the 1x1's output from a buffer with a zero border and writing
 *   straight into the block tensor's channels.
 * Built only where the compiler targets AMX (CPUs with it also have AVX512_BF16). */
#include <immintrin.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_PIXELS 32

/* Linux hands out the tile registers' state only to processes that ask for it. */
int amx_request(void) {
    return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */);
}

/* w: [n_out][k] bf16 -> tiles of 16 output channels x 32 inputs, in the pairs tdpbf16ps reads
 * (row r holds inputs 2r and 2r+1 of each channel); both sizes zero-padded to multiples of 32.
 * A 3x3 convolution's weights are the same with k = 9 taps x channels, tap-major. */
void pack_weights_amx(const uint16_t *w, int64_t n_out, int64_t k, uint16_t *packed) {
    int64_t k_blocks = ROUND_UP_32(k) / 32;
    for (int64_t nb = 0; nb < ROUND_UP_32(n_out) / 16; nb++)
        for (int64_t kb = 0; kb < k_blocks; kb++) {
            uint16_t *tile = packed + (nb * k_blocks + kb) * 512;
            for (int r = 0; r < 16; r++)
                for (int n = 0; n < 16; n++)
                    for (int p = 0; p < 2; p++) {
                        int64_t out = nb * 16 + n, in = kb * 32 + 2 * r + p;
                        tile[r * 32 + n * 2 + p] = out < n_out && in < k ? w[out * k + in] : 0;
                    }
        }
}

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* Every tile 16 rows of 64 bytes: tiles 0-3 hold 32 pixels x 32 output channels of float sums,
 * 4-5 the input's 32 pixels, 6-7 the weights of 32 output channels. */
static void configure_tiles(void) {
    tile_config config = {.palette_id = 1};
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* Tiles 0 and 2 (and 1 and 3 if `both`: 32 output channels, else 16, as in DenseNet-BC's k = 12)
 * += input (32 pixels, rows a_stride bytes apart) x weights, for k_blocks steps of 32 input
 * channels; the two weight tiles of a step are w_stride elements apart. Called with a constant
 * `both`, so that each use compiles to the loop it needs. */
static inline void multiply_tiles(const uint16_t *a, int64_t a_stride, const uint16_t *w,
                                  int64_t w_stride, int64_t k_blocks, int both) {
    for (int64_t kb = 0; kb < k_blocks; kb++) {
        _tile_loadd(4, a + kb * 32, a_stride);
        _tile_loadd(5, (const char *)(a + kb * 32) + 16 * a_stride, a_stride);
        _tile_loadd(6, w + kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (both) {
            _tile_loadd(7, w + w_stride + kb * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
}

static inline void zero_sums(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

/* sums: 32 pixels x 32 channels of float, row by row. */
static inline void store_sums(float *sums) {
    _tile_stored(0, sums, 128);
    _tile_stored(1, sums + 16, 128);
    _tile_stored(2, sums + 16 * 32, 128);
    _tile_stored(3, sums + 16 * 32 + 16, 128);
}

/* The first `channels` of 32 float sums (+ bias, then ReLU if `relu`) rounded to bf16 into dst.
 * max(0, v) keeps a NaN v, as v < 0 ? 0 : v does; the conversion rounds to nearest even and
 * quiets NaN, as PyTorch's does (it reads float denormals as zero, as oneDNN's does). */
static inline void store_row(const float *sums, __m512 bias_low, __m512 bias_high, int relu,
                             __mmask32 channels, uint16_t *dst) {
    __m512 low = _mm512_load_ps(sums), high = _mm512_load_ps(sums + 16);
    finish_sums(&low, &high, 1, bias_low, bias_high, relu);
    store_rounded(dst, channels, low, high);
}

/* As clamp_conv1x1_float, in bf16 on the tile unit: 32 pixels at a time are clamped (and pooled)
 * into a buffer that stays in the thread's cache. Outputs go inside a zero-bordered buffer for
 * conv3x3_amx with border 1. */
void clamp_conv1x1_amx(const uint16_t *x, int64_t pixel_stride, int64_t n, int64_t height,
                       int64_t width, int64_t k, const float *low, const float *high,
                       const uint16_t *packed, const float *bias, int64_t n_out, uint16_t *out,
                       int64_t out_stride, int64_t border, int64_t pool, int64_t relu,
                       const void *prefetch, int64_t prefetch_bytes, int threads) {
    int64_t rows = n * (pool ? height / 2 * (width / 2) : height * width);
    int64_t k_padded = ROUND_UP_32(k), k_blocks = k_padded / 32;
    PARALLEL_REGION
    {
        configure_tiles();
        uint16_t clamped[AMX_PIXELS * k_padded] __attribute__((aligned(64)));
        float sums[AMX_PIXELS * 32] __attribute__((aligned(64)));
        uint16_t bounds[BOUND_KINDS * k_padded] __attribute__((aligned(64)));
        if (!pool) split_bounds(low, high, k, k_padded, bounds); /* a transition clamps in float */
        memset(clamped, 0, sizeof clamped);
        PARALLEL_FOR
        for (int64_t first = 0; first < rows; first += AMX_PIXELS) {
            int64_t pixels = rows - first < AMX_PIXELS ? rows - first : AMX_PIXELS;
            prefetch_part(prefetch, prefetch_bytes, first / AMX_PIXELS,
                          (rows + AMX_PIXELS - 1) / AMX_PIXELS);
            int64_t src[AMX_PIXELS], at[AMX_PIXELS];
            locate_pixels(first, pixels, height, width, pixel_stride, pool, border, out_stride,
                          src, at);
            for (int64_t i = 0; i < pixels; i++)
                if (pool)
                    clamp_pool_pixel_bf16(x + src[i], pixel_stride, width * pixel_stride,
                                          clamped + i * k_padded, k, low, high);
                else
                    clamp_pixel_bits(x + src[i], clamped + i * k_padded, k, k_padded, bounds);
            for (int64_t i = pixels; i < AMX_PIXELS; i++)
                memset(clamped + i * k_padded, 0, k * sizeof(uint16_t));
            for (int64_t nb = 0; nb < ROUND_UP_32(n_out) / 16; nb += 2) {
                const uint16_t *w = packed + nb * k_blocks * 512;
                int64_t a_stride = k_padded * sizeof(uint16_t);
                zero_sums();
                if (n_out - nb * 16 > 16)
                    multiply_tiles(clamped, a_stride, w, k_blocks * 512, k_blocks, 1);
                else
                    multiply_tiles(clamped, a_stride, w, k_blocks * 512, k_blocks, 0);
                store_sums(sums);
                __mmask32 channels = first_channels(n_out - nb * 16);
                __m512 bias_low, bias_high;
                load_bias(bias, nb * 16, n_out, &bias_low, &bias_high);
                for (int64_t i = 0; i < pixels; i++)
                    store_row(sums + i * 32, bias_low, bias_high, (int)relu, channels,
                              out + at[i] + nb * 16);
            }
        }
        _tile_release();
    }
}

/* conv2d(x, w, stride 1, padding 1) for x held with a zero border: `bordered` is
 * [n][height + 2][width + 2][k] (k a multiple of 32), followed by AMX_PIXELS spare zero pixels.
 * out's pixel (image, y, x) is at out + ((image * height + y) * width + x) * out_stride.
 * Tap (dy, dx) of consecutive pixels of an image reads consecutive bordered pixels, so each tile
 * loads straight from the buffer: 32 bordered positions at a time, of which those on the
 * border are computed and dropped. */
void conv3x3_amx(const uint16_t *bordered, int64_t n, int64_t height, int64_t width, int64_t k,
                 const uint16_t *packed, int64_t n_out, uint16_t *out, int64_t out_stride,
                 const void *prefetch, int64_t prefetch_bytes, int threads) {
    int64_t row = width + 2, image_pixels = (height + 2) * row;
    int64_t first = row + 1, last = height * row + width; /* the first and last inside pixel */
    int64_t tiles = (last - first) / AMX_PIXELS + 1, k_blocks = 9 * k / 32;
    PARALLEL_REGION
    {
        configure_tiles();
        float sums[AMX_PIXELS * 32] __attribute__((aligned(64)));
        PARALLEL_FOR
        for (int64_t item = 0; item < n * tiles; item++) {
            prefetch_part(prefetch, prefetch_bytes, item, n * tiles);
            int64_t image = item / tiles, start = first + item % tiles * AMX_PIXELS;
            const uint16_t *centre = bordered + (image * image_pixels + start) * k;
            int64_t at[AMX_PIXELS];
            locate_bordered(image, start, last, AMX_PIXELS, height, width, out_stride, at);
            for (int64_t nb = 0; nb < ROUND_UP_32(n_out) / 16; nb += 2) {
                const uint16_t *w = packed + nb * k_blocks * 512;
                zero_sums();
                for (int tap = 0; tap < 9; tap++) {
                    const uint16_t *a = centre + ((tap / 3 - 1) * row + tap % 3 - 1) * k;
                    const uint16_t *w_tap = w + tap * (k / 32) * 512;
                    int64_t a_stride = k * sizeof(uint16_t);
                    if (n_out - nb * 16 > 16)
                        multiply_tiles(a, a_stride, w_tap, k_blocks * 512, k / 32, 1);
                    else
                        multiply_tiles(a, a_stride, w_tap, k_blocks * 512, k / 32, 0);
                }
                store_sums(sums);
                __mmask32 channels = first_channels(n_out - nb * 16);
                for (int64_t i = 0; i < AMX_PIXELS; i++)
                    if (at[i] >= 0)
                        store_row(sums + i * 32, _mm512_setzero_ps(), _mm512_setzero_ps(), 0,
                                  channels, out + at[i] + nb * 16);
            }
        }
        _tile_release();
    }
}
DENSE_BLOCK(dense_block_amx, uint16_t, uint16_t, clamp_conv1x1_amx, conv3x3_amx, ROUND_UP_32)
#endif
