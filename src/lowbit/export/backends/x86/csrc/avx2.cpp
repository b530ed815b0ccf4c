// The AVX2 path: pshufb nibble popcounts, 4 rows per register, compare/movemask sign packing.
#include "kernels.h"

#if defined(__x86_64__)  // an x86 instruction set: nothing to build on other CPUs

namespace lowbit {
namespace {

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

// r + sum_b coef2[b * co] * count[b] for 4 channels (the counts' low 32 bits: AVX2 has no int64 -> double).
template <int P>
__attribute__((target("avx2"), always_inline)) inline __m256d add_counts(__m256d r, const double* coef2, int64_t co,
                                                                         const __m256i* count, __m256i low_dwords) {
  for (int b = 0; b < P; ++b) {
    const __m256d cd = _mm256_cvtepi32_pd(_mm256_castsi256_si128(_mm256_permutevar8x32_epi32(count[b], low_dwords)));
    r = _mm256_add_pd(r, _mm256_mul_pd(_mm256_loadu_pd(coef2 + b * co), cd));
  }
  return r;
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
      for (int64_t plane = a.act_planes - 1; plane >= 0; --plane) {  // Horner over the activation planes
      for (int j = 0; j < P * CV; ++j) {
        acc[j] = _mm256_slli_epi64(_mm256_add_epi64(acc[j], _mm256_sad_epu8(bytes[j], zero)), 1);
        bytes[j] = zero;
      }
      const uint64_t* wrow = f.w_t + c0;
      int pending = 0;
      for (int64_t t = 0; t < taps; ++t) {
        const uint64_t* src = pixel.px + offs[t] + plane * wc;
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
      }
      for (int v = 0; v < CV; ++v) {
        const int64_t c = c0 + 4 * v;
        __m256d r = _mm256_add_pd(_mm256_loadu_pd(pixel.base + c), _mm256_mul_pd(_mm256_loadu_pd(a.offset2 + c), pos));
        __m256i count[P];
        for (int b = 0; b < P; ++b) count[b] = _mm256_add_epi64(acc[b * CV + v], _mm256_sad_epu8(bytes[b * CV + v], zero));
        if (P == 4 && a.fold_planes) {  // sum_b 2^b count[b] first (kernels.h, the output value)
          for (int b = P - 2; b >= 0; --b) count[b] = _mm256_add_epi64(_mm256_slli_epi64(count[b + 1], 1), count[b]);
          r = add_counts<1>(r, a.coef2 + c, co, count, low_dwords);
        } else {
          r = add_counts<P>(r, a.coef2 + c, co, count, low_dwords);
        }
        _mm_storeu_ps(pixel.out + c, _mm256_cvtpd_ps(r));
      }
    }
  }
}

template <int R>
__attribute__((target("avx2,popcnt"))) void pixels_avx2(const ConvArgs& a, const PhaseInfo& f, int64_t i,
                                                        int64_t qh, Scratch& /*s*/) {
  row_pixels<R>(a, f, i, qh);
}

__attribute__((target("avx2,popcnt"))) void generic_avx2(const ConvArgs& a, const PhaseInfo& f, int64_t i,
                                                         int64_t qh, Scratch& s) {
  row_generic<rows_avx2, words_popcnt>(a, f, i, qh, s);
}

__attribute__((target("avx2,popcnt"))) void lanes_avx2(const ConvArgs& a, const PhaseInfo& f, int64_t i,
                                                       int64_t qh, Scratch& s) {
  row_lanes<lane_counts_portable>(a, f, i, qh, s);
}

// The AVX2 register kernel: 4-channel vectors, P * CV <= 4 accumulators (plus as many byte sums: 16 ymm).
RowFn pick_avx2_regs(int64_t planes, int64_t co) {
  if (co % 4 != 0) return nullptr;
  const int64_t vectors = co / 4;
  LOWBIT_PICK_REGS(row_avx2_regs, 4)
  return nullptr;
}

// The codes of 8 values y as 32-bit lanes: the number of thresholds passed (t: the thresholds, one broadcast
// each when stride is 0, else vectors `stride` floats apart).
__attribute__((target("avx2"))) inline __m256i codes8(__m256 y, const float* t, int64_t stride, const LevelArgs& l) {
  const __m256i one = _mm256_set1_epi32(1);
  __m256i code = _mm256_setzero_si256();
  for (int64_t m = 0; m < l.count; ++m) {
    const __m256 tv = stride == 0 ? _mm256_set1_ps(t[m]) : _mm256_loadu_ps(t + m * stride);
    const __m256 pass = l.ties_up ? _mm256_cmp_ps(y, tv, _CMP_GE_OQ) : _mm256_cmp_ps(y, tv, _CMP_GT_OQ);
    code = _mm256_add_epi32(code, _mm256_and_si256(_mm256_castps_si256(pass), one));
  }
  return code;
}

// NCHW level coding, 8 pixels of one channel per compare: as pack_nchw_avx2, bit k % 32 of the low / high
// half-word of each pixel, one pair of halves per plane, interleaved into 64-bit words at the end.
__attribute__((target("avx2"))) void pack_levels_nchw_avx2(const float* src, uint64_t* dst, const int64_t* at,
                                                           int64_t c, int64_t hw, int64_t wc, int64_t p0,
                                                           int64_t total, const LevelArgs& l) {
  alignas(32) uint64_t lanes[8];
  alignas(32) float tail[8];
  for (int64_t j0 = 0; j0 < total; j0 += 8) {
    const int64_t count = total - j0 < 8 ? total - j0 : 8;
    for (int64_t cw = 0; cw < wc; ++cw) {
      const int64_t channels = c - cw * 64 < 64 ? c - cw * 64 : 64;
      __m256i half[kMaxCodePlanes][2];
      for (int64_t b = 0; b < l.planes; ++b) half[b][0] = half[b][1] = _mm256_setzero_si256();
      for (int64_t k = 0; k < channels; ++k) {
        const int64_t ch = cw * 64 + k;
        const float* row = src + ch * hw + p0 + j0;
        if (count < 8) {
          for (int64_t j = 0; j < 8; ++j) tail[j] = j < count ? row[j] : 0.0f;
        }
        const __m256 v = count == 8 ? _mm256_loadu_ps(row) : _mm256_load_ps(tail);
        const __m256i code = codes8(_mm256_mul_ps(v, _mm256_set1_ps(l.signs[ch])), l.thresholds + ch * l.count, 0, l);
        const __m256i bit = _mm256_set1_epi32(static_cast<int>(1u << (k % 32)));
        for (int64_t b = 0; b < l.planes; ++b) {
          const __m256i plane = _mm256_set1_epi32(1 << b);
          const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(code, plane), plane);
          half[b][k / 32] = _mm256_or_si256(half[b][k / 32], _mm256_and_si256(set, bit));
        }
      }
      for (int64_t b = 0; b < l.planes; ++b) {
        const __m256i lo = _mm256_unpacklo_epi32(half[b][0], half[b][1]);
        const __m256i hi = _mm256_unpackhi_epi32(half[b][0], half[b][1]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 4), _mm256_permute2x128_si256(lo, hi, 0x31));
        for (int64_t j = 0; j < count; ++j) dst[at[j0 + j] + b * wc + cw] = lanes[j];
      }
    }
  }
}

