// The torch-free driver (driver.h): CPU feature detection, threaded sign packing and binary_conv.
#include "driver.h"

#include <algorithm>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1 << 1)
#endif
#endif

namespace lowbit {

int64_t supported_paths_mask() {
  int64_t mask = int64_t{1} << kScalar;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) mask |= int64_t{1} << kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vpopcntdq")) {
    mask |= int64_t{1} << kAvx512;
  }
#elif defined(__aarch64__) && defined(__linux__)
  if (getauxval(AT_HWCAP) & HWCAP_ASIMD) mask |= int64_t{1} << kNeon;
#elif defined(__aarch64__)
  mask |= int64_t{1} << kNeon;  // Advanced SIMD is part of every ARMv8-A core
#endif
  return mask;
}

bool path_supported(int64_t path) { return path >= 0 && path < 63 && (supported_paths_mask() >> path) & 1; }

namespace {

// The packer and per-pixel kernel of a path; only the paths of the CPU family this file is built for exist.
PackFn pack_fn(int64_t path, bool nchw) {
#if defined(__x86_64__)
  if (path == kAvx512) return pack_fn_avx512(nchw);
  if (path == kAvx2) return pack_fn_avx2(nchw);
#elif defined(__aarch64__)
  if (path == kNeon) return pack_fn_neon(nchw);
#endif
  return pack_fn_scalar(nchw);
}

RowFn pick_row(int64_t path, int64_t planes, int64_t co, int64_t wc, int64_t in_step_w) {
#if defined(__x86_64__)
  if (path == kAvx512) return pick_row_avx512(planes, co, wc, in_step_w);
  if (path == kAvx2) return pick_row_avx2(planes, co, wc, in_step_w);
#elif defined(__aarch64__)
  if (path == kNeon) return pick_row_neon(planes, co, wc, in_step_w);
#endif
  return pick_row_scalar(planes, co, wc, in_step_w);
}

}  // namespace

std::string parse_phases(const std::vector<int64_t>& phases, std::vector<Taps>& taps) {
  for (size_t pos = 0; pos < phases.size();) {
    if (pos + 4 > phases.size()) return "bad phase list";
    Taps t{phases[pos], phases[pos + 1], {}, {}};
    const int64_t nth = phases[pos + 2], ntw = phases[pos + 3];
    if (nth < 0 || ntw < 0 || static_cast<uint64_t>(nth + ntw) > phases.size() - pos - 4) return "bad phase list";
    t.th.assign(phases.begin() + pos + 4, phases.begin() + pos + 4 + nth);
    t.tw.assign(phases.begin() + pos + 4 + nth, phases.begin() + pos + 4 + nth + ntw);
    for (const int64_t v : t.th) if (v < -kMaxTap || v > kMaxTap) return "phase tap out of range";
    for (const int64_t v : t.tw) if (v < -kMaxTap || v > kMaxTap) return "phase tap out of range";
    pos += 4 + nth + ntw;
    taps.push_back(std::move(t));
  }
  return "";
}

int64_t padded_words(const Image& x, const PackGeometry& g) {
  return x.n * (x.h + g.pad_top + g.pad_bottom) * (x.w + g.pad_left + g.pad_right) * ((x.c + 63) / 64);
}

void pack_sign_into(const Image& x, int64_t path, const PackGeometry& g, uint64_t* dst, const ParallelFor& parallel) {
  const int64_t c = x.c, h = x.h, w = x.w, hw = h * w, wc = (c + 63) / 64;
  const int64_t hp = h + g.pad_top + g.pad_bottom, wp = w + g.pad_left + g.pad_right;
  const int64_t chunks = (hw + kChunk - 1) / kChunk;
  const PackFn pack = pack_fn(path, x.nchw);
  parallel(x.n * chunks, [&](int64_t begin, int64_t end) {
    int64_t at_word[kChunk];
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx / chunks, p0 = (idx % chunks) * kChunk, count = hw - p0 < kChunk ? hw - p0 : kChunk;
      int64_t y = p0 / w, xc = p0 % w;
      for (int64_t j = 0; j < count; ++j) {
        at_word[j] = ((y + g.pad_top) * wp + xc + g.pad_left) * wc;
        if (++xc == w) xc = 0, ++y;
      }
      pack(x.data + i * c * hw, dst + i * hp * wp * wc, at_word, c, hw, wc, p0, count);
    }
  });
}

