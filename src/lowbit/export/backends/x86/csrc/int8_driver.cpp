// The torch-free driver of the integer path (int8.h): checks a call, turns the float input into the padded
// code image and its per-pixel code sums, then runs every phase's output rows on the path's row kernel.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "int8.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

namespace lowbit {
namespace {

// |D| <= words * 4 * 255 * 128 must fit an int32.
constexpr int64_t kMaxInt8Words = (int64_t{1} << 31) / (4 * 255 * 128) - 1;

CodesFn codes_fn(int64_t kernel_path) {
#if defined(__x86_64__)
  if (kernel_path == kAvx512) return int8_codes_avx512();
  if (kernel_path == kAvx2) return int8_codes_avx2();
#endif
  (void)kernel_path;
  return int8_codes_scalar();
}

Int8RowFn row_fn(int64_t kernel_path, const Int8Args& a) {
#if defined(__x86_64__)
  if (kernel_path == kAvx512) return int8_row_avx512(a);
  if (kernel_path == kAvx2) return int8_row_avx2(a);
#elif defined(__aarch64__)
  if (kernel_path == kNeon) return int8_row_neon(a);
#endif
  return int8_row_scalar(a);
}

std::string check_bounds(const Int8Conv& c) {
  const size_t n = c.bounds.size();
  if (n < 3 || n > 257) return "the activation needs 2..256 levels (" + std::to_string(n) + " bounds)";
  if (!(c.bounds[0] == -std::numeric_limits<float>::infinity()) ||
      !(c.bounds[n - 1] == std::numeric_limits<float>::infinity())) {
    return "bounds must start at -inf and end at +inf";
  }
  for (size_t k = 1; k < n; ++k) {
    if (!(c.bounds[k] >= c.bounds[k - 1])) return "bounds must be sorted and finite inside";
  }
  if (!std::isfinite(c.lo) || !std::isfinite(c.inv_step) || !(c.inv_step > 0.0f)) return "bad lo / step";
  return "";
}

// How far the bucket edges sit from the integers of t = (v - lo) * inv_step + 1/2, plus 1e-3 for the float32
// rounding of t itself (|t| <= 256: under 1e-4).
float edge_margin(const Int8Conv& c) {
  double worst = 0.0;
  for (size_t g = 1; g + 1 < c.bounds.size(); ++g) {
    const double t = (static_cast<double>(c.bounds[g]) - c.lo) * c.inv_step + 0.5;
    worst = std::max(worst, std::fabs(t - static_cast<double>(g)));
  }
  return static_cast<float>(worst + 1e-3);
}

bool any_wide_byte(const Int8Conv& c) {
  for (size_t f = 0; f < c.w_ts.size(); ++f) {
    const auto* bytes = reinterpret_cast<const int8_t*>(c.w_ts[f]);
    const int64_t n = c.w_t_words[f] * c.co_pad * 4;
    for (int64_t k = 0; k < n; ++k) {
      if (bytes[k] < -64 || bytes[k] > 64) return true;
    }
  }
  return false;
}

// Codes of row y of image i into the padded image (channels-last bytes) and its pixels' code sums.
void quantize_row(const Int8Conv& c, const PackGeometry& g, CodesFn codes, const Int8Levels& levels, int64_t i,
                  int64_t y, int64_t wp, int64_t cq, uint8_t* image, int32_t* sums, std::vector<uint8_t>& tmp) {
  static const float kZero = 0.0f;
  const int64_t ch = c.x.c, w = c.x.w, h = c.x.h;
  const int64_t first = ((i * (h + g.pad_top + g.pad_bottom) + y + g.pad_top) * wp + g.pad_left);
  uint8_t* row = image + first * cq;
  if (c.x.nchw) {
    tmp.resize(static_cast<size_t>(w));
    for (int64_t k = 0; k < ch; ++k) {
      const float* shift = c.shift ? c.shift + k : &kZero;
      codes(c.x.data + ((i * ch + k) * h + y) * w, shift, 0, w, levels, tmp.data());
      for (int64_t x = 0; x < w; ++x) row[x * cq + k] = tmp[static_cast<size_t>(x)];
    }
  } else {
    const float* src = c.x.data + (i * h + y) * w * ch;
    if (!c.shift && cq == ch) {  // the row's codes are as contiguous as its floats: one call
      codes(src, &kZero, 0, w * ch, levels, row);
    } else {
      for (int64_t x = 0; x < w; ++x) codes(src + x * ch, c.shift ? c.shift : &kZero, c.shift ? 1 : 0, ch, levels, row + x * cq);
    }
  }
  for (int64_t x = 0; x < w; ++x) {
    int32_t total = 0;
    for (int64_t k = 0; k < ch; ++k) total += row[x * cq + k];
    sums[first + x] = total;
  }
}

}  // namespace

int64_t int8_kernel_path(int64_t path) {
#if defined(__x86_64__)
  if (path == kAvx512) return cpu_features().avx512vnni && cpu_features().avx512bw ? kAvx512 : kAvx2;
  return path == kAvx2 ? kAvx2 : kScalar;
#elif defined(__aarch64__) && defined(__linux__)
  return path == kNeon && (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) ? kNeon : kScalar;
#else
  (void)path;
  return kScalar;
#endif
}

std::string check_int8_conv(const Int8Conv& c) {
  if (!path_supported(c.path)) return "kernel path " + std::to_string(c.path) + " is not supported by this CPU";
  if (c.x.n < 0 || c.x.c <= 0 || c.x.h <= 0 || c.x.w <= 0) return "bad input shape";
  if (c.ho <= 0 || c.wo <= 0 || c.co <= 0) return "bad output shape";
  if (const char* bad_base = check_base_map(c.base, c.ho, c.wo); *bad_base) return bad_base;
  for (const int64_t s : c.steps) if (s <= 0 || s > kMaxTap) return "bad steps";
  const std::string bad_bounds = check_bounds(c);
  if (!bad_bounds.empty()) return bad_bounds;
  std::vector<Taps> taps;
  const std::string bad = parse_phases(c.phases, taps);
  if (!bad.empty()) return bad;
  if (taps.size() != c.w_ts.size() || taps.size() != c.w_t_words.size()) return "one w_t per phase";
  if (c.co_pad % kInt8CoAlign != 0 || c.co_pad < c.co) return "w_t columns must cover co, padded to 16";
  const int64_t wc = (c.x.c + 3) / 4;
  for (size_t k = 0; k < taps.size(); ++k) {
    const int64_t words = static_cast<int64_t>(taps[k].th.size() * taps[k].tw.size()) * wc;
    if (c.w_t_words[k] != words) return "bad w_t for phase " + std::to_string(k);
    if (words > kMaxInt8Words) return "too many taps x channels for exact int32 sums";
  }
  return "";
}

void run_int8_conv(const Int8Conv& c, float* out, const ParallelFor& parallel) {
  std::vector<Taps> taps;
  parse_phases(c.phases, taps);
  const PackGeometry g = padding_for(c, taps);
  const int64_t kernel_path = int8_kernel_path(c.path);
  Int8Args a;
  a.wc = (c.x.c + 3) / 4;
  a.hp = c.x.h + g.pad_top + g.pad_bottom, a.wp = c.x.w + g.pad_left + g.pad_right;
  a.ho = c.ho, a.wo = c.wo, a.co = c.co, a.co_pad = c.co_pad;
  a.in_step_h = c.steps[0], a.in_step_w = c.steps[1], a.out_step_h = c.steps[2], a.out_step_w = c.steps[3];
  a.coef = c.coef, a.offset = c.offset, a.base = c.base, a.out = out;
  a.wide = c.wide >= 0 ? c.wide != 0 : any_wide_byte(c);
  // The code image and the sums live in per-thread buffers reused across calls (as the binary bit image).
  thread_local std::vector<uint8_t> image;
  thread_local std::vector<int32_t> sums;
  const int64_t cq = 4 * a.wc, pixels = c.x.n * a.hp * a.wp;
  image.assign(static_cast<size_t>(pixels * cq), 0);
  sums.assign(static_cast<size_t>(pixels), 0);
  const Int8Levels levels{c.lo, c.inv_step, static_cast<int64_t>(c.bounds.size()) - 1, c.bounds.data(),
                          edge_margin(c)};
  const CodesFn codes = codes_fn(kernel_path);
  uint8_t* image_data = image.data();
  int32_t* sums_data = sums.data();
  parallel(c.x.n * c.x.h, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> tmp;
    for (int64_t r = begin; r < end; ++r) {
      quantize_row(c, g, codes, levels, r / c.x.h, r % c.x.h, a.wp, cq, image_data, sums_data, tmp);
    }
  });
  a.x = image_data, a.sums = sums_data;
  thread_local std::vector<int32_t> planar;
  a.planar = nullptr;
  if (a.co <= kInt8FewChannels) {
    planar.resize(static_cast<size_t>(pixels * a.wc));
    const auto* words = reinterpret_cast<const int32_t*>(image_data);
    int32_t* dst = planar.data();
    parallel(c.x.n * a.hp, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t k = 0; k < a.wc; ++k) {
          for (int64_t x = 0; x < a.wp; ++x) dst[(r * a.wc + k) * a.wp + x] = words[(r * a.wp + x) * a.wc + k];
        }
      }
    });
    a.planar = dst;
  }

  std::vector<Int8Phase> infos;
  int64_t max_qh = 0;
  for (size_t k = 0; k < taps.size(); ++k) {
    const Taps& t = taps[k];
    Int8Phase f;
    f.ph = t.ph, f.pw = t.pw;
    f.n_qh = count_q(t.ph, a.ho, a.out_step_h), f.n_qw = count_q(t.pw, a.wo, a.out_step_w);
    for (const int64_t th : t.th) {
      for (const int64_t tw : t.tw) {
        f.pix.push_back((th + g.pad_top) * a.wp + tw + g.pad_left);
        f.tap_y.push_back(th + g.pad_top), f.tap_x.push_back(tw + g.pad_left);
        f.offs.push_back(f.pix.back() * a.wc);
      }
    }
    f.words = static_cast<int64_t>(f.offs.size()) * a.wc;
    f.w_t = c.w_ts[k];
    f.w_r.resize(static_cast<size_t>(a.co * f.words));
    f.zsum_pad.assign(static_cast<size_t>(a.co_pad), 0);
    for (int64_t word = 0; word < f.words; ++word) {
      for (int64_t ch = 0; ch < a.co; ++ch) {
        const int32_t packed = f.w_t[word * a.co_pad + ch];
        f.w_r[static_cast<size_t>(ch * f.words + word)] = packed;
        int8_t bytes[4];
        std::memcpy(bytes, &packed, 4);
        f.zsum_pad[static_cast<size_t>(ch)] += bytes[0] + bytes[1] + bytes[2] + bytes[3];
      }
    }
    max_qh = std::max(max_qh, f.n_qh);
    infos.push_back(std::move(f));
  }
  const Int8RowFn row = row_fn(kernel_path, a);
  // One task per (image, qh): every phase's row qh, so a task owns whole output rows (as run_binary_conv:
  // tasks by phase made two threads write the interleaved pixels of the same cache lines).
  parallel(c.x.n * max_qh, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> scratch(static_cast<size_t>(4 * a.co_pad));
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx / max_qh, qh = idx % max_qh;
      for (const Int8Phase& f : infos) {
        if (qh < f.n_qh) row(a, f, i, qh, scratch.data());
      }
    }
  });
}

}  // namespace lowbit
