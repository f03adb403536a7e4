// CPU tests of cluster scoring and selection: the reference against brute force on tiny inputs,
// its invariants on random inputs, the oneTBB path bitwise against the reference (1 and N
// threads), edge cases and the errors on bad input.
#include "kernels/cluster_select.h"

#include <gtest/gtest.h>
#include <tbb/global_control.h>
#include <tbb/info.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "tests/common/test_util.h"

namespace kvtier::kernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::string aggregation_name(ScoreAggregation a) {
  return a == ScoreAggregation::kMax ? "max" : "softmax_sum";
}
std::string overflow_name(BudgetOverflow o) {
  return o == BudgetOverflow::kSkip ? "skip" : "truncate";
}

/// Host arrays of one batch of problems.
struct Case {
  ClusterSelectParams p;
  uint64_t seed = 0;
  std::vector<float> queries, centroids;
  std::vector<int32_t> num_clusters, sizes, budgets;
  std::vector<float> scores;  // input of selection-only cases

  std::string describe() const {
    std::ostringstream os;
    os << "test_seed " << test::test_seed() << " (case seed " << seed << ") problems "
       << p.num_problems << " G " << p.group_size << " head_dim " << p.head_dim << " max_clusters "
       << p.max_clusters << " aggregation " << aggregation_name(p.aggregation) << " overflow "
       << overflow_name(p.overflow);
    return os.str();
  }
};

/// Outputs of one run.
struct Result {
  std::vector<float> scores;
  std::vector<int32_t> ids, rows, num_selected, total_rows;
};

/// Tensors over the case's inputs and the result's outputs (sized here).
ClusterSelectTensors tensors(Case& c, Result& r) {
  const size_t slots = static_cast<size_t>(c.p.num_problems) * c.p.max_clusters;
  r.scores.assign(slots, 12345.f);
  r.ids.assign(slots, 777);
  r.rows.assign(slots, 777);
  r.num_selected.assign(c.p.num_problems, 777);
  r.total_rows.assign(c.p.num_problems, 777);
  ClusterSelectTensors t;
  t.queries = c.queries.data();
  t.centroids = c.centroids.data();
  t.num_clusters = c.num_clusters.data();
  t.cluster_sizes = c.sizes.data();
  t.budgets = c.budgets.data();
  t.scores = r.scores.data();
  t.selected_ids = r.ids.data();
  t.selected_rows = r.rows.data();
  t.num_selected = r.num_selected.data();
  t.total_rows = r.total_rows.data();
  return t;
}

/// Tensors for selection only: scores come from the case.
ClusterSelectTensors select_tensors(Case& c, Result& r) {
  ClusterSelectTensors t = tensors(c, r);
  r.scores = c.scores;
  t.scores = r.scores.data();
  return t;
}

int64_t context_rows(const Case& c, int32_t problem) {
  int64_t total = 0;
  for (int32_t j = 0; j < c.num_clusters[problem]; ++j) {
    total += c.sizes[static_cast<size_t>(problem) * c.p.max_clusters + j];
  }
  return total;
}

/// Random sizes (about 10% empty) and budgets: 0, a share of the context, all of it, more.
void fill_sizes_and_budgets(Case& c, std::mt19937_64& rng) {
  const size_t slots = static_cast<size_t>(c.p.num_problems) * c.p.max_clusters;
  c.sizes.assign(slots, 0);
  for (int32_t& s : c.sizes) s = rng() % 10 == 0 ? 0 : 1 + static_cast<int32_t>(rng() % 40);
  c.budgets.resize(c.p.num_problems);
  for (int32_t i = 0; i < c.p.num_problems; ++i) {
    const int64_t ctx = context_rows(c, i);
    switch (i % 5) {
      case 0:
        c.budgets[i] = 0;
        break;
      case 1:
        c.budgets[i] = static_cast<int32_t>(ctx / 3);
        break;
      case 2:
        c.budgets[i] = static_cast<int32_t>(ctx);
        break;
      case 3:
        c.budgets[i] = static_cast<int32_t>(ctx + 17);
        break;
      default:
        c.budgets[i] = static_cast<int32_t>(rng() % (ctx + 1));
        break;
    }
  }
}

/// Random queries and centroids, N(0, 1); valid counts in [max/2, max], problem 0 full.
Case make_case(int32_t problems, int32_t G, int32_t head_dim, int32_t max_clusters,
               ScoreAggregation agg, BudgetOverflow overflow, uint64_t seed) {
  Case c;
  c.seed = seed;
  c.p.num_problems = problems;
  c.p.group_size = G;
  c.p.head_dim = head_dim;
  c.p.max_clusters = max_clusters;
  c.p.aggregation = agg;
  c.p.overflow = overflow;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  c.queries.resize(static_cast<size_t>(problems) * G * head_dim);
  for (float& x : c.queries) x = normal(rng);
  c.centroids.resize(static_cast<size_t>(problems) * max_clusters * head_dim);
  for (float& x : c.centroids) x = normal(rng);
  c.num_clusters.resize(problems);
  for (int32_t i = 0; i < problems; ++i) {
    c.num_clusters[i] =
        i == 0 ? max_clusters
               : max_clusters / 2 + static_cast<int32_t>(rng() % (max_clusters / 2 + 1));
  }
  fill_sizes_and_budgets(c, rng);
  return c;
}

