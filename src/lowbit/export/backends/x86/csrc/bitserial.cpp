// Bit-serial kernels for layers whose input is binary (sign activations, x in {-1, +1}) and whose
// weights are k-bit codes with a per-output-channel codebook.
//
// Derivation (lowbit docs/export.md "Kernels"). Let xpos_i = 1 if x_i = +1 else 0, so x_i = 2*xpos_i - 1
// on the taps that fall inside the input (padding and the holes of a transposed conv contribute 0).
// For an output channel c:
//   sum_i w_i x_i = 2 * sum_i w_i xpos_i - sum_{i valid} w_i                                  (1)
// The last term does not depend on the input: it is the layer applied to an all-ones input ("corr",
// computed once per input size in Python). With an affine codebook w_i = scale_c * z_i + offset_c and
// z_i = sum_b 2^b z_i^(b):
//   sum_i w_i xpos_i = sum_b (scale_c 2^b) * popcount(z^(b) & xpos) + offset_c * popcount(xpos)    (2)
// A general codebook uses one-hot planes instead: sum_l codebook[c, l] * popcount(onehot_l & xpos).
// So each output pixel needs popcount(plane_row & patch) for every (plane, channel) row, plus
// popcount(patch) once. Rows are stored transposed (word-major, rows padded to a multiple of 8) so a
// broadcast patch word meets 8 rows in one AVX-512 register (4 in AVX2) and no horizontal sums are needed.
//
// Convolutions are described by "phases": an output pixel (oh, ow) = (qh*out_step_h + ph, qw*out_step_w + pw)
// reads input (qh*in_step_h + tap_h[t], qw*in_step_w + tap_w[u]). A Conv2d is one phase (in_step = stride);
// a ConvTranspose2d with stride s is s*s phases with in_step 1, each keeping only the taps that hit input
// pixels (the sub-pixel decomposition), so no multiply-by-zero holes are computed.
//
// One call per layer (binary_conv): the input is sign-packed into a zero-padded bit image (a per-thread
// buffer reused across calls) wide enough that every tap of every phase lands inside it, so the pixel
// loops have no bounds checks; then every phase's output rows run. Per pixel, by shape:
//   * Co a multiple of 8 (4 on AVX2), <= 4 planes: register kernels (row_avx512_regs / row_avx2_regs) keep
//     the counts of a block of channels in registers, broadcast patch words straight from the bit image
//     and combine 8 (4) channels at a time;
//   * at most 16 rows (planes * Co, e.g. a generator's 1- or 3-channel output layer): AVX-512 vectorizes
//     over 8 neighbouring output pixels (one masked load per tap when a pixel is one word), the other
//     paths go pixel by pixel with scalar popcounts (<= 4 rows) or the generic lane loop;
//   * anything else: the generic loop (gather the patch, count all rows, combine).
// Every path accumulates the same exact integer counts and combines them in float64 in the same order
// (see binary_conv), so all paths give bit-identical outputs.
//
// Dispatch: the hot loops are compiled three times with function-level target attributes (AVX-512
// VPOPCNTDQ, AVX2, portable scalar) in this one translation unit, built without any -march flag; the
// caller passes the path id and supported_paths() reads cpuid. Sign packing has AVX-512, AVX2 and
// portable versions.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kScalar = 0;
constexpr int64_t kAvx2 = 1;
constexpr int64_t kAvx512 = 2;

using RowsFn = void (*)(const uint64_t*, const uint64_t*, int64_t, int64_t, int64_t*);
using WordsFn = int64_t (*)(const uint64_t*, int64_t);

// counts[r] = sum_w popcount(w_t[w * rows + r] & patch[w]) for r < rows (rows a multiple of 8).
void rows_scalar(const uint64_t* w_t, const uint64_t* patch, int64_t words, int64_t rows, int64_t* counts) {
  for (int64_t r = 0; r < rows; ++r) counts[r] = 0;
  for (int64_t w = 0; w < words; ++w) {
    const uint64_t x = patch[w];
    if (x == 0) continue;
    const uint64_t* row = w_t + w * rows;
    for (int64_t r = 0; r < rows; ++r) counts[r] += __builtin_popcountll(row[r] & x);
  }
}

int64_t words_scalar(const uint64_t* patch, int64_t words) {
  int64_t total = 0;
  for (int64_t w = 0; w < words; ++w) total += __builtin_popcountll(patch[w]);
  return total;
}

// AVX2 has no vector popcount: nibble lookup (pshufb) per byte, then sad_epu8 sums the bytes of each
// 64-bit lane; returns popcount(row & x) for the 4 rows at `row`.
__attribute__((target("avx2"))) inline __m256i popcount_and_avx2(const uint64_t* row, __m256i x) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i v = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)), x);
  const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low));
  const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
  return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());
}

__attribute__((target("avx2"))) void rows_avx2(const uint64_t* w_t, const uint64_t* patch, int64_t words,
                                               int64_t rows, int64_t* counts) {
  const __m256i zero = _mm256_setzero_si256();
  int64_t r = 0;
  for (; r + 16 <= rows; r += 16) {
    __m256i a0 = zero, a1 = zero, a2 = zero, a3 = zero;
    for (int64_t w = 0; w < words; ++w) {
      const __m256i x = _mm256_set1_epi64x(static_cast<long long>(patch[w]));
      const uint64_t* row = w_t + w * rows + r;
      a0 = _mm256_add_epi64(a0, popcount_and_avx2(row, x));
      a1 = _mm256_add_epi64(a1, popcount_and_avx2(row + 4, x));
      a2 = _mm256_add_epi64(a2, popcount_and_avx2(row + 8, x));
      a3 = _mm256_add_epi64(a3, popcount_and_avx2(row + 12, x));
    }
    __m256i* out = reinterpret_cast<__m256i*>(counts + r);
    _mm256_storeu_si256(out, a0);
    _mm256_storeu_si256(out + 1, a1);
    _mm256_storeu_si256(out + 2, a2);
    _mm256_storeu_si256(out + 3, a3);
  }
  for (; r < rows; r += 4) {
    __m256i acc = zero;
    for (int64_t w = 0; w < words; ++w) {
      const __m256i x = _mm256_set1_epi64x(static_cast<long long>(patch[w]));
      acc = _mm256_add_epi64(acc, popcount_and_avx2(w_t + w * rows + r, x));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(counts + r), acc);
  }
}

__attribute__((target("popcnt"))) int64_t words_popcnt(const uint64_t* patch, int64_t words) {
  int64_t total = 0;
  for (int64_t w = 0; w < words; ++w) total += static_cast<int64_t>(_mm_popcnt_u64(patch[w]));
  return total;
}

