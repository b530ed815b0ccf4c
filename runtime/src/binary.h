// Weight layers on the bit-serial kernels (csrc/driver.h): the same claim rule, BatchNorm folding and kernel
// arguments as the Python x86 backend (lowbit/export/backends/x86/__init__.py and binary.py).
#pragma once

#include <memory>

#include "driver.h"
#include "graph.h"

namespace lowbit {

struct BinaryLayer {
  const Node* layer = nullptr;
  const Node* act = nullptr;           // the coded quant_act whose input the layer packs
  const Node* norm = nullptr;          // the BatchNorm folded into the thresholds (the layer packs its input)
  std::vector<const Node*> chain;      // reflect/replicate pads, nearest resizes, reshapes in between
  int source = -1;                     // node the activation reads (-1: the graph input)
  bool ties_up = true;                 // sign: bit where x - t >= 0; else bit where t - x >= 0
  float threshold = 0.0f;
  // Multi-level or BatchNorm-folded input (driver.h LevelCode): thresholds (C, count), signs (C); empty: sign bits.
  std::vector<float> thresholds, signs;
  int64_t count = 0;
  Shape packed;                        // per-sample (C, H, W) the kernel packs
  std::vector<std::vector<uint64_t>> w_ts;
  std::vector<int64_t> phases;
  std::vector<double> coef2, offset2, base;
  int64_t rows_padded = 0, planes = 0, steps[4] = {1, 1, 1, 1};
};

// The binary layer for node `index`, or nullptr when the kernels do not take it.
std::unique_ptr<BinaryLayer> plan_binary(const Graph& graph, int index);

// Runs the layer on `source` (the activation's input) with kernel path `path` into out (full NCHW shape set).
void run_binary(const BinaryLayer& layer, const Tensor& source, int64_t path, const ParallelFor& parallel, Tensor& out);

}  // namespace lowbit
