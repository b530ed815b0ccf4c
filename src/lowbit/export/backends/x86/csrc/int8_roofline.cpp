// Roofline micro-benchmarks: this CPU's single-thread peak of the two instructions the kernels live on, in the
// units the kernels' achieved rates are counted in (docs/export.md "Roofline"):
//   * binary ops/s: AND + VPOPCNTQ + add of 512-bit vectors, one weight bit x one activation bit per op;
//   * int8 MAC/s: VPDPBUSD, 64 byte products (16 lanes x 4) per instruction.
// Each runs `iterations` rounds of independent chains (8, 16) over weights from a 4 KiB (L1) buffer, as the kernels'
// inner loops stream weight rows against a broadcast input word. Timed in this thread's CPU time, so time the
// thread spends preempted on a shared machine does not count.
#include <ctime>

#include "int8.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lowbit {
namespace {

constexpr int64_t kChains = 8;       // add latency 1: 8 chains keep the popcount unit busy
constexpr int64_t kVnniChains = 16;  // VPDPBUSD latency ~5 at up to 2 per cycle
constexpr int64_t kBufferWords = 512;  // 4 KiB of uint64

#if defined(__x86_64__)
double thread_seconds() {
  timespec now{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec);
}

// Stores the chains' sum where the compiler cannot see it unused, so the loop stays.
volatile long long g_sink = 0;

__attribute__((target("avx512f"))) void keep(__m512i total) {
  alignas(64) long long lanes[8];
  _mm512_store_si512(lanes, total);
  for (int k = 0; k < 8; ++k) g_sink = g_sink + lanes[k];
}

__attribute__((target("avx512f,avx512vpopcntdq"))) double popcount_rate(int64_t iterations, const uint64_t* buffer) {
  __m512i acc[kChains];
  for (auto& v : acc) v = _mm512_setzero_si512();
  const __m512i x = _mm512_set1_epi64(0x5555aaaa3333cccbLL);
  const double start = thread_seconds();
  for (int64_t r = 0; r < iterations; ++r) {
    const uint64_t* row = buffer + (r * kChains * 8) % kBufferWords;
    for (int64_t k = 0; k < kChains; ++k) {
      acc[k] = _mm512_add_epi64(acc[k], _mm512_popcnt_epi64(_mm512_and_si512(_mm512_loadu_si512(row + 8 * k), x)));
    }
  }
  const double elapsed = thread_seconds() - start;
  __m512i total = acc[0];
  for (int64_t k = 1; k < kChains; ++k) total = _mm512_add_epi64(total, acc[k]);
  keep(total);
  return static_cast<double>(iterations * kChains * 512) / elapsed;
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) double vnni_rate(int64_t iterations, const uint64_t* buffer) {
  __m512i acc[kVnniChains];
  for (auto& v : acc) v = _mm512_setzero_si512();
  const __m512i x = _mm512_set1_epi32(0x01020304);
  const double start = thread_seconds();
  for (int64_t r = 0; r < iterations; ++r) {
    const uint64_t* row = buffer + (r * kVnniChains * 8) % kBufferWords;
    for (int64_t k = 0; k < kVnniChains; ++k) acc[k] = _mm512_dpbusd_epi32(acc[k], x, _mm512_loadu_si512(row + 8 * k));
  }
  const double elapsed = thread_seconds() - start;
  __m512i total = acc[0];
  for (int64_t k = 1; k < kVnniChains; ++k) total = _mm512_add_epi32(total, acc[k]);
  keep(total);
  return static_cast<double>(iterations * kVnniChains * 64) / elapsed;
}
#endif

}  // namespace

double peak_rate(const std::string& kind, int64_t iterations) {
  std::vector<uint64_t> buffer(kBufferWords);
  for (int64_t k = 0; k < kBufferWords; ++k) buffer[static_cast<size_t>(k)] = 0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(k + 1);
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (kind == "popcount" && __builtin_cpu_supports("avx512vpopcntdq")) return popcount_rate(iterations, buffer.data());
  if (kind == "vnni" && __builtin_cpu_supports("avx512vnni")) return vnni_rate(iterations, buffer.data());
#endif
  (void)kind, (void)iterations;
  return 0.0;
}

}  // namespace lowbit
