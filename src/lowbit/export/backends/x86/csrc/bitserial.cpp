// The torch binding of the bit-serial kernels: tensors in and out, torch's thread count on the driver's pool and
// the per-thread output pool. Everything else (cpuid dispatch, sign packing, binary_conv) is the torch-free
// driver.cpp, shared with the native runtime; the derivation is in kernels.h's header and docs/export.md.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "driver.h"

namespace lowbit {
namespace {

int64_t supported_paths() { return supported_paths_mask(); }

void check_path(int64_t path) {
  TORCH_CHECK(path_supported(path), "kernel path ", path, " is not supported by this CPU");
}

// torch's intra-op thread count on the driver's pool: at::parallel_for is inline OpenMP, which this extension
// (built without -fopenmp, so no second OpenMP runtime is loaded beside torch's) would run serially.
void torch_parallel(int64_t n, const ParallelBody& body) { pool_parallel(at::get_num_threads(), n, body); }

// x as the driver's Image: NCHW or channels-last float32 (anything else is made contiguous in `keep`).
Image image_of(const at::Tensor& x, at::Tensor& keep) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "the kernels want a 4-d float32 input");
  keep = x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous();
  return Image{keep.data_ptr<float>(), keep.is_contiguous(), keep.size(0), keep.size(1), keep.size(2), keep.size(3)};
}

// Sign-binarise x (N, C, H, W) float32, contiguous or channels-last, into bits (N, H, W, ceil(C/64)) int64.
at::Tensor pack_sign(const at::Tensor& x, int64_t path) {
  check_path(path);
  at::Tensor keep;
  const Image image = image_of(x, keep);
  at::Tensor bits = at::zeros({x.size(0), x.size(2), x.size(3), (x.size(1) + 63) / 64}, x.options().dtype(at::kLong));
  pack_sign_into(image, path, PackGeometry{}, reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>()), torch_parallel);
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

// The driver's call for the arguments of binary_conv (x is kept alive in `keep`).
BinaryConv conv_call(const at::Tensor& x, at::TensorList w_ts, at::IntArrayRef phases, const at::Tensor& coef2,
                     const at::Tensor& offset2, const at::Tensor& base, at::IntArrayRef steps, int64_t path,
                     at::Tensor& keep) {
  TORCH_CHECK(coef2.scalar_type() == at::kDouble && offset2.scalar_type() == at::kDouble &&
                  base.scalar_type() == at::kDouble && base.is_contiguous() && coef2.is_contiguous() &&
                  offset2.is_contiguous(),
              "coef/offset/base must be contiguous float64");
  TORCH_CHECK(base.dim() == 3 && steps.size() == 4, "base must be (Ho, Wo, Co) and steps 4 ints");
  BinaryConv call;
  call.x = image_of(x, keep);
  call.ho = base.size(0), call.wo = base.size(1), call.co = base.size(2);
  call.planes = call.co > 0 ? coef2.numel() / call.co : 0;
  TORCH_CHECK(offset2.numel() == call.co && coef2.numel() == call.planes * call.co, "coef/offset shape mismatch");
  call.rows_padded = w_ts.empty() ? 0 : w_ts[0].size(-1);
  for (const at::Tensor& w_t : w_ts) {
    TORCH_CHECK(w_t.dim() == 2 && w_t.scalar_type() == at::kLong && w_t.is_contiguous() &&
                    w_t.size(1) == call.rows_padded,
                "every w_t must be a contiguous int64 (words, rows_padded) tensor, rows_padded the same");
    call.w_ts.push_back(reinterpret_cast<const uint64_t*>(w_t.data_ptr<int64_t>()));
    call.w_t_words.push_back(w_t.size(0));
  }
  call.phases.assign(phases.begin(), phases.end());
  call.coef2 = coef2.data_ptr<double>(), call.offset2 = offset2.data_ptr<double>();
  thread_local std::vector<int64_t> base_index;  // read by the call that follows on this thread
  call.base = per_pixel_base(base.data_ptr<double>(), call.ho, call.wo, base_index);
  for (int k = 0; k < 4; ++k) call.steps[k] = steps[k];
  call.path = path;
  return call;
}

// Checks and runs a call into a (pooled) (N, Ho, Wo, co) float32 output.
at::Tensor run_call(const BinaryConv& call, const at::Tensor& x) {
  const std::string bad = check_binary_conv(call);
  TORCH_CHECK(bad.empty(), "binary_conv: ", bad);
  at::Tensor out = output_buffer({call.x.n, call.ho, call.wo, call.co}, x.options());
  run_binary_conv(call, out.data_ptr<float>(), torch_parallel);
  return out;
}

// All phases of a binary-input conv in one call (driver.h's BinaryConv): x (N, Ci, H, W) float32, NCHW or
// channels-last; w_ts[f] int64 (words, rows_padded); coef2, offset2, base float64. Returns out (N, Ho, Wo, co).
at::Tensor binary_conv(const at::Tensor& x, at::TensorList w_ts, at::IntArrayRef phases, const at::Tensor& coef2,
                       const at::Tensor& offset2, const at::Tensor& base, at::IntArrayRef steps, int64_t path) {
  at::Tensor keep;
  return run_call(conv_call(x, w_ts, phases, coef2, offset2, base, steps, path, keep), x);
}

// binary_conv on a multi-level (or threshold-fused) input: x is coded by driver.h's LevelCode with
// thresholds (Ci, count) float32 and signs (Ci,) float32 (+1 / -1), into code_planes(count) bit planes.
at::Tensor levels_conv(const at::Tensor& x, at::TensorList w_ts, at::IntArrayRef phases, const at::Tensor& coef2,
                       const at::Tensor& offset2, const at::Tensor& base, at::IntArrayRef steps, int64_t path,
                       const at::Tensor& thresholds, const at::Tensor& signs, bool ties_up) {
  at::Tensor keep;
  BinaryConv call = conv_call(x, w_ts, phases, coef2, offset2, base, steps, path, keep);
  TORCH_CHECK(thresholds.scalar_type() == at::kFloat && thresholds.is_contiguous() && thresholds.dim() == 2 &&
                  thresholds.size(0) == call.x.c,
              "thresholds must be a contiguous float32 (in_channels, count) tensor");
  TORCH_CHECK(signs.scalar_type() == at::kFloat && signs.is_contiguous() && signs.numel() == call.x.c,
              "signs must be a contiguous float32 tensor of in_channels values");
  call.levels.thresholds = thresholds.data_ptr<float>();
  call.levels.signs = signs.data_ptr<float>();
  call.levels.count = thresholds.size(1);
  call.levels.ties_up = ties_up;
  return run_call(call, x);
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY(lowbit_bitserial, m) {
  m.def("supported_paths() -> int", &lowbit::supported_paths);
  m.def("pack_sign(Tensor x, int path) -> Tensor", &lowbit::pack_sign);
  m.def("binary_conv(Tensor x, Tensor[] w_ts, int[] phases, Tensor coef2, Tensor offset2, Tensor base, "
        "int[] steps, int path) -> Tensor",
        &lowbit::binary_conv);
  m.def("levels_conv(Tensor x, Tensor[] w_ts, int[] phases, Tensor coef2, Tensor offset2, Tensor base, "
        "int[] steps, int path, Tensor thresholds, Tensor signs, bool ties_up) -> Tensor",
        &lowbit::levels_conv);
}
