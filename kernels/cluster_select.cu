// Launchers of cluster scoring and selection: head_dim / head-tile / aggregation dispatch for the
// scoring kernel, the block tiers (radix select) and the segmented-sort fallback for selection.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <limits>
#include <mutex>
#include <type_traits>

#include "kernels/cluster_select_kernels.cuh"
#include "kernels/dispatch.h"
#include "memory/core/check.h"
#include "memory/core/log.h"

namespace kvtier::kernels {

namespace {

using cluster_select_device::kScoreThreads;
using cluster_select_device::kScoreWarps;
using cluster_select_device::kSplitThreads;
using cluster_select_device::kSplitTile;

/// Threads and items per thread of the sorted-walk kernel of the segmented path.
constexpr int kWalkThreads = 256;
constexpr int kWalkItems = 4;

constexpr size_t kDefaultSmemBytes = 48 << 10;

size_t max_dynamic_smem_bytes() {
  int device = 0, bytes = 0;
  KVTIER_CUDA_CHECK(cudaGetDevice(&device));
  KVTIER_CUDA_CHECK(
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(bytes);
}

template <typename Kernel>
void launch_with_smem(Kernel kernel, int grid, int threads, size_t smem, cudaStream_t stream,
                      const ScoreKernelParams& kp) {
  if (smem > kDefaultSmemBytes) {
    KVTIER_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)));
  }
  kernel<<<grid, threads, smem, stream>>>(kp);
  KVTIER_CUDA_CHECK_LAUNCH("score_clusters_kernel");
}

void reset_nonfinite_flag(int32_t* flag, cudaStream_t stream) {
  if (flag != nullptr) KVTIER_CUDA_CHECK(cudaMemsetAsync(flag, 0xff, sizeof(int32_t), stream));
}

void check_aligned(const void* ptr, const char* name) {
  KVTIER_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, name, " must be 16-byte aligned, got ",
               ptr);
}

void score_impl(const ClusterSelectParams& p, const ClusterSelectTensors& t, cudaStream_t stream) {
  check_aligned(t.queries, "queries");
  check_aligned(t.centroids, "centroids");
  const ScoreKernelParams kp = detail::score_kernel_params(p, t);
  const size_t G = static_cast<size_t>(p.group_size);
  const size_t base_smem = (2 * kScoreWarps * G + 2 * G) * sizeof(float);
  const size_t cache_smem =
      base_smem + G * (static_cast<size_t>(p.max_clusters) + 1) * sizeof(float);
  const size_t smem_limit = max_dynamic_smem_bytes();
  KVTIER_CHECK(base_smem <= smem_limit, "group_size ", p.group_size, " needs ", base_smem,
               " bytes of shared memory; the device allows ", smem_limit);
  const bool cache = cache_smem <= smem_limit;
  dispatch_head_dim(p.head_dim, [&](auto dim) {
    constexpr int kDim = decltype(dim)::value;
    dispatch_head_tile(p.group_size, [&](auto tile) {
      constexpr int kTile = decltype(tile)::value;
      if (p.aggregation == ScoreAggregation::kMax) {
        launch_with_smem(score_clusters_kernel<kDim, kTile, ScoreAggregation::kMax, false>,
                         p.num_problems, kScoreThreads, base_smem, stream, kp);
      } else if (cache) {
        launch_with_smem(score_clusters_kernel<kDim, kTile, ScoreAggregation::kSoftmaxSum, true>,
                         p.num_problems, kScoreThreads, cache_smem, stream, kp);
      } else {
        launch_with_smem(score_clusters_kernel<kDim, kTile, ScoreAggregation::kSoftmaxSum, false>,
                         p.num_problems, kScoreThreads, base_smem, stream, kp);
      }
    });
  });
}

/// Workspace of the segmented path, each piece 256-byte aligned.
struct SegmentedLayout {
  size_t keys_in = 0, keys_out = 0, offsets = 0, bad = 0, temp = 0;
  size_t temp_bytes = 0, total = 0;
};

