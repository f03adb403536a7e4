// The engine on the CUDA backend, against dense attention over every row (the same oracle as the
// CPU suite) and against the CPU backend: full mode, clusterkv with a budget covering the
// context, bf16, and recall with a small budget.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "scheduler/engine.h"
#include "scheduler/engine_kernels.h"
#include "tests/scheduler/engine_driver.h"

#if KVTIER_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace kvtier {
namespace {

using namespace test_engine;

EngineConfig gpu_config(Mode mode, const Shape& s, DType dtype = DType::kF16) {
  EngineConfig c = make_config(mode, s, dtype);
  c.backend = Backend::kCuda;
  return c;
}

TEST(EngineGpu, FullModeEqualsDenseAttention) {
  KVTIER_REQUIRE_GPU();
  EXPECT_LT(run_churn(gpu_config(Mode::kFull, Shape{}), test::test_seed(), 50), kTol);
}

TEST(EngineGpu, ClusterKVWithBudgetCoveringTheContextEqualsDense) {
  KVTIER_REQUIRE_GPU();
  EngineConfig c = gpu_config(Mode::kClusterKV, Shape{});
  c.budget = 4096;
  EXPECT_LT(run_churn(c, test::test_seed() + 1, 60), kTol);
}

// More clusters per head than one block selects (one row per cluster: 4100 > 4096): the
// prologue, then scoring, a segmented sort and the chunk builder as separate launches.
TEST(EngineGpu, ClusterKVWithMoreClustersThanOneBlockSelectsEqualsDense) {
  KVTIER_REQUIRE_GPU();
  EngineConfig c = gpu_config(Mode::kClusterKV, Shape{});
  c.budget = 4096;
  c.tokens_per_cluster = 1;
  EXPECT_LT(run_churn(c, test::test_seed() + 11, 30), kTol);
}

// A batch whose call block is larger than a kernel argument holds (72 sequences x 4 KV heads):
// the block is uploaded and the prologue reads it from device memory (no graph).
TEST(EngineGpu, ABatchTooLargeToPassByValueEqualsDense) {
  KVTIER_REQUIRE_GPU();
  EngineConfig c = gpu_config(Mode::kClusterKV, Shape{2, 8, 4, 64});
  c.budget = 4096;
  c.max_sequences = 72;
  c.max_batch = 72;
  c.host_bytes_limit = 256 << 20;
  Driver d(c, test::test_seed() + 12);
  std::vector<SeqId> all;
  for (SeqId id = 1; id <= 72; ++id) {
    d.add(id, 24 + static_cast<int64_t>(id % 5) * 7, id % 2 == 0);
    all.push_back(id);
  }
  double worst = 0;
  for (int t = 0; t < 6; ++t) worst = std::max(worst, d.step(all));
  EXPECT_LT(worst, kTol);
  EXPECT_EQ(d.engine().stats().graph_launches, 0);
}

TEST(EngineGpu, LastSelectionListsEachHeadsClusters) {
  KVTIER_REQUIRE_GPU();
  check_last_selection(Backend::kCuda);
}

TEST(EngineGpu, CommittedWindowClustersEnterTheCache) {
  KVTIER_REQUIRE_GPU();
  check_window_admission(Backend::kCuda);
}

TEST(EngineGpu, MeanKeysRecallTheClusterThatHoldsTheAttention) {
  KVTIER_REQUIRE_GPU();
  check_mean_key_scores(Backend::kCuda);
}

#if KVTIER_WITH_CUDA
// The admit_rows kernel against admit_rows_host, byte for byte: 6 items (windows of 256 rows
// starting anywhere in rings of 512, random labels over 4 clusters, one cluster of some items not
// admitted), pages of 16 rows of 256 bytes in a shuffled pool.
TEST(EngineGpu, AdmitRowsKernelEqualsTheHostVersion) {
  KVTIER_REQUIRE_GPU();
  constexpr int32_t kItems = 6, kW = 256, kC = 4, kP = 16, kRow = 256, kCap = 512;
  std::mt19937 rng(test::test_seed() + 62);
  std::vector<int32_t> labels(kItems * kW), page_off, pages;
  for (int32_t& l : labels) l = static_cast<int32_t>(rng() % kC);
  int32_t next_page = 0;
  for (int32_t b = 0; b < kItems; ++b) {
    std::vector<int32_t> rows(kC, 0);
    for (int32_t i = 0; i < kW; ++i) ++rows[labels[b * kW + i]];
    for (int32_t c = 0; c < kC; ++c) {
      page_off.push_back(static_cast<int32_t>(pages.size()));
      if (b % 2 == 1 && c == 2) continue;  // not admitted
      for (int32_t q = 0; q < (rows[c] + kP - 1) / kP; ++q) pages.push_back(next_page++);
    }
    page_off.push_back(static_cast<int32_t>(pages.size()));
  }
  std::shuffle(pages.begin(), pages.end(), rng);
  const size_t ring_bytes = static_cast<size_t>(kItems) * kCap * kRow;
  const size_t pool_bytes = static_cast<size_t>(next_page) * kP * kRow;
  std::vector<std::byte> ring_k(ring_bytes), ring_v(ring_bytes);
  for (auto& x : ring_k) x = std::byte(rng());
  for (auto& x : ring_v) x = std::byte(rng());
  std::vector<std::byte> k_host(pool_bytes, std::byte(0)), v_host(pool_bytes, std::byte(0));
  // Device copies of host vectors (RAII), and the pools zeroed like the host's.
  auto upload = [](const auto& h) {
    using T = typename std::decay_t<decltype(h)>::value_type;
    cuda::DeviceBuffer<T> d(h.size(), 0);
    test::upload_complete(d.get(), h.data(), h.size() * sizeof(T));
    return d;
  };
  const auto d_ring_k = upload(ring_k), d_ring_v = upload(ring_v);
  const auto d_k = upload(k_host), d_v = upload(v_host);
  const auto d_labels = upload(labels), d_off = upload(page_off), d_pages = upload(pages);
  std::vector<scheduler::AdmitItem> host_items(kItems), dev_items(kItems);
  for (int32_t b = 0; b < kItems; ++b) {
    const size_t at = static_cast<size_t>(b) * kCap * kRow;
    const int64_t begin = static_cast<int64_t>(rng() % 100000);
    host_items[b] = {
        ring_k.data() + at, ring_v.data() + at, k_host.data(), v_host.data(), begin, kCap};
    dev_items[b] = {d_ring_k.get() + at, d_ring_v.get() + at, d_k.get(), d_v.get(), begin, kCap};
  }
  const auto d_items = upload(dev_items);
  scheduler::AdmitParams p;
  p.count = kItems;
  p.window = kW;
  p.clusters = kC;
  p.page_size = kP;
  p.row_bytes = kRow;
  p.items = host_items.data();
  p.labels = labels.data();
  p.page_off = page_off.data();
  p.pages = pages.data();
  scheduler::admit_rows_host(p);
  p.items = d_items.get();
  p.labels = d_labels.get();
  p.page_off = d_off.get();
  p.pages = d_pages.get();
  scheduler::launch_admit_rows(p, nullptr);
  std::vector<std::byte> k_dev(pool_bytes), v_dev(pool_bytes);
  ASSERT_EQ(cudaMemcpy(k_dev.data(), d_k.get(), pool_bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(v_dev.data(), d_v.get(), pool_bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_TRUE(k_dev == k_host);
  EXPECT_TRUE(v_dev == v_host);
  EXPECT_NE(std::count(k_host.begin(), k_host.end(), std::byte(0)),
            static_cast<std::ptrdiff_t>(pool_bytes));  // rows were copied
}
#endif

TEST(EngineGpu, NoDenseLayers) {
  KVTIER_REQUIRE_GPU();
  EngineConfig c = gpu_config(Mode::kClusterKV, Shape{});
  c.budget = 4096;
  c.num_dense_layers = 0;
  EXPECT_LT(run_churn(c, test::test_seed() + 2, 40), kTol);
}

TEST(EngineGpu, Bf16AndHeadDim128) {
  KVTIER_REQUIRE_GPU();
  EngineConfig c = gpu_config(Mode::kClusterKV, Shape{2, 8, 2, 128}, DType::kBF16);
  c.budget = 4096;
  EXPECT_LT(run_churn(c, test::test_seed() + 4, 30), 2e-2);
}

TEST(EngineGpu, SmallBudgetRecallsWhatMattersAndMatchesTheCpuBackend) {
  KVTIER_REQUIRE_GPU();
  EngineStats gpu, cpu;
  const double g = run_peaked(gpu_config(Mode::kClusterKV, Shape{}), test::test_seed() + 5, &gpu);
  const double c = run_peaked(make_config(Mode::kClusterKV, Shape{}), test::test_seed() + 5, &cpu);
  EXPECT_LT(g, 0.05);
  EXPECT_LT(c, 0.05);
  EXPECT_LE(gpu.rows_attended, 40 * (4 + 384 + 2 * 32));
  EXPECT_GT(gpu.recall_hits, 0);
  EXPECT_GT(gpu.window_clusterings, 0);
  EXPECT_EQ(gpu.window_clusterings, cpu.window_clusterings);
  EXPECT_GT(gpu.gpu_bytes, 0u);
}

// The same at the Llama shape's head_dim and group (128, 4 query heads per KV head), where the
// fused kernel scores from the fp16 centroid copy loading each head's query values once per pass.
TEST(EngineGpu, SmallBudgetAtHeadDim128RecallsWhatMattersAsTheCpuBackendDoes) {
  KVTIER_REQUIRE_GPU();
  const Shape shape{2, 8, 2, 128};
  EngineConfig on_gpu = gpu_config(Mode::kClusterKV, Shape{}),
               on_cpu = make_config(Mode::kClusterKV, Shape{});
  // As in AttentionInsideTheSelectionKernel...: clusters per head within what one block selects.
  on_gpu.max_context = on_cpu.max_context = 2560;
  EngineStats gpu, cpu;
  const double g = run_peaked(on_gpu, test::test_seed() + 6, &gpu, shape);
  const double c = run_peaked(on_cpu, test::test_seed() + 6, &cpu, shape);
  EXPECT_LT(g, 0.05);
  EXPECT_LT(c, 0.05);
  EXPECT_GT(gpu.recall_hits, 0);
  EXPECT_EQ(gpu.window_clusterings, cpu.window_clusterings);
#if KVTIER_WITH_CUDA
  int device = 0, major = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), cudaSuccess);
  if (major >= 9) {
    EXPECT_GT(gpu.select_attend_layers, 0);
  }
#endif
}

// total_budget on the device (per-problem budgets through the call block, graphs included):
// every recall problem attends exactly the budget each step, as on the CPU backend.
TEST(EngineGpu, TotalBudgetAttendsExactlyTheBudgetAsTheCpuBackendDoes) {
  KVTIER_REQUIRE_GPU();
  for (const Backend b : {Backend::kCuda, Backend::kCpu}) {
    EngineConfig c = make_config(Mode::kClusterKV, Shape{});
    c.backend = b;
    c.num_dense_layers = 0;
    c.total_budget = true;
    c.budget = 96;
    Driver d(c, test::test_seed() + 7);
    d.add(1, 400, true);
    d.add(2, 300, false);
    for (int t = 0; t < 30; ++t) d.step({1, 2});
    d.engine().synchronize();  // the last step's policy job counts its rows
    EXPECT_EQ(d.engine().stats().rows_attended,
              int64_t{30} * 2 * c.model.num_layers * c.model.num_kv_heads * 96)
        << backend_name(b);
  }
}

// The graph path (a recall layer's kernels replayed with a new call block per launch) against
// the same kernels launched one by one, over sequences joining and leaving (several graphs per
// layer, one per batch size). With the budget covering the context both attend every row; only
// the order of clusters may differ (k-means ties), hence a tolerance of a few fp16 ulps.
TEST(EngineGpu, CudaGraphsGiveTheOutputsOfLaunchesOneByOne) {
  KVTIER_REQUIRE_GPU();
  EngineConfig c = gpu_config(Mode::kClusterKV, Shape{});
  c.budget = 4096;
  std::vector<float> graphs, eager;
  EngineStats with, without;
  EXPECT_LT(run_churn(c, test::test_seed() + 7, 60, &graphs, &with), kTol);
  c.cuda_graphs = false;
  EXPECT_LT(run_churn(c, test::test_seed() + 7, 60, &eager, &without), kTol);
  EXPECT_GT(with.graph_launches, 0);  // the graphs did run
  EXPECT_EQ(without.graph_launches, 0);
  ASSERT_EQ(graphs.size(), eager.size());
  double worst = 0;
  for (size_t i = 0; i < graphs.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::fabs(graphs[i] - eager[i])));
  }
  EXPECT_LT(worst, 2e-3);
}

