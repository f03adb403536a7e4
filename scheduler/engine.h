// kvtier::Engine: the KV cache of one model, kept in the tiers and served to decode attention.
//
// Per (sequence, layer) the engine keeps:
//   - resident rows on the GPU, always attended: the sink (first `sink` tokens) of a recall
//     layer, or every row of a dense layer (mode full, and the first `num_dense_layers` layers);
//   - for a recall layer (clusterkv), the recallable rows in the host tier (TieredStore),
//     clustered by spherical k-means per KV head, with the centroids on the GPU; the rows not yet
//     clustered sit in a GPU window ring and are clustered W at a time off the critical path;
//   - recalled clusters in the GPU cluster cache (pages of `page_size` rows, retention R).
// A decode step for a recall layer scores the centroids against the query heads of each KV
// group, selects whole clusters up to the budget, fetches the misses from pinned host memory
// into cache pages, and runs sparse attention over [sink | selected pages | window].
//
// Backends: kCuda (device pointers, work ordered on the caller's stream plus the engine's side
// and copy streams; no device-wide synchronization) and kCpu (host pointers, the same code with
// the CPU kernels; used by CI to run everything but the kernels).
//
// Thread-safety: one thread drives an Engine (the calls below are not concurrent with each
// other); the engine's own background work (offload, clustering) runs on oneTBB tasks. On kCuda
// each call makes config.device current and restores the caller's device, so one thread can
// drive engines on several GPUs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/cluster_select.h"
#include "kernels/density_cluster.h"
#include "memory/cluster_cache.h"
#include "memory/core/backend.h"
#include "memory/core/cuda_fwd.h"
#include "memory/core/dtype.h"
#include "memory/tiered_store.h"
#include "scheduler/telemetry.h"

namespace kvtier {

using memory::SeqId;

enum class Mode : uint8_t {
  kFull,         ///< every row kept on the GPU and attended; rows are offloaded to the host tier
  kClusterKV,    ///< recall per step: sink + selected clusters + local window
  kClusterAttn,  ///< prefill-time selection by DBAC (on kCuda prefill waits for the votes and DBAC)
  kHybrid,       ///< DBAC's set resident + ClusterKV recall of the other rows
};
const char* mode_name(Mode mode);
/// "full", "clusterkv", "clusterattn", "hybrid". Throws InvalidArgumentError otherwise.
Mode parse_mode(std::string_view name);

struct ModelShape {
  int32_t num_layers = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;    ///< num_q_heads is a multiple of it (GQA)
  int32_t head_dim = 0;        ///< 64 or 128
  DType dtype = DType::kBF16;  ///< of K, V, queries and outputs; kF32 on the CPU backend only
};

struct EngineConfig {
  ModelShape model;
  Mode mode = Mode::kClusterKV;
  Backend backend = Backend::kCuda;
  int device = 0;

  // ---- recall (clusterkv) ----
  int32_t budget = 2048;  ///< rows recalled per KV head and step (B)
  /// Off: `budget` counts the recalled rows only; the sink (or DBAC's resident rows in hybrid)
  /// and the window come on top. On (clusterkv, hybrid): `budget` counts every row a KV head
  /// attends in a step, and recall gets what the resident rows and the window leave (at least
  /// 0), so clusterkv attends exactly `budget` rows per KV head and step once the context is
  /// longer, and hybrid does on average over heads (what comparisons at equal budgets need).
  bool total_budget = false;
  int32_t sink = 16;                ///< first tokens, always resident (S)
  int32_t window = 256;             ///< unclustered rows are clustered W at a time (W)
  int32_t tokens_per_cluster = 64;  ///< prompt clusters: C0 = ceil(rows / this), unless set
  int32_t initial_clusters = 0;     ///< C0 for a prompt; 0: from tokens_per_cluster
  int32_t window_clusters = 4;      ///< C+: clusters per W window rows
  int32_t retention_steps = 8;      ///< R
  /// A window's new clusters enter the GPU cache when its clustering is committed (end_step),
  /// copied from the window's rows on the device, instead of being recalled over PCIe when first
  /// selected (docs/engine.md).
  bool admit_window_clusters = true;
  int32_t page_size = 16;        ///< cache page rows
  int32_t num_dense_layers = 2;  ///< first layers kept whole on the GPU (ClusterKV keeps 2)
  /// Score a cluster by its mean key (a query's dot product with it is the cluster's mean
  /// logit) instead of the unit centroid k-means assigns rows by (the keys' direction alone).
  bool mean_key_scores = false;
  kernels::ScoreAggregation aggregation = kernels::ScoreAggregation::kSoftmaxSum;
  kernels::BudgetOverflow overflow = kernels::BudgetOverflow::kTruncate;
  int32_t kmeans_iters = 10;

