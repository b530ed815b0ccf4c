// The AVX2 integer path: vpmaddubsw (code x weight byte pairs into int16) then vpmaddwd (pairs into int32).
// vpmaddubsw saturates beyond 32767, so weights outside [-64, 64] (7-8 bit codes) go in as two nibbles,
// 16 * high + low, each product pair then exact; the code search gathers the bounds around each guess.
#include "int8.h"

#if defined(__x86_64__)  // an x86 instruction set: nothing to build on other CPUs
#include <immintrin.h>

#define LOWBIT_AVX2 __attribute__((target("avx2,fma")))

namespace lowbit {
namespace {

// int8_combine of `count` pixels (output columns ow0 + p * ow_step, patch sums q[p], products at d + p * co_pad),
// one vectorised copy in this file: inlined, every row kernel instantiation carried copies of its own (size).
LOWBIT_AVX2 __attribute__((noinline)) void combine(const Int8Args& a, int64_t i, int64_t oh, int64_t ow0, int64_t ow_step,
                                                   const int32_t* q, const int32_t* d, int count) {
  for (int p = 0; p < count; ++p) int8_combine(a, i, oh, ow0 + p * ow_step, q[p], d + p * a.co_pad);
}

LOWBIT_AVX2 void codes_avx2(const float* src, const float* shift, int64_t shift_step, int64_t n, const Int8Levels& l,
                            uint8_t* codes) {
  const __m256 lo = _mm256_set1_ps(l.lo), inv = _mm256_set1_ps(l.inv_step), half = _mm256_set1_ps(0.5f);
  const __m256 top = _mm256_set1_ps(static_cast<float>(l.count - 1)), zero = _mm256_setzero_ps();
  const __m256i one = _mm256_set1_epi32(1), izero = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 sh = shift_step ? _mm256_loadu_ps(shift + j) : _mm256_set1_ps(*shift);
    const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(src + j), sh);
    const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v, lo), inv), half), zero), top);
    __m256i g = _mm256_cvttps_epi32(t);
    for (;;) {
      const __m256 below = _mm256_i32gather_ps(l.bounds, g, 4);
      const __m256 above = _mm256_i32gather_ps(l.bounds, _mm256_add_epi32(g, one), 4);
      const __m256i down = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, below, _CMP_LE_OQ)),
                                            _mm256_cmpgt_epi32(g, izero));
      const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(v, above, _CMP_GT_OQ));
      if (_mm256_testz_si256(_mm256_or_si256(down, up), _mm256_or_si256(down, up))) break;
      g = _mm256_sub_epi32(_mm256_add_epi32(g, down), up);  // masks are -1 where set
    }
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), g);
    for (int k = 0; k < 8; ++k) codes[j + k] = static_cast<uint8_t>(lanes[k]);
  }
  for (; j < n; ++j) codes[j] = int8_code(src[j] - shift[j * shift_step], l);
}

// acc += the 8 int32 dot products of the 4 code bytes in x with the 4 weight bytes of each lane of w.
template <bool Wide>
LOWBIT_AVX2 inline __m256i dot4(__m256i acc, __m256i x, __m256i w) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (!Wide) return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), ones));
  const __m256i nibble = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8);
  const __m256i low = _mm256_and_si256(w, nibble);
  const __m256i high = _mm256_sub_epi8(_mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(w, 4), nibble), eight), eight);
  const __m256i lo_sum = _mm256_madd_epi16(_mm256_maddubs_epi16(x, low), ones);
  const __m256i hi_sum = _mm256_madd_epi16(_mm256_maddubs_epi16(x, high), ones);
  return _mm256_add_epi32(acc, _mm256_add_epi32(lo_sum, _mm256_slli_epi32(hi_sum, 4)));
}

// PB pixels x 16 output channels (two registers) from c0 on.
template <int PB, bool Wide>
LOWBIT_AVX2 inline void dots(const Int8Args& a, const Int8Phase& f, const int32_t* const* px, int64_t c0, int32_t* d) {
  __m256i acc[PB][2];
  for (int p = 0; p < PB; ++p) acc[p][0] = acc[p][1] = _mm256_setzero_si256();
  const int64_t taps = static_cast<int64_t>(f.offs.size()), wc = a.wc, cp = a.co_pad;
  for (int64_t t = 0; t < taps; ++t) {
    const int32_t* wr = f.w_t + t * wc * cp + c0;
    const int64_t o = f.offs[t];
    for (int64_t k = 0; k < wc; ++k, wr += cp) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 8));
      for (int p = 0; p < PB; ++p) {
        const __m256i x = _mm256_set1_epi32(px[p][o + k]);
        acc[p][0] = dot4<Wide>(acc[p][0], x, w0);
        acc[p][1] = dot4<Wide>(acc[p][1], x, w1);
      }
    }
  }
  for (int p = 0; p < PB; ++p) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + p * cp + c0), acc[p][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + p * cp + c0 + 8), acc[p][1]);
  }
}

template <int PB, bool Wide>
LOWBIT_AVX2 inline void pixels(const Int8Args& a, const Int8Phase& f, int64_t i, int64_t qh, int64_t qw, int32_t* d) {
  const auto* x = reinterpret_cast<const int32_t*>(a.x);
  const int32_t* px[PB];
  int64_t pixel[PB];
  for (int p = 0; p < PB; ++p) pixel[p] = int8_origin(a, i, qh, qw + p), px[p] = x + pixel[p] * a.wc;
  for (int64_t c0 = 0; c0 < a.co_pad; c0 += 16) dots<PB, Wide>(a, f, px, c0, d);
  const int64_t oh = qh * a.out_step_h + f.ph;
  int32_t q[PB];
  for (int p = 0; p < PB; ++p) q[p] = int8_patch_sum(a, f, pixel[p]);
  combine(a, i, oh, qw * a.out_step_w + f.pw, a.out_step_w, q, d, PB);
}

template <bool Wide>
LOWBIT_AVX2 void row_avx2(const Int8Args& a, const Int8Phase& f, int64_t i, int64_t qh, int32_t* d) {
  int64_t qw = 0;
  for (; qw + 4 <= f.n_qw; qw += 4) pixels<4, Wide>(a, f, i, qh, qw, d);
  for (; qw < f.n_qw; ++qw) pixels<1, Wide>(a, f, i, qh, qw, d);
}

}  // namespace

CodesFn int8_codes_avx2() { return codes_avx2; }

Int8RowFn int8_row_avx2(const Int8Args& a) { return a.wide ? row_avx2<true> : row_avx2<false>; }

}  // namespace lowbit

#endif
