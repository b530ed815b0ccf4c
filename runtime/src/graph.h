// The runtime's view of a packed file: stored tensors, IR nodes with parsed attributes, float tensors.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "../include/lowbit.h"
#include "json.h"
#include "sgemm.h"

namespace lowbit {

// Every failure inside the library: a LOWBIT_ERROR_* code and the message lowbit_last_error() returns.
struct Error : std::runtime_error {
  Error(int code, const std::string& message) : std::runtime_error(message), code(code) {}
  int code;
};

// A damaged or inconsistent file (LOWBIT_ERROR_FORMAT), with the advice the Python reader gives.
Error damaged(const std::string& what);
// A node's field is wrong: names the node and the field.
Error bad_node(const std::string& node, const std::string& what);

using Shape = std::vector<int64_t>;
constexpr size_t kMaxRank = 8;  // of any tensor, the batch included
int64_t numel(const Shape& shape);
std::string shape_text(const Shape& shape);  // "[2, 16]", as Python prints a list

// A float32 tensor owned by the runtime: row-major over `shape` (N, C, ...), or for a rank-4 shape with
// channels_last set, stored (N, H, W, C) as the kernel layers write it (ops that take that layout keep it).
// An allocator whose growth leaves new floats uninitialised: every op writes all of its output before anything reads
// it, so a pooled buffer reused for a larger value costs no memset.
template <typename T>
struct Uninitialised : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = Uninitialised<U>;
  };
  Uninitialised() = default;
  template <typename U>
  Uninitialised(const Uninitialised<U>&) noexcept {}
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
using Floats = std::vector<float, Uninitialised<float>>;

struct Tensor {
  Shape shape;
  Floats data;
  bool channels_last = false;
};

// A tensor as stored in the file: bytes inside the file's buffer, checked against dtype and shape.
struct Stored {
  std::string dtype;  // safetensors name: F32, U8, ...
  Shape shape;
  const uint8_t* data = nullptr;
  size_t bytes = 0;
};

// Interpolation as torch computes it: output size, and the scale used for source indices (0: in/out).
struct Resize {
  int64_t size[2] = {0, 0};
  double scale[2] = {0.0, 0.0};
  bool nearest = true, align_corners = false;
};

// The attributes of all ops, parsed and checked once at load (only the fields of the node's op are set).
struct Attrs {
  int64_t stride[2] = {1, 1}, padding[2] = {0, 0}, dilation[2] = {1, 1}, output_padding[2] = {0, 0};
  int64_t kernel[2] = {1, 1};
  int64_t groups = 1, in_channels = 0, out_channels = 0;
  std::vector<int64_t> pad;  // F.pad order: last dim's (before, after) first
  std::string pad_mode = "constant";
  double pad_value = 0.0;
  Resize resize;
  int64_t factor = 1, dim = 0, norm_groups = 1;
  Shape shape;                // reshape (per sample; {-1} flattens), layer_norm's normalized shape
  std::vector<int64_t> dims;  // permute, mean (full rank, batch = 0)
  bool keepdim = false, running_stats = false, has_scalar = false, scalar_first = false, gelu_tanh = false;
  double eps = 0.0, slope = 0.0, alpha = 0.0, min_val = 0.0, max_val = 0.0, scalar = 0.0;
};

// A weight layer's weight in torch's layout: the stored float values, or a packed weight's codes and codebook
// (its float values are decoded only where the float code needs them: decode()).
struct Weight {
  Shape shape;                  // conv (Co, Ci/g, kh, kw), transposed conv (Ci, Co/g, kh, kw), linear (out, in)
  Floats values;                // the stored float weight (empty for a packed one)
  bool packed = false, affine = false, sparse = false;
  int64_t channel_dim = 0, levels = 0;
  int64_t inner = 1;            // packed: values in a run sharing one codebook row (the sizes after channel_dim)
  std::vector<uint8_t> codes;   // packed weights: code_bits bits a code, lowest bits first (0 where pruned)
  int code_bits = 8;            // 1, 2 or 4 as stored, 8 for pruned weights (expanded at load)
  std::vector<uint8_t> keep;    // sparse (pruned) weights: 1 per kept value, 0 per pruned one
  std::vector<float> codebook;  // (rows, levels), rows = shape[channel_dim]
  std::vector<float> bias;      // empty when the layer has none
  // Values [first, first + count) in storage order into `out`: codebook[row, code] (0 where pruned; row = the
  // index along channel_dim), exactly the simulated layer's weight, or the stored float values.
  void decode(int64_t first, int64_t count, float* out) const;
  // Codes [first, first + count) of a packed weight, one byte each, into `out`.
  void unpack(int64_t first, int64_t count, uint8_t* out) const;
  // The float code's product operand, packed at load (prepare_float_layer): per group A (conv, transposed
  // conv), or B (linear, latent transposed conv).
  std::vector<PackedWeights> gemm;
  PackedColumns columns;
};

struct Node {
  std::string name, op, module;
  std::vector<int> inputs;  // node indices; -1 is the graph input
  Attrs attrs;
  Weight weight;                       // conv2d, conv_transpose2d, linear
  std::map<std::string, Tensor> tensors;  // norms, quant_act, prelu, constant: float32 tensors by field
  Shape out_shape;                     // per sample (constants: the full value shape)
};

struct Graph {
  std::vector<Node> nodes;
  int output = -1;
  Shape input_shape, output_shape;
};

// Codes [first, first + count) of `width` bits (1, 2, 4 or 8; lowest bits first) from `packed`, a byte each.
void unpack_codes(const uint8_t* packed, int width, int64_t first, int64_t count, uint8_t* out);

// Every code of a packed weight, one byte each, in a per-thread buffer (valid until this thread's next call).
const uint8_t* unpacked_codes(const Weight& w);

// Reads and checks a packed file held in data[0, size) (which must outlive nothing: everything is copied out).
Graph load_graph(const uint8_t* data, size_t size);

// Output shape of `node` for full input shapes (batch first; constants have no batch).
Shape infer_shape(const Node& node, const std::vector<const Shape*>& inputs);

}  // namespace lowbit
