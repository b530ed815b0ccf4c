// lowbit-run: generate images from a packed model with liblowbit alone (no Python, no torch).
//   lowbit-run FILE [-n 16] [--seed 0] [--input IN.npy] [--threads 1] [--kernel-path auto] -o OUT.png|OUT.npy
// Without --input the model's input is drawn from N(0, 1) with the CLI's own generator (splitmix64 + Box-Muller):
// the same seed gives the same images on every machine, but not the images torch's generator would give.
// PNG output: a grid of the samples, values in [-1, 1] mapped to 0..255 (1 or 3 channels); .npy: raw float32.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../include/lowbit.h"

namespace {

struct Options {
  std::string model, input, output, kernel_path = "auto";
  int64_t count = 16;
  uint64_t seed = 0;
  int threads = 1;
};

[[noreturn]] void fail(const char* message) {
  std::fprintf(stderr, "error: %s\n", message);
  std::exit(2);
}

[[noreturn]] void fail(const std::string& message) { fail(message.c_str()); }

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

int64_t parse_int(const char* text, const char* flag, int64_t low, int64_t high) {
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  if (!*text || *end || value < low || value > high) {
    fail(std::string(flag) + " wants an integer from " + std::to_string(low) + " to " + std::to_string(high));
  }
  return value;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) fail(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-n") o.count = parse_int(value(), "-n", 1, 1 << 20);
    else if (arg == "--seed") o.seed = static_cast<uint64_t>(parse_int(value(), "--seed", 0, INT64_MAX));
    else if (arg == "--threads") o.threads = static_cast<int>(parse_int(value(), "--threads", 1, 1024));
    else if (arg == "--input") o.input = value();
    else if (arg == "--kernel-path") o.kernel_path = value();
    else if (arg == "-o") o.output = value();
    else if (arg == "-h" || arg == "--help") {
      std::puts("usage: lowbit-run FILE [-n 16] [--seed 0] [--input IN.npy] [--threads 1] "
                "[--kernel-path auto|avx512|avx2|neon|scalar|float] -o OUT.png|OUT.npy");
      std::exit(0);
    } else if (!arg.empty() && arg[0] == '-') fail("unknown option " + arg);
    else if (o.model.empty()) o.model = arg;
    else fail("more than one model file given");
  }
  if (o.model.empty() || o.output.empty()) fail("usage: lowbit-run FILE [-n 16] [--seed 0] [--input IN.npy] -o OUT.png|OUT.npy");
  if (!ends_with(o.output, ".png") && !ends_with(o.output, ".npy")) fail("-o must name a .png or .npy file");
  return o;
}

// ----- sampling -----

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::vector<float> normal_samples(size_t count, uint64_t seed) {
  std::vector<float> values(count);
  uint64_t state = seed;
  for (size_t k = 0; k < count; k += 2) {
    const double u1 = (static_cast<double>(splitmix64(state) >> 11) + 1.0) / 9007199254740993.0;  // (0, 1]
    const double u2 = static_cast<double>(splitmix64(state) >> 11) / 9007199254740992.0;
    const double radius = std::sqrt(-2.0 * std::log(u1)), angle = 6.283185307179586 * u2;
    values[k] = static_cast<float>(radius * std::cos(angle));
    if (k + 1 < count) values[k + 1] = static_cast<float>(radius * std::sin(angle));
  }
  return values;
}

// ----- .npy -----

