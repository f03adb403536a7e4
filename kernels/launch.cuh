// Programmatic dependent launch (PDL, Hopper and later) for the kernels of the decode path.
//
// A decode step is a chain of small kernels (a recall layer: the prologue, scoring and selection
// with its chunk lists, attention with its split merge), each a few microseconds, so the time
// between one kernel's end and the next one's first instruction is a large share of the step.
// Launched with launch_pdl, a kernel may be scheduled while its predecessor in the stream still
// runs: its blocks become resident and wait in pdl_wait() until the predecessor has finished and
// its memory is visible. Captured into a CUDA graph, the launches become programmatic edges.
//
// The contract, for every kernel launched with launch_pdl: call pdl_wait() before the first
// access to global memory that an earlier kernel may write or read (the kernels here call it
// first thing), then pdl_launch_dependents() to let the next kernel be scheduled. Without a
// programmatic launch, or on devices before sm_90, both are no-ops and the launch is an ordinary
// one.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "memory/core/check.h"

namespace kvtier::kernels {

/// Waits until the grids this one depends on have completed and their writes are visible.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/// Lets the next kernel of the stream be scheduled once every block of this one has called it
/// (or exited).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

namespace detail {
/// Whether `kernel` may be launched programmatically: the current device takes such launches
/// (compute capability 9.0 or later) and the kernel's code was compiled for sm_90 or later, so
/// its pdl_wait() is really there (a build for an older target, JIT-compiled on a Hopper, has it
/// compiled out and must launch in order). Looked up once per device and kernel.
bool pdl_enabled(const void* kernel);

/// A launch configuration with `count` attributes from `attrs` (which must outlive the launch).
inline cudaLaunchConfig_t launch_config(dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                        cudaLaunchAttribute* attrs, unsigned count) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = count;
  return config;
}

/// The launch attribute of a programmatic dependent launch.
inline void set_pdl(cudaLaunchAttribute& a) {
  a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  a.val.programmaticStreamSerializationAllowed = 1;
}

/// The launch attribute of thread block clusters of `x` blocks along x.
inline void set_cluster(cudaLaunchAttribute& a, unsigned x) {
  a.id = cudaLaunchAttributeClusterDimension;
  a.val.clusterDim.x = x;
  a.val.clusterDim.y = 1;
  a.val.clusterDim.z = 1;
}

/// The current device's multiprocessor count (looked up once per device).
int sm_count();

/// A kernel launched in thread block clusters, prepared once per device: its dynamic shared
/// memory cap set to the most the device allows beside its static shared memory (max_dynamic),
/// and clusters beyond the portable 8 allowed where the device takes that (non_portable).
struct ClusterKernelInfo {
  size_t static_smem = 0, max_dynamic = 0;
  bool non_portable = false;
};
const ClusterKernelInfo& cluster_kernel_info(const void* kernel);

/// The largest thread block cluster (along x), at most 16 (8 without non_portable), with which
/// `kernel` can be launched on the current device with `threads` threads and `smem` bytes of
/// dynamic shared memory per block; 0 if none (or if the occupancy query fails, which is logged
/// and asked again next time). Remembered per kernel, device and shape.
int max_cluster_size(const void* kernel, int threads, size_t smem);
/// How many clusters of `cluster` blocks of `kernel` (`threads` threads, `smem` bytes of dynamic
/// shared memory each) the current device holds at once (cudaOccupancyMaxActiveClusters); 0
/// without sm_90 or if the query fails. Remembered per kernel, device and shape.
int max_active_clusters(const void* kernel, int threads, size_t smem, int cluster);
}  // namespace detail

/// kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent launch where the
/// device supports it (see the contract above), else an ordinary launch.
template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args&&... args) {
  cudaLaunchAttribute attr[1];
  detail::set_pdl(attr[0]);
  cudaLaunchConfig_t config =
      detail::launch_config(grid, block, smem, stream, attr,
                            detail::pdl_enabled(reinterpret_cast<const void*>(kernel)) ? 1 : 0);
  KVTIER_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

/// launch_pdl for a kernel of thread block clusters of `cluster` blocks along x (sm_90 and later:
/// the caller checks detail::pdl_enabled(kernel) first, which a cluster launch requires too).
/// Returns the launch's status (cleared from the thread's last error) for the caller to report.
template <typename... Params, typename... Args>
cudaError_t launch_pdl_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                               cudaStream_t stream, unsigned cluster, Args&&... args) {
  cudaLaunchAttribute attr[2];
  detail::set_cluster(attr[0], cluster);
  detail::set_pdl(attr[1]);
  cudaLaunchConfig_t config = detail::launch_config(grid, block, smem, stream, attr, 2);
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err;
}

}  // namespace kvtier::kernels
