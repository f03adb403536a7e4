// Device code of ClusterAttn's prefill compression: the flash-style observation-vote kernels and
// the one-block-per-head DBAC kernels. Included by density_cluster.cu (and GPU tests).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "kernels/density_cluster.h"

namespace kvtier::kernels::dbac_device {

// ---- observation votes ----

constexpr int kVoteThreads = 256;  // 16 x 16 threads, each a 4 x 4 register tile of scores
constexpr int kVoteTileRows = 64;  // query rows per chunk
constexpr int kVoteTileKeys = 64;  // keys per block
constexpr int kVoteTileDim = 32;   // head_dim slice staged in shared memory per step

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

struct VoteKernelParams {
  const void* q_window;  // [num_q_heads, window, head_dim]
  const void* keys;      // [num_kv_heads, num_tokens, head_dim]
  float2* partial;       // [num_tiles, num_q_heads * window]: (max, sum) of base-2 logits
  float2* row_stats;     // [num_q_heads * window]: (max, 1 / sum)
  float* votes;          // [num_kv_heads, num_prefix] (unpooled)
  int32_t* nonfinite;    // [1] or null
  int64_t num_tokens;    // n
  int64_t num_prefix;    // n - window
  int32_t window;
  int32_t rows_per_head;  // query heads per KV head x window
  int64_t num_rows;       // num_q_heads * window
  float scale_log2;       // softmax scale * log2(e)
};

/// Scores of query rows [row0, row0 + 64) of one KV head's group (q_group: its first row)
/// against keys [key0, key0 + 64) of that head: thread (tx, ty) gets s[u][v] = dot(row
/// row0 + ty + 16 u, key key0 + tx + 16 v), summed over dims in order with fmaf (the same in both
/// passes, so both see bitwise the same scores). Out-of-range rows and keys read as zero. Every
/// thread of the block must call it (it synchronizes).
template <typename T, int kHeadDim>
__device__ __forceinline__ void score_tile(const T* q_group, int rows, int row0, const T* k_head,
                                           int64_t num_keys, int64_t key0, float (&s)[4][4],
                                           float (*qs)[kVoteTileRows + 1],
                                           float (*ks)[kVoteTileKeys + 1], bool* bad) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) s[u][v] = 0.f;
  for (int d0 = 0; d0 < kHeadDim; d0 += kVoteTileDim) {
    for (int idx = threadIdx.x; idx < kVoteTileRows * kVoteTileDim; idx += kVoteThreads) {
      const int r = idx / kVoteTileDim, dd = idx % kVoteTileDim;
      float x = 0.f;
      if (row0 + r < rows)
        x = to_float(q_group[static_cast<int64_t>(row0 + r) * kHeadDim + d0 + dd]);
      *bad |= !isfinite(x);
      qs[dd][r] = x;
    }
    for (int idx = threadIdx.x; idx < kVoteTileKeys * kVoteTileDim; idx += kVoteThreads) {
      const int j = idx / kVoteTileDim, dd = idx % kVoteTileDim;
      float x = 0.f;
      if (key0 + j < num_keys) x = to_float(k_head[(key0 + j) * kHeadDim + d0 + dd]);
      *bad |= !isfinite(x);
      ks[dd][j] = x;
    }
    __syncthreads();
#pragma unroll 8
    for (int dd = 0; dd < kVoteTileDim; ++dd) {
      float a[4], b[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) a[u] = qs[dd][ty + 16 * u];
#pragma unroll
      for (int v = 0; v < 4; ++v) b[v] = ks[dd][tx + 16 * v];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) s[u][v] = fmaf(a[u], b[v], s[u][v]);
    }
    __syncthreads();
  }
}

