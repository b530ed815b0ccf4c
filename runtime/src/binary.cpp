// Planning a binary layer (docs/export.md "Kernels"): bit planes of the codes in word-major rows per phase,
// coefficients and offsets times the input's bit weight, and the input-independent term `base` (which layers, and
// with what coding, is claim.cpp's).
#include "binary.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "ops.h"

namespace lowbit {

namespace {

// Bit `bit` of each of the 8 bytes of x as one byte (byte k -> bit k): the multiply moves the bits to the top
// byte, every product term on a bit of its own (nothing carries).
inline uint64_t byte_bits(uint64_t x, int bit) {
  return (((x >> bit) & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56;
}

// Where each kernel tap (y, z) lies: (its phase, its tap index there); phase -1 where none.
using TapPlaces = std::vector<std::pair<int64_t, int64_t>>;

// Whether a weight's codes are its one bit plane: two levels, plane masks 0 and 1 (a 1-bit affine weight).
bool codes_are_the_plane(const Weight& w, const std::vector<uint64_t>& masks, int64_t planes) {
  if (w.levels != 2 || planes != 1) return false;
  for (size_t k = 0; k < masks.size(); ++k) if (masks[k] != k % 2) return false;
  return true;
}

// Each phase's weights as word-major rows: row p * Co + c of tap t, word j holds plane p of input channels
// 64j..64j+63 of channel c at that tap. Per (channel, kernel tap), eight planes at a time: the input channels'
// plane bits as a byte column, then each word from eight 8-byte loads (little-endian hosts). Returns the taps'
// places.
TapPlaces build_phases(BinaryLayer& b, const Geometry& g, const std::vector<uint64_t>& masks) {
  const Weight& w = b.layer->weight;
  const int64_t wc = (g.ci + 63) / 64, rows = b.planes * g.co;
  b.rows_padded = (rows + 7) / 8 * 8;
  // Every kernel tap (y, z) lies in one phase: (phase, its tap index there).
  TapPlaces place(static_cast<size_t>(g.kh * g.kw), {-1, 0});
  const std::vector<PhaseTaps> phases = layer_phases(*b.layer, g, b.phases, b.steps);
  for (size_t ph = 0; ph < phases.size(); ++ph) {
    const std::vector<int64_t>&kh = phases[ph].kh, &kw = phases[ph].kw;
    for (size_t y = 0; y < kh.size(); ++y) {
      for (size_t z = 0; z < kw.size(); ++z) {
        place[static_cast<size_t>(kh[y] * g.kw + kw[z])] = {static_cast<int64_t>(ph), static_cast<int64_t>(y * kw.size() + z)};
      }
    }
    b.w_ts.emplace_back(static_cast<size_t>(static_cast<int64_t>(kh.size() * kw.size()) * wc * b.rows_padded), 0);
  }
  std::vector<uint8_t> column(static_cast<size_t>(wc * 64), 0);  // zero past g.ci
  const uint8_t* all_codes = unpacked_codes(w);
  const bool own_plane = codes_are_the_plane(w, masks, b.planes);  // the code is the bit: no mask lookups
  for (int64_t c = 0; c < g.co; ++c) {
    const uint64_t* mask = masks.data() + c * w.levels;
    for (int64_t k = 0; k < g.kh * g.kw; ++k) {
      const auto [phase, tap] = place[static_cast<size_t>(k)];
      if (phase < 0) continue;
      uint64_t* w_t = b.w_ts[static_cast<size_t>(phase)].data();
      const uint8_t* codes = all_codes + g.index(c, 0, k / g.kw, k % g.kw);
      for (int64_t first = 0; first < b.planes; first += 8) {
        if (own_plane) {
          for (int64_t i = 0; i < g.ci; ++i) column[static_cast<size_t>(i)] = codes[i * g.step_ci];
        } else {
          for (int64_t i = 0; i < g.ci; ++i) column[static_cast<size_t>(i)] = static_cast<uint8_t>(mask[codes[i * g.step_ci]] >> first);
        }
        const int64_t last = std::min<int64_t>(b.planes, first + 8);
        for (int64_t j = 0; j < wc; ++j) {
          uint64_t bytes[8];
          std::memcpy(bytes, column.data() + 64 * j, sizeof bytes);
          for (int64_t p = first; p < last; ++p) {
            uint64_t word = 0;
            for (int q = 0; q < 8; ++q) word |= byte_bits(bytes[q], static_cast<int>(p - first)) << (8 * q);
            w_t[(tap * wc + j) * b.rows_padded + p * g.co + c] = word;
          }
        }
      }
    }
  }
  return place;
}

// Per (output channel, kernel tap) the codes 1 of a two-level weight whose codes are their own bit plane (one
// plane, masks 0 and 1), as popcounts of the kernel rows build_phases wrote (bits past Ci are zero); empty for any
// other weight, or when a tap lies in no phase.
std::vector<int64_t> ones_per_tap(const BinaryLayer& b, const Geometry& g, const std::vector<uint64_t>& masks,
                                  const TapPlaces& place) {
  if (!codes_are_the_plane(b.layer->weight, masks, b.planes)) return {};
  const int64_t wc = (g.ci + 63) / 64, taps = g.kh * g.kw;
  std::vector<int64_t> ones(static_cast<size_t>(g.co * taps), 0);
  for (int64_t k = 0; k < taps; ++k) {
    const auto [phase, tap] = place[static_cast<size_t>(k)];
    if (phase < 0) return {};
    const uint64_t* w_t = b.w_ts[static_cast<size_t>(phase)].data();
    for (int64_t j = 0; j < wc; ++j) {
      const uint64_t* row = w_t + (tap * wc + j) * b.rows_padded;
      for (int64_t c = 0; c < g.co; ++c) ones[static_cast<size_t>(c * taps + k)] += __builtin_popcountll(row[c]);
    }
  }
  return ones;
}

}  // namespace

namespace {

// The kernel taps along one axis that link output index o to an input index in [0, size): o = i * stride -
// padding + k * dilation, read from the output side for a conv and from the input side for a transposed one.
std::vector<int64_t> linked_taps(const Geometry& g, int dim, bool transposed, int64_t o, int64_t size) {
  const int64_t kernel = dim == 0 ? g.kh : g.kw, s = g.stride[dim], p = g.padding[dim], d = g.dilation[dim];
  std::vector<int64_t> taps;
  for (int64_t k = 0; k < kernel; ++k) {
    if (transposed) {
      const int64_t shifted = o + p - k * d;
      if (shifted % s == 0 && shifted / s >= 0 && shifted / s < size) taps.push_back(k);
    } else if (o * s - p + k * d >= 0 && o * s - p + k * d < size) {
      taps.push_back(k);
    }
  }
  return taps;
}

// Whether every sum of up to n values of a codebook row is exact in float64, in any order: each value is a
// multiple of q, the smallest float ulp among the row's nonzero values, so every partial sum is a multiple of
// q of at most n * max |value|, which float64 holds exactly while that is at most 2^53 q.
bool exact_sums(const float* row, int64_t levels, int64_t n) {
  double largest = 0.0;
  int lowest = 0;
  for (int64_t z = 0; z < levels; ++z) {
    if (!std::isfinite(row[z])) return false;
    if (row[z] == 0.0f) continue;
    int exponent = 0;
    std::frexp(row[z], &exponent);
    lowest = largest == 0.0 ? exponent - 24 : std::min(lowest, exponent - 24);
    largest = std::max(largest, std::fabs(static_cast<double>(row[z])));
  }
  return largest == 0.0 || static_cast<double>(n) * largest <= std::ldexp(1.0, 53 + lowest);
}

// Per (output channel, tap) the sum over input channels of the weight, in float64, equal to the direct sum in
// input-channel order. When every output channel has a codebook row of its own (channel_dim the output
// channels, no pruning, at most Ci levels) whose sums are exact (exact_sums), it is sum_z count[z] * value[z]
// over the counts of the codes (bit-identical, as every sum is exact; no float copy of the weight); else the
// weight is decoded and summed in order. Either reads the weight in storage order, (outer, middle, tap) with
// (outer, middle) = (Co, Ci) or a transposed conv's (Ci, Co), a (middle, tap) block at a time.
// Per (output channel, tap, code) how many input channels have that code: one pass over the codes.
std::vector<int32_t> code_counts(const Weight& w, const Geometry& g, bool transposed) {
  const int64_t taps = g.kh * g.kw, outer = transposed ? g.ci : g.co, middle = transposed ? g.co : g.ci;
  std::vector<int32_t> count(static_cast<size_t>(g.co * taps * w.levels), 0);
  std::vector<uint8_t> codes(static_cast<size_t>(middle * taps));
  for (int64_t a = 0; a < outer; ++a) {
    w.unpack(a * middle * taps, middle * taps, codes.data());
    for (int64_t m = 0; m < middle; ++m) {
      int32_t* slot = count.data() + (transposed ? m : a) * taps * w.levels;
      const uint8_t* code = codes.data() + m * taps;
      for (int64_t t = 0; t < taps; ++t) ++slot[t * w.levels + code[t]];
    }
  }
  return count;
}

// The same counts of a two-level weight from its codes 1 per (output channel, tap) (ones_per_tap).
std::vector<int32_t> two_level_counts(const std::vector<int64_t>& ones, const Geometry& g) {
  std::vector<int32_t> count(2 * ones.size());
  for (size_t k = 0; k < ones.size(); ++k) {
    count[2 * k + 1] = static_cast<int32_t>(ones[k]);
    count[2 * k] = static_cast<int32_t>(g.ci) - count[2 * k + 1];
  }
  return count;
}

// `ones`, when given, holds per (output channel, tap) how many of its codes are 1 in a two-level weight (counted
// from the kernels' bit rows, ones_per_tap): the counts then need no pass over the codes.
std::vector<double> tap_sums(const Weight& w, const Geometry& g, bool transposed, const std::vector<int64_t>* ones) {
  const int64_t taps = g.kh * g.kw, outer = transposed ? g.ci : g.co, middle = transposed ? g.co : g.ci;
  std::vector<double> sums(static_cast<size_t>(g.co * taps), 0.0);
  bool counted = w.packed && !w.sparse && w.channel_dim == (transposed ? 1 : 0) && w.levels <= g.ci;
  for (int64_t c = 0; counted && c < g.co; ++c) counted = exact_sums(w.codebook.data() + c * w.levels, w.levels, g.ci);
  if (counted) {
    const std::vector<int32_t> count = ones != nullptr ? two_level_counts(*ones, g) : code_counts(w, g, transposed);
    for (int64_t k = 0; k < g.co * taps; ++k) {
      const float* value = w.codebook.data() + k / taps * w.levels;
      const int32_t* n = count.data() + k * w.levels;
      double sum = 0.0;
      for (int64_t z = 0; z < w.levels; ++z) sum += static_cast<double>(n[z]) * static_cast<double>(value[z]);
      sums[static_cast<size_t>(k)] = sum;
    }
    return sums;
  }
  std::vector<float> block(static_cast<size_t>(middle * taps));
  for (int64_t a = 0; a < outer; ++a) {
    w.decode(a * middle * taps, middle * taps, block.data());
    for (int64_t m = 0; m < middle; ++m) {
      double* sum = sums.data() + (transposed ? m : a) * taps;
      const float* value = block.data() + m * taps;
      for (int64_t t = 0; t < taps; ++t) sum[t] += static_cast<double>(value[t]);
    }
  }
  return sums;
}

// Each output index's class along one axis (indices with the same linked taps share one) and the classes' taps.
std::vector<size_t> tap_classes(const Geometry& g, int dim, bool transposed, int64_t outputs, int64_t size,
                                std::vector<std::vector<int64_t>>& classes) {
  std::vector<size_t> of(static_cast<size_t>(outputs));
  for (int64_t o = 0; o < outputs; ++o) {
    const std::vector<int64_t> taps = linked_taps(g, dim, transposed, o, size);
    const auto found = std::find(classes.begin(), classes.end(), taps);
    of[static_cast<size_t>(o)] = static_cast<size_t>(found - classes.begin());
    if (found == classes.end()) classes.push_back(taps);
  }
  return of;
}

}  // namespace

// bias + c * (the layer on an all-ones input of the packed size) in float64, one Co-vector per border class. An
// output pixel sums the weights of its linked taps (row-major over taps, as the direct sum); pixels with the same
// linked taps (a row class x a column class) share one entry, so nothing is stored per pixel.
AllOnesBase all_ones_base(const Node& node, const Shape& packed, double c_term, const Shape& out,
                          const std::vector<int64_t>* ones) {
  const Geometry g = geometry(node);
  const int64_t h = packed[1], w = packed[2], ho = out[0], wo = out[1];
  const bool transposed = node.op == "conv_transpose2d";
  const std::vector<double> tap_sum = tap_sums(node.weight, g, transposed, ones);
  std::vector<std::vector<int64_t>> rows, cols;
  const std::vector<size_t> row_of = tap_classes(g, 0, transposed, ho, h, rows);
  const std::vector<size_t> col_of = tap_classes(g, 1, transposed, wo, w, cols);
  AllOnesBase base;
  base.entries = static_cast<int64_t>(rows.size() * cols.size());
  base.values.assign(static_cast<size_t>(base.entries * g.co), 0.0);
  for (size_t r = 0; r < rows.size(); ++r) {
    for (size_t q = 0; q < cols.size(); ++q) {
      double* value = base.values.data() + (r * cols.size() + q) * static_cast<size_t>(g.co);
      for (const int64_t y : rows[r]) {
        for (const int64_t z : cols[q]) {
          for (int64_t c = 0; c < g.co; ++c) value[c] += tap_sum[static_cast<size_t>((c * g.kh + y) * g.kw + z)];
        }
      }
      for (int64_t c = 0; c < g.co; ++c) {
        value[c] = c_term * value[c] + (node.weight.bias.empty() ? 0.0 : static_cast<double>(node.weight.bias[static_cast<size_t>(c)]));
      }
    }
  }
  for (const size_t r : row_of) base.rows.push_back(static_cast<int64_t>(r * cols.size()));
  for (const size_t q : col_of) base.cols.push_back(static_cast<int64_t>(q));
  return base;
}

namespace {

// A per-thread buffer reused across calls (no allocation or page faults per call), `count` values long; a
// large one is given back when a call needs under a quarter of it.
Tensor& scratch(Tensor& t, const Shape& shape, bool channels_last) {
  const auto count = static_cast<size_t>(numel(shape));
  if (t.data.capacity() > (size_t{1} << 20) && count < t.data.capacity() / 4) Floats().swap(t.data);
  t.shape = shape, t.channels_last = channels_last;
  t.data.resize(count);
  return t;
}

}  // namespace

const Tensor& kernel_input(const Node& act, const std::vector<const Node*>& chain, const Node& layer, const Tensor& source,
                           bool shifted) {
  thread_local Tensor buffers[2];  // each step reads one and writes the other
  const Tensor* x = &source;
  int next = 0;
  if (shifted && act.tensors.count("shift")) {
    Tensor& t = scratch(buffers[next], source.shape, source.channels_last);
    std::copy(source.data.begin(), source.data.end(), t.data.begin());
    subtract_shift(t, act.tensors.at("shift").data);
    x = &t, next ^= 1;
  }
  for (const Node* step : chain) {
    Shape shape{source.shape[0]};
    shape.insert(shape.end(), step->out_shape.begin(), step->out_shape.end());
    Tensor& t = scratch(buffers[next], shape, false);
    run_op(*step, {x}, t);
    x = &t, next ^= 1;
  }
  if (!layer.attrs.pad.empty()) {
    pad_tensor(*x, layer.attrs.pad, layer.attrs.pad_mode, 0.0, scratch(buffers[next], x->shape, false));
    x = &buffers[next];
  }
  return *x;
}

namespace {

// The kernel call of layer `b` on a batch of n, its input data not set yet.
BinaryConv binary_call(const BinaryLayer& b, int64_t n, int64_t path) {
  BinaryConv call;
  call.x = Image{nullptr, false, n, b.packed[0], b.packed[1], b.packed[2]};
  Tensor out;
  out.shape = {n};
  out.shape.insert(out.shape.end(), b.layer->out_shape.begin(), b.layer->out_shape.end());
  layer_call(call, b.w_ts, b.rows_padded, b.phases, *b.layer, out, b.steps, path);
  call.rows_padded = b.rows_padded;
  call.coef2 = b.coef2.data(), call.offset2 = b.offset2.data(), call.base = b.base.map();
  call.co = static_cast<int64_t>(b.offset2.size()), call.planes = b.planes;
  if (b.count > 0) call.levels = LevelCode{b.thresholds.data(), b.signs.data(), b.count, b.ties_up};
  return call;
}

}  // namespace

std::unique_ptr<BinaryLayer> plan_binary(const Graph& graph, int index) {
  const Node& node = graph.nodes[static_cast<size_t>(index)];
  KernelSource found;
  std::vector<float> levels;
  if (!kernel_source(graph, index, found) || !coded_levels(*found.act, levels)) return nullptr;
  if (!prefers_planes(node, levels.size())) return nullptr;
  const float low = levels.front(), high = levels.back();
  auto b = std::make_unique<BinaryLayer>();
  b->layer = &node;
  b->act = found.act, b->chain = found.chain, b->packed = found.packed;
  const int norm = fusable_norm(graph, *b);
  if (norm >= 0) b->norm = &graph.nodes[static_cast<size_t>(norm)];
  b->source = b->norm != nullptr ? b->norm->inputs[0] : found.source;
  if (b->source >= 0 && graph.nodes[static_cast<size_t>(b->source)].op == "constant") return nullptr;
  // Sign (levels {-1, +1}) ties go up: a = 2, c = -1; otherwise ties go to `low`: a = -(high - low), c = high.
  // Coded inputs (more levels, or a folded BatchNorm): value = low + step * code, a = step, c = low.
  const double gap = static_cast<double>(high) - static_cast<double>(low);
  b->ties_up = levels.size() == 2 && low == -1.0f && high == 1.0f;
  b->threshold = static_cast<float>((static_cast<double>(low) + static_cast<double>(high)) / 2.0);
  double a_term = b->ties_up ? gap : -gap, c_term = b->ties_up ? low : high;
  if (levels.size() > 2 || b->norm != nullptr) {
    const std::vector<float> mid = midpoints_of(levels);
    b->count = static_cast<int64_t>(mid.size());
    if (b->norm != nullptr) {
      fold_norm(*b, mid, b->ties_up);
      if (static_cast<int64_t>(b->signs.size()) != b->packed[0]) return nullptr;  // channels changed on the way
    } else {
      for (int64_t c = 0; c < b->packed[0]; ++c) b->thresholds.insert(b->thresholds.end(), mid.begin(), mid.end());
      b->signs.assign(static_cast<size_t>(b->packed[0]), 1.0f);
    }
    a_term = gap / static_cast<double>(levels.size() - 1), c_term = low;
  }
  const Geometry g = geometry(node);
  std::vector<double> coef, offset;
  const std::vector<uint64_t> masks = planes_of(node, g, b->planes, coef, offset);
  if (b->planes == 0) return nullptr;  // a one-level codebook: nothing to count, the float path is exact
  for (double& v : coef) v *= a_term;
  for (double& v : offset) v *= a_term;
  b->coef2 = coef, b->offset2 = offset;
  const TapPlaces place = build_phases(*b, g, masks);
  const Shape& out = node.out_shape;
  const std::vector<int64_t> ones = ones_per_tap(*b, g, masks, place);
  b->base = all_ones_base(node, b->packed, c_term, node.op == "linear" ? Shape{1, 1} : Shape{out[1], out[2]},
                          ones.empty() ? nullptr : &ones);
  b->input_pad = input_padding(binary_call(*b, 1, kScalar));
  return b;
}

void write_channels_last(const Node& layer, Tensor& out) {
  out.channels_last = layer.op != "linear" && out.shape[2] * out.shape[3] > 1;
}

namespace {

// t - x for every value of x (into a per-thread buffer): sign packing's bit then marks the low level.
const Tensor& flipped(const Tensor& x, float t) {
  thread_local Tensor buffer;
  Tensor& out = scratch(buffer, x.shape, x.channels_last);
  for (size_t k = 0; k < x.data.size(); ++k) out.data[k] = t - x.data[k];
  return out;
}

// Zeroes the border of `n` (hp, wp) images of `wc` words a pixel around the (h, w) interior at (top, left).
void zero_border(uint64_t* bits, int64_t n, int64_t hp, int64_t wp, int64_t wc, int64_t top, int64_t left, int64_t h,
                 int64_t w) {
  for (int64_t i = 0; i < n; ++i) {
    uint64_t* image = bits + i * hp * wp * wc;
    std::fill(image, image + top * wp * wc, 0);
    std::fill(image + (top + h) * wp * wc, image + hp * wp * wc, 0);
    for (int64_t y = top; y < top + h; ++y) {
      uint64_t* row = image + y * wp * wc;
      std::fill(row, row + left * wc, 0);
      std::fill(row + (left + w) * wc, row + wp * wc, 0);
    }
  }
}

// The sink of `producer` writing `reader`'s packed input for a batch of n into `bits`: the kernels write every
// interior word, so only the border is zeroed here.
BitSink sink_for(const BinaryLayer& producer, const BinaryLayer& reader, int64_t n, std::vector<uint64_t>& bits) {
  const PackGeometry& g = reader.input_pad;
  const Image x{nullptr, false, n, reader.packed[0], reader.packed[1], reader.packed[2]};
  BitSink sink;
  sink.hp = x.h + g.pad_top + g.pad_bottom, sink.wp = x.w + g.pad_left + g.pad_right;
  sink.pad_top = g.pad_top, sink.pad_left = g.pad_left;
  bits.resize(static_cast<size_t>(padded_words(x, g)));
  zero_border(bits.data(), n, sink.hp, sink.wp, (x.c + 63) / 64, g.pad_top, g.pad_left, x.h, x.w);
  sink.bits = bits.data();
  sink.thresholds = reader.thresholds.data(), sink.signs = reader.signs.data(), sink.ties_up = reader.ties_up;
  sink.cuts = producer.cuts.data(), sink.slopes = producer.slopes.data(), sink.flips = producer.flips.data();
  return sink;
}

}  // namespace

bool packs_from(const BinaryLayer& reader, const BinaryLayer& producer) {
  return reader.count == 1 && reader.chain.empty() && reader.layer->attrs.pad.empty() && producer.layer->op != "linear" &&
         reader.packed == producer.layer->out_shape;
}

bool run_binary(const BinaryLayer& b, const Tensor& source, int64_t path, const ParallelFor& parallel, Tensor& out,
                const uint64_t* packed, const BinaryLayer* reader, std::vector<uint64_t>* bits) {
  BinaryConv call = binary_call(b, source.shape[0], path);
  if (packed == nullptr) {
    // Sign packing takes bit = (value >= 0): the value itself when ties go up (sign, threshold 0), t - x otherwise
    // (bit marks `low`); coded inputs (b.count > 0) are compared with their thresholds by the packer itself.
    const Tensor& input = kernel_input(*b.act, b.chain, *b.layer, source, b.norm == nullptr);
    const Tensor& x = b.count == 0 && !b.ties_up ? flipped(input, b.threshold) : input;
    call.x.data = x.data.data(), call.x.nchw = !x.channels_last;
  }
  const std::string bad = check_binary_conv(call);
  if (!bad.empty()) throw bad_node(b.layer->name, "binary kernel arguments: " + bad);
  write_channels_last(*b.layer, out);
  if (reader == nullptr || pick_sink_row(path, call.planes, call.co) == nullptr) {
    run_binary_conv(call, out.data.data(), parallel, packed);
    return false;
  }
  const BitSink sink = sink_for(b, *reader, call.x.n, *bits);
  run_binary_conv(call, nullptr, parallel, packed, &sink);
  return true;
}

}  // namespace lowbit
