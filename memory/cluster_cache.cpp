// ClusterCache: page pool, (seq, layer, head, cluster) -> pages map, retention + LRU eviction.
#include "memory/cluster_cache.h"

#include <algorithm>
#include <unordered_set>

#include "memory/core/check.h"

namespace kvtier::memory {

ClusterCache::ClusterCache(const ClusterCacheConfig& c)
    : backend_(c.backend),
      page_size_(c.page_size),
      row_bytes_(kv_row_bytes(c.dtype, c.head_dim)),
      page_bytes_(static_cast<size_t>(c.page_size) * kv_row_bytes(c.dtype, c.head_dim)),
      retention_(c.retention_steps) {
  check_kv_row_shape(c.dtype, c.head_dim);
  KVTIER_CHECK(c.page_size > 0, "page_size must be > 0, got ", c.page_size);
  KVTIER_CHECK(c.retention_steps >= 0, "retention_steps must be >= 0, got ", c.retention_steps);
  num_pages_ =
      c.num_pages > 0 ? c.num_pages : static_cast<int64_t>(c.bytes_limit / (2 * page_bytes_));
  KVTIER_CHECK(num_pages_ > 0, "cluster cache needs at least one page: num_pages ", c.num_pages,
               ", bytes_limit ", c.bytes_limit, " (a page of K and V is ", 2 * page_bytes_,
               " bytes)");
  KVTIER_CHECK(num_pages_ <= INT32_MAX, "cluster cache num_pages ", num_pages_, " is too large");
  const size_t pool_bytes = static_cast<size_t>(num_pages_) * page_bytes_;
  if (backend_ == Backend::kCuda) {
    device_pool_ = cuda::DeviceAllocation(2 * pool_bytes, c.device);
    k_pool_ = static_cast<std::byte*>(device_pool_.get());
  } else {
    host_pool_.reset(new std::byte[2 * pool_bytes]);
    k_pool_ = host_pool_.get();
  }
  v_pool_ = k_pool_ + pool_bytes;
  free_pages_.reserve(static_cast<size_t>(num_pages_));
  for (int64_t p = num_pages_; p-- > 0;) free_pages_.push_back(static_cast<int32_t>(p));
  stats_.num_pages = num_pages_;
}

ClusterCache::~ClusterCache() = default;

void ClusterCache::begin_step(int64_t step) {
  std::lock_guard<std::mutex> lock(mu_);
  KVTIER_CHECK(step > step_, "begin_step(", step, "): steps must increase (current step ", step_,
               ")");
  step_ = step;
  pinned_pages_ = 0;
}

int64_t ClusterCache::step() const {
  std::lock_guard<std::mutex> lock(mu_);
  return step_;
}

void ClusterCache::touch_locked(Entry& e) {
  if (e.last_used != step_) pinned_pages_ += static_cast<int64_t>(e.pages.size());
  e.last_used = step_;
  lru_.splice(lru_.end(), lru_, e.lru);
}

void ClusterCache::free_entry_locked(
    std::unordered_map<ClusterKey, Entry, ClusterKeyHash>::iterator it) {
  Entry& e = it->second;
  if (e.last_used == step_) pinned_pages_ -= static_cast<int64_t>(e.pages.size());
  free_pages_.insert(free_pages_.end(), e.pages.rbegin(), e.pages.rend());
  lru_.erase(e.lru);
  entries_.erase(it);
}

void ClusterCache::evict_front_locked(std::vector<ClusterKey>* evicted) {
  KVTIER_ASSERT(!lru_.empty());
  auto it = entries_.find(lru_.front());
  KVTIER_ASSERT(it != entries_.end());
  // Pinned entries sit at the back (largest last_used), so the front is unpinned whenever any
  // entry is; lookup() checked that enough unpinned pages exist.
  KVTIER_ASSERT(it->second.last_used < step_);
  const bool within_retention = !expired_locked(it->second);
  ++stats_.evictions;
  if (within_retention) ++stats_.pressure_evictions;
  evicted->push_back(it->first);
  free_entry_locked(it);
}

CacheLookup ClusterCache::lookup(const CacheRequest* requests, size_t count) {
  return place(requests, count, /*admission=*/false);
}

CacheLookup ClusterCache::admit(const CacheRequest* requests, size_t count) {
  return place(requests, count, /*admission=*/true);
}

CacheLookup ClusterCache::place(const CacheRequest* requests, size_t count, bool admission) {
  KVTIER_CHECK(count == 0 || requests != nullptr, "lookup: requests is null");
  for (size_t i = 0; i < count; ++i) {
    KVTIER_CHECK(requests[i].num_rows > 0, "lookup: request ", i, " (sequence ",
                 requests[i].key.seq, " cluster ", requests[i].key.cluster, ") has num_rows ",
                 requests[i].num_rows, "; must be > 0");
  }
  std::lock_guard<std::mutex> lock(mu_);

  // Pass 1, read-only: classify, count the pages the misses need and the pages eviction may free.
  // The scratch containers are members, cleared here, so a lookup allocates nothing once warm.
  auto& first_miss = scratch_first_miss_;  // key -> request index
  auto& placed = scratch_placed_;          // request -> its entry (hits now, misses once placed)
  first_miss.clear();
  ++lookup_serial_;  // marks the hits already counted by this lookup (no set of keys)
  placed.assign(count, nullptr);
  int64_t need_pages = 0, hit_unpinned_pages = 0;
  for (size_t i = 0; i < count; ++i) {
    const CacheRequest& r = requests[i];
    auto it = entries_.find(r.key);
    if (it != entries_.end()) {
      KVTIER_CHECK(it->second.num_rows == r.num_rows, "lookup: cluster ", r.key.cluster,
                   " of sequence ", r.key.seq, " layer ", r.key.layer, " kv_head ", r.key.kv_head,
                   " is cached with ", it->second.num_rows, " rows but requested with ",
                   r.num_rows);
      placed[i] = &it->second;  // entries are node-based: the pointer survives later inserts
      if (it->second.last_used != step_ && it->second.counted != lookup_serial_) {
        it->second.counted = lookup_serial_;
        hit_unpinned_pages += static_cast<int64_t>(it->second.pages.size());
      }
    } else {
      auto [m, fresh] = first_miss.emplace(r.key, i);
      if (fresh) {
        need_pages += pages_for(r.num_rows);
      } else {
        KVTIER_CHECK(requests[m->second].num_rows == r.num_rows, "lookup: cluster ", r.key.cluster,
                     " of sequence ", r.key.seq, " is requested twice with different row counts");
      }
    }
  }
  const int64_t used = num_pages_ - static_cast<int64_t>(free_pages_.size());
  int64_t evictable = used - pinned_pages_ - hit_unpinned_pages;
  const int64_t free_now = static_cast<int64_t>(free_pages_.size());
  if (admission && need_pages > free_now) {
    // Only clusters past retention make room (LRU order is expiry order).
    evictable = 0;
    for (const ClusterKey& k : lru_) {
      const Entry& e = entries_.find(k)->second;
      if (!expired_locked(e) || e.counted == lookup_serial_) break;
      evictable += static_cast<int64_t>(e.pages.size());
      if (free_now + evictable >= need_pages) break;
    }
  }
  const int64_t available = free_now + evictable;
  if (admission && need_pages > available) {
    throw CapacityError(
        "kvtier: cluster cache: no room for the admitted clusters without "
        "evicting clusters within retention");
  }
  if (need_pages > available) {
    throw CapacityError(
        detail::str_cat("kvtier: cluster cache of ", num_pages_, " pages (", page_size_,
                        " rows each) is smaller than this step's selection: the misses need ",
                        need_pages, " pages, ", free_pages_.size(), " are free and ", evictable,
                        " evictable; ", pinned_pages_ + hit_unpinned_pages, " are pinned by step ",
                        step_, ". Raise the cache size or lower the budget."));
  }

  // Pass 2: pin the hits, then place the misses.
  CacheLookup out;
  out.page_indptr.assign(count + 1, 0);
  out.hit.assign(count, 0);
  for (size_t i = 0; i < count; ++i) {
    if (placed[i] == nullptr) continue;
    touch_locked(*placed[i]);  // pinned now, so evicting for the misses cannot take it
    out.hit[i] = 1;
  }
  for (size_t i = 0; i < count; ++i) {
    if (placed[i] != nullptr) continue;
    const CacheRequest& r = requests[i];
    auto m = first_miss.find(r.key);
    if (m->second != i) continue;  // a repeat of an earlier miss: filled in below
    const int32_t n = pages_for(r.num_rows);
    while (static_cast<int32_t>(free_pages_.size()) < n) evict_front_locked(&out.evicted);
    Entry e;
    e.num_rows = r.num_rows;
    e.pages.assign(free_pages_.end() - n, free_pages_.end());
    std::reverse(e.pages.begin(), e.pages.end());
    free_pages_.resize(free_pages_.size() - n);
    e.last_used = step_;
    pinned_pages_ += n;
    e.lru = lru_.insert(lru_.end(), r.key);
    placed[i] = &entries_.emplace(r.key, std::move(e)).first->second;
    out.misses.push_back(static_cast<int32_t>(i));
    out.miss_rows += r.num_rows;
    if (!admission) stats_.bytes_fetched += static_cast<int64_t>(2 * row_bytes_) * r.num_rows;
  }
  for (size_t i = 0; i < count; ++i) {
    if (placed[i] == nullptr) {  // repeat of a miss: it shares the first request's pages
      placed[i] = &entries_.find(requests[i].key)->second;
      out.hit[i] = 1;
    }
    if (out.hit[i]) out.hit_rows += requests[i].num_rows;
    out.page_indptr[i + 1] = out.page_indptr[i] + static_cast<int32_t>(placed[i]->pages.size());
  }
  out.page_ids.reserve(static_cast<size_t>(out.page_indptr[count]));
  for (size_t i = 0; i < count; ++i)
    out.page_ids.insert(out.page_ids.end(), placed[i]->pages.begin(), placed[i]->pages.end());

  if (admission) {
    stats_.admitted += static_cast<int64_t>(out.misses.size());
    return out;
  }
  ++stats_.lookups;
  stats_.misses += static_cast<int64_t>(out.misses.size());
  stats_.hits += static_cast<int64_t>(count - out.misses.size());
  return out;
}

size_t ClusterCache::erase_sequence(SeqId seq) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (auto it = entries_.begin(); it != entries_.end();) {
    auto next = std::next(it);
    if (it->first.seq == seq) {
      free_entry_locked(it);
      ++n;
    }
    it = next;
  }
  return n;
}

size_t ClusterCache::erase(const ClusterKey* keys, size_t count) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (size_t i = 0; i < count; ++i) {
    auto it = entries_.find(keys[i]);
    if (it == entries_.end()) continue;
    free_entry_locked(it);
    ++n;
  }
  return n;
}

size_t ClusterCache::release_expired() {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  while (!lru_.empty()) {
    auto it = entries_.find(lru_.front());
    if (!expired_locked(it->second)) break;  // LRU order == expiry order
    ++stats_.evictions;
    free_entry_locked(it);
    ++n;
  }
  return n;
}

bool ClusterCache::contains(const ClusterKey& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_.count(key) != 0;
}

CacheStats ClusterCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  CacheStats s = stats_;
  s.num_entries = static_cast<int64_t>(entries_.size());
  s.pages_used = num_pages_ - static_cast<int64_t>(free_pages_.size());
  return s;
}

}  // namespace kvtier::memory