size_t align_up(size_t x) { return (x + 255) & ~size_t{255}; }

detail::SplitLayout split_layout(const ClusterSelectParams& p) {
  const size_t tiles = static_cast<size_t>((p.max_clusters + kSplitTile - 1) / kSplitTile);
  detail::SplitLayout l;
  l.partials = align_up(static_cast<size_t>(p.num_problems) * p.group_size * p.max_clusters * 4);
  l.total = l.partials + align_up(static_cast<size_t>(p.num_problems) * tiles * p.group_size * 8);
  return l;
}

SegmentedLayout segmented_layout(const ClusterSelectParams& p) {
  const int64_t items = static_cast<int64_t>(p.num_problems) * p.max_clusters;
  KVTIER_CHECK(items <= std::numeric_limits<int>::max(), "num_problems * max_clusters = ", items,
               " exceeds the segmented sort's limit of 2^31 - 1 (num_problems ", p.num_problems,
               ", max_clusters ", p.max_clusters, ")");
  SegmentedLayout l;
  const size_t key_bytes = align_up(static_cast<size_t>(items) * sizeof(uint64_t));
  l.keys_in = 0;
  l.keys_out = l.keys_in + key_bytes;
  l.offsets = l.keys_out + key_bytes;
  l.bad = l.offsets + align_up((static_cast<size_t>(p.num_problems) + 1) * sizeof(int32_t));
  l.temp = l.bad + align_up(static_cast<size_t>(p.num_problems) * sizeof(int32_t));
  KVTIER_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(
      nullptr, l.temp_bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
      static_cast<int>(items), p.num_problems, static_cast<const int32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), 0, 32 + detail::cluster_id_bits(p.max_clusters)));
  l.total = l.temp + align_up(l.temp_bytes);
  return l;
}

/// Throws unless `workspace` can hold what the selection needs (nothing below the block-sort
/// limit). Called before anything is launched.
void check_workspace(const ClusterSelectParams& p, const void* workspace, size_t workspace_bytes) {
  if (p.max_clusters <= kMaxBlockSortClusters) return;
  const size_t need = segmented_layout(p).total;
  KVTIER_CHECK(workspace != nullptr && workspace_bytes >= need, "workspace of ", workspace_bytes,
               " bytes is smaller than the ", need,
               " that select_clusters_workspace_bytes() asks for (max_clusters ", p.max_clusters,
               ")");
}

void select_impl(const ClusterSelectParams& p, const ClusterSelectTensors& t, void* workspace,
                 cudaStream_t stream) {
  SelectKernelParams kp = detail::select_kernel_params(p, t);
  const int grid = p.num_problems;
  if (p.max_clusters <= kMaxBlockSortClusters) {
    detail::launch_select_block(p, kp, cluster_select_device::NoSelectEpilogue{}, stream);
  } else {
    const SegmentedLayout l = segmented_layout(p);
    auto* base = static_cast<std::byte*>(workspace);
    auto* keys_in = reinterpret_cast<uint64_t*>(base + l.keys_in);
    auto* keys_out = reinterpret_cast<uint64_t*>(base + l.keys_out);
    auto* offsets = reinterpret_cast<int32_t*>(base + l.offsets);
    auto* bad = reinterpret_cast<int32_t*>(base + l.bad);
    build_select_keys_kernel<<<grid, 256, 0, stream>>>(kp, p.num_problems, keys_in, offsets, bad);
    KVTIER_CUDA_CHECK_LAUNCH("build_select_keys_kernel");
    size_t temp_bytes = l.temp_bytes;
    KVTIER_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(
        base + l.temp, temp_bytes, keys_in, keys_out,
        static_cast<int>(static_cast<int64_t>(p.num_problems) * p.max_clusters), p.num_problems,
        static_cast<const int32_t*>(offsets), static_cast<const int32_t*>(offsets + 1), 0,
        32 + kp.id_bits, stream));
    KVTIER_CUDA_CHECK_LAUNCH("cub::DeviceSegmentedRadixSort::SortKeysDescending");
    kp.sorted_keys = keys_out;
    kp.problem_bad = bad;
    select_clusters_sorted_kernel<kWalkThreads, kWalkItems><<<grid, kWalkThreads, 0, stream>>>(kp);
    KVTIER_CUDA_CHECK_LAUNCH("select_clusters_sorted_kernel");
  }
}

}  // namespace

