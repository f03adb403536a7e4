// Where a module keeps its data and runs its work. Everything above kernels/ takes a Backend, so
// the tiers, the cache and the scheduler run (and are tested) on machines without a GPU.
#pragma once

#include <cstdint>

namespace kvtier {

enum class Backend : uint8_t { kCpu, kCuda };

inline const char* backend_name(Backend b) { return b == Backend::kCuda ? "cuda" : "cpu"; }

}  // namespace kvtier
