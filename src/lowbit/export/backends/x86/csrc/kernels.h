// Shared declarations of the bit-serial kernels: one copy, compiled into every translation unit that needs
// them (the per-ISA files scalar.cpp, avx2.cpp, avx512.cpp and the torch binding bitserial.cpp).
// Nothing here depends on torch, so the same sources can serve a runtime without it.
//
// Bit-serial kernels for layers whose input is binary (sign activations, x in {-1, +1}) and whose
// weights are k-bit codes with a per-output-channel codebook.
//
// Derivation (lowbit docs/export.md "Kernels"). Let xpos_i = 1 if x_i = +1 else 0, so x_i = 2*xpos_i - 1
// on the taps that fall inside the input (padding and the holes of a transposed conv contribute 0).
// For an output channel c:
//   sum_i w_i x_i = 2 * sum_i w_i xpos_i - sum_{i valid} w_i                                  (1)
// The last term does not depend on the input: it is the layer applied to an all-ones input ("corr",
// computed once per input size in Python). With an affine codebook w_i = scale_c * z_i + offset_c and
// z_i = sum_b 2^b z_i^(b):
//   sum_i w_i xpos_i = sum_b (scale_c 2^b) * popcount(z^(b) & xpos) + offset_c * popcount(xpos)    (2)
// A table codebook uses the planes of its cheapest exact decomposition (additive / fixed-point / one-hot,
// chosen per channel at plan time): w = offset_c + sum_p coef_{p,c} plane_p.
// Multi-level input (an affine activation low + step * code, code = sum_k 2^k a^(k)): every count becomes
// sum_k 2^k popcount(. & a^(k)) over A activation planes, accumulated exactly (Horner: acc = 2 acc + count,
// most significant plane first); the combine below is unchanged (docs/export.md eq. 4).
// So each output pixel needs popcount(plane_row & patch) for every (plane, channel) row, plus
// popcount(patch) once. Rows are stored transposed (word-major, rows padded to a multiple of 8) so a
// broadcast patch word meets 8 rows in one AVX-512 register (4 in AVX2) and no horizontal sums are needed.
//
// Convolutions are described by "phases": an output pixel (oh, ow) = (qh*out_step_h + ph, qw*out_step_w + pw)
// reads input (qh*in_step_h + tap_h[t], qw*in_step_w + tap_w[u]). A Conv2d is one phase (in_step = stride);
// a ConvTranspose2d with stride s is s*s phases with in_step 1, each keeping only the taps that hit input
// pixels (the sub-pixel decomposition), so no multiply-by-zero holes are computed.
//
// One call per layer (binary_conv): the input is sign-packed into a zero-padded bit image (a per-thread
// buffer reused across calls) wide enough that every tap of every phase lands inside it, so the pixel
// loops have no bounds checks; then every phase's output rows run. Per pixel, by shape:
//   * Co a multiple of 8 (4 on AVX2), <= 4 planes: register kernels (row_avx512_regs / row_avx2_regs) keep
//     the counts of a block of channels in registers, broadcast patch words straight from the bit image
//     and combine 8 (4) channels at a time;
//   * at most 16 rows (planes * Co, e.g. a generator's 1- or 3-channel output layer): AVX-512 vectorizes
//     over 8 neighbouring output pixels (one masked load per tap, or a gather per tap and activation
//     plane, when a pixel's plane is one word), the other paths go pixel by pixel with scalar popcounts
//     (<= 4 rows) or the generic lane loop;
//   * anything else: the generic loop (gather the patch, count all rows, combine).
// Every path accumulates the same exact integer counts and combines them in float64 in the same order
// (see binary_conv), so all paths give bit-identical outputs.
//
// Dispatch: the hot loops are compiled once per path with function-level target attributes (AVX-512
// VPOPCNTDQ, AVX2, portable scalar; NEON on ARM64), built without any -march flag; the caller passes the
// path id and supported_paths_mask() (driver.cpp) reads cpuid / the ARM64 hwcaps. Sign packing has AVX-512, AVX2 and
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>
// x86 has a popcount instruction only with this target; elsewhere __builtin_popcountll is native already.
#define LOWBIT_POPCNT_TARGET __attribute__((target("popcnt")))
#else
#define LOWBIT_POPCNT_TARGET
#endif

#include <cstddef>
#include <cstdint>
#include <vector>

