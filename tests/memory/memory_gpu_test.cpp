// GPU tests of the memory layer: pinned NUMA-placed arena, and the fetch (gather kernel and copy
// engine) against the CPU reference, bitwise, over the whole pool.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

#include "kernels/kv_gather.h"
#include "memory/cluster_cache.h"
#include "memory/fetch_plan.h"
#include "memory/numa_topology.h"
#include "tests/common/test_util.h"

namespace kvtier::memory {
namespace {

TEST(GpuArena, PinnedMappedAndNearTheGpu) {
  KVTIER_REQUIRE_GPU();
  HostArenaConfig c;
  c.bytes_limit = 8 << 20;
  c.slab_bytes = 4 << 20;
  HostArena arena(c);
  std::vector<HostPageId> pages;
  ASSERT_TRUE(arena.allocate(100, &pages).is_ok());
  EXPECT_TRUE(arena.is_pinned()) << arena.pin_note();
  EXPECT_EQ(arena.numa_node(), NumaTopology::instance().node_of_gpu(0));
  for (HostPageId p : pages) EXPECT_NE(arena.device_ptr(p), nullptr);
  arena.release(pages.data(), pages.size());
}

class GpuFetch : public ::testing::TestWithParam<std::tuple<int, DType, int32_t>> {};

enum class FetchPath { kKernel, kCopyEngine };

void run_fetch_case(int head_dim, DType dtype, int32_t page_size, FetchPath path) {
#if KVTIER_WITH_CUDA
  TieredStoreConfig sc;
  sc.shape = {2, 4, head_dim, dtype};
  sc.host.bytes_limit = 256 << 20;
  sc.host.page_bytes = 64 << 10;
  TieredStore store(sc);
  const size_t rb = store.row_bytes();
  std::mt19937_64 rng(test::test_seed() + head_dim * 3 + page_size);
  const int64_t rows = 3001, sinks = 16;
  store.add_sequence(4);
  for (int32_t l = 0; l < 2; ++l) {
    std::vector<std::byte> k = test::random_bytes(rb * rows * 4, rng),
                           v = test::random_bytes(k.size(), rng);
    store.append(4, l, KvRows{k.data(), v.data(), dtype, 4, head_dim, rows});
    for (int32_t h = 0; h < 4; ++h) {
      // Skewed sizes: many small clusters, a few large ones, some empty.
      const int32_t kc = 97;
      std::vector<int32_t> labels(rows - sinks);
      for (auto& x : labels) {
        const uint64_t u = rng() % 100;
        x = u < 50 ? static_cast<int32_t>(rng() % 5) : static_cast<int32_t>(5 + rng() % (kc - 10));
      }
      store.cluster(4, l, h, sinks, rows - sinks, labels.data(), kc);
    }
  }
  ASSERT_TRUE(store.arena().is_pinned()) << store.arena().pin_note();
  ClusterCacheConfig cc;
  cc.backend = Backend::kCuda;
  cc.dtype = dtype;
  cc.head_dim = head_dim;
  cc.page_size = page_size;
  cc.num_pages = 2 * rows * 8 / page_size + 1024;
  ClusterCache cache(cc);
  cache.begin_step(1);
  std::vector<CacheRequest> reqs;
  for (int32_t l = 0; l < 2; ++l)
    for (int32_t h = 0; h < 4; ++h)
      for (int32_t c = 0; c < 97; ++c) {
        const int32_t n = store.cluster_span(4, l, h, c).num_rows;
        if (n > 0) reqs.push_back({{4, l, h, c}, n});
      }
  std::shuffle(reqs.begin(), reqs.end(), rng);
  const CacheLookup lk = cache.lookup(reqs);
  ASSERT_EQ(lk.misses.size(), reqs.size());

  const size_t pool_bytes = static_cast<size_t>(cache.num_pages()) * cache.page_bytes();
  cuda::Stream stream(0);
  cuda::memset_async(cache.k_pool(), 0xEE, pool_bytes, stream.get());
  cuda::memset_async(cache.v_pool(), 0xEE, pool_bytes, stream.get());
  std::vector<GatherSegment> host_plan;
  plan_fetch(store, reqs.data(), lk, page_size, HostAddress::kHost, &host_plan);
  if (path == FetchPath::kKernel) {
    std::vector<GatherSegment> dev_plan;
    plan_fetch(store, reqs.data(), lk, page_size, HostAddress::kDevice, &dev_plan);
    ASSERT_EQ(dev_plan.size(), host_plan.size());
    cuda::DeviceBuffer<GatherSegment> segs(dev_plan.size(), 0);
    cuda::memcpy_async(segs.get(), dev_plan.data(), dev_plan.size() * sizeof(GatherSegment),
                       stream.get());
    kernels::launch_gather({segs.get(), static_cast<int32_t>(dev_plan.size()),
                            static_cast<int32_t>(rb), page_size, cache.k_pool(), cache.v_pool()},
                           stream.get());
    stream.synchronize();
  } else {
    const int64_t copies = kernels::launch_gather_copy_engine(
        host_plan.data(), static_cast<int32_t>(host_plan.size()), static_cast<int32_t>(rb),
        page_size, cache.k_pool(), cache.v_pool(), stream.get());
    EXPECT_GT(copies, 0);
    EXPECT_LE(copies, static_cast<int64_t>(2 * host_plan.size()));
    stream.synchronize();
  }
  // The reference, on a host pool poisoned the same way.
  std::vector<std::byte> want_k(pool_bytes, std::byte{0xEE}), want_v(pool_bytes, std::byte{0xEE});
  kernels::gather_ref({host_plan.data(), static_cast<int32_t>(host_plan.size()),
                       static_cast<int32_t>(rb), page_size, want_k.data(), want_v.data()});
  std::vector<std::byte> got_k(pool_bytes), got_v(pool_bytes);
  cuda::memcpy_async(got_k.data(), cache.k_pool(), pool_bytes, stream.get());
  cuda::memcpy_async(got_v.data(), cache.v_pool(), pool_bytes, stream.get());
  stream.synchronize();
  const int64_t dk = test::first_difference(got_k.data(), want_k.data(), pool_bytes);
  const int64_t dv = test::first_difference(got_v.data(), want_v.data(), pool_bytes);
  EXPECT_EQ(dk, -1) << "first bad K byte at page "
                    << (dk / static_cast<int64_t>(cache.page_bytes())) << "; head_dim " << head_dim
                    << " page_size " << page_size << " seed " << test::test_seed();
  EXPECT_EQ(dv, -1) << "head_dim " << head_dim << " page_size " << page_size;
  // And the pool holds the store's rows, cluster by cluster (host store -> cache -> host).
  for (size_t i = 0; i < reqs.size(); i += 7) {
    const CacheRequest& q = reqs[i];
    const ClusterSpan span =
        store.cluster_span(q.key.seq, q.key.layer, q.key.kv_head, q.key.cluster);
    std::vector<std::byte> sk(rb * span.num_rows), sv(sk.size());
    store.read_slots(q.key.seq, q.key.layer, q.key.kv_head, span.slot_begin, span.num_rows,
                     sk.data(), sv.data());
    for (int32_t r = 0; r < q.num_rows; ++r) {
      const size_t off =
          static_cast<size_t>(lk.page_ids[lk.page_indptr[i] + r / page_size]) * cache.page_bytes() +
          static_cast<size_t>(r % page_size) * rb;
      ASSERT_EQ(std::memcmp(got_k.data() + off, sk.data() + r * rb, rb), 0)
          << "cluster " << q.key.cluster;
      ASSERT_EQ(std::memcmp(got_v.data() + off, sv.data() + r * rb, rb), 0)
          << "cluster " << q.key.cluster;
    }
  }
#else
  (void)head_dim, (void)dtype, (void)page_size, (void)path;
  FAIL() << "built without CUDA";
#endif
}

TEST_P(GpuFetch, KernelMatchesReferenceBitwise) {
  KVTIER_REQUIRE_GPU();
  const auto [head_dim, dtype, page_size] = GetParam();
  run_fetch_case(head_dim, dtype, page_size, FetchPath::kKernel);
}

TEST_P(GpuFetch, CopyEngineMatchesReferenceBitwise) {
  KVTIER_REQUIRE_GPU();
  const auto [head_dim, dtype, page_size] = GetParam();
  run_fetch_case(head_dim, dtype, page_size, FetchPath::kCopyEngine);
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuFetch,
                         ::testing::Combine(::testing::Values(64, 128, 256),
                                            ::testing::Values(DType::kF16, DType::kBF16),
                                            ::testing::Values(1, 7, 16, 17)));

TEST(GpuFetch, RefusedPinningFallsBackAndThePlanSaysWhy) {
  KVTIER_REQUIRE_GPU();
  testing::set_pin_fault(testing::PinFault::kRefuse);
  TieredStoreConfig sc;
  sc.shape = {1, 1, 128, DType::kBF16};
  sc.host.bytes_limit = 1 << 20;
  TieredStore store(sc);
  store.add_sequence(0);
  std::vector<std::byte> k(256 * 8), v(k.size());
  store.append(0, 0, KvRows{k.data(), v.data(), DType::kBF16, 1, 128, 8});
  testing::set_pin_fault(testing::PinFault::kNone);
  EXPECT_FALSE(store.arena().is_pinned());
  EXPECT_NE(store.arena().pin_note().find("refused"), std::string::npos)
      << store.arena().pin_note();
  int32_t labels[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  store.cluster(0, 0, 0, 0, 8, labels, 1);
  ClusterCacheConfig cc;
  cc.backend = Backend::kCuda;
  cc.num_pages = 4;
  ClusterCache cache(cc);
  std::vector<CacheRequest> reqs = {{{0, 0, 0, 0}, 8}};
  const CacheLookup lk = cache.lookup(reqs);
  std::vector<GatherSegment> plan;
  try {
    plan_fetch(store, reqs.data(), lk, cc.page_size, HostAddress::kDevice, &plan);
    FAIL() << "no error for a device plan over pageable memory";
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("not in pinned memory"), std::string::npos) << e.what();
  }
  // The host path still works (the copy engine stages pageable memory itself).
  EXPECT_NO_THROW(plan_fetch(store, reqs.data(), lk, cc.page_size, HostAddress::kHost, &plan));
}

}  // namespace
}  // namespace kvtier::memory