// Attention inside the scoring-and-selection kernel (sm_90: each problem's cluster attends the
// chunk lists its CTA 0 just built, and merges its splits in shared memory) against the separate
// attention kernel (KVTIER_SELECT_ATTEND=0), over sequences joining and leaving, with a budget
// covering the context: both equal dense attention, and each other within 2 units in the last
// place of the dtype (the same sums in another order: their splits differ). Groups of 1, 2, 4, 5
// and 8 query heads (5: a tile of 8 with padding), head_dim 64 and 128, fp16 and bf16; on
// sm_90 every recall-layer decode runs fused. Then recall with a small budget, where the fused
// kernel reads the misses from host memory (and copies them into the cache): it keeps the attention
// mass as the separate kernel does. Both runs settle the engine after every step: when a
// window's clustering lands decides whether its rows are summed as window or as clusters, which
// moves sums by more than 2 ulps. (Small-budget selections depend on that landing too, so those
// two runs are compared by their error, not row by row.)
TEST(EngineGpu, AttentionInsideTheSelectionKernelGivesTheOutputsOfTheSeparateKernel) {
  KVTIER_REQUIRE_GPU();
  int major = 0;
#if KVTIER_WITH_CUDA
  int device = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), cudaSuccess);
#endif
  const auto expect_fused = [&](const EngineStats& with, const EngineStats& without) {
    if (major >= 9) {
      EXPECT_GT(with.select_attend_layers, 0);
    } else {
      EXPECT_EQ(with.select_attend_layers, 0);
    }
    EXPECT_EQ(without.select_attend_layers, 0);
  };
  // Every recall-layer decode of a run (each step decodes every layer).
  const auto recall_decodes = [](const EngineConfig& c, const EngineStats& st) {
    return st.decode_layer_calls / c.model.num_layers * (c.model.num_layers - c.num_dense_layers);
  };
  struct Case {
    Shape shape;
    DType dtype;
    double tol;  // against dense, and between the two
  };
  const Case cases[] = {
      {Shape{}, DType::kF16, kTol},
      {Shape{2, 8, 8, 64}, DType::kF16, kTol},
      {Shape{2, 8, 4, 128}, DType::kBF16, 2e-2},
      {Shape{2, 10, 2, 128}, DType::kBF16, 2e-2},
      {Shape{2, 16, 4, 128}, DType::kBF16, 2e-2},
      {Shape{2, 16, 2, 64}, DType::kF16, kTol},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE("Hq " + std::to_string(k.shape.Hq) + " Hkv " + std::to_string(k.shape.Hkv) +
                 " D " + std::to_string(k.shape.D));
    EngineConfig c = gpu_config(Mode::kClusterKV, k.shape, k.dtype);
    c.budget = 4096;
    std::vector<float> fused, apart;
    EngineStats with, without;
    {
      test::ScopedEnv env("KVTIER_SELECT_ATTEND", "1");
      EXPECT_LT(run_churn(c, test::test_seed() + 30, 40, &fused, &with, true), k.tol);
    }
    {
      test::ScopedEnv env("KVTIER_SELECT_ATTEND", "0");
      EXPECT_LT(run_churn(c, test::test_seed() + 30, 40, &apart, &without, true), k.tol);
    }
    expect_fused(with, without);
    if (major >= 9) {
      EXPECT_EQ(with.select_attend_layers, recall_decodes(c, with));
    }
    ASSERT_EQ(fused.size(), apart.size());
    // 2 eps of the larger value (2 to 4 ulps), at least of 2^-6 (near 0 the fp32 sums' own error
    // dominates); a NaN on either side fails.
    const double eps = k.dtype == DType::kBF16 ? 0x1p-7 : 0x1p-10;
    size_t worst = 0;
    double worst_excess = -1;
    for (size_t i = 0; i < fused.size(); ++i) {
      const double f = fused[i], a = apart[i];
      const double bound = 2 * eps * std::max({std::fabs(f), std::fabs(a), 0x1p-6});
      const double excess = std::isnan(f) || std::isnan(a) ? INFINITY : std::fabs(f - a) - bound;
      if (excess > worst_excess) {
        worst_excess = excess;
        worst = i;
      }
    }
    EXPECT_LE(worst_excess, 0.0) << "output " << worst << ": fused " << fused[worst]
                                 << ", separate " << apart[worst];
  }
  // run_peaked's window clusters hold one row each: a context of 2560 keeps the clusters per head
  // within what one block selects (4096), where the fused kernel runs.
  EngineConfig peaked = gpu_config(Mode::kClusterKV, Shape{});
  peaked.max_context = 2560;
  EngineStats with, without;
  double fused = 0, apart = 0;
  {
    test::ScopedEnv env("KVTIER_SELECT_ATTEND", "1");
    fused = run_peaked(peaked, test::test_seed() + 31, &with);
  }
  {
    test::ScopedEnv env("KVTIER_SELECT_ATTEND", "0");
    apart = run_peaked(peaked, test::test_seed() + 31, &without);
  }
  EXPECT_LT(fused, 0.05);
  EXPECT_LT(apart, 0.05);
  EXPECT_GT(with.recall_misses, 0);
  EXPECT_GT(with.recall_hits, 0);
  expect_fused(with, without);
}