#if !defined(LOWBIT_PATH_SCALAR) || !defined(LOWBIT_PATH_AVX2) || !defined(LOWBIT_PATH_AVX512) || \
    !defined(LOWBIT_PATH_NEON)
#error "build with -DLOWBIT_PATH_SCALAR=.. -DLOWBIT_PATH_AVX2=.. -DLOWBIT_PATH_AVX512=.. -DLOWBIT_PATH_NEON=.. (lowbit/export/backends/x86/build.py)"
#endif

namespace lowbit {

constexpr int64_t kScalar = LOWBIT_PATH_SCALAR;
constexpr int64_t kAvx2 = LOWBIT_PATH_AVX2;
constexpr int64_t kAvx512 = LOWBIT_PATH_AVX512;
constexpr int64_t kNeon = LOWBIT_PATH_NEON;

using RowsFn = void (*)(const uint64_t*, const uint64_t*, int64_t, int64_t, int64_t*);
using WordsFn = int64_t (*)(const uint64_t*, int64_t);

// ----- sign packing into bits: bit c of a pixel's word(s) set iff x[c, pixel] >= 0 -----
// NCHW input: a channel's plane is contiguous, so bits are gathered across planes; channels-last (NHWC)
// input: a pixel's channels are contiguous, so each 64-bit word is built from consecutive floats.
// Pixels are packed in chunks of up to kChunk; at[j] is the word index of chunk pixel j in the destination
// (which may be a zero-padded image, see PackGeometry), so the packers never divide.

constexpr int64_t kChunk = 64;

// sum_w popcount(patch[w]) with the popcount instruction (the AVX2, AVX-512 and NEON paths).
LOWBIT_POPCNT_TARGET inline int64_t words_popcnt(const uint64_t* patch, int64_t words) {
  int64_t total = 0;
  for (int64_t w = 0; w < words; ++w) total += __builtin_popcountll(patch[w]);
  return total;
}

using PackFn = void (*)(const float*, uint64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t);

// ----- binary-input conv: all phases of one layer in one call -----
//
// Output value (eq. 1-2 with the factor 2 folded into coef2 = 2*coef and offset2 = 2*offset, exact in
// floating point): out[c] = float(base[c] + offset2[c] * popcount(patch) + sum_b coef2[b, c] * count[b, c]),
// accumulated in double in exactly this order on every path, so all paths agree bit for bit. Narrow layers of
// 4-bit affine weights (ConvArgs::fold_planes: at most 32 one-plane input channels, Co a multiple of 16, four
// planes with coef2[b, c] = 2^b coef2[0, c]; pruned generators' layers, where the combine costs as much as the
// counts) add the planes first, as the exact integer n = sum_b 2^b count[b, c]: ... + coef2[0, c] * n.

// The all-ones base (bias - layer(all-ones input)) of every output pixel, stored once per border class: the
// pixels whose taps meet the same padding / holes pattern share one co-vector, so a layer keeps (row classes x
// column classes x co) doubles instead of (Ho x Wo x co). Pixel (oh, ow) reads values + (row[oh] + col[ow]) * co
// (row[oh] = its row class x the column classes, col[ow] = its column class); one entry per pixel is row[oh] =
// oh * Wo, col[ow] = ow.
struct BaseMap {
  const double* values = nullptr;  // (entries, co)
  const int64_t* row = nullptr;    // (Ho)
  const int64_t* col = nullptr;    // (Wo)
  int64_t entries = 0;
  const double* at(int64_t oh, int64_t ow, int64_t co) const { return values + (row[oh] + col[ow]) * co; }
};

// Why `map` would read outside its values for an ho x wo output ("" when every pixel's entry exists).
inline const char* check_base_map(const BaseMap& map, int64_t ho, int64_t wo) {
  if (map.values == nullptr || map.row == nullptr || map.col == nullptr) return "the base map is incomplete";
  int64_t max_row = 0, max_col = 0;
  for (int64_t oh = 0; oh < ho; ++oh) {
    if (map.row[oh] < 0) return "a base row index is negative";
    max_row = map.row[oh] > max_row ? map.row[oh] : max_row;
  }
  for (int64_t ow = 0; ow < wo; ++ow) {
    if (map.col[ow] < 0) return "a base column index is negative";
    max_col = map.col[ow] > max_col ? map.col[ow] : max_col;
  }
  return ho > 0 && wo > 0 && max_row + max_col >= map.entries ? "a base index is past the base values" : "";
}

// The fused threshold epilogue: a layer whose only reader is a binary layer packing it with one threshold per
// channel writes that reader's packed input instead of float32 outputs. Bit c of output pixel p is set iff
// signs[c] * float(value) >= thresholds[c] (> unless ties_up): the one-threshold packer's rule on the value the
// layer would have stored, so the bits equal packing the float output.
struct BitSink {
  uint64_t* bits = nullptr;           // (N, hp, wp, ceil(Co / 64)) words, the output at (pad_top, pad_left), zero borders
  const float* thresholds = nullptr;  // (Co)
  const float* signs = nullptr;       // (Co) of +1 / -1
  bool ties_up = true;
  int64_t pad_top = 0, pad_left = 0, hp = 0, wp = 0;
  // A one-plane combine (one weight plane, or planes folded into n; the output value above) writes its sink in
  // integers, with no float arithmetic: bit c of a pixel of border class e is ((n << 32) >= cuts[e, c] + slopes[c] *
  // positives) xor bit c of flips, a line in 32.32 fixed point that the runtime's plan_cuts fits to where the float
  // rule above flips and checks at every reachable positives. Multi-plane combines compare their float values.
  static constexpr int kCutBits = 32;  // the fraction bits of cuts and slopes: n << kCutBits is compared
  const int64_t* cuts = nullptr;    // (base entries, Co), laid out as the layer's BaseMap::values
  const int64_t* slopes = nullptr;  // (Co)
  const uint64_t* flips = nullptr;  // (ceil(Co / 64)) words
};

// Sets the bits of output channels c0.. (one block of a register kernel, within one word) in a pixel's sink words:
// the first block of a word writes it whole, so the sink's image needs zero borders only.
inline void set_sink_bits(uint64_t* bits, uint64_t c0, uint64_t set) {
  uint64_t& word = bits[c0 / 64];
  word = c0 % 64 == 0 ? set : word | set << (c0 % 64);
}

struct ConvArgs {
  const uint64_t* x;     // zero-padded bits (N, hp, wp, act_planes, wc): activation bit plane b at word b * wc
  const double* coef2;   // (planes, co)
  const double* offset2; // (co)
  BaseMap base;          // per pixel (Ho, Wo) a co-vector: bias - layer(all-ones input)
  float* out;            // (N, Ho, Wo, co): channels-last, one contiguous store per pixel (nullptr with a sink)
  const BitSink* sink = nullptr;  // the register kernels' other output: the next layer's bits instead of `out`
  int64_t hp, wp, wc, ho, wo, co, planes, rows_padded;
  int64_t in_step_h, in_step_w, out_step_h, out_step_w;
  int64_t act_planes = 1;  // activation bit planes A: every count is sum_b 2^b popcount(.. & plane_b)
  int64_t px_words = 0;    // words per padded pixel: act_planes * wc
  bool fold_planes = false;  // the weight planes' counts add up before the combine (see the output value above)
};

struct PhaseInfo {
  const uint64_t* w_t;        // (words, rows_padded), rows = plane * co + channel
  std::vector<uint32_t> w32;  // inputs of at most 32 channels on AVX-512: the low halves of w_t (row_avx512_half)
  std::vector<int64_t> offs;  // word offset of every tap (t, u) from the patch's top-left padded pixel
  std::vector<double> base_lanes;  // few-row layers: the phase's base as (n_qh, co, n_qw), a row's lanes contiguous
  int64_t ph, pw, n_qh, n_qw, words;
};

// ConvArgs::base of phase f's output pixels, lane-major (PhaseInfo::base_lanes): one load per 8 lanes.
inline std::vector<double> lane_base(const ConvArgs& a, const PhaseInfo& f) {
  std::vector<double> lanes(static_cast<size_t>(f.n_qh * a.co * f.n_qw));
  for (int64_t qh = 0; qh < f.n_qh; ++qh) {
    for (int64_t qw = 0; qw < f.n_qw; ++qw) {
      const double* base = a.base.at(qh * a.out_step_h + f.ph, qw * a.out_step_w + f.pw, a.co);
      for (int64_t c = 0; c < a.co; ++c) lanes[static_cast<size_t>((qh * a.co + c) * f.n_qw + qw)] = base[c];
    }
  }
  return lanes;
}

struct Scratch {
  std::vector<uint64_t> patch;
  std::vector<int64_t> counts;
  std::vector<int64_t> totals;  // the plane-weighted counts of multi-plane activations
};

// The output pixel (qh, qw) of phase f reads the padded input from here on (plus f.offs).
inline const uint64_t* patch_origin(const ConvArgs& a, int64_t i, int64_t qh, int64_t qw) {
  return a.x + ((i * a.hp + qh * a.in_step_h) * a.wp + qw * a.in_step_w) * a.px_words;
}

// One output pixel of the register kernels: its patch origin in the padded input, its base, its output row
// (or its words in the sink's bit image), and the set bits of its patch words (the ``positives`` of the combine).
struct Pixel {
  const uint64_t* px;
  const double* base;
  float* out;
  uint64_t* bits;
  int64_t positives;
};

// `count`: whether to count the positives here (a kernel may count them in its own tap loop instead).
LOWBIT_POPCNT_TARGET inline Pixel pixel_at(const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh,
                                           int64_t qw, int64_t oh, bool count = true) {
  const int64_t ow = qw * a.out_step_w + f.pw;
  Pixel p{patch_origin(a, i, qh, qw), a.base.at(oh, ow, a.co), nullptr, nullptr, 0};
  if (a.sink == nullptr) {
    p.out = a.out + ((i * a.ho + oh) * a.wo + ow) * a.co;
  } else {
    const BitSink& s = *a.sink;
    p.bits = s.bits + ((i * s.hp + oh + s.pad_top) * s.wp + ow + s.pad_left) * ((a.co + 63) / 64);
  }
  if (!count) return p;
  for (int64_t b = a.act_planes - 1; b >= 0; --b) {  // Horner: positives = sum_b 2^b popcount(plane b)
    p.positives *= 2;
    for (const int64_t off : f.offs) {
      for (int64_t k = 0; k < a.wc; ++k) p.positives += __builtin_popcountll(p.px[off + b * a.wc + k]);
    }
  }
  return p;
}

// Generic per-row loop (any co, planes): gathers the patch, Rows() counts every (plane, channel) row.
// Written once and inlined into each ISA's wrapper, so the compiler vectorizes the combine for that ISA.
template <RowsFn Rows, WordsFn Words>
__attribute__((always_inline)) inline void row_generic(const ConvArgs& a, const PhaseInfo& f, int64_t i,
                                                       int64_t qh, Scratch& s) {
  const int64_t co = a.co, wc = a.wc, taps = static_cast<int64_t>(f.offs.size());
  const int64_t oh = qh * a.out_step_h + f.ph;
  uint64_t* patch = s.patch.data();
  for (int64_t qw = 0; qw < f.n_qw; ++qw) {
    const int64_t ow = qw * a.out_step_w + f.pw;
    int64_t positive_count = 0;
    if (a.act_planes > 1) s.totals.assign(s.counts.size(), 0);
    for (int64_t b = a.act_planes - 1; b >= 0; --b) {  // Horner over the activation planes, exact integers
      const uint64_t* px = patch_origin(a, i, qh, qw) + b * wc;
      uint64_t* p = patch;
      for (int64_t t = 0; t < taps; ++t) {
        for (int64_t k = 0; k < wc; ++k) *p++ = px[f.offs[t] + k];
      }
      positive_count = 2 * positive_count + Words(patch, f.words);
      Rows(f.w_t, patch, f.words, a.rows_padded, s.counts.data());
      if (a.act_planes == 1) break;
      for (int64_t r = 0; r < a.rows_padded; ++r) s.totals[r] = 2 * s.totals[r] + s.counts[r];
    }
    const double positives = static_cast<double>(positive_count);
    const int64_t* cnt = a.act_planes == 1 ? s.counts.data() : s.totals.data();
    const double* base = a.base.at(oh, ow, co);
    float* out = a.out + ((i * a.ho + oh) * a.wo + ow) * co;
    for (int64_t c = 0; c < co; ++c) {
      double r = base[c] + a.offset2[c] * positives;
      if (a.fold_planes) {
        int64_t n = 0;
        for (int64_t b = a.planes - 1; b >= 0; --b) n = 2 * n + cnt[b * co + c];
        r = r + a.coef2[c] * static_cast<double>(n);
      } else {
        for (int64_t b = 0; b < a.planes; ++b) r = r + a.coef2[b * co + c] * static_cast<double>(cnt[b * co + c]);
      }
      out[c] = static_cast<float>(r);
    }
  }
}

// Few rows (R = planes * co <= 4) on the scalar and AVX2 paths: one output pixel at a time, its patch
// words read straight from the padded input, R + 1 scalar popcounts per word (the popcnt instruction
// where the wrapper's target has it).
template <int R>
__attribute__((always_inline)) inline void row_pixels(const ConvArgs& a, const PhaseInfo& f, int64_t i,
                                                      int64_t qh) {
  const int64_t co = a.co, wc = a.wc, rp = a.rows_padded, taps = static_cast<int64_t>(f.offs.size());
  const int64_t oh = qh * a.out_step_h + f.ph;
  const int64_t* offs = f.offs.data();
  for (int64_t qw = 0; qw < f.n_qw; ++qw) {
    const int64_t ow = qw * a.out_step_w + f.pw;
    int64_t positives = 0, counts[R] = {};
    for (int64_t b = a.act_planes - 1; b >= 0; --b) {  // Horner over the activation planes
      const uint64_t* px = patch_origin(a, i, qh, qw) + b * wc;
      const uint64_t* wrow = f.w_t;
      positives *= 2;
      for (int r = 0; r < R; ++r) counts[r] *= 2;
      if (wc == 1) {  // one word per tap: the common case, without the inner loop
        for (int64_t t = 0; t < taps; ++t, wrow += rp) {
          const uint64_t x = px[offs[t]];
          positives += __builtin_popcountll(x);
          for (int r = 0; r < R; ++r) counts[r] += __builtin_popcountll(x & wrow[r]);
        }
      } else {
        for (int64_t t = 0; t < taps; ++t) {
          for (int64_t k = 0; k < wc; ++k, wrow += rp) {
            const uint64_t x = px[offs[t] + k];
            positives += __builtin_popcountll(x);
            for (int r = 0; r < R; ++r) counts[r] += __builtin_popcountll(x & wrow[r]);
          }
        }
      }
    }
    const double* base = a.base.at(oh, ow, co);
    float* out = a.out + ((i * a.ho + oh) * a.wo + ow) * co;
    if (R == 1) {  // one channel, one plane
      out[0] = static_cast<float>(base[0] + a.offset2[0] * static_cast<double>(positives) +
                                  a.coef2[0] * static_cast<double>(counts[0]));
      continue;
    }
    for (int64_t c = 0; c < co; ++c) {
      double r = base[c] + a.offset2[c] * static_cast<double>(positives);
      for (int64_t b = 0; b < a.planes; ++b) r = r + a.coef2[b * co + c] * static_cast<double>(counts[b * co + c]);
      out[c] = static_cast<float>(r);
    }
  }
}

constexpr int64_t kLanes = 8;
constexpr int64_t kMaxLaneRows = 16;

// Layers with few rows (e.g. the RGB/grey output layer of a generator) vectorize over 8 neighbouring
// output pixels of a phase row instead of over rows: counts[r][l] = sum_wd popcount(w_t[wd, r] &
// patch[wd][l]), positives[l] = sum_wd popcount(patch[wd][l]) (patch stored word-major, 8 lanes a word).
using LanesFn = void (*)(const uint64_t*, const uint64_t*, int64_t, int64_t, int64_t, int64_t (*)[kLanes],
                         int64_t*);

// always_inline: compiled inside each path's wrapper, so the avx2 path gets the popcnt instruction.
__attribute__((always_inline)) inline void lane_counts_portable(const uint64_t* patch, const uint64_t* w_t,
                                                                int64_t words, int64_t rows_padded, int64_t rows,
                                                                int64_t (*counts)[kLanes], int64_t* positives) {
  for (int64_t l = 0; l < kLanes; ++l) positives[l] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t l = 0; l < kLanes; ++l) counts[r][l] = 0;
  }
  for (int64_t wd = 0; wd < words; ++wd) {
    const uint64_t* x = patch + wd * kLanes;
    for (int64_t l = 0; l < kLanes; ++l) positives[l] += __builtin_popcountll(x[l]);
    for (int64_t r = 0; r < rows; ++r) {
      const uint64_t wbits = w_t[wd * rows_padded + r];
      for (int64_t l = 0; l < kLanes; ++l) counts[r][l] += __builtin_popcountll(wbits & x[l]);
    }
  }
}

