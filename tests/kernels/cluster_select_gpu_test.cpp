// GPU tests of cluster scoring and selection against the CPU reference:
//   selection    exactly the reference's on the same scores (unique or tied), for every tier of the
//                block kernel and the segmented fallback above 4096 clusters; the radix select's
//                edge cases (budgets on cluster boundaries, equal scores, the candidate cap and the
//                full-sort fallback, rows beyond 32 bits, unaligned rows)
//   scoring      within rtol 1e-5 / atol 1e-6 of the reference (cached and recomputed logits,
//                one or several head tiles)
//   split        scoring folded into selection: scores within the split tolerance, the selection
//                exactly the reference's on them; size rows read through an index; no scores
//   pipeline     ids exactly the reference's on data whose logits are exact in fp32 (small
//                integers, scale 1/8); on Gaussian data the GPU selection equals the reference
//                selection of the GPU's own scores
//   non-finite   the flag names the lowest bad problem, which selects nothing; others unaffected
// Each test starts with KVTIER_REQUIRE_GPU(); without CUDA the binary builds and the tests skip.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#if KVTIER_WITH_CUDA
#include <cuda_runtime.h>
#endif

#include "kernels/cluster_select.h"
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
  std::vector<float> scores;            // input of selection-only runs
  std::vector<int32_t> centroid_rows;   // optional: `centroids` is a table read through these
  std::vector<int32_t> size_rows;       // optional: `sizes` is a table read through these
  std::vector<uint16_t> centroids_f16;  // optional: the centroids' fp16 copy (centroids_f16)

  std::string describe() const {
    std::ostringstream os;
    os << "test_seed " << test::test_seed() << " (case seed " << seed << ") problems "
       << p.num_problems << " G " << p.group_size << " head_dim " << p.head_dim << " max_clusters "
       << p.max_clusters << " aggregation " << aggregation_name(p.aggregation) << " overflow "
       << overflow_name(p.overflow) << " scale " << p.scale;
    return os.str();
  }
};

struct Result {
  std::vector<float> scores;
  std::vector<int32_t> ids, rows, num_selected, total_rows;
  int32_t nonfinite_problem = 0;
};

int64_t context_rows(const Case& c, int32_t problem) {
  int64_t total = 0;
  for (int32_t j = 0; j < c.num_clusters[problem]; ++j) {
    total += c.sizes[static_cast<size_t>(problem) * c.p.max_clusters + j];
  }
  return total;
}

enum class Data { kGaussian, kSmallIntegers };

