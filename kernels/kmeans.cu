// CUDA spherical k-means, batched over problems. Every iteration is a fixed sequence of kernels
// enqueued on one stream (no host synchronization); a problem that has converged skips the rest
// through its flag in the workspace. Same algorithm as kmeans_ref: cosine assignment (ties to
// the lower id), fp32 sums of unit rows, worst-fit re-seeding of empty clusters, relative
// objective test after each assignment.
// The assignment is a fused GEMM + argmax on tensor cores (mma.sync; fp16 operands: unit vectors
// need no exponent range, and fp16's 11-bit significand flips 8x fewer near-ties than bf16; fp32
// accumulation; no n x k score matrix in memory). It keeps the top two candidates per row, and
// both are re-scored exactly in fp32 before the label is final; that kernel also computes the
// objective and accumulates the next update's sums.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <type_traits>
#include <vector>

#include "kernels/dispatch.h"
#include "kernels/kmeans.h"
#include "kernels/kmeans_common.h"
#include "memory/core/check.h"
#include "memory/core/cuda_raii.h"

namespace kvtier::kernels {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

struct Workspace {
  float* inv_norm;     // [P, n]
  float* best;         // [P, n] cos to the assigned centroid
  float* sums;         // [P, k, d]
  int32_t* counts;     // [P, k]
  double* objective;   // [P, max_iters + 1]
  int32_t* done;       // [P] 1 once converged
  int32_t* iters;      // [P]
  int32_t* init_rows;  // [P, k] kRandomRows: uploaded; kPlusPlus: written by plus_plus_kernel
  __half* cb;  // [P, k_pad, d] fp16 copy of the unit centroids for the tensor-core assignment
  int32_t* runner_up;     // [P, n] second candidate of the fp16 assignment, re-scored exactly
  float* second_score;    // [P, n] fp16 score of that second candidate
  float* theta2;          // [P, n] lower bound on the angle to the nearest other centroid
  int32_t* active_rows;   // [P, n] rows the next assignment must scan (compacted)
  int32_t* active_count;  // [P]
  uint8_t* active;        // [P, n] 1 if the row was scanned in the current assignment
  float* drift;           // [P, k] angle each centroid moved in the last update
  int32_t* drift_max;     // [P] largest drift (float bits; drifts are >= 0)
  int32_t* prev_labels;   // [P, n] labels of the previous assignment (sums are kept incrementally)
  int32_t* moved;         // [P] rows whose label changed in the current assignment
  int32_t* rebuild;       // [P] nonzero: this assignment rebuilds sums and counts from scratch
  int32_t* cursor;        // [P, k] counting-sort offsets of the rebuild
  int32_t* order;         // [P, n] rows grouped by label (rebuild)
};

/// Sums are rebuilt from scratch (counting sort by label, then one warp per cluster) when more
/// than 1/kRebuildShare of a problem's rows moved in the previous assignment; otherwise the moved
/// rows update them with atomics. A moved row costs 2 * d float atomics (about 3.6 ns per row
/// at d = 128 on an H100) while a rebuild costs about 0.4 ns per row of the problem.
constexpr int kRebuildShare = 16;

/// A row keeps its label without a scan when (angle to own centroid + its drift) + kAngleMargin
/// < (lower bound on the angle to any other centroid - the largest drift). The margin covers
/// acos() in fp32 near 1 (~3.5e-4 rad); kScoreSlack covers fp16 rounding of both operands in
/// the tensor-core scores (each score is within ~2^-10 of the exact cosine).
constexpr float kAngleMargin = 1e-3f;
constexpr float kScoreSlack = 2e-3f;

constexpr int kAssignPoints = 128;     // rows per assignment block
constexpr int kAssignCentroids = 128;  // centroids per shared-memory chunk
inline int64_t padded_k(int k) {
  return (k + kAssignCentroids - 1) / kAssignCentroids * kAssignCentroids;
}

size_t align_up(size_t v) { return (v + 255) / 256 * 256; }

Workspace carve(const KmeansParams& p, void* base, size_t* total) {
  const size_t P = static_cast<size_t>(p.num_problems), n = static_cast<size_t>(p.num_points);
  const size_t k = static_cast<size_t>(kmeans_effective_k(p)), d = static_cast<size_t>(p.dim);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    std::byte* ptr = static_cast<std::byte*>(base) + off;
    off += align_up(bytes);
    return ptr;
  };
  Workspace w;
  w.inv_norm = reinterpret_cast<float*>(take(P * n * 4));
  w.best = reinterpret_cast<float*>(take(P * n * 4));
  w.sums = reinterpret_cast<float*>(take(P * k * d * 4));
  w.counts = reinterpret_cast<int32_t*>(take(P * k * 4));
  w.objective = reinterpret_cast<double*>(take(P * (p.max_iters + 1) * 8));
  w.done = reinterpret_cast<int32_t*>(take(P * 4));
  w.iters = reinterpret_cast<int32_t*>(take(P * 4));
  w.init_rows = reinterpret_cast<int32_t*>(take(P * k * 4));
  w.runner_up = reinterpret_cast<int32_t*>(take(P * n * 4));
  w.second_score = reinterpret_cast<float*>(take(P * n * 4));
  w.theta2 = reinterpret_cast<float*>(take(P * n * 4));
  w.active_rows = reinterpret_cast<int32_t*>(take(P * n * 4));
  w.active_count = reinterpret_cast<int32_t*>(take(P * 4));
  w.active = reinterpret_cast<uint8_t*>(take(P * n));
  w.drift = reinterpret_cast<float*>(take(P * k * 4));
  w.drift_max = reinterpret_cast<int32_t*>(take(P * 4));
  w.prev_labels = reinterpret_cast<int32_t*>(take(P * n * 4));
  w.moved = reinterpret_cast<int32_t*>(take(P * 4));
  w.rebuild = reinterpret_cast<int32_t*>(take(P * 4));
  w.cursor = reinterpret_cast<int32_t*>(take(P * k * 4));
  w.order = reinterpret_cast<int32_t*>(take(P * n * 4));
  w.cb = reinterpret_cast<__half*>(
      take(P * static_cast<size_t>(padded_k(static_cast<int>(k))) * d * 2));
  *total = off;
  return w;
}

// grid: (ceil(n / 8), P), block 256 = 8 warps, one warp per row.
template <typename T>
__global__ void prep_kernel(const T* __restrict__ x, int64_t n, int d, float* inv_norm,
                            int32_t* nonfinite) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (row >= n) return;
  const T* r = x + (static_cast<size_t>(blockIdx.y) * n + row) * d;
  float s = 0.f;
  bool bad = false;
  for (int t = lane; t < d; t += 32) {
    const float v = to_float(r[t]);
    bad |= !isfinite(v);
    s += v * v;
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (__any_sync(0xffffffffu, bad) && lane == 0 && nonfinite) atomicOr(nonfinite, 1);
  if (lane == 0) inv_norm[static_cast<size_t>(blockIdx.y) * n + row] = s > 0.f ? rsqrtf(s) : 0.f;
}

// grid: (k, P), block 128: centroid j of problem p = unit row init_rows[p][j].
template <typename T>
__global__ void init_kernel(const T* __restrict__ x, int64_t n, int d, int k, int stride,
                            const int32_t* init_rows, const float* inv_norm, float* centroids) {
  const int p = blockIdx.y, j = blockIdx.x;
  const int64_t row = init_rows[static_cast<size_t>(p) * k + j];
  const float inv = inv_norm[static_cast<size_t>(p) * n + row];
  for (int t = threadIdx.x; t < d; t += blockDim.x)
    centroids[(static_cast<size_t>(p) * stride + j) * d + t] =
        to_float(x[(static_cast<size_t>(p) * n + row) * d + t]) * inv;
}

// grid: (k_pad / 128, P), block 128: fp16 copy of the centroids, zero rows past k.
__global__ void centroids_fp16_kernel(int d, int k, int stride, int64_t k_pad,
                                      const float* centroids, const int32_t* done, __half* cb) {
  const int p = blockIdx.y;
  if (done[p]) return;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k_pad) return;
  __half* dst = cb + (static_cast<size_t>(p) * k_pad + j) * d;
  const float* src = centroids + (static_cast<size_t>(p) * stride + j) * d;
  for (int t = 0; t < d; ++t) dst[t] = __float2half(j < k ? src[t] : 0.f);
}