__attribute__((target("avx512f,avx512vpopcntdq"))) void rows_avx512(const uint64_t* w_t, const uint64_t* patch,
                                                                    int64_t words, int64_t rows, int64_t* counts) {
  const __m512i zero = _mm512_setzero_si512();
  int64_t r = 0;
  for (; r + 32 <= rows; r += 32) {
    __m512i a0 = zero, a1 = zero, a2 = zero, a3 = zero;
    for (int64_t w = 0; w < words; ++w) {
      const __m512i x = _mm512_set1_epi64(static_cast<long long>(patch[w]));
      const uint64_t* row = w_t + w * rows + r;
      a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_loadu_si512(row), x)));
      a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_loadu_si512(row + 8), x)));
      a2 = _mm512_add_epi64(a2, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_loadu_si512(row + 16), x)));
      a3 = _mm512_add_epi64(a3, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_loadu_si512(row + 24), x)));
    }
    _mm512_storeu_si512(counts + r, a0);
    _mm512_storeu_si512(counts + r + 8, a1);
    _mm512_storeu_si512(counts + r + 16, a2);
    _mm512_storeu_si512(counts + r + 24, a3);
  }
  for (; r < rows; r += 8) {
    __m512i acc = zero;
    for (int64_t w = 0; w < words; ++w) {
      const __m512i x = _mm512_set1_epi64(static_cast<long long>(patch[w]));
      acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_loadu_si512(w_t + w * rows + r), x)));
    }
    _mm512_storeu_si512(counts + r, acc);
  }
}

int64_t supported_paths_mask() {
  __builtin_cpu_init();
  int64_t mask = 1 << kScalar;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) mask |= 1 << kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vpopcntdq")) {
    mask |= 1 << kAvx512;
  }
  return mask;
}

void check_path(int64_t path) {
  TORCH_CHECK(path >= kScalar && path <= kAvx512 && (supported_paths_mask() >> path) & 1,
              "kernel path ", path, " is not supported by this CPU");
}

// ----- sign packing into bits: bit c of a pixel's word(s) set iff x[c, pixel] >= 0 -----
// NCHW input: a channel's plane is contiguous, so bits are gathered across planes; channels-last (NHWC)
// input: a pixel's channels are contiguous, so each 64-bit word is built from consecutive floats.
// Pixels are packed in chunks of up to kChunk; at[j] is the word index of chunk pixel j in the destination
// (which may be a zero-padded image, see PackGeometry), so the packers never divide.

constexpr int64_t kChunk = 64;

void pack_nchw_scalar(const float* src, uint64_t* dst, const int64_t* at, int64_t c, int64_t hw, int64_t /*wc*/,
                      int64_t p0, int64_t count) {
  for (int64_t ch = 0; ch < c; ++ch) {
    const float* plane = src + ch * hw + p0;
    const int shift = static_cast<int>(ch % 64);
    uint64_t* word = dst + ch / 64;
    for (int64_t j = 0; j < count; ++j) word[at[j]] |= static_cast<uint64_t>(plane[j] >= 0.0f) << shift;
  }
}

// 16 pixels at a time: one compare gives their sign bits for channel k, which masked ORs set as bit k of
// the 16 pixels' words (two 8-lane registers), so no bit transposition loop is needed.
__attribute__((target("avx512f"))) void pack_nchw_avx512(const float* src, uint64_t* dst, const int64_t* at,
                                                         int64_t c, int64_t hw, int64_t wc, int64_t p0,
                                                         int64_t total) {
  const __m512 zero = _mm512_setzero_ps();
  alignas(64) uint64_t lanes[16];
  for (int64_t j0 = 0; j0 < total; j0 += 16) {
    const int64_t count = total - j0 < 16 ? total - j0 : 16;
    const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1u);
    for (int64_t cw = 0; cw < wc; ++cw) {
      __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
      const int64_t channels = c - cw * 64 < 64 ? c - cw * 64 : 64;
      const float* plane = src + cw * 64 * hw + p0 + j0;
      for (int64_t k = 0; k < channels; ++k, plane += hw) {
        const __mmask16 positive =
            count == 16 ? _mm512_cmp_ps_mask(_mm512_loadu_ps(plane), zero, _CMP_GE_OQ)
                        : _mm512_mask_cmp_ps_mask(valid, _mm512_maskz_loadu_ps(valid, plane), zero, _CMP_GE_OQ);
        const __m512i bit = _mm512_set1_epi64(static_cast<long long>(uint64_t{1} << k));
        acc0 = _mm512_mask_or_epi64(acc0, static_cast<__mmask8>(positive & 0xff), acc0, bit);
        acc1 = _mm512_mask_or_epi64(acc1, static_cast<__mmask8>(positive >> 8), acc1, bit);
      }
      _mm512_store_si512(lanes, acc0);
      _mm512_store_si512(lanes + 8, acc1);
      for (int64_t j = 0; j < count; ++j) dst[at[j0 + j] + cw] = lanes[j];
    }
  }
}

void pack_nhwc_scalar(const float* src, uint64_t* dst, const int64_t* at, int64_t c, int64_t /*hw*/, int64_t wc,
                      int64_t p0, int64_t count) {
  for (int64_t j = 0; j < count; ++j) {
    const float* pixel = src + (p0 + j) * c;
    for (int64_t cw = 0; cw < wc; ++cw) {
      const int64_t channels = c - cw * 64 < 64 ? c - cw * 64 : 64;
      uint64_t word = 0;
      for (int64_t k = 0; k < channels; ++k) word |= static_cast<uint64_t>(pixel[cw * 64 + k] >= 0.0f) << k;
      dst[at[j] + cw] = word;
    }
  }
}

// One compare yields the sign bits of 16 consecutive channels; four of them make a 64-bit word.
__attribute__((target("avx512f"))) void pack_nhwc_avx512(const float* src, uint64_t* dst, const int64_t* at,
                                                         int64_t c, int64_t /*hw*/, int64_t wc, int64_t p0,
                                                         int64_t count) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    const float* pixel = src + (p0 + j) * c;
    for (int64_t cw = 0; cw < wc; ++cw) {
      uint64_t word = 0;
      for (int64_t s = 0; s < 4; ++s) {
        const int64_t first = cw * 64 + s * 16;
        if (first >= c) break;
        const int64_t n = c - first < 16 ? c - first : 16;
        const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(valid, pixel + first);
        word |= static_cast<uint64_t>(_mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_GE_OQ)) << (16 * s);
      }
      dst[at[j] + cw] = word;
    }
  }
}

