// The claim rules of planning: which weight layers the kernels take and how their input and weights are coded
// (binary.h). Each runs once per layer at load, so this file is built for size (-Os); the weight loops of
// planning stay at -O3 in binary.cpp and weight.cpp.
#include "binary.h"

#include <algorithm>
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

bool integer_weights(const Weight& w) { return w.packed && w.affine && !w.sparse && w.levels <= kMaxIntegerLevels; }

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

constexpr size_t kMaxLevels = 16;          // binary.py MAX_LEVELS: 4 activation planes
constexpr double kAffineTolerance = 1e-6;  // binary.py AFFINE_TOLERANCE
constexpr int64_t kMaxPlanePairs = 4;      // x86/__init__.py MAX_PLANE_PAIRS
constexpr int64_t kFewOutputChannels = 4;  // x86/__init__.py FEW_OUTPUT_CHANNELS
constexpr int64_t kWordChannels = 64;      // binary.py BITS_PER_WORD: input channels in one word a pixel

// Planes needed for codes 0..levels-1.
int64_t bits_of(int64_t levels) {
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::log2(static_cast<double>(levels)))));
}

// A float64 threshold as the float32 that float32 inputs compare against as against the float64 value.
float round_threshold(double value, bool ties_up) {
  const float rounded = static_cast<float>(value);
  if (ties_up && static_cast<double>(rounded) < value) return std::nextafter(rounded, INFINITY);
  if (!ties_up && static_cast<double>(rounded) > value) return std::nextafter(rounded, -INFINITY);
  return rounded;
}

float channel_value(const Node& node, const char* field, int64_t c, float otherwise) {
  const auto it = node.tensors.find(field);
  return it == node.tensors.end() ? otherwise : it->second.data[static_cast<size_t>(c)];
}

// A codebook row as offset + sum_p coef[p] * bit_p(mask[code]) (binary.py Decomposition).
struct Decomposition {
  double offset = 0.0;
  std::vector<double> coef;
  std::vector<int64_t> mask;
};

// binary.py _additive: 2^k levels that are all subset sums of k generators (LQ-Nets' v^T e), else false.
bool additive(const std::vector<double>& row, double tol, Decomposition& d) {
  const size_t n = row.size();
  if (n < 2 || (n & (n - 1)) != 0) return false;
  std::vector<size_t> order(n);
  for (size_t k = 0; k < n; ++k) order[k] = k;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return row[a] < row[b]; });
  const double low = row[order[0]];
  std::vector<std::pair<double, size_t>> remaining;
  for (size_t k = 1; k < n; ++k) remaining.emplace_back(row[order[k]] - low, order[k]);
  std::vector<std::pair<double, int64_t>> sums{{0.0, 0}};
  d = Decomposition{low, {}, std::vector<int64_t>(n, 0)};
  while (!remaining.empty()) {
    const double g = remaining[0].first;
    const int64_t bit = int64_t{1} << d.coef.size();
    const size_t before = sums.size();
    for (size_t s = 0; s < before; ++s) {
      const auto [value, pattern] = sums[s];
      size_t j = 0;
      while (j < remaining.size() && !(std::fabs(remaining[j].first - value - g) <= tol)) ++j;
      if (j == remaining.size()) return false;
      d.mask[remaining[j].second] = pattern | bit;
      remaining.erase(remaining.begin() + static_cast<std::ptrdiff_t>(j));
      sums.emplace_back(value + g, pattern | bit);
    }
    d.coef.push_back(g);
  }
  return true;
}

// binary.py _fixed_point: levels low + q * z on the grid of the smallest gap q (e.g. powers of two).
bool fixed_point(const std::vector<double>& row, double tol, Decomposition& d) {
  std::vector<double> ordered = row;
  std::sort(ordered.begin(), ordered.end());
  const double low = ordered.front();
  double q = INFINITY;
  for (size_t k = 1; k < ordered.size(); ++k) {
    if (ordered[k] - ordered[k - 1] > tol) q = std::min(q, ordered[k] - ordered[k - 1]);
  }
  if (!std::isfinite(q)) return false;
  d = Decomposition{low, {}, {}};
  int64_t largest = 0;
  for (const double v : row) {
    const double z = std::nearbyint((v - low) / q);
    if (!(std::fabs(v - low - q * z) <= tol)) return false;
    d.mask.push_back(static_cast<int64_t>(z));
    largest = std::max(largest, static_cast<int64_t>(z));
  }
  for (int64_t b = 0; (largest >> b) != 0; ++b) d.coef.push_back(q * std::ldexp(1.0, static_cast<int>(b)));
  return true;
}