// Top-two insert: (v, id) into (b1, i1) >= (b2, i2); higher score first, ties to the lower id.
__device__ __forceinline__ void top2_insert(float v, int id, float& b1, int& i1, float& b2,
                                            int& i2) {
  if (v > b1 || (v == b1 && id < i1)) {
    b2 = b1;
    i2 = i1;
    b1 = v;
    i1 = id;
  } else if (v > b2 || (v == b2 && id < i2)) {
    b2 = v;
    i2 = id;
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n"); }

// grid: (ceil(n / 128), P), block 256 = 8 warps as 4 (rows) x 2 (columns); each block takes 128
// entries of the problem's active-row list. The block's rows (unit vectors, fp16) stay in shared
// memory; centroids stream through in chunks of 128 with cp.async double buffering. Warp (wr, wc)
// computes rows wr*32.. x chunk columns wc*64.. with mma.sync m16n8k16 (2 x 8 tiles, fp32
// accumulators in registers) and folds each row's 16 scores per thread into a running top two,
// merged across the 4 threads of a quad by shuffles; the two column halves are merged at the end.
template <typename T, int kDim>
__global__ void __launch_bounds__(256)
    assign_mma_kernel(const T* __restrict__ x, bool vec16, int64_t n, int k, int64_t k_pad,
                      const __half* __restrict__ cb, const float* __restrict__ inv_norm,
                      const int32_t* done, const int32_t* active_rows, const int32_t* active_count,
                      int32_t* labels, int32_t* runner_up, float* second_score) {
  const int p = blockIdx.y;
  if (done[p]) return;
  const int64_t count = active_count[p];
  const int64_t entry0 = static_cast<int64_t>(blockIdx.x) * kAssignPoints;
  if (entry0 >= count) return;   // only the compacted active rows are scanned
  constexpr int kLd = kDim + 8;  // fp16 row stride: rows 16-byte aligned, ldmatrix conflict-free
  constexpr int kVecPerRow = kDim / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* xs = reinterpret_cast<__half*>(smem_raw);  // [128][kLd]
  __half* cs = xs + kAssignPoints * kLd;             // [2][128][kLd]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wr = warp >> 1, wc = warp & 1;
  const int g = lane >> 2, t4 = lane & 3;
  const int32_t* rows = active_rows + static_cast<size_t>(p) * n;
  const __half* cbase = cb + static_cast<size_t>(p) * k_pad * kDim;

  auto load_chunk = [&](int64_t c0, __half* dst) {
    const int4* src = reinterpret_cast<const int4*>(cbase + c0 * kDim);
    for (int i = threadIdx.x; i < kAssignCentroids * kVecPerRow; i += blockDim.x) {
      const int r = i / kVecPerRow, v = i % kVecPerRow;
      cp_async_16(dst + r * kLd + v * 8, src + i);
    }
    cp_async_commit();
  };
  load_chunk(0, cs);
  if (vec16) {  // 16-byte loads of the rows (each row is a multiple of 16 bytes)
    constexpr int kPer = 16 / sizeof(T), kVecs = kDim / kPer;
    for (int i = threadIdx.x; i < kAssignPoints * kVecs; i += blockDim.x) {
      const int r = i / kVecs, c = (i % kVecs) * kPer;
      const int64_t e = entry0 + r;
      __align__(16) __half h[kPer];
      if (e < count) {
        const size_t row = static_cast<size_t>(p) * n + rows[e];
        const float s = inv_norm[row];
        const int4 raw = *reinterpret_cast<const int4*>(x + row * kDim + c);
        const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < kPer; ++j) h[j] = __float2half(to_float(t[j]) * s);
      } else {
#pragma unroll
        for (int j = 0; j < kPer; ++j) h[j] = __float2half(0.f);
      }
      if constexpr (kPer == 8) {
        *reinterpret_cast<int4*>(xs + r * kLd + c) = *reinterpret_cast<const int4*>(h);
      } else {
        *reinterpret_cast<uint2*>(xs + r * kLd + c) = *reinterpret_cast<const uint2*>(h);
      }
    }
  } else {
    for (int i = threadIdx.x; i < kAssignPoints * kDim; i += blockDim.x) {
      const int r = i / kDim, c = i % kDim;
      const int64_t e = entry0 + r;
      const int64_t row = e < count ? rows[e] : -1;
      const float v = row >= 0 ? to_float(x[(static_cast<size_t>(p) * n + row) * kDim + c]) *
                                     inv_norm[static_cast<size_t>(p) * n + row]
                               : 0.f;
      xs[r * kLd + c] = __float2half(v);
    }
  }
  // Running top two for the 4 rows this thread sees: [m-tile a][half h] -> row wr*32 + a*16 + h*8 +
  // g.
  float b1[2][2], b2[2][2];
  int i1[2][2], i2[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      b1[a][h] = b2[a][h] = -INFINITY,
      i1[a][h] = i2[a][h] = 0;  // id 0: valid even if every score is NaN

  int buf = 0;
  for (int64_t c0 = 0; c0 < k_pad; c0 += kAssignCentroids, buf ^= 1) {
    cp_async_wait_all();
    __syncthreads();  // chunk c0 landed; xs written; the other buffer is free again
    if (c0 + kAssignCentroids < k_pad)
      load_chunk(c0 + kAssignCentroids, cs + (buf ^ 1) * kAssignCentroids * kLd);
    const __half* cur = cs + buf * kAssignCentroids * kLd;
    float acc[2][8][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 8; ++b)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[a][b][q] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kDim; kk += 16) {
      uint32_t fa[2][4];
#pragma unroll
      for (int a = 0; a < 2; ++a)
        ldmatrix_x4(fa[a], xs + (wr * 32 + a * 16 + (lane & 15)) * kLd + kk + (lane >> 4) * 8);
#pragma unroll
      for (int bp = 0; bp < 4; ++bp) {  // two n-tiles of 8 centroids per ldmatrix.x4
        uint32_t fb[4];
        const int nrow = wc * 64 + bp * 16 + ((lane >> 4) << 3) + (lane & 7);
        ldmatrix_x4(fb, cur + nrow * kLd + kk + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          mma_16816(acc[a][2 * bp], fa[a], fb[0], fb[1]);
          mma_16816(acc[a][2 * bp + 1], fa[a], fb[2], fb[3]);
        }
      }
    }
    // Fold: thread holds columns 2*t4 + {0, 1} of every n-tile for rows g and g + 8, 16 scores
    // per row. The fold used to cost ten instructions per score (a divergent compare-and-insert
    // for each), several times the mma work; now a row's 16 scores are screened by their maximum
    // against the running second best, and only a row whose maximum beats it (common in the
    // first chunks, rare later) inserts them, without branches. A thread sees its columns in
    // increasing id order, so strict compares keep the lower id on ties, as top2_insert does.
    // Columns past k exist only in the last chunk; they score -inf and never enter.
    const int col0 = static_cast<int>(c0) + wc * 64 + 2 * t4;
    if (c0 + kAssignCentroids > k) {
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 8; ++b)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (col0 + b * 8 + (e & 1) >= k) acc[a][b][e] = -INFINITY;
    }
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m = acc[a][0][h * 2];
#pragma unroll
        for (int b = 0; b < 8; ++b) m = fmaxf(m, fmaxf(acc[a][b][h * 2], acc[a][b][h * 2 + 1]));
        if (m > b2[a][h]) {
#pragma unroll
          for (int b = 0; b < 8; ++b)
#pragma unroll
            for (int q = 0; q < 2; ++q) {
              const float v = acc[a][b][h * 2 + q];
              const int id = col0 + b * 8 + q;
              const bool g1 = v > b1[a][h], g2 = v > b2[a][h];
              b2[a][h] = g1 ? b1[a][h] : (g2 ? v : b2[a][h]);
              i2[a][h] = g1 ? i1[a][h] : (g2 ? id : i2[a][h]);
              b1[a][h] = g1 ? v : b1[a][h];
              i1[a][h] = g1 ? id : i1[a][h];
            }
        }
      }
  }
  // Merge the quad's four partial top-twos (threads t4 = 0..3 of a row), then the column halves.
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int o = 1; o < 4; o <<= 1) {
        const float ob1 = __shfl_xor_sync(0xffffffffu, b1[a][h], o);
        const float ob2 = __shfl_xor_sync(0xffffffffu, b2[a][h], o);
        const int oi1 = __shfl_xor_sync(0xffffffffu, i1[a][h], o);
        const int oi2 = __shfl_xor_sync(0xffffffffu, i2[a][h], o);
        top2_insert(ob1, oi1, b1[a][h], i1[a][h], b2[a][h], i2[a][h]);
        top2_insert(ob2, oi2, b1[a][h], i1[a][h], b2[a][h], i2[a][h]);
      }
  cp_async_wait_all();
  __syncthreads();
  float* hand_v = reinterpret_cast<float*>(cs);  // reuse: [128 rows][2]
  int* hand_i = reinterpret_cast<int*>(hand_v + kAssignPoints * 2);
  if (wc == 1 && t4 == 0) {
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wr * 32 + a * 16 + h * 8 + g;
        hand_v[r * 2] = b1[a][h];
        hand_v[r * 2 + 1] = b2[a][h];
        hand_i[r * 2] = i1[a][h];
        hand_i[r * 2 + 1] = i2[a][h];
      }
  }
  __syncthreads();
  if (wc == 0 && t4 == 0) {
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wr * 32 + a * 16 + h * 8 + g;
        top2_insert(hand_v[r * 2], hand_i[r * 2], b1[a][h], i1[a][h], b2[a][h], i2[a][h]);
        top2_insert(hand_v[r * 2 + 1], hand_i[r * 2 + 1], b1[a][h], i1[a][h], b2[a][h], i2[a][h]);
        const int64_t e = entry0 + r;
        if (e < count) {
          const size_t ri = static_cast<size_t>(p) * n + rows[e];
          const bool has2 = b2[a][h] > -INFINITY;
          labels[ri] = i1[a][h];
          runner_up[ri] = has2 ? i2[a][h] : i1[a][h];
          second_score[ri] = has2 ? b2[a][h] : -1.f;
        }
      }
  }
}

