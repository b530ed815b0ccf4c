// Element-wise activations (relu, tanh, sigmoid, silu, leaky_relu, elu, gelu, hardtanh) over runs of values,
// so a layer or norm can apply the activation that follows it in its own pass (capi.cpp's fusion).
// tanh, sigmoid and silu use exp_approx: within 3e-7 absolute (tanh, sigmoid) of the exact function.
#pragma once

#include <cstdint>

#include "graph.h"

// Hot float loops the compiler vectorises are also cloned for AVX2 / AVX-512 on x86, picked at load from the CPU
// (no fused multiply-adds: -ffp-contract=off, so every clone rounds alike).
#if defined(__x86_64__)
#define LOWBIT_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LOWBIT_VECTOR_CLONES
#endif

namespace lowbit {

struct Activation {
  enum Kind { None, Relu, Tanh, Sigmoid, Silu, LeakyRelu, Elu, Gelu, GeluTanh, Hardtanh } kind = None;
  float a = 0.0f, b = 0.0f;  // leaky_relu slope, elu alpha, hardtanh min / max
};

// The activation `node` computes, or kind None when it is not an element-wise activation.
Activation activation_of(const Node& node);

// dst[k] = act(src[k]) for k < count (dst may be src).
void activate(const Activation& act, const float* src, float* dst, int64_t count);

}  // namespace lowbit
