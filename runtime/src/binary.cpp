// Planning a binary layer (docs/export.md "Kernels"): bit planes of the codes in word-major rows per phase,
// coefficients and offsets times the input's bit weight, and the input-independent term `base`.
#include "binary.h"

#include <cmath>

#include "ops.h"

namespace lowbit {

Geometry geometry(const Node& node) {
  const Attrs& a = node.attrs;
  const Shape& s = node.weight.shape;
  if (node.op == "linear") return {s[0], s[1], 1, 1, {1, 1}, {0, 0}, {1, 1}, s[1], 1, 1};
  const bool transposed = node.op == "conv_transpose2d";
  const int64_t co = transposed ? s[1] : s[0], ci = transposed ? s[0] : s[1], taps = s[2] * s[3];
  return {co, ci, s[2], s[3], {a.stride[0], a.stride[1]}, {a.padding[0], a.padding[1]}, {a.dilation[0], a.dilation[1]},
          transposed ? taps : ci * taps, transposed ? co * taps : taps, s[3]};
}

// (kernel indices, input offsets) of one axis of one phase: all taps for a conv, the sub-pixel subset for a
// transposed conv (taps k with (phase + padding - k * dilation) divisible by the stride).
void axis_taps(const Node& node, const Geometry& g, int dim, int64_t phase, std::vector<int64_t>& ks,
               std::vector<int64_t>& offsets) {
  const int64_t kernel = dim == 0 ? g.kh : g.kw;
  for (int64_t k = 0; k < kernel; ++k) {
    if (node.op != "conv_transpose2d") {
      ks.push_back(k), offsets.push_back(k * g.dilation[dim] - g.padding[dim]);
      continue;
    }
    const int64_t shifted = phase + g.padding[dim] - k * g.dilation[dim];
    if (shifted % g.stride[dim] != 0) continue;
    ks.push_back(k);
    // floor division, as Python's //
    offsets.push_back(shifted >= 0 ? shifted / g.stride[dim] : -((-shifted + g.stride[dim] - 1) / g.stride[dim]));
  }
}

namespace {

bool commutes(const Node& node) {
  if (node.op == "pad") return node.attrs.pad_mode == "reflect" || node.attrs.pad_mode == "replicate";
  if (node.op == "interpolate") return node.attrs.resize.nearest;
  return node.op == "reshape";
}

bool two_level(const Node& act, float& low, float& high) {
  if (act.op != "quant_act") return false;
  const std::vector<float>& levels = act.tensors.at("levels").data;
  if (levels.size() != 2) return false;
  low = std::min(levels[0], levels[1]), high = std::max(levels[0], levels[1]);
  return high > low;
}

// Planes: bit b of the codes (affine codebooks) or code == level (tables); w = offset + sum_p coef[p] plane_p.
void planes_of(const Node& node, int64_t co, std::vector<std::vector<uint8_t>>& planes, std::vector<double>& coef,
               std::vector<double>& offset) {
  const Weight& w = node.weight;
  const int64_t levels = w.levels;
  offset.resize(static_cast<size_t>(co));
  for (int64_t c = 0; c < co; ++c) offset[static_cast<size_t>(c)] = w.codebook[static_cast<size_t>(c * levels)];
  if (w.affine) {
    const int64_t bits = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::log2(static_cast<double>(levels)))));
    for (int64_t b = 0; b < bits; ++b) {
      std::vector<uint8_t> plane(w.codes.size());
      for (size_t i = 0; i < plane.size(); ++i) plane[i] = (w.codes[i] >> b) & 1;
      planes.push_back(std::move(plane));
      for (int64_t c = 0; c < co; ++c) {
        const double scale = levels > 1 ? static_cast<double>(w.codebook[static_cast<size_t>(c * levels + 1)]) -
                                              static_cast<double>(w.codebook[static_cast<size_t>(c * levels)])
                                        : 0.0;
        coef.push_back(scale * std::ldexp(1.0, static_cast<int>(b)));
      }
    }
    return;
  }
  for (int64_t level = 1; level < levels; ++level) {
    std::vector<uint8_t> plane(w.codes.size());
    for (size_t i = 0; i < plane.size(); ++i) plane[i] = w.codes[i] == level;
    planes.push_back(std::move(plane));
    for (int64_t c = 0; c < co; ++c) {
      coef.push_back(static_cast<double>(w.codebook[static_cast<size_t>(c * levels + level)]) -
                     static_cast<double>(w.codebook[static_cast<size_t>(c * levels)]));
    }
  }
}