// AVX2, 8 pixels at a time: a compare gives 8 all-ones/zero 32-bit lanes for channel k, ANDed with
// 1 << (k % 32) and ORed into the low (channels 0-31) or high (32-63) half-word of the 8 pixels; the
// halves are interleaved into 64-bit words at the end.
__attribute__((target("avx2"))) void pack_nchw_avx2(const float* src, uint64_t* dst, const int64_t* at, int64_t c,
                                                    int64_t hw, int64_t wc, int64_t p0, int64_t total) {
  const __m256 zero = _mm256_setzero_ps();
  alignas(32) uint64_t lanes[8];
  alignas(32) float tail[8];
  for (int64_t j0 = 0; j0 < total; j0 += 8) {
    const int64_t count = total - j0 < 8 ? total - j0 : 8;
    for (int64_t cw = 0; cw < wc; ++cw) {
      const int64_t channels = c - cw * 64 < 64 ? c - cw * 64 : 64;
      const float* plane = src + cw * 64 * hw + p0 + j0;
      __m256i half[2];
      for (int64_t part = 0; part < 2; ++part) {  // two loops, so each half stays in a register
        __m256i acc = _mm256_setzero_si256();
        for (int64_t k = part * 32; k < channels && k < part * 32 + 32; ++k) {
          const float* row = plane + k * hw;
          __m256 v;
          if (count == 8) {
            v = _mm256_loadu_ps(row);
          } else {
            for (int64_t j = 0; j < 8; ++j) tail[j] = j < count ? row[j] : 0.0f;
            v = _mm256_load_ps(tail);
          }
          const __m256i positive = _mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_GE_OQ));
          acc = _mm256_or_si256(acc, _mm256_and_si256(positive, _mm256_set1_epi32(static_cast<int>(1u << (k % 32)))));
        }
        half[part] = acc;
      }
      // unpack within 128-bit lanes gives pixels (0,1,4,5) and (2,3,6,7); permute back to 0..7.
      const __m256i a = _mm256_unpacklo_epi32(half[0], half[1]), b = _mm256_unpackhi_epi32(half[0], half[1]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_permute2x128_si256(a, b, 0x20));
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 4), _mm256_permute2x128_si256(a, b, 0x31));
      for (int64_t j = 0; j < count; ++j) dst[at[j0 + j] + cw] = lanes[j];
    }
  }
}

// AVX2 channels-last: one compare + movemask gives the sign bits of 8 consecutive channels.
__attribute__((target("avx2"))) void pack_nhwc_avx2(const float* src, uint64_t* dst, const int64_t* at, int64_t c,
                                                    int64_t /*hw*/, int64_t wc, int64_t p0, int64_t count) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    const float* pixel = src + (p0 + j) * c;
    for (int64_t cw = 0; cw < wc; ++cw) {
      const int64_t channels = c - cw * 64 < 64 ? c - cw * 64 : 64;
      const float* first = pixel + cw * 64;
      uint64_t word = 0;
      int64_t k = 0;
      for (; k + 8 <= channels; k += 8) {
        const int bits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(first + k), zero, _CMP_GE_OQ));
        word |= static_cast<uint64_t>(static_cast<unsigned>(bits)) << k;
      }
      for (; k < channels; ++k) word |= static_cast<uint64_t>(first[k] >= 0.0f) << k;
      dst[at[j] + cw] = word;
    }
  }
}

// Destination of packed bits: (N, H + pad_top + pad_bottom, W + pad_left + pad_right, wc) words, the
// input image at (pad_top, pad_left) and zeros (no positive bit: "outside the input") around it.
struct PackGeometry {
  int64_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;
};

int64_t padded_words(const at::Tensor& x, const PackGeometry& g) {
  return x.size(0) * (x.size(2) + g.pad_top + g.pad_bottom) * (x.size(3) + g.pad_left + g.pad_right) *
         ((x.size(1) + 63) / 64);
}

// Packs x (N, C, H, W) float32, NCHW or channels-last, into `dst` (padded_words(x, g) zeroed words).
void pack_sign_into(const at::Tensor& x, int64_t path, const PackGeometry& g, uint64_t* dst) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "pack_sign wants a 4-d float32 tensor");
  const bool nchw = x.is_contiguous();
  TORCH_CHECK(nchw || x.is_contiguous(at::MemoryFormat::ChannelsLast), "pack_sign wants NCHW or channels-last");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), hw = h * w, wc = (c + 63) / 64;
  const int64_t hp = h + g.pad_top + g.pad_bottom, wp = w + g.pad_left + g.pad_right;
  const float* src = x.data_ptr<float>();
  const int64_t chunks = (hw + kChunk - 1) / kChunk;
  const auto pack = path == kAvx512 ? (nchw ? pack_nchw_avx512 : pack_nhwc_avx512)
                    : path == kAvx2 ? (nchw ? pack_nchw_avx2 : pack_nhwc_avx2)
                                    : (nchw ? pack_nchw_scalar : pack_nhwc_scalar);
  at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
    int64_t at_word[kChunk];
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx / chunks, p0 = (idx % chunks) * kChunk, count = hw - p0 < kChunk ? hw - p0 : kChunk;
      int64_t y = p0 / w, xc = p0 % w;
      for (int64_t j = 0; j < count; ++j) {
        at_word[j] = ((y + g.pad_top) * wp + xc + g.pad_left) * wc;
        if (++xc == w) xc = 0, ++y;
      }
      pack(src + i * c * hw, dst + i * hp * wp * wc, at_word, c, hw, wc, p0, count);
    }
  });
}

// Sign-binarise x (N, C, H, W) float32, contiguous or channels-last, into bits (N, H, W, ceil(C/64)) int64.
at::Tensor pack_sign(const at::Tensor& x, int64_t path) {
  check_path(path);
  TORCH_CHECK(x.dim() == 4, "pack_sign wants a 4-d float32 tensor");
  at::Tensor bits = at::zeros({x.size(0), x.size(2), x.size(3), (x.size(1) + 63) / 64}, x.options().dtype(at::kLong));
  pack_sign_into(x, path, PackGeometry{}, reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>()));
  return bits;
}

// ----- binary-input conv: all phases of one layer in one call -----
//
// Output value (eq. 1-2 with the factor 2 folded into coef2 = 2*coef and offset2 = 2*offset, exact in
// floating point): out[c] = float(base[c] + offset2[c] * popcount(patch) + sum_b coef2[b, c] * count[b, c]),
// accumulated in double in exactly this order on every path, so all paths agree bit for bit.

struct ConvArgs {
  const uint64_t* x;     // zero-padded bits (N, hp, wp, wc)
  const double* coef2;   // (planes, co)
  const double* offset2; // (co)
  const double* base;    // (Ho, Wo, co): bias - layer(all-ones input)
  float* out;            // (N, Ho, Wo, co): channels-last, one contiguous store per pixel
  int64_t hp, wp, wc, ho, wo, co, planes, rows_padded;
  int64_t in_step_h, in_step_w, out_step_h, out_step_w;
};

struct PhaseInfo {
  const uint64_t* w_t;        // (words, rows_padded), rows = plane * co + channel
  std::vector<int64_t> offs;  // word offset of every tap (t, u) from the patch's top-left padded pixel
  int64_t ph, pw, n_qh, n_qw, words;
};

struct Scratch {
  std::vector<uint64_t> patch;
  std::vector<int64_t> counts;
};

