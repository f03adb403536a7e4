// GPU spherical k-means against the reference: objective within 1e-4 relative, exact labels
// where the reference recovered well-separated blobs, edge cases and the non-finite flag; k-means++
// seeding on the GPU picks the reference's rows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>

#include "kernels/kmeans.h"
#include "memory/core/cuda_raii.h"
#include "memory/core/half.h"
#include "memory/core/status.h"
#include "tests/common/test_util.h"

namespace kvtier::kernels {
namespace {

std::vector<float> blobs(int32_t problems, int64_t n, int dim, int nb, float noise, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> out(static_cast<size_t>(problems) * n * dim);
  for (int32_t p = 0; p < problems; ++p) {
    std::vector<float> c(static_cast<size_t>(nb) * dim);
    for (auto& v : c) v = g(rng);
    for (int64_t i = 0; i < n; ++i)
      for (int t = 0; t < dim; ++t)
        out[(static_cast<size_t>(p) * n + i) * dim + t] = c[(i % nb) * dim + t] + noise * g(rng);
  }
  return out;
}

#if KVTIER_WITH_CUDA
struct GpuOut {
  std::vector<float> centroids;
  std::vector<int32_t> labels, sizes, iters;
  std::vector<double> objective;
  int32_t nonfinite = 0;
};

/// Runs launch_kmeans on a copy of the points `misalign` bytes past a 256-byte boundary (a
/// multiple of the element size; nonzero exercises the unaligned loads).
GpuOut run_gpu(const KmeansParams& p, const void* host_points, size_t bytes, size_t misalign = 0) {
  cuda::Stream s(0);
  cuda::DeviceAllocation xa(bytes + misalign, 0), ws(kmeans_workspace_bytes(p), 0);
  void* const xp = static_cast<std::byte*>(xa.get()) + misalign;
  const int32_t stride = kmeans_centroid_stride(p);
  cuda::DeviceBuffer<float> c(static_cast<size_t>(p.num_problems) * stride * p.dim, 0);
  cuda::DeviceBuffer<int32_t> l(static_cast<size_t>(p.num_problems) * p.num_points, 0),
      sz(static_cast<size_t>(p.num_problems) * stride, 0), it(p.num_problems, 0), nf(1, 0);
  cuda::DeviceBuffer<double> obj(p.num_problems, 0);
  cuda::memcpy_async(xp, host_points, bytes, s.get());
  launch_kmeans(p, xp, c.get(), l.get(), sz.get(), ws.get(), obj.get(), it.get(), nf.get(),
                s.get());
  GpuOut o;
  o.centroids.resize(c.size());
  o.labels.resize(l.size());
  o.sizes.resize(sz.size());
  o.iters.resize(it.size());
  o.objective.resize(obj.size());
  cuda::memcpy_async(o.centroids.data(), c.get(), c.size_bytes(), s.get());
  cuda::memcpy_async(o.labels.data(), l.get(), l.size_bytes(), s.get());
  cuda::memcpy_async(o.sizes.data(), sz.get(), sz.size_bytes(), s.get());
  cuda::memcpy_async(o.iters.data(), it.get(), it.size_bytes(), s.get());
  cuda::memcpy_async(o.objective.data(), obj.get(), obj.size_bytes(), s.get());
  cuda::memcpy_async(&o.nonfinite, nf.get(), 4, s.get());
  s.synchronize();
  return o;
}
#endif

class KmeansGpu : public ::testing::TestWithParam<std::tuple<int, DType, int32_t>> {};

TEST_P(KmeansGpu, MatchesReference) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  const auto [dim, dtype, k] = GetParam();
  KmeansParams p;
  p.num_problems = 3;
  p.num_points = 1031;
  p.dim = dim;
  p.num_clusters = k;
  p.seed = test::test_seed();
  p.dtype = dtype;
  const std::vector<float> xf = blobs(3, 1031, dim, 6, 0.3f, test::test_seed() + k);
  std::vector<uint16_t> xh(xf.size());
  for (size_t i = 0; i < xf.size(); ++i)
    xh[i] = dtype == DType::kBF16 ? float_to_bf16(xf[i]) : float_to_fp16(xf[i]);
  const void* pts = dtype == DType::kF32 ? static_cast<const void*>(xf.data()) : xh.data();
  const size_t bytes = xf.size() * dtype_size(dtype);
  std::vector<float> c(static_cast<size_t>(3) * k * dim);
  std::vector<int32_t> l(3 * 1031), sz(3 * k);
  const auto want = kmeans_ref(p, pts, c.data(), l.data(), sz.data());
  for (KmeansPruning pruning : {KmeansPruning::kBounds, KmeansPruning::kNone}) {
    p.pruning = pruning;
    SCOPED_TRACE(pruning == KmeansPruning::kBounds ? "pruning: bounds" : "pruning: none");
    const GpuOut got = run_gpu(p, pts, bytes);
    EXPECT_EQ(got.nonfinite, 0);
    for (int32_t prob = 0; prob < 3; ++prob) {
      EXPECT_NEAR(got.objective[prob], want[prob].objective,
                  1e-4 * std::max(1.0, want[prob].objective))
          << "problem " << prob << " dim " << dim << " k " << k << " seed " << test::test_seed();
      int64_t total = 0;
      for (int32_t j = 0; j < k; ++j) total += got.sizes[prob * k + j];
      EXPECT_EQ(total, 1031);
    }
    // Where the reference recovered the six well-separated blobs exactly (row i is in blob i % 6),
    // no row is near a tie, so the GPU must agree row for row.
    if (k == 6) {
      for (int32_t prob = 0; prob < 3; ++prob) {
        bool found = true;
        for (int64_t i = 6; i < 1031 && found; ++i)
          found = l[prob * 1031 + i] == l[prob * 1031 + i % 6];
        for (int a = 0; a < 6 && found; ++a)
          for (int b = a + 1; b < 6; ++b) found = found && l[prob * 1031 + a] != l[prob * 1031 + b];
        if (!found) continue;
        for (int64_t i = 0; i < 1031; ++i)
          ASSERT_EQ(got.labels[prob * 1031 + i], l[prob * 1031 + i])
              << "problem " << prob << " row " << i;
      }
    }
  }
#else
  FAIL() << "built without CUDA";
#endif
}

INSTANTIATE_TEST_SUITE_P(Shapes, KmeansGpu,
                         ::testing::Combine(::testing::Values(64, 128),
                                            ::testing::Values(DType::kF32, DType::kF16,
                                                              DType::kBF16),
                                            ::testing::Values(6, 40)));

TEST(KmeansGpuEdge, KLargerThanNAndNonFinite) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  KmeansParams p;
  p.num_points = 5;
  p.dim = 64;
  p.num_clusters = 9;
  std::vector<float> x = blobs(1, 5, 64, 5, 0.f, 1);
  GpuOut o = run_gpu(p, x.data(), x.size() * 4);
  std::vector<int32_t> l = o.labels;
  std::sort(l.begin(), l.end());
  EXPECT_EQ(l, (std::vector<int32_t>{0, 1, 2, 3, 4}));
  for (int j = 5; j < 9; ++j) EXPECT_EQ(o.sizes[j], 0);
  for (int t = 0; t < 64; ++t) EXPECT_EQ(o.centroids[8 * 64 + t], 0.f);
  // The same with k-means++ seeding: every row is a centre, each once.
  p.init = KmeansInit::kPlusPlus;
  o = run_gpu(p, x.data(), x.size() * 4);
  l = o.labels;
  std::sort(l.begin(), l.end());
  EXPECT_EQ(l, (std::vector<int32_t>{0, 1, 2, 3, 4}));
  for (int j = 5; j < 9; ++j) EXPECT_EQ(o.sizes[j], 0);
  EXPECT_NEAR(o.objective[0], 0.0, 1e-5);
  // Non-finite input: flagged; k-means++ still terminates and picks rows in range.
  x[2 * 64 + 7] = std::nanf("");
  for (KmeansInit init : {KmeansInit::kRandomRows, KmeansInit::kPlusPlus}) {
    p.init = init;
    o = run_gpu(p, x.data(), x.size() * 4);
    EXPECT_EQ(o.nonfinite, 1);
    if (init == KmeansInit::kPlusPlus) {
      for (int32_t lab : o.labels) EXPECT_TRUE(lab >= 0 && lab < 5) << lab;
    }
  }
#else
  FAIL() << "built without CUDA";
#endif
}