void build_phases(BinaryLayer& b, const Geometry& g, const std::vector<std::vector<uint8_t>>& planes) {
  const int64_t wc = (g.ci + 63) / 64, rows = b.planes * g.co;
  b.rows_padded = (rows + 7) / 8 * 8;
  for (const PhaseTaps& phase : layer_phases(*b.layer, g, b.phases, b.steps)) {
    const std::vector<int64_t>&kh = phase.kh, &kw = phase.kw;
    const int64_t taps = static_cast<int64_t>(kh.size() * kw.size());
    std::vector<uint64_t> w_t(static_cast<size_t>(taps * wc * b.rows_padded), 0);
    for (int64_t p = 0; p < b.planes; ++p) {
      for (int64_t c = 0; c < g.co; ++c) {
        const int64_t row = p * g.co + c;
        for (size_t y = 0; y < kh.size(); ++y) {
          for (size_t z = 0; z < kw.size(); ++z) {
            const int64_t tap = static_cast<int64_t>(y * kw.size() + z);
            for (int64_t ci = 0; ci < g.ci; ++ci) {
              if (!planes[static_cast<size_t>(p)][static_cast<size_t>(g.index(c, ci, kh[y], kw[z]))]) continue;
              w_t[static_cast<size_t>((tap * wc + ci / 64) * b.rows_padded + row)] |= uint64_t{1} << (ci % 64);
            }
          }
        }
      }
    }
    b.w_ts.push_back(std::move(w_t));
  }
}

}  // namespace

// bias + c * (the layer on an all-ones input of the packed size), (Ho, Wo, Co) in float64.
std::vector<double> all_ones_base(const Node& node, const Shape& packed, double c_term, const Shape& out) {
  const Geometry g = geometry(node);
  const int64_t h = packed[1], w = packed[2], ho = out[0], wo = out[1];
  std::vector<double> tap_sum(static_cast<size_t>(g.co * g.kh * g.kw), 0.0);  // sum over input channels
  for (int64_t c = 0; c < g.co; ++c) {
    for (int64_t y = 0; y < g.kh; ++y) {
      for (int64_t z = 0; z < g.kw; ++z) {
        double sum = 0.0;
        for (int64_t ci = 0; ci < g.ci; ++ci) sum += node.weight.values[static_cast<size_t>(g.index(c, ci, y, z))];
        tap_sum[static_cast<size_t>((c * g.kh + y) * g.kw + z)] = sum;
      }
    }
  }
  std::vector<double> corr(static_cast<size_t>(ho * wo * g.co), 0.0);
  auto link = [&](int64_t oh, int64_t ow, int64_t y, int64_t z) {
    for (int64_t c = 0; c < g.co; ++c) {
      corr[static_cast<size_t>((oh * wo + ow) * g.co + c)] += tap_sum[static_cast<size_t>((c * g.kh + y) * g.kw + z)];
    }
  };
  const bool transposed = node.op == "conv_transpose2d";
  // Every (input pixel, output pixel) pair a tap links: output -> input for a conv, input -> output transposed.
  const int64_t rows = transposed ? h : ho, cols = transposed ? w : wo, other_h = transposed ? ho : h,
                other_w = transposed ? wo : w;
  for (int64_t y = 0; y < g.kh; ++y) {
    for (int64_t z = 0; z < g.kw; ++z) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t rh = r * g.stride[0] - g.padding[0] + y * g.dilation[0];
        if (rh < 0 || rh >= other_h) continue;
        for (int64_t q = 0; q < cols; ++q) {
          const int64_t rw = q * g.stride[1] - g.padding[1] + z * g.dilation[1];
          if (rw < 0 || rw >= other_w) continue;
          if (transposed) link(rh, rw, y, z);
          else link(r, q, y, z);
        }
      }
    }
  }
  std::vector<double> base(corr.size());
  for (size_t k = 0; k < corr.size(); ++k) {
    const int64_t c = static_cast<int64_t>(k) % g.co;
    base[k] = c_term * corr[k] + (node.weight.bias.empty() ? 0.0 : static_cast<double>(node.weight.bias[static_cast<size_t>(c)]));
  }
  return base;
}

