// Robustness driver for liblowbit, built with AddressSanitizer + UndefinedBehaviorSanitizer by `make asan`.
//   fuzz_load random FILE ITERATIONS SEED   truncations, byte flips anywhere, byte flips in the header
//   fuzz_load files FILE...                 load each file (e.g. hostile re-signed ones), print code + message
// Every model that loads is also run on one zero sample. A crash or sanitizer report fails the caller's test;
// each line printed is "<code> <message>" so the test can check the files were refused for the right reason.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../include/lowbit.h"

namespace {

std::vector<uint8_t> read_file(const char* path) {
  std::vector<uint8_t> bytes;
  std::FILE* file = std::fopen(path, "rb");
  if (!file) return bytes;
  int c = 0;
  while ((c = std::fgetc(file)) != EOF) bytes.push_back(static_cast<uint8_t>(c));
  std::fclose(file);
  return bytes;
}

// Loads `bytes`, runs one zero sample when it loads; returns the load's code.
int try_model(const std::vector<uint8_t>& bytes) {
  lowbit_model* model = nullptr;
  const int code = lowbit_load_memory(bytes.data(), bytes.size(), &model);
  if (code != LOWBIT_OK) return code;
  int64_t dims[8];
  int in_rank = 0, out_rank = 0;
  int64_t in_values = 1, out_values = 1;
  lowbit_input_shape(model, dims, 8, &in_rank);
  for (int k = 0; k < in_rank; ++k) in_values *= dims[k];
  lowbit_output_shape(model, dims, 8, &out_rank);
  for (int k = 0; k < out_rank; ++k) out_values *= dims[k];
  std::vector<float> in(static_cast<size_t>(in_values), 0.0f), out(static_cast<size_t>(out_values));
  const int run = lowbit_run(model, in.data(), 1, out.data());
  lowbit_free(model);
  return run;
}

uint64_t next(uint64_t& state) {
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return state >> 17;
}

int random_mode(const char* path, long iterations, uint64_t seed) {
  const std::vector<uint8_t> original = read_file(path);
  if (original.size() < 16 || try_model(original) != LOWBIT_OK) {
    std::fprintf(stderr, "the original file does not load: %s\n", lowbit_last_error());
    return 1;
  }
  const size_t header = 8 + (original[0] | original[1] << 8 | original[2] << 16);
  long counts[8] = {};
  for (long trial = 0; trial < iterations; ++trial) {
    std::vector<uint8_t> data = original;
    if (trial % 3 == 0) {
      data.resize(next(seed) % data.size());
    } else {
      const size_t span = trial % 3 == 1 ? std::min(header, data.size()) : data.size();
      for (int flips = 1 + static_cast<int>(next(seed) % 8); flips > 0; --flips) {
        data[next(seed) % span] = static_cast<uint8_t>(next(seed));
      }
    }
    const int code = try_model(data);
    ++counts[code >= 0 && code < 8 ? code : 7];
  }
  std::printf("ok %ld format %ld checksum %ld other %ld\n", counts[0], counts[LOWBIT_ERROR_FORMAT],
              counts[LOWBIT_ERROR_CHECKSUM], iterations - counts[0] - counts[2] - counts[3]);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "random" && argc == 5) return random_mode(argv[2], std::atol(argv[3]), std::strtoull(argv[4], nullptr, 10));
  if (mode == "files") {
    for (int i = 2; i < argc; ++i) {
      const int code = try_model(read_file(argv[i]));
      std::printf("%d %s\n", code, code == LOWBIT_OK ? "ok" : lowbit_last_error());
    }
    return 0;
  }
  std::fprintf(stderr, "usage: fuzz_load random FILE ITERATIONS SEED | fuzz_load files FILE...\n");
  return 2;
}
