// Fetch execution: copy a plan's host rows (memory::GatherSegment) into cluster-cache pages.
//   gather_ref            CPU reference (memcpy per segment); also the CPU backend's fetch
//   launch_gather         GPU kernel reading mapped pinned host memory with 16-byte loads
//   launch_gather_copy_engine  the copy engine: contiguous runs merged, one copy per piece
// Measured on an H100: one cudaMemcpyAsync per 4 KiB piece reaches only ~1.4 GB/s, a gather
// kernel over mapped memory ~50 GB/s at any piece size, so the kernel is the default.
#pragma once

#include <cstddef>
#include <cstdint>

#include "memory/core/cuda_fwd.h"
#include "memory/fetch_plan.h"

namespace kvtier::kernels {

struct GatherParams {
  const memory::GatherSegment* segments = nullptr;  ///< [num_segments]
  int32_t num_segments = 0;
  int32_t row_bytes = 0;        ///< bytes of one K (or V) row; a multiple of 16
  int32_t page_size = 0;        ///< rows per cache page
  std::byte* k_pool = nullptr;  ///< [num_pages, page_size, row_bytes]
  std::byte* v_pool = nullptr;  ///< [num_pages, page_size, row_bytes]
};

/// Throws InvalidArgumentError on a malformed params struct (checked on the host side).
void check_gather_params(const GatherParams& p);

/// Reference: copies every segment with memcpy. Pointers are host pointers.
void gather_ref(const GatherParams& p);

#if KVTIER_WITH_CUDA
/// GPU gather ordered on `stream`. `segments` must be device-readable (device memory or mapped
/// pinned memory) and stay valid until the kernel completes; sources are mapped host rows
/// (HostAddress::kDevice plans); pools are device memory.
void launch_gather(const GatherParams& p, cudaStream_t stream);

/// Copy-engine alternative. `host_segments` is a host array of a kHost plan; adjacent segments
/// whose sources and destinations are both contiguous are merged, then each piece is one
/// cudaMemcpyAsync per side. Returns the number of copies issued. host_segments may be reused
/// once this returns.
int64_t launch_gather_copy_engine(const memory::GatherSegment* host_segments, int32_t num_segments,
                                  int32_t row_bytes, int32_t page_size, std::byte* k_pool,
                                  std::byte* v_pool, cudaStream_t stream);
#endif

}  // namespace kvtier::kernels
