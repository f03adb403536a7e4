// KV shapes of real models, for benchmarks and demos.
#pragma once

#include <cstdint>

#include "memory/core/dtype.h"

namespace kvtier::bench {

struct ModelShape {
  const char* name;
  int32_t num_layers;
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  DType dtype;
};

inline constexpr ModelShape kModelShapes[] = {
    {"Llama-3.1-8B", 32, 32, 8, 128, DType::kBF16},
    {"Mistral-7B", 32, 32, 8, 128, DType::kBF16},
    {"Qwen2-7B", 28, 28, 4, 128, DType::kBF16},
    {"SmolLM2-135M", 30, 9, 3, 64, DType::kBF16},
};

}  // namespace kvtier::bench
