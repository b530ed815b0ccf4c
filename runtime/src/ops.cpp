// Shape inference and float code of every IR op, following the torch call each op stands for
// (lowbit.export.backends.torch). Accumulations are float32 like torch's; the order differs, so results
// agree with torch within float rounding (the parity tests state the tolerance).
#include "ops.h"

#include "activation.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace lowbit {
namespace {

// A failed shape check of `node` (built only on failure: the messages cost no work when the checks pass).
[[noreturn, gnu::cold]] void fail(const Node& node, const std::string& what) { throw bad_node(node.name, what); }
[[noreturn, gnu::cold]] void fail(const Node& node, const char* what) { throw bad_node(node.name, what); }

int64_t inner_size(const Shape& shape, size_t from) {
  int64_t n = 1;
  for (size_t d = from; d < shape.size(); ++d) n *= shape[d];
  return n;
}

// ----- shapes -----

int64_t conv_out(int64_t size, int64_t pad, int64_t dilation, int64_t kernel, int64_t stride) {
  const int64_t span = size + 2 * pad - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

Shape conv_shape(const Node& node, const Shape& x) {
  const Attrs& a = node.attrs;
  if (x.size() != 4 || x[1] != a.in_channels) {
    fail(node, "input " + shape_text(x) + " does not fit the layer's " + std::to_string(a.in_channels) +
                   " input channels");
  }
  Shape in = a.pad.empty() ? x : padded_shape(x, a.pad);
  if (a.pad_mode == "reflect" && !(a.pad[0] < x[3] && a.pad[1] < x[3] && a.pad[2] < x[2] && a.pad[3] < x[2])) {
    fail(node, "reflect padding exceeds the input");
  }
  int64_t out[2];
  for (int k = 0; k < 2; ++k) {
    if (node.op == "conv2d") {
      out[k] = conv_out(in[static_cast<size_t>(2 + k)], a.padding[k], a.dilation[k], a.kernel[k], a.stride[k]);
    } else {
      out[k] = (in[static_cast<size_t>(2 + k)] - 1) * a.stride[k] - 2 * a.padding[k] + a.dilation[k] * (a.kernel[k] - 1) +
               a.output_padding[k] + 1;
    }
    if (out[k] < 1 || out[k] > (int64_t{1} << 26)) fail(node, "the output size is not positive");
  }
  return {x[0], a.out_channels, out[0], out[1]};
}

Shape broadcast_shape(const Node& node, const Shape& a, const Shape& b) {
  const size_t rank = std::max(a.size(), b.size());
  Shape out(rank);
  for (size_t k = 0; k < rank; ++k) {
    const int64_t x = k + a.size() >= rank ? a[k + a.size() - rank] : 1;
    const int64_t y = k + b.size() >= rank ? b[k + b.size() - rank] : 1;
    if (x != y && x != 1 && y != 1) fail(node, "shapes " + shape_text(a) + " and " + shape_text(b) + " do not broadcast");
    out[k] = x == 1 ? y : x;
  }
  return out;
}

void check_channel_tensor(const Node& node, const char* field, int64_t channels) {
  const auto it = node.tensors.find(field);
  if (it != node.tensors.end()) {
    if (static_cast<int64_t>(it->second.data.size()) != channels) {
      fail(node, std::string("tensor '") + field + "' has " + std::to_string(it->second.data.size()) +
                     " values, expected " + std::to_string(channels));
    }
  }
}

// Index scale of a resized axis as torch computes it: 1 / scale_factor when given, else in / out.
float resize_scale(const Resize& r, int k, int64_t in, int64_t out) {
  if (r.align_corners) return out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.0f;
  if (r.scale[k] > 0.0 && r.size[0] >= 0) return static_cast<float>(1.0 / r.scale[k]);
  return static_cast<float>(in) / static_cast<float>(out);
}

Shape resize_shape(const Node& node, const Shape& x) {
  const Resize& r = node.attrs.resize;
  if (x.size() != 4) fail(node, "interpolate wants N x C x H x W");
  Shape out = x;
  for (int k = 0; k < 2; ++k) {
    const size_t d = static_cast<size_t>(2 + k);
    out[d] = r.scale[k] > 0.0 ? static_cast<int64_t>(std::floor(static_cast<double>(x[d]) * r.scale[k])) : r.size[k];
    if (out[d] < 1 || out[d] > (int64_t{1} << 26)) fail(node, "the output size is not positive");
  }
  return out;
}

Shape reshape_shape(const Node& node, const Shape& x) {
  const Shape& s = node.attrs.shape;
  const int64_t per_sample = inner_size(x, 1);
  Shape out{x[0]};
  if (s == Shape{-1}) {
    out.push_back(per_sample);
  } else {
    if (numel(s) != per_sample) fail(node, "cannot reshape " + shape_text(x) + " to " + shape_text(s));
    out.insert(out.end(), s.begin(), s.end());
  }
  return out;
}

Shape permute_shape(const Node& node, const Shape& x) {
  const std::vector<int64_t>& dims = node.attrs.dims;
  if (dims.size() != x.size() || dims[0] != 0) fail(node, "permute dims do not fit the input");
  std::vector<bool> seen(x.size(), false);
  Shape out;
  for (const int64_t d : dims) {
    if (d >= static_cast<int64_t>(x.size()) || seen[static_cast<size_t>(d)]) fail(node, "permute dims are not a permutation");
    seen[static_cast<size_t>(d)] = true;
    out.push_back(x[static_cast<size_t>(d)]);
  }
  return out;
}

Shape cat_shape(const Node& node, const std::vector<const Shape*>& xs) {
  const size_t dim = static_cast<size_t>(node.attrs.dim);
  Shape out = *xs[0];
  if (dim >= out.size()) fail(node, "cat dim is beyond the inputs' rank");
  for (size_t k = 1; k < xs.size(); ++k) {
    const Shape& s = *xs[k];
    if (s.size() != out.size()) fail(node, "cat inputs differ in rank");
    for (size_t d = 0; d < s.size(); ++d) {
      if (d != dim && s[d] != out[d]) fail(node, "cat inputs differ in size");
    }
    out[dim] += s[dim];
  }
  return out;
}

Shape mean_shape(const Node& node, const Shape& x) {
  Shape out;
  for (size_t d = 0; d < x.size(); ++d) {
    const bool reduced = std::count(node.attrs.dims.begin(), node.attrs.dims.end(), static_cast<int64_t>(d)) > 0;
    if (!reduced) out.push_back(x[d]);
    else if (node.attrs.keepdim) out.push_back(1);
  }
  for (const int64_t d : node.attrs.dims) {
    if (d <= 0 || d >= static_cast<int64_t>(x.size())) fail(node, "mean dims out of range");
  }
  return out;
}

Shape norm_shape(const Node& node, const Shape& x) {
  if (x.size() < 2) fail(node, "normalisation wants a channel dimension");
  const int64_t channels = x[1];
  if (node.op == "batch_norm") {
    for (const char* f : {"running_mean", "running_var", "weight", "bias"}) check_channel_tensor(node, f, channels);
  } else if (node.op == "instance_norm") {
    if (x.size() < 3) fail(node, "instance norm wants N x C x L or N x C x H x W");
    if (node.attrs.running_stats && !(node.tensors.count("running_mean") && node.tensors.count("running_var"))) {
      fail(node, "running statistics are missing");
    }
    for (const char* f : {"running_mean", "running_var", "weight", "bias"}) check_channel_tensor(node, f, channels);
  } else if (node.op == "group_norm") {
    if (channels % node.attrs.norm_groups != 0) fail(node, "channels are not divisible by the groups");
    for (const char* f : {"weight", "bias"}) check_channel_tensor(node, f, channels);
  } else {  // layer_norm: the trailing dims are the normalized shape
    const Shape& s = node.attrs.shape;
    if (s.size() >= x.size() || !std::equal(s.begin(), s.end(), x.end() - static_cast<std::ptrdiff_t>(s.size()))) {
      fail(node, "layer norm shape " + shape_text(s) + " does not end " + shape_text(x));
    }
    for (const char* f : {"weight", "bias"}) check_channel_tensor(node, f, numel(s));
  }
  return x;
}

// ----- float code -----

// ----- float layers: products on sgemm.h -----

constexpr int64_t kChunkColumns = 4096;  // columns of a transposed conv's product held at once

// Columns (sample i, output pixel p) of a conv's product: rows (input channel, tap) of `channels` input planes
// (h x w) at x + i * sample_stride; 0 outside the input.
struct Patches {
  const float* x;
  int64_t sample_stride, channels, h, w, wo, pixels;
  int64_t kernel[2], stride[2], padding[2], dilation[2];
};

// A run of `run` output pixels of one row (oh, ow..) of one sample, every (input channel, tap) row into
// dst[row * width + t]: unit-stride rows are copies between zero edges.
void pack_patch_run(const Patches& g, const float* sample, int64_t oh, int64_t ow, int64_t run, float* dst, int64_t width) {
  for (int64_t ic = 0; ic < g.channels; ++ic) {
    const float* plane = sample + ic * g.h * g.w;
    for (int64_t y = 0; y < g.kernel[0]; ++y) {
      const int64_t ih = oh * g.stride[0] - g.padding[0] + y * g.dilation[0];
      for (int64_t z = 0; z < g.kernel[1]; ++z, dst += width) {
        const int64_t iw0 = ow * g.stride[1] - g.padding[1] + z * g.dilation[1];
        if (ih < 0 || ih >= g.h) {
          std::fill(dst, dst + run, 0.0f);
        } else if (g.stride[1] == 1) {
          const int64_t lo = std::min(std::max<int64_t>(-iw0, 0), run), hi = std::min(std::max(g.w - iw0, lo), run);
          std::fill(dst, dst + lo, 0.0f);
          if (hi > lo) std::copy(plane + ih * g.w + iw0 + lo, plane + ih * g.w + iw0 + hi, dst + lo);
          std::fill(dst + hi, dst + run, 0.0f);
        } else {
          for (int64_t t = 0; t < run; ++t) {
            const int64_t iw = iw0 + t * g.stride[1];
            dst[t] = iw >= 0 && iw < g.w ? plane[ih * g.w + iw] : 0.0f;
          }
        }
      }
    }
  }
}

// Whether a full tile of `width` pixels from (oh, ow) reads every tap inside the input with unit stride, so
// each (input channel, tap) row of the product is `width` contiguous input values.
bool tile_inside(const Patches& g, int64_t oh, int64_t ow, int64_t width) {
  const int64_t ih = oh * g.stride[0] - g.padding[0], iw = ow - g.padding[1];
  return g.stride[1] == 1 && ow + width <= g.wo && ih >= 0 && ih + (g.kernel[0] - 1) * g.dilation[0] < g.h && iw >= 0 &&
         iw + (g.kernel[1] - 1) * g.dilation[1] + width <= g.w;
}

// Columns [col0, col0 + count) of the product: pointers into the input when the tile lies inside one output
// row and the input, else gathered into scratch (depth x width) a run of one output row at a time.
void pack_patches(const Patches& g, int64_t col0, int64_t count, float* scratch, int64_t width, const float** rows) {
  int64_t i = col0 / g.pixels, p = col0 % g.pixels;
  if (count == width && tile_inside(g, p / g.wo, p % g.wo, width)) {
    const float* sample = g.x + i * g.sample_stride;
    const int64_t ih = (p / g.wo) * g.stride[0] - g.padding[0], iw = p % g.wo - g.padding[1];
    for (int64_t ic = 0; ic < g.channels; ++ic) {
      for (int64_t y = 0; y < g.kernel[0]; ++y) {
        const float* row = sample + (ic * g.h + ih + y * g.dilation[0]) * g.w + iw;
        for (int64_t z = 0; z < g.kernel[1]; ++z) *rows++ = row + z * g.dilation[1];
      }
    }
    return;
  }
  const int64_t depth = g.channels * g.kernel[0] * g.kernel[1];
  for (int64_t k = 0; k < depth; ++k) rows[k] = scratch + k * width;
  float* dst = scratch;
  for (int64_t j = 0; j < count;) {
    const int64_t ow = p % g.wo, run = std::min(count - j, g.wo - ow);
    pack_patch_run(g, g.x + i * g.sample_stride, p / g.wo, ow, run, dst + j, width);
    j += run, p += run;
    if (p == g.pixels) p = 0, ++i;
  }
}

float bias_of(const Weight& w, int64_t channel) { return w.bias.empty() ? 0.0f : w.bias[static_cast<size_t>(channel)]; }

// The product's block (channels first_channel.. + rows) x (sample, pixel) columns into NCHW out, plus bias,
// then the fused activation.
void store_planes(const Weight& weight, const float* block, int64_t width, int64_t col0, int64_t count, int64_t rows,
                  int64_t first_channel, const Activation& then, Tensor& out) {
  const int64_t channels = out.shape[1], pixels = out.shape[2] * out.shape[3];
  int64_t i = col0 / pixels, p = col0 % pixels;
  for (int64_t j = 0; j < count;) {
    const int64_t run = std::min(count - j, pixels - p);
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = block + r * width + j;
      float* dst = out.data.data() + (i * channels + first_channel + r) * pixels + p;
      const float b = bias_of(weight, first_channel + r);
      for (int64_t t = 0; t < run; ++t) dst[t] = src[t] + b;
      activate(then, dst, dst, run);
    }
    j += run, p = 0, ++i;
  }
}

// A conv as weight (output channel x (input channel, tap)) times patches (.. x (sample, output pixel)), per group.
void conv2d(const Node& node, const Tensor& input, Tensor& out, const ParallelFor& parallel, const Activation& then) {
  const Attrs& a = node.attrs;
  Tensor padded;
  if (!a.pad.empty()) pad_tensor(input, a.pad, a.pad_mode, 0.0, padded);
  const Tensor& x = a.pad.empty() ? input : padded;
  const int64_t n = x.shape[0], ci = x.shape[1], h = x.shape[2], w = x.shape[3];
  const int64_t cig = ci / a.groups, cog = out.shape[1] / a.groups, pixels = out.shape[2] * out.shape[3];
  for (int64_t g = 0; g < a.groups; ++g) {
    const Patches src{x.data.data() + g * cig * h * w, ci * h * w, cig, h, w, out.shape[3], pixels,
                      {a.kernel[0], a.kernel[1]}, {a.stride[0], a.stride[1]}, {a.padding[0], a.padding[1]},
                      {a.dilation[0], a.dilation[1]}};
    sgemm(node.weight.gemm[static_cast<size_t>(g)], n * pixels,
          [&](int64_t col0, int64_t count, float* scratch, int64_t width, const float** rows) {
            pack_patches(src, col0, count, scratch, width, rows);
          },
          [&](int64_t col0, int64_t count, const float* block, int64_t width) {
            store_planes(node.weight, block, width, col0, count, cog, g * cog, then, out);
          },
          parallel);
  }
}

// out[r, c] = then(sum_k x[r, k] * B[k, c] + bias[c / per_bias]) for the weight packed as B (linear, latent layer):
// rows of x are the product's A, packed per call.
void rows_times_weight(const Weight& weight, const float* x, int64_t rows, int64_t per_bias, float* out,
                       const ParallelFor& parallel, const Activation& then) {
  const PackedColumns& b = weight.columns;
  const PackedWeights a = pack_weights(x, rows, b.depth, b.depth, 1);
  sgemm(a, b.columns, [&](int64_t col0, int64_t, float*, int64_t, const float** rows) { b.tile_rows(col0, rows); },
        [&](int64_t col0, int64_t count, const float* block, int64_t width) {
          for (int64_t r = 0; r < rows; ++r) {
            float* dst = out + r * b.columns + col0;
            const float* src = block + r * width;
            if (weight.bias.empty()) {  // a plain copy (a generator's latent layer mostly has no bias)
              std::copy_n(src, count, dst);
            } else {
              for (int64_t j = 0; j < count; ++j) dst[j] = src[j] + weight.bias[static_cast<size_t>((col0 + j) / per_bias)];
            }
            activate(then, dst, dst, count);
          }
        },
        parallel);
}

// A generator's latent layer: a transposed conv on a 1 x 1 input without padding, groups or dilation writes
// sum_ic x[ic] * weight[ic, (oc, y, z)] to output (oc, y, z): one product with the weight as B.
bool is_latent_transpose(const Attrs& a, const Shape& x) {
  return x[2] == 1 && x[3] == 1 && a.groups == 1 && a.padding[0] == 0 && a.padding[1] == 0 &&
         a.output_padding[0] == 0 && a.output_padding[1] == 0 && a.dilation[0] == 1 && a.dilation[1] == 1;
}

// One output plane of a transposed conv: bias, then per tap (y, z) ascending the product's column of every
// input pixel that tap reaches, then the fused activation (cols: the plane's (tap x input pixel) rows, `stride` apart).
void add_taps(const Attrs& a, const float* cols, int64_t stride, int64_t h, int64_t w, int64_t ho, int64_t wo, float bias,
              const Activation& then, float* dst) {
  std::fill(dst, dst + ho * wo, bias);
  for (int64_t y = 0; y < a.kernel[0]; ++y) {
    for (int64_t z = 0; z < a.kernel[1]; ++z, cols += stride) {
      for (int64_t ih = 0; ih < h; ++ih) {
        const int64_t oh = ih * a.stride[0] - a.padding[0] + y * a.dilation[0];
        if (oh < 0 || oh >= ho) continue;
        for (int64_t iw = 0; iw < w; ++iw) {
          const int64_t ow = iw * a.stride[1] - a.padding[1] + z * a.dilation[1];
          if (ow >= 0 && ow < wo) dst[oh * wo + ow] += cols[ih * w + iw];
        }
      }
    }
  }
  activate(then, dst, dst, ho * wo);
}

// A transposed conv: per group and chunk of samples, the product weight ((output channel, tap) x input channel)
// times the input ((input channel) x (sample, input pixel)), then every output plane from its taps' columns.
void conv_transpose2d(const Node& node, const Tensor& x, Tensor& out, const ParallelFor& parallel, const Activation& then) {
  const Attrs& a = node.attrs;
  const int64_t n = x.shape[0], ci = x.shape[1], h = x.shape[2], w = x.shape[3];
  const int64_t co = out.shape[1], ho = out.shape[2], wo = out.shape[3], taps = a.kernel[0] * a.kernel[1];
  if (!node.weight.columns.tiles.empty()) {
    rows_times_weight(node.weight, x.data.data(), n, taps, out.data.data(), parallel, then);
    return;
  }
  const int64_t cig = ci / a.groups, cog = co / a.groups, rows = cog * taps, in_pixels = h * w;
  const int64_t per = std::max<int64_t>(1, kChunkColumns / in_pixels);
  std::vector<float> cols(static_cast<size_t>(rows * std::min(n, per) * in_pixels));
  for (int64_t g = 0; g < a.groups; ++g) {
    for (int64_t i0 = 0; i0 < n; i0 += per) {
      const int64_t samples = std::min(per, n - i0), columns = samples * in_pixels;
      const Patches src{x.data.data() + (i0 * ci + g * cig) * in_pixels, ci * in_pixels, cig, h, w, w, in_pixels,
                        {1, 1}, {1, 1}, {0, 0}, {1, 1}};
      sgemm(node.weight.gemm[static_cast<size_t>(g)], columns,
            [&](int64_t col0, int64_t count, float* scratch, int64_t width, const float** rows) {
            pack_patches(src, col0, count, scratch, width, rows);
          },
            [&](int64_t col0, int64_t count, const float* block, int64_t width) {
              for (int64_t r = 0; r < rows; ++r) std::copy_n(block + r * width, count, cols.data() + r * columns + col0);
            },
            parallel);
      parallel(samples * cog, [&](int64_t first, int64_t last) {
        for (int64_t plane = first; plane < last; ++plane) {
          const int64_t i = plane / cog, oc = plane % cog;
          add_taps(a, cols.data() + oc * taps * columns + i * in_pixels, columns, h, w, ho, wo, bias_of(node.weight, g * cog + oc), then,
                   out.data.data() + ((i0 + i) * co + g * cog + oc) * ho * wo);
        }
      });
    }
  }
}

void linear(const Node& node, const Tensor& x, Tensor& out, const ParallelFor& parallel, const Activation& then) {
  rows_times_weight(node.weight, x.data.data(), numel(x.shape) / node.attrs.in_channels, 1, out.data.data(), parallel, then);
}

const float* optional_data(const Node& node, const char* field) {
  const auto it = node.tensors.find(field);
  return it == node.tensors.end() ? nullptr : it->second.data.data();
}

// y = (x - mean) / sqrt(var + eps) * weight + bias over `count` values at x with stride 1.
void normalize(const float* x, float* y, int64_t count, double mean, double var, double eps, const float* weight,
               const float* bias, int64_t channel) {
  const float scale = static_cast<float>(1.0 / std::sqrt(var + eps));
  const float w = weight ? weight[channel] : 1.0f, b = bias ? bias[channel] : 0.0f;
  const float m = static_cast<float>(mean);
  for (int64_t k = 0; k < count; ++k) y[k] = (x[k] - m) * scale * w + b;
}

constexpr int64_t kLanes = 8;  // independent double partial sums: vectorised, no add latency chain

// sum_k f(x[k]) in double, lane k % kLanes, lanes added in order at the end (fixed order for any input).
template <typename Fn>
double lane_sum(const float* x, int64_t count, Fn f) {
  double lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= count; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += f(static_cast<double>(x[k + l]));
  }
  for (; k < count; ++k) lanes[k % kLanes] += f(static_cast<double>(x[k]));
  double sum = 0.0;
  for (const double lane : lanes) sum += lane;
  return sum;
}