std::vector<float> read_npy(const std::string& path, std::vector<int64_t>& shape) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (!file) fail("cannot open " + path);
  std::vector<char> bytes;
  char chunk[1 << 16];
  size_t got = 0;
  while ((got = std::fread(chunk, 1, sizeof chunk, file)) > 0) bytes.insert(bytes.end(), chunk, chunk + got);
  std::fclose(file);
  if (bytes.size() < 10 || std::memcmp(bytes.data(), "\x93NUMPY", 6) != 0) fail(path + " is not a .npy file");
  const int major = static_cast<unsigned char>(bytes[6]);
  const size_t prefix = major == 1 ? 10 : 12;
  if (bytes.size() < prefix) fail(path + " is truncated");
  size_t header_len = static_cast<unsigned char>(bytes[8]) | static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8;
  if (major != 1) header_len |= static_cast<size_t>(static_cast<unsigned char>(bytes[10])) << 16 |
                                static_cast<size_t>(static_cast<unsigned char>(bytes[11])) << 24;
  if (header_len > bytes.size() - prefix) fail(path + " is truncated");
  const std::string header(bytes.data() + prefix, header_len);
  if (header.find("'descr': '<f4'") == std::string::npos || header.find("'fortran_order': False") == std::string::npos) {
    fail(path + " must hold little-endian float32 in C order (numpy: a.astype('float32'))");
  }
  const size_t open = header.find('(', header.find("'shape'")), close = header.find(')', open);
  if (open == std::string::npos || close == std::string::npos) fail(path + " has no shape");
  int64_t count = 1;
  for (size_t pos = open + 1; pos < close;) {
    char* end = nullptr;
    const long long size = std::strtoll(header.c_str() + pos, &end, 10);
    if (end == header.c_str() + pos) break;
    if (size < 1 || size > (int64_t{1} << 31) / count) fail(path + " has a bad shape");
    shape.push_back(size), count *= size;
    pos = static_cast<size_t>(end - header.c_str()) + 1;
  }
  if (shape.empty() || bytes.size() - prefix - header_len != static_cast<size_t>(count) * 4) fail(path + " does not hold its shape's data");
  std::vector<float> values(static_cast<size_t>(count));
  std::memcpy(values.data(), bytes.data() + prefix + header_len, values.size() * 4);
  return values;
}

void write_file(const std::string& path, const std::string& bytes) {
  std::FILE* file = std::fopen(path.c_str(), "wb");
  if (!file || std::fwrite(bytes.data(), 1, bytes.size(), file) != bytes.size() || std::fclose(file) != 0) {
    fail("cannot write " + path);
  }
}

void write_npy(const std::string& path, const std::vector<float>& values, const std::vector<int64_t>& shape) {
  std::string dims;
  for (const int64_t s : shape) dims += std::to_string(s) + ", ";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ');  // data starts 64-byte aligned
  header += '\n';
  std::string bytes("\x93NUMPY\x01\x00", 8);
  bytes += static_cast<char>(header.size() & 0xFF);
  bytes += static_cast<char>(header.size() >> 8);
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(values.data()), values.size() * 4);
  write_file(path, bytes);
}

// ----- PNG: zlib with stored (uncompressed) deflate blocks, so no compression library is needed -----

uint32_t crc32(const std::string& bytes, size_t begin) {
  static uint32_t table[256];
  if (!table[1]) {
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      table[n] = c;
    }
  }
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t k = begin; k < bytes.size(); ++k) crc = table[(crc ^ static_cast<unsigned char>(bytes[k])) & 0xFF] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

void put32(std::string& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out += static_cast<char>((v >> shift) & 0xFF);
}

void chunk(std::string& png, const char* type, const std::string& data) {
  put32(png, static_cast<uint32_t>(data.size()));
  const size_t start = png.size();
  png += type;
  png += data;
  put32(png, crc32(png, start));
}

std::string zlib_stored(const std::string& raw) {
  std::string out("\x78\x01", 2);
  size_t pos = 0;
  do {
    const size_t len = std::min<size_t>(65535, raw.size() - pos);
    out += static_cast<char>(pos + len == raw.size() ? 1 : 0);  // BFINAL on the last block, BTYPE 00 (stored)
    out += static_cast<char>(len & 0xFF), out += static_cast<char>(len >> 8);
    out += static_cast<char>(~len & 0xFF), out += static_cast<char>((~len >> 8) & 0xFF);
    out.append(raw, pos, len);
    pos += len;
  } while (pos < raw.size());
  uint32_t a = 1, b = 0;  // Adler-32
  for (const char c : raw) a = (a + static_cast<unsigned char>(c)) % 65521, b = (b + a) % 65521;
  put32(out, b << 16 | a);
  return out;
}

