// Spherical k-means: the reference on tiny brute-force cases and invariants; the oneTBB path
// against the reference; edge cases and bad input.
#include "kernels/kmeans.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "memory/core/half.h"
#include "memory/core/status.h"
#include "tests/common/test_util.h"

namespace kvtier::kernels {
namespace {

/// Rows drawn around `blobs` random unit directions with angular noise `noise` (well separated
/// for small noise), [num_problems, n, dim] float. truth[i] is the blob of row i.
std::vector<float> make_blobs(int32_t problems, int64_t n, int dim, int blobs, float noise,
                              uint64_t seed, std::vector<int32_t>* truth) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> out(static_cast<size_t>(problems) * n * dim);
  if (truth) truth->assign(static_cast<size_t>(problems) * n, 0);
  for (int32_t p = 0; p < problems; ++p) {
    std::vector<float> centers(static_cast<size_t>(blobs) * dim);
    for (auto& v : centers) v = g(rng);
    for (int64_t i = 0; i < n; ++i) {
      const int b = static_cast<int>(i % blobs);
      if (truth) (*truth)[static_cast<size_t>(p) * n + i] = b;
      const float scale = 0.5f + static_cast<float>(rng() % 1000) / 500.f;  // norms vary
      for (int t = 0; t < dim; ++t)
        out[(static_cast<size_t>(p) * n + i) * dim + t] =
            scale * (centers[b * dim + t] + noise * g(rng));
    }
  }
  return out;
}

struct Result {
  std::vector<float> centroids;
  std::vector<int32_t> labels, sizes;
  std::vector<KmeansReport> reports;
};

template <typename Fn>
Result run(Fn fn, const KmeansParams& p, const void* points) {
  Result r;
  r.centroids.assign(static_cast<size_t>(p.num_problems) * kmeans_centroid_stride(p) * p.dim, -7.f);
  r.labels.assign(static_cast<size_t>(p.num_problems) * p.num_points, -7);
  r.sizes.assign(static_cast<size_t>(p.num_problems) * kmeans_centroid_stride(p), -7);
  r.reports = fn(p, points, r.centroids.data(), r.labels.data(), r.sizes.data());
  return r;
}

/// Maps labels to blob ids by majority; true when the mapping is a bijection and every row agrees.
bool labels_match_blobs(const std::vector<int32_t>& labels, const std::vector<int32_t>& truth,
                        int64_t begin, int64_t n) {
  std::map<int32_t, int32_t> to_blob, from_blob;
  for (int64_t i = begin; i < begin + n; ++i) {
    auto [a, fresh_a] = to_blob.emplace(labels[i], truth[i]);
    auto [b, fresh_b] = from_blob.emplace(truth[i], labels[i]);
    if (a->second != truth[i] || b->second != labels[i]) return false;
  }
  return true;
}

TEST(KmeansRef, BruteForceTinyCase) {
  // Four 2-D-like directions embedded in 64 dims: rows 0,1 near e0, rows 2,3 near e1.
  KmeansParams p;
  p.num_points = 4;
  p.dim = 64;
  p.num_clusters = 2;
  std::vector<float> x(4 * 64, 0.f);
  x[0 * 64 + 0] = 1.f, x[0 * 64 + 1] = 0.1f;
  x[1 * 64 + 0] = 2.f, x[1 * 64 + 2] = -0.1f;
  x[2 * 64 + 1] = 1.f, x[2 * 64 + 3] = 0.2f;
  x[3 * 64 + 1] = 3.f;
  const Result r = run(kmeans_ref, p, x.data());
  EXPECT_EQ(r.labels[0], r.labels[1]);
  EXPECT_EQ(r.labels[2], r.labels[3]);
  EXPECT_NE(r.labels[0], r.labels[2]);
  EXPECT_EQ(r.sizes[0] + r.sizes[1], 4);
  // Brute force: the objective of the best 2-partition (all 7 splits) equals ours.
  auto unit = [&](int i) {
    std::vector<double> u(64);
    double nn = 0;
    for (int t = 0; t < 64; ++t) nn += double(x[i * 64 + t]) * x[i * 64 + t];
    for (int t = 0; t < 64; ++t) u[t] = x[i * 64 + t] / std::sqrt(nn);
    return u;
  };
  double best = 1e9;
  for (int mask = 1; mask < 15; ++mask) {
    double obj = 0;
    for (int side = 0; side < 2; ++side) {
      std::vector<double> s(64, 0.0);
      for (int i = 0; i < 4; ++i)
        if (((mask >> i) & 1) == side) {
          auto u = unit(i);
          for (int t = 0; t < 64; ++t) s[t] += u[t];
        }
      double nn = 0;
      for (double v : s) nn += v * v;
      // sum of (1 - cos) to the normalized mean = count - |sum|
      int cnt = 0;
      for (int i = 0; i < 4; ++i) cnt += ((mask >> i) & 1) == side;
      obj += cnt - std::sqrt(nn);
    }
    best = std::min(best, obj);
  }
  EXPECT_NEAR(r.reports[0].objective, best, 1e-9);
}

TEST(KmeansRef, InvariantsOnRandomData) {
  KmeansParams p;
  p.num_problems = 3;
  p.num_points = 300;
  p.dim = 64;
  p.num_clusters = 13;
  p.max_iters = 30;
  p.rel_tol = 0.f;  // run all iterations so the history is long
  p.seed = test::test_seed();
  std::vector<float> x = make_blobs(3, 300, 64, 5, 2.0f, test::test_seed(), nullptr);
  for (KmeansInit init : {KmeansInit::kRandomRows, KmeansInit::kPlusPlus}) {
    p.init = init;
    const Result r = run(kmeans_ref, p, x.data());
    for (int32_t prob = 0; prob < 3; ++prob) {
      const auto& h = r.reports[prob].history;
      ASSERT_GE(h.size(), 2u);
      for (size_t i = 1; i < h.size(); ++i)
        EXPECT_LE(h[i], h[i - 1] + 1e-9)
            << "objective increased at update " << i << " problem " << prob;
      // Each label is its row's nearest centroid; sizes count labels; centroids are unit.
      int64_t total = 0;
      for (int32_t j = 0; j < 13; ++j) {
        double nn = 0;
        for (int t = 0; t < 64; ++t)
          nn +=
              double(r.centroids[(prob * 13 + j) * 64 + t]) * r.centroids[(prob * 13 + j) * 64 + t];
        if (r.sizes[prob * 13 + j] > 0) {
          EXPECT_NEAR(nn, 1.0, 1e-5);
        }
        total += r.sizes[prob * 13 + j];
      }
      EXPECT_EQ(total, 300);
      for (int64_t i = 0; i < 300; ++i) {
        const float* xi = &x[(prob * 300 + i) * 64];
        double best = -9;
        int arg = -1;
        for (int32_t j = 0; j < 13; ++j) {
          double dot = 0;
          for (int t = 0; t < 64; ++t) dot += double(xi[t]) * r.centroids[(prob * 13 + j) * 64 + t];
          if (dot > best + 1e-12) best = dot, arg = j;
        }
        EXPECT_EQ(r.labels[prob * 300 + i], arg) << "row " << i << " problem " << prob;
      }
    }
  }
}

class KmeansCpuVsRef : public ::testing::TestWithParam<std::tuple<int, DType, KmeansInit>> {};

TEST_P(KmeansCpuVsRef, ObjectiveAndBlobLabels) {
  const auto [dim, dtype, init] = GetParam();
  KmeansParams p;
  p.num_problems = 4;
  p.num_points = 997;  // prime
  p.dim = dim;
  p.num_clusters = 8;
  p.init = init;
  p.seed = test::test_seed();
  p.dtype = dtype;
  std::vector<int32_t> truth;
  const std::vector<float> xf = make_blobs(4, 997, dim, 8, 0.05f, test::test_seed() + dim, &truth);
  std::vector<uint16_t> xh(xf.size());
  for (size_t i = 0; i < xf.size(); ++i)
    xh[i] = dtype == DType::kBF16 ? float_to_bf16(xf[i]) : float_to_fp16(xf[i]);
  const void* pts = dtype == DType::kF32 ? static_cast<const void*>(xf.data()) : xh.data();
  const Result want = run(kmeans_ref, p, pts);
  const Result got = run(kmeans_cpu, p, pts);
  for (int32_t prob = 0; prob < 4; ++prob) {
    EXPECT_NEAR(got.reports[prob].objective, want.reports[prob].objective,
                1e-4 * std::max(1.0, want.reports[prob].objective))
        << "problem " << prob << " seed " << test::test_seed();
  }
  // Well-separated blobs: with k-means++ seeding both find the blobs exactly, so the labels agree
  // row for row. (Random rows may start two centroids in one blob; rows of that blob then sit
  // near a tie, where float and double argmax may differ, so only the objective is compared.)
  if (init == KmeansInit::kPlusPlus) {
    EXPECT_EQ(got.labels, want.labels);
    for (int32_t prob = 0; prob < 4; ++prob)
      EXPECT_TRUE(labels_match_blobs(want.labels, truth, prob * 997, 997)) << "problem " << prob;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, KmeansCpuVsRef,
    ::testing::Combine(::testing::Values(64, 128),
                       ::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                       ::testing::Values(KmeansInit::kRandomRows, KmeansInit::kPlusPlus)));

/// Unit rows of a problem as float, for comparing centroids with rows.
std::vector<double> unit_row(const std::vector<float>& x, int64_t row, int dim) {
  std::vector<double> u(dim);
  double nn = 0;
  for (int t = 0; t < dim; ++t) nn += double(x[row * dim + t]) * x[row * dim + t];
  for (int t = 0; t < dim; ++t) u[t] = nn > 0 ? x[row * dim + t] / std::sqrt(nn) : 0.0;
  return u;
}

TEST(KmeansPlusPlus, OneCentrePerWellSeparatedBlob) {
  // Counter-based k-means++ still seeds well: on well-separated blobs every blob gets exactly one
  // centre, so the initial assignment (max_iters = 0) already recovers the blobs exactly. Also
  // when the centres come from a strided sample of the rows (init_sample < n; a stride of 2.4
  // rows, which does not alias with the blob layout, row i in blob i % blobs).
  for (int64_t sample : {int64_t{16384}, int64_t{333}}) {
    for (int blobs : {5, 16, 40}) {
      KmeansParams p;
      p.num_problems = 3;
      p.num_points = 800;
      p.dim = 64;
      p.num_clusters = blobs;
      p.max_iters = 0;
      p.init = KmeansInit::kPlusPlus;
      p.init_sample = sample;
      p.seed = test::test_seed() + blobs;
      std::vector<int32_t> truth;
      const std::vector<float> x =
          make_blobs(3, 800, 64, blobs, 0.05f, test::test_seed() + 7 * blobs, &truth);
      const Result r = run(kmeans_ref, p, x.data());
      for (int32_t prob = 0; prob < 3; ++prob)
        EXPECT_TRUE(labels_match_blobs(r.labels, truth, prob * 800, 800))
            << "problem " << prob << " blobs " << blobs << " init_sample " << sample << " seed "
            << test::test_seed();
    }
  }
}

TEST(KmeansPlusPlus, CpuStartsFromTheReferencesRows) {
  // kmeans_cpu runs the reference's seeding: after 0 updates the centroids are the same rows,
  // bit for bit, on unique-valued data; and the full runs agree on the objective.
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    KmeansParams p;
    p.num_problems = 4;
    p.num_points = 700;
    p.dim = 128;
    p.num_clusters = 45;
    p.max_iters = 0;
    p.init = KmeansInit::kPlusPlus;
    p.init_sample = 500;
    p.seed = test::test_seed();
    p.dtype = dtype;
    const std::vector<float> xf = make_blobs(4, 700, 128, 700, 0.f, test::test_seed() + 3, nullptr);
    std::vector<uint16_t> xh(xf.size());
    for (size_t i = 0; i < xf.size(); ++i) xh[i] = float_to_bf16(xf[i]);
    const void* pts = dtype == DType::kF32 ? static_cast<const void*>(xf.data()) : xh.data();
    const Result want = run(kmeans_ref, p, pts);
    const Result got = run(kmeans_cpu, p, pts);
    EXPECT_EQ(got.centroids, want.centroids);
    // The centroids are distinct sample rows (rows floor(s * 700 / 500)).
    for (int32_t prob = 0; prob < 4; ++prob) {
      std::vector<int64_t> rows;
      for (int32_t j = 0; j < 45; ++j) {
        int64_t found = -1;
        for (int64_t s = 0; s < 500 && found < 0; ++s) {
          const int64_t row = s * 700 / 500;
          const std::vector<double> u = unit_row(xf, prob * 700 + row, 128);
          bool same = true;
          for (int t = 0; t < 128 && same; ++t)
            same = std::abs(u[t] - want.centroids[(prob * 45 + j) * 128 + t]) < 1e-2;
          if (same) found = row;
        }
        ASSERT_GE(found, 0) << "centroid " << j << " of problem " << prob << " is no sample row";
        rows.push_back(found);
      }
      std::sort(rows.begin(), rows.end());
      EXPECT_EQ(std::unique(rows.begin(), rows.end()), rows.end()) << "problem " << prob;
    }
    p.max_iters = 10;
    const Result want_full = run(kmeans_ref, p, pts);
    const Result got_full = run(kmeans_cpu, p, pts);
    for (int32_t prob = 0; prob < 4; ++prob)
      EXPECT_NEAR(got_full.reports[prob].objective, want_full.reports[prob].objective,
                  1e-4 * want_full.reports[prob].objective);
  }
}

TEST(KmeansPlusPlus, DeterministicInSeedAndProblem) {
  KmeansParams p;
  p.num_problems = 2;
  p.num_points = 300;
  p.dim = 64;
  p.num_clusters = 12;
  p.max_iters = 0;
  p.init = KmeansInit::kPlusPlus;
  p.seed = 11;
  // Both problems hold the same rows: they still draw differently (one stream per problem).
  std::vector<float> x = make_blobs(1, 300, 64, 300, 0.f, 9, nullptr);
  x.insert(x.end(), x.begin(), x.end());
  const Result a = run(kmeans_ref, p, x.data());
  const Result b = run(kmeans_ref, p, x.data());
  EXPECT_EQ(a.centroids, b.centroids);
  EXPECT_EQ(a.labels, b.labels);
  EXPECT_FALSE(std::equal(a.centroids.begin(), a.centroids.begin() + 12 * 64,
                          a.centroids.begin() + 12 * 64));
  p.seed = 12;
  const Result c = run(kmeans_ref, p, x.data());
  EXPECT_NE(a.centroids, c.centroids);
}

TEST(KmeansPlusPlus, EveryRowOnceAndExactDuplicates) {
  for (auto fn : {kmeans_ref, kmeans_cpu}) {
    KmeansParams p;
    p.dim = 64;
    p.max_iters = 0;
    p.init = KmeansInit::kPlusPlus;
    // k = n (and k > n): every row is a centre, each once.
    p.num_points = 37;
    p.num_clusters = 40;
    const std::vector<float> x = make_blobs(1, 37, 64, 37, 0.f, 4, nullptr);
    Result r = run(fn, p, x.data());
    std::vector<int32_t> l = r.labels;
    std::sort(l.begin(), l.end());
    for (int32_t i = 0; i < 37; ++i) EXPECT_EQ(l[i], i);
    EXPECT_NEAR(r.reports[0].objective, 0.0, 1e-6);
    // Basis vectors repeated: after e0 and e1 every untaken row coincides with a centre exactly
    // (total 0), and the next centres are the first untaken rows; nothing breaks.
    p.num_points = 8;
    p.num_clusters = 5;
    std::vector<float> e(8 * 64, 0.f);
    for (int i = 0; i < 8; ++i) e[i * 64 + (i % 2)] = 1.f + i;
    r = run(fn, p, e.data());
    EXPECT_NEAR(r.reports[0].objective, 0.0, 1e-12);
    // n = 1.
    p.num_points = 1;
    p.num_clusters = 3;
    r = run(fn, p, x.data());
    EXPECT_EQ(r.labels[0], 0);
    EXPECT_EQ(r.sizes, (std::vector<int32_t>{1, 0, 0}));
  }
}

TEST(Kmeans, EdgeCases) {
  for (auto fn : {kmeans_ref, kmeans_cpu}) {
    KmeansParams p;
    p.dim = 64;
    // n = 1.
    p.num_points = 1;
    p.num_clusters = 4;  // k > n: effective k = 1
    std::vector<float> one(64, 0.5f);
    Result r = run(fn, p, one.data());
    EXPECT_EQ(r.labels[0], 0);
    EXPECT_EQ(r.sizes, (std::vector<int32_t>{1, 0, 0, 0}));
    EXPECT_NEAR(r.reports[0].objective, 0.0, 1e-9);
    for (int t = 0; t < 64; ++t) EXPECT_EQ(r.centroids[64 + t], 0.f);
    // k > n with n = 5: every row its own cluster.
    p.num_points = 5;
    p.num_clusters = 9;
    std::vector<float> five = make_blobs(1, 5, 64, 5, 0.f, 3, nullptr);
    r = run(fn, p, five.data());
    std::vector<int32_t> l = r.labels;
    std::sort(l.begin(), l.end());
    EXPECT_EQ(l, (std::vector<int32_t>{0, 1, 2, 3, 4}));
    // All-equal keys: one cluster holds everything, the objective is 0, nothing breaks.
    p.num_points = 50;
    p.num_clusters = 6;
    std::vector<float> same(50 * 64, 0.25f);
    r = run(fn, p, same.data());
    EXPECT_NEAR(r.reports[0].objective, 0.0, 1e-9);
    EXPECT_EQ(*std::max_element(r.sizes.begin(), r.sizes.end()), 50);
    // Zero rows are allowed (cos 0 to everything).
    std::vector<float> zeros(50 * 64, 0.f);
    r = run(fn, p, zeros.data());
    EXPECT_NEAR(r.reports[0].objective, 50.0, 1e-9);
    // max_iters = 0: the initial assignment only.
    p.max_iters = 0;
    p.num_points = 5;
    p.num_clusters = 3;
    r = run(fn, p, five.data());
    EXPECT_EQ(r.reports[0].iterations, 0);
    EXPECT_EQ(r.reports[0].history.size(), 1u);
  }
}

/// The plain mean of each labelled cluster's rows of `x` (as float values of `dtype`), in double:
/// [problems, stride, dim], zero for empty clusters.
std::vector<double> cluster_means(const KmeansParams& p, const void* x,
                                  const std::vector<int32_t>& labels) {
  const int32_t stride = kmeans_centroid_stride(p);
  std::vector<double> sum(static_cast<size_t>(p.num_problems) * stride * p.dim, 0.0);
  std::vector<int64_t> cnt(static_cast<size_t>(p.num_problems) * stride, 0);
  for (int32_t prob = 0; prob < p.num_problems; ++prob)
    for (int64_t i = 0; i < p.num_points; ++i) {
      const size_t row = static_cast<size_t>(prob) * p.num_points + i;
      const size_t j = static_cast<size_t>(prob) * stride + labels[row];
      ++cnt[j];
      for (int t = 0; t < p.dim; ++t)
        sum[j * p.dim + t] += load_as_float(x, p.dtype, row * p.dim + t);
    }
  for (size_t j = 0; j < cnt.size(); ++j)
    for (int t = 0; t < p.dim; ++t)
      if (cnt[j] > 0) sum[j * p.dim + t] /= static_cast<double>(cnt[j]);
  return sum;
}

TEST(Kmeans, MeanRowCentroidsAreEachClustersMeanRow) {
  // Rows of varied norms (make_blobs scales each row by 0.5 to 2.5), so the mean row is not a
  // multiple of the unit centroid; k > the blobs, so some clusters split a blob.
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    KmeansParams p;
    p.num_problems = 2;
    p.num_points = 301;
    p.dim = 64;
    p.num_clusters = 9;
    p.centroid_stride = 12;  // the index layout of incremental clustering
    p.init = KmeansInit::kPlusPlus;
    p.seed = test::test_seed();
    p.dtype = dtype;
    const std::vector<float> xf = make_blobs(2, 301, 64, 5, 0.3f, test::test_seed(), nullptr);
    std::vector<uint16_t> xh(xf.size());
    for (size_t i = 0; i < xf.size(); ++i) xh[i] = float_to_bf16(xf[i]);
    const void* x = dtype == DType::kF32 ? static_cast<const void*>(xf.data()) : xh.data();
    for (auto fn : {kmeans_ref, kmeans_cpu}) {
      const Result unit = run(fn, p, x);
      KmeansParams pm = p;
      pm.output = KmeansCentroids::kMeanRow;
      const Result mean = run(fn, pm, x);
      EXPECT_EQ(mean.labels, unit.labels);
      EXPECT_EQ(mean.sizes, unit.sizes);
      const std::vector<double> want = cluster_means(p, x, unit.labels);
      int mismatched = 0;
      for (int32_t prob = 0; prob < 2; ++prob)
        for (int32_t j = 0; j < 12; ++j) {
          const size_t at = (static_cast<size_t>(prob) * 12 + j) * 64;
          for (int t = 0; t < 64; ++t) {
            if (j >= 9) {  // past num_clusters: not written
              EXPECT_EQ(mean.centroids[at + t], -7.f);
              continue;
            }
            mismatched += std::abs(mean.centroids[at + t] - want[at + t]) >
                          1e-6 * std::max(1.0, std::abs(want[at + t]));
          }
          if (j < 9 && mean.sizes[prob * 12 + j] > 0) {
            double n_mean = 0, n_unit = 0;
            for (int t = 0; t < 64; ++t) {
              n_mean += double(mean.centroids[at + t]) * mean.centroids[at + t];
              n_unit += double(unit.centroids[at + t]) * unit.centroids[at + t];
            }
            EXPECT_NEAR(n_unit, 1.0, 1e-5);
            EXPECT_GT(std::abs(n_mean - 1.0), 1e-3) << "problem " << prob << " cluster " << j;
          }
        }
      EXPECT_EQ(mismatched, 0);
    }
  }
}