#if KVTIER_WITH_CUDA
/// Unique-valued rows: independent Gaussian entries, [problems, n, dim], converted to `dtype`.
struct Points {
  std::vector<float> f;
  std::vector<uint16_t> h;
  DType dtype;
  const void* data() const {
    return dtype == DType::kF32 ? static_cast<const void*>(f.data()) : h.data();
  }
  size_t bytes() const { return f.size() * dtype_size(dtype); }
};
Points to_dtype(std::vector<float> f, DType dtype) {
  Points pts{std::move(f), {}, dtype};
  pts.h.resize(pts.f.size());
  for (size_t i = 0; i < pts.f.size(); ++i)
    pts.h[i] = dtype == DType::kBF16 ? float_to_bf16(pts.f[i]) : float_to_fp16(pts.f[i]);
  return pts;
}
Points gaussian_rows(int32_t problems, int64_t n, int dim, DType dtype, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> f(static_cast<size_t>(problems) * n * dim);
  for (auto& v : f) v = g(rng);
  return to_dtype(std::move(f), dtype);
}
#endif

class KmeansGpuPlusPlus : public ::testing::TestWithParam<std::tuple<int, DType>> {};

TEST_P(KmeansGpuPlusPlus, SameInitialRowsAsReference) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  const auto [dim, dtype] = GetParam();
  struct Case {
    int32_t problems;
    int64_t n;
    int32_t k;
    int64_t init_sample;
  };
  // Blocks per problem (the launcher splits a sample of >= 1024 rows while there are few
  // problems) and trials per centre (kernel bucket): 2 blocks, 5 trials; a strided sample of
  // 4096 of 5000 rows in 8 blocks; 4 blocks, 3 trials; 2 blocks, 9 trials (k = 1100 of 1200
  // rows); 40 problems of one block each; k > init_sample (the sample grows to k).
  const Case cases[] = {{3, 1031, 40, 16384},   {2, 5000, 64, 4096},  {1, 3000, 6, 16384},
                        {1, 1200, 1100, 16384}, {40, 600, 20, 16384}, {2, 900, 300, 100}};
  for (const Case& cs : cases) {
    KmeansParams p;
    p.num_problems = cs.problems;
    p.num_points = cs.n;
    p.dim = dim;
    p.num_clusters = cs.k;
    p.max_iters = 0;  // the initial assignment only: the centroids are the initial rows
    p.init = KmeansInit::kPlusPlus;
    p.init_sample = cs.init_sample;
    p.seed = test::test_seed() + cs.k;
    p.dtype = dtype;
    SCOPED_TRACE(::testing::Message()
                 << "problems " << cs.problems << " n " << cs.n << " k " << cs.k << " init_sample "
                 << cs.init_sample << " seed " << test::test_seed());
    const Points pts = gaussian_rows(cs.problems, cs.n, dim, dtype, test::test_seed() + cs.n);
    std::vector<float> c(static_cast<size_t>(cs.problems) * cs.k * dim);
    std::vector<int32_t> l(static_cast<size_t>(cs.problems) * cs.n), sz(c.size() / dim);
    const auto want = kmeans_ref(p, pts.data(), c.data(), l.data(), sz.data());
    // Unaligned points take the scalar loads; the rows chosen must not change.
    for (size_t misalign : {size_t{0}, dtype_size(dtype)}) {
      SCOPED_TRACE(::testing::Message() << "misalign " << misalign);
      const GpuOut got = run_gpu(p, pts.data(), pts.bytes(), misalign);
      EXPECT_EQ(got.nonfinite, 0);
      for (int32_t prob = 0; prob < cs.problems; ++prob) {
        EXPECT_NEAR(got.objective[prob], want[prob].objective,
                    1e-4 * std::max(1.0, want[prob].objective))
            << "problem " << prob;
        // Same rows: every centroid is the reference's up to fp32 normalization.
        int32_t first_diff = -1;
        for (int32_t j = 0; j < cs.k && first_diff < 0; ++j)
          for (int t = 0; t < dim; ++t) {
            const size_t i = (static_cast<size_t>(prob) * cs.k + j) * dim + t;
            if (std::abs(got.centroids[i] - c[i]) > 1e-5f) {
              first_diff = j;
              break;
            }
          }
        EXPECT_EQ(first_diff, -1) << "problem " << prob << ": centre " << first_diff
                                  << " is not the reference's row";
      }
    }
  }
