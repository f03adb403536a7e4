// Kernel benchmarks. k-means: 32 layers x 8 KV heads = 256 problems of dim 128, k = ctx / 64,
// 20 iterations (no early stop), bf16 keys with cluster structure, timed with CUDA events.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "kernels/kmeans.h"
#include "memory/core/cuda_raii.h"
#include "memory/core/half.h"

namespace kvtier::bench {
namespace {

#if KVTIER_WITH_CUDA
void BM_KmeansGpu(benchmark::State& state) {
  if (!cuda::device_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  kernels::KmeansParams p;
  p.num_problems = static_cast<int32_t>(state.range(1));
  p.num_points = state.range(0);
  p.dim = 128;
  p.num_clusters = static_cast<int32_t>(p.num_points / 64);
  p.max_iters = 20;
  p.rel_tol = 0.f;  // always 20 iterations: the figure the target is stated for
  p.dtype = DType::kBF16;
  p.pruning = state.range(2) ? kernels::KmeansPruning::kBounds : kernels::KmeansPruning::kNone;
  p.init = state.range(3) ? kernels::KmeansInit::kPlusPlus : kernels::KmeansInit::kRandomRows;
  // Keys around 4096 random directions per problem, as real keys cluster.
  const size_t elems = static_cast<size_t>(p.num_problems) * p.num_points * p.dim;
  std::vector<uint16_t> host(elems);
  std::mt19937_64 rng(1);
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> dirs(4096 * 128);
  for (auto& v : dirs) v = g(rng);
  for (size_t r = 0; r < elems / 128; ++r) {
    const float* d = &dirs[(rng() % 4096) * 128];
    for (int t = 0; t < 128; ++t) host[r * 128 + t] = float_to_bf16(d[t] + 0.5f * g(rng));
  }
  cuda::Stream s(0);
  cuda::DeviceAllocation x(elems * 2, 0), ws(kernels::kmeans_workspace_bytes(p), 0);
  cuda::DeviceBuffer<float> c(static_cast<size_t>(p.num_problems) * p.num_clusters * p.dim, 0);
  cuda::DeviceBuffer<int32_t> l(static_cast<size_t>(p.num_problems) * p.num_points, 0),
      sz(static_cast<size_t>(p.num_problems) * p.num_clusters, 0);
  cuda::memcpy_async(x.get(), host.data(), elems * 2, s.get());
  cuda::Event a(cuda::EventTiming::kEnabled), b(cuda::EventTiming::kEnabled);
  kernels::launch_kmeans(p, x.get(), c.get(), l.get(), sz.get(), ws.get(), nullptr, nullptr,
                         nullptr, s.get());
  s.synchronize();  // warm-up
  for (auto _ : state) {
    a.record(s.get());
    kernels::launch_kmeans(p, x.get(), c.get(), l.get(), sz.get(), ws.get(), nullptr, nullptr,
                           nullptr, s.get());
    b.record(s.get());
    b.synchronize();
    state.SetIterationTime(cuda::elapsed_ms(a, b) * 1e-3);
  }
  const double flop =
      2.0 * p.num_problems * p.num_points * p.num_clusters * p.dim * (p.max_iters + 1);
  state.counters["assign_TFLOP"] = flop / 1e12;
}
// Args: keys per problem, problems, pruning (1 = angle bounds, 0 = scan every row), init (0 =
// random rows, 1 = k-means++ on a sample of 16384 rows).
BENCHMARK(BM_KmeansGpu)
    ->Args({32768, 256, 0, 0})
    ->Args({32768, 256, 1, 0})
    ->Args({131072, 8, 0, 0})
    ->Args({131072, 8, 1, 0})
    ->Args({131072, 8, 1, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(2);
#endif

}  // namespace
}  // namespace kvtier::bench

BENCHMARK_MAIN();
