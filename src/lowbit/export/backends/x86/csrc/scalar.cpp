// The portable scalar path (__builtin_popcountll): reference of the other paths, and the fallback.
#include "kernels.h"

namespace lowbit {
namespace {

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

void pack_nchw_scalar(const float* src, uint64_t* dst, const int64_t* at, int64_t c, int64_t hw, int64_t /*wc*/,
                      int64_t p0, int64_t count) {
  for (int64_t ch = 0; ch < c; ++ch) {
    const float* plane = src + ch * hw + p0;
    const int shift = static_cast<int>(ch % 64);
    uint64_t* word = dst + ch / 64;
    for (int64_t j = 0; j < count; ++j) word[at[j]] |= static_cast<uint64_t>(plane[j] >= 0.0f) << shift;
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

template <int R>
void pixels_scalar(const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& /*s*/) {
  row_pixels<R>(a, f, i, qh);
}

void generic_scalar(const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& s) {
  row_generic<rows_scalar, words_scalar>(a, f, i, qh, s);
}

void lanes_scalar(const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& s) {
  row_lanes<lane_counts_portable>(a, f, i, qh, s);
}

}  // namespace

PackFn pack_fn_scalar(bool nchw) { return nchw ? pack_nchw_scalar : pack_nhwc_scalar; }

RowFn pick_row_scalar(int64_t planes, int64_t co, int64_t /*px_words*/, int64_t /*in_step_w*/) {
  switch (planes * co) {
    case 1: return pixels_scalar<1>;
    case 2: return pixels_scalar<2>;
    case 3: return pixels_scalar<3>;
    case 4: return pixels_scalar<4>;
    default: return planes * co <= kMaxLaneRows ? lanes_scalar : generic_scalar;
  }
}

}  // namespace lowbit
