// The AVX-512 path (F, DQ, VPOPCNTDQ): vector popcounts, 8 rows per register, masked-OR sign packing.
#include "kernels.h"

#if defined(__x86_64__)  // an x86 instruction set: nothing to build on other CPUs

namespace lowbit {
namespace {


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

// The sink's bits (kernels.h BitSink) of 8 channels from c whose float outputs are `value`: the product and the
// comparison of pack_threshold_nhwc_avx512 on the stored floats.
__attribute__((target("avx2"), always_inline)) inline uint64_t sink_mask8(const BitSink& s, int64_t c, __m256 value) {
  const __m256 y = _mm256_mul_ps(value, _mm256_loadu_ps(s.signs + c)), t = _mm256_loadu_ps(s.thresholds + c);
  const __m256 pass = s.ties_up ? _mm256_cmp_ps(y, t, _CMP_GE_OQ) : _mm256_cmp_ps(y, t, _CMP_GT_OQ);
  return static_cast<unsigned>(_mm256_movemask_ps(pass));
}

// Blocks of at least this many 8-channel vectors write sinks (Co a multiple of 32: every generator layer the
// benchmarks fuse); narrower blocks do not carry the sink code (16 KB over every instantiation).
constexpr int kSinkVectors = 4;

// The sink bits of a one-plane combine for the channel block at c0 (kernels.h BitSink::cuts): n in fixed point against the
// fixed-point line cuts[class] + slopes * positives, no float arithmetic.
template <int CV>
__attribute__((target("avx512f,avx512dq"), always_inline)) inline void sink_cuts(const ConvArgs& a, const Pixel& pixel,
                                                                                  int64_t c0, const __m512i* acc) {
  const BitSink& s = *a.sink;
  const int64_t* cuts = s.cuts + (pixel.base - a.base.values) + c0;
  const __m512i positives = _mm512_set1_epi64(pixel.positives);
  uint64_t set = 0;
  for (int v = 0; v < CV; ++v) {
    const __m512i slope = _mm512_mullo_epi64(_mm512_loadu_si512(s.slopes + c0 + 8 * v), positives);
    const __m512i line = _mm512_add_epi64(_mm512_loadu_si512(cuts + 8 * v), slope);
    set |= static_cast<uint64_t>(_mm512_cmpge_epi64_mask(_mm512_slli_epi64(acc[v], BitSink::kCutBits), line)) << (8 * v);
  }
  const uint64_t block = 8 * CV == 64 ? ~uint64_t{0} : (uint64_t{1} << (8 * CV)) - 1;
  set_sink_bits(pixel.bits, static_cast<uint64_t>(c0), (set ^ s.flips[c0 / 64] >> (c0 % 64)) & block);
}

// The combine of the register kernels for the channel block at c0: 8 doubles at a time, in row_generic's order.
// With a sink the block's 8 * CV bits (a block never straddles a word) go into the pixel's word: a one-plane combine's
// by sink_cuts, the others' from the float values as the reader's packer would compare them.
template <int P, int CV>
__attribute__((target("avx512f,avx512dq"), always_inline)) inline void combine_block(const ConvArgs& a,
                                                                                      const Pixel& pixel, int64_t c0,
                                                                                      const __m512i* acc) {
  if (P == 1 && CV >= kSinkVectors && a.sink != nullptr) return sink_cuts<CV>(a, pixel, c0, acc);
  const __m512d pos = _mm512_set1_pd(static_cast<double>(pixel.positives));
  uint64_t set = 0;
  for (int v = 0; v < CV; ++v) {
    const int64_t c = c0 + 8 * v;
    __m512d r = _mm512_add_pd(_mm512_loadu_pd(pixel.base + c), _mm512_mul_pd(_mm512_loadu_pd(a.offset2 + c), pos));
    for (int b = 0; b < P; ++b) {
      r = _mm512_add_pd(r, _mm512_mul_pd(_mm512_loadu_pd(a.coef2 + b * a.co + c), _mm512_cvtepi64_pd(acc[b * CV + v])));
    }
    if (P == 1 || CV < kSinkVectors || a.sink == nullptr) {
      _mm256_storeu_ps(pixel.out + c, _mm512_cvtpd_ps(r));
    } else {
      set |= sink_mask8(*a.sink, c, _mm512_cvtpd_ps(r)) << (8 * v);
    }
  }
  if (P > 1 && CV >= kSinkVectors && a.sink != nullptr) set_sink_bits(pixel.bits, static_cast<uint64_t>(c0), set);
}

// AVX-512, co a multiple of 8: the counts of P planes x CV channel vectors (8 channels each) stay in
// registers, the patch words are broadcast straight from the padded input (no patch buffer), and the
// combine runs on 8 doubles at a time in the same order as row_generic. Channels go in blocks of 8*CV.
// One word per pixel (one activation plane, <= 64 channels: the common generator layer) takes a loop
// without the word and plane loops.
template <int P, int CV>
__attribute__((target("avx512f,avx512dq,avx512vpopcntdq,avx2,popcnt"))) void row_avx512_regs(
    const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& /*s*/) {
  const int64_t co = a.co, wc = a.wc, rp = a.rows_padded, taps = static_cast<int64_t>(f.offs.size());
  const int64_t oh = qh * a.out_step_h + f.ph;
  const int64_t* offs = f.offs.data();
  const int64_t blocks = co / (8 * CV);
  if (a.px_words == 1) {
    for (int64_t qw = 0; qw < f.n_qw; ++qw) {
      Pixel pixel = pixel_at(a, f, i, qh, qw, oh, false);
      for (int64_t cb = 0; cb < blocks; ++cb) {
        const int64_t c0 = cb * 8 * CV;
        __m512i acc[P * CV];
        for (int j = 0; j < P * CV; ++j) acc[j] = _mm512_setzero_si512();
        const uint64_t* wrow = f.w_t + c0;
        int64_t positives = 0;  // counted beside the vector work (scalar ports), again per block
        for (int64_t t = 0; t < taps; ++t, wrow += rp) {
          const uint64_t word = pixel.px[offs[t]];
          positives += __builtin_popcountll(word);
          const __m512i xv = _mm512_set1_epi64(static_cast<long long>(word));
          for (int b = 0; b < P; ++b) {
            for (int v = 0; v < CV; ++v) {
              const __m512i wv = _mm512_loadu_si512(wrow + b * co + 8 * v);
              acc[b * CV + v] = _mm512_add_epi64(acc[b * CV + v], _mm512_popcnt_epi64(_mm512_and_si512(wv, xv)));
            }
          }
        }
        pixel.positives = positives;
        combine_block<P, CV>(a, pixel, c0, acc);
      }
    }
    return;
  }
  for (int64_t qw = 0; qw < f.n_qw; ++qw) {
    const Pixel pixel = pixel_at(a, f, i, qh, qw, oh);
    for (int64_t cb = 0; cb < blocks; ++cb) {
      const int64_t c0 = cb * 8 * CV;
      __m512i acc[P * CV];
      for (int j = 0; j < P * CV; ++j) acc[j] = _mm512_setzero_si512();
      for (int64_t plane = a.act_planes - 1; plane >= 0; --plane) {  // Horner over the activation planes
        for (int j = 0; j < P * CV; ++j) acc[j] = _mm512_slli_epi64(acc[j], 1);
        const uint64_t* wrow = f.w_t + c0;
        for (int64_t t = 0; t < taps; ++t) {
          const uint64_t* src = pixel.px + offs[t] + plane * wc;
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
      }
      combine_block<P, CV>(a, pixel, c0, acc);
    }
  }
}

// AVX-512, at most 32 input channels (one word per pixel whose upper half is zero), co a multiple of 16 * CV,
// P power-of-two weight planes (ConvArgs::fold_planes): the rows as 32-bit words (PhaseInfo::w32), so one popcount
// counts 16 channels where the 64-bit rows count 8 (pruned and narrow layers); the planes' counts are folded into
// one integer, then widened to 64-bit lanes for combine_block (one plane).
template <int P, int CV>
__attribute__((target("avx512f,avx512dq,avx512vpopcntdq,avx2,popcnt"))) void row_avx512_half(
    const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& /*s*/) {
  const int64_t co = a.co, rp = a.rows_padded, taps = static_cast<int64_t>(f.offs.size());
  const int64_t oh = qh * a.out_step_h + f.ph;
  const int64_t* offs = f.offs.data();
  for (int64_t qw = 0; qw < f.n_qw; ++qw) {
    Pixel pixel = pixel_at(a, f, i, qh, qw, oh, false);
    for (int64_t c0 = 0; c0 < co; c0 += 16 * CV) {
      __m512i acc[P * CV];
      for (int j = 0; j < P * CV; ++j) acc[j] = _mm512_setzero_si512();
      const uint32_t* wrow = f.w32.data() + c0;
      int64_t positives = 0;
      for (int64_t t = 0; t < taps; ++t, wrow += rp) {
        const uint64_t word = pixel.px[offs[t]];
        positives += __builtin_popcountll(word);
        const __m512i xv = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(word)));
        for (int b = 0; b < P; ++b) {
          for (int v = 0; v < CV; ++v) {
            const __m512i wv = _mm512_loadu_si512(wrow + b * co + 16 * v);
            acc[b * CV + v] = _mm512_add_epi32(acc[b * CV + v], _mm512_popcnt_epi32(_mm512_and_si512(wv, xv)));
          }
        }
      }
      pixel.positives = positives;
      __m512i wide[2 * CV];  // the planes' counts folded (ConvArgs::fold_planes), widened to 64-bit lanes
      for (int v = 0; v < CV; ++v) {
        __m512i n = acc[(P - 1) * CV + v];
        for (int b = P - 2; b >= 0; --b) n = _mm512_add_epi32(_mm512_slli_epi32(n, 1), acc[b * CV + v]);
        wide[2 * v] = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(n));
        wide[2 * v + 1] = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(n, 1));
      }
      combine_block<1, 2 * CV>(a, pixel, c0, wide);
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

// Plane b of `lanes` consecutive pixels of two activation planes (words: pixel 0 plane 0, pixel 0 plane 1, pixel 1
// plane 0, ...): two (masked) loads and one permute instead of a gather; lanes past `lanes` are zero. Only in the
// lane kernels of up to 2 rows (a W2A2 generator's output layer: -5% of its batch-64 time), for size.
__attribute__((target("avx512f"), always_inline)) inline __m512i plane_of_pairs(const uint64_t* px, int64_t lanes,
                                                                                int64_t b) {
  const int64_t words = 2 * lanes;
  const __mmask8 low = static_cast<__mmask8>(words >= 8 ? 0xff : (1u << words) - 1u);
  const __mmask8 high = static_cast<__mmask8>(words <= 8 ? 0 : (1u << (words - 8)) - 1u);
  const __m512i index = _mm512_add_epi64(_mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), _mm512_set1_epi64(b));
  return _mm512_permutex2var_epi64(_mm512_maskz_loadu_epi64(low, px), index, _mm512_maskz_loadu_epi64(high, px + 8));
}

// AVX-512 lanes with one input word per pixel and activation plane (<= 64 channels) and unit input step: a
// tap's 8 lanes are 8 consecutive pixels of the padded input, one (masked) load with one activation plane,
// else one gather per plane (Horner over the planes, as row_generic); R = rows (planes * co).
template <int R>
__attribute__((target("avx512f,avx512dq,avx512vpopcntdq,avx2,popcnt"))) void row_avx512_lanes(
    const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& /*s*/) {
  const int64_t taps = static_cast<int64_t>(f.offs.size()), rp = a.rows_padded;
  const int64_t oh = qh * a.out_step_h + f.ph;
  const int64_t* offs = f.offs.data();
  // several activation planes: a lane's plane-b word is px_words further per lane (one gather per tap)
  const __m512i lane_words = _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(a.px_words));
  for (int64_t q0 = 0; q0 < f.n_qw; q0 += kLanes) {
    const int64_t lanes = f.n_qw - q0 < kLanes ? f.n_qw - q0 : kLanes;
    const __mmask8 valid = static_cast<__mmask8>((1u << lanes) - 1u);
    const uint64_t* px = patch_origin(a, i, qh, q0);
    __m512i pos = _mm512_setzero_si512();
    __m512i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
    for (int64_t b = a.act_planes - 1; b >= 0; --b) {  // Horner over the activation planes
      if (a.act_planes > 1) {
        pos = _mm512_slli_epi64(pos, 1);
        for (int r = 0; r < R; ++r) acc[r] = _mm512_slli_epi64(acc[r], 1);
      }
      for (int64_t t = 0; t < taps; ++t) {
        const __m512i xv = a.act_planes == 1   ? _mm512_maskz_loadu_epi64(valid, px + offs[t])
                           : R <= 2 && a.act_planes == 2 ? plane_of_pairs(px + offs[t], lanes, b)  // W2A2 output
                                               : _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), valid, lane_words,
                                                                             px + offs[t] + b, 8);
        pos = _mm512_add_epi64(pos, _mm512_popcnt_epi64(xv));
        for (int r = 0; r < R; ++r) {
          const __m512i wv = _mm512_set1_epi64(static_cast<long long>(f.w_t[t * rp + r]));
          acc[r] = _mm512_add_epi64(acc[r], _mm512_popcnt_epi64(_mm512_and_si512(xv, wv)));
        }
      }
    }
    // The combine of lanes_combine on 8 lanes at once (same double operations in the same order): base from
    // the phase's lane-major copy, outputs stored lane by lane (stride out_step_w * co; a scatter is slower).
    const int64_t co = a.co, stride = a.out_step_w * co, ow0 = q0 * a.out_step_w + f.pw;
    const double* base = f.base_lanes.data() + qh * co * f.n_qw + q0;
    const __m512d pos_d = _mm512_cvtepi64_pd(pos);
    __m512d counts[R];
    for (int r = 0; r < R; ++r) counts[r] = _mm512_cvtepi64_pd(acc[r]);
    alignas(32) float values[kLanes];
    for (int64_t c = 0; c < co; ++c) {
      __m512d r = _mm512_maskz_loadu_pd(valid, base + c * f.n_qw);
      r = _mm512_add_pd(r, _mm512_mul_pd(_mm512_set1_pd(a.offset2[c]), pos_d));
      for (int64_t b = 0; b < a.planes; ++b) {
        r = _mm512_add_pd(r, _mm512_mul_pd(_mm512_set1_pd(a.coef2[b * co + c]), counts[b * co + c]));
      }
      _mm256_store_ps(values, _mm512_cvtpd_ps(r));
      float* out = a.out + ((i * a.ho + oh) * a.wo + ow0) * co + c;
      for (int64_t l = 0; l < lanes; ++l) out[l * stride] = values[l];
    }
  }
}

