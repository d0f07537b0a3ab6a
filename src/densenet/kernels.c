/* Memory-bound passes over channels_last data as plain loops: optimize_for_inference's clamps and
 * pools, and memory-efficient training's bf16 BN-ReLU and batch-norm input gradient; and, where
 * the compiler targets AMX, a bottleneck's clamp fused with its 1x1 convolution (at the end).
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

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* On CPUs with AMX: relu(clamp(x, low, high) @ W^T + bias), a dense layer's clamp and bottleneck
 * 1x1 convolution in one pass. Each thread clamps 32 pixels at a time into a small buffer that
 * stays in its cache and multiplies it with the packed weights on the tile unit, in float, rounding
 * once; the clamped input never goes to memory. Built only where the compiler targets AMX. */
#include <immintrin.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_PIXELS 32
#define ROUND_UP_32(v) (((v) + 31) / 32 * 32)

/* Linux hands out the tile registers' state only to processes that ask for it. */
int amx_request(void) {
    return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */);
}

/* w: [n_out][k] bf16 -> tiles of 16 output channels x 32 inputs, in the pairs tdpbf16ps reads
 * (row r holds inputs 2r and 2r+1 of each channel); both sizes zero-padded to multiples of 32. */
void pack_conv1x1_weights_amx(const uint16_t *w, int64_t n_out, int64_t k, uint16_t *packed) {
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

void clamp_conv1x1_relu_amx(const uint16_t *x, int64_t pixel_stride, int64_t rows, int64_t k,
                            const float *low, const float *high, const uint16_t *packed,
                            const float *bias, int64_t n_out, uint16_t *out, int threads) {
    int64_t k_padded = ROUND_UP_32(k), k_blocks = k_padded / 32;
    PARALLEL_REGION
    {
        tile_config config = {.palette_id = 1};
        for (int t = 0; t < 8; t++) {
            config.rows[t] = 16;
            config.bytes_per_row[t] = 64;
        }
        _tile_loadconfig(&config);
        /* tiles 0-3: 32 pixels x 32 output channels of float sums; 4-5: clamped input; 6-7: weights */
        uint16_t *clamped = aligned_alloc(64, AMX_PIXELS * k_padded * sizeof(uint16_t));
        float *sums = aligned_alloc(64, AMX_PIXELS * 32 * sizeof(float));
        memset(clamped, 0, AMX_PIXELS * k_padded * sizeof(uint16_t));
        PARALLEL_FOR
        for (int64_t first = 0; first < rows; first += AMX_PIXELS) {
            int64_t pixels = rows - first < AMX_PIXELS ? rows - first : AMX_PIXELS;
            for (int64_t i = 0; i < pixels; i++) {
                const uint16_t *in = x + (first + i) * pixel_stride;
                uint16_t *dst = clamped + i * k_padded;
                for (int64_t c = 0; c < k; c++)
                    dst[c] = narrow_exact(clamp(widen(in[c]), low[c], high[c]));
            }
            for (int64_t i = pixels; i < AMX_PIXELS; i++)
                memset(clamped + i * k_padded, 0, k * sizeof(uint16_t));
            for (int64_t nb = 0; nb < ROUND_UP_32(n_out) / 16; nb += 2) {
                const uint16_t *w0 = packed + nb * k_blocks * 512, *w1 = w0 + k_blocks * 512;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t kb = 0; kb < k_blocks; kb++) {
                    _tile_loadd(4, clamped + kb * 32, k_padded * sizeof(uint16_t));
                    _tile_loadd(5, clamped + 16 * k_padded + kb * 32, k_padded * sizeof(uint16_t));
                    _tile_loadd(6, w0 + kb * 512, 64);
                    _tile_loadd(7, w1 + kb * 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(0, sums, 128);
                _tile_stored(1, sums + 16, 128);
                _tile_stored(2, sums + 16 * 32, 128);
                _tile_stored(3, sums + 16 * 32 + 16, 128);
                int64_t channels = n_out - nb * 16 < 32 ? n_out - nb * 16 : 32;
                for (int64_t i = 0; i < pixels; i++) {
                    uint16_t *dst = out + (first + i) * n_out + nb * 16;
                    for (int64_t j = 0; j < channels; j++) {
                        float value = sums[i * 32 + j] + bias[nb * 16 + j];
                        dst[j] = narrow_rounded(value < 0.0f ? 0.0f : value);
                    }
                }
            }
        }
        free(clamped);
        free(sums);
        _tile_release();
    }
}
#endif
