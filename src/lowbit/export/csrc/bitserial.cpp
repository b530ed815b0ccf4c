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
// Dispatch: the hot loops are compiled three times with function-level target attributes (AVX-512
// VPOPCNTDQ, AVX2, portable scalar) in this one translation unit, built without any -march flag; the
// caller passes the path id and supported_paths() reads cpuid. Sign packing has an AVX-512 version; the
// AVX2 and scalar paths share the portable one.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <immintrin.h>

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

// ----- sign packing into bits (N, H*W, wc) uint64: bit c of pixel p set iff x[c, p] >= 0 -----
// NCHW input: a channel's plane is contiguous, so bits are gathered across planes; channels-last (NHWC)
// input: a pixel's channels are contiguous, so each 64-bit word is built from consecutive floats.

void pack_nchw_scalar(const float* src, uint64_t* dst, int64_t c, int64_t hw, int64_t wc, int64_t p0, int64_t p1) {
  for (int64_t ch = 0; ch < c; ++ch) {
    const float* plane = src + ch * hw;
    const int shift = static_cast<int>(ch % 64);
    uint64_t* word = dst + ch / 64;
    for (int64_t p = p0; p < p1; ++p) word[p * wc] |= static_cast<uint64_t>(plane[p] >= 0.0f) << shift;
  }
}

// 16 pixels at a time: one compare gives their sign bits for channel k, which masked ORs set as bit k of
// the 16 pixels' words (two 8-lane registers), so no bit transposition loop is needed.
__attribute__((target("avx512f"))) void pack_nchw_avx512(const float* src, uint64_t* dst, int64_t c, int64_t hw,
                                                         int64_t wc, int64_t p0, int64_t p1) {
  const __m512 zero = _mm512_setzero_ps();
  alignas(64) uint64_t lanes[16];
  for (int64_t p = p0; p < p1; p += 16) {
    const int64_t count = p1 - p < 16 ? p1 - p : 16;
    const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1u);
    for (int64_t cw = 0; cw < wc; ++cw) {
      __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
      const int64_t channels = c - cw * 64 < 64 ? c - cw * 64 : 64;
      for (int64_t k = 0; k < channels; ++k) {
        const __m512 v = _mm512_maskz_loadu_ps(valid, src + (cw * 64 + k) * hw + p);
        const __mmask16 positive = _mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_GE_OQ);
        const __m512i bit = _mm512_set1_epi64(static_cast<long long>(uint64_t{1} << k));
        acc0 = _mm512_mask_or_epi64(acc0, static_cast<__mmask8>(positive & 0xff), acc0, bit);
        acc1 = _mm512_mask_or_epi64(acc1, static_cast<__mmask8>(positive >> 8), acc1, bit);
      }
      _mm512_store_si512(lanes, acc0);
      _mm512_store_si512(lanes + 8, acc1);
      for (int64_t j = 0; j < count; ++j) dst[(p + j) * wc + cw] = lanes[j];
    }
  }
}

void pack_nhwc_scalar(const float* src, uint64_t* dst, int64_t c, int64_t /*hw*/, int64_t wc, int64_t p0,
                      int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* pixel = src + p * c;
    for (int64_t cw = 0; cw < wc; ++cw) {
      const int64_t channels = c - cw * 64 < 64 ? c - cw * 64 : 64;
      uint64_t word = 0;
      for (int64_t k = 0; k < channels; ++k) word |= static_cast<uint64_t>(pixel[cw * 64 + k] >= 0.0f) << k;
      dst[p * wc + cw] = word;
    }
  }
}

// One compare yields the sign bits of 16 consecutive channels; four of them make a 64-bit word.
__attribute__((target("avx512f"))) void pack_nhwc_avx512(const float* src, uint64_t* dst, int64_t c,
                                                         int64_t /*hw*/, int64_t wc, int64_t p0, int64_t p1) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    const float* pixel = src + p * c;
    for (int64_t cw = 0; cw < wc; ++cw) {
      uint64_t word = 0;
      for (int64_t j = 0; j < 4; ++j) {
        const int64_t first = cw * 64 + j * 16;
        if (first >= c) break;
        const int64_t count = c - first < 16 ? c - first : 16;
        const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(valid, pixel + first);
        word |= static_cast<uint64_t>(_mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_GE_OQ)) << (16 * j);
      }
      dst[p * wc + cw] = word;
    }
  }
}