__attribute__((target("avx512f,avx512dq,avx512vpopcntdq,avx2,popcnt"))) void generic_avx512(
    const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& s) {
  row_generic<rows_avx512, words_popcnt>(a, f, i, qh, s);
}

__attribute__((target("avx512f,avx512dq,avx512vpopcntdq,avx2,popcnt"))) void lanes_avx512(
    const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& s) {
  row_lanes<lane_counts_avx512>(a, f, i, qh, s);
}

// The AVX-512 register kernel: 8-channel vectors, P * CV <= 16 accumulators; nullptr when co is not
// a multiple of 8 or planes > 4.
RowFn pick_avx512_regs(int64_t planes, int64_t co) {
  if (co % 8 != 0) return nullptr;
  const int64_t vectors = co / 8;
  LOWBIT_PICK_REGS(row_avx512_regs, 16)
  return nullptr;
}

// rows <= kMaxLaneRows.
RowFn pick_avx512_lanes(int64_t rows) {
  switch (rows) {
    case 1: return row_avx512_lanes<1>;
    case 2: return row_avx512_lanes<2>;
    case 3: return row_avx512_lanes<3>;
    case 4: return row_avx512_lanes<4>;
    default: break;
  }
  // More rows run as the next size up: the rows past `rows` are zero padding of w_t (rows_padded >= that
  // size), so they count nothing and the combine never reads them.
  return rows <= 8 ? row_avx512_lanes<8> : row_avx512_lanes<kMaxLaneRows>;
}

