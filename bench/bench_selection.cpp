// Selection benchmarks: decode-time cluster recall (kernels/cluster_select.h) and ClusterAttn's
// prefill compression (kernels/density_cluster.h), at Llama-3.1-8B shapes (bench/model_shapes.h).
// Each case is checked against the CPU reference or the oneTBB path once before it is timed. Then
// one launch per iteration is timed with CUDA events (after a warm-up launch). An untimed 128 MiB
// memset runs ahead of the start event, so the launch is queued before the GPU reaches that event:
// the figure is the GPU time of the launch with no host launch overhead in it, and L2 starts cold.
// The optional error words (nonfinite_problem, nonfinite_dev, invalid_vote_dev) are passed in the
// check and left null in the timed launches.
//   BM_SelectClusters/clusters/skip     launch_select_clusters on precomputed, unique scores. One
//       layer of a batch: 32 sequences x 8 KV heads = 256 problems, 4096 (also 1024, 256)
//       clusters of 1..128 tokens each, budget 2048 tokens, kTruncate (skip:0) and kSkip (skip:1).
//   BM_ScoreClusters/clusters/agg       launch_score_clusters on the same batch: G = 4 query
//       heads per KV head, head_dim 128, fp32 queries and centroids, agg 0 = kSoftmaxSum, 1 = kMax.
//       Counters: min_read_MB (centroids + queries) and GB_per_s (that over the time; scoring is
//       memory-bound).
//   BM_ScoreAndSelect/clusters/agg      launch_score_and_select_clusters, same shapes, kTruncate.
//   BM_ObservationVotes/window          launch_observation_votes for one layer at a 128K prompt
//       (32 query heads, 8 KV heads, head_dim 128, bf16), Wobs 32 and 64. Counters: ms_per_layer
//       and ms_x32_layers (32 x the per-layer figure, not measured as a batch).
//   BM_Dbac                             launch_dbac for one layer at a 128K prompt (Wobs 32): 8 KV
//       heads, total budget 8 x 2048, synthetic votes (below), kept positions written. Counters as
//       for the votes, plus ranges and tokens per head.
// There is no all-layers DBAC case: one launch splits one total budget across all its heads, so a
// launch over 32 layers x 8 heads would move budget between layers. That computes a different
// result from 32 per-layer launches, not the same work in one batch.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <unordered_set>
#include <vector>

#include "bench/model_shapes.h"
#include "kernels/cluster_select.h"
#include "kernels/density_cluster.h"
#include "memory/core/cuda_raii.h"
#include "memory/core/half.h"

namespace kvtier::bench {
namespace {

#if KVTIER_WITH_CUDA
constexpr ModelShape kModel = kModelShapes[0];  // Llama-3.1-8B
constexpr int32_t kNumSequences = 32;
constexpr int32_t kNumProblems = kNumSequences * kModel.num_kv_heads;     // 256: one layer
constexpr int32_t kGroupSize = kModel.num_q_heads / kModel.num_kv_heads;  // 4
constexpr int32_t kMaxClusterTokens = 128;
constexpr int32_t kBudgetTokens = 2048;  // per problem (selection) or per KV head (DBAC)
constexpr int64_t kPromptTokens = 131072;
constexpr int64_t kCheckPromptTokens = 8192;  // votes: the CPU check's prompt
constexpr int32_t kDbacWindow = 32;

/// splitmix64: fills the 134M-element inputs in well under a second (std::normal_distribution
/// takes several).
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  /// Uniform in (0, 1], never 0: (k + 1) / 2^24, exact in float.
  float unit() { return (static_cast<float>(next() >> 40) + 1.f) * 0x1p-24f; }
  /// Uniform in (-1, 1), never 0: an odd multiple of 2^-24.
  float symmetric() {
    const int64_t k = static_cast<int64_t>(next() >> 40);
    return static_cast<float>(2 * k + 1 - (int64_t{1} << 24)) * 0x1p-24f;
  }
  /// Uniform integer in [0, n).
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }

 private:
  uint64_t s_;
};