/// Queries and centroids N(0, 1), or integers in {-1, 0, 1} (every fp32 dot product is then
/// exact). Valid counts in [max/2, max], problem 0 full; sizes 1..40 with ~10% empty; budgets 0,
/// a third of the context, all of it, more, random.
Case make_case(int32_t problems, int32_t G, int32_t head_dim, int32_t max_clusters,
               ScoreAggregation agg, BudgetOverflow overflow, uint64_t seed,
               Data data = Data::kGaussian) {
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
  auto value = [&] {
    return data == Data::kGaussian ? normal(rng)
                                   : static_cast<float>(static_cast<int>(rng() % 3) - 1);
  };
  c.queries.resize(static_cast<size_t>(problems) * G * head_dim);
  for (float& x : c.queries) x = value();
  c.centroids.resize(static_cast<size_t>(problems) * max_clusters * head_dim);
  for (float& x : c.centroids) x = value();
  c.num_clusters.resize(problems);
  for (int32_t i = 0; i < problems; ++i) {
    c.num_clusters[i] =
        i == 0 ? max_clusters
               : max_clusters / 2 + static_cast<int32_t>(rng() % (max_clusters / 2 + 1));
  }
  c.sizes.resize(static_cast<size_t>(problems) * max_clusters);
  for (int32_t& s : c.sizes) s = rng() % 10 == 0 ? 0 : 1 + static_cast<int32_t>(rng() % 40);
  c.budgets.resize(problems);
  for (int32_t i = 0; i < problems; ++i) {
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
  return c;
}

/// Selection-only case: unique scores, or (ties) few distinct values including -0 and +0.
/// Padding scores are NaN: they must never be read.
Case make_select_case(int32_t problems, int32_t max_clusters, BudgetOverflow overflow,
                      uint64_t seed, bool ties) {
  Case c = make_case(problems, 1, 64, max_clusters, ScoreAggregation::kMax, overflow, seed);
  std::mt19937_64 rng(seed ^ 0x5eed);
  c.scores.assign(static_cast<size_t>(problems) * max_clusters, kNaN);
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

ClusterSelectTensors host_tensors(Case& c, Result& r) {
  const size_t slots = static_cast<size_t>(c.p.num_problems) * c.p.max_clusters;
  r.scores.resize(slots);
  r.ids.resize(slots);
  r.rows.resize(slots);
  r.num_selected.resize(c.p.num_problems);
  r.total_rows.resize(c.p.num_problems);
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

Result ref_pipeline(Case c) {
  Result r;
  score_and_select_clusters_ref(c.p, host_tensors(c, r));
  return r;
}

Result ref_select(Case c, const std::vector<float>& scores) {
  Result r;
  ClusterSelectTensors t = host_tensors(c, r);
  r.scores = scores;
  t.scores = r.scores.data();
  select_clusters_ref(c.p, t);
  return r;
}

Result ref_scores(Case c) {
  Result r;
  score_clusters_ref(c.p, host_tensors(c, r));
  return r;
}

int64_t first_mismatch(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  }
  return -1;
}

/// Exact equality of the four selection outputs, restricted to problems `keep` (all if empty).
void expect_same_selection(const Case& c, const Result& want, const Result& got,
                           const std::vector<bool>& keep = {}) {
  const int32_t K = c.p.max_clusters;
  for (int32_t i = 0; i < c.p.num_problems; ++i) {
    if (!keep.empty() && !keep[i]) continue;
    ASSERT_EQ(want.num_selected[i], got.num_selected[i]) << c.describe() << " problem " << i;
    ASSERT_EQ(want.total_rows[i], got.total_rows[i]) << c.describe() << " problem " << i;
    const std::vector<int32_t> wi(want.ids.begin() + i * K, want.ids.begin() + (i + 1) * K),
        gi(got.ids.begin() + i * K, got.ids.begin() + (i + 1) * K),
        wr(want.rows.begin() + i * K, want.rows.begin() + (i + 1) * K),
        gr(got.rows.begin() + i * K, got.rows.begin() + (i + 1) * K);
    ASSERT_EQ(first_mismatch(wi, gi), -1)
        << "first bad slot of selected_ids; " << c.describe() << " problem " << i;
    ASSERT_EQ(first_mismatch(wr, gr), -1)
        << "first bad slot of selected_rows; " << c.describe() << " problem " << i;
  }
}

/// `scores` with the padding slots (j >= num_clusters) set to -inf, as scoring writes them (the
/// split score-and-select writes only the valid ones).
std::vector<float> with_padding(const Case& c, std::vector<float> scores) {
  for (int32_t i = 0; i < c.p.num_problems; ++i) {
    for (int32_t j = c.num_clusters[i]; j < c.p.max_clusters; ++j) {
      scores[static_cast<size_t>(i) * c.p.max_clusters + j] = -kInf;
    }
  }
  return scores;
}

/// fp32 tolerance of the style guide: |got - want| <= 1e-6 + 1e-5 |want|; padding exactly -inf.
void expect_scores_close(const Case& c, const std::vector<float>& want,
                         const std::vector<float>& got, const std::vector<bool>& keep = {}) {
  ASSERT_EQ(want.size(), got.size());
  double max_err = 0;
  int64_t first_bad = -1;
  for (int32_t i = 0; i < c.p.num_problems; ++i) {
    if (!keep.empty() && !keep[i]) continue;
    for (int32_t j = 0; j < c.p.max_clusters; ++j) {
      const size_t k = static_cast<size_t>(i) * c.p.max_clusters + j;
      if (j >= c.num_clusters[i]) {
        if (!(got[k] == -kInf) && first_bad < 0) first_bad = static_cast<int64_t>(k);
        continue;
      }
      const double err = std::fabs(static_cast<double>(got[k]) - want[k]);
      max_err = std::max(max_err, err);
      if (!(err <= 1e-6 + 1e-5 * std::fabs(want[k])) && first_bad < 0) {
        first_bad = static_cast<int64_t>(k);
      }
    }
  }
  EXPECT_EQ(first_bad, -1) << "first bad score index (problem * max_clusters + cluster); max error "
                           << max_err << "; " << c.describe();
}

#if KVTIER_WITH_CUDA

template <typename T>
cuda::DeviceBuffer<T> upload(const std::vector<T>& v, cudaStream_t stream) {
  cuda::DeviceBuffer<T> b(std::max<size_t>(v.size(), 1), 0);
  if (!v.empty()) cuda::memcpy_async(b.get(), v.data(), v.size() * sizeof(T), stream);
  return b;
}

template <typename T>
std::vector<T> download(const cuda::DeviceBuffer<T>& b, size_t n, cudaStream_t stream,
                        size_t offset = 0) {
  std::vector<T> v(n);
  if (n > 0) cuda::memcpy_async(v.data(), b.get() + offset, n * sizeof(T), stream);
  return v;
}

/// `v` uploaded after `offset` filler elements (the data starts at get() + offset).
template <typename T>
cuda::DeviceBuffer<T> upload_at(const std::vector<T>& v, size_t offset, T filler,
                                cudaStream_t stream) {
  std::vector<T> shifted(offset + v.size(), filler);
  std::copy(v.begin(), v.end(), shifted.begin() + static_cast<std::ptrdiff_t>(offset));
  return upload(shifted, stream);
}

enum class GpuStep {
  kScore,
  kSelect,
  kScoreThenSelect,
  kBoth,
  kScoreSplit,
  kScoreSelectSplit,         // launch_score_select_split, scores written
  kScoreSelectSplitNoScores  // the same with t.scores null (scores stay poisoned)
};

/// Runs `step` on the device. kSelect reads c.scores; the others score c's queries and
/// centroids. Outputs are poisoned first, so every slot the kernels should write is checked.
/// `misalign` elements shift the per-cluster arrays (scores, sizes, ids, rows) off their
/// allocations' 16-byte alignment.
Result run_on_gpu(const Case& c, GpuStep step, size_t misalign = 0) {
  cuda::Stream stream(0);
  const cudaStream_t s = stream.get();
  const size_t slots = static_cast<size_t>(c.p.num_problems) * c.p.max_clusters;
  auto queries = upload(c.queries, s);
  auto centroids = upload(c.centroids, s);
  auto centroids_f16 = upload(c.centroids_f16, s);
  auto centroid_rows =
      upload(c.centroid_rows.empty() ? std::vector<int32_t>{0} : c.centroid_rows, s);
  auto size_rows = upload(c.size_rows.empty() ? std::vector<int32_t>{0} : c.size_rows, s);
  auto num_clusters = upload(c.num_clusters, s);
  auto sizes = upload_at(c.sizes, misalign, int32_t{0}, s);
  auto budgets = upload(c.budgets, s);
  auto scores = step == GpuStep::kSelect
                    ? upload_at(c.scores, misalign, 0.f, s)
                    : upload_at(std::vector<float>(slots, 7.f), misalign, 0.f, s);
  auto ids = upload_at(std::vector<int32_t>(slots, 0x5a5a5a5a), misalign, int32_t{0}, s);
  auto rows = upload_at(std::vector<int32_t>(slots, 0x5a5a5a5a), misalign, int32_t{0}, s);
  auto num_selected = upload(std::vector<int32_t>(c.p.num_problems, 0x5a5a5a5a), s);
  auto total_rows = upload(std::vector<int32_t>(c.p.num_problems, 0x5a5a5a5a), s);
  auto flag = upload(std::vector<int32_t>{12345}, s);
  ClusterSelectTensors t;
  t.queries = queries.get();
  t.centroids = centroids.get();
  t.centroid_rows = c.centroid_rows.empty() ? nullptr : centroid_rows.get();
  t.centroids_f16 = c.centroids_f16.empty() ? nullptr : centroids_f16.get();
  t.num_clusters = num_clusters.get();
  t.cluster_sizes = sizes.get() + misalign;
  t.cluster_size_rows = c.size_rows.empty() ? nullptr : size_rows.get();
  t.budgets = budgets.get();
  t.scores = scores.get() + misalign;
  t.selected_ids = ids.get() + misalign;
  t.selected_rows = rows.get() + misalign;
  t.num_selected = num_selected.get();
  t.total_rows = total_rows.get();
  t.nonfinite_problem = flag.get();
  const size_t ws_bytes = select_clusters_workspace_bytes(c.p);
  cuda::DeviceBuffer<std::byte> workspace(std::max<size_t>(ws_bytes, 1), 0);
  switch (step) {
    case GpuStep::kScore:
      launch_score_clusters(c.p, t, s);
      break;
    case GpuStep::kScoreSplit: {
      const size_t bytes = score_clusters_split_workspace_bytes(c.p);
      cuda::DeviceBuffer<std::byte> logits(std::max<size_t>(bytes, 1), 0);
      launch_score_clusters_split(c.p, t, logits.get(), bytes, s);
      stream.synchronize();  // the logits buffer is freed below
      break;
    }
    case GpuStep::kScoreSelectSplit:
    case GpuStep::kScoreSelectSplitNoScores: {
      if (step == GpuStep::kScoreSelectSplitNoScores) t.scores = nullptr;
      const size_t bytes = score_select_split_workspace_bytes(c.p);
      cuda::DeviceBuffer<std::byte> split_ws(std::max<size_t>(bytes, 1), 0);
      launch_score_select_split(c.p, t, split_ws.get(), bytes, s);
      stream.synchronize();  // the workspace is freed below
      break;
    }
    case GpuStep::kSelect:
      launch_select_clusters(c.p, t, workspace.get(), ws_bytes, s);
      break;
    case GpuStep::kScoreThenSelect:
      launch_score_clusters(c.p, t, s);
      launch_select_clusters(c.p, t, workspace.get(), ws_bytes, s);
      break;
    case GpuStep::kBoth:
      launch_score_and_select_clusters(c.p, t, workspace.get(), ws_bytes, s);
      break;
  }
  Result r;
  r.scores = download(scores, slots, s, misalign);
  r.ids = download(ids, slots, s, misalign);
  r.rows = download(rows, slots, s, misalign);
  r.num_selected = download(num_selected, c.p.num_problems, s);
  r.total_rows = download(total_rows, c.p.num_problems, s);
  r.nonfinite_problem = download(flag, 1, s)[0];
  stream.synchronize();
  return r;
}

#endif  // KVTIER_WITH_CUDA

// ---- selection: exact, every tier ----

class ClusterSelectGpu : public ::testing::TestWithParam<int32_t> {};

TEST_P(ClusterSelectGpu, EqualsReferenceOnUniqueScores) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  const int32_t k = GetParam();
  for (const auto overflow : {BudgetOverflow::kTruncate, BudgetOverflow::kSkip}) {
    Case c = make_select_case(10, k, overflow, test::test_seed() + k, /*ties=*/false);
    const Result want = ref_select(c, c.scores);
    const Result got = run_on_gpu(c, GpuStep::kSelect);
    EXPECT_EQ(got.nonfinite_problem, -1) << c.describe();
    expect_same_selection(c, want, got);
  }
#endif
}

TEST_P(ClusterSelectGpu, EqualsReferenceWithTiesAndSignedZeros) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  const int32_t k = GetParam();
  for (const auto overflow : {BudgetOverflow::kTruncate, BudgetOverflow::kSkip}) {
    Case c = make_select_case(6, k, overflow, test::test_seed() + 7 * k, /*ties=*/true);
    expect_same_selection(c, ref_select(c, c.scores), run_on_gpu(c, GpuStep::kSelect));
  }
#endif
}