  // ---- prefill compression (clusterattn) ----
  /// Rows kept per KV head on average by DBAC (the total, budget x KV heads, is split across
  /// heads by how concentrated their votes are); the sink and the observation window are kept on
  /// top. `budget` above is used for it, unless resident_budget is set.
  int32_t resident_budget = 0;      ///< > 0: DBAC's average rows per KV head instead of `budget`
  int32_t observation_window = 32;  ///< Wobs: window queries the caller passes at prefill
  int32_t dbac_eps = 4;             ///< docs/dbac.md
  float dbac_min_density_ratio = 1.f;
  float dbac_coverage = 0.9f;
  float dbac_floor_fraction = 0.2f;
  /// clusterattn: the budget DBAC leaves unused (it stops at dbac_coverage of the votes) keeps
  /// the prompt rows just before the observation window instead, so a layer keeps `budget` rows
  /// per KV head on average.
  bool dbac_fill_recent = true;
  /// clusterattn: the share of the budget kept for the prompt rows just before the observation
  /// window, whatever DBAC picks: DBAC chooses within (1 - share) of it (and the fill above gives
  /// the rest to recent rows). 0: DBAC may use all of it. Continuing a text rewards recent rows;
  /// retrieval rewards DBAC's ranges; kvtier.profile searches it.
  float dbac_recent_share = 0.f;

  // ---- capacity ----
  size_t host_bytes_limit = 0;  ///< host tier (pinned arena) cap; required
  /// GPU cluster cache, K and V, split evenly over the recall layers; 0: twice one step's
  /// selection (budget rows plus a partial page per cluster) per KV head of max_batch sequences.
  size_t cache_bytes = 0;
  int32_t max_sequences = 8;     ///< live sequences at once (sizes the centroid tables)
  int32_t max_batch = 8;         ///< sequences per decode_layer call
  int64_t max_context = 135168;  ///< rows per sequence and layer (prompt + generated)

  /// If set, the engine traces from construction (see Engine::start_trace): the file is
  /// truncated and every event is written there as JSON Lines (docs/telemetry.md).
  std::string telemetry_path;

  /// kCuda: replay a recall layer's decode kernels (prologue, scoring, selection, chunk build,
  /// attention) as one CUDA graph per (layer, batch size), captured at its second use. The host
  /// then issues four calls per recall layer instead of about twenty. Off: the same kernels
  /// are launched one by one (identical results).
  bool cuda_graphs = true;
};

/// Throws InvalidArgumentError naming the first bad field.
void validate(const EngineConfig& config);

/// The last prompt queries of one layer, for the observation-window votes of clusterattn:
/// q [num_q_heads, num_queries, head_dim] contiguous in model.dtype (device pointer on kCuda).
struct ObservationWindow {
  const void* q = nullptr;
  int32_t num_queries = 0;
};

/// One decode step of one layer for a batch of sequences. Pointers are device pointers on kCuda,
/// host pointers on kCpu; all tensors contiguous in model.dtype.
struct DecodeBatch {
  const SeqId* seqs = nullptr;  ///< [num_seqs] (host array), distinct
  int32_t num_seqs = 0;
  const void* q = nullptr;      ///< [num_seqs, num_q_heads, head_dim]
  const void* k_new = nullptr;  ///< [num_seqs, num_kv_heads, head_dim]: this step's token
  const void* v_new = nullptr;
  void* out = nullptr;  ///< [num_seqs, num_q_heads, head_dim]
  /// Optional [num_seqs, num_q_heads] fp32 (device memory on the CUDA backend): the log-sum-exp
  /// (natural log) of the scaled logits over the rows the layer attended, so that exp(lse -
  /// lse_full) is the share of full attention's weight those rows hold.
  float* lse = nullptr;
};

struct EngineStats {
  int64_t steps = 0;
  int64_t decode_layer_calls = 0;
  int64_t sequences = 0;
  memory::CacheStats cache;
  scheduler::TelemetryStats telemetry;
  size_t gpu_bytes = 0;     ///< device memory the engine holds now (all of it)
  size_t gpu_kv_bytes = 0;  ///< of that, KV rows: resident rows, windows and the cache pool
  size_t gpu_peak_bytes = 0;
  size_t host_bytes_used = 0;  ///< host tier
  size_t host_bytes_peak = 0;
  double prefill_cluster_ms = 0;  ///< clustering time of prefills (wall, in background jobs)
  int64_t window_clusterings = 0;
  /// Clusters of committed windows copied into the GPU cache from the window's rows
  /// (admit_window_clusters; device to device, not counted in fill_bytes).
  int64_t window_admissions = 0;
  int64_t rows_attended = 0;  ///< sum over decode problems of the rows attention read
  /// CPU time of the caller's thread inside decode_layer and end_step, and of that the time
  /// spent spinning on the device (reusing a staging slot whose copies are still in flight).
  /// Busy host time per step near the device's step time means the caller's thread, not the
  /// GPU, sets the pace.
  double decode_host_ms = 0;
  double decode_blocked_ms = 0;
  int64_t graph_launches = 0;  ///< recall-layer decodes replayed as a CUDA graph
  /// Recall-layer decodes whose attention ran inside the scoring-and-selection kernel (sm_90;
  /// KVTIER_SELECT_ATTEND, docs/engine.md).
  int64_t select_attend_layers = 0;
  /// Recall layers, as attention saw them: selected clusters found in the GPU cache or not (a
  /// miss is read from pinned host memory by attention itself), bytes so read, and bytes
  /// gathered into the cache afterwards for later steps (K and V).
  int64_t recall_hits = 0;
  int64_t recall_misses = 0;
  int64_t host_read_bytes = 0;
  int64_t fill_bytes = 0;
  double recall_hit_rate() const {
    return recall_hits + recall_misses
               ? static_cast<double>(recall_hits) / static_cast<double>(recall_hits + recall_misses)
               : 0.0;
  }
};

class Engine {
 public:
  explicit Engine(const EngineConfig& config);
  ~Engine();  ///< waits for background work
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  /// Throws InvalidArgumentError if `seq` exists, CapacityError past max_sequences.
  void add_sequence(SeqId seq);
  /// Frees everything of `seq` (waits for its background work). NotFoundError if unknown.
  void remove_sequence(SeqId seq);
  bool contains(SeqId seq) const;
  /// Rows stored for `seq` in each layer after the calls so far (prompt + decoded tokens).
  int64_t sequence_length(SeqId seq, int32_t layer) const;

