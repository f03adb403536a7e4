// Device code of cluster scoring and budgeted selection. Included by cluster_select.cu and GPU
// tests. One thread block per problem throughout. Selection up to kMaxBlockSortClusters is a
// row-weighted radix select that sorts only the clusters near the budget's threshold.
#pragma once

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <type_traits>
#include <utility>

#include "kernels/cluster_select.h"
#include "kernels/dispatch.h"
#include "kernels/launch.cuh"
#include "memory/core/check.h"

namespace kvtier::kernels {

/// Scoring arguments, by value.
struct ScoreKernelParams {
  const float* queries;    // [num_problems, group_size, head_dim]
  const float* centroids;  // [num_problems, max_clusters, head_dim]
  // Optional, same layout: the centroids' fp16 copy (ClusterSelectTensors::centroids_f16), read
  // instead by the kernels of thread block clusters.
  const __half* centroids_f16;
  const int32_t* num_clusters;   // [num_problems]
  const int32_t* centroid_rows;  // [num_problems] or null: problem p scores centroid row [p]
  float* scores;                 // [num_problems, max_clusters]
  int32_t* nonfinite_problem;    // [1] or null: lowest problem with a non-finite input or logit
  int32_t group_size;
  int32_t max_clusters;
  float scale;
};

/// Selection arguments, by value.
struct SelectKernelParams {
  const float* scores;           // [num_problems, max_clusters]
  const int32_t* num_clusters;   // [num_problems]
  const int32_t* cluster_sizes;  // [num_problems, max_clusters] (or table rows, see size_rows)
  const int32_t* size_rows;      // [num_problems] or null: problem p's sizes are row size_rows[p]
  const int32_t* budgets;        // [num_problems]
  int32_t* selected_ids;         // [num_problems, max_clusters]
  int32_t* selected_rows;        // [num_problems, max_clusters]
  int32_t* num_selected;         // [num_problems]
  int32_t* total_rows;           // [num_problems]
  int32_t* nonfinite_problem;    // [1] or null
  const uint64_t* sorted_keys;   // [num_problems, max_clusters] (segmented path only)
  const int32_t* problem_bad;    // [num_problems] (segmented path only)
  int32_t max_clusters;
  int32_t id_bits;  // bits of the largest cluster id (detail::cluster_id_bits)
  BudgetOverflow overflow;
  // scores, cluster_sizes, selected_ids and selected_rows are 16-byte aligned and max_clusters is a
  // multiple of 4: every row may then be read and written with vector accesses.
  bool aligned_rows;
  // Split scoring folded into selection (launch_score_select_split): when logits is set, cluster
  // j's score is aggregated from logits [num_problems, group_size, max_clusters] (scaled dot
  // products) and, under kSoftmaxSum, from the per-tile, per-head (max, sum of exp) partials
  // [num_problems, num_tiles, group_size] of the tiles of kSplitTile clusters (scores is unused);
  // scores_out, if not null, receives the aggregated values of the valid clusters.
  const float* logits;
  float* scores_out;
  const float2* partials;
  int32_t group_size;
  ScoreAggregation aggregation;
};

namespace cluster_select_device {

constexpr int kSplitTile = 64;      // centroids per block of the split logits kernel
constexpr int kSplitThreads = 256;  // 8 warps
constexpr int kMaxSplitGroup = 32;  // heads per group that split scoring handles

constexpr int kScoreThreads = 512;  // 16 warps: enough loads in flight for one block per SM
constexpr int kScoreWarps = kScoreThreads / 32;
constexpr int kScoreUnroll = 2;  // centroids each warp loads before the first FMA

__device__ __forceinline__ int clamp_clusters(int32_t n, int32_t max_clusters) {
  return n < 0 ? 0 : (n > max_clusters ? max_clusters : n);
}

__device__ __forceinline__ void flag_nonfinite(int32_t* nonfinite_problem, int problem) {
  // The launcher stored -1, which is UINT_MAX as unsigned: the minimum is the lowest bad problem.
  if (nonfinite_problem != nullptr) {
    atomicMin(reinterpret_cast<unsigned int*>(nonfinite_problem), static_cast<unsigned>(problem));
  }
}

/// The 32 order-preserving bits of a score in its sort key.
__device__ __forceinline__ uint32_t ordered_score(float score) {
  const uint32_t u = __float_as_uint(score + 0.f);  // -0 + 0 = +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/// (ordered << id_bits) | (id_mask - id): descending key order is descending score, then
/// ascending id.
__device__ __forceinline__ uint64_t key_of(uint32_t ordered, uint32_t id, int id_bits) {
  const uint64_t id_mask = (uint64_t{1} << id_bits) - 1;
  return (static_cast<uint64_t>(ordered) << id_bits) | (id_mask - id);
}

/// Device twin of detail::cluster_sort_key (bit for bit).
__device__ __forceinline__ uint64_t sort_key(float score, uint32_t id, int id_bits) {
  return key_of(ordered_score(score), id, id_bits);
}

/// A head_dim row spread over the 32 lanes of a warp with coalesced vector loads: lane l holds
/// elements (c * 32 + l) * kLoad + e of the row, for chunk c and component e.
template <int kHeadDim>
struct LaneSlice {
  static constexpr int kVec = kHeadDim / 32;       // floats per lane: 2, 4 or 8
  static constexpr int kLoad = kVec >= 4 ? 4 : 2;  // floats per load
  static constexpr int kChunks = kVec / kLoad;     // loads per lane
  __device__ __forceinline__ static void load(const float* __restrict__ row, int lane,
                                              float (&out)[kVec]) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if constexpr (kLoad == 4) {
        const float4 x = __ldg(reinterpret_cast<const float4*>(row) + c * 32 + lane);
        out[c * 4 + 0] = x.x;
        out[c * 4 + 1] = x.y;
        out[c * 4 + 2] = x.z;
        out[c * 4 + 3] = x.w;
      } else {
        const float2 x = __ldg(reinterpret_cast<const float2*>(row) + c * 32 + lane);
        out[c * 2 + 0] = x.x;
        out[c * 2 + 1] = x.y;
      }
    }
  }
};

template <int kHeadTile>
constexpr int log2_tile() {
  return kHeadTile == 1 ? 0 : kHeadTile == 2 ? 1 : kHeadTile == 4 ? 2 : 3;
}

/// Sums v[h] over the 32 lanes for every h < T with 5 + T - 1 shuffles instead of 5 T: each
/// halving stage hands half of the values to the partner lane. Afterwards v[0] of lane l holds the
/// full sum for head l >> (5 - log2 T); the 32 / T lanes of one head hold the same value.
template <int T>
__device__ __forceinline__ void warp_transpose_sum(float (&v)[T], int lane) {
#pragma unroll
  for (int half = T / 2, offset = 16; half >= 1; half >>= 1, offset >>= 1) {
    const bool upper = (lane & offset) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = upper ? v[i] : v[i + half];
      const float keep = upper ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
    }
  }
#pragma unroll
  for (int offset = 16 / T; offset >= 1; offset >>= 1) {
    v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
  }
}

/// Loads the query slices of heads [g0, g0 + T) (zeros past G); false if one is not finite.
template <int kHeadDim, int T>
__device__ __forceinline__ bool load_query_tile(const float* q_base, int g0, int G, int lane,
                                                float (&q)[T][LaneSlice<kHeadDim>::kVec]) {
  constexpr int kVec = LaneSlice<kHeadDim>::kVec;
  bool finite = true;
#pragma unroll
  for (int h = 0; h < T; ++h) {
    if (g0 + h < G) {
      LaneSlice<kHeadDim>::load(q_base + static_cast<size_t>(g0 + h) * kHeadDim, lane, q[h]);
#pragma unroll
      for (int e = 0; e < kVec; ++e) finite = finite && isfinite(q[h][e]);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[h][e] = 0.f;
    }
  }
  return finite;
}

/// Visits the valid centroids of a problem warp by warp (warp w takes j = w, w + 16, ...), with
/// kScoreUnroll rows loaded before the first FMA, and calls f(j, s) where s is this lane's head's
/// logit scale * dot(q[g0 + head], c[j]) (head = lane >> (5 - log2 T)).
template <int kHeadDim, int T, typename F>
__device__ __forceinline__ void for_each_logit(const float* c_base, int n, int warp, int lane,
                                               const float (&q)[T][LaneSlice<kHeadDim>::kVec],
                                               float scale, F&& f) {
  using Slice = LaneSlice<kHeadDim>;
  constexpr int kVec = Slice::kVec;
  for (int j0 = warp; j0 < n; j0 += kScoreWarps * kScoreUnroll) {
    float c[kScoreUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kScoreUnroll; ++u) {
      const int j = j0 + u * kScoreWarps;
      if (j < n) {
        Slice::load(c_base + static_cast<size_t>(j) * kHeadDim, lane, c[u]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) c[u][e] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kScoreUnroll; ++u) {
      const int j = j0 + u * kScoreWarps;
      if (j >= n) break;  // warp-uniform
      float dot[T];
#pragma unroll
      for (int h = 0; h < T; ++h) {
        dot[h] = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot[h] = fmaf(q[h][e], c[u][e], dot[h]);
      }
      warp_transpose_sum<T>(dot, lane);
      f(j, scale * dot[0]);
    }
  }
}

}  // namespace cluster_select_device