// grid: (ceil(n / kAccumRows), P), block 256: each warp takes kAccumRows / 8 rows in turn. For
// the labels of assignment `it`: a row scanned in this assignment picks the exactly better of its
// two candidates and gets a fresh bound theta2; every row gets its exact fp32 cosine to its
// centroid (best[], objective[it]) and adds its unit vector to the next update's sums. The
// objective is reduced in the block first: one double atomic per block, not per row (per-row
// atomics on one address per problem serialized and cost more than the rest of the kernel).
constexpr int kAccumRows = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cos_accumulate_kernel(const T* __restrict__ x, int64_t n, int d, int k, int stride,
                          int max_iters, int it, int32_t* labels, const int32_t* runner_up,
                          const float* second_score, const uint8_t* active, const float* centroids,
                          const float* inv_norm, const int32_t* done, float* best, float* theta2,
                          double* objective, float* sums, int32_t* counts, int32_t* prev_labels,
                          const int32_t* rebuild, int32_t* moved) {
  const int p = blockIdx.y;
  if (done[p]) return;
  const bool rebuilding = it == 0 || rebuild[p] != 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kWarps = kThreads / 32;
  double loss = 0.0;  // lane 0's share of this warp's rows
  int moves = 0;
  for (int j = 0; j < kAccumRows / kWarps; ++j) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kAccumRows + j * kWarps + warp;
    if (row >= n) break;
    const size_t ri = static_cast<size_t>(p) * n + row;
    const bool scanned = active[ri] != 0;
    const int cand1 = labels[ri];
    const int cand2 = scanned ? runner_up[ri] : cand1;
    const float inv = inv_norm[ri];
    const T* r = x + ri * d;
    const float* c1 = centroids + (static_cast<size_t>(p) * stride + cand1) * d;
    const float* c2 = centroids + (static_cast<size_t>(p) * stride + cand2) * d;
    float d1 = 0.f, d2 = 0.f;
    if (cand2 != cand1) {
      for (int t = lane; t < d; t += 32) {
        const float v = to_float(r[t]) * inv;
        d1 += v * c1[t];
        d2 += v * c2[t];
      }
      for (int o = 16; o > 0; o >>= 1) {
        d1 += __shfl_xor_sync(0xffffffffu, d1, o);
        d2 += __shfl_xor_sync(0xffffffffu, d2, o);
      }
    } else {
      for (int t = lane; t < d; t += 32) d1 += to_float(r[t]) * inv * c1[t];
      for (int o = 16; o > 0; o >>= 1) d1 += __shfl_xor_sync(0xffffffffu, d1, o);
      d2 = d1;
    }
    const bool second = d2 > d1 || (d2 == d1 && cand2 < cand1);
    const int lab = second ? cand2 : cand1;
    const float dot = second ? d2 : d1;
    // Incremental sums: a row moves its contribution only when its label changes (after a few
    // iterations few rows move, so this is a few atomics instead of n * d per iteration). A
    // rebuilding problem only counts here; rebuild_sums_kernel redoes its sums.
    const int old = it == 0 ? -1 : prev_labels[ri];
    if (old != lab && !rebuilding) {
      float* s_new = sums + (static_cast<size_t>(p) * k + lab) * d;
      float* s_old = old >= 0 ? sums + (static_cast<size_t>(p) * k + old) * d : nullptr;
      for (int t = lane; t < d; t += 32) {
        const float v = to_float(r[t]) * inv;
        atomicAdd(&s_new[t], v);
        if (s_old) atomicAdd(&s_old[t], -v);
      }
    }
    if (lane == 0) {
      if (rebuilding) atomicAdd(&counts[static_cast<size_t>(p) * k + lab], 1);
      if (old != lab) {
        if (!rebuilding) {
          atomicAdd(&counts[static_cast<size_t>(p) * k + lab], 1);
          if (old >= 0) atomicSub(&counts[static_cast<size_t>(p) * k + old], 1);
        }
        prev_labels[ri] = lab;
        moves += old >= 0 ? 1 : 0;
      }
      if (second) labels[ri] = lab;
      if (scanned) {
        // Every other centroid scored at most second_score in fp16, so its true cosine is at most
        // that plus the slack; the other candidate's is known exactly.
        const float other = cand2 == cand1 ? -1.f : (second ? d1 : d2);
        const float u = fminf(1.f, fmaxf(other, second_score[ri] + kScoreSlack));
        theta2[ri] = cand2 == cand1 && second_score[ri] < -0.5f ? 4.f : acosf(u);  // k == 1
      }
      best[ri] = dot;
      loss += 1.0 - static_cast<double>(dot);
    }
  }
  __shared__ double warp_loss[kWarps];
  __shared__ int warp_moves[kWarps];
  if (lane == 0) warp_loss[warp] = loss, warp_moves[warp] = moves;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    int total_moves = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_loss[w], total_moves += warp_moves[w];
    atomicAdd(&objective[static_cast<size_t>(p) * (max_iters + 1) + it], total);
    if (total_moves) atomicAdd(&moved[p], total_moves);
  }
}

// grid: (ceil(k / 256), P), block 256: a rebuilding problem's counts start from zero.
__global__ void rebuild_prepare_kernel(int k, int it, const int32_t* done, const int32_t* rebuild,
                                       int32_t* counts) {
  const int p = blockIdx.y;
  if (done[p] || !(it == 0 || rebuild[p] != 0)) return;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < k) counts[static_cast<size_t>(p) * k + j] = 0;
}

// grid: (P), block kScanThreads: exclusive scan of a rebuilding problem's counts into cursor.
constexpr int kScanThreads = 1024;
__global__ void __launch_bounds__(kScanThreads)
    rebuild_scan_kernel(int k, int it, const int32_t* done, const int32_t* rebuild,
                        const int32_t* counts, int32_t* cursor) {
  const int p = blockIdx.x;
  if (done[p] || !(it == 0 || rebuild[p] != 0)) return;
  using Scan = cub::BlockScan<int32_t, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int32_t carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  const int32_t* c = counts + static_cast<size_t>(p) * k;
  int32_t* out = cursor + static_cast<size_t>(p) * k;
  for (int base = 0; base < k; base += kScanThreads) {
    const int j = base + static_cast<int>(threadIdx.x);
    const int32_t v = j < k ? c[j] : 0;
    int32_t excl, total;
    Scan(tmp).ExclusiveSum(v, excl, total);
    if (j < k) out[j] = carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
}

// grid: (ceil(n / 256), P), block 256: rows into their label's range of order[]; afterwards
// cursor[j] is the end of cluster j's range (its start is the end minus counts[j]).
__global__ void rebuild_scatter_kernel(int64_t n, int k, int it, const int32_t* done,
                                       const int32_t* rebuild, const int32_t* labels,
                                       int32_t* cursor, int32_t* order) {
  const int p = blockIdx.y;
  if (done[p] || !(it == 0 || rebuild[p] != 0)) return;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  const size_t ri = static_cast<size_t>(p) * n + row;
  const int32_t pos = atomicAdd(&cursor[static_cast<size_t>(p) * k + labels[ri]], 1);
  order[static_cast<size_t>(p) * n + pos] = static_cast<int32_t>(row);
}

// grid: (ceil(k / 8), P), block 256, one warp per cluster: the cluster's sum of unit rows in
// fp32 registers, written whole (empty clusters get zeros), no atomics.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    rebuild_sums_kernel(const T* __restrict__ x, int64_t n, int d, int k, int it,
                        const int32_t* done, const int32_t* rebuild, const int32_t* counts,
                        const int32_t* cursor, const int32_t* order, const float* inv_norm,
                        float* sums) {
  const int p = blockIdx.y;
  if (done[p] || !(it == 0 || rebuild[p] != 0)) return;
  const int j = blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5);
  if (j >= k) return;
  const int lane = threadIdx.x & 31;
  constexpr int kMaxPerLane = 8;  // d <= 256
  float acc[kMaxPerLane] = {};
  const size_t pj = static_cast<size_t>(p) * k + j;
  const int32_t end = cursor[pj], begin = end - counts[pj];
  const int32_t* ord = order + static_cast<size_t>(p) * n;
  const T* xp = x + static_cast<size_t>(p) * n * d;
  const float* invp = inv_norm + static_cast<size_t>(p) * n;
  for (int32_t i = begin; i < end; ++i) {
    const int32_t row = ord[i];
    const float inv = invp[row];
    const T* r = xp + static_cast<size_t>(row) * d;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int t = lane + 32 * e;
      if (t < d) acc[e] += to_float(r[t]) * inv;
    }
  }
  float* s = sums + pj * d;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int t = lane + 32 * e;
    if (t < d) s[t] = acc[e];
  }
}