// The output pixel (qh, qw) of phase f reads the padded input from here on (plus f.offs).
inline const uint64_t* patch_origin(const ConvArgs& a, int64_t i, int64_t qh, int64_t qw) {
  return a.x + ((i * a.hp + qh * a.in_step_h) * a.wp + qw * a.in_step_w) * a.wc;
}

// One output pixel of the register kernels: its patch origin in the padded input, its base and output
// rows, and the set bits of its patch words (the ``positives`` of the combine).
struct Pixel {
  const uint64_t* px;
  const double* base;
  float* out;
  int64_t positives;
};

__attribute__((target("popcnt"))) inline Pixel pixel_at(const ConvArgs& a, const PhaseInfo& f, int64_t i,
                                                        int64_t qh, int64_t qw, int64_t oh) {
  const int64_t ow = qw * a.out_step_w + f.pw;
  Pixel p{patch_origin(a, i, qh, qw), a.base + (oh * a.wo + ow) * a.co,
          a.out + ((i * a.ho + oh) * a.wo + ow) * a.co, 0};
  for (const int64_t off : f.offs) {
    for (int64_t k = 0; k < a.wc; ++k) p.positives += static_cast<int64_t>(_mm_popcnt_u64(p.px[off + k]));
  }
  return p;
}

// Generic per-row loop (any co, planes): gathers the patch, Rows() counts every (plane, channel) row.
// Written once and inlined into each ISA's wrapper, so the compiler vectorizes the combine for that ISA.
template <RowsFn Rows, WordsFn Words>
__attribute__((always_inline)) inline void row_generic(const ConvArgs& a, const PhaseInfo& f, int64_t i,
                                                       int64_t qh, Scratch& s) {
  const int64_t co = a.co, wc = a.wc, taps = static_cast<int64_t>(f.offs.size());
  const int64_t oh = qh * a.out_step_h + f.ph;
  uint64_t* patch = s.patch.data();
  const int64_t* cnt = s.counts.data();
  for (int64_t qw = 0; qw < f.n_qw; ++qw) {
    const int64_t ow = qw * a.out_step_w + f.pw;
    const uint64_t* px = patch_origin(a, i, qh, qw);
    uint64_t* p = patch;
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t k = 0; k < wc; ++k) *p++ = px[f.offs[t] + k];
    }
    const double positives = static_cast<double>(Words(patch, f.words));
    Rows(f.w_t, patch, f.words, a.rows_padded, s.counts.data());
    const double* base = a.base + (oh * a.wo + ow) * co;
    float* out = a.out + ((i * a.ho + oh) * a.wo + ow) * co;
    for (int64_t c = 0; c < co; ++c) {
      double r = base[c] + a.offset2[c] * positives;
      for (int64_t b = 0; b < a.planes; ++b) r = r + a.coef2[b * co + c] * static_cast<double>(cnt[b * co + c]);
      out[c] = static_cast<float>(r);
    }
  }
}

// AVX-512, co a multiple of 8: the counts of P planes x CV channel vectors (8 channels each) stay in
// registers, the patch words are broadcast straight from the padded input (no patch buffer), and the
// combine runs on 8 doubles at a time in the same order as row_generic. Channels go in blocks of 8*CV.
template <int P, int CV>
__attribute__((target("avx512f,avx512dq,avx512vpopcntdq,avx2,popcnt"))) void row_avx512_regs(
    const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& /*s*/) {
  const int64_t co = a.co, wc = a.wc, rp = a.rows_padded, taps = static_cast<int64_t>(f.offs.size());
  const int64_t oh = qh * a.out_step_h + f.ph;
  const int64_t* offs = f.offs.data();
  const int64_t blocks = co / (8 * CV);
  for (int64_t qw = 0; qw < f.n_qw; ++qw) {
    const Pixel pixel = pixel_at(a, f, i, qh, qw, oh);
    const __m512d pos = _mm512_set1_pd(static_cast<double>(pixel.positives));
    for (int64_t cb = 0; cb < blocks; ++cb) {
      const int64_t c0 = cb * 8 * CV;
      __m512i acc[P * CV];
      for (int j = 0; j < P * CV; ++j) acc[j] = _mm512_setzero_si512();
      const uint64_t* wrow = f.w_t + c0;
      for (int64_t t = 0; t < taps; ++t) {
        const uint64_t* src = pixel.px + offs[t];
        for (int64_t k = 0; k < wc; ++k, wrow += rp) {
          const __m512i xv = _mm512_set1_epi64(static_cast<long long>(src[k]));
          for (int b = 0; b < P; ++b) {
            for (int v = 0; v < CV; ++v) {
              const __m512i wv = _mm512_loadu_si512(wrow + b * co + 8 * v);
              acc[b * CV + v] = _mm512_add_epi64(acc[b * CV + v], _mm512_popcnt_epi64(_mm512_and_si512(wv, xv)));
            }
          }
        }
      }
      for (int v = 0; v < CV; ++v) {
        const int64_t c = c0 + 8 * v;
        __m512d r = _mm512_add_pd(_mm512_loadu_pd(pixel.base + c), _mm512_mul_pd(_mm512_loadu_pd(a.offset2 + c), pos));
        for (int b = 0; b < P; ++b) {
          r = _mm512_add_pd(r, _mm512_mul_pd(_mm512_loadu_pd(a.coef2 + b * co + c), _mm512_cvtepi64_pd(acc[b * CV + v])));
        }
        _mm256_storeu_ps(pixel.out + c, _mm512_cvtpd_ps(r));
      }
    }
  }
}

