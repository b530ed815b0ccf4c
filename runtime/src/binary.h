// Weight layers on the bit-serial kernels (csrc/driver.h): the same claim rule, BatchNorm folding and kernel
// arguments as the Python x86 backend (lowbit/export/backends/x86/__init__.py and binary.py).
#pragma once

#include <memory>

#include "driver.h"
#include "graph.h"

namespace lowbit {

// A layer's all-ones base per border class (csrc/kernels.h BaseMap): `values` (entries, Co) and, per output row
// and column, its class's index (rows already multiplied by the column classes).
struct AllOnesBase {
  std::vector<double> values;
  std::vector<int64_t> rows, cols;
  int64_t entries = 0;
  BaseMap map() const { return BaseMap{values.data(), rows.data(), cols.data(), entries}; }
};

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
  std::vector<double> coef2, offset2;
  AllOnesBase base;
  int64_t rows_padded = 0, planes = 0, steps[4] = {1, 1, 1, 1};
  PackGeometry input_pad;              // the zero border of the bit image its input is packed into (any batch)
  // The integer epilogue of its sink when it packs for a reader (kernels.h BitSink::cuts; plan_cuts).
  std::vector<int64_t> cuts, slopes;
  std::vector<uint64_t> flips;
};

// A weight layer as a conv: sizes, hyper-parameters, and the strides of (output channel, input channel, tap
// row) in its stored weight (conv (Co, Ci, kh, kw), transposed conv (Ci, Co, kh, kw), linear (Co, Ci)).
struct Geometry {
  int64_t co, ci, kh, kw, stride[2], padding[2], dilation[2];
  int64_t step_co, step_ci, step_y;

  int64_t index(int64_t c, int64_t i, int64_t y, int64_t z) const { return c * step_co + i * step_ci + y * step_y + z; }
};

Geometry geometry(const Node& node);

constexpr int64_t kMaxIntegerLevels = 256;  // x86/__init__.py MAX_INTEGER_LEVELS: signed-byte weight codes

// Whether the integer path can take a weight: packed, affine, unpruned, at most 8 bits (x86 integer_weights).
bool integer_weights(const Weight& w);

// (kernel indices, input offsets) of one axis of one phase (see binary.cpp).
void axis_taps(const Node& node, const Geometry& g, int dim, int64_t phase, std::vector<int64_t>& ks,
               std::vector<int64_t>& offsets);

// The kernel rows and columns one phase of a layer uses.
struct PhaseTaps {
  std::vector<int64_t> kh, kw;
};

// Appends every phase of `node` (one for a conv, stride^2 sub-pixel phases for a transposed conv) to the
// kernels' phase list, sets their [in_step_h, in_step_w, out_step_h, out_step_w], returns each phase's taps.
std::vector<PhaseTaps> layer_phases(const Node& node, const Geometry& g, std::vector<int64_t>& phases, int64_t steps[4]);

// bias + c_term * (the layer on an all-ones input of the packed (C, H, W) size) for the (Ho, Wo) output pixels,
// in float64, one Co-vector per border class: the input-independent term of the binary and the integer path.
// `ones`: per (output channel, tap) the codes 1 of a two-level weight, when the caller has counted them.
AllOnesBase all_ones_base(const Node& node, const Shape& packed, double c_term, const Shape& out,
                          const std::vector<int64_t>* ones = nullptr);

// The activation a kernel layer reads through: a quant_act, the commuting ops (reflect / replicate pads, nearest
// resizes, reshapes before a linear layer) in between, the node it reads (-1: the graph input) and the
// per-sample (C, H, W) the kernel sees (after the layer's own pad).
struct KernelSource {
  const Node* act = nullptr;
  std::vector<const Node*> chain;
  int source = -1;
  Shape packed;
};

// Whether node `index` is an ungrouped packed weight layer fed by a quant_act that way (then `found` is set).
bool kernel_source(const Graph& graph, int index, KernelSource& found);

