// Device code of cluster scoring and budgeted selection. Included by cluster_select.cu and GPU
// tests. One thread block per problem throughout.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include "kernels/cluster_select.h"

namespace kvtier::kernels {

/// Scoring arguments, by value.
struct ScoreKernelParams {
  const float* queries;         // [num_problems, group_size, head_dim]
  const float* centroids;       // [num_problems, max_clusters, head_dim]
  const int32_t* num_clusters;  // [num_problems]
  float* scores;                // [num_problems, max_clusters]
  int32_t* nonfinite_problem;   // [1] or null: lowest problem with a non-finite input or logit
  int32_t group_size;
  int32_t max_clusters;
  float scale;
};

/// Selection arguments, by value.
struct SelectKernelParams {
  const float* scores;           // [num_problems, max_clusters]
  const int32_t* num_clusters;   // [num_problems]
  const int32_t* cluster_sizes;  // [num_problems, max_clusters]
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
};

namespace cluster_select_device {

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

/// Device twin of detail::cluster_sort_key (bit for bit).
__device__ __forceinline__ uint64_t sort_key(float score, uint32_t id, int id_bits) {
  const uint32_t u = __float_as_uint(score + 0.f);  // -0 + 0 = +0
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  const uint64_t id_mask = (uint64_t{1} << id_bits) - 1;
  return (static_cast<uint64_t>(ordered) << id_bits) | (id_mask - id);
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
  const float* c_base = kp.centroids + static_cast<size_t>(problem) * kp.max_clusters * kHeadDim;
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

/// Writes num_selected / total_rows and the padding (-1 ids, 0 rows) after the selection. Call
/// after a barrier that follows the last apply_budget_tile.
__device__ __forceinline__ void finish_selection(const SelectKernelParams& kp, int problem,
                                                 int count, int rows) {
  const size_t row = static_cast<size_t>(problem) * kp.max_clusters;
  if (threadIdx.x == 0) {
    kp.num_selected[problem] = count;
    kp.total_rows[problem] = rows;
  }
  for (int k = count + threadIdx.x; k < kp.max_clusters; k += blockDim.x) {
    kp.selected_ids[row + k] = -1;
    kp.selected_rows[row + k] = 0;
  }
}

}  // namespace cluster_select_device

/// Grid: block.x = problem. The block sorts (score, id) keys of its problem's valid clusters with
/// cub::BlockRadixSort (striped in: thread t loads j = i * kThreads + t; blocked out), descending,
/// over the 32 score bits and id_bits id bits only, then applies the budget in one tile.
/// kThreads * kItems >= max_clusters.
/// __launch_bounds__ caps registers at 64 so two 512-thread blocks fit an SM: 256 problems then
/// run in one wave on an H100's 132 SMs.
template <int kThreads, int kItems>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads)
    select_clusters_block_kernel(SelectKernelParams kp) {
  using namespace cluster_select_device;
  using Sort = cub::BlockRadixSort<uint64_t, kThreads, kItems>;
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ union {
    typename Sort::TempStorage sort;
    typename Scan::TempStorage scan;
  } storage;
  __shared__ int s_count, s_rows;

  const int problem = blockIdx.x;
  const int n = clamp_clusters(kp.num_clusters[problem], kp.max_clusters);
  const size_t row = static_cast<size_t>(problem) * kp.max_clusters;
  uint64_t keys[kItems];
  bool bad = false;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int j = i * kThreads + static_cast<int>(threadIdx.x);
    keys[i] = 0;  // padding sorts last: every finite score's key is larger
    if (j < n) {
      const float s = kp.scores[row + j];
      bad |= !isfinite(s);
      keys[i] = sort_key(s, static_cast<uint32_t>(j), kp.id_bits);
    }
  }
  if (threadIdx.x == 0) {
    s_count = 0;
    s_rows = 0;
  }
  int64_t budget = kp.budgets[problem] > 0 ? kp.budgets[problem] : 0;
  if (__syncthreads_or(bad)) {
    if (threadIdx.x == 0) flag_nonfinite(kp.nonfinite_problem, problem);
    budget = 0;  // a problem with a non-finite score selects nothing
  }
  if (n > 0 && budget > 0) {  // block-uniform
    Sort(storage.sort).SortDescending(keys, 0, 32 + kp.id_bits);
    __syncthreads();  // the scan reuses the sort's shared memory
    int64_t carry_rows = 0;
    int carry_count = 0;
    apply_budget_tile<kThreads, kItems>(keys, 0, n, kp.cluster_sizes + row, budget, kp.overflow,
                                        kp.id_bits, kp.selected_ids + row, kp.selected_rows + row,
                                        carry_rows, carry_count, storage.scan, s_count, s_rows);
  }
  __syncthreads();
  finish_selection(kp, problem, s_count, s_rows);
}

/// Grid: block.x = problem, 256 threads striding over its max_clusters slots. Writes the keys of
/// the segmented sort (0 for padding), the segment offsets, and whether a valid score is not
/// finite.
__global__ void __launch_bounds__(256)
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
    apply_budget_tile<kThreads, kItems>(keys, base, n, kp.cluster_sizes + row, budget, kp.overflow,
                                        kp.id_bits, kp.selected_ids + row, kp.selected_rows + row,
                                        carry_rows, carry_count, scan_storage, s_count, s_rows);
    __syncthreads();  // scan_storage is reused by the next tile
  }
  __syncthreads();
  finish_selection(kp, problem, s_count, s_rows);
}

}  // namespace kvtier::kernels