// Combine of the lane paths: the same double arithmetic, in the same order, as row_generic.
__attribute__((always_inline)) inline void lanes_combine(const ConvArgs& a, int64_t i, int64_t oh, int64_t ow0,
                                                         int64_t lanes, const int64_t (*counts)[kLanes],
                                                         const int64_t* positives) {
  const int64_t co = a.co, stride = a.out_step_w * co;
  for (int64_t c = 0; c < co; ++c) {
    float* out = a.out + ((i * a.ho + oh) * a.wo + ow0) * co + c;
    for (int64_t l = 0; l < lanes; ++l) {
      double r = a.base.at(oh, ow0 + l * a.out_step_w, co)[c] + a.offset2[c] * static_cast<double>(positives[l]);
      for (int64_t b = 0; b < a.planes; ++b) {
        r = r + a.coef2[b * co + c] * static_cast<double>(counts[b * co + c][l]);
      }
      out[l * stride] = static_cast<float>(r);
    }
  }
}

template <LanesFn Counts>
__attribute__((always_inline)) inline void row_lanes(const ConvArgs& a, const PhaseInfo& f, int64_t i, int64_t qh,
                                                     Scratch& s) {
  const int64_t wc = a.wc, taps = static_cast<int64_t>(f.offs.size()), rows = a.planes * a.co;
  const int64_t oh = qh * a.out_step_h + f.ph;
  uint64_t* patch = s.patch.data();
  for (int64_t q0 = 0; q0 < f.n_qw; q0 += kLanes) {
    const int64_t lanes = f.n_qw - q0 < kLanes ? f.n_qw - q0 : kLanes;
    int64_t positives[kLanes] = {};
    int64_t counts[kMaxLaneRows][kLanes] = {};
    for (int64_t b = a.act_planes - 1; b >= 0; --b) {  // Horner over the activation planes
      for (int64_t l = 0; l < kLanes; ++l) {
        const uint64_t* px = patch_origin(a, i, qh, q0 + (l < lanes ? l : 0)) + b * wc;
        for (int64_t t = 0; t < taps; ++t) {
          for (int64_t k = 0; k < wc; ++k) patch[(t * wc + k) * kLanes + l] = l < lanes ? px[f.offs[t] + k] : 0;
        }
      }
      int64_t plane_positives[kLanes];
      int64_t plane_counts[kMaxLaneRows][kLanes];
      Counts(patch, f.w_t, f.words, a.rows_padded, rows, plane_counts, plane_positives);
      for (int64_t l = 0; l < kLanes; ++l) positives[l] = 2 * positives[l] + plane_positives[l];
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t l = 0; l < kLanes; ++l) counts[r][l] = 2 * counts[r][l] + plane_counts[r][l];
      }
    }
    lanes_combine(a, i, oh, q0 * a.out_step_w + f.pw, lanes, counts, positives);
  }
}