/// Votes shaped like a layer's observation-window votes. Per head, with head-specific shares of
/// the mass: an attention sink on the first 4 tokens, a recency tail decaying over 100..1000
/// tokens before the window, 8..24 dense regions (retrieved passages) of 17..129 tokens, 100..300
/// scattered heavy hitters and a flat background; then multiplicative noise on every position
/// (0.1 + 0.9 x an exponential variate: mean 1, heavy-tailed, never 0). All positive; each head
/// sums to `mass` (G x Wobs for real votes).
std::vector<float> synthetic_votes(int32_t heads, int64_t m, double mass, Rng& rng) {
  std::vector<float> v(static_cast<size_t>(heads) * static_cast<size_t>(m));
  std::vector<double> x(static_cast<size_t>(m));
  for (int32_t h = 0; h < heads; ++h) {
    double share[5] = {0.05 + 0.3 * rng.unit(), 0.03 + 0.1 * rng.unit(), 0.1 + 0.3 * rng.unit(),
                       0.05 + 0.1 * rng.unit(), 0.05 + 0.15 * rng.unit()};
    const double total_share = share[0] + share[1] + share[2] + share[3] + share[4];
    for (double& s : share) s *= mass / total_share;
    const auto [sink, tail, regions, hitters, background] = share;
    const double tail_tokens = 100 + 900 * rng.unit();
    for (int64_t i = 0; i < m; ++i)
      x[i] = background / m +
             tail / tail_tokens * std::exp(-static_cast<double>(m - 1 - i) / tail_tokens);
    for (int64_t i = 0; i < std::min<int64_t>(4, m); ++i) x[i] += sink / 4;
    const int64_t num_regions = 8 + rng.below(17);
    for (int64_t r = 0; r < num_regions; ++r) {
      const int64_t centre = rng.below(m), half = 8 + rng.below(57);
      const double peak = regions / num_regions * (0.5 + rng.unit()) / (half + 1);
      for (int64_t i = std::max<int64_t>(0, centre - half); i < std::min(m, centre + half + 1); ++i)
        x[i] += peak * (1.0 - static_cast<double>(std::abs(i - centre)) / (half + 1));
    }
    const int64_t num_hitters = 100 + rng.below(201);
    for (int64_t r = 0; r < num_hitters; ++r)
      x[rng.below(m)] += hitters / num_hitters * (0.5 + rng.unit());
    double sum = 0;
    for (int64_t i = 0; i < m; ++i) sum += x[i] *= 0.1 - 0.9 * std::log(rng.unit());
    for (int64_t i = 0; i < m; ++i)
      v[static_cast<size_t>(h * m + i)] = static_cast<float>(x[i] * mass / sum);
  }
  return v;
}

template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

using kernels::BudgetOverflow;
using kernels::ClusterSelectParams;
using kernels::ClusterSelectTensors;
using kernels::ScoreAggregation;

/// The stream, the timing events and the queue filler shared by every case.
struct Gpu {
  cuda::Stream stream{0};
  cuda::Event start{cuda::EventTiming::kEnabled}, stop{cuda::EventTiming::kEnabled};
  cuda::DeviceAllocation filler{size_t{128} << 20, 0};  // > 50 MiB of H100 L2
};

template <typename T>
cuda::DeviceBuffer<T> upload(const std::vector<T>& host, Gpu& gpu) {
  cuda::DeviceBuffer<T> d(std::max<size_t>(host.size(), 1), 0);
  if (!host.empty())
    cuda::memcpy_async(d.get(), host.data(), host.size() * sizeof(T), gpu.stream.get());
  return d;
}

template <typename T>
std::vector<T> download(const cuda::DeviceBuffer<T>& d, size_t count, Gpu& gpu) {
  std::vector<T> host(count);
  if (count > 0) cuda::memcpy_async(host.data(), d.get(), count * sizeof(T), gpu.stream.get());
  gpu.stream.synchronize();
  return host;
}

/// Times `launch` once per iteration with CUDA events after one warm-up launch; returns the mean in
/// ms. The filler memset queued before the start event keeps the GPU busy while the host enqueues
/// the launch, so host launch overhead is not in the figure; it also evicts L2.
template <typename F>
double time_launches(benchmark::State& state, Gpu& gpu, F&& launch) {
  launch();
  gpu.stream.synchronize();
  double total_ms = 0;
  for (auto _ : state) {
    cuda::memset_async(gpu.filler.get(), 0x5a, gpu.filler.size_bytes(), gpu.stream.get());
    gpu.start.record(gpu.stream.get());
    launch();
    gpu.stop.record(gpu.stream.get());
    gpu.stop.synchronize();
    const double ms = cuda::elapsed_ms(gpu.start, gpu.stop);
    total_ms += ms;
    state.SetIterationTime(ms * 1e-3);
  }
  return state.iterations() > 0 ? total_ms / static_cast<double>(state.iterations()) : 0.0;
}

/// Runs `check` once per key and keeps its verdict ("" when it passed).
template <typename F>
const std::string& verdict(std::map<int, std::string>& memo, int key, F&& check) {
  auto it = memo.find(key);
  if (it == memo.end()) it = memo.emplace(key, check()).first;
  return it->second;
}

// ---- cluster scoring and selection ----

/// One layer's batch of cluster problems, every row full (num_clusters = max_clusters), on host
/// and device. Either unique positive scores (selection only) or queries and centroids (scoring).
struct ClusterBatch {
  ClusterSelectParams p;
  std::vector<float> queries, centroids, scores;  // [P, G, D], [P, K, D], [P, K]
  std::vector<int32_t> num_clusters, sizes, budgets;
  cuda::DeviceBuffer<float> d_queries, d_centroids, d_scores;
  cuda::DeviceBuffer<int32_t> d_num_clusters, d_sizes, d_budgets, d_ids, d_rows, d_num_selected,
      d_total_rows, d_nonfinite;
  cuda::DeviceAllocation workspace;
  size_t workspace_bytes = 0;
  std::map<int, std::vector<float>> cpu_scores;  // by aggregation
  std::map<int, std::string> verdicts;

  size_t slots() const { return static_cast<size_t>(p.num_problems) * p.max_clusters; }