INSTANTIATE_TEST_SUITE_P(Clusters, ClusterSelectGpu,
                         ::testing::Values(1, 2, 3, 7, 20, 255, 256, 257, 1000, 4095, 4096, 4097,
                                           5000),
                         [](const auto& info) { return "k" + std::to_string(info.param); });

TEST(ClusterSelectGpuEdge, DeviceValuesAreClamped) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // On the device: num_clusters above max_clusters counts as max_clusters, below 0 as 0; a
  // negative budget as 0; a negative size as an empty cluster.
  for (const int32_t k : {100, 5000}) {
    Case c = make_select_case(4, k, BudgetOverflow::kTruncate, test::test_seed(), false);
    for (int32_t j = 0; j < k; ++j) c.scores[static_cast<size_t>(1) * k + j] = 1000.f + j;
    Case sane = c;
    c.num_clusters[1] = k + 50;
    sane.num_clusters[1] = k;
    c.num_clusters[2] = -3;
    sane.num_clusters[2] = 0;
    c.budgets[3] = -8;
    sane.budgets[3] = 0;
    c.sizes[0] = -2;
    sane.sizes[0] = 0;
    c.budgets[0] = 100000;
    sane.budgets[0] = 100000;
    expect_same_selection(c, ref_select(sane, sane.scores), run_on_gpu(c, GpuStep::kSelect));
  }
#endif
}

TEST(ClusterSelectGpuEdge, WorkspaceIsSizedAndChecked) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  ClusterSelectParams p;
  p.num_problems = 4;
  p.max_clusters = kMaxBlockSortClusters;
  EXPECT_EQ(select_clusters_workspace_bytes(p), 0u);
  p.max_clusters = kMaxBlockSortClusters + 1;
  const size_t need = select_clusters_workspace_bytes(p);
  EXPECT_GE(need, static_cast<size_t>(2 * 4 * (kMaxBlockSortClusters + 1) * sizeof(uint64_t)));
  Case c = make_select_case(4, kMaxBlockSortClusters + 1, BudgetOverflow::kTruncate,
                            test::test_seed(), false);
  cuda::Stream stream(0);
  cuda::DeviceBuffer<std::byte> small(need - 1, 0);
  ClusterSelectTensors t;  // never dereferenced: the workspace check comes first
  int32_t dummy = 0;
  t.scores = reinterpret_cast<float*>(&dummy);
  t.num_clusters = t.cluster_sizes = t.budgets = &dummy;
  t.selected_ids = t.selected_rows = t.num_selected = t.total_rows = &dummy;
  EXPECT_THROW(launch_select_clusters(c.p, t, small.get(), need - 1, stream.get()),
               InvalidArgumentError);
  EXPECT_THROW(launch_select_clusters(c.p, t, nullptr, 0, stream.get()), InvalidArgumentError);
