// Fetch bandwidth for cluster-granular misses: clusters of 8..128 rows in random order, K and V,
// head_dim 128, bf16, from pinned host memory into cluster-cache pages. Beside each, one large
// cudaMemcpyAsync H2D of the same bytes in the same run (the ceiling), reported as pct_of_memcpy.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>

#include "bench/fetch_fixture.h"
#include "kernels/kv_gather.h"
#include "memory/core/cuda_raii.h"
#include "memory/core/log.h"

namespace kvtier::bench {
namespace {

constexpr int32_t kHeadDim = 128;
constexpr int32_t kKvHeads = 8;
constexpr int32_t kPageSize = 16;
constexpr int kNumSelections = 4;  // rotate so no selection is re-read from L2
const std::vector<int32_t> kClusterRows = {8, 16, 32, 64, 128};

int64_t env_int(const char* name, int64_t def) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : def;
}

/// Rows per KV head in the host tier and rows per fetch; KVTIER_BENCH_ROWS_PER_HEAD and
/// KVTIER_BENCH_FETCH_ROWS override (defaults: 32768 rows per head, 64 MiB of K+V per fetch).
int64_t rows_per_head() { return env_int("KVTIER_BENCH_ROWS_PER_HEAD", 32768); }
int64_t fetch_rows() { return env_int("KVTIER_BENCH_FETCH_ROWS", 131072); }

struct Plans {
  std::vector<std::vector<memory::GatherSegment>> host;    // per selection, kHost addresses
  std::vector<std::vector<memory::GatherSegment>> device;  // per selection, kDevice addresses
  std::vector<int64_t> bytes;
};

struct Fixture {
  FetchWorkload w;
  std::unique_ptr<memory::ClusterCache> cache;
  std::vector<Plans> plans;  // per layer (cluster size)
  int64_t pool_pages = 0;

