// kvtier-bench: simulated long-context decoding on one GPU, side by side.
//
// For a model shape (default Llama-3.1-8B: 32 layers, 32 query heads, 8 KV heads, head_dim 128,
// bf16) and a context (default 131072) it holds real KV data and decodes `--steps` tokens per
// sequence with each method, timing the attention path only (everything a decode step does with
// the KV cache: append, selection, fetch, attention; not the model's projections or MLPs):
//   dense      all KV on the GPU, kvtier's dense decode kernel
//   offload    KV in pinned host memory, each layer's whole KV copied H2D every step (what
//              transformers' offloaded cache does), then dense attention; the next layer's copy
//              overlaps this layer's attention
//   full       the engine in mode full (all rows resident, offloaded to the host tier)
//   clusterkv  the engine in mode clusterkv (recall with budget B)
//   clusterkv-cold  clusterkv with fresh random queries every step and R = 0: ~0% cache hits
//   clusterattn  the engine in mode clusterattn (DBAC keeps prompt ranges that the observation
//              window votes for; the rest of the prompt is dropped)
//   hybrid     the engine in mode hybrid (DBAC's ranges resident, the other rows recalled)
// It prints a table and writes JSON. The data generator is described in docs/kvtier_bench.md.
#include <tbb/parallel_for.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/decode_attention.h"
#include "memory/core/check.h"
#include "memory/core/cuda_raii.h"
#include "memory/core/half.h"
#include "memory/core/status.h"
#include "memory/pinned_buffer.h"
#include "scheduler/engine.h"
#include "scheduler/spans.h"

#if KVTIER_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace kvtier::bench {
namespace {

struct Options {
  ModelShape model{32, 32, 8, 128, DType::kBF16};
  int64_t context = 131072;
  int32_t batch = 1;
  int32_t steps = 32;
  int32_t warmup = 16;  // the first steps after a prompt carry one-time work
  int32_t offload_steps = 3;
  std::vector<std::string> modes{"dense", "offload", "full", "clusterkv", "clusterkv-cold"};
  int32_t budget = 2048, sink = 16, window = 256, retention = 8, page_size = 16;
  int32_t num_dense_layers = 2;
  int32_t kmeans_iters = 10;
  float drift = 0.05f;
  int32_t topics = 64;
  Backend backend = Backend::kCuda;
  double host_gib = 0;  // host tier cap; 0: what the sequences need + 10%
  std::string json;
  std::string torch_script;  // companion: torch SDPA at the same shape, run in the same call
  uint64_t seed = 1;
  bool cuda_graphs = true;
  bool admit_window = true;  // EngineConfig::admit_window_clusters
  bool mean_keys = false;    // EngineConfig::mean_key_scores
  std::string trace_dir;     // --trace: each engine mode's telemetry, profiled at the end
  std::string trace_tool;    // the profiler (default: tools/kvtier-trace of this source tree)
  /// Decode steps an engine mode runs: warm-up, the timed steps, and with --trace two more
  /// blocks (untraced, then traced again) for the overhead of tracing.
  int32_t engine_steps() const { return warmup + steps * (trace_dir.empty() ? 1 : 3); }
};

[[noreturn]] void usage(const char* msg) {
  std::fprintf(
      stderr,
      "%s\nusage: kvtier-bench [--layers N] [--q-heads N] [--kv-heads N] [--head-dim 64|128]\n"
      "  [--dtype bf16|fp16] [--context N] [--batch N] [--steps N] [--warmup N]\n"
      "  [--offload-steps N]\n"
      "  [--modes dense,offload,full,clusterkv,clusterkv-cold,clusterattn,hybrid]\n"
      "  [--budget N] [--sink N] [--window N] [--retention N] [--page-size N]\n"
      "  [--dense-layers N] [--kmeans-iters N] [--drift X] [--topics N]\n"
      "  [--backend cuda|cpu] [--host-gib X] [--json FILE]\n"
      "  [--torch-script bench/sdpa_baseline.py] [--seed N] [--cuda-graphs 0|1]\n"
      "  [--admit-window 0|1] [--mean-keys 0|1]\n"
      "  [--trace DIR [--trace-tool tools/kvtier-trace]]\n",
      msg);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value for " + a).c_str());
      return argv[++i];
    };
    if (a == "--layers")
      o.model.num_layers = std::stoi(next());
    else if (a == "--q-heads")
      o.model.num_q_heads = std::stoi(next());
    else if (a == "--kv-heads")
      o.model.num_kv_heads = std::stoi(next());
    else if (a == "--head-dim")
      o.model.head_dim = std::stoi(next());
    else if (a == "--dtype") {
      const std::string t = next();
      if (t == "bf16")
        o.model.dtype = DType::kBF16;
      else if (t == "fp16")
        o.model.dtype = DType::kF16;
      else
        usage("--dtype must be bf16 or fp16");
    } else if (a == "--context")
      o.context = std::stoll(next());
    else if (a == "--batch")
      o.batch = std::stoi(next());
    else if (a == "--steps")
      o.steps = std::stoi(next());
    else if (a == "--warmup")
      o.warmup = std::stoi(next());
    else if (a == "--offload-steps")
      o.offload_steps = std::stoi(next());
    else if (a == "--modes") {
      o.modes.clear();
      std::stringstream ss(next());
      std::string m;
      while (std::getline(ss, m, ',')) o.modes.push_back(m);
    } else if (a == "--budget")
      o.budget = std::stoi(next());
    else if (a == "--sink")
      o.sink = std::stoi(next());
    else if (a == "--window")
      o.window = std::stoi(next());
    else if (a == "--retention")
      o.retention = std::stoi(next());
    else if (a == "--page-size")
      o.page_size = std::stoi(next());
    else if (a == "--dense-layers")
      o.num_dense_layers = std::stoi(next());
    else if (a == "--kmeans-iters")
      o.kmeans_iters = std::stoi(next());
    else if (a == "--drift")
      o.drift = std::stof(next());
    else if (a == "--topics")
      o.topics = std::stoi(next());
    else if (a == "--backend") {
      const std::string b = next();
      if (b == "cuda")
        o.backend = Backend::kCuda;
      else if (b == "cpu")
        o.backend = Backend::kCpu;
      else
        usage("--backend must be cuda or cpu");
    } else if (a == "--host-gib")
      o.host_gib = std::stod(next());
    else if (a == "--json")
      o.json = next();
    else if (a == "--torch-script")
      o.torch_script = next();
    else if (a == "--seed")
      o.seed = std::stoull(next());
    else if (a == "--cuda-graphs")
      o.cuda_graphs = std::stoi(next()) != 0;
    else if (a == "--admit-window")
      o.admit_window = std::stoi(next()) != 0;
    else if (a == "--mean-keys")
      o.mean_keys = std::stoi(next()) != 0;
    else if (a == "--trace")
      o.trace_dir = next();
    else if (a == "--trace-tool")
      o.trace_tool = next();
    else if (a == "--help" || a == "-h")
      usage("");
    else
      usage(("unknown argument " + a).c_str());
  }
  if (o.context <= 0 || o.batch <= 0 || o.steps <= 0 || o.warmup < 0) usage("bad sizes");
  for (const std::string& m : o.modes) {
    if (m != "dense" && m != "offload" && m != "full" && m != "clusterkv" &&
        m != "clusterkv-cold" && m != "clusterattn" && m != "hybrid")
      usage(("unknown mode " + m).c_str());
  }
  return o;
}