#endif
}

// ---- selection: edge cases of the radix select (up to kMaxBlockSortClusters) ----

/// Rows of the first q non-empty clusters of `problem` in the reference's order (score
/// descending, ties to the lower id).
int64_t rows_of_top(const Case& c, int32_t problem, int32_t q) {
  const int32_t K = c.p.max_clusters, n = c.num_clusters[problem];
  const float* s = c.scores.data() + static_cast<size_t>(problem) * K;
  const int32_t* sizes = c.sizes.data() + static_cast<size_t>(problem) * K;
  std::vector<int32_t> order(n);
  for (int32_t j = 0; j < n; ++j) order[j] = j;
  std::sort(order.begin(), order.end(),
            [s](int32_t a, int32_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
  int64_t rows = 0;
  for (int32_t k = 0, taken = 0; k < n && taken < q; ++k) {
    if (sizes[order[k]] == 0) continue;
    rows += sizes[order[k]];
    ++taken;
  }
  return rows;
}

TEST(ClusterSelectGpuRadix, BudgetsOnClusterBoundaries) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // A budget equal to the rows of the top q clusters (the stopping cluster fits exactly), one
  // less (it is truncated or, under kSkip, ends the scan) and one more.
  const int32_t tops[] = {1, 2, 5, 17, 33, 64, 100, 129, 200, 511, 512, 513};
  for (const int32_t k : {300, 1000, 4096}) {
    for (const auto overflow : {BudgetOverflow::kTruncate, BudgetOverflow::kSkip}) {
      for (const bool ties : {false, true}) {
        Case c = make_select_case(36, k, overflow, test::test_seed() + 11 * k, ties);
        std::mt19937_64 rng(c.seed);
        for (int32_t& size : c.sizes) {
          size = rng() % 8 == 0 ? 0 : 1 + static_cast<int32_t>(rng() % 128);
        }
        for (int32_t i = 0; i < c.p.num_problems; ++i) {
          const int64_t rows = rows_of_top(c, i, tops[(i / 3) % 12]);
          c.budgets[i] = static_cast<int32_t>(std::max<int64_t>(0, rows + i % 3 - 1));
        }
        expect_same_selection(c, ref_select(c, c.scores), run_on_gpu(c, GpuStep::kSelect));
      }
    }
  }
#endif
}

TEST(ClusterSelectGpuRadix, EqualAndNearlyEqualScores) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // Keys that differ only in their id bits or in the last bits of the score: the threshold is
  // refined over several digits, and ids break the ties.
  for (const int32_t k : {256, 1000, 4096}) {
    for (const auto overflow : {BudgetOverflow::kTruncate, BudgetOverflow::kSkip}) {
      for (int variant = 0; variant < 3; ++variant) {
        Case c = make_select_case(8, k, overflow, test::test_seed() + 13 * k + variant, false);
        std::mt19937_64 rng(c.seed);
        for (int32_t i = 0; i < c.p.num_problems; ++i) {
          for (int32_t j = 0; j < c.num_clusters[i]; ++j) {
            float& s = c.scores[static_cast<size_t>(i) * k + j];
            if (variant == 0) {
              s = 0.5f;
            } else if (variant == 1) {
              s = rng() % 2 ? 0.f : -0.f;
            } else {
              s = std::nextafter(1.f + static_cast<float>(rng() % 3), 10.f) *
                  (1.f + std::numeric_limits<float>::epsilon() * static_cast<float>(rng() % 7));
            }
          }
          const int64_t budgets[] = {1, 40, 700, 2048, 5000, context_rows(c, i) - 1};
          c.budgets[i] = static_cast<int32_t>(std::max<int64_t>(0, budgets[i % 6]));
        }
        expect_same_selection(c, ref_select(c, c.scores), run_on_gpu(c, GpuStep::kSelect));
      }
    }
  }
#endif
}

TEST(ClusterSelectGpuRadix, CandidateCapAndFullSortFallback) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // Single-row clusters: a budget of b rows needs b clusters, so the candidates exceed the cap
  // (512) from b = 513 on and the block sorts every key. With mostly empty clusters a budget
  // above the context takes every live cluster: ranked when there are few, sorted when many.
  for (const int32_t k : {1000, 4096}) {
    for (const auto overflow : {BudgetOverflow::kTruncate, BudgetOverflow::kSkip}) {
      for (const bool ties : {false, true}) {
        Case c = make_select_case(14, k, overflow, test::test_seed() + 17 * k, ties);
        std::mt19937_64 rng(c.seed);
        const int32_t budgets[] = {1, 100, 511, 512, 513, 1000, 4000};
        for (int32_t i = 0; i < c.p.num_problems; ++i) {
          int32_t* sizes = c.sizes.data() + static_cast<size_t>(i) * k;
          if (i < 7) {
            for (int32_t j = 0; j < k; ++j) sizes[j] = 1;
            c.budgets[i] = budgets[i];
          } else {
            const int32_t empty_per_16 = i < 10 ? 15 : 4;  // ~1/16 or ~3/4 of clusters live
            for (int32_t j = 0; j < k; ++j) {
              sizes[j] = static_cast<int32_t>(rng() % 16) < empty_per_16
                             ? 0
                             : 1 + static_cast<int32_t>(rng() % 3);
            }
            const int64_t ctx = context_rows(c, i);
            c.budgets[i] = static_cast<int32_t>(i % 2 ? ctx : ctx + 5);
          }
        }
        expect_same_selection(c, ref_select(c, c.scores), run_on_gpu(c, GpuStep::kSelect));
      }
    }
  }
#endif
}