TEST(EngineGpu, ClusterAttnKeepingEveryRowEqualsDense) {
  KVTIER_REQUIRE_GPU();
  EngineConfig c = gpu_config(Mode::kClusterAttn, Shape{});
  c.budget = 4096;
  c.dbac_min_density_ratio = 0.f;  // every position a core point: nothing is dropped
  EngineStats st;
  EXPECT_LT(run_clusterattn(c, test::test_seed() + 20, &st), kTol);
  EXPECT_EQ(st.rows_attended, 2 * 12 * (2048 + 6) + 2 * 12 * 13 / 2 - 2 * 12 * 6);
}

// Votes and DBAC on the device keep what the window attends, as on the CPU backend.
TEST(EngineGpu, ClusterAttnKeepsWhatTheWindowAttends) {
  KVTIER_REQUIRE_GPU();
  EngineConfig c = gpu_config(Mode::kClusterAttn, Shape{});
  c.budget = 160;  // the two attended segments (2 x 64) with DBAC's border points
  EngineStats gpu, cpu;
  EXPECT_LT(run_clusterattn(c, test::test_seed() + 21, &gpu), 0.05);
  c.backend = Backend::kCpu;
  EXPECT_LT(run_clusterattn(c, test::test_seed() + 21, &cpu), 0.05);
  for (const EngineStats* st : {&gpu, &cpu}) {
    EXPECT_LE(st->rows_attended, 2 * 12 * (4 + 160 + 16) + 2 * 12 * 13 / 2);
    EXPECT_GT(st->rows_attended, 2 * 12 * (4 + 100 + 16));
  }
  EXPECT_GT(gpu.gpu_kv_bytes, 0u);
  EXPECT_EQ(gpu.host_bytes_used, 0u);  // clusterattn drops what it does not keep
}