/// Pass 1. Grid: x = key tile (64 keys of the whole prompt), y = KV head. Block: 16 x 16
/// threads; for each chunk of 64 query rows of the head's group, the 16 threads of a row (one
/// half-warp) reduce its max and sum of exp2(logit - max) over the tile's keys it may attend
/// (key <= its position) and write them to partial[tile][row].
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kVoteThreads) votes_partial_kernel(VoteKernelParams p) {
  __shared__ float qs[kVoteTileDim][kVoteTileRows + 1];
  __shared__ float ks[kVoteTileDim][kVoteTileKeys + 1];
  const int g = blockIdx.y, tile = blockIdx.x;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t key0 = static_cast<int64_t>(tile) * kVoteTileKeys;
  const int rows = p.rows_per_head;
  const T* q_group = static_cast<const T*>(p.q_window) + static_cast<int64_t>(g) * rows * kHeadDim;
  const T* k_head =
      static_cast<const T*>(p.keys) + static_cast<int64_t>(g) * p.num_tokens * kHeadDim;
  bool bad = false;
  for (int row0 = 0; row0 < rows; row0 += kVoteTileRows) {
    float s[4][4];
    score_tile<T, kHeadDim>(q_group, rows, row0, k_head, p.num_tokens, key0, s, qs, ks, &bad);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int r = row0 + ty + 16 * u;
      const int64_t t = p.num_prefix + r % p.window;  // the query's position
      float x[4], mx = -INFINITY;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int64_t key = key0 + tx + 16 * v;
        x[v] = r < rows && key <= t && key < p.num_tokens ? __fmul_rn(s[u][v], p.scale_log2)
                                                          : -INFINITY;
        mx = fmaxf(mx, x[v]);
      }
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      float sum = 0.f;
#pragma unroll
      for (int v = 0; v < 4; ++v) sum += x[v] == -INFINITY ? 0.f : exp2f(__fsub_rn(x[v], mx));
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (tx == 0 && r < rows)
        p.partial[static_cast<int64_t>(tile) * p.num_rows + static_cast<int64_t>(g) * rows + r] =
            make_float2(mx, sum);
    }
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0 && p.nonfinite) atomicOr(p.nonfinite, 1);
}

/// Combine. Grid: 1-D over query rows, one thread per row: max over its tiles, then the sum of
/// the tiles' sums rescaled to it, in tile order (deterministic).
__global__ void votes_combine_kernel(VoteKernelParams p, int32_t num_tiles) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.num_rows) return;
  float mx = -INFINITY;
  for (int32_t t = 0; t < num_tiles; ++t) mx = fmaxf(mx, p.partial[t * p.num_rows + row].x);
  float l = 0.f;
  for (int32_t t = 0; t < num_tiles; ++t) {
    const float2 pt = p.partial[t * p.num_rows + row];
    if (pt.y > 0.f) l += pt.y * exp2f(__fsub_rn(pt.x, mx));
  }
  p.row_stats[row] = make_float2(mx, 1.f / l);
}

/// Pass 2. Grid: x = key tile of the prefix (64 keys), y = KV head. Block: 16 x 16 threads. For
/// each chunk of 64 rows, thread (tx, ty) sums the probabilities of its 4 rows for its 4 keys;
/// the 16 partial sums of a key are then added in ty order by thread `key`, across chunks, so
/// each vote is a fixed-order sum written by exactly one thread (no atomics).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kVoteThreads) votes_accumulate_kernel(VoteKernelParams p) {
  __shared__ float qs[kVoteTileDim][kVoteTileRows + 1];
  __shared__ float ks[kVoteTileDim][kVoteTileKeys + 1];
  __shared__ float colsum[16][kVoteTileKeys + 1];
  const int g = blockIdx.y, tile = blockIdx.x;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t key0 = static_cast<int64_t>(tile) * kVoteTileKeys;
  const int rows = p.rows_per_head;
  const T* q_group = static_cast<const T*>(p.q_window) + static_cast<int64_t>(g) * rows * kHeadDim;
  const T* k_head =
      static_cast<const T*>(p.keys) + static_cast<int64_t>(g) * p.num_tokens * kHeadDim;
  bool bad = false;  // reported by pass 1
  float vote = 0.f;
  for (int row0 = 0; row0 < rows; row0 += kVoteTileRows) {
    float s[4][4];
    score_tile<T, kHeadDim>(q_group, rows, row0, k_head, p.num_prefix, key0, s, qs, ks, &bad);
    float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int r = row0 + ty + 16 * u;
      if (r >= rows) continue;
      const float2 st = p.row_stats[static_cast<int64_t>(g) * rows + r];
#pragma unroll
      for (int v = 0; v < 4; ++v)
        part[v] += exp2f(__fsub_rn(__fmul_rn(s[u][v], p.scale_log2), st.x)) * st.y;
    }
#pragma unroll
    for (int v = 0; v < 4; ++v) colsum[ty][tx + 16 * v] = part[v];
    __syncthreads();
    if (threadIdx.x < kVoteTileKeys)
      for (int y = 0; y < 16; ++y) vote += colsum[y][threadIdx.x];
    __syncthreads();
  }
  const int64_t key = key0 + threadIdx.x;
  if (threadIdx.x < kVoteTileKeys && key < p.num_prefix)
    p.votes[static_cast<int64_t>(g) * p.num_prefix + key] = vote;
}

