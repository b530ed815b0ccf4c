// Steady-state run time of one liblowbit build: loads FILE, runs one warm-up batch, then prints the best
// process CPU ms of REPEATS runs at batch BATCH (and a sum of the outputs, to compare builds' results). Two
// builds side by side: alternate them in one loop through LD_LIBRARY_PATH (docs/RESULTS.md, fourth pass).
//   g++ -O2 -Iruntime/include benchmarks/native_steady.cpp -o /tmp/native_steady -Lruntime/build -llowbit
//   OMP_NUM_THREADS=1 LD_LIBRARY_PATH=runtime/build /tmp/native_steady FILE REPEATS BATCH
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <vector>

#include "lowbit.h"

namespace {

double cpu_ms() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) * 1e3 + static_cast<double>(t.tv_nsec) / 1e6;
}

size_t values(int (*shape)(const lowbit_model*, int64_t*, int, int*), const lowbit_model* model) {
  int64_t dims[8];
  int rank = 0;
  shape(model, dims, 8, &rank);
  size_t count = 1;
  for (int k = 0; k < rank; ++k) count *= static_cast<size_t>(dims[k]);
  return count;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: native_steady FILE REPEATS BATCH\n");
    return 2;
  }
  const int repeats = std::atoi(argv[2]);
  const long batch = std::atol(argv[3]);
  lowbit_model* model = nullptr;
  if (lowbit_load_file(argv[1], &model) != LOWBIT_OK) {
    std::fprintf(stderr, "%s\n", lowbit_last_error());
    return 2;
  }
  std::vector<float> x(values(lowbit_input_shape, model) * batch), y(values(lowbit_output_shape, model) * batch);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 1000) / 500.0f - 1.0f;
  lowbit_run(model, x.data(), batch, y.data());
  double best = 1e300;
  for (int k = 0; k < repeats; ++k) {
    const double start = cpu_ms();
    lowbit_run(model, x.data(), batch, y.data());
    const double spent = cpu_ms() - start;
    best = spent < best ? spent : best;
  }
  double sum = 0.0;
  for (const float v : y) sum += v;
  std::printf("%.3f ms (output sum %.6f)\n", best, sum);
  lowbit_free(model);
  return 0;
}