  /// One layer's prompt K and V (any strides, see KvRows; device pointers on kCuda). Called once
  /// per layer, before that layer's first decode_layer. Copies what it needs before the work on
  /// `stream` that follows it, so the caller may reuse the buffers once `stream` passes this
  /// point. Offload and clustering continue in the background; decode waits for them only when
  /// it first needs the layer.
  void prefill_layer(SeqId seq, int32_t layer, const memory::KvRows& kv,
                     cudaStream_t stream = nullptr);
  /// The same with the observation window's queries, which clusterattn needs for its layers
  /// past num_dense_layers (other modes ignore them). A clusterattn layer keeps per KV head the
  /// sink, the rows DBAC picks from the window's votes and the window itself; the other prompt
  /// rows are dropped. Decoded rows are all kept.
  void prefill_layer(SeqId seq, int32_t layer, const memory::KvRows& kv,
                     const ObservationWindow& window, cudaStream_t stream = nullptr);

  /// Appends each sequence's new K/V row to `layer` and writes attention over all its rows (the
  /// new one included) to batch.out, ordered on `stream`.
  void decode_layer(int32_t layer, const DecodeBatch& batch, cudaStream_t stream = nullptr);

  /// Ends a decode step: the step's rows reach the host tier, finished window clusterings are
  /// committed and new ones started, the cache's step advances.
  /// `stream` orders the step's cache-directory updates (kCuda); decode_layer calls of the next
  /// step wait for them whatever stream they use.
  void end_step(cudaStream_t stream = nullptr);

  /// Waits for all background work (offloads, clusterings) to finish.
  void synchronize();

  /// Starts writing every telemetry event to `path` (truncated; JSON Lines, docs/telemetry.md):
  /// a writer thread drains the event queue off the decode path, work on the engine's streams is
  /// timed with CUDA events (spans), and the link is measured first (a few milliseconds). Until
  /// a trace starts, events only add to stats().telemetry. Throws if a trace is running or the
  /// file cannot be opened. tools/kvtier-trace reads the file.
  void start_trace(const std::string& path);
  /// Waits for the traced work (synchronize), writes what is left and closes the file. No-op
  /// without a trace.
  void stop_trace();
  bool tracing() const;

  EngineStats stats() const;
  const EngineConfig& config() const;
  scheduler::Telemetry& telemetry();
  /// True if `layer` is served by recall (clusterkv and not a dense layer).
  bool is_recall_layer(int32_t layer) const;
  /// The clusters `layer` selected for `seq` in the last step that ended (end_step): one vector
  /// per KV head, in selection order (descending score), of the head's cluster ids in that
  /// layer (prompt clusters first, then the window's as they are clustered). Empty when `layer`
  /// is not a recall layer or `seq` was not decoded in that step (or was removed since). Waits
  /// for that step's cache policy job, which reads the selections on the host; like every other
  /// call, not to be made while another thread is inside this engine (end_step starts that job).
  std::vector<std::vector<int32_t>> last_selection(SeqId seq, int32_t layer) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier
