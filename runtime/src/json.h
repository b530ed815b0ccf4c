// A small JSON reader for the safetensors header and the IR: values, bounded nesting, strict syntax.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lowbit {

struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Null;
  bool boolean = false;
  double number = 0.0;
  std::string text;
  std::vector<Json> items;                            // Array
  std::vector<std::pair<std::string, Json>> fields;  // Object, in file order

  // The field `key` of an object, or nullptr (also when this is not an object).
  const Json* get(const std::string& key) const;
  bool is_int() const;  // a number without a fractional part that fits int64
};

// Nesting deeper than this is refused (the IR needs a handful of levels; deep input must not exhaust the stack).
constexpr int kMaxJsonDepth = 32;

// Parses data[0, size) as one JSON value; on failure returns false and sets `error`.
bool parse_json(const char* data, size_t size, Json& out, std::string& error);

}  // namespace lowbit