// hybrid on the device: DBAC's rows resident, the rest clustered by the GPU k-means and recalled.
TEST(EngineGpu, HybridWithARecallBudgetCoveringTheContextEqualsDense) {
  KVTIER_REQUIRE_GPU();
  EngineConfig c = gpu_config(Mode::kHybrid, Shape{});
  c.budget = 4096;
  c.window = 8;  // decoded rows are clustered and recalled too
  c.window_clusters = 2;
  EngineStats st;
  EXPECT_LT(run_clusterattn(c, test::test_seed() + 22, &st), kTol);
  EXPECT_GT(st.window_clusterings, 0);
}

TEST(EngineGpu, HybridKeepsDbacRowsAndRecallsTheRestAsTheCpuBackendDoes) {
  KVTIER_REQUIRE_GPU();
  for (const bool mean_keys : {false, true}) {
    SCOPED_TRACE(mean_keys ? "mean keys" : "unit centroids");
    EngineConfig c = gpu_config(Mode::kHybrid, Shape{});
    c.budget = 160;
    c.mean_key_scores = mean_keys;
    EngineStats gpu, cpu;
    EXPECT_LT(run_clusterattn(c, test::test_seed() + 23, &gpu), 0.05);
    c.backend = Backend::kCpu;
    EXPECT_LT(run_clusterattn(c, test::test_seed() + 23, &cpu), 0.05);
    for (const EngineStats* st : {&gpu, &cpu}) {
      EXPECT_GT(st->recall_hits + st->recall_misses, 0);
      // Resident DBAC rows + at most the budget recalled + the window, against 2048+ rows.
      EXPECT_LE(st->rows_attended, 2 * 12 * (4 + 176 + 160 + 2 * 16 + 12));
    }
    EXPECT_GT(gpu.host_bytes_used, 0u);  // unlike clusterattn, every row stays recallable
  }
}

TEST(EngineGpu, StatsAndTelemetryAddUp) {
  KVTIER_REQUIRE_GPU();
  EngineConfig c = gpu_config(Mode::kClusterKV, Shape{});
  c.budget = 24;
  Driver d(c, test::test_seed() + 6);
  d.add(1, 150, true);
  d.add(2, 80, false);
  for (int t = 0; t < 40; ++t) d.step({1, 2});
  d.engine().synchronize();
  const EngineStats s = d.engine().stats();
  EXPECT_EQ(s.telemetry.hits, s.recall_hits);
  EXPECT_EQ(s.telemetry.misses, s.recall_misses);
  EXPECT_EQ(s.telemetry.bytes[static_cast<int>(scheduler::Direction::kHostToDevice)],
            s.host_read_bytes + s.fill_bytes);
  EXPECT_GT(s.recall_hits, 0);
  EXPECT_GT(s.host_bytes_used, 0u);
  EXPECT_EQ(d.engine().sequence_length(1, 0), 190);
}

}  // namespace
}  // namespace kvtier