/// Grid: block.x = problem; 16 warps, warp w takes the centroids j = w, w + 16, ... of its problem
/// (one coalesced row load serves all kHeadTile heads of a head tile: GQA-aware). Lane l works for
/// head g0 + (l >> (5 - log2 kHeadTile)) of the tile after the transposed warp reduction.
/// kMax: the per-cluster max over heads goes straight to scores (read-modify-write across tiles).
/// kSoftmaxSum: an online (max, sum) per head and warp, merged across warps in shared memory, then
/// scores[j] = sum_g exp(s_g(j) - m_g) / l_g from the logits cached in shared memory
/// (kCacheLogits) or recomputed from the centroids.
/// Dynamic shared memory, floats: warp_m, warp_l [16, G]; head_m, head_l [G]; logits
/// [G, max_clusters + 1] when kCacheLogits.
template <int kHeadDim, int kHeadTile, ScoreAggregation kAgg, bool kCacheLogits>
__global__ void __launch_bounds__(cluster_select_device::kScoreThreads)
    score_clusters_kernel(ScoreKernelParams kp) {
  using namespace cluster_select_device;
  constexpr int kVec = LaneSlice<kHeadDim>::kVec;
  constexpr int kHeadShift = 5 - log2_tile<kHeadTile>();
  extern __shared__ float smem[];
  const int G = kp.group_size;
  float* warp_m = smem;
  float* warp_l = warp_m + kScoreWarps * G;
  float* head_m = warp_l + kScoreWarps * G;
  float* head_l = head_m + G;
  float* logits = head_l + G;
  const int logit_stride = kp.max_clusters + 1;  // + 1: the kHeadTile rows fall in distinct banks

  const int problem = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = clamp_clusters(kp.num_clusters[problem], kp.max_clusters);
  const float* q_base = kp.queries + static_cast<size_t>(problem) * G * kHeadDim;
  const size_t c_row = kp.centroid_rows ? static_cast<size_t>(kp.centroid_rows[problem])
                                        : static_cast<size_t>(problem);
  const float* c_base = kp.centroids + c_row * kp.max_clusters * kHeadDim;
  float* out = kp.scores + static_cast<size_t>(problem) * kp.max_clusters;
  const int my_head = lane >> kHeadShift;
  const bool head_leader = (lane & ((1 << kHeadShift) - 1)) == 0;
  bool bad = false;

  for (int j = n + threadIdx.x; j < kp.max_clusters; j += blockDim.x) out[j] = -INFINITY;

  // ---- phase A: logits; kMax is done here ----
  for (int g0 = 0; g0 < G; g0 += kHeadTile) {
    float q[kHeadTile][kVec];
    bad |= !load_query_tile<kHeadDim, kHeadTile>(q_base, g0, G, lane, q);
    const int g = g0 + my_head;
    const bool head_valid = g < G;
    float m = -INFINITY, l = 0.f;
    for_each_logit<kHeadDim, kHeadTile>(c_base, n, warp, lane, q, kp.scale, [&](int j, float s) {
      // A NaN/Inf centroid value makes every head's logit non-finite, so this also catches those.
      bad |= head_valid && !isfinite(s);
      if constexpr (kAgg == ScoreAggregation::kMax) {
        float v = head_valid ? s : -INFINITY;
#pragma unroll
        for (int offset = 16; offset >= (32 >> log2_tile<kHeadTile>()); offset >>= 1) {
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
        }
        if (lane == 0) out[j] = g0 == 0 ? v : fmaxf(v, out[j]);  // same lane in every tile
      } else {
        if (head_valid) {
          if (s > m) {
            l = l * expf(m - s) + 1.f;
            m = s;
          } else {
            l += expf(s - m);
          }
          if constexpr (kCacheLogits) {
            if (head_leader) logits[static_cast<size_t>(g) * logit_stride + j] = s;
          }
        }
      }
    });
    if constexpr (kAgg == ScoreAggregation::kSoftmaxSum) {
      if (head_leader && head_valid) {
        warp_m[warp * G + g] = m;
        warp_l[warp * G + g] = l;
      }
    }
  }
  if (__syncthreads_or(bad)) {
    for (int j = threadIdx.x; j < n; j += blockDim.x) out[j] = NAN;
    if (threadIdx.x == 0) flag_nonfinite(kp.nonfinite_problem, problem);
    return;
  }
  if constexpr (kAgg == ScoreAggregation::kSoftmaxSum) {
    // ---- merge the warps' (max, sum) per head ----
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
      float mx = -INFINITY;
      for (int w = 0; w < kScoreWarps; ++w) mx = fmaxf(mx, warp_m[w * G + g]);
      float z = 0.f;
      for (int w = 0; w < kScoreWarps; ++w) {
        const float mw = warp_m[w * G + g];
        if (mw != -INFINITY) z += warp_l[w * G + g] * expf(mw - mx);  // -inf: warp had no cluster
      }
      head_m[g] = mx;
      head_l[g] = z;
    }
    __syncthreads();
    // ---- phase B: scores[j] = sum_g softmax_g(j) ----
    if constexpr (kCacheLogits) {
      for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float acc = 0.f;
        for (int g = 0; g < G; ++g) {
          acc += expf(logits[static_cast<size_t>(g) * logit_stride + j] - head_m[g]) / head_l[g];
        }
        out[j] = acc;
      }
    } else {
      for (int g0 = 0; g0 < G; g0 += kHeadTile) {
        float q[kHeadTile][kVec];
        load_query_tile<kHeadDim, kHeadTile>(q_base, g0, G, lane, q);
        const int g = g0 + my_head;
        const bool head_valid = g < G;
        const float hm = head_valid ? head_m[g] : 0.f;
        const float hl = head_valid ? head_l[g] : 1.f;
        for_each_logit<kHeadDim, kHeadTile>(
            c_base, n, warp, lane, q, kp.scale, [&](int j, float s) {
              float e = head_valid ? expf(s - hm) / hl : 0.f;
#pragma unroll
              for (int offset = 16; offset >= (32 >> log2_tile<kHeadTile>()); offset >>= 1) {
                e += __shfl_xor_sync(0xffffffffu, e, offset);
              }
              if (lane == 0) out[j] = g0 == 0 ? e : out[j] + e;  // same lane in every tile
            });
      }
    }
  }
}

namespace cluster_select_device {

/// Applies the budget to one tile of sorted keys. Blocked: thread t holds the sorted positions
/// tile_base + t * kItems + i. Positions >= n are padding. One block-wide exclusive scan over
/// (rows << 16 | non-empty count) gives each item the rows of all earlier clusters (the budget
/// test) and its output slot: the selected clusters are a prefix of the non-empty ones, so the
/// slot is the number of non-empty clusters before it. carry_* (block-uniform) hold the totals of
/// earlier tiles; s_count / s_rows (shared) accumulate what was selected.
template <int kThreads, int kItems>
__device__ __forceinline__ void apply_budget_tile(
    const uint64_t (&keys)[kItems], int tile_base, int n, const int32_t* __restrict__ sizes,
    int64_t budget, BudgetOverflow overflow, int id_bits, int32_t* __restrict__ ids,
    int32_t* __restrict__ rows, int64_t& carry_rows, int& carry_count,
    typename cub::BlockScan<unsigned long long, kThreads>::TempStorage& scan_storage, int& s_count,
    int& s_rows) {
  const uint64_t id_mask = (uint64_t{1} << id_bits) - 1;
  int id[kItems];
  int size[kItems];
  unsigned long long local = 0;  // (rows << 16) | count; a tile holds <= 4096 clusters < 2^16
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int pos = tile_base + static_cast<int>(threadIdx.x) * kItems + i;
    id[i] = -1;
    size[i] = 0;
    if (pos < n) {
      id[i] = static_cast<int>(id_mask - (keys[i] & id_mask));
      const int sz = sizes[id[i]];
      size[i] = sz > 0 ? sz : 0;  // negative counts as empty on the GPU
    }
    local += (static_cast<unsigned long long>(size[i]) << 16) | (size[i] > 0 ? 1u : 0u);
  }
  unsigned long long before = 0, aggregate = 0;
  cub::BlockScan<unsigned long long, kThreads>(scan_storage).ExclusiveSum(local, before, aggregate);
  int64_t rows_before = carry_rows + static_cast<int64_t>(before >> 16);
  int slot = carry_count + static_cast<int>(before & 0xffffu);
  int selected = 0, taken = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (size[i] == 0) continue;
    int64_t take = 0;
    if (overflow == BudgetOverflow::kTruncate) {
      if (rows_before < budget)
        take = size[i] < budget - rows_before ? size[i] : budget - rows_before;
    } else if (rows_before + size[i] <= budget) {
      take = size[i];
    }
    if (take > 0) {
      ids[slot] = id[i];
      rows[slot] = static_cast<int>(take);
      ++selected;
      taken += static_cast<int>(take);
    }
    rows_before += size[i];
    ++slot;
  }
  if (selected > 0) {
    atomicAdd(&s_count, selected);
    atomicAdd(&s_rows, taken);
  }
  carry_rows += static_cast<int64_t>(aggregate >> 16);
  carry_count += static_cast<int>(aggregate & 0xffffu);
}

/// Writes the padding (-1 ids, 0 rows) of slots [begin, end) of a problem's row: 4 slots per
/// store in the aligned middle when the rows are aligned.
__device__ __forceinline__ void write_unselected(const SelectKernelParams& kp, size_t row,
                                                 int begin, int end) {
  int32_t* __restrict__ ids = kp.selected_ids + row;
  int32_t* __restrict__ rows = kp.selected_rows + row;
  int vector_begin = end, vector_end = end;  // [vector_begin, vector_end): int4 stores
  if (kp.aligned_rows) {
    vector_begin = (begin + 3) & ~3;
    vector_end = end & ~3;
    if (vector_begin > vector_end) vector_begin = vector_end = end;
    const int4 minus_one = make_int4(-1, -1, -1, -1), zero = make_int4(0, 0, 0, 0);
    for (int c = vector_begin / 4 + static_cast<int>(threadIdx.x); c < vector_end / 4;
         c += blockDim.x) {
      reinterpret_cast<int4*>(ids)[c] = minus_one;
      reinterpret_cast<int4*>(rows)[c] = zero;
    }
  }
  for (int k = begin + static_cast<int>(threadIdx.x); k < vector_begin; k += blockDim.x) {
    ids[k] = -1;
    rows[k] = 0;
  }
  for (int k = vector_end + static_cast<int>(threadIdx.x); k < end; k += blockDim.x) {
    ids[k] = -1;
    rows[k] = 0;
  }
}