#else
  FAIL() << "built without CUDA";
#endif
}

TEST_P(KmeansGpuPlusPlus, ExactLabelsOnBlobs) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  const auto [dim, dtype] = GetParam();
  // 24 well-separated blobs (row i in blob i % 24); 2053 rows (4 blocks per problem).
  KmeansParams p;
  p.num_problems = 4;
  p.num_points = 2053;
  p.dim = dim;
  p.num_clusters = 24;
  p.init = KmeansInit::kPlusPlus;
  p.seed = test::test_seed();
  p.dtype = dtype;
  const Points pts = to_dtype(blobs(4, 2053, dim, 24, 0.05f, test::test_seed() + 1), dtype);
  for (int32_t iters : {0, 20}) {
    p.max_iters = iters;
    SCOPED_TRACE(::testing::Message() << "max_iters " << iters << " seed " << test::test_seed());
    std::vector<float> c(static_cast<size_t>(4) * 24 * dim);
    std::vector<int32_t> l(4 * 2053), sz(4 * 24);
    const auto want = kmeans_ref(p, pts.data(), c.data(), l.data(), sz.data());
    const GpuOut got = run_gpu(p, pts.data(), pts.bytes());
    for (int32_t prob = 0; prob < 4; ++prob) {
      // The reference's seeding puts one centre in each blob...
      bool found = true;
      for (int64_t i = 24; i < 2053 && found; ++i)
        found = l[prob * 2053 + i] == l[prob * 2053 + i % 24];
      for (int a = 0; a < 24 && found; ++a)
        for (int b = a + 1; b < 24; ++b) found = found && l[prob * 2053 + a] != l[prob * 2053 + b];
      EXPECT_TRUE(found) << "problem " << prob << ": reference did not recover the blobs";
      // ...and the GPU's labels agree row for row (no row is near a tie).
      for (int64_t i = 0; i < 2053; ++i)
        ASSERT_EQ(got.labels[prob * 2053 + i], l[prob * 2053 + i])
            << "problem " << prob << " row " << i;
      EXPECT_NEAR(got.objective[prob], want[prob].objective,
                  1e-4 * std::max(1.0, want[prob].objective));
    }
  }
