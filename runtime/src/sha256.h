// SHA-256 (FIPS 180-4), for the packed file's checksum: on the x86 SHA extensions where the CPU has them
// (checked at run time), else portable code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace lowbit {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  void update(const std::string& text) { update(text.data(), text.size()); }
  std::string hex_digest();  // finishes the hash: call once

 private:
  uint32_t state_[8];
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t total_ = 0;
};

}  // namespace lowbit
