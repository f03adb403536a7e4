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
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
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
  int32_t* init_rows;  // [P, k]
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

template <typename T>
void run(const KmeansParams& p, const T* x, float* centroids, int32_t* labels, int32_t* sizes,
         void* ws_base, double* objective_dev, int32_t* iterations_dev, int32_t* nonfinite_dev,
         cudaStream_t stream) {
  size_t total = 0;
  const Workspace w = carve(p, ws_base, &total);
  const int P = p.num_problems, d = p.dim, k = kmeans_effective_k(p),
            stride = kmeans_centroid_stride(p);
  const int64_t n = p.num_points;
  const std::vector<int32_t> rows = kmeans_random_init_rows(p);
  KVTIER_CUDA_CHECK(
      cudaMemcpyAsync(w.init_rows, rows.data(), rows.size() * 4, cudaMemcpyHostToDevice, stream));
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
  KVTIER_CHECK(p.init == KmeansInit::kRandomRows,
               "launch_kmeans: init kPlusPlus is not available on the GPU yet; use kRandomRows");
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
