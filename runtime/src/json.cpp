// Recursive-descent JSON parser: every read is bounds-checked against the end of the buffer.
#include "json.h"

#include <cmath>
#include <cstdlib>

namespace lowbit {

const Json* Json::get(const std::string& key) const {
  if (kind != Object) return nullptr;
  for (const auto& field : fields) {
    if (field.first == key) return &field.second;
  }
  return nullptr;
}

bool Json::is_int() const {
  return kind == Number && std::floor(number) == number && std::fabs(number) < 9.0e15;
}

namespace {

class Parser {
 public:
  Parser(const char* data, size_t size) : p_(data), end_(data + size) {}

  bool document(Json& out, std::string& error) {
    const bool ok = value(out, 0) && (skip_space(), p_ == end_);
    if (!ok) error = error_.empty() ? "trailing characters" : error_;
    return ok;
  }

 private:
  const char* p_;
  const char* end_;
  std::string error_;

  bool fail(const char* what) {
    if (error_.empty()) error_ = what;
    return false;
  }

  void skip_space() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }

  bool literal(const char* word) {
    for (; *word; ++word, ++p_) {
      if (p_ == end_ || *p_ != *word) return fail("bad literal");
    }
    return true;
  }

  bool value(Json& out, int depth) {
    if (depth > kMaxJsonDepth) return fail("nesting too deep");
    skip_space();
    if (p_ == end_) return fail("unexpected end");
    switch (*p_) {
      case '{': return object(out, depth);
      case '[': return array(out, depth);
      case '"': out.kind = Json::String; return string(out.text);
      case 't': out.kind = Json::Bool, out.boolean = true; return literal("true");
      case 'f': out.kind = Json::Bool, out.boolean = false; return literal("false");
      case 'n': out.kind = Json::Null; return literal("null");
      default: return number(out);
    }
  }

  bool object(Json& out, int depth) {
    out.kind = Json::Object;
    ++p_;
    skip_space();
    if (p_ < end_ && *p_ == '}') return ++p_, true;
    for (;;) {
      skip_space();
      std::pair<std::string, Json> field;
      if (p_ == end_ || *p_ != '"' || !string(field.first)) return fail("bad object key");
      skip_space();
      if (p_ == end_ || *p_++ != ':') return fail("expected ':'");
      if (!value(field.second, depth + 1)) return false;
      out.fields.push_back(std::move(field));
      skip_space();
      if (p_ == end_) return fail("unexpected end");
      if (*p_ == ',') { ++p_; continue; }
      if (*p_ == '}') return ++p_, true;
      return fail("expected ',' or '}'");
    }
  }

  bool array(Json& out, int depth) {
    out.kind = Json::Array;
    ++p_;
    skip_space();
    if (p_ < end_ && *p_ == ']') return ++p_, true;
    for (;;) {
      Json item;
      if (!value(item, depth + 1)) return false;
      out.items.push_back(std::move(item));
      skip_space();
      if (p_ == end_) return fail("unexpected end");
      if (*p_ == ',') { ++p_; continue; }
      if (*p_ == ']') return ++p_, true;
      return fail("expected ',' or ']'");
    }
  }

  bool hex4(uint32_t& code) {
    if (end_ - p_ < 4) return fail("bad \\u escape");
    code = 0;
    for (int k = 0; k < 4; ++k, ++p_) {
      const char c = *p_;
      const int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                        : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
      if (digit < 0) return fail("bad \\u escape");
      code = code * 16 + static_cast<uint32_t>(digit);
    }
    return true;
  }

  static void utf8(uint32_t code, std::string& out) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  // \uXXXX, joining a UTF-16 surrogate pair into one code point.
  bool unicode_escape(std::string& out) {
    uint32_t code = 0;
    if (!hex4(code)) return false;
    if (code >= 0xD800 && code < 0xDC00) {
      uint32_t low = 0;
      if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') return fail("lone surrogate");
      p_ += 2;
      if (!hex4(low) || low < 0xDC00 || low >= 0xE000) return fail("lone surrogate");
      code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
    } else if (code >= 0xDC00 && code < 0xE000) {
      return fail("lone surrogate");
    }
    utf8(code, out);
    return true;
  }

  bool string(std::string& out) {
    ++p_;  // the opening quote
    while (p_ < end_) {
      const char c = *p_++;
      if (c == '"') return true;
      if (static_cast<unsigned char>(c) < 0x20) return fail("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (p_ == end_) break;
      const char e = *p_++;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': if (!unicode_escape(out)) return false; break;
        default: return fail("bad escape");
      }
    }
    return fail("unterminated string");
  }

  bool number(Json& out) {
    const char* start = p_;
    if (p_ < end_ && *p_ == '-') ++p_;
    const char* digits = p_;
    while (p_ < end_ && ((*p_ >= '0' && *p_ <= '9') || *p_ == '.' || *p_ == 'e' || *p_ == 'E' || *p_ == '+' ||
                         *p_ == '-')) {
      ++p_;
    }
    if (p_ == digits || p_ - start > 64) return fail("bad number");
    const std::string text(start, p_);
    char* stop = nullptr;
    out.kind = Json::Number;
    out.number = std::strtod(text.c_str(), &stop);
    if (stop != text.c_str() + text.size() || !std::isfinite(out.number)) return fail("bad number");
    return true;
  }
};

}  // namespace

bool parse_json(const char* data, size_t size, Json& out, std::string& error) {
  out = Json();
  return Parser(data, size).document(out, error);
}

}  // namespace lowbit
