// TieredStore: round trips, cluster-contiguous layout, incremental clustering, errors, capacity.
#include "memory/tiered_store.h"

#include <gtest/gtest.h>
#include <tbb/task_arena.h>
#include <tbb/task_group.h>

#include <algorithm>
#include <cstring>
#include <numeric>

#include "tests/common/test_util.h"

namespace kvtier::memory {
namespace {

TieredStoreConfig config(int layers, int heads, int head_dim, DType dtype, size_t limit_bytes,
                         size_t page_bytes = 4096) {
  TieredStoreConfig c;
  c.shape = {layers, heads, head_dim, dtype};
  c.host.bytes_limit = limit_bytes;
  c.host.page_bytes = page_bytes;
  c.host.slab_bytes = 64 * page_bytes;
  return c;
}

/// Reference copy of what was appended: [layer][head] -> K rows and V rows, token order.
struct Mirror {
  size_t row_bytes;
  std::vector<std::vector<std::byte>> k, v;  // index layer * heads + head
};

void append_random(TieredStore& store, SeqId seq, int64_t rows, std::mt19937_64& rng,
                   Mirror* mirror) {
  const KvShape& s = store.shape();
  const size_t rb = store.row_bytes();
  for (int32_t l = 0; l < s.num_layers; ++l) {
    std::vector<std::byte> k = test::random_bytes(rb * rows * s.num_kv_heads, rng);
    std::vector<std::byte> v = test::random_bytes(rb * rows * s.num_kv_heads, rng);
    KvRows r;
    r.k = k.data();
    r.v = v.data();
    r.dtype = s.dtype;
    r.head_dim = s.head_dim;
    r.num_kv_heads = s.num_kv_heads;
    r.num_rows = rows;
    store.append(seq, l, r);
    if (mirror) {
      for (int32_t h = 0; h < s.num_kv_heads; ++h) {
        auto& mk = mirror->k[l * s.num_kv_heads + h];
        auto& mv = mirror->v[l * s.num_kv_heads + h];
        mk.insert(mk.end(), k.begin() + h * rows * rb, k.begin() + (h + 1) * rows * rb);
        mv.insert(mv.end(), v.begin() + h * rows * rb, v.begin() + (h + 1) * rows * rb);
      }
    }
  }
}

Mirror make_mirror(const TieredStore& store) {
  const size_t n = static_cast<size_t>(store.shape().num_layers) * store.shape().num_kv_heads;
  return Mirror{store.row_bytes(), std::vector<std::vector<std::byte>>(n),
                std::vector<std::vector<std::byte>>(n)};
}

void expect_positions_match(const TieredStore& store, SeqId seq, const Mirror& m) {
  const KvShape& s = store.shape();
  const size_t rb = store.row_bytes();
  for (int32_t l = 0; l < s.num_layers; ++l) {
    for (int32_t h = 0; h < s.num_kv_heads; ++h) {
      const auto& mk = m.k[l * s.num_kv_heads + h];
      const auto& mv = m.v[l * s.num_kv_heads + h];
      const int64_t rows = static_cast<int64_t>(mk.size() / rb);
      ASSERT_EQ(store.layout(seq, l, h).num_rows, rows);
      std::vector<std::byte> k(mk.size()), v(mv.size());
      store.read_positions(seq, l, h, 0, rows, k.data(), v.data());
      EXPECT_EQ(test::first_difference(k.data(), mk.data(), k.size()), -1)
          << "seq " << seq << " layer " << l << " head " << h << " seed " << test::test_seed();
      EXPECT_EQ(test::first_difference(v.data(), mv.data(), v.size()), -1);
    }
  }
}

class StoreRoundTrip : public ::testing::TestWithParam<std::tuple<int, DType, int64_t>> {};

TEST_P(StoreRoundTrip, AppendThenReadIsBitwiseEqual) {
  const auto [head_dim, dtype, rows] = GetParam();
  TieredStore store(config(2, 3, head_dim, dtype, 64 << 20));
  std::mt19937_64 rng(test::test_seed() ^ rows);
  Mirror m = make_mirror(store);
  store.add_sequence(7);
  append_random(store, 7, rows, rng, &m);
  append_random(store, 7, 1, rng, &m);  // a second, ragged append
  expect_positions_match(store, 7, m);
  // Before any clustering, slots are positions.
  std::vector<std::byte> k(store.row_bytes() * (rows + 1)), v(k.size());
  store.read_slots(7, 1, 2, 0, rows + 1, k.data(), v.data());
  EXPECT_EQ(test::first_difference(k.data(), m.k[1 * 3 + 2].data(), k.size()), -1);
}

INSTANTIATE_TEST_SUITE_P(
    AwkwardSizes, StoreRoundTrip,
    ::testing::Combine(::testing::Values(64, 128, 256),
                       ::testing::Values(DType::kF16, DType::kBF16),
                       // 1, around the 16-row cache page, around a 4 KiB host page of 256 B rows
                       // (16 rows), primes, and several pages.
                       ::testing::Values<int64_t>(1, 15, 16, 17, 31, 97, 257, 1031)));

TEST(TieredStore, ClusterLayoutIsContiguousAndPermutationCorrect) {
  TieredStore store(config(1, 2, 128, DType::kBF16, 16 << 20));
  std::mt19937_64 rng(test::test_seed());
  Mirror m = make_mirror(store);
  store.add_sequence(1);
  const int64_t n = 1000, sinks = 4, clustered = 900;
  append_random(store, 1, n, rng, &m);
  const int32_t k = 37;
  std::vector<int32_t> labels(clustered);
  for (auto& x : labels) x = static_cast<int32_t>(rng() % (k - 1));  // cluster k-1 stays empty
  ASSERT_EQ(store.cluster(1, 0, 1, sinks, clustered, labels.data(), k), 0);

  const HeadLayout lay = store.layout(1, 0, 1);
  EXPECT_EQ(lay.index_begin, sinks);
  EXPECT_EQ(lay.index_end, sinks + clustered);
  EXPECT_EQ(lay.num_clusters, k);
  const size_t rb = store.row_bytes();
  int64_t covered = 0;
  for (int32_t c = 0; c < k; ++c) {
    const ClusterSpan span = store.cluster_span(1, 0, 1, c);
    EXPECT_EQ(span.slot_begin, sinks + covered);  // clusters tile the index in id order
    covered += span.num_rows;
    // The cluster's rows are exactly the positions labelled c, in token order.
    std::vector<int64_t> want;
    for (int64_t i = 0; i < clustered; ++i)
      if (labels[i] == c) want.push_back(sinks + i);
    std::vector<int64_t> got(span.num_rows);
    store.slot_positions(1, 0, 1, span.slot_begin, span.num_rows, got.data());
    EXPECT_EQ(got, want) << "cluster " << c;
    // And the bytes in those slots are those positions' rows.
    std::vector<std::byte> kk(rb * span.num_rows), vv(kk.size());
    if (span.num_rows > 0)
      store.read_slots(1, 0, 1, span.slot_begin, span.num_rows, kk.data(), vv.data());
    for (int32_t j = 0; j < span.num_rows; ++j) {
      ASSERT_EQ(std::memcmp(kk.data() + j * rb, m.k[1].data() + want[j] * rb, rb), 0);
      ASSERT_EQ(std::memcmp(vv.data() + j * rb, m.v[1].data() + want[j] * rb, rb), 0);
    }
  }
  EXPECT_EQ(covered, clustered);
  EXPECT_EQ(store.cluster_span(1, 0, 1, k - 1).num_rows, 0);
  // Sinks and the tail are still addressable by position, and head 0 is untouched.
  expect_positions_match(store, 1, m);
  std::vector<int64_t> pos(3);
  store.slot_positions(1, 0, 1, 0, 2, pos.data());
  EXPECT_EQ(pos[0], 0);
  EXPECT_EQ(pos[1], 1);
  store.slot_positions(1, 0, 1, n - 1, 1, pos.data());
  EXPECT_EQ(pos[0], n - 1);
}

TEST(TieredStore, IncrementalClusteringAppendsClusters) {
  TieredStore store(config(1, 1, 64, DType::kF16, 8 << 20));
  std::mt19937_64 rng(test::test_seed() + 1);
  Mirror m = make_mirror(store);
  store.add_sequence(3);
  append_random(store, 3, 300, rng, &m);
  std::vector<int32_t> a(280);
  for (auto& x : a) x = static_cast<int32_t>(rng() % 8);
  ASSERT_EQ(store.cluster(3, 0, 0, 20, 280, a.data(), 8), 0);
  append_random(store, 3, 64, rng, &m);  // new decode tokens land in the tail
  std::vector<int32_t> b(64);
  for (auto& x : b) x = static_cast<int32_t>(rng() % 4);
  // Must continue at the oldest unclustered row.
  EXPECT_THROW(store.cluster(3, 0, 0, 301, 63, b.data(), 4), InvalidArgumentError);
  ASSERT_EQ(store.cluster(3, 0, 0, 300, 64, b.data(), 4), 8);
  const HeadLayout lay = store.layout(3, 0, 0);
  EXPECT_EQ(lay.num_clusters, 12);
  EXPECT_EQ(lay.index_end, 364);
  for (int32_t c = 8; c < 12; ++c) {
    const ClusterSpan span = store.cluster_span(3, 0, 0, c);
    std::vector<int64_t> pos(span.num_rows);
    if (span.num_rows) store.slot_positions(3, 0, 0, span.slot_begin, span.num_rows, pos.data());
    for (int64_t p : pos) {
      EXPECT_GE(p, 300);
      EXPECT_EQ(b[p - 300], c - 8);
    }
  }
  expect_positions_match(store, 3, m);
}

// Every slot of every head of two stores, bytes and positions, and their cluster layouts.
void expect_same_layout(const TieredStore& a, const TieredStore& b, SeqId seq, int32_t layer) {
  const size_t rb = a.row_bytes();
  for (int32_t h = 0; h < a.shape().num_kv_heads; ++h) {
    const HeadLayout la = a.layout(seq, layer, h), lb = b.layout(seq, layer, h);
    ASSERT_EQ(la.num_rows, lb.num_rows);
    ASSERT_EQ(la.index_begin, lb.index_begin);
    ASSERT_EQ(la.index_end, lb.index_end);
    ASSERT_EQ(la.num_clusters, lb.num_clusters);
    for (int32_t c = 0; c < la.num_clusters; ++c) {
      ASSERT_EQ(a.cluster_span(seq, layer, h, c).slot_begin,
                b.cluster_span(seq, layer, h, c).slot_begin);
      ASSERT_EQ(a.cluster_span(seq, layer, h, c).num_rows,
                b.cluster_span(seq, layer, h, c).num_rows);
    }
    const int64_t n = la.num_rows;
    std::vector<int64_t> pa(n), pb(n);
    a.slot_positions(seq, layer, h, 0, n, pa.data());
    b.slot_positions(seq, layer, h, 0, n, pb.data());
    ASSERT_EQ(pa, pb) << "head " << h;
    std::vector<std::byte> ka(rb * n), va(ka.size()), kb(ka.size()), vb(ka.size());
    a.read_slots(seq, layer, h, 0, n, ka.data(), va.data());
    b.read_slots(seq, layer, h, 0, n, kb.data(), vb.data());
    ASSERT_EQ(ka, kb) << "head " << h;
    ASSERT_EQ(va, vb) << "head " << h;
  }
}

TEST(TieredStore, AppendClusteredEqualsAppendThenCluster) {
  // Sizes below and above the parallel threshold, pages partly filled, a sink prefix (the
  // first rows appended plainly) and a second clustered append after the first.
  for (const int64_t n : {int64_t{1}, int64_t{300}, int64_t{5000}}) {
    const int32_t H = 4, k = 23;
    TieredStore a(config(2, H, 64, DType::kF16, 64 << 20)),
        b(config(2, H, 64, DType::kF16, 64 << 20));
    a.add_sequence(9);
    b.add_sequence(9);
    std::mt19937_64 rng(test::test_seed() + n);
    const size_t rb = a.row_bytes();
    auto rows_of = [&](const std::vector<std::byte>& kk, const std::vector<std::byte>& vv,
                       int64_t count) {
      return KvRows{kk.data(), vv.data(), DType::kF16, H, 64, count, -1, -1};
    };
    const int64_t sink = 5;
    std::vector<std::byte> sk = test::random_bytes(rb * H * sink, rng),
                           sv = test::random_bytes(sk.size(), rng);
    a.append(9, 1, rows_of(sk, sv, sink));
    b.append(9, 1, rows_of(sk, sv, sink));
    int32_t first = 0;
    for (int round = 0; round < 2; ++round) {
      std::vector<std::byte> kk = test::random_bytes(rb * H * n, rng),
                             vv = test::random_bytes(kk.size(), rng);
      std::vector<int32_t> labels(static_cast<size_t>(H) * n);
      for (auto& x : labels) x = static_cast<int32_t>(rng() % (k - 1));  // one stays empty
      const int64_t at = a.layout(9, 1, 0).num_rows;
      a.append(9, 1, rows_of(kk, vv, n));
      for (int32_t h = 0; h < H; ++h) {
        ASSERT_EQ(a.cluster(9, 1, h, at, n, labels.data() + h * n, k), first);
      }
      ASSERT_EQ(b.append_clustered(9, 1, rows_of(kk, vv, n), labels.data(), k), first);
      expect_same_layout(a, b, 9, 1);
      first += k;
    }
    // Rows appended plainly after the index leave the tail unclustered: clustering must go on
    // from there, so append_clustered refuses.
    std::vector<std::byte> kk = test::random_bytes(rb * H * 3, rng), vv = kk;
    b.append(9, 1, rows_of(kk, vv, 3));
    std::vector<int32_t> labels(static_cast<size_t>(H) * 3, 0);
    EXPECT_THROW(b.append_clustered(9, 1, rows_of(kk, vv, 3), labels.data(), 1),
                 InvalidArgumentError);
    labels[5] = 7;
    EXPECT_THROW(b.append_clustered(9, 0, rows_of(kk, vv, 3), labels.data(), 7),
                 InvalidArgumentError);
    EXPECT_EQ(b.layout(9, 0, 0).num_rows, 0);
  }
}

TEST(TieredStore, LargeAppendsToOneSequenceFromManyTasks) {
  // Each append copies its heads in parallel while it holds the sequence's lock; a thread
  // waiting there must not run another task's append to the same sequence (it would take the
  // lock twice: "Resource deadlock avoided").
  // Several sequences, so that threads busy with one are free to steal the parallel copies of
  // another's append, whose thread then waits (and would steal) in turn.
  const int32_t L = 12, H = 8, kSeqs = 3;
  const int64_t n = 2048;  // the smallest append whose heads are copied in parallel
  TieredStore store(config(L, H, 64, DType::kF16, size_t{1} << 30));
  for (SeqId seq = 2; seq < 2 + kSeqs; ++seq) store.add_sequence(seq);
  std::mt19937_64 rng(test::test_seed());
  std::vector<std::byte> k = test::random_bytes(store.row_bytes() * H * n, rng), v = k;
  std::vector<int32_t> labels(static_cast<size_t>(H) * n);
  for (auto& x : labels) x = static_cast<int32_t>(rng() % 64);
  const KvRows rows{k.data(), v.data(), DType::kF16, H, 64, n, -1, -1};
  // More threads than CI's cores, so that waits (and steals) happen.
  tbb::task_arena arena(8);
  tbb::task_group tasks;
  arena.execute([&] {
    for (int32_t l = 0; l < L; ++l) {
      for (SeqId seq = 2; seq < 2 + kSeqs; ++seq) {
        tasks.run([&, l, seq] {
          if (l % 2) {
            store.append_clustered(seq, l, rows, labels.data(), 64);
          } else {
            store.append(seq, l, rows);
          }
        });
      }
    }
  });
  ASSERT_NO_THROW(arena.execute([&] { tasks.wait(); }));
  for (SeqId seq = 2; seq < 2 + kSeqs; ++seq) {
    for (int32_t l = 0; l < L; ++l) {
      EXPECT_EQ(store.layout(seq, l, H - 1).num_rows, n);
      EXPECT_EQ(store.layout(seq, l, H - 1).num_clusters, l % 2 ? 64 : 0);
    }
  }
}

TEST(TieredStore, AppendClusteredIsAllOrNothingWhenTheArenaIsFull) {
  TieredStore store(config(1, 2, 64, DType::kF16, 64 * 4096));  // 64 pages of 32 rows
  store.add_sequence(1);
  std::mt19937_64 rng(test::test_seed());
  const int64_t n = 32 * 40;  // 40 pages per K or V of a head: 160 in all
  std::vector<std::byte> k = test::random_bytes(store.row_bytes() * 2 * n, rng), v = k;
  std::vector<int32_t> labels(2 * n, 0);
  EXPECT_THROW(
      store.append_clustered(1, 0, KvRows{k.data(), v.data(), DType::kF16, 2, 64, n, -1, -1},
                             labels.data(), 1),
      CapacityError);
  EXPECT_EQ(store.layout(1, 0, 0).num_rows, 0);
  EXPECT_EQ(store.layout(1, 0, 0).num_clusters, 0);
  EXPECT_EQ(store.arena().bytes_used(), 0u);
}

TEST(TieredStore, TokenMajorStrides) {
  TieredStore store(config(1, 4, 64, DType::kBF16, 4 << 20));
  store.add_sequence(0);
  std::mt19937_64 rng(test::test_seed());
  const int64_t rows = 19;
  const size_t rb = store.row_bytes();
  // [rows, heads, head_dim]
  std::vector<std::byte> k = test::random_bytes(rb * 4 * rows, rng),
                         v = test::random_bytes(k.size(), rng);
  KvRows r{k.data(), v.data(), DType::kBF16,       4,
           64,       rows,     /*head_stride=*/64, /*row_stride=*/4 * 64};
  store.append(0, 0, r);
  std::vector<std::byte> out(rb), vout(rb);
  for (int h = 0; h < 4; ++h)
    for (int64_t i = 0; i < rows; ++i) {
      store.read_positions(0, 0, h, i, 1, out.data(), vout.data());
      ASSERT_EQ(std::memcmp(out.data(), k.data() + (i * 4 + h) * rb, rb), 0);
      ASSERT_EQ(std::memcmp(vout.data(), v.data() + (i * 4 + h) * rb, rb), 0);
    }
}

TEST(TieredStore, ClearErrors) {
  TieredStore store(config(2, 2, 128, DType::kBF16, 4 << 20));
  store.add_sequence(5);
  EXPECT_THROW(store.add_sequence(5), InvalidArgumentError);
  std::vector<std::byte> buf(256 * 4);
  KvRows r{buf.data(), buf.data(), DType::kBF16, 2, 128, 2};
  try {
    store.append(99, 0, r);
    FAIL();
  } catch (const NotFoundError& e) {
    EXPECT_NE(std::string(e.what()).find("unknown sequence 99"), std::string::npos) << e.what();
  }
  KvRows bad = r;
  bad.dtype = DType::kF16;
  try {
    store.append(5, 0, bad);
    FAIL();
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("dtype fp16"), std::string::npos) << e.what();
  }
  bad = r;
  bad.head_dim = 64;
  try {
    store.append(5, 0, bad);
    FAIL();
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("head_dim 64"), std::string::npos) << e.what();
  }
  EXPECT_THROW(store.append(5, 2, r), InvalidArgumentError);  // layer out of range
  store.append(5, 0, r);
  int32_t labels[2] = {0, 3};
  try {
    store.cluster(5, 0, 0, 0, 2, labels, 2);
    FAIL();
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("label 3"), std::string::npos) << e.what();
  }
  EXPECT_THROW(store.cluster(5, 0, 0, 0, 3, labels, 4), InvalidArgumentError);  // past the end
  EXPECT_THROW(store.layout(5, 0, 2), InvalidArgumentError);
  EXPECT_THROW(store.cluster_span(5, 0, 0, 0), InvalidArgumentError);  // no clusters yet
  EXPECT_THROW(store.remove_sequence(6), NotFoundError);
  TieredStoreConfig c = config(1, 1, 96, DType::kBF16, 1 << 20);
  EXPECT_THROW(TieredStore{c}, InvalidArgumentError);
}

