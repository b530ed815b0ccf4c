// The torch-free driver of the bit-serial kernels: which paths this CPU runs, sign packing and binary_conv
// (every phase of one layer in one call). Compiled into both the torch extension (bitserial.cpp, the
// binding) and the native runtime (runtime/), so both run the same kernel sources. Threads are the
// caller's: each gives a ParallelFor (pool_parallel with torch's thread count in the extension, the runtime's own).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.h"

namespace lowbit {

// The x86 features the kernels and the runtime dispatch on, from cpuid, with the vector registers' state saved by
// the OS (xgetbv) for AVX and AVX-512: one reading per process. Not libgcc's __builtin_cpu_supports /
// target_clones, whose CPU model tables cost the runtime 4.5 KB. All false on other CPUs.
struct CpuFeatures {
  bool popcnt = false, ssse3 = false, sse41 = false, fma = false, avx2 = false, sha = false;
  bool avx512f = false, avx512dq = false, avx512bw = false, avx512vnni = false, avx512vpopcntdq = false;
};
const CpuFeatures& cpu_features();

// Bit `path` is set for every kernel path this CPU can run (cpuid on x86, hwcaps on ARM64).
int64_t supported_paths_mask();
bool path_supported(int64_t path);

// A non-owning reference to a callable (C++26's std::function_ref): an object pointer and one call thunk, so a
// lambda handed to a parallel section is neither copied to the heap nor given a type-erased manager (std::function
// cost 2 KB of managers and a heap copy per call). The callable must outlive the reference: pass lambdas straight
// to the call that runs them, or name them first.
template <typename Signature>
class FunctionRef;

template <typename R, typename... Args>
class FunctionRef<R(Args...)> {
 public:
  template <typename F, typename = std::enable_if_t<!std::is_same_v<std::decay_t<F>, FunctionRef>>>
  FunctionRef(F&& f) noexcept : object_(erase(f)), call_(&invoke<std::remove_reference_t<F>>) {}  // NOLINT: implicit

  R operator()(Args... args) const { return call_(object_, std::forward<Args>(args)...); }

 private:
  template <typename T>
  static void* erase(T& f) {
    if constexpr (std::is_function_v<T>) return reinterpret_cast<void*>(&f);  // a plain function (POSIX: as dlsym)
    else return const_cast<void*>(static_cast<const void*>(std::addressof(f)));
  }
  template <typename T>
  static R invoke(void* object, Args... args) {
    if constexpr (std::is_function_v<T>) return reinterpret_cast<T*>(object)(std::forward<Args>(args)...);
    else return (*static_cast<T*>(object))(std::forward<Args>(args)...);
  }