// grid: (ceil(n / 256), P), block 256: rows whose label provably cannot change stay; the rest go
// to the active list of the next assignment. The first assignment scans every row.
__global__ void filter_kernel(int64_t n, int first, const int32_t* labels, const float* best,
                              const float* drift, const int32_t* drift_max, const int32_t* done,
                              int k, float* theta2, uint8_t* active, int32_t* active_rows,
                              int32_t* active_count) {
  const int p = blockIdx.y;
  if (done[p]) return;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  const size_t ri = static_cast<size_t>(p) * n + row;
  bool scan = first != 0;
  if (!scan) {
    const float s1 = best[ri];  // +inf marks a row taken to re-seed a cluster
    const float t2 = theta2[ri] - __int_as_float(drift_max[p]);
    theta2[ri] = t2;
    scan = !(s1 <= 1.f) || !(acosf(fmaxf(s1, -1.f)) +
                                 drift[static_cast<size_t>(p) * k + labels[ri]] + kAngleMargin <
                             t2);
  }
  active[ri] = scan ? 1 : 0;
  if (scan) {
    // Warp-aggregated append: one atomic per warp.
    const unsigned mask = __activemask();
    const unsigned ballot = __ballot_sync(mask, scan);
    const int leader = __ffs(ballot) - 1;
    const int lane = threadIdx.x & 31;
    int base = 0;
    if (lane == leader) base = atomicAdd(&active_count[p], __popc(ballot));
    base = __shfl_sync(mask, base, leader);
    active_rows[static_cast<size_t>(p) * n + base + __popc(ballot & ((1u << lane) - 1))] =
        static_cast<int32_t>(row);
  }
}

// grid: (k, P), block 128: normalize non-empty clusters' sums into centroids.
__global__ void update_kernel(int d, int k, int stride, const float* sums, const int32_t* counts,
                              const int32_t* done, float* centroids, float* drift,
                              int32_t* drift_max) {
  const int p = blockIdx.y, j = blockIdx.x;
  if (done[p] || counts[static_cast<size_t>(p) * k + j] == 0) return;
  const float* s = sums + (static_cast<size_t>(p) * k + j) * d;
  __shared__ float red[32];
  float v = 0.f;
  for (int t = threadIdx.x; t < d; t += blockDim.x) v += s[t] * s[t];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float tot = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) tot += red[w];
    red[0] = tot;
  }
  __syncthreads();
  if (red[0] <= 0.f) return;  // rows cancel out: keep the centroid
  const float inv = rsqrtf(red[0]);
  __syncthreads();
  float* c = centroids + (static_cast<size_t>(p) * stride + j) * d;
  float dot = 0.f;  // old . new, for the drift angle
  for (int t = threadIdx.x; t < d; t += blockDim.x) {
    const float nv = s[t] * inv;
    dot += c[t] * nv;
    c[t] = nv;
  }
  for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    float tot = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) tot += red[w];
    // acos of a rounded dot: add a little so the drift is never underestimated.
    const float ang = acosf(fminf(1.f, fmaxf(-1.f, tot))) + 1e-4f;
    drift[static_cast<size_t>(p) * k + j] = ang;
    atomicMax(&drift_max[p], __float_as_int(ang));
  }
}

// grid: (P), block 256: each empty cluster, in id order, takes the worst-fitting row not yet
// taken (lowest cos; lowest index among equals). best[] entries taken are set to +inf.
template <typename T>
__global__ void reseed_kernel(const T* __restrict__ x, int64_t n, int d, int k, int stride,
                              const int32_t* counts, const float* inv_norm, const int32_t* done,
                              float* best, float* centroids, float* drift, int32_t* drift_max) {
  const int p = blockIdx.x;
  if (done[p]) return;
  __shared__ float sv[kThreads];
  __shared__ int64_t si[kThreads];
  __shared__ int any_empty;
  // Most iterations have no empty cluster: find that out with parallel loads, not the serial
  // walk below (k dependent loads, ~0.16 ms per launch at k = 2048).
  if (threadIdx.x == 0) any_empty = 0;
  __syncthreads();
  for (int j = threadIdx.x; j < k; j += blockDim.x)
    if (counts[static_cast<size_t>(p) * k + j] == 0) any_empty = 1;
  __syncthreads();
  if (!any_empty) return;
  float* b = best + static_cast<size_t>(p) * n;
  for (int j = 0; j < k; ++j) {
    if (counts[static_cast<size_t>(p) * k + j] != 0) continue;
    float v = INFINITY;
    int64_t idx = n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      if (b[i] < v) v = b[i], idx = i;  // strided: first hit per thread has the lowest index
    sv[threadIdx.x] = v;
    si[threadIdx.x] = idx;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) {
        const float ov = sv[threadIdx.x + s];
        const int64_t oi = si[threadIdx.x + s];
        if (ov < sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x]))
          sv[threadIdx.x] = ov, si[threadIdx.x] = oi;
      }
      __syncthreads();
    }
    const int64_t row = si[0];
    __syncthreads();
    if (row >= n) return;
    const float inv = inv_norm[static_cast<size_t>(p) * n + row];
    float* c = centroids + (static_cast<size_t>(p) * stride + j) * d;
    float dot = 0.f;
    for (int t = threadIdx.x; t < d; t += blockDim.x) {
      const float nv = to_float(x[(static_cast<size_t>(p) * n + row) * d + t]) * inv;
      dot += c[t] * nv;
      c[t] = nv;
    }
    sv[threadIdx.x] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
      float tot = 0.f;
      for (int q = 0; q < static_cast<int>(blockDim.x); ++q) tot += sv[q];
      const float ang = acosf(fminf(1.f, fmaxf(-1.f, tot))) + 1e-4f;
      drift[static_cast<size_t>(p) * k + j] = ang;
      atomicMax(&drift_max[p], __float_as_int(ang));
      b[row] = INFINITY;
    }
    __syncthreads();
  }
}

// grid: (ceil(P / 128)), block 128: the stopping test after assignment `it`.
__global__ void converge_kernel(int P, int64_t n, int it, int max_iters, float rel_tol,
                                const double* objective, int32_t* done, int32_t* iters,
                                int32_t* moved, int32_t* rebuild) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= P || done[p]) return;
  rebuild[p] = static_cast<int64_t>(moved[p]) * kRebuildShare > n ? 1 : 0;
  moved[p] = 0;
  const double* o = objective + static_cast<size_t>(p) * (max_iters + 1);
  iters[p] = it;
  if (o[it - 1] - o[it] <= static_cast<double>(rel_tol) * o[it - 1]) done[p] = 1;
}

// ---- k-means++ seeding (KmeansInit::kPlusPlus) ----
// One thread-block cluster of C blocks (C = 1..8; sm_90 clusters) per problem, all problems in
// one launch; the greedy loop over the k centres runs inside the kernel. The sample is split into
// C contiguous slices; each block keeps best[] (1 - cos to the nearest centre so far, -1 once
// taken) and a per-row bit mask for its slice in shared memory, and streams its slice's rows from
// the input (scaled by inv_norm from prep_kernel, so rows are normalized once). Per centre:
//   1. prefix sums of w = best over untaken rows: per thread (contiguous chunk, double), a block
//      scan, then the C block totals through distributed shared memory (cluster barrier A);
//   2. every trial's u = total * uniform(draw) is owned by exactly one thread of one block, which
//      walks its chunk to the candidate and writes it into every block (barrier B);
//   3. one pass over the slice computes each row's cosine to all trial candidates at once (fp32,
//      4 lanes per row, 2 rows per lane) and each candidate's gain (fp32 per lane, then double),
//      and marks in mask[] which candidates lower the row's best;
//   4. gains are summed over the cluster in a fixed order (barrier C), so every block picks the
//      same winner; rows whose mask has the winner's bit recompute that cosine (bit for bit the
//      same arithmetic) and lower best[].
// The draws are the reference's (counter-based, detail::plus_plus_draw); only the order of the
// floating-point sums differs, so the rows picked are the reference's unless a draw or a gain
// comparison falls within rounding of a boundary.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define KVTIER_KMEANS_PP_CLUSTERS 1
#else
#define KVTIER_KMEANS_PP_CLUSTERS 0
#endif

constexpr int kPPThreads = 512;
constexpr int kPPWarps = kPPThreads / 32;
constexpr int kPPLanes = 4;                       // lanes per row in the distance passes
constexpr int kPPSlots = 32 / kPPLanes;           // rows side by side in a warp
constexpr int kPPRho = 2;                         // rows per lane
constexpr int kPPPartials = kPPWarps * kPPSlots;  // gain partial sums per trial and block
constexpr int kPPMaxCluster = 8;                  // portable cluster size
constexpr int kPPMinSliceRows = 512;              // fewer rows per block: not worth a barrier
constexpr int kPPTargetBlocks = 128;              // split problems until about this many blocks
constexpr size_t kPPExclBytes = (static_cast<size_t>(kPPThreads + 1) * 8 + 15) / 16 * 16;

struct PlusPlusArgs {
  int64_t n;          // rows per problem
  int64_t m;          // sample rows
  double ratio;       // n / m (sample row s is row floor(s * n / m))
  uint64_t seed;      // KmeansParams::seed
  int32_t d;          // dim
  int32_t k;          // effective k
  int32_t trials;     // candidates per centre
  int32_t cluster;    // C, blocks per problem
  int32_t slice_cap;  // rows the shared-memory arrays hold (largest slice, rounded up to 4)
  int32_t vec;        // points are 16-byte aligned: 16-byte loads
};