void moments(const float* x, int64_t count, double& mean, double& var) {
  mean = lane_sum(x, count, [](double v) { return v; }) / static_cast<double>(count);
  const double m = mean;
  var = lane_sum(x, count, [m](double v) { return (v - m) * (v - m); }) / static_cast<double>(count);  // biased, as torch
}

// Per-channel mean and (biased) variance of one channels-last sample (pixels x c) in one pass: sums of x and x^2
// in float64, in pixel order (var = E[x^2] - mean^2, at least 0).
__attribute__((always_inline)) inline void channel_moments_body(const float* x, int64_t pixels, int64_t c, double* mean,
                                                                 double* var) {
  for (int64_t ch = 0; ch < c; ++ch) mean[ch] = 0.0, var[ch] = 0.0;
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const double v = static_cast<double>(x[p * c + ch]);
      mean[ch] += v, var[ch] += v * v;
    }
  }
  const double count = static_cast<double>(pixels);
  for (int64_t ch = 0; ch < c; ++ch) {
    mean[ch] /= count;
    var[ch] = std::max(var[ch] / count - mean[ch] * mean[ch], 0.0);
  }
}
LOWBIT_VECTOR_CLONES(channel_moments, (const float* x, int64_t pixels, int64_t c, double* mean, double* var),
                     (x, pixels, c, mean, var))

