// Blocked SGEMM for the float layers (sgemm.h): kTileRows x tile_columns() register tiles, depth in blocks
// of kDepthBlock so a packed B block stays in L1 while every row panel of A passes over it.
#include "sgemm.h"

#include "driver.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace lowbit {
namespace {

constexpr int64_t kDepthBlock = 256;

// c (kTileRows x width) = (accumulate ? c : 0) + a (depth x kTileRows) x B (rows[k]: width values), k ascending.
using MicroKernel = void (*)(const float* a, const float* const* rows, int64_t depth, float* c, bool accumulate);

// The portable tile: multiply then add (no FMA), 8 columns.
void micro_portable(const float* a, const float* const* rows, int64_t depth, float* c, bool accumulate) {
  constexpr int64_t kWidth = 8;
  float acc[kTileRows][kWidth];
  for (int64_t r = 0; r < kTileRows; ++r) {
    for (int64_t j = 0; j < kWidth; ++j) acc[r][j] = accumulate ? c[r * kWidth + j] : 0.0f;
  }
  for (int64_t k = 0; k < depth; ++k, a += kTileRows) {
    const float* b = rows[k];
    for (int64_t r = 0; r < kTileRows; ++r) {
      for (int64_t j = 0; j < kWidth; ++j) acc[r][j] += a[r] * b[j];
    }
  }
  for (int64_t r = 0; r < kTileRows; ++r) {
    for (int64_t j = 0; j < kWidth; ++j) c[r * kWidth + j] = acc[r][j];
  }
}

#if defined(__x86_64__)
// 4 x 32 on AVX-512: eight accumulators, two B vectors and a broadcast per step.
__attribute__((target("avx512f"))) void micro_avx512(const float* a, const float* const* rows, int64_t depth, float* c,
                                                      bool accumulate) {
  __m512 acc[kTileRows][2];
  for (int64_t r = 0; r < kTileRows; ++r) {
    for (int64_t h = 0; h < 2; ++h) acc[r][h] = accumulate ? _mm512_loadu_ps(c + r * 32 + h * 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < depth; ++k, a += kTileRows) {
    const __m512 b0 = _mm512_loadu_ps(rows[k]), b1 = _mm512_loadu_ps(rows[k] + 16);
    for (int64_t r = 0; r < kTileRows; ++r) {
      const __m512 x = _mm512_set1_ps(a[r]);
      acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  for (int64_t r = 0; r < kTileRows; ++r) {
    for (int64_t h = 0; h < 2; ++h) _mm512_storeu_ps(c + r * 32 + h * 16, acc[r][h]);
  }
}

// 4 x 16 on AVX2 + FMA.
__attribute__((target("avx2,fma"))) void micro_avx2(const float* a, const float* const* rows, int64_t depth, float* c,
                                                     bool accumulate) {
  __m256 acc[kTileRows][2];
  for (int64_t r = 0; r < kTileRows; ++r) {
    for (int64_t h = 0; h < 2; ++h) acc[r][h] = accumulate ? _mm256_loadu_ps(c + r * 16 + h * 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < depth; ++k, a += kTileRows) {
    const __m256 b0 = _mm256_loadu_ps(rows[k]), b1 = _mm256_loadu_ps(rows[k] + 8);
    for (int64_t r = 0; r < kTileRows; ++r) {
      const __m256 x = _mm256_set1_ps(a[r]);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  for (int64_t r = 0; r < kTileRows; ++r) {
    for (int64_t h = 0; h < 2; ++h) _mm256_storeu_ps(c + r * 16 + h * 8, acc[r][h]);
  }
}
#elif defined(__aarch64__)
// 4 x 8 on NEON (vfmaq: fused, as the x86 tiles).
void micro_neon(const float* a, const float* const* rows, int64_t depth, float* c, bool accumulate) {
  float32x4_t acc[kTileRows][2];
  for (int64_t r = 0; r < kTileRows; ++r) {
    for (int64_t h = 0; h < 2; ++h) acc[r][h] = accumulate ? vld1q_f32(c + r * 8 + h * 4) : vdupq_n_f32(0.0f);
  }
  for (int64_t k = 0; k < depth; ++k, a += kTileRows) {
    const float32x4_t b0 = vld1q_f32(rows[k]), b1 = vld1q_f32(rows[k] + 4);
    for (int64_t r = 0; r < kTileRows; ++r) {
      acc[r][0] = vfmaq_n_f32(acc[r][0], b0, a[r]);
      acc[r][1] = vfmaq_n_f32(acc[r][1], b1, a[r]);
    }
  }
  for (int64_t r = 0; r < kTileRows; ++r) {
    for (int64_t h = 0; h < 2; ++h) vst1q_f32(c + r * 8 + h * 4, acc[r][h]);
  }
}
#endif

struct Micro {
  MicroKernel kernel;
  int64_t width;
};

// The widest tile this CPU runs; $LOWBIT_FLOAT_TILE = avx2 or portable picks a narrower one (the tests
// compare them).
Micro pick_micro() {
  const char* env = std::getenv("LOWBIT_FLOAT_TILE");
  const std::string wanted = env ? env : "";
  if (wanted == "portable") return {micro_portable, 8};
#if defined(__x86_64__)
  if (wanted != "avx2" && cpu_features().avx512f) return {micro_avx512, 32};
  if (cpu_features().avx2 && cpu_features().fma) return {micro_avx2, 16};
#elif defined(__aarch64__)
  return {micro_neon, 8};
#endif
  return {micro_portable, 8};
}

const Micro& micro() {
  static const Micro chosen = pick_micro();
  return chosen;
}

}  // namespace

PackedWeights pack_weights(const float* w, int64_t rows, int64_t depth, int64_t row_stride, int64_t depth_stride) {
  PackedWeights p;
  p.rows = rows, p.depth = depth;
  const int64_t panels = (rows + kTileRows - 1) / kTileRows;
  p.panels.assign(static_cast<size_t>(panels * kTileRows * depth), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = p.panels.data() + (r / kTileRows) * kTileRows * depth + r % kTileRows;
    for (int64_t k = 0; k < depth; ++k) dst[k * kTileRows] = w[r * row_stride + k * depth_stride];
  }
  return p;
}

int64_t tile_columns() { return micro().width; }

void PackedColumns::tile_rows(int64_t col0, const float** rows) const {
  for (int64_t k = 0; k < depth; ++k) rows[k] = tiles.data() + col0 * depth + k * width;
}

PackedColumns pack_columns(const float* w, int64_t depth, int64_t columns, int64_t depth_stride, int64_t column_stride) {
  PackedColumns p;
  p.depth = depth, p.columns = columns, p.width = tile_columns();
  const int64_t tiles = (columns + p.width - 1) / p.width;
  p.tiles.assign(static_cast<size_t>(tiles * p.width * depth), 0.0f);
  for (int64_t j = 0; j < columns; ++j) {
    float* dst = p.tiles.data() + (j / p.width) * p.width * depth + j % p.width;
    for (int64_t k = 0; k < depth; ++k) dst[k * p.width] = w[k * depth_stride + j * column_stride];
  }
  return p;
}

void sgemm(const PackedWeights& a, int64_t columns, const ColumnSource& source, const TileSink& sink,
           const ParallelFor& parallel) {
  const Micro m = micro();
  const int64_t width = m.width, tiles = (columns + width - 1) / width;
  const int64_t panels = (a.rows + kTileRows - 1) / kTileRows;
  parallel(tiles, [&](int64_t first, int64_t last) {
    std::vector<float> b(static_cast<size_t>(a.depth * width)), c(static_cast<size_t>(panels * kTileRows * width));
    std::vector<const float*> rows(static_cast<size_t>(a.depth));
    for (int64_t t = first; t < last; ++t) {
      const int64_t col0 = t * width, count = std::min(width, columns - col0);
      if (count < width) std::fill(b.begin(), b.end(), 0.0f);  // B's missing columns are 0, never garbage
      source(col0, count, b.data(), width, rows.data());
      for (int64_t k0 = 0; k0 < a.depth; k0 += kDepthBlock) {
        const int64_t depth = std::min(kDepthBlock, a.depth - k0);
        for (int64_t p = 0; p < panels; ++p) {
          m.kernel(a.panels.data() + (p * a.depth + k0) * kTileRows, rows.data() + k0, depth,
                   c.data() + p * kTileRows * width, k0 > 0);
        }
      }
      sink(col0, count, c.data(), width);
    }
  });
}

}  // namespace lowbit
