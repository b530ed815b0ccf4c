// Element-wise activations (relu, tanh, sigmoid, silu, leaky_relu, elu, gelu, hardtanh) over runs of values,
// so a layer or norm can apply the activation that follows it in its own pass (capi.cpp's fusion).
// tanh, sigmoid and silu use exp_approx: within 3e-7 absolute (tanh, sigmoid) of the exact function.
#pragma once

#include <cstdint>

#include "driver.h"
#include "graph.h"

// Hot float loops the compiler vectorises run as AVX-512, AVX2 or baseline copies on x86, picked once from cpuid
// (driver.h cpu_features: target_clones without libgcc's CPU model code); no fused multiply-adds
// (-ffp-contract=off), so every copy rounds alike. LOWBIT_VECTOR_CLONES(NAME, (PARAMS), (ARGS)) defines the void
// function NAME(PARAMS) from the always_inline NAME_body(PARAMS) that holds the loop.
#if defined(__x86_64__)
#define LOWBIT_VECTOR_CLONES(name, params, args)                                                                  \
  __attribute__((target("avx512f"))) void name##_avx512 params { name##_body args; }                              \
  __attribute__((target("avx2"))) void name##_avx2 params { name##_body args; }                                   \
  void name##_baseline params { name##_body args; }                                                               \
  void name params {                                                                                              \
    static const auto pick = cpu_features().avx512f ? name##_avx512 : cpu_features().avx2 ? name##_avx2 : name##_baseline; \
    pick args;                                                                                                    \
  }
#else
#define LOWBIT_VECTOR_CLONES(name, params, args) \
  void name params { name##_body args; }
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
