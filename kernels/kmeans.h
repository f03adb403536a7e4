// Spherical k-means over keys, batched: many independent problems (one per layer and KV head, or
// per sequence, layer and KV head) in one call. Cosine assignment; centroid = normalized mean of
// its points' unit vectors, accumulated in fp32 (ClusterKV's code accumulates in fp16 atomics,
// which loses mass once clusters hold thousands of rows); empty clusters re-seeded with the
// worst-fitting points; a maximum iteration count and a relative-objective stopping test.
//   kmeans_ref   plain loops, double accumulation, deterministic: the specification
//   kmeans_cpu   the same algorithm on oneTBB (problems and points in parallel)
//   launch_kmeans  CUDA, ordered on a stream
// The objective is sum over points of (1 - cos(point, its centroid)); it never increases.
// Initial centres: kRandomRows (k distinct rows, drawn on the host) or kPlusPlus (greedy
// k-means++ over a strided sample of init_sample rows: the first centre uniform, then for each
// next one 2 + ln(k) candidates drawn with probability proportional to 1 - best cos, keeping the
// first whose drop of the total is within 1e-5 (relative) of the largest, so that exact ties
// break alike on every backend). k-means++'s random numbers are counter-based: draw t for
// centre j of problem p is a splitmix64-style hash of (seed, p, j, t) (kernels/kmeans_common.h),
// deterministic in (seed, problem), so the GPU computes all of a step's draws at once and every
// backend picks the same rows up to floating-point summation order (the CPU paths share the
// reference's code and pick exactly the same rows). launch_kmeans runs k-means++ on the device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "memory/core/cuda_fwd.h"
#include "memory/core/dtype.h"

namespace kvtier::kernels {

enum class KmeansInit : uint8_t {
  kRandomRows,  ///< k distinct rows drawn uniformly (seeded)
  kPlusPlus,    ///< greedy k-means++ (D^2 sampling on 1 - cos) over init_sample rows
};

/// What the centroids output holds once the labels are final.
enum class KmeansCentroids : uint8_t {
  kUnit,  ///< the unit centroids the assignment used (normalized mean of the unit rows)
  /// Each non-empty cluster's plain mean of its rows, not normalized: a query's dot product with
  /// it is the cluster's mean logit, which ranks clusters for recall better than the direction
  /// alone where the rows' norms differ, as keys' do. An empty cluster keeps its unit centroid.
  kMeanRow,
};

/// How the GPU assignment avoids work (the CPU paths always scan every row).
enum class KmeansPruning : uint8_t {
  kBounds,  ///< skip rows whose label provably cannot change (angle bounds vs centroid drift)
  kNone,    ///< scan every row against every centroid each iteration
};

struct KmeansParams {
  int32_t num_problems = 1;
  int64_t num_points = 0;    ///< n, rows per problem (problems are stored with this stride)
  int32_t dim = 0;           ///< 64 or 128 (also 256)
  int32_t num_clusters = 0;  ///< k requested; the effective k is min(k, n), see below
  int32_t max_iters = 20;    ///< Lloyd updates at most
  float rel_tol = 1e-4f;     ///< stop when (prev - obj) <= rel_tol * prev
  KmeansInit init = KmeansInit::kRandomRows;
  /// Rows k-means++ draws from: min(n, init_sample) rows, evenly strided (at least k of them).
  /// launch_kmeans keeps them in shared memory: at most 8 blocks' worth (about 280K rows on an
  /// H100 at dim 128).
  int64_t init_sample = 16384;
  uint64_t seed = 0;
  DType dtype = DType::kF32;  ///< element type of the points
  /// Clusters between consecutive problems in centroids and sizes; 0 means num_clusters. For
  /// incremental clustering (a window of W new rows into C+ clusters appended to an index of C
  /// clusters), pass centroids + C * dim, sizes + C and the index's capacity as the stride.
  int32_t centroid_stride = 0;
  KmeansPruning pruning = KmeansPruning::kBounds;   ///< GPU only; results are the same either way
  KmeansCentroids output = KmeansCentroids::kUnit;  ///< labels and sizes are the same either way
};

inline int32_t kmeans_centroid_stride(const KmeansParams& p) {
  return p.centroid_stride > 0 ? p.centroid_stride : p.num_clusters;
}

/// Effective cluster count: min(num_clusters, num_points). Clusters past it come out empty
/// (size 0, zero centroid) and no label points at them.
inline int32_t kmeans_effective_k(const KmeansParams& p) {
  return static_cast<int32_t>(p.num_points < p.num_clusters ? p.num_points : p.num_clusters);
}

/// Throws InvalidArgumentError naming the bad field.
void check_kmeans_params(const KmeansParams& p);

/// Per-problem result summary.
struct KmeansReport {
  double objective = 0;         ///< final sum of (1 - cos)
  int32_t iterations = 0;       ///< Lloyd updates done
  std::vector<double> history;  ///< objective after the initial assignment and after each update
};

/// Initial centroid rows [num_problems, k_eff] for kRandomRows: distinct, uniformly drawn, a
/// function of (seed, problem) only, so every backend starts from the same rows.
std::vector<int32_t> kmeans_random_init_rows(const KmeansParams& p);

/// Reference. points [num_problems, num_points, dim] of p.dtype (host); outputs (host):
/// centroids [num_problems, stride, dim] as p.output says (first num_clusters of each problem
/// written), labels [num_problems, num_points] in [0, k_eff), sizes [num_problems, stride].
/// Throws InvalidArgumentError on NaN or Inf in the points, naming problem, row and column.
std::vector<KmeansReport> kmeans_ref(const KmeansParams& p, const void* points, float* centroids,
                                     int32_t* labels, int32_t* sizes);

/// The same contract and result (up to floating-point summation order) on oneTBB.
std::vector<KmeansReport> kmeans_cpu(const KmeansParams& p, const void* points, float* centroids,
                                     int32_t* labels, int32_t* sizes);

#if KVTIER_WITH_CUDA
/// Device workspace launch_kmeans needs, in bytes (k-means++ needs none beyond it: its state
/// lives in shared memory).
size_t kmeans_workspace_bytes(const KmeansParams& p);

/// Same contract on device pointers, ordered on `stream`; no host synchronization. `workspace`
/// holds kmeans_workspace_bytes(p) bytes. objective_dev [num_problems] (final objective),
/// iterations_dev [num_problems], nonfinite_dev [1] (set to 1 if any input is NaN or Inf: then
/// the outputs are meaningless) may be null. Initial rows for kRandomRows are uploaded from the
/// host (kmeans_random_init_rows), so the call is asynchronous after that small copy; kPlusPlus
/// chooses them on the device (one kernel for all problems, thread-block clusters of up to 8
/// blocks per problem on sm_90), with no copy. Throws InvalidArgumentError, before enqueuing
/// anything, if the k-means++ sample does not fit in shared memory (see init_sample).
void launch_kmeans(const KmeansParams& p, const void* points, float* centroids, int32_t* labels,
                   int32_t* sizes, void* workspace, double* objective_dev, int32_t* iterations_dev,
                   int32_t* nonfinite_dev, cudaStream_t stream);
#endif

}  // namespace kvtier::kernels
