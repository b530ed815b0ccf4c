// The AVX-512 integer path (F, BW, VNNI): vpdpbusd adds 4 code x weight byte products into each of 16 int32
// lanes; the code search gathers the two bounds around each guess (int8.h).
#include "int8.h"

#if defined(__x86_64__)  // an x86 instruction set: nothing to build on other CPUs
#include <immintrin.h>

#define LOWBIT_VNNI512 __attribute__((target("avx512f,avx512bw,avx512vnni")))

namespace lowbit {
namespace {

// int8_combine of `count` pixels (output columns ow0 + p * ow_step, patch sums q[p], products at d + p * co_pad),
// one vectorised copy in this file: inlined, every row kernel instantiation carried copies of its own (size).
LOWBIT_VNNI512 __attribute__((noinline)) void combine(const Int8Args& a, int64_t i, int64_t oh, int64_t ow0, int64_t ow_step,
                                                      const int32_t* q, const int32_t* d, int count) {
  for (int p = 0; p < count; ++p) int8_combine(a, i, oh, ow0 + p * ow_step, q[p], d + p * a.co_pad);
}

LOWBIT_VNNI512 void codes_avx512(const float* src, const float* shift, int64_t shift_step, int64_t n,
                                 const Int8Levels& l, uint8_t* codes) {
  const __m512 lo = _mm512_set1_ps(l.lo), inv = _mm512_set1_ps(l.inv_step), half = _mm512_set1_ps(0.5f);
  const __m512 top = _mm512_set1_ps(static_cast<float>(l.count - 1)), zero = _mm512_setzero_ps();
  const __m512i one = _mm512_set1_epi32(1);
  const __m512 margin = _mm512_set1_ps(l.margin), far = _mm512_set1_ps(1.0f - l.margin);
  const __m512 last = _mm512_set1_ps(static_cast<float>(l.count - 1) + l.margin);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 valid = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 sh = shift_step ? _mm512_maskz_loadu_ps(valid, shift + j) : _mm512_set1_ps(*shift);
    const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, src + j), sh);
    // max(NaN, 0) = 0 (the second operand), as the scalar search's clamp
    const __m512 raw = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(v, lo), inv), half);
    const __m512 t = _mm512_min_ps(_mm512_max_ps(raw, zero), top);
    __m512i g = _mm512_cvttps_epi32(t);
    // only lanes within `margin` of an inner bucket edge (t = 1 .. L - 1), and NaN, need the exact search
    const __m512 frac = _mm512_sub_ps(t, _mm512_cvtepi32_ps(g));
    const __mmask16 inside = _mm512_cmp_ps_mask(raw, far, _CMP_GE_OQ) & _mm512_cmp_ps_mask(raw, last, _CMP_LE_OQ);
    const __mmask16 edge = _mm512_cmp_ps_mask(frac, margin, _CMP_LT_OQ) | _mm512_cmp_ps_mask(frac, far, _CMP_GT_OQ);
    const __mmask16 near = ((inside & edge) | _mm512_cmp_ps_mask(raw, raw, _CMP_UNORD_Q)) & valid;
    for (__mmask16 active = near; active;) {
      const __m512 below = _mm512_mask_i32gather_ps(zero, active, g, l.bounds, 4);
      const __m512 above = _mm512_mask_i32gather_ps(zero, active, _mm512_add_epi32(g, one), l.bounds, 4);
      const __mmask16 down = _mm512_mask_cmp_ps_mask(active, v, below, _CMP_LE_OQ) & _mm512_cmpgt_epi32_mask(g, _mm512_setzero_si512());
      const __mmask16 up = _mm512_mask_cmp_ps_mask(active, v, above, _CMP_GT_OQ);
      g = _mm512_mask_sub_epi32(g, down, g, one);
      g = _mm512_mask_add_epi32(g, up, g, one);
      active = down | up;
    }
    _mm512_mask_cvtepi32_storeu_epi8(codes + j, valid, g);
  }
}

// Dot products of PB pixels (patch origins px, int32 words) with CV * 16 output channels from c0 on.
template <int PB, int CV>
LOWBIT_VNNI512 inline void dots(const Int8Args& a, const Int8Phase& f, const int32_t* const* px, int64_t c0,
                                int32_t* d) {
  __m512i acc[PB][CV];
  for (int p = 0; p < PB; ++p) {
    for (int v = 0; v < CV; ++v) acc[p][v] = _mm512_setzero_si512();
  }
  const int64_t taps = static_cast<int64_t>(f.offs.size()), wc = a.wc, cp = a.co_pad;
  for (int64_t t = 0; t < taps; ++t) {
    const int32_t* wr = f.w_t + t * wc * cp + c0;
    const int64_t o = f.offs[t];
    for (int64_t k = 0; k < wc; ++k, wr += cp) {
      __m512i w[CV];
      for (int v = 0; v < CV; ++v) w[v] = _mm512_loadu_si512(wr + 16 * v);
      for (int p = 0; p < PB; ++p) {
        const __m512i x = _mm512_set1_epi32(px[p][o + k]);
        for (int v = 0; v < CV; ++v) acc[p][v] = _mm512_dpbusd_epi32(acc[p][v], x, w[v]);
      }
    }
  }
  for (int p = 0; p < PB; ++p) {
    for (int v = 0; v < CV; ++v) _mm512_storeu_si512(d + p * cp + c0 + 16 * v, acc[p][v]);
  }
}