/// Writes num_selected / total_rows and the padding (-1 ids, 0 rows) of slots [count, end)
/// (slots from end on were padded earlier). Call after a barrier that follows the last write of a
/// selected slot.
__device__ __forceinline__ void finish_selection(const SelectKernelParams& kp, int problem,
                                                 int count, int rows, int end) {
  if (threadIdx.x == 0) {
    kp.num_selected[problem] = count;
    kp.total_rows[problem] = rows;
  }
  write_unselected(kp, static_cast<size_t>(problem) * kp.max_clusters, count, end);
}

/// The default epilogue of the selection kernels: nothing. An epilogue's run() is called by
/// every thread of the selecting block after the selection's last writes (selected ids and rows,
/// num_selected, total_rows) and must begin with a barrier before it reads them. In a kernel of
/// thread block clusters it may stage what it will read in the selecting CTA's shared memory while
/// the cluster aggregates and selects: stage_bytes() bytes (a multiple of 16) at `stage`, 16-byte
/// aligned, which prefetch() fills with cp.async (the kernel commits and waits; n: the problem's
/// clusters; key: what stage_key() returned, read when the kernel begins so that its load has
/// landed by then) and run() reads; elsewhere run() gets a null `stage`.
struct NoSelectEpilogue {
  __host__ __device__ int stage_bytes() const { return 0; }
  /// The epilogue without its stage (run() then reads global memory), for a kernel whose shared
  /// memory the stage would overfill.
  NoSelectEpilogue without_stage() const { return *this; }
  __device__ int stage_key(int) const { return 0; }
  template <int kThreads>
  __device__ void prefetch(const SelectKernelParams&, int, int, int, void*) const {}
  template <int kThreads>
  __device__ void run(const SelectKernelParams&, int, const void*) const {}
};

// ---- radix select (select_clusters_block_kernel) ----

/// Most candidates the rank step orders. Ranking compares every pair, m^2 / 32 warp steps: 512
/// candidates cost about as much as 1 / 6 of the full sort they replace, and a problem that needs
/// more (budget >= its context with many clusters, or hundreds of clusters before the threshold)
/// takes the full sort.
constexpr int kSelectMaxCandidates = 512;
/// The threshold is refined by another digit while more candidates than this remain (and
/// refining can drop some): a level costs about as much as ranking 128 candidates.
constexpr int kSelectRefineTarget = 128;

constexpr int ilog2(int x) { return x <= 1 ? 0 : 1 + ilog2(x / 2); }

/// Compile-time shape of the radix select of a kThreads x kItems block.
/// Problem p's cluster sizes.
__device__ __forceinline__ const int32_t* sizes_of(const SelectKernelParams& kp, int problem) {
  const size_t row = kp.size_rows != nullptr ? static_cast<size_t>(kp.size_rows[problem])
                                             : static_cast<size_t>(problem);
  return kp.cluster_sizes + row * kp.max_clusters;
}

/// Per head of a split-scored problem (logits mode): head_m[g] = max of its logits over the valid
/// clusters, head_inv[g] = 1 / sum of exp(logit - head_m[g]), combined from the partials of the
/// tiles that hold valid clusters. One warp per head; the caller synchronizes afterwards.
__device__ __forceinline__ void split_head_stats(const SelectKernelParams& kp, int problem, int n,
                                                 float* head_m, float* head_inv) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int tiles = (n + kSplitTile - 1) / kSplitTile;
  const int stride = (kp.max_clusters + kSplitTile - 1) / kSplitTile;
  const float2* part = kp.partials + static_cast<size_t>(problem) * stride * kp.group_size;
  for (int g = warp; g < kp.group_size; g += static_cast<int>(blockDim.x) >> 5) {
    float m = -INFINITY;
    for (int t = lane; t < tiles; t += 32) m = fmaxf(m, part[t * kp.group_size + g].x);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.f;
    for (int t = lane; t < tiles; t += 32) {
      const float2 v = part[t * kp.group_size + g];
      sum += v.y * __expf(v.x - m);
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) {
      head_m[g] = m;
      head_inv[g] = 1.f / sum;
    }
  }
}

template <int kThreads, int kItems>
struct SelectShape {
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kDigitBits = ilog2(kThreads) + 2;  // 4 buckets per thread
  static constexpr int kBuckets = 1 << kDigitBits;
  static constexpr int kMaxCandidates =
      kThreads * kItems < kSelectMaxCandidates ? kThreads * kItems : kSelectMaxCandidates;
  static constexpr int kVec = kItems < 4 ? kItems : 4;  // clusters per vector load
  static_assert(kItems % kVec == 0, "kItems must be a multiple of the vector width");
  static_assert(kThreads * kItems <= 0xffff, "counts are packed into 16 bits");
};

/// Cluster held as item i by this thread: runs of kVec clusters, so that a thread's items
/// c * kVec .. c * kVec + kVec - 1 are one vector load, j = ((i / kVec) * kThreads + t) * kVec +
/// i % kVec.
template <int kThreads, int kItems>
__device__ __forceinline__ int select_item_cluster(int i) {
  constexpr int kVec = SelectShape<kThreads, kItems>::kVec;
  return ((i / kVec) * kThreads + static_cast<int>(threadIdx.x)) * kVec + i % kVec;
}

/// Loads the problem's clusters into registers, item i being cluster select_item_cluster(i): with
/// vector loads when the rows are aligned, else one cluster per load. ordered[i] is the score's
/// ordered_score (any value for padding, j >= n): registers hold these 32 bits rather than 64-bit
/// keys, which are rebuilt where needed (64 registers per thread are all two 512-thread blocks per
/// SM allow). sizes[i] is the cluster's rows when it is valid (j < n) and non-empty, i.e. "live",
/// else 0. Returns whether a valid score is not finite.
template <int kThreads, int kItems>
__device__ __forceinline__ bool load_select_items(const SelectKernelParams& kp, int problem, int n,
                                                  const float* head_m, const float* head_inv,
                                                  uint32_t (&ordered)[kItems],
                                                  uint32_t (&sizes)[kItems]) {
  constexpr int kVec = SelectShape<kThreads, kItems>::kVec;
  const size_t row = static_cast<size_t>(problem) * kp.max_clusters;
  const float* __restrict__ scores = kp.scores + row;
  const int32_t* __restrict__ cluster_sizes = sizes_of(kp, problem);
  float s[kItems];
  int32_t z[kItems];
  if (kp.logits != nullptr) {
    // Split scoring: aggregate the heads' logits here, two heads' loads in flight at a time (one
    // round trip per pair of heads; more would spill under the 64-register cap).
    const float* logits = kp.logits + row * kp.group_size;
    const bool max_agg = kp.aggregation == ScoreAggregation::kMax;
    uint32_t nonfinite = 0;  // bit i: a logit of item i is NaN or infinite (fmaxf would drop NaN)
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = select_item_cluster<kThreads, kItems>(i);
      z[i] = j < n ? __ldg(cluster_sizes + j) : 0;
      s[i] = max_agg ? -INFINITY : 0.f;
    }
    for (int g0 = 0; g0 < kp.group_size; g0 += 2) {
      const int g1 = g0 + 1 < kp.group_size ? g0 + 1 : g0;  // odd G: loaded twice, used once
      float l[2][kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int j = select_item_cluster<kThreads, kItems>(i);
        l[0][i] = j < n ? __ldg(logits + static_cast<size_t>(g0) * kp.max_clusters + j) : 0.f;
        l[1][i] = j < n ? __ldg(logits + static_cast<size_t>(g1) * kp.max_clusters + j) : 0.f;
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (h == 1 && g1 == g0) break;
        const int g = g0 + h;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          s[i] = max_agg ? fmaxf(s[i], l[h][i]) : s[i] + __expf(l[h][i] - head_m[g]) * head_inv[g];
          nonfinite |= isfinite(l[h][i]) ? 0u : 1u << i;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (nonfinite & (1u << i)) s[i] = NAN;  // the problem is flagged and selects nothing
    }
    if (kp.scores_out != nullptr) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int j = select_item_cluster<kThreads, kItems>(i);
        if (j < n) kp.scores_out[row + j] = s[i];
      }
    }
  } else if (kp.aligned_rows) {  // every load is issued before any is used: one round trip
#pragma unroll
    for (int c = 0; c < kItems / kVec; ++c) {
      const int j0 = select_item_cluster<kThreads, kItems>(c * kVec);
      const bool in = j0 < n;  // then j0 + kVec <= max_clusters: max_clusters is a multiple of 4
      if constexpr (kVec == 4) {
        const float4 sv =
            in ? __ldg(reinterpret_cast<const float4*>(scores + j0)) : make_float4(0, 0, 0, 0);
        const int4 zv =
            in ? __ldg(reinterpret_cast<const int4*>(cluster_sizes + j0)) : make_int4(0, 0, 0, 0);
        s[c * 4 + 0] = sv.x, s[c * 4 + 1] = sv.y, s[c * 4 + 2] = sv.z, s[c * 4 + 3] = sv.w;
        z[c * 4 + 0] = zv.x, z[c * 4 + 1] = zv.y, z[c * 4 + 2] = zv.z, z[c * 4 + 3] = zv.w;
      } else if constexpr (kVec == 2) {
        const float2 sv =
            in ? __ldg(reinterpret_cast<const float2*>(scores + j0)) : make_float2(0, 0);
        const int2 zv =
            in ? __ldg(reinterpret_cast<const int2*>(cluster_sizes + j0)) : make_int2(0, 0);
        s[c * 2 + 0] = sv.x, s[c * 2 + 1] = sv.y;
        z[c * 2 + 0] = zv.x, z[c * 2 + 1] = zv.y;
      } else {
        s[c] = in ? __ldg(scores + j0) : 0.f;
        z[c] = in ? __ldg(cluster_sizes + j0) : 0;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = select_item_cluster<kThreads, kItems>(i);
      s[i] = j < n ? __ldg(scores + j) : 0.f;
      z[i] = j < n ? __ldg(cluster_sizes + j) : 0;
    }
  }
  bool bad = false;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const bool valid = select_item_cluster<kThreads, kItems>(i) < n;
    bad |= valid && !isfinite(s[i]);
    ordered[i] = ordered_score(s[i]);
    sizes[i] = valid && z[i] > 0 ? static_cast<uint32_t>(z[i]) : 0u;
  }
  return bad;
}