namespace {

// ---- split scoring: many blocks per problem, for batches too small to fill the GPU ----

// grid: (num_problems), block kSplitThreads: per head max and sum over the problem's logits (one
// warp per head, shuffles only), then scores[j] = sum_g exp(l_gj - m_g) / s_g (kSoftmaxSum) or
// max_g l_gj (kMax); -inf past n.
template <ScoreAggregation kAgg>
__global__ void __launch_bounds__(kSplitThreads)
    split_finish_kernel(ScoreKernelParams kp, const float* logits) {
  const int p = blockIdx.x, G = kp.group_size;
  const int n = min(max(kp.num_clusters[p], 0), kp.max_clusters);
  float* out = kp.scores + static_cast<size_t>(p) * kp.max_clusters;
  for (int j = n + threadIdx.x; j < kp.max_clusters; j += blockDim.x) out[j] = -INFINITY;
  if (n == 0) return;
  __shared__ float head_m[32], head_s[32];
  __shared__ int bad;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  const float* lp = logits + static_cast<size_t>(p) * G * kp.max_clusters;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int g = warp; g < G; g += kSplitThreads / 32) {
    const float* row = lp + static_cast<size_t>(g) * kp.max_clusters;
    float m = -INFINITY;
    bool my_bad = false;
    for (int j = lane; j < n; j += 32) {
      const float v = row[j];
      my_bad = my_bad || !isfinite(v);
      m = fmaxf(m, v);
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (__any_sync(0xffffffffu, my_bad) && lane == 0) bad = 1;
    float sum = 0.f;
    if constexpr (kAgg == ScoreAggregation::kSoftmaxSum) {
      for (int j = lane; j < n; j += 32) sum += __expf(row[j] - m);
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
    if (lane == 0) head_m[g] = m, head_s[g] = sum;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float v = kAgg == ScoreAggregation::kMax ? -INFINITY : 0.f;
    for (int g = 0; g < G; ++g) {
      const float l = lp[static_cast<size_t>(g) * kp.max_clusters + j];
      if constexpr (kAgg == ScoreAggregation::kMax) {
        v = fmaxf(v, l);
      } else {
        v += __expf(l - head_m[g]) / head_s[g];
      }
    }
    out[j] = bad ? NAN : v;
  }
  if (bad && threadIdx.x == 0 && kp.nonfinite_problem) {
    atomicMin(reinterpret_cast<unsigned int*>(kp.nonfinite_problem), static_cast<unsigned>(p));
  }
}

}  // namespace

size_t score_clusters_split_workspace_bytes(const ClusterSelectParams& p) {
  check_score_params(p);
  return static_cast<size_t>(p.num_problems) * p.group_size * p.max_clusters * sizeof(float);
}

void launch_score_clusters_split(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                                 void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  check_score_params(p);
  detail::check_score_tensors(p, t);
  KVTIER_CHECK(p.group_size <= 32, "split scoring supports group_size <= 32, got ", p.group_size);
  if (p.num_problems > 0) {
    check_aligned(t.queries, "queries");  // 16-byte loads
    check_aligned(t.centroids, "centroids");
  }
  reset_nonfinite_flag(t.nonfinite_problem, stream);
  if (p.num_problems == 0) return;
  const size_t need = score_clusters_split_workspace_bytes(p);
  KVTIER_CHECK(workspace != nullptr && workspace_bytes >= need, "split scoring needs ", need,
               " bytes of workspace, got ", workspace_bytes);
  const ScoreKernelParams kp = detail::score_kernel_params(p, t);
  float* logits = static_cast<float*>(workspace);
  detail::launch_split_logits(p, t, logits, nullptr, stream);
  if (p.aggregation == ScoreAggregation::kMax) {
    split_finish_kernel<ScoreAggregation::kMax>
        <<<p.num_problems, kSplitThreads, 0, stream>>>(kp, logits);
  } else {
    split_finish_kernel<ScoreAggregation::kSoftmaxSum>
        <<<p.num_problems, kSplitThreads, 0, stream>>>(kp, logits);
  }
  KVTIER_CUDA_CHECK_LAUNCH("split_finish_kernel");
}

void launch_score_clusters(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                           cudaStream_t stream) {
  check_score_params(p);
  detail::check_score_tensors(p, t);
  reset_nonfinite_flag(t.nonfinite_problem, stream);
  if (p.num_problems == 0) return;
  score_impl(p, t, stream);
}

size_t select_clusters_workspace_bytes(const ClusterSelectParams& p) {
  check_select_params(p);
  if (p.max_clusters <= kMaxBlockSortClusters || p.num_problems == 0) return 0;
  return segmented_layout(p).total;
}

void launch_select_clusters(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                            void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  check_select_params(p);
  detail::check_select_tensors(p, t);
  if (p.num_problems == 0) {
    reset_nonfinite_flag(t.nonfinite_problem, stream);
    return;
  }
  check_workspace(p, workspace, workspace_bytes);
  reset_nonfinite_flag(t.nonfinite_problem, stream);
  select_impl(p, t, workspace, stream);
}

void launch_score_and_select_clusters(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                                      void* workspace, size_t workspace_bytes,
                                      cudaStream_t stream) {
  check_score_params(p);
  check_select_params(p);
  detail::check_score_tensors(p, t);
  detail::check_select_tensors(p, t);
  if (p.num_problems == 0) {
    reset_nonfinite_flag(t.nonfinite_problem, stream);
    return;
  }
  check_workspace(p, workspace, workspace_bytes);
  reset_nonfinite_flag(t.nonfinite_problem, stream);
  score_impl(p, t, stream);
  select_impl(p, t, workspace, stream);
}

namespace {
__global__ void round_centroids_fp16_kernel(float* centroids, __half* copy, int64_t rows,
                                            int64_t cols, int64_t stride) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t at = i / cols * stride + i % cols;
    const __half h = __float2half_rn(centroids[at]);
    centroids[at] = __half2float(h);
    if (copy != nullptr) copy[at] = h;
  }
}
}  // namespace