template <int PB, int CV>
LOWBIT_VNNI512 inline void pixels(const Int8Args& a, const Int8Phase& f, int64_t i, int64_t qh, int64_t qw,
                                  int32_t* d) {
  const auto* x = reinterpret_cast<const int32_t*>(a.x);
  const int32_t* px[PB];
  int64_t pixel[PB];
  for (int p = 0; p < PB; ++p) pixel[p] = int8_origin(a, i, qh, qw + p), px[p] = x + pixel[p] * a.wc;
  for (int64_t c0 = 0; c0 < a.co_pad; c0 += 16 * CV) dots<PB, CV>(a, f, px, c0, d);
  const int64_t oh = qh * a.out_step_h + f.ph;
  int32_t q[PB];
  for (int p = 0; p < PB; ++p) q[p] = int8_patch_sum(a, f, pixel[p]);
  combine(a, i, oh, qw * a.out_step_w + f.pw, a.out_step_w, q, d, PB);
}

// Many channels: 4 pixels x CV channel vectors in registers, a broadcast code word meets CV weight vectors.
template <int CV>
LOWBIT_VNNI512 void row_channels(const Int8Args& a, const Int8Phase& f, int64_t i, int64_t qh, int32_t* d) {
  int64_t qw = 0;
  for (; qw + 4 <= f.n_qw; qw += 4) pixels<4, CV>(a, f, i, qh, qw, d);
  for (; qw < f.n_qw; ++qw) pixels<1, CV>(a, f, i, qh, qw, d);
}

// 16 pixels' word from `words` on (one load when they are neighbours, else a gather).
template <bool Contiguous>
LOWBIT_VNNI512 inline __m512i lane_words(const int32_t* words, __mmask16 valid, __m512i offsets) {
  if (Contiguous) return _mm512_maskz_loadu_epi32(valid, words);
  return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, offsets, words, 4);
}

// Few channels (co <= 4): 16 neighbouring output pixels of a phase row in the 16 lanes, each patch word of the
// 16 read from the planar code image and met by the channel's broadcast weight word; lane sums land per pixel.
template <int CO, bool Contiguous>
LOWBIT_VNNI512 void row_few(const Int8Args& a, const Int8Phase& f, int64_t i, int64_t qh, int32_t* d) {
  const int64_t oh = qh * a.out_step_h + f.ph, taps = static_cast<int64_t>(f.offs.size()), wc = a.wc, wp = a.wp;
  const __m512i lane_offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                  _mm512_set1_epi32(static_cast<int>(a.in_step_w)));
  const int64_t row0 = i * a.hp + qh * a.in_step_h;
  alignas(64) int32_t lanes[CO][16];
  for (int64_t q0 = 0; q0 < f.n_qw; q0 += 16) {
    const int64_t count = f.n_qw - q0 < 16 ? f.n_qw - q0 : 16;
    const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1u);
    __m512i even[CO], odd[CO];  // two chains per channel: consecutive words do not wait on each other
    for (int c = 0; c < CO; ++c) even[c] = odd[c] = _mm512_setzero_si512();
    for (int64_t t = 0; t < taps; ++t) {
      const int32_t* tap = a.planar + (row0 + f.tap_y[t]) * wc * wp + f.tap_x[t] + q0 * a.in_step_w;
      const int32_t* w = f.w_r.data() + t * wc;
      int64_t k = 0;
      for (; k + 2 <= wc; k += 2) {
        const __m512i x0 = lane_words<Contiguous>(tap + k * wp, valid, lane_offsets);
        const __m512i x1 = lane_words<Contiguous>(tap + (k + 1) * wp, valid, lane_offsets);
        for (int c = 0; c < CO; ++c) {
          even[c] = _mm512_dpbusd_epi32(even[c], x0, _mm512_set1_epi32(w[c * f.words + k]));
          odd[c] = _mm512_dpbusd_epi32(odd[c], x1, _mm512_set1_epi32(w[c * f.words + k + 1]));
        }
      }
      if (k < wc) {
        const __m512i x0 = lane_words<Contiguous>(tap + k * wp, valid, lane_offsets);
        for (int c = 0; c < CO; ++c) even[c] = _mm512_dpbusd_epi32(even[c], x0, _mm512_set1_epi32(w[c * f.words + k]));
      }
    }
    for (int c = 0; c < CO; ++c) _mm512_store_si512(lanes[c], _mm512_add_epi32(even[c], odd[c]));
    for (int64_t l = 0; l < count; ++l) {
      for (int c = 0; c < CO; ++c) d[c] = lanes[c][l];
      const int64_t qw = q0 + l;
      const int32_t q = int8_patch_sum(a, f, int8_origin(a, i, qh, qw));
      combine(a, i, oh, qw * a.out_step_w + f.pw, 0, &q, d, 1);
    }
  }
}

}  // namespace

CodesFn int8_codes_avx512() { return codes_avx512; }

Int8RowFn int8_row_avx512(const Int8Args& a) {
  const bool contiguous = a.in_step_w == 1;
  switch (a.co) {
    case 1: return contiguous ? row_few<1, true> : row_few<1, false>;
    case 2: return contiguous ? row_few<2, true> : row_few<2, false>;
    case 3: return contiguous ? row_few<3, true> : row_few<3, false>;
    case 4: return contiguous ? row_few<4, true> : row_few<4, false>;
    default: break;
  }
  const int64_t vectors = a.co_pad / 16;
  if (vectors % 4 == 0) return row_channels<4>;
  if (vectors % 2 == 0) return row_channels<2>;
  return row_channels<1>;
}

}  // namespace lowbit

#endif