  explicit Fixture(Backend backend) {
    w = make_fetch_workload(kClusterRows, rows_per_head(), kKvHeads, kHeadDim, DType::kBF16, 7);
    memory::ClusterCacheConfig cc;
    cc.backend = backend;
    cc.head_dim = kHeadDim;
    cc.page_size = kPageSize;
    // Clusters of 8 rows take a whole 16-row page: size the pool for that worst case.
    cc.num_pages = 2 * fetch_rows() / 8 + 1024;
    cache = std::make_unique<memory::ClusterCache>(cc);
    std::mt19937_64 rng(11);
    int64_t step = 0;
    for (size_t l = 0; l < kClusterRows.size(); ++l) {
      Plans p;
      for (int s = 0; s < kNumSelections; ++s) {
        cache->erase_sequence(0);  // a cold cache: every cluster misses
        cache->begin_step(++step);
        const auto sel = random_selection(w, static_cast<int32_t>(l), fetch_rows(), rng);
        const memory::CacheLookup lk = cache->lookup(sel);
        std::vector<memory::GatherSegment> h, d;
        memory::plan_fetch(*w.store, sel.data(), lk, kPageSize, memory::HostAddress::kHost, &h);
        if (backend == Backend::kCuda)
          memory::plan_fetch(*w.store, sel.data(), lk, kPageSize, memory::HostAddress::kDevice, &d);
        p.bytes.push_back(memory::plan_bytes(h, w.store->row_bytes()));
        p.host.push_back(std::move(h));
        p.device.push_back(std::move(d));
      }
      plans.push_back(std::move(p));
    }
  }
};

Fixture& cpu_fixture() {
  static Fixture f(Backend::kCpu);
  return f;
}

#if KVTIER_WITH_CUDA
Fixture& gpu_fixture() {
  static Fixture f(Backend::kCuda);
  return f;
}

/// Median GB/s of one cudaMemcpyAsync H2D of `bytes` from pinned memory (the ceiling).
double memcpy_ceiling_gbps(size_t bytes, cuda::Stream& stream) {
  static std::map<size_t, double> memo;
  if (auto it = memo.find(bytes); it != memo.end()) return it->second;
  memory::PinnedBuffer src = memory::PinnedBuffer::allocate(bytes);
  std::memset(src.data(), 1, bytes);
  cuda::DeviceAllocation dst(bytes, 0);
  cuda::Event a(cuda::EventTiming::kEnabled), b(cuda::EventTiming::kEnabled);
  std::vector<double> gbps;
  for (int i = 0; i < 23; ++i) {
    a.record(stream.get());
    cuda::memcpy_async(dst.get(), src.data(), bytes, stream.get());
    b.record(stream.get());
    b.synchronize();
    if (i >= 3) gbps.push_back(bytes / (cuda::elapsed_ms(a, b) * 1e-3) / 1e9);
  }
  std::sort(gbps.begin(), gbps.end());
  return memo[bytes] = gbps[gbps.size() / 2];
}

enum class Path { kKernel, kCopyEngine };

void run_gpu_fetch(benchmark::State& state, Path path) {
  if (!cuda::device_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  Fixture& f = gpu_fixture();
  const size_t layer = static_cast<size_t>(state.range(0));
  const Plans& p = f.plans[layer];
  cuda::Stream stream(0);
  const int32_t rb = static_cast<int32_t>(f.w.store->row_bytes());
  std::vector<cuda::DeviceBuffer<memory::GatherSegment>> dev_segs;
  for (const auto& d : p.device) dev_segs.emplace_back(d.size(), 0);
  // One pinned staging area for the segment lists, as the engine uses.
  std::vector<memory::PinnedBuffer> staging;
  for (const auto& d : p.device) {
    staging.push_back(memory::PinnedBuffer::allocate(d.size() * sizeof(memory::GatherSegment)));
    std::memcpy(staging.back().data(), d.data(), d.size() * sizeof(memory::GatherSegment));
  }
  int64_t copies = 0;  // copy-engine calls per fetch, after merging contiguous runs
  auto fetch = [&](int s) {
    if (path == Path::kKernel) {
      // The segment list travels too: it is part of every fetch.
      cuda::memcpy_async(dev_segs[s].get(), staging[s].data(),
                         p.device[s].size() * sizeof(memory::GatherSegment), stream.get());
      kernels::launch_gather({dev_segs[s].get(), static_cast<int32_t>(p.device[s].size()), rb,
                              kPageSize, f.cache->k_pool(), f.cache->v_pool()},
                             stream.get());
    } else {
      copies = kernels::launch_gather_copy_engine(
          p.host[s].data(), static_cast<int32_t>(p.host[s].size()), rb, kPageSize,
          f.cache->k_pool(), f.cache->v_pool(), stream.get());
    }
  };
  // Correctness before timing: one cluster's first row must arrive intact.
  {
    fetch(0);
    stream.synchronize();
    const memory::GatherSegment& s0 = p.host[0][0];
    std::vector<std::byte> got(rb);
    cuda::memcpy_async(got.data(),
                       f.cache->k_page(s0.dst_page) + static_cast<size_t>(s0.dst_row) * rb, rb,
                       stream.get());
    stream.synchronize();
    if (std::memcmp(got.data(), s0.src_k, rb) != 0) {
      state.SkipWithError("fetched rows differ from the host tier");
      return;
    }
  }
  for (int s = 0; s < kNumSelections; ++s) fetch(s);  // warm-up
  stream.synchronize();
  cuda::Event a(cuda::EventTiming::kEnabled), b(cuda::EventTiming::kEnabled);
  int s = 0;
  int64_t bytes = 0;
  double seconds = 0;
  for (auto _ : state) {
    a.record(stream.get());
    fetch(s);
    b.record(stream.get());
    b.synchronize();
    const double t = cuda::elapsed_ms(a, b) * 1e-3;
    state.SetIterationTime(t);
    seconds += t;
    bytes += p.bytes[s];
    s = (s + 1) % kNumSelections;
  }
  state.SetBytesProcessed(bytes);
  const double ceiling = memcpy_ceiling_gbps(static_cast<size_t>(p.bytes[0]), stream);
  state.counters["cluster_rows"] = kClusterRows[layer];
  state.counters["segments"] = static_cast<double>(p.device[0].size());
  state.counters["memcpy_GBps"] = ceiling;
  if (path == Path::kCopyEngine) state.counters["copies"] = static_cast<double>(copies);
  const double gbps = static_cast<double>(bytes) / seconds / 1e9;
  state.counters["fetch_GBps"] = gbps;
  state.counters["pct_of_memcpy"] = gbps / ceiling * 100.0;
}

void BM_FetchGatherKernel(benchmark::State& state) { run_gpu_fetch(state, Path::kKernel); }
void BM_FetchCopyEngine(benchmark::State& state) { run_gpu_fetch(state, Path::kCopyEngine); }

void BM_MemcpyCeiling(benchmark::State& state) {
  if (!cuda::device_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const size_t bytes = static_cast<size_t>(fetch_rows()) * 2 * kHeadDim * 2;
  memory::PinnedBuffer src = memory::PinnedBuffer::allocate(bytes);
  std::memset(src.data(), 3, bytes);
  cuda::DeviceAllocation dst(bytes, 0);
  cuda::Stream stream(0);
  cuda::Event a(cuda::EventTiming::kEnabled), b(cuda::EventTiming::kEnabled);
  cuda::memcpy_async(dst.get(), src.data(), bytes, stream.get());
  stream.synchronize();
  for (auto _ : state) {
    a.record(stream.get());
    cuda::memcpy_async(dst.get(), src.data(), bytes, stream.get());
    b.record(stream.get());
    b.synchronize();
    state.SetIterationTime(cuda::elapsed_ms(a, b) * 1e-3);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(bytes));
  state.counters["pinned"] = src.is_pinned();
}

BENCHMARK(BM_MemcpyCeiling)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FetchGatherKernel)->DenseRange(0, 4)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FetchCopyEngine)->DenseRange(0, 4)->UseManualTime()->Unit(benchmark::kMillisecond);
#endif  // KVTIER_WITH_CUDA

/// The CPU backend's fetch (the reference gather), for machines without a GPU.
void BM_FetchCpuReference(benchmark::State& state) {
  Fixture& f = cpu_fixture();
  const size_t layer = static_cast<size_t>(state.range(0));
  const Plans& p = f.plans[layer];
  const int32_t rb = static_cast<int32_t>(f.w.store->row_bytes());
  int s = 0;
  int64_t bytes = 0;
  for (auto _ : state) {
    kernels::gather_ref({p.host[s].data(), static_cast<int32_t>(p.host[s].size()), rb, kPageSize,
                         f.cache->k_pool(), f.cache->v_pool()});
    benchmark::ClobberMemory();
    bytes += p.bytes[s];
    s = (s + 1) % kNumSelections;
  }
  state.SetBytesProcessed(bytes);
  state.counters["cluster_rows"] = kClusterRows[layer];
}
BENCHMARK(BM_FetchCpuReference)->DenseRange(0, 4)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvtier::bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  benchmark::AddCustomContext("kvtier_device", kvtier::cuda::device_description(0));
  benchmark::AddCustomContext("kvtier_shape", "head_dim 128, bf16, 8 KV heads, page 16 rows");
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