// Dynamic shared memory of plus_plus_kernel: excl[kPPThreads + 1] (double), cvec[kT][d],
// part[kT][kPPPartials], best[slice_cap] (float), mask[slice_cap].
inline size_t plus_plus_fixed_bytes(int bucket, int d) {
  return kPPExclBytes + static_cast<size_t>(bucket) * d * 4 +
         static_cast<size_t>(bucket) * kPPPartials * 4;
}
inline size_t plus_plus_row_bytes(int bucket) { return 4 + (bucket <= 16 ? 2 : 4); }

struct PPMax {
  __device__ __forceinline__ double operator()(double a, double b) const { return a < b ? b : a; }
};

/// Row of sample index s: floor(s * n / m), exactly (the reference's init_sample_rows).
__device__ __forceinline__ int64_t pp_sample_row(int64_t s, int64_t n, int64_t m, double ratio) {
  if (n == m) return s;
  const int64_t num = s * n;  // < 2^62
  int64_t q = static_cast<int64_t>(static_cast<double>(s) * ratio);
  while (q > 0 && q * m > num) --q;
  while ((q + 1) * m <= num) ++q;
  return q;
}

__device__ __forceinline__ int pp_rank(int cluster) {
#if KVTIER_KMEANS_PP_CLUSTERS
  (void)cluster;
  return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#else
  if (cluster != 1) __trap();  // the host launches clusters only for sm_90 code
  return 0;
#endif
}

// Cluster-wide barrier (all threads of all blocks; release/acquire for shared and global
// memory). Without clusters the cluster is the block.
__device__ __forceinline__ void pp_cluster_sync() {
#if KVTIER_KMEANS_PP_CLUSTERS
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

/// The same shared-memory object in block `rank` of the cluster.
template <typename U>
__device__ __forceinline__ U* pp_remote(U* p, int rank) {
#if KVTIER_KMEANS_PP_CLUSTERS
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  (void)rank;
  return p;
#endif
}

// 16 bytes of a row as floats.
__device__ __forceinline__ void pp_load(const float* p, bool vec, float (&f)[4]) {
  if (vec) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) f[e] = p[e];
  }
}
__device__ __forceinline__ void pp_load(const __half* p, bool vec, float (&f)[8]) {
  if (vec) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = __half2float(p[e]);
  }
}
__device__ __forceinline__ void pp_load(const __nv_bfloat16* p, bool vec, float (&f)[8]) {
  if (vec) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);  // bf16 -> fp32 is exact: the high half of the bits
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = __bfloat162float(p[e]);
  }
}

// Dot products of kPPRho rows (raw, not normalized) with kT unit vectors cvec[kT][d]: lane `sub`
// of a row's 4 lanes takes the row's 16-byte pieces sub, sub + 4, ..., then the 4 partial sums
// are combined by two xor shuffles, so all 4 lanes hold the same sums. Rows with load[r] false
// count as zero. A candidate's arithmetic (fmaf in this order, then the shuffles) does not depend
// on kT, so a later call with kT = 1 reproduces its sums bit for bit. All lanes must call it.
template <typename T, int kT>
__device__ __forceinline__ void pp_dots(const T* const (&rows)[kPPRho], const bool (&load)[kPPRho],
                                        int d, int sub, bool vec, const float* cvec,
                                        float (&acc)[kPPRho][kT]) {
  constexpr int kE = 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int r = 0; r < kPPRho; ++r)
#pragma unroll
    for (int t = 0; t < kT; ++t) acc[r][t] = 0.f;
  const int pieces = d / kE;
#pragma unroll 1
  for (int v = sub; v < pieces; v += kPPLanes) {
    float f[kPPRho][kE];
#pragma unroll
    for (int r = 0; r < kPPRho; ++r) {
      if (load[r]) {
        pp_load(rows[r] + v * kE, vec, f[r]);
      } else {
#pragma unroll
        for (int e = 0; e < kE; ++e) f[r][e] = 0.f;
      }
    }
#pragma unroll
    for (int t = 0; t < kT; ++t) {
      float c[kE];
      const float4* cp = reinterpret_cast<const float4*>(cvec + t * d + v * kE);
#pragma unroll
      for (int i = 0; i < kE / 4; ++i) {
        const float4 q = cp[i];
        c[4 * i] = q.x, c[4 * i + 1] = q.y, c[4 * i + 2] = q.z, c[4 * i + 3] = q.w;
      }
#pragma unroll
      for (int e = 0; e < kE; ++e)
#pragma unroll
        for (int r = 0; r < kPPRho; ++r) acc[r][t] = fmaf(f[r][e], c[e], acc[r][t]);
    }
  }
#pragma unroll
  for (int r = 0; r < kPPRho; ++r)
#pragma unroll
    for (int t = 0; t < kT; ++t) {
      acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], 1);
      acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], 2);
    }
}

/// max(0, 1 - cos) from a raw row's dot product with a unit vector and the row's inverse norm;
/// one explicit fma, so the pass and the update round it the same way.
__device__ __forceinline__ float pp_distance(float dot, float inv) {
  return fmaxf(0.f, __fmaf_rn(-dot, inv, 1.f));
}

// cvec[t] = unit vector of sample row cand[t] for t < count, zeros up to `width` (block-wide).
template <typename T>
__device__ void pp_load_centres(const T* __restrict__ xp, const float* __restrict__ invp,
                                const int64_t* cand, int count, int width, const PlusPlusArgs& a,
                                float* cvec) {
  for (int i = threadIdx.x; i < width * a.d; i += blockDim.x) {
    const int t = i / a.d, e = i - t * a.d;
    float v = 0.f;
    if (t < count) {
      const int64_t row = pp_sample_row(cand[t], a.n, a.m, a.ratio);
      v = to_float(xp[row * a.d + e]) * invp[row];  // as init_kernel computes the centroid
    }
    cvec[i] = v;
  }
}

// Rare: no row with w > 0 in the chunk that owns a draw (rounding at a boundary, or an empty
// chunk). The last row with w > 0 before `from` (this slice, then the earlier slices), else the
// first one at or after it. Some row has w > 0 because the total is positive.
__device__ int64_t pp_nearest_positive(float* best, int from, int rank, const PlusPlusArgs& a) {
  const int C = a.cluster;
  for (int q = rank; q >= 0; --q) {
    const float* bq = pp_remote(best, q);
    const int64_t qb = a.m * q / C;
    const int qn = static_cast<int>(a.m * (q + 1) / C - qb);
    for (int s = (q == rank ? from : qn) - 1; s >= 0; --s)
      if (bq[s] > 0.f) return qb + s;
  }
  for (int q = rank; q < C; ++q) {
    const float* bq = pp_remote(best, q);
    const int64_t qb = a.m * q / C;
    const int qn = static_cast<int>(a.m * (q + 1) / C - qb);
    for (int s = q == rank ? from : 0; s < qn; ++s)
      if (bq[s] > 0.f) return qb + s;
  }
  return 0;  // not reached
}