// Per-channel mean and biased variance (float64) of sample i of x (N, C, ...), as instance norm uses them.
void sample_moments(const Tensor& x, int64_t i, std::vector<double>& mean, std::vector<double>& var) {
  const int64_t c = x.shape[1], inner = inner_size(x.shape, 2);
  const float* sample = x.data.data() + i * c * inner;
  mean.resize(static_cast<size_t>(c)), var.resize(static_cast<size_t>(c));
  if (x.channels_last) return channel_moments(sample, inner, c, mean.data(), var.data());
  for (int64_t ch = 0; ch < c; ++ch) moments(sample + ch * inner, inner, mean[static_cast<size_t>(ch)], var[static_cast<size_t>(ch)]);
}

// y = (x - m[ch]) * scale[ch] * w[ch] + b[ch] over the c channels of each of `pixels` pixels (channels-last).
__attribute__((always_inline)) inline void affine_pixels_body(const float* x, float* y, int64_t pixels, int64_t c,
                                                               const float* m, const float* scale, const float* w,
                                                               const float* b) {
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t ch = 0; ch < c; ++ch) y[p * c + ch] = (x[p * c + ch] - m[ch]) * scale[ch] * w[ch] + b[ch];
  }
}
LOWBIT_VECTOR_CLONES(affine_pixels, (const float* x, float* y, int64_t pixels, int64_t c, const float* m,
                                     const float* scale, const float* w, const float* b),
                     (x, y, pixels, c, m, scale, w, b))