/// Histogram bucket d as (rows << 16) | count: counts[d] holds the count in its low 16 bits and
/// the carries out of rows_lo[d] above them.
__device__ __forceinline__ unsigned long long bucket_entry(const uint32_t* rows_lo,
                                                           const uint32_t* counts, int d) {
  const uint32_t c = counts[d];
  const unsigned long long rows = (static_cast<unsigned long long>(c >> 16) << 32) | rows_lo[d];
  return (rows << 16) | (c & 0xffffu);
}

/// Sum of bucket_entry over the buckets 4 quad .. 4 quad + 3.
__device__ __forceinline__ unsigned long long bucket_quad_sum(const uint32_t* rows_lo,
                                                              const uint32_t* counts, int quad) {
  const uint4 lo = reinterpret_cast<const uint4*>(rows_lo)[quad];
  const uint4 c = reinterpret_cast<const uint4*>(counts)[quad];
  const unsigned long long rows =
      static_cast<unsigned long long>(lo.x) + lo.y + lo.z + lo.w +
      (static_cast<unsigned long long>((c.x >> 16) + (c.y >> 16) + (c.z >> 16) + (c.w >> 16))
       << 32);
  return (rows << 16) + (c.x & 0xffffu) + (c.y & 0xffffu) + (c.z & 0xffffu) + (c.w & 0xffffu);
}

/// Orders the m candidates (distinct keys, non-empty) and applies the budget. Candidate i's slot
/// is the number of candidates with a larger key, and the rows before it are their sizes: every
/// live cluster ranked before a candidate is a candidate too, so both equal what a scan of the
/// sorted clusters would see (empty clusters take no slot and no rows). `lanes` threads share one
/// candidate (the comparisons are split between them), so that about m groups cover it at once.
template <int kThreads>
__device__ __forceinline__ void take_candidates(const ulonglong2* __restrict__ candidates, int m,
                                                int64_t budget, BudgetOverflow overflow,
                                                int id_bits, int32_t* __restrict__ ids,
                                                int32_t* __restrict__ rows, int& s_count,
                                                int& s_rows) {
  int log_lanes = 5;
  while (log_lanes > 0 && (kThreads >> log_lanes) < m) --log_lanes;  // block-uniform
  const int lanes = 1 << log_lanes;
  const int sub = static_cast<int>(threadIdx.x) & (lanes - 1);
  const int groups = kThreads >> log_lanes;
  const uint64_t id_mask = (uint64_t{1} << id_bits) - 1;
  for (int base = 0; base < m; base += groups) {  // block-uniform trip count
    const int i = base + (static_cast<int>(threadIdx.x) >> log_lanes);
    uint64_t key = 0, size = 0, rows_before = 0;
    unsigned rank = 0;
    if (i < m) {
      const ulonglong2 me = candidates[i];
      key = me.x;
      size = me.y;
#pragma unroll 4
      for (int j = sub; j < m; j += lanes) {
        const ulonglong2 other = candidates[j];
        if (other.x > key) {
          ++rank;
          rows_before += other.y;
        }
      }
    }
    for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
      rank += __shfl_xor_sync(0xffffffffu, rank, offset);
      rows_before += __shfl_xor_sync(0xffffffffu, rows_before, offset);
    }
    int64_t take = 0;
    if (i < m && sub == 0) {
      const int64_t before = static_cast<int64_t>(rows_before), sz = static_cast<int64_t>(size);
      if (overflow == BudgetOverflow::kTruncate) {
        if (before < budget) take = sz < budget - before ? sz : budget - before;
      } else if (before + sz <= budget) {
        take = sz;
      }
      if (take > 0) {
        ids[rank] = static_cast<int32_t>(id_mask - (key & id_mask));
        rows[rank] = static_cast<int32_t>(take);
      }
    }
    // take <= budget < 2^31, and so is the sum of a warp's takes (all of them add up to <= budget)
    const unsigned warp_count = __reduce_add_sync(0xffffffffu, take > 0 ? 1u : 0u);
    const unsigned warp_rows = __reduce_add_sync(0xffffffffu, static_cast<unsigned>(take));
    if ((threadIdx.x & 31) == 0 && warp_count > 0) {
      atomicAdd(&s_count, static_cast<int>(warp_count));
      atomicAdd(&s_rows, static_cast<int>(warp_rows));
    }
  }
}

/// Shared memory of block_select.
template <int kThreads, int kItems>
struct BlockSelectShared {
  using Shape = SelectShape<kThreads, kItems>;
  using Sort = cub::BlockRadixSort<uint64_t, kThreads, kItems>;
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  struct Histogram {
    alignas(16) uint32_t rows_lo[Shape::kBuckets];  // rows of the live clusters, mod 2^32
    alignas(16) uint32_t counts[Shape::kBuckets];   // count | (carries out of rows_lo << 16)
  };
  struct RadixSelect {
    Histogram hist[2];  // by level parity: the next level's is cleared while this one is read
    typename Scan::TempStorage scan;
    ulonglong2 candidates[Shape::kMaxCandidates];  // {key, rows}
  };
  union {
    typename Sort::TempStorage sort;
    RadixSelect select;
  } storage;
  uint2 and_or[Shape::kWarps];
  unsigned long long found_above, found_bucket;
  int found_digit, num_candidates, count, rows;
};

