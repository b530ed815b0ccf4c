// The float layers' matrix product C = A x B (docs/export.md "Float layers"): A a weight matrix packed once
// at load, B gathered tile by tile (conv patches, transposed-conv inputs, linear rows), C handed over a column
// tile at a time. Register-tiled micro-kernels with fused multiply-adds (AVX-512, AVX2+FMA, NEON; a plain
// multiply-then-add fallback), picked at run time from the CPU. Every C value is the sum over k in ascending
// order started from 0, whatever the thread count or tile, so results do not depend on threads.
#pragma once

#include <cstdint>
#include <vector>

#include "driver.h"

namespace lowbit {

constexpr int64_t kTileRows = 4;  // rows of A (and C) one micro-kernel call covers

// A (rows x depth), packed in panels of kTileRows rows, depth-major inside a panel, zero rows at the end.
struct PackedWeights {
  int64_t rows = 0, depth = 0;
  std::vector<float> panels;
};

// Packs A[r][k] = w[r * row_stride + k * depth_stride].
PackedWeights pack_weights(const float* w, int64_t rows, int64_t depth, int64_t row_stride, int64_t depth_stride);

// Columns of the micro-kernel this CPU runs (a multiple of 8).
int64_t tile_columns();

// A constant B (depth x columns) packed once in blocks of tile_columns() columns, zero columns at the end.
struct PackedColumns {
  int64_t depth = 0, columns = 0, width = 0;
  std::vector<float> tiles;
  // rows[k] of the tile holding column col0 (a multiple of width).
  void tile_rows(int64_t col0, const float** rows) const;
};

// Packs B[k][j] = w[k * depth_stride + j * column_stride].
PackedColumns pack_columns(const float* w, int64_t depth, int64_t columns, int64_t depth_stride, int64_t column_stride);

// B's columns [col0, col0 + count) as depth rows of width = tile_columns() values: rows[k] points at
// B[k][col0 .. col0 + width), either in scratch (depth x width, gathered there; sgemm zeroes columns
// count.. width first) or straight into the source's own data (a packed PackedColumns tile, or input rows
// that already lie contiguous: no copy).
using ColumnSource =
    FunctionRef<void(int64_t col0, int64_t count, float* scratch, int64_t width, const float** rows)>;
// Receives C[r][col0 + j] = block[r * width + j] for r < rows, j < count.
using TileSink = FunctionRef<void(int64_t col0, int64_t count, const float* block, int64_t width)>;

// C = A x B over `columns` columns of B, column tiles shared among the threads of `parallel`.
void sgemm(const PackedWeights& a, int64_t columns, const ColumnSource& source, const TileSink& sink,
           const ParallelFor& parallel);

}  // namespace lowbit
