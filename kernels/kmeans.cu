// CUDA spherical k-means, batched over problems. Every iteration is a fixed sequence of kernels
// enqueued on one stream (no host synchronization); a problem that has converged skips the rest
// through its flag in the workspace. Same algorithm as kmeans_ref: cosine assignment (ties to
// the lower id), fp32 sums of unit rows, worst-fit re-seeding of empty clusters, relative
// objective test after each assignment.
// NOTE: this first version computes the assignment on CUDA cores from shared-memory tiles; the
// tensor-core version is the next step (see bench/RESULTS.md for where it stands).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/kmeans.h"
#include "kernels/kmeans_common.h"
#include "memory/core/check.h"
#include "memory/core/cuda_raii.h"

namespace kvtier::kernels {

namespace {

constexpr int kThreads = 256;
constexpr int kTilePoints = 64;     // points per assignment block
constexpr int kTileCentroids = 32;  // centroids per shared-memory chunk

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
};

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

// grid: (ceil(n / kTilePoints), P), block kThreads. A tile of unit rows and chunks of centroids in
// shared memory; thread (r, c) of a 64 x 4 layout scores row r against centroids c, c+4, ... of the
// chunk; the 4 threads of a row combine their best (max cos, ties to the lower id).
template <typename T>
__global__ void assign_kernel(const T* __restrict__ x, int64_t n, int d, int k, int stride,
                              const float* __restrict__ centroids,
                              const float* __restrict__ inv_norm, const int32_t* done, int it,
                              int max_iters, int32_t* labels, float* best, double* objective) {
  const int p = blockIdx.y;
  if (done[p]) return;
  extern __shared__ float smem[];
  float* xs = smem;                          // [kTilePoints][d + 1]
  float* cs = smem + kTilePoints * (d + 1);  // [kTileCentroids][d + 1]
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTilePoints;
  for (int i = threadIdx.x; i < kTilePoints * d; i += blockDim.x) {
    const int r = i / d, t = i % d;
    const int64_t row = row0 + r;
    xs[r * (d + 1) + t] = row < n ? to_float(x[(static_cast<size_t>(p) * n + row) * d + t]) *
                                        inv_norm[static_cast<size_t>(p) * n + row]
                                  : 0.f;
  }
  const int r = threadIdx.x >> 2, lane4 = threadIdx.x & 3;
  float my_best = -3.f;
  int my_arg = 0;
  const float* cbase = centroids + static_cast<size_t>(p) * stride * d;
  for (int c0 = 0; c0 < k; c0 += kTileCentroids) {
    __syncthreads();
    for (int i = threadIdx.x; i < kTileCentroids * d; i += blockDim.x) {
      const int c = i / d, t = i % d;
      cs[c * (d + 1) + t] = c0 + c < k ? cbase[static_cast<size_t>(c0 + c) * d + t] : 0.f;
    }
    __syncthreads();
    for (int c = lane4; c < kTileCentroids && c0 + c < k; c += 4) {
      float dot = 0.f;
      const float* xr = xs + r * (d + 1);
      const float* cr = cs + c * (d + 1);
#pragma unroll 8
      for (int t = 0; t < d; ++t) dot += xr[t] * cr[t];
      if (dot > my_best) {  // c increases within a thread, so ties keep the lower id
        my_best = dot;
        my_arg = c0 + c;
      }
    }
  }
  for (int o = 1; o < 4; o <<= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, my_best, o);
    const int oa = __shfl_xor_sync(0xffffffffu, my_arg, o);
    if (ob > my_best || (ob == my_best && oa < my_arg)) {
      my_best = ob;
      my_arg = oa;
    }
  }
  const int64_t row = row0 + r;
  if (lane4 == 0 && row < n) {
    // The objective term recomputed exactly against the chosen centroid (fp32 dot of unit rows).
    labels[static_cast<size_t>(p) * n + row] = my_arg;
    best[static_cast<size_t>(p) * n + row] = my_best;
    atomicAdd(&objective[static_cast<size_t>(p) * (max_iters + 1) + it],
              1.0 - static_cast<double>(my_best));
  }
}

// grid: (ceil(n / 8), P), block 256, one warp per row: sums[label] += unit row, counts[label]++.
template <typename T>
__global__ void accumulate_kernel(const T* __restrict__ x, int64_t n, int d, int k,
                                  const int32_t* labels, const float* inv_norm, const int32_t* done,
                                  float* sums, int32_t* counts) {
  const int p = blockIdx.y;
  if (done[p]) return;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (row >= n) return;
  const int lab = labels[static_cast<size_t>(p) * n + row];
  const float inv = inv_norm[static_cast<size_t>(p) * n + row];
  const T* r = x + (static_cast<size_t>(p) * n + row) * d;
  float* s = sums + (static_cast<size_t>(p) * k + lab) * d;
  for (int t = lane; t < d; t += 32) atomicAdd(&s[t], to_float(r[t]) * inv);
  if (lane == 0) atomicAdd(&counts[static_cast<size_t>(p) * k + lab], 1);
}

