// Device code of the fetch gather. Included by kv_gather.cu and GPU tests.
#pragma once

#include <cuda_runtime.h>

#include "kernels/kv_gather.h"

namespace kvtier::kernels {

/// Grid: warps stride over segments (warp w of the grid takes segments w, w + num_warps, ...).
/// Within a segment, lane l moves the 16-byte vectors l, l + 32, ... of K then V; kUnroll loads
/// are issued before the first store so many PCIe reads are in flight per warp (a read of mapped
/// host memory takes ~1-2 us; 55 GB/s needs ~100 KB in flight across the GPU).
template <int kUnroll>
__global__ void __launch_bounds__(256) gather_segments_kernel(GatherParams p) {
  const int lane = threadIdx.x & 31;
  const int warps_per_block = blockDim.x >> 5;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * warps_per_block;
  const size_t page_bytes = static_cast<size_t>(p.page_size) * p.row_bytes;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * warps_per_block + (threadIdx.x >> 5);
       i < p.num_segments; i += num_warps) {
    const memory::GatherSegment s = p.segments[i];
    const int nvec = s.num_rows * (p.row_bytes / 16);  // per side
    const int4* __restrict__ src_k = static_cast<const int4*>(s.src_k);
    const int4* __restrict__ src_v = static_cast<const int4*>(s.src_v);
    const size_t dst_off =
        static_cast<size_t>(s.dst_page) * page_bytes + static_cast<size_t>(s.dst_row) * p.row_bytes;
    int4* __restrict__ dst_k = reinterpret_cast<int4*>(p.k_pool + dst_off);
    int4* __restrict__ dst_v = reinterpret_cast<int4*>(p.v_pool + dst_off);
    for (int base = lane; base < 2 * nvec; base += 32 * kUnroll) {
      int4 r[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = base + u * 32;
        if (j < nvec) {
          r[u] = src_k[j];
        } else if (j < 2 * nvec) {
          r[u] = src_v[j - nvec];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = base + u * 32;
        if (j < nvec) {
          dst_k[j] = r[u];
        } else if (j < 2 * nvec) {
          dst_v[j - nvec] = r[u];
        }
      }
    }
  }
}

}  // namespace kvtier::kernels