/// The selection of one problem by the whole block, from the problem's clusters in registers
/// (item i is cluster select_item_cluster(i); see load_select_items): a row-weighted radix select
/// over the 64-bit (score, id) keys finds a threshold key T such that every cluster the scan of
/// the sorted order visits until the budget is met (up to and including the first one at which
/// the rows reach the budget) has a key >= T, then ranks only the live (valid, non-empty)
/// clusters with keys >= T, the candidates:
///   1. The AND and OR of the live ordered scores give the leading key bits they all share.
///   2. Per level, a histogram of the next kDigitBits key bits below the fixed prefix (4 buckets
///      per thread: 11 bits for 512 threads) accumulates rows and counts of the live clusters in
///      the current bucket with shared-memory atomics; a block scan from the top bucket finds the
///      one in which the rows (including those of all larger keys) first reach the budget. Levels
///      repeat inside that bucket while more than kSelectRefineTarget candidates remain; two
///      histograms alternate, so a level costs three barriers. If even all live rows stay below
///      the budget, every live cluster is a candidate.
///   3. Up to kSelectMaxCandidates candidates are compacted to shared memory and ranked by
///      counting (take_candidates); the slots from the candidate count on are padded first. A
///      larger set takes the full cub::BlockRadixSort of all keys (32 score bits and id_bits id
///      bits) and apply_budget_tile.
/// Typical decode data (budget 2048, clusters of 1..128 rows) needs one level and 30..120
/// candidates. Selections are exactly the reference's: the candidates' ranks and preceding rows
/// are those of the full sorted scan. __launch_bounds__ caps registers at 64 so two 512-thread
/// blocks fit an SM: 256 problems then run in one wave on an H100's 132 SMs.
/// `reload(ordered)` loads the items' ordered scores again (the full sort's path). Ends with the
/// problem's outputs written (finish_selection).
template <int kThreads, int kItems, typename Reload>
__device__ __forceinline__ void block_select(const SelectKernelParams& kp, int problem, int n,
                                             const uint32_t (&ordered)[kItems],
                                             const uint32_t (&sizes)[kItems], bool bad,
                                             BlockSelectShared<kThreads, kItems>& sh,
                                             const Reload& reload) {
  using Shape = SelectShape<kThreads, kItems>;
  using Shared = BlockSelectShared<kThreads, kItems>;
  using Sort = typename Shared::Sort;
  using Scan = typename Shared::Scan;
  using Histogram = typename Shared::Histogram;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const size_t row = static_cast<size_t>(problem) * kp.max_clusters;
  // The sort key of item i, rebuilt where needed: id_mask - j in 32 bits from one per-thread base
  // (the item's offset is a constant), so that no per-item 64-bit value is kept.
  const uint32_t id_base = static_cast<uint32_t>((uint64_t{1} << kp.id_bits) - 1) -
                           static_cast<uint32_t>(select_item_cluster<kThreads, kItems>(0));
  auto key = [&](int i) {
    const uint32_t offset = static_cast<uint32_t>(select_item_cluster<kThreads, kItems>(i) -
                                                  select_item_cluster<kThreads, kItems>(0));
    return (static_cast<uint64_t>(ordered[i]) << kp.id_bits) | (id_base - offset);
  };

  // ---- 1. leading score bits common to the live keys (live ordered scores are > 0) ----
  uint32_t ordered_and = ~0u, ordered_or = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (sizes[i] != 0) {
      ordered_and &= ordered[i];
      ordered_or |= ordered[i];
    }
  }
  ordered_and = __reduce_and_sync(0xffffffffu, ordered_and);
  ordered_or = __reduce_or_sync(0xffffffffu, ordered_or);
  if (lane == 0) sh.and_or[warp] = make_uint2(ordered_and, ordered_or);
  if (threadIdx.x == 0) {
    sh.num_candidates = 0;
    sh.count = 0;
    sh.rows = 0;
  }
  reinterpret_cast<uint4*>(sh.storage.select.hist[0].rows_lo)[threadIdx.x] = make_uint4(0, 0, 0, 0);
  reinterpret_cast<uint4*>(sh.storage.select.hist[0].counts)[threadIdx.x] = make_uint4(0, 0, 0, 0);
  int64_t budget = kp.budgets[problem] > 0 ? kp.budgets[problem] : 0;
  if (__syncthreads_or(bad)) {
    if (threadIdx.x == 0) flag_nonfinite(kp.nonfinite_problem, problem);
    budget = 0;  // a problem with a non-finite score selects nothing
  }
  {
    const uint2 v = sh.and_or[lane % Shape::kWarps];  // kWarps <= 32; AND, OR are idempotent
    ordered_and = __reduce_and_sync(0xffffffffu, v.x);
    ordered_or = __reduce_or_sync(0xffffffffu, v.y);
  }
  int unselected_from = kp.max_clusters;  // slots from here on are padded at the end

  if (budget > 0 && ordered_or != 0) {  // block-uniform; ordered_or == 0: no live cluster
    // ---- 2. the threshold: live keys >= prefix; the `shift` low bits of prefix are free ----
    // The id bits count as free (one level over them is cheap when the scores are all equal).
    const uint32_t diff = ordered_and ^ ordered_or;
    int shift = kp.id_bits + (diff == 0 ? 0 : 32 - __clz(static_cast<int>(diff)));  // <= 63
    uint64_t prefix =
        (static_cast<uint64_t>(ordered_and) << kp.id_bits) & ~((uint64_t{1} << shift) - 1);
    unsigned long long above = 0;  // (rows << 16) | count of live keys above prefix's bucket
    int bucket_count = 1;  // live keys in prefix's bucket (shift == 0: one cluster, the only one)
    for (int level = 0; shift > 0; ++level) {
      Histogram& hist = sh.storage.select.hist[level & 1];
      Histogram& next_hist = sh.storage.select.hist[(level + 1) & 1];
      const int bits = shift < Shape::kDigitBits ? shift : Shape::kDigitBits;
      const int next = shift - bits;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const uint64_t k = key(i);
        if (sizes[i] != 0 && (k >> shift) == (prefix >> shift)) {
          const int digit = static_cast<int>(k >> next) & ((1 << bits) - 1);
          const uint32_t old = atomicAdd(&hist.rows_lo[digit], sizes[i]);
          atomicAdd(&hist.counts[digit], old + sizes[i] < old ? 0x10001u : 1u);
        }
      }
      // The next level's histogram was last read before the previous level's final barrier.
      reinterpret_cast<uint4*>(next_hist.rows_lo)[threadIdx.x] = make_uint4(0, 0, 0, 0);
      reinterpret_cast<uint4*>(next_hist.counts)[threadIdx.x] = make_uint4(0, 0, 0, 0);
      __syncthreads();
      // Thread t owns the buckets kBuckets - 1 - 4 t - q, q = 0..3: the scan runs from the top.
      // (rows << 16) | count per bucket: rows < 2^43, count <= 4096.
      const int quad = Shape::kBuckets / 4 - 1 - static_cast<int>(threadIdx.x);
      unsigned long long before = 0, total = 0;
      Scan(sh.storage.select.scan)
          .ExclusiveSum(bucket_quad_sum(hist.rows_lo, hist.counts, quad), before, total);
      const int64_t above_rows = static_cast<int64_t>(above >> 16);
      if (above_rows + static_cast<int64_t>(total >> 16) < budget) {
        // Only at the first level (later buckets hold the budget): every live key is taken.
        bucket_count = static_cast<int>(total & 0xffffu);
        break;
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const unsigned long long v = bucket_entry(hist.rows_lo, hist.counts, 4 * quad + 3 - q);
        const unsigned long long incl = before + v;
        if (above_rows + static_cast<int64_t>(before >> 16) < budget &&
            budget <= above_rows + static_cast<int64_t>(incl >> 16)) {  // exactly one bucket
          sh.found_digit = 4 * quad + 3 - q;
          sh.found_above = above + before;
          sh.found_bucket = v;
        }
        before = incl;
      }
      __syncthreads();
      prefix |= static_cast<uint64_t>(sh.found_digit) << next;
      shift = next;
      above = sh.found_above;
      bucket_count = static_cast<int>(sh.found_bucket & 0xffffu);
      const int above_count = static_cast<int>(above & 0xffffu);
      if (above_count + bucket_count <= kSelectRefineTarget || bucket_count == 1 ||
          above_count >= Shape::kMaxCandidates) {
        break;
      }
      // The next level's barrier orders these reads before the next s_found_* writes.
    }
    const int m = static_cast<int>(above & 0xffffu) + bucket_count;  // live keys >= prefix
    int32_t* __restrict__ ids = kp.selected_ids + row;
    int32_t* __restrict__ rows = kp.selected_rows + row;

    if (m <= Shape::kMaxCandidates) {
      // ---- 3. compact the candidates (any order), then rank them ----
      // At most m clusters are selected: pad the slots from m on now, behind the ranking.
      unselected_from = m;
      write_unselected(kp, row, m, kp.max_clusters);
      int mine = 0;
#pragma unroll
      for (int i = 0; i < kItems; ++i) mine += sizes[i] != 0 && key(i) >= prefix ? 1 : 0;
      int inclusive = mine;
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += other;
      }
      int slot = 0;
      if (lane == 31 && inclusive > 0) slot = atomicAdd(&sh.num_candidates, inclusive);
      slot = __shfl_sync(0xffffffffu, slot, 31) + inclusive - mine;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const uint64_t k = key(i);
        if (sizes[i] != 0 && k >= prefix) {
          sh.storage.select.candidates[slot++] = make_ulonglong2(k, sizes[i]);
        }
      }
      __syncthreads();
      take_candidates<kThreads>(sh.storage.select.candidates, m, budget, kp.overflow, kp.id_bits,
                                ids, rows, sh.count, sh.rows);
    } else {
      // ---- 3'. too many candidates: sort every key ----
      // The scores are loaded again (from L1 or L2): keys kept in registers across the sort would
      // make the path above spill.
      uint32_t all_ordered[kItems];
      reload(all_ordered);
      uint64_t all_keys[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int j = select_item_cluster<kThreads, kItems>(i);
        all_keys[i] = j < n ? key_of(all_ordered[i], static_cast<uint32_t>(j), kp.id_bits)
                            : 0;  // padding sorts last
      }
      __syncthreads();  // the sort reuses the histograms' shared memory
      Sort(sh.storage.sort).SortDescending(all_keys, 0, 32 + kp.id_bits);
      __syncthreads();  // the scan reuses the sort's shared memory
      int64_t carry_rows = 0;
      int carry_count = 0;
      apply_budget_tile<kThreads, kItems>(all_keys, 0, n, sizes_of(kp, problem), budget,
                                          kp.overflow, kp.id_bits, ids, rows, carry_rows,
                                          carry_count, sh.storage.select.scan, sh.count, sh.rows);
    }
  }
  __syncthreads();
  finish_selection(kp, problem, sh.count, sh.rows, unselected_from);
}

}  // namespace cluster_select_device

/// Grid: block.x = problem; kThreads * kItems >= max_clusters, each thread holds kItems clusters
/// in registers (load_select_items), selected by block_select.
/// In logits mode (kp.logits set) the scores are aggregated from split scoring's logits first.
/// `epi.run<kThreads>(kp, problem, nullptr)` runs last, by the whole block, once the selection is
/// written (see NoSelectEpilogue): a caller can build on the selection without another launch.
template <int kThreads, int kItems, typename Epilogue>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads)
    select_clusters_block_kernel(SelectKernelParams kp, Epilogue epi) {
  using namespace cluster_select_device;
  __shared__ BlockSelectShared<kThreads, kItems> sh;
  __shared__ float s_head_m[kMaxSplitGroup], s_head_inv[kMaxSplitGroup];
  pdl_wait();
  pdl_launch_dependents();

  const int problem = blockIdx.x;
  const int n = clamp_clusters(kp.num_clusters[problem], kp.max_clusters);
  if (kp.logits != nullptr) {  // block-uniform
    if (kp.aggregation == ScoreAggregation::kSoftmaxSum) {
      split_head_stats(kp, problem, n, s_head_m, s_head_inv);
    }
    __syncthreads();
  }
  uint32_t ordered[kItems];
  uint32_t sizes[kItems];
  const bool bad =
      load_select_items<kThreads, kItems>(kp, problem, n, s_head_m, s_head_inv, ordered, sizes);
  block_select<kThreads, kItems>(kp, problem, n, ordered, sizes, bad, sh,
                                 [&](uint32_t(&again)[kItems]) {
                                   uint32_t unused_sizes[kItems];
                                   load_select_items<kThreads, kItems>(
                                       kp, problem, n, s_head_m, s_head_inv, again, unused_sizes);
                                 });
  epi.template run<kThreads>(kp, problem, nullptr);
}

