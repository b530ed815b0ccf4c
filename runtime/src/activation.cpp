// Vectorisable activations (activation.h). exp_approx is Cephes' expf (range reduction by ln 2 in two
// parts, degree-5 polynomial, 2^n from the exponent bits); with -ffp-contract=off it is plain IEEE float
// arithmetic, so x86-64 and ARM64 give the same bits (glibc's tanhf / expf differ in the last bit).
#include "activation.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace lowbit {
namespace {

// e^x for x clamped to [-87.3, 88.3] (relative error < 2e-7 there; e^x beyond overflows or is denormal).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln 2) via the 1.5 * 2^23 trick
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// tanh: Cephes' odd polynomial for |x| < 0.625, else sign(x) (1 - 2 / (e^{2|x|} + 1)); absolute error < 3e-7.
inline float tanh_approx(float x) {
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float ax = std::fabs(x);
  const float large = 1.0f - 2.0f / (exp_approx(2.0f * ax) + 1.0f);
  return ax < 0.625f ? small : std::copysign(large, x);
}

inline float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

float gelu(float x, bool tanh_form) {
  if (tanh_form) {
    const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + std::tanh(inner));
  }
  return 0.5f * x * (1.0f + std::erf(x * 0.7071067811865476f));
}

// Each activation is a branch-free loop the compiler vectorises (LOWBIT_VECTOR_CLONES).

__attribute__((always_inline)) inline void tanh_run_body(const float* src, float* dst, int64_t count) {
  for (int64_t k = 0; k < count; ++k) dst[k] = tanh_approx(src[k]);
}
LOWBIT_VECTOR_CLONES(tanh_run, (const float* src, float* dst, int64_t count), (src, dst, count))

__attribute__((always_inline)) inline void sigmoid_run_body(const float* src, float* dst, int64_t count, bool times_x) {
  for (int64_t k = 0; k < count; ++k) dst[k] = (times_x ? src[k] : 1.0f) * sigmoid_approx(src[k]);
}
LOWBIT_VECTOR_CLONES(sigmoid_run, (const float* src, float* dst, int64_t count, bool times_x), (src, dst, count, times_x))

}  // namespace

Activation activation_of(const Node& node) {
  const std::string& op = node.op;
  const Attrs& a = node.attrs;
  Activation act;
  if (op == "relu") act.kind = Activation::Relu;
  else if (op == "tanh") act.kind = Activation::Tanh;
  else if (op == "sigmoid") act.kind = Activation::Sigmoid;
  else if (op == "silu") act.kind = Activation::Silu;
  else if (op == "leaky_relu") act.kind = Activation::LeakyRelu, act.a = static_cast<float>(a.slope);
  else if (op == "elu") act.kind = Activation::Elu, act.a = static_cast<float>(a.alpha);
  else if (op == "gelu") act.kind = a.gelu_tanh ? Activation::GeluTanh : Activation::Gelu;
  else if (op == "hardtanh") act.kind = Activation::Hardtanh, act.a = static_cast<float>(a.min_val), act.b = static_cast<float>(a.max_val);
  return act;
}

void activate(const Activation& act, const float* src, float* dst, int64_t count) {
  const float a = act.a, b = act.b;
  switch (act.kind) {
    case Activation::None: if (src != dst) std::copy_n(src, count, dst); break;
    case Activation::Relu: for (int64_t k = 0; k < count; ++k) dst[k] = src[k] > 0.0f ? src[k] : 0.0f; break;
    case Activation::Tanh: tanh_run(src, dst, count); break;
    case Activation::Sigmoid: sigmoid_run(src, dst, count, false); break;
    case Activation::Silu: sigmoid_run(src, dst, count, true); break;
    case Activation::LeakyRelu: for (int64_t k = 0; k < count; ++k) dst[k] = src[k] > 0.0f ? src[k] : src[k] * a; break;
    case Activation::Elu: for (int64_t k = 0; k < count; ++k) dst[k] = src[k] > 0.0f ? src[k] : a * std::expm1(src[k]); break;
    case Activation::Gelu: for (int64_t k = 0; k < count; ++k) dst[k] = gelu(src[k], false); break;
    case Activation::GeluTanh: for (int64_t k = 0; k < count; ++k) dst[k] = gelu(src[k], true); break;
    case Activation::Hardtanh: for (int64_t k = 0; k < count; ++k) dst[k] = std::min(std::max(src[k], a), b); break;
  }
}

}  // namespace lowbit
