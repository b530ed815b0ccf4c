// The portable integer path: plain C loops, the reference of the vector paths (int8.h) and their fallback.
#include <cstring>

#include "int8.h"

namespace lowbit {
namespace {

void codes_scalar(const float* src, const float* shift, int64_t shift_step, int64_t n, const Int8Levels& levels,
                  uint8_t* codes) {
  for (int64_t j = 0; j < n; ++j) codes[j] = int8_code(src[j] - shift[j * shift_step], levels);
}

// d[c] = sum over the patch's words and their 4 bytes of code * weight, for every output channel.
void row_scalar(const Int8Args& a, const Int8Phase& f, int64_t i, int64_t qh, int32_t* d) {
  const int64_t oh = qh * a.out_step_h + f.ph, taps = static_cast<int64_t>(f.offs.size());
  for (int64_t qw = 0; qw < f.n_qw; ++qw) {
    const int64_t pixel = int8_origin(a, i, qh, qw);
    const uint8_t* px = a.x + pixel * a.wc * 4;
    for (int64_t c = 0; c < a.co; ++c) d[c] = 0;
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t k = 0; k < a.wc; ++k) {
        const uint8_t* x = px + (f.offs[t] + k) * 4;
        const int32_t* row = f.w_t + (t * a.wc + k) * a.co_pad;
        for (int64_t c = 0; c < a.co; ++c) {
          int8_t w[4];
          std::memcpy(w, row + c, 4);
          d[c] += x[0] * w[0] + x[1] * w[1] + x[2] * w[2] + x[3] * w[3];
        }
      }
    }
    int8_combine(a, i, oh, qw * a.out_step_w + f.pw, int8_patch_sum(a, f, pixel), d);
  }
}

}  // namespace

CodesFn int8_codes_scalar() { return codes_scalar; }

Int8RowFn int8_row_scalar(const Int8Args& /*a*/) { return row_scalar; }

}  // namespace lowbit