// Sign-binarise x (N, C, H, W) float32, contiguous or channels-last, into bits (N, H, W, ceil(C/64)) int64.
at::Tensor pack_sign(const at::Tensor& x, int64_t path) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "pack_sign wants a 4-d float32 tensor");
  const bool nchw = x.is_contiguous();
  TORCH_CHECK(nchw || x.is_contiguous(at::MemoryFormat::ChannelsLast), "pack_sign wants NCHW or channels-last");
  check_path(path);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), wc = (c + 63) / 64;
  at::Tensor bits = at::zeros({n, x.size(2), x.size(3), wc}, x.options().dtype(at::kLong));
  const float* src = x.data_ptr<float>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>());
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (hw + kChunk - 1) / kChunk;
  const bool wide = path == kAvx512;
  const auto pack = nchw ? (wide ? pack_nchw_avx512 : pack_nchw_scalar) : (wide ? pack_nhwc_avx512 : pack_nhwc_scalar);
  at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx / chunks, p0 = (idx % chunks) * kChunk, p1 = p0 + kChunk < hw ? p0 + kChunk : hw;
      pack(src + i * c * hw, dst + i * hw * wc, c, hw, wc, p0, p1);
    }
  });
  return bits;
}

// ----- one phase of a binary-input conv -----

struct PhaseArgs {
  const uint64_t* x_bits;  // (N, H, W, wc)
  const uint64_t* w_t;     // (words, rows_padded), rows = plane * co + channel
  const double* coef;      // (planes, co)
  const double* offset;    // (co)
  const double* base;      // (Ho, Wo, co): bias - layer(all-ones input)
  const int64_t* tap_h;
  const int64_t* tap_w;
  float* out;              // (N, Ho, Wo, co): channels-last, one contiguous store per pixel
  int64_t h, w, wc, n_tap_h, n_tap_w, words, co, ho, wo, rows_padded, planes;
  int64_t in_step_h, in_step_w, out_step_h, out_step_w, ph, pw, n_qh, n_qw;
};

// The per-output-row loop, written once and inlined into each ISA's wrapper below, so the compiler
// vectorizes the combine step for that ISA (a callee may inline into a caller with a wider target).
template <RowsFn Rows, WordsFn Words>
__attribute__((always_inline)) inline void phase_rows(const PhaseArgs& a, int64_t begin, int64_t end) {
  std::vector<uint64_t> patch(a.words);
  std::vector<int64_t> counts(a.rows_padded);
  std::vector<double> acc(a.co);
  const int64_t co = a.co;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t i = idx / a.n_qh, qh = idx % a.n_qh, oh = qh * a.out_step_h + a.ph;
    for (int64_t qw = 0; qw < a.n_qw; ++qw) {
      const int64_t ow = qw * a.out_step_w + a.pw;
      uint64_t* p = patch.data();
      for (int64_t t = 0; t < a.n_tap_h; ++t) {
        const int64_t ih = qh * a.in_step_h + a.tap_h[t];
        for (int64_t u = 0; u < a.n_tap_w; ++u, p += a.wc) {
          const int64_t iw = qw * a.in_step_w + a.tap_w[u];
          if (ih >= 0 && ih < a.h && iw >= 0 && iw < a.w) {
            const uint64_t* src = a.x_bits + ((i * a.h + ih) * a.w + iw) * a.wc;
            for (int64_t k = 0; k < a.wc; ++k) p[k] = src[k];
          } else {
            for (int64_t k = 0; k < a.wc; ++k) p[k] = 0;
          }
        }
      }
      const double positives = static_cast<double>(Words(patch.data(), a.words));
      Rows(a.w_t, patch.data(), a.words, a.rows_padded, counts.data());
      for (int64_t c = 0; c < co; ++c) acc[c] = a.offset[c] * positives;
      for (int64_t b = 0; b < a.planes; ++b) {
        const double* cf = a.coef + b * co;
        const int64_t* cnt = counts.data() + b * co;
        for (int64_t c = 0; c < co; ++c) acc[c] += cf[c] * static_cast<double>(cnt[c]);
      }
      const double* base = a.base + (oh * a.wo + ow) * co;
      float* out = a.out + ((i * a.ho + oh) * a.wo + ow) * co;
      for (int64_t c = 0; c < co; ++c) out[c] = static_cast<float>(2.0 * acc[c] + base[c]);
    }
  }
}

constexpr int64_t kLanes = 8;
constexpr int64_t kMaxLaneRows = 16;

// counts[r][l] = sum_wd popcount(w_t[wd * rows_padded + r] & patch[wd][l]) and positives[l] =
// sum_wd popcount(patch[wd][l]) for 8 pixel lanes l (patch stored word-major, 8 lanes per word).
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