void launch_round_centroids_fp16(float* centroids, uint16_t* copy, int64_t rows, int64_t cols,
                                 int64_t stride, cudaStream_t stream) {
  KVTIER_CHECK(rows >= 0 && cols >= 0 && stride >= cols, "launch_round_centroids_fp16: rows ", rows,
               ", cols ", cols, ", stride ", stride);
  const int64_t total = rows * cols;
  if (total == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks =
      std::min<int64_t>((total + kThreads - 1) / kThreads, 4 * detail::sm_count());
  round_centroids_fp16_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      centroids, reinterpret_cast<__half*>(copy), rows, cols, stride);
  KVTIER_CUDA_CHECK_LAUNCH("round_centroids_fp16_kernel");
}

namespace detail {

SplitLayout check_score_select_split(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                                     const void* workspace, size_t workspace_bytes) {
  check_score_params(p);
  check_select_params(p);
  KVTIER_CHECK(p.group_size <= cluster_select_device::kMaxSplitGroup,
               "split scoring supports group_size <= ", cluster_select_device::kMaxSplitGroup,
               ", got ", p.group_size);
  KVTIER_CHECK(p.max_clusters <= kMaxBlockSortClusters,
               "split score-and-select supports max_clusters <= ", kMaxBlockSortClusters, ", got ",
               p.max_clusters);
  const SplitLayout l = split_layout(p);
  if (p.num_problems == 0) return l;
  KVTIER_CHECK(t.queries != nullptr && t.centroids != nullptr,
               "split score-and-select: queries and centroids must not be null");
  check_select_inputs_and_outputs(p, t);
  check_aligned(t.queries, "queries");
  check_aligned(t.centroids, "centroids");
  if (t.centroids_f16 != nullptr) check_aligned(t.centroids_f16, "centroids_f16");
  KVTIER_CHECK(workspace != nullptr && workspace_bytes >= l.total, "split score-and-select needs ",
               l.total, " bytes of workspace, got ", workspace_bytes);
  KVTIER_CHECK(reinterpret_cast<uintptr_t>(workspace) % 256 == 0,
               "split score-and-select: the workspace must be 256-byte aligned");
  return l;
}

ScoreKernelParams score_kernel_params(const ClusterSelectParams& p, const ClusterSelectTensors& t) {
  return ScoreKernelParams{t.queries,
                           t.centroids,
                           reinterpret_cast<const __half*>(t.centroids_f16),
                           t.num_clusters,
                           t.centroid_rows,
                           t.scores,
                           t.nonfinite_problem,
                           p.group_size,
                           p.max_clusters,
                           cluster_score_scale(p)};
}

int cluster_select_max_size() {
  const char* v = std::getenv("KVTIER_CLUSTER_SELECT");
  if (v == nullptr || *v == '\0') return 8;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  if (end == v || *end != '\0' || n < 0) {
    static std::once_flag warned;
    std::call_once(warned, [&] {
      KVTIER_LOG(kWarn, "KVTIER_CLUSTER_SELECT=", v,
                 " is not a cluster size (0 to 16): the default, 8, is used");
    });
    return 8;
  }
  return n >= 16 ? 16 : static_cast<int>(n);
}

bool select_attend_enabled() {
  const char* v = std::getenv("KVTIER_SELECT_ATTEND");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "1") == 0) return true;
  if (std::strcmp(v, "0") == 0) return false;
  static std::once_flag warned;
  std::call_once(warned, [&] {
    KVTIER_LOG(kWarn, "KVTIER_SELECT_ATTEND=", v, " is neither 0 nor 1: 1 is used");
  });
  return true;
}