/// A selection-only case with unique scores (unless `ties`: few distinct values, with -0 and +0).
Case make_select_case(int32_t problems, int32_t max_clusters, BudgetOverflow overflow,
                      uint64_t seed, bool ties) {
  Case c = make_case(problems, 1, 64, max_clusters, ScoreAggregation::kMax, overflow, seed);
  std::mt19937_64 rng(seed ^ 0x5eed);
  c.scores.assign(static_cast<size_t>(problems) * max_clusters, kNaN);  // padding is never read
  for (int32_t i = 0; i < problems; ++i) {
    std::set<float> used;
    for (int32_t j = 0; j < c.num_clusters[i]; ++j) {
      float s;
      if (ties) {
        const float pool[] = {-0.f, 0.f, 1.5f, -2.f, 3.25f, 1e-30f};
        s = pool[rng() % 6];
      } else {
        do {
          s = std::uniform_real_distribution<float>(-50.f, 50.f)(rng);
        } while (!used.insert(s).second);
      }
      c.scores[static_cast<size_t>(i) * max_clusters + j] = s;
    }
  }
  return c;
}

/// Brute-force selection of one problem: repeatedly take the best remaining cluster (highest
/// score, then lowest id) by a linear scan, applying the budget rules.
void brute_force_select(const Case& c, int32_t problem, std::vector<int32_t>* ids,
                        std::vector<int32_t>* rows) {
  const size_t row = static_cast<size_t>(problem) * c.p.max_clusters;
  const int32_t n = c.num_clusters[problem];
  std::vector<bool> used(n, false);
  int64_t left = c.budgets[problem];
  ids->clear();
  rows->clear();
  for (int32_t step = 0; step < n; ++step) {
    int32_t best = -1;
    for (int32_t j = 0; j < n; ++j) {
      if (used[j]) continue;
      if (best < 0 || c.scores[row + j] > c.scores[row + best]) best = j;
    }
    used[best] = true;
    const int32_t size = c.sizes[row + best];
    if (size == 0) continue;
    if (left == 0) break;
    if (size <= left) {
      ids->push_back(best);
      rows->push_back(size);
      left -= size;
    } else {
      if (c.p.overflow == BudgetOverflow::kSkip) break;
      ids->push_back(best);
      rows->push_back(static_cast<int32_t>(left));
      left = 0;
    }
  }
}

/// First index where two int arrays differ, or -1.
int64_t first_mismatch(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  }
  return -1;
}

void expect_same_selection(const Result& want, const Result& got, const std::string& config) {
  EXPECT_EQ(first_mismatch(want.num_selected, got.num_selected), -1) << config;
  EXPECT_EQ(first_mismatch(want.total_rows, got.total_rows), -1) << config;
  EXPECT_EQ(first_mismatch(want.ids, got.ids), -1) << config;
  EXPECT_EQ(first_mismatch(want.rows, got.rows), -1) << config;
}

/// Invariants of a selection of case c with scores `scores`.
void check_invariants(const Case& c, const std::vector<float>& scores, const Result& r) {
  for (int32_t i = 0; i < c.p.num_problems; ++i) {
    const size_t row = static_cast<size_t>(i) * c.p.max_clusters;
    const int32_t n = c.num_clusters[i], count = r.num_selected[i];
    const std::string where = c.describe() + " problem " + std::to_string(i);
    ASSERT_GE(count, 0) << where;
    ASSERT_LE(count, n) << where;
    int64_t sum = 0;
    std::set<int32_t> seen;
    for (int32_t k = 0; k < count; ++k) {
      const int32_t id = r.ids[row + k];
      ASSERT_GE(id, 0) << where << " slot " << k;
      ASSERT_LT(id, n) << where << " slot " << k;
      ASSERT_TRUE(seen.insert(id).second) << where << " slot " << k << " repeats " << id;
      const int32_t size = c.sizes[row + id];
      ASSERT_GT(r.rows[row + k], 0) << where << " slot " << k;
      if (k + 1 < count || c.p.overflow == BudgetOverflow::kSkip) {
        ASSERT_EQ(r.rows[row + k], size) << where << " slot " << k << ": not the full cluster";
      } else {
        ASSERT_LE(r.rows[row + k], size) << where << " slot " << k;
      }
      if (k > 0) {  // order: score non-increasing, equal scores by increasing id
        const float a = scores[row + r.ids[row + k - 1]], b = scores[row + id];
        ASSERT_TRUE(a > b || (a == b && r.ids[row + k - 1] < id)) << where << " slot " << k;
      }
      sum += r.rows[row + k];
    }
    for (int32_t k = count; k < c.p.max_clusters; ++k) {
      ASSERT_EQ(r.ids[row + k], -1) << where << " padding slot " << k;
      ASSERT_EQ(r.rows[row + k], 0) << where << " padding slot " << k;
    }
    ASSERT_EQ(sum, r.total_rows[i]) << where;
    ASSERT_LE(sum, c.budgets[i]) << where;
    const int64_t ctx = context_rows(c, i);
    if (c.p.overflow == BudgetOverflow::kTruncate) {
      ASSERT_EQ(sum, std::min<int64_t>(c.budgets[i], ctx)) << where;
    } else if (count < n) {
      // kSkip stops at the first non-empty unselected cluster in order: it must not have fit.
      int32_t next = -1;
      for (int32_t j = 0; j < n; ++j) {
        if (c.sizes[row + j] == 0 || seen.count(j)) continue;
        if (next < 0 || scores[row + j] > scores[row + next]) next = j;
      }
      if (next >= 0) {
        ASSERT_GT(sum + c.sizes[row + next], c.budgets[i]) << where;
      }
    }
  }
}

// ---- reference vs brute force ----