  ClusterSelectTensors device_tensors() const {
    ClusterSelectTensors t;
    t.queries = d_queries.get();
    t.centroids = d_centroids.get();
    t.num_clusters = d_num_clusters.get();
    t.cluster_sizes = d_sizes.get();
    t.budgets = d_budgets.get();
    t.scores = d_scores.get();
    t.selected_ids = d_ids.get();
    t.selected_rows = d_rows.get();
    t.num_selected = d_num_selected.get();
    t.total_rows = d_total_rows.get();
    return t;
  }
};

enum class BatchContents { kScores, kQueriesAndCentroids };

/// The host arrays of a batch; the device arrays stay empty.
std::unique_ptr<ClusterBatch> make_host_batch(int32_t clusters, BatchContents contents) {
  auto b = std::make_unique<ClusterBatch>();
  b->p.num_problems = kNumProblems;
  b->p.group_size = kGroupSize;
  b->p.head_dim = kModel.head_dim;
  b->p.max_clusters = clusters;
  Rng rng(contents == BatchContents::kScores ? 101 + clusters : 202 + clusters);
  const size_t slots = b->slots();
  b->num_clusters.assign(kNumProblems, clusters);
  b->budgets.assign(kNumProblems, kBudgetTokens);
  b->sizes.resize(slots);
  for (auto& s : b->sizes) s = 1 + static_cast<int32_t>(rng.below(kMaxClusterTokens));
  if (contents == BatchContents::kScores) {
    // Positive, spanning e^-4..e^4, unique within each problem (exact ids are then defined).
    b->scores.resize(slots);
    std::unordered_set<float> seen;
    for (int32_t q = 0; q < kNumProblems; ++q) {
      seen.clear();
      for (int32_t j = 0; j < clusters; ++j) {
        float s = 0.f;
        do s = std::exp(8.f * (rng.unit() - 0.5f));
        while (!seen.insert(s).second);
        b->scores[static_cast<size_t>(q) * clusters + j] = s;
      }
    }
  } else {
    b->queries.resize(static_cast<size_t>(kNumProblems) * kGroupSize * kModel.head_dim);
    b->centroids.resize(slots * kModel.head_dim);
    for (auto& x : b->queries) x = 2.f * rng.symmetric();
    for (auto& x : b->centroids) x = rng.symmetric();
  }
  return b;
}

std::unique_ptr<ClusterBatch> make_cluster_batch(int32_t clusters, BatchContents contents,
                                                 Gpu& gpu) {
  std::unique_ptr<ClusterBatch> b = make_host_batch(clusters, contents);
  const size_t slots = b->slots();
  if (contents == BatchContents::kScores) {
    b->d_scores = upload(b->scores, gpu);
  } else {
    b->d_queries = upload(b->queries, gpu);
    b->d_centroids = upload(b->centroids, gpu);
    b->d_scores = cuda::DeviceBuffer<float>(slots, 0);
  }
  b->d_num_clusters = upload(b->num_clusters, gpu);
  b->d_sizes = upload(b->sizes, gpu);
  b->d_budgets = upload(b->budgets, gpu);
  b->d_ids = cuda::DeviceBuffer<int32_t>(slots, 0);
  b->d_rows = cuda::DeviceBuffer<int32_t>(slots, 0);
  b->d_num_selected = cuda::DeviceBuffer<int32_t>(kNumProblems, 0);
  b->d_total_rows = cuda::DeviceBuffer<int32_t>(kNumProblems, 0);
  b->d_nonfinite = cuda::DeviceBuffer<int32_t>(1, 0);
  b->workspace_bytes = kernels::select_clusters_workspace_bytes(b->p);
  if (b->workspace_bytes > 0) b->workspace = cuda::DeviceAllocation(b->workspace_bytes, 0);
  gpu.stream.synchronize();
  return b;
}

struct Selection {
  std::vector<int32_t> ids, rows, num_selected, total_rows;
};

/// select_clusters_ref on `scores` (host) with the batch's sizes and budgets.
Selection select_on_host(const ClusterBatch& b, std::vector<float> scores,
                         BudgetOverflow overflow) {
  ClusterSelectParams p = b.p;
  p.overflow = overflow;
  Selection s{std::vector<int32_t>(b.slots()), std::vector<int32_t>(b.slots()),
              std::vector<int32_t>(kNumProblems), std::vector<int32_t>(kNumProblems)};
  ClusterSelectTensors t;
  t.num_clusters = b.num_clusters.data();
  t.cluster_sizes = b.sizes.data();
  t.budgets = b.budgets.data();
  t.scores = scores.data();
  t.selected_ids = s.ids.data();
  t.selected_rows = s.rows.data();
  t.num_selected = s.num_selected.data();
  t.total_rows = s.total_rows.data();
  kernels::select_clusters_ref(p, t);
  return s;
}

/// The selection outputs and the non-finite flag from the device.
Selection download_selection(const ClusterBatch& b, Gpu& gpu, int32_t* nonfinite) {
  Selection s{download(b.d_ids, b.slots(), gpu), download(b.d_rows, b.slots(), gpu),
              download(b.d_num_selected, kNumProblems, gpu),
              download(b.d_total_rows, kNumProblems, gpu)};
  *nonfinite = download(b.d_nonfinite, 1, gpu)[0];
  return s;
}

