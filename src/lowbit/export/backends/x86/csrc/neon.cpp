// The ARM64 path: NEON vcnt (byte popcount) summed with pairwise widening adds, two rows per register.
// The sign packers are the portable ones of scalar.cpp (plain compare-and-shift loops).
#include "kernels.h"

#if defined(__aarch64__)  // an ARM64 instruction set: nothing to build on other CPUs
#include <arm_neon.h>

namespace lowbit {
namespace {

// popcount(row[j] & x[j]) for the two 64-bit lanes: vcnt per byte, then three pairwise widening adds.
inline uint64x2_t popcount_and(uint64x2_t row, uint64x2_t x) {
  const uint8x16_t bytes = vcntq_u8(vreinterpretq_u8_u64(vandq_u64(row, x)));
  return vpaddlq_u32(vpaddlq_u16(vpaddlq_u8(bytes)));
}

inline void add_counts(int64_t* counts, uint64x2_t sum) {
  vst1q_s64(counts, vaddq_s64(vld1q_s64(counts), vreinterpretq_s64_u64(sum)));
}

// counts[r] = sum_w popcount(w_t[w * rows + r] & patch[w]) for r < rows (rows a multiple of 8): one patch
// word broadcast against 8 rows (four registers) at a time.
void rows_neon(const uint64_t* w_t, const uint64_t* patch, int64_t words, int64_t rows, int64_t* counts) {
  for (int64_t r = 0; r < rows; r += 8) {
    uint64x2_t a0 = vdupq_n_u64(0), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t w = 0; w < words; ++w) {
      const uint64x2_t x = vdupq_n_u64(patch[w]);
      const uint64_t* row = w_t + w * rows + r;
      a0 = vaddq_u64(a0, popcount_and(vld1q_u64(row), x));
      a1 = vaddq_u64(a1, popcount_and(vld1q_u64(row + 2), x));
      a2 = vaddq_u64(a2, popcount_and(vld1q_u64(row + 4), x));
      a3 = vaddq_u64(a3, popcount_and(vld1q_u64(row + 6), x));
    }
    vst1q_s64(counts + r, vreinterpretq_s64_u64(a0));
    vst1q_s64(counts + r + 2, vreinterpretq_s64_u64(a1));
    vst1q_s64(counts + r + 4, vreinterpretq_s64_u64(a2));
    vst1q_s64(counts + r + 6, vreinterpretq_s64_u64(a3));
  }
}

// The lane kernel (kernels.h row_lanes): 8 neighbouring output pixels, two per register.
void lane_counts_neon(const uint64_t* patch, const uint64_t* w_t, int64_t words, int64_t rows_padded, int64_t rows,
                      int64_t (*counts)[kLanes], int64_t* positives) {
  for (int64_t l = 0; l < kLanes; ++l) positives[l] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t l = 0; l < kLanes; ++l) counts[r][l] = 0;
  }
  const uint64x2_t ones = vdupq_n_u64(~uint64_t{0});
  for (int64_t wd = 0; wd < words; ++wd) {
    const uint64_t* x = patch + wd * kLanes;
    const uint64x2_t x0 = vld1q_u64(x), x1 = vld1q_u64(x + 2), x2 = vld1q_u64(x + 4), x3 = vld1q_u64(x + 6);
    add_counts(positives, popcount_and(x0, ones));
    add_counts(positives + 2, popcount_and(x1, ones));
    add_counts(positives + 4, popcount_and(x2, ones));
    add_counts(positives + 6, popcount_and(x3, ones));
    for (int64_t r = 0; r < rows; ++r) {
      const uint64x2_t wbits = vdupq_n_u64(w_t[wd * rows_padded + r]);
      add_counts(counts[r], popcount_and(wbits, x0));
      add_counts(counts[r] + 2, popcount_and(wbits, x1));
      add_counts(counts[r] + 4, popcount_and(wbits, x2));
      add_counts(counts[r] + 6, popcount_and(wbits, x3));
    }
  }
}

template <int R>
void pixels_neon(const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& /*s*/) {
  row_pixels<R>(a, f, i, qh);
}

void generic_neon(const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& s) {
  row_generic<rows_neon, words_popcnt>(a, f, i, qh, s);
}

void lanes_neon(const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh, Scratch& s) {
  row_lanes<lane_counts_neon>(a, f, i, qh, s);
}

}  // namespace

PackFn pack_fn_neon(bool nchw) { return pack_fn_scalar(nchw); }

RowFn pick_row_neon(int64_t planes, int64_t co, int64_t /*px_words*/, int64_t /*in_step_w*/) {
  switch (planes * co) {
    case 1: return pixels_neon<1>;
    case 2: return pixels_neon<2>;
    case 3: return pixels_neon<3>;
    case 4: return pixels_neon<4>;
    default: return planes * co <= kMaxLaneRows ? lanes_neon : generic_neon;
  }
}

}  // namespace lowbit

#endif  // __aarch64__
