// GPU spherical k-means against the reference: objective within 1e-4 relative, exact labels
// where the reference recovered well-separated blobs, edge cases and the non-finite flag.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
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

GpuOut run_gpu(const KmeansParams& p, const void* host_points, size_t bytes) {
  cuda::Stream s(0);
  cuda::DeviceAllocation x(bytes, 0), ws(kmeans_workspace_bytes(p), 0);
  const int32_t stride = kmeans_centroid_stride(p);
  cuda::DeviceBuffer<float> c(static_cast<size_t>(p.num_problems) * stride * p.dim, 0);
  cuda::DeviceBuffer<int32_t> l(static_cast<size_t>(p.num_problems) * p.num_points, 0),
      sz(static_cast<size_t>(p.num_problems) * stride, 0), it(p.num_problems, 0), nf(1, 0);
  cuda::DeviceBuffer<double> obj(p.num_problems, 0);
  cuda::memcpy_async(x.get(), host_points, bytes, s.get());
  launch_kmeans(p, x.get(), c.get(), l.get(), sz.get(), ws.get(), obj.get(), it.get(), nf.get(),
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
  x[2 * 64 + 7] = std::nanf("");
  o = run_gpu(p, x.data(), x.size() * 4);
  EXPECT_EQ(o.nonfinite, 1);
  p.init = KmeansInit::kPlusPlus;
  EXPECT_THROW(run_gpu(p, x.data(), x.size() * 4), InvalidArgumentError);
#else
  FAIL() << "built without CUDA";
#endif
}

}  // namespace
}  // namespace kvtier::kernels
