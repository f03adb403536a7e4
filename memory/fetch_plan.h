// The plan of a fetch: which host rows go into which cache page rows. A lookup's misses become
// GatherSegments, each a run of rows that is contiguous in the host tier and lands in one cache
// page. kernels/kv_gather executes a plan (GPU kernel, copy engine, or CPU reference).
#pragma once

#include <cstdint>
#include <vector>

#include "memory/cluster_cache.h"
#include "memory/tiered_store.h"

namespace kvtier::memory {

/// Rows [0, num_rows) at src_k / src_v go to rows [dst_row, dst_row + num_rows) of cache page
/// dst_page. num_rows <= page_size - dst_row. 32 bytes, 16-byte aligned.
struct alignas(16) GatherSegment {
  const void* src_k = nullptr;
  const void* src_v = nullptr;
  int32_t dst_page = 0;
  int32_t dst_row = 0;
  int32_t num_rows = 0;
  int32_t reserved = 0;
};
static_assert(sizeof(GatherSegment) == 32, "GatherSegment is shared with device code");

/// Which address of the host rows a plan carries: host pointers (CPU reference, copy engine) or
/// mapped device pointers (the GPU gather kernel).
enum class HostAddress : uint8_t { kHost, kDevice };

/// Appends to `out` the segments that fetch every miss of `lookup` from `store` into the cache
/// pages the lookup assigned. Throws InvalidArgumentError if a request's row count differs from
/// its cluster's, and if kDevice is asked for rows that are not in pinned memory.
void plan_fetch(const TieredStore& store, const CacheRequest* requests, const CacheLookup& lookup,
                int32_t page_size, HostAddress address, std::vector<GatherSegment>* out);

/// Bytes a plan moves (K and V).
int64_t plan_bytes(const std::vector<GatherSegment>& plan, size_t row_bytes);

}  // namespace kvtier::memory