// The samples (N, C, H, W), C = 1 or 3, as a grid of ceil(sqrt(N)) columns with a 2-pixel border.
void write_png(const std::string& path, const std::vector<float>& values, const std::vector<int64_t>& shape) {
  if (shape.size() != 4 || (shape[1] != 1 && shape[1] != 3)) fail("PNG output needs images of 1 or 3 channels; use .npy");
  const int64_t n = shape[0], c = shape[1], h = shape[2], w = shape[3], pad = 2;
  const int64_t cols = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(n)))), rows = (n + cols - 1) / cols;
  const int64_t width = cols * (w + pad) + pad, height = rows * (h + pad) + pad;
  std::string raw;
  for (int64_t y = 0; y < height; ++y) {
    raw += '\0';  // filter type None
    for (int64_t x = 0; x < width; ++x) {
      const int64_t gy = (y - pad) / (h + pad), gx = (x - pad) / (w + pad), iy = (y - pad) % (h + pad), ix = (x - pad) % (w + pad);
      const int64_t i = gy * cols + gx;
      const bool inside = y >= pad && x >= pad && iy < h && ix < w && i < n;
      for (int64_t ch = 0; ch < c; ++ch) {
        const float v = inside ? values[static_cast<size_t>(((i * c + ch) * h + iy) * w + ix)] : -1.0f;
        raw += static_cast<char>(static_cast<int>(std::lround(std::min(std::max((v + 1.0f) * 127.5f, 0.0f), 255.0f))));
      }
    }
  }
  std::string png("\x89PNG\r\n\x1a\n", 8), header;
  put32(header, static_cast<uint32_t>(width));
  put32(header, static_cast<uint32_t>(height));
  header += std::string{8, static_cast<char>(c == 3 ? 2 : 0), 0, 0, 0};  // 8 bit, RGB or grey
  chunk(png, "IHDR", header);
  chunk(png, "IDAT", zlib_stored(raw));
  chunk(png, "IEND", "");
  write_file(path, png);
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  lowbit_model* model = nullptr;
  if (lowbit_load_file(o.model.c_str(), &model) != LOWBIT_OK) fail(lowbit_last_error());
  if (lowbit_set_kernel_path(model, o.kernel_path.c_str()) != LOWBIT_OK ||
      lowbit_set_threads(model, o.threads) != LOWBIT_OK) {
    fail(lowbit_last_error());
  }
  int64_t in_dims[8], out_dims[8];
  int in_rank = 0, out_rank = 0;
  lowbit_input_shape(model, in_dims, 8, &in_rank);
  lowbit_output_shape(model, out_dims, 8, &out_rank);
  int64_t per_sample = 1;
  for (int k = 0; k < in_rank; ++k) per_sample *= in_dims[k];
  std::vector<float> input;
  int64_t batch = o.count;
  if (!o.input.empty()) {
    std::vector<int64_t> shape;
    input = read_npy(o.input, shape);
    batch = shape[0];
    if (static_cast<int64_t>(input.size()) != batch * per_sample) fail(o.input + " does not hold N samples of the model's input");
  } else {
    input = normal_samples(static_cast<size_t>(batch * per_sample), o.seed);
  }
  std::vector<int64_t> shape{batch};
  int64_t out_per_sample = 1;
  for (int k = 0; k < out_rank; ++k) shape.push_back(out_dims[k]), out_per_sample *= out_dims[k];
  std::vector<float> output(static_cast<size_t>(batch * out_per_sample));
  if (lowbit_run(model, input.data(), batch, output.data()) != LOWBIT_OK) fail(lowbit_last_error());
  // No lowbit_free: the process ends here and gives the model's memory back at once (freeing it buffer by
  // buffer costs ~2 ms of start-up on a 1 MB file).
  if (ends_with(o.output, ".npy")) write_npy(o.output, output, shape);
  else write_png(o.output, output, shape);
  return 0;
}