/// "" when both selections are identical, else the first difference.
std::string diff_selection(const Selection& want, const Selection& got, int32_t clusters) {
  for (int32_t q = 0; q < kNumProblems; ++q) {
    if (want.num_selected[q] != got.num_selected[q] || want.total_rows[q] != got.total_rows[q])
      return str_cat("problem ", q, ": num_selected ", got.num_selected[q], " (want ",
                     want.num_selected[q], "), total_rows ", got.total_rows[q], " (want ",
                     want.total_rows[q], ")");
    for (int32_t j = 0; j < clusters; ++j) {
      const size_t i = static_cast<size_t>(q) * clusters + j;
      if (want.ids[i] != got.ids[i] || want.rows[i] != got.rows[i])
        return str_cat("problem ", q, " slot ", j, ": id ", got.ids[i], " rows ", got.rows[i],
                       " (want id ", want.ids[i], " rows ", want.rows[i], ")");
    }
  }
  return "";
}

/// "" when every score is within rtol 1e-5 / atol 1e-6 of the reference, else the first miss.
std::string diff_scores(const std::vector<float>& want, const std::vector<float>& got,
                        int32_t clusters) {
  for (size_t i = 0; i < want.size(); ++i) {
    const double w = want[i], err = std::abs(static_cast<double>(got[i]) - w);
    if (!(err <= 1e-6 + 1e-5 * std::abs(w)))
      return str_cat("score of problem ", i / clusters, " cluster ", i % clusters, ": ", got[i],
                     ", reference ", want[i]);
  }
  return "";
}

/// score_clusters_cpu (bitwise the reference) over the whole batch, computed once per aggregation.
const std::vector<float>& scores_on_host(ClusterBatch& b, ScoreAggregation aggregation) {
  std::vector<float>& s = b.cpu_scores[static_cast<int>(aggregation)];
  if (s.empty()) {
    ClusterSelectParams p = b.p;
    p.aggregation = aggregation;
    s.resize(b.slots());
    ClusterSelectTensors t;
    t.queries = b.queries.data();
    t.centroids = b.centroids.data();
    t.num_clusters = b.num_clusters.data();
    t.scores = s.data();
    kernels::score_clusters_cpu(p, t);
  }
  return s;
}

std::string check_select(ClusterBatch& b, BudgetOverflow overflow, Gpu& gpu) {
  ClusterSelectParams p = b.p;
  p.overflow = overflow;
  ClusterSelectTensors t = b.device_tensors();
  t.nonfinite_problem = b.d_nonfinite.get();
  kernels::launch_select_clusters(p, t, b.workspace.get(), b.workspace_bytes, gpu.stream.get());
  int32_t nonfinite = 0;
  const Selection got = download_selection(b, gpu, &nonfinite);
  if (nonfinite != -1) return str_cat("GPU flagged problem ", nonfinite, " as non-finite");
  return diff_selection(select_on_host(b, b.scores, overflow), got, p.max_clusters);
}

std::string check_score(ClusterBatch& b, ScoreAggregation aggregation, Gpu& gpu) {
  ClusterSelectParams p = b.p;
  p.aggregation = aggregation;
  ClusterSelectTensors t = b.device_tensors();
  t.nonfinite_problem = b.d_nonfinite.get();
  kernels::launch_score_clusters(p, t, gpu.stream.get());
  const std::vector<float> got = download(b.d_scores, b.slots(), gpu);
  const int32_t nonfinite = download(b.d_nonfinite, 1, gpu)[0];
  if (nonfinite != -1) return str_cat("GPU flagged problem ", nonfinite, " as non-finite");
  return diff_scores(scores_on_host(b, aggregation), got, p.max_clusters);
}

/// Scores within tolerance of the CPU's, and the selection exactly select_clusters_ref's on the
/// GPU's own scores (the GPU's fp32 scores may order near-ties differently from the reference's).
std::string check_score_and_select(ClusterBatch& b, ScoreAggregation aggregation, Gpu& gpu) {
  ClusterSelectParams p = b.p;
  p.aggregation = aggregation;
  p.overflow = BudgetOverflow::kTruncate;
  ClusterSelectTensors t = b.device_tensors();
  t.nonfinite_problem = b.d_nonfinite.get();
  kernels::launch_score_and_select_clusters(p, t, b.workspace.get(), b.workspace_bytes,
                                            gpu.stream.get());
  int32_t nonfinite = 0;
  const Selection got = download_selection(b, gpu, &nonfinite);
  const std::vector<float> scores = download(b.d_scores, b.slots(), gpu);
  if (nonfinite != -1) return str_cat("GPU flagged problem ", nonfinite, " as non-finite");
  std::string bad = diff_scores(scores_on_host(b, aggregation), scores, p.max_clusters);
  if (bad.empty()) bad = diff_selection(select_on_host(b, scores, p.overflow), got, p.max_clusters);
  return bad;
}

// ---- observation votes and DBAC ----

/// Keys of one layer's 128K-token prompt: [kv_heads, n, head_dim] bf16, on host and device.
struct PromptKeys {
  std::vector<uint16_t> host;
  cuda::DeviceBuffer<uint16_t> device;
};