namespace cluster_select_device {

/// A 16-byte piece of a centroid (4 fp32 or 8 fp16 values) dotted with the matching query values
/// `x` (fp32, one or two float4), accumulated in fp32 onto d.
__device__ __forceinline__ float dot_piece(const float4& c, const float4 (&x)[1], float d) {
  d = fmaf(c.x, x[0].x, d);
  d = fmaf(c.y, x[0].y, d);
  d = fmaf(c.z, x[0].z, d);
  return fmaf(c.w, x[0].w, d);
}
__device__ __forceinline__ float dot_piece(const uint4& c, const float4 (&x)[2], float d) {
  const __half2* h = reinterpret_cast<const __half2*>(&c);
  const float2 a = __half22float2(h[0]), b = __half22float2(h[1]), e = __half22float2(h[2]),
               f = __half22float2(h[3]);
  d = fmaf(a.x, x[0].x, d);
  d = fmaf(a.y, x[0].y, d);
  d = fmaf(b.x, x[0].z, d);
  d = fmaf(b.y, x[0].w, d);
  d = fmaf(e.x, x[1].x, d);
  d = fmaf(e.y, x[1].y, d);
  d = fmaf(f.x, x[1].z, d);
  return fmaf(f.y, x[1].w, d);
}

/// The logits of centroids [b, e) of a problem's row `cb` (kDim elements each, fp32 or fp16)
/// against its G queries q4 (shared memory, fp32 [G][kDim]), into logits[g * slice + j - b],
/// times `scale`: eight lanes per centroid, 16-byte loads, and as many bytes in flight per thread
/// for either type (an fp16 pass covers twice the centroids of an fp32 one).
template <int kDim, int kThreads, typename C>
__device__ __forceinline__ void slice_logits(const C* cb, int b, int e, int G, const float4* q4,
                                             float* logits, int slice, float scale) {
  using Piece = std::conditional_t<std::is_same_v<C, float>, float4, uint4>;
  constexpr int kLanes = 8;                                       // lanes per centroid
  constexpr int kPieces = kDim * sizeof(C) / 16;                  // 16-byte pieces of a centroid
  constexpr int kPerLane = kPieces / kLanes;                      // of them per lane
  constexpr int kQ = 4 / sizeof(C);                               // query float4s per piece
  constexpr int kRounds = (kDim > 128 ? 1 : 2) * kQ;              // centroids per lane group
  constexpr int kPass = kThreads / 32 * (32 / kLanes) * kRounds;  // centroids per block pass
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int sub = lane % kLanes, grp = lane / kLanes;
  const Piece* pieces = reinterpret_cast<const Piece*>(cb);
  for (int base = b; base < e; base += kPass) {  // block-uniform
    Piece c[kRounds][kPerLane];
    int js[kRounds];
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      js[r] = base + (warp * kRounds + r) * (32 / kLanes) + grp;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        c[r][k] = js[r] < e
                      ? __ldg(pieces + static_cast<size_t>(js[r]) * kPieces + k * kLanes + sub)
                      : Piece{};
      }
    }
    for (int g = 0; g < G; ++g) {
      // Up to head_dim 128 in fp16 the lane's query values are loaded once per head and pass (its
      // pieces' values fit in registers beside the centroids); otherwise once per centroid round.
      constexpr bool kOnce = kQ > 1 && kPerLane <= 2;
      float4 x[kOnce ? kPerLane : 1][kQ];
      auto load_x = [&](int k, float4(&to)[kQ]) {
#pragma unroll
        for (int i = 0; i < kQ; ++i) to[i] = q4[g * (kDim / 4) + (k * kLanes + sub) * kQ + i];
      };
      if constexpr (kOnce) {
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) load_x(k, x[k]);
      }
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {
        float d = 0.f;
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
          if constexpr (kOnce) {
            d = dot_piece(c[r][k], x[k], d);
          } else {
            load_x(k, x[0]);
            d = dot_piece(c[r][k], x[0], d);
          }
        }
#pragma unroll
        for (int o = kLanes / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        if (js[r] < e && sub == g % kLanes) logits[g * slice + (js[r] - b)] = d * scale;
      }
    }
  }
}

}  // namespace cluster_select_device

/// Dynamic shared memory of score_select_cluster_kernel, in bytes from its start: the problem's
/// queries [G][kDim] (float), the per-CTA, per-head (max, sum of exp) partials [cluster][G]
/// (float2), this CTA's logits [G][slice], and, read in CTA 0 only, the problem's scores and
/// cluster sizes [max_clusters] each, then (16-byte aligned) the epilogue's stage_bytes, which CTA
/// 0 fills once its logits are done.
struct ClusterSelectSmem {
  int32_t partials, logits, scores, sizes, stage, total;
  __host__ __device__ static ClusterSelectSmem of(int group_size, int head_dim, int cluster,
                                                  int slice, int max_clusters,
                                                  int stage_bytes = 0) {
    ClusterSelectSmem l;
    l.partials = group_size * head_dim * 4;
    l.logits = l.partials + cluster * group_size * 8;
    l.scores = l.logits + group_size * slice * 4;
    l.sizes = l.scores + max_clusters * 4;
    l.stage = (l.sizes + max_clusters * 4 + 15) / 16 * 16;
    l.total = l.stage + stage_bytes;
    return l;
  }
};

/// The body of score_select_cluster_kernel (below), for kernels that go on after it: CTA 0 of
/// each cluster returns once its epilogue has run, the other CTAs after the scores reached CTA 0.
/// `smem` is the dynamic shared memory (ClusterSelectSmem; the queries stay at its start), sh and
/// s_head_* static shared memory of the calling kernel. sm_90 only.
template <int kDim, int kThreads, int kItems, typename Epilogue>
__device__ __forceinline__ void score_select_in_cluster(
    const ScoreKernelParams& sk, const SelectKernelParams& kp, const Epilogue& epi, int slice,
    cluster_select_device::BlockSelectShared<kThreads, kItems>& sh, float* s_head_m,
    float* s_head_inv, unsigned char* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using namespace cluster_select_device;
  constexpr int kWarps = kThreads / 32;
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  // Remote shared memory may be written only once its CTA runs: arrive now, wait before the first
  // remote store.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  const int cs = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int problem = static_cast<int>(blockIdx.x) / cs;
  const int G = kp.group_size;
  const ClusterSelectSmem lay =
      ClusterSelectSmem::of(G, kDim, cs, slice, kp.max_clusters, epi.stage_bytes());
  float4* q4 = reinterpret_cast<float4*>(smem);
  float2* part = reinterpret_cast<float2*>(smem + lay.partials);
  float* logits = reinterpret_cast<float*>(smem + lay.logits);
  float* scores = reinterpret_cast<float*>(smem + lay.scores);
  int32_t* sizes_s = reinterpret_cast<int32_t*>(smem + lay.sizes);
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  pdl_wait();
  pdl_launch_dependents();

  const int n = clamp_clusters(kp.num_clusters[problem], kp.max_clusters);
  const int per = (n + cs - 1) / cs;
  const int b = min(n, rank * per), e = min(n, b + per), cnt = e - b;
  const int stage_key = rank == 0 ? epi.stage_key(problem) : 0;
  if (rank == 0) {  // the sizes, in the background until the selection
    const int32_t* zs = sizes_of(kp, problem);
    for (int j = static_cast<int>(threadIdx.x); j < n; j += kThreads) {
      __pipeline_memcpy_async(sizes_s + j, zs + j, sizeof(int32_t));
    }
    __pipeline_commit();
  }

  // ---- the slice's logits ----
  const size_t crow = sk.centroid_rows ? static_cast<size_t>(sk.centroid_rows[problem])
                                       : static_cast<size_t>(problem);
  const float4* qsrc =
      reinterpret_cast<const float4*>(sk.queries) + static_cast<size_t>(problem) * G * (kDim / 4);
  for (int i = static_cast<int>(threadIdx.x); i < G * kDim / 4; i += kThreads) q4[i] = qsrc[i];
  __syncthreads();
  const size_t first = crow * static_cast<size_t>(kp.max_clusters) * kDim;
  if (sk.centroids_f16 != nullptr) {  // block-uniform
    slice_logits<kDim, kThreads>(sk.centroids_f16 + first, b, e, G, q4, logits, slice, sk.scale);
  } else {
    slice_logits<kDim, kThreads>(sk.centroids + first, b, e, G, q4, logits, slice, sk.scale);
  }
  __syncthreads();
  if (rank == 0) {  // the epilogue's stage, in the background until it runs
    epi.template prefetch<kThreads>(kp, problem, n, stage_key, smem + lay.stage);
    __pipeline_commit();
  }
  // ---- each head's (max, sum of exp) over the slice, to every CTA of the cluster ----
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
  for (int g = warp; g < G; g += kWarps) {
    const float* lg = logits + g * slice;
    float m = -INFINITY;
    for (int i = lane; i < cnt; i += 32) m = fmaxf(m, lg[i]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.f;
    if (m != -INFINITY) {
      for (int i = lane; i < cnt; i += 32) sum += __expf(lg[i] - m);
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane < cs) cluster.map_shared_rank(part, lane)[rank * G + g] = make_float2(m, sum);
  }
  cluster.sync();  // every CTA holds every partial
  for (int g = warp; g < G; g += kWarps) {
    const float2 v = lane < cs ? part[lane * G + g] : make_float2(-INFINITY, 0.f);
    float m = v.x;
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = v.y > 0.f ? v.y * __expf(v.x - m) : 0.f;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) {
      s_head_m[g] = m;
      s_head_inv[g] = 1.f / sum;
    }
  }
  __syncthreads();
  // ---- the slice's scores, into CTA 0 ----
  float* scores0 = cluster.map_shared_rank(scores, 0);
  const bool max_agg = kp.aggregation == ScoreAggregation::kMax;
  const size_t row = static_cast<size_t>(problem) * kp.max_clusters;
  for (int i = static_cast<int>(threadIdx.x); i < cnt; i += kThreads) {
    float s = max_agg ? -INFINITY : 0.f;
    bool nonfinite = false;  // fmaxf would drop a NaN
    for (int g = 0; g < G; ++g) {
      const float l = logits[g * slice + i];
      s = max_agg ? fmaxf(s, l) : s + __expf(l - s_head_m[g]) * s_head_inv[g];
      nonfinite |= !isfinite(l);
    }
    if (nonfinite) s = NAN;  // the problem is flagged and selects nothing
    scores0[b + i] = s;
    if (kp.scores_out != nullptr) kp.scores_out[row + b + i] = s;
  }
  cluster.sync();  // CTA 0 holds every score; no CTA touches another's memory after this
  if (rank != 0) return;
  __pipeline_wait_prior(0);  // the sizes and the epilogue's stage
  __syncthreads();
  auto load = [&](uint32_t(&ordered)[kItems], uint32_t* sizes) {
    bool bad = false;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = select_item_cluster<kThreads, kItems>(i);
      const bool valid = j < n;
      const float s = valid ? scores[j] : 0.f;
      bad |= valid && !isfinite(s);
      ordered[i] = ordered_score(s);
      if (sizes != nullptr)
        sizes[i] = valid && sizes_s[j] > 0 ? static_cast<uint32_t>(sizes_s[j]) : 0u;
    }
    return bad;
  };
  uint32_t ordered[kItems];
  uint32_t sizes[kItems];
  const bool bad = load(ordered, sizes);
  block_select<kThreads, kItems>(kp, problem, n, ordered, sizes, bad, sh,
                                 [&](uint32_t(&again)[kItems]) { load(again, nullptr); });
  epi.template run<kThreads>(kp, problem, smem + lay.stage);
