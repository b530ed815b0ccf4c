// The float reference of every IR op (lowbit.export.backends.torch): naive loops, float32 values.
#pragma once

#include "graph.h"

namespace lowbit {

// Runs `node` on its inputs into `out`, whose shape the caller set (infer_shape) and whose data it sized.
void run_op(const Node& node, const std::vector<const Tensor*>& inputs, Tensor& out);

// x - shift[c] along dim 1 (a quant_act's per-channel shift), in place.
void subtract_shift(Tensor& x, const std::vector<float>& shift);

// Ops that the binary layers apply to their float input before packing (pads, nearest resize, reshape).
void pad_tensor(const Tensor& x, const std::vector<int64_t>& pad, const std::string& mode, double value, Tensor& out);
Shape padded_shape(const Shape& x, const std::vector<int64_t>& pad);

}  // namespace lowbit