// Channels-last level coding: 8 consecutive channels per compare against the transposed thresholds; bit b
// of the 8 codes comes out of one movemask (the code's bit b moved to each lane's sign bit). Channels past
// the last multiple of 8 take the portable comparisons (the same bits).
__attribute__((target("avx2"))) void level_words_avx2(const float* pixel, int64_t first, int64_t channels, int64_t c,
                                                      const LevelArgs& l, uint64_t* words) {
  int64_t k = 0;
  for (; k + 8 <= channels; k += 8) {
    const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(pixel + first + k), _mm256_loadu_ps(l.signs + first + k));
    const __m256i code = codes8(y, l.thresholds_t + first + k, c, l);
    for (int64_t b = 0; b < l.planes; ++b) {
      const __m256i top = _mm256_sll_epi32(code, _mm_cvtsi64_si128(31 - b));
      words[b] |= static_cast<uint64_t>(static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(top)))) << k;
    }
  }
  for (; k < channels; ++k) {
    const int64_t ch = first + k;
    const auto value = static_cast<uint64_t>(level_code(l.signs[ch] * pixel[ch], l.thresholds + ch * l.count, l.count,
                                                        l.ties_up));
    for (int64_t b = 0; b < l.planes; ++b) words[b] |= ((value >> b) & 1) << k;
  }
}

__attribute__((target("avx2"))) void pack_levels_nhwc_avx2(const float* src, uint64_t* dst, const int64_t* at,
                                                           int64_t c, int64_t /*hw*/, int64_t wc, int64_t p0,
                                                           int64_t count, const LevelArgs& l) {
  pack_levels_nhwc<level_words_avx2>(src, dst, at, c, wc, p0, count, l);
}

}  // namespace

LevelPackFn level_pack_fn_avx2(bool nchw) { return nchw ? pack_levels_nchw_avx2 : pack_levels_nhwc_avx2; }

PackFn pack_fn_avx2(bool nchw) { return nchw ? pack_nchw_avx2 : pack_nhwc_avx2; }

RowFn pick_row_avx2(int64_t planes, int64_t co, int64_t /*px_words*/, int64_t /*in_step_w*/) {
  const int64_t rows = planes * co;
  switch (rows) {
    case 1: return pixels_avx2<1>;
    case 2: return pixels_avx2<2>;
    case 3: return pixels_avx2<3>;
    case 4: return pixels_avx2<4>;
    default: break;
  }
  if (rows <= kMaxLaneRows) return lanes_avx2;
  RowFn fn = pick_avx2_regs(planes, co);
  return fn != nullptr ? fn : generic_avx2;
}

}  // namespace lowbit

#endif  // __x86_64__
