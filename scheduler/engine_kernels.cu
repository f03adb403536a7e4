#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
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
