// Many threads adding, filling, clustering, reading and removing sequences at once, with a shared
// cluster cache. Run also under the TSan and ASan presets.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "memory/cluster_cache.h"
#include "memory/tiered_store.h"
#include "tests/common/test_util.h"

namespace kvtier::memory {
namespace {

TEST(Concurrency, ThreadsAddFillReadRemoveSequences) {
  TieredStoreConfig c;
  c.shape = {2, 2, 64, DType::kBF16};
  c.host.bytes_limit = 64 << 20;
  c.host.page_bytes = 4096;
  c.host.slab_bytes = 1 << 20;
  TieredStore store(c);
  ClusterCacheConfig cc;
  cc.head_dim = 64;
  cc.num_pages = 4096;
  ClusterCache cache(cc);
  const size_t rb = store.row_bytes();
  constexpr int kThreads = 8;
  constexpr int kIters = 40;
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(test::test_seed() * 101 + t);
      for (int it = 0; it < kIters; ++it) {
        const SeqId seq = t * 1000 + it;
        store.add_sequence(seq);
        const int64_t rows = 1 + static_cast<int64_t>(rng() % 200);
        std::vector<std::byte> k = test::random_bytes(rb * rows * 2, rng),
                               v = test::random_bytes(k.size(), rng);
        for (int32_t l = 0; l < 2; ++l)
          store.append(seq, l, KvRows{k.data(), v.data(), DType::kBF16, 2, 64, rows});
        std::vector<int32_t> labels(static_cast<size_t>(rows));
        for (auto& x : labels) x = static_cast<int32_t>(rng() % 5);
        store.cluster(seq, 1, 1, 0, rows, labels.data(), 5);
        std::vector<CacheRequest> reqs;
        for (int32_t cl = 0; cl < 5; ++cl) {
          const int32_t n = store.cluster_span(seq, 1, 1, cl).num_rows;
          if (n > 0) reqs.push_back({{seq, 1, 1, cl}, n});
        }
        (void)cache.lookup(reqs);
        // Read back: positions must be the appended rows, whatever the other threads do.
        std::vector<std::byte> kk(rb * rows), vv(kk.size());
        for (int32_t h = 0; h < 2; ++h) {
          store.read_positions(seq, 1, h, 0, rows, kk.data(), vv.data());
          if (std::memcmp(kk.data(), k.data() + h * rows * rb, kk.size()) != 0 ||
              std::memcmp(vv.data(), v.data() + h * rows * rb, vv.size()) != 0)
            ++errors;
        }
        // Remove every other sequence at once; keep the rest to the end.
        if (it % 2 == 0) {
          cache.erase_sequence(seq);
          store.remove_sequence(seq);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0) << "seed " << test::test_seed();
  EXPECT_EQ(store.num_sequences(), static_cast<size_t>(kThreads * kIters / 2));
  for (int t = 0; t < kThreads; ++t)
    for (int it = 1; it < kIters; it += 2) store.remove_sequence(t * 1000 + it);
  EXPECT_EQ(store.arena().bytes_used(), 0u);
}

TEST(Concurrency, ReadersWhileWriterAppends) {
  TieredStoreConfig c;
  c.shape = {1, 1, 128, DType::kF16};
  c.host.bytes_limit = 16 << 20;
  c.host.page_bytes = 4096;
  TieredStore store(c);
  store.add_sequence(1);
  const size_t rb = store.row_bytes();
  std::atomic<bool> done{false};
  std::atomic<int> errors{0};
  // Row r holds the byte value r % 251 everywhere, so a reader can check any prefix it sees.
  std::thread writer([&] {
    std::vector<std::byte> row(rb);
    for (int r = 0; r < 2000; ++r) {
      std::memset(row.data(), r % 251, rb);
      store.append(1, 0, KvRows{row.data(), row.data(), DType::kF16, 1, 128, 1});
    }
    done = true;
  });
  std::vector<std::thread> readers;
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&] {
      std::vector<std::byte> k(rb), v(rb);
      while (!done) {
        const int64_t n = store.layout(1, 0, 0).num_rows;
        if (n == 0) continue;
        const int64_t r = n - 1;
        store.read_positions(1, 0, 0, r, 1, k.data(), v.data());
        if (static_cast<int>(k[0]) != r % 251 || static_cast<int>(v[rb - 1]) != r % 251) ++errors;
      }
    });
  }
  writer.join();
  for (auto& th : readers) th.join();
  EXPECT_EQ(errors.load(), 0);
  store.remove_sequence(1);
}

}  // namespace
}  // namespace kvtier::memory
