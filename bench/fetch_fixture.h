// A host tier filled with clustered KV rows and a cluster cache, shared by the fetch benchmark
// and the demo: one sequence, one layer per cluster size, every cluster exactly `rows` rows,
// stored cluster-contiguously with clusters in shuffled token order.
#pragma once

#include <algorithm>
#include <memory>
#include <random>
#include <vector>

#include "memory/cluster_cache.h"
#include "memory/fetch_plan.h"
#include "memory/tiered_store.h"

namespace kvtier::bench {

struct FetchWorkload {
  std::unique_ptr<memory::TieredStore> store;
  std::vector<int32_t> cluster_rows;  ///< one layer per entry
  int64_t rows_per_head = 0;
  int32_t num_kv_heads = 0;
};

/// Fills layer l with clusters of cluster_rows[l] rows each (rows_per_head / size clusters).
inline FetchWorkload make_fetch_workload(const std::vector<int32_t>& cluster_rows,
                                         int64_t rows_per_head, int32_t num_kv_heads,
                                         int32_t head_dim, DType dtype, uint64_t seed) {
  FetchWorkload w;
  w.cluster_rows = cluster_rows;
  w.rows_per_head = rows_per_head;
  w.num_kv_heads = num_kv_heads;
  memory::TieredStoreConfig sc;
  sc.shape = {static_cast<int32_t>(cluster_rows.size()), num_kv_heads, head_dim, dtype};
  const size_t bytes =
      2 * sc.shape.row_bytes() * rows_per_head * num_kv_heads * cluster_rows.size();
  sc.host.bytes_limit = bytes + bytes / 8 + (64 << 20);
  w.store = std::make_unique<memory::TieredStore>(sc);
  w.store->add_sequence(0);
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> data(sc.shape.row_bytes() * rows_per_head * num_kv_heads / 8);
  for (size_t l = 0; l < cluster_rows.size(); ++l) {
    for (auto& x : data) x = rng();
    memory::KvRows r{data.data(), data.data(), dtype, num_kv_heads, head_dim, rows_per_head};
    w.store->append(0, static_cast<int32_t>(l), r);
    const int32_t size = cluster_rows[l];
    const int32_t k = static_cast<int32_t>(rows_per_head / size);
    std::vector<int32_t> labels(static_cast<size_t>(rows_per_head));
    for (int64_t i = 0; i < rows_per_head; ++i)
      labels[i] = static_cast<int32_t>(std::min<int64_t>(i / size, k - 1));
    for (int32_t h = 0; h < num_kv_heads; ++h) {
      std::shuffle(labels.begin(), labels.end(), rng);
      w.store->cluster(0, static_cast<int32_t>(l), h, 0, rows_per_head, labels.data(), k);
    }
  }
  return w;
}

/// A random selection of whole clusters of layer `layer`, all heads, totalling about `rows`.
inline std::vector<memory::CacheRequest> random_selection(const FetchWorkload& w, int32_t layer,
                                                          int64_t rows, std::mt19937_64& rng) {
  std::vector<memory::CacheRequest> all;
  for (int32_t h = 0; h < w.num_kv_heads; ++h) {
    const int32_t n = w.store->layout(0, layer, h).num_clusters;
    for (int32_t c = 0; c < n; ++c)
      all.push_back({{0, layer, h, c}, w.store->cluster_span(0, layer, h, c).num_rows});
  }
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<memory::CacheRequest> out;
  int64_t got = 0;
  for (const auto& r : all) {
    if (got >= rows) break;
    out.push_back(r);
    got += r.num_rows;
  }
  return out;
}

}  // namespace kvtier::bench