// AVX2 version of row_avx512_regs: 4 channels per register, P x CV <= 4 accumulators. The pshufb
// nibble popcounts of one block add up as bytes over up to 31 patch words (8 per word per byte, so no
// overflow) and are summed to 64-bit lanes (sad_epu8) once per 31 words; AVX2 has no int64 -> double
// conversion, so the (small) counts go through their low 32 bits.
template <int P, int CV>
__attribute__((target("avx2,popcnt"))) void row_avx2_regs(const ConvArgs& a, const PhaseInfo& f, int64_t i,
                                                          int64_t qh, Scratch& /*s*/) {
  const int64_t co = a.co, wc = a.wc, rp = a.rows_padded, taps = static_cast<int64_t>(f.offs.size());
  const int64_t oh = qh * a.out_step_h + f.ph;
  const int64_t* offs = f.offs.data();
  const int64_t blocks = co / (4 * CV);
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i low_dwords = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  for (int64_t qw = 0; qw < f.n_qw; ++qw) {
    const Pixel pixel = pixel_at(a, f, i, qh, qw, oh);
    const __m256d pos = _mm256_set1_pd(static_cast<double>(pixel.positives));
    for (int64_t cb = 0; cb < blocks; ++cb) {
      const int64_t c0 = cb * 4 * CV;
      __m256i acc[P * CV], bytes[P * CV];
      for (int j = 0; j < P * CV; ++j) acc[j] = bytes[j] = zero;
      const uint64_t* wrow = f.w_t + c0;
      int pending = 0;
      for (int64_t t = 0; t < taps; ++t) {
        const uint64_t* src = pixel.px + offs[t];
        for (int64_t k = 0; k < wc; ++k, wrow += rp) {
          const __m256i xv = _mm256_set1_epi64x(static_cast<long long>(src[k]));
          for (int b = 0; b < P; ++b) {
            for (int v = 0; v < CV; ++v) {
              const __m256i wv = _mm256_and_si256(
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + b * co + 4 * v)), xv);
              const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(wv, low));
              const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(wv, 4), low));
              bytes[b * CV + v] = _mm256_add_epi8(bytes[b * CV + v], _mm256_add_epi8(lo, hi));
            }
          }
          if (++pending == 31) {
            for (int j = 0; j < P * CV; ++j) {
              acc[j] = _mm256_add_epi64(acc[j], _mm256_sad_epu8(bytes[j], zero));
              bytes[j] = zero;
            }
            pending = 0;
          }
        }
      }
      for (int v = 0; v < CV; ++v) {
        const int64_t c = c0 + 4 * v;
        __m256d r = _mm256_add_pd(_mm256_loadu_pd(pixel.base + c), _mm256_mul_pd(_mm256_loadu_pd(a.offset2 + c), pos));
        for (int b = 0; b < P; ++b) {
          const __m256i count = _mm256_add_epi64(acc[b * CV + v], _mm256_sad_epu8(bytes[b * CV + v], zero));
          const __m256d cd = _mm256_cvtepi32_pd(
              _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(count, low_dwords)));
          r = _mm256_add_pd(r, _mm256_mul_pd(_mm256_loadu_pd(a.coef2 + b * co + c), cd));
        }
        _mm_storeu_ps(pixel.out + c, _mm256_cvtpd_ps(r));
      }
    }
  }
}

// Few rows (R = planes * co <= 4) on the scalar and AVX2 paths: one output pixel at a time, its patch
// words read straight from the padded input, R + 1 scalar popcounts per word (the popcnt instruction
// where the wrapper's target has it).
template <int R>
__attribute__((always_inline)) inline void row_pixels(const ConvArgs& a, const PhaseInfo& f, int64_t i,
                                                      int64_t qh) {
  const int64_t co = a.co, wc = a.wc, rp = a.rows_padded, taps = static_cast<int64_t>(f.offs.size());
  const int64_t oh = qh * a.out_step_h + f.ph;
  const int64_t* offs = f.offs.data();
  for (int64_t qw = 0; qw < f.n_qw; ++qw) {
    const int64_t ow = qw * a.out_step_w + f.pw;
    const uint64_t* px = patch_origin(a, i, qh, qw);
    int64_t positives = 0, counts[R] = {};
    const uint64_t* wrow = f.w_t;
    if (wc == 1) {  // one word per tap: the common case, without the inner loop
      for (int64_t t = 0; t < taps; ++t, wrow += rp) {
        const uint64_t x = px[offs[t]];
        positives += __builtin_popcountll(x);
        for (int r = 0; r < R; ++r) counts[r] += __builtin_popcountll(x & wrow[r]);
      }
    } else {
      for (int64_t t = 0; t < taps; ++t) {
        for (int64_t k = 0; k < wc; ++k, wrow += rp) {
          const uint64_t x = px[offs[t] + k];
          positives += __builtin_popcountll(x);
          for (int r = 0; r < R; ++r) counts[r] += __builtin_popcountll(x & wrow[r]);
        }
      }
    }
    const double* base = a.base + (oh * a.wo + ow) * co;
    float* out = a.out + ((i * a.ho + oh) * a.wo + ow) * co;
    if (R == 1) {  // one channel, one plane
      out[0] = static_cast<float>(base[0] + a.offset2[0] * static_cast<double>(positives) +
                                  a.coef2[0] * static_cast<double>(counts[0]));
      continue;
    }
    for (int64_t c = 0; c < co; ++c) {
      double r = base[c] + a.offset2[c] * static_cast<double>(positives);
      for (int64_t b = 0; b < a.planes; ++b) r = r + a.coef2[b * co + c] * static_cast<double>(counts[b * co + c]);
      out[c] = static_cast<float>(r);
    }
  }
}

template <int R>
void pixels_scalar(const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& /*s*/) {
  row_pixels<R>(a, f, i, qh);
}

template <int R>
__attribute__((target("avx2,popcnt"))) void pixels_avx2(const ConvArgs& a, const PhaseInfo& f, int64_t i,
                                                        int64_t qh, Scratch& /*s*/) {
  row_pixels<R>(a, f, i, qh);
}

constexpr int64_t kLanes = 8;
constexpr int64_t kMaxLaneRows = 16;

// Layers with few rows (e.g. the RGB/grey output layer of a generator) vectorize over 8 neighbouring
// output pixels of a phase row instead of over rows: counts[r][l] = sum_wd popcount(w_t[wd, r] &
// patch[wd][l]), positives[l] = sum_wd popcount(patch[wd][l]) (patch stored word-major, 8 lanes a word).
using LanesFn = void (*)(const uint64_t*, const uint64_t*, int64_t, int64_t, int64_t, int64_t (*)[kLanes],
                         int64_t*);

// always_inline: compiled inside each path's wrapper, so the avx2 path gets the popcnt instruction.
__attribute__((always_inline)) inline void lane_counts_portable(const uint64_t* patch, const uint64_t* w_t,
                                                                int64_t words, int64_t rows_padded, int64_t rows,
                                                                int64_t (*counts)[kLanes], int64_t* positives) {
  for (int64_t l = 0; l < kLanes; ++l) positives[l] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t l = 0; l < kLanes; ++l) counts[r][l] = 0;
  }
  for (int64_t wd = 0; wd < words; ++wd) {
    const uint64_t* x = patch + wd * kLanes;
    for (int64_t l = 0; l < kLanes; ++l) positives[l] += __builtin_popcountll(x[l]);
    for (int64_t r = 0; r < rows; ++r) {
      const uint64_t wbits = w_t[wd * rows_padded + r];
      for (int64_t l = 0; l < kLanes; ++l) counts[r][l] += __builtin_popcountll(wbits & x[l]);
    }
  }
}

