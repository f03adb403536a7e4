// ClusterCache: the policy against a small reference model, capacity errors, and the round trip
// host store -> cache (CPU gather reference) -> host.
#include "memory/cluster_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>

#include "kernels/kv_gather.h"
#include "memory/fetch_plan.h"
#include "tests/common/test_util.h"

namespace kvtier::memory {
namespace {

ClusterCacheConfig cache_config(int64_t pages, int32_t page_size = 16, int32_t retention = 2) {
  ClusterCacheConfig c;
  c.backend = Backend::kCpu;
  c.dtype = DType::kBF16;
  c.head_dim = 64;
  c.page_size = page_size;
  c.num_pages = pages;
  c.retention_steps = retention;
  return c;
}

/// The policy, written the obvious way: a list of entries, linear scans.
/// Evict: among unpinned entries, the expired one (last_used + R < now) used least recently;
/// if none is expired, the unpinned one used least recently. Recency = order of last touch.
class ReferenceCache {
 public:
  ReferenceCache(int64_t pages, int32_t page_size, int32_t retention)
      : free_(pages), page_size_(page_size), retention_(retention) {}
  void begin_step(int64_t s) { now_ = s; }

  struct Result {
    std::vector<uint8_t> hit;
    std::vector<ClusterKey> evicted;
    bool capacity_error = false;
  };
  Result lookup(const std::vector<CacheRequest>& reqs) {
    Result r;
    // Capacity: pages of distinct misses vs free + pages of entries neither pinned nor requested.
    int64_t need = 0, evictable = 0;
    std::vector<ClusterKey> seen;
    for (const auto& q : reqs) {
      if (find(q.key) == nullptr && std::find(seen.begin(), seen.end(), q.key) == seen.end()) {
        need += pages(q.num_rows);
        seen.push_back(q.key);
      }
    }
    for (const auto& e : entries_) {
      bool requested = false;
      for (const auto& q : reqs) requested = requested || q.key == e.key;
      if (e.last_used != now_ && !requested) evictable += pages(e.rows);
    }
    if (need > free_ + evictable) {
      r.capacity_error = true;
      return r;
    }
    for (const auto& q : reqs)
      if (Entry* e = find(q.key)) touch(*e);
    std::vector<ClusterKey> fetched;
    for (const auto& q : reqs) {
      if (find(q.key) != nullptr) {
        r.hit.push_back(1);
        continue;
      }
      while (free_ < pages(q.num_rows)) r.evicted.push_back(evict_one());
      free_ -= pages(q.num_rows);
      entries_.push_back({q.key, q.num_rows, now_, ++clock_});
      r.hit.push_back(0);
    }
    return r;
  }

