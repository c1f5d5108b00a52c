// safetensors files (the Hugging Face format), written and read without a dependency:
//
//   8 bytes   N, the header length, unsigned little-endian
//   N bytes   JSON: {"__metadata__": {str: str} (optional),
//                    "<name>": {"dtype": "F32"|"BF16"|"I32"|"I64"|"F64", "shape": [...],
//                               "data_offsets": [begin, end]}, ...}
//             padded with spaces so that the data starts 8-byte aligned
//   the rest  every tensor's raw little-endian bytes; offsets are relative to this data
//             section, contiguous, without gaps or overlaps, and cover all of it
//
// Files of many GB stream both ways: the writer never holds more than one chunk of a
// device tensor on the host, and the reader seeks to each tensor. Any other tool that
// reads safetensors reads these files, and every file a reader accepts has been fully
// validated (header, dtypes, shapes, offsets against the file size) when it is opened.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace flashmoe {

// Writes `tensors` in the order given (tensors on any device) and `metadata` as the
// header's "__metadata__", then fsyncs the file. Overwrites `path` in place: callers that
// need atomic replacement write to a temporary name first, as CheckpointWriter does.
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

struct SafetensorsTensorInfo {
  std::string name;
  DType dtype = DType::f32;
  Shape shape;
  uint64_t data_begin = 0;  // bytes, relative to the data section
  uint64_t data_end = 0;
};

// An opened, validated safetensors file. Tensors are read on request, straight from the
// file into their destination.
class SafetensorsFile {
 public:
  const std::string& path() const { return path_; }
  // In the order of their data in the file (the order they were written in).
  const std::vector<SafetensorsTensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // nullptr when the file holds no tensor of that name.
  const SafetensorsTensorInfo* find(const std::string& name) const;

  // Throws unless the file holds `name` with the dtype and shape of `destination`.
  void check_destination(const std::string& name, const Tensor& destination) const;
  // Reads tensor `name` into `destination` (any device), after check_destination.
  void load_into(const std::string& name, Tensor& destination) const;
  // Checks every destination first, then loads them all: a mismatch modifies nothing.
  void load_all(const std::vector<std::pair<std::string, Tensor*>>& destinations) const;
  // A new tensor on `device` holding tensor `name`.
  Tensor load(const std::string& name, Device device) const;

 private:
  friend SafetensorsFile read_safetensors(const std::string& path);
  struct OpenFile;

  std::string path_;
  std::shared_ptr<const OpenFile> file_;  // kept open so reads see the validated file
  uint64_t data_start_ = 0;               // file offset of the data section
  std::vector<SafetensorsTensorInfo> tensors_;
  std::map<std::string, size_t> index_by_name_;
  std::map<std::string, std::string> metadata_;
};

// Opens and validates `path`; every problem is a one-line flashmoe::Error naming the file.
SafetensorsFile read_safetensors(const std::string& path);

}  // namespace flashmoe
