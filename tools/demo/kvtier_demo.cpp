// kvtier-demo: the memory tiers at work on a decode-shaped workload. It fills the host tier with
// one long sequence (default: 4 layers of a Llama-3.1-8B-shaped model at 32K tokens), lays each
// KV head out in clusters, then runs decode steps: each step and layer selects whole clusters up
// to a token budget per KV head (a slowly drifting working set, so selections recur as they do in
// a real model), looks them up in the cluster cache, fetches the misses (GPU gather kernel, or the
// CPU reference without a GPU), verifies what arrived bitwise, and appends the step's new token.
// Cluster labels are synthetic here (uniform random assignment of tokens to clusters): the
// k-means that produces real ones is a separate kernel.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/kv_gather.h"
#include "memory/cluster_cache.h"
#include "memory/core/cuda_raii.h"
#include "memory/fetch_plan.h"
#include "memory/tiered_store.h"

using namespace kvtier;

namespace {

struct Options {
  int64_t context = 32768;
  int32_t layers = 4;
  int32_t kv_heads = 8;
  int32_t head_dim = 128;
  int32_t rows_per_cluster = 64;  // C0 = context / rows_per_cluster clusters per head
  int32_t budget = 2048;          // selected tokens per KV head per step
  int32_t steps = 32;
  int32_t retention = 8;
  double drift = 0.05;  // share of the working set replaced per step
  size_t cache_mib = 1024;
  std::string backend = "auto";
};

void usage() {
  std::printf(
      "usage: kvtier_demo [--context N] [--layers N] [--kv-heads N] [--head-dim 64|128|256]\n"
      "                   [--rows-per-cluster N] [--budget N] [--steps N] [--retention R]\n"
      "                   [--drift F] [--cache-mib N] [--backend auto|cpu|cuda]\n");
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "kvtier_demo: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--context")
      o.context = std::atoll(next());
    else if (a == "--layers")
      o.layers = std::atoi(next());
    else if (a == "--kv-heads")
      o.kv_heads = std::atoi(next());
    else if (a == "--head-dim")
      o.head_dim = std::atoi(next());
    else if (a == "--rows-per-cluster")
      o.rows_per_cluster = std::atoi(next());
    else if (a == "--budget")
      o.budget = std::atoi(next());
    else if (a == "--steps")
      o.steps = std::atoi(next());
    else if (a == "--retention")
      o.retention = std::atoi(next());
    else if (a == "--drift")
      o.drift = std::atof(next());
    else if (a == "--cache-mib")
      o.cache_mib = static_cast<size_t>(std::atoll(next()));
    else if (a == "--backend")
      o.backend = next();
    else if (a == "-h" || a == "--help") {
      usage();
      std::exit(0);
    } else {
      std::fprintf(stderr, "kvtier_demo: unknown option %s\n", a.c_str());
      usage();
      std::exit(2);
    }
  }
  return o;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) try {
  const Options o = parse(argc, argv);
  Backend backend = cuda::device_available() ? Backend::kCuda : Backend::kCpu;
  if (o.backend == "cpu") backend = Backend::kCpu;
  if (o.backend == "cuda") backend = Backend::kCuda;
  const int64_t sinks = 16;
  const int32_t num_clusters =
      static_cast<int32_t>(std::max<int64_t>(1, (o.context - sinks) / o.rows_per_cluster));

  memory::TieredStoreConfig sc;
  sc.shape = {o.layers, o.kv_heads, o.head_dim, DType::kBF16};
  const size_t row_bytes = sc.shape.row_bytes();
  const size_t kv_bytes =
      2 * row_bytes * static_cast<size_t>(o.context + o.steps) * o.kv_heads * o.layers;
  sc.host.bytes_limit = kv_bytes + kv_bytes / 16 + (64u << 20);
  memory::TieredStore store(sc);

  std::printf("kvtier demo: memory tiers and cluster cache\n");
  std::printf("  device        %s\n", cuda::device_description(0).c_str());
  std::printf("  backend       %s\n", backend_name(backend));
  std::printf("  shape         %d layers x %d KV heads x head_dim %d, bf16, context %lld\n",
              o.layers, o.kv_heads, o.head_dim, static_cast<long long>(o.context));

  // ---- prefill: host tier + cluster layout ----
  auto t0 = std::chrono::steady_clock::now();
  store.add_sequence(0);
  std::mt19937_64 rng(2026);
  std::vector<uint64_t> rows(row_bytes * o.context * o.kv_heads / 8);
  for (int32_t l = 0; l < o.layers; ++l) {
    for (auto& x : rows) x = rng();
    store.append(
        0, l,
        memory::KvRows{rows.data(), rows.data(), DType::kBF16, o.kv_heads, o.head_dim, o.context});
  }
  const double t_append = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> labels(static_cast<size_t>(o.context - sinks));
  for (int32_t l = 0; l < o.layers; ++l)
    for (int32_t h = 0; h < o.kv_heads; ++h) {
      for (auto& x : labels) x = static_cast<int32_t>(rng() % num_clusters);
      store.cluster(0, l, h, sinks, o.context - sinks, labels.data(), num_clusters);
    }
  const double t_cluster = seconds_since(t0);
  const memory::HostArenaStats hs = store.arena().stats();
  std::printf("  host tier     %.1f MiB in %zu slabs, %s, NUMA node %d%s%s\n",
              hs.bytes_used / 1048576.0, hs.num_slabs,
              store.arena().is_pinned() ? "pinned" : "pageable", store.arena().numa_node(),
              store.arena().pin_note().empty() ? "" : " -- ", store.arena().pin_note().c_str());
  std::printf("  prefill       append %.2f s, cluster layout %.2f s (%d clusters per head)\n",
              t_append, t_cluster, num_clusters);

  // ---- decode ----
  memory::ClusterCacheConfig cc;
  cc.backend = backend;
  cc.dtype = DType::kBF16;
  cc.head_dim = o.head_dim;
  cc.bytes_limit = o.cache_mib << 20;
  cc.retention_steps = o.retention;
  memory::ClusterCache cache(cc);
  std::printf("  cluster cache %lld pages of %d rows (%.0f MiB K+V), retention %d steps\n",
              static_cast<long long>(cache.num_pages()), cc.page_size,
              2.0 * cache.num_pages() * cache.page_bytes() / 1048576.0, o.retention);

  // Working set per (layer, head): a ranking of clusters that drifts a little every step.
  std::vector<std::vector<int32_t>> ranking(static_cast<size_t>(o.layers) * o.kv_heads);
  for (auto& r : ranking) {
    r.resize(num_clusters);
    for (int32_t c = 0; c < num_clusters; ++c) r[c] = c;
    std::shuffle(r.begin(), r.end(), rng);
  }
  std::unique_ptr<cuda::Stream> stream;
  std::unique_ptr<cuda::DeviceBuffer<memory::GatherSegment>> dev_segs;
  std::unique_ptr<cuda::Event> ev_a, ev_b;
  if (backend == Backend::kCuda) {
    stream = std::make_unique<cuda::Stream>(0);
    ev_a = std::make_unique<cuda::Event>(cuda::EventTiming::kEnabled);
    ev_b = std::make_unique<cuda::Event>(cuda::EventTiming::kEnabled);
  }
  double fetch_seconds = 0;
  int64_t fetched_bytes = 0, verified = 0, mismatches = 0;
  std::vector<uint64_t> token(row_bytes * o.kv_heads / 8);
  const auto t_decode = std::chrono::steady_clock::now();
  for (int32_t step = 1; step <= o.steps; ++step) {
    cache.begin_step(step);
    for (int32_t l = 0; l < o.layers; ++l) {
      std::vector<memory::CacheRequest> reqs;
      for (int32_t h = 0; h < o.kv_heads; ++h) {
        auto& r = ranking[static_cast<size_t>(l) * o.kv_heads + h];
        // Drift: swap a few top-ranked clusters with random others.
        const int32_t swaps =
            static_cast<int32_t>(std::ceil(o.drift * o.budget / o.rows_per_cluster));
        for (int32_t s = 0; s < swaps; ++s)
          std::swap(r[rng() % std::min<int32_t>(num_clusters, o.budget / o.rows_per_cluster + 1)],
                    r[rng() % num_clusters]);
        int64_t taken = 0;
        for (int32_t c : r) {
          if (taken >= o.budget) break;
          const memory::ClusterSpan span = store.cluster_span(0, l, h, c);
          if (span.num_rows == 0) continue;
          reqs.push_back({{0, l, h, c}, span.num_rows});
          taken += span.num_rows;
        }
      }
      const memory::CacheLookup lk = cache.lookup(reqs);
      std::vector<memory::GatherSegment> plan;
      const auto addr =
          backend == Backend::kCuda ? memory::HostAddress::kDevice : memory::HostAddress::kHost;
      memory::plan_fetch(store, reqs.data(), lk, cc.page_size, addr, &plan);
      fetched_bytes += memory::plan_bytes(plan, row_bytes);
      kernels::GatherParams gp{plan.data(),
                               static_cast<int32_t>(plan.size()),
                               static_cast<int32_t>(row_bytes),
                               cc.page_size,
                               cache.k_pool(),
                               cache.v_pool()};
      if (backend == Backend::kCuda) {
#if KVTIER_WITH_CUDA
        if (!dev_segs || dev_segs->size() < plan.size())
          dev_segs = std::make_unique<cuda::DeviceBuffer<memory::GatherSegment>>(
              plan.size() * 2 + 1024, 0);
        ev_a->record(stream->get());
        cuda::memcpy_async(dev_segs->get(), plan.data(),
                           plan.size() * sizeof(memory::GatherSegment), stream->get());
        gp.segments = dev_segs->get();
        kernels::launch_gather(gp, stream->get());
        ev_b->record(stream->get());
        ev_b->synchronize();
        fetch_seconds += cuda::elapsed_ms(*ev_a, *ev_b) * 1e-3;
#endif
      } else {
        const auto tf = std::chrono::steady_clock::now();
        kernels::gather_ref(gp);
        fetch_seconds += seconds_since(tf);
      }
      // Verify one request in 16 against the host tier, bitwise.
      for (size_t i = 0; i < reqs.size(); i += 16) {
        const auto& q = reqs[i];
        const memory::ClusterSpan span =
            store.cluster_span(0, q.key.layer, q.key.kv_head, q.key.cluster);
        std::vector<std::byte> want(row_bytes * span.num_rows), want_v(want.size()), got(row_bytes);
        store.read_slots(0, q.key.layer, q.key.kv_head, span.slot_begin, span.num_rows, want.data(),
                         want_v.data());
        for (int32_t r = 0; r < q.num_rows; r += 7) {
          const std::byte* src = cache.k_page(lk.page_ids[lk.page_indptr[i] + r / cc.page_size]) +
                                 static_cast<size_t>(r % cc.page_size) * row_bytes;
          if (backend == Backend::kCuda) {
            cuda::memcpy_async(got.data(), src, row_bytes, stream->get());
            stream->synchronize();
          } else {
            std::memcpy(got.data(), src, row_bytes);
          }
          ++verified;
          if (std::memcmp(got.data(), want.data() + r * row_bytes, row_bytes) != 0) ++mismatches;
        }
      }
      // The step's new token goes to the tail of the host tier.
      for (auto& x : token) x = rng();
      store.append(
          0, l,
          memory::KvRows{token.data(), token.data(), DType::kBF16, o.kv_heads, o.head_dim, 1});
    }
  }
  const double decode_s = seconds_since(t_decode);
  const memory::CacheStats cs = cache.stats();
  const memory::HostArenaStats hs2 = store.arena().stats();
  std::printf("\n%-28s %s\n", "metric", "value");
  std::printf("%-28s %d steps x %d layers, budget %d tokens/KV head\n", "decode", o.steps, o.layers,
              o.budget);
  std::printf("%-28s %.1f %%\n", "cache hit rate", 100.0 * cs.hit_rate());
  std::printf("%-28s %lld hits, %lld misses\n", "cluster lookups", static_cast<long long>(cs.hits),
              static_cast<long long>(cs.misses));
  std::printf("%-28s %lld (%lld under memory pressure)\n", "evictions",
              static_cast<long long>(cs.evictions), static_cast<long long>(cs.pressure_evictions));
  std::printf("%-28s %.1f MiB (%.2f MiB per step)\n", "bytes fetched", fetched_bytes / 1048576.0,
              fetched_bytes / 1048576.0 / o.steps);
  std::printf("%-28s %.2f GB/s (%s)\n", "fetch bandwidth",
              fetched_bytes / std::max(fetch_seconds, 1e-12) / 1e9,
              backend == Backend::kCuda ? "gather kernel, CUDA events" : "CPU reference gather");
  std::printf("%-28s %.1f / %.1f MiB (peak %.1f)\n", "host arena used / limit",
              hs2.bytes_used / 1048576.0, hs2.bytes_limit / 1048576.0, hs2.bytes_peak / 1048576.0);
  std::printf("%-28s %lld / %lld pages\n", "cache pages used",
              static_cast<long long>(cs.pages_used), static_cast<long long>(cs.num_pages));
  std::printf("%-28s %lld rows checked, %lld mismatches\n", "verification",
              static_cast<long long>(verified), static_cast<long long>(mismatches));
  std::printf("%-28s %.2f s\n", "decode wall time", decode_s);
  return mismatches == 0 ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "kvtier_demo: %s\n", e.what());
  return 1;
}
