#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "memory/core/check.h"
#include "scheduler/engine_kernels.h"

namespace kvtier::scheduler {
namespace {

template <typename T>
__device__ __forceinline__ float as_float(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return v;
  }
}

template <typename T>
__global__ void to_f32_kernel(const T* __restrict__ q, int64_t count, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = as_float(q[i]);
}

// grid: (num_rows), block 256.
__global__ void gather_table_rows_kernel(const int32_t* __restrict__ table,
                                         const int32_t* __restrict__ rows, int32_t cols,
                                         int32_t* __restrict__ out) {
  const int32_t* src = table + static_cast<size_t>(rows[blockIdx.x]) * cols;
  int32_t* dst = out + static_cast<size_t>(blockIdx.x) * cols;
  for (int j = threadIdx.x; j < cols; j += blockDim.x) dst[j] = src[j];
}

// grid: (count, 2), block 64: 16-byte pieces of one row.
__global__ void append_rows_kernel(const int4* __restrict__ k_src, const int4* __restrict__ v_src,
                                   int32_t src_rows, int32_t vec_per_row, void* const* k_dst,
                                   void* const* v_dst) {
  const int p = blockIdx.x;
  const int4* src =
      (blockIdx.y == 0 ? k_src : v_src) + static_cast<size_t>(p % src_rows) * vec_per_row;
  int4* dst = static_cast<int4*>(blockIdx.y == 0 ? k_dst[p] : v_dst[p]);
  for (int i = threadIdx.x; i < vec_per_row; i += blockDim.x) dst[i] = src[i];
}

}  // namespace

void launch_to_f32(const void* q, DType dtype, int64_t count, float* out, cudaStream_t stream) {
  if (count == 0) return;
  const int blocks = static_cast<int>(std::min<int64_t>((count + 255) / 256, 1024));
  switch (dtype) {
    case DType::kF32:
      to_f32_kernel<<<blocks, 256, 0, stream>>>(static_cast<const float*>(q), count, out);
      break;
    case DType::kF16:
      to_f32_kernel<<<blocks, 256, 0, stream>>>(static_cast<const __half*>(q), count, out);
      break;
    case DType::kBF16:
      to_f32_kernel<<<blocks, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(q), count, out);
      break;
  }
  KVTIER_CUDA_CHECK_LAUNCH("engine to_f32_kernel");
}

void launch_gather_table_rows(const int32_t* table, const int32_t* rows, int32_t num_rows,
                              int32_t cols, int32_t* out, cudaStream_t stream) {
  if (num_rows == 0) return;
  gather_table_rows_kernel<<<num_rows, 256, 0, stream>>>(table, rows, cols, out);
  KVTIER_CUDA_CHECK_LAUNCH("engine gather_table_rows_kernel");
}

void launch_append_rows(const void* k_src, const void* v_src, int32_t src_rows, int32_t count,
                        int32_t row_bytes, void* const* k_dst, void* const* v_dst,
                        cudaStream_t stream) {
  if (count == 0) return;
  KVTIER_CHECK(src_rows > 0, "append_rows: src_rows must be > 0");
  KVTIER_CHECK(row_bytes % 16 == 0, "append_rows: row_bytes ", row_bytes, " not a multiple of 16");
  append_rows_kernel<<<dim3(count, 2), 64, 0, stream>>>(static_cast<const int4*>(k_src),
                                                        static_cast<const int4*>(v_src), src_rows,
                                                        row_bytes / 16, k_dst, v_dst);
  KVTIER_CUDA_CHECK_LAUNCH("engine append_rows_kernel");
}

}  // namespace kvtier::scheduler