#endif
}

/// Scoring, aggregation and selection of each problem by a thread block cluster (sm_90):
/// grid.x = problem * cluster + rank, cluster dims (cluster, 1, 1), kThreads threads, dynamic
/// shared memory ClusterSelectSmem. The CTAs of a problem split its valid centroids into
/// contiguous slices of at most `slice`, compute the slice's logits into shared memory (eight
/// lanes per centroid, 16-byte loads, as split_logits_kernel) and each head's (max, sum of exp)
/// over it, and send those partials to every CTA of the cluster; after a cluster barrier each CTA
/// aggregates its slice's scores and writes them into CTA 0's shared memory; after a second
/// barrier CTA 0 selects (block_select) and runs the epilogue, while its cluster sizes have been
/// copied to shared memory in the background (cp.async) since the kernel began. The logits and
/// scores never travel through global memory, and one kernel replaces split_logits_kernel and the
/// selection block with its grid-wide dependency. Scores are those of the split path within
/// rounding (the heads' statistics are combined from other partitions).
template <int kDim, int kThreads, int kItems, typename Epilogue>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads)
    score_select_cluster_kernel(ScoreKernelParams sk, SelectKernelParams kp, Epilogue epi,
                                int slice) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ cluster_select_device::BlockSelectShared<kThreads, kItems> sh;
  __shared__ float s_head_m[cluster_select_device::kMaxSplitGroup],
      s_head_inv[cluster_select_device::kMaxSplitGroup];
  extern __shared__ float4 smem4[];
  score_select_in_cluster<kDim, kThreads, kItems>(sk, kp, epi, slice, sh, s_head_m, s_head_inv,
                                                  reinterpret_cast<unsigned char*>(smem4));
#endif
}

/// Grid: block.x = problem, 256 threads striding over its max_clusters slots. Writes the keys of
/// the segmented sort (0 for padding), the segment offsets, and whether a valid score is not
/// finite.
static __global__ void __launch_bounds__(256)
    build_select_keys_kernel(SelectKernelParams kp, int num_problems, uint64_t* keys,
                             int32_t* offsets, int32_t* problem_bad) {
  using namespace cluster_select_device;
  const int problem = blockIdx.x;
  const int n = clamp_clusters(kp.num_clusters[problem], kp.max_clusters);
  const size_t row = static_cast<size_t>(problem) * kp.max_clusters;
  bool bad = false;
  for (int j = threadIdx.x; j < kp.max_clusters; j += blockDim.x) {
    uint64_t key = 0;
    if (j < n) {
      const float s = kp.scores[row + j];
      bad |= !isfinite(s);
      key = sort_key(s, static_cast<uint32_t>(j), kp.id_bits);
    }
    keys[row + j] = key;
  }
  if (threadIdx.x == 0) {
    offsets[problem] = static_cast<int32_t>(row);  // < 2^31, checked on the host
    if (problem == num_problems - 1) {
      offsets[num_problems] = static_cast<int32_t>(row + kp.max_clusters);
    }
  }
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    problem_bad[problem] = bad ? 1 : 0;
    if (bad) flag_nonfinite(kp.nonfinite_problem, problem);
  }
}

/// Grid: block.x = problem. Walks the problem's segment of kp.sorted_keys in tiles of
/// kThreads * kItems (blocked), carrying the rows and slots of earlier tiles, until the clusters
/// or the budget run out.
template <int kThreads, int kItems>
__global__ void __launch_bounds__(kThreads) select_clusters_sorted_kernel(SelectKernelParams kp) {
  using namespace cluster_select_device;
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int s_count, s_rows;

  const int problem = blockIdx.x;
  const int n = clamp_clusters(kp.num_clusters[problem], kp.max_clusters);
  const size_t row = static_cast<size_t>(problem) * kp.max_clusters;
  const int64_t budget =
      kp.problem_bad[problem] ? 0 : (kp.budgets[problem] > 0 ? kp.budgets[problem] : 0);
  if (threadIdx.x == 0) {
    s_count = 0;
    s_rows = 0;
  }
  __syncthreads();
  int64_t carry_rows = 0;
  int carry_count = 0;
  // carry_rows comes from the block aggregate, so the loop condition is block-uniform.
  for (int base = 0; base < n && carry_rows < budget; base += kThreads * kItems) {
    uint64_t keys[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int pos = base + static_cast<int>(threadIdx.x) * kItems + i;
      keys[i] = pos < n ? kp.sorted_keys[row + pos] : 0;
    }
    apply_budget_tile<kThreads, kItems>(keys, base, n, sizes_of(kp, problem), budget, kp.overflow,
                                        kp.id_bits, kp.selected_ids + row, kp.selected_rows + row,
                                        carry_rows, carry_count, scan_storage, s_count, s_rows);
    __syncthreads();  // scan_storage is reused by the next tile
  }
  __syncthreads();
  finish_selection(kp, problem, s_count, s_rows, kp.max_clusters);
}

// ---- split scoring: many blocks per problem, for batches too small to fill the GPU ----

/// Grid: (num_problems, ceil(max_clusters / kSplitTile)), kSplitThreads threads; dynamic shared
/// memory G * kDim floats. Writes logits[p][g][j] = scale * q_g . c_j for the tile's valid
/// centroids j and, when `partials` is not null, the tile's per-head (max, sum of exp(logit -
/// max)) over them at partials[(p * tiles + tile) * G + g] (tiles = gridDim.y). Eight lanes share a
/// centroid with 16-byte loads (128 contiguous bytes per load across them); a warp takes 8
/// centroids, and all of a lane's loads are issued before its first FMA (one round trip).
template <int kDim>
__global__ void __launch_bounds__(cluster_select_device::kSplitThreads)
    split_logits_kernel(ScoreKernelParams kp, float* __restrict__ logits,
                        float2* __restrict__ partials) {
  using namespace cluster_select_device;
  constexpr int kLanes = 8;                      // lanes per centroid
  constexpr int kPerLane = kDim / (4 * kLanes);  // float4 pieces of a centroid per lane
  constexpr int kRounds = 2;                     // centroids per lane group
  constexpr int kWarps = kSplitThreads / 32;
  static_assert(kWarps * (32 / kLanes) * kRounds == kSplitTile, "one tile per block");
  extern __shared__ float4 q4[];  // [G][kDim / 4]
  __shared__ float2 s_part[kWarps][kMaxSplitGroup];
  pdl_wait();
  pdl_launch_dependents();
  const int p = blockIdx.x, G = kp.group_size, tile = blockIdx.y;
  const int n = clamp_clusters(kp.num_clusters[p], kp.max_clusters);
  const int j0 = tile * kSplitTile;
  if (j0 >= n) return;  // block-uniform: these tiles hold no valid centroid
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int sub = lane % kLanes, grp = lane / kLanes;
  const size_t crow =
      kp.centroid_rows ? static_cast<size_t>(kp.centroid_rows[p]) : static_cast<size_t>(p);
  const float4* cb = reinterpret_cast<const float4*>(kp.centroids) +
                     crow * static_cast<size_t>(kp.max_clusters) * (kDim / 4);
  float4 c[kRounds][kPerLane];
  int js[kRounds];
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    js[r] = j0 + (warp * kRounds + r) * (32 / kLanes) + grp;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      c[r][e] = js[r] < n ? __ldg(cb + static_cast<size_t>(js[r]) * (kDim / 4) + e * kLanes + sub)
                          : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  const float4* qsrc =
      reinterpret_cast<const float4*>(kp.queries) + static_cast<size_t>(p) * G * (kDim / 4);
  for (int i = static_cast<int>(threadIdx.x); i < G * kDim / 4; i += kSplitThreads) q4[i] = qsrc[i];
  __syncthreads();
  for (int g = 0; g < G; ++g) {
    float l[kRounds];
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      float d = 0.f;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        const float4 q = q4[g * (kDim / 4) + e * kLanes + sub];
        d = fmaf(c[r][e].x, q.x, d);
        d = fmaf(c[r][e].y, q.y, d);
        d = fmaf(c[r][e].z, q.z, d);
        d = fmaf(c[r][e].w, q.w, d);
      }
#pragma unroll
      for (int o = kLanes / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
      d *= kp.scale;
      l[r] = js[r] < n ? d : -INFINITY;
      if (js[r] < n && sub == g % kLanes) {
        logits[(static_cast<size_t>(p) * G + g) * kp.max_clusters + js[r]] = d;
      }
    }
    if (partials != nullptr) {  // block-uniform
      float m = fmaxf(l[0], l[1]);
#pragma unroll
      for (int o = kLanes; o < 32; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      float e = 0.f;
#pragma unroll
      for (int r = 0; r < kRounds; ++r) e += js[r] < n ? __expf(l[r] - m) : 0.f;
#pragma unroll
      for (int o = kLanes; o < 32; o <<= 1) e += __shfl_xor_sync(0xffffffffu, e, o);
      if (lane == 0) s_part[warp][g] = make_float2(m, e);
    }
  }
  if (partials == nullptr) return;
  __syncthreads();
  for (int g = static_cast<int>(threadIdx.x); g < G; g += kSplitThreads) {
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, s_part[w][g].x);
    float e = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (s_part[w][g].y > 0.f) e += s_part[w][g].y * __expf(s_part[w][g].x - m);
    }
    partials[(static_cast<size_t>(p) * gridDim.y + tile) * G + g] = make_float2(m, e);
  }
}

