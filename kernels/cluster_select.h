// Cluster scoring and budgeted selection: ClusterKV's per-decode-step recall decision.
//   score_clusters_*    aggregated score of every cluster from the query heads of its GQA group
//   select_clusters_*   whole clusters in descending score until a token budget is met
// Each step exists as a reference (_ref: the specification), a oneTBB host path (_cpu) and a CUDA
// launcher (launch_*), all on one contract: a params struct, a tensors struct of raw pointers and,
// on the GPU, a stream. The ranking is exact with no cap on the number of clusters (ClusterKV's
// published ranking kernel returns only ~27% of the true top-20 and stops at 256 clusters).
// Nothing here holds state: concurrent calls are safe when their outputs do not overlap.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "memory/core/cuda_fwd.h"
#include "memory/core/status.h"

namespace kvtier::kernels {

/// How the G query heads of a group combine their per-cluster logits s_g(j).
enum class ScoreAggregation : uint8_t {
  kSoftmaxSum,  ///< sum over g of softmax_j(s_g(j)) over the problem's valid clusters
  kMax,         ///< max over g of s_g(j)
};

/// What happens to the first cluster, in score order, that does not fit the remaining budget.
enum class BudgetOverflow : uint8_t {
  kTruncate,  ///< take only the remaining rows of it, then stop (total = min(budget, context))
  kSkip,      ///< stop there: it is not taken, and no later (smaller) cluster is tried either
};

/// Largest max_clusters that the GPU selection handles inside one thread block (radix select);
/// above it the selection uses cub::DeviceSegmentedRadixSort and a caller-provided workspace.
constexpr int32_t kMaxBlockSortClusters = 4096;

/// Shapes and options. A "problem" is one (sequence, KV head). Every per-cluster array has a row
/// stride of max_clusters; only the first num_clusters[p] entries of row p are valid.
struct ClusterSelectParams {
  int32_t num_problems = 0;  ///< sequences x KV heads
  int32_t group_size = 0;    ///< G: query heads per KV head (>= 1); scoring only
  int32_t head_dim = 0;      ///< 64, 128 or 256; scoring only
  int32_t max_clusters = 0;  ///< padded cluster count per problem (>= 1)
  float scale = 0.f;         ///< logit scale s = scale * dot(q, c); 0 means 1/sqrt(head_dim)
  ScoreAggregation aggregation = ScoreAggregation::kSoftmaxSum;
  BudgetOverflow overflow = BudgetOverflow::kTruncate;
};

/// The arrays of one call: host pointers for the _ref/_cpu paths, device pointers for launch_*.
/// Scoring reads queries, centroids, num_clusters and writes scores; selection reads scores,
/// num_clusters, cluster_sizes, budgets and writes the four selection outputs. Fields a step does
/// not use may stay null. Nothing is owned.
struct ClusterSelectTensors {
  const float* queries = nullptr;    ///< [num_problems, group_size, head_dim]
  const float* centroids = nullptr;  ///< [num_problems, max_clusters, head_dim]
  /// Optional [num_problems]: problem p scores the centroids of row centroid_rows[p] of
  /// `centroids` instead of row p (an engine keeps one centroid table per layer and scores a
  /// batch's rows of it in place). Rows must be >= 0 and within the table; not validated.
  const int32_t* centroid_rows = nullptr;
  /// Optional, GPU only: the same centroids as fp16 bit patterns, same layout and rows. Every
  /// value of `centroids` that a call reads must be exactly representable in fp16 and equal to
  /// its copy here (round_centroids_fp16_cpu / launch_round_centroids_fp16 make both). The
  /// kernels of thread block clusters (the
  /// split score-and-select and the engine's fused recall kernel) then read this copy, half the
  /// bytes; the other paths and the CPU read `centroids`, and all score the same values.
  const uint16_t* centroids_f16 = nullptr;
  const int32_t* num_clusters = nullptr;   ///< [num_problems], each in [0, max_clusters]
  const int32_t* cluster_sizes = nullptr;  ///< [num_problems, max_clusters] rows (tokens), >= 0
  /// Optional [num_problems]: problem p's sizes are row cluster_size_rows[p] of cluster_sizes
  /// instead of row p (like centroid_rows: an engine's per-layer size table, read in place).
  const int32_t* cluster_size_rows = nullptr;
  const int32_t* budgets = nullptr;  ///< [num_problems] tokens to recall, >= 0
  /// [num_problems, max_clusters]: written by scoring, read by selection. Padding entries
  /// (j >= num_clusters[p]) are written as -inf and never read.
  float* scores = nullptr;
  /// [num_problems, max_clusters] cluster ids in selection order (descending score, ties to the
  /// lower id); -1 from num_selected[p] on.
  int32_t* selected_ids = nullptr;
  /// [num_problems, max_clusters] rows taken from each selected cluster: its full size, except the
  /// last one under kTruncate; 0 from num_selected[p] on.
  int32_t* selected_rows = nullptr;
  int32_t* num_selected = nullptr;  ///< [num_problems] clusters selected
  int32_t* total_rows = nullptr;    ///< [num_problems] sum of selected_rows, <= budgets[p]
  /// GPU only, optional [1] (ignored by the CPU paths). See "non-finite input on the GPU" below.
  int32_t* nonfinite_problem = nullptr;
};

/// Throws InvalidArgumentError naming the value unless the scoring fields are valid: num_problems
/// >= 0, group_size >= 1, head_dim in {64, 128, 256}, max_clusters >= 1, scale finite and >= 0.
void check_score_params(const ClusterSelectParams& p);
/// Same for selection: num_problems >= 0, max_clusters >= 1, known enums.
void check_select_params(const ClusterSelectParams& p);
/// The scale actually applied: p.scale, or 1/sqrt(head_dim) when p.scale == 0.
float cluster_score_scale(const ClusterSelectParams& p);

// ---- CPU: reference (plain loops, double accumulation, deterministic) ----
//
// Both CPU paths validate every problem: num_clusters[p] in [0, max_clusters], finite queries and
// valid centroids, budgets >= 0, cluster sizes >= 0, finite valid scores. A bad value throws
// InvalidArgumentError naming the problem and the index ("problem 3: centroid 7 dim 12 is nan");
// when several problems are bad, the lowest one is named. After a throw the outputs are
// unspecified. A kMax score that overflows float (from finite inputs) is reported the same way.

/// scores[p][j] = aggregation over g of s_g(j) = scale * dot(queries[p][g], centroids[p][j]).
void score_clusters_ref(const ClusterSelectParams& p, const ClusterSelectTensors& t);
/// Sorts the valid clusters by (score descending, id ascending) and takes them in that order until
/// the budget is met: empty clusters are passed over, the first one that does not fit is
/// truncated (kTruncate) or ends the scan (kSkip). Budget 0 selects nothing; a budget of at least
/// the problem's context selects every non-empty cluster.
void select_clusters_ref(const ClusterSelectParams& p, const ClusterSelectTensors& t);
/// score_clusters_ref then select_clusters_ref.
void score_and_select_clusters_ref(const ClusterSelectParams& p, const ClusterSelectTensors& t);

// ---- CPU: fast path (oneTBB parallel_for over problems) ----
//
// Bitwise the same scores and selections as the reference (the same double arithmetic in the same
// order per problem; the ranking sorts the 64-bit keys of the GPU path, which order exactly like
// the reference's comparison), and the same error messages. Runs in the calling thread's task
// arena; honours tbb::global_control. Each centroid row is read once for all G heads.

void score_clusters_cpu(const ClusterSelectParams& p, const ClusterSelectTensors& t);
void select_clusters_cpu(const ClusterSelectParams& p, const ClusterSelectTensors& t);
void score_and_select_clusters_cpu(const ClusterSelectParams& p, const ClusterSelectTensors& t);

/// Rounds `cols` fp32 values of each of `rows` rows (row r at centroids + r * stride, in elements)
/// to the nearest fp16 value (ties to even), in place, and stores them as fp16 in `copy` (same
/// layout) unless it is null: the pair ClusterSelectTensors::centroids_f16 asks for. Host memory.
void round_centroids_fp16_cpu(float* centroids, uint16_t* copy, int64_t rows, int64_t cols,
                              int64_t stride);

// ---- GPU (device pointers, ordered on `stream`) ----
//
// One thread block per problem. Scoring accumulates in fp32 (within rtol 1e-5 / atol 1e-6 of the
// reference); each centroid is read once for all G heads when G <= 8, once per 8 heads otherwise.
// Under kSoftmaxSum the G x max_clusters logits stay in shared memory when they fit (G = 8 and
// 4096 clusters: 128 KiB); otherwise the centroids are read a second time. Selection, up to
// kMaxBlockSortClusters per problem, is a radix select in one block per problem: histograms of the
// order-preserving score bits weighted by cluster rows find the bucket where the budget fills, and
// only the clusters at or above it (at most 512) are ranked; with more candidates it falls back to
// a cub::BlockRadixSort of all keys. Above kMaxBlockSortClusters the keys are sorted with
// cub::DeviceSegmentedRadixSort. Either way the budget is then applied in score order, and given
// the same scores the result is exactly the reference's selection, ties included.
//
// Non-finite input on the GPU: nothing is thrown, nothing hangs, nothing outside the arrays is
// written. A problem whose queries or valid centroids hold a NaN/Inf (or whose fp32 logits
// overflow) gets NaN for all its valid scores; a problem with a NaN/Inf valid score selects nothing
// (num_selected = total_rows = 0, ids -1, rows 0). If t.nonfinite_problem is not null, the
// launcher first sets *nonfinite_problem = -1 on `stream`, and the kernels leave there the lowest
// such problem index; read it after the stream has completed. Other problems are unaffected.
// Device arrays are not validated on the host: on the GPU, num_clusters[p] is clamped to
// [0, max_clusters], a negative budget counts as 0 and a negative cluster size as an empty
// cluster. queries and centroids must be 16-byte aligned (cudaMalloc's are).

#if KVTIER_WITH_CUDA
/// Scores on `stream`. Throws InvalidArgumentError on bad params or when G is too large for the
/// device's shared memory (G above ~1700 on an H100).
void launch_score_clusters(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                           cudaStream_t stream);

/// Bytes of device workspace that launch_select_clusters needs: 0 when max_clusters <=
/// kMaxBlockSortClusters, else the segmented sort's key buffers and temporary storage
/// (about 16 bytes per cluster slot plus CUB's share). Requires num_problems * max_clusters < 2^31
/// in that case. Queries the current device; launches nothing.
size_t select_clusters_workspace_bytes(const ClusterSelectParams& p);

/// Selection on `stream`. `workspace` is device memory of at least
/// select_clusters_workspace_bytes(p) bytes (may be null when that is 0); it must not be used by
/// other work until this selection has completed on `stream`.
void launch_select_clusters(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                            void* workspace, size_t workspace_bytes, cudaStream_t stream);

/// Scoring split over many thread blocks per problem (tiles of 64 centroids write their logits to
/// `workspace`, then one block per problem aggregates): the same results as
/// launch_score_clusters (fp32, within the same tolerance of the reference), for batches of few
/// problems that one block per problem cannot spread over the GPU (a decode step of one
/// sequence has 8 problems per layer). Requires group_size <= 32.
size_t score_clusters_split_workspace_bytes(const ClusterSelectParams& p);
void launch_score_clusters_split(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                                 void* workspace, size_t workspace_bytes, cudaStream_t stream);
/// Split scoring folded into selection, for few problems (a decode step of one sequence). On sm_90
/// one kernel of thread block clusters: each problem's CTAs score slices of its centroids into
/// shared memory and CTA 0 selects from the scores they send it (KVTIER_CLUSTER_SELECT=N caps the
/// cluster size, default 8; 0 selects the path that follows). Otherwise tiles of 64 centroids
/// write their logits and per-head (max, sum of exp) partials to `workspace`, and each problem's
/// selection block aggregates its clusters' scores from them as it loads them. The scores need
/// not be written (t.scores is optional; when set, the valid scores are written). The selection
/// equals select_clusters_ref on the scores it aggregates, which are within the split scoring's
/// tolerance of the reference. Requires group_size <= 32 and max_clusters <= kMaxBlockSortClusters.
size_t score_select_split_workspace_bytes(const ClusterSelectParams& p);
void launch_score_select_split(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream);
/// launch_score_clusters then launch_select_clusters, with one reset of t.nonfinite_problem.
void launch_score_and_select_clusters(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                                      void* workspace, size_t workspace_bytes, cudaStream_t stream);
/// round_centroids_fp16_cpu on device memory, on `stream`: the same values bit for bit, but for
/// a NaN's payload.
void launch_round_centroids_fp16(float* centroids, uint16_t* copy, int64_t rows, int64_t cols,
                                 int64_t stride, cudaStream_t stream);
#endif

namespace detail {
#if KVTIER_WITH_CUDA
/// Workspace of launch_score_select_split: logits [P, G, max_clusters] floats, then the partials
/// [P, tiles, G] (max, sum) float pairs; byte offsets, 256-byte aligned.
struct SplitLayout {
  size_t logits = 0, partials = 0, total = 0;
};
/// Validates a split score-and-select call (params, tensors, limits, workspace) and returns its
/// workspace layout; throws InvalidArgumentError naming what is wrong.
SplitLayout check_score_select_split(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                                     const void* workspace, size_t workspace_bytes);
/// Thread block cluster size with which launch_score_select_split runs p on the current device
/// (the kernel of thread block clusters); 0: the two-kernel path.
int score_select_cluster_size(const ClusterSelectParams& p);
/// The logits kernel of split scoring; `partials` (float2 pairs) may be null.
void launch_split_logits(const ClusterSelectParams& p, const ClusterSelectTensors& t, float* logits,
                         void* partials, cudaStream_t stream);
#endif
/// The cluster size with which a kernel of thread block clusters (the split score-and-select, the
/// engine's fused recall kernel) runs a call of `problems` clusters, from a size `cs` whose shared
/// memory fits: halved while the device holds fewer than `problems` such clusters at once
/// (active(c)) and the smaller plan still fits (fits(c)). Clusters that wait for others to finish
/// double the call's time; smaller ones only lengthen each CTA's share. `cs` itself when no
/// smaller size holds them all.
template <typename Active, typename Fits>
int co_resident_cluster_size(int64_t problems, int cs, Active&& active, Fits&& fits) {
  for (int c = cs; c >= 1; c /= 2) {
    if (c < cs && !fits(c)) break;
    if (problems <= static_cast<int64_t>(active(c))) return c;
  }
  return cs;
}
/// Row of `centroids` that problem p scores.
inline size_t centroid_row(const ClusterSelectTensors& t, int32_t problem) {
  return static_cast<size_t>(t.centroid_rows ? t.centroid_rows[problem] : problem);
}
/// Offset of problem p's row of cluster_sizes.
inline size_t size_row_offset(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                              int32_t problem) {
  const size_t row =
      static_cast<size_t>(t.cluster_size_rows ? t.cluster_size_rows[problem] : problem);
  return row * static_cast<size_t>(p.max_clusters);
}
/// Throws InvalidArgumentError when an array that scoring (selection) uses is null while
/// num_problems > 0. Shared by _ref and _cpu.
void check_score_tensors(const ClusterSelectParams& p, const ClusterSelectTensors& t);
void check_select_tensors(const ClusterSelectParams& p, const ClusterSelectTensors& t);
/// check_select_tensors without the scores (the split score-and-select aggregates them itself).
void check_select_inputs_and_outputs(const ClusterSelectParams& p, const ClusterSelectTensors& t);
/// Validation of one problem's scoring inputs, in the order the CPU paths report: num_clusters,
/// then queries (head, dim), then valid centroids (cluster, dim). Shared by _ref and _cpu.
Status check_score_problem(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                           int32_t problem);
/// After scoring one problem: every valid score is finite (a kMax score of finite inputs can
/// still overflow float).
Status check_scores_finite(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                           int32_t problem);
/// Selection inputs of one problem: num_clusters, budget, then per valid cluster its score and
/// size.
Status check_select_problem(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                            int32_t problem);
/// Order-preserving 64-bit sort key of (score, id): descending key order is descending score, then
/// ascending id. -0 and +0 are one value (as in float comparison). `id_bits` covers the largest id;
/// 0 is below every key of a finite score, so it serves as padding.
inline uint64_t cluster_sort_key(float score, uint32_t id, int id_bits) {
  const float canonical = score + 0.f;  // -0 + 0 = +0
  uint32_t u;
  std::memcpy(&u, &canonical, 4);
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  const uint64_t id_mask = (uint64_t{1} << id_bits) - 1;
  return (static_cast<uint64_t>(ordered) << id_bits) | (id_mask - id);
}
/// Bits needed for ids in [0, max_clusters).
inline int cluster_id_bits(int32_t max_clusters) {
  int bits = 0;
  while (bits < 31 && (int64_t{1} << bits) < max_clusters) ++bits;
  return bits;
}
}  // namespace detail

}  // namespace kvtier::kernels