struct VotesCase {
  kernels::ObservationVotesParams p;
  std::vector<uint16_t> q_window;  // [q_heads, window, head_dim] bf16
  cuda::DeviceBuffer<uint16_t> d_q_window;
  cuda::DeviceBuffer<float> d_votes;
  cuda::DeviceBuffer<int32_t> d_nonfinite;
  cuda::DeviceAllocation workspace;
  std::map<int, std::string> verdicts;
};

std::unique_ptr<PromptKeys> make_prompt_keys(Gpu& gpu) {
  auto k = std::make_unique<PromptKeys>();
  k->host.resize(static_cast<size_t>(kModel.num_kv_heads) * kPromptTokens * kModel.head_dim);
  Rng rng(303);
  for (auto& x : k->host) x = float_to_bf16(rng.symmetric());
  k->device = upload(k->host, gpu);
  gpu.stream.synchronize();
  return k;
}

std::unique_ptr<VotesCase> make_votes_case(int32_t window, Gpu& gpu) {
  auto c = std::make_unique<VotesCase>();
  c->p.dtype = kModel.dtype;
  c->p.num_q_heads = kModel.num_q_heads;
  c->p.num_kv_heads = kModel.num_kv_heads;
  c->p.head_dim = kModel.head_dim;
  c->p.num_tokens = kPromptTokens;
  c->p.window = window;
  c->q_window.resize(static_cast<size_t>(kModel.num_q_heads) * window * kModel.head_dim);
  Rng rng(404 + window);
  // Three times the keys' range: logits of standard deviation ~1 rather than ~0.3.
  for (auto& x : c->q_window) x = float_to_bf16(3.f * rng.symmetric());
  c->d_q_window = upload(c->q_window, gpu);
  c->d_votes = cuda::DeviceBuffer<float>(
      static_cast<size_t>(kModel.num_kv_heads) * kernels::num_prefix_tokens(c->p), 0);
  c->d_nonfinite = cuda::DeviceBuffer<int32_t>(1, 0);
  c->workspace = cuda::DeviceAllocation(kernels::observation_votes_workspace_bytes(c->p), 0);
  gpu.stream.synchronize();
  return c;
}

/// 1. The first kCheckPromptTokens keys of every head with the same window queries, on the GPU and
///    with observation_votes_cpu: |got - want| <= 1e-2 (max vote + |want|) (bf16 inputs).
/// 2. The full 128K run: flag clear, every vote finite and >= 0, each head's votes summing to at
///    most G x Wobs (each window query spreads a probability of at most 1 over the prefix).
std::string check_votes(const VotesCase& c, const PromptKeys& keys, Gpu& gpu) {
  kernels::ObservationVotesParams sp = c.p;
  sp.num_tokens = kCheckPromptTokens;
  const size_t d = static_cast<size_t>(kModel.head_dim);
  std::vector<uint16_t> small(static_cast<size_t>(kModel.num_kv_heads) * kCheckPromptTokens * d);
  for (int32_t h = 0; h < kModel.num_kv_heads; ++h)
    std::copy_n(keys.host.begin() + static_cast<int64_t>(h * kPromptTokens * d),
                kCheckPromptTokens * d,
                small.begin() + static_cast<int64_t>(h * kCheckPromptTokens * d));
  const size_t nv = static_cast<size_t>(kModel.num_kv_heads) * kernels::num_prefix_tokens(sp);
  std::vector<float> want(nv);
  kernels::observation_votes_cpu(sp, c.q_window.data(), small.data(), want.data());
  const cuda::DeviceBuffer<uint16_t> d_small = upload(small, gpu);
  const cuda::DeviceBuffer<float> d_votes(nv, 0);
  const cuda::DeviceAllocation ws(kernels::observation_votes_workspace_bytes(sp), 0);
  kernels::launch_observation_votes(sp, c.d_q_window.get(), d_small.get(), d_votes.get(), ws.get(),
                                    c.d_nonfinite.get(), gpu.stream.get());
  const std::vector<float> got = download(d_votes, nv, gpu);
  if (download(c.d_nonfinite, 1, gpu)[0] != 0) return "GPU flagged the check's inputs non-finite";
  double max_vote = 0;
  for (float w : want) max_vote = std::max(max_vote, static_cast<double>(w));
  for (size_t i = 0; i < nv; ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= 1e-2 * (max_vote + std::abs(want[i]))))
      return str_cat("n ", kCheckPromptTokens, ": vote ", i, " is ", got[i], ", CPU ", want[i],
                     " (max vote ", max_vote, ")");
  }

  kernels::launch_observation_votes(c.p, c.d_q_window.get(), keys.device.get(), c.d_votes.get(),
                                    c.workspace.get(), c.d_nonfinite.get(), gpu.stream.get());
  const int64_t m = kernels::num_prefix_tokens(c.p);
  const std::vector<float> full = download(c.d_votes, c.d_votes.size(), gpu);
  if (download(c.d_nonfinite, 1, gpu)[0] != 0) return "GPU flagged the 128K inputs non-finite";
  const double limit = static_cast<double>(kGroupSize) * c.p.window * (1 + 1e-3);
  for (int32_t h = 0; h < kModel.num_kv_heads; ++h) {
    double sum = 0;
    for (int64_t i = 0; i < m; ++i) {
      const float v = full[static_cast<size_t>(h * m + i)];
      if (!(std::isfinite(v) && v >= 0.f))
        return str_cat("n ", kPromptTokens, ": vote of head ", h, " position ", i, " is ", v);
      sum += v;
    }
    if (!(sum > 0 && sum <= limit))
      return str_cat("n ", kPromptTokens, ": votes of head ", h, " sum to ", sum, ", expected (0, ",
                     limit, "]");
  }
  return "";
}