/// Pooling. Grid: 1-D over num_kv_heads x num_prefix, one thread per output vote.
__global__ void votes_pool_kernel(const float* raw, int64_t num_prefix, int64_t count,
                                  VotePool pool, int32_t kernel, float* votes) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= count) return;
  const int64_t g = idx / num_prefix, j = idx % num_prefix, half = kernel / 2;
  const int64_t lo = j - half < 0 ? 0 : j - half;
  const int64_t hi = j + half > num_prefix - 1 ? num_prefix - 1 : j + half;
  const float* x = raw + g * num_prefix;
  float s = pool == VotePool::kAvg ? 0.f : x[lo];
  for (int64_t i = lo; i <= hi; ++i) s = pool == VotePool::kAvg ? s + x[i] : fmaxf(s, x[i]);
  votes[idx] = pool == VotePool::kAvg ? s / static_cast<float>(kernel) : s;
}

// ---- DBAC ----

constexpr int kDbacThreads = 512;  // one block per KV head (1024 would cap registers at 64: spills)

struct DbacKernelParams {
  const float* votes;  // [num_kv_heads, m]
  int32_t num_kv_heads;
  int32_t m;  // num_prefix
  int32_t window;
  int32_t eps;
  float ratio;
  float coverage;
  int64_t total_budget;
  int64_t budget_floor;
  int64_t cluster_capacity;  // per head
  int64_t range_capacity;
  int64_t kept_capacity;
  // outputs
  TokenRange* ranges;                // [num_kv_heads, range_capacity]
  int32_t* num_ranges;               // [num_kv_heads]
  int32_t* num_tokens;               // [num_kv_heads]
  int32_t* head_budget;              // [num_kv_heads]
  int32_t* concentration;            // [num_kv_heads] (the caller's or the workspace's)
  int32_t* kept;                     // [num_kv_heads, kept_capacity] or null
  int32_t* num_kept;                 // [num_kv_heads], written only with kept
  unsigned long long* invalid_vote;  // [1] or null; ULLONG_MAX when all votes are valid
  // workspace. NOTE: no const/__restrict__ on arrays a kernel writes and re-reads after
  // __syncthreads(), so loads never take the non-coherent read-only path.
  int32_t* shift;     // [num_kv_heads]
  int64_t* total;     // [num_kv_heads]
  int64_t* work;      // [num_kv_heads] budget split scratch
  int64_t* prefix;    // [num_kv_heads, m + 1]
  int32_t* cl_first;  // [num_kv_heads, cluster_capacity] first core point
  int32_t* cl_last;   // last core point
  int32_t* cl_begin;  // range begin
  int32_t* cl_end;    // range end
  int32_t* cl_taken;  // tokens taken (-1: none), then offset into the kept row
  int64_t* cl_mass;   // fixed-point vote mass of the range
};

struct MaxOp {
  __device__ __forceinline__ long long operator()(long long a, long long b) const {
    return a > b ? a : b;
  }
};

struct FMaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

/// A window start and its mass; the better one has more mass, then the lower start.
struct WindowPick {
  long long mass;
  int start;
};

struct WindowPickOp {
  __device__ __forceinline__ WindowPick operator()(const WindowPick& a, const WindowPick& b) const {
    return (b.mass > a.mass || (b.mass == a.mass && b.start < a.start)) ? b : a;
  }
};

struct RadixShared {
  unsigned long long bin_w[256];
  unsigned int bin_c[256];
  long long prefix, weight_above, count_above;
};

struct RadixPick {
  long long key, weight_above, count_above;
};

/// Block-wide radix selection by weight, 8 bits per pass from bit top_bits down (the same digits
/// and choices as radix_pick in density_cluster_cpu.cpp): the largest key v such that the items
/// with key >= v weigh at least `target`, plus the weight and count of the items with key > v.
/// item(i, &key, &weight) for i in [0, n); keys in [0, 2^top_bits); 0 < target <= total weight.
/// Integer atomics, so the result does not depend on the order of the adds. All threads call it.
template <typename Item>
__device__ RadixPick block_radix_pick(int n, int top_bits, long long target, Item item,
                                      RadixShared& sh) {
  long long prefix = 0, above_w = 0, above_c = 0;
  for (int hi = top_bits; hi > 0;) {
    const int lo = hi > 8 ? hi - 8 : 0, width = hi - lo;
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
      sh.bin_w[b] = 0;
      sh.bin_c[b] = 0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      long long k = 0, w = 0;
      item(i, &k, &w);
      if ((k == 0 && w == 0) || (k >> hi) != prefix) continue;  // zero items never decide
      const int b = static_cast<int>((k >> lo) & ((1ll << width) - 1));
      if (w != 0) atomicAdd(&sh.bin_w[b], static_cast<unsigned long long>(w));
      atomicAdd(&sh.bin_c[b], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int b = (1 << width) - 1;
      for (; b > 0; --b) {
        if (above_w + static_cast<long long>(sh.bin_w[b]) >= target) break;
        above_w += static_cast<long long>(sh.bin_w[b]);
        above_c += sh.bin_c[b];
      }
      sh.prefix = (prefix << width) | b;
      sh.weight_above = above_w;
      sh.count_above = above_c;
    }
    __syncthreads();
    prefix = sh.prefix;
    above_w = sh.weight_above;
    above_c = sh.count_above;
    hi = lo;
    __syncthreads();  // all have read sh before the next pass rewrites it
  }
  return {prefix, above_w, above_c};
}

/// Contiguous chunk [lo, hi) of [0, n) owned by this thread (chunks in thread order).
__device__ __forceinline__ void thread_chunk(int n, int* lo, int* hi) {
  const int per = (n + blockDim.x - 1) / blockDim.x;
  *lo = min(n, static_cast<int>(threadIdx.x) * per);
  *hi = min(n, *lo + per);
}

/// Stats. Grid: one block per KV head, kDbacThreads threads striding over its votes: validation
/// (first bad vote into invalid_vote), the fixed-point shift, the total and the concentration.
__global__ void __launch_bounds__(kDbacThreads) dbac_stats_kernel(DbacKernelParams p) {
  using ReduceF = cub::BlockReduce<float, kDbacThreads>;
  using ReduceI = cub::BlockReduce<long long, kDbacThreads>;
  __shared__ union {
    typename ReduceF::TempStorage f;
    typename ReduceI::TempStorage i;
  } tmp;
  __shared__ RadixShared rs;
  __shared__ long long s_val;
  const int h = blockIdx.x, m = p.m;
  const float* v = p.votes + static_cast<int64_t>(h) * m;
  float mx = 0.f;
  unsigned long long bad = ULLONG_MAX;
  for (int i = threadIdx.x; i < m; i += blockDim.x) {
    const int kind = detail::dbac_vote_defect(v[i]);
    if (kind >= 0) {
      const unsigned long long code =
          4ull * static_cast<unsigned long long>(static_cast<int64_t>(h) * m + i) + kind;
      bad = code < bad ? code : bad;
    } else {
      mx = fmaxf(mx, v[i]);
    }
  }
  if (bad != ULLONG_MAX && p.invalid_vote) atomicMin(p.invalid_vote, bad);
  mx = ReduceF(tmp.f).Reduce(mx, FMaxOp());
  if (threadIdx.x == 0) s_val = detail::dbac_quant_shift(mx, m);
  __syncthreads();
  const int shift = static_cast<int>(s_val);
  long long sum = 0;
  for (int i = threadIdx.x; i < m; i += blockDim.x) sum += detail::dbac_quantize(v[i], shift);
  sum = ReduceI(tmp.i).Sum(sum);
  __syncthreads();  // everyone has read s_val
  if (threadIdx.x == 0) s_val = sum;
  __syncthreads();
  const long long total = s_val;
  int conc = 0;
  if (total > 0) {
    const long long target = detail::dbac_coverage_target(total, p.coverage);
    const RadixPick pick = block_radix_pick(
        m, detail::dbac_quant_bits(m), target,
        [&](int i, long long* k, long long* w) { *k = *w = detail::dbac_quantize(v[i], shift); },
        rs);
    conc =
        static_cast<int>(pick.count_above + (target - pick.weight_above + pick.key - 1) / pick.key);
  }
  if (threadIdx.x == 0) {
    p.shift[h] = shift;
    p.total[h] = total;
    p.concentration[h] = conc;
  }
}

/// Budget split. Grid: 1 block of 1 thread (num_kv_heads is small): the shared host/device
/// dbac_split_budgets, so the split equals the reference's exactly.
__global__ void dbac_budget_kernel(DbacKernelParams p) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  detail::dbac_split_budgets(p.num_kv_heads, p.m, p.total_budget, p.budget_floor, p.concentration,
                             p.work, p.head_budget);
}