// Layers with few rows (e.g. the RGB/grey output layer of a generator) vectorize over 8 neighbouring
// output pixels instead of over rows (see lane_counts_*).

template <LanesFn Counts>
__attribute__((always_inline)) inline void phase_rows_lanes(const PhaseArgs& a, int64_t begin, int64_t end) {
  std::vector<uint64_t> patch(a.words * kLanes);
  const int64_t co = a.co, rows = a.planes * co;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t i = idx / a.n_qh, qh = idx % a.n_qh, oh = qh * a.out_step_h + a.ph;
    for (int64_t q0 = 0; q0 < a.n_qw; q0 += kLanes) {
      const int64_t lanes = a.n_qw - q0 < kLanes ? a.n_qw - q0 : kLanes;
      for (int64_t t = 0, wd = 0; t < a.n_tap_h; ++t) {
        const int64_t ih = qh * a.in_step_h + a.tap_h[t];
        const bool row_inside = ih >= 0 && ih < a.h;
        const uint64_t* row = a.x_bits + (i * a.h + (row_inside ? ih : 0)) * a.w * a.wc;
        for (int64_t u = 0; u < a.n_tap_w; ++u, wd += a.wc) {
          const int64_t iw0 = q0 * a.in_step_w + a.tap_w[u];
          if (a.wc == 1 && a.in_step_w == 1) {  // the 8 lanes read 8 consecutive words: one masked load
            uint64_t* dst = patch.data() + wd * kLanes;
            for (int64_t l = 0; l < kLanes; ++l) {
              const int64_t iw = iw0 + l;
              dst[l] = row_inside && l < lanes && iw >= 0 && iw < a.w ? row[iw] : 0;
            }
            continue;
          }
          for (int64_t k = 0; k < a.wc; ++k) {
            uint64_t* dst = patch.data() + (wd + k) * kLanes;
            for (int64_t l = 0; l < kLanes; ++l) {
              const int64_t iw = iw0 + l * a.in_step_w;
              const bool inside = row_inside && l < lanes && iw >= 0 && iw < a.w;
              dst[l] = inside ? row[(inside ? iw : 0) * a.wc + k] : 0;
            }
          }
        }
      }
      int64_t positives[kLanes];
      int64_t counts[kMaxLaneRows][kLanes];
      Counts(patch.data(), a.w_t, a.words, a.rows_padded, rows, counts, positives);
      const int64_t ow0 = q0 * a.out_step_w + a.pw;
      for (int64_t c = 0; c < co; ++c) {
        double acc[kLanes];
        for (int64_t l = 0; l < kLanes; ++l) acc[l] = a.offset[c] * static_cast<double>(positives[l]);
        for (int64_t b = 0; b < a.planes; ++b) {
          const double cf = a.coef[b * co + c];
          for (int64_t l = 0; l < kLanes; ++l) acc[l] += cf * static_cast<double>(counts[b * co + c][l]);
        }
        const double* base = a.base + (oh * a.wo + ow0) * co + c;
        float* out = a.out + ((i * a.ho + oh) * a.wo + ow0) * co + c;
        for (int64_t l = 0; l < lanes; ++l) {
          out[l * a.out_step_w * co] = static_cast<float>(2.0 * acc[l] + base[l * a.out_step_w * co]);
        }
      }
    }
  }
}

void phase_scalar(const PhaseArgs& a, int64_t begin, int64_t end) {
  phase_rows<rows_scalar, words_scalar>(a, begin, end);
}

__attribute__((target("avx2,popcnt"))) void phase_avx2(const PhaseArgs& a, int64_t begin, int64_t end) {
  phase_rows<rows_avx2, words_popcnt>(a, begin, end);
}

__attribute__((target("avx512f,avx512dq,avx512vpopcntdq,avx2,popcnt"))) void phase_avx512(const PhaseArgs& a,
                                                                                          int64_t begin,
                                                                                          int64_t end) {
  phase_rows<rows_avx512, words_popcnt>(a, begin, end);
}

void lanes_scalar(const PhaseArgs& a, int64_t begin, int64_t end) {
  phase_rows_lanes<lane_counts_portable>(a, begin, end);
}

__attribute__((target("avx2,popcnt"))) void lanes_avx2(const PhaseArgs& a, int64_t begin, int64_t end) {
  phase_rows_lanes<lane_counts_portable>(a, begin, end);
}

