/* Memory-bound passes over channels_last data as plain loops: optimize_for_inference's clamps and
 * pools, and memory-efficient training's bf16 BN-ReLU and batch-norm input gradient.
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

#define PARALLEL_ROWS _Pragma("omp parallel for num_threads(threads) if (threads > 1) schedule(static)")

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

/* max_pool2d(x, 3, stride=2, padding=1) of n dense channels_last bf16 or float images. */
#define MAX_POOL_3X3S2(NAME, T, LOAD, STORE)                                                    \
    void NAME(const T *x, T *out, int64_t n, int64_t height, int64_t width, int64_t channels, \
              int threads) {                                                                  \
        int64_t out_height = (height - 1) / 2 + 1, out_width = (width - 1) / 2 + 1;            \
        PARALLEL_ROWS                                                                         \
        for (int64_t row = 0; row < n * out_height; row++) {                                  \
            float window[channels];                                                           \
            int64_t image = row / out_height, y = row % out_height;                           \
            for (int64_t x_out = 0; x_out < out_width; x_out++) {                             \
                for (int64_t c = 0; c < channels; c++) window[c] = -INFINITY;                 \
                for (int64_t iy = 2 * y - 1; iy <= 2 * y + 1; iy++) {                         \
                    if (iy < 0 || iy >= height) continue;                                     \
                    for (int64_t ix = 2 * x_out - 1; ix <= 2 * x_out + 1; ix++) {             \
                        if (ix < 0 || ix >= width) continue;                                  \
                        const T *in = x + ((image * height + iy) * width + ix) * channels;    \
                        for (int64_t c = 0; c < channels; c++) {                              \
                            float v = LOAD(in[c]);                                            \
                            window[c] = (v > window[c] || v != v) ? v : window[c];            \
                        }                                                                     \
                    }                                                                         \
                }                                                                             \
                T *dst = out + (row * out_width + x_out) * channels;                          \
                for (int64_t c = 0; c < channels; c++) dst[c] = STORE(window[c]);             \
            }                                                                                 \
        }                                                                                     \
    }

static inline float load_float(float v) { return v; }
static inline float store_float(float v) { return v; }
MAX_POOL_3X3S2(max_pool_3x3s2_bf16, uint16_t, widen, narrow_exact)
MAX_POOL_3X3S2(max_pool_3x3s2_float, float, load_float, store_float)

/* relu(x * scale + shift) per channel, computed in float and rounded once, for `rows` pixels of
 * bf16 tensors: batch norm with given statistics, then ReLU (NaN passes, as in torch.relu).
 * x's pixels are x_stride apart (a channel slice of a block tensor); out's are dense. */
void norm_relu_bf16(const uint16_t *restrict x, int64_t x_stride, uint16_t *restrict out,
                    int64_t rows, int64_t channels, const float *restrict scale,
                    const float *restrict shift, int threads) {
    PARALLEL_ROWS
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *in = x + r * x_stride;
        uint16_t *dst = out + r * channels;
        for (int64_t c = 0; c < channels; c++) {
            float value = widen(in[c]) * scale[c] + shift[c];
            dst[c] = narrow_rounded(value < 0.0f ? 0.0f : value);
        }
    }
}

/* target = [target +] scale_grad * grad + scale_x * x + shift per channel, for `rows` pixels of
 * bf16 tensors: batch norm's input gradient in training mode, computed in float
 * and rounded once, added to a gradient accumulator when `accumulate` is set, else written (target
 * may then be grad itself). target's pixels are target_stride apart (a channel slice of a block's
 * gradient); grad's and x's are dense. */
void norm_input_gradient_bf16(uint16_t *target, int64_t target_stride, const uint16_t *grad,
                              const uint16_t *x, int64_t rows, int64_t channels,
                              const float *scale_grad, const float *scale_x, const float *shift,
                              int accumulate, int threads) {
    PARALLEL_ROWS
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *dst = target + r * target_stride;
        const uint16_t *g = grad + r * channels, *in = x + r * channels;
        if (accumulate) {
            for (int64_t c = 0; c < channels; c++) {
                float sum = widen(dst[c]) + scale_grad[c] * widen(g[c]);
                dst[c] = narrow_rounded(sum + (scale_x[c] * widen(in[c]) + shift[c]));
            }
        } else {
            for (int64_t c = 0; c < channels; c++)
                dst[c] = narrow_rounded(scale_grad[c] * widen(g[c]) +
                                        (scale_x[c] * widen(in[c]) + shift[c]));
        }
    }
}