TEST(ClusterSelectRef, ScoresMatchBruteForceOnTinyCases) {
  for (const ScoreAggregation agg : {ScoreAggregation::kSoftmaxSum, ScoreAggregation::kMax}) {
    for (const int32_t G : {1, 2, 3}) {
      for (const int32_t k : {1, 2, 5}) {
        Case c = make_case(3, G, 64, k + 1, agg, BudgetOverflow::kTruncate,
                           test::test_seed() + G * 10 + k);
        Result r;
        score_clusters_ref(c.p, tensors(c, r));
        const long double scale = 1.0L / std::sqrt(64.0L);
        for (int32_t i = 0; i < c.p.num_problems; ++i) {
          const int32_t n = c.num_clusters[i];
          std::vector<long double> s(static_cast<size_t>(G) * n);
          for (int32_t g = 0; g < G; ++g) {
            for (int32_t j = 0; j < n; ++j) {
              long double dot = 0;
              for (int32_t d = 0; d < 64; ++d) {
                dot +=
                    static_cast<long double>(c.queries[(static_cast<size_t>(i) * G + g) * 64 + d]) *
                    c.centroids[(static_cast<size_t>(i) * c.p.max_clusters + j) * 64 + d];
              }
              s[g * n + j] = scale * dot;
            }
          }
          for (int32_t j = 0; j < n; ++j) {
            long double want = agg == ScoreAggregation::kMax ? -INFINITY : 0;
            for (int32_t g = 0; g < G; ++g) {
              if (agg == ScoreAggregation::kMax) {
                want = std::max(want, s[g * n + j]);
              } else {
                long double mx = -INFINITY, z = 0;
                for (int32_t jj = 0; jj < n; ++jj) mx = std::max(mx, s[g * n + jj]);
                for (int32_t jj = 0; jj < n; ++jj) z += std::exp(s[g * n + jj] - mx);
                want += std::exp(s[g * n + j] - mx) / z;
              }
            }
            const float got = r.scores[static_cast<size_t>(i) * c.p.max_clusters + j];
            ASSERT_NEAR(got, static_cast<double>(want),
                        1e-6 * std::fabs(static_cast<double>(want)) + 1e-7)
                << c.describe() << " problem " << i << " cluster " << j;
          }
          for (int32_t j = n; j < c.p.max_clusters; ++j) {
            ASSERT_EQ(r.scores[static_cast<size_t>(i) * c.p.max_clusters + j], -kInf)
                << "padding " << j << " " << c.describe();
          }
        }
      }
    }
  }
}

TEST(ClusterSelectRef, SelectionMatchesBruteForceOnTinyCases) {
  std::mt19937_64 rng(test::test_seed());
  for (int trial = 0; trial < 400; ++trial) {
    const int32_t k = 1 + trial % 6;
    const auto overflow = trial % 2 ? BudgetOverflow::kSkip : BudgetOverflow::kTruncate;
    Case c = make_select_case(4, k, overflow, test::test_seed() + trial, /*ties=*/trial % 3 == 0);
    for (int32_t& s : c.sizes) s = static_cast<int32_t>(rng() % 6);  // 0..5, often empty
    for (int32_t i = 0; i < c.p.num_problems; ++i) {
      c.budgets[i] = static_cast<int32_t>(rng() % (context_rows(c, i) + 3));
    }
    Result r;
    select_clusters_ref(c.p, select_tensors(c, r));
    for (int32_t i = 0; i < c.p.num_problems; ++i) {
      std::vector<int32_t> ids, rows;
      brute_force_select(c, i, &ids, &rows);
      const size_t row = static_cast<size_t>(i) * k;
      ASSERT_EQ(r.num_selected[i], static_cast<int32_t>(ids.size()))
          << c.describe() << " problem " << i << " trial " << trial;
      for (size_t s = 0; s < ids.size(); ++s) {
        ASSERT_EQ(r.ids[row + s], ids[s]) << c.describe() << " problem " << i << " slot " << s;
        ASSERT_EQ(r.rows[row + s], rows[s]) << c.describe() << " problem " << i << " slot " << s;
      }
    }
    check_invariants(c, c.scores, r);
  }
}

TEST(ClusterSelectRef, SkipStopsAtTheFirstClusterThatDoesNotFit) {
  // Scores order the clusters 0, 1, 2; sizes 5, 10, 2; budget 12.
  Case c;
  c.p.num_problems = 1;
  c.p.max_clusters = 3;
  c.num_clusters = {3};
  c.scores = {3.f, 2.f, 1.f};
  c.sizes = {5, 10, 2};
  c.budgets = {12};
  Result r;
  c.p.overflow = BudgetOverflow::kSkip;
  select_clusters_ref(c.p, select_tensors(c, r));
  EXPECT_EQ(r.num_selected[0], 1);
  EXPECT_EQ(r.total_rows[0], 5);  // cluster 2 would fit, but the scan stopped at cluster 1
  EXPECT_EQ(r.ids, (std::vector<int32_t>{0, -1, -1}));
  c.p.overflow = BudgetOverflow::kTruncate;
  select_clusters_ref(c.p, select_tensors(c, r));
  EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 1, -1}));
  EXPECT_EQ(r.rows, (std::vector<int32_t>{5, 7, 0}));
  EXPECT_EQ(r.total_rows[0], 12);
}