// Level codes of 16 values y (a vector): the number of thresholds passed, as 32-bit lanes.
__attribute__((target("avx512f"))) inline __m512i codes16(__m512 y, const float* thresholds, int64_t stride,
                                                          int64_t count, bool ties_up, __mmask16 valid) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i code = _mm512_setzero_si512();
  for (int64_t m = 0; m < count; ++m) {
    const __m512 t = stride == 0 ? _mm512_set1_ps(thresholds[m]) : _mm512_maskz_loadu_ps(valid, thresholds + m * stride);
    const __mmask16 pass = ties_up ? _mm512_mask_cmp_ps_mask(valid, y, t, _CMP_GE_OQ)
                                   : _mm512_mask_cmp_ps_mask(valid, y, t, _CMP_GT_OQ);
    code = _mm512_mask_add_epi32(code, pass, code, one);
  }
  return code;
}

// NCHW: 16 pixels of one channel per compare; bit b of each code goes to plane b's 16 words by masked ORs
// (as pack_nchw_avx512 does for signs).
__attribute__((target("avx512f"))) void pack_levels_nchw_avx512(const float* src, uint64_t* dst, const int64_t* at,
                                                                int64_t c, int64_t hw, int64_t wc, int64_t p0,
                                                                int64_t total, const LevelArgs& l) {
  alignas(64) uint64_t lanes[16];
  for (int64_t j0 = 0; j0 < total; j0 += 16) {
    const int64_t count = total - j0 < 16 ? total - j0 : 16;
    const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1u);
    for (int64_t cw = 0; cw < wc; ++cw) {
      __m512i acc[kMaxCodePlanes][2];
      for (int64_t b = 0; b < l.planes; ++b) acc[b][0] = acc[b][1] = _mm512_setzero_si512();
      const int64_t channels = c - cw * 64 < 64 ? c - cw * 64 : 64;
      for (int64_t k = 0; k < channels; ++k) {
        const int64_t ch = cw * 64 + k;
        const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, src + ch * hw + p0 + j0), _mm512_set1_ps(l.signs[ch]));
        const __m512i code = codes16(y, l.thresholds + ch * l.count, 0, l.count, l.ties_up, valid);
        const __m512i bit = _mm512_set1_epi64(static_cast<long long>(uint64_t{1} << k));
        for (int64_t b = 0; b < l.planes; ++b) {
          const __mmask16 set = _mm512_test_epi32_mask(code, _mm512_set1_epi32(1 << b));
          acc[b][0] = _mm512_mask_or_epi64(acc[b][0], static_cast<__mmask8>(set & 0xff), acc[b][0], bit);
          acc[b][1] = _mm512_mask_or_epi64(acc[b][1], static_cast<__mmask8>(set >> 8), acc[b][1], bit);
        }
      }
      for (int64_t b = 0; b < l.planes; ++b) {
        _mm512_store_si512(lanes, acc[b][0]);
        _mm512_store_si512(lanes + 8, acc[b][1]);
        for (int64_t j = 0; j < count; ++j) dst[at[j0 + j] + b * wc + cw] = lanes[j];
      }
    }
  }
}

