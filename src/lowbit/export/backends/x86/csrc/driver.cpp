// The torch-free driver (driver.h): CPU feature detection, threaded sign packing and binary_conv.
#include "driver.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include <unistd.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1 << 1)
#endif
#endif

namespace lowbit {

namespace {

#if defined(__x86_64__)
// CPUID leaf 1 ECX bits, leaf 7 (subleaf 0) EBX / ECX bits, and the XCR0 state bits (SSE | AVX; opmask | ZMM).
namespace cpuid_bits {
constexpr unsigned kSsse3 = 1u << 9, kFma = 1u << 12, kSse41 = 1u << 19, kPopcnt = 1u << 23, kOsxsave = 1u << 27,
                   kAvx = 1u << 28;
constexpr unsigned kAvx2 = 1u << 5, kAvx512F = 1u << 16, kAvx512Dq = 1u << 17, kSha = 1u << 29, kAvx512Bw = 1u << 30;
constexpr unsigned kVnni = 1u << 11, kVpopcntdq = 1u << 14;
constexpr uint64_t kAvxState = 0x6, kAvx512State = 0xe0;
}  // namespace cpuid_bits

CpuFeatures read_cpu_features() {
  using namespace cpuid_bits;
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  f.popcnt = c & kPopcnt, f.ssse3 = c & kSsse3, f.sse41 = c & kSse41;
  uint32_t lo = 0, hi = 0;
  if (c & kOsxsave) asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const uint64_t xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  const bool avx = (c & kAvx) && (xcr0 & kAvxState) == kAvxState, avx512 = avx && (xcr0 & kAvx512State) == kAvx512State;
  f.fma = avx && (c & kFma);
  unsigned b7 = 0, c7 = 0;
  if (__get_cpuid_count(7, 0, &a, &b7, &c7, &d)) {
    f.avx2 = avx && (b7 & kAvx2), f.sha = b7 & kSha;
    f.avx512f = avx512 && (b7 & kAvx512F), f.avx512dq = f.avx512f && (b7 & kAvx512Dq);
    f.avx512bw = f.avx512f && (b7 & kAvx512Bw), f.avx512vnni = f.avx512f && (c7 & kVnni);
    f.avx512vpopcntdq = f.avx512f && (c7 & kVpopcntdq);
  }
  return f;
}
#else
CpuFeatures read_cpu_features() { return {}; }
#endif

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = read_cpu_features();
  return features;
}

int64_t supported_paths_mask() {
  int64_t mask = int64_t{1} << kScalar;
#if defined(__x86_64__)
  const CpuFeatures& cpu = cpu_features();
  if (cpu.avx2 && cpu.popcnt) mask |= int64_t{1} << kAvx2;
  if (cpu.avx512f && cpu.avx512dq && cpu.avx512vpopcntdq) mask |= int64_t{1} << kAvx512;
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

RowFn pick_row(int64_t path, int64_t planes, int64_t co, int64_t wc, int64_t px_words, int64_t in_step_w) {
#if defined(__x86_64__)
  if (path == kAvx512) return pick_row_avx512(planes, co, wc, in_step_w);
  if (path == kAvx2) return pick_row_avx2(planes, co, px_words, in_step_w);
#elif defined(__aarch64__)
  if (path == kNeon) return pick_row_neon(planes, co, px_words, in_step_w);
#endif
  return pick_row_scalar(planes, co, px_words, in_step_w);
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

namespace {

// Calls pack(image, p0, count, at_word, image_dst) for every chunk of up to kChunk pixels of every image, on
// `parallel`: at_word[j] is the word of chunk pixel j in its zero-padded image of px_words words a pixel.
template <typename Pack>
void for_each_chunk(const Image& x, const PackGeometry& g, int64_t px_words, uint64_t* dst,
                    const ParallelFor& parallel, const Pack& pack) {
  const int64_t w = x.w, hw = x.h * w, hp = x.h + g.pad_top + g.pad_bottom, wp = w + g.pad_left + g.pad_right;
  const int64_t chunks = (hw + kChunk - 1) / kChunk;
  parallel(x.n * chunks, [&](int64_t begin, int64_t end) {
    int64_t at_word[kChunk];
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx / chunks, p0 = (idx % chunks) * kChunk, count = hw - p0 < kChunk ? hw - p0 : kChunk;
      int64_t y = p0 / w, xc = p0 % w;
      for (int64_t j = 0; j < count; ++j) {
        at_word[j] = ((y + g.pad_top) * wp + xc + g.pad_left) * px_words;
        if (++xc == w) xc = 0, ++y;
      }
      pack(x.data + i * x.c * hw, p0, count, at_word, dst + i * hp * wp * px_words);
    }
  });
}

}  // namespace

void pack_sign_into(const Image& x, int64_t path, const PackGeometry& g, uint64_t* dst, const ParallelFor& parallel) {
  const int64_t wc = (x.c + 63) / 64, hw = x.h * x.w;
  const PackFn pack = pack_fn(path, x.nchw);
  for_each_chunk(x, g, wc, dst, parallel,
                 [&](const float* image, int64_t p0, int64_t count, const int64_t* at, uint64_t* out) {
                   pack(image, out, at, x.c, hw, wc, p0, count);
                 });
}

int64_t code_planes(int64_t count) {
  int64_t planes = 1;
  while ((int64_t{1} << planes) <= count) ++planes;
  return planes;
}

namespace {

// The portable level packer (every path but AVX-512; the same comparisons, so the same bits).
void pack_levels_portable(const float* src, uint64_t* dst, const int64_t* at, int64_t c, int64_t hw, int64_t wc,
                          int64_t p0, int64_t count_px, bool nchw, const LevelArgs& l) {
  for (int64_t ch = 0; ch < c; ++ch) {
    const int shift = static_cast<int>(ch % 64);
    for (int64_t j = 0; j < count_px; ++j) {
      const float v = nchw ? src[ch * hw + p0 + j] : src[(p0 + j) * c + ch];
      const auto value = static_cast<uint64_t>(level_code(l.signs[ch] * v, l.thresholds + ch * l.count, l.count,
                                                          l.ties_up));
      uint64_t* word = dst + at[j] + ch / 64;
      for (int64_t b = 0; b < l.planes; ++b) word[b * wc] |= ((value >> b) & 1) << shift;
    }
  }
}

void pack_levels_nchw_portable(const float* src, uint64_t* dst, const int64_t* at, int64_t c, int64_t hw,
                               int64_t wc, int64_t p0, int64_t count_px, const LevelArgs& l) {
  pack_levels_portable(src, dst, at, c, hw, wc, p0, count_px, true, l);
}

void pack_levels_nhwc_portable(const float* src, uint64_t* dst, const int64_t* at, int64_t c, int64_t hw,
                               int64_t wc, int64_t p0, int64_t count_px, const LevelArgs& l) {
  pack_levels_portable(src, dst, at, c, hw, wc, p0, count_px, false, l);
}

LevelPackFn level_pack_fn(int64_t path, bool nchw, const LevelCode& code) {
#if defined(__x86_64__)
  if (path == kAvx512) return level_pack_fn_avx512(nchw, code.count, code.ties_up);
  if (path == kAvx2) return level_pack_fn_avx2(nchw);
#endif
  return nchw ? pack_levels_nchw_portable : pack_levels_nhwc_portable;
}

}  // namespace

void pack_levels_into(const Image& x, const LevelCode& code, int64_t path, const PackGeometry& g, uint64_t* dst,
                      const ParallelFor& parallel) {
  const int64_t hw = x.h * x.w, wc = (x.c + 63) / 64, planes = code_planes(code.count);
  std::vector<float> transposed(static_cast<size_t>(x.c * code.count));
  for (int64_t ch = 0; ch < x.c; ++ch) {
    for (int64_t m = 0; m < code.count; ++m) {
      transposed[static_cast<size_t>(m * x.c + ch)] = code.thresholds[ch * code.count + m];
    }
  }
  const std::vector<float> ones(static_cast<size_t>(x.c), 1.0f);
  const LevelArgs args{code.thresholds, transposed.data(), code.signs != nullptr ? code.signs : ones.data(),
                       code.count, planes, code.ties_up};
  const LevelPackFn pack = level_pack_fn(path, x.nchw, code);
  for_each_chunk(x, g, planes * wc, dst, parallel,
                 [&](const float* image, int64_t p0, int64_t count, const int64_t* at, uint64_t* out) {
                   pack(image, out, at, x.c, hw, wc, p0, count, args);
                 });
}

std::string check_binary_conv(const BinaryConv& c) {
  if (!path_supported(c.path)) return "kernel path " + std::to_string(c.path) + " is not supported by this CPU";
  if (c.x.n < 0 || c.x.c <= 0 || c.x.h <= 0 || c.x.w <= 0) return "bad input shape";
  if (c.ho <= 0 || c.wo <= 0 || c.co <= 0 || c.planes <= 0) return "bad output shape";
  if (const char* bad_base = check_base_map(c.base, c.ho, c.wo); *bad_base) return bad_base;
  for (const int64_t s : c.steps) if (s <= 0 || s > kMaxTap) return "bad steps";
  std::vector<Taps> taps;
  const std::string bad = parse_phases(c.phases, taps);
  if (!bad.empty()) return bad;
  if (taps.size() != c.w_ts.size() || taps.size() != c.w_t_words.size()) return "one w_t per phase";
  if (c.levels.thresholds != nullptr && (c.levels.count < 1 || c.levels.count > 255)) {
    return "a multi-level input needs 1 to 255 thresholds per channel";
  }
  if (c.rows_padded % 8 != 0 || c.rows_padded < c.planes * c.co) return "w_t rows must cover planes * co, padded to 8";
  const int64_t wc = (c.x.c + 63) / 64;
  for (size_t k = 0; k < taps.size(); ++k) {
    const int64_t words = static_cast<int64_t>(taps[k].th.size() * taps[k].tw.size()) * wc;
    if (c.w_t_words[k] != words) return "bad w_t for phase " + std::to_string(k);
  }
  return "";
}

PackGeometry input_padding(const BinaryConv& c) {
  std::vector<Taps> taps;
  parse_phases(c.phases, taps);
  return padding_for(c, taps);
}

// Whether every weight plane's coefficients are 2^b times plane 0's (the codes of an affine codebook), the
// condition for adding the planes' counts as one exact integer.
bool folds_planes(int64_t ci, int64_t act_planes, int64_t planes, int64_t co, const double* coef2) {
  if (ci > 32 || act_planes != 1 || planes != 4 || co % 16 != 0) return false;
  for (int64_t b = 1; b < planes; ++b) {
    for (int64_t c = 0; c < co; ++c) {
      if (coef2[b * co + c] != coef2[c] * static_cast<double>(int64_t{1} << b)) return false;  // exact
    }
  }
  return true;
}

RowFn pick_sink_row(int64_t path, int64_t planes, int64_t co) {
#if defined(__x86_64__)
  if (path == kAvx512) return pick_sink_avx512(planes, co);
#endif
  return nullptr;
}

void run_binary_conv(const BinaryConv& c, float* out, const ParallelFor& parallel, const uint64_t* packed,
                     const BitSink* sink) {
  std::vector<Taps> taps;
  parse_phases(c.phases, taps);
  const PackGeometry g = padding_for(c, taps);
  ConvArgs a;
  a.wc = (c.x.c + 63) / 64;
  a.ho = c.ho, a.wo = c.wo, a.co = c.co, a.planes = c.planes, a.rows_padded = c.rows_padded;
  a.in_step_h = c.steps[0], a.in_step_w = c.steps[1], a.out_step_h = c.steps[2], a.out_step_w = c.steps[3];
  const bool multi_level = c.levels.thresholds != nullptr;
  a.act_planes = multi_level ? code_planes(c.levels.count) : 1;
  a.px_words = a.act_planes * a.wc;
  // The bit image lives in a per-thread buffer reused across calls: no allocation (or page faults) per call.
  // (It is given back when a call needs under a quarter of a large one, e.g. after one huge batch.)
  thread_local std::vector<uint64_t> bits;
  if (packed == nullptr) {
    const auto needed = static_cast<size_t>(padded_words(c.x, g) * a.act_planes);
    if (bits.capacity() > (size_t{1} << 20) && needed < bits.capacity() / 4) std::vector<uint64_t>().swap(bits);
    bits.assign(needed, 0);
    if (multi_level) {
      pack_levels_into(c.x, c.levels, c.path, g, bits.data(), parallel);
    } else {
      pack_sign_into(c.x, c.path, g, bits.data(), parallel);
    }
  }
  a.hp = c.x.h + g.pad_top + g.pad_bottom, a.wp = c.x.w + g.pad_left + g.pad_right;
  a.x = packed != nullptr ? packed : bits.data();
  a.coef2 = c.coef2, a.offset2 = c.offset2, a.base = c.base, a.out = sink != nullptr ? nullptr : out, a.sink = sink;
  a.fold_planes = folds_planes(c.x.c, a.act_planes, a.planes, a.co, a.coef2);

  std::vector<PhaseInfo> infos;
  std::vector<RowFn> fns;
  int64_t max_qh = 0, max_words = 0;
  const bool few_rows = a.planes * a.co <= kMaxLaneRows;
#if defined(__x86_64__)
  const bool half = c.path == kAvx512 && a.fold_planes;  // pick_half_avx512's layers
#else
  const bool half = false;
#endif
  for (size_t k = 0; k < taps.size(); ++k) {
    const Taps& t = taps[k];
    PhaseInfo f;
    f.ph = t.ph, f.pw = t.pw;
    f.n_qh = count_q(t.ph, a.ho, a.out_step_h), f.n_qw = count_q(t.pw, a.wo, a.out_step_w);
    for (const int64_t th : t.th) {
      for (const int64_t tw : t.tw) f.offs.push_back(((th + g.pad_top) * a.wp + tw + g.pad_left) * a.px_words);
    }
    f.words = static_cast<int64_t>(f.offs.size()) * a.wc;
    f.w_t = c.w_ts[k];
    if (few_rows && c.path == kAvx512) f.base_lanes = lane_base(a, f);  // read by the AVX-512 lane kernels only
    RowFn fn = half ? pick_half_avx512(a.co) : nullptr;
    if (fn != nullptr) f.w32.assign(f.w_t, f.w_t + f.words * a.rows_padded);  // the low half of every row word
    max_words = std::max(max_words, f.words);
    max_qh = std::max(max_qh, f.n_qh);
    infos.push_back(std::move(f));
    if (fn == nullptr) {
      fn = sink != nullptr ? pick_sink_row(c.path, a.planes, a.co)
                           : pick_row(c.path, a.planes, a.co, a.wc, a.px_words, a.in_step_w);
    }
    fns.push_back(fn);
  }
  const int64_t patch_words = max_words * (few_rows ? kLanes : 1);
  // One task per (image, qh): every phase's row qh, i.e. the output rows qh * out_step_h + ph, so no two
  // tasks write the same output row (phases interleave within a row: splitting by phase shares cache lines).
  parallel(c.x.n * max_qh, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.patch.assign(patch_words > 0 ? patch_words : 1, 0);
    s.counts.assign(a.rows_padded > 0 ? a.rows_padded : 8, 0);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx / max_qh, qh = idx % max_qh;
      for (size_t k = 0; k < infos.size(); ++k) {
        if (qh < infos[k].n_qh) fns[k](a, infos[k], i, qh, s);
      }
    }
  });
}