TEST(ClusterSelectRef, EmptyClustersArePassedOver) {
  Case c;
  c.p.num_problems = 1;
  c.p.max_clusters = 4;
  c.num_clusters = {4};
  c.scores = {4.f, 3.f, 2.f, 1.f};
  c.sizes = {0, 3, 0, 4};
  c.budgets = {5};
  Result r;
  c.p.overflow = BudgetOverflow::kTruncate;
  select_clusters_ref(c.p, select_tensors(c, r));
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 3, -1, -1}));
  EXPECT_EQ(r.rows, (std::vector<int32_t>{3, 2, 0, 0}));
  c.p.overflow = BudgetOverflow::kSkip;
  select_clusters_ref(c.p, select_tensors(c, r));
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, -1, -1, -1}));
  EXPECT_EQ(r.total_rows[0], 3);
}

// ---- invariants on random inputs ----

TEST(ClusterSelectRef, InvariantsOnRandomInputs) {
  for (const auto overflow : {BudgetOverflow::kTruncate, BudgetOverflow::kSkip}) {
    for (const int32_t k : {1, 2, 3, 17, 64, 257, 1000}) {
      for (const bool ties : {false, true}) {
        Case c = make_select_case(10, k, overflow, test::test_seed() + k, ties);
        Result r;
        select_clusters_ref(c.p, select_tensors(c, r));
        check_invariants(c, c.scores, r);
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST(ClusterSelectRef, PipelineInvariantsOnRandomData) {
  for (const auto agg : {ScoreAggregation::kSoftmaxSum, ScoreAggregation::kMax}) {
    for (const auto overflow : {BudgetOverflow::kTruncate, BudgetOverflow::kSkip}) {
      Case c = make_case(10, 4, 128, 200, agg, overflow, test::test_seed());
      Result r;
      score_and_select_clusters_ref(c.p, tensors(c, r));
      check_invariants(c, r.scores, r);
      if (HasFatalFailure()) return;
      if (agg == ScoreAggregation::kSoftmaxSum) {  // each head's softmax sums to 1
        for (int32_t i = 0; i < c.p.num_problems; ++i) {
          double sum = 0;
          for (int32_t j = 0; j < c.num_clusters[i]; ++j) sum += r.scores[i * 200 + j];
          EXPECT_NEAR(sum, 4.0, 1e-4) << c.describe() << " problem " << i;
        }
      }
    }
  }
}

// ---- the oneTBB path ----

void expect_cpu_equals_ref(Case& c) {
  Result want, got;
  score_and_select_clusters_ref(c.p, tensors(c, want));
  score_and_select_clusters_cpu(c.p, tensors(c, got));
  ASSERT_EQ(want.scores.size(), got.scores.size());
  EXPECT_EQ(test::first_difference(want.scores.data(), got.scores.data(),
                                   want.scores.size() * sizeof(float)),
            -1)
      << "scores differ (byte offset); " << c.describe();
  expect_same_selection(want, got, c.describe());
}

// A centroid table holding the problems' rows in another order (plus an unused row), read
// through centroid_rows, scores exactly like the contiguous layout, on both CPU paths.
TEST(ClusterSelectCentroidRows, IndirectRowsScoreLikeContiguousRows) {
  Case c = make_case(6, 4, 128, 50, ScoreAggregation::kSoftmaxSum, BudgetOverflow::kTruncate,
                     test::test_seed() + 99);
  Result want;
  score_clusters_ref(c.p, tensors(c, want));
  const size_t row = static_cast<size_t>(c.p.max_clusters) * c.p.head_dim;
  std::vector<int32_t> rows;  // row 0 stays NaN: reading it would poison the scores
  const std::vector<float> table = test::reversed_table(
      c.centroids, row, c.p.num_problems, 1, std::numeric_limits<float>::quiet_NaN(), rows);
  for (const bool fast : {false, true}) {
    Result got;
    ClusterSelectTensors t = tensors(c, got);
    t.centroids = table.data();
    t.centroid_rows = rows.data();
    if (fast) {
      score_clusters_cpu(c.p, t);
    } else {
      score_clusters_ref(c.p, t);
    }
    EXPECT_EQ(std::memcmp(got.scores.data(), want.scores.data(), want.scores.size() * 4), 0)
        << (fast ? "cpu " : "ref ") << c.describe();
  }
}

// Likewise for cluster sizes read through cluster_size_rows: the same selection on both CPU
// paths as with the contiguous sizes (the unused rows hold -1, which would be an error).
TEST(ClusterSelectCentroidRows, IndirectSizeRowsSelectLikeContiguousRows) {
  Case c = make_case(6, 4, 128, 50, ScoreAggregation::kSoftmaxSum, BudgetOverflow::kTruncate,
                     test::test_seed() + 98);
  Result want;
  score_and_select_clusters_ref(c.p, tensors(c, want));
  std::vector<int32_t> rows;
  std::vector<int32_t> table = test::reversed_table(c.sizes, static_cast<size_t>(c.p.max_clusters),
                                                    c.p.num_problems, 2, -1, rows);
  for (const bool fast : {false, true}) {
    Result got;
    ClusterSelectTensors t = tensors(c, got);
    t.cluster_sizes = table.data();
    t.cluster_size_rows = rows.data();
    if (fast) {
      score_and_select_clusters_cpu(c.p, t);
    } else {
      score_and_select_clusters_ref(c.p, t);
    }
    expect_same_selection(want, got, (fast ? "cpu " : "ref ") + c.describe());
  }
}

class ClusterSelectCpu
    : public ::testing::TestWithParam<std::tuple<int, int, ScoreAggregation, BudgetOverflow>> {};

TEST_P(ClusterSelectCpu, EqualsReferenceBitwise) {
  const auto [head_dim, G, agg, overflow] = GetParam();
  for (const int32_t k : {1, 7, 300}) {
    Case c = make_case(13, G, head_dim, k, agg, overflow, test::test_seed() + k);
    expect_cpu_equals_ref(c);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ClusterSelectCpu,
    ::testing::Combine(::testing::Values(64, 128, 256), ::testing::Values(1, 4, 8, 12),
                       ::testing::Values(ScoreAggregation::kSoftmaxSum, ScoreAggregation::kMax),
                       ::testing::Values(BudgetOverflow::kTruncate, BudgetOverflow::kSkip)),
    [](const auto& info) {
      return "d" + std::to_string(std::get<0>(info.param)) + "_g" +
             std::to_string(std::get<1>(info.param)) + "_" +
             aggregation_name(std::get<2>(info.param)) + "_" +
             overflow_name(std::get<3>(info.param));
    });

TEST(ClusterSelectCpuThreads, SameResultAtOneAndNThreads) {
  Case c = make_case(37, 8, 128, 500, ScoreAggregation::kSoftmaxSum, BudgetOverflow::kTruncate,
                     test::test_seed());
  Result one, many;
  {
    tbb::global_control limit(tbb::global_control::max_allowed_parallelism, 1);
    score_and_select_clusters_cpu(c.p, tensors(c, one));
  }
  {
    tbb::global_control limit(tbb::global_control::max_allowed_parallelism,
                              std::max(4, tbb::info::default_concurrency()));
    score_and_select_clusters_cpu(c.p, tensors(c, many));
  }
  EXPECT_EQ(test::first_difference(one.scores.data(), many.scores.data(),
                                   one.scores.size() * sizeof(float)),
            -1)
      << c.describe();
  expect_same_selection(one, many, c.describe());
}

TEST(ClusterSelectCpu, SelectionEqualsReferenceWithTies) {
  for (const auto overflow : {BudgetOverflow::kTruncate, BudgetOverflow::kSkip}) {
    for (const int32_t k : {1, 5, 300, 5000}) {
      Case c = make_select_case(6, k, overflow, test::test_seed() + k, /*ties=*/true);
      Result want, got;
      select_clusters_ref(c.p, select_tensors(c, want));
      select_clusters_cpu(c.p, select_tensors(c, got));
      expect_same_selection(want, got, c.describe());
    }
  }
}

// ---- edge cases ----

TEST(ClusterSelectEdge, SingleCluster) {
  Case c = make_case(5, 2, 64, 1, ScoreAggregation::kSoftmaxSum, BudgetOverflow::kTruncate,
                     test::test_seed());
  for (int32_t& n : c.num_clusters) n = 1;
  c.sizes = {7, 7, 7, 0, 7};
  c.budgets = {0, 3, 7, 100, 100};
  Result r;
  score_and_select_clusters_ref(c.p, tensors(c, r));
  for (int32_t i = 0; i < 5; ++i) EXPECT_FLOAT_EQ(r.scores[i], 2.f) << "softmax of one cluster";
  EXPECT_EQ(r.num_selected, (std::vector<int32_t>{0, 1, 1, 0, 1}));
  EXPECT_EQ(r.total_rows, (std::vector<int32_t>{0, 3, 7, 0, 7}));
  EXPECT_EQ(r.ids, (std::vector<int32_t>{-1, 0, 0, -1, 0}));
  expect_cpu_equals_ref(c);
}

TEST(ClusterSelectEdge, PaddingIsIgnored) {
  // The same problems stored with max_clusters 40 and 24, the padding full of garbage.
  for (const auto agg : {ScoreAggregation::kSoftmaxSum, ScoreAggregation::kMax}) {
    Case tight = make_case(6, 3, 64, 24, agg, BudgetOverflow::kTruncate, test::test_seed());
    Case wide = tight;
    wide.p.max_clusters = 40;
    wide.centroids.assign(static_cast<size_t>(6) * 40 * 64, kNaN);
    wide.sizes.assign(static_cast<size_t>(6) * 40, -5);
    for (int32_t i = 0; i < 6; ++i) {
      for (int32_t j = 0; j < 24; ++j) {
        std::copy_n(tight.centroids.begin() + (static_cast<size_t>(i) * 24 + j) * 64, 64,
                    wide.centroids.begin() + (static_cast<size_t>(i) * 40 + j) * 64);
        wide.sizes[i * 40 + j] = tight.sizes[i * 24 + j];
      }
    }
    Result a, b, b_cpu;
    score_and_select_clusters_ref(tight.p, tensors(tight, a));
    ASSERT_NO_THROW(score_and_select_clusters_ref(wide.p, tensors(wide, b))) << wide.describe();
    ASSERT_NO_THROW(score_and_select_clusters_cpu(wide.p, tensors(wide, b_cpu)));
    for (int32_t i = 0; i < 6; ++i) {
      EXPECT_EQ(a.num_selected[i], b.num_selected[i]) << "problem " << i;
      EXPECT_EQ(a.total_rows[i], b.total_rows[i]) << "problem " << i;
      for (int32_t j = 0; j < 24; ++j) {
        ASSERT_EQ(a.scores[i * 24 + j], b.scores[i * 40 + j])
            << "problem " << i << " cluster " << j;
        ASSERT_EQ(a.ids[i * 24 + j], b.ids[i * 40 + j]) << "problem " << i << " slot " << j;
        ASSERT_EQ(a.rows[i * 24 + j], b.rows[i * 40 + j]) << "problem " << i << " slot " << j;
      }
      for (int32_t j = 24; j < 40; ++j) {
        ASSERT_EQ(b.scores[i * 40 + j], -kInf);
        ASSERT_EQ(b.ids[i * 40 + j], -1);
        ASSERT_EQ(b.rows[i * 40 + j], 0);
      }
    }
    expect_same_selection(b, b_cpu, wide.describe());
  }
}

TEST(ClusterSelectEdge, BudgetZeroSelectsNothingAndLargeBudgetSelectsAllNonEmpty) {
  for (const auto overflow : {BudgetOverflow::kTruncate, BudgetOverflow::kSkip}) {
    Case c = make_select_case(4, 100, overflow, test::test_seed(), /*ties=*/false);
    c.budgets = {0, 0, std::numeric_limits<int32_t>::max(), 0};
    c.budgets[3] = static_cast<int32_t>(context_rows(c, 3));
    Result r;
    select_clusters_ref(c.p, select_tensors(c, r));
    for (const int32_t i : {0, 1}) {
      EXPECT_EQ(r.num_selected[i], 0);
      EXPECT_EQ(r.total_rows[i], 0);
    }
    for (const int32_t i : {2, 3}) {
      int32_t non_empty = 0;
      for (int32_t j = 0; j < c.num_clusters[i]; ++j) non_empty += c.sizes[i * 100 + j] > 0;
      EXPECT_EQ(r.num_selected[i], non_empty) << "problem " << i;
      EXPECT_EQ(r.total_rows[i], context_rows(c, i)) << "problem " << i;
    }
    check_invariants(c, c.scores, r);
  }
}

TEST(ClusterSelectEdge, AllEmptyAndNoClusters) {
  Case c = make_case(3, 2, 64, 8, ScoreAggregation::kSoftmaxSum, BudgetOverflow::kTruncate,
                     test::test_seed());
  c.num_clusters = {0, 8, 8};
  std::fill(c.sizes.begin() + 8, c.sizes.begin() + 16, 0);  // problem 1: every cluster empty
  c.budgets = {10, 10, 0};
  Result r;
  score_and_select_clusters_ref(c.p, tensors(c, r));
  EXPECT_EQ(r.num_selected, (std::vector<int32_t>{0, 0, 0}));
  EXPECT_EQ(r.total_rows, (std::vector<int32_t>{0, 0, 0}));
  for (int32_t j = 0; j < 8; ++j) EXPECT_EQ(r.scores[j], -kInf) << "problem 0 has no clusters";
  expect_cpu_equals_ref(c);
}

TEST(ClusterSelectEdge, SignedZerosAreOneValue) {
  Case c;
  c.p.num_problems = 1;
  c.p.max_clusters = 4;
  c.num_clusters = {4};
  c.scores = {-0.f, 0.f, -0.f, 1.f};
  c.sizes = {1, 1, 1, 1};
  c.budgets = {4};
  Result want, got;
  select_clusters_ref(c.p, select_tensors(c, want));
  select_clusters_cpu(c.p, select_tensors(c, got));
  EXPECT_EQ(want.ids, (std::vector<int32_t>{3, 0, 1, 2}));
  expect_same_selection(want, got, "signed zeros");
}

TEST(ClusterSelectEdge, DefaultScaleIsInverseSqrtHeadDim) {
  Case c = make_case(4, 4, 128, 50, ScoreAggregation::kSoftmaxSum, BudgetOverflow::kTruncate,
                     test::test_seed());
  Result a, b;
  score_clusters_ref(c.p, tensors(c, a));
  c.p.scale = 1.f / std::sqrt(128.f);
  score_clusters_ref(c.p, tensors(c, b));
  EXPECT_EQ(test::first_difference(a.scores.data(), b.scores.data(), a.scores.size() * 4), -1);
  c.p.scale = 0.5f;
  score_clusters_ref(c.p, tensors(c, b));
  EXPECT_NE(test::first_difference(a.scores.data(), b.scores.data(), a.scores.size() * 4), -1);
}

TEST(ClusterSelectEdge, ZeroProblemsIsANoOp) {
  ClusterSelectParams p;
  p.group_size = 1;
  p.head_dim = 64;
  p.max_clusters = 4;
  EXPECT_NO_THROW(score_and_select_clusters_ref(p, ClusterSelectTensors{}));
  EXPECT_NO_THROW(score_and_select_clusters_cpu(p, ClusterSelectTensors{}));
}

// ---- errors ----

/// Runs `f` and returns the InvalidArgumentError message ("" if nothing was thrown).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const InvalidArgumentError& e) {
    return e.what();
  }
  return "";
}

TEST(ClusterSelectErrors, NonFiniteInputNamesProblemAndIndex) {
  for (const float v : {kNaN, kInf, -kInf}) {
    Case base = make_case(6, 3, 64, 10, ScoreAggregation::kSoftmaxSum, BudgetOverflow::kTruncate,
                          test::test_seed());
    base.num_clusters[4] = 10;
    // A centroid of problem 4, cluster 6, dim 9; and (later problem) a query of problem 5.
    Case c = base;
    c.centroids[(static_cast<size_t>(4) * 10 + 6) * 64 + 9] = v;
    c.queries[(static_cast<size_t>(5) * 3 + 1) * 64 + 2] = v;
    Result r;
    const std::string ref = error_of([&] { score_clusters_ref(c.p, tensors(c, r)); });
    const std::string cpu = error_of([&] { score_clusters_cpu(c.p, tensors(c, r)); });
    EXPECT_NE(ref.find("problem 4: centroid 6 dim 9 is"), std::string::npos) << ref;
    EXPECT_EQ(ref, cpu);
    // Queries are checked before centroids.
    c.queries[(static_cast<size_t>(4) * 3 + 2) * 64 + 63] = v;
    const std::string ref_q = error_of([&] { score_clusters_ref(c.p, tensors(c, r)); });
    EXPECT_NE(ref_q.find("problem 4: query head 2 dim 63 is"), std::string::npos) << ref_q;
    EXPECT_EQ(ref_q, error_of([&] { score_and_select_clusters_cpu(c.p, tensors(c, r)); }));
    // Scores handed to the selection.
    Case s = make_select_case(5, 20, BudgetOverflow::kTruncate, test::test_seed(), false);
    s.num_clusters[3] = 20;
    for (int32_t j = 0; j < 20; ++j) s.scores[3 * 20 + j] = 100.f + j;  // all valid now
    s.scores[3 * 20 + 11] = v;
    const std::string sel = error_of([&] { select_clusters_ref(s.p, select_tensors(s, r)); });
    EXPECT_NE(sel.find("problem 3: score of cluster 11 is"), std::string::npos) << sel;
    EXPECT_EQ(sel, error_of([&] { select_clusters_cpu(s.p, select_tensors(s, r)); }));
  }
}

TEST(ClusterSelectErrors, MaxScoreOverflowingFloatIsReported) {
  Case c =
      make_case(2, 1, 64, 3, ScoreAggregation::kMax, BudgetOverflow::kTruncate, test::test_seed());
  c.p.scale = 1.f;
  std::fill(c.queries.begin() + 64, c.queries.end(), 1e30f);
  std::fill(c.centroids.begin() + 3 * 64, c.centroids.end(), 1e30f);
  Result r;
  const std::string ref = error_of([&] { score_clusters_ref(c.p, tensors(c, r)); });
  EXPECT_NE(ref.find("problem 1: score of cluster 0 is inf (overflows float)"), std::string::npos)
      << ref;
  EXPECT_EQ(ref, error_of([&] { score_clusters_cpu(c.p, tensors(c, r)); }));
}

TEST(ClusterSelectErrors, BadPerProblemValues) {
  Case base = make_select_case(4, 8, BudgetOverflow::kTruncate, test::test_seed(), false);
  Result r;
  auto both = [&](Case& c, const std::string& expect) {
    const std::string ref = error_of([&] { select_clusters_ref(c.p, select_tensors(c, r)); });
    EXPECT_NE(ref.find(expect), std::string::npos) << ref;
    EXPECT_EQ(ref, error_of([&] { select_clusters_cpu(c.p, select_tensors(c, r)); }));
  };
  Case c = base;
  c.num_clusters[2] = 9;
  both(c, "problem 2: num_clusters 9 out of [0, 8]");
  c = base;
  c.num_clusters[1] = -1;
  both(c, "problem 1: num_clusters -1 out of [0, 8]");
  c = base;
  c.budgets[3] = -4;
  both(c, "problem 3: budget must be >= 0, got -4");
  c = base;
  c.sizes[8 + 2] = -1;
  both(c, "problem 1: size of cluster 2 must be >= 0, got -1");
  // Lowest problem first, whatever the thread order.
  c.budgets[3] = -4;
  both(c, "problem 1:");

  Case s =
      make_case(3, 2, 64, 5, ScoreAggregation::kMax, BudgetOverflow::kTruncate, test::test_seed());
  s.num_clusters[1] = 6;
  EXPECT_NE(error_of([&] {
              score_clusters_cpu(s.p, tensors(s, r));
            }).find("problem 1: num_clusters 6 out of [0, 5]"),
            std::string::npos);
}

TEST(ClusterSelectErrors, BadParams) {
  Case c = make_case(2, 2, 64, 4, ScoreAggregation::kSoftmaxSum, BudgetOverflow::kTruncate,
                     test::test_seed());
  Result r;
  auto expect_score_error = [&](ClusterSelectParams p, const std::string& expect) {
    const std::string ref = error_of([&] { score_clusters_ref(p, tensors(c, r)); });
    EXPECT_NE(ref.find(expect), std::string::npos) << ref;
    EXPECT_NE(error_of([&] { score_clusters_cpu(p, tensors(c, r)); }).find(expect),
              std::string::npos);
  };
  ClusterSelectParams p = c.p;
  p.head_dim = 96;
  expect_score_error(p, "unsupported head_dim 96");
  p = c.p;
  p.group_size = 0;
  expect_score_error(p, "group_size must be >= 1, got 0");
  p = c.p;
  p.max_clusters = 0;
  expect_score_error(p, "max_clusters must be >= 1, got 0");
  p = c.p;
  p.num_problems = -1;
  expect_score_error(p, "num_problems must be >= 0, got -1");
  p = c.p;
  p.scale = -1.f;
  expect_score_error(p, "scale must be finite and >= 0");
  p = c.p;
  p.scale = kNaN;
  expect_score_error(p, "scale must be finite and >= 0");
  ClusterSelectTensors t = tensors(c, r);
  t.centroids = nullptr;
  EXPECT_THROW(score_clusters_ref(c.p, t), InvalidArgumentError);
  EXPECT_THROW(score_clusters_cpu(c.p, t), InvalidArgumentError);
  t = tensors(c, r);
  t.budgets = nullptr;
  EXPECT_THROW(select_clusters_ref(c.p, t), InvalidArgumentError);
  EXPECT_THROW(select_clusters_cpu(c.p, t), InvalidArgumentError);
  p = c.p;
  p.max_clusters = 0;
  EXPECT_THROW(select_clusters_cpu(p, tensors(c, r)), InvalidArgumentError);
}

TEST(ClusterSelectRound, CentroidsRoundToTheNearestFp16ValueWithTheirCopy) {
  // Known values: ties to even, subnormals, overflow, signs; then the copy's bits, the padding
  // and a null copy.
  const float tiny = std::ldexp(1.f, -24);  // the smallest fp16 subnormal
  const std::vector<std::pair<float, float>> known = {
      {1.f, 1.f},
      {1.f + 1.f / 2048.f, 1.f},                  // halfway: to even (down)
      {1.f + 3.f / 2048.f, 1.f + 2.f / 1024.f},   // halfway: to even (up)
      {1.f + 1.1f / 2048.f, 1.f + 1.f / 1024.f},  // above halfway
      {-0.33333334f, -0.33325195f},
      {65504.f, 65504.f},
      {65520.f, kInf},  // halfway to the next binade: overflows
      {-1e6f, -kInf},
      {tiny * 0.5f, 0.f},         // halfway to zero: to even (zero)
      {tiny * 1.5f, tiny * 2.f},  // halfway: to even
      {tiny * 3.25f, tiny * 3.f},
      {1e-9f, 0.f},
      {-0.f, -0.f}};
  std::vector<float> v;
  for (const auto& [x, want] : known) v.push_back(x);
  std::vector<uint16_t> copy(v.size());
  round_centroids_fp16_cpu(v.data(), copy.data(), 1, static_cast<int64_t>(v.size()),
                           static_cast<int64_t>(v.size()));
  for (size_t i = 0; i < known.size(); ++i) {
    EXPECT_EQ(v[i], known[i].second) << "input " << known[i].first;
    EXPECT_EQ(std::signbit(v[i]), std::signbit(known[i].second)) << "input " << known[i].first;
  }
  EXPECT_EQ(copy[0], 0x3c00);                 // 1
  EXPECT_EQ(copy[6], 0x7c00);                 // +inf
  EXPECT_EQ(copy[7], 0xfc00);                 // -inf
  EXPECT_EQ(copy[9], 0x0002);                 // 2 x the smallest subnormal
  EXPECT_EQ(copy[known.size() - 1], 0x8000);  // -0

  // Random rows with padding: every result is an fp16 value nearest its input (within half a
  // unit in the last place), rounding again changes nothing, the padding stays.
  const int64_t rows = 3, cols = 500, stride = 512;
  std::mt19937_64 rng(test::test_seed() + 5);
  std::vector<float> in(static_cast<size_t>(rows * stride));
  for (float& x : in) x = std::uniform_real_distribution<float>(-1.f, 1.f)(rng);
  std::vector<float> out = in;
  round_centroids_fp16_cpu(out.data(), nullptr, rows, cols, stride);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < stride; ++i) {
      const size_t k = static_cast<size_t>(r * stride + i);
      if (i >= cols) {
        ASSERT_EQ(out[k], in[k]);
        continue;
      }
      int e = 0;
      (void)std::frexp(in[k], &e);
      const double ulp = std::ldexp(1.0, std::max(e, -13) - 11);
      ASSERT_LE(std::fabs(static_cast<double>(out[k]) - in[k]), ulp / 2) << in[k];
    }
  }
  std::vector<float> again = out;
  round_centroids_fp16_cpu(again.data(), nullptr, rows, cols, stride);
  EXPECT_EQ(again, out);
  EXPECT_THROW(round_centroids_fp16_cpu(out.data(), nullptr, 1, 10, 5), InvalidArgumentError);
}

TEST(ClusterSelectPlan, ClustersAreHalvedUntilTheDeviceHoldsThemAll) {
  // An H100's occupancy for one block per multiprocessor (132 of them, one graphics processing
  // cluster short of 16): 7 clusters of 16 at once, 15 of 8, 30 of 4, 66 of 2, 132 of 1.
  auto h100 = [](int c) {
    switch (c) {
      case 16:
        return 7;
      case 8:
        return 15;
      case 4:
        return 30;
      case 2:
        return 66;
      default:
        return 132;
    }
  };
  auto all_fit = [](int) { return true; };
  EXPECT_EQ(detail::co_resident_cluster_size(8, 8, h100, all_fit), 8);  // a batch of one: unchanged
  EXPECT_EQ(detail::co_resident_cluster_size(8, 16, h100, all_fit), 8);  // 7 of 16 at once
  EXPECT_EQ(detail::co_resident_cluster_size(16, 8, h100, all_fit), 4);  // batch 2: 15 of 8 at once
  EXPECT_EQ(detail::co_resident_cluster_size(32, 4, h100, all_fit), 2);  // batch 4: 30 of 4 at once
  EXPECT_EQ(detail::co_resident_cluster_size(132, 1, h100, all_fit), 1);
  EXPECT_EQ(detail::co_resident_cluster_size(500, 4, h100, all_fit),
            4);  // none holds them: unchanged
  // A smaller size whose shared memory does not fit ends the search.
  auto from_4 = [](int c) { return c >= 4; };
  EXPECT_EQ(detail::co_resident_cluster_size(16, 8, h100, from_4), 4);
  EXPECT_EQ(detail::co_resident_cluster_size(32, 8, h100, from_4), 8);
  auto none = [](int) { return 0; };  // a failed query: the size stays
  EXPECT_EQ(detail::co_resident_cluster_size(8, 8, none, all_fit), 8);
}

}  // namespace
}  // namespace kvtier::kernels