namespace kvtier::scheduler {
namespace {

constexpr int kBuildThreads = 256;

// grid: (P), block kBuildThreads: chunk count and stats of problem p.
__global__ void __launch_bounds__(kBuildThreads) count_chunks_kernel(ChunkBuildParams p) {
  const int pi = blockIdx.x;
  const RecallProblem pr = p.problems[pi];
  const int32_t n = p.num_sel[pi];
  int32_t chunks = 0, hits = 0, misses = 0, host_rows = 0, rows_total = 0;
  for (int32_t j = threadIdx.x; j < n; j += blockDim.x) {
    const size_t si = static_cast<size_t>(pi) * p.sel_stride + j;
    const int32_t rows = p.sel_rows[si];
    bool hit = false;
    chunks += detail::cluster_chunks(p, pr, p.sel_ids[si], rows, nullptr, &hit);
    hits += hit ? 1 : 0;
    misses += hit ? 0 : 1;
    host_rows += hit ? 0 : rows;
    rows_total += rows;
  }
  using Reduce = cub::BlockReduce<int32_t, kBuildThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int32_t c = Reduce(tmp).Sum(chunks);
  __syncthreads();
  const int32_t h = Reduce(tmp).Sum(hits);
  __syncthreads();
  const int32_t m = Reduce(tmp).Sum(misses);
  __syncthreads();
  const int32_t hr = Reduce(tmp).Sum(host_rows);
  __syncthreads();
  const int32_t rt = Reduce(tmp).Sum(rows_total);
  if (threadIdx.x == 0) {
    p.counts[pi] = c + (pr.res_rows > 0 ? 1 : 0) + detail::window_chunks(p, pr, nullptr);
    int32_t* st = p.stats + 4 * pi;
    st[0] = h;
    st[1] = m;
    st[2] = hr;
    st[3] = rt + static_cast<int32_t>(pr.res_rows + pr.win_rows);
  }
}

// grid: (P), block kBuildThreads: writes problem p's chunks after those of problems < p.
__global__ void __launch_bounds__(kBuildThreads) write_chunks_kernel(ChunkBuildParams p) {
  const int pi = blockIdx.x;
  const RecallProblem pr = p.problems[pi];
  using Reduce = cub::BlockReduce<int32_t, kBuildThreads>;
  using Scan = cub::BlockScan<int32_t, kBuildThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ int32_t base;
  int32_t before = 0;
  for (int q = threadIdx.x; q < pi; q += blockDim.x) before += p.counts[q];
  const int32_t off = Reduce(tmp.reduce).Sum(before);
  if (threadIdx.x == 0) {
    p.indptr[pi] = off;
    if (pi == p.num_problems - 1) p.indptr[pi + 1] = off + p.counts[pi];
    base = off;
    if (pr.res_rows > 0) p.chunks[base++] = detail::make_chunk(pr.res_k, pr.res_v, pr.res_rows);
  }
  __syncthreads();
  const int32_t n = p.num_sel[pi];
  for (int32_t t0 = 0; t0 < n; t0 += blockDim.x) {
    const int32_t j = t0 + threadIdx.x;
    int32_t c = 0, rows = 0, id = 0;
    bool hit = false;
    if (j < n) {
      const size_t si = static_cast<size_t>(pi) * p.sel_stride + j;
      rows = p.sel_rows[si];
      id = p.sel_ids[si];
      c = detail::cluster_chunks(p, pr, id, rows, nullptr, &hit);
    }
    int32_t excl, total;
    __syncthreads();
    Scan(tmp.scan).ExclusiveSum(c, excl, total);
    if (j < n) detail::cluster_chunks(p, pr, id, rows, p.chunks + base + excl, &hit);
    __syncthreads();
    if (threadIdx.x == 0) base += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) detail::window_chunks(p, pr, p.chunks + base);
}

// grid: (min(count, 4096)), block 128: items strided over blocks; 16-byte pieces over threads.
__global__ void copy_rows_kernel(const kernels::KvChunk* items, int32_t count,
                                 int32_t vec_per_row) {
  for (int32_t i = blockIdx.x; i < count; i += gridDim.x) {
    const kernels::KvChunk c = items[i];
    const int64_t n = static_cast<int64_t>(c.num_rows) * vec_per_row;
    const int4* ks = static_cast<const int4*>(c.k);
    const int4* vs = static_cast<const int4*>(c.v);
    int4* kd = static_cast<int4*>(c.k_copy);
    int4* vd = static_cast<int4*>(c.v_copy);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const int4 a = ks[j], b = vs[j];
      kd[j] = a;
      vd[j] = b;
    }
  }
}

__global__ void scatter_i32_kernel(int32_t* dst, const int32_t* idx, const int32_t* val,
                                   int32_t count) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) dst[idx[i]] = val[i];
}

}  // namespace

void launch_build_recall_chunks(const ChunkBuildParams& p, cudaStream_t stream) {
  if (p.num_problems == 0) return;
  count_chunks_kernel<<<p.num_problems, kBuildThreads, 0, stream>>>(p);
  KVTIER_CUDA_CHECK_LAUNCH("engine count_chunks_kernel");
  write_chunks_kernel<<<p.num_problems, kBuildThreads, 0, stream>>>(p);
  KVTIER_CUDA_CHECK_LAUNCH("engine write_chunks_kernel");
}

void launch_copy_rows(const kernels::KvChunk* items, int32_t count, int32_t row_bytes,
                      cudaStream_t stream) {
  if (count == 0) return;
  KVTIER_CHECK(row_bytes % 16 == 0, "copy_rows: row_bytes ", row_bytes, " not a multiple of 16");
  copy_rows_kernel<<<std::min(count, 4096), 128, 0, stream>>>(items, count, row_bytes / 16);
  KVTIER_CUDA_CHECK_LAUNCH("engine copy_rows_kernel");
}

void launch_scatter_i32(int32_t* dst, const int32_t* idx, const int32_t* val, int32_t count,
                        cudaStream_t stream) {
  if (count == 0) return;
  scatter_i32_kernel<<<(count + 255) / 256, 256, 0, stream>>>(dst, idx, val, count);
  KVTIER_CUDA_CHECK_LAUNCH("engine scatter_i32_kernel");
}

}  // namespace kvtier::scheduler