// grid: (P * C) in clusters of C, block kPPThreads, dynamic shared memory as above. Writes
// init_rows[p][0..k) (rows of the problem, in the order chosen).
template <typename T, int kT>
__global__ void __launch_bounds__(kPPThreads, 1)
    plus_plus_kernel(const T* __restrict__ x, const float* __restrict__ inv_norm, PlusPlusArgs a,
                     int32_t* init_rows) {
  using MaskT = std::conditional_t<(kT <= 16), uint16_t, uint32_t>;
  using Scan = cub::BlockScan<double, kPPThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ double sh_total;      // this block's sum of w (read by the cluster)
  __shared__ int sh_first;         // this block's first untaken row (read by the cluster)
  __shared__ int64_t sh_cand[kT];  // this step's candidates, written by the block owning the draw
  __shared__ double sh_gain[kT];   // this block's share of each candidate's gain
  __shared__ double sh_u[kT];
  __shared__ double sh_tot_all[kPPMaxCluster];
  __shared__ int sh_first_all[kPPMaxCluster];
  __shared__ double sh_gain_all[kPPMaxCluster * kT];
  __shared__ int sh_win;
  extern __shared__ __align__(16) unsigned char pp_smem[];
  double* excl = reinterpret_cast<double*>(pp_smem);
  float* cvec = reinterpret_cast<float*>(pp_smem + kPPExclBytes);
  float* part = cvec + kT * a.d;
  float* best = part + kT * kPPPartials;
  MaskT* mask = reinterpret_cast<MaskT*>(best + a.slice_cap);

  const int C = a.cluster;
  const int rank = pp_rank(C);
  const int prob = static_cast<int>(blockIdx.x) / C;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int slot = lane / kPPLanes, sub = lane % kPPLanes;
  const int64_t n = a.n, m = a.m;
  const int d = a.d, k = a.k, trials = a.trials;
  const bool vec = a.vec != 0;
  const int64_t sb = m * rank / C;  // this block's slice: sample rows [sb, sb + ms)
  const int ms = static_cast<int>(m * (rank + 1) / C - sb);
  const T* xp = x + static_cast<size_t>(prob) * n * d;
  const float* invp = inv_norm + static_cast<size_t>(prob) * n;
  // Each thread's contiguous chunk of the slice for the prefix sums; an odd length puts a warp's
  // reads of best[] on 32 different banks.
  const int chunk = ((ms + kPPThreads - 1) / kPPThreads) | 1;
  const int c0 = min(ms, tid * chunk), c1 = min(ms, c0 + chunk);
  const uint64_t stream = detail::plus_plus_stream(a.seed, prob);

  for (int s = tid; s < ms; s += kPPThreads) best[s] = 2.f, mask[s] = 0;
  if (tid == 0) sh_first = INT_MAX;
  __syncthreads();

  // Rows of the distance passes: warp `warp` takes 16 rows at a time, lane (slot, sub) works on
  // rows slot and slot + 8 of them.
  constexpr int kWarpRows = kPPSlots * kPPRho;
  auto pass_rows = [&](int base, int(&s)[kPPRho], bool(&ok)[kPPRho]) {
#pragma unroll
    for (int r = 0; r < kPPRho; ++r) {
      s[r] = base + slot + r * kPPSlots;
      ok[r] = s[r] < ms;
    }
  };
  // The points and inverse norms of the pass's rows that `use` marks (row 0 and 0 otherwise).
  auto rows_of = [&](const int(&s)[kPPRho], const bool(&use)[kPPRho], const T*(&rows)[kPPRho],
                     float(&inv)[kPPRho]) {
#pragma unroll
    for (int r = 0; r < kPPRho; ++r) {
      const int64_t row = use[r] ? pp_sample_row(sb + s[r], n, m, a.ratio) : 0;
      rows[r] = xp + row * d;
      inv[r] = use[r] ? invp[row] : 0.f;
    }
  };

  for (int j = 0; j < k; ++j) {
    int mode;  // 0: the first centre; 1: drawn; 2: every untaken row coincides with a centre
    int win = 0;
    int64_t pick;
    if (j == 0) {
      mode = 0;
      pick = static_cast<int64_t>(detail::plus_plus_draw(stream, 0, 0) % static_cast<uint64_t>(m));
      if (tid == 0) sh_cand[0] = pick;
      __syncthreads();
      pp_load_centres(xp, invp, sh_cand, 1, 1, a, cvec);
      __syncthreads();
    } else {
      // 1. Sums of w per thread chunk, the block scan, and the cluster's totals.
      double sum = 0.0;
      int first = INT_MAX;
      for (int s = c0; s < c1; ++s) {
        const float b = best[s];
        if (b >= 0.f) {
          first = min(first, s);
          sum += b;
        }
      }
      if (first != INT_MAX) atomicMin(&sh_first, first);
      double ex, tot;
      Scan(scan_tmp).ExclusiveSum(sum, ex, tot);
      // The scan's tree of additions can leave a prefix an ulp below its predecessor's (after a
      // zero); a running maximum (exact) makes the bounds non-decreasing, so the threads'
      // intervals below partition the line and each draw has exactly one owner.
      __syncthreads();  // scan_tmp is reused
      Scan(scan_tmp).InclusiveScan(tid == 0 ? 0.0 : ex, ex, PPMax());
      excl[tid] = ex;
      if (tid == 0) sh_total = tot;
      pp_cluster_sync();  // A
      if (tid < C) {
        sh_tot_all[tid] = *pp_remote(&sh_total, tid);
        sh_first_all[tid] = *pp_remote(&sh_first, tid);
      }
      __syncthreads();
      // Every block forms the same sequential prefix over the block totals, so block r's upper
      // bound is bit for bit block r + 1's lower bound.
      double grand = 0.0, base = 0.0, lo = -INFINITY, hi = INFINITY;
      for (int q = 0; q < C; ++q) {
        if (q == rank) {
          base = grand;
          if (q > 0) lo = grand;
        }
        grand += sh_tot_all[q];
        if (q == rank && q < C - 1) hi = grand;
      }
      if (!(grand > 0.0)) {
        mode = 2;
        pick = 0;
        for (int q = C - 1; q >= 0; --q)
          if (sh_first_all[q] != INT_MAX) pick = m * q / C + sh_first_all[q];
      } else {
        mode = 1;
        pick = -1;
        if (tid < trials)
          sh_u[tid] = grand * detail::plus_plus_uniform(detail::plus_plus_draw(stream, j, tid));
        __syncthreads();
        // 2. The owner of each draw: the block whose [lo, hi) holds u, then the thread whose
        // [base + excl[tid], base + excl[tid + 1]) does (open at both ends of the block). Both
        // sequences of bounds are non-decreasing, so exactly one thread owns each draw.
        const double tlo = base + excl[tid];
        const double thi = tid + 1 < kPPThreads ? base + excl[tid + 1] : INFINITY;
        for (int t = 0; t < trials; ++t) {
          const double u = sh_u[t];
          if (!(u >= lo && u < hi)) continue;
          if (!((tid == 0 || u >= tlo) && (tid == kPPThreads - 1 || u < thi))) continue;
          double acc = tlo;
          int found = -1, last = -1;
          for (int s = c0; s < c1; ++s) {
            const float b = best[s];
            if (!(b > 0.f)) continue;
            last = s;
            acc += b;
            if (u < acc) {
              found = s;
              break;
            }
          }
          if (found < 0) found = last;
          const int64_t cand = found >= 0 ? sb + found : pp_nearest_positive(best, c0, rank, a);
          for (int q = 0; q < C; ++q) *pp_remote(&sh_cand[t], q) = cand;
        }
      }
      pp_cluster_sync();  // B: candidates known everywhere; totals no longer read

      if (mode == 1) {
        pp_load_centres(xp, invp, sh_cand, trials, kT, a, cvec);
        __syncthreads();
        // 3. Cosines to every candidate, gains and masks over the slice.
        float gain[kT];
#pragma unroll
        for (int t = 0; t < kT; ++t) gain[t] = 0.f;
        for (int b0 = warp * kWarpRows; b0 < ms; b0 += kPPWarps * kWarpRows) {
          int s[kPPRho];
          bool ok[kPPRho];
          pass_rows(b0, s, ok);
          const T* rows[kPPRho];
          float inv[kPPRho];
          rows_of(s, ok, rows, inv);
          float acc[kPPRho][kT];
          pp_dots<T, kT>(rows, ok, d, sub, vec, cvec, acc);
#pragma unroll
          for (int r = 0; r < kPPRho; ++r) {
            if (!ok[r]) continue;
            const float b = best[s[r]];
            uint32_t bits = 0;
            if (b >= 0.f) {
              const int64_t g = sb + s[r];
#pragma unroll
              for (int t = 0; t < kT; ++t) {
                if (t >= trials) continue;
                const float nb = pp_distance(acc[r][t], inv[r]);
                const bool lower = nb < b;
                bits |= lower ? 1u << t : 0u;
                const float dg = g == sh_cand[t] ? b : (lower ? b - nb : 0.f);
                if ((t & (kPPLanes - 1)) == sub) gain[t] += dg;
              }
            }
            if (sub == 0) mask[s[r]] = static_cast<MaskT>(bits);
          }
        }
#pragma unroll
        for (int t = 0; t < kT; ++t)
          if ((t & (kPPLanes - 1)) == sub) part[t * kPPPartials + warp * kPPSlots + slot] = gain[t];
        __syncthreads();
        if (tid < trials) {
          double g = 0.0;
          for (int i = 0; i < kPPPartials; ++i) g += part[tid * kPPPartials + i];
          sh_gain[tid] = g;
        }
        pp_cluster_sync();  // C: every block's gains are published
        if (tid < C * trials) sh_gain_all[tid] = *pp_remote(&sh_gain[tid % trials], tid / trials);
        __syncthreads();
        if (tid == 0) {
          // 4. The first trial whose gain is within kPlusPlusGainTolerance of the highest; the
          // same sums in the same order in every block.
          double top = 0.0;
          for (int t = 0; t < trials; ++t) {
            double g = 0.0;
            for (int q = 0; q < C; ++q) g += sh_gain_all[q * trials + t];
            sh_u[t] = g;  // the draws are used up: reuse their slots for the gains
            top = t == 0 ? g : fmax(top, g);
          }
          while (win < trials - 1 && !(sh_u[win] >= top * (1.0 - detail::kPlusPlusGainTolerance)))
            ++win;
          sh_win = win;
        }
        __syncthreads();
        win = sh_win;
        pick = sh_cand[win];
      }
    }

    // best[] lowered by the new centre's cosines: every row for the first centre, else the rows
    // whose mask has the winner's bit.
    if (mode != 2) {
      const float* cw = cvec + static_cast<size_t>(win) * d;
      for (int b0 = warp * kWarpRows; b0 < ms; b0 += kPPWarps * kWarpRows) {
        int s[kPPRho];
        bool ok[kPPRho], need[kPPRho];
        pass_rows(b0, s, ok);
        bool any = false;
#pragma unroll
        for (int r = 0; r < kPPRho; ++r) {
          need[r] = ok[r] && sb + s[r] != pick && best[s[r]] >= 0.f &&
                    (mode == 0 || ((mask[s[r]] >> win) & 1u) != 0);
          any |= need[r];
        }
        if (!__any_sync(0xffffffffu, any)) continue;
        const T* rows[kPPRho];
        float inv[kPPRho];
        rows_of(s, need, rows, inv);
        float acc[kPPRho][1];
        pp_dots<T, 1>(rows, need, d, sub, vec, cw, acc);
#pragma unroll
        for (int r = 0; r < kPPRho; ++r)
          if (need[r] && sub == 0) best[s[r]] = fminf(best[s[r]], pp_distance(acc[r][0], inv[r]));
      }
    }
    __syncthreads();
    if (tid == 0) {
      if (pick >= sb && pick < sb + ms) best[pick - sb] = -1.f;
      if (rank == 0)
        init_rows[static_cast<size_t>(prob) * k + j] =
            static_cast<int32_t>(pp_sample_row(pick, n, m, a.ratio));
      sh_first = INT_MAX;
    }
    __syncthreads();
  }
  pp_cluster_sync();  // no block leaves while another may still read its shared memory
}