// binary.py decompose_codebook: the fewest planes of additive, fixed-point and one-hot.
Decomposition decompose(const std::vector<double>& row) {
  double largest = 0.0;
  for (const double v : row) largest = std::max(largest, std::fabs(v));
  const double tol = kAffineTolerance * largest;
  Decomposition best{row[0], {}, {}};
  for (size_t level = 0; level < row.size(); ++level) {
    if (level > 0) best.coef.push_back(row[level] - row[0]);
    best.mask.push_back(level == 0 ? 0 : int64_t{1} << (level - 1));
  }
  Decomposition found;
  if (fixed_point(row, tol, found) && found.coef.size() <= best.coef.size()) best = found;
  if (additive(row, tol, found) && found.coef.size() <= best.coef.size()) best = found;
  return best;
}

}  // namespace

// The sorted levels of a quant_act the kernels code: two distinct levels, or 3 to 16 affine ones
// (|level_j - (low + step * j)| <= 1e-6 max |level|, computed as binary.py affine_levels does).
bool coded_levels(const Node& act, std::vector<float>& levels) {
  if (act.op != "quant_act") return false;
  const Floats& stored = act.tensors.at("levels").data;
  levels.assign(stored.begin(), stored.end());
  std::sort(levels.begin(), levels.end());
  const size_t count = levels.size();
  if (count < 2 || count > kMaxLevels || !(levels.back() > levels.front())) return false;
  if (count == 2) return true;
  double largest = 0.0;
  for (const float v : levels) {
    if (!std::isfinite(v)) return false;
    largest = std::max(largest, std::fabs(static_cast<double>(v)));
  }
  const double low = levels.front(), step = (static_cast<double>(levels.back()) - low) / static_cast<double>(count - 1);
  for (size_t j = 0; j < count; ++j) {
    if (std::fabs(static_cast<double>(levels[j]) - (low + step * static_cast<double>(j))) > kAffineTolerance * largest) {
      return false;
    }
  }
  return true;
}

// x86/__init__.py prefers_planes: two-level inputs run as bit planes; 3-16 affine levels too when weight planes x
// activation planes <= kMaxPlanePairs and the layer has more than kFewOutputChannels outputs or at most 64
// inputs (more fall to the plane kernels' slow generic lane loop), or when the integer path cannot take the
// weights; otherwise the integer path.
bool prefers_planes(const Node& node, size_t act_levels) {
  const Weight& w = node.weight;
  if (act_levels <= 2 || !integer_weights(w)) return true;
  const Geometry g = geometry(node);
  if (g.co <= kFewOutputChannels && g.ci > kWordChannels) return false;
  return bits_of(w.levels) * bits_of(static_cast<int64_t>(act_levels)) <= kMaxPlanePairs;
}

// The float32 midpoints of sorted levels, as the torch backend and ops.cpp quant_act compute them.
std::vector<float> midpoints_of(const std::vector<float>& levels) {
  std::vector<float> mid;
  for (size_t k = 1; k < levels.size(); ++k) mid.push_back((levels[k] + levels[k - 1]) / 2.0f);
  return mid;
}

// binary.py fold_batch_norm: thresholds t (+ shift[c]) on BN(x) = (x - mean) * s + beta, s = gamma / sqrt(var +
// eps), become x > mean + (t + shift - beta) / s, or -x > -(that) for s < 0; s = 0 gives a constant code.
void fold_norm(BinaryLayer& b, const std::vector<float>& mid, bool ties_up) {
  const Node& norm = *b.norm;
  const int64_t channels = static_cast<int64_t>(norm.tensors.at("running_mean").data.size());
  const bool shifted = b.act->tensors.count("shift") > 0;
  for (int64_t c = 0; c < channels; ++c) {
    const double mean = channel_value(norm, "running_mean", c, 0.0f), var = channel_value(norm, "running_var", c, 0.0f);
    const double gamma = channel_value(norm, "weight", c, 1.0f), beta = channel_value(norm, "bias", c, 0.0f);
    const double scale = gamma / std::sqrt(var + norm.attrs.eps);
    const double sign = scale < 0 ? -1.0 : 1.0;
    for (const float t : mid) {
      const double level = shifted ? static_cast<double>(t) + channel_value(*b.act, "shift", c, 0.0f) : static_cast<double>(t);
      double folded = (mean + (level - beta) / scale) * sign;
      if (scale == 0) folded = (ties_up ? beta >= level : beta > level) ? -INFINITY : INFINITY;
      b.thresholds.push_back(round_threshold(folded, ties_up));
    }
    b.signs.push_back(static_cast<float>(sign));
  }
}

