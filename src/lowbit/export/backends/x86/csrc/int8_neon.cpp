// The ARM64 integer path: sdot (the dot-product extension, signed x signed bytes) on codes moved to q - 128,
// then D = D'' + 128 * (sum of the weight bytes), exact in int32; the code search is the scalar one.
#include "int8.h"

#if defined(__aarch64__)  // an ARM64 instruction set: nothing to build on other CPUs
#include <arm_neon.h>

#define LOWBIT_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))

namespace lowbit {
namespace {

// PB pixels x 16 output channels (four registers) from c0 on.
template <int PB>
LOWBIT_DOTPROD inline void dots(const Int8Args& a, const Int8Phase& f, const int32_t* const* px, int64_t c0, int32_t* d) {
  int32x4_t acc[PB][4];
  for (int p = 0; p < PB; ++p) {
    for (int v = 0; v < 4; ++v) acc[p][v] = vdupq_n_s32(0);
  }
  const int64_t taps = static_cast<int64_t>(f.offs.size()), wc = a.wc, cp = a.co_pad;
  const uint8x16_t flip = vdupq_n_u8(0x80);
  for (int64_t t = 0; t < taps; ++t) {
    const int32_t* wr = f.w_t + t * wc * cp + c0;
    const int64_t o = f.offs[t];
    for (int64_t k = 0; k < wc; ++k, wr += cp) {
      int8x16_t w[4];
      for (int v = 0; v < 4; ++v) w[v] = vreinterpretq_s8_s32(vld1q_s32(wr + 4 * v));
      for (int p = 0; p < PB; ++p) {
        const int8x16_t x = vreinterpretq_s8_u8(veorq_u8(vreinterpretq_u8_s32(vdupq_n_s32(px[p][o + k])), flip));
        for (int v = 0; v < 4; ++v) acc[p][v] = vdotq_s32(acc[p][v], x, w[v]);
      }
    }
  }
  for (int p = 0; p < PB; ++p) {
    for (int v = 0; v < 4; ++v) {
      const int32x4_t fix = vshlq_n_s32(vld1q_s32(f.zsum_pad.data() + c0 + 4 * v), 7);
      vst1q_s32(d + p * cp + c0 + 4 * v, vaddq_s32(acc[p][v], fix));
    }
  }
}

template <int PB>
LOWBIT_DOTPROD inline void pixels(const Int8Args& a, const Int8Phase& f, int64_t i, int64_t qh, int64_t qw, int32_t* d) {
  const auto* x = reinterpret_cast<const int32_t*>(a.x);
  const int32_t* px[PB];
  int64_t pixel[PB];
  for (int p = 0; p < PB; ++p) pixel[p] = int8_origin(a, i, qh, qw + p), px[p] = x + pixel[p] * a.wc;
  for (int64_t c0 = 0; c0 < a.co_pad; c0 += 16) dots<PB>(a, f, px, c0, d);
  const int64_t oh = qh * a.out_step_h + f.ph;
  for (int p = 0; p < PB; ++p) {
    int8_combine(a, i, oh, (qw + p) * a.out_step_w + f.pw, int8_patch_sum(a, f, pixel[p]), d + p * a.co_pad);
  }
}

LOWBIT_DOTPROD void row_neon(const Int8Args& a, const Int8Phase& f, int64_t i, int64_t qh, int32_t* d) {
  int64_t qw = 0;
  for (; qw + 4 <= f.n_qw; qw += 4) pixels<4>(a, f, i, qh, qw, d);
  for (; qw < f.n_qw; ++qw) pixels<1>(a, f, i, qh, qw, d);
}

}  // namespace

Int8RowFn int8_row_neon(const Int8Args& /*a*/) { return row_neon; }

}  // namespace lowbit

#endif