TEST(ClusterSelectGpuRadix, RowsBeyond32Bits) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // Sizes near 2^31: a histogram bucket's rows overflow 32 bits (the carry path).
  for (const int32_t k : {1000, 4096}) {
    for (const auto overflow : {BudgetOverflow::kTruncate, BudgetOverflow::kSkip}) {
      for (const bool ties : {false, true}) {
        Case c = make_select_case(6, k, overflow, test::test_seed() + 19 * k, ties);
        std::mt19937_64 rng(c.seed);
        for (int32_t& size : c.sizes) {
          size = rng() % 2
                     ? std::numeric_limits<int32_t>::max() - static_cast<int32_t>(rng() % 1000)
                     : static_cast<int32_t>(rng() % (1u << 30));
        }
        const int32_t budgets[] = {std::numeric_limits<int32_t>::max(),
                                   1 << 30,
                                   std::numeric_limits<int32_t>::max() - 1,
                                   12345,
                                   0,
                                   1};
        for (int32_t i = 0; i < c.p.num_problems; ++i) c.budgets[i] = budgets[i % 6];
        expect_same_selection(c, ref_select(c, c.scores), run_on_gpu(c, GpuStep::kSelect));
      }
    }
  }
#endif
}

TEST(ClusterSelectGpuRadix, UnalignedRowsUseScalarAccesses) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // Arrays shifted by one element: no vector loads or stores, same selection.
  for (const int32_t k : {256, 1024, 4096}) {
    for (const auto overflow : {BudgetOverflow::kTruncate, BudgetOverflow::kSkip}) {
      Case c = make_select_case(10, k, overflow, test::test_seed() + 23 * k, false);
      std::mt19937_64 rng(c.seed);
      for (int32_t i = 0; i < c.p.num_problems; ++i) {
        c.budgets[i] = static_cast<int32_t>(rng() % 3000);
      }
      const Result want = ref_select(c, c.scores);
      expect_same_selection(c, want, run_on_gpu(c, GpuStep::kSelect, /*misalign=*/1));
      expect_same_selection(c, want, run_on_gpu(c, GpuStep::kSelect));
    }
  }
#endif
}

// ---- scoring: fp32 tolerance ----

class ClusterSelectGpuScore
    : public ::testing::TestWithParam<std::tuple<int, int, ScoreAggregation>> {};

TEST_P(ClusterSelectGpuScore, MatchesReferenceWithinTolerance) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  const auto [head_dim, G, agg] = GetParam();
  for (const int32_t k : {1, 37, 1000}) {
    Case c = make_case(9, G, head_dim, k, agg, BudgetOverflow::kTruncate,
                       test::test_seed() + head_dim + G * 1000 + k);
    const Result got = run_on_gpu(c, GpuStep::kScore);
    EXPECT_EQ(got.nonfinite_problem, -1) << c.describe();
    expect_scores_close(c, ref_scores(c).scores, got.scores);
  }
#endif
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ClusterSelectGpuScore,
    ::testing::Combine(::testing::Values(64, 128, 256), ::testing::Values(1, 3, 4, 8, 12),
                       ::testing::Values(ScoreAggregation::kSoftmaxSum, ScoreAggregation::kMax)),
    [](const auto& info) {
      return "d" + std::to_string(std::get<0>(info.param)) + "_g" +
             std::to_string(std::get<1>(info.param)) + "_" +
             aggregation_name(std::get<2>(info.param));
    });

TEST(ClusterSelectGpuScoreEdge, RecomputedLogitsWhenTheCacheDoesNotFit) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // 8 heads x 8000 clusters of logits = 256 KiB: more than a block's shared memory, so the
  // softmax reads the centroids a second time. G = 20 also crosses three head tiles.
  for (const int32_t G : {8, 20}) {
    Case c = make_case(3, G, 128, 8000, ScoreAggregation::kSoftmaxSum, BudgetOverflow::kTruncate,
                       test::test_seed() + G);
    c.p.scale = 0.3f;
    const Result got = run_on_gpu(c, GpuStep::kScore);
    EXPECT_EQ(got.nonfinite_problem, -1);
    expect_scores_close(c, ref_scores(c).scores, got.scores);
  }
#endif
}

TEST_P(ClusterSelectGpuScore, SplitPathMatchesReferenceWithinTolerance) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  const auto [head_dim, G, agg] = GetParam();
  for (const int32_t k : {1, 37, 1000, 2050}) {
    Case c = make_case(5, G, head_dim, k, agg, BudgetOverflow::kTruncate,
                       test::test_seed() + head_dim + G * 1000 + k + 7);
    const Result got = run_on_gpu(c, GpuStep::kScoreSplit);
    EXPECT_EQ(got.nonfinite_problem, -1) << c.describe();
    expect_scores_close(c, ref_scores(c).scores, got.scores);
  }
#endif
}

TEST_P(ClusterSelectGpuScore, SplitScoreSelectEqualsReferenceOnItsScores) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // Scores aggregated inside the selection block: within the split tolerance of the reference,
  // and the selection exactly the reference's on those scores (every block tier).
  const auto [head_dim, G, agg] = GetParam();
  for (const int32_t k : {1, 37, 300, 1000, 2050, 4096}) {
    for (const auto overflow : {BudgetOverflow::kTruncate, BudgetOverflow::kSkip}) {
      Case c = make_case(6, G, head_dim, k, agg, overflow,
                         test::test_seed() + head_dim + G * 1000 + k + 13);
      const Result got = run_on_gpu(c, GpuStep::kScoreSelectSplit);
      EXPECT_EQ(got.nonfinite_problem, -1) << c.describe();
      expect_scores_close(c, ref_scores(c).scores, with_padding(c, got.scores));
      expect_same_selection(c, ref_select(c, got.scores), got);
    }
  }
#endif
}

TEST(ClusterSelectGpuScoreEdge, SplitScoreSelectIdsEqualReferenceOnExactLogits) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // As IdsEqualReferenceOnExactLogits: integer data, scale 1/8, so the ranking is exact.
  for (const auto agg : {ScoreAggregation::kSoftmaxSum, ScoreAggregation::kMax}) {
    for (const int32_t k : {300, 4096}) {
      const int32_t G = agg == ScoreAggregation::kMax ? 8 : 1;
      Case c = make_case(12, G, 128, k, agg, BudgetOverflow::kTruncate, test::test_seed() + k,
                         Data::kSmallIntegers);
      c.p.scale = 0.125f;
      const Result got = run_on_gpu(c, GpuStep::kScoreSelectSplitNoScores);
      EXPECT_EQ(got.nonfinite_problem, -1);
      expect_same_selection(c, ref_pipeline(c), got);
    }
  }
#endif
}

