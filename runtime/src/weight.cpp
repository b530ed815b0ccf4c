// A packed weight's codes and values (graph.h Weight): the hot loops of start-up, built at -O3 while the file
// checks around them (load.cpp) are built for size.
#include <algorithm>
#include <array>
#include <cstring>

#include "graph.h"

namespace lowbit {
namespace {

// Codes [first, first + count) of `Width` bits (1, 2, 4 or 8), lowest bits first, from `packed` into `out`: a
// whole byte's codes at a time from a table of every byte's codes (little-endian hosts), one at a time at the
// unaligned ends.
template <int Width>
void unpack_width(const uint8_t* packed, int64_t first, int64_t count, uint8_t* out) {
  constexpr int kPerByte = 8 / Width;
  constexpr unsigned kMask = (1u << Width) - 1;
  static const std::array<uint64_t, 256> table = [] {
    std::array<uint64_t, 256> codes_of{};
    for (unsigned byte = 0; byte < 256; ++byte) {
      for (int k = 0; k < kPerByte; ++k) codes_of[byte] |= uint64_t{(byte >> (k * Width)) & kMask} << (8 * k);
    }
    return codes_of;
  }();
  auto one = [&](int64_t i) { return static_cast<uint8_t>((packed[i / kPerByte] >> (i % kPerByte * Width)) & kMask); };
  int64_t i = first;
  const int64_t end = first + count;
  for (; i < end && i % kPerByte != 0; ++i) *out++ = one(i);
  for (; i + kPerByte <= end; i += kPerByte, out += kPerByte) std::memcpy(out, &table[packed[i / kPerByte]], kPerByte);
  for (; i < end; ++i) *out++ = one(i);
}

}  // namespace

void unpack_codes(const uint8_t* packed, int width, int64_t first, int64_t count, uint8_t* out) {
  switch (width) {
    case 1: return unpack_width<1>(packed, first, count, out);
    case 2: return unpack_width<2>(packed, first, count, out);
    case 4: return unpack_width<4>(packed, first, count, out);
    default: std::copy_n(packed + first, count, out);
  }
}

void Weight::decode(int64_t first, int64_t count, float* out) const {
  if (!packed) {
    std::copy_n(values.data() + first, count, out);
    return;
  }
  const int64_t rows = shape[static_cast<size_t>(channel_dim)];
  int64_t row = (first / inner) % rows, left = inner - first % inner;  // runs of `inner` values share a row
  const float* book = codebook.data() + row * levels;
  uint8_t chunk[1024];
  for (int64_t done = 0; done < count; done += static_cast<int64_t>(sizeof chunk)) {
    const int64_t n = std::min<int64_t>(sizeof chunk, count - done);
    unpack(first + done, n, chunk);
    for (int64_t k = 0; k < n;) {  // a run of values on one codebook row at a time
      if (left == 0) {
        row = row + 1 == rows ? 0 : row + 1, left = inner;
        book = codebook.data() + row * levels;
      }
      const int64_t run = std::min(left, n - k);
      float* values_out = out + done + k;
      for (int64_t j = 0; j < run; ++j) values_out[j] = book[chunk[k + j]];
      if (sparse) {  // pruned: 0, as the simulated layer
        const uint8_t* kept = keep.data() + first + done + k;
        for (int64_t j = 0; j < run; ++j) values_out[j] = kept[j] ? values_out[j] : 0.0f;
      }
      k += run, left -= run;
    }
  }
}

void Weight::unpack(int64_t first, int64_t count, uint8_t* out) const {
  unpack_codes(codes.data(), code_bits, first, count, out);
}

const uint8_t* unpacked_codes(const Weight& w) {
  thread_local std::vector<uint8_t> all;
  all.resize(static_cast<size_t>(numel(w.shape)));
  w.unpack(0, numel(w.shape), all.data());
  return all.data();
}

}  // namespace lowbit
