#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <type_traits>
#include <vector>

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

template <int kBytes>
struct RecallBlob {
  alignas(16) unsigned char bytes[kBytes];
};

// grid: (P), block 256. kBytes 0: the call block is read from p.call_block.
template <typename T, int kBytes>
__global__ void __launch_bounds__(256)
    recall_prologue_kernel(const RecallPrologueParams p,
                           const __grid_constant__ RecallBlob<kBytes == 0 ? 16 : kBytes> blob) {
  const int pi = blockIdx.x;
  const unsigned char* src = static_cast<const unsigned char*>(p.call_block);
  if constexpr (kBytes > 0) {
    src = blob.bytes;
    if (pi == 0) {
      const int4* from = reinterpret_cast<const int4*>(blob.bytes);
      int4* to = static_cast<int4*>(p.call_block);
      for (int i = threadIdx.x; i < p.call_bytes / 16; i += blockDim.x) to[i] = from[i];
    }
  }
  const RecallCall& c = *reinterpret_cast<const RecallCall*>(src);
  void* const* dst = reinterpret_cast<void* const*>(src + p.off_dst);
  const int32_t row = reinterpret_cast<const int32_t*>(src + p.off_rows)[pi];
  const size_t q0 = static_cast<size_t>(pi) * p.q_per_problem;
  const T* q = static_cast<const T*>(c.q) + q0;
  T* qc = static_cast<T*>(p.q_copy) + q0;
  for (int i = threadIdx.x; i < p.q_per_problem; i += blockDim.x) {
    const T v = q[i];
    qc[i] = v;
    p.q32[q0 + i] = as_float(v);
  }
  const int vec = p.row_bytes / 16, P = p.num_problems;
  const int4* ks = static_cast<const int4*>(c.k_new) + static_cast<size_t>(pi) * vec;
  const int4* vs = static_cast<const int4*>(c.v_new) + static_cast<size_t>(pi) * vec;
  int4* kd = static_cast<int4*>(dst[pi]);
  int4* vd = static_cast<int4*>(dst[P + pi]);
  int4* ksd = static_cast<int4*>(dst[2 * P + pi]);
  int4* vsd = static_cast<int4*>(dst[3 * P + pi]);
  for (int i = threadIdx.x; i < vec; i += blockDim.x) {
    const int4 a = ks[i], b = vs[i];
    kd[i] = a;
    vd[i] = b;
    ksd[i] = a;
    vsd[i] = b;
  }
  const int32_t* sizes = p.size_table + static_cast<size_t>(row) * p.cols;
  int32_t* out = p.sizes_out + static_cast<size_t>(pi) * p.cols;
  for (int j = threadIdx.x; j < p.cols; j += blockDim.x) out[j] = sizes[j];
}

// grid: enough blocks of 256 for out_bytes / 16.
__global__ void recall_epilogue_kernel(const RecallCall* call, const int4* src, int64_t vecs) {
  int4* out = static_cast<int4*>(call->out);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vecs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = src[i];
}

template <typename T>
struct TypeTag {
  using type = T;
};

// The blob buckets: the call block is passed in the smallest that holds it.
template <typename F>
void dispatch_prologue(DType dtype, size_t bytes, F&& f) {
  auto by_size = [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (bytes == 0) {
      f(recall_prologue_kernel<T, 0>, std::integral_constant<int, 0>{});
    } else if (bytes <= 2048) {
      f(recall_prologue_kernel<T, 2048>, std::integral_constant<int, 2048>{});
    } else if (bytes <= 8192) {
      f(recall_prologue_kernel<T, 8192>, std::integral_constant<int, 8192>{});
    } else {
      f(recall_prologue_kernel<T, static_cast<int>(kRecallBlobMax)>,
        std::integral_constant<int, static_cast<int>(kRecallBlobMax)>{});
    }
  };
  switch (dtype) {
    case DType::kF32:
      by_size(TypeTag<float>{});
      break;
    case DType::kF16:
      by_size(TypeTag<__half>{});
      break;
    case DType::kBF16:
      by_size(TypeTag<__nv_bfloat16>{});
      break;
  }
}

void check_prologue(const RecallPrologueParams& p, const void* blob) {
  KVTIER_CHECK(p.row_bytes % 16 == 0, "recall_prologue: row_bytes ", p.row_bytes,
               " not a multiple of 16");
  KVTIER_CHECK(p.call_bytes % 16 == 0 && p.call_bytes > 0, "recall_prologue: call_bytes ",
               p.call_bytes, " not a positive multiple of 16");
  KVTIER_CHECK(blob == nullptr || static_cast<size_t>(p.call_bytes) <= kRecallBlobMax,
               "recall_prologue: a call block of ", p.call_bytes, " bytes exceeds ",
               kRecallBlobMax);
}