/// Selection. Grid: one block per KV head, kDbacThreads threads; positions and clusters are split
/// into contiguous per-thread chunks so block scans keep position order. Steps: prefix sums of the
/// fixed-point votes; core points from windowed sums; cluster starts (a core point more than eps
/// after the previous one) numbered by a scan; cluster bounds; the budget cut by radix selection
/// on mass; the truncated cluster's densest window; compaction of the ranges and kept positions.
__global__ void __launch_bounds__(kDbacThreads) dbac_select_kernel(DbacKernelParams p) {
  using Scan = cub::BlockScan<long long, kDbacThreads>;
  using Reduce = cub::BlockReduce<long long, kDbacThreads>;
  using ReducePick = cub::BlockReduce<WindowPick, kDbacThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
    typename ReducePick::TempStorage pick;
  } tmp;
  __shared__ RadixShared rs;
  __shared__ long long s_all, s_trunc_c, s_trunc_r;
  const int h = blockIdx.x, m = p.m, eps = p.eps;
  const float* v = p.votes + static_cast<int64_t>(h) * m;
  int64_t* pre = p.prefix + static_cast<int64_t>(h) * (m + 1);
  const int64_t cbase = static_cast<int64_t>(h) * p.cluster_capacity;
  int32_t* cf = p.cl_first + cbase;
  int32_t* cl = p.cl_last + cbase;
  int32_t* cb = p.cl_begin + cbase;
  int32_t* ce = p.cl_end + cbase;
  int32_t* ct = p.cl_taken + cbase;
  int64_t* cm = p.cl_mass + cbase;
  const int shift = p.shift[h];
  const long long total = p.total[h];
  const long long budget = p.head_budget[h];

  // 1. pre[i] = q[0] + ... + q[i - 1].
  int lo, hi;
  thread_chunk(m, &lo, &hi);
  long long run = 0;
  for (int i = lo; i < hi; ++i) run += detail::dbac_quantize(v[i], shift);
  Scan(tmp.scan).ExclusiveSum(run, run);
  if (threadIdx.x == 0) pre[0] = 0;
  for (int i = lo; i < hi; ++i) {
    run += detail::dbac_quantize(v[i], shift);
    pre[i + 1] = run;
  }
  __syncthreads();

  // 2. Core points and cluster (first, last) core points.
  const long long thr = total > 0 ? detail::dbac_core_threshold(total, m, eps, p.ratio) : 0;
  auto is_core = [&](int i) {
    const long long dens = pre[min(m, i + eps + 1)] - pre[max(0, i - eps)];
    return dens > 0 && dens >= thr;
  };
  long long last = -1;
  for (int i = lo; i < hi; ++i)
    if (is_core(i)) last = i;
  long long prev_in = -1, last_all = -1;
  Scan(tmp.scan).ExclusiveScan(last, prev_in, -1ll, MaxOp(), last_all);
  __syncthreads();
  long long starts = 0;
  long long prev = prev_in;
  for (int i = lo; i < hi; ++i) {
    if (!is_core(i)) continue;
    starts += prev < 0 || i - prev > eps;
    prev = i;
  }
  long long id = 0, num_clusters = 0;
  Scan(tmp.scan).ExclusiveSum(starts, id, num_clusters);
  __syncthreads();
  prev = prev_in;
  for (int i = lo; i < hi; ++i) {
    if (!is_core(i)) continue;
    if (prev < 0 || i - prev > eps) {
      cf[id] = i;
      if (id > 0) cl[id - 1] = static_cast<int32_t>(prev);
      ++id;
    }
    prev = i;
  }
  if (threadIdx.x == 0 && num_clusters > 0) cl[num_clusters - 1] = static_cast<int32_t>(last_all);
  __syncthreads();
  const int num_c = static_cast<int>(num_clusters);

  // 3. Bounds: border points within eps, split at the midpoint between neighbouring clusters'
  // core points (a tie goes to the left cluster). Mass of each range.
  for (int c = threadIdx.x; c < num_c; c += blockDim.x) {
    int b = max(cf[c] - eps, 0);
    if (c > 0) b = max(b, (cl[c - 1] + cf[c]) / 2 + 1);
    int e = min(cl[c] + eps + 1, m);
    if (c + 1 < num_c) e = min(e, (cl[c] + cf[c + 1]) / 2 + 1);
    cb[c] = b;
    ce[c] = e;
    cm[c] = pre[e] - pre[b];
  }
  __syncthreads();

  // 4. The cut: clusters with mass above mu whole; those with mass mu in position order while
  // they fit, the first that does not truncated, the rest dropped.
  int clo, chi;
  thread_chunk(num_c, &clo, &chi);
  long long size_sum = 0;
  for (int c = clo; c < chi; ++c) size_sum += ce[c] - cb[c];
  size_sum = Reduce(tmp.reduce).Sum(size_sum);
  if (threadIdx.x == 0) {
    s_all = size_sum;
    s_trunc_c = -1;
    s_trunc_r = 0;
  }
  __syncthreads();
  long long mu = -1, above = 0;
  if (s_all > budget) {
    const RadixPick pick = block_radix_pick(
        num_c, 52, budget + 1,
        [&](int c, long long* k, long long* w) {
          *k = cm[c];
          *w = ce[c] - cb[c];
        },
        rs);
    mu = pick.key;
    above = pick.weight_above;
  }
  long long x = 0;
  for (int c = clo; c < chi; ++c)
    if (cm[c] == mu) x += ce[c] - cb[c];
  Scan(tmp.scan).ExclusiveSum(x, x);
  for (int c = clo; c < chi; ++c) {
    const long long size = ce[c] - cb[c];
    long long taken = 0;
    if (cm[c] > mu) {
      taken = size;
    } else if (cm[c] == mu) {
      if (above + x + size <= budget) {
        taken = size;
      } else if (above + x < budget) {
        taken = budget - above - x;
        s_trunc_c = c;  // at most one cluster gets here
        s_trunc_r = taken;
      }
      x += size;
    }
    ct[c] = taken > 0 ? static_cast<int32_t>(taken) : -1;
  }
  __syncthreads();

  // 5. The truncated cluster: its densest window of the remaining length (ties: leftmost).
  if (s_trunc_c >= 0) {
    const int c = static_cast<int>(s_trunc_c), r = static_cast<int>(s_trunc_r);
    const int b = cb[c], e = ce[c];
    WindowPick best{-1, INT_MAX};
    for (int s = b + threadIdx.x; s + r <= e; s += blockDim.x) {
      const long long mass = pre[s + r] - pre[s];
      if (mass > best.mass) best = {mass, s};  // s increases per thread: first hit is lowest
    }
    best = ReducePick(tmp.pick).Reduce(best, WindowPickOp());
    if (threadIdx.x == 0) {
      cb[c] = best.start;
      ce[c] = best.start + r;
    }
    __syncthreads();
  }

  // 6. Compaction in position order: ranges, counts, and each taken cluster's kept offset.
  long long nr = 0, nt = 0;
  for (int c = clo; c < chi; ++c)
    if (ct[c] > 0) {
      ++nr;
      nt += ct[c];
    }
  long long r_at = 0, t_at = 0, nr_all = 0, nt_all = 0;
  Scan(tmp.scan).ExclusiveSum(nr, r_at, nr_all);
  __syncthreads();
  Scan(tmp.scan).ExclusiveSum(nt, t_at, nt_all);
  TokenRange* ranges = p.ranges + static_cast<int64_t>(h) * p.range_capacity;
  for (int c = clo; c < chi; ++c) {
    if (ct[c] <= 0) continue;
    ranges[r_at++] = TokenRange{cb[c], ce[c]};
    const int32_t len = ct[c];
    ct[c] = static_cast<int32_t>(t_at);
    t_at += len;
  }
  if (threadIdx.x == 0) {
    p.num_ranges[h] = static_cast<int32_t>(nr_all);
    p.num_tokens[h] = static_cast<int32_t>(nt_all);
    if (p.kept) p.num_kept[h] = static_cast<int32_t>(nt_all + p.window);
  }
  if (p.kept == nullptr) return;
  __syncthreads();
  // 7. Kept positions: one warp per taken cluster, then the window.
  int32_t* kept = p.kept + static_cast<int64_t>(h) * p.kept_capacity;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int c = warp; c < num_c; c += blockDim.x / 32) {
    const int32_t off = ct[c];
    if (off < 0) continue;
    const int b = cb[c], len = ce[c] - cb[c];
    for (int i = lane; i < len; i += 32) kept[off + i] = b + i;
  }
  for (int i = threadIdx.x; i < p.window; i += blockDim.x) kept[nt_all + i] = m + i;
}

}  // namespace kvtier::kernels::dbac_device