namespace {

// Spins while `waiting()` holds, for some tens of microseconds at most: the next section of a run (or a helper's
// last block) usually comes sooner than a sleeping thread wakes (a futex round trip, 10-50 us on a VM).
template <typename Waiting>
bool spin_while(const Waiting& waiting) {
  for (int k = 0; k < 4096; ++k) {
    if (!waiting()) return true;
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
  return !waiting();
}

// A process-wide pool of worker threads (created on first use, grown on demand, never destroyed, so exit-time
// teardown never meets a running worker). A call hands out blocks of [0, n) from an atomic counter to the
// caller and `threads - 1` workers; results never depend on the split (every task writes its own outputs).
// Between calls a worker spins briefly before it sleeps, and the caller spins before it sleeps on the last
// helper, so the sections of one run (a few per layer) do not each pay two thread wake-ups. The caller waits
// only for workers that joined before it ran out of blocks: a worker the OS has not scheduled yet (the other
// core busy) is not waited for and cannot stall the call (one that joined and holds a block still can).
class WorkerPool {
 public:
  void run(int64_t threads, int64_t n, const ParallelBody& body) {
    const int64_t helpers = std::min(threads, n) - 1;
    if (helpers <= 0) {
      body(0, n);
      return;
    }
    std::lock_guard<std::mutex> one_call(call_mutex_);
    Job job{&body, n, std::max<int64_t>(1, n / (8 * (helpers + 1)))};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (; started_ < helpers; ++started_) std::thread(&WorkerPool::serve, this, started_).detach();
      job_ = &job, helpers_ = helpers;
      generation_.fetch_add(1);
      if (sleeping_ > 0) wake_.notify_all();
    }
    work(job);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = nullptr;  // every block is claimed: a worker that has not joined yet sits this call out
    }
    if (!spin_while([this] { return joined_.load() != 0; })) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [this] { return joined_.load() == 0; });
    }
  }

 private:
  struct Job {
    const ParallelBody* body;
    int64_t n, block;
    std::atomic<int64_t> next{0};
  };

  static void work(Job& job) {
    for (;;) {
      const int64_t begin = job.next.fetch_add(job.block);
      if (begin >= job.n) return;
      (*job.body)(begin, std::min(job.n, begin + job.block));
    }
  }

  void serve(int64_t index) {
    int64_t seen = 0;
    for (;;) {
      spin_while([&] { return generation_.load() == seen; });
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        if (generation_.load() == seen) {
          ++sleeping_;
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          --sleeping_;
        }
        seen = generation_.load();
        if (index >= helpers_ || job_ == nullptr) continue;  // a smaller call, or one already done
        job = job_;
        joined_.fetch_add(1);
      }
      work(*job);
      if (joined_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_all();
      }
    }
  }

  std::mutex call_mutex_, mutex_;
  std::condition_variable wake_, done_;
  Job* job_ = nullptr;
  int64_t started_ = 0, helpers_ = 0, sleeping_ = 0;
  std::atomic<int64_t> joined_{0}, generation_{0};
};

}  // namespace

void pool_parallel(int64_t threads, int64_t n, const ParallelBody& body) {
  // One pool per process: a fork()ed child (e.g. a data-loader worker) gets a fresh one, its parent's
  // workers do not exist there.
  static WorkerPool* pool = new WorkerPool();
  static pid_t owner = getpid();
  static std::mutex fork_mutex;
  {
    std::lock_guard<std::mutex> lock(fork_mutex);
    if (getpid() != owner) pool = new WorkerPool(), owner = getpid();
  }
  pool->run(threads, n, body);
}

}  // namespace lowbit
