// plan_fetch: cluster spans of the host tier, cut at host-page and cache-page boundaries.
#include "memory/fetch_plan.h"

#include <algorithm>

#include "memory/core/check.h"

namespace kvtier::memory {

void plan_fetch(const TieredStore& store, const CacheRequest* requests, const CacheLookup& lookup,
                int32_t page_size, HostAddress address, std::vector<GatherSegment>* out) {
  KVTIER_CHECK(out != nullptr, "plan_fetch: out is null");
  for (int32_t i : lookup.misses) {
    const CacheRequest& r = requests[i];
    const int32_t* pages = lookup.page_ids.data() + lookup.page_indptr[i];
    auto rows_mismatch = [&](int64_t cluster_rows) {
      return detail::str_cat("request for cluster ", r.key.cluster, " of sequence ", r.key.seq,
                             " layer ", r.key.layer, " kv_head ", r.key.kv_head, " says ",
                             r.num_rows, " rows; the cluster has ", cluster_rows);
    };
    int64_t first_slot = -1;  // the cluster's first slot: the first run starts there
    const ClusterSpan span = store.for_each_cluster_run(
        r.key.seq, r.key.layer, r.key.kv_head, r.key.cluster, [&](const RowRun& run) {
          if (first_slot < 0) first_slot = run.slot;
          int64_t row = run.slot - first_slot;  // row within the cluster
          // A cluster larger than the request would write past the request's pages.
          if (row + run.num_rows > r.num_rows)
            throw InvalidArgumentError("kvtier: " + rows_mismatch(row + run.num_rows) + " or more");
          const std::byte* k = address == HostAddress::kDevice ? run.k_device : run.k;
          const std::byte* v = address == HostAddress::kDevice ? run.v_device : run.v;
          KVTIER_CHECK(k != nullptr && v != nullptr, "plan_fetch: the rows of sequence ", r.key.seq,
                       " are not in pinned memory, so the GPU cannot read them (host arena: ",
                       store.arena().pin_note(), ")");
          int32_t done = 0;
          while (done < run.num_rows) {
            const int32_t dst_row = static_cast<int32_t>(row % page_size);
            const int32_t n = std::min(run.num_rows - done, page_size - dst_row);
            GatherSegment s;
            s.src_k = k + static_cast<size_t>(done) * store.row_bytes();
            s.src_v = v + static_cast<size_t>(done) * store.row_bytes();
            s.dst_page = pages[row / page_size];
            s.dst_row = dst_row;
            s.num_rows = n;
            out->push_back(s);
            done += n;
            row += n;
          }
        });
    KVTIER_CHECK(span.num_rows == r.num_rows, rows_mismatch(span.num_rows));
  }
}

int64_t plan_bytes(const std::vector<GatherSegment>& plan, size_t row_bytes) {
  int64_t rows = 0;
  for (const GatherSegment& s : plan) rows += s.num_rows;
  return rows * static_cast<int64_t>(2 * row_bytes);
}

}  // namespace kvtier::memory