// grid: (P), block 256: final sizes, padding of clusters >= k_eff, objective and iterations out.
__global__ void finish_kernel(int64_t n, int d, int k, int num_clusters, int stride, int max_iters,
                              const int32_t* labels, const double* objective, const int32_t* iters,
                              float* centroids, int32_t* sizes, double* objective_out,
                              int32_t* iters_out) {
  const int p = blockIdx.x;
  for (int j = threadIdx.x; j < num_clusters; j += blockDim.x)
    sizes[static_cast<size_t>(p) * stride + j] = 0;
  for (int j = k + threadIdx.x / 32; j < num_clusters; j += blockDim.x / 32)
    for (int t = threadIdx.x & 31; t < d; t += 32)
      centroids[(static_cast<size_t>(p) * stride + j) * d + t] = 0.f;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    atomicAdd(&sizes[static_cast<size_t>(p) * stride + labels[static_cast<size_t>(p) * n + i]], 1);
  if (threadIdx.x == 0) {
    if (objective_out)
      objective_out[p] = objective[static_cast<size_t>(p) * (max_iters + 1) + iters[p]];
    if (iters_out) iters_out[p] = iters[p];
  }
}

// KmeansCentroids::kMeanRow, after finish_kernel. grid: (ceil(n / kAccumRows), P), block 256:
// each warp adds its rows' raw values to their clusters' sums (sums zeroed before).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mean_accumulate_kernel(const T* __restrict__ x, int64_t n, int d, int k, const int32_t* labels,
                           float* sums) {
  const int p = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kWarps = kThreads / 32;
  for (int j = 0; j < kAccumRows / kWarps; ++j) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kAccumRows + j * kWarps + warp;
    if (row >= n) break;
    const size_t ri = static_cast<size_t>(p) * n + row;
    const T* r = x + ri * d;
    float* s = sums + (static_cast<size_t>(p) * k + labels[ri]) * d;
    for (int t = lane; t < d; t += 32) atomicAdd(&s[t], to_float(r[t]));
  }
}

// grid: (k, P), block 128: each non-empty cluster's centroid becomes its rows' mean.
__global__ void mean_finish_kernel(int d, int k, int stride, const float* sums,
                                   const int32_t* sizes, float* centroids) {
  const int p = blockIdx.y, j = blockIdx.x;
  const int32_t count = sizes[static_cast<size_t>(p) * stride + j];
  if (count == 0) return;
  const float* s = sums + (static_cast<size_t>(p) * k + j) * d;
  float* c = centroids + (static_cast<size_t>(p) * stride + j) * d;
  for (int t = threadIdx.x; t < d; t += blockDim.x) c[t] = s[t] / static_cast<float>(count);
}

inline int plus_plus_bucket(int trials) {
  return trials <= 4 ? 4 : trials <= 8 ? 8 : trials <= 10 ? 10 : 24;
}

/// Calls f(std::integral_constant<int, bucket>{}): the compile-time trial count kT >= trials.
template <typename F>
void dispatch_plus_plus_bucket(int bucket, F&& f) {
  switch (bucket) {
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    case 10:
      f(std::integral_constant<int, 10>{});
      break;
    default:
      f(std::integral_constant<int, 24>{});
      break;
  }
}

struct PlusPlusPlan {
  PlusPlusArgs args{};
  size_t smem = 0;
  bool clusters = false;
};

/// Blocks per problem and shared memory for plus_plus_kernel<T, kT>. Problems are split while the
/// launch has fewer than about kPPTargetBlocks blocks and slices keep kPPMinSliceRows rows, and
/// further if a slice's arrays do not fit in shared memory. Throws InvalidArgumentError if the
/// sample needs more than kPPMaxCluster blocks (about 280K rows on an H100 at d = 128). Only
/// host calls (device attributes), nothing enqueued.
template <typename T, int kT>
PlusPlusPlan plan_plus_plus(const KmeansParams& p, const void* points) {
  PlusPlusPlan plan;
  PlusPlusArgs& a = plan.args;
  a.n = p.num_points;
  a.m = detail::init_sample_size(p);
  a.ratio = static_cast<double>(a.n) / static_cast<double>(a.m);
  a.seed = p.seed;
  a.d = p.dim;
  a.k = kmeans_effective_k(p);
  a.trials = detail::plus_plus_trials(a.k);
  a.vec = reinterpret_cast<uintptr_t>(points) % 16 == 0 ? 1 : 0;
  int device = 0, major = 0, optin = 0;
  KVTIER_CUDA_CHECK(cudaGetDevice(&device));
  KVTIER_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  KVTIER_CUDA_CHECK(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes fa{};
  KVTIER_CUDA_CHECK(cudaFuncGetAttributes(&fa, plus_plus_kernel<T, kT>));
  // Clusters need sm_90 hardware and code compiled for it (the kernel traps otherwise).
  plan.clusters = major >= 9 && fa.ptxVersion >= 90;
  const int max_c = plan.clusters ? kPPMaxCluster : 1;
  const size_t limit = static_cast<size_t>(optin) > fa.sharedSizeBytes
                           ? static_cast<size_t>(optin) - fa.sharedSizeBytes
                           : 0;
  const size_t fixed = plus_plus_fixed_bytes(kT, a.d), per_row = plus_plus_row_bytes(kT);
  auto slice_cap = [&](int64_t c) { return ((a.m + c - 1) / c + 3) / 4 * 4; };
  auto bytes = [&](int64_t c) { return fixed + static_cast<size_t>(slice_cap(c)) * per_row; };
  int c = 1;
  while (c < max_c && static_cast<int64_t>(p.num_problems) * c * 2 <= kPPTargetBlocks &&
         a.m / (2 * c) >= kPPMinSliceRows)
    c *= 2;
  while (c < max_c && bytes(c) > limit) c *= 2;
  KVTIER_CHECK(bytes(c) <= limit,
               "launch_kmeans: k-means++ keeps its sample in shared memory, and ", a.m,
               " sample rows (num_points ", p.num_points, ", init_sample ", p.init_sample,
               ") need more than ", max_c, " blocks of ", limit, " bytes; lower init_sample");
  KVTIER_CHECK(static_cast<int64_t>(p.num_problems) * c <= INT32_MAX,
               "launch_kmeans: too many problems for k-means++ (", p.num_problems, ")");
  a.cluster = c;
  a.slice_cap = static_cast<int32_t>(slice_cap(c));
  plan.smem = bytes(c);
  return plan;
}

template <typename T, int kT>
void launch_plus_plus(const PlusPlusPlan& plan, int P, const T* x, const float* inv_norm,
                      int32_t* init_rows, cudaStream_t stream) {
  auto kernel = plus_plus_kernel<T, kT>;
  KVTIER_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(plan.smem)));
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(P * plan.args.cluster));
  cfg.blockDim = dim3(kPPThreads);
  cfg.dynamicSmemBytes = plan.smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1]{};
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(plan.args.cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = plan.clusters ? 1 : 0;
  KVTIER_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, x, inv_norm, plan.args, init_rows));
  KVTIER_CUDA_CHECK_LAUNCH("kmeans plus_plus_kernel");
}