struct DbacResult {
  std::vector<kernels::TokenRange> ranges;
  std::vector<int32_t> num_ranges, num_tokens, head_budget, concentration, kept, num_kept;
};

struct DbacCase {
  kernels::DbacParams p;
  std::vector<float> votes;  // [kv_heads, m]
  cuda::DeviceBuffer<float> d_votes;
  cuda::DeviceBuffer<kernels::TokenRange> d_ranges;
  cuda::DeviceBuffer<int32_t> d_num_ranges, d_num_tokens, d_head_budget, d_concentration, d_kept,
      d_num_kept;
  cuda::DeviceBuffer<int64_t> d_invalid;
  cuda::DeviceAllocation workspace;
  std::map<int, std::string> verdicts;
  double ranges_per_head = 0, tokens_per_head = 0;  // from the check

  size_t heads() const { return static_cast<size_t>(p.num_kv_heads); }
  size_t range_slots() const { return heads() * kernels::dbac_range_capacity(p); }
  size_t kept_slots() const { return heads() * kernels::dbac_kept_capacity(p); }

  kernels::DbacOutput device_output() const {
    return {d_ranges.get(),        d_num_ranges.get(), d_num_tokens.get(), d_head_budget.get(),
            d_concentration.get(), d_kept.get(),       d_num_kept.get()};
  }
};

std::unique_ptr<DbacCase> make_dbac_case(Gpu& gpu) {
  auto c = std::make_unique<DbacCase>();
  c->p.num_kv_heads = kModel.num_kv_heads;
  c->p.num_tokens = kPromptTokens;
  c->p.window = kDbacWindow;
  c->p.total_budget = int64_t{kModel.num_kv_heads} * kBudgetTokens;  // other fields: defaults
  Rng rng(505);
  c->votes = synthetic_votes(kModel.num_kv_heads, kernels::num_prefix_tokens(c->p),
                             static_cast<double>(kGroupSize) * kDbacWindow, rng);
  c->d_votes = upload(c->votes, gpu);
  c->d_ranges = cuda::DeviceBuffer<kernels::TokenRange>(c->range_slots(), 0);
  c->d_num_ranges = cuda::DeviceBuffer<int32_t>(c->heads(), 0);
  c->d_num_tokens = cuda::DeviceBuffer<int32_t>(c->heads(), 0);
  c->d_head_budget = cuda::DeviceBuffer<int32_t>(c->heads(), 0);
  c->d_concentration = cuda::DeviceBuffer<int32_t>(c->heads(), 0);
  c->d_kept = cuda::DeviceBuffer<int32_t>(c->kept_slots(), 0);
  c->d_num_kept = cuda::DeviceBuffer<int32_t>(c->heads(), 0);
  c->d_invalid = cuda::DeviceBuffer<int64_t>(1, 0);
  c->workspace = cuda::DeviceAllocation(kernels::dbac_workspace_bytes(c->p), 0);
  gpu.stream.synchronize();
  return c;
}

