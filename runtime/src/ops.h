// The float code of every IR op (lowbit.export.backends.torch): float32 values; conv / linear products on
// sgemm.h.
#pragma once

#include "activation.h"
#include "graph.h"

namespace lowbit {

// body(0, n) on the calling thread.
const ParallelFor& serial();

// Runs `node` on its inputs into `out`, whose shape the caller set (infer_shape) and whose data it sized
// (channels-last inputs stay so where the op takes them, else are read through an NCHW copy), then applies `then` (the element-wise activation fused into this op: in the op's own pass for float layers
// and batch / instance norms); the float layers' products share out their column tiles through `parallel`.
void run_op(const Node& node, const std::vector<const Tensor*>& inputs, Tensor& out,
            const ParallelFor& parallel = serial(), const Activation& then = Activation());

// Packs a conv2d / conv_transpose2d / linear node's float weight for its product, given its full input shape.
void prepare_float_layer(Node& node, const Shape& input);

// x - shift[c] along dim 1 (a quant_act's per-channel shift), in place.
void subtract_shift(Tensor& x, const Floats& shift);

// A (n, pixels, c) channels-last block of values as (n, c, pixels) at `out`.
void channels_first(const float* nhwc, int64_t n, int64_t pixels, int64_t c, float* out);
// x in NCHW order into `out` (a plain copy when x is not channels-last).
void to_channels_first(const Tensor& x, Tensor& out);

// Ops that the binary layers apply to their float input before packing (pads, nearest resize, reshape).
void pad_tensor(const Tensor& x, const std::vector<int64_t>& pad, const std::string& mode, double value, Tensor& out);
Shape padded_shape(const Shape& x, const std::vector<int64_t>& pad);

}  // namespace lowbit
