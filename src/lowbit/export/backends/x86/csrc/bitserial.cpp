// The torch binding of the bit-serial kernels: cpuid dispatch, sign packing over threads, the per-thread
// output pool and binary_conv (every phase of one layer in one call). The kernels are in kernels.h and the
// per-ISA files; the derivation is in kernels.h's header comment and docs/export.md.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace lowbit {
namespace {

int64_t supported_paths_mask() {
  __builtin_cpu_init();
  int64_t mask = 1 << kScalar;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) mask |= 1 << kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vpopcntdq")) {
    mask |= 1 << kAvx512;
  }
  return mask;
}

void check_path(int64_t path) {
  TORCH_CHECK(path >= kScalar && path <= kAvx512 && (supported_paths_mask() >> path) & 1,
              "kernel path ", path, " is not supported by this CPU");
}

// Destination of packed bits: (N, H + pad_top + pad_bottom, W + pad_left + pad_right, wc) words, the
// input image at (pad_top, pad_left) and zeros (no positive bit: "outside the input") around it.
struct PackGeometry {
  int64_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;
};

int64_t padded_words(const at::Tensor& x, const PackGeometry& g) {
  return x.size(0) * (x.size(2) + g.pad_top + g.pad_bottom) * (x.size(3) + g.pad_left + g.pad_right) *
         ((x.size(1) + 63) / 64);
}

// Packs x (N, C, H, W) float32, NCHW or channels-last, into `dst` (padded_words(x, g) zeroed words).
void pack_sign_into(const at::Tensor& x, int64_t path, const PackGeometry& g, uint64_t* dst) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "pack_sign wants a 4-d float32 tensor");
  const bool nchw = x.is_contiguous();
  TORCH_CHECK(nchw || x.is_contiguous(at::MemoryFormat::ChannelsLast), "pack_sign wants NCHW or channels-last");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), hw = h * w, wc = (c + 63) / 64;
  const int64_t hp = h + g.pad_top + g.pad_bottom, wp = w + g.pad_left + g.pad_right;
  const float* src = x.data_ptr<float>();
  const int64_t chunks = (hw + kChunk - 1) / kChunk;
  const PackFn pack = path == kAvx512 ? pack_fn_avx512(nchw) : path == kAvx2 ? pack_fn_avx2(nchw)
                                                                              : pack_fn_scalar(nchw);
  at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
    int64_t at_word[kChunk];
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx / chunks, p0 = (idx % chunks) * kChunk, count = hw - p0 < kChunk ? hw - p0 : kChunk;
      int64_t y = p0 / w, xc = p0 % w;
      for (int64_t j = 0; j < count; ++j) {
        at_word[j] = ((y + g.pad_top) * wp + xc + g.pad_left) * wc;
        if (++xc == w) xc = 0, ++y;
      }
      pack(src + i * c * hw, dst + i * hp * wp * wc, at_word, c, hw, wc, p0, count);
    }
  });
}

// Sign-binarise x (N, C, H, W) float32, contiguous or channels-last, into bits (N, H, W, ceil(C/64)) int64.
at::Tensor pack_sign(const at::Tensor& x, int64_t path) {
  check_path(path);
  TORCH_CHECK(x.dim() == 4, "pack_sign wants a 4-d float32 tensor");
  at::Tensor bits = at::zeros({x.size(0), x.size(2), x.size(3), (x.size(1) + 63) / 64}, x.options().dtype(at::kLong));
  pack_sign_into(x, path, PackGeometry{}, reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>()));
  return bits;
}

// The output tensor, reusing one of this thread's earlier outputs when no tensor refers to it any more
// (the caller dropped it and every view of it): same as freeing and allocating again, minus the page
// faults a fresh large allocation costs each time the C allocator hands it back to the system.
at::Tensor output_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kPoolBytes = size_t{64} << 20;  // what one thread may keep, in all
  // Storages, not tensors: a fresh tensor is made on a free storage, so nothing the caller does with
  // (or Python keeps of) the tensor it got can make a storage look taken once that tensor is gone.
  thread_local auto* pool = new std::vector<at::Storage>();  // never destroyed: outlives exit-time teardown
  size_t nbytes = options.dtype().itemsize();
  for (int64_t size : sizes) nbytes *= static_cast<size_t>(size);
  for (const at::Storage& storage : *pool) {
    if (storage.use_count() == 1 && storage.nbytes() == nbytes && storage.resizable()) {
      at::Tensor out = at::empty({0}, options);
      out.set_(storage, 0, sizes);
      return out;
    }
  }
  at::Tensor out = at::empty(sizes, options);
  // Keep it for later calls: drop free storages of other sizes (oldest first) while over the budget.
  size_t kept = nbytes;
  for (const at::Storage& storage : *pool) kept += storage.nbytes();
  for (auto it = pool->begin(); it != pool->end() && kept > kPoolBytes;) {
    if (it->use_count() == 1) {
      kept -= it->nbytes();
      it = pool->erase(it);
    } else {
      ++it;
    }
  }
  if (kept <= kPoolBytes) pool->push_back(out.storage());
  return out;
}

