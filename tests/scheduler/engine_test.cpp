// The engine on the CPU backend: every path but the kernels themselves. Mode full and clusterkv
// with a budget of at least the context must equal dense attention over all rows, step after
// step, with ragged batches and sequences joining and leaving; clusterkv with a small budget
// must recall what matters; bad input gets a clear error and changes nothing.
#include "scheduler/engine.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "scheduler/engine_kernels.h"
#include "tests/scheduler/engine_driver.h"

namespace kvtier {
namespace {

using namespace test_engine;

TEST(Engine, FullModeEqualsDenseAttentionOverManySteps) {
  const EngineConfig c = make_config(Mode::kFull, Shape{});
  EXPECT_LT(run_churn(c, test::test_seed(), 60), kTol);
}

TEST(Engine, ClusterKVWithBudgetCoveringTheContextEqualsDense) {
  EngineConfig c = make_config(Mode::kClusterKV, Shape{});
  c.budget = 4096;  // >= any context here: every cluster is selected
  EXPECT_LT(run_churn(c, test::test_seed() + 1, 70), kTol);
}

TEST(Engine, ClusterKVWithTruncateAndSkipAndNoDenseLayers) {
  for (const auto overflow : {kernels::BudgetOverflow::kTruncate, kernels::BudgetOverflow::kSkip}) {
    EngineConfig c = make_config(Mode::kClusterKV, Shape{});
    c.num_dense_layers = 0;
    c.overflow = overflow;
    c.budget = 4096;
    EXPECT_LT(run_churn(c, test::test_seed() + 2, 40), kTol);
  }
}

TEST(Engine, HalfPrecisionDtypesEqualDenseWithinTolerance) {
  for (const DType t : {DType::kBF16, DType::kF16}) {
    EngineConfig c = make_config(Mode::kClusterKV, Shape{2, 4, 2, 128}, t);
    c.budget = 4096;
    EXPECT_LT(run_churn(c, test::test_seed() + 3, 30), t == DType::kBF16 ? 2e-2 : kTol)
        << dtype_name(t);
  }
}

// fp32 K/V (CPU backend: models run in fp32 on the CPU): full and clusterkv with a budget
// covering the context equal dense attention to fp32 rounding, and a small budget still recalls
// what matters.
TEST(Engine, Fp32OnTheCpuBackend) {
  for (const Mode m : {Mode::kFull, Mode::kClusterKV}) {
    EngineConfig c = make_config(m, Shape{2, 4, 2, 64}, DType::kF32);
    c.budget = 4096;
    EXPECT_LT(run_churn(c, test::test_seed() + 30, 30), 1e-5) << mode_name(m);
  }
  EngineStats st;
  EXPECT_LT(
      run_peaked(make_config(Mode::kClusterKV, Shape{}, DType::kF32), test::test_seed() + 31, &st),
      0.05);
  EXPECT_GT(st.recall_hits, 0);
}

TEST(Engine, SmallBudgetRecallsTheClustersThatMatter) {
  EngineStats st;
  EXPECT_LT(run_peaked(make_config(Mode::kClusterKV, Shape{}), test::test_seed() + 4, &st), 0.05);
  // Sink + budget + window (at most 2W) per step and layer, against 2048+ rows.
  EXPECT_LE(st.rows_attended, 40 * (4 + 384 + 2 * 32));
  EXPECT_GT(st.recall_hits, 0);
  EXPECT_GT(st.window_clusterings, 0);
}

TEST(Engine, LastSelectionListsEachHeadsClusters) { check_last_selection(Backend::kCpu); }

TEST(Engine, CommittedWindowClustersEnterTheCache) { check_window_admission(Backend::kCpu); }

TEST(Engine, MeanKeysRecallTheClusterThatHoldsTheAttention) {
  check_mean_key_scores(Backend::kCpu);
}

// admit_rows_host by hand: a window of 6 rows from position 5 of a ring of 8 (slots 5 6 7 0 1 2),
// labels 1 0 1 1 0 1, pages of 2 rows; cluster 0 (rows 1, 4) goes to page 3, cluster 1 (rows 0,
// 2, 3, 5) to pages 0 and 2, each in window order; page 1 is not written. A second item admits
// only its cluster 1 (cluster 0's page range is empty).
TEST(Engine, AdmittedRowsLandInWindowOrderInTheirClustersPages) {
  constexpr int32_t kRow = 16, kPage = 2, kPages = 6;
  std::vector<std::byte> ring_k(8 * kRow), ring_v(8 * kRow), k_pool(kPages * kPage * kRow),
      v_pool(k_pool.size());
  for (int slot = 0; slot < 8; ++slot) {
    std::fill_n(ring_k.begin() + slot * kRow, kRow, std::byte(1 + slot));
    std::fill_n(ring_v.begin() + slot * kRow, kRow, std::byte(101 + slot));
  }
  scheduler::AdmitItem items[2];
  for (scheduler::AdmitItem& it : items) {
    it.ring_k = ring_k.data();
    it.ring_v = ring_v.data();
    it.k_pool = k_pool.data();
    it.v_pool = v_pool.data();
    it.begin = 5;
    it.win_cap = 8;
  }
  const int32_t labels[] = {1, 0, 1, 1, 0, 1, /* item 1 */ 0, 0, 1, 1, 1, 0};
  const int32_t page_off[] = {0, 1, 3, /* item 1 */ 3, 3, 5};
  const int32_t pages[] = {3, 0, 2, /* item 1 */ 4, 5};
  scheduler::AdmitParams p;
  p.count = 2;
  p.window = 6;
  p.clusters = 2;
  p.page_size = kPage;
  p.row_bytes = kRow;
  p.items = items;
  p.labels = labels;
  p.page_off = page_off;
  p.pages = pages;
  scheduler::admit_rows_host(p);
  auto k_at = [&](int page, int row) {
    return static_cast<int>(k_pool[(page * kPage + row) * kRow]);
  };
  auto v_at = [&](int page, int row) {
    return static_cast<int>(v_pool[(page * kPage + row) * kRow]);
  };
  // Item 0. Window row i is at slot (5 + i) % 8, whose K bytes are 1 + slot.
  EXPECT_EQ(k_at(3, 0), 1 + 6);  // cluster 0: rows 1, 4
  EXPECT_EQ(k_at(3, 1), 1 + 1);
  EXPECT_EQ(k_at(0, 0), 1 + 5);  // cluster 1: rows 0, 2, 3, 5
  EXPECT_EQ(k_at(0, 1), 1 + 7);
  EXPECT_EQ(k_at(2, 0), 1 + 0);
  EXPECT_EQ(k_at(2, 1), 1 + 2);
  EXPECT_EQ(v_at(2, 1), 101 + 2);
  EXPECT_EQ(k_at(1, 0), 0);
  EXPECT_EQ(k_at(1, 1), 0);
  // Item 1: cluster 1 is rows 2, 3, 4 (slots 7, 0, 1) on pages 4 and 5.
  EXPECT_EQ(k_at(4, 0), 1 + 7);
  EXPECT_EQ(k_at(4, 1), 1 + 0);
  EXPECT_EQ(k_at(5, 0), 1 + 1);
  EXPECT_EQ(v_at(5, 0), 101 + 1);
  EXPECT_EQ(k_at(5, 1), 0);
}

TEST(Engine, StatsAndTelemetryAddUp) {
  EngineConfig c = make_config(Mode::kClusterKV, Shape{});
  c.budget = 24;
  Driver d(c, test::test_seed() + 5);
  d.add(1, 150, true);
  d.add(2, 80, false);
  for (int t = 0; t < 40; ++t) d.step({1, 2});
  const EngineStats s = d.engine().stats();
  EXPECT_EQ(s.steps, 40);
  EXPECT_EQ(s.decode_layer_calls, 40 * 3);
  EXPECT_EQ(s.telemetry.hits, s.recall_hits);
  EXPECT_EQ(s.telemetry.misses, s.recall_misses);
  EXPECT_EQ(s.telemetry.bytes[static_cast<int>(scheduler::Direction::kHostToDevice)],
            s.host_read_bytes + s.fill_bytes);
  EXPECT_LE(s.fill_bytes, s.cache.bytes_fetched);  // misses of non-repeating steps are not filled
  EXPECT_GT(s.recall_hits, 0);                     // retention keeps recent clusters
  EXPECT_GT(s.recall_misses, 0);
  EXPECT_GT(s.host_bytes_used, 0u);
  EXPECT_EQ(d.engine().sequence_length(1, 0), 190);
  EXPECT_EQ(d.engine().sequence_length(2, 2), 120);
}

// A traced run: the file holds every event the totals count (nothing dropped), one step event per
// end_step, the link measured at the start, the policy's timed work and the caches' occupancy;
// a trace stops and starts again on the same engine.
TEST(Engine, TraceFileHoldsEveryEventAndAddsUp) {
  EngineConfig c = make_config(Mode::kClusterKV, Shape{});
  c.budget = 24;
  c.telemetry_path = ::testing::TempDir() + "kvtier_engine_trace.jsonl";
  Driver d(c, test::test_seed() + 6);
  EXPECT_TRUE(d.engine().tracing());
  d.add(1, 150, true);
  d.add(2, 80, false);
  for (int t = 0; t < 30; ++t) d.step({1, 2});
  d.engine().stop_trace();
  EXPECT_FALSE(d.engine().tracing());
  const EngineStats s = d.engine().stats();
  auto field = [](const std::string& line, const std::string& key) -> int64_t {
    const size_t at = line.find("\"" + key + "\":");
    return at == std::string::npos ? 0 : std::stoll(line.substr(at + key.size() + 3));
  };
  auto is = [](const std::string& line, const std::string& kind) {
    return line.find("\"kind\":\"" + kind + "\"") != std::string::npos;
  };
  std::ifstream f(c.telemetry_path);
  std::string line;
  int64_t hits = 0, misses = 0, h2d = 0, steps = 0, links = 0, policy = 0, occupancy = 0, lines = 0;
  bool footer = false;
  while (std::getline(f, line)) {
    ++lines;
    if (is(line, "lookup")) {
      hits += field(line, "hits");
      misses += field(line, "misses");
    }
    if ((is(line, "fetch") || is(line, "lookup")) && line.find("\"h2d\"") != std::string::npos)
      h2d += field(line, "bytes");
    steps += is(line, "step");
    links += is(line, "link");
    policy += is(line, "span") && line.find("\"op\":\"policy\"") != std::string::npos;
    if (is(line, "occupancy")) {
      ++occupancy;
      EXPECT_LE(field(line, "bytes"), field(line, "total"));
      EXPECT_GT(field(line, "total"), 0);
    }
    if (is(line, "end")) {
      footer = true;
      EXPECT_EQ(field(line, "dropped"), 0);
      EXPECT_EQ(field(line, "events"), lines - 2);  // all but the header and the footer
    }
  }
  EXPECT_TRUE(footer);
  EXPECT_EQ(hits, s.recall_hits);
  EXPECT_EQ(misses, s.recall_misses);
  EXPECT_EQ(h2d, s.host_read_bytes + s.fill_bytes);
  EXPECT_EQ(steps, 30);
  EXPECT_EQ(links, 1);  // kCpu: one host copy
  const int64_t recall_layers = c.model.num_layers - c.num_dense_layers;
  EXPECT_EQ(policy, 30 * recall_layers);
  EXPECT_EQ(occupancy, policy);
  EXPECT_EQ(s.telemetry.dropped, 0);
  // Again on the same engine; a second start while one runs is refused.
  const std::string again = ::testing::TempDir() + "kvtier_engine_trace2.jsonl";
  d.engine().start_trace(again);
  EXPECT_THROW(d.engine().start_trace(again), InvalidArgumentError);
  d.step({1, 2});
  d.engine().stop_trace();
  std::ifstream g(again);
  int64_t steps2 = 0;
  while (std::getline(g, line)) steps2 += is(line, "step");
  EXPECT_EQ(steps2, 1);
  std::remove(c.telemetry_path.c_str());
  std::remove(again.c_str());
  EXPECT_THROW(d.engine().start_trace("/nonexistent-dir/t.jsonl"), Error);
  EXPECT_FALSE(d.engine().tracing());
}

// total_budget: every recall problem attends exactly `budget` rows a step (sink, window and
// recalled clusters together) once the context is longer, in clusterkv and in hybrid (DBAC's
// resident rows counted too); a budget covering the context still equals dense attention.
TEST(Engine, TotalBudgetAttendsExactlyTheBudget) {
  EngineConfig c = make_config(Mode::kClusterKV, Shape{});
  c.num_dense_layers = 0;
  c.total_budget = true;
  c.budget = 96;
  Driver d(c, test::test_seed() + 7);
  d.add(1, 400, true);
  constexpr int kSteps = 30;
  for (int t = 0; t < kSteps; ++t) d.step({1});
  EXPECT_EQ(d.engine().stats().rows_attended,
            int64_t{kSteps} * c.model.num_layers * c.model.num_kv_heads * 96);
  // hybrid: 2 layers, 1 KV head, 12 steps (run_clusterattn); DBAC keeps about 24 rows.
  EngineConfig h = make_config(Mode::kHybrid, Shape{});
  h.total_budget = true;
  h.budget = 160;
  h.resident_budget = 24;
  EngineStats st;
  EXPECT_LT(run_clusterattn(h, test::test_seed() + 8, &st), 0.05);
  EXPECT_EQ(st.rows_attended, 12 * 2 * 160);
  EngineConfig full = make_config(Mode::kClusterKV, Shape{});
  full.total_budget = true;
  full.budget = 4096;
  EXPECT_LT(run_churn(full, test::test_seed() + 9, 30), kTol);
}

// ---- clusterattn ----

TEST(Engine, ClusterAttnKeepingEveryRowEqualsDense) {
  // Every position a core point (ratio 0) and a budget over the prompt: nothing is dropped.
  EngineConfig c = make_config(Mode::kClusterAttn, Shape{});
  c.budget = 4096;
  c.dbac_min_density_ratio = 0.f;
  EngineStats st;
  EXPECT_LT(run_clusterattn(c, test::test_seed() + 20, &st), kTol);
  EXPECT_EQ(st.rows_attended, 2 * 12 * (2048 + 6) + 2 * 12 * 13 / 2 - 2 * 12 * 6);
}

TEST(Engine, ClusterAttnKeepsWhatTheWindowAttends) {
  EngineConfig c = make_config(Mode::kClusterAttn, Shape{});
  c.budget = 160;  // the two attended segments (2 x 64) with DBAC's border points
  EngineStats st;
  EXPECT_LT(run_clusterattn(c, test::test_seed() + 21, &st), 0.05);
  // Sink + at most the budget + the window, plus the decoded rows, against 2048+ rows.
  EXPECT_LE(st.rows_attended, 2 * 12 * (4 + 160 + 16) + 2 * 12 * 13 / 2);
  EXPECT_GT(st.rows_attended, 2 * 12 * (4 + 100 + 16));
}

// What DBAC leaves of the budget keeps the rows just before the observation window: a layer
// keeps exactly the budget (one KV head here), and the answer stays as good.
TEST(Engine, ClusterAttnFillsTheBudgetWithRecentRows) {
  EngineConfig c = make_config(Mode::kClusterAttn, Shape{});
  c.budget = 400;  // more than DBAC picks on these two segments
  c.dbac_fill_recent = false;
  EngineStats off, on;
  EXPECT_LT(run_clusterattn(c, test::test_seed() + 24, &off), 0.05);
  c.dbac_fill_recent = true;
  EXPECT_LT(run_clusterattn(c, test::test_seed() + 24, &on), 0.05);
  // Sink + budget + observation window per layer and step, plus the decoded rows (1..12).
  EXPECT_EQ(on.rows_attended, 2 * 12 * (4 + 400 + 16) + 2 * 12 * 13 / 2);
  EXPECT_LT(off.rows_attended, on.rows_attended);
}

// dbac_recent_share holds part of the budget for the most recent prompt rows: as many rows are
// kept, but DBAC picks from fewer of the segments the queries aim at, so attention moves away
// from the dense result; an out-of-range share is refused.
TEST(Engine, ClusterAttnRecentShareKeepsTheTotalAndTakesFromDbac) {
  EngineConfig c = make_config(Mode::kClusterAttn, Shape{});
  c.budget = 400;
  EngineStats all_dbac, mostly_recent;
  const double err_dbac = run_clusterattn(c, test::test_seed() + 25, &all_dbac);
  c.dbac_recent_share = 0.9f;
  const double err_recent = run_clusterattn(c, test::test_seed() + 25, &mostly_recent);
  EXPECT_EQ(mostly_recent.rows_attended, all_dbac.rows_attended);
  EXPECT_LT(err_dbac, 0.05);
  EXPECT_GT(err_recent, 2 * err_dbac);
  c.dbac_recent_share = 1.f;
  EXPECT_THROW(validate(c), InvalidArgumentError);
}

TEST(Engine, HybridWithARecallBudgetCoveringTheContextEqualsDense) {
  // DBAC's rows stay resident and every other row is recalled: each row is attended once.
  EngineConfig c = make_config(Mode::kHybrid, Shape{});
  c.budget = 4096;
  c.window = 8;  // decoded rows are clustered and recalled too
  c.window_clusters = 2;
  EngineStats st;
  EXPECT_LT(run_clusterattn(c, test::test_seed() + 22, &st), kTol);
  EXPECT_GT(st.window_clusterings, 0);
}

TEST(Engine, HybridKeepsDbacRowsAndRecallsTheRest) {
  for (const bool mean_keys : {false, true}) {
    SCOPED_TRACE(mean_keys ? "mean keys" : "unit centroids");
    EngineConfig c = make_config(Mode::kHybrid, Shape{});
    c.budget = 160;
    c.mean_key_scores = mean_keys;
    EngineStats st;
    EXPECT_LT(run_clusterattn(c, test::test_seed() + 23, &st), 0.05);
    EXPECT_GT(st.recall_hits + st.recall_misses, 0);
    // Resident DBAC rows + at most the budget recalled + the window, against 2048+ rows.
    EXPECT_LE(st.rows_attended, 2 * 12 * (4 + 176 + 160 + 2 * 16 + 12));
  }
}

TEST(EngineErrors, ClusterAttnAndHybridNeedTheWindow) {
  EngineConfig c = make_config(Mode::kClusterAttn, Shape{});
  Engine e(c);
  e.add_sequence(1);
  std::vector<uint16_t> k(2 * 40 * 64);
  const memory::KvRows rows{k.data(), k.data(), DType::kF16, 2, 64, 40, -1, -1};
  e.prefill_layer(1, 0, rows);  // a dense layer needs no window
  EXPECT_THROW(e.prefill_layer(1, 1, rows), InvalidArgumentError);
  c.mode = Mode::kHybrid;
  Engine h(c);
  h.add_sequence(1);
  h.prefill_layer(1, 0, rows);
  EXPECT_THROW(h.prefill_layer(1, 1, rows), InvalidArgumentError);
  if (cuda::built_with_cuda()) {  // both modes run on either backend
    for (const Mode m : {Mode::kClusterAttn, Mode::kHybrid}) {
      c.mode = m;
      c.backend = Backend::kCuda;
      EXPECT_NO_THROW(validate(c));
    }
  }
}

TEST(EngineErrors, Fp32NeedsTheCpuBackend) {
  EngineConfig c = make_config(Mode::kClusterKV, Shape{}, DType::kF32);
  EXPECT_NO_THROW(validate(c));
  c.backend = Backend::kCuda;
  try {
    validate(c);
    FAIL();
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("fp32 on the CPU backend"), std::string::npos) << e.what();
  }
}

TEST(EngineErrors, BadConfigNamesTheField) {
  auto msg = [](EngineConfig c) {
    try {
      validate(c);
    } catch (const InvalidArgumentError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const EngineConfig ok = make_config(Mode::kClusterKV, Shape{});
  EXPECT_EQ(msg(ok), "");
  EngineConfig c = ok;
  c.budget = 0;
  EXPECT_NE(msg(c).find("budget"), std::string::npos);
  c = ok;
  c.model.head_dim = 96;
  EXPECT_NE(msg(c).find("head_dim"), std::string::npos);
  c = ok;
  c.model.num_q_heads = 7;
  EXPECT_NE(msg(c).find("num_q_heads"), std::string::npos);
  c = ok;
  c.host_bytes_limit = 0;
  EXPECT_NE(msg(c).find("host_bytes_limit"), std::string::npos);
  c = ok;
  c.window_clusters = 0;
  EXPECT_NE(msg(c).find("window_clusters"), std::string::npos);
  EXPECT_THROW(parse_mode("sparse"), InvalidArgumentError);
  EXPECT_EQ(parse_mode("hybrid"), Mode::kHybrid);
}

TEST(EngineErrors, BadCallsThrowAndChangeNothing) {
  const EngineConfig c = make_config(Mode::kClusterKV, Shape{});
  Driver d(c, test::test_seed() + 6);
  d.add(1, 40, true);
  Engine& e = d.engine();
  EXPECT_THROW(e.add_sequence(1), InvalidArgumentError);
  EXPECT_THROW(e.remove_sequence(99), NotFoundError);
  std::vector<uint16_t> x(8 * 64), out(8 * 64);
  const SeqId unknown = 42, one = 1;
  DecodeBatch b{&unknown, 1, x.data(), x.data(), x.data(), out.data()};
  EXPECT_THROW(e.decode_layer(0, b), NotFoundError);
  b.seqs = &one;
  EXPECT_THROW(e.decode_layer(7, b), InvalidArgumentError);
  const SeqId twice[] = {1, 1};
  DecodeBatch b2{twice, 2, x.data(), x.data(), x.data(), out.data()};
  EXPECT_THROW(e.decode_layer(0, b2), InvalidArgumentError);
  memory::KvRows rows{x.data(), x.data(), DType::kF16, 2, 64, 1, -1, -1};
  EXPECT_THROW(e.prefill_layer(1, 0, rows), InvalidArgumentError);  // already prefilled
  rows.dtype = DType::kBF16;
  EXPECT_THROW(e.prefill_layer(1, 0, rows), InvalidArgumentError);
  for (SeqId s = 2; s <= 4; ++s) e.add_sequence(s);
  EXPECT_THROW(e.add_sequence(5), CapacityError);
  // The sequence is intact: decoding still equals dense attention.
  for (SeqId s = 2; s <= 4; ++s) e.remove_sequence(s);
  EXPECT_EQ(e.sequence_length(1, 0), 40);
  EXPECT_LT(d.step({1}), kTol);
}

}  // namespace
}  // namespace kvtier