// The BatchNorm node whose output the activation reads, when it folds (binary.py fused_norm), else -1.
int fusable_norm(const Graph& graph, const BinaryLayer& b) {
  const int source = b.act->inputs[0];
  if (source < 0 || graph.nodes[static_cast<size_t>(source)].op != "batch_norm") return -1;
  for (const Node* step : b.chain) {
    if (step->op == "reshape") return -1;
  }
  return source;
}

// Planes: bit b of the codes (affine codebooks) or each channel's decompose() (tables), padded to the most
// planes of any channel; w = offset + sum_p coef[p] plane_p. Returns the planes' bits of each (channel, code),
// (Co, levels): bit p of masks[c * levels + code] is plane p of a weight of channel c with that code.
std::vector<uint64_t> planes_of(const Node& node, const Geometry& g, int64_t& count, std::vector<double>& coef,
                                std::vector<double>& offset) {
  const Weight& w = node.weight;
  const int64_t co = g.co;
  const int64_t levels = w.levels;
  std::vector<uint64_t> masks(static_cast<size_t>(co * levels));
  offset.resize(static_cast<size_t>(co));
  for (int64_t c = 0; c < co; ++c) offset[static_cast<size_t>(c)] = w.codebook[static_cast<size_t>(c * levels)];
  if (w.affine) {
    count = bits_of(levels);
    for (int64_t b = 0; b < count; ++b) {
      for (int64_t c = 0; c < co; ++c) {
        const double scale = levels > 1 ? static_cast<double>(w.codebook[static_cast<size_t>(c * levels + 1)]) -
                                              static_cast<double>(w.codebook[static_cast<size_t>(c * levels)])
                                        : 0.0;
        coef.push_back(scale * std::ldexp(1.0, static_cast<int>(b)));
      }
    }
    for (size_t k = 0; k < masks.size(); ++k) masks[k] = static_cast<uint64_t>(static_cast<int64_t>(k) % levels);
    return masks;
  }
  std::vector<Decomposition> parts;
  size_t most = 0;
  for (int64_t c = 0; c < co; ++c) {
    const auto first = w.codebook.begin() + c * levels;
    parts.push_back(decompose(std::vector<double>(first, first + levels)));
    offset[static_cast<size_t>(c)] = parts.back().offset;
    most = std::max(most, parts.back().coef.size());
  }
  for (size_t p = 0; p < most; ++p) {
    for (const Decomposition& d : parts) coef.push_back(p < d.coef.size() ? d.coef[p] : 0.0);
  }
  for (int64_t c = 0; c < co; ++c) {
    const std::vector<int64_t>& mask = parts[static_cast<size_t>(c)].mask;
    for (int64_t code = 0; code < levels; ++code) {
      masks[static_cast<size_t>(c * levels + code)] = static_cast<uint64_t>(mask[static_cast<size_t>(code)]);
    }
  }
  count = static_cast<int64_t>(most);
  return masks;
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

namespace {

constexpr int kFraction = BitSink::kCutBits;           // kernels.h BitSink::cuts compares n << kFraction
constexpr double kFixed = double(int64_t{1} << kFraction);

// One channel of a one-plane combine and the reader's rule on its value (kernels.h BitSink).
struct CutChannel {
  double base, offset, coef;
  float sign, threshold;
  bool ties_up;
};

// The bit the float sink writes for (positives, n): the register kernels' combine (base + offset * positives, then
// + coef * n, in float64; float32), times the sign, against the threshold.
bool sink_bit(const CutChannel& c, int64_t positives, int64_t n) {
  double value = c.base + c.offset * static_cast<double>(positives);
  value = value + c.coef * static_cast<double>(n);
  const float y = static_cast<float>(value) * c.sign;
  return c.ties_up ? y >= c.threshold : y > c.threshold;
}

// The least n in [0, nmax + 1] whose bit at `positives` differs from the bit of n = -infinity, when the real count
// where the rule flips is within a rounding slack of the integer k: the kernel's own arithmetic decides at k.
int64_t flip_near(const CutChannel& c, int64_t positives, int64_t k, int64_t nmax, bool rising) {
  return std::clamp<int64_t>(k + (sink_bit(c, positives, k) != rising), 0, nmax + 1);
}

}  // namespace

bool plan_cuts(BinaryLayer& b, const BinaryLayer& reader) {
  if (!b.cuts.empty()) return true;  // planned for this reader by an earlier plan (another kernel path)
  const int64_t co = static_cast<int64_t>(b.offset2.size());
  const int64_t act_planes = b.count > 0 ? code_planes(b.count) : 1;
  if (b.planes != 1 && !folds_planes(b.packed[0], act_planes, b.planes, co, b.coef2.data())) return true;
  // The most positives a pixel counts (its phase's taps, from the phase list [ph, pw, n_h, n_w, taps...]), and n.
  int64_t most = 0;
  for (size_t at = 0; at + 3 < b.phases.size(); at += static_cast<size_t>(4 + b.phases[at + 2] + b.phases[at + 3])) {
    most = std::max(most, b.phases[at + 2] * b.phases[at + 3]);
  }
  const int64_t pmax = ((int64_t{1} << act_planes) - 1) * most * b.packed[0];
  const int64_t nmax = ((int64_t{1} << b.planes) - 1) * pmax;
  if (pmax > 65535 || b.base.entries * co * (pmax + 1) > (int64_t{1} << 23)) return false;
  std::vector<int64_t> cuts(static_cast<size_t>(b.base.entries * co)), slopes(static_cast<size_t>(co));
  std::vector<uint64_t> flips(static_cast<size_t>((co + 63) / 64), 0);
  for (int64_t ch = 0; ch < co; ++ch) {
    CutChannel c{0.0, b.offset2[static_cast<size_t>(ch)], b.coef2[static_cast<size_t>(ch)],
                 reader.signs[static_cast<size_t>(ch)], reader.thresholds[static_cast<size_t>(ch)], reader.ties_up};
    const double slope = -c.offset / c.coef;  // the crossing moves by this many counts per positive
    if (!(std::fabs(slope) <= 1024.0) || std::isnan(c.threshold)) return false;
    const auto fixed_slope = static_cast<int64_t>(slope * kFixed);  // truncated: off by under 2^-16 over 2^16 positives
    const bool rising = (c.sign > 0) == (c.coef > 0);
    const float least = c.ties_up ? c.threshold : std::nextafter(c.threshold, INFINITY);  // the least float that passes
    slopes[static_cast<size_t>(ch)] = fixed_slope;
    if (!rising) flips[static_cast<size_t>(ch / 64)] |= uint64_t{1} << (ch % 64);
    for (int64_t e = 0; e < b.base.entries; ++e) {
      c.base = b.base.values[static_cast<size_t>(e * co + ch)];
      const double largest = std::fabs(c.base) + std::fabs(c.offset) * static_cast<double>(pmax) +
                             std::fabs(c.coef) * static_cast<double>(nmax) + std::fabs(c.threshold);
      const double slack = (largest * 0x1p-48 + std::fabs(c.threshold) * 0x1p-22 + 1e-36) / std::fabs(c.coef);
      // g(p) = start + slope * p, the real count where the rule flips at positives p, is within `err` of exact. Where
      // it is further than `near` from every integer, the kernel's flip is ceil(g), and so is the flip of the line
      // T + R * p for any T within slack + 2^-15 counts of the nominal T0 = start in fixed point (T0's and R's truncation add
      // up to 2^-16). Nearer, the kernel's arithmetic decides (flip_near) and bounds T: (n << kFraction) >= T + R * p exactly
      // when n >= flip; those bounds move T from T0 by at most slack + 2^-16 + 2 err.
      const double start = (static_cast<double>(c.sign) * static_cast<double>(least) - c.base) / c.coef;
      int64_t& cut = cuts[static_cast<size_t>(e * co + ch)];
      cut = start > 0 ? int64_t{1} << 61 : -(int64_t{1} << 61);  // past 2^29 counts: one bit for every (p, n)
      if (!(std::fabs(start) < 0x1p29)) continue;
      const double err = (std::fabs(start) + std::fabs(slope) * static_cast<double>(pmax)) * 0x1p-50;
      const double near = 2 * slack + 0x1p-13 + 8 * err;
      if (!(slack < 0.125)) return false;
      int64_t low = INT64_MIN / 4, high = INT64_MAX / 4;
      for (int64_t p = 0; p <= pmax; ++p) {
        const double x = start + slope * static_cast<double>(p);
        const auto k = static_cast<int64_t>(x + (x < 0 ? -0.5 : 0.5));
        if (std::fabs(x) > static_cast<double>(nmax) + 2.0 || std::fabs(x - static_cast<double>(k)) > near) continue;
        const int64_t flip = flip_near(c, p, k, nmax, rising);
        if (flip > 0) low = std::max(low, ((flip - 1) << kFraction) + 1 - fixed_slope * p);
        if (flip <= nmax) high = std::min(high, (flip << kFraction) - fixed_slope * p);
      }
      if (low > high) return false;
      cut = std::min(std::max(static_cast<int64_t>(start * kFixed), low), high);
    }
  }
  b.cuts.swap(cuts), b.slopes.swap(slopes), b.flips.swap(flips);
  return true;
}

}  // namespace lowbit