/// launch_dbac against dbac_ref on the same votes: every output exactly equal (ranges, counts,
/// budgets, concentrations, kept positions), and no invalid vote reported.
std::string check_dbac(DbacCase& c, Gpu& gpu) {
  kernels::launch_dbac(c.p, c.d_votes.get(), c.device_output(), c.workspace.get(),
                       c.d_invalid.get(), gpu.stream.get());
  const size_t h = c.heads();
  const DbacResult got{download(c.d_ranges, c.range_slots(), gpu),
                       download(c.d_num_ranges, h, gpu),
                       download(c.d_num_tokens, h, gpu),
                       download(c.d_head_budget, h, gpu),
                       download(c.d_concentration, h, gpu),
                       download(c.d_kept, c.kept_slots(), gpu),
                       download(c.d_num_kept, h, gpu)};
  const int64_t invalid = download(c.d_invalid, 1, gpu)[0];
  if (invalid != -1) return str_cat("GPU reported invalid vote word ", invalid);
  DbacResult want{std::vector<kernels::TokenRange>(c.range_slots()),
                  std::vector<int32_t>(h),
                  std::vector<int32_t>(h),
                  std::vector<int32_t>(h),
                  std::vector<int32_t>(h),
                  std::vector<int32_t>(c.kept_slots()),
                  std::vector<int32_t>(h)};
  kernels::dbac_ref(
      c.p, c.votes.data(),
      {want.ranges.data(), want.num_ranges.data(), want.num_tokens.data(), want.head_budget.data(),
       want.concentration.data(), want.kept.data(), want.num_kept.data()});
  const int64_t rc = kernels::dbac_range_capacity(c.p), kc = kernels::dbac_kept_capacity(c.p);
  for (size_t k = 0; k < h; ++k) {
    if (want.num_ranges[k] != got.num_ranges[k] || want.num_tokens[k] != got.num_tokens[k] ||
        want.head_budget[k] != got.head_budget[k] ||
        want.concentration[k] != got.concentration[k] || want.num_kept[k] != got.num_kept[k])
      return str_cat("head ", k, " (GPU/ref): ranges ", got.num_ranges[k], "/", want.num_ranges[k],
                     " tokens ", got.num_tokens[k], "/", want.num_tokens[k], " budget ",
                     got.head_budget[k], "/", want.head_budget[k], " concentration ",
                     got.concentration[k], "/", want.concentration[k], " kept ", got.num_kept[k],
                     "/", want.num_kept[k]);
    for (int32_t i = 0; i < want.num_ranges[k]; ++i) {
      const kernels::TokenRange a = want.ranges[k * rc + i], b = got.ranges[k * rc + i];
      if (a.begin != b.begin || a.end != b.end)
        return str_cat("head ", k, " range ", i, ": [", b.begin, ", ", b.end, "), ref [", a.begin,
                       ", ", a.end, ")");
    }
    for (int32_t i = 0; i < want.num_kept[k]; ++i)
      if (want.kept[k * kc + i] != got.kept[k * kc + i])
        return str_cat("head ", k, " kept position ", i, ": ", got.kept[k * kc + i], ", ref ",
                       want.kept[k * kc + i]);
    c.ranges_per_head += static_cast<double>(got.num_ranges[k]) / static_cast<double>(h);
    c.tokens_per_head += static_cast<double>(got.num_tokens[k]) / static_cast<double>(h);
  }
  return "";
}

// ---- fixtures, built on first use and kept for the whole run ----

struct Registry {
  std::unique_ptr<Gpu> gpu;
  std::map<int32_t, std::unique_ptr<ClusterBatch>> select, score;  // by max_clusters
  std::unique_ptr<PromptKeys> keys;
  std::map<int32_t, std::unique_ptr<VotesCase>> votes;  // by window
  std::unique_ptr<DbacCase> dbac;
};

Registry& registry() {
  static Registry r;
  return r;
}

Gpu& gpu() {
  auto& g = registry().gpu;
  if (!g) g = std::make_unique<Gpu>();
  return *g;
}

template <typename Key, typename T, typename Make>
T& cached(std::map<Key, std::unique_ptr<T>>& memo, const Key& key, Make&& make) {
  auto& slot = memo[key];
  if (!slot) slot = make();
  return *slot;
}

template <typename T, typename Make>
T& cached(std::unique_ptr<T>& slot, Make&& make) {
  if (!slot) slot = make();
  return *slot;
}

const char* aggregation_name(ScoreAggregation a) {
  return a == ScoreAggregation::kMax ? "max" : "softmax_sum";
}

// ---- benchmarks ----