int score_select_cluster_size(const ClusterSelectParams& p) {
  int cluster = 0;
  dispatch_score_select_cluster<cluster_select_device::NoSelectEpilogue>(p, [&](auto dim,
                                                                                auto kernel,
                                                                                int threads) {
    constexpr int kDim = decltype(dim)::value;
    cluster =
        plan_score_select_cluster<kDim>(p, reinterpret_cast<const void*>(kernel), threads).cluster;
  });
  return cluster;
}

void launch_split_logits(const ClusterSelectParams& p, const ClusterSelectTensors& t, float* logits,
                         void* partials, cudaStream_t stream) {
  if (p.num_problems == 0) return;
  const ScoreKernelParams kp = detail::score_kernel_params(p, t);
  const dim3 grid(static_cast<unsigned>(p.num_problems),
                  static_cast<unsigned>((p.max_clusters + kSplitTile - 1) / kSplitTile));
  dispatch_head_dim(p.head_dim, [&](auto dim) {
    constexpr int kDim = decltype(dim)::value;
    launch_pdl(split_logits_kernel<kDim>, grid, kSplitThreads, p.group_size * kDim * sizeof(float),
               stream, kp, logits, static_cast<float2*>(partials));
  });
  KVTIER_CUDA_CHECK_LAUNCH("split_logits_kernel");
}

}  // namespace detail

size_t score_select_split_workspace_bytes(const ClusterSelectParams& p) {
  check_score_params(p);
  check_select_params(p);
  return split_layout(p).total;
}

void launch_score_select_split(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  reset_nonfinite_flag(p.num_problems > 0 ? t.nonfinite_problem : nullptr, stream);
  detail::launch_score_select_split_with(p, t, workspace, workspace_bytes,
                                         cluster_select_device::NoSelectEpilogue{}, stream);
}

}  // namespace kvtier::kernels