// What a kernel layer reads: `source` (the activation's input) minus the activation's shift (when `shifted`; a
// folded BatchNorm holds it in its thresholds), through the commuting `chain` and the layer's own pad: `source`
// itself when there is nothing to apply, else a per-thread buffer reused across calls (valid until the next).
const Tensor& kernel_input(const Node& act, const std::vector<const Node*>& chain, const Node& layer, const Tensor& source,
                           bool shifted = true);

// The arguments every kernel call (driver.h BinaryConv, int8.h Int8Conv) takes from a planned layer: each
// phase's weights and its words per `row_width`-wide row, the phase list, the output size, steps and path.
template <typename Call, typename Word>
void layer_call(Call& call, const std::vector<std::vector<Word>>& w_ts, int64_t row_width, const std::vector<int64_t>& phases,
                const Node& layer, const Tensor& out, const int64_t steps[4], int64_t path) {
  for (const auto& w_t : w_ts) {
    call.w_ts.push_back(w_t.data());
    call.w_t_words.push_back(static_cast<int64_t>(w_t.size()) / row_width);
  }
  call.phases = phases;
  const bool flat = layer.op == "linear";
  call.ho = flat ? 1 : out.shape[2], call.wo = flat ? 1 : out.shape[3];
  for (int k = 0; k < 4; ++k) call.steps[k] = steps[k];
  call.path = path;
}

// Marks `out` as the kernels write a layer's output: (N, Ho, Wo, Co), channels-last when it has several pixels
// (otherwise both layouts agree: a linear layer's N x Co, or 1 x 1 images).
void write_channels_last(const Node& layer, Tensor& out);

// The claim rules of planning (claim.cpp, built for size; comments there): the sorted levels of a quant_act the
// binary kernels code, whether a layer runs as bit planes rather than on the integer path, the float32 midpoints
// of sorted levels, a BatchNorm folded into the thresholds, the BatchNorm the activation reads (-1: none), and
// the weight planes of the codes (Co, levels) with their coefficients and offsets.
bool coded_levels(const Node& act, std::vector<float>& levels);
bool prefers_planes(const Node& node, size_t act_levels);
std::vector<float> midpoints_of(const std::vector<float>& levels);
void fold_norm(BinaryLayer& b, const std::vector<float>& mid, bool ties_up);
int fusable_norm(const Graph& graph, const BinaryLayer& b);
std::vector<uint64_t> planes_of(const Node& node, const Geometry& g, int64_t& count, std::vector<double>& coef,
                                std::vector<double>& offset);

// The binary layer for node `index`, or nullptr when the kernels do not take it or the claim policy
// (x86/__init__.py prefers_planes) gives it to the integer path.
std::unique_ptr<BinaryLayer> plan_binary(const Graph& graph, int index);

// Whether `reader` can take its packed input from the layer it reads (kernels.h BitSink, the fused threshold
// epilogue): one threshold per channel (a BatchNorm folded in front of a two-level activation) and nothing between
// (no chain, pad or shift), reading the `producer`'s whole output as it is.
bool packs_from(const BinaryLayer& reader, const BinaryLayer& producer);

// Whether `producer` can write `reader`'s packed input (packs_from being true), planning the integer epilogue of a
// one-plane combine (kernels.h BitSink::cuts): per border class and channel a fixed-point line in the positives where
// the reader's float rule flips. False when that line cannot be placed with certainty (the rule flips within
// rounding of a count the line misses, a slope past 2^10, or over 2^23 points to check): the layer then stores floats.
bool plan_cuts(BinaryLayer& producer, const BinaryLayer& reader);

// Runs the layer on `source` (the activation's input) with kernel path `path` into out (full NCHW shape set); with
// `packed`, its input bits come from the previous layer's sink instead. With `reader` (packs_from this layer) and a
// kernel of `path` that writes sinks, writes reader's packed input into `bits` instead of `out` and returns true.
bool run_binary(const BinaryLayer& layer, const Tensor& source, int64_t path, const ParallelFor& parallel, Tensor& out,
                const uint64_t* packed = nullptr, const BinaryLayer* reader = nullptr, std::vector<uint64_t>* bits = nullptr);

}  // namespace lowbit
