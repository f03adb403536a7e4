#include <array>
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "kernels/launch.cuh"

namespace kvtier::kernels::detail {

namespace {

/// Compute capability 9.0 or later, per device ordinal (0: not looked up, 1: no, 2: yes).
bool device_supported(int device) {
  static std::array<std::atomic<int>, 64> known{};
  if (device < 0 || device >= static_cast<int>(known.size())) return false;
  int state = known[device].load(std::memory_order_relaxed);
  if (state == 0) {
    int major = 0;
    KVTIER_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    state = major >= 9 ? 2 : 1;
    known[device].store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

struct PairHash {
  size_t operator()(const std::pair<const void*, int>& k) const {
    return std::hash<const void*>()(k.first) ^ (static_cast<size_t>(k.second) << 1);
  }
};

}  // namespace

bool pdl_enabled(const void* kernel) {
  int device = 0;
  KVTIER_CUDA_CHECK(cudaGetDevice(&device));
  if (!device_supported(device)) return false;
  static std::mutex mu;
  static std::unordered_map<std::pair<const void*, int>, bool, PairHash> compiled;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(kernel, device);
  auto it = compiled.find(key);
  if (it == compiled.end()) {
    cudaFuncAttributes attr{};
    KVTIER_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    it = compiled.emplace(key, attr.ptxVersion >= 90).first;
  }
  return it->second;
}

}  // namespace kvtier::kernels::detail