using RowFn = void (*)(const ConvArgs&, const PhaseInfo&, int64_t, int64_t, Scratch&);

// ----- level coding of multi-level (or threshold-fused) inputs: driver.h LevelCode, prepared per call -----
constexpr int64_t kMaxCodePlanes = 8;

struct LevelArgs {
  const float* thresholds;    // (C, count), ascending per channel
  const float* thresholds_t;  // the same, transposed (count, C): channel vectors for channels-last input
  const float* signs;         // (C,) of +1 / -1
  int64_t count, planes;
  bool ties_up;
};

// Codes `count_px` pixels from p0 (NCHW or channels-last, as pack_fn) into plane bits at at[j] + plane * wc.
using LevelPackFn = void (*)(const float*, uint64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                             const LevelArgs&);
// Codes one pixel's channels [first, first + channels) (channels-last, c in all) into the plane words.
using LevelWordsFn = void (*)(const float*, int64_t, int64_t, int64_t, const LevelArgs&, uint64_t*);

// The channels-last level packer, written once: Words (one per ISA) codes each 64-channel word group.
template <LevelWordsFn Words>
__attribute__((always_inline)) inline void pack_levels_nhwc(const float* src, uint64_t* dst, const int64_t* at,
                                                            int64_t c, int64_t wc, int64_t p0, int64_t count,
                                                            const LevelArgs& l) {
  for (int64_t j = 0; j < count; ++j) {
    const float* pixel = src + (p0 + j) * c;
    for (int64_t cw = 0; cw < wc; ++cw) {
      uint64_t words[kMaxCodePlanes] = {};
      Words(pixel, cw * 64, c - cw * 64 < 64 ? c - cw * 64 : 64, c, l, words);
      for (int64_t b = 0; b < l.planes; ++b) dst[at[j] + b * wc + cw] = words[b];
    }
  }
}