__attribute__((target("avx512f,avx512vpopcntdq"))) void lane_counts_avx512(const uint64_t* patch,
                                                                           const uint64_t* w_t, int64_t words,
                                                                           int64_t rows_padded, int64_t rows,
                                                                           int64_t (*counts)[kLanes],
                                                                           int64_t* positives) {
  __m512i acc[kMaxLaneRows];
  __m512i pos = _mm512_setzero_si512();
  for (int64_t r = 0; r < rows; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t wd = 0; wd < words; ++wd) {
    const __m512i x = _mm512_loadu_si512(patch + wd * kLanes);
    pos = _mm512_add_epi64(pos, _mm512_popcnt_epi64(x));
    for (int64_t r = 0; r < rows; ++r) {
      const __m512i wbits = _mm512_set1_epi64(static_cast<long long>(w_t[wd * rows_padded + r]));
      acc[r] = _mm512_add_epi64(acc[r], _mm512_popcnt_epi64(_mm512_and_si512(x, wbits)));
    }
  }
  _mm512_storeu_si512(positives, pos);
  for (int64_t r = 0; r < rows; ++r) _mm512_storeu_si512(counts[r], acc[r]);
}

// Combine of the lane paths: the same double arithmetic, in the same order, as row_generic.
__attribute__((always_inline)) inline void lanes_combine(const ConvArgs& a, int64_t i, int64_t oh, int64_t ow0,
                                                         int64_t lanes, const int64_t (*counts)[kLanes],
                                                         const int64_t* positives) {
  const int64_t co = a.co, stride = a.out_step_w * co;
  for (int64_t c = 0; c < co; ++c) {
    const double* base = a.base + (oh * a.wo + ow0) * co + c;
    float* out = a.out + ((i * a.ho + oh) * a.wo + ow0) * co + c;
    for (int64_t l = 0; l < lanes; ++l) {
      double r = base[l * stride] + a.offset2[c] * static_cast<double>(positives[l]);
      for (int64_t b = 0; b < a.planes; ++b) {
        r = r + a.coef2[b * co + c] * static_cast<double>(counts[b * co + c][l]);
      }
      out[l * stride] = static_cast<float>(r);
    }
  }
}

template <LanesFn Counts>
__attribute__((always_inline)) inline void row_lanes(const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh,
                                                     Scratch& s) {
  const int64_t wc = a.wc, taps = static_cast<int64_t>(f.offs.size()), rows = a.planes * a.co;
  const int64_t oh = qh * a.out_step_h + f.ph;
  uint64_t* patch = s.patch.data();
  for (int64_t q0 = 0; q0 < f.n_qw; q0 += kLanes) {
    const int64_t lanes = f.n_qw - q0 < kLanes ? f.n_qw - q0 : kLanes;
    for (int64_t l = 0; l < kLanes; ++l) {
      const uint64_t* px = patch_origin(a, i, qh, q0 + (l < lanes ? l : 0));
      for (int64_t t = 0; t < taps; ++t) {
        for (int64_t k = 0; k < wc; ++k) patch[(t * wc + k) * kLanes + l] = l < lanes ? px[f.offs[t] + k] : 0;
      }
    }
    int64_t positives[kLanes];
    int64_t counts[kMaxLaneRows][kLanes];
    Counts(patch, f.w_t, f.words, a.rows_padded, rows, counts, positives);
    lanes_combine(a, i, oh, q0 * a.out_step_w + f.pw, lanes, counts, positives);
  }
}

// AVX-512 lanes with one input word per pixel and unit input step: a tap's 8 lanes are 8 consecutive
// words of the padded input, one (masked) load; R = rows (planes * co).
template <int R>
__attribute__((target("avx512f,avx512dq,avx512vpopcntdq,avx2,popcnt"))) void row_avx512_lanes(
    const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& /*s*/) {
  const int64_t taps = static_cast<int64_t>(f.offs.size()), rp = a.rows_padded;
  const int64_t oh = qh * a.out_step_h + f.ph;
  const int64_t* offs = f.offs.data();
  for (int64_t q0 = 0; q0 < f.n_qw; q0 += kLanes) {
    const int64_t lanes = f.n_qw - q0 < kLanes ? f.n_qw - q0 : kLanes;
    const __mmask8 valid = static_cast<__mmask8>((1u << lanes) - 1u);
    const uint64_t* px = patch_origin(a, i, qh, q0);
    __m512i pos = _mm512_setzero_si512();
    __m512i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
    for (int64_t t = 0; t < taps; ++t) {
      const __m512i xv = _mm512_maskz_loadu_epi64(valid, px + offs[t]);
      pos = _mm512_add_epi64(pos, _mm512_popcnt_epi64(xv));
      for (int r = 0; r < R; ++r) {
        const __m512i wv = _mm512_set1_epi64(static_cast<long long>(f.w_t[t * rp + r]));
        acc[r] = _mm512_add_epi64(acc[r], _mm512_popcnt_epi64(_mm512_and_si512(xv, wv)));
      }
    }
    // The combine of lanes_combine on 8 lanes at once: base gathered, outputs scattered (lane stride
    // out_step_w * co), same double operations in the same order.
    const int64_t co = a.co, ow0 = q0 * a.out_step_w + f.pw;
    const __m512i lane_index = _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7),
                                                  _mm512_set1_epi64(a.out_step_w * co));
    const __m512d pos_d = _mm512_cvtepi64_pd(pos);
    __m512d counts[R];
    for (int r = 0; r < R; ++r) counts[r] = _mm512_cvtepi64_pd(acc[r]);
    for (int64_t c = 0; c < co; ++c) {
      const double* base = a.base + (oh * a.wo + ow0) * co + c;
      float* out = a.out + ((i * a.ho + oh) * a.wo + ow0) * co + c;
      __m512d r = _mm512_mask_i64gather_pd(_mm512_setzero_pd(), valid, lane_index, base, 8);
      r = _mm512_add_pd(r, _mm512_mul_pd(_mm512_set1_pd(a.offset2[c]), pos_d));
      for (int64_t b = 0; b < a.planes; ++b) {
        r = _mm512_add_pd(r, _mm512_mul_pd(_mm512_set1_pd(a.coef2[b * co + c]), counts[b * co + c]));
      }
      _mm512_mask_i64scatter_ps(out, valid, lane_index, _mm512_cvtpd_ps(r), 4);
    }
  }
}

using RowFn = void (*)(const ConvArgs&, const PhaseInfo&, int64_t, int64_t, Scratch&);

void generic_scalar(const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& s) {
  row_generic<rows_scalar, words_scalar>(a, f, i, qh, s);
}

__attribute__((target("avx2,popcnt"))) void generic_avx2(const ConvArgs& a, const PhaseInfo& f, int64_t i,
                                                         int64_t qh, Scratch& s) {
  row_generic<rows_avx2, words_popcnt>(a, f, i, qh, s);
}

__attribute__((target("avx512f,avx512dq,avx512vpopcntdq,avx2,popcnt"))) void generic_avx512(
    const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& s) {
  row_generic<rows_avx512, words_popcnt>(a, f, i, qh, s);
}

void lanes_scalar(const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& s) {
  row_lanes<lane_counts_portable>(a, f, i, qh, s);
}

__attribute__((target("avx2,popcnt"))) void lanes_avx2(const ConvArgs& a, const PhaseInfo& f, int64_t i,
                                                       int64_t qh, Scratch& s) {
  row_lanes<lane_counts_portable>(a, f, i, qh, s);
}