namespace detail {

/// Kernel arguments of a selection (any mode; logits mode is set by the split launcher).
inline SelectKernelParams select_kernel_params(const ClusterSelectParams& p,
                                               const ClusterSelectTensors& t) {
  SelectKernelParams kp{};
  kp.scores = t.scores;
  kp.num_clusters = t.num_clusters;
  kp.cluster_sizes = t.cluster_sizes;
  kp.size_rows = t.cluster_size_rows;
  kp.budgets = t.budgets;
  kp.selected_ids = t.selected_ids;
  kp.selected_rows = t.selected_rows;
  kp.num_selected = t.num_selected;
  kp.total_rows = t.total_rows;
  kp.nonfinite_problem = t.nonfinite_problem;
  kp.max_clusters = p.max_clusters;
  kp.id_bits = cluster_id_bits(p.max_clusters);
  kp.overflow = p.overflow;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  kp.aligned_rows = p.max_clusters % 4 == 0 && aligned(t.scores) && aligned(t.cluster_sizes) &&
                    aligned(t.selected_ids) && aligned(t.selected_rows);
  kp.group_size = p.group_size;
  kp.aggregation = p.aggregation;
  return kp;
}

/// Launches the block selection tier for p.max_clusters (<= kMaxBlockSortClusters) with `epi`.
template <typename Epilogue>
void launch_select_block(const ClusterSelectParams& p, const SelectKernelParams& kp,
                         const Epilogue& epi, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.num_problems));
  if (p.max_clusters <= 256) {
    launch_pdl(select_clusters_block_kernel<128, 2, Epilogue>, grid, 128, 0, stream, kp, epi);
  } else if (p.max_clusters <= 1024) {
    launch_pdl(select_clusters_block_kernel<256, 4, Epilogue>, grid, 256, 0, stream, kp, epi);
  } else {
    launch_pdl(select_clusters_block_kernel<512, 8, Epilogue>, grid, 512, 0, stream, kp, epi);
  }
  KVTIER_CUDA_CHECK_LAUNCH("select_clusters_block_kernel");
}

/// The largest cluster size score_select_cluster_kernel may take: `KVTIER_CLUSTER_SELECT=N` in the
/// environment (default 8, the portable size; at most 16); 0 selects the two-kernel path (split
/// logits, then the selection block) instead, for comparison.
int cluster_select_max_size();

/// Whether a recall layer's attention may run inside the clustered score-and-select
/// (select_attend_kernels.cuh): `KVTIER_SELECT_ATTEND=0` in the environment keeps it a kernel of
/// its own (default 1).
bool select_attend_enabled();

/// Scoring arguments of a call (scores and nonfinite_problem from t).
ScoreKernelParams score_kernel_params(const ClusterSelectParams& p, const ClusterSelectTensors& t);

/// How score_select_cluster_kernel runs a call: `cluster` CTAs per problem (0: it does not run),
/// each scoring at most `slice` centroids, with `bytes` of dynamic shared memory.
struct ClusterSelectPlan {
  int cluster = 0, slice = 0;
  size_t bytes = 0;
};

/// The cluster plan of a kernel that runs score_select_in_cluster, whose dynamic shared memory
/// is bytes_of(cluster, slice): the largest power of two up to cluster_select_max_size() with
/// which the problems' clusters fill at most the multiprocessors once (a batch of one sequence
/// with 8 KV heads: 8 clusters of 8 on an H100's 132), raised while the shared memory does not
/// fit (more CTAs, shorter slices of logits), lowered to what the device schedules, and then
/// while the device cannot hold every problem's cluster at once (co_resident_cluster_size);
/// cluster 0 without sm_90 code and device.
template <typename BytesOf>
ClusterSelectPlan plan_cluster_kernel(const ClusterSelectParams& p, const void* kernel, int threads,
                                      BytesOf&& bytes_of) {
  ClusterSelectPlan plan;
  const int max_size = cluster_select_max_size();
  if (max_size == 0 || !pdl_enabled(kernel)) return plan;
  const size_t limit = cluster_kernel_info(kernel).max_dynamic;
  const int sms = sm_count();
  int cs = 1;
  while (cs * 2 <= max_size && static_cast<int64_t>(p.num_problems) * cs * 2 <= sms) cs *= 2;
  auto slice_of = [&](int c) { return ((p.max_clusters + c - 1) / c + 3) / 4 * 4; };
  bool lowered = false;  // to what the device schedules: never raised again
  for (;;) {
    const int slice = slice_of(cs);
    const size_t bytes = bytes_of(cs, slice);
    if (bytes > limit) {
      if (lowered || cs * 2 > max_size) return plan;
      cs *= 2;
      continue;
    }
    const int most = max_cluster_size(kernel, threads, bytes);
    if (most >= cs) {
      const int size = co_resident_cluster_size(
          p.num_problems, cs,
          [&](int c) { return max_active_clusters(kernel, threads, bytes_of(c, slice_of(c)), c); },
          [&](int c) { return bytes_of(c, slice_of(c)) <= limit; });
      return ClusterSelectPlan{size, slice_of(size), bytes_of(size, slice_of(size))};
    }
    if (most == 0) return plan;
    while (cs > most) cs /= 2;
    lowered = true;
  }
}

/// plan(stage_bytes) with the epilogue's stage, or without it (epi.without_stage()) where the
/// kernel's shared memory does not hold the stage: the plan and the epilogue to launch with.
template <typename Epilogue, typename Plan>
std::pair<ClusterSelectPlan, Epilogue> plan_with_stage(const Epilogue& epi, Plan&& plan) {
  const ClusterSelectPlan staged = plan(epi.stage_bytes());
  if (staged.cluster != 0 || epi.stage_bytes() == 0) return {staged, epi};
  const Epilogue e = epi.without_stage();
  return {plan(e.stage_bytes()), e};
}

/// The plan of one instantiation of score_select_cluster_kernel (plan_cluster_kernel with its
/// ClusterSelectSmem).
template <int kDim>
ClusterSelectPlan plan_score_select_cluster(const ClusterSelectParams& p, const void* kernel,
                                            int threads, int stage_bytes = 0) {
  return plan_cluster_kernel(p, kernel, threads, [&](int cs, int slice) {
    return static_cast<size_t>(
        ClusterSelectSmem::of(p.group_size, kDim, cs, slice, p.max_clusters, stage_bytes).total);
  });
}

/// Calls f(kernel, threads) with the instantiation of score_select_cluster_kernel (as a function
/// pointer) for the call's head_dim and block tier.
template <typename Epilogue, typename F>
void dispatch_score_select_cluster(const ClusterSelectParams& p, F&& f) {
  dispatch_head_dim(p.head_dim, [&](auto dim) {
    constexpr int kDim = decltype(dim)::value;
    if (p.max_clusters <= 256) {
      f(dim, score_select_cluster_kernel<kDim, 128, 2, Epilogue>, 128);
    } else if (p.max_clusters <= 1024) {
      f(dim, score_select_cluster_kernel<kDim, 256, 4, Epilogue>, 256);
    } else {
      f(dim, score_select_cluster_kernel<kDim, 512, 8, Epilogue>, 512);
    }
  });
}

/// Launches score_select_cluster_kernel for a split score-and-select when its plan runs it (sm_90,
/// shared memory that fits, a cluster the device schedules); false (nothing launched) otherwise.
template <typename Epilogue>
bool launch_score_select_cluster(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                                 const SelectKernelParams& kp, const Epilogue& epi,
                                 cudaStream_t stream) {
  const ScoreKernelParams sk = score_kernel_params(p, t);  // its scores output is not used
  bool launched = false;
  dispatch_score_select_cluster<Epilogue>(p, [&](auto dim, auto kernel, int threads) {
    constexpr int kDim = decltype(dim)::value;
    const auto [plan, e] = plan_with_stage(epi, [&](int stage_bytes) {
      return plan_score_select_cluster<kDim>(p, reinterpret_cast<const void*>(kernel), threads,
                                             stage_bytes);
    });
    if (plan.cluster == 0) return;
    const cudaError_t err = launch_pdl_cluster(
        kernel, dim3(static_cast<unsigned>(p.num_problems * plan.cluster)), threads, plan.bytes,
        stream, static_cast<unsigned>(plan.cluster), sk, kp, e, plan.slice);
    KVTIER_CHECK(err == cudaSuccess, "score_select_cluster_kernel: ", cudaGetErrorString(err),
                 " (problems ", p.num_problems, ", cluster ", plan.cluster, ", threads ", threads,
                 ", dynamic shared memory ", plan.bytes, " bytes, max_clusters ", p.max_clusters,
                 ", group ", p.group_size, ")");
    launched = true;
  });
  return launched;
}

/// launch_score_select_split with an epilogue run by each problem's selection block once its
/// selection is written (the engine builds its attention chunk lists there).
template <typename Epilogue>
void launch_score_select_split_with(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                                    void* workspace, size_t workspace_bytes, const Epilogue& epi,
                                    cudaStream_t stream) {
  const SplitLayout l = check_score_select_split(p, t, workspace, workspace_bytes);
  if (p.num_problems == 0) return;
  auto* base = static_cast<std::byte*>(workspace);
  auto* logits = reinterpret_cast<float*>(base + l.logits);
  auto* partials = reinterpret_cast<float2*>(base + l.partials);
  SelectKernelParams kp = select_kernel_params(p, t);
  kp.logits = logits;
  kp.partials = partials;
  kp.scores = nullptr;
  kp.scores_out = t.scores;
  if (launch_score_select_cluster(p, t, kp, epi, stream)) return;
  launch_split_logits(p, t, logits, partials, stream);
  launch_select_block(p, kp, epi, stream);
}

}  // namespace detail

}  // namespace kvtier::kernels