// Channels-last: 16 consecutive channels per compare against the transposed thresholds.
__attribute__((target("avx512f"))) void level_words_avx512(const float* pixel, int64_t first, int64_t channels,
                                                           int64_t c, const LevelArgs& l, uint64_t* words) {
  for (int64_t s = 0; s * 16 < channels; ++s) {
    const int64_t from = first + s * 16, n = channels - s * 16 < 16 ? channels - s * 16 : 16;
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
    const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, pixel + from), _mm512_maskz_loadu_ps(valid, l.signs + from));
    const __m512i code = codes16(y, l.thresholds_t + from, c, l.count, l.ties_up, valid);
    for (int64_t b = 0; b < l.planes; ++b) {
      const __mmask16 set = _mm512_mask_test_epi32_mask(valid, code, _mm512_set1_epi32(1 << b));
      words[b] |= static_cast<uint64_t>(set) << (16 * s);
    }
  }
}

__attribute__((target("avx512f"))) void pack_levels_nhwc_avx512(const float* src, uint64_t* dst, const int64_t* at,
                                                                int64_t c, int64_t /*hw*/, int64_t wc, int64_t p0,
                                                                int64_t count, const LevelArgs& l) {
  pack_levels_nhwc<level_words_avx512>(src, dst, at, c, wc, p0, count, l);
}