// normalize for a channels-last sample (pixels x c) (the same float operations), then the fused activation.
void normalize_pixels(const float* x, float* y, int64_t pixels, int64_t c, const std::vector<double>& mean,
                      const std::vector<double>& var, double eps, const float* weight, const float* bias, const Activation& then) {
  std::vector<float> m(static_cast<size_t>(c)), scale(m), w(m), b(m);
  for (int64_t ch = 0; ch < c; ++ch) {
    const size_t k = static_cast<size_t>(ch);
    m[k] = static_cast<float>(mean[k]), scale[k] = static_cast<float>(1.0 / std::sqrt(var[k] + eps));
    w[k] = weight ? weight[ch] : 1.0f, b[k] = bias ? bias[ch] : 0.0f;
  }
  affine_pixels(x, y, pixels, c, m.data(), scale.data(), w.data(), b.data());
  activate(then, y, y, pixels * c);
}

// One sample of channel_norm: its own moments first unless `stats` (mean and var hold the running ones).
__attribute__((noinline)) void norm_sample(const Node& node, const Tensor& x, Tensor& out, int64_t i, bool stats,
                                           std::vector<double>& mean, std::vector<double>& var, const Activation& then) {
  const int64_t c = x.shape[1], inner = inner_size(x.shape, 2);
  const float* weight = optional_data(node, "weight");
  const float* bias = optional_data(node, "bias");
  if (!stats) sample_moments(x, i, mean, var);
  const float* src = x.data.data() + i * c * inner;
  float* dst = out.data.data() + i * c * inner;
  if (x.channels_last) return normalize_pixels(src, dst, inner, c, mean, var, node.attrs.eps, weight, bias, then);
  for (int64_t ch = 0; ch < c; ++ch) {
    const size_t k = static_cast<size_t>(ch);
    normalize(src + ch * inner, dst + ch * inner, inner, mean[k], var[k], node.attrs.eps, weight, bias, ch);
    activate(then, dst + ch * inner, dst + ch * inner, inner);
  }
}

// Batch norm (running statistics) or instance norm (each sample's own, unless it tracks running ones), the
// samples shared out over the threads (each is computed alike on any thread: the same outputs for any count).
void channel_norm(const Node& node, const Tensor& x, Tensor& out, const ParallelFor& parallel, const Activation& then) {
  const int64_t c = x.shape[1];
  const bool stats = node.op == "batch_norm" || node.attrs.running_stats;
  std::vector<double> running_mean, running_var;
  if (stats) {
    const float* m = optional_data(node, "running_mean");
    const float* v = optional_data(node, "running_var");
    running_mean.assign(m, m + c), running_var.assign(v, v + c);
  }
  parallel(x.shape[0], [&](int64_t begin, int64_t end) {
    std::vector<double> mean = running_mean, var = running_var;
    for (int64_t i = begin; i < end; ++i) norm_sample(node, x, out, i, stats, mean, var, then);
  });
}