// Kernel-node arguments with the blob padded to its bucket (the argument's full size is read).
template <int kBytes>
struct PaddedBlob {
  RecallBlob<kBytes == 0 ? 16 : kBytes> b;
  PaddedBlob(const void* blob, size_t bytes) {
    if (blob != nullptr) std::memcpy(b.bytes, blob, bytes);
  }
};

bool is_prologue_function(const void* fn) {
  bool found = false;
  for (const DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (const size_t bytes : {size_t{2048}, size_t{8192}, kRecallBlobMax}) {
      dispatch_prologue(t, bytes, [&](auto kernel, auto) {
        found = found || reinterpret_cast<const void*>(kernel) == fn;
      });
    }
  }
  return found;
}

}  // namespace

void launch_recall_prologue(const RecallPrologueParams& p, const void* blob, cudaStream_t stream) {
  if (p.num_problems == 0) return;
  check_prologue(p, blob);
  const size_t bytes = blob ? static_cast<size_t>(p.call_bytes) : 0;
  dispatch_prologue(p.dtype, bytes, [&](auto kernel, auto size) {
    constexpr int kBytes = decltype(size)::value;
    const PaddedBlob<kBytes> arg(blob, bytes);
    kernel<<<p.num_problems, 256, 0, stream>>>(p, arg.b);
  });
  KVTIER_CUDA_CHECK_LAUNCH("engine recall_prologue_kernel");
}

bool is_recall_prologue_node(cudaGraphNode_t node) {
  cudaGraphNodeType type;
  KVTIER_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
  if (type != cudaGraphNodeTypeKernel) return false;
  cudaKernelNodeParams kp{};
  KVTIER_CUDA_CHECK(cudaGraphKernelNodeGetParams(node, &kp));
  return is_prologue_function(kp.func);
}

void update_recall_prologue_node(cudaGraphExec_t exec, cudaGraphNode_t node,
                                 const RecallPrologueParams& p, const void* blob) {
  check_prologue(p, blob);
  KVTIER_CHECK(blob != nullptr, "update_recall_prologue_node: blob is null");
  dispatch_prologue(p.dtype, static_cast<size_t>(p.call_bytes), [&](auto kernel, auto size) {
    constexpr int kBytes = decltype(size)::value;
    PaddedBlob<kBytes> arg(blob, static_cast<size_t>(p.call_bytes));
    RecallPrologueParams pc = p;
    void* args[] = {&pc, &arg.b};
    cudaKernelNodeParams kp{};
    kp.func = reinterpret_cast<void*>(kernel);
    kp.gridDim = dim3(static_cast<unsigned>(p.num_problems));
    kp.blockDim = dim3(256);
    kp.sharedMemBytes = 0;
    kp.kernelParams = args;
    KVTIER_CUDA_CHECK(cudaGraphExecKernelNodeSetParams(exec, node, &kp));
  });
}

void launch_recall_epilogue(const RecallCall* call, const void* src, size_t out_bytes,
                            cudaStream_t stream) {
  if (out_bytes == 0) return;
  KVTIER_CHECK(out_bytes % 16 == 0, "recall_epilogue: ", out_bytes, " bytes, not a multiple of 16");
  const int64_t vecs = static_cast<int64_t>(out_bytes / 16);
  const int blocks = static_cast<int>(std::min<int64_t>((vecs + 255) / 256, 256));
  recall_epilogue_kernel<<<blocks, 256, 0, stream>>>(call, static_cast<const int4*>(src), vecs);
  KVTIER_CUDA_CHECK_LAUNCH("engine recall_epilogue_kernel");
}

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
  if (p.record != nullptr) {
    int32_t* rec = p.record + static_cast<size_t>(*p.record_base + pi) * p.record_cols;
    if (threadIdx.x == 0) rec[0] = n;
    if (threadIdx.x < 4) rec[1 + threadIdx.x] = p.stats[4 * pi + threadIdx.x];
    const int32_t ids = n < p.record_cols - 5 ? n : p.record_cols - 5;
    for (int32_t j = threadIdx.x; j < ids; j += blockDim.x)
      rec[5 + j] = p.sel_ids[static_cast<size_t>(pi) * p.sel_stride + j];
  }
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