#else
  FAIL() << "built without CUDA";
#endif
}

TEST_P(KmeansGpuPlusPlus, MeanRowCentroidsAreTheReferences) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  const auto [dim, dtype] = GetParam();
  // As ExactLabelsOnBlobs (the labels agree row for row), in an index of 28 clusters per problem.
  KmeansParams p;
  p.num_problems = 3;
  p.num_points = 2053;
  p.dim = dim;
  p.num_clusters = 24;
  p.centroid_stride = 28;
  p.init = KmeansInit::kPlusPlus;
  p.output = KmeansCentroids::kMeanRow;
  p.seed = test::test_seed();
  p.dtype = dtype;
  SCOPED_TRACE(::testing::Message() << "seed " << test::test_seed());
  const Points pts = to_dtype(blobs(3, 2053, dim, 24, 0.05f, test::test_seed() + 2), dtype);
  std::vector<float> c(static_cast<size_t>(3) * 28 * dim, 0.f);
  std::vector<int32_t> l(3 * 2053), sz(3 * 28, 0);
  kmeans_ref(p, pts.data(), c.data(), l.data(), sz.data());
  const GpuOut got = run_gpu(p, pts.data(), pts.bytes());
  ASSERT_EQ(got.labels, l);
  for (int32_t prob = 0; prob < 3; ++prob)
    for (int32_t j = 0; j < 24; ++j) {
      ASSERT_EQ(got.sizes[prob * 28 + j], sz[prob * 28 + j])
          << "problem " << prob << " cluster " << j;
      for (int t = 0; t < dim; ++t) {
        const size_t at = (static_cast<size_t>(prob) * 28 + j) * dim + t;
        ASSERT_NEAR(got.centroids[at], c[at], 1e-5f * std::max(1.f, std::abs(c[at])))
            << "problem " << prob << " cluster " << j << " column " << t;
      }
    }
#else
  FAIL() << "built without CUDA";
#endif
}

INSTANTIATE_TEST_SUITE_P(Shapes, KmeansGpuPlusPlus,
                         ::testing::Combine(::testing::Values(64, 128),
                                            ::testing::Values(DType::kF32, DType::kF16,
                                                              DType::kBF16)));

TEST(KmeansGpuPlusPlusEdge, SinglePointProblems) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  KmeansParams p;
  p.num_problems = 3;
  p.num_points = 1;
  p.dim = 128;
  p.num_clusters = 4;
  p.init = KmeansInit::kPlusPlus;
  const Points pts = gaussian_rows(3, 1, 128, DType::kF32, 5);
  const GpuOut o = run_gpu(p, pts.data(), pts.bytes());
  for (int32_t prob = 0; prob < 3; ++prob) {
    EXPECT_EQ(o.labels[prob], 0);
    EXPECT_EQ(o.sizes[prob * 4], 1);
    for (int j = 1; j < 4; ++j) EXPECT_EQ(o.sizes[prob * 4 + j], 0);
    EXPECT_NEAR(o.objective[prob], 0.0, 1e-5);
  }
#else
  FAIL() << "built without CUDA";
#endif
}

}  // namespace
}  // namespace kvtier::kernels