std::string check_binary_conv(const BinaryConv& c) {
  if (!path_supported(c.path)) return "kernel path " + std::to_string(c.path) + " is not supported by this CPU";
  if (c.x.n < 0 || c.x.c <= 0 || c.x.h <= 0 || c.x.w <= 0) return "bad input shape";
  if (c.ho <= 0 || c.wo <= 0 || c.co <= 0 || c.planes <= 0) return "bad output shape";
  for (const int64_t s : c.steps) if (s <= 0 || s > kMaxTap) return "bad steps";
  std::vector<Taps> taps;
  const std::string bad = parse_phases(c.phases, taps);
  if (!bad.empty()) return bad;
  if (taps.size() != c.w_ts.size() || taps.size() != c.w_t_words.size()) return "one w_t per phase";
  if (c.rows_padded % 8 != 0 || c.rows_padded < c.planes * c.co) return "w_t rows must cover planes * co, padded to 8";
  const int64_t wc = (c.x.c + 63) / 64;
  for (size_t k = 0; k < taps.size(); ++k) {
    const int64_t words = static_cast<int64_t>(taps[k].th.size() * taps[k].tw.size()) * wc;
    if (c.w_t_words[k] != words) return "bad w_t for phase " + std::to_string(k);
  }
  return "";
}

void run_binary_conv(const BinaryConv& c, float* out, const ParallelFor& parallel) {
  std::vector<Taps> taps;
  parse_phases(c.phases, taps);
  const PackGeometry g = padding_for(c, taps);
  ConvArgs a;
  a.wc = (c.x.c + 63) / 64;
  a.ho = c.ho, a.wo = c.wo, a.co = c.co, a.planes = c.planes, a.rows_padded = c.rows_padded;
  a.in_step_h = c.steps[0], a.in_step_w = c.steps[1], a.out_step_h = c.steps[2], a.out_step_w = c.steps[3];
  // The bit image lives in a per-thread buffer reused across calls: no allocation (or page faults) per call.
  // (It is given back when a call needs under a quarter of a large one, e.g. after one huge batch.)
  thread_local std::vector<uint64_t> bits;
  const auto needed = static_cast<size_t>(padded_words(c.x, g));
  if (bits.capacity() > (size_t{1} << 20) && needed < bits.capacity() / 4) std::vector<uint64_t>().swap(bits);
  bits.assign(needed, 0);
  pack_sign_into(c.x, c.path, g, bits.data(), parallel);
  a.hp = c.x.h + g.pad_top + g.pad_bottom, a.wp = c.x.w + g.pad_left + g.pad_right;
  a.x = bits.data();
  a.coef2 = c.coef2, a.offset2 = c.offset2, a.base = c.base, a.out = out;

  std::vector<PhaseInfo> infos;
  std::vector<RowFn> fns;
  std::vector<int64_t> first_row;  // prefix sums of the (image, qh) rows of every phase
  int64_t total_rows = 0, max_words = 0;
  const bool few_rows = a.planes * a.co <= kMaxLaneRows;
  for (size_t k = 0; k < taps.size(); ++k) {
    const Taps& t = taps[k];
    PhaseInfo f;
    f.ph = t.ph, f.pw = t.pw;
    f.n_qh = count_q(t.ph, a.ho, a.out_step_h), f.n_qw = count_q(t.pw, a.wo, a.out_step_w);
    for (const int64_t th : t.th) {
      for (const int64_t tw : t.tw) f.offs.push_back(((th + g.pad_top) * a.wp + tw + g.pad_left) * a.wc);
    }
    f.words = static_cast<int64_t>(f.offs.size()) * a.wc;
    f.w_t = c.w_ts[k];
    max_words = std::max(max_words, f.words);
    first_row.push_back(total_rows);
    total_rows += c.x.n * f.n_qh;
    infos.push_back(std::move(f));
    fns.push_back(pick_row(c.path, a.planes, a.co, a.wc, a.in_step_w));
  }
  first_row.push_back(total_rows);
  const int64_t patch_words = max_words * (few_rows ? kLanes : 1);
  parallel(total_rows, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.patch.assign(patch_words > 0 ? patch_words : 1, 0);
    s.counts.assign(a.rows_padded > 0 ? a.rows_padded : 8, 0);
    size_t k = 0;
    for (int64_t idx = begin; idx < end; ++idx) {
      while (idx >= first_row[k + 1]) ++k;
      const PhaseInfo& f = infos[k];
      const int64_t local = idx - first_row[k];
      fns[k](a, f, local / f.n_qh, local % f.n_qh, s);
    }
  });
}

}  // namespace lowbit
