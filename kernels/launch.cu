#include <array>
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "kernels/launch.cuh"
#include "memory/core/log.h"

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

int sm_count() {
  int device = 0;
  KVTIER_CUDA_CHECK(cudaGetDevice(&device));
  static std::array<std::atomic<int>, 64> known{};
  if (device < 0 || device >= static_cast<int>(known.size())) {
    int n = 0;
    KVTIER_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }
  int n = known[device].load(std::memory_order_relaxed);
  if (n == 0) {
    KVTIER_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    known[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

const ClusterKernelInfo& cluster_kernel_info(const void* kernel) {
  int device = 0;
  KVTIER_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mu;
  static std::unordered_map<std::pair<const void*, int>, ClusterKernelInfo, PairHash> known;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(kernel, device);
  auto it = known.find(key);
  if (it == known.end()) {
    ClusterKernelInfo info;
    cudaFuncAttributes attr{};
    KVTIER_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    int optin = 0;
    KVTIER_CUDA_CHECK(
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    info.static_smem = attr.sharedSizeBytes;
    info.max_dynamic = static_cast<size_t>(optin) > attr.sharedSizeBytes
                           ? static_cast<size_t>(optin) - attr.sharedSizeBytes
                           : 0;
    // The attributes are caps, set once to the most the device allows: launches of any shape may
    // then run concurrently from several threads.
    KVTIER_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(info.max_dynamic)));
    if (device_supported(device)) {
      info.non_portable =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
          cudaSuccess;
      if (!info.non_portable) (void)cudaGetLastError();  // clusters of up to 8 remain
    }
    it = known.emplace(key, info).first;
  }
  return it->second;
}

namespace {

/// cudaOccupancyMaxActiveClusters of `kernel` in clusters of `cluster` blocks (with `threads`
/// threads and `smem` bytes of dynamic shared memory each) into `clusters`, remembered per
/// kernel, device and shape; a failed query is not remembered (asked again next time).
cudaError_t active_clusters(const void* kernel, int device, int threads, size_t smem, int cluster,
                            int& clusters) {
  struct Key {
    const void* kernel;
    int device, threads, cluster;
    size_t smem;
    bool operator==(const Key& o) const {
      return kernel == o.kernel && device == o.device && threads == o.threads &&
             cluster == o.cluster && smem == o.smem;
    }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const {
      return std::hash<const void*>()(k.kernel) ^ (static_cast<size_t>(k.device) << 1) ^
             (static_cast<size_t>(k.threads) << 8) ^ (static_cast<size_t>(k.cluster) << 16) ^
             (k.smem << 20);
    }
  };
  static std::mutex mu;
  static std::unordered_map<Key, int, KeyHash> known;
  const Key key{kernel, device, threads, cluster, smem};
  {
    std::lock_guard<std::mutex> lock(mu);
    if (auto it = known.find(key); it != known.end()) {
      clusters = it->second;
      return cudaSuccess;
    }
  }
  cudaLaunchAttribute attr;
  set_cluster(attr, static_cast<unsigned>(cluster));
  cudaLaunchConfig_t config =
      launch_config(dim3(static_cast<unsigned>(cluster)), dim3(static_cast<unsigned>(threads)),
                    smem, nullptr, &attr, 1);
  clusters = 0;
  const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return err;
  }
  std::lock_guard<std::mutex> lock(mu);
  known.emplace(key, clusters);
  return cudaSuccess;
}

}  // namespace

int max_cluster_size(const void* kernel, int threads, size_t smem) {
  int device = 0;
  KVTIER_CUDA_CHECK(cudaGetDevice(&device));
  if (!device_supported(device)) return 0;
  const ClusterKernelInfo& info = cluster_kernel_info(kernel);
  if (smem > info.max_dynamic) return 0;
  struct Key {
    const void* kernel;
    int device, threads;
    size_t smem;
    bool operator==(const Key& o) const {
      return kernel == o.kernel && device == o.device && threads == o.threads && smem == o.smem;
    }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const {
      return std::hash<const void*>()(k.kernel) ^ (static_cast<size_t>(k.device) << 1) ^
             (static_cast<size_t>(k.threads) << 8) ^ (k.smem << 20);
    }
  };
  static std::mutex mu;
  static std::unordered_map<Key, int, KeyHash> known;
  std::lock_guard<std::mutex> lock(mu);
  const Key key{kernel, device, threads, smem};
  if (auto it = known.find(key); it != known.end()) return it->second;
  cudaLaunchConfig_t config =
      launch_config(dim3(8), dim3(static_cast<unsigned>(threads)), smem, nullptr, nullptr, 0);
  int size = 0;
  cudaError_t err = cudaOccupancyMaxPotentialClusterSize(&size, kernel, &config);
  const int cap = info.non_portable ? 16 : 8;
  size = size > cap ? cap : size;
  if (err == cudaSuccess && size > 0) {  // the size is possible; is one such cluster resident?
    int clusters = 0;
    err = active_clusters(kernel, device, threads, smem, size, clusters);
    if (clusters == 0) size = 0;
  }
  if (err != cudaSuccess) {  // not remembered: a later call asks again
    (void)cudaGetLastError();
    KVTIER_LOG(kWarn, "the occupancy of a thread block cluster kernel could not be queried (",
               cudaGetErrorString(err), "): this launch takes its path without clusters");
    return 0;
  }
  if (size == 0) {
    KVTIER_LOG(kInfo, "no thread block cluster of this kernel fits (", threads, " threads, ", smem,
               " bytes of dynamic shared memory): its caller takes its path without clusters");
  }
  known.emplace(key, size);
  return size;
}

int max_active_clusters(const void* kernel, int threads, size_t smem, int cluster) {
  int device = 0;
  KVTIER_CUDA_CHECK(cudaGetDevice(&device));
  if (!device_supported(device) || cluster < 1) return 0;
  int clusters = 0;
  if (active_clusters(kernel, device, threads, smem, cluster, clusters) != cudaSuccess) return 0;
  return clusters;
}

}  // namespace kvtier::kernels::detail
