// Reading a packed file without trusting it (docs/export.md "File checks"): the safetensors header against
// the buffer size, every tensor's byte range, the SHA-256 checksum, the metadata, then every IR node (op,
// inputs, attributes, tensor dtypes and shapes, finite values), and every node's output shape.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>

#include "graph.h"
#include "sha256.h"

namespace lowbit {

Error damaged(const std::string& what) {
  return Error(LOWBIT_ERROR_FORMAT, "not a valid lowbit packed model (" + what +
                                        "); the file is truncated, damaged or not a lowbit export: re-export it");
}

Error bad_node(const std::string& node, const std::string& what) {
  return Error(LOWBIT_ERROR_FORMAT,
               "node '" + node + "': " + what + "; the file is damaged or written by another tool, re-export it");
}

int64_t numel(const Shape& shape) {
  int64_t n = 1;
  for (const int64_t size : shape) n *= size;
  return n;
}

std::string shape_text(const Shape& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

namespace {

// Throw damaged() / bad_node() / an Error: one call per check instead of an inline throw sequence (70 checks, cold).
[[noreturn, gnu::cold]] void fail_damaged(const std::string& what) { throw damaged(what); }
[[noreturn, gnu::cold]] void fail_damaged(const char* what) { throw damaged(what); }
[[noreturn, gnu::cold]] void fail_with(int code, const std::string& what) { throw Error(code, what); }
[[noreturn, gnu::cold]] void fail_node(const std::string& node, const std::string& what) { throw bad_node(node, what); }
[[noreturn, gnu::cold]] void fail_node(const std::string& node, const char* what) { throw bad_node(node, what); }

constexpr uint64_t kMaxHeaderBytes = uint64_t{64} << 20;
constexpr int64_t kMaxSampleValues = int64_t{1} << 26;  // as lowbit.export.validate
constexpr size_t kMaxNodes = 100000;

// ----- safetensors -----

struct DtypeInfo {
  const char* name;
  const char* torch_name;  // as the checksum spells it
  size_t size;
};

const DtypeInfo kDtypes[] = {{"F32", "torch.float32", 4}, {"U8", "torch.uint8", 1},   {"F64", "torch.float64", 8},
                             {"F16", "torch.float16", 2}, {"BF16", "torch.bfloat16", 2}, {"I64", "torch.int64", 8},
                             {"I32", "torch.int32", 4},   {"I16", "torch.int16", 2},  {"I8", "torch.int8", 1},
                             {"BOOL", "torch.bool", 1}};

const DtypeInfo* dtype_info(const std::string& name) {
  for (const DtypeInfo& info : kDtypes) {
    if (name == info.name) return &info;
  }
  return nullptr;
}

bool json_size(const Json& value, int64_t limit, int64_t& out) {
  if (!value.is_int() || value.number < 0 || value.number > static_cast<double>(limit)) return false;
  out = static_cast<int64_t>(value.number);
  return true;
}

Stored stored_tensor(const std::string& name, const Json& entry, const uint8_t* data, uint64_t data_bytes) {
  const Json* dtype = entry.get("dtype");
  const Json* shape = entry.get("shape");
  const Json* offsets = entry.get("data_offsets");
  const DtypeInfo* info = dtype && dtype->kind == Json::String ? dtype_info(dtype->text) : nullptr;
  if (!info || !shape || shape->kind != Json::Array || shape->items.size() > kMaxRank || !offsets ||
      offsets->kind != Json::Array || offsets->items.size() != 2) {
    fail_damaged("tensor '" + name + "' has a malformed header entry");
  }
  int64_t begin = 0, end = 0;
  if (!json_size(offsets->items[0], static_cast<int64_t>(data_bytes), begin) ||
      !json_size(offsets->items[1], static_cast<int64_t>(data_bytes), end) || begin > end) {
    fail_damaged("tensor '" + name + "' lies outside the file");
  }
  Stored t;
  t.dtype = info->name;
  int64_t count = 1;
  for (const Json& size : shape->items) {
    int64_t s = 0;
    if (!json_size(size, int64_t{1} << 40, s)) fail_damaged("tensor '" + name + "' has a bad shape");
    t.shape.push_back(s);
    count = s == 0 ? 0 : count;
    if (s != 0 && count > (int64_t{1} << 40) / s) fail_damaged("tensor '" + name + "' is too large");
    count *= s;
  }
  if (static_cast<uint64_t>(count) * info->size != static_cast<uint64_t>(end - begin)) {
    fail_damaged("tensor '" + name + "' holds " + std::to_string(end - begin) + " bytes, its shape needs " +
                 std::to_string(count * static_cast<int64_t>(info->size)));
  }
  t.data = data + begin;
  t.bytes = static_cast<size_t>(end - begin);
  return t;
}

struct File {
  std::map<std::string, Stored> tensors;
  std::map<std::string, std::string> metadata;
};

File read_safetensors(const uint8_t* bytes, size_t size) {
  if (size < 8) fail_damaged("only " + std::to_string(size) + " bytes");
  uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = length << 8 | bytes[i];
  if (length > std::min<uint64_t>(kMaxHeaderBytes, size - 8)) {
    fail_damaged("header claims " + std::to_string(length) + " bytes but the file has " + std::to_string(size));
  }
  Json header;
  std::string error;
  if (!parse_json(reinterpret_cast<const char*>(bytes) + 8, length, header, error)) {
    fail_damaged("unreadable header: " + error);
  }
  if (header.kind != Json::Object) fail_damaged("header is not a JSON object");
  const uint8_t* data = bytes + 8 + length;
  const uint64_t data_bytes = size - 8 - length;
  File file;
  for (const auto& field : header.fields) {
    if (field.first == "__metadata__") {
      if (field.second.kind != Json::Object) fail_damaged("metadata is not an object");
      for (const auto& item : field.second.fields) {
        if (item.second.kind != Json::String) fail_damaged("metadata value '" + item.first + "' is not a string");
        file.metadata[item.first] = item.second.text;
      }
      continue;
    }
    if (file.tensors.count(field.first)) fail_damaged("tensor '" + field.first + "' appears twice");
    file.tensors[field.first] = stored_tensor(field.first, field.second, data, data_bytes);
  }
  return file;
}

// SHA-256 over every tensor (name|torch dtype|shape| + bytes, in name order) and the architecture JSON.
std::string checksum(const File& file, const std::string& architecture) {
  Sha256 hash;
  for (const auto& item : file.tensors) {
    hash.update(item.first + "|" + dtype_info(item.second.dtype)->torch_name + "|" + shape_text(item.second.shape) + "|");
    hash.update(item.second.data, item.second.bytes);
  }
  hash.update(architecture);
  return hash.hex_digest();
}

const std::string& metadata_field(const File& file, const std::string& key) {
  const auto it = file.metadata.find(key);
  if (it == file.metadata.end()) {
    fail_with(LOWBIT_ERROR_FORMAT, "not a lowbit packed model (no '" + key +
                                       "' metadata); create one with `lowbit export`");
  }
  return it->second;
}

void check_metadata(const File& file) {
  if (metadata_field(file, "lowbit.format") != "lowbit-packed") {
    fail_with(LOWBIT_ERROR_FORMAT, "not a lowbit packed model (format is not 'lowbit-packed')");
  }
  const std::string& version = metadata_field(file, "lowbit.format_version");
  if (version == "1") {
    fail_with(LOWBIT_ERROR_UNSUPPORTED, "packed format version 1 is read by the Python runtime only; "
                                        "re-export the model with a current lowbit (version 2)");
  }
  if (version != "2") {
    fail_with(LOWBIT_ERROR_UNSUPPORTED, "packed format version '" + version +
                                            "' is not readable by this runtime (version 2); use a newer one");
  }
  if (checksum(file, metadata_field(file, "lowbit.architecture")) != metadata_field(file, "lowbit.checksum")) {
    fail_with(LOWBIT_ERROR_CHECKSUM, "the file does not match its checksum: it was modified or damaged after "
                                     "export; re-export it from the checkpoint");
  }
}

// ----- attributes -----

class NodeReader {
 public:
  NodeReader(const Json& attrs, const std::string& name) : attrs_(attrs), name_(name) {}

  const Json& field(const char* key) const {
    const Json* value = attrs_.get(key);
    if (!value) fail_node(name_, std::string("attribute '") + key + "' is missing");
    return *value;
  }
  bool has(const char* key) const {
    const Json* value = attrs_.get(key);
    return value && value->kind != Json::Null;
  }
  int64_t integer(const char* key, int64_t low, int64_t high) const { return integer_of(field(key), key, low, high); }
  int64_t integer_of(const Json& value, const char* key, int64_t low, int64_t high) const {
    if (!value.is_int() || value.number < static_cast<double>(low) || value.number > static_cast<double>(high)) {
      fail_node(name_, std::string("attribute '") + key + "' must be an integer in [" + std::to_string(low) +
                           ", " + std::to_string(high) + "]");
    }
    return static_cast<int64_t>(value.number);
  }
  std::vector<int64_t> integers(const char* key, int64_t low, int64_t high, size_t min_n, size_t max_n) const {
    const Json& value = field(key);
    if (value.kind != Json::Array || value.items.size() < min_n || value.items.size() > max_n) {
      fail_node(name_, std::string("attribute '") + key + "' must be a list of " + std::to_string(min_n) +
                           ".." + std::to_string(max_n) + " integers");
    }
    std::vector<int64_t> out;
    for (const Json& item : value.items) out.push_back(integer_of(item, key, low, high));
    return out;
  }
  void pair(const char* key, int64_t low, int64_t high, int64_t* out) const {
    const std::vector<int64_t> values = integers(key, low, high, 2, 2);
    out[0] = values[0], out[1] = values[1];
  }
  double number(const char* key) const {
    const Json& value = field(key);
    if (value.kind != Json::Number) fail_node(name_, std::string("attribute '") + key + "' must be a number");
    return value.number;
  }
  bool boolean(const char* key) const {
    const Json& value = field(key);
    if (value.kind != Json::Bool) fail_node(name_, std::string("attribute '") + key + "' must be true/false");
    return value.boolean;
  }
  std::string text(const char* key) const {
    const Json& value = field(key);
    if (value.kind != Json::String) fail_node(name_, std::string("attribute '") + key + "' must be a string");
    return value.text;
  }

 private:
  const Json& attrs_;
  const std::string& name_;
};

constexpr int64_t kMaxGeometry = 4096;  // kernel sizes, strides, paddings, dilations, factors
constexpr int64_t kMaxChannels = int64_t{1} << 24;

void read_conv_attrs(const NodeReader& r, Node& node) {
  Attrs& a = node.attrs;
  if (node.op == "linear") {
    a.in_channels = r.integer("in_features", 1, kMaxSampleValues);
    a.out_channels = r.integer("out_features", 1, kMaxSampleValues);
    return;
  }
  r.pair("stride", 1, kMaxGeometry, a.stride);
  r.pair("dilation", 1, kMaxGeometry, a.dilation);
  r.pair("kernel_size", 1, kMaxGeometry, a.kernel);
  r.pair("padding", 0, kMaxGeometry - 1, a.padding);
  a.groups = r.integer("groups", 1, kMaxChannels);
  a.in_channels = r.integer("in_channels", 1, kMaxChannels);
  a.out_channels = r.integer("out_channels", 1, kMaxChannels);
  if (a.in_channels % a.groups || a.out_channels % a.groups) fail_node(node.name, "channels not divisible by groups");
  if (node.op == "conv_transpose2d") {
    r.pair("output_padding", 0, kMaxGeometry, a.output_padding);
  } else if (r.has("pad")) {
    a.pad = r.integers("pad", 0, kMaxGeometry, 4, 4);
    a.pad_mode = r.text("pad_mode");
    if (a.pad_mode != "constant" && a.pad_mode != "reflect" && a.pad_mode != "replicate") {
      fail_node(node.name, "pad_mode must be constant, reflect or replicate");
    }
  }
}

void read_resize(const NodeReader& r, Node& node) {
  Resize& z = node.attrs.resize;
  const std::string mode = r.text("mode");
  if (mode != "nearest" && mode != "bilinear") fail_node(node.name, "interpolation mode must be nearest or bilinear");
  z.nearest = mode == "nearest";
  z.align_corners = r.has("align_corners") && r.boolean("align_corners");
  if (r.has("size")) {
    const Json& size = r.field("size");
    if (size.kind == Json::Array) {
      r.pair("size", 1, kMaxSampleValues, z.size);
    } else {
      z.size[0] = z.size[1] = r.integer("size", 1, kMaxSampleValues);
    }
    return;
  }
  if (!r.has("scale_factor")) fail_node(node.name, "interpolate needs size or scale_factor");
  const Json& scale = r.field("scale_factor");
  const bool pair = scale.kind == Json::Array;
  if ((pair && scale.items.size() != 2) || (!pair && scale.kind != Json::Number)) {
    fail_node(node.name, "scale_factor must be a number or two");
  }
  for (int k = 0; k < 2; ++k) {
    const Json& value = pair ? scale.items[static_cast<size_t>(k)] : scale;
    if (value.kind != Json::Number || !(value.number > 0.0) || value.number > kMaxGeometry) {
      fail_node(node.name, "scale_factor must be positive");
    }
    z.scale[k] = value.number;
  }
  // recompute_scale_factor: source indices from the sizes (in / out) instead of 1 / scale_factor.
  if (r.has("recompute_scale_factor") && r.boolean("recompute_scale_factor")) z.size[0] = -1;
}

void read_attrs(const NodeReader& r, Node& node) {
  Attrs& a = node.attrs;
  const std::string& op = node.op;
  if (op == "conv2d" || op == "conv_transpose2d" || op == "linear") {
    read_conv_attrs(r, node);
  } else if (op == "batch_norm" || op == "layer_norm" || op == "group_norm" || op == "instance_norm") {
    a.eps = r.number("eps");
    if (!(a.eps >= 0.0)) fail_node(node.name, "eps must be >= 0");
    if (op == "layer_norm") a.shape = r.integers("shape", 1, kMaxSampleValues, 1, kMaxRank);
    if (op == "group_norm") a.norm_groups = r.integer("groups", 1, kMaxChannels);
    if (op == "instance_norm") a.running_stats = r.boolean("running_stats");
  } else if (op == "leaky_relu") {
    a.slope = r.number("negative_slope");
  } else if (op == "elu") {
    a.alpha = r.number("alpha");
  } else if (op == "gelu") {
    const std::string mode = r.text("approximate");
    if (mode != "none" && mode != "tanh") fail_node(node.name, "gelu approximate must be none or tanh");
    a.gelu_tanh = mode == "tanh";
  } else if (op == "hardtanh") {
    a.min_val = r.number("min_val"), a.max_val = r.number("max_val");
  } else if (op == "pad") {
    a.pad = r.integers("pad", 0, kMaxGeometry, 2, 2 * (kMaxRank - 1));
    if (a.pad.size() % 2) fail_node(node.name, "pad needs an even number of sizes");
    a.pad_mode = r.text("mode");
    if (a.pad_mode != "constant" && a.pad_mode != "reflect" && a.pad_mode != "replicate") {
      fail_node(node.name, "pad mode must be constant, reflect or replicate");
    }
    a.pad_value = r.has("value") ? r.number("value") : 0.0;
  } else if (op == "interpolate") {
    read_resize(r, node);
  } else if (op == "pixel_shuffle") {
    a.factor = r.integer("factor", 1, kMaxGeometry);
  } else if (op == "reshape") {
    // [] is a per-sample scalar (a discriminator's N outputs); [-1] flattens every value of a sample.
    const std::vector<int64_t> shape = r.integers("shape", -1, kMaxSampleValues, 0, kMaxRank - 1);
    if (shape != std::vector<int64_t>{-1}) {
      for (const int64_t s : shape) if (s < 1) fail_node(node.name, "reshape sizes must be positive");
    }
    a.shape = shape;
  } else if (op == "permute" || op == "mean") {
    a.dims = r.integers("dims", 0, kMaxRank - 1, 1, kMaxRank);
    if (op == "mean") a.keepdim = r.boolean("keepdim");
  } else if (op == "cat") {
    a.dim = r.integer("dim", 1, kMaxRank - 1);
  } else if (op == "add" || op == "sub" || op == "mul" || op == "div") {
    a.has_scalar = r.has("scalar");
    if (a.has_scalar) a.scalar = r.number("scalar"), a.scalar_first = r.boolean("scalar_first");
  }
}

// ----- tensors -----

// The float32 tensor `field` of a node, checked for dtype, shape (when given) and finite values.
Tensor float_tensor(const Node& node, const std::map<std::string, Stored>& own, const std::string& field,
                    const Shape* expected = nullptr) {
  const auto it = own.find(field);
  if (it == own.end()) fail_node(node.name, "tensor '" + field + "' is missing");
  const Stored& s = it->second;
  if (s.dtype != "F32") fail_node(node.name, "tensor '" + field + "' is " + s.dtype + ", expected F32");
  if (expected && s.shape != *expected) {
    fail_node(node.name, "tensor '" + field + "' has shape " + shape_text(s.shape) + ", expected " +
                             shape_text(*expected));
  }
  Tensor t;
  t.shape = s.shape;
  t.data.resize(s.bytes / 4);
  if (s.bytes) std::memcpy(t.data.data(), s.data, s.bytes);  // little-endian hosts (x86-64, ARM64)
  for (const float v : t.data) {
    if (!std::isfinite(v)) fail_node(node.name, "tensor '" + field + "' holds non-finite values");
  }
  return t;
}

Shape weight_shape(const Node& node) {
  const Attrs& a = node.attrs;
  if (node.op == "linear") return {a.out_channels, a.in_channels};
  if (node.op == "conv2d") return {a.out_channels, a.in_channels / a.groups, a.kernel[0], a.kernel[1]};
  return {a.in_channels, a.out_channels / a.groups, a.kernel[0], a.kernel[1]};
}

// k-bit codes stored at 1, 2, 4 or 8 bits a value, the first value in the lowest bits of a byte.
int storage_bits(int64_t bits) { return bits <= 1 ? 1 : bits <= 2 ? 2 : bits <= 4 ? 4 : 8; }

// The packed tensor `field` (codes, or a sparse weight's 1-bit mask): U8 holding `count` codes of `width` bits,
// each below `levels` (checked a chunk at a time, unless every code of that width is a level).
void check_packed(const Node& node, const Stored& packed, const char* field, int width, int64_t count, int64_t levels) {
  const int64_t needed = (count * width + 7) / 8;
  if (packed.dtype != "U8" || packed.shape != Shape{needed}) {
    fail_node(node.name, std::string("tensor '") + field + "' has shape " + shape_text(packed.shape) + " (" +
                             packed.dtype + "), expected [" + std::to_string(needed) + "] (U8)");
  }
  if (levels >= int64_t{1} << width) return;
  uint8_t chunk[4096];
  for (int64_t first = 0; first < count; first += sizeof chunk) {
    const int64_t n = std::min<int64_t>(sizeof chunk, count - first);
    unpack_codes(packed.data, width, first, n, chunk);
    if (*std::max_element(chunk, chunk + n) >= levels) {
      fail_node(node.name, std::string(field) + " go beyond the " + std::to_string(levels) + " levels");
    }
  }
}

// `count` codes below `levels` from the packed tensor `field`, one byte each.
std::vector<uint8_t> unpack_field(const Node& node, const Stored& packed, const char* field, int64_t bits, int64_t count,
                                  int64_t levels) {
  const int width = storage_bits(bits);
  check_packed(node, packed, field, width, count, levels);
  std::vector<uint8_t> codes(static_cast<size_t>(count));
  unpack_codes(packed.data, width, 0, count, codes.data());
  return codes;
}

const Stored& stored_field(const Node& node, const std::map<std::string, Stored>& own, const char* field) {
  const auto it = own.find(field);
  if (it == own.end()) fail_node(node.name, std::string("tensor '") + field + "' is missing");
  return it->second;
}

// The codes of every weight value, kept packed as stored. A pruned weight ("sparse": true) stores a 1-bit keep
// map ('mask', one bit per value) and the codes of the kept values only: its codes are expanded to a byte per
// value, code 0 and keep 0 where pruned.
void read_codes(Node& node, const NodeReader& r, const std::map<std::string, Stored>& own, int64_t bits) {
  Weight& w = node.weight;
  const int64_t count = numel(w.shape);
  w.sparse = r.has("sparse") && r.boolean("sparse");
  if (!w.sparse) {
    if (own.count("mask")) fail_node(node.name, "tensor 'mask' belongs to a sparse weight, but 'sparse' is not set");
    const Stored& codes = stored_field(node, own, "codes");
    w.code_bits = storage_bits(bits);
    check_packed(node, codes, "codes", w.code_bits, count, w.levels);
    w.codes.assign(codes.data, codes.data + codes.bytes);
    return;
  }
  w.keep = unpack_field(node, stored_field(node, own, "mask"), "mask", 1, count, 2);
  const int64_t kept = std::count(w.keep.begin(), w.keep.end(), uint8_t{1});
  const std::vector<uint8_t> stored = unpack_field(node, stored_field(node, own, "codes"), "codes", bits, kept, w.levels);
  w.code_bits = 8;
  w.codes.assign(static_cast<size_t>(count), 0);
  for (size_t i = 0, next = 0; i < w.keep.size(); ++i) {
    if (w.keep[i]) w.codes[i] = stored[next++];
  }
}

// (rows, levels): the affine rows scale * z + offset in float32 (as the Python reader), or the stored table.
void read_codebook(Node& node, const std::map<std::string, Stored>& own, const std::string& kind) {
  Weight& w = node.weight;
  const int64_t rows = w.shape[static_cast<size_t>(w.channel_dim)];
  w.codebook.assign(static_cast<size_t>(rows * w.levels), 0.0f);
  if (kind == "affine") {
    const Tensor affine = float_tensor(node, own, "affine");
    if (affine.shape.size() != 2 || affine.shape[0] != 2 || (affine.shape[1] != 1 && affine.shape[1] != rows)) {
      fail_node(node.name, "tensor 'affine' has shape " + shape_text(affine.shape) + ", expected [2, " +
                               std::to_string(rows) + "]");
    }
    const int64_t stored = affine.shape[1];
    for (int64_t r = 0; r < rows; ++r) {
      const float scale = affine.data[static_cast<size_t>(r % stored)];
      const float offset = affine.data[static_cast<size_t>(stored + r % stored)];
      for (int64_t z = 0; z < w.levels; ++z) {
        const float scaled = scale * static_cast<float>(z);  // two roundings, as torch: no fused multiply-add
        w.codebook[static_cast<size_t>(r * w.levels + z)] = scaled + offset;
      }
    }
    w.affine = true;
    return;
  }
  if (kind != "table") fail_node(node.name, "packed weight needs codebook 'affine' or 'table'");
  const Tensor table = float_tensor(node, own, "codebook");
  if (table.shape.size() != 2 || (table.shape[0] != 1 && table.shape[0] != rows) || table.shape[1] != w.levels) {
    fail_node(node.name, "tensor 'codebook' has shape " + shape_text(table.shape) + ", expected [" +
                             std::to_string(rows) + ", " + std::to_string(w.levels) + "]");
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t src = table.shape[0] == 1 ? 0 : r;
    std::copy_n(table.data.begin() + src * w.levels, w.levels, w.codebook.begin() + r * w.levels);
  }
}

void read_weight(Node& node, const Json& attrs, const std::map<std::string, Stored>& own) {
  Weight& w = node.weight;
  w.shape = weight_shape(node);
  if (numel(w.shape) > (int64_t{1} << 31)) fail_node(node.name, "weight shape " + shape_text(w.shape) + " is too large");
  const Json* spec = attrs.get("weight");
  const Json* format = spec ? spec->get("format") : nullptr;
  if (!format || format->kind != Json::String || (format->text != "float" && format->text != "packed")) {
    fail_node(node.name, "attribute 'weight' must say format float or packed");
  }
  const int64_t out_channels = node.op == "conv_transpose2d" ? w.shape[1] * node.attrs.groups : w.shape[0];
  const Json* bias = attrs.get("bias");
  if (bias && bias->kind == Json::Bool && bias->boolean) {
    const Shape expected{out_channels};
    const Floats bias_values = float_tensor(node, own, "bias", &expected).data;
    w.bias.assign(bias_values.begin(), bias_values.end());
  }
  if (format->text == "float") {
    w.values = float_tensor(node, own, "weight", &w.shape).data;
    return;
  }
  const NodeReader r(*spec, node.name);
  const int64_t bits = r.integer("bits", 1, 8);
  w.packed = true;
  w.levels = r.integer("levels", 1, int64_t{1} << bits);
  w.channel_dim = r.integer("channel_dim", 0, static_cast<int64_t>(w.shape.size()) - 1);
  const std::vector<int64_t> declared = r.integers("shape", 1, int64_t{1} << 31, 1, 4);
  if (declared != w.shape) {
    fail_node(node.name, "packed weight shape " + shape_text(declared) + " differs from " + shape_text(w.shape));
  }
  read_codes(node, r, own, bits);
  read_codebook(node, own, r.text("codebook"));
  for (size_t d = static_cast<size_t>(w.channel_dim) + 1; d < w.shape.size(); ++d) w.inner *= w.shape[d];
}

// The tensors each op must / may have (as lowbit.export.validate.SCHEMA).
// The float32 tensors each op reads (required, then optional), as constant tables without pointers to relocate:
// no start-up code builds them (a table of std::string vectors was 5 KB of initialisation code). A schema names
// its two field lists by index into kFieldLists (space-separated tensor names).
constexpr const char* kFieldLists[] = {"",
                                       "weight codes mask affine codebook bias",
                                       "running_mean running_var",
                                       "weight bias",
                                       "running_mean running_var weight bias",
                                       "levels",
                                       "shift",
                                       "weight",
                                       "shift_in slope shift_out",
                                       "value"};

struct TensorSchema {
  char op[20];
  uint8_t required, optional;  // indices into kFieldLists
};

constexpr TensorSchema kSchemas[] = {
    {"conv2d", 0, 1}, {"conv_transpose2d", 0, 1}, {"linear", 0, 1}, {"batch_norm", 2, 3}, {"instance_norm", 0, 4},
    {"layer_norm", 0, 3}, {"group_norm", 0, 3}, {"quant_act", 5, 6}, {"prelu", 7, 0}, {"rprelu", 8, 0},
    {"constant", 9, 0}, {"relu", 0, 0}, {"tanh", 0, 0}, {"sigmoid", 0, 0}, {"silu", 0, 0}, {"leaky_relu", 0, 0},
    {"elu", 0, 0}, {"gelu", 0, 0}, {"hardtanh", 0, 0}, {"pad", 0, 0}, {"interpolate", 0, 0},
    {"pixel_shuffle", 0, 0}, {"reshape", 0, 0}, {"permute", 0, 0}, {"cat", 0, 0}, {"add", 0, 0},
    {"sub", 0, 0}, {"mul", 0, 0}, {"div", 0, 0}, {"mean", 0, 0}};

// The names of field list `list`, in order.
std::vector<std::string> field_names(uint8_t list) {
  std::vector<std::string> names;
  for (const char* p = kFieldLists[list]; *p;) {
    const char* end = std::strchr(p, ' ');
    if (!end) end = p + std::strlen(p);
    names.emplace_back(p, end);
    p = *end ? end + 1 : end;
  }
  return names;
}

const TensorSchema& schema_of(const std::string& name, const std::string& op) {
  for (const TensorSchema& schema : kSchemas) {
    if (op == schema.op) return schema;
  }
  fail_with(LOWBIT_ERROR_FORMAT, "node '" + name + "' has unknown op '" + op.substr(0, 40) +
                                     "'; this file needs a newer lowbit runtime");
}

void read_tensors(Node& node, const Json& attrs, const std::map<std::string, Stored>& own) {
  const TensorSchema& schema = schema_of(node.name, node.op);
  const std::vector<std::string> required = field_names(schema.required), optional = field_names(schema.optional);
  for (const auto& item : own) {
    if (std::find(required.begin(), required.end(), item.first) == required.end() &&
        std::find(optional.begin(), optional.end(), item.first) == optional.end()) {
      fail_node(node.name, "unexpected tensor '" + item.first + "'");
    }
  }
  if (node.op == "conv2d" || node.op == "conv_transpose2d" || node.op == "linear") {
    read_weight(node, attrs, own);
    return;
  }
  for (const std::string& field : required) node.tensors[field] = float_tensor(node, own, field);
  for (const std::string& field : optional) {
    if (own.count(field)) node.tensors[field] = float_tensor(node, own, field);
  }
  if (node.op == "quant_act") {
    const Tensor& levels = node.tensors["levels"];
    if (levels.shape.size() != 1 || levels.data.empty() || levels.data.size() > 256) {
      fail_node(node.name, "levels must be a list of 1 to 256 values, got shape " + shape_text(levels.shape));
    }
  }
}

const std::string& node_text(const Json& item, const char* key, const std::string& name) {
  const Json* value = item.get(key);
  if (!value || value->kind != Json::String) fail_node(name, std::string("'") + key + "' must be a string");
  return value->text;
}

bool valid_name(const std::string& name) {
  if (name.empty() || name.size() > 201 || std::isdigit(static_cast<unsigned char>(name[0]))) return false;
  return std::all_of(name.begin(), name.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
}

Node read_node(const Json& item, const std::map<std::string, int>& index, const File& file) {
  const Json* name = item.get("name");
  if (item.kind != Json::Object || !name || name->kind != Json::String || !valid_name(name->text)) {
    fail_damaged("a node entry is malformed");
  }
  Node node;
  node.name = name->text;
  node.op = node_text(item, "op", node.name);
  schema_of(node.name, node.op);
  const Json* module = item.get("module");
  if (module && module->kind == Json::String) node.module = module->text;
  const Json* inputs = item.get("inputs");
  if (!inputs || inputs->kind != Json::Array) fail_node(node.name, "inputs must be a list of names");
  for (const Json& input : inputs->items) {
    const auto it = input.kind == Json::String ? index.find(input.text) : index.end();
    if (it == index.end()) fail_node(node.name, "it reads an input that no earlier node produces");
    node.inputs.push_back(it->second);
  }
  if (node.op != "constant" && node.inputs.empty()) fail_node(node.name, "it has no input");
  if (node.op == "cat" ? node.inputs.empty() : node.inputs.size() > 2) fail_node(node.name, "wrong number of inputs");
  const Json* attrs = item.get("attrs");
  static const Json empty_object = [] { Json j; j.kind = Json::Object; return j; }();
  if (attrs && attrs->kind != Json::Object) fail_node(node.name, "attrs must be an object");
  const Json& a = attrs ? *attrs : empty_object;
  read_attrs(NodeReader(a, node.name), node);
  std::map<std::string, Stored> own;
  const std::string prefix = node.name + ".";
  for (auto it = file.tensors.lower_bound(prefix); it != file.tensors.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    own[it->first.substr(prefix.size())] = it->second;
  }
  read_tensors(node, a, own);
  return node;
}

// A per-sample shape; [] is one value per sample.
Shape sample_shape(const Json* value, const char* what) {
  if (!value || value->kind != Json::Array || value->items.size() >= kMaxRank) {
    fail_damaged(std::string(what) + " must be a list of positive sizes");
  }
  Shape shape;
  for (const Json& size : value->items) {
    int64_t s = 0;
    if (!json_size(size, kMaxSampleValues, s) || s < 1) fail_damaged(std::string(what) + " must be a list of positive sizes");
    shape.push_back(s);
  }
  if (numel(shape) > kMaxSampleValues) fail_damaged(std::string(what) + " has too many values per sample");
  return shape;
}

// Every node's per-sample output shape, inferred at batch 2 (constants keep their own full shape): checks that
// every layer's input fits it and every intermediate stays within the per-sample limit.
void infer_shapes(Graph& graph) {
  const Shape input = [&] { Shape s{2}; s.insert(s.end(), graph.input_shape.begin(), graph.input_shape.end()); return s; }();
  std::vector<Shape> full(graph.nodes.size());
  for (size_t k = 0; k < graph.nodes.size(); ++k) {
    Node& node = graph.nodes[k];
    std::vector<const Shape*> inputs;
    bool batched = false;
    for (const int i : node.inputs) {
      inputs.push_back(i < 0 ? &input : &full[static_cast<size_t>(i)]);
      batched = batched || i < 0 || graph.nodes[static_cast<size_t>(i)].op != "constant";
    }
    full[k] = infer_shape(node, inputs);
    if (node.op == "constant") {
      node.out_shape = full[k];
      continue;
    }
    if (!batched || full[k].empty() || full[k][0] != 2) fail_node(node.name, "its output does not keep the batch first");
    node.out_shape.assign(full[k].begin() + 1, full[k].end());
    if (numel(node.out_shape) > kMaxSampleValues) {
      fail_node(node.name, "output " + shape_text(node.out_shape) + " has too many values per sample");
    }
  }
}

}  // namespace

Graph load_graph(const uint8_t* data, size_t size) {
  const File file = read_safetensors(data, size);
  check_metadata(file);
  const std::string& text = metadata_field(file, "lowbit.architecture");
  Json arch;
  std::string error;
  if (!parse_json(text.data(), text.size(), arch, error)) fail_damaged("architecture is not JSON: " + error);
  if (arch.kind != Json::Object) fail_damaged("architecture is not a JSON object");
  const Json* nodes = arch.get("nodes");
  if (!nodes || nodes->kind != Json::Array) fail_damaged("the architecture has no node list");
  if (nodes->items.size() > kMaxNodes) fail_damaged("the graph has too many nodes");
  Graph graph;
  graph.input_shape = sample_shape(arch.get("input_shape"), "input_shape");
  std::map<std::string, int> index{{"input", -1}};
  for (const Json& item : nodes->items) {
    Node node = read_node(item, index, file);
    if (index.count(node.name)) fail_node(node.name, "the name is used twice");
    index[node.name] = static_cast<int>(graph.nodes.size());
    graph.nodes.push_back(std::move(node));
  }
  const Json* output = arch.get("output");
  const auto out = output && output->kind == Json::String ? index.find(output->text) : index.end();
  if (out == index.end() || out->second < 0) fail_damaged("the graph's output is not a node");
  graph.output = out->second;
  infer_shapes(graph);
  graph.output_shape = graph.nodes[static_cast<size_t>(graph.output)].out_shape;
  if (graph.nodes[static_cast<size_t>(graph.output)].op == "constant") fail_damaged("the graph's output is a constant");
  if (arch.get("output_shape") && sample_shape(arch.get("output_shape"), "output_shape") != graph.output_shape) {
    fail_damaged("output_shape differs from the shape the graph computes, " + shape_text(graph.output_shape));
  }
  return graph;
}

}  // namespace lowbit
