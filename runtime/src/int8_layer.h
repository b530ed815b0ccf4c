// Weight layers on the integer kernels (csrc/int8.h): the same claim rule and kernel arguments as the Python
// x86 backend's integer path (lowbit/export/backends/x86/int8.py), for layers the binary kernels do not take.
#pragma once

#include <memory>

#include "binary.h"
#include "int8.h"

namespace lowbit {

struct Int8Layer {
  const Node* layer = nullptr;
  KernelSource input;                  // the uniform quant_act, the ops in between, what the kernel sees
  std::vector<std::vector<int32_t>> w_ts;
  std::vector<int64_t> phases;
  std::vector<double> coef, offset;
  AllOnesBase base;
  std::vector<float> bounds;           // -inf, the activation's float32 midpoints, +inf
  float lo = 0.0f, inv_step = 1.0f;
  int64_t co_pad = 0, steps[4] = {1, 1, 1, 1};
  bool wide = false;                   // some weight byte outside [-64, 64] (int8.h Int8Conv::wide), found once here
};

// The integer layer for node `index` (an affine packed weight fed by 3..256 evenly spaced levels), or nullptr.
std::unique_ptr<Int8Layer> plan_int8(const Graph& graph, int index);

// Runs the layer on `source` (the activation's input) with kernel path `path` into out (full NCHW shape set).
void run_int8(const Int8Layer& layer, const Tensor& source, int64_t path, const ParallelFor& parallel, Tensor& out);

}  // namespace lowbit