void group_norm(const Node& node, const Tensor& x, Tensor& out) {
  const int64_t n = x.shape[0], c = x.shape[1], inner = inner_size(x.shape, 2), groups = node.attrs.norm_groups;
  const int64_t per = c / groups;
  const float* weight = optional_data(node, "weight");
  const float* bias = optional_data(node, "bias");
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = (i * c + g * per) * inner;
      double mean = 0.0, var = 0.0;
      moments(x.data.data() + first, per * inner, mean, var);
      for (int64_t ch = 0; ch < per; ++ch) {
        normalize(x.data.data() + first + ch * inner, out.data.data() + first + ch * inner, inner, mean, var,
                  node.attrs.eps, weight, bias, g * per + ch);
      }
    }
  }
}

void layer_norm(const Node& node, const Tensor& x, Tensor& out) {
  const int64_t inner = numel(node.attrs.shape), rows = numel(x.shape) / inner;
  const float* weight = optional_data(node, "weight");
  const float* bias = optional_data(node, "bias");
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x.data.data() + r * inner;
    float* dst = out.data.data() + r * inner;
    double mean = 0.0, var = 0.0;
    moments(src, inner, mean, var);
    const float scale = static_cast<float>(1.0 / std::sqrt(var + node.attrs.eps));
    for (int64_t k = 0; k < inner; ++k) {
      dst[k] = (src[k] - static_cast<float>(mean)) * scale * (weight ? weight[k] : 1.0f) + (bias ? bias[k] : 0.0f);
    }
  }
}

// sign(x) with sign(0) = +1, a vectorised loop.
__attribute__((always_inline)) inline void sign_run_body(const float* x, float* y, int64_t count) {
  for (int64_t k = 0; k < count; ++k) y[k] = x[k] >= 0.0f ? 1.0f : -1.0f;
}
LOWBIT_VECTOR_CLONES(sign_run, (const float* x, float* y, int64_t count), (x, y, count))

// Nearest of the sorted levels (ties go down, as torch.bucketize), or sign(x) with sign(0) = +1 for {-1, +1};
// applied to x - shift[c] when the node has a per-channel shift.
void quant_act(const Node& node, const Tensor& input, Tensor& out) {
  const Floats& stored = node.tensors.at("levels").data;
  std::vector<float> levels(stored.begin(), stored.end());
  std::sort(levels.begin(), levels.end());
  const bool sign = levels.size() == 2 && levels[0] == -1.0f && levels[1] == 1.0f;
  std::vector<float> midpoints;
  for (size_t k = 1; k < levels.size(); ++k) midpoints.push_back((levels[k] + levels[k - 1]) / 2.0f);
  Tensor shifted;
  if (node.tensors.count("shift")) {
    shifted = input;
    subtract_shift(shifted, node.tensors.at("shift").data);
  }
  const Tensor& x = node.tensors.count("shift") ? shifted : input;
  if (sign) return sign_run(x.data.data(), out.data.data(), static_cast<int64_t>(x.data.size()));
  for (size_t k = 0; k < x.data.size(); ++k) {
    const size_t bucket = static_cast<size_t>(std::lower_bound(midpoints.begin(), midpoints.end(), x.data[k]) - midpoints.begin());
    out.data[k] = levels[bucket];
  }
}

void unary(const Node& node, const Tensor& x, Tensor& out) {
  activate(activation_of(node), x.data.data(), out.data.data(), static_cast<int64_t>(x.data.size()));
}

void prelu(const Node& node, const Tensor& x, Tensor& out) {
  const Floats& weight = node.tensors.at("weight").data;
  const int64_t channels = x.shape.size() > 1 ? x.shape[1] : 1, inner = inner_size(x.shape, 2);
  for (size_t k = 0; k < x.data.size(); ++k) {
    const float slope = weight.size() == 1 ? weight[0] : weight[static_cast<size_t>((static_cast<int64_t>(k) / inner) % channels)];
    out.data[k] = x.data[k] > 0.0f ? x.data[k] : x.data[k] * slope;
  }
}

// lowbit.nn.RPReLU (ReActNet eq. 3): u = x - shift_in[c]; y = (u >= 0 ? u : slope[c] * u) + shift_out[c].
void rprelu(const Node& node, const Tensor& x, Tensor& out) {
  const float* shift_in = node.tensors.at("shift_in").data.data();
  const float* slope = node.tensors.at("slope").data.data();
  const float* shift_out = node.tensors.at("shift_out").data.data();
  const int64_t channels = x.shape[1], inner = inner_size(x.shape, 2), planes = numel(x.shape) / inner;
  for (int64_t p = 0; p < planes; ++p) {
    const int64_t c = p % channels;
    const float* src = x.data.data() + p * inner;
    float* dst = out.data.data() + p * inner;
    for (int64_t k = 0; k < inner; ++k) {
      const float u = src[k] - shift_in[c];
      dst[k] = (u >= 0.0f ? u : slope[c] * u) + shift_out[c];
    }
  }
}

void resize(const Node& node, const Tensor& x, Tensor& out) {
  const Resize& r = node.attrs.resize;
  const int64_t planes = x.shape[0] * x.shape[1], h = x.shape[2], w = x.shape[3], ho = out.shape[2], wo = out.shape[3];
  const float sh = resize_scale(r, 0, h, ho), sw = resize_scale(r, 1, w, wo);
  // Source coordinate of an output index: nearest floors dst * scale; bilinear uses pixel centres.
  auto source = [&](int64_t dst, float scale, int64_t in, int64_t& i0, int64_t& i1, float& l1) {
    if (r.nearest) {
      i0 = i1 = std::min(static_cast<int64_t>(std::floor(static_cast<float>(dst) * scale)), in - 1);
      l1 = 0.0f;
      return;
    }
    float src = r.align_corners ? scale * static_cast<float>(dst) : scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
    src = src < 0.0f ? 0.0f : src;
    i0 = std::min(static_cast<int64_t>(src), in - 1);
    i1 = i0 + (i0 < in - 1 ? 1 : 0);
    l1 = src - static_cast<float>(i0);
  };
  std::vector<int64_t> w0(static_cast<size_t>(wo)), w1(static_cast<size_t>(wo));
  std::vector<float> wl(static_cast<size_t>(wo));
  for (int64_t ow = 0; ow < wo; ++ow) source(ow, sw, w, w0[static_cast<size_t>(ow)], w1[static_cast<size_t>(ow)], wl[static_cast<size_t>(ow)]);
  for (int64_t p = 0; p < planes; ++p) {
    const float* src = x.data.data() + p * h * w;
    float* dst = out.data.data() + p * ho * wo;
    for (int64_t oh = 0; oh < ho; ++oh) {
      int64_t h0 = 0, h1 = 0;
      float hl = 0.0f;
      source(oh, sh, h, h0, h1, hl);
      for (int64_t ow = 0; ow < wo; ++ow) {
        const size_t o = static_cast<size_t>(ow);
        const float l1 = wl[o], l0 = 1.0f - l1;
        const float top = l0 * src[h0 * w + w0[o]] + l1 * src[h0 * w + w1[o]];
        const float bottom = l0 * src[h1 * w + w0[o]] + l1 * src[h1 * w + w1[o]];
        dst[oh * wo + ow] = r.nearest ? src[h0 * w + w0[o]] : (1.0f - hl) * top + hl * bottom;
      }
    }
  }
}

