#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <type_traits>
#include <vector>

#include "kernels/cluster_select_kernels.cuh"
#include "kernels/launch.cuh"
#include "memory/core/check.h"
#include "scheduler/engine_chunks.cuh"
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

// grid: (count, 2), block 64: 16-byte pieces of one row.
__global__ void append_rows_kernel(const int4* __restrict__ k_src, const int4* __restrict__ v_src,
                                   int32_t src_rows, int32_t vec_per_row, void* const* k_dst,
                                   void* const* v_dst) {
  kernels::pdl_wait();
  kernels::pdl_launch_dependents();
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
  kernels::pdl_wait();
  kernels::pdl_launch_dependents();
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
    kernels::launch_pdl(kernel, dim3(static_cast<unsigned>(p.num_problems)), 256, 0, stream, p,
                        arg.b);
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

void launch_append_rows(const void* k_src, const void* v_src, int32_t src_rows, int32_t count,
                        int32_t row_bytes, void* const* k_dst, void* const* v_dst,
                        cudaStream_t stream) {
  if (count == 0) return;
  KVTIER_CHECK(src_rows > 0, "append_rows: src_rows must be > 0");
  KVTIER_CHECK(row_bytes % 16 == 0, "append_rows: row_bytes ", row_bytes, " not a multiple of 16");
  kernels::launch_pdl(append_rows_kernel, dim3(count, 2), 64, 0, stream,
                      static_cast<const int4*>(k_src), static_cast<const int4*>(v_src), src_rows,
                      row_bytes / 16, k_dst, v_dst);
  KVTIER_CUDA_CHECK_LAUNCH("engine append_rows_kernel");
}

}  // namespace kvtier::scheduler

namespace kvtier::scheduler {
namespace {

using chunks_device::build_problem_chunks;
using chunks_device::BuildChunksEpilogue;
using chunks_device::kBuildThreads;

// grid: (P), block kBuildThreads.
__global__ void __launch_bounds__(kBuildThreads) build_chunks_kernel(ChunkBuildParams p) {
  kernels::pdl_wait();
  kernels::pdl_launch_dependents();
  build_problem_chunks<kBuildThreads>(p, static_cast<int>(blockIdx.x));
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

constexpr int kAdmitThreads = 256;

// grid: (p.count), block kAdmitThreads: one item's window. For each cluster, a block-wide scan of
// "row i has this label" gives each of its rows its rank r (window order); the thread of row i
// copies it (K and V) to row r % P of the cluster's page r / P.
__global__ void __launch_bounds__(kAdmitThreads) admit_rows_kernel(const AdmitParams p) {
  using Scan = cub::BlockScan<int32_t, kAdmitThreads>;
  __shared__ typename Scan::TempStorage scan;
  const AdmitItem it = p.items[blockIdx.x];
  const int32_t* labels = p.labels + static_cast<size_t>(blockIdx.x) * p.window;
  const int32_t* off = p.page_off + static_cast<size_t>(blockIdx.x) * (p.clusters + 1);
  const int vec = p.row_bytes / 16;
  for (int32_t c = 0; c < p.clusters; ++c) {
    if (off[c] == off[c + 1]) continue;  // block-uniform: not admitted
    int32_t carry = 0;
    for (int32_t t0 = 0; t0 < p.window; t0 += kAdmitThreads) {  // block-uniform trip count
      const int32_t i = t0 + static_cast<int32_t>(threadIdx.x);
      const int32_t mine = i < p.window && labels[i] == c ? 1 : 0;
      int32_t rank, total;
      Scan(scan).ExclusiveSum(mine, rank, total);
      __syncthreads();  // the scan storage is reused
      if (mine) {
        const int32_t r = carry + rank;
        const int32_t page = p.pages[off[c] + r / p.page_size];
        const size_t src = static_cast<size_t>((it.begin + i) % it.win_cap) * p.row_bytes;
        const size_t dst =
            (static_cast<size_t>(page) * p.page_size + r % p.page_size) * p.row_bytes;
        const int4* ks = reinterpret_cast<const int4*>(it.ring_k + src);
        const int4* vs = reinterpret_cast<const int4*>(it.ring_v + src);
        int4* kd = reinterpret_cast<int4*>(it.k_pool + dst);
        int4* vd = reinterpret_cast<int4*>(it.v_pool + dst);
        for (int v = 0; v < vec; ++v) {
          kd[v] = ks[v];
          vd[v] = vs[v];
        }
      }
      carry += total;
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
  kernels::launch_pdl(build_chunks_kernel, dim3(static_cast<unsigned>(p.num_problems)),
                      kBuildThreads, 0, stream, p);
  KVTIER_CUDA_CHECK_LAUNCH("engine build_chunks_kernel");
}

void launch_recall_select_build(const kernels::ClusterSelectParams& sp,
                                const kernels::ClusterSelectTensors& t, void* workspace,
                                size_t workspace_bytes, const ChunkBuildParams& bp,
                                cudaStream_t stream) {
  KVTIER_CHECK(t.nonfinite_problem == nullptr,
               "launch_recall_select_build: nonfinite_problem is not supported (it is not reset)");
  kernels::detail::launch_score_select_split_with(sp, t, workspace, workspace_bytes,
                                                  BuildChunksEpilogue::for_clusters(bp), stream);
}

void launch_admit_rows(const AdmitParams& p, cudaStream_t stream) {
  if (p.count == 0) return;
  KVTIER_CHECK(p.row_bytes % 16 == 0, "admit_rows: row_bytes ", p.row_bytes,
               " not a multiple of 16");
  KVTIER_CHECK(p.window > 0 && p.clusters > 0 && p.page_size > 0, "admit_rows: window ", p.window,
               ", clusters ", p.clusters, ", page_size ", p.page_size);
  admit_rows_kernel<<<p.count, kAdmitThreads, 0, stream>>>(p);
  KVTIER_CUDA_CHECK_LAUNCH("engine admit_rows_kernel");
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
