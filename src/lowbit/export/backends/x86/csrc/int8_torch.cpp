// The torch binding of the integer path (int8.h) and the roofline probes: tensors in and out, at::parallel_for
// as the thread pool; everything else is the torch-free int8_driver.cpp, shared with the native runtime.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "int8.h"

namespace lowbit {
namespace {

// x (N, C, H, W) float32, NCHW or channels-last; shift (C) or undefined; bounds (L + 1) float32; w_ts[f] int32
// (words, co_pad); coef, offset (co) and base (Ho, Wo, co) float64. Returns (N, Ho, Wo, co).
at::Tensor int8_conv(const at::Tensor& x, const std::optional<at::Tensor>& shift, const at::Tensor& bounds, double lo,
                     double inv_step, at::TensorList w_ts, at::IntArrayRef phases, const at::Tensor& coef,
                     const at::Tensor& offset, const at::Tensor& base, at::IntArrayRef steps, int64_t path) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "int8_conv wants a 4-d float32 input");
  const at::Tensor keep = x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous();
  TORCH_CHECK(coef.scalar_type() == at::kDouble && offset.scalar_type() == at::kDouble &&
                  base.scalar_type() == at::kDouble && coef.is_contiguous() && offset.is_contiguous() &&
                  base.is_contiguous() && base.dim() == 3,
              "coef / offset / base must be contiguous float64, base (Ho, Wo, Co)");
  TORCH_CHECK(bounds.scalar_type() == at::kFloat && bounds.is_contiguous(), "bounds must be contiguous float32");
  TORCH_CHECK(steps.size() == 4, "steps must be 4 ints");
  Int8Conv call;
  call.x = Image{keep.data_ptr<float>(), keep.is_contiguous(), keep.size(0), keep.size(1), keep.size(2), keep.size(3)};
  if (shift.has_value()) {
    TORCH_CHECK(shift->scalar_type() == at::kFloat && shift->is_contiguous() && shift->numel() == x.size(1),
                "shift must be contiguous float32 with one value per input channel");
    call.shift = shift->data_ptr<float>();
  }
  call.bounds.assign(bounds.data_ptr<float>(), bounds.data_ptr<float>() + bounds.numel());
  call.lo = static_cast<float>(lo), call.inv_step = static_cast<float>(inv_step);
  call.ho = base.size(0), call.wo = base.size(1), call.co = base.size(2);
  TORCH_CHECK(coef.numel() == call.co && offset.numel() == call.co, "coef / offset need one value per channel");
  call.co_pad = w_ts.empty() ? 0 : w_ts[0].size(-1);
  for (const at::Tensor& w_t : w_ts) {
    TORCH_CHECK(w_t.dim() == 2 && w_t.scalar_type() == at::kInt && w_t.is_contiguous() && w_t.size(1) == call.co_pad,
                "every w_t must be a contiguous int32 (words, co_pad) tensor, co_pad the same");
    call.w_ts.push_back(w_t.data_ptr<int32_t>());
    call.w_t_words.push_back(w_t.size(0));
  }
  call.phases.assign(phases.begin(), phases.end());
  call.coef = coef.data_ptr<double>(), call.offset = offset.data_ptr<double>();
  thread_local std::vector<int64_t> base_index;  // read by the call that follows on this thread
  call.base = per_pixel_base(base.data_ptr<double>(), call.ho, call.wo, base_index);
  for (int k = 0; k < 4; ++k) call.steps[k] = steps[k];
  call.path = path;
  const std::string bad = check_int8_conv(call);
  TORCH_CHECK(bad.empty(), "int8_conv: ", bad);
  at::Tensor out = at::empty({call.x.n, call.ho, call.wo, call.co}, x.options());
  run_int8_conv(call, out.data_ptr<float>(), [](int64_t n, const ParallelBody& body) { at::parallel_for(0, n, 1, body); });
  return out;
}

double peak(const std::string& kind, int64_t iterations) { return peak_rate(kind, iterations); }

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_FRAGMENT(lowbit_bitserial, m) {
  m.def("int8_conv(Tensor x, Tensor? shift, Tensor bounds, float lo, float inv_step, Tensor[] w_ts, int[] phases, "
        "Tensor coef, Tensor offset, Tensor base, int[] steps, int path) -> Tensor",
        &lowbit::int8_conv);
  m.def("peak_rate(str kind, int iterations) -> float", &lowbit::peak);
}