void pixel_shuffle(const Node& node, const Tensor& x, Tensor& out) {
  const int64_t f = node.attrs.factor, n = out.shape[0], c = out.shape[1], ho = out.shape[2], wo = out.shape[3];
  const int64_t h = x.shape[2], w = x.shape[3];
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t ch = 0; ch < c; ++ch) {
      for (int64_t oh = 0; oh < ho; ++oh) {
        for (int64_t ow = 0; ow < wo; ++ow) {
          const int64_t src_c = ch * f * f + (oh % f) * f + ow % f;
          out.data[static_cast<size_t>(((i * c + ch) * ho + oh) * wo + ow)] =
              x.data[static_cast<size_t>(((i * x.shape[1] + src_c) * h + oh / f) * w + ow / f)];
        }
      }
    }
  }
}

// Row-major strides of `shape`, with 0 where a broadcast dimension of size 1 meets a larger output.
std::vector<int64_t> strides_for(const Shape& shape, const Shape& out) {
  std::vector<int64_t> strides(out.size(), 0);
  int64_t stride = 1;
  for (size_t k = 0; k < shape.size(); ++k) {
    const size_t d = shape.size() - 1 - k, o = out.size() - 1 - k;
    strides[o] = shape[d] == 1 ? 0 : stride;
    stride *= shape[d];
  }
  return strides;
}

// Calls fn(out index, offset in a, offset in b) for every output element (row-major).
template <typename Fn>
void for_each_index(const Shape& out, const std::vector<int64_t>& sa, const std::vector<int64_t>& sb, Fn fn) {
  const int64_t total = numel(out);
  std::vector<int64_t> index(out.size(), 0);
  int64_t oa = 0, ob = 0;
  for (int64_t k = 0; k < total; ++k) {
    fn(k, oa, ob);
    for (size_t d = out.size(); d-- > 0;) {
      ++index[d], oa += sa[d], ob += sb[d];
      if (index[d] < out[d]) break;
      oa -= sa[d] * out[d], ob -= sb[d] * out[d], index[d] = 0;
    }
  }
}

enum class Arith { Add, Sub, Mul, Div };

Arith arith_of(const std::string& op) {
  return op == "add" ? Arith::Add : op == "sub" ? Arith::Sub : op == "mul" ? Arith::Mul : Arith::Div;
}

inline float arith(Arith op, float x, float y) {
  switch (op) {
    case Arith::Add: return x + y;
    case Arith::Sub: return x - y;
    case Arith::Mul: return x * y;
    default: return x / y;
  }
}

template <Arith Op>
__attribute__((always_inline)) inline void arith_loop(const float* a, const float* b, float* dst, int64_t count) {
  for (int64_t k = 0; k < count; ++k) dst[k] = arith(Op, a[k], b[k]);
}

// dst[k] = a[k] op b[k] (a residual connection): the op picked once, so each loop vectorises.
__attribute__((always_inline)) inline void arith_run_body(Arith op, const float* a, const float* b, float* dst,
                                                           int64_t count) {
  switch (op) {
    case Arith::Add: return arith_loop<Arith::Add>(a, b, dst, count);
    case Arith::Sub: return arith_loop<Arith::Sub>(a, b, dst, count);
    case Arith::Mul: return arith_loop<Arith::Mul>(a, b, dst, count);
    default: return arith_loop<Arith::Div>(a, b, dst, count);
  }
}
LOWBIT_VECTOR_CLONES(arith_run, (Arith op, const float* a, const float* b, float* dst, int64_t count),
                     (op, a, b, dst, count))

void elementwise(const Node& node, const std::vector<const Tensor*>& in, Tensor& out) {
  const Arith op = arith_of(node.op);
  float* dst = out.data.data();
  const int64_t count = static_cast<int64_t>(out.data.size());
  if (node.attrs.has_scalar) {
    const float s = static_cast<float>(node.attrs.scalar);
    const float* x = in[0]->data.data();
    if (node.attrs.scalar_first) {
      for (int64_t k = 0; k < count; ++k) dst[k] = arith(op, s, x[k]);
    } else {
      for (int64_t k = 0; k < count; ++k) dst[k] = arith(op, x[k], s);
    }
    return;
  }
  const Tensor& a = *in[0];
  const Tensor& b = *in[1];
  if (a.shape == b.shape) return arith_run(op, a.data.data(), b.data.data(), dst, count);  // no broadcasting
  for_each_index(out.shape, strides_for(a.shape, out.shape), strides_for(b.shape, out.shape), [&](int64_t k, int64_t ia, int64_t ib) {
    dst[k] = arith(op, a.data[static_cast<size_t>(ia)], b.data[static_cast<size_t>(ib)]);
  });
}

void permute(const Node& node, const Tensor& x, Tensor& out) {
  const std::vector<int64_t> in_strides = strides_for(x.shape, x.shape);
  std::vector<int64_t> strides;
  for (const int64_t d : node.attrs.dims) strides.push_back(in_strides[static_cast<size_t>(d)]);
  for_each_index(out.shape, strides, strides, [&](int64_t k, int64_t ix, int64_t) { out.data[static_cast<size_t>(k)] = x.data[static_cast<size_t>(ix)]; });
}

// Channels-last inputs (all of them, joined along dim 1) have their channels innermost: one run per pixel.
void cat(const Node& node, const std::vector<const Tensor*>& in, Tensor& out) {
  const size_t dim = static_cast<size_t>(node.attrs.dim);
  const int64_t outer = out.channels_last ? numel(out.shape) / out.shape[1]
                                          : numel(Shape(out.shape.begin(), out.shape.begin() + static_cast<std::ptrdiff_t>(dim)));
  const int64_t inner = out.channels_last ? 1 : inner_size(out.shape, dim + 1);
  float* dst = out.data.data();
  for (int64_t o = 0; o < outer; ++o) {
    for (const Tensor* t : in) {
      const int64_t chunk = t->shape[dim] * inner;
      dst = std::copy_n(t->data.begin() + o * chunk, chunk, dst);
    }
  }
}

void mean(const Node& node, const Tensor& x, Tensor& out) {
  Shape kept = x.shape;  // the output with keepdim: reduced dims of size 1
  for (const int64_t d : node.attrs.dims) kept[static_cast<size_t>(d)] = 1;
  std::vector<double> sums(static_cast<size_t>(numel(kept)), 0.0);
  const std::vector<int64_t> strides = strides_for(kept, x.shape);
  for_each_index(x.shape, strides, strides, [&](int64_t k, int64_t o, int64_t) { sums[static_cast<size_t>(o)] += x.data[static_cast<size_t>(k)]; });
  const double count = static_cast<double>(numel(x.shape) / numel(kept));
  for (size_t k = 0; k < sums.size(); ++k) out.data[k] = static_cast<float>(sums[k] / count);
}

}  // namespace

