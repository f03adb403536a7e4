// CPU reference of the fetch gather: one memcpy per segment side.
#include <cstring>

#include "kernels/kv_gather.h"
#include "memory/core/check.h"

namespace kvtier::kernels {

void check_gather_params(const GatherParams& p) {
  KVTIER_CHECK(p.num_segments >= 0, "num_segments must be >= 0, got ", p.num_segments);
  KVTIER_CHECK(p.num_segments == 0 || p.segments != nullptr, "segments is null");
  KVTIER_CHECK(p.row_bytes > 0 && p.row_bytes % 16 == 0, "row_bytes ", p.row_bytes,
               " must be a positive multiple of 16");
  KVTIER_CHECK(p.page_size > 0, "page_size must be > 0, got ", p.page_size);
  KVTIER_CHECK(p.k_pool != nullptr && p.v_pool != nullptr, "k_pool and v_pool must not be null");
}

void gather_ref(const GatherParams& p) {
  check_gather_params(p);
  const size_t page_bytes = static_cast<size_t>(p.page_size) * p.row_bytes;
  for (int32_t i = 0; i < p.num_segments; ++i) {
    const memory::GatherSegment& s = p.segments[i];
    KVTIER_CHECK(s.dst_row >= 0 && s.num_rows >= 0 && s.dst_row + s.num_rows <= p.page_size,
                 "segment ", i, " rows [", s.dst_row, ", ", s.dst_row + s.num_rows,
                 ") do not fit a page of ", p.page_size, " rows");
    const size_t off =
        static_cast<size_t>(s.dst_page) * page_bytes + static_cast<size_t>(s.dst_row) * p.row_bytes;
    const size_t bytes = static_cast<size_t>(s.num_rows) * p.row_bytes;
    std::memcpy(p.k_pool + off, s.src_k, bytes);
    std::memcpy(p.v_pool + off, s.src_v, bytes);
  }
}

}  // namespace kvtier::kernels