// ---- data generator (docs/kvtier_bench.md) ----

uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
/// Standard normal from a 64-bit hash (Box-Muller on two 32-bit halves).
float gauss(uint64_t h) {
  const double u1 = (static_cast<double>(h >> 40) + 0.5) / 16777216.0;
  const double u2 = (static_cast<double>(h & 0xFFFFFF) + 0.5) / 16777216.0;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

class Generator {
 public:
  Generator(const Options& o) : o_(o), D_(o.model.head_dim) {
    // Topic directions per (layer, KV head): unit vectors times a key norm of 8.
    const size_t n = static_cast<size_t>(o.model.num_layers) * o.model.num_kv_heads * o.topics;
    topics_.resize(n * D_);
    for (size_t t = 0; t < n; ++t) {
      double sq = 0;
      for (int d = 0; d < D_; ++d) {
        const float x = gauss(mix(o.seed * 7919 + t * 1000 + d));
        topics_[t * D_ + d] = x;
        sq += x * x;
      }
      const float s = static_cast<float>(8.0 / std::sqrt(sq));
      for (int d = 0; d < D_; ++d) topics_[t * D_ + d] *= s;
    }
  }
  const float* topic(int32_t layer, int32_t h, int32_t c) const {
    return &topics_[((static_cast<size_t>(layer) * o_.model.num_kv_heads + h) * o_.topics + c) *
                    D_];
  }
  /// Topic of token `pos`: topics persist over segments of 64 to 512 tokens, as text stays on a
  /// subject for a while.
  int32_t topic_of(uint64_t seq, int32_t layer, int32_t h, int64_t pos) const {
    const int64_t seg = pos / 256;
    const uint64_t hsh = mix(seq * 1315423911ull + static_cast<uint64_t>(layer) * 2654435761ull +
                             static_cast<uint64_t>(h) * 97 + static_cast<uint64_t>(seg));
    return static_cast<int32_t>(hsh % o_.topics);
  }
  /// Rows [pos0, pos0 + n) of one (sequence, layer) as head-major [Hkv, n, D] of the model dtype.
  void rows(uint64_t seq, int32_t layer, int64_t pos0, int64_t n, uint16_t* k, uint16_t* v) const {
    const int32_t Hkv = o_.model.num_kv_heads;
    tbb::parallel_for(int64_t{0}, static_cast<int64_t>(Hkv) * n, [&](int64_t i) {
      const int32_t h = static_cast<int32_t>(i / n);
      const int64_t pos = pos0 + i % n;
      const float* t = topic(layer, h, topic_of(seq, layer, h, pos));
      const uint64_t base = mix(seq * 0x51ED27ull + layer * 0x3F1ull + h * 0x7Bull) ^
                            static_cast<uint64_t>(pos) * 0x9E3779B97F4A7C15ull;
      for (int d = 0; d < D_; ++d) {
        const float kx = t[d] + 0.5f * gauss(mix(base + 2 * d));
        const float vx = gauss(mix(base + 2 * d + 1));
        k[i * D_ + d] = store(kx);
        v[i * D_ + d] = store(vx);
      }
    });
  }
  /// The observation window of one (sequence, layer): the queries of the last n prompt
  /// positions, [Hq, n, D]; each head's query is its group's topic at that position plus noise,
  /// like the decode queries (make_queries).
  void window_queries(uint64_t seq, int32_t layer, int64_t n, uint16_t* q) const {
    const int32_t Hq = o_.model.num_q_heads, G = Hq / o_.model.num_kv_heads;
    tbb::parallel_for(int64_t{0}, static_cast<int64_t>(Hq) * n, [&](int64_t i) {
      const int32_t qh = static_cast<int32_t>(i / n);
      const int64_t pos = o_.context - n + i % n;
      const float* t = topic(layer, qh / G, topic_of(seq, layer, qh / G, pos));
      const uint64_t base = mix(seq * 0xC0FFEEull + layer * 0x9Bull + qh * 0x3Dull) ^
                            static_cast<uint64_t>(pos) * 0x9E3779B97F4A7C15ull;
      for (int d = 0; d < D_; ++d) q[i * D_ + d] = store(t[d] + 0.5f * gauss(mix(base + d)));
    });
  }
  uint16_t store(float x) const {
    return o_.model.dtype == DType::kBF16 ? float_to_bf16(x) : float_to_fp16(x);
  }

 private:
  const Options& o_;
  int D_;
  std::vector<float> topics_;
};

/// Queries of every step: [steps][layer][batch][Hq][D]. Each query head starts at its group's
/// topic of the last prompt segment and drifts slowly: q_{t+1} = |q| normalize(q_t + drift |q| z);
/// with `cold`, every step draws a fresh random topic instead (no temporal locality).
std::vector<uint16_t> make_queries(const Options& o, const Generator& g, int32_t steps, bool cold) {
  const int32_t L = o.model.num_layers, B = o.batch, Hq = o.model.num_q_heads,
                Hkv = o.model.num_kv_heads, D = o.model.head_dim, G = Hq / Hkv;
  std::vector<uint16_t> out(static_cast<size_t>(steps) * L * B * Hq * D);
  tbb::parallel_for(0, L * B * Hq, [&](int idx) {
    const int32_t l = idx / (B * Hq), b = (idx / Hq) % B, qh = idx % Hq, h = qh / G;
    std::vector<float> q(D);
    uint64_t r = mix(o.seed * 31 + static_cast<uint64_t>(idx) * 1000003ull);
    auto fresh = [&](int64_t pos) {
      const float* t = g.topic(l, h, g.topic_of(b, l, h, pos));
      for (int d = 0; d < D; ++d) q[d] = t[d] + 0.5f * gauss(r = mix(r));
    };
    fresh(o.context - 1);
    for (int32_t s = 0; s < steps; ++s) {
      if (cold) {
        fresh(static_cast<int64_t>(mix(r = mix(r)) % static_cast<uint64_t>(o.context)));
      } else if (s > 0) {
        double sq = 0, sq2 = 0;
        for (int d = 0; d < D; ++d) sq += q[d] * q[d];
        const float norm = static_cast<float>(std::sqrt(sq));
        for (int d = 0; d < D; ++d) q[d] += o.drift * norm * gauss(r = mix(r)) / std::sqrt(D);
        for (int d = 0; d < D; ++d) sq2 += q[d] * q[d];
        const float s2 = static_cast<float>(norm / std::sqrt(sq2));
        for (int d = 0; d < D; ++d) q[d] *= s2;
      }
      uint16_t* dst = &out[((((static_cast<size_t>(s) * L + l) * B + b) * Hq + qh)) * D];
      for (int d = 0; d < D; ++d) dst[d] = g.store(q[d]);
    }
  });
  return out;
}

// ---- memory helpers ----

void sync(Backend b, cudaStream_t s) {
#if KVTIER_WITH_CUDA
  if (b == Backend::kCuda) KVTIER_CUDA_CHECK(cudaStreamSynchronize(s));
#else
  (void)b;
  (void)s;
#endif
}
void wait_event(cudaStream_t s, const cuda::Event& e) {
#if KVTIER_WITH_CUDA
  KVTIER_CUDA_CHECK(cudaStreamWaitEvent(s, e.get(), 0));
#else
  (void)s;
  (void)e;
#endif
}

/// Device memory on the CUDA backend, host memory on the CPU backend.
class Mem {
 public:
  Mem(Backend b, size_t bytes) : backend_(b) {
    if (b == Backend::kCuda) {
      dev_ = cuda::DeviceAllocation(std::max<size_t>(bytes, 16), 0);
      ptr_ = static_cast<std::byte*>(dev_.get());
    } else {
      host_.resize(std::max<size_t>(bytes, 16));
      ptr_ = host_.data();
    }
  }
  std::byte* get() const { return ptr_; }
  void upload(size_t off, const void* src, size_t bytes, cudaStream_t s) {
    if (backend_ == Backend::kCuda) {
      cuda::memcpy_async(ptr_ + off, src, bytes, s);
    } else {
      std::memcpy(ptr_ + off, src, bytes);
    }
  }

 private:
  Backend backend_;
  cuda::DeviceAllocation dev_;
  std::vector<std::byte> host_;
  std::byte* ptr_ = nullptr;
};

struct Timer {
  Backend backend;
  cudaStream_t stream;
  std::unique_ptr<cuda::Event> a, b;
  std::chrono::steady_clock::time_point t0;
  Timer(Backend bk, cudaStream_t s) : backend(bk), stream(s) {
    if (bk == Backend::kCuda) {
      a = std::make_unique<cuda::Event>(cuda::EventTiming::kEnabled);
      b = std::make_unique<cuda::Event>(cuda::EventTiming::kEnabled);
    }
  }
  // Per-step marks (an event, or the wall clock on the CPU backend) for the step-time spread.
  std::vector<std::unique_ptr<cuda::Event>> marks;
  std::vector<std::chrono::steady_clock::time_point> wall;
  void start() {
    if (a) a->record(stream);
    t0 = std::chrono::steady_clock::now();
    marks.clear();
    wall.clear();
  }
  /// The end of one timed step.
  void mark() {
    if (backend == Backend::kCuda) {
      marks.push_back(std::make_unique<cuda::Event>(cuda::EventTiming::kEnabled));
      marks.back()->record(stream);
    } else {
      wall.push_back(std::chrono::steady_clock::now());
    }
  }
  /// Each marked step's time, after stop_ms().
  std::vector<double> step_ms() const {
    std::vector<double> out;
    for (size_t i = 0; i < marks.size(); ++i)
      out.push_back(cuda::elapsed_ms(i == 0 ? *a : *marks[i - 1], *marks[i]));
    for (size_t i = 0; i < wall.size(); ++i)
      out.push_back(
          std::chrono::duration<double, std::milli>(wall[i] - (i == 0 ? t0 : wall[i - 1])).count());
    return out;
  }
  double stop_ms() {
    if (b) {
      b->record(stream);
      b->synchronize();
      return cuda::elapsed_ms(*a, *b);
    }
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }
};

/// p50, p99 and max of per-step times (nearest rank).
void set_spread(const std::vector<double>& steps, double* p50, double* p99, double* mx) {
  if (steps.empty()) return;
  std::vector<double> v = steps;
  std::sort(v.begin(), v.end());
  auto rank = [&](double q) {
    const size_t i = static_cast<size_t>(std::ceil(q * static_cast<double>(v.size())));
    return v[std::min(v.size() - 1, i == 0 ? 0 : i - 1)];
  };
  *p50 = rank(0.50);
  *p99 = rank(0.99);
  *mx = v.back();
}

struct Result {
  std::string mode;
  double ms_per_step = 0;  // one token for every sequence of the batch, all layers
  double tokens_per_s = 0;
  double gpu_kv_gib = 0, gpu_total_gib = 0, host_gib = 0;
  double pcie_gbps = 0;  // H2D bytes / time over the timed steps
  double hit_rate = -1;
  double prefill_s = 0, prefill_cluster_s = 0;
  double host_ms = -1;  // caller-thread time per step inside the engine, not blocked on the GPU
  double p50_ms = 0, p99_ms = 0, max_ms = 0;  // spread of the timed steps
  std::vector<double> step_ms;                // each timed step, in order
  double rows_per_problem = 0;  // rows attended per (sequence, layer, KV head) and step
  // Of the timed recall-layer decodes (-1 without recall layers): the share replayed as a CUDA
  // graph, and the share whose attention ran inside the selection kernel.
  double graph_share = -1, select_attend_share = -1;
  double traced_ms_per_step = 0;  // --trace: the same steps while tracing (two blocks' mean)
  // --trace: median single-step times, traced (both blocks) and untraced. A one-time event in a
  // block (the first window re-clustering, a stall) moves the means, not the medians.
  double traced_p50_ms = 0, untraced_p50_ms = 0;
  std::string trace_file;
  std::string note;
};

double gib(double bytes) { return bytes / (1024.0 * 1024.0 * 1024.0); }

void progress(const char* what, int i, int n) {
  std::fprintf(stderr, "\r  %s %d/%d   ", what, i, n);
  if (i == n) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

// ---- baselines: dense and whole-layer offload ----

Result run_dense(const Options& o, const Generator& g, const std::vector<uint16_t>& queries,
                 bool offload, cudaStream_t stream) {
  const int32_t L = o.model.num_layers, B = o.batch, Hq = o.model.num_q_heads,
                Hkv = o.model.num_kv_heads, D = o.model.head_dim;
  const int64_t max_len = o.context + o.warmup + std::max(o.steps, o.offload_steps);
  const size_t rowb = kv_row_bytes(o.model.dtype, D);
  const size_t layer_bytes = static_cast<size_t>(B) * Hkv * max_len * rowb;  // K (V the same)
  Result r;
  r.mode = offload ? "offload" : "dense";
  const int32_t steps = offload ? o.offload_steps : o.steps;
  // Storage: all layers on the GPU (dense) or in pinned host memory (offload).
  std::vector<std::unique_ptr<Mem>> dk, dv;
  std::vector<memory::PinnedBuffer> hk, hv;
  std::vector<uint16_t> k(static_cast<size_t>(Hkv) * o.context * D),
      v(static_cast<size_t>(Hkv) * o.context * D);
  const auto t0 = std::chrono::steady_clock::now();
  for (int32_t l = 0; l < L; ++l) {
    progress(offload ? "offload: filling layer" : "dense: filling layer", l + 1, L);
    if (offload) {
      hk.push_back(memory::PinnedBuffer::allocate(layer_bytes));
      hv.push_back(memory::PinnedBuffer::allocate(layer_bytes));
    } else {
      dk.push_back(std::make_unique<Mem>(o.backend, layer_bytes));
      dv.push_back(std::make_unique<Mem>(o.backend, layer_bytes));
    }
    for (int32_t b = 0; b < B; ++b) {
      g.rows(static_cast<uint64_t>(b), l, 0, o.context, k.data(), v.data());
      for (int32_t h = 0; h < Hkv; ++h) {
        const size_t off = (static_cast<size_t>(b) * Hkv + h) * max_len * rowb;
        const size_t src = static_cast<size_t>(h) * o.context * D;
        if (offload) {
          std::memcpy(hk[l].data() + off, &k[src], o.context * rowb);
          std::memcpy(hv[l].data() + off, &v[src], o.context * rowb);
        } else {
          dk[l]->upload(off, &k[src], o.context * rowb, stream);
          dv[l]->upload(off, &v[src], o.context * rowb, stream);
        }
      }
      sync(o.backend, stream);
    }
  }
  r.prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Offload: two GPU layer buffers; layer l+1 is copied (copy stream) while l is attended.
  std::unique_ptr<Mem> stage_k[2], stage_v[2];
  std::unique_ptr<cuda::Stream> copy;
  std::unique_ptr<cuda::Event> copied[2], used[2];
  if (offload) {
    for (int i = 0; i < 2; ++i) {
      stage_k[i] = std::make_unique<Mem>(o.backend, layer_bytes);
      stage_v[i] = std::make_unique<Mem>(o.backend, layer_bytes);
      if (o.backend == Backend::kCuda) {
        copied[i] = std::make_unique<cuda::Event>();
        used[i] = std::make_unique<cuda::Event>();
      }
    }
    if (o.backend == Backend::kCuda) copy = std::make_unique<cuda::Stream>(0);
  }
  const size_t qbytes = static_cast<size_t>(B) * Hq * D * 2;
  const size_t per_step = static_cast<size_t>(L) * qbytes;
  const int32_t total_steps = o.warmup + steps;
  Mem q_dev(o.backend, per_step * total_steps), out(o.backend, qbytes);
  q_dev.upload(0, queries.data(), per_step * total_steps, stream);
  kernels::DecodeAttentionParams ap;
  ap.num_seqs = B;
  ap.num_q_heads = Hq;
  ap.num_kv_heads = Hkv;
  ap.head_dim = D;
  ap.dtype = o.model.dtype;
#if KVTIER_WITH_CUDA
  const size_t ws_bytes =
      o.backend == Backend::kCuda ? kernels::decode_attention_workspace_bytes(ap, max_len) : 0;
#else
  const size_t ws_bytes = 0;
#endif
  Mem ws(o.backend, ws_bytes);
  // This step's new rows [steps][layer][batch][Hkv][D], generated before timing; each is written
  // at position len of its sequence (dense: one pitched device copy per layer and sequence).
  const size_t kvbytes = static_cast<size_t>(B) * Hkv * rowb;
  std::vector<uint16_t> nk(static_cast<size_t>(total_steps) * L * B * Hkv * D), nv(nk.size());
  for (int32_t s = 0; s < total_steps; ++s)
    for (int32_t l = 0; l < L; ++l)
      for (int32_t b = 0; b < B; ++b) {
        const size_t off = ((static_cast<size_t>(s) * L + l) * B + b) * Hkv * D;
        g.rows(static_cast<uint64_t>(b), l, o.context + s, 1, &nk[off], &nv[off]);
      }
  Mem nk_dev(o.backend, nk.size() * 2), nv_dev(o.backend, nv.size() * 2);
  nk_dev.upload(0, nk.data(), nk.size() * 2, stream);
  nv_dev.upload(0, nv.data(), nv.size() * 2, stream);
  std::vector<int32_t> lens_all(static_cast<size_t>(total_steps) * B);
  for (int32_t s = 0; s < total_steps; ++s)
    for (int32_t b = 0; b < B; ++b) lens_all[s * B + b] = static_cast<int32_t>(o.context + s + 1);
  Mem lens_dev(o.backend, lens_all.size() * 4);
  lens_dev.upload(0, lens_all.data(), lens_all.size() * 4, stream);
  sync(o.backend, stream);
  auto copy_rows = [&](std::byte* dst, const std::byte* src) {  // [Hkv] rows -> pitch max_len
#if KVTIER_WITH_CUDA
    if (o.backend == Backend::kCuda) {
      KVTIER_CUDA_CHECK(
          cudaMemcpy2DAsync(dst, max_len * rowb, src, rowb, rowb, Hkv, cudaMemcpyDefault, stream));
      return;
    }
#endif
    for (int32_t h = 0; h < Hkv; ++h) std::memcpy(dst + h * max_len * rowb, src + h * rowb, rowb);
  };
  Timer timer(o.backend, stream);
  double timed = 0;
  for (int32_t s = 0; s < total_steps; ++s) {
    if (s == o.warmup) timer.start();
    const int64_t len = o.context + s;  // rows before this step's
    if (offload) {
      // The new rows join the host copy before this step's layer copies are issued.
      if (copy) copy->synchronize();
      for (int32_t l = 0; l < L; ++l)
        for (int32_t b = 0; b < B; ++b) {
          const size_t src = ((static_cast<size_t>(s) * L + l) * B + b) * Hkv * D;
          const size_t off = (static_cast<size_t>(b) * Hkv * max_len + len) * rowb;
          for (int32_t h = 0; h < Hkv; ++h) {
            std::memcpy(hk[l].data() + off + h * max_len * rowb, &nk[src + h * D], rowb);
            std::memcpy(hv[l].data() + off + h * max_len * rowb, &nv[src + h * D], rowb);
          }
        }
    }
    for (int32_t l = 0; l < L; ++l) {
      std::byte *K, *V;
      if (offload) {
        const int i = l % 2;
        if (o.backend == Backend::kCuda) {
          if (l == 0) {  // the first layer's copy is not hidden
            copy->wait(*used[0]);
            cuda::memcpy_async(stage_k[0]->get(), hk[0].data(), layer_bytes, copy->get());
            cuda::memcpy_async(stage_v[0]->get(), hv[0].data(), layer_bytes, copy->get());
            copied[0]->record(copy->get());
          }
          if (l + 1 < L) {
            copy->wait(*used[(l + 1) % 2]);
            cuda::memcpy_async(stage_k[(l + 1) % 2]->get(), hk[l + 1].data(), layer_bytes,
                               copy->get());
            cuda::memcpy_async(stage_v[(l + 1) % 2]->get(), hv[l + 1].data(), layer_bytes,
                               copy->get());
            copied[(l + 1) % 2]->record(copy->get());
          }
          wait_event(stream, *copied[i]);
        } else {
          std::memcpy(stage_k[i]->get(), hk[l].data(), layer_bytes);
          std::memcpy(stage_v[i]->get(), hv[l].data(), layer_bytes);
        }
        K = stage_k[i]->get();
        V = stage_v[i]->get();
      } else {
        K = dk[l]->get();
        V = dv[l]->get();
        for (int32_t b = 0; b < B; ++b) {
          const size_t src = ((static_cast<size_t>(s) * L + l) * B + b) * kvbytes / B;
          const size_t off = (static_cast<size_t>(b) * Hkv * max_len + len) * rowb;
          copy_rows(K + off, nk_dev.get() + src);
          copy_rows(V + off, nv_dev.get() + src);
        }
      }
      kernels::DenseDecodeTensors t;
      t.q = q_dev.get() + (static_cast<size_t>(s) * L + l) * qbytes;
      t.k = K;
      t.v = V;
      t.seq_lens = reinterpret_cast<const int32_t*>(lens_dev.get()) + static_cast<size_t>(s) * B;
      t.max_len = max_len;
      t.out = out.get();
      if (o.backend == Backend::kCuda) {
#if KVTIER_WITH_CUDA
        kernels::launch_dense_decode_attention(ap, t, ws.get(), ws_bytes, stream);
        if (offload) used[l % 2]->record(stream);
#endif
      } else {
        kernels::dense_decode_attention_cpu(ap, t);
      }
    }
    if (s >= o.warmup) {
      timer.mark();
      progress(offload ? "offload: step" : "dense: step", s - o.warmup + 1, steps);
    }
  }
  timed = timer.stop_ms();
  r.step_ms = timer.step_ms();
  set_spread(r.step_ms, &r.p50_ms, &r.p99_ms, &r.max_ms);
  r.ms_per_step = timed / steps;
  r.tokens_per_s = 1000.0 * B / r.ms_per_step;
  const double kv = 2.0 * L * layer_bytes;
  r.gpu_kv_gib = offload ? gib(4.0 * layer_bytes) : gib(kv);
  r.gpu_total_gib = r.gpu_kv_gib;
  r.host_gib = offload ? gib(kv) : 0;
  if (offload) r.pcie_gbps = kv / (r.ms_per_step * 1e6);
  r.rows_per_problem = static_cast<double>(o.context);
  return r;
}

// ---- the engine ----

Result run_engine(const Options& o, const Generator& g, const std::string& mode,
                  const std::vector<uint16_t>& queries, cudaStream_t stream) {
  const int32_t L = o.model.num_layers, B = o.batch, Hq = o.model.num_q_heads,
                Hkv = o.model.num_kv_heads, D = o.model.head_dim;
  const size_t rowb = kv_row_bytes(o.model.dtype, D);
  const bool cold = mode == "clusterkv-cold";
  const int64_t recall_layers = std::max(0, L - o.num_dense_layers);  // in clusterkv and hybrid
  EngineConfig c;
  c.model = o.model;
  c.mode = mode == "full"          ? Mode::kFull
           : mode == "clusterattn" ? Mode::kClusterAttn
           : mode == "hybrid"      ? Mode::kHybrid
                                   : Mode::kClusterKV;
  const bool windowed = c.mode == Mode::kClusterAttn || c.mode == Mode::kHybrid;
  c.backend = o.backend;
  c.budget = o.budget;
  c.sink = o.sink;
  c.window = o.window;
  c.window_clusters = std::max(1, o.window / 64);
  c.retention_steps = cold ? 0 : o.retention;
  c.cuda_graphs = o.cuda_graphs;
  c.admit_window_clusters = o.admit_window;
  c.mean_key_scores = o.mean_keys;
  if (cold) {
    // A cache that holds about one step's selections: nothing survives to be hit by chance.
    const int64_t pages = (o.budget / o.page_size + o.budget / 16 + 16) * Hkv * B * recall_layers;
    c.cache_bytes = static_cast<size_t>(pages) * o.page_size * rowb * 2;
  }
  c.page_size = o.page_size;
  c.num_dense_layers = o.num_dense_layers;
  c.kmeans_iters = o.kmeans_iters;
  c.max_sequences = B;
  c.max_batch = B;
  c.max_context = o.context + o.engine_steps() + 1;
  if (!o.trace_dir.empty()) c.telemetry_path = o.trace_dir + "/" + mode + ".jsonl";
  const double need = 2.0 * L * B * static_cast<double>(c.max_context) * Hkv * rowb;
  c.host_bytes_limit = o.host_gib > 0 ? static_cast<size_t>(o.host_gib * (1ull << 30))
                                      : static_cast<size_t>(need * 1.1 + (64 << 20));
  Result r;
  r.mode = mode;
  Engine e(c);
  // Prefill: generated rows uploaded one (sequence, layer) at a time.
  std::vector<uint16_t> k(static_cast<size_t>(Hkv) * o.context * D),
      v(static_cast<size_t>(Hkv) * o.context * D);
  Mem dk(o.backend, k.size() * 2), dv(o.backend, v.size() * 2);
  const int32_t wobs = c.observation_window;
  std::vector<uint16_t> wq(windowed ? static_cast<size_t>(Hq) * wobs * D : 0);
  Mem dq(o.backend, wq.size() * 2);
  const auto t0 = std::chrono::steady_clock::now();
  for (int32_t b = 0; b < B; ++b) {
    e.add_sequence(b);
    for (int32_t l = 0; l < L; ++l) {
      progress((mode + ": prefill layer").c_str(), b * L + l + 1, B * L);
      g.rows(static_cast<uint64_t>(b), l, 0, o.context, k.data(), v.data());
      dk.upload(0, k.data(), k.size() * 2, stream);
      dv.upload(0, v.data(), v.size() * 2, stream);
      memory::KvRows rows{dk.get(), dv.get(), o.model.dtype, Hkv, D, o.context, -1, -1};
      if (windowed) {
        g.window_queries(static_cast<uint64_t>(b), l, wobs, wq.data());
        dq.upload(0, wq.data(), wq.size() * 2, stream);
        e.prefill_layer(b, l, rows, ObservationWindow{dq.get(), wobs}, stream);
      } else {
        e.prefill_layer(b, l, rows, stream);
      }
      sync(o.backend, stream);
    }
  }
  e.synchronize();
  r.prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.prefill_cluster_s = e.stats().prefill_cluster_ms / 1000.0;

  const size_t qbytes = static_cast<size_t>(B) * Hq * D * 2;
  const size_t per_step = static_cast<size_t>(L) * qbytes;
  const int32_t total_steps = o.engine_steps();
  Mem q_dev(o.backend, per_step * total_steps), out(o.backend, qbytes);
  q_dev.upload(0, queries.data(), per_step * total_steps, stream);
  // New rows of every step: [steps][layer][batch][Hkv][D], uploaded before timing.
  const size_t kvbytes = static_cast<size_t>(B) * Hkv * rowb;
  std::vector<uint16_t> nk(static_cast<size_t>(total_steps) * L * B * Hkv * D), nv(nk.size());
  for (int32_t s = 0; s < total_steps; ++s)
    for (int32_t l = 0; l < L; ++l)
      for (int32_t b = 0; b < B; ++b) {
        const size_t off = ((static_cast<size_t>(s) * L + l) * B + b) * Hkv * D;
        g.rows(static_cast<uint64_t>(b), l, o.context + s, 1, &nk[off], &nv[off]);
      }
  Mem nk_dev(o.backend, nk.size() * 2), nv_dev(o.backend, nv.size() * 2);
  nk_dev.upload(0, nk.data(), nk.size() * 2, stream);
  nv_dev.upload(0, nv.data(), nv.size() * 2, stream);
  std::vector<SeqId> seqs(B);
  for (int32_t b = 0; b < B; ++b) seqs[b] = b;
  Timer timer(o.backend, stream);
  auto decode_step = [&](int32_t s) {
    for (int32_t l = 0; l < L; ++l) {
      DecodeBatch db;
      db.seqs = seqs.data();
      db.num_seqs = B;
      db.q = q_dev.get() + (static_cast<size_t>(s) * L + l) * qbytes;
      db.k_new = nk_dev.get() + (static_cast<size_t>(s) * L + l) * kvbytes;
      db.v_new = nv_dev.get() + (static_cast<size_t>(s) * L + l) * kvbytes;
      db.out = out.get();
      e.decode_layer(l, db, stream);
    }
    e.end_step(stream);
  };
  for (int32_t s = 0; s < o.warmup; ++s) decode_step(s);
  sync(o.backend, stream);
  e.synchronize();
  const EngineStats before = e.stats();
  timer.start();
  for (int32_t s = o.warmup; s < o.warmup + o.steps; ++s) {
    decode_step(s);
    timer.mark();
    progress((mode + ": step").c_str(), s - o.warmup + 1, o.steps);
  }
  const double ms = timer.stop_ms();
  r.step_ms = timer.step_ms();
  set_spread(r.step_ms, &r.p50_ms, &r.p99_ms, &r.max_ms);
  const EngineStats after = e.stats();
  r.ms_per_step = ms / o.steps;
  r.tokens_per_s = 1000.0 * B / r.ms_per_step;
  r.gpu_kv_gib = gib(static_cast<double>(after.gpu_kv_bytes));
  r.gpu_total_gib = gib(static_cast<double>(after.gpu_bytes));
  r.host_gib = gib(static_cast<double>(after.host_bytes_used));
  e.synchronize();  // the last policy job's counters
  const EngineStats fin = e.stats();
  const double fetched = static_cast<double>(fin.host_read_bytes + fin.fill_bytes -
                                             before.host_read_bytes - before.fill_bytes);
  r.pcie_gbps = fetched / (ms * 1e6);
  const int64_t hits = fin.recall_hits - before.recall_hits,
                misses = fin.recall_misses - before.recall_misses;
  if (hits + misses > 0)
    r.hit_rate = static_cast<double>(hits) / static_cast<double>(hits + misses);
  r.host_ms = ((after.decode_host_ms - before.decode_host_ms) -
               (after.decode_blocked_ms - before.decode_blocked_ms)) /
              o.steps;
  r.rows_per_problem = static_cast<double>(fin.rows_attended - before.rows_attended) /
                       (static_cast<double>(o.steps) * L * B * Hkv);
  const bool recall = c.mode == Mode::kClusterKV || c.mode == Mode::kHybrid;
  const int64_t recall_decodes = recall ? static_cast<int64_t>(o.steps) * recall_layers : 0;
  if (recall_decodes > 0) {
    r.graph_share = static_cast<double>(fin.graph_launches - before.graph_launches) /
                    static_cast<double>(recall_decodes);
    r.select_attend_share =
        static_cast<double>(fin.select_attend_layers - before.select_attend_layers) /
        static_cast<double>(recall_decodes);
  }
  if (!o.trace_dir.empty()) {
    // The overhead of tracing: the timed steps above were traced; the same number again
    // untraced, then traced again (into a second file, removed), so a drift over the run
    // cancels. The mode's figures are the untraced block's.
    const std::vector<double> traced_steps = timer.step_ms();
    r.trace_file = c.telemetry_path;
    e.stop_trace();
    auto block = [&](int32_t first) {
      sync(o.backend, stream);
      e.synchronize();
      Timer t(o.backend, stream);
      t.start();
      for (int32_t s = first; s < first + o.steps; ++s) {
        decode_step(s);
        t.mark();
      }
      return t;
    };
    Timer untraced = block(o.warmup + o.steps);
    const double untraced_ms = untraced.stop_ms();
    const std::string second = o.trace_dir + "/" + mode + ".overhead.jsonl";
    e.start_trace(second);
    Timer traced2 = block(o.warmup + 2 * o.steps);
    const double traced2_ms = traced2.stop_ms();
    e.stop_trace();
    std::remove(second.c_str());
    r.traced_ms_per_step = (ms + traced2_ms) / (2.0 * o.steps);
    r.ms_per_step = untraced_ms / o.steps;
    r.tokens_per_s = 1000.0 * B / r.ms_per_step;
    r.step_ms = untraced.step_ms();
    set_spread(r.step_ms, &r.p50_ms, &r.p99_ms, &r.max_ms);
    std::vector<double> both = traced_steps;
    for (const double t : traced2.step_ms()) both.push_back(t);
    double p99 = 0, mx = 0;
    set_spread(both, &r.traced_p50_ms, &p99, &mx);
    r.untraced_p50_ms = r.p50_ms;
  }
  return r;
}

double measure_link_gbps(Backend b) {
  // The best of 3 rounds of 4 back-to-back 256 MiB copies from pinned memory.
  return b == Backend::kCuda ? scheduler::measure_link(b, 0, 256u << 20, 4).h2d_gbps() : 0.0;
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    o += ch;
  }
  return o;
}

int run(int argc, char** argv) {
  const Options o = parse(argc, argv);
  if (o.backend == Backend::kCuda && !cuda::device_available()) {
    std::fprintf(stderr, "kvtier-bench: no CUDA device; use --backend cpu\n");
    return 1;
  }
  std::unique_ptr<cuda::Stream> stream;
  if (o.backend == Backend::kCuda) stream = std::make_unique<cuda::Stream>(0);
  const cudaStream_t s = stream ? stream->get() : nullptr;
  const double link = measure_link_gbps(o.backend);
  std::fprintf(stderr,
               "kvtier-bench: %d layers, %d/%d heads, head_dim %d, %s, context %lld, batch %d, "
               "%d steps (+%d warm-up); device %s; H2D link %.1f GB/s\n",
               o.model.num_layers, o.model.num_q_heads, o.model.num_kv_heads, o.model.head_dim,
               dtype_name(o.model.dtype), static_cast<long long>(o.context), o.batch, o.steps,
               o.warmup, o.backend == Backend::kCuda ? cuda::device_description(0).c_str() : "cpu",
               link);
  Generator g(o);
  const std::vector<uint16_t> warm_q = make_queries(o, g, o.engine_steps(), false);
  const std::vector<uint16_t> cold_q = make_queries(o, g, o.engine_steps(), true);
  if (!o.trace_dir.empty()) std::filesystem::create_directories(o.trace_dir);
  std::vector<Result> results;
  for (const std::string& m : o.modes) {
    try {
      if (m == "dense" || m == "offload") {
        results.push_back(run_dense(o, g, warm_q, m == "offload", s));
      } else {
        results.push_back(run_engine(o, g, m, m == "clusterkv-cold" ? cold_q : warm_q, s));
      }
    } catch (const std::exception& ex) {
      Result r;
      r.mode = m;
      r.note = ex.what();
      results.push_back(r);
      std::fprintf(stderr, "\n  %s failed: %s\n", m.c_str(), ex.what());
    }
  }
  // torch SDPA companion (same shape, same process call): its JSON line on stdout.
  std::string torch_line;
  if (!o.torch_script.empty()) {
    std::ostringstream cmd;
    cmd << "python3 " << o.torch_script << " --layers " << o.model.num_layers << " --q-heads "
        << o.model.num_q_heads << " --kv-heads " << o.model.num_kv_heads << " --head-dim "
        << o.model.head_dim << " --context " << o.context << " --batch " << o.batch << " --dtype "
        << (o.model.dtype == DType::kBF16 ? "bf16" : "fp16") << " --steps " << o.steps;
    FILE* p = popen(cmd.str().c_str(), "r");
    if (p) {
      char buf[4096];
      while (std::fgets(buf, sizeof buf, p)) {
        if (buf[0] == '{') torch_line = buf;
      }
      pclose(p);
    }
    if (!torch_line.empty()) {
      while (!torch_line.empty() && (torch_line.back() == '\n' || torch_line.back() == '\r'))
        torch_line.pop_back();
      Result r;
      r.mode = "torch-sdpa";
      const auto pos = torch_line.find("\"ms_per_step\":");
      if (pos != std::string::npos) r.ms_per_step = std::atof(torch_line.c_str() + pos + 14);
      r.tokens_per_s = r.ms_per_step > 0 ? 1000.0 * o.batch / r.ms_per_step : 0;
      const auto gpos = torch_line.find("\"gpu_kv_gib\":");
      if (gpos != std::string::npos)
        r.gpu_kv_gib = r.gpu_total_gib = std::atof(torch_line.c_str() + gpos + 13);
      r.rows_per_problem = static_cast<double>(o.context);
      results.push_back(r);
    }
  }
  double dense_ms = 0;
  for (const Result& r : results)
    if (r.mode == "dense") dense_ms = r.ms_per_step;
  std::printf("\n%-15s %10s %8s %8s %9s %8s %9s %10s %9s %9s %8s %9s %10s %10s\n", "mode",
              "ms/step", "p50 ms", "p99 ms", "vs dense", "host ms", "tok/s", "GPU KV GiB",
              "host GiB", "PCIe GB/s", "hit %", "rows/head", "prefill s", "offload+kmeans s");
  for (const Result& r : results) {
    if (!r.note.empty()) {
      std::printf("%-15s failed: %s\n", r.mode.c_str(), r.note.c_str());
      continue;
    }
    char hit[16] = "-";
    if (r.hit_rate >= 0) std::snprintf(hit, sizeof hit, "%.1f", 100 * r.hit_rate);
    char host[16] = "-";
    if (r.host_ms >= 0) std::snprintf(host, sizeof host, "%.3f", r.host_ms);
    char p50[16] = "-", p99[16] = "-";
    if (r.p50_ms > 0) std::snprintf(p50, sizeof p50, "%.3f", r.p50_ms);
    if (r.p99_ms > 0) std::snprintf(p99, sizeof p99, "%.3f", r.p99_ms);
    std::printf(
        "%-15s %10.3f %8s %8s %8.2fx %8s %9.1f %10.2f %9.2f %9.1f %8s %9.0f %10.1f %10.1f\n",
        r.mode.c_str(), r.ms_per_step, p50, p99, dense_ms > 0 ? dense_ms / r.ms_per_step : 0.0,
        host, r.tokens_per_s, r.gpu_kv_gib, r.host_gib, r.pcie_gbps, hit, r.rows_per_problem,
        r.prefill_s, r.prefill_cluster_s);
  }
  std::printf(
      "(ms/step: the attention path of one decode step for every sequence of the batch, "
      "all layers; p50 / p99 ms: the median and 99th percentile of single steps (a run whose "
      "steps spread far apart reads better at the median); vs dense: speed-up over kvtier's "
      "dense kernel, of the means; host ms: the caller's thread "
      "CPU time inside the engine per step, not counting spins on the GPU; PCIe: H2D fetch rate "
      "over the timed steps, link %.1f GB/s; offload+kmeans: the engine's background prefill "
      "work, summed over layers)\n",
      link);
  // --trace: the overhead of tracing, then each traced mode's profile.
  int trace_failures = 0;
  for (const Result& r : results) {
    if (r.trace_file.empty() || !r.note.empty()) continue;
    std::printf(
        "\ntracing %-15s median step %.3f ms traced vs %.3f untraced: overhead %+.2f%% (means "
        "%.3f vs %.3f: %+.2f%%)\n",
        r.mode.c_str(), r.traced_p50_ms, r.untraced_p50_ms,
        100.0 * (r.traced_p50_ms / r.untraced_p50_ms - 1.0), r.traced_ms_per_step, r.ms_per_step,
        100.0 * (r.traced_ms_per_step / r.ms_per_step - 1.0));
    std::fflush(stdout);
    const std::string tool = !o.trace_tool.empty()
                                 ? o.trace_tool
                                 : std::string(KVTIER_SOURCE_DIR) + "/tools/kvtier-trace";
    const std::string out = r.trace_file.substr(0, r.trace_file.size() - 6) + "_profile";
    const std::string cmd = "python3 '" + tool + "' '" + r.trace_file + "' --out '" + out + "'";
    if (std::system(cmd.c_str()) != 0) {
      std::fprintf(stderr, "kvtier-bench: the profiler failed: %s\n", cmd.c_str());
      ++trace_failures;
    }
  }
  if (!o.json.empty()) {
    std::ofstream f(o.json);
    f << "{\"model\":{\"layers\":" << o.model.num_layers << ",\"q_heads\":" << o.model.num_q_heads
      << ",\"kv_heads\":" << o.model.num_kv_heads << ",\"head_dim\":" << o.model.head_dim
      << ",\"dtype\":\"" << dtype_name(o.model.dtype) << "\"},\"context\":" << o.context
      << ",\"batch\":" << o.batch << ",\"steps\":" << o.steps << ",\"budget\":" << o.budget
      << ",\"sink\":" << o.sink << ",\"window\":" << o.window << ",\"retention\":" << o.retention
      << ",\"drift\":" << o.drift << ",\"backend\":\"" << backend_name(o.backend)
      << "\",\"link_h2d_gbps\":" << link << ",\"results\":[";
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      f << (i ? "," : "") << "{\"mode\":\"" << r.mode << "\",\"ms_per_step\":" << r.ms_per_step
        << ",\"step_ms_p50\":" << r.p50_ms << ",\"step_ms_p99\":" << r.p99_ms
        << ",\"step_ms_max\":" << r.max_ms << ",\"tokens_per_s\":" << r.tokens_per_s
        << ",\"host_ms_per_step\":" << r.host_ms << ",\"gpu_kv_gib\":" << r.gpu_kv_gib
        << ",\"gpu_total_gib\":" << r.gpu_total_gib << ",\"host_gib\":" << r.host_gib
        << ",\"pcie_gbps\":" << r.pcie_gbps << ",\"hit_rate\":" << r.hit_rate
        << ",\"rows_per_head\":" << r.rows_per_problem << ",\"prefill_s\":" << r.prefill_s
        << ",\"prefill_cluster_s\":" << r.prefill_cluster_s << ",\"graph_share\":" << r.graph_share
        << ",\"select_attend_share\":" << r.select_attend_share << ",\"step_ms\":[";
      for (size_t j = 0; j < r.step_ms.size(); ++j) f << (j ? "," : "") << r.step_ms[j];
      f << "]";
      if (!r.trace_file.empty())
        f << ",\"traced_ms_per_step\":" << r.traced_ms_per_step
          << ",\"traced_step_ms_p50\":" << r.traced_p50_ms
          << ",\"untraced_step_ms_p50\":" << r.untraced_p50_ms << ",\"trace_file\":\""
          << json_escape(r.trace_file) << "\"";
      f << ",\"error\":\"" << json_escape(r.note) << "\"}";
    }
    f << "]}\n";
  }
  for (const Result& r : results)
    if (!r.note.empty()) return 1;
  return trace_failures > 0 ? 1 : 0;
}

}  // namespace
}  // namespace kvtier::bench

int main(int argc, char** argv) {
  try {
    return kvtier::bench::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvtier-bench: %s\n", e.what());
    return 1;
  }
}