// AVX-512: count is the thresholds per channel (one of them has its own packer), ties_up their comparison.
LevelPackFn level_pack_fn_avx512(bool nchw, int64_t count, bool ties_up);
LevelPackFn level_pack_fn_avx2(bool nchw);

// The code of y = sign * x: the number of thresholds it passes (strictly unless ties go up).
inline int64_t level_code(float y, const float* thresholds, int64_t count, bool ties_up) {
  int64_t code = 0;
  if (ties_up) {
    for (int64_t m = 0; m < count; ++m) code += y >= thresholds[m];
  } else {
    for (int64_t m = 0; m < count; ++m) code += y > thresholds[m];
  }
  return code;
}

// The packer and the per-pixel kernel of each path: pack_fn(nchw) and pick_row(planes, co, px_words,
// in_step_w) for the layer shape (px_words: words per padded pixel, all activation planes; see the header
// comment for which kernel serves which shape).
PackFn pack_fn_scalar(bool nchw);
PackFn pack_fn_avx2(bool nchw);
PackFn pack_fn_avx512(bool nchw);
PackFn pack_fn_neon(bool nchw);
RowFn pick_row_scalar(int64_t planes, int64_t co, int64_t px_words, int64_t in_step_w);
RowFn pick_row_avx2(int64_t planes, int64_t co, int64_t px_words, int64_t in_step_w);
RowFn pick_row_avx512(int64_t planes, int64_t co, int64_t wc, int64_t in_step_w);  // wc: words per plane
RowFn pick_row_neon(int64_t planes, int64_t co, int64_t px_words, int64_t in_step_w);
// AVX-512 for the layers of ConvArgs::fold_planes (at most 32 input channels, one activation plane, four
// power-of-two weight planes, co a multiple of 16): 16 channels a popcount on 32-bit rows (PhaseInfo::w32), 32 (or
// 16) channels a block. Writes sinks too.
RowFn pick_half_avx512(int64_t co);
// The kernel pick_row chooses for this shape when it writes a BitSink (AVX-512's register kernels, co a multiple
// of 32), else nullptr.
RowFn pick_sink_avx512(int64_t planes, int64_t co);

