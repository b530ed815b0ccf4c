// The integer path: weight layers (conv, transposed conv, linear) fed by a uniform multi-level activation
// (e.g. 8-bit `act` / DoReFa: levels lo + step * q, q = 0..L-1, L <= 256) with k-bit affine weights
// (w = scale_c * z + offset_c, z = 0..2^k - 1, k = 1..8). Torch-free: compiled into the torch extension
// (int8_torch.cpp) and the native runtime (runtime/src/int8_layer.cpp).
//
// Derivation (docs/export.md "The integer path"). The activation's code q_i is the index of its level, exactly
// as the torch backend's bucketize picks it (nearest level, ties down, after the per-channel shift). Taps that
// fall outside the input (zero padding, the holes of a transposed conv) contribute 0 and get q = 0. Then
//   sum_i w_i x_i = step*scale_c * D_c + step*offset_c * Q + lo * sum_{i valid} w_i,  D_c = sum_i z_i q_i,
//   Q = sum_i q_i,
// and the last term is the layer on an all-ones input ("base", with the bias; as the binary path's).
// 8-bit weights are stored as z' = z - 128 (signed bytes): D = D' + 128 Q, folded into the offset term. So per
// output pixel: D (an exact int32 dot product of unsigned activation bytes and signed weight bytes: AVX-512
// VNNI vpdpbusd, AVX2 vpmaddubsw + vpmaddwd, NEON sdot on q - 128, or plain C) and Q (the sum of per-pixel
// code sums over the taps), combined in float64 in one fixed order by int8_combine on every path, so all paths
// agree bit for bit.
//
// Layouts. Codes: a zero-padded channels-last byte image (N, hp, wp, 4 * wc), channels padded to a multiple of 4
// so one 32-bit word holds 4 channels; the padding is wide enough that every tap of every output pixel lands
// inside it (as the binary path's bit image). Weights per phase: w_t (words, co_pad) int32, word = tap * wc + k,
// each int32 the 4 signed bytes of channels 4k..4k+3 of one output channel, co_pad a multiple of 16.
// Phases as in kernels.h (a transposed conv = stride^2 sub-pixel convs).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "driver.h"

