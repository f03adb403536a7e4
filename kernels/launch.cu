#include <array>
#include <atomic>

#include "kernels/launch.cuh"

namespace kvtier::kernels::detail {

bool pdl_supported() {
  // 0: not looked up yet, 1: no, 2: yes; per device ordinal.
  static std::array<std::atomic<int>, 64> known{};
  int device = 0;
  KVTIER_CUDA_CHECK(cudaGetDevice(&device));
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

}  // namespace kvtier::kernels::detail