__attribute__((target("avx512f,avx512dq,avx512vpopcntdq,avx2,popcnt"))) void lanes_avx512(
    const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& s) {
  row_lanes<lane_counts_avx512>(a, f, i, qh, s);
}

// A register kernel KERNEL<P, CV> for planes P: CV = the most channel vectors per block with
// P * CV <= ACC accumulators that divides `vectors`; expands to the returns for planes 1..4.
#define LOWBIT_PICK_REGS(KERNEL, ACC)                                                        \
  LOWBIT_REGS_FOR(KERNEL, ACC, 1)                                                            \
  LOWBIT_REGS_FOR(KERNEL, ACC, 2)                                                            \
  LOWBIT_REGS_FOR(KERNEL, ACC, 3)                                                            \
  LOWBIT_REGS_FOR(KERNEL, ACC, 4)
#define LOWBIT_REGS_FOR(KERNEL, ACC, P)                                                      \
  if (planes == P) {                                                                         \
    if ((ACC / P) >= 8 && vectors % 8 == 0) return KERNEL<P, (ACC / P >= 8 ? 8 : 1)>;        \
    if ((ACC / P) >= 4 && vectors % 4 == 0) return KERNEL<P, (ACC / P >= 4 ? 4 : 1)>;        \
    if ((ACC / P) >= 2 && vectors % 2 == 0) return KERNEL<P, (ACC / P >= 2 ? 2 : 1)>;        \
    return KERNEL<P, 1>;                                                                     \
  }

// The AVX-512 register kernel: 8-channel vectors, P * CV <= 16 accumulators; nullptr when co is not
// a multiple of 8 or planes > 4.
RowFn pick_avx512_regs(int64_t planes, int64_t co) {
  if (co % 8 != 0) return nullptr;
  const int64_t vectors = co / 8;
  LOWBIT_PICK_REGS(row_avx512_regs, 16)
  return nullptr;
}

// The AVX2 register kernel: 4-channel vectors, P * CV <= 4 accumulators (plus as many byte sums: 16 ymm).
RowFn pick_avx2_regs(int64_t planes, int64_t co) {
  if (co % 4 != 0) return nullptr;
  const int64_t vectors = co / 4;
  LOWBIT_PICK_REGS(row_avx2_regs, 4)
  return nullptr;
}
#undef LOWBIT_REGS_FOR
#undef LOWBIT_PICK_REGS

// One pixel at a time for rows <= 4 (scalar and AVX2 paths).
RowFn pick_pixels(int64_t rows, bool avx2) {
  switch (rows) {
    case 1: return avx2 ? pixels_avx2<1> : pixels_scalar<1>;
    case 2: return avx2 ? pixels_avx2<2> : pixels_scalar<2>;
    case 3: return avx2 ? pixels_avx2<3> : pixels_scalar<3>;
    case 4: return avx2 ? pixels_avx2<4> : pixels_scalar<4>;
    default: return nullptr;
  }
}

RowFn pick_avx512_lanes(int64_t rows) {
  switch (rows) {
    case 1: return row_avx512_lanes<1>;
    case 2: return row_avx512_lanes<2>;
    case 3: return row_avx512_lanes<3>;
    case 4: return row_avx512_lanes<4>;
    default: return nullptr;
  }
}

// The output tensor, reusing one of this thread's earlier outputs when no tensor refers to it any more
// (the caller dropped it and every view of it): same as freeing and allocating again, minus the page
// faults a fresh large allocation costs each time the C allocator hands it back to the system.
at::Tensor output_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kPoolBytes = size_t{64} << 20;  // what one thread may keep, in all
  // Storages, not tensors: a fresh tensor is made on a free storage, so nothing the caller does with
  // (or Python keeps of) the tensor it got can make a storage look taken once that tensor is gone.
  thread_local auto* pool = new std::vector<at::Storage>();  // never destroyed: outlives exit-time teardown
  size_t nbytes = options.dtype().itemsize();
  for (int64_t size : sizes) nbytes *= static_cast<size_t>(size);
  for (const at::Storage& storage : *pool) {
    if (storage.use_count() == 1 && storage.nbytes() == nbytes && storage.resizable()) {
      at::Tensor out = at::empty({0}, options);
      out.set_(storage, 0, sizes);
      return out;
    }
  }
  at::Tensor out = at::empty(sizes, options);
  // Keep it for later calls: drop free storages of other sizes (oldest first) while over the budget.
  size_t kept = nbytes;
  for (const at::Storage& storage : *pool) kept += storage.nbytes();
  for (auto it = pool->begin(); it != pool->end() && kept > kPoolBytes;) {
    if (it->use_count() == 1) {
      kept -= it->nbytes();
      it = pool->erase(it);
    } else {
      ++it;
    }
  }
  if (kept <= kPoolBytes) pool->push_back(out.storage());
  return out;
}

