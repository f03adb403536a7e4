// Small device kernels of the engine's decode path (CUDA builds only): query conversion for
// scoring, a batch's rows of the cluster-size table, and appending the step's K/V rows.
#pragma once

#include <cstddef>
#include <cstdint>

#include "memory/core/cuda_fwd.h"
#include "memory/core/dtype.h"

namespace kvtier::scheduler {

#if KVTIER_WITH_CUDA
/// out[i] = float(q[i]) for i < count; q of `dtype`.
void launch_to_f32(const void* q, DType dtype, int64_t count, float* out, cudaStream_t stream);

/// out[p, j] = table[rows[p], j] for p < num_rows, j < cols.
void launch_gather_table_rows(const int32_t* table, const int32_t* rows, int32_t num_rows,
                              int32_t cols, int32_t* out, cudaStream_t stream);

/// Row p % src_rows (row_bytes, a multiple of 16) of k_src / v_src goes to k_dst[p] / v_dst[p],
/// p < count. The pointer arrays are device-readable.
void launch_append_rows(const void* k_src, const void* v_src, int32_t src_rows, int32_t count,
                        int32_t row_bytes, void* const* k_dst, void* const* v_dst,
                        cudaStream_t stream);
#endif

}  // namespace kvtier::scheduler