template <typename T>
void run(const KmeansParams& p, const T* x, float* centroids, int32_t* labels, int32_t* sizes,
         void* ws_base, double* objective_dev, int32_t* iterations_dev, int32_t* nonfinite_dev,
         cudaStream_t stream) {
  size_t total = 0;
  const Workspace w = carve(p, ws_base, &total);
  const int P = p.num_problems, d = p.dim, k = kmeans_effective_k(p),
            stride = kmeans_centroid_stride(p);
  const int64_t n = p.num_points;
  // Initial rows: kRandomRows' are drawn on the host and uploaded; kPlusPlus's are chosen on the
  // device by plus_plus_kernel after prep_kernel. Planned first, so a throw enqueues nothing.
  const bool plus_plus = p.init == KmeansInit::kPlusPlus;
  const int pp_bucket = plus_plus_bucket(detail::plus_plus_trials(k));
  PlusPlusPlan pp;
  if (plus_plus) {
    dispatch_plus_plus_bucket(
        pp_bucket, [&](auto bucket) { pp = plan_plus_plus<T, decltype(bucket)::value>(p, x); });
  } else {
    const std::vector<int32_t> rows = kmeans_random_init_rows(p);
    KVTIER_CUDA_CHECK(
        cudaMemcpyAsync(w.init_rows, rows.data(), rows.size() * 4, cudaMemcpyHostToDevice, stream));
  }
  KVTIER_CUDA_CHECK(
      cudaMemsetAsync(w.objective, 0, static_cast<size_t>(P) * (p.max_iters + 1) * 8, stream));
  KVTIER_CUDA_CHECK(cudaMemsetAsync(w.done, 0, static_cast<size_t>(P) * 4, stream));
  KVTIER_CUDA_CHECK(cudaMemsetAsync(w.iters, 0, static_cast<size_t>(P) * 4, stream));
  KVTIER_CUDA_CHECK(cudaMemsetAsync(w.moved, 0, static_cast<size_t>(P) * 4, stream));
  // Nonzero bytes: the second assignment rebuilds too (the first always does).
  KVTIER_CUDA_CHECK(cudaMemsetAsync(w.rebuild, 1, static_cast<size_t>(P) * 4, stream));
  if (nonfinite_dev) KVTIER_CUDA_CHECK(cudaMemsetAsync(nonfinite_dev, 0, 4, stream));
  const dim3 row_grid(static_cast<unsigned>((n + 7) / 8), static_cast<unsigned>(P));
  prep_kernel<T><<<row_grid, kThreads, 0, stream>>>(x, n, d, w.inv_norm, nonfinite_dev);
  KVTIER_CUDA_CHECK_LAUNCH("kmeans prep_kernel");
  if (plus_plus) {
    dispatch_plus_plus_bucket(pp_bucket, [&](auto bucket) {
      launch_plus_plus<T, decltype(bucket)::value>(pp, P, x, w.inv_norm, w.init_rows, stream);
    });
  }
  init_kernel<T>
      <<<dim3(k, P), 128, 0, stream>>>(x, n, d, k, stride, w.init_rows, w.inv_norm, centroids);
  KVTIER_CUDA_CHECK_LAUNCH("kmeans init_kernel");
  const int64_t k_pad = padded_k(k);
  const dim3 tile_grid(static_cast<unsigned>((n + kAssignPoints - 1) / kAssignPoints),
                       static_cast<unsigned>(P));
  const dim3 cb_grid(static_cast<unsigned>(k_pad / 128), static_cast<unsigned>(P));
  const bool prune = p.pruning == KmeansPruning::kBounds;
  const dim3 accum_grid(static_cast<unsigned>((n + kAccumRows - 1) / kAccumRows),
                        static_cast<unsigned>(P));
  const dim3 filter_grid(static_cast<unsigned>((n + 255) / 256), static_cast<unsigned>(P));
  auto assign = [&](int it) {
    // Which rows to scan: all of them at first (or without pruning), else those whose bounds fail.
    KVTIER_CUDA_CHECK(cudaMemsetAsync(w.active_count, 0, static_cast<size_t>(P) * 4, stream));
    filter_kernel<<<filter_grid, 256, 0, stream>>>(n, it == 0 || !prune ? 1 : 0, labels, w.best,
                                                   w.drift, w.drift_max, w.done, k, w.theta2,
                                                   w.active, w.active_rows, w.active_count);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans filter_kernel");
    centroids_fp16_kernel<<<cb_grid, 128, 0, stream>>>(d, k, stride, k_pad, centroids, w.done,
                                                       w.cb);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans centroids_fp16_kernel");
    dispatch_head_dim(d, [&](auto dim) {
      constexpr int kDim = decltype(dim)::value;
      constexpr size_t smem = (kAssignPoints + 2 * kAssignCentroids) * (kDim + 8) * 2;
      KVTIER_CUDA_CHECK(cudaFuncSetAttribute(assign_mma_kernel<T, kDim>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
      assign_mma_kernel<T, kDim><<<tile_grid, 256, smem, stream>>>(
          x, reinterpret_cast<uintptr_t>(x) % 16 == 0, n, k, k_pad, w.cb, w.inv_norm, w.done,
          w.active_rows, w.active_count, labels, w.runner_up, w.second_score);
    });
    KVTIER_CUDA_CHECK_LAUNCH("kmeans assign_mma_kernel");
    rebuild_prepare_kernel<<<dim3(static_cast<unsigned>((k + 255) / 256), P), 256, 0, stream>>>(
        k, it, w.done, w.rebuild, w.counts);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans rebuild_prepare_kernel");
    cos_accumulate_kernel<T><<<accum_grid, kThreads, 0, stream>>>(
        x, n, d, k, stride, p.max_iters, it, labels, w.runner_up, w.second_score, w.active,
        centroids, w.inv_norm, w.done, w.best, w.theta2, w.objective, w.sums, w.counts,
        w.prev_labels, w.rebuild, w.moved);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans cos_accumulate_kernel");
    rebuild_scan_kernel<<<P, kScanThreads, 0, stream>>>(k, it, w.done, w.rebuild, w.counts,
                                                        w.cursor);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans rebuild_scan_kernel");
    rebuild_scatter_kernel<<<filter_grid, 256, 0, stream>>>(n, k, it, w.done, w.rebuild, labels,
                                                            w.cursor, w.order);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans rebuild_scatter_kernel");
    rebuild_sums_kernel<T><<<dim3(static_cast<unsigned>((k + 7) / 8), P), kThreads, 0, stream>>>(
        x, n, d, k, it, w.done, w.rebuild, w.counts, w.cursor, w.order, w.inv_norm, w.sums);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans rebuild_sums_kernel");
  };
  assign(0);
  for (int it = 1; it <= p.max_iters; ++it) {
    KVTIER_CUDA_CHECK(cudaMemsetAsync(w.drift, 0, static_cast<size_t>(P) * k * 4, stream));
    KVTIER_CUDA_CHECK(cudaMemsetAsync(w.drift_max, 0, static_cast<size_t>(P) * 4, stream));
    update_kernel<<<dim3(k, P), 128, 0, stream>>>(d, k, stride, w.sums, w.counts, w.done, centroids,
                                                  w.drift, w.drift_max);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans update_kernel");
    reseed_kernel<T><<<P, kThreads, 0, stream>>>(x, n, d, k, stride, w.counts, w.inv_norm, w.done,
                                                 w.best, centroids, w.drift, w.drift_max);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans reseed_kernel");
    assign(it);
    converge_kernel<<<(P + 127) / 128, 128, 0, stream>>>(
        P, n, it, p.max_iters, p.rel_tol, w.objective, w.done, w.iters, w.moved, w.rebuild);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans converge_kernel");
  }
  finish_kernel<<<P, kThreads, 0, stream>>>(n, d, k, p.num_clusters, stride, p.max_iters, labels,
                                            w.objective, w.iters, centroids, sizes, objective_dev,
                                            iterations_dev);
  KVTIER_CUDA_CHECK_LAUNCH("kmeans finish_kernel");
  if (p.output == KmeansCentroids::kMeanRow) {
    KVTIER_CUDA_CHECK(cudaMemsetAsync(w.sums, 0, static_cast<size_t>(P) * k * d * 4, stream));
    mean_accumulate_kernel<T><<<accum_grid, kThreads, 0, stream>>>(x, n, d, k, labels, w.sums);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans mean_accumulate_kernel");
    mean_finish_kernel<<<dim3(k, P), 128, 0, stream>>>(d, k, stride, w.sums, sizes, centroids);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans mean_finish_kernel");
  }
}

}  // namespace

size_t kmeans_workspace_bytes(const KmeansParams& p) {
  check_kmeans_params(p);
  size_t total = 0;
  carve(p, nullptr, &total);
  return total;
}

void launch_kmeans(const KmeansParams& p, const void* points, float* centroids, int32_t* labels,
                   int32_t* sizes, void* workspace, double* objective_dev, int32_t* iterations_dev,
                   int32_t* nonfinite_dev, cudaStream_t stream) {
  check_kmeans_params(p);
  KVTIER_CHECK(points && centroids && labels && sizes && workspace,
               "launch_kmeans: null pointer argument");
  switch (p.dtype) {
    case DType::kF32:
      run(p, static_cast<const float*>(points), centroids, labels, sizes, workspace, objective_dev,
          iterations_dev, nonfinite_dev, stream);
      break;
    case DType::kF16:
      run(p, static_cast<const __half*>(points), centroids, labels, sizes, workspace, objective_dev,
          iterations_dev, nonfinite_dev, stream);
      break;
    case DType::kBF16:
      run(p, static_cast<const __nv_bfloat16*>(points), centroids, labels, sizes, workspace,
          objective_dev, iterations_dev, nonfinite_dev, stream);
      break;
  }
}

}  // namespace kvtier::kernels