void subtract_shift(Tensor& x, const Floats& shift) {
  const int64_t channels = x.shape.size() > 1 ? x.shape[1] : 1, inner = inner_size(x.shape, 2);
  // Runs of `run` values share a channel (channels-last: runs of one, cycling through the channels).
  const int64_t run = x.channels_last ? 1 : inner, runs = static_cast<int64_t>(x.data.size()) / run;
  for (int64_t r = 0; r < runs; ++r) {
    const float s = shift[static_cast<size_t>(r % channels)];
    float* v = x.data.data() + r * run;
    for (int64_t k = 0; k < run; ++k) v[k] = v[k] - s;
  }
}

Shape padded_shape(const Shape& x, const std::vector<int64_t>& pad) {
  Shape out = x;
  for (size_t k = 0; k < pad.size() / 2; ++k) out[x.size() - 1 - k] += pad[2 * k] + pad[2 * k + 1];
  return out;
}

namespace {

// pad_tensor on row-major values of `shape`: every output row (last dimension) is a copy of an input row, the
// constant, or a gather along the row of reflected / clamped / constant elements.
void pad_values(const float* x, const Shape& shape, const std::vector<int64_t>& pad, const std::string& mode, float value,
                float* out) {
  const size_t rank = shape.size();
  const Shape out_shape = padded_shape(shape, pad);
  // Per dimension, the source index of every output index: reflected, clamped, or -1 (the constant).
  std::vector<std::vector<int64_t>> source(rank);
  for (size_t d = 0; d < rank; ++d) {
    const size_t from_last = rank - 1 - d;
    const int64_t before = from_last < pad.size() / 2 ? pad[2 * from_last] : 0, n = shape[d];
    for (int64_t o = 0; o < out_shape[d]; ++o) {
      int64_t i = o - before;
      if (i < 0 || i >= n) {
        i = mode == "constant" ? -1 : mode == "reflect" ? (i < 0 ? -i : 2 * (n - 1) - i) : std::min(std::max<int64_t>(i, 0), n - 1);
      }
      source[d].push_back(i);
    }
  }
  const std::vector<int64_t> in_strides = strides_for(shape, shape);
  const std::vector<int64_t>& last = source[rank - 1];
  const int64_t width = out_shape[rank - 1], rows = numel(out_shape) / width;
  const bool whole_rows = width == shape[rank - 1] && (pad.empty() || pad[0] == 0);  // the last dimension is not padded
  std::vector<int64_t> index(rank, 0);  // of the row's first element
  for (int64_t r = 0; r < rows; ++r) {
    int64_t base = 0;
    bool inside = true;
    for (size_t d = 0; d + 1 < rank && inside; ++d) {
      const int64_t i = source[d][static_cast<size_t>(index[d])];
      inside = i >= 0;
      base += i * in_strides[d];
    }
    float* dst = out + r * width;
    if (!inside) {
      std::fill(dst, dst + width, value);
    } else if (whole_rows) {
      std::copy_n(x + base, width, dst);
    } else {
      for (int64_t o = 0; o < width; ++o) {
        const int64_t i = last[static_cast<size_t>(o)];
        dst[o] = i >= 0 ? x[base + i] : value;
      }
    }
    for (size_t d = rank - 1; d-- > 0;) {
      if (++index[d] < out_shape[d]) break;
      index[d] = 0;
    }
  }
}

}  // namespace

void pad_tensor(const Tensor& x, const std::vector<int64_t>& pad, const std::string& mode, double value, Tensor& out) {
  out.shape = padded_shape(x.shape, pad);
  out.channels_last = x.channels_last;
  out.data.resize(static_cast<size_t>(numel(out.shape)));
  if (!x.channels_last) return pad_values(x.data.data(), x.shape, pad, mode, static_cast<float>(value), out.data.data());
  // Stored (N, H, W, C): the pads of W and H (run_op keeps this layout for no others) one dimension further in.
  std::vector<int64_t> inner{0, 0};
  inner.insert(inner.end(), pad.begin(), pad.end());
  pad_values(x.data.data(), {x.shape[0], x.shape[2], x.shape[3], x.shape[1]}, inner, mode, static_cast<float>(value),
             out.data.data());
}

void channels_first(const float* nhwc, int64_t n, int64_t pixels, int64_t c, float* out) {
  if (c == 1 || pixels == 1) {  // both layouts agree (a generator's 1-channel image)
    std::copy_n(nhwc, n * pixels * c, out);
    return;
  }
  constexpr int64_t kBlock = 16;  // a block of pixels x channels: both its reads and its writes stay in a few lines
  for (int64_t i = 0; i < n; ++i) {
    const float* src = nhwc + i * pixels * c;
    float* dst = out + i * pixels * c;
    for (int64_t p0 = 0; p0 < pixels; p0 += kBlock) {
      for (int64_t c0 = 0; c0 < c; c0 += kBlock) {
        const int64_t p1 = std::min(p0 + kBlock, pixels), c1 = std::min(c0 + kBlock, c);
        for (int64_t ch = c0; ch < c1; ++ch) {
          for (int64_t p = p0; p < p1; ++p) dst[ch * pixels + p] = src[p * c + ch];
        }
      }
    }
  }
}

void to_channels_first(const Tensor& x, Tensor& out) {
  out.shape = x.shape;
  out.channels_last = false;
  out.data.resize(x.data.size());
  if (!x.channels_last) {
    std::copy(x.data.begin(), x.data.end(), out.data.begin());
    return;
  }
  channels_first(x.data.data(), x.shape[0], x.shape[2] * x.shape[3], x.shape[1], out.data.data());
}