// All phases of a binary-input conv (see the header comment) in one call: sign-packs x into a zero-padded
// bit image (so no tap needs a bounds check), then runs every phase's output pixels.
//   x: (N, Ci, H, W) float32, NCHW or channels-last; w_ts[f]: phase f's rows (words, rows_padded);
//   phases: per phase [ph, pw, n_tap_h, n_tap_w, tap_h..., tap_w...]; coef2 (planes, co), offset2 (co),
//   base (Ho, Wo, co) float64; steps: [in_step_h, in_step_w, out_step_h, out_step_w].
// Returns out (N, Ho, Wo, co) float32.
at::Tensor binary_conv(const at::Tensor& x, at::TensorList w_ts, at::IntArrayRef phases, const at::Tensor& coef2,
                       const at::Tensor& offset2, const at::Tensor& base, at::IntArrayRef steps, int64_t path) {
  check_path(path);
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "binary_conv wants a 4-d float32 input");
  TORCH_CHECK(coef2.scalar_type() == at::kDouble && offset2.scalar_type() == at::kDouble &&
                  base.scalar_type() == at::kDouble && base.is_contiguous() && coef2.is_contiguous() &&
                  offset2.is_contiguous(),
              "coef/offset/base must be contiguous float64");
  TORCH_CHECK(base.dim() == 3 && steps.size() == 4, "base must be (Ho, Wo, Co) and steps 4 ints");
  ConvArgs a;
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  a.wc = (x.size(1) + 63) / 64;
  a.ho = base.size(0), a.wo = base.size(1), a.co = base.size(2);
  a.planes = coef2.numel() / a.co;
  TORCH_CHECK(offset2.numel() == a.co && coef2.numel() == a.planes * a.co, "coef/offset shape mismatch");
  a.in_step_h = steps[0], a.in_step_w = steps[1], a.out_step_h = steps[2], a.out_step_w = steps[3];
  TORCH_CHECK(a.in_step_h > 0 && a.in_step_w > 0 && a.out_step_h > 0 && a.out_step_w > 0, "bad steps");

  // Phase geometry, and the padding that keeps every tap of every output pixel inside the bit image.
  struct Taps {
    int64_t ph, pw;
    std::vector<int64_t> th, tw;
  };
  std::vector<Taps> taps;
  PackGeometry g;
  for (size_t pos = 0; pos < phases.size();) {
    TORCH_CHECK(pos + 4 <= phases.size(), "bad phase list");
    Taps t{phases[pos], phases[pos + 1], {}, {}};
    const int64_t nth = phases[pos + 2], ntw = phases[pos + 3];
    TORCH_CHECK(nth >= 0 && ntw >= 0 && pos + 4 + nth + ntw <= phases.size(), "bad phase list");
    t.th.assign(phases.begin() + pos + 4, phases.begin() + pos + 4 + nth);
    t.tw.assign(phases.begin() + pos + 4 + nth, phases.begin() + pos + 4 + nth + ntw);
    pos += 4 + nth + ntw;
    taps.push_back(std::move(t));
  }
  TORCH_CHECK(taps.size() == w_ts.size(), "one w_t per phase");
  auto count_q = [](int64_t phase, int64_t size, int64_t step) {
    return phase < size ? (size - phase + step - 1) / step : int64_t{0};
  };
  for (const Taps& t : taps) {
    const int64_t n_qh = count_q(t.ph, a.ho, a.out_step_h), n_qw = count_q(t.pw, a.wo, a.out_step_w);
    if (n_qh == 0 || n_qw == 0) continue;
    for (int64_t v : t.th) {
      g.pad_top = std::max(g.pad_top, -v);
      g.pad_bottom = std::max(g.pad_bottom, (n_qh - 1) * a.in_step_h + v - (h - 1));
    }
    for (int64_t v : t.tw) {
      g.pad_left = std::max(g.pad_left, -v);
      g.pad_right = std::max(g.pad_right, (n_qw - 1) * a.in_step_w + v - (w - 1));
    }
  }
  at::Tensor xx = x;
  if (!(xx.is_contiguous() || xx.is_contiguous(at::MemoryFormat::ChannelsLast))) xx = xx.contiguous();
  // The bit image lives in a per-thread buffer reused across calls: no allocation (or page faults) per call.
  // (It is given back when a call needs under a quarter of a large one, e.g. after one huge batch.)
  thread_local std::vector<uint64_t> bits;
  const auto needed = static_cast<size_t>(padded_words(xx, g));
  if (bits.capacity() > (size_t{1} << 20) && needed < bits.capacity() / 4) std::vector<uint64_t>().swap(bits);
  bits.assign(needed, 0);
  pack_sign_into(xx, path, g, bits.data());
  a.hp = h + g.pad_top + g.pad_bottom, a.wp = w + g.pad_left + g.pad_right;
  a.x = bits.data();
  a.coef2 = coef2.data_ptr<double>(), a.offset2 = offset2.data_ptr<double>(), a.base = base.data_ptr<double>();
  at::Tensor out = output_buffer({n, a.ho, a.wo, a.co}, x.options());
  a.out = out.data_ptr<float>();
  a.rows_padded = -1;

  std::vector<PhaseInfo> infos;
  std::vector<RowFn> fns;
  std::vector<int64_t> first_row;  // prefix sums of the (image, qh) rows of every phase
  int64_t total_rows = 0;
  int64_t max_words = 0;
  const int64_t rows = a.planes * a.co;
  const bool few_rows = rows <= kMaxLaneRows;
  for (size_t k = 0; k < taps.size(); ++k) {
    const Taps& t = taps[k];
    const at::Tensor& w_t = w_ts[k];
    PhaseInfo f;
    f.ph = t.ph, f.pw = t.pw;
    f.n_qh = count_q(t.ph, a.ho, a.out_step_h), f.n_qw = count_q(t.pw, a.wo, a.out_step_w);
    for (int64_t th : t.th) {
      for (int64_t tw : t.tw) f.offs.push_back(((th + g.pad_top) * a.wp + tw + g.pad_left) * a.wc);
    }
    f.words = static_cast<int64_t>(f.offs.size()) * a.wc;
    TORCH_CHECK(w_t.dim() == 2 && w_t.scalar_type() == at::kLong && w_t.is_contiguous() && w_t.size(0) == f.words,
                "bad w_t for phase ", k);
    TORCH_CHECK(a.rows_padded < 0 || a.rows_padded == w_t.size(1), "w_t of all phases need the same rows");
    a.rows_padded = w_t.size(1);
    TORCH_CHECK(a.rows_padded % 8 == 0 && a.rows_padded >= rows, "w_t rows must cover planes * co, padded to 8");
    f.w_t = reinterpret_cast<const uint64_t*>(w_t.data_ptr<int64_t>());
    RowFn fn = nullptr;
    if (path == kAvx512) {
      if (few_rows) {
        fn = a.wc == 1 && a.in_step_w == 1 ? pick_avx512_lanes(rows) : nullptr;
        if (fn == nullptr) fn = lanes_avx512;
      } else {
        fn = pick_avx512_regs(a.planes, a.co);
        if (fn == nullptr) fn = generic_avx512;
      }
    } else if (path == kAvx2) {
      fn = few_rows ? pick_pixels(rows, true) : pick_avx2_regs(a.planes, a.co);
      if (fn == nullptr) fn = few_rows ? lanes_avx2 : generic_avx2;
    } else {
      fn = few_rows ? pick_pixels(rows, false) : nullptr;
      if (fn == nullptr) fn = few_rows ? lanes_scalar : generic_scalar;
    }
    max_words = std::max(max_words, f.words);
    first_row.push_back(total_rows);
    total_rows += n * f.n_qh;
    infos.push_back(std::move(f));
    fns.push_back(fn);
  }
  first_row.push_back(total_rows);
  const int64_t patch_words = max_words * (few_rows ? kLanes : 1);
  const int64_t count_words = a.rows_padded > 0 ? a.rows_padded : 8;
  at::parallel_for(0, total_rows, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.patch.assign(patch_words > 0 ? patch_words : 1, 0);
    s.counts.assign(count_words, 0);
    size_t k = 0;
    for (int64_t idx = begin; idx < end; ++idx) {
      while (idx >= first_row[k + 1]) ++k;
      const PhaseInfo& f = infos[k];
      const int64_t local = idx - first_row[k];
      fns[k](a, f, local / f.n_qh, local % f.n_qh, s);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lowbit_bitserial, m) {
  m.def("supported_paths() -> int", &supported_paths_mask);
  m.def("pack_sign(Tensor x, int path) -> Tensor", &pack_sign);
  m.def("binary_conv(Tensor x, Tensor[] w_ts, int[] phases, Tensor coef2, Tensor offset2, Tensor base, "
        "int[] steps, int path) -> Tensor",
        &binary_conv);
}