// All phases of a binary-input conv (see the header comment) in one call: sign-packs x into a zero-padded
// bit image (so no tap needs a bounds check), then runs every phase's output pixels.
//   x: (N, Ci, H, W) float32, NCHW or channels-last; w_ts[f]: phase f's rows (words, rows_padded);
//   phases: per phase [ph, pw, n_tap_h, n_tap_w, tap_h..., tap_w...]; coef2 (planes, co), offset2 (co),
//   base (Ho, Wo, co) float64; steps: [in_step_h, in_step_w, out_step_h, out_step_w].
// Returns out (N, Ho, Wo, co) float32.
at::Tensor binary_conv(const at::Tensor& x, at::TensorList w_ts, at::IntArrayRef phases, const at::Tensor& coef2,
                       const at::Tensor& offset2, const at::Tensor& base, at::IntArrayRef steps, int64_t path) {
  check_path(path);
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "binary_conv wants a 4-d float32 input");
  TORCH_CHECK(coef2.scalar_type() == at::kDouble && offset2.scalar_type() == at::kDouble &&
                  base.scalar_type() == at::kDouble && base.is_contiguous() && coef2.is_contiguous() &&
                  offset2.is_contiguous(),
              "coef/offset/base must be contiguous float64");
  TORCH_CHECK(base.dim() == 3 && steps.size() == 4, "base must be (Ho, Wo, Co) and steps 4 ints");
  ConvArgs a;
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  a.wc = (x.size(1) + 63) / 64;
  a.ho = base.size(0), a.wo = base.size(1), a.co = base.size(2);
  a.planes = coef2.numel() / a.co;
  TORCH_CHECK(offset2.numel() == a.co && coef2.numel() == a.planes * a.co, "coef/offset shape mismatch");
  a.in_step_h = steps[0], a.in_step_w = steps[1], a.out_step_h = steps[2], a.out_step_w = steps[3];
  TORCH_CHECK(a.in_step_h > 0 && a.in_step_w > 0 && a.out_step_h > 0 && a.out_step_w > 0, "bad steps");

  // Phase geometry, and the padding that keeps every tap of every output pixel inside the bit image.
  struct Taps {
    int64_t ph, pw;
    std::vector<int64_t> th, tw;
  };
  std::vector<Taps> taps;
  PackGeometry g;
  for (size_t pos = 0; pos < phases.size();) {
    TORCH_CHECK(pos + 4 <= phases.size(), "bad phase list");
    Taps t{phases[pos], phases[pos + 1], {}, {}};
    const int64_t nth = phases[pos + 2], ntw = phases[pos + 3];
    TORCH_CHECK(nth >= 0 && ntw >= 0 && pos + 4 + nth + ntw <= phases.size(), "bad phase list");
    t.th.assign(phases.begin() + pos + 4, phases.begin() + pos + 4 + nth);
    t.tw.assign(phases.begin() + pos + 4 + nth, phases.begin() + pos + 4 + nth + ntw);
    pos += 4 + nth + ntw;
    taps.push_back(std::move(t));
  }
  TORCH_CHECK(taps.size() == w_ts.size(), "one w_t per phase");
  auto count_q = [](int64_t phase, int64_t size, int64_t step) {
    return phase < size ? (size - phase + step - 1) / step : int64_t{0};
  };
  for (const Taps& t : taps) {
    const int64_t n_qh = count_q(t.ph, a.ho, a.out_step_h), n_qw = count_q(t.pw, a.wo, a.out_step_w);
    if (n_qh == 0 || n_qw == 0) continue;
    for (int64_t v : t.th) {
      g.pad_top = std::max(g.pad_top, -v);
      g.pad_bottom = std::max(g.pad_bottom, (n_qh - 1) * a.in_step_h + v - (h - 1));
    }
    for (int64_t v : t.tw) {
      g.pad_left = std::max(g.pad_left, -v);
      g.pad_right = std::max(g.pad_right, (n_qw - 1) * a.in_step_w + v - (w - 1));
    }
  }
  at::Tensor xx = x;
  if (!(xx.is_contiguous() || xx.is_contiguous(at::MemoryFormat::ChannelsLast))) xx = xx.contiguous();
  // The bit image lives in a per-thread buffer reused across calls: no allocation (or page faults) per call.
  // (It is given back when a call needs under a quarter of a large one, e.g. after one huge batch.)
  thread_local std::vector<uint64_t> bits;
  const auto needed = static_cast<size_t>(padded_words(xx, g));
  if (bits.capacity() > (size_t{1} << 20) && needed < bits.capacity() / 4) std::vector<uint64_t>().swap(bits);
  bits.assign(needed, 0);
  pack_sign_into(xx, path, g, bits.data());
  a.hp = h + g.pad_top + g.pad_bottom, a.wp = w + g.pad_left + g.pad_right;
  a.x = bits.data();
  a.coef2 = coef2.data_ptr<double>(), a.offset2 = offset2.data_ptr<double>(), a.base = base.data_ptr<double>();
  at::Tensor out = output_buffer({n, a.ho, a.wo, a.co}, x.options());
  a.out = out.data_ptr<float>();
  a.rows_padded = -1;

  std::vector<PhaseInfo> infos;
  std::vector<RowFn> fns;
  std::vector<int64_t> first_row;  // prefix sums of the (image, qh) rows of every phase
  int64_t total_rows = 0;
  int64_t max_words = 0;
  const int64_t rows = a.planes * a.co;
  const bool few_rows = rows <= kMaxLaneRows;
  for (size_t k = 0; k < taps.size(); ++k) {
    const Taps& t = taps[k];
    const at::Tensor& w_t = w_ts[k];
    PhaseInfo f;
    f.ph = t.ph, f.pw = t.pw;
    f.n_qh = count_q(t.ph, a.ho, a.out_step_h), f.n_qw = count_q(t.pw, a.wo, a.out_step_w);
    for (int64_t th : t.th) {
      for (int64_t tw : t.tw) f.offs.push_back(((th + g.pad_top) * a.wp + tw + g.pad_left) * a.wc);
    }
    f.words = static_cast<int64_t>(f.offs.size()) * a.wc;
    TORCH_CHECK(w_t.dim() == 2 && w_t.scalar_type() == at::kLong && w_t.is_contiguous() && w_t.size(0) == f.words,
                "bad w_t for phase ", k);
    TORCH_CHECK(a.rows_padded < 0 || a.rows_padded == w_t.size(1), "w_t of all phases need the same rows");
    a.rows_padded = w_t.size(1);
    TORCH_CHECK(a.rows_padded % 8 == 0 && a.rows_padded >= rows, "w_t rows must cover planes * co, padded to 8");
    f.w_t = reinterpret_cast<const uint64_t*>(w_t.data_ptr<int64_t>());
    const RowFn fn = path == kAvx512 ? pick_row_avx512(a.planes, a.co, a.wc, a.in_step_w)
                     : path == kAvx2 ? pick_row_avx2(a.planes, a.co, a.wc, a.in_step_w)
                                     : pick_row_scalar(a.planes, a.co, a.wc, a.in_step_w);
    max_words = std::max(max_words, f.words);
    first_row.push_back(total_rows);
    total_rows += n * f.n_qh;
    infos.push_back(std::move(f));
    fns.push_back(fn);
  }
  first_row.push_back(total_rows);
  const int64_t patch_words = max_words * (few_rows ? kLanes : 1);
  const int64_t count_words = a.rows_padded > 0 ? a.rows_padded : 8;
  at::parallel_for(0, total_rows, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.patch.assign(patch_words > 0 ? patch_words : 1, 0);
    s.counts.assign(count_words, 0);
    size_t k = 0;
    for (int64_t idx = begin; idx < end; ++idx) {
      while (idx >= first_row[k + 1]) ++k;
      const PhaseInfo& f = infos[k];
      const int64_t local = idx - first_row[k];
      fns[k](a, f, local / f.n_qh, local % f.n_qh, s);
    }
  });
  return out;
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY(lowbit_bitserial, m) {
  m.def("supported_paths() -> int", &lowbit::supported_paths_mask);
  m.def("pack_sign(Tensor x, int path) -> Tensor", &lowbit::pack_sign);
  m.def("binary_conv(Tensor x, Tensor[] w_ts, int[] phases, Tensor coef2, Tensor offset2, Tensor base, "
        "int[] steps, int path) -> Tensor",
        &lowbit::binary_conv);
}