TEST(ClusterSelectGpuScoreEdge, EveryClusterSizeAndTheTwoKernelPathSelectTheSame) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // On sm_90 split score-and-select runs as one kernel of thread block clusters, each problem's
  // centroids split over its CTAs; KVTIER_CLUSTER_SELECT caps the cluster size (0: the split
  // logits kernel and the selection block). Every size runs (the plan says which, and the test
  // checks it took the size asked for), across the block tiers:
  // - on exact logits the selection is the reference's;
  // - with four query heads under softmax, the scores (whose per-head statistics are combined
  //   across the cluster's CTAs) are within the split tolerance of the reference and the
  //   selection is the reference's on them.
  int device = 0, major = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), cudaSuccess);
  for (const int32_t k : {200, 700, 4096}) {
    for (const int32_t problems : {3, 4}) {
      std::vector<std::pair<Case, bool>> cases;  // (case, exact logits)
      for (const auto agg : {ScoreAggregation::kSoftmaxSum, ScoreAggregation::kMax}) {
        Case c = make_case(problems, agg == ScoreAggregation::kMax ? 8 : 1, 128, k, agg,
                           BudgetOverflow::kTruncate, test::test_seed() + k + problems,
                           Data::kSmallIntegers);
        c.p.scale = 0.125f;
        cases.emplace_back(c, true);
      }
      cases.emplace_back(make_case(problems, 4, 128, k, ScoreAggregation::kSoftmaxSum,
                                   BudgetOverflow::kSkip, test::test_seed() + 7 * k + problems),
                         false);
      for (const int size : {0, 1, 2, 4, 8, 16}) {
        const std::string name = "KVTIER_CLUSTER_SELECT=" + std::to_string(size);
        SCOPED_TRACE(name);
        const test::ScopedEnv env("KVTIER_CLUSTER_SELECT", std::to_string(size));
        for (const auto& [c, exact] : cases) {
          SCOPED_TRACE(c.describe());
          const int32_t planned = detail::score_select_cluster_size(c.p);
          if (major >= 9 && size <= 8) {
            EXPECT_EQ(planned, size);  // 3 or 4 problems x 8 fill at most 32 multiprocessors
          } else if (major >= 9) {
            EXPECT_GE(planned, 8);  // 16 where the device schedules clusters beyond the portable 8
          } else {
            EXPECT_EQ(planned, 0);
          }
          if (exact) {
            const Result got = run_on_gpu(c, GpuStep::kScoreSelectSplitNoScores);
            EXPECT_EQ(got.nonfinite_problem, -1);
            expect_same_selection(c, ref_pipeline(c), got);
          } else {
            const Result got = run_on_gpu(c, GpuStep::kScoreSelectSplit);
            EXPECT_EQ(got.nonfinite_problem, -1);
            expect_scores_close(c, ref_scores(c).scores, with_padding(c, got.scores));
            expect_same_selection(c, ref_select(c, got.scores), got);
          }
        }
      }
    }
  }
#endif
}

TEST(ClusterSelectGpuScoreEdge, SplitScoreSelectReadsSizeRowsAndFlagsNonFinite) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  Case c = make_case(5, 4, 128, 700, ScoreAggregation::kSoftmaxSum, BudgetOverflow::kTruncate,
                     test::test_seed() + 17);
  const Result want = run_on_gpu(c, GpuStep::kScoreSelectSplit);
  // The same sizes as rows of a larger table, read through size_rows (rows 0 and 1 unused).
  Case d = c;
  const size_t row = static_cast<size_t>(c.p.max_clusters);
  d.sizes = test::reversed_table(c.sizes, row, c.p.num_problems, 2, 999, d.size_rows);
  const Result got = run_on_gpu(d, GpuStep::kScoreSelectSplitNoScores);
  EXPECT_EQ(got.nonfinite_problem, -1);
  expect_same_selection(c, want, got);
  EXPECT_EQ(got.scores, std::vector<float>(c.p.num_problems * row, 7.f));  // not written
  // A non-finite query (Inf, or NaN in one head, which a max over the heads would drop): that
  // problem selects nothing and is flagged, under either aggregation; the others are unchanged.
  for (const auto agg : {ScoreAggregation::kSoftmaxSum, ScoreAggregation::kMax}) {
    for (const float poison : {kInf, kNaN}) {
      Case e = c;
      e.p.aggregation = agg;
      const Result clean = run_on_gpu(e, GpuStep::kScoreSelectSplit);
      e.queries[2 * 4 * 128 + 5] = poison;
      const Result bad = run_on_gpu(e, GpuStep::kScoreSelectSplit);
      const std::string what = aggregation_name(agg) + (std::isnan(poison) ? " nan" : " inf");
      EXPECT_EQ(bad.nonfinite_problem, 2) << what;
      EXPECT_EQ(bad.num_selected[2], 0) << what;
      EXPECT_EQ(bad.total_rows[2], 0) << what;
      for (const int32_t p : {0, 1, 3, 4}) {
        EXPECT_EQ(bad.num_selected[p], clean.num_selected[p]) << what << " problem " << p;
        EXPECT_EQ(bad.total_rows[p], clean.total_rows[p]) << what << " problem " << p;
      }
    }
  }
  // Limits are checked on the host.
  Case big = make_case(1, 4, 128, kMaxBlockSortClusters + 4, ScoreAggregation::kSoftmaxSum,
                       BudgetOverflow::kTruncate, 1);
  ClusterSelectTensors t;
  EXPECT_THROW(launch_score_select_split(big.p, t, nullptr, 0, nullptr), InvalidArgumentError);
#endif
}

TEST(ClusterSelectGpuScoreEdge, SplitPathFlagsNonFiniteInputAndReadsIndirectRows) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  Case c = make_case(4, 4, 128, 300, ScoreAggregation::kSoftmaxSum, BudgetOverflow::kTruncate,
                     test::test_seed() + 11);
  const Result want = run_on_gpu(c, GpuStep::kScore);
  Case d = c;
  const size_t row = static_cast<size_t>(d.p.max_clusters) * d.p.head_dim;
  d.centroids = test::reversed_table(c.centroids, row, d.p.num_problems, 1, kNaN, d.centroid_rows);
  const Result split = run_on_gpu(d, GpuStep::kScoreSplit);
  EXPECT_EQ(split.nonfinite_problem, -1);
  expect_scores_close(c, want.scores, split.scores);
  c.queries[2 * 4 * 128 + 5] = std::numeric_limits<float>::infinity();  // problem 2
  const Result bad = run_on_gpu(c, GpuStep::kScoreSplit);
  EXPECT_EQ(bad.nonfinite_problem, 2);
  EXPECT_TRUE(std::isnan(bad.scores[2 * 300]));
  EXPECT_FALSE(std::isnan(bad.scores[0]));
