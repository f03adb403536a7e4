// Element types of KV rows and the validation of a KV row shape (dtype x head_dim), done in one
// place so every layer rejects bad shapes with the same message.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <string>

namespace kvtier {

enum class DType : uint8_t { kF16, kBF16, kF32 };

/// Bytes per element.
constexpr size_t dtype_size(DType t) { return t == DType::kF32 ? 4 : 2; }
/// "fp16", "bf16", "fp32".
const char* dtype_name(DType t);
/// Writes dtype_name(t) (for test names and messages).
std::ostream& operator<<(std::ostream& os, DType t);
/// Parses "fp16"/"float16"/"half", "bf16"/"bfloat16", "fp32"/"float32"; throws
/// InvalidArgumentError.
DType parse_dtype(const std::string& name);

/// head_dim values the KV tiers and kernels support.
constexpr int kSupportedHeadDims[] = {64, 128, 256};

/// Throws InvalidArgumentError unless dtype is fp16, bf16 or fp32 and head_dim one of 64, 128,
/// 256. (The tiers move rows as bytes; which dtypes attention takes is the engine's business.)
void check_kv_row_shape(DType dtype, int head_dim);

/// Bytes of one K (or V) row.
constexpr size_t kv_row_bytes(DType dtype, int head_dim) {
  return dtype_size(dtype) * static_cast<size_t>(head_dim);
}

}  // namespace kvtier