// One threshold per channel (count == 1: a two-level activation behind a folded BatchNorm, one plane): the bit is
// the comparison itself, sign * x > t (>= when ties go up), with no level count or plane test in between.
template <bool TiesUp>
__attribute__((target("avx512f"))) inline __mmask16 passes16(__m512 y, __m512 t, __mmask16 valid) {
  return TiesUp ? _mm512_mask_cmp_ps_mask(valid, y, t, _CMP_GE_OQ) : _mm512_mask_cmp_ps_mask(valid, y, t, _CMP_GT_OQ);
}

// NCHW, one threshold: 16 pixels of a channel per compare, set as bit k of their words by masked ORs.
template <bool TiesUp>
__attribute__((target("avx512f"))) void pack_threshold_nchw_avx512(const float* src, uint64_t* dst, const int64_t* at,
                                                                   int64_t c, int64_t hw, int64_t wc, int64_t p0,
                                                                   int64_t total, const LevelArgs& l) {
  alignas(64) uint64_t lanes[16];
  for (int64_t j0 = 0; j0 < total; j0 += 16) {
    const int64_t count = total - j0 < 16 ? total - j0 : 16;
    const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1u);
    for (int64_t cw = 0; cw < wc; ++cw) {
      __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
      const int64_t channels = c - cw * 64 < 64 ? c - cw * 64 : 64;
      for (int64_t k = 0; k < channels; ++k) {
        const int64_t ch = cw * 64 + k;
        const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, src + ch * hw + p0 + j0), _mm512_set1_ps(l.signs[ch]));
        const __mmask16 set = passes16<TiesUp>(y, _mm512_set1_ps(l.thresholds[ch]), valid);
        const __m512i bit = _mm512_set1_epi64(static_cast<long long>(uint64_t{1} << k));
        acc0 = _mm512_mask_or_epi64(acc0, static_cast<__mmask8>(set & 0xff), acc0, bit);
        acc1 = _mm512_mask_or_epi64(acc1, static_cast<__mmask8>(set >> 8), acc1, bit);
      }
      _mm512_store_si512(lanes, acc0);
      _mm512_store_si512(lanes + 8, acc1);
      for (int64_t j = 0; j < count; ++j) dst[at[j0 + j] + cw] = lanes[j];
    }
  }
}