 private:
  struct Entry {
    ClusterKey key;
    int32_t rows;
    int64_t last_used;
    int64_t touched;
  };
  int64_t pages(int32_t rows) const { return (rows + page_size_ - 1) / page_size_; }
  Entry* find(const ClusterKey& k) {
    for (auto& e : entries_)
      if (e.key == k) return &e;
    return nullptr;
  }
  void touch(Entry& e) {
    e.last_used = now_;
    e.touched = ++clock_;
  }
  ClusterKey evict_one() {
    int best = -1;
    for (int pass = 0; pass < 2 && best < 0; ++pass) {
      for (int i = 0; i < static_cast<int>(entries_.size()); ++i) {
        const Entry& e = entries_[i];
        if (e.last_used == now_) continue;                            // pinned
        if (pass == 0 && e.last_used + retention_ >= now_) continue;  // still retained
        if (best < 0 || e.touched < entries_[best].touched) best = i;
      }
    }
    EXPECT_GE(best, 0);
    const ClusterKey k = entries_[best].key;
    free_ += pages(entries_[best].rows);
    entries_.erase(entries_.begin() + best);
    return k;
  }
  std::vector<Entry> entries_;
  int64_t free_;
  int32_t page_size_;
  int32_t retention_;
  int64_t now_ = 0;
  int64_t clock_ = 0;
};

TEST(ClusterCache, MatchesReferencePolicyOnRandomTraces) {
  for (int trial = 0; trial < 20; ++trial) {
    std::mt19937_64 rng(test::test_seed() * 31 + trial);
    const int64_t pages = 8 + rng() % 40;
    const int32_t page_size = 1 + static_cast<int32_t>(rng() % 16);
    const int32_t retention = static_cast<int32_t>(rng() % 5);
    ClusterCache cache(cache_config(pages, page_size, retention));
    ReferenceCache ref(pages, page_size, retention);
    std::map<int32_t, int32_t> rows_of;  // cluster id -> rows (fixed per cluster)
    int64_t hits = 0, misses = 0, evictions = 0;
    for (int64_t step = 1; step <= 60; ++step) {
      cache.begin_step(step);
      ref.begin_step(step);
      const int nlookups = 1 + static_cast<int>(rng() % 3);  // e.g. several layers per step
      for (int l = 0; l < nlookups; ++l) {
        std::vector<CacheRequest> reqs;
        const int n = 1 + static_cast<int>(rng() % 5);
        for (int i = 0; i < n; ++i) {
          // Drifting working set: clusters near step/2, so some recur and some are new.
          const int32_t c = static_cast<int32_t>(step / 2 + rng() % 12);
          if (!rows_of.count(c)) rows_of[c] = 1 + static_cast<int32_t>(rng() % (2 * page_size + 3));
          reqs.push_back({{static_cast<SeqId>(c % 3), l, c % 2, c}, rows_of[c]});
        }
        const auto want = ref.lookup(reqs);
        if (want.capacity_error) {
          const CacheStats before = cache.stats();
          EXPECT_THROW(cache.lookup(reqs), CapacityError) << "trial " << trial << " step " << step;
          const CacheStats after = cache.stats();
          EXPECT_EQ(before.pages_used, after.pages_used);
          EXPECT_EQ(before.num_entries, after.num_entries);
          continue;
        }
        const CacheLookup got = cache.lookup(reqs);
        ASSERT_EQ(got.hit, want.hit) << "trial " << trial << " step " << step;
        ASSERT_EQ(got.evicted.size(), want.evicted.size()) << "trial " << trial << " step " << step;
        for (size_t i = 0; i < want.evicted.size(); ++i)
          EXPECT_TRUE(got.evicted[i] == want.evicted[i]) << "trial " << trial << " step " << step;
        for (uint8_t h : got.hit) (h ? hits : misses)++;
        evictions += static_cast<int64_t>(got.evicted.size());
        // Every request's pages hold enough rows and no page is shared between clusters.
        std::vector<int32_t> all(got.page_ids);
        for (size_t i = 0; i < reqs.size(); ++i)
          EXPECT_EQ(got.page_indptr[i + 1] - got.page_indptr[i],
                    (reqs[i].num_rows + page_size - 1) / page_size);
        std::sort(all.begin(), all.end());
        std::vector<int32_t> uniq(all);
        uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
        for (int32_t p : uniq) EXPECT_TRUE(p >= 0 && p < pages);
      }
    }
    const CacheStats s = cache.stats();
    EXPECT_EQ(s.hits, hits);
    EXPECT_EQ(s.misses, misses);
    EXPECT_EQ(s.evictions, evictions);
    EXPECT_LE(s.pages_used, pages);
  }
}

TEST(ClusterCache, RetentionThenLruThenPressure) {
  // 4 pages of 16 rows; one page per cluster; R = 2.
  ClusterCache cache(cache_config(4, 16, 2));
  auto req = [](int32_t c) { return CacheRequest{{0, 0, 0, c}, 16}; };
  cache.begin_step(1);
  auto r = cache.lookup({req(0), req(1)});
  EXPECT_EQ(r.misses.size(), 2u);
  cache.begin_step(2);
  r = cache.lookup({req(2), req(3)});
  EXPECT_EQ(r.misses.size(), 2u);
  EXPECT_TRUE(r.evicted.empty());
  cache.begin_step(3);
  r = cache.lookup({req(1)});  // hit: 1 is now more recent than 0
  EXPECT_EQ(r.hit[0], 1);
  cache.begin_step(4);  // 0 used at 1, expired (1 + 2 < 4); 2, 3 retained; 1 retained
  r = cache.lookup({req(4)});
  ASSERT_EQ(r.evicted.size(), 1u);
  EXPECT_EQ(r.evicted[0].cluster, 0);
  EXPECT_EQ(cache.stats().pressure_evictions, 0);
  // At step 5, 2 and 3 (used at 2) are expired, 1 and 4 are not: the expired go, LRU first.
  cache.begin_step(5);
  r = cache.lookup({req(5), req(6)});
  ASSERT_EQ(r.evicted.size(), 2u);
  EXPECT_EQ(r.evicted[0].cluster, 2);
  EXPECT_EQ(r.evicted[1].cluster, 3);
  EXPECT_EQ(cache.stats().pressure_evictions, 0);
  // Step 6: 1 (used at 3) is expired, 4 (used at 4) is not. Two pages are needed: 1 goes first,
  // then memory is short and 4, the least recently used unpinned cluster, goes too, counted as a
  // pressure eviction.
  cache.begin_step(6);
  r = cache.lookup({req(7), req(8)});
  ASSERT_EQ(r.evicted.size(), 2u);
  EXPECT_EQ(r.evicted[0].cluster, 1);
  EXPECT_EQ(r.evicted[1].cluster, 4);
  EXPECT_EQ(cache.stats().pressure_evictions, 1);
  // Pin the other two: all four pages are pinned by this step, so one more cluster cannot fit,
  // and the failed lookup changes nothing.
  r = cache.lookup({req(5), req(6)});
  EXPECT_EQ(r.misses.size(), 0u);
  const CacheStats before = cache.stats();
  try {
    cache.lookup({req(9)});
    FAIL() << "no CapacityError";
  } catch (const CapacityError& e) {
    EXPECT_NE(std::string(e.what()).find("smaller than this step's selection"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(cache.stats().num_entries, before.num_entries);
  EXPECT_TRUE(cache.contains({0, 0, 0, 7}));
  // release_expired frees nothing retained; later it frees everything.
  EXPECT_EQ(cache.release_expired(), 0u);
  cache.begin_step(100);
  EXPECT_EQ(cache.release_expired(), 4u);
  EXPECT_EQ(cache.stats().pages_used, 0);
}

// admit() places clusters the caller fills itself: pinned and retained like a lookup's misses,
// counted as admissions (not misses, not fetched bytes); a later lookup finds them; a cluster
// already cached comes back as a hit; when nothing can be evicted it throws and changes nothing.
TEST(ClusterCache, AdmittedClustersAreFoundByLaterLookups) {
  ClusterCache cache(cache_config(4, 16, 2));
  auto req = [](int32_t c) { return CacheRequest{{0, 0, 0, c}, 16}; };
  cache.begin_step(1);
  const CacheRequest two[] = {req(0), req(1)};
  CacheLookup r = cache.admit(two, 2);
  EXPECT_EQ(r.misses, (std::vector<int32_t>{0, 1}));  // pages for the caller to fill
  EXPECT_EQ(r.page_indptr.back(), 2);
  CacheStats s = cache.stats();
  EXPECT_EQ(s.admitted, 2);
  EXPECT_EQ(s.misses, 0);
  EXPECT_EQ(s.lookups, 0);
  EXPECT_EQ(s.bytes_fetched, 0);
  EXPECT_EQ(s.pages_used, 2);
  cache.begin_step(2);
  r = cache.lookup({req(0)});
  EXPECT_EQ(r.hit[0], 1);
  EXPECT_EQ(cache.stats().hits, 1);
  const CacheRequest cached[] = {req(1)};
  r = cache.admit(cached, 1);
  EXPECT_EQ(r.hit[0], 1);
  EXPECT_TRUE(r.misses.empty());
  EXPECT_EQ(cache.stats().admitted, 2);
  // Both pinned by step 2, two more fill the pool; a fifth cannot be placed.
  const CacheRequest more[] = {req(2), req(3)};
  EXPECT_EQ(cache.admit(more, 2).misses.size(), 2u);
  const CacheRequest fifth[] = {req(4)};
  EXPECT_THROW(cache.admit(fifth, 1), CapacityError);
  EXPECT_EQ(cache.stats().admitted, 4);
  EXPECT_FALSE(cache.contains(req(4).key));
  // Step 3: nothing pinned, all within retention (used at 2, R = 2). An admission does not evict
  // them; a lookup does (memory is short).
  cache.begin_step(3);
  EXPECT_THROW(cache.admit(fifth, 1), CapacityError);
  EXPECT_EQ(cache.stats().evictions, 0);
  EXPECT_EQ(cache.lookup({req(4)}).evicted.size(), 1u);
  EXPECT_EQ(cache.stats().pressure_evictions, 1);
  // Step 10: all expired; an admission evicts the least recently used.
  cache.begin_step(10);
  const CacheRequest sixth[] = {req(5)};
  r = cache.admit(sixth, 1);
  ASSERT_EQ(r.evicted.size(), 1u);
  EXPECT_EQ(cache.stats().pressure_evictions, 1);
  EXPECT_EQ(cache.stats().admitted, 5);
}

TEST(ClusterCache, RepeatsEraseAndErrors) {
  ClusterCache cache(cache_config(10, 4, 1));
  cache.begin_step(1);
  CacheRequest a{{1, 0, 0, 5}, 9};  // 3 pages
  CacheRequest b{{2, 0, 0, 5}, 1};  // same cluster id, other sequence
  auto r = cache.lookup({a, a, b});
  EXPECT_EQ(r.misses, (std::vector<int32_t>{0, 2}));
  // The repeat shares the first request's pages.
  EXPECT_TRUE(std::equal(r.page_ids.begin() + r.page_indptr[0],
                         r.page_ids.begin() + r.page_indptr[1],
                         r.page_ids.begin() + r.page_indptr[1]));
  EXPECT_EQ(cache.stats().pages_used, 4);
  CacheRequest wrong = a;
  wrong.num_rows = 10;
  EXPECT_THROW(cache.lookup({wrong}), InvalidArgumentError);
  CacheRequest zero = a;
  zero.num_rows = 0;
  EXPECT_THROW(cache.lookup({zero}), InvalidArgumentError);
  EXPECT_THROW(cache.begin_step(1), InvalidArgumentError);
  EXPECT_EQ(cache.erase_sequence(1), 1u);
  EXPECT_EQ(cache.stats().pages_used, 1);
  EXPECT_FALSE(cache.contains(a.key));
  // erase() returns pages: b's page is free again, and unknown keys are ignored.
  const ClusterKey gone[] = {b.key, a.key};
  EXPECT_EQ(cache.erase(gone, 2), 1u);
  EXPECT_EQ(cache.stats().pages_used, 0);
  EXPECT_FALSE(cache.contains(b.key));
  ClusterCacheConfig bad = cache_config(0);
  EXPECT_THROW(ClusterCache{bad}, InvalidArgumentError);
  bad = cache_config(4);
  bad.head_dim = 80;
  EXPECT_THROW(ClusterCache{bad}, InvalidArgumentError);
}

// ---- round trip: host store -> cache -> host, bitwise ----

class CacheRoundTrip : public ::testing::TestWithParam<std::tuple<int32_t, int>> {};

TEST_P(CacheRoundTrip, FetchedPagesEqualStoreRows) {
  const auto [page_size, head_dim] = GetParam();
  TieredStoreConfig sc;
  sc.shape = {2, 2, head_dim, DType::kBF16};
  sc.host.bytes_limit = 64 << 20;
  sc.host.page_bytes = 4096;  // so clusters straddle host pages
  TieredStore store(sc);
  std::mt19937_64 rng(test::test_seed() + page_size * 7 + head_dim);
  const size_t rb = store.row_bytes();
  // Cluster sizes at awkward values around the cache page size.
  std::vector<int32_t> sizes = {1, page_size - 1, page_size, page_size + 1, 2, 3, 5, 13, 31, 97};
  sizes.erase(std::remove(sizes.begin(), sizes.end(), 0), sizes.end());
  int64_t n = 0;
  for (int32_t s : sizes) n += s;
  const int64_t sinks = 3;
  store.add_sequence(11);
  for (int32_t l = 0; l < 2; ++l) {
    std::vector<std::byte> k = test::random_bytes(rb * (n + sinks) * 2, rng),
                           v = test::random_bytes(k.size(), rng);
    store.append(11, l, KvRows{k.data(), v.data(), DType::kBF16, 2, head_dim, n + sinks});
    for (int32_t h = 0; h < 2; ++h) {
      // Labels that give cluster c exactly sizes[c] rows, scattered in token order.
      std::vector<int32_t> labels;
      for (int32_t c = 0; c < static_cast<int32_t>(sizes.size()); ++c)
        labels.insert(labels.end(), sizes[c], c);
      std::shuffle(labels.begin(), labels.end(), rng);
      store.cluster(11, l, h, sinks, n, labels.data(), static_cast<int32_t>(sizes.size()));
    }
  }
  ClusterCacheConfig cc = cache_config(4 * (n + static_cast<int64_t>(sizes.size())), page_size);
  cc.head_dim = head_dim;
  ClusterCache cache(cc);
  cache.begin_step(1);
  std::vector<CacheRequest> reqs;
  for (int32_t l = 0; l < 2; ++l)
    for (int32_t h = 0; h < 2; ++h)
      for (int32_t c = static_cast<int32_t>(sizes.size()); c-- > 0;)
        reqs.push_back({{11, l, h, c}, store.cluster_span(11, l, h, c).num_rows});
  std::shuffle(reqs.begin(), reqs.end(), rng);
  const CacheLookup lk = cache.lookup(reqs);
  ASSERT_EQ(lk.misses.size(), reqs.size());
  std::vector<GatherSegment> plan;
  plan_fetch(store, reqs.data(), lk, page_size, HostAddress::kHost, &plan);
  EXPECT_EQ(plan_bytes(plan, rb), static_cast<int64_t>(2 * rb) * 4 * n);
  kernels::GatherParams gp{plan.data(),
                           static_cast<int32_t>(plan.size()),
                           static_cast<int32_t>(rb),
                           page_size,
                           cache.k_pool(),
                           cache.v_pool()};
  kernels::gather_ref(gp);
  // Read every cluster back out of its pages and compare with the store's rows.
  for (size_t i = 0; i < reqs.size(); ++i) {
    const CacheRequest& q = reqs[i];
    const ClusterSpan span =
        store.cluster_span(q.key.seq, q.key.layer, q.key.kv_head, q.key.cluster);
    std::vector<std::byte> want_k(rb * span.num_rows), want_v(want_k.size());
    store.read_slots(q.key.seq, q.key.layer, q.key.kv_head, span.slot_begin, span.num_rows,
                     want_k.data(), want_v.data());
    std::vector<std::byte> got_k(want_k.size()), got_v(want_v.size());
    for (int32_t row = 0; row < q.num_rows; ++row) {
      const int32_t page = lk.page_ids[lk.page_indptr[i] + row / page_size];
      std::memcpy(got_k.data() + row * rb, cache.k_page(page) + (row % page_size) * rb, rb);
      std::memcpy(got_v.data() + row * rb, cache.v_page(page) + (row % page_size) * rb, rb);
    }
    EXPECT_EQ(test::first_difference(got_k.data(), want_k.data(), got_k.size()), -1)
        << "cluster " << q.key.cluster << " rows " << q.num_rows << " seed " << test::test_seed();
    EXPECT_EQ(test::first_difference(got_v.data(), want_v.data(), got_v.size()), -1);
  }
}

INSTANTIATE_TEST_SUITE_P(PageSizes, CacheRoundTrip,
                         ::testing::Combine(::testing::Values(1, 2, 7, 16, 17),
                                            ::testing::Values(64, 128, 256)));

}  // namespace
}  // namespace kvtier::memory

namespace kvtier::memory {
namespace {

TEST(FetchPlan, RowCountMismatchIsAnErrorAndWritesNoStrayPage) {
  TieredStoreConfig sc;
  sc.shape = {1, 1, 64, DType::kBF16};
  sc.host.bytes_limit = 1 << 20;
  sc.host.page_bytes = 4096;
  TieredStore store(sc);
  store.add_sequence(0);
  std::vector<std::byte> k(128 * 40), v(k.size());
  store.append(0, 0, KvRows{k.data(), v.data(), DType::kBF16, 1, 64, 40});
  std::vector<int32_t> labels(40, 0);
  store.cluster(0, 0, 0, 0, 40, labels.data(), 1);  // one cluster of 40 rows
  ClusterCache cache(cache_config(64, 16));
  for (int32_t rows : {20, 60}) {  // fewer and more rows than the cluster has
    cache.erase_sequence(0);
    std::vector<CacheRequest> reqs = {{{0, 0, 0, 0}, rows}};
    const CacheLookup lk = cache.lookup(reqs);
    std::vector<GatherSegment> plan;
    try {
      plan_fetch(store, reqs.data(), lk, 16, HostAddress::kHost, &plan);
      FAIL() << "no error for " << rows << " rows";
    } catch (const InvalidArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find("says " + std::to_string(rows) + " rows"),
                std::string::npos)
          << e.what();
    }
    for (const GatherSegment& s : plan)  // nothing planned past the request's own pages
      EXPECT_TRUE(std::find(lk.page_ids.begin(), lk.page_ids.end(), s.dst_page) !=
                  lk.page_ids.end());
  }
}

}  // namespace
}  // namespace kvtier::memory