std::vector<PhaseTaps> layer_phases(const Node& node, const Geometry& g, std::vector<int64_t>& phases, int64_t steps[4]) {
  const bool transposed = node.op == "conv_transpose2d";
  const int64_t sh = transposed ? g.stride[0] : 1, sw = transposed ? g.stride[1] : 1;
  std::vector<PhaseTaps> all;
  for (int64_t ph = 0; ph < sh; ++ph) {
    for (int64_t pw = 0; pw < sw; ++pw) {
      PhaseTaps phase;
      std::vector<int64_t> th, tw;
      axis_taps(node, g, 0, ph, phase.kh, th);
      axis_taps(node, g, 1, pw, phase.kw, tw);
      phases.insert(phases.end(), {ph, pw, static_cast<int64_t>(th.size()), static_cast<int64_t>(tw.size())});
      phases.insert(phases.end(), th.begin(), th.end());
      phases.insert(phases.end(), tw.begin(), tw.end());
      all.push_back(std::move(phase));
    }
  }
  steps[0] = transposed ? 1 : g.stride[0], steps[1] = transposed ? 1 : g.stride[1];
  steps[2] = sh, steps[3] = sw;
  return all;
}

Tensor kernel_input(const Node& act, const std::vector<const Node*>& chain, const Node& layer, const Tensor& source) {
  const int64_t n = source.shape[0];
  Tensor x = source;
  if (act.tensors.count("shift")) subtract_shift(x, act.tensors.at("shift").data);
  for (const Node* step : chain) {
    Tensor next;
    next.shape = {n};
    next.shape.insert(next.shape.end(), step->out_shape.begin(), step->out_shape.end());
    next.data.resize(static_cast<size_t>(numel(next.shape)));
    run_op(*step, {&x}, next);
    x = std::move(next);
  }
  if (!layer.attrs.pad.empty()) {
    Tensor padded;
    pad_tensor(x, layer.attrs.pad, layer.attrs.pad_mode, 0.0, padded);
    x = std::move(padded);
  }
  return x;
}

void channels_first(const std::vector<float>& nhwc, int64_t n, int64_t pixels, int64_t co, Tensor& out) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t p = 0; p < pixels; ++p) {
      for (int64_t c = 0; c < co; ++c) {
        out.data[static_cast<size_t>((i * co + c) * pixels + p)] = nhwc[static_cast<size_t>((i * pixels + p) * co + c)];
      }
    }
  }
}

bool kernel_source(const Graph& graph, int index, KernelSource& found) {
  const Node& node = graph.nodes[static_cast<size_t>(index)];
  const bool weight_op = node.op == "conv2d" || node.op == "conv_transpose2d" || node.op == "linear";
  if (!weight_op || !node.weight.packed || node.attrs.groups != 1) return false;
  if (!node.attrs.pad.empty() && node.attrs.pad_mode == "constant") return false;
  int current = node.inputs[0];
  while (current >= 0 && commutes(graph.nodes[static_cast<size_t>(current)])) {
    found.chain.insert(found.chain.begin(), &graph.nodes[static_cast<size_t>(current)]);
    current = graph.nodes[static_cast<size_t>(current)].inputs[0];
  }
  if (current < 0 || graph.nodes[static_cast<size_t>(current)].op != "quant_act") return false;
  found.act = &graph.nodes[static_cast<size_t>(current)];
  found.source = found.act->inputs[0];
  for (const Node* step : found.chain) {
    if (step->op == "reshape" && node.op != "linear") return false;
  }
  // What the kernel packs: the last commuting op's output, padded by the layer's own reflect/replicate pad.
  const Shape& before = found.chain.empty() ? (found.source < 0 ? graph.input_shape : graph.nodes[static_cast<size_t>(found.source)].out_shape)
                                            : found.chain.back()->out_shape;
  if (node.op == "linear") {
    if (before.size() != 1) return false;
    found.packed = {before[0], 1, 1};
  } else {
    found.packed = node.attrs.pad.empty() ? before : padded_shape(before, node.attrs.pad);
  }
  return found.source < 0 || graph.nodes[static_cast<size_t>(found.source)].op != "constant";
}

