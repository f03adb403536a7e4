// GPU cluster cache: a pool of fixed-size pages (P rows of one KV head, K and V in twin pools)
// holding whole clusters recalled from the host tier, keyed by (sequence, layer, KV head, cluster).
// One cache per KV head group, never per query head. Policy:
//   - a lookup returns hits and the misses to fetch, and allocates the misses' pages;
//   - everything looked up in the current step is pinned until the step ends;
//   - retention R: a cluster used at step t is kept until step t + R unless memory is short;
//   - eviction takes clusters past retention first, least recently used first, and only then
//     (memory short) unpinned clusters still within retention, again LRU.
// With one R for all clusters, recency order and expiry order agree, so both rules are served by
// one LRU list; pressure evictions are counted separately. The same code runs with host pages
// (Backend::kCpu), so CI tests the policy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "memory/core/backend.h"
#include "memory/core/cuda_raii.h"
#include "memory/core/dtype.h"
#include "memory/tiered_store.h"

namespace kvtier::memory {

struct ClusterKey {
  SeqId seq = 0;
  int32_t layer = 0;
  int32_t kv_head = 0;
  int32_t cluster = 0;
  bool operator==(const ClusterKey& o) const {
    return seq == o.seq && layer == o.layer && kv_head == o.kv_head && cluster == o.cluster;
  }
};
struct ClusterKeyHash {
  size_t operator()(const ClusterKey& k) const {
    uint64_t h = static_cast<uint64_t>(k.seq) * 0x9E3779B97F4A7C15ull;
    h ^= (static_cast<uint64_t>(static_cast<uint32_t>(k.layer)) << 40) ^
         (static_cast<uint64_t>(static_cast<uint32_t>(k.kv_head)) << 20) ^
         static_cast<uint32_t>(k.cluster);
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ull;
    return static_cast<size_t>(h ^ (h >> 32));
  }
};

constexpr int32_t kDefaultPageSize = 16;

struct ClusterCacheConfig {
  Backend backend = Backend::kCpu;
  int device = 0;
  DType dtype = DType::kBF16;
  int32_t head_dim = 128;
  int32_t page_size = kDefaultPageSize;  ///< rows per page (P)
  int64_t num_pages = 0;                 ///< pool size in pages; if 0, derived from bytes_limit
  size_t bytes_limit = 0;                ///< K and V pools together, used when num_pages == 0
  int32_t retention_steps = 8;           ///< R
};

/// One cluster wanted in the current step, with its row count (whole clusters are cached).
struct CacheRequest {
  ClusterKey key;
  int32_t num_rows = 0;
};

/// Result of one lookup. Request i's rows live in pages page_ids[page_indptr[i] ..
/// page_indptr[i+1]), P rows each, in row order (the last page may be partly filled).
struct CacheLookup {
  std::vector<int32_t> page_indptr;  ///< [num_requests + 1]
  std::vector<int32_t> page_ids;
  std::vector<uint8_t> hit;         ///< [num_requests]; 0 = its pages must be fetched now
  std::vector<int32_t> misses;      ///< request indices to fetch (each distinct cluster once)
  std::vector<ClusterKey> evicted;  ///< clusters evicted to make room, in eviction order
  int64_t hit_rows = 0;
  int64_t miss_rows = 0;
};

/// Counters since construction.
struct CacheStats {
  int64_t lookups = 0;
  int64_t hits = 0;                ///< requests found cached
  int64_t misses = 0;              ///< requests that had to be fetched
  int64_t evictions = 0;           ///< clusters evicted (all reasons)
  int64_t pressure_evictions = 0;  ///< of those, still within retention (memory was short)
  int64_t bytes_fetched = 0;       ///< K+V bytes of the misses handed out to fetch
  int64_t admitted = 0;            ///< clusters placed by admit() (not counted as misses)
  int64_t num_entries = 0;
  int64_t pages_used = 0;
  int64_t num_pages = 0;
  double hit_rate() const { return hits + misses ? double(hits) / double(hits + misses) : 0.0; }
};

/// Thread-safe (one mutex). Pool memory: device memory for kCuda, host memory for kCpu.
class ClusterCache {
 public:
  explicit ClusterCache(const ClusterCacheConfig& config);
  ~ClusterCache();
  ClusterCache(const ClusterCache&) = delete;
  ClusterCache& operator=(const ClusterCache&) = delete;