// A register kernel KERNEL<P, CV> for planes P: CV = the most channel vectors per block with
// P * CV <= ACC accumulators that divides `vectors`; expands to the returns for planes 1, 2 and 4. Three planes
// (3-bit affine weights, three-plane table decompositions: rare) and, where blocks of 4+ vectors fit, an odd
// number of vectors (e.g. Co = 24 on AVX-512) run on the generic kernel: those instantiations were 16 KB of the
// runtime.
#define LOWBIT_PICK_REGS(KERNEL, ACC)                                                        \
  LOWBIT_REGS_FOR(KERNEL, ACC, 1)                                                            \
  LOWBIT_REGS_FOR(KERNEL, ACC, 2)                                                            \
  LOWBIT_REGS_FOR(KERNEL, ACC, 4)
#define LOWBIT_REGS_FOR(KERNEL, ACC, P)                                                      \
  if (planes == P) {                                                                         \
    if ((ACC / P) >= 8 && vectors % 8 == 0) return KERNEL<P, (ACC / P >= 8 ? 8 : 1)>;        \
    if ((ACC / P) >= 4 && vectors % 4 == 0) return KERNEL<P, (ACC / P >= 4 ? 4 : 1)>;        \
    if ((ACC / P) >= 2 && vectors % 2 == 0) return KERNEL<P, (ACC / P >= 2 ? 2 : 1)>;        \
    if ((ACC / P) < 4) return KERNEL<P, 1>;                                                  \
    return nullptr;                                                                          \
  }

}  // namespace lowbit
