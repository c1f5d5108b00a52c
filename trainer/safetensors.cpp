#include "trainer/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>
#include <string_view>

namespace flashmoe {

// Tensor bytes go to and from the file as they lie in memory; the format is little-endian.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes little-endian");

namespace {

// Device tensors pass through a host buffer of at most this size; single read/write calls
// stay below it too, since Linux transfers at most ~2 GiB per call.
constexpr size_t kChunkBytes = size_t{64} << 20;
// As the reference implementation: a longer header is garbage, not a real file.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// The header is at most two levels of objects holding arrays; anything deeper is garbage.
constexpr int kMaxJsonDepth = 4;
constexpr const char* kMetadataKey = "__metadata__";

struct DTypeName {
  DType dtype;
  const char* name;
};
constexpr DTypeName kDTypeNames[] = {{DType::f32, "F32"},
                                     {DType::bf16, "BF16"},
                                     {DType::i32, "I32"},
                                     {DType::i64, "I64"},
                                     {DType::f64, "F64"}};

const char* safetensors_dtype_name(DType dtype) {
  for (const auto& entry : kDTypeNames) {
    if (entry.dtype == dtype) return entry.name;
  }
  FLASHMOE_FAIL("dtype " << dtype_name(dtype) << " has no safetensors name");
}

// Names and metadata come from files: quoting them keeps every error message on one line.
std::string json_quote(std::string_view text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
      out += escaped;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string describe_file(const std::string& path) { return "safetensors file '" + path + "'"; }

// ---------------------------------------------------------------------------------------
// File descriptors: POSIX calls, because the writer must fsync and the reader must seek.

struct Fd {
  explicit Fd(int fd) : fd(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  int fd;
};

void write_all(int fd, const void* data, size_t size, const std::string& path) {
  const char* bytes = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t written = ::write(fd, bytes, std::min(size, kChunkBytes));
    if (written < 0 && errno == EINTR) continue;
    FLASHMOE_CHECK(written > 0,
                   "cannot write " << describe_file(path) << ": " << std::strerror(errno));
    bytes += written;
    size -= static_cast<size_t>(written);
  }
}

void read_exactly(int fd, void* data, size_t size, uint64_t offset, const std::string& path) {
  char* bytes = static_cast<char*>(data);
  while (size > 0) {
    ssize_t got = ::pread(fd, bytes, std::min(size, kChunkBytes), static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    FLASHMOE_CHECK(got >= 0, "cannot read " << describe_file(path) << ": " << std::strerror(errno));
    FLASHMOE_CHECK(got > 0, describe_file(path) << " ended at byte " << offset
                                                << " while reading (was it truncated?)");
    bytes += got;
    size -= static_cast<size_t>(got);
    offset += static_cast<uint64_t>(got);
  }
}

// ---------------------------------------------------------------------------------------
// A strict JSON reader for exactly what a safetensors header holds: objects, arrays,
// strings and non-negative integers.

struct JsonValue {
  enum class Kind { object, array, string, integer };
  Kind kind = Kind::integer;
  uint64_t integer = 0;
  std::string text;
  std::vector<JsonValue> items;
  std::vector<std::pair<std::string, JsonValue>> members;  // in file order
};

class JsonParser {
 public:
  JsonParser(std::string_view text, const std::string& path) : text_(text), path_(path) {}

  // One object, then nothing but whitespace (the padding).
  JsonValue parse_document() {
    skip_whitespace();
    if (peek() != '{') fail("expected '{' opening the header object");
    JsonValue document = parse_value(0);
    skip_whitespace();
    if (pos_ != text_.size()) fail("unexpected bytes after the header object");
    return document;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    FLASHMOE_FAIL(describe_file(path_)
                  << ": malformed JSON header at byte " << pos_ << ": " << what);
  }

  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  char peek_next() const { return pos_ + 1 < text_.size() ? text_[pos_ + 1] : '\0'; }

  void skip_whitespace() {
    while (pos_ < text_.size() && std::strchr(" \t\r\n", text_[pos_]) != nullptr) ++pos_;
  }

  // True when a ',' followed, announcing another element.
  bool skip_comma() {
    skip_whitespace();
    if (peek() != ',') return false;
    ++pos_;
    return true;
  }

  void expect(char c) {
    skip_whitespace();
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }

  JsonValue parse_value(int depth) {
    if (depth > kMaxJsonDepth) fail("nesting deeper than a safetensors header");
    skip_whitespace();
    char c = peek();
    if (c == '{') return parse_object(depth);
    if (c == '[') return parse_array(depth);
    JsonValue value;
    if (c == '"') {
      value.kind = JsonValue::Kind::string;
      value.text = parse_string();
    } else if (c >= '0' && c <= '9') {
      value.integer = parse_integer();
    } else {
      fail("expected an object, array, string or non-negative integer");
    }
    return value;
  }

  JsonValue parse_object(int depth) {
    JsonValue object;
    object.kind = JsonValue::Kind::object;
    std::set<std::string> keys;
    expect('{');
    skip_whitespace();
    if (peek() == '}') {
      ++pos_;
      return object;
    }
    while (true) {
      skip_whitespace();
      if (peek() != '"') fail("expected a string key");
      std::string key = parse_string();
      if (!keys.insert(key).second) fail("duplicate key " + json_quote(key));
      expect(':');
      object.members.emplace_back(std::move(key), parse_value(depth + 1));
      if (!skip_comma()) break;
    }
    expect('}');
    return object;
  }

  JsonValue parse_array(int depth) {
    JsonValue array;
    array.kind = JsonValue::Kind::array;
    expect('[');
    skip_whitespace();
    if (peek() == ']') {
      ++pos_;
      return array;
    }
    while (true) {
      array.items.push_back(parse_value(depth + 1));
      if (!skip_comma()) break;
    }
    expect(']');
    return array;
  }

  uint64_t parse_integer() {
    if (peek() == '0' && std::isdigit(static_cast<unsigned char>(peek_next()))) {
      fail("integer with a leading zero");
    }
    uint64_t value = 0;
    while (std::isdigit(static_cast<unsigned char>(peek()))) {
      uint64_t digit = static_cast<uint64_t>(text_[pos_++] - '0');
      if (value > (UINT64_MAX - digit) / 10) fail("integer beyond 64 bits");
      value = value * 10 + digit;
    }
    if (peek() == '.' || peek() == 'e' || peek() == 'E') fail("expected an integer");
    return value;
  }

  std::string parse_string() {
    ++pos_;  // the opening quote
    std::string out;
    while (true) {
      if (pos_ >= text_.size()) fail("unterminated string");
      unsigned char c = static_cast<unsigned char>(text_[pos_++]);
      if (c == '"') return out;
      if (c < 0x20) fail("control character inside a string");
      if (c != '\\') {
        out += static_cast<char>(c);
        continue;
      }
      parse_escape(out);
    }
  }

  void parse_escape(std::string& out) {
    char c = pos_ < text_.size() ? text_[pos_++] : '\0';
    switch (c) {
      case '"': out += '"'; return;
      case '\\': out += '\\'; return;
      case '/': out += '/'; return;
      case 'b': out += '\b'; return;
      case 'f': out += '\f'; return;
      case 'n': out += '\n'; return;
      case 'r': out += '\r'; return;
      case 't': out += '\t'; return;
      case 'u': append_utf8(out, parse_code_point()); return;
      default: fail("invalid escape in a string");
    }
  }

  // After "\u": one code point, joining a UTF-16 surrogate pair.
  uint32_t parse_code_point() {
    uint32_t unit = parse_hex4();
    if (unit >= 0xDC00 && unit <= 0xDFFF) fail("unpaired low surrogate");
    if (unit < 0xD800 || unit > 0xDBFF) return unit;
    if (text_.substr(pos_, 2) != "\\u") fail("unpaired high surrogate");
    pos_ += 2;
    uint32_t low = parse_hex4();
    if (low < 0xDC00 || low > 0xDFFF) fail("unpaired high surrogate");
    return 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
  }

  uint32_t parse_hex4() {
    uint32_t value = 0;
    for (int i = 0; i < 4; ++i) {
      char c = peek();
      int digit = std::isdigit(static_cast<unsigned char>(c)) ? c - '0'
                  : (c >= 'a' && c <= 'f')                    ? c - 'a' + 10
                  : (c >= 'A' && c <= 'F')                    ? c - 'A' + 10
                                                              : -1;
      if (digit < 0) fail("expected 4 hex digits after \\u");
      value = value * 16 + static_cast<uint32_t>(digit);
      ++pos_;
    }
    return value;
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string_view text_;
  const std::string& path_;
  size_t pos_ = 0;
};

// ---------------------------------------------------------------------------------------
// The header: JSON text to tensor entries and back.

DType parse_dtype(const JsonValue& value, const std::string& where) {
  if (value.kind == JsonValue::Kind::string) {
    for (const auto& entry : kDTypeNames) {
      if (value.text == entry.name) return entry.dtype;
    }
  }
  FLASHMOE_FAIL(where << " has dtype "
                      << (value.kind == JsonValue::Kind::string ? json_quote(value.text)
                                                                : std::string("(not a string)"))
                      << ", expected one of F32, BF16, I32, I64, F64");
}

std::vector<uint64_t> parse_integers(const JsonValue& value, const std::string& where,
                                     const char* key) {
  FLASHMOE_CHECK(value.kind == JsonValue::Kind::array,
                 where << ": \"" << key << "\" is not an array, expected an array of integers");
  std::vector<uint64_t> integers;
  for (const JsonValue& item : value.items) {
    FLASHMOE_CHECK(item.kind == JsonValue::Kind::integer,
                   where << ": \"" << key << "\" holds a non-integer, expected integers");
    integers.push_back(item.integer);
  }
  return integers;
}

// Byte size of a tensor of `shape` and `dtype`, or an error when it passes 64 bits.
uint64_t checked_byte_size(const Shape& shape, DType dtype, const std::string& where) {
  uint64_t bytes = dtype_size(dtype);
  for (int64_t dim : shape) {
    FLASHMOE_CHECK(!__builtin_mul_overflow(bytes, static_cast<uint64_t>(dim), &bytes),
                   where << " has shape " << shape_string(shape) << " whose size passes 64 bits");
  }
  return bytes;
}

SafetensorsTensorInfo parse_tensor_entry(const std::string& name, const JsonValue& value,
                                         const std::string& file_description) {
  const std::string where = file_description + ": tensor " + json_quote(name);
  FLASHMOE_CHECK(value.kind == JsonValue::Kind::object,
                 where << " is not an object, expected {\"dtype\", \"shape\", \"data_offsets\"}");
  SafetensorsTensorInfo info;
  info.name = name;
  std::set<std::string> seen;
  for (const auto& [key, member] : value.members) {
    if (key == "dtype") {
      info.dtype = parse_dtype(member, where);
    } else if (key == "shape") {
      for (uint64_t dim : parse_integers(member, where, "shape")) {
        FLASHMOE_CHECK(dim <= INT64_MAX, where << " has a dimension beyond 2^63");
        info.shape.push_back(static_cast<int64_t>(dim));
      }
    } else if (key == "data_offsets") {
      std::vector<uint64_t> offsets = parse_integers(member, where, "data_offsets");
      FLASHMOE_CHECK(offsets.size() == 2 && offsets[0] <= offsets[1],
                     where << " has invalid data_offsets, expected [begin, end] with begin <= end");
      info.data_begin = offsets[0];
      info.data_end = offsets[1];
    } else {
      FLASHMOE_FAIL(where << " has unknown key " << json_quote(key)
                          << ", expected only dtype, shape and data_offsets");
    }
    seen.insert(key);
  }
  FLASHMOE_CHECK(seen.size() == 3, where << " lacks a key, expected dtype, shape and data_offsets");
  uint64_t expected = checked_byte_size(info.shape, info.dtype, where);
  FLASHMOE_CHECK(info.data_end - info.data_begin == expected,
                 where << " spans " << info.data_end - info.data_begin << " bytes, expected "
                       << expected << " for " << safetensors_dtype_name(info.dtype) << " "
                       << shape_string(info.shape));
  return info;
}

std::map<std::string, std::string> parse_metadata(const JsonValue& value,
                                                  const std::string& file_description) {
  FLASHMOE_CHECK(value.kind == JsonValue::Kind::object,
                 file_description << ": \"__metadata__\" is not an object, expected {str: str}");
  std::map<std::string, std::string> metadata;
  for (const auto& [key, member] : value.members) {
    FLASHMOE_CHECK(member.kind == JsonValue::Kind::string,
                   file_description << ": metadata " << json_quote(key)
                                    << " is not a string, expected {str: str}");
    metadata[key] = member.text;
  }
  return metadata;
}

// The data of consecutive tensors must tile [0, data_size) exactly.
void check_offsets_tile_data(std::vector<SafetensorsTensorInfo>& tensors, uint64_t data_size,
                             const std::string& file_description) {
  std::stable_sort(tensors.begin(), tensors.end(), [](const auto& a, const auto& b) {
    return std::pair(a.data_begin, a.data_end) < std::pair(b.data_begin, b.data_end);
  });
  uint64_t expected_begin = 0;
  for (const auto& info : tensors) {
    FLASHMOE_CHECK(info.data_begin >= expected_begin,
                   file_description << ": tensor " << json_quote(info.name) << " at bytes ["
                                    << info.data_begin << ", " << info.data_end
                                    << ") overlaps the previous tensor, expected it to start at "
                                    << expected_begin);
    FLASHMOE_CHECK(info.data_begin == expected_begin,
                   file_description << ": gap before tensor " << json_quote(info.name)
                                    << " at byte " << info.data_begin
                                    << ", expected it to start at " << expected_begin);
    expected_begin = info.data_end;
  }
  FLASHMOE_CHECK(expected_begin == data_size,
                 file_description << ": the data section holds " << data_size
                                  << " bytes, the header's offsets cover " << expected_begin
                                  << " (expected equal: truncated or padded file?)");
}

std::string header_json(const std::vector<std::pair<std::string, Tensor>>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  std::string json = "{";
  if (!metadata.empty()) {
    json += json_quote(kMetadataKey) + ":{";
    for (const auto& [key, value] : metadata) {
      if (json.back() != '{') json += ',';
      json += json_quote(key) + ":" + json_quote(value);
    }
    json += "}";
  }
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (json.size() > 1) json += ',';
    std::string shape;
    for (int64_t dim : tensor.shape()) {
      if (!shape.empty()) shape += ',';
      shape += std::to_string(dim);
    }
    json += json_quote(name) + ":{\"dtype\":\"" + safetensors_dtype_name(tensor.dtype()) +
            "\",\"shape\":[" + shape + "],\"data_offsets\":[" + std::to_string(offset) + "," +
            std::to_string(offset + tensor.nbytes()) + "]}";
    offset += tensor.nbytes();
  }
  json += "}";
  // Spaces, as the reference writer pads, so the data section starts 8-byte aligned.
  json.append((8 - json.size() % 8) % 8, ' ');
  return json;
}

void check_writable(const std::vector<std::pair<std::string, Tensor>>& tensors,
                    const std::string& path) {
  std::set<std::string> names;
  for (const auto& [name, tensor] : tensors) {
    FLASHMOE_CHECK(!name.empty() && name != kMetadataKey,
                   "cannot write " << describe_file(path) << ": tensor name " << json_quote(name)
                                   << " is reserved, expected a non-empty name");
    FLASHMOE_CHECK(names.insert(name).second, "cannot write " << describe_file(path)
                                                              << ": duplicate tensor name "
                                                              << json_quote(name));
    FLASHMOE_CHECK(tensor.defined(), "cannot write " << describe_file(path) << ": tensor "
                                                     << json_quote(name) << " is undefined");
  }
}

void write_tensor_data(int fd, const Tensor& tensor, const std::string& path) {
  if (tensor.nbytes() == 0) return;
  if (tensor.device() == Device::cpu) return write_all(fd, tensor.raw(), tensor.nbytes(), path);
  // Device memory reaches the file through a bounded host buffer, a chunk at a time.
  const int64_t numel = tensor.numel();
  const int64_t chunk = static_cast<int64_t>(kChunkBytes / dtype_size(tensor.dtype()));
  Tensor flat = tensor.view({numel});
  Tensor host = Tensor::empty({std::min(chunk, numel)}, tensor.dtype(), Device::cpu);
  for (int64_t begin = 0; begin < numel; begin += chunk) {
    int64_t end = std::min(begin + chunk, numel);
    Tensor part = host.rows(0, end - begin);
    part.copy_from(flat.rows(begin, end));
    write_all(fd, part.raw(), part.nbytes(), path);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  check_writable(tensors, path);
  const std::string header = header_json(tensors, metadata);
  Fd file(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  FLASHMOE_CHECK(file.fd >= 0,
                 "cannot create " << describe_file(path) << ": " << std::strerror(errno));
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>(uint64_t{header.size()} >> (8 * i));
  write_all(file.fd, length, sizeof length, path);
  write_all(file.fd, header.data(), header.size(), path);
  for (const auto& [name, tensor] : tensors) write_tensor_data(file.fd, tensor, path);
  FLASHMOE_CHECK(::fsync(file.fd) == 0,
                 "cannot fsync " << describe_file(path) << ": " << std::strerror(errno));
}

// The reader's descriptor, shared by the copies of a SafetensorsFile.
struct SafetensorsFile::OpenFile {
  explicit OpenFile(int fd) : fd(fd) {}
  OpenFile(const OpenFile&) = delete;
  OpenFile& operator=(const OpenFile&) = delete;
  ~OpenFile() {
    if (fd >= 0) ::close(fd);
  }
  const int fd;
};

SafetensorsFile read_safetensors(const std::string& path) {
  const std::string file_description = describe_file(path);
  auto file =
      std::make_shared<const SafetensorsFile::OpenFile>(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  const int fd = file->fd;
  FLASHMOE_CHECK(fd >= 0, "cannot open " << file_description << ": " << std::strerror(errno));
  struct stat status {};
  FLASHMOE_CHECK(::fstat(fd, &status) == 0 && S_ISREG(status.st_mode),
                 file_description << " is not a regular file");
  const uint64_t file_size = static_cast<uint64_t>(status.st_size);
  FLASHMOE_CHECK(file_size >= 8, file_description << " is " << file_size
                                                  << " bytes, shorter than the 8-byte header "
                                                     "length that starts a safetensors file");
  uint8_t length_bytes[8];
  read_exactly(fd, length_bytes, 8, 0, path);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = header_size << 8 | length_bytes[i];
  FLASHMOE_CHECK(header_size <= file_size - 8 && header_size <= kMaxHeaderBytes,
                 file_description << ": header length " << header_size << " exceeds the "
                                  << file_size - 8
                                  << " bytes after it (not a safetensors file, or truncated)");
  std::string header(header_size, '\0');
  read_exactly(fd, header.data(), header.size(), 8, path);

  SafetensorsFile result;
  const JsonValue document = JsonParser(header, path).parse_document();
  for (const auto& [key, value] : document.members) {
    if (key == kMetadataKey) {
      result.metadata_ = parse_metadata(value, file_description);
    } else {
      result.tensors_.push_back(parse_tensor_entry(key, value, file_description));
    }
  }
  result.data_start_ = 8 + header_size;
  check_offsets_tile_data(result.tensors_, file_size - result.data_start_, file_description);
  for (size_t i = 0; i < result.tensors_.size(); ++i) {
    result.index_by_name_[result.tensors_[i].name] = i;
  }
  result.path_ = path;
  result.file_ = std::move(file);
  return result;
}

const SafetensorsTensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_by_name_.find(name);
  return it == index_by_name_.end() ? nullptr : &tensors_[it->second];
}

void SafetensorsFile::check_destination(const std::string& name, const Tensor& destination) const {
  const SafetensorsTensorInfo* info = find(name);
  FLASHMOE_CHECK(info != nullptr, describe_file(path_)
                                      << " has no tensor " << json_quote(name) << " (it holds "
                                      << tensors_.size() << " tensors)");
  FLASHMOE_CHECK(destination.defined() && destination.dtype() == info->dtype &&
                     destination.shape() == info->shape,
                 describe_file(path_)
                     << ": tensor " << json_quote(name) << " is " << dtype_name(info->dtype) << " "
                     << shape_string(info->shape) << ", the destination is "
                     << (destination.defined() ? std::string(dtype_name(destination.dtype())) +
                                                     " " + shape_string(destination.shape())
                                               : std::string("undefined"))
                     << " (expected the same dtype and shape)");
}

void SafetensorsFile::load_into(const std::string& name, Tensor& destination) const {
  check_destination(name, destination);
  const SafetensorsTensorInfo& info = *find(name);
  const uint64_t offset = data_start_ + info.data_begin;
  if (destination.nbytes() == 0) return;
  if (destination.device() == Device::cpu) {
    return read_exactly(file_->fd, destination.raw(), destination.nbytes(), offset, path_);
  }
  // Into device memory through a bounded host buffer, a chunk at a time.
  const int64_t numel = destination.numel();
  const size_t element_size = dtype_size(destination.dtype());
  const int64_t chunk = static_cast<int64_t>(kChunkBytes / element_size);
  Tensor flat = destination.view({numel});
  Tensor host = Tensor::empty({std::min(chunk, numel)}, destination.dtype(), Device::cpu);
  for (int64_t begin = 0; begin < numel; begin += chunk) {
    int64_t end = std::min(begin + chunk, numel);
    Tensor part = host.rows(0, end - begin);
    read_exactly(file_->fd, part.raw(), part.nbytes(),
                 offset + static_cast<uint64_t>(begin) * element_size, path_);
    flat.rows(begin, end).copy_from(part);
  }
}

void SafetensorsFile::load_all(
    const std::vector<std::pair<std::string, Tensor*>>& destinations) const {
  for (const auto& [name, destination] : destinations) check_destination(name, *destination);
  for (const auto& [name, destination] : destinations) load_into(name, *destination);
}

Tensor SafetensorsFile::load(const std::string& name, Device device) const {
  const SafetensorsTensorInfo* info = find(name);
  FLASHMOE_CHECK(info != nullptr, describe_file(path_)
                                      << " has no tensor " << json_quote(name) << " (it holds "
                                      << tensors_.size() << " tensors)");
  Tensor tensor = Tensor::empty(info->shape, info->dtype, device);
  load_into(name, tensor);
  return tensor;
}

}  // namespace flashmoe