namespace lowbit {

constexpr int64_t kInt8CoAlign = 16;
constexpr int64_t kInt8FewChannels = 4;

// The uniform levels of the activation and how codes are found: guess round((v - lo) / step), then move to
// the exact bucket of the stored midpoints: bounds[g] < v <= bounds[g + 1], bounds = (-inf, mid..., +inf).
// A vector path may skip the exact search where t = (v - lo) / step + 1/2 sits farther than `margin` from an
// integer (the buckets' edges sit within margin - 1e-3 of integers in t, measured once per call).
struct Int8Levels {
  float lo, inv_step;
  int64_t count;                // L
  const float* bounds;          // L + 1 values
  float margin;
};

// codes[j] = bucket of src[j] - shift[j * shift_step] for j < n (a channel's row: step 0; a pixel's channels: 1).
using CodesFn = void (*)(const float* src, const float* shift, int64_t shift_step, int64_t n, const Int8Levels& levels,
                        uint8_t* codes);

struct Int8Args {
  const uint8_t* x;       // codes (N, hp, wp, 4 * wc)
  const int32_t* sums;    // (N, hp, wp): sum of a pixel's codes
  const double* coef;     // (co): step * scale
  const double* offset;   // (co): step * (offset + zero_point * scale)
  BaseMap base;           // per pixel (ho, wo) a co-vector (kernels.h)
  float* out;             // (N, ho, wo, co)
  int64_t hp, wp, wc, ho, wo, co, co_pad;
  int64_t in_step_h, in_step_w, out_step_h, out_step_w;
  bool wide;              // some weight byte outside [-64, 64] (AVX2 then splits bytes into nibbles)
  const int32_t* planar;  // layers with few channels (co <= kInt8FewChannels): the code words as (N, hp, wc, wp),
                          // so 16 neighbouring pixels' word k are one load; nullptr otherwise
};

struct Int8Phase {
  const int32_t* w_t;         // (words, co_pad)
  std::vector<int32_t> w_r;   // (co, words): the same bytes channel-major, for the few-channel kernels
  std::vector<int64_t> offs;  // word offset of every tap from the output pixel's patch origin
  std::vector<int64_t> pix;   // pixel offset of every tap (into sums)
  std::vector<int64_t> tap_y, tap_x;  // every tap's row and column offset in the padded image
  std::vector<int32_t> zsum_pad;  // (co_pad): sum of the signed weight bytes (the NEON path's q - 128 fix)
  int64_t ph, pw, n_qh, n_qw, words;
};

// Word index of output pixel (qh, qw)'s patch origin in image i.
inline int64_t int8_origin(const Int8Args& a, int64_t i, int64_t qh, int64_t qw) {
  return (i * a.hp + qh * a.in_step_h) * a.wp + qw * a.in_step_w;
}

inline int32_t int8_patch_sum(const Int8Args& a, const Int8Phase& f, int64_t pixel) {
  int32_t total = 0;
  for (const int64_t p : f.pix) total += a.sums[pixel + p];
  return total;
}

// out[c] = float(base[c] + offset[c] * Q + coef[c] * D[c]), in this order on every path.
__attribute__((always_inline)) inline void int8_combine(const Int8Args& a, int64_t i, int64_t oh, int64_t ow,
                                                        int32_t q, const int32_t* d) {
  const double* base = a.base.at(oh, ow, a.co);
  float* out = a.out + ((i * a.ho + oh) * a.wo + ow) * a.co;
  const double qd = static_cast<double>(q);
  for (int64_t c = 0; c < a.co; ++c) {
    out[c] = static_cast<float>(base[c] + a.offset[c] * qd + a.coef[c] * static_cast<double>(d[c]));
  }
}

// One output row (image i, phase row qh) of a phase; scratch holds at least 4 * co_pad int32.
using Int8RowFn = void (*)(const Int8Args&, const Int8Phase&, int64_t i, int64_t qh, int32_t* scratch);

CodesFn int8_codes_scalar();
CodesFn int8_codes_avx2();
CodesFn int8_codes_avx512();
Int8RowFn int8_row_scalar(const Int8Args& a);
Int8RowFn int8_row_avx2(const Int8Args& a);
Int8RowFn int8_row_avx512(const Int8Args& a);
Int8RowFn int8_row_neon(const Int8Args& a);

// The portable code search: the reference of the vector ones (all return the exact bucket).
inline uint8_t int8_code(float v, const Int8Levels& l) {
  float t = (v - l.lo) * l.inv_step + 0.5f;
  const float top = static_cast<float>(l.count - 1);
  t = t > 0.0f ? (t < top ? t : top) : 0.0f;  // NaN -> 0
  int64_t g = static_cast<int64_t>(t);
  while (g > 0 && v <= l.bounds[g]) --g;
  while (g < l.count - 1 && v > l.bounds[g + 1]) ++g;
  return static_cast<uint8_t>(g);
}

// One layer on the integer path (the driver's entry, int8_driver.cpp): the float input x (N, C, H, W), its
// per-channel shift (nullptr: none), the activation's levels as bounds (L + 1: -inf, the L - 1 float32
// midpoints, +inf), lo and 1 / step; per phase w_ts[f] (w_t_words[f], co_pad) int32 as described above;
// phases and steps as BinaryConv's; coef, offset (co) and base (ho, wo, co) float64.
struct Int8Conv {
  Image x;
  const float* shift = nullptr;
  std::vector<float> bounds;
  float lo = 0.0f, inv_step = 1.0f;
  std::vector<const int32_t*> w_ts;
  std::vector<int64_t> w_t_words;
  int64_t co_pad = 0;
  std::vector<int64_t> phases;
  const double* coef = nullptr;
  const double* offset = nullptr;
  BaseMap base;
  int64_t ho = 0, wo = 0, co = 0;
  int64_t steps[4] = {1, 1, 1, 1};
  int64_t path = 0;
  int wide = -1;  // 1 / 0: some weight byte is / none is outside [-64, 64] (Int8Args::wide); -1: scan w_ts per call
};

// "" when `call` is consistent (run_int8_conv then reads nothing outside its arrays), else the reason.
std::string check_int8_conv(const Int8Conv& call);

// Runs a checked call, writing out (N, ho, wo, co) float32, channels-last.
void run_int8_conv(const Int8Conv& call, float* out, const ParallelFor& parallel);

// Which integer kernels a path id really runs on this CPU: the AVX-512 path needs AVX-512 VNNI (else the AVX2
// kernels, identical results), the NEON path the dot-product extension (else the scalar ones).
int64_t int8_kernel_path(int64_t path);

// One thread's measured peak (int8_roofline.cpp): kind "popcount" (binary ops/s) or "vnni" (int8 MAC/s); 0
// where this CPU lacks the instruction.
double peak_rate(const std::string& kind, int64_t iterations);

}  // namespace lowbit