#endif
}

TEST(ClusterSelectGpuScoreEdge, IndirectCentroidRows) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  Case c = make_case(5, 4, 128, 300, ScoreAggregation::kSoftmaxSum, BudgetOverflow::kTruncate,
                     test::test_seed() + 7);
  const Result want = run_on_gpu(c, GpuStep::kScore);
  const size_t row = static_cast<size_t>(c.p.max_clusters) * c.p.head_dim;
  // Rows 0 and 1 stay NaN: reading them would poison the scores.
  c.centroids = test::reversed_table(c.centroids, row, c.p.num_problems, 2, kNaN, c.centroid_rows);
  const Result got = run_on_gpu(c, GpuStep::kScore);
  EXPECT_EQ(got.nonfinite_problem, -1);
  EXPECT_EQ(got.scores, want.scores);
#endif
}

TEST(ClusterSelectGpuScoreEdge, Fp16CentroidCopyIsReadAndScoresLikeTheTable) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // Centroids rounded to fp16 values with their fp16 copy (round_centroids_fp16_cpu), read
  // through centroid_rows from a table with spare rows as an engine does: the split
  // score-and-select reads the copy where it runs as thread block clusters, and its scores are
  // those of the fp32 table within the split tolerance of the reference, with the reference's
  // selection on them. A copy that differs from the table changes every valid score there, so
  // the test sees which one was read.
  const test::ScopedEnv env("KVTIER_CLUSTER_SELECT", "8");
  int device = 0, major = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), cudaSuccess);
  for (const int32_t head_dim : {64, 128, 256}) {
    for (const int32_t k : {200, 700, 4096}) {
      for (const auto agg : {ScoreAggregation::kSoftmaxSum, ScoreAggregation::kMax}) {
        Case c = make_case(4, 4, head_dim, k, agg, BudgetOverflow::kTruncate,
                           test::test_seed() + head_dim + 3 * k + static_cast<int>(agg));
        SCOPED_TRACE(c.describe());
        const size_t row = static_cast<size_t>(k) * head_dim;
        round_centroids_fp16_cpu(c.centroids.data(), nullptr, c.p.num_problems,
                                 static_cast<int64_t>(row), static_cast<int64_t>(row));
        const Case plain = c;  // the references read the rows directly
        // Rows 0 and 1 of the table stay NaN: reading them would poison the scores.
        c.centroids =
            test::reversed_table(c.centroids, row, c.p.num_problems, 2, kNaN, c.centroid_rows);
        c.centroids_f16.resize(c.centroids.size());
        std::vector<float> table = c.centroids;
        round_centroids_fp16_cpu(table.data(), c.centroids_f16.data(), c.p.num_problems + 2,
                                 static_cast<int64_t>(row), static_cast<int64_t>(row));
        ASSERT_EQ(std::memcmp(table.data(), c.centroids.data(), table.size() * 4), 0)
            << "rounding twice changed a value";
        const Result got = run_on_gpu(c, GpuStep::kScoreSelectSplit);
        EXPECT_EQ(got.nonfinite_problem, -1);
        expect_scores_close(c, ref_scores(plain).scores, with_padding(c, got.scores));
        expect_same_selection(c, ref_select(plain, got.scores), got);

        Case other = c;  // the copy negated: every valid score read from it differs
        for (uint16_t& h : other.centroids_f16) h ^= 0x8000u;
        const Result flipped = run_on_gpu(other, GpuStep::kScoreSelectSplit);
        const bool clusters = detail::score_select_cluster_size(c.p) > 0;
        EXPECT_EQ(clusters, major >= 9);
        int64_t valid = 0, same = 0;
        for (int32_t i = 0; i < c.p.num_problems; ++i) {
          for (int32_t j = 0; j < c.num_clusters[i]; ++j) {
            const size_t at = static_cast<size_t>(i) * k + j;
            ++valid;
            same += flipped.scores[at] == got.scores[at];
          }
        }
        if (clusters) {
          EXPECT_LT(same, valid / 100) << "the copy was not read";
        } else {
          EXPECT_EQ(same, valid) << "the copy was read without clusters";
        }
      }
    }
  }
#endif
}

TEST(ClusterSelectGpuScoreEdge, RoundingCentroidsToFp16MatchesTheHostBitForBit) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // Normal, subnormal, tie and out-of-range values in rows with padding: the device rounds and
  // copies exactly as round_centroids_fp16_cpu, and leaves the padding alone.
  const int64_t rows = 5, cols = 1000, stride = 1040;
  std::mt19937_64 rng(test::test_seed() + 99);
  std::vector<float> table(static_cast<size_t>(rows * stride));
  for (size_t i = 0; i < table.size(); ++i) {
    const int kind = static_cast<int>(rng() % 5);
    const float u = std::uniform_real_distribution<float>(-1.f, 1.f)(rng);
    table[i] = kind == 0   ? u
               : kind == 1 ? u * 1e-6f  // fp16 subnormals
               : kind == 2 ? std::ldexp(1.f + 1.f / 2048.f, static_cast<int>(rng() % 8) - 4)
               : kind == 3 ? u * 1e5f  // beyond fp16: inf
                           : std::ldexp(u, -20);
  }
  std::vector<float> host = table;
  std::vector<uint16_t> host_copy(table.size(), 0x1234);
  round_centroids_fp16_cpu(host.data(), host_copy.data(), rows, cols, stride);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = cols; i < stride; ++i) {
      ASSERT_EQ(host[r * stride + i], table[r * stride + i]);  // padding untouched
      ASSERT_EQ(host_copy[r * stride + i], 0x1234);
    }
  }
  cuda::Stream stream(0);
  auto d_table = upload(table, stream.get());
  auto d_copy = upload(std::vector<uint16_t>(table.size(), 0x1234), stream.get());
  launch_round_centroids_fp16(d_table.get(), d_copy.get(), rows, cols, stride, stream.get());
  const std::vector<float> dev = download(d_table, table.size(), stream.get());
  const std::vector<uint16_t> dev_copy = download(d_copy, table.size(), stream.get());
  stream.synchronize();
  for (size_t i = 0; i < table.size(); ++i) {
    ASSERT_EQ(std::memcmp(&dev[i], &host[i], 4), 0) << "element " << i << " of " << table[i];
    ASSERT_EQ(dev_copy[i], host_copy[i]) << "element " << i << " of " << table[i];
  }