  /// Starts step `step` (> the current one): the previous step's pins are released.
  void begin_step(int64_t step);
  int64_t step() const;

  /// Looks up `count` requests at the current step, pins all of them, and allocates pages for
  /// the misses (evicting as the policy says). If the misses cannot fit even after evicting every
  /// unpinned cluster, throws CapacityError and changes nothing.
  CacheLookup lookup(const CacheRequest* requests, size_t count);
  CacheLookup lookup(const std::vector<CacheRequest>& r) { return lookup(r.data(), r.size()); }
  /// Places clusters that the caller fills from elsewhere (a decode window's new clusters, copied
  /// from the window's rows on the device): a lookup in every other respect (used at the current
  /// step, LRU first), except that only clusters past retention make room (CapacityError,
  /// changing nothing, when free pages and those do not suffice), and counted as admissions, not
  /// as misses or fetched bytes. Requests already cached come back as hits.
  CacheLookup admit(const CacheRequest* requests, size_t count);

  /// Drops every cluster of `seq` (e.g. when the sequence is removed). Returns how many.
  size_t erase_sequence(SeqId seq);
  /// Drops the given clusters (those not cached are ignored): a caller that decided not to fill
  /// pages it was just given returns them. Returns how many were dropped.
  size_t erase(const ClusterKey* keys, size_t count);
  /// Frees every cluster past retention now. Returns how many.
  size_t release_expired();
  bool contains(const ClusterKey& key) const;
  CacheStats stats() const;

  // ---- pools ----
  Backend backend() const { return backend_; }
  int32_t page_size() const { return page_size_; }
  int64_t num_pages() const { return num_pages_; }
  size_t row_bytes() const { return row_bytes_; }
  /// Bytes of one page of one pool (K or V): page_size * row_bytes.
  size_t page_bytes() const { return page_bytes_; }
  /// [num_pages, page_size, head_dim] of dtype; device memory for kCuda.
  std::byte* k_pool() const { return k_pool_; }
  std::byte* v_pool() const { return v_pool_; }
  std::byte* k_page(int32_t page) const {
    return k_pool_ + static_cast<size_t>(page) * page_bytes_;
  }
  std::byte* v_page(int32_t page) const {
    return v_pool_ + static_cast<size_t>(page) * page_bytes_;
  }

 private:
  struct Entry {
    std::vector<int32_t> pages;
    int32_t num_rows = 0;
    int64_t last_used = 0;
    int64_t counted = -1;  // lookup serial that last counted this hit's pages
    std::list<ClusterKey>::iterator lru;
  };
  CacheLookup place(const CacheRequest* requests, size_t count, bool admission);
  void touch_locked(Entry& e);
  /// Past retention: last used more than R steps before the current one.
  bool expired_locked(const Entry& e) const { return e.last_used + retention_ < step_; }
  void evict_front_locked(std::vector<ClusterKey>* evicted);
  void free_entry_locked(std::unordered_map<ClusterKey, Entry, ClusterKeyHash>::iterator it);
  int32_t pages_for(int32_t rows) const { return (rows + page_size_ - 1) / page_size_; }

  const Backend backend_;
  const int32_t page_size_;
  const size_t row_bytes_;
  const size_t page_bytes_;
  const int32_t retention_;
  int64_t num_pages_ = 0;

  cuda::DeviceAllocation device_pool_;
  std::unique_ptr<std::byte[]> host_pool_;
  std::byte* k_pool_ = nullptr;
  std::byte* v_pool_ = nullptr;

  mutable std::mutex mu_;
  int64_t step_ = 0;
  int64_t pinned_pages_ = 0;  // pages of entries used at step_
  std::unordered_map<ClusterKey, Entry, ClusterKeyHash> entries_;
  std::list<ClusterKey> lru_;  // front = least recently used; ordered by last_used
  std::vector<int32_t> free_pages_;
  CacheStats stats_;
  // Scratch of lookup(), kept to avoid allocating per call (guarded by mu_).
  std::unordered_map<ClusterKey, size_t, ClusterKeyHash> scratch_first_miss_;
  int64_t lookup_serial_ = 0;
  std::vector<Entry*> scratch_placed_;
};

}  // namespace kvtier::memory
