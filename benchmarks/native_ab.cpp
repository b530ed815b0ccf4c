// Two liblowbit builds side by side in one process (each dlopen'ed RTLD_LOCAL), taking turns: the best process
// CPU ms of each, so a busy machine's load falls on both alike, and whether their outputs agree bit for bit.
// BATCH 0 times lowbit_load_file + lowbit_free instead (start-up, all planning threads counted).
//   g++ -O2 -Iruntime/include benchmarks/native_ab.cpp -o /tmp/native_ab -ldl
//   OMP_NUM_THREADS=1 /tmp/native_ab OLD/liblowbit.so runtime/build/liblowbit.so FILE BATCH REPEATS ROUNDS
// prints "FILE bBATCH old MS new MS new/old R same|DIFFERENT" (docs/RESULTS.md, "size and start-up, fifth pass").
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <vector>

#include "lowbit.h"

namespace {

struct Build {
  decltype(&lowbit_load_file) load;
  decltype(&lowbit_free) free;
  decltype(&lowbit_run) run;
  decltype(&lowbit_input_shape) input_shape;
  decltype(&lowbit_output_shape) output_shape;
};

template <typename Fn>
void bind(void* library, const char* name, Fn& fn) {
  fn = reinterpret_cast<Fn>(dlsym(library, name));
  if (fn == nullptr) std::fprintf(stderr, "%s missing\n", name), std::exit(2);
}

Build open_build(const char* path) {
  void* library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) std::fprintf(stderr, "%s\n", dlerror()), std::exit(2);
  Build b;
  bind(library, "lowbit_load_file", b.load), bind(library, "lowbit_free", b.free), bind(library, "lowbit_run", b.run);
  bind(library, "lowbit_input_shape", b.input_shape), bind(library, "lowbit_output_shape", b.output_shape);
  return b;
}

double cpu_ms() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) * 1e3 + static_cast<double>(t.tv_nsec) / 1e6;
}

size_t values(decltype(&lowbit_input_shape) shape, const lowbit_model* model, long batch) {
  int64_t dims[8];
  int rank = 0;
  shape(model, dims, 8, &rank);
  size_t count = static_cast<size_t>(batch);
  for (int k = 0; k < rank; ++k) count *= static_cast<size_t>(dims[k]);  // the per-sample shape
  return count;
}

lowbit_model* load(const Build& b, const char* file) {
  lowbit_model* model = nullptr;
  if (b.load(file, &model) != LOWBIT_OK) std::fprintf(stderr, "cannot load %s\n", file), std::exit(2);
  return model;
}

// Best CPU ms of `turns` loads per build, the builds alternating.
void time_loads(const Build (&builds)[2], const char* file, int turns, double (&best)[2]) {
  for (int k = 0; k < turns; ++k) {
    for (int i = 0; i < 2; ++i) {
      const double start = cpu_ms();
      lowbit_model* model = load(builds[i], file);
      best[i] = std::min(best[i], cpu_ms() - start);
      builds[i].free(model);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: native_ab OLD.so NEW.so FILE BATCH REPEATS ROUNDS  (BATCH 0: load time)\n");
    return 2;
  }
  const Build builds[2] = {open_build(argv[1]), open_build(argv[2])};
  const char* file = argv[3];
  const long batch = std::atol(argv[4]);
  const int repeats = std::atoi(argv[5]), rounds = std::atoi(argv[6]);
  double best[2] = {1e300, 1e300};
  bool same = true;
  if (batch == 0) {
    time_loads(builds, file, repeats * rounds, best);
  } else {
    lowbit_model* models[2] = {load(builds[0], file), load(builds[1], file)};
    std::vector<float> x(values(builds[0].input_shape, models[0], batch)), y[2];
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 1000) / 500.0f - 1.0f;
    for (int i = 0; i < 2; ++i) y[i].resize(values(builds[i].output_shape, models[i], batch));
    for (int r = 0; r < rounds; ++r) {
      for (int i = 0; i < 2; ++i) {
        for (int k = 0; k < repeats; ++k) {
          const double start = cpu_ms();
          builds[i].run(models[i], x.data(), batch, y[i].data());
          best[i] = std::min(best[i], cpu_ms() - start);
        }
      }
    }
    same = y[0].size() == y[1].size() && std::memcmp(y[0].data(), y[1].data(), y[0].size() * sizeof(float)) == 0;
  }
  const char* slash = std::strrchr(file, '/');
  std::printf("%s b%ld old %.3f new %.3f new/old %.3f %s\n", slash ? slash + 1 : file, batch, best[0], best[1],
              best[1] / best[0], same ? "same" : "DIFFERENT");
  return same ? 0 : 1;
}