// Channels-last, one threshold: per 64-channel word, its (up to 4) sign and threshold vectors are loaded once
// for all the chunk's pixels; each pixel's word is then 4 compares.
template <bool TiesUp>
__attribute__((target("avx512f"))) void pack_threshold_nhwc_avx512(const float* src, uint64_t* dst, const int64_t* at,
                                                                   int64_t c, int64_t /*hw*/, int64_t wc, int64_t p0,
                                                                   int64_t count, const LevelArgs& l) {
  for (int64_t cw = 0; cw < wc; ++cw) {
    __m512 signs[4], thresholds[4];
    __mmask16 valid[4];
    for (int64_t s = 0; s < 4; ++s) {
      const int64_t first = cw * 64 + s * 16, n = c - first < 0 ? 0 : (c - first < 16 ? c - first : 16);
      valid[s] = static_cast<__mmask16>((1u << n) - 1u);
      signs[s] = _mm512_maskz_loadu_ps(valid[s], l.signs + (n > 0 ? first : 0));
      thresholds[s] = _mm512_maskz_loadu_ps(valid[s], l.thresholds + (n > 0 ? first : 0));
    }
    for (int64_t j = 0; j < count; ++j) {
      const float* pixel = src + (p0 + j) * c + cw * 64;
      uint64_t word = 0;
      for (int64_t s = 0; s < 4; ++s) {
        const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid[s], pixel + 16 * s), signs[s]);
        word |= static_cast<uint64_t>(passes16<TiesUp>(y, thresholds[s], valid[s])) << (16 * s);
      }
      dst[at[j] + cw] = word;
    }
  }
}

}  // namespace

LevelPackFn level_pack_fn_avx512(bool nchw, int64_t count, bool ties_up) {
  if (count == 1) {
    if (nchw) return ties_up ? pack_threshold_nchw_avx512<true> : pack_threshold_nchw_avx512<false>;
    return ties_up ? pack_threshold_nhwc_avx512<true> : pack_threshold_nhwc_avx512<false>;
  }
  return nchw ? pack_levels_nchw_avx512 : pack_levels_nhwc_avx512;
}

PackFn pack_fn_avx512(bool nchw) { return nchw ? pack_nchw_avx512 : pack_nhwc_avx512; }

RowFn pick_half_avx512(int64_t co) {  // the layers of ConvArgs::fold_planes (4 planes, Co % 16): pruned W4A1 recipes
  return co % 32 == 0 ? row_avx512_half<4, 2> : row_avx512_half<4, 1>;  // (~2 KB each; 1: e.g. 50% channels' 16)
}

RowFn pick_sink_avx512(int64_t planes, int64_t co) {
  // co % 32: the register kernels then take blocks of kSinkVectors or more vectors (LOWBIT_PICK_REGS, <= 4 planes)
  return planes * co > kMaxLaneRows && co % (8 * kSinkVectors) == 0 ? pick_avx512_regs(planes, co) : nullptr;
}

RowFn pick_row_avx512(int64_t planes, int64_t co, int64_t wc, int64_t in_step_w) {
  const int64_t rows = planes * co;
  if (rows <= kMaxLaneRows) {
    RowFn fn = wc == 1 && in_step_w == 1 ? pick_avx512_lanes(rows) : nullptr;
    return fn != nullptr ? fn : lanes_avx512;
  }
  RowFn fn = pick_avx512_regs(planes, co);
  return fn != nullptr ? fn : generic_avx512;
}

}  // namespace lowbit

#endif  // __x86_64__