#endif
}

// ---- the pipeline ----

class ClusterSelectGpuPipeline
    : public ::testing::TestWithParam<std::tuple<int32_t, ScoreAggregation, BudgetOverflow>> {};

TEST_P(ClusterSelectGpuPipeline, IdsEqualReferenceOnExactLogits) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // Integer data and scale 1/8: every logit is exact in fp32. Under kMax the scores are then
  // bitwise the reference's; under kSoftmaxSum with G = 1 the score is a monotone function of
  // the logit, and distinct logits differ by >= 1/8 (a 13% score ratio), far above fp32 error,
  // while equal logits give equal scores on both sides (ties broken by id).
  const auto [k, agg, overflow] = GetParam();
  const int32_t G = agg == ScoreAggregation::kMax ? 8 : 1;
  Case c = make_case(12, G, 128, k, agg, overflow, test::test_seed() + k, Data::kSmallIntegers);
  c.p.scale = 0.125f;
  const Result want = ref_pipeline(c);
  const Result got = run_on_gpu(c, GpuStep::kBoth);
  EXPECT_EQ(got.nonfinite_problem, -1);
  expect_scores_close(c, want.scores, got.scores);
  expect_same_selection(c, want, got);
#endif
}

TEST_P(ClusterSelectGpuPipeline, SelectionOfGaussianDataEqualsReferenceOnGpuScores) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  const auto [k, agg, overflow] = GetParam();
  Case c = make_case(12, 4, 128, k, agg, overflow, test::test_seed() + 3 * k);
  const Result want = ref_pipeline(c);
  const Result got = run_on_gpu(c, GpuStep::kScoreThenSelect);
  EXPECT_EQ(got.nonfinite_problem, -1);
  expect_scores_close(c, want.scores, got.scores);
  expect_same_selection(c, ref_select(c, got.scores), got);
#endif
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ClusterSelectGpuPipeline,
    ::testing::Combine(::testing::Values(300, 4096, 5000),
                       ::testing::Values(ScoreAggregation::kSoftmaxSum, ScoreAggregation::kMax),
                       ::testing::Values(BudgetOverflow::kTruncate, BudgetOverflow::kSkip)),
    [](const auto& info) {
      return "k" + std::to_string(std::get<0>(info.param)) + "_" +
             aggregation_name(std::get<1>(info.param)) + "_" +
             overflow_name(std::get<2>(info.param));
    });

// ---- non-finite input ----

TEST(ClusterSelectGpuNonFinite, ScoringFlagsTheLowestBadProblem) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  for (const auto agg : {ScoreAggregation::kSoftmaxSum, ScoreAggregation::kMax}) {
    for (const float v : {kNaN, kInf}) {
      Case clean = make_case(8, 4, 128, 300, agg, BudgetOverflow::kTruncate, test::test_seed(),
                             Data::kSmallIntegers);
      clean.p.scale = 0.125f;
      Case c = clean;
      c.centroids[(static_cast<size_t>(5) * 300 + 7) * 128 + 3] = v;  // problem 5, cluster 7
      c.queries[(static_cast<size_t>(6) * 4 + 3) * 128 + 127] = v;    // problem 6, head 3
      c.queries[(static_cast<size_t>(3) * 4 + 0) * 128 + 0] = v;      // problem 3, no clusters
      c.num_clusters[3] = 0;
      clean.num_clusters[3] = 0;
      const Result got = run_on_gpu(c, GpuStep::kBoth);
      EXPECT_EQ(got.nonfinite_problem, 3) << c.describe();
      std::vector<bool> good(8, true);
      for (const int32_t i : {3, 5, 6}) {
        good[i] = false;
        EXPECT_EQ(got.num_selected[i], 0) << "problem " << i;
        EXPECT_EQ(got.total_rows[i], 0) << "problem " << i;
        for (int32_t j = 0; j < 300; ++j) {
          const size_t k = static_cast<size_t>(i) * 300 + j;
          ASSERT_EQ(got.ids[k], -1) << "problem " << i << " slot " << j;
          ASSERT_EQ(got.rows[k], 0) << "problem " << i << " slot " << j;
          if (j < c.num_clusters[i]) {
            ASSERT_TRUE(std::isnan(got.scores[k])) << "problem " << i << " cluster " << j;
          } else {
            ASSERT_EQ(got.scores[k], -kInf) << "problem " << i << " cluster " << j;
          }
        }
      }
      expect_scores_close(c, ref_scores(clean).scores, got.scores, good);
      // The other problems' selections are the reference's on the GPU's scores.
      Case rest = clean;
      for (const int32_t i : {3, 5, 6}) rest.num_clusters[i] = 0;
      expect_same_selection(c, ref_select(rest, got.scores), got, good);
    }
  }
#endif
}

TEST(ClusterSelectGpuNonFinite, SelectionFlagsTheLowestBadProblem) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  for (const int32_t k : {300, 5000}) {
    Case c = make_select_case(6, k, BudgetOverflow::kTruncate, test::test_seed(), false);
    Case clean = c;
    c.scores[static_cast<size_t>(4) * k + 1] = -kInf;
    c.scores[static_cast<size_t>(2) * k + 0] = kNaN;
    clean.num_clusters[2] = clean.num_clusters[4] = 0;
    const Result got = run_on_gpu(c, GpuStep::kSelect);
    EXPECT_EQ(got.nonfinite_problem, 2) << c.describe();
    for (const int32_t i : {2, 4}) {
      EXPECT_EQ(got.num_selected[i], 0) << "problem " << i;
      EXPECT_EQ(got.total_rows[i], 0) << "problem " << i;
    }
    // With their clusters removed, the bad problems' reference is the empty selection too.
    expect_same_selection(c, ref_select(clean, clean.scores), got);
  }
#endif
}

}  // namespace
}  // namespace kvtier::kernels