std::unique_ptr<BinaryLayer> plan_binary(const Graph& graph, int index) {
  const Node& node = graph.nodes[static_cast<size_t>(index)];
  KernelSource found;
  float low = 0.0f, high = 0.0f;
  if (!kernel_source(graph, index, found) || !two_level(*found.act, low, high)) return nullptr;
  auto b = std::make_unique<BinaryLayer>();
  b->layer = &node;
  b->act = found.act, b->chain = found.chain, b->source = found.source, b->packed = found.packed;
  // Sign (levels {-1, +1}) ties go up: a = 2, c = -1; otherwise ties go to `low`: a = -(high - low), c = high.
  const double gap = static_cast<double>(high) - static_cast<double>(low);
  b->ties_up = low == -1.0f && high == 1.0f;
  b->threshold = static_cast<float>((static_cast<double>(low) + static_cast<double>(high)) / 2.0);
  const double a_term = b->ties_up ? gap : -gap, c_term = b->ties_up ? low : high;
  const Geometry g = geometry(node);
  std::vector<std::vector<uint8_t>> planes;
  std::vector<double> coef, offset;
  planes_of(node, g.co, planes, coef, offset);
  b->planes = static_cast<int64_t>(planes.size());
  if (b->planes == 0) return nullptr;  // a one-level codebook: nothing to count, the float path is exact
  for (double& v : coef) v *= a_term;
  for (double& v : offset) v *= a_term;
  b->coef2 = coef, b->offset2 = offset;
  build_phases(*b, g, planes);
  const Shape& out = node.out_shape;
  b->base = all_ones_base(node, b->packed, c_term, node.op == "linear" ? Shape{1, 1} : Shape{out[1], out[2]});
  return b;
}

void run_binary(const BinaryLayer& b, const Tensor& source, int64_t path, const ParallelFor& parallel, Tensor& out) {
  const int64_t n = source.shape[0];
  Tensor x = kernel_input(*b.act, b.chain, *b.layer, source);
  // The kernels pack bit = (value >= 0): value x - t when ties go up, t - x otherwise (bit marks `low`).
  const float t = b.threshold;
  if (!b.ties_up) {
    for (float& v : x.data) v = t - v;
  } else if (t != 0.0f) {
    for (float& v : x.data) v = v - t;
  }
  BinaryConv call;
  call.x = Image{x.data.data(), true, n, b.packed[0], b.packed[1], b.packed[2]};
  for (const auto& w_t : b.w_ts) {
    call.w_ts.push_back(w_t.data());
    call.w_t_words.push_back(static_cast<int64_t>(w_t.size()) / b.rows_padded);
  }
  call.rows_padded = b.rows_padded;
  call.phases = b.phases;
  call.coef2 = b.coef2.data(), call.offset2 = b.offset2.data(), call.base = b.base.data();
  const int64_t co = static_cast<int64_t>(b.offset2.size());
  const bool flat = b.layer->op == "linear";
  call.ho = flat ? 1 : out.shape[2], call.wo = flat ? 1 : out.shape[3], call.co = co, call.planes = b.planes;
  for (int k = 0; k < 4; ++k) call.steps[k] = b.steps[k];
  call.path = path;
  const std::string bad = check_binary_conv(call);
  if (!bad.empty()) throw bad_node(b.layer->name, "binary kernel arguments: " + bad);
  std::vector<float> nhwc(static_cast<size_t>(n * call.ho * call.wo * co));
  run_binary_conv(call, nhwc.data(), parallel);
  channels_first(nhwc, n, call.ho * call.wo, co, out);
}

}  // namespace lowbit
