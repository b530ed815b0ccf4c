// Planning an integer layer (docs/export.md "The integer path"): weight codes as signed bytes in int32 words
// per phase, the combine's coefficients, the all-ones term, and the activation's bucket bounds.
#include "int8_layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace lowbit {
namespace {

constexpr double kUniformSlack = 1e-3;  // in steps, as UNIFORM_SLACK in int8.py

// lo, step and the bucket bounds of 3..256 evenly spaced levels; false for any other activation.
bool uniform_levels(const Node& act, Int8Layer& l, double& step) {
  const Floats& stored = act.tensors.at("levels").data;
  std::vector<float> levels(stored.begin(), stored.end());
  std::sort(levels.begin(), levels.end());
  const size_t count = levels.size();
  if (count < 3 || count > 256) return false;
  for (const float v : levels) if (!std::isfinite(v)) return false;
  const double lo = levels[0];
  step = (static_cast<double>(levels.back()) - lo) / static_cast<double>(count - 1);
  if (!(step > 0.0)) return false;
  for (size_t k = 0; k < count; ++k) {
    if (std::fabs(static_cast<double>(levels[k]) - (lo + step * static_cast<double>(k))) > kUniformSlack * step) return false;
  }
  l.lo = levels[0];
  l.inv_step = static_cast<float>(1.0 / step);
  l.bounds = {-std::numeric_limits<float>::infinity()};
  for (size_t k = 1; k < count; ++k) l.bounds.push_back((levels[k] + levels[k - 1]) / 2.0f);
  l.bounds.push_back(std::numeric_limits<float>::infinity());
  return true;
}

// Every phase's words: byte (ci % 4) of w_t[(tap * wc + ci / 4) * co_pad + c] is code - zero_point.
void build_words(Int8Layer& l, const Geometry& g, int zero_point) {
  const Node& node = *l.layer;
  const int64_t wc = (g.ci + 3) / 4;
  l.co_pad = (g.co + kInt8CoAlign - 1) / kInt8CoAlign * kInt8CoAlign;
  const uint8_t* codes = unpacked_codes(node.weight);
  for (const PhaseTaps& phase : layer_phases(node, g, l.phases, l.steps)) {
    const std::vector<int64_t>&kh = phase.kh, &kw = phase.kw;
    const int64_t taps = static_cast<int64_t>(kh.size() * kw.size());
    std::vector<int8_t> bytes(static_cast<size_t>(taps * wc * l.co_pad * 4), 0);
    for (size_t y = 0; y < kh.size(); ++y) {
      for (size_t z = 0; z < kw.size(); ++z) {
        const int64_t tap = static_cast<int64_t>(y * kw.size() + z);
        for (int64_t c = 0; c < g.co; ++c) {
          for (int64_t ci = 0; ci < g.ci; ++ci) {
            const int code = codes[g.index(c, ci, kh[y], kw[z])] - zero_point;
            bytes[static_cast<size_t>(((tap * wc + ci / 4) * l.co_pad + c) * 4 + ci % 4)] = static_cast<int8_t>(code);
            l.wide = l.wide || code < -64 || code > 64;
          }
        }
      }
    }
    std::vector<int32_t> words(bytes.size() / 4);
    std::memcpy(words.data(), bytes.data(), bytes.size());
    l.w_ts.push_back(std::move(words));
  }
}

}  // namespace

std::unique_ptr<Int8Layer> plan_int8(const Graph& graph, int index) {
  const Node& node = graph.nodes[static_cast<size_t>(index)];
  auto l = std::make_unique<Int8Layer>();
  double step = 0.0;
  if (!kernel_source(graph, index, l->input) || !uniform_levels(*l->input.act, *l, step)) return nullptr;
  const Weight& w = node.weight;
  if (!integer_weights(w)) return nullptr;
  l->layer = &node;
  const Geometry g = geometry(node);
  const int zero_point = w.levels > 128 ? 128 : 0;
  for (int64_t c = 0; c < g.co; ++c) {
    const double offset = w.codebook[static_cast<size_t>(c * w.levels)];
    const double scale = w.levels > 1 ? static_cast<double>(w.codebook[static_cast<size_t>(c * w.levels + 1)]) - offset : 0.0;
    const double coef = step * scale;
    l->coef.push_back(coef);
    l->offset.push_back(step * offset + zero_point * coef);
  }
  build_words(*l, g, zero_point);
  const Shape& out = node.out_shape;
  l->base = all_ones_base(node, l->input.packed, l->lo, node.op == "linear" ? Shape{1, 1} : Shape{out[1], out[2]});
  return l;
}

void run_int8(const Int8Layer& l, const Tensor& source, int64_t path, const ParallelFor& parallel, Tensor& out) {
  const int64_t n = source.shape[0];
  const Tensor& x = kernel_input(*l.input.act, l.input.chain, *l.layer, source);
  Int8Conv call;
  call.x = Image{x.data.data(), !x.channels_last, n, l.input.packed[0], l.input.packed[1], l.input.packed[2]};
  call.bounds = l.bounds, call.lo = l.lo, call.inv_step = l.inv_step;
  layer_call(call, l.w_ts, l.co_pad, l.phases, *l.layer, out, l.steps, path);
  call.co_pad = l.co_pad, call.wide = l.wide;
  call.coef = l.coef.data(), call.offset = l.offset.data(), call.base = l.base.map();
  const int64_t co = static_cast<int64_t>(l.coef.size());
  call.co = co;
  const std::string bad = check_int8_conv(call);
  if (!bad.empty()) throw bad_node(l.layer->name, "integer kernel arguments: " + bad);
  write_channels_last(*l.layer, out);
  run_int8_conv(call, out.data.data(), parallel);
}

}  // namespace lowbit