  void* object_;
  R (*call_)(void*, Args...);
};

// Runs body(begin, end) over sub-ranges covering [0, n), possibly on several threads at once.
using ParallelBody = FunctionRef<void(int64_t, int64_t)>;
using ParallelFor = FunctionRef<void(int64_t n, const ParallelBody& body)>;

// Runs body over [0, n) on the calling thread and up to threads - 1 workers of a persistent process-wide pool
// (no thread is created per call), blocks handed out dynamically; returns when all are done.
void pool_parallel(int64_t threads, int64_t n, const ParallelBody& body);

// Destination of packed bits: (N, H + pad_top + pad_bottom, W + pad_left + pad_right, wc) words, the
// input image at (pad_top, pad_left) and zeros (no positive bit: "outside the input") around it.
struct PackGeometry {
  int64_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;
};

// A float32 (N, C, H, W) image, NCHW (nchw) or channels-last in memory.
struct Image {
  const float* data;
  bool nchw;
  int64_t n, c, h, w;
};

int64_t padded_words(const Image& x, const PackGeometry& g);

// One phase's geometry as the phase list gives it (shared by the binary and the integer path).
struct Taps {
  int64_t ph, pw;
  std::vector<int64_t> th, tw;
};

// Taps are offsets into the input: far beyond any real kernel, but small enough that no product overflows.
constexpr int64_t kMaxTap = int64_t{1} << 20;

// Parses a phase list ([ph, pw, n_tap_h, n_tap_w, tap_h..., tap_w...] per phase): "" or what is wrong.
std::string parse_phases(const std::vector<int64_t>& phases, std::vector<Taps>& taps);

inline int64_t count_q(int64_t phase, int64_t size, int64_t step) {
  return phase >= 0 && phase < size ? (size - phase + step - 1) / step : int64_t{0};
}

// The padding that keeps every tap of every output pixel of every phase inside the padded image of a call
// (BinaryConv or Int8Conv: input x, output ho x wo, steps [in_step_h, in_step_w, out_step_h, out_step_w]).
template <typename Call>
PackGeometry padding_for(const Call& c, const std::vector<Taps>& taps) {
  PackGeometry g;
  for (const Taps& t : taps) {
    const int64_t n_qh = count_q(t.ph, c.ho, c.steps[2]), n_qw = count_q(t.pw, c.wo, c.steps[3]);
    if (n_qh == 0 || n_qw == 0) continue;
    for (const int64_t v : t.th) {
      g.pad_top = g.pad_top > -v ? g.pad_top : -v;
      const int64_t bottom = (n_qh - 1) * c.steps[0] + v - (c.x.h - 1);
      g.pad_bottom = g.pad_bottom > bottom ? g.pad_bottom : bottom;
    }
    for (const int64_t v : t.tw) {
      g.pad_left = g.pad_left > -v ? g.pad_left : -v;
      const int64_t right = (n_qw - 1) * c.steps[1] + v - (c.x.w - 1);
      g.pad_right = g.pad_right > right ? g.pad_right : right;
    }
  }
  return g;
}

// Sets bit c of a pixel's words iff x[c, pixel] >= 0, into `dst` (padded_words(x, g) zeroed words).
void pack_sign_into(const Image& x, int64_t path, const PackGeometry& g, uint64_t* dst, const ParallelFor& parallel);

// How a multi-level activation becomes its integer code while packing (docs/export.md "Kernels"): for
// channel c, y = signs[c] * x and code = #{m : y > thresholds[c, m]} (y >= t when ties_up), thresholds
// ascending; bit b of the code goes to activation plane b. Per-channel thresholds also carry a folded
// BatchNorm (signs[c] = -1 where its scale is negative). count = levels - 1 (1 to 255: at most 8 planes).
struct LevelCode {
  const float* thresholds = nullptr;  // (C, count); nullptr: one plane, the sign packer (bit iff x >= 0)
  const float* signs = nullptr;       // (C) of +1 / -1; nullptr: all +1
  int64_t count = 0;
  bool ties_up = false;
};

// Activation bit planes of a code with `count` thresholds: ceil(log2(count + 1)).
int64_t code_planes(int64_t count);

// Packs the codes of `x` (LevelCode) as code_planes(count) bit planes per pixel, plane b at word b * wc:
// into `dst` (padded_words(x, g) * planes zeroed words).
void pack_levels_into(const Image& x, const LevelCode& code, int64_t path, const PackGeometry& g, uint64_t* dst,
                      const ParallelFor& parallel);

// One layer's arguments (see kernels.h): w_ts[f] is phase f's rows (words_f, rows_padded) with
// words_f = taps_f * ceil(C / 64); phases: per phase [ph, pw, n_tap_h, n_tap_w, tap_h..., tap_w...];
// coef2 (planes, co), offset2 (co), base a BaseMap over (ho, wo); steps: [in_step_h, in_step_w, out_step_h, out_step_w].
struct BinaryConv {
  Image x;
  std::vector<const uint64_t*> w_ts;
  std::vector<int64_t> w_t_words;  // the first size of every w_ts[f], checked against its taps
  int64_t rows_padded;
  std::vector<int64_t> phases;
  const double* coef2;
  const double* offset2;
  BaseMap base;
  int64_t ho, wo, co, planes;
  int64_t steps[4];
  int64_t path;
  LevelCode levels;  // multi-level (or threshold-fused) input; default: sign packing, one plane
};

// A BaseMap over a full (ho, wo, co) base, one entry per pixel (the torch backend's form); `index` keeps its
// row and column indices and must outlive the call.
inline BaseMap per_pixel_base(const double* values, int64_t ho, int64_t wo, std::vector<int64_t>& index) {
  index.resize(static_cast<size_t>(ho + wo));
  for (int64_t oh = 0; oh < ho; ++oh) index[static_cast<size_t>(oh)] = oh * wo;
  for (int64_t ow = 0; ow < wo; ++ow) index[static_cast<size_t>(ho + ow)] = ow;
  return BaseMap{values, index.data(), index.data() + ho, ho * wo};
}

// Checks `call` (an empty string when it is consistent, else the reason), so that run_binary_conv reads
// nothing outside the arrays it was given.
std::string check_binary_conv(const BinaryConv& call);

// The zero padding of the bit image a call packs its input into (its taps' reach beyond the input).
PackGeometry input_padding(const BinaryConv& call);

// Whether a layer's weight planes add up as one exact integer before the combine (kernels.h ConvArgs::fold_planes):
// at most 32 input channels on one activation plane, four planes with coef2[b, c] = 2^b coef2[0, c], Co % 16 == 0.
bool folds_planes(int64_t ci, int64_t act_planes, int64_t planes, int64_t co, const double* coef2);

// The kernel of `path` that writes a layer of `planes` weight planes and co outputs as a BitSink (the next
// layer's packed input), or nullptr: that layer then writes float32 and its reader packs them.
RowFn pick_sink_row(int64_t path, int64_t planes, int64_t co);

// Runs a checked call, writing out (N, ho, wo, co) float32, channels-last; or, with `sink` (only where
// pick_sink_row has a kernel), the sink's bits instead (out unused). Its input is call.x, packed here, or
// `packed`: the bits an earlier call's sink wrote, padded by input_padding(call).
void run_binary_conv(const BinaryConv& call, float* out, const ParallelFor& parallel, const uint64_t* packed = nullptr,
                     const BitSink* sink = nullptr);

}  // namespace lowbit