// Cold (optimised for size): it runs once per node at load, and its checks' messages were 10 KB of -O3 code.
[[gnu::cold]] Shape infer_shape(const Node& node, const std::vector<const Shape*>& in) {
  const std::string& op = node.op;
  if (op == "constant") return node.tensors.at("value").shape;
  const Shape& x = *in[0];
  if (x.empty() || x.size() > kMaxRank) fail(node, "input rank " + std::to_string(x.size()) + " is not supported");
  if (op == "conv2d" || op == "conv_transpose2d") return conv_shape(node, x);
  if (op == "linear") {
    if (x.back() != node.attrs.in_channels) fail(node, "input " + shape_text(x) + " does not end in the layer's in_features");
    Shape out = x;
    out.back() = node.attrs.out_channels;
    return out;
  }
  if (op == "batch_norm" || op == "instance_norm" || op == "group_norm" || op == "layer_norm") return norm_shape(node, x);
  const int64_t channels = x.size() > 1 ? x[1] : 1;  // dim 1, as torch's per-channel parameters
  if (op == "quant_act") {
    if (node.tensors.count("shift")) check_channel_tensor(node, "shift", channels);
    return x;
  }
  if (op == "rprelu") {
    if (x.size() < 2) fail(node, "rprelu wants a channel dimension");
    for (const char* f : {"shift_in", "slope", "shift_out"}) check_channel_tensor(node, f, channels);
    return x;
  }
  if (op == "prelu") {
    const size_t count = node.tensors.at("weight").data.size();
    if (count != 1 && static_cast<int64_t>(count) != channels) fail(node, "prelu weight does not fit the channels");
    return x;
  }
  if (op == "pad") {
    const std::vector<int64_t>& pad = node.attrs.pad;
    if (pad.size() / 2 >= x.size()) fail(node, "pad covers the batch dimension");
    for (size_t k = 0; k < pad.size(); ++k) {
      if (node.attrs.pad_mode == "reflect" && pad[k] >= x[x.size() - 1 - k / 2]) {
        fail(node, "reflect padding exceeds the input");
      }
    }
    return padded_shape(x, pad);
  }
  if (op == "interpolate") return resize_shape(node, x);
  if (op == "pixel_shuffle") {
    const int64_t f = node.attrs.factor;
    if (x.size() != 4 || x[1] % (f * f) != 0) fail(node, "pixel shuffle wants N x C*r*r x H x W");
    return {x[0], x[1] / (f * f), x[2] * f, x[3] * f};
  }
  if (op == "reshape") return reshape_shape(node, x);
  if (op == "permute") return permute_shape(node, x);
  if (op == "cat") return cat_shape(node, in);
  if (op == "mean") return mean_shape(node, x);
  if (op == "add" || op == "sub" || op == "mul" || op == "div") {
    if (in.size() != (node.attrs.has_scalar ? 1u : 2u)) fail(node, "wrong number of operands");
    return node.attrs.has_scalar ? x : broadcast_shape(node, x, *in[1]);
  }
  if (in.size() != 1) fail(node, "wrong number of inputs");
  return x;  // element-wise activations
}

const ParallelFor& serial() {
  static constexpr auto run_serially = [](int64_t n, const ParallelBody& body) {
    if (n > 0) body(0, n);
  };
  static const ParallelFor one = run_serially;
  return one;
}

void prepare_float_layer(Node& node, const Shape& input) {
  Weight& w = node.weight;
  const Attrs& a = node.attrs;
  const int64_t taps = a.kernel[0] * a.kernel[1];
  if (node.op == "linear") {
    w.columns = pack_columns(w.values.data(), a.in_channels, a.out_channels, 1, a.in_channels);
  } else if (node.op == "conv_transpose2d" && is_latent_transpose(a, input)) {
    w.columns = pack_columns(w.values.data(), a.in_channels, a.out_channels * taps, a.out_channels * taps, 1);
  } else {
    const bool transposed = node.op == "conv_transpose2d";
    const int64_t cig = a.in_channels / a.groups, cog = a.out_channels / a.groups;
    for (int64_t g = 0; g < a.groups; ++g) {
      // conv: (Co, Ci/g, kh, kw) rows by output channel; transposed: (Ci, Co/g, kh, kw) read as (oc, tap) x ic.
      w.gemm.push_back(transposed ? pack_weights(w.values.data() + g * cig * cog * taps, cog * taps, cig, 1, cog * taps)
                                  : pack_weights(w.values.data() + g * cog * cig * taps, cog, cig * taps, cig * taps, 1));
    }
  }
}

namespace {

// Whether run_op takes these inputs as they are when some are channels-last (and then writes `out` so):
// element-wise ops (a second operand of the same shape and layout), per-channel norms, pads of H and W, and
// joins along the channels of channels-last inputs only.
bool keeps_channels_last(const Node& node, const std::vector<const Tensor*>& in) {
  const auto last = [](const Tensor* t) { return t->channels_last; };
  if (std::none_of(in.begin(), in.end(), last)) return false;
  const std::string& op = node.op;
  if (activation_of(node).kind != Activation::None || op == "quant_act" || op == "batch_norm" || op == "instance_norm") {
    return true;
  }
  if (op == "add" || op == "sub" || op == "mul" || op == "div") {
    return node.attrs.has_scalar || (in[0]->shape == in[1]->shape && last(in[0]) && last(in[1]));
  }
  if (op == "pad") return node.attrs.pad.size() <= 4;
  return op == "cat" && node.attrs.dim == 1 && std::all_of(in.begin(), in.end(), last);
}

}  // namespace

void run_op(const Node& node, const std::vector<const Tensor*>& given, Tensor& out, const ParallelFor& parallel,
            const Activation& then) {
  out.channels_last = keeps_channels_last(node, given);
  const bool converts = !out.channels_last && std::any_of(given.begin(), given.end(), [](const Tensor* t) { return t->channels_last; });
  if (converts) {  // the channels-last inputs of an op that takes them channels-first, through NCHW copies
    std::vector<Tensor> nchw(given.size());
    std::vector<const Tensor*> in = given;
    for (size_t k = 0; k < given.size(); ++k) {
      if (given[k]->channels_last) to_channels_first(*given[k], nchw[k]), in[k] = &nchw[k];
    }
    return run_op(node, in, out, parallel, then);
  }
  const std::vector<const Tensor*>& in = given;
  const std::string& op = node.op;
  const bool fuses = op == "conv2d" || op == "conv_transpose2d" || op == "linear" || op == "batch_norm" || op == "instance_norm";
  if (op == "constant") out.data = node.tensors.at("value").data;
  else if (op == "conv2d") conv2d(node, *in[0], out, parallel, then);
  else if (op == "conv_transpose2d") conv_transpose2d(node, *in[0], out, parallel, then);
  else if (op == "linear") linear(node, *in[0], out, parallel, then);
  else if (op == "batch_norm" || op == "instance_norm") channel_norm(node, *in[0], out, parallel, then);
  else if (op == "group_norm") group_norm(node, *in[0], out);
  else if (op == "layer_norm") layer_norm(node, *in[0], out);
  else if (op == "quant_act") quant_act(node, *in[0], out);
  else if (op == "prelu") prelu(node, *in[0], out);
  else if (op == "rprelu") rprelu(node, *in[0], out);
  else if (op == "pad") pad_tensor(*in[0], node.attrs.pad, node.attrs.pad_mode, node.attrs.pad_value, out);
  else if (op == "interpolate") resize(node, *in[0], out);
  else if (op == "pixel_shuffle") pixel_shuffle(node, *in[0], out);
  else if (op == "reshape") out.data = in[0]->data;
  else if (op == "permute") permute(node, *in[0], out);
  else if (op == "cat") cat(node, in, out);
  else if (op == "mean") mean(node, *in[0], out);
  else if (op == "add" || op == "sub" || op == "mul" || op == "div") elementwise(node, in, out);
  else unary(node, *in[0], out);
  if (!fuses) activate(then, out.data.data(), out.data.data(), static_cast<int64_t>(out.data.size()));
}

}  // namespace lowbit