__attribute__((target("avx512f,avx512dq,avx512vpopcntdq,avx2,popcnt"))) void lanes_avx512(const PhaseArgs& a,
                                                                                          int64_t begin,
                                                                                          int64_t end) {
  phase_rows_lanes<lane_counts_avx512>(a, begin, end);
}

// One phase of a binary-input conv (see the header comment); writes its pixels of `out` (N, Ho, Wo, Co).
void binary_conv_phase(const at::Tensor& x_bits, const at::Tensor& w_t, const at::Tensor& coef,
                       const at::Tensor& offset, const at::Tensor& base, const at::Tensor& tap_h,
                       const at::Tensor& tap_w, at::Tensor out, int64_t in_step_h, int64_t in_step_w,
                       int64_t out_step_h, int64_t out_step_w, int64_t ph, int64_t pw, int64_t n_qh, int64_t n_qw,
                       int64_t path) {
  TORCH_CHECK(x_bits.dim() == 4 && x_bits.scalar_type() == at::kLong && x_bits.is_contiguous(), "bad x_bits");
  TORCH_CHECK(w_t.dim() == 2 && w_t.scalar_type() == at::kLong && w_t.is_contiguous(), "bad w_t");
  TORCH_CHECK(out.dim() == 4 && out.scalar_type() == at::kFloat && out.is_contiguous(), "bad out (N, Ho, Wo, Co)");
  TORCH_CHECK(coef.scalar_type() == at::kDouble && offset.scalar_type() == at::kDouble &&
              base.scalar_type() == at::kDouble && base.is_contiguous() && coef.is_contiguous(),
              "coef/offset/base must be contiguous float64");
  TORCH_CHECK(tap_h.scalar_type() == at::kLong && tap_w.scalar_type() == at::kLong, "taps must be int64");
  check_path(path);
  PhaseArgs a;
  a.h = x_bits.size(1), a.w = x_bits.size(2), a.wc = x_bits.size(3);
  a.n_tap_h = tap_h.numel(), a.n_tap_w = tap_w.numel(), a.words = a.n_tap_h * a.n_tap_w * a.wc;
  a.ho = out.size(1), a.wo = out.size(2), a.co = out.size(3);
  a.rows_padded = w_t.size(1), a.planes = coef.numel() / a.co;
  TORCH_CHECK(w_t.size(0) == a.words && a.rows_padded % 8 == 0 && a.rows_padded >= a.planes * a.co,
              "w_t shape mismatch");
  TORCH_CHECK(base.numel() == a.co * a.ho * a.wo && offset.numel() == a.co, "base/offset shape mismatch");
  a.x_bits = reinterpret_cast<const uint64_t*>(x_bits.data_ptr<int64_t>());
  a.w_t = reinterpret_cast<const uint64_t*>(w_t.data_ptr<int64_t>());
  a.coef = coef.data_ptr<double>(), a.offset = offset.data_ptr<double>(), a.base = base.data_ptr<double>();
  a.tap_h = tap_h.data_ptr<int64_t>(), a.tap_w = tap_w.data_ptr<int64_t>(), a.out = out.data_ptr<float>();
  a.in_step_h = in_step_h, a.in_step_w = in_step_w, a.out_step_h = out_step_h, a.out_step_w = out_step_w;
  a.ph = ph, a.pw = pw, a.n_qh = n_qh, a.n_qw = n_qw;
  const bool few_rows = a.planes * a.co <= kMaxLaneRows;
  const auto phase = path == kAvx512 ? (few_rows ? lanes_avx512 : phase_avx512)
                     : path == kAvx2 ? (few_rows ? lanes_avx2 : phase_avx2)
                                     : (few_rows ? lanes_scalar : phase_scalar);
  at::parallel_for(0, x_bits.size(0) * n_qh, 1, [&](int64_t begin, int64_t end) { phase(a, begin, end); });
}

}  // namespace

TORCH_LIBRARY(lowbit_bitserial, m) {
  m.def("supported_paths() -> int", &supported_paths_mask);
  m.def("pack_sign(Tensor x, int path) -> Tensor", &pack_sign);
  m.def("binary_conv_phase(Tensor x_bits, Tensor w_t, Tensor coef, Tensor offset, Tensor base, Tensor tap_h, "
        "Tensor tap_w, Tensor(a!) out, int in_step_h, int in_step_w, int out_step_h, int out_step_w, int ph, int pw, "
        "int n_qh, int n_qw, int path) -> ()",
        &binary_conv_phase);
}