TEST(TieredStore, ArenaExhaustionLosesNothing) {
  // 16 pages of 4 KiB, 2 heads, 128-dim bf16 (16 rows per page): 4 pages per 16 rows of a layer.
  TieredStore store(config(1, 2, 128, DType::kBF16, 16 * 4096));
  std::mt19937_64 rng(test::test_seed());
  Mirror m = make_mirror(store);
  store.add_sequence(1);
  append_random(store, 1, 40, rng, &m);  // 3 pages per side per head = 12 pages
  const size_t used = store.arena().bytes_used();
  try {
    append_random(store, 1, 40, rng, nullptr);  // 5 pages per side per head: 8 more, 4 free
    FAIL() << "no CapacityError";
  } catch (const CapacityError& e) {
    EXPECT_NE(std::string(e.what()).find("host arena exhausted"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("unchanged"), std::string::npos) << e.what();
  }
  EXPECT_EQ(store.arena().bytes_used(), used);
  expect_positions_match(store, 1, m);
  append_random(store, 1, 8, rng, &m);  // still fits in the partly filled pages
  expect_positions_match(store, 1, m);
  store.add_sequence(2);
  EXPECT_THROW(append_random(store, 2, 40, rng, nullptr), CapacityError);
  expect_positions_match(store, 1, m);
  EXPECT_EQ(store.layout(2, 0, 0).num_rows, 0);
}

TEST(TieredStore, RemoveFreesMemoryAndManyLengthsCoexist) {
  TieredStore store(config(2, 2, 64, DType::kBF16, 32 << 20));
  std::mt19937_64 rng(test::test_seed());
  std::vector<Mirror> mirrors;
  const int64_t lengths[] = {1, 7, 64, 65, 300, 1000};
  for (SeqId s = 0; s < 6; ++s) {
    store.add_sequence(s);
    mirrors.push_back(make_mirror(store));
    append_random(store, s, lengths[s], rng, &mirrors.back());
  }
  for (SeqId s = 0; s < 6; ++s) expect_positions_match(store, s, mirrors[s]);
  const size_t used = store.arena().bytes_used();
  const size_t seq5 = store.sequence_bytes(5);
  EXPECT_GT(seq5, 0u);
  store.remove_sequence(5);
  EXPECT_EQ(store.arena().bytes_used(), used - seq5);
  EXPECT_FALSE(store.contains(5));
  for (SeqId s = 0; s < 5; ++s) expect_positions_match(store, s, mirrors[s]);
  for (SeqId s = 0; s < 5; ++s) store.remove_sequence(s);
  EXPECT_EQ(store.arena().bytes_used(), 0u);
  EXPECT_EQ(store.num_sequences(), 0u);
}

}  // namespace
}  // namespace kvtier::memory
