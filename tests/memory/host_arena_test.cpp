// PinnedBuffer and HostArena: fallbacks, accounting, exhaustion, reuse.
#include "memory/host_arena.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "memory/core/log.h"
#include "memory/pinned_buffer.h"
#include "tests/common/test_util.h"

namespace kvtier::memory {
namespace {

TEST(PinnedBuffer, PageableOnRequest) {
  PinnedBuffer b = PinnedBuffer::allocate(10000, kNumaAny, PinMode::kPageable);
  EXPECT_FALSE(b.is_pinned());
  EXPECT_EQ(b.kind(), HostMemoryKind::kPageable);
  EXPECT_GE(b.size_bytes(), 10000u);
  EXPECT_EQ(b.device_data(), nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % 4096, 0u);
  std::memset(b.data(), 0xAB, b.size_bytes());  // writable end to end (ASan checks bounds)
}

TEST(PinnedBuffer, MoveTransfersOwnership) {
  PinnedBuffer a = PinnedBuffer::allocate(4096, kNumaAny, PinMode::kPageable);
  std::byte* p = a.data();
  PinnedBuffer b(std::move(a));
  EXPECT_EQ(b.data(), p);
  EXPECT_EQ(a.data(), nullptr);
  PinnedBuffer c;
  c = std::move(b);
  EXPECT_EQ(c.data(), p);
}

TEST(PinnedBuffer, RefusedPinningFallsBackAndSaysSo) {
  std::vector<std::string> warnings;
  LogSink old = set_log_sink([&](LogLevel l, const std::string& m) {
    if (l == LogLevel::kWarn) warnings.push_back(m);
  });
  testing::set_pin_fault(testing::PinFault::kRefuse);
  PinnedBuffer b = PinnedBuffer::allocate(1 << 20);
  testing::set_pin_fault(testing::PinFault::kNone);
  set_log_sink(old);
  EXPECT_FALSE(b.is_pinned());
  EXPECT_EQ(b.device_data(), nullptr);
  EXPECT_FALSE(b.note().empty());
  if (cuda::device_available()) {
    // With a device, a refusal is news: it is logged as a warning naming the cause.
    EXPECT_NE(b.note().find("refused"), std::string::npos) << b.note();
    ASSERT_FALSE(warnings.empty());
    EXPECT_NE(warnings[0].find("pageable"), std::string::npos) << warnings[0];
  } else {
    EXPECT_NE(b.note().find("no CUDA device"), std::string::npos) << b.note();
  }
}

TEST(PinnedBuffer, NumaBindingFallsBackOnBadNode) {
  // Node 4095 does not exist: the binding fails, memory still arrives, and the note says why.
  PinnedBuffer b = PinnedBuffer::allocate(1 << 16, 4095);
  ASSERT_NE(b.data(), nullptr);
  EXPECT_NE(b.note().find("NUMA node 4095"), std::string::npos) << b.note();
}

HostArenaConfig small_arena(size_t pages, size_t page_bytes = 4096, size_t slab_pages = 4) {
  HostArenaConfig c;
  c.bytes_limit = pages * page_bytes;
  c.page_bytes = page_bytes;
  c.slab_bytes = slab_pages * page_bytes;
  c.numa_node = kNumaNearestGpu;
  return c;
}

TEST(HostArena, AccountingAndPeak) {
  HostArena a(small_arena(10));
  EXPECT_EQ(a.bytes_limit(), 10u * 4096);
  std::vector<HostPageId> p1, p2;
  ASSERT_TRUE(a.allocate(3, &p1).is_ok());
  ASSERT_TRUE(a.allocate(5, &p2).is_ok());
  EXPECT_EQ(a.bytes_used(), 8u * 4096);
  a.release(p1.data(), p1.size());
  EXPECT_EQ(a.bytes_used(), 5u * 4096);
  HostArenaStats s = a.stats();
  EXPECT_EQ(s.bytes_peak, 8u * 4096);
  EXPECT_EQ(s.bytes_limit, 10u * 4096);
  EXPECT_EQ(s.num_slabs, 2u);  // 8 pages in slabs of 4
  EXPECT_EQ(a.is_pinned(), cuda::device_available());
  a.release(p2.data(), p2.size());
  EXPECT_EQ(a.bytes_used(), 0u);
}

TEST(HostArena, PagesAreDistinctAndWritable) {
  HostArena a(small_arena(9, 4096, 4));  // last slab is partial (1 page)
  std::vector<HostPageId> pages;
  ASSERT_TRUE(a.allocate(9, &pages).is_ok());
  std::set<std::byte*> addrs;
  for (size_t i = 0; i < pages.size(); ++i) {
    std::byte* p = a.host_ptr(pages[i]);
    EXPECT_TRUE(addrs.insert(p).second);
    std::memset(p, static_cast<int>(i), 4096);
    if (a.is_pinned()) {
      EXPECT_NE(a.device_ptr(pages[i]), nullptr);
    }
  }
  for (size_t i = 0; i < pages.size(); ++i)
    EXPECT_EQ(static_cast<int>(a.host_ptr(pages[i])[4095]), static_cast<int>(i));
  a.release(pages.data(), pages.size());
}

TEST(HostArena, ExhaustionIsAStatusAndChangesNothing) {
  HostArena a(small_arena(6));
  std::vector<HostPageId> held;
  ASSERT_TRUE(a.allocate(4, &held).is_ok());
  std::vector<HostPageId> more = {123};  // existing contents must survive a failed call
  Status st = a.allocate(3, &more);
  EXPECT_EQ(st.code(), StatusCode::kCapacity);
  EXPECT_NE(st.message().find("3 pages"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("2 of 6 pages free"), std::string::npos) << st.message();
  EXPECT_EQ(more.size(), 1u);
  EXPECT_EQ(a.bytes_used(), 4u * 4096);
  EXPECT_TRUE(a.allocate(2, &more).is_ok());
  EXPECT_EQ(a.bytes_used(), a.bytes_limit());
  a.release(held.data(), held.size());
  a.release(more.data() + 1, 2);
}

TEST(HostArena, FreedPagesAreReused) {
  HostArena a(small_arena(4));
  std::vector<HostPageId> p;
  ASSERT_TRUE(a.allocate(4, &p).is_ok());
  a.release(p.data() + 1, 1);
  std::vector<HostPageId> q;
  ASSERT_TRUE(a.allocate(1, &q).is_ok());
  EXPECT_EQ(q[0], p[1]);
  EXPECT_EQ(a.stats().bytes_reserved, 4u * 4096);  // no new slab for a reuse
  a.release(p.data(), 1);
  a.release(p.data() + 2, 2);
  a.release(q.data(), 1);
}

TEST(HostArena, RejectsBadConfig) {
  HostArenaConfig c = small_arena(4);
  c.bytes_limit = 0;
  EXPECT_THROW(HostArena{c}, InvalidArgumentError);
  c = small_arena(4);
  c.page_bytes = 1000;
  EXPECT_THROW(HostArena{c}, InvalidArgumentError);
}

TEST(HostArena, ConcurrentAllocateRelease) {
  HostArena a(small_arena(256, 4096, 16));
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(test::test_seed() + t);
      for (int it = 0; it < 500; ++it) {
        std::vector<HostPageId> p;
        const size_t n = 1 + rng() % 8;
        if (!a.allocate(n, &p).is_ok()) {
          ++failures;
          continue;
        }
        for (HostPageId id : p) std::memset(a.host_ptr(id), t, 64);
        for (HostPageId id : p)
          if (static_cast<int>(a.host_ptr(id)[63]) != t) ++failures;
        a.release(p.data(), p.size());
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);  // 8 threads x 8 pages <= 256: never full, never shared
  EXPECT_EQ(a.bytes_used(), 0u);
}

TEST(HostArena, ReserveObtainsSlabsAheadUpToTheLimit) {
  HostArena a(small_arena(10));  // slabs of 4 pages
  EXPECT_EQ(a.free_pages(), 0u);
  EXPECT_GE(a.reserve(5), 5u);
  EXPECT_EQ(a.stats().num_slabs, 2u);  // 8 pages
  EXPECT_EQ(a.free_pages(), 8u);
  EXPECT_EQ(a.bytes_used(), 0u);  // reserved pages are free, not used
  std::vector<HostPageId> p;
  ASSERT_TRUE(a.allocate(8, &p).is_ok());
  EXPECT_EQ(a.stats().num_slabs, 2u);  // allocate found them: no new slab
  EXPECT_EQ(a.reserve(100), 2u);       // up to the limit: the last slab holds the 2 pages left
  EXPECT_EQ(a.stats().num_slabs, 3u);
  EXPECT_EQ(a.stats().bytes_reserved, 10u * 4096);
  std::vector<HostPageId> q;
  ASSERT_TRUE(a.allocate(2, &q).is_ok());
  EXPECT_FALSE(a.allocate(1, &q).is_ok());
  p.insert(p.end(), q.begin(), q.end());
  std::sort(p.begin(), p.end());
  EXPECT_EQ(std::adjacent_find(p.begin(), p.end()), p.end());  // all distinct
  a.release(p.data(), p.size());
  EXPECT_EQ(a.free_pages(), 10u);
}

TEST(HostArena, ReserveWhileOthersAllocate) {
  // One thread keeps reserving ahead while others allocate and write: every page handed out is
  // distinct, nothing exceeds the limit, and the accounting adds up.
  HostArena a(small_arena(512, 4096, 16));
  std::atomic<bool> stop{false};
  std::thread grower([&] {
    while (!stop) a.reserve(64);
  });
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  std::mutex mu;
  std::vector<HostPageId> held;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(test::test_seed() + 100 + t);
      for (int it = 0; it < 300; ++it) {
        std::vector<HostPageId> p;
        if (!a.allocate(1 + rng() % 4, &p).is_ok()) {
          ++failures;
          continue;
        }
        for (HostPageId id : p) std::memset(a.host_ptr(id), t + 1, 64);
        for (HostPageId id : p)
          if (static_cast<int>(a.host_ptr(id)[0]) != t + 1) ++failures;
        if (it % 10 == 0) {
          std::lock_guard<std::mutex> lock(mu);
          held.insert(held.end(), p.begin(), p.end());  // kept: the arena must grow
        } else {
          a.release(p.data(), p.size());
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  stop = true;
  grower.join();
  EXPECT_EQ(failures.load(), 0);  // at most 4 x (30 x 4 held + 4 in hand) = 496 pages <= 512
  std::sort(held.begin(), held.end());
  EXPECT_EQ(std::adjacent_find(held.begin(), held.end()), held.end());
  EXPECT_EQ(a.bytes_used(), held.size() * 4096);
  EXPECT_LE(a.stats().bytes_reserved, 512u * 4096);
  EXPECT_EQ(a.free_pages() + held.size(), a.stats().bytes_reserved / 4096);
  a.release(held.data(), held.size());
}

}  // namespace
}  // namespace kvtier::memory
