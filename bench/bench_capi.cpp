// A C ABI over kernels that Python benchmarks load with ctypes, so a PyTorch baseline and the
// kvtier kernel are timed in the same process, on the same tensors and stream.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>

#include "kernels/kmeans.h"

namespace {
kvtier::kernels::KmeansParams kmeans_params(int32_t problems, int64_t n, int32_t dim, int32_t k,
                                            int32_t max_iters, float rel_tol, int32_t dtype,
                                            uint64_t seed) {
  kvtier::kernels::KmeansParams p;
  p.num_problems = problems;
  p.num_points = n;
  p.dim = dim;
  p.num_clusters = k;
  p.max_iters = max_iters;
  p.rel_tol = rel_tol;
  p.dtype = static_cast<kvtier::DType>(dtype);
  p.seed = seed;
  return p;
}
}  // namespace

extern "C" {

/// Workspace bytes for kvtier_bench_kmeans with the same arguments; 0 on error.
size_t kvtier_bench_kmeans_workspace(int32_t problems, int64_t n, int32_t dim, int32_t k,
                                     int32_t max_iters, float rel_tol, int32_t dtype,
                                     uint64_t seed) {
#if KVTIER_WITH_CUDA
  try {
    return kvtier::kernels::kmeans_workspace_bytes(
        kmeans_params(problems, n, dim, k, max_iters, rel_tol, dtype, seed));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvtier_bench_kmeans_workspace: %s\n", e.what());
  }
#endif
  return 0;
}

/// Runs launch_kmeans on device pointers, ordered on `stream`. dtype: 0 fp16, 1 bf16, 2 fp32.
/// Returns 0 on success, -1 on error (printed).
int kvtier_bench_kmeans(int32_t problems, int64_t n, int32_t dim, int32_t k, int32_t max_iters,
                        float rel_tol, int32_t dtype, uint64_t seed, const void* points,
                        float* centroids, int32_t* labels, int32_t* sizes, void* workspace,
                        double* objective, int32_t* iterations, void* stream) {
#if KVTIER_WITH_CUDA
  try {
    kvtier::kernels::launch_kmeans(
        kmeans_params(problems, n, dim, k, max_iters, rel_tol, dtype, seed), points, centroids,
        labels, sizes, workspace, objective, iterations, nullptr,
        static_cast<cudaStream_t>(stream));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvtier_bench_kmeans: %s\n", e.what());
  }
#else
  (void)problems, (void)n, (void)dim, (void)k, (void)max_iters, (void)rel_tol, (void)dtype,
      (void)seed, (void)points, (void)centroids, (void)labels, (void)sizes, (void)workspace,
      (void)objective, (void)iterations, (void)stream;
  std::fprintf(stderr, "kvtier_bench_kmeans: built without CUDA\n");
#endif
  return -1;
}

}  // extern "C"