void BM_SelectClusters(benchmark::State& state) {
  if (!cuda::device_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  try {
    const int32_t clusters = static_cast<int32_t>(state.range(0));
    const BudgetOverflow overflow =
        state.range(1) == 0 ? BudgetOverflow::kTruncate : BudgetOverflow::kSkip;
    Gpu& g = gpu();
    ClusterBatch& b = cached(registry().select, clusters, [&] {
      return make_cluster_batch(clusters, BatchContents::kScores, g);
    });
    const std::string& bad = verdict(b.verdicts, static_cast<int>(overflow),
                                     [&] { return check_select(b, overflow, g); });
    if (!bad.empty()) {
      state.SkipWithError(("GPU selection differs from select_clusters_ref: " + bad).c_str());
      return;
    }
    ClusterSelectParams p = b.p;
    p.overflow = overflow;
    const ClusterSelectTensors t = b.device_tensors();
    time_launches(state, g, [&] {
      kernels::launch_select_clusters(p, t, b.workspace.get(), b.workspace_bytes, g.stream.get());
    });
    state.SetLabel(str_cat(kNumProblems, " problems (1 layer), budget ", kBudgetTokens, ", ",
                           overflow == BudgetOverflow::kSkip ? "skip" : "truncate"));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}
BENCHMARK(BM_SelectClusters)
    ->ArgNames({"clusters", "skip"})
    ->ArgsProduct({{4096, 1024, 256}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

enum class ScoreStep { kScore, kScoreAndSelect };

void run_scoring(benchmark::State& state, ScoreStep step) {
  if (!cuda::device_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  try {
    const int32_t clusters = static_cast<int32_t>(state.range(0));
    const ScoreAggregation aggregation =
        state.range(1) == 0 ? ScoreAggregation::kSoftmaxSum : ScoreAggregation::kMax;
    Gpu& g = gpu();
    ClusterBatch& b = cached(registry().score, clusters, [&] {
      return make_cluster_batch(clusters, BatchContents::kQueriesAndCentroids, g);
    });
    const int key = 10 * static_cast<int>(step) + static_cast<int>(aggregation);
    const std::string& bad = verdict(b.verdicts, key, [&] {
      return step == ScoreStep::kScore ? check_score(b, aggregation, g)
                                       : check_score_and_select(b, aggregation, g);
    });
    if (!bad.empty()) {
      state.SkipWithError(("GPU result differs from the CPU reference: " + bad).c_str());
      return;
    }
    ClusterSelectParams p = b.p;
    p.aggregation = aggregation;
    p.overflow = BudgetOverflow::kTruncate;
    const ClusterSelectTensors t = b.device_tensors();
    const double ms = time_launches(state, g, [&] {
      if (step == ScoreStep::kScore) {
        kernels::launch_score_clusters(p, t, g.stream.get());
      } else {
        kernels::launch_score_and_select_clusters(p, t, b.workspace.get(), b.workspace_bytes,
                                                  g.stream.get());
      }
    });
    const double bytes = 4.0 * kNumProblems * kModel.head_dim * (clusters + kGroupSize);
    state.counters["min_read_MB"] = bytes / 1e6;
    if (ms > 0) state.counters["GB_per_s"] = bytes / (ms * 1e-3) / 1e9;
    state.SetLabel(str_cat(kNumProblems, " problems (1 layer), G ", kGroupSize, ", ",
                           aggregation_name(aggregation)));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void BM_ScoreClusters(benchmark::State& state) { run_scoring(state, ScoreStep::kScore); }
BENCHMARK(BM_ScoreClusters)
    ->ArgNames({"clusters", "agg"})
    ->ArgsProduct({{4096, 1024, 256}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

void BM_ScoreAndSelect(benchmark::State& state) { run_scoring(state, ScoreStep::kScoreAndSelect); }
BENCHMARK(BM_ScoreAndSelect)
    ->ArgNames({"clusters", "agg"})
    ->ArgsProduct({{4096, 1024, 256}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

void report_per_layer(benchmark::State& state, double ms) {
  state.counters["ms_per_layer"] = ms;
  state.counters["ms_x32_layers"] = ms * kModel.num_layers;
}

void BM_ObservationVotes(benchmark::State& state) {
  if (!cuda::device_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  try {
    const int32_t window = static_cast<int32_t>(state.range(0));
    Gpu& g = gpu();
    const PromptKeys& keys = cached(registry().keys, [&] { return make_prompt_keys(g); });
    VotesCase& c = cached(registry().votes, window, [&] { return make_votes_case(window, g); });
    const std::string& bad = verdict(c.verdicts, 0, [&] { return check_votes(c, keys, g); });
    if (!bad.empty()) {
      state.SkipWithError(("GPU votes fail the check: " + bad).c_str());
      return;
    }
    const double ms = time_launches(state, g, [&] {
      kernels::launch_observation_votes(c.p, c.d_q_window.get(), keys.device.get(), c.d_votes.get(),
                                        c.workspace.get(), nullptr, g.stream.get());
    });
    report_per_layer(state, ms);
    state.SetLabel(
        str_cat(kModel.name, ", n ", kPromptTokens, ", bf16; ms_x32_layers = 32 x ms_per_layer"));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}
BENCHMARK(BM_ObservationVotes)
    ->ArgNames({"window"})
    ->Arg(32)
    ->Arg(64)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

void BM_Dbac(benchmark::State& state) {
  if (!cuda::device_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  try {
    Gpu& g = gpu();
    DbacCase& c = cached(registry().dbac, [&] { return make_dbac_case(g); });
    const std::string& bad = verdict(c.verdicts, 0, [&] { return check_dbac(c, g); });
    if (!bad.empty()) {
      state.SkipWithError(("GPU DBAC differs from dbac_ref: " + bad).c_str());
      return;
    }
    const kernels::DbacOutput out = c.device_output();
    const double ms = time_launches(state, g, [&] {
      kernels::launch_dbac(c.p, c.d_votes.get(), out, c.workspace.get(), nullptr, g.stream.get());
    });
    report_per_layer(state, ms);
    state.counters["ranges_per_head"] = c.ranges_per_head;
    state.counters["tokens_per_head"] = c.tokens_per_head;
    state.SetLabel(str_cat(kModel.num_kv_heads, " KV heads, n ", kPromptTokens, ", budget ",
                           c.p.total_budget, "; ms_x32_layers = 32 x ms_per_layer"));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}
BENCHMARK(BM_Dbac)->UseManualTime()->Unit(benchmark::kMillisecond);

#endif  // KVTIER_WITH_CUDA

}  // namespace

/// Frees the fixtures' device memory while the CUDA runtime is still up (before static teardown).
void release_fixtures() {
#if KVTIER_WITH_CUDA
  Registry& r = registry();
  r.select.clear();
  r.score.clear();
  r.votes.clear();
  r.keys.reset();
  r.dbac.reset();
  r.gpu.reset();
#endif
}

}  // namespace kvtier::bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("kvtier_device", kvtier::cuda::device_description(0));
  benchmark::RunSpecifiedBenchmarks();
  kvtier::bench::release_fixtures();
  benchmark::Shutdown();
  return 0;
}