TEST(Kmeans, BadInputIsAClearError) {
  for (auto fn : {kmeans_ref, kmeans_cpu}) {
    KmeansParams p;
    p.num_points = 10;
    p.dim = 64;
    p.num_clusters = 2;
    std::vector<float> x(10 * 64, 1.f);
    x[3 * 64 + 5] = std::nanf("");
    try {
      run(fn, p, x.data());
      FAIL() << "no error for NaN";
    } catch (const InvalidArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find("row 3, column 5"), std::string::npos) << e.what();
    }
    x[3 * 64 + 5] = INFINITY;
    EXPECT_THROW(run(fn, p, x.data()), InvalidArgumentError);
    x[3 * 64 + 5] = 1.f;
    p.dim = 96;
    EXPECT_THROW(run(fn, p, x.data()), InvalidArgumentError);
    p.dim = 64;
    p.num_clusters = 0;
    EXPECT_THROW(run(fn, p, x.data()), InvalidArgumentError);
  }
}

TEST(Kmeans, IncrementalAppendsToAnIndex) {
  // An index of capacity 16 clusters: 10 from the prompt, then 4 from a window of new rows.
  KmeansParams p;
  p.num_points = 200;
  p.dim = 64;
  p.num_clusters = 10;
  p.centroid_stride = 16;
  std::vector<float> prompt = make_blobs(1, 200, 64, 10, 0.05f, 5, nullptr);
  std::vector<float> cent(16 * 64, -7.f);
  std::vector<int32_t> lab(200), sizes(16, -7);
  kmeans_cpu(p, prompt.data(), cent.data(), lab.data(), sizes.data());
  KmeansParams w = p;
  w.num_points = 64;
  w.num_clusters = 4;
  std::vector<float> window = make_blobs(1, 64, 64, 4, 0.05f, 6, nullptr);
  std::vector<int32_t> wl(64);
  kmeans_cpu(w, window.data(), cent.data() + 10 * 64, wl.data(), sizes.data() + 10);
  EXPECT_EQ(std::accumulate(sizes.begin(), sizes.begin() + 10, 0), 200);
  EXPECT_EQ(std::accumulate(sizes.begin() + 10, sizes.begin() + 14, 0), 64);
  EXPECT_EQ(sizes[14], -7);  // past the appended clusters nothing is written
  EXPECT_EQ(cent[14 * 64], -7.f);
}

}  // namespace
}  // namespace kvtier::kernels