// grid: (k, P), block 128: normalize non-empty clusters' sums into centroids.
__global__ void update_kernel(int d, int k, int stride, const float* sums, const int32_t* counts,
                              const int32_t* done, float* centroids) {
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
  for (int t = threadIdx.x; t < d; t += blockDim.x)
    centroids[(static_cast<size_t>(p) * stride + j) * d + t] = s[t] * inv;
}

// grid: (P), block 256: each empty cluster, in id order, takes the worst-fitting row not yet
// taken (lowest cos; lowest index among equals). best[] entries taken are set to +inf.
template <typename T>
__global__ void reseed_kernel(const T* __restrict__ x, int64_t n, int d, int k, int stride,
                              const int32_t* counts, const float* inv_norm, const int32_t* done,
                              float* best, float* centroids) {
  const int p = blockIdx.x;
  if (done[p]) return;
  __shared__ float sv[kThreads];
  __shared__ int64_t si[kThreads];
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
    for (int t = threadIdx.x; t < d; t += blockDim.x)
      centroids[(static_cast<size_t>(p) * stride + j) * d + t] =
          to_float(x[(static_cast<size_t>(p) * n + row) * d + t]) * inv;
    __syncthreads();
    if (threadIdx.x == 0) b[row] = INFINITY;
    __syncthreads();
  }
}

// grid: (ceil(P / 128)), block 128: the stopping test after assignment `it`.
__global__ void converge_kernel(int P, int it, int max_iters, float rel_tol,
                                const double* objective, int32_t* done, int32_t* iters) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= P || done[p]) return;
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
  if (nonfinite_dev) KVTIER_CUDA_CHECK(cudaMemsetAsync(nonfinite_dev, 0, 4, stream));
  const dim3 row_grid(static_cast<unsigned>((n + 7) / 8), static_cast<unsigned>(P));
  prep_kernel<T><<<row_grid, kThreads, 0, stream>>>(x, n, d, w.inv_norm, nonfinite_dev);
  KVTIER_CUDA_CHECK_LAUNCH("kmeans prep_kernel");
  init_kernel<T>
      <<<dim3(k, P), 128, 0, stream>>>(x, n, d, k, stride, w.init_rows, w.inv_norm, centroids);
  KVTIER_CUDA_CHECK_LAUNCH("kmeans init_kernel");
  const size_t smem = static_cast<size_t>(kTilePoints + kTileCentroids) * (d + 1) * sizeof(float);
  KVTIER_CUDA_CHECK(cudaFuncSetAttribute(
      assign_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 tile_grid(static_cast<unsigned>((n + kTilePoints - 1) / kTilePoints),
                       static_cast<unsigned>(P));
  auto assign = [&](int it) {
    assign_kernel<T><<<tile_grid, kThreads, smem, stream>>>(x, n, d, k, stride, centroids,
                                                            w.inv_norm, w.done, it, p.max_iters,
                                                            labels, w.best, w.objective);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans assign_kernel");
  };
  assign(0);
  for (int it = 1; it <= p.max_iters; ++it) {
    KVTIER_CUDA_CHECK(cudaMemsetAsync(w.sums, 0, static_cast<size_t>(P) * k * d * 4, stream));
    KVTIER_CUDA_CHECK(cudaMemsetAsync(w.counts, 0, static_cast<size_t>(P) * k * 4, stream));
    accumulate_kernel<T><<<row_grid, kThreads, 0, stream>>>(x, n, d, k, labels, w.inv_norm, w.done,
                                                            w.sums, w.counts);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans accumulate_kernel");
    update_kernel<<<dim3(k, P), 128, 0, stream>>>(d, k, stride, w.sums, w.counts, w.done,
                                                  centroids);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans update_kernel");
    reseed_kernel<T><<<P, kThreads, 0, stream>>>(x, n, d, k, stride, w.counts, w.inv_norm, w.done,
                                                 w.best, centroids);
    KVTIER_CUDA_CHECK_LAUNCH("kmeans reseed_kernel");
    assign(it);
    converge_kernel<<<(P + 127) / 128, 128, 0, stream>>>(P, it, p.max_iters, p.rel_tol, w.objective,
                                                         w.done, w.iters);
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
