// The engine: see engine.h for what it keeps where. Both backends run this file; the kCuda-only
// parts are the stream plumbing and the kernel launches, each next to its kCpu twin.
#include "scheduler/engine.h"

#include <tbb/parallel_for.h>
#include <tbb/task_group.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <exception>
#include <future>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "kernels/decode_attention.h"
#include "kernels/kmeans.h"
#include "kernels/kv_gather.h"
#include "memory/core/check.h"
#include "memory/core/cuda_raii.h"
#include "memory/core/half.h"
#include "memory/core/log.h"
#include "memory/fetch_plan.h"
#include "memory/pinned_buffer.h"

#if KVTIER_WITH_CUDA
#include <cuda_runtime.h>

#endif

#include "scheduler/engine_kernels.h"
#include "scheduler/spans.h"

namespace kvtier {

using memory::KvRows;
using scheduler::Direction;
using scheduler::Event;
using scheduler::EventKind;
using scheduler::Op;
using scheduler::Track;

const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::kFull:
      return "full";
    case Mode::kClusterKV:
      return "clusterkv";
    case Mode::kClusterAttn:
      return "clusterattn";
    case Mode::kHybrid:
      return "hybrid";
  }
  return "?";
}

Mode parse_mode(std::string_view name) {
  for (const Mode m : {Mode::kFull, Mode::kClusterKV, Mode::kClusterAttn, Mode::kHybrid}) {
    if (name == mode_name(m)) return m;
  }
  KVTIER_CHECK(false, "unknown mode '", std::string(name),
               "'; expected full, clusterkv, clusterattn or hybrid");
  return Mode::kFull;
}

void validate(const EngineConfig& c) {
  const ModelShape& m = c.model;
  KVTIER_CHECK(m.num_layers > 0, "model.num_layers must be > 0, got ", m.num_layers);
  KVTIER_CHECK(m.num_kv_heads > 0, "model.num_kv_heads must be > 0, got ", m.num_kv_heads);
  KVTIER_CHECK(m.num_q_heads > 0 && m.num_q_heads % m.num_kv_heads == 0, "model.num_q_heads ",
               m.num_q_heads, " must be a positive multiple of num_kv_heads ", m.num_kv_heads);
  KVTIER_CHECK(m.head_dim == 64 || m.head_dim == 128, "model.head_dim must be 64 or 128, got ",
               m.head_dim);
  KVTIER_CHECK(m.dtype == DType::kF16 || m.dtype == DType::kBF16 ||
                   (m.dtype == DType::kF32 && c.backend == Backend::kCpu),
               "model.dtype ", dtype_name(m.dtype),
               " is not supported on this backend (fp16 or bf16; fp32 on the CPU backend)");
  KVTIER_CHECK(c.observation_window > 0, "observation_window must be > 0, got ",
               c.observation_window);
  KVTIER_CHECK(c.budget > 0, "budget must be > 0, got ", c.budget);
  KVTIER_CHECK(c.resident_budget >= 0, "resident_budget must be >= 0, got ", c.resident_budget);
  KVTIER_CHECK(c.dbac_recent_share >= 0.f && c.dbac_recent_share < 1.f,
               "dbac_recent_share must be in [0, 1), got ", c.dbac_recent_share);
  KVTIER_CHECK(c.sink >= 0, "sink must be >= 0, got ", c.sink);
  KVTIER_CHECK(c.window > 0, "window must be > 0, got ", c.window);
  KVTIER_CHECK(c.tokens_per_cluster > 0, "tokens_per_cluster must be > 0, got ",
               c.tokens_per_cluster);
  KVTIER_CHECK(c.initial_clusters >= 0, "initial_clusters must be >= 0, got ", c.initial_clusters);
  KVTIER_CHECK(c.window_clusters > 0 && c.window_clusters <= c.window, "window_clusters ",
               c.window_clusters, " must be in [1, window = ", c.window, "]");
  KVTIER_CHECK(c.retention_steps >= 0, "retention_steps must be >= 0, got ", c.retention_steps);
  KVTIER_CHECK(c.page_size > 0, "page_size must be > 0, got ", c.page_size);
  KVTIER_CHECK(c.num_dense_layers >= 0, "num_dense_layers must be >= 0, got ", c.num_dense_layers);
  KVTIER_CHECK(c.kmeans_iters > 0, "kmeans_iters must be > 0, got ", c.kmeans_iters);
  KVTIER_CHECK(c.host_bytes_limit > 0, "host_bytes_limit must be > 0 (the host tier's cap)");
  KVTIER_CHECK(c.max_sequences > 0, "max_sequences must be > 0, got ", c.max_sequences);
  KVTIER_CHECK(c.max_batch > 0, "max_batch must be > 0, got ", c.max_batch);
  KVTIER_CHECK(c.max_context > 0, "max_context must be > 0, got ", c.max_context);
  KVTIER_CHECK(c.backend == Backend::kCpu || cuda::built_with_cuda(),
               "backend cuda: this build has no CUDA");
}

namespace {

using Clock = std::chrono::steady_clock;

/// CPU time of the calling thread (it does not advance while the thread sleeps in a wait).
double thread_cpu_ms() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) * 1e-6;
}

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

/// Device memory on kCuda, host memory on kCpu; counted in the engine's GPU accounting only for
/// kCuda.
struct MemCounter {
  std::atomic<size_t> now{0};
  std::atomic<size_t> kv{0};
  std::atomic<size_t> peak{0};
  void add(size_t b, bool is_kv) {
    const size_t v = now.fetch_add(b) + b;
    if (is_kv) kv.fetch_add(b);
    size_t p = peak.load();
    while (v > p && !peak.compare_exchange_weak(p, v)) {
    }
  }
  void sub(size_t b, bool is_kv) {
    now.fetch_sub(b);
    if (is_kv) kv.fetch_sub(b);
  }
};

class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend backend, int device, size_t bytes, MemCounter* counter, bool is_kv)
      : bytes_(bytes), is_kv_(is_kv) {
    if (bytes == 0) return;
    if (backend == Backend::kCuda) {
      dev_ = cuda::DeviceAllocation(bytes, device);
      ptr_ = static_cast<std::byte*>(dev_.get());
      counter_ = counter;
      if (counter_) counter_->add(bytes, is_kv_);
    } else {
      host_.reset(new std::byte[bytes]);
      ptr_ = host_.get();
    }
  }
  ~Buffer() { release(); }
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      release();
      dev_ = std::move(o.dev_);
      host_ = std::move(o.host_);
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
      counter_ = std::exchange(o.counter_, nullptr);
      is_kv_ = o.is_kv_;
    }
    return *this;
  }
  std::byte* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(ptr_);
  }
  size_t size() const { return bytes_; }

 private:
  void release() {
    if (counter_) counter_->sub(bytes_, is_kv_);
    counter_ = nullptr;
    dev_ = cuda::DeviceAllocation();
    host_.reset();
    ptr_ = nullptr;
    bytes_ = 0;
  }
  cuda::DeviceAllocation dev_;
  std::unique_ptr<std::byte[]> host_;
  std::byte* ptr_ = nullptr;
  size_t bytes_ = 0;
  MemCounter* counter_ = nullptr;
  bool is_kv_ = false;
};

/// Copies `height` rows of `width` bytes between pitched layouts, on `stream` (kCuda) or now.
void copy_2d(Backend backend, void* dst, size_t dpitch, const void* src, size_t spitch,
             size_t width, size_t height, cudaStream_t stream) {
  if (height == 0 || width == 0) return;
#if KVTIER_WITH_CUDA
  if (backend == Backend::kCuda) {
    KVTIER_CUDA_CHECK(
        cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, cudaMemcpyDefault, stream));
    return;
  }
#endif
  (void)stream;
  (void)backend;
  for (size_t r = 0; r < height; ++r) {
    std::memcpy(static_cast<std::byte*>(dst) + r * dpitch,
                static_cast<const std::byte*>(src) + r * spitch, width);
  }
}

/// Waits for `ev` by polling with short sleeps (background threads; see MaybeEvent).
void poll_event(const cuda::Event* ev) {
  if (ev == nullptr) return;
  while (!ev->query()) std::this_thread::sleep_for(std::chrono::microseconds(50));
}

/// A CUDA event, or nothing on kCpu.

struct MaybeEvent {
  std::unique_ptr<cuda::Event> ev;
  void record(Backend b, cudaStream_t s) {
    if (b != Backend::kCuda) return;
    if (!ev) ev = std::make_unique<cuda::Event>();
    ev->record(s);
  }
  void synchronize() {
    if (ev) ev->synchronize();
  }
  bool done() const { return !ev || ev->query(); }
  /// For background threads: polls instead of blocking in the driver, which would serialize
  /// the decode thread's CUDA calls behind this wait.
  void wait_polling() const { poll_event(ev.get()); }
};

void stream_wait(Backend b, cudaStream_t s, const MaybeEvent& e) {
#if KVTIER_WITH_CUDA
  if (b == Backend::kCuda && e.ev) KVTIER_CUDA_CHECK(cudaStreamWaitEvent(s, e.ev->get(), 0));
#else
  (void)b;
  (void)s;
  (void)e;
#endif
}

/// Pinned host staging slots for the small per-call uploads and downloads: a slot is reused
/// only after the copies that read or wrote it have completed (its event).
class StagingRing {
 public:
  StagingRing(Backend backend, size_t slots) : backend_(backend), slots_(slots) {}
  /// A slot with at least `bytes`; waits for its previous use.
  std::byte* acquire(size_t bytes) {
    Slot& s = slots_[next_];
    if (!s.done.done()) {
      const auto t0 = Clock::now();
      s.done.synchronize();
      blocked_ms_ += ms_since(t0);
    }
    if (s.buf.size_bytes() < bytes) {
      s.buf = memory::PinnedBuffer::allocate(std::max<size_t>(bytes, 64 << 10) * 2);
    }
    current_ = next_;
    next_ = (next_ + 1) % slots_.size();
    return s.buf.data();
  }
  /// Marks the last acquired slot busy until the work enqueued on `stream` so far completes.
  void release(cudaStream_t stream) { slots_[current_].done.record(backend_, stream); }
  /// Wall time acquire() spent waiting for the device.
  double blocked_ms() const { return blocked_ms_; }

 private:
  struct Slot {
    memory::PinnedBuffer buf;
    MaybeEvent done;
  };
  Backend backend_;
  std::vector<Slot> slots_;
  size_t next_ = 0, current_ = 0;
  double blocked_ms_ = 0;
};

/// Background job result: waited on (and its error rethrown) where the engine first needs it.
struct Job {
  std::promise<void> promise;
  std::shared_future<void> future = promise.get_future().share();
  bool ready() const {
    return future.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
  }
};

struct WindowJob {
  int64_t begin = 0;  ///< store position of the first row clustered
  int32_t first_cluster = 0;
  std::vector<int32_t> labels;  ///< [Hkv, W] (kCpu: filled at once)
  memory::PinnedBuffer labels_host;
  Buffer points, labels_dev, workspace;  ///< kCuda
  MaybeEvent done;                       ///< k-means and its label download finished
  std::shared_ptr<Job> host;             ///< store.cluster done
};

struct LayerState {
  bool recall = false;
  bool compressed = false;  ///< clusterattn: per-head resident rows (head_rows), no host tier
  std::vector<int64_t> head_rows;  ///< compressed layers: resident rows of each KV head
  bool prefilled = false;
  int64_t rows = 0;  ///< rows of this layer (prompt + decoded)
  // Resident rows: [Hkv, res_cap, D] K and V, res_rows per head (the same for every head).
  Buffer res_k, res_v;
  int64_t res_cap = 0, res_rows = 0;
  // Recall: store positions [0, recall_end) are the recallable rows; [0, clustered) indexed.
  int64_t recall_end = 0, clustered = 0;
  int32_t num_clusters = 0;
  std::vector<std::vector<int32_t>> sizes;  ///< [Hkv][num_clusters], host copy
  Buffer win_k, win_v;                      ///< ring [Hkv, win_cap, D]: position p at p % win_cap
  int64_t win_cap = 0;
  int64_t table_row = 0;  ///< centroid-table row of KV head 0
  Buffer host_pages;      ///< [Hkv][host_pages_cap][2] K, V base of each host-tier page
  int64_t host_pages_cap = 0;
  memory::PinnedBuffer dir_up;  ///< kCuda: staging of refresh_host_directory's uploads
  MaybeEvent dir_up_done;
  std::unique_ptr<WindowJob> spare_window;  ///< a finished window job, its buffers reused
  std::shared_ptr<Job> prefill;             ///< offload + clustering of the prompt
  MaybeEvent prefill_device;                ///< centroids and sizes written
  std::unique_ptr<WindowJob> window;        ///< window clustering in flight
  MaybeEvent centroids_ready;               ///< committed window clusters' centroids written
  MaybeEvent last_decode;                   ///< the last decode_layer's work on this layer
};

struct Sequence {
  SeqId id = 0;
  int32_t slot = 0;
  std::vector<LayerState> layers;
};

}  // namespace

struct Engine::Impl {
  EngineConfig cfg;
  Backend backend;
  int device;
  int32_t L, Hq, Hkv, D, G;
  DType dtype;
  size_t rowb;
  std::vector<int32_t> recall_index;  // per layer: index among recall layers, or -1
  int32_t num_recall_layers = 0;
  int32_t cap_c = 0;  // centroid capacity per (sequence, layer, KV head)

  MemCounter mem;
  std::unique_ptr<memory::TieredStore> store;
  // One cluster cache per recall layer (each with its own page pool), so the per-step policy
  // work runs for all layers in parallel.
  std::vector<std::unique_ptr<memory::ClusterCache>> caches;
  // [sum of the layers' pages]: next page of the same cluster or -1; layer ri's pages start at
  // page_next_off[ri] (one array, so the policy updates of all layers are one launch).
  Buffer page_next;
  std::vector<int64_t> page_next_off;
  scheduler::Telemetry telemetry{65534};
  // Tracing (start_trace / telemetry_path): events are queued for the file's writer thread, and
  // work on the streams is timed (spans). Off: events only add to the totals.
  std::unique_ptr<scheduler::SpanTimer> spans;
  std::atomic<int32_t> step_now{0};  // `steps`, for events recorded by background threads
  bool step_open = false;            // a decode_layer has run since the last end_step
  uint64_t step_begin_ns = 0;
  scheduler::SpanTimer::Token decode_span;
  bool decode_span_open = false;  // decode_span was begun by the current `spans`
  void start_trace(const std::string& path);
  void stop_trace();
  // Ends a span of stream work (its event is recorded once the work has run, with this step).
  void end_span(const scheduler::SpanTimer::Token& tk, cudaStream_t stream, Event e) {
    if (e.step < 0) e.step = step_now.load(std::memory_order_relaxed);
    spans->end(tk, stream, e);
  }
  // A span event: what a piece of timed work was.
  static Event span_event(Op op, Track track, Direction dir, int64_t bytes, SeqId seq = -1,
                          int32_t layer = -1) {
    Event e;
    e.kind = EventKind::kSpan;
    e.op = op;
    e.track = track;
    e.dir = dir;
    e.bytes = bytes;
    e.seq = seq;
    e.layer = layer;
    return e;
  }
  // Enqueues `work` on `stream` inside a span `e` when tracing (recorded once it has run).
  template <typename F>
  void timed(cudaStream_t stream, const Event& e, F&& work) {
    if (!spans) {
      work();
      return;
    }
    const scheduler::SpanTimer::Token tk = spans->begin(stream);
    work();
    end_span(tk, stream, e);
  }
  // Records a piece of host work that began at `t0_ns` and ends now.
  void record_host_span(Event e, uint64_t t0_ns) {
    e.kind = EventKind::kSpan;
    e.time_ns = t0_ns;
    e.dur_ns = telemetry.now_ns() - t0_ns;
    record(e);
  }
  Buffer centroid_table;  // float [max_sequences * R * Hkv, cap_c, D], fp16 values (see seal)
  Buffer centroid_f16;    // kCuda: its fp16 copy, which the thread block cluster kernels score
  Buffer size_table;      // int32 [max_sequences * R * Hkv, cap_c]
  Buffer dir_table;       // int32 [same rows, cap_c]: first cache page of the cluster, or -1
  Buffer slot_table;      // int32 [same rows, cap_c]: first host-tier slot of the cluster
  int32_t sel_cols = 0;   // selected clusters per problem that the policy reads back

  // What each recall layer selected in a step, for the cache policy (read back without waiting;
  // double-buffered by step parity). buf: ids [Pmax][sel_cols] | num_sel [Pmax] | stats [Pmax][4].
  // A recall layer's step record: per problem, a row of rec_cols ints [selected count, clusters
  // found in the cache, not found, rows read from the host, rows attended, selected ids...],
  // written by the chunk builder (on kCuda into rec_dev, downloaded once per step at end_step).
  struct LayerRecord {
    int32_t* rows = nullptr;   // [max_problems, rec_cols] in record_buf
    std::vector<SeqId> seq;    // per problem
    std::vector<int32_t> row;  // per problem: directory row
    int32_t problems = 0;
  };
  std::vector<LayerRecord> records[2];
  memory::PinnedBuffer record_buf[2];  // [recall layers, max_problems, rec_cols]
  Buffer rec_dev;                      // kCuda: the same layout, written by the decode kernels
  int32_t max_problems = 0, rec_cols = 0;
  // The policy's decisions for one recall layer, applied on the stream at the next end_step.
  struct LayerPolicy {
    std::vector<memory::GatherSegment> segments;
    std::vector<int32_t> inval_idx, set_idx, set_val, next_idx, next_val;
    /// A cluster placed in `n` cache pages enters directory entry `entry` (row * cap_c +
    /// cluster): its first page, and the pages chained in order.
    void place(int64_t entry, const int32_t* pages, int32_t n) {
      set_idx.push_back(static_cast<int32_t>(entry));
      set_val.push_back(pages[0]);
      for (int32_t q = 0; q < n; ++q) {
        next_idx.push_back(pages[q]);
        next_val.push_back(q + 1 < n ? pages[q + 1] : -1);
      }
    }
  };
  /// The directory entries of the clusters a lookup or an admission of recall layer `ri` evicted
  /// leave with `pol` (slot_of: the sequence's slot, or a negative value once it is gone), and an
  /// evict event says how many.
  template <typename SlotOf>
  void note_evictions(LayerPolicy& pol, int32_t ri, int32_t layer, int32_t step,
                      const std::vector<memory::ClusterKey>& evicted, SlotOf&& slot_of) {
    for (const memory::ClusterKey& k : evicted) {
      const int64_t slot = slot_of(k.seq);
      if (slot < 0) continue;
      const int64_t row = (slot * num_recall_layers + ri) * Hkv + k.kv_head;
      pol.inval_idx.push_back(static_cast<int32_t>(row * cap_c + k.cluster));
    }
    if (evicted.empty()) return;
    Event e;
    e.kind = EventKind::kEvict;
    e.step = step;
    e.layer = layer;
    e.misses = static_cast<int32_t>(evicted.size());
    record(e);
  }
  std::vector<LayerPolicy> policy;
  // Per recall layer: the clusters selected in the previous step. When most of a step's
  // selection is new (no temporal locality), misses are not filled into the cache: the fill
  // would only double their PCIe bytes.
  std::vector<std::unordered_set<memory::ClusterKey, memory::ClusterKeyHash>> prev_selected;
  // Per recall layer: each sequence's selection of the step it was last decoded in, per KV head
  // (last_selection); written by that step's policy job into the same vectors every step.
  struct StepSelection {
    int64_t step = -1;
    std::vector<std::vector<int32_t>> heads;
  };
  std::vector<std::unordered_map<SeqId, StepSelection>> last_selected;
  std::shared_ptr<Job> policy_job;  // decides `policy` for the previous step
  mutable std::mutex stats_mu;      // the counters below, written by policy jobs
  int64_t recall_hits = 0, recall_misses = 0, host_read_bytes = 0, fill_bytes = 0;
  MaybeEvent policy_applied;  // end_step's directory work; decode waits for it
  std::vector<int32_t> free_slots;
  std::unordered_map<SeqId, std::unique_ptr<Sequence>> seqs;

  tbb::task_group jobs;
  std::deque<std::shared_ptr<Job>> inflight_prefills;
  static constexpr size_t kMaxInflightPrefills = 4;
  // kCuda prefill scratch, reused from layer to layer: a prompt's engine-owned copy on the
  // device, its k-means labels and workspace, and the pinned staging of its download. Allocating
  // them per layer cost a cudaMalloc/cudaFree and a pinned allocation and release per layer, and
  // cudaFree and cudaFreeHost wait for the whole device: a 32K-token prefill of an 8B-shaped
  // model spent about 6 s in them. At most kMaxInflightPrefills are in use; end_step frees them
  // once no prefill is in flight.
  struct PrefillScratch {
    Buffer k, v, labels, ws;
    memory::PinnedBuffer host;
  };
  std::mutex scratch_mu;
  std::vector<std::unique_ptr<PrefillScratch>> scratch_pool;
  std::unique_ptr<PrefillScratch> take_scratch() {
    std::lock_guard lock(scratch_mu);
    if (scratch_pool.empty()) return std::make_unique<PrefillScratch>();
    auto sc = std::move(scratch_pool.back());
    scratch_pool.pop_back();
    return sc;
  }
  void give_scratch(std::unique_ptr<PrefillScratch> sc) {
    std::lock_guard lock(scratch_mu);
    scratch_pool.push_back(std::move(sc));
  }
  void release_prefill_scratch() {
    while (!inflight_prefills.empty() &&
           inflight_prefills.front()->future.wait_for(std::chrono::seconds(0)) ==
               std::future_status::ready) {
      inflight_prefills.pop_front();
    }
    if (!inflight_prefills.empty()) return;
    std::lock_guard lock(scratch_mu);
    scratch_pool.clear();
  }

#if KVTIER_WITH_CUDA
  std::unique_ptr<cuda::Stream> side, copy;
#endif
  StagingRing staging{Backend::kCpu, 8};
  // The step's new rows bound for the host tier (kCuda): the append kernel also writes them to
  // step_dev [L][max_batch][2][Hkv][D]; end_step downloads them in one copy and a background job
  // appends them to the store.
  Buffer step_dev;
  memory::PinnedBuffer step_host;
  struct StepRow {
    SeqId seq;
    int32_t layer;
    int32_t index;  // batch index within the layer's slice of step_dev
  };
  std::vector<StepRow> step_rows;
  std::vector<int32_t> step_rows_per_layer;
  std::vector<MaybeEvent> step_layer_done;  // per layer: its last decode this step
  std::shared_ptr<Job> step_append;         // the previous step's append job

  // Decode scratch (device on kCuda, host on kCpu), grown on demand.
  Buffer q32, scores, sel_ids, sel_rows, num_sel, total_rows, select_ws, attn_ws, segments_dev,
      chunk_buf, build_misc, policy_dev;
  // kCuda recall decode (fixed once allocated): the call upload, the queries and output in
  // engine memory, the attention workspace, and one graph per (layer, batch problems).
  Buffer call_params, q_own, rattn_ws, merge_counters;  // recall layers' scratch
  Buffer dense_counters;  // the split merge counters of the other layers' attention
#if KVTIER_WITH_CUDA
  struct RecallGraph {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    cudaGraphNode_t prologue = nullptr;  // its call block changes every launch
    int32_t uses = 0;
    bool select_attend = false;  // attention runs inside the selection kernel
    RecallGraph() = default;
    RecallGraph(const RecallGraph&) = delete;
    RecallGraph& operator=(const RecallGraph&) = delete;
    ~RecallGraph() {
      if (exec) cudaGraphExecDestroy(exec);
      if (graph) cudaGraphDestroy(graph);
    }
  };
  std::map<std::pair<int32_t, int32_t>, RecallGraph> recall_graphs;
  std::unique_ptr<cuda::Stream> capture;
  bool graphs_ok = true;
#endif

  int64_t steps = 0, decode_calls = 0, window_clusterings = 0;
  double decode_host_ms = 0;  // CPU time of the caller's thread in decode_layer and end_step
  int64_t graph_launches = 0;
  int64_t select_attend_layers = 0;
  std::atomic<int64_t> rows_attended{0};  // decode (dense layers) and policy jobs (recall layers)
  std::atomic<int64_t> prefill_cluster_us{0};

  explicit Impl(const EngineConfig& c);
  ~Impl();

  cudaStream_t side_stream() const {
#if KVTIER_WITH_CUDA
    return side ? side->get() : nullptr;
#else
    return nullptr;
#endif
  }
  cudaStream_t copy_stream() const {
#if KVTIER_WITH_CUDA
    return copy ? copy->get() : nullptr;
#else
    return nullptr;
#endif
  }
  Buffer alloc(size_t bytes, bool is_kv = false) {
    return Buffer(backend, device, bytes, &mem, is_kv);
  }
  void grow(Buffer& b, size_t bytes) {
    if (b.size() < bytes) b = alloc(std::max(bytes, b.size() * 3 / 2));
  }
  Sequence& find(SeqId seq) {
    auto it = seqs.find(seq);
    KVTIER_CHECK_CODE(kNotFound, it != seqs.end(), "unknown sequence ", seq);
    return *it->second;
  }
  float* centroids_row(int64_t row) const { return centroid_table.as<float>() + row * cap_c * D; }
  /// Rounds clusters [first, first + count) of table rows [row, row + Hkv) to fp16 values in
  /// place and, on kCuda, writes their fp16 copy, on `stream`: scoring reads the copy (half the
  /// bytes) where it can and the fp32 table elsewhere, and both hold the same values.
  void seal_centroids(int64_t row, int32_t first, int32_t count, cudaStream_t stream) {
    const int64_t at = (row * cap_c + first) * D, cols = static_cast<int64_t>(count) * D;
    if (backend == Backend::kCpu) {
      kernels::round_centroids_fp16_cpu(centroid_table.as<float>() + at, nullptr, Hkv, cols,
                                        static_cast<int64_t>(cap_c) * D);
      return;
    }
#if KVTIER_WITH_CUDA
    kernels::launch_round_centroids_fp16(centroid_table.as<float>() + at,
                                         centroid_f16.as<uint16_t>() + at, Hkv, cols,
                                         static_cast<int64_t>(cap_c) * D, stream);
#endif
  }
  int32_t* sizes_row(int64_t row) const { return size_table.as<int32_t>() + row * cap_c; }
  void record(Event e) {
    if (e.step < 0) e.step = step_now.load(std::memory_order_relaxed);
    telemetry.record(e);
  }
  void wait_job(const std::shared_ptr<Job>& job, SeqId seq, int32_t layer);
  /// Decode attention of a batch of B sequences.
  kernels::DecodeAttentionParams attention_params(int32_t B) const {
    kernels::DecodeAttentionParams ap;
    ap.num_seqs = B;
    ap.num_q_heads = Hq;
    ap.num_kv_heads = Hkv;
    ap.head_dim = D;
    ap.dtype = dtype;
    return ap;
  }
  /// Scoring and selection over `problems` (sequence, KV head) pairs of the centroid table.
  kernels::ClusterSelectParams select_params(int32_t problems) const {
    kernels::ClusterSelectParams sp;
    sp.num_problems = problems;
    sp.group_size = G;
    sp.head_dim = D;
    sp.max_clusters = cap_c;
    sp.aggregation = cfg.aggregation;
    sp.overflow = cfg.overflow;
    return sp;
  }
  /// k-means of `rows` rows per KV head into `k` clusters, written into the centroid table.
  kernels::KmeansParams kmeans_params(int64_t rows, int32_t k, uint64_t seed) const {
    kernels::KmeansParams kp;
    kp.num_problems = Hkv;
    kp.num_points = rows;
    kp.dim = D;
    kp.num_clusters = k;
    kp.max_iters = cfg.kmeans_iters;
    kp.dtype = dtype;
    kp.centroid_stride = cap_c;
    kp.seed = seed;
    if (cfg.mean_key_scores) kp.output = kernels::KmeansCentroids::kMeanRow;
    return kp;
  }
  /// C0 for `rows` prompt rows: initial_clusters, or one per tokens_per_cluster rows.
  int32_t initial_cluster_count(int64_t rows) const {
    return cfg.initial_clusters > 0
               ? static_cast<int32_t>(std::min<int64_t>(cfg.initial_clusters, rows))
               : static_cast<int32_t>((rows + cfg.tokens_per_cluster - 1) / cfg.tokens_per_cluster);
  }
  /// The window ring of a recall layer: 2W rows per KV head.
  void alloc_window(LayerState& st) {
    st.win_cap = 2 * static_cast<int64_t>(cfg.window);
    st.win_k = alloc(static_cast<size_t>(Hkv) * st.win_cap * rowb, true);
    st.win_v = alloc(static_cast<size_t>(Hkv) * st.win_cap * rowb, true);
#if KVTIER_WITH_CUDA
    if (backend == Backend::kCuda && !st.spare_window) {
      // The window job's buffers, made now rather than on the decode path.
      auto j = std::make_unique<WindowJob>();
      const size_t W = static_cast<size_t>(cfg.window);
      j->points = alloc(Hkv * W * rowb);
      j->labels_dev = alloc(Hkv * W * 4);
      j->workspace =
          alloc(kernels::kmeans_workspace_bytes(kmeans_params(cfg.window, cfg.window_clusters, 0)));
      j->labels_host = memory::PinnedBuffer::allocate(Hkv * W * 4);
      st.spare_window = std::move(j);
    }
#endif
  }
  void ensure_resident(LayerState& st, int64_t rows, cudaStream_t stream);
  void prefill(Sequence& s, int32_t layer, const KvRows& kv, cudaStream_t stream);
  void prefill_compressed(Sequence& s, int32_t layer, const KvRows& kv,
                          const ObservationWindow& window, cudaStream_t stream);
  void prefill_hybrid(Sequence& s, int32_t layer, const KvRows& kv, const ObservationWindow& window,
                      cudaStream_t stream);
  std::vector<std::vector<int64_t>> dbac_keep(int32_t layer, const KvRows& kv,
                                              const ObservationWindow& window,
                                              cudaStream_t stream = nullptr);
  void keep_resident(LayerState& st, const KvRows& kv,
                     const std::vector<std::vector<int64_t>>& keep, int64_t spare,
                     cudaStream_t stream = nullptr);
  void decode(int32_t layer, const DecodeBatch& b, cudaStream_t stream);
  void start_window_job(Sequence& s, int32_t layer);
  /// `admit`: from end_step, where no policy job runs, so the window's clusters may enter the
  /// cache (admit_window).
  void finish_window_job(Sequence& s, int32_t layer, bool wait, cudaStream_t stream, bool admit);
  void run_window_host(Sequence& s, int32_t layer, WindowJob& job);
  void flush_step_rows(cudaStream_t stream);
  // Host-tier pages are pinned ahead of need on a oneTBB task, beside decode or the model's
  // forward: an append that found the arena empty would pin a 256 MiB slab itself (tens of
  // milliseconds) on the critical path. One reservation runs at a time.
  std::atomic<bool> reserving{false};
  void reserve_pages_async(size_t target_free) {
    if (reserving.exchange(true)) return;
    jobs.run([this, target_free] {
      try {
        store->arena().reserve(target_free);
      } catch (...) {  // a later append that finds the arena full reports it
      }
      reserving = false;
    });
  }
  // Keeps free pages for about 512 more steps of appends.
  void reserve_host_pages() {
    const int64_t rpp = store->rows_per_page();
    const size_t per_step_pages = std::max<size_t>(seqs.size(), 1) * L * 2 * Hkv;
    const size_t low = per_step_pages * static_cast<size_t>((512 + rpp - 1) / rpp);
    if (store->arena().free_pages() < low) reserve_pages_async(2 * low);
  }
  // A prompt of `rows` rows needs pages in every layer: reserved when its first layer arrives
  // (a 128K-token prompt of an 8B-shaped model fills 64 slabs).
  void reserve_prompt_pages(int64_t rows) {
    const int64_t rpp = store->rows_per_page();
    const size_t need =
        static_cast<size_t>(L) * 2 * Hkv * static_cast<size_t>((rows + rpp - 1) / rpp);
    reserve_pages_async(store->arena().free_pages() + need);
  }
  void wait_sequence(Sequence& s);
  /// The device's view of the host tier for rows [first_row, clustered) and clusters from
  /// first_cluster on: host page bases and each cluster's first slot. `sync`: wait for the
  /// upload (callers off the decode stream's order).
  void refresh_host_directory(Sequence& s, int32_t layer, int32_t first_cluster, int64_t first_row,
                              cudaStream_t stream, bool sync);
  void decode_recall(int32_t layer, const DecodeBatch& b, const std::vector<Sequence*>& ss,
                     const std::vector<void*>& dst, cudaStream_t stream);
  // kCuda recall decode: fixed scratch (allocated once for max_batch, so captured graphs stay
  // valid), the launches, and the graphs that replay them.
  void ensure_recall_scratch(cudaStream_t stream);
  struct RecallLaunch {
    int32_t layer = 0, P = 0;
    kernels::ClusterSelectParams sp;
    scheduler::ChunkBuildParams bp;
    kernels::DecodeAttentionParams ap;
    const scheduler::RecallCall* call = nullptr;
    const scheduler::RecallProblem* problems = nullptr;
    const int32_t *crow = nullptr, *ncl = nullptr, *budgets = nullptr;
    const void* blob = nullptr;  // the call block by value, or null (uploaded to call_params)
    int32_t call_bytes = 0, off_rows = 0, off_dst = 0;
  };
#if KVTIER_WITH_CUDA
  scheduler::RecallPrologueParams prologue_params(const RecallLaunch& r) const;
#endif
  struct alignas(16) Block16 {
    unsigned char b[16];
  };
  std::vector<Block16> call_blob;
  /// Returns whether attention ran inside the selection kernel.
  bool launch_recall_kernels(const RecallLaunch& r, cudaStream_t stream);
  // Chunks per problem: sink, window (2), and per selected cluster its pages or host runs.
  int64_t chunks_per_problem() const {
    return 4 + 2 * static_cast<int64_t>(sel_cols) +
           2 * (cfg.budget / std::min<int64_t>(cfg.page_size, 16) + 1);
  }
  static size_t align16(size_t x) { return (x + 15) & ~size_t{15}; }
  /// Rows a recall problem attends at most: its resident rows (the sink; in hybrid the sink and
  /// DBAC's kept rows, at most min(total budget, prompt) + the observation window per head), the
  /// budget, and the window (up to 2W while the previous W are being clustered).
  int64_t recall_max_rows() const {
    int64_t resident = cfg.sink;
    if (cfg.mode == Mode::kHybrid) {
      const int64_t dbac = cfg.resident_budget > 0 ? cfg.resident_budget : cfg.budget;
      resident = std::min<int64_t>(cfg.max_context, cfg.sink + dbac * Hkv + cfg.observation_window);
    }
    return resident + cfg.budget + 2 * static_cast<int64_t>(cfg.window);
  }
  void launch_policy_job(cudaStream_t stream);
  // The decisions for all layers, packed for one upload (kCuda).
  struct PolicyPack {
    memory::PinnedBuffer buf;
    bool valid = false;  // packed from `policy` as it is now (purge_slot invalidates)
    size_t total = 0;    // bytes to upload; 0: nothing to apply
    int32_t fills = 0, ni = 0, nn = 0, ns = 0;
    int64_t fill_bytes = 0;  // K and V rows the fills copy
    MaybeEvent uploaded;
  };
  PolicyPack policy_pack;
  // A committed window's clusters placed in the cache (end_step, admit_window), applied at once:
  // their directory entries through `policy` and their own pack and device buffer, their rows by
  // one admit_rows launch over admit_batch (packed into admit_host, uploaded to admit_rows_dev).
  // Two of each host buffer, used in turn: sequences commit on different steps, and a buffer is
  // rewritten only once the upload that read it two admissions ago has completed.
  PolicyPack admit_pack[2];
  memory::PinnedBuffer admit_host[2];
  MaybeEvent admit_uploaded[2];
  int admit_turn = 0;
  Buffer admit_dev, admit_rows_dev;
  struct AdmitBatch {
    std::vector<scheduler::AdmitItem> items;
    std::vector<int32_t> labels, page_off, pages;
    int64_t rows = 0;
  } admit_batch;
  bool admissions = false;  // `policy` and admit_batch hold admissions not yet applied
  void apply_admissions(cudaStream_t stream);
  void pack_policy(PolicyPack& pk);
  void purge_slot(int32_t slot);
  void apply_policy(cudaStream_t stream);
  // Enqueues (kCuda) or carries out (kCpu) what `policy` holds: invalidations, copies into cache
  // pages, page chains and directory entries; `op` and `dir` label the copies' span.
  void apply_decisions(PolicyPack& pk, Buffer& dev, Op op, Direction dir, cudaStream_t stream);
  void admit_window(Sequence& s, int32_t layer, const WindowJob& j, int32_t first);
  // Sizes the admissions' pinned packs and device buffers for max_sequences committing a window
  // in every recall layer at once, on the first add_sequence rather than in the end_step that
  // first needs them: pinning and device allocation take milliseconds.
  void reserve_admissions();
  int64_t table_row_of(SeqId seq, int32_t layer, int32_t h) const;
};

Engine::Impl::Impl(const EngineConfig& c)
    : cfg(c),
      backend(c.backend),
      device(c.device),
      L(c.model.num_layers),
      Hq(c.model.num_q_heads),
      Hkv(c.model.num_kv_heads),
      D(c.model.head_dim),
      G(c.model.num_q_heads / c.model.num_kv_heads),
      dtype(c.model.dtype),
      rowb(kv_row_bytes(c.model.dtype, c.model.head_dim)),
      staging(c.backend, 8) {
  if (backend == Backend::kCuda) {
    KVTIER_CHECK(cuda::device_available(), "backend cuda: no CUDA device is available");
  }
  recall_index.assign(L, -1);
  if (cfg.mode == Mode::kClusterKV || cfg.mode == Mode::kHybrid) {
    for (int32_t l = std::min(cfg.num_dense_layers, L); l < L; ++l) {
      recall_index[l] = num_recall_layers++;
    }
  }
  telemetry.set_queueing(false);  // until a trace starts
  memory::TieredStoreConfig sc;
  sc.shape = memory::KvShape{L, Hkv, D, dtype};
  sc.host.bytes_limit = cfg.host_bytes_limit;
  sc.host.device = device;
  if (backend == Backend::kCpu) sc.host.pin = memory::PinMode::kPageable;
  store = std::make_unique<memory::TieredStore>(sc);
  // chunks_per_problem() bounds a problem's chunk list (the device builder writes each into a
  // region of that many) with a missed cluster split over host pages of at least this many rows.
  KVTIER_ASSERT(store->rows_per_page() >= std::min<int64_t>(cfg.page_size, 16));
  for (int32_t i = cfg.max_sequences - 1; i >= 0; --i) free_slots.push_back(i);
  step_rows_per_layer.assign(L, 0);
  step_layer_done.resize(L);
#if KVTIER_WITH_CUDA
  if (backend == Backend::kCuda) {
    cuda::DeviceGuard guard(device);
    side = std::make_unique<cuda::Stream>(device);
    copy = std::make_unique<cuda::Stream>(device);
    const size_t step_bytes = static_cast<size_t>(L) * cfg.max_batch * 2 * Hkv * rowb;
    step_host = memory::PinnedBuffer::allocate(step_bytes);
    step_dev = alloc(step_bytes);
  }
#endif
  if (num_recall_layers > 0) {
    // Prompt clusters hold tokens_per_cluster rows on average and window clusters W / C+, so a
    // head never has more than max_context / min(both) clusters (+ rounding).
    const double per = std::min<double>(cfg.tokens_per_cluster,
                                        static_cast<double>(cfg.window) / cfg.window_clusters);
    int64_t cap = static_cast<int64_t>(static_cast<double>(cfg.max_context) / per) + 2;
    if (cfg.initial_clusters > 0) cap += cfg.initial_clusters;
    cap = (cap + 3) / 4 * 4;
    KVTIER_CHECK(cap < (1 << 30), "max_context ", cfg.max_context, " needs too many clusters");
    cap_c = static_cast<int32_t>(cap);
    const size_t rows = static_cast<size_t>(cfg.max_sequences) * num_recall_layers * Hkv;
    centroid_table = alloc(rows * cap_c * D * sizeof(float));
    if (backend == Backend::kCuda) centroid_f16 = alloc(rows * cap_c * D * sizeof(uint16_t));
    size_table = alloc(rows * cap_c * sizeof(int32_t));
    dir_table = alloc(rows * cap_c * sizeof(int32_t));
    slot_table = alloc(rows * cap_c * sizeof(int32_t));
    sel_cols = std::min(cap_c, cfg.budget);
    max_problems = cfg.max_batch * Hkv;
    rec_cols = 5 + sel_cols;
    const size_t layer_ints = static_cast<size_t>(max_problems) * rec_cols;
    for (int parity = 0; parity < 2; ++parity) {
      record_buf[parity] = memory::PinnedBuffer::allocate(num_recall_layers * layer_ints * 4);
      records[parity].resize(num_recall_layers);
      for (int32_t ri = 0; ri < num_recall_layers; ++ri) {
        records[parity][ri].rows =
            reinterpret_cast<int32_t*>(record_buf[parity].data()) + ri * layer_ints;
      }
    }
    if (backend == Backend::kCuda) rec_dev = alloc(num_recall_layers * layer_ints * 4);
    policy.resize(num_recall_layers);
    prev_selected.resize(num_recall_layers);
    last_selected.resize(num_recall_layers);
    memory::ClusterCacheConfig cc;
    cc.backend = backend;
    cc.device = device;
    cc.dtype = dtype;
    cc.head_dim = D;
    cc.page_size = cfg.page_size;
    cc.retention_steps = cfg.retention_steps;
    if (cfg.cache_bytes > 0) {
      cc.num_pages = std::max<int64_t>(
          1, static_cast<int64_t>(cfg.cache_bytes / num_recall_layers /
                                  (2 * static_cast<size_t>(cfg.page_size) * rowb)));
    } else {
      // Twice a step's selection of every KV head of max_batch sequences: the budget's pages
      // plus a partly filled page per selected cluster (about one per 64 rows).
      const int64_t pages_per_head =
          (cfg.budget + cfg.page_size - 1) / cfg.page_size + (cfg.budget + 63) / 64;
      cc.num_pages = 2 * pages_per_head * Hkv * cfg.max_batch;
    }
    for (int32_t i = 0; i < num_recall_layers; ++i) {
      caches.push_back(std::make_unique<memory::ClusterCache>(cc));
      page_next_off.push_back(static_cast<int64_t>(i) * cc.num_pages);
      if (backend == Backend::kCuda) {
        mem.add(static_cast<size_t>(cc.num_pages) * caches.back()->page_bytes() * 2, true);
      }
    }
    page_next = alloc(static_cast<size_t>(num_recall_layers) * cc.num_pages * sizeof(int32_t));
  }
  if (!cfg.telemetry_path.empty()) start_trace(cfg.telemetry_path);
}

Engine::Impl::~Impl() {
  try {
    jobs.wait();
  } catch (...) {
  }
  try {
    stop_trace();
  } catch (const std::exception& e) {
    KVTIER_LOG(kWarn, "telemetry: ", e.what());
  }
  for (const auto& c : caches) {
    if (backend == Backend::kCuda)
      mem.sub(static_cast<size_t>(c->num_pages()) * c->page_bytes() * 2, true);
  }
}

void Engine::Impl::wait_job(const std::shared_ptr<Job>& job, SeqId seq, int32_t layer) {
  if (!job) return;
  if (!job->ready()) {
    const uint64_t t0 = telemetry.now_ns();
    job->future.wait();
    Event e;
    e.kind = EventKind::kStall;
    e.seq = seq;
    e.layer = layer;
    e.time_ns = t0;
    e.dur_ns = telemetry.now_ns() - t0;
    record(e);
  }
  job->future.get();  // rethrows the job's error
}

void Engine::Impl::start_trace(const std::string& path) {
  KVTIER_CHECK(!spans, "start_trace: a trace is being written already (stop_trace first)");
  telemetry.open_file(path).throw_if_error();
  decode_span_open = false;  // a step begun before the trace has no span to end
  try {
    scheduler::record_link(&telemetry, scheduler::measure_link(backend, device));
    spans = std::make_unique<scheduler::SpanTimer>(&telemetry, backend, device);
  } catch (...) {
    (void)telemetry.close_file();
    telemetry.set_queueing(false);
    throw;
  }
}

void Engine::Impl::stop_trace() {
  if (!spans) return;
  std::exception_ptr error;
  try {
    spans->poll(/*wait=*/true);
  } catch (...) {
    error = std::current_exception();  // the file is closed all the same
  }
  spans.reset();
  decode_span_open = false;
  const Status st = telemetry.close_file();
  telemetry.set_queueing(false);
  if (error) std::rethrow_exception(error);
  st.throw_if_error();
}

void Engine::Impl::wait_sequence(Sequence& s) {
  for (int32_t l = 0; l < L; ++l) {
    LayerState& st = s.layers[l];
    if (st.prefill) st.prefill->future.wait();
    if (st.window && st.window->host) st.window->host->future.wait();
    st.window.reset();
    st.prefill_device.synchronize();
    st.last_decode.synchronize();
    st.dir_up_done.synchronize();  // dir_up is read by a copy until then
  }
}

// Resident rows [Hkv, cap, D]: grows (keeping the rows) when `rows` do not fit.
void Engine::Impl::ensure_resident(LayerState& st, int64_t rows, cudaStream_t stream) {
  if (rows <= st.res_cap) return;
  const int64_t cap = std::max<int64_t>({rows, st.res_cap + st.res_cap / 4, 64});
  Buffer k = alloc(static_cast<size_t>(Hkv) * cap * rowb, true);
  Buffer v = alloc(static_cast<size_t>(Hkv) * cap * rowb, true);
  int64_t used = st.res_rows;
  for (const int64_t r : st.head_rows) used = std::max(used, r);
  if (used > 0) {
    copy_2d(backend, k.get(), cap * rowb, st.res_k.get(), st.res_cap * rowb, used * rowb, Hkv,
            stream);
    copy_2d(backend, v.get(), cap * rowb, st.res_v.get(), st.res_cap * rowb, used * rowb, Hkv,
            stream);
  }
#if KVTIER_WITH_CUDA
  // The old buffers may still be read by work on `stream`; freeing them synchronizes.
  if (backend == Backend::kCuda && used > 0) KVTIER_CUDA_CHECK(cudaStreamSynchronize(stream));
#endif
  st.res_k = std::move(k);
  st.res_v = std::move(v);
  st.res_cap = cap;
}

// Copies rows [r0, r0 + count) of every head of `kv` to a head-major destination whose head h
// starts at dst + h * head_pitch and whose row i goes to row dst_row + i.
void copy_kv_rows(Backend backend, const KvRows& kv, bool v_side, int64_t r0, int64_t count,
                  std::byte* dst, size_t head_pitch, int64_t dst_row, size_t rowb,
                  cudaStream_t stream) {
  const size_t es = dtype_size(kv.dtype);
  const int64_t hs = kv.head_stride >= 0 ? kv.head_stride : kv.num_rows * kv.head_dim;
  const int64_t rs = kv.row_stride >= 0 ? kv.row_stride : kv.head_dim;
  const std::byte* src = static_cast<const std::byte*>(v_side ? kv.v : kv.k);
  for (int32_t h = 0; h < kv.num_kv_heads; ++h) {
    copy_2d(backend, dst + h * head_pitch + dst_row * rowb, rowb,
            src + (static_cast<size_t>(h) * hs + static_cast<size_t>(r0) * rs) * es, rs * es, rowb,
            static_cast<size_t>(count), stream);
  }
}

void Engine::Impl::prefill(Sequence& s, int32_t layer, const KvRows& kv, cudaStream_t stream) {
  LayerState& st = s.layers[layer];
  const int64_t n = kv.num_rows;
  const bool recall = st.recall;
  // Row split: resident [0, res_n); recallable [res_n, n), of which the first c_n are clustered
  // now and the remainder (< W) waits in the window.
  const int64_t res_n = recall ? std::min<int64_t>(cfg.sink, n) : n;
  const int64_t r_n = n - res_n;
  const int64_t rem = recall ? r_n % cfg.window : 0;
  const int64_t c_n = recall ? r_n - rem : 0;
  int32_t c0 = 0;
  if (c_n > 0) {
    c0 = initial_cluster_count(c_n);
    KVTIER_CHECK_CODE(kCapacity, c0 <= cap_c, "prompt of ", n, " rows needs ", c0,
                      " clusters per head; the table holds ", cap_c,
                      " (raise max_context or tokens_per_cluster)");
  }
  const cudaStream_t side_s = backend == Backend::kCuda ? side_stream() : nullptr;
  MaybeEvent in;
  in.record(backend, stream);
  stream_wait(backend, side_s, in);

  // Resident rows and the window remainder, copied now (on the side stream).
  ensure_resident(st, recall ? std::max<int64_t>(cfg.sink, 1) : n + 256, side_s);
  copy_kv_rows(backend, kv, false, 0, res_n, st.res_k.get(), st.res_cap * rowb, 0, rowb, side_s);
  copy_kv_rows(backend, kv, true, 0, res_n, st.res_v.get(), st.res_cap * rowb, 0, rowb, side_s);
  st.res_rows = res_n;
  if (recall) {
    alloc_window(st);
    for (int64_t i = 0; i < rem;) {  // positions c_n + i -> ring slot (c_n + i) % win_cap
      const int64_t slot = (c_n + i) % st.win_cap;
      const int64_t run = std::min(rem - i, st.win_cap - slot);
      copy_kv_rows(backend, kv, false, res_n + c_n + i, run, st.win_k.get(), st.win_cap * rowb,
                   slot, rowb, side_s);
      copy_kv_rows(backend, kv, true, res_n + c_n + i, run, st.win_v.get(), st.win_cap * rowb, slot,
                   rowb, side_s);
      i += run;
    }
    st.recall_end = r_n;
    st.sizes.assign(Hkv, {});
  }
  st.rows = n;
  st.prefilled = true;

  // What goes to the host tier: the recallable rows (recall layers) or every row (offload).
  const int64_t off0 = recall ? res_n : 0, off_n = recall ? r_n : n;
  auto job = std::make_shared<Job>();
  st.prefill = job;
  const SeqId seq = s.id;
  Event off;
  off.kind = EventKind::kOffload;
  off.op = Op::kPrefillStore;
  off.seq = seq;
  off.layer = layer;
  off.dir = Direction::kDeviceToHost;
  off.bytes = static_cast<int64_t>(2 * off_n * Hkv * rowb);

  if (backend == Backend::kCpu) {
    // Same steps, in order, now.
    try {
      KvRows part = kv;
      const size_t es = dtype_size(kv.dtype);
      const int64_t rs = kv.row_stride >= 0 ? kv.row_stride : kv.head_dim;
      part.head_stride = kv.head_stride >= 0 ? kv.head_stride : kv.num_rows * kv.head_dim;
      part.row_stride = rs;
      // Rows [off0, off0 + c_n) are clustered (region A), the c_n.. rest wait (region B).
      auto part_of = [&](int64_t first, int64_t count) {
        part.k = static_cast<const std::byte*>(kv.k) + first * rs * es;
        part.v = static_cast<const std::byte*>(kv.v) + first * rs * es;
        part.num_rows = count;
        return part;
      };
      const auto t0 = Clock::now();
      const uint64_t t0_ns = telemetry.now_ns();
      if (c_n > 0) {
        std::vector<std::byte> points(static_cast<size_t>(Hkv) * c_n * rowb);
        copy_kv_rows(backend, kv, false, res_n, c_n, points.data(), c_n * rowb, 0, rowb, nullptr);
        const kernels::KmeansParams kp =
            kmeans_params(c_n, c0, static_cast<uint64_t>(seq) * 1000003ull + layer);
        std::vector<int32_t> labels(static_cast<size_t>(Hkv) * c_n);
        kernels::kmeans_cpu(kp, points.data(), centroids_row(st.table_row), labels.data(),
                            sizes_row(st.table_row));
        seal_centroids(st.table_row, 0, c0, nullptr);
        store->append_clustered(seq, layer, part_of(off0, c_n), labels.data(), c0);
        for (int32_t h = 0; h < Hkv; ++h) {
          st.sizes[h].assign(sizes_row(st.table_row + h), sizes_row(st.table_row + h) + c0);
        }
      }
      if (off_n > c_n) store->append(seq, layer, part_of(off0 + c_n, off_n - c_n));
      record(off);
      if (c_n > 0) {
        st.num_clusters = c0;
        st.clustered = c_n;
        prefill_cluster_us += static_cast<int64_t>(ms_since(t0) * 1000);
        Event ce;
        ce.kind = EventKind::kCluster;
        ce.op = Op::kPrefillCluster;
        ce.seq = seq;
        ce.layer = layer;
        ce.bytes = static_cast<int64_t>(c_n * Hkv * rowb);
        record(ce);
      }
      record_host_span(
          span_event(Op::kPrefillStore, Track::kHost, Direction::kNone, off.bytes, seq, layer),
          t0_ns);
      if (recall) refresh_host_directory(s, layer, 0, 0, nullptr, true);
      job->promise.set_value();
    } catch (...) {
      job->promise.set_exception(std::current_exception());
    }
    return;
  }

#if KVTIER_WITH_CUDA
  if (layer == 0 && off_n > 0) reserve_prompt_pages(n);
  // kCuda: an engine-owned head-major copy [Hkv, off_n] (clustered rows first, then the rest)
  // lets the caller reuse its buffers as soon as the copy is done; offload and k-means read it.
  while (inflight_prefills.size() >= kMaxInflightPrefills) {
    inflight_prefills.front()->future.wait();
    inflight_prefills.pop_front();
  }
  struct Work {
    std::unique_ptr<PrefillScratch> sc;  // k, v, labels, ws; host: [K | V] staging, head-major
    MaybeEvent copied, d2h, kmeans;
  };
  auto w = std::make_shared<Work>();
  w->sc = take_scratch();
  PrefillScratch& sc = *w->sc;
  const size_t part_bytes = static_cast<size_t>(Hkv) * off_n * rowb;
  if (off_n > 0) {
    grow(sc.k, part_bytes);
    grow(sc.v, part_bytes);
    // Region A: [Hkv, c_n] clustered rows; region B: [Hkv, off_n - c_n] the rest.
    const int64_t b_n = off_n - c_n;
    std::byte* kb = sc.k.get() + static_cast<size_t>(Hkv) * c_n * rowb;
    std::byte* vb = sc.v.get() + static_cast<size_t>(Hkv) * c_n * rowb;
    copy_kv_rows(backend, kv, false, off0, c_n, sc.k.get(), c_n * rowb, 0, rowb, side_s);
    copy_kv_rows(backend, kv, true, off0, c_n, sc.v.get(), c_n * rowb, 0, rowb, side_s);
    copy_kv_rows(backend, kv, false, off0 + c_n, b_n, kb, b_n * rowb, 0, rowb, side_s);
    copy_kv_rows(backend, kv, true, off0 + c_n, b_n, vb, b_n * rowb, 0, rowb, side_s);
  }
  w->copied.record(backend, side_s);
  stream_wait(backend, stream, w->copied);  // the caller's buffers are free after this
  if (off_n > 0) {
    if (sc.host.size_bytes() < 2 * part_bytes) {
      sc.host = memory::PinnedBuffer();  // free the smaller one first
      sc.host = memory::PinnedBuffer::allocate(2 * part_bytes);
    }
    stream_wait(backend, copy_stream(), w->copied);
    timed(copy_stream(),
          span_event(Op::kPrefillCopy, Track::kCopy, Direction::kDeviceToHost,
                     static_cast<int64_t>(2 * part_bytes), s.id, layer),
          [&] {
            cuda::memcpy_async(sc.host.data(), sc.k.get(), part_bytes, copy_stream());
            cuda::memcpy_async(sc.host.data() + part_bytes, sc.v.get(), part_bytes, copy_stream());
          });
    w->d2h.record(backend, copy_stream());
  }
  if (c_n > 0) {
    const kernels::KmeansParams kp =
        kmeans_params(c_n, c0, static_cast<uint64_t>(seq) * 1000003ull + layer);
    grow(sc.labels, static_cast<size_t>(Hkv) * c_n * sizeof(int32_t));
    grow(sc.ws, kernels::kmeans_workspace_bytes(kp));
    timed(side_s,
          span_event(Op::kPrefillCluster, Track::kSide, Direction::kNone,
                     static_cast<int64_t>(c_n * Hkv * rowb), s.id, layer),
          [&] {
            kernels::launch_kmeans(kp, sc.k.get(), centroids_row(st.table_row),
                                   sc.labels.as<int32_t>(), sizes_row(st.table_row), sc.ws.get(),
                                   nullptr, nullptr, nullptr, side_s);
            seal_centroids(st.table_row, 0, c0, side_s);
          });
    w->kmeans.record(backend, side_s);
  }
  st.prefill_device.record(backend, side_s);
  inflight_prefills.push_back(job);
  LayerState* stp = &st;
  Sequence* seqp = &s;
  jobs.run([this, w, job, seq, layer, off_n, c_n, c0, part_bytes, off, stp, seqp, recall] {
    try {
      cuda::DeviceGuard guard(device);  // this job creates events and pinned buffers
      const auto t0 = Clock::now();
      w->d2h.wait_polling();
      const uint64_t t0_ns = telemetry.now_ns();
      // Region A (clustered) goes to the store laid out by cluster in one pass, then region B:
      // store positions stay in token order.
      const int64_t b_n = off_n - c_n;
      const std::byte* hk = off_n > 0 ? w->sc->host.data() : nullptr;
      const std::byte* hv = off_n > 0 ? w->sc->host.data() + part_bytes : nullptr;
      if (c_n > 0) {
        std::vector<int32_t> labels(static_cast<size_t>(Hkv) * c_n);
        w->kmeans.wait_polling();
        KVTIER_CUDA_CHECK(cudaMemcpyAsync(labels.data(), w->sc->labels.get(), labels.size() * 4,
                                          cudaMemcpyDeviceToHost, copy_stream()));
        KVTIER_CUDA_CHECK(cudaStreamSynchronize(copy_stream()));
        store->append_clustered(seq, layer, KvRows{hk, hv, dtype, Hkv, D, c_n, c_n * D, D},
                                labels.data(), c0);
        for (int32_t h = 0; h < Hkv; ++h) {
          const int32_t* lab = labels.data() + static_cast<size_t>(h) * c_n;
          std::vector<int32_t> sz(c0, 0);
          for (int64_t i = 0; i < c_n; ++i) ++sz[lab[i]];
          stp->sizes[h] = std::move(sz);
        }
      }
      if (b_n > 0) {
        store->append(
            seq, layer,
            KvRows{hk + static_cast<size_t>(Hkv) * c_n * rowb,
                   hv + static_cast<size_t>(Hkv) * c_n * rowb, dtype, Hkv, D, b_n, b_n * D, D});
      }
      Event e = off;
      record(e);
      if (c_n > 0) {
        stp->num_clusters = c0;
        stp->clustered = c_n;
        Event ce;
        ce.kind = EventKind::kCluster;
        ce.op = Op::kPrefillCluster;
        ce.seq = seq;
        ce.layer = layer;
        ce.bytes = static_cast<int64_t>(c_n * Hkv * rowb);
        record(ce);
      }
      if (recall) refresh_host_directory(*seqp, layer, 0, 0, copy_stream(), true);
      prefill_cluster_us += static_cast<int64_t>(ms_since(t0) * 1000);
      record_host_span(
          span_event(Op::kPrefillStore, Track::kHost, Direction::kNone, off.bytes, seq, layer),
          t0_ns);
      // The download and k-means have finished (waited above): the scratch is free.
      give_scratch(std::move(w->sc));
      job->promise.set_value();
    } catch (...) {
      job->promise.set_exception(std::current_exception());
    }
  });
#endif
}

// clusterattn: the observation window votes on the prompt's rows, DBAC picks ranges per KV head
// within the per-head budgets, and each head keeps the sink, its picked rows and the window, in
// position order. The rest of the prompt is dropped. On kCuda the votes and DBAC run on the device
// and prefill waits for them (the kept positions decide the copies).
std::vector<std::vector<int64_t>> Engine::Impl::dbac_keep(int32_t layer, const KvRows& kv,
                                                          const ObservationWindow& window,
                                                          cudaStream_t stream) {
  (void)stream;
  const int64_t n = kv.num_rows;
  KVTIER_CHECK(window.q != nullptr && window.num_queries > 0, "prefill_layer: mode ",
               mode_name(cfg.mode), " needs the observation window's queries for layer ", layer,
               " (ObservationWindow with num_queries > 0)");
  const int32_t w = static_cast<int32_t>(std::min<int64_t>(window.num_queries, n));
  std::vector<std::vector<int64_t>> keep(Hkv);
  const int64_t prefix = n - w;
  if (prefix > 0) {
    // Head-major keys and the window's queries (the last w of the num_queries given) for the
    // votes.
    kernels::ObservationVotesParams vp;
    vp.dtype = dtype;
    vp.num_q_heads = Hq;
    vp.num_kv_heads = Hkv;
    vp.head_dim = D;
    vp.num_tokens = n;
    vp.window = w;
    kernels::DbacParams dp;
    dp.num_kv_heads = Hkv;
    dp.num_tokens = n;
    dp.window = w;
    dp.eps = cfg.dbac_eps;
    dp.min_density_ratio = cfg.dbac_min_density_ratio;
    const int64_t per_head = cfg.resident_budget > 0 ? cfg.resident_budget : cfg.budget;
    // In clusterattn a share of the budget may be held back for the most recent prompt rows (the
    // fill below gives it to them).
    const double dbac_share =
        cfg.mode == Mode::kClusterAttn && cfg.dbac_fill_recent ? 1.0 - cfg.dbac_recent_share : 1.0;
    dp.total_budget =
        std::max<int64_t>(1, std::llround(static_cast<double>(per_head) * dbac_share)) * Hkv;
    dp.coverage = cfg.dbac_coverage;
    dp.floor_fraction = cfg.dbac_floor_fraction;
    const int64_t rcap = kernels::dbac_range_capacity(dp), kcap = kernels::dbac_kept_capacity(dp);
    std::vector<int32_t> kept(static_cast<size_t>(Hkv) * kcap), nk(Hkv);
    if (backend == Backend::kCpu) {
      std::vector<std::byte> q(static_cast<size_t>(Hq) * w * rowb);
      for (int32_t h = 0; h < Hq; ++h) {
        std::memcpy(
            q.data() + static_cast<size_t>(h) * w * rowb,
            static_cast<const std::byte*>(window.q) +
                (static_cast<size_t>(h) * window.num_queries + (window.num_queries - w)) * rowb,
            static_cast<size_t>(w) * rowb);
      }
      std::vector<std::byte> keys(static_cast<size_t>(Hkv) * n * rowb);
      copy_kv_rows(backend, kv, false, 0, n, keys.data(), n * rowb, 0, rowb, nullptr);
      std::vector<float> votes(static_cast<size_t>(Hkv) * prefix);
      kernels::observation_votes_cpu(vp, q.data(), keys.data(), votes.data());
      std::vector<kernels::TokenRange> ranges(static_cast<size_t>(Hkv) *
                                              std::max<int64_t>(rcap, 1));
      std::vector<int32_t> nr(Hkv), nt(Hkv), hb(Hkv);
      kernels::DbacOutput out;
      out.ranges = ranges.data();
      out.num_ranges = nr.data();
      out.num_tokens = nt.data();
      out.head_budget = hb.data();
      out.kept_positions = kept.data();
      out.num_kept = nk.data();
      kernels::dbac_cpu(dp, votes.data(), out);
    }
#if KVTIER_WITH_CUDA
    else {
      // Votes and DBAC on the device; only the kept positions come back (they decide which
      // rows are copied), so this waits for `stream`.
      Buffer keys = alloc(static_cast<size_t>(Hkv) * n * rowb);
      copy_kv_rows(backend, kv, false, 0, n, keys.get(), n * rowb, 0, rowb, stream);
      Buffer q = alloc(static_cast<size_t>(Hq) * w * rowb);
      copy_2d(backend, q.get(), w * rowb,
              static_cast<const std::byte*>(window.q) + (window.num_queries - w) * rowb,
              window.num_queries * rowb, w * rowb, Hq, stream);
      Buffer votes = alloc(static_cast<size_t>(Hkv) * prefix * sizeof(float));
      Buffer vws = alloc(std::max<size_t>(kernels::observation_votes_workspace_bytes(vp), 16));
      kernels::launch_observation_votes(vp, q.get(), keys.get(), votes.as<float>(), vws.get(),
                                        nullptr, stream);
      // [invalid vote (int64) | ranges | kept positions | 4 x Hkv counts], each part aligned.
      const size_t rb = align16(static_cast<size_t>(Hkv) * std::max<int64_t>(rcap, 1) *
                                sizeof(kernels::TokenRange));
      const size_t kb = align16(static_cast<size_t>(Hkv) * kcap * 4);
      Buffer outs = alloc(16 + rb + kb + 4 * static_cast<size_t>(Hkv) * 4);
      auto* invalid = reinterpret_cast<int64_t*>(outs.get());
      kernels::DbacOutput out;
      out.ranges = reinterpret_cast<kernels::TokenRange*>(outs.get() + 16);
      out.kept_positions = reinterpret_cast<int32_t*>(outs.get() + 16 + rb);
      int32_t* small = reinterpret_cast<int32_t*>(outs.get() + 16 + rb + kb);
      out.num_ranges = small;
      out.num_tokens = small + Hkv;
      out.head_budget = small + 2 * Hkv;
      out.num_kept = small + 3 * Hkv;
      Buffer dws = alloc(std::max<size_t>(kernels::dbac_workspace_bytes(dp), 16));
      kernels::launch_dbac(dp, votes.as<float>(), out, dws.get(), invalid, stream);
      int64_t bad = -1;
      KVTIER_CUDA_CHECK(cudaMemcpyAsync(kept.data(), out.kept_positions, kept.size() * 4,
                                        cudaMemcpyDeviceToHost, stream));
      KVTIER_CUDA_CHECK(
          cudaMemcpyAsync(nk.data(), out.num_kept, Hkv * 4, cudaMemcpyDeviceToHost, stream));
      KVTIER_CUDA_CHECK(cudaMemcpyAsync(&bad, invalid, sizeof bad, cudaMemcpyDeviceToHost, stream));
      KVTIER_CUDA_CHECK(cudaStreamSynchronize(stream));
      kernels::throw_if_invalid_vote(dp, bad);
    }
#endif
    const int64_t sink = std::min<int64_t>(cfg.sink, prefix);
    std::vector<int64_t> picked(Hkv, 0);  // DBAC's prompt rows per head (not sink, not window)
    for (int32_t h = 0; h < Hkv; ++h) {
      // Sink, then the kept positions (ranges and window, ascending), without repeats.
      for (int64_t r = 0; r < sink; ++r) keep[h].push_back(r);
      for (int32_t i = 0; i < nk[h]; ++i) {
        const int64_t pos = kept[static_cast<size_t>(h) * kcap + i];
        if (pos >= sink) keep[h].push_back(pos);
        picked[h] += pos >= sink && pos < prefix ? 1 : 0;
      }
    }
    if (cfg.mode == Mode::kClusterAttn && cfg.dbac_fill_recent) {
      // DBAC stops at its coverage, often short of the budget; what it leaves goes to the prompt
      // rows just before the observation window, to the heads below the average budget in
      // proportion to their shortfall. (In hybrid the unused share is recall's already.)
      const int64_t avg = cfg.resident_budget > 0 ? cfg.resident_budget : cfg.budget;
      int64_t pool = avg * Hkv, short_total = 0;
      for (int32_t h = 0; h < Hkv; ++h) {
        pool -= picked[h];
        short_total += std::max<int64_t>(0, avg - picked[h]);
      }
      for (int32_t h = 0; h < Hkv && pool > 0 && short_total > 0; ++h) {
        const int64_t want =
            std::max<int64_t>(0, avg - picked[h]) * std::min(pool, short_total) / short_total;
        std::vector<int64_t> recent;
        for (int64_t pos = prefix - 1; pos >= sink && static_cast<int64_t>(recent.size()) < want;
             --pos) {
          if (!std::binary_search(keep[h].begin(), keep[h].end(), pos)) recent.push_back(pos);
        }
        std::vector<int64_t> merged(keep[h].size() + recent.size());
        std::merge(keep[h].begin(), keep[h].end(), recent.rbegin(), recent.rend(), merged.begin());
        keep[h] = std::move(merged);
      }
    }
  } else {
    for (int32_t h = 0; h < Hkv; ++h)
      for (int64_t r = 0; r < n; ++r) keep[h].push_back(r);
  }
  Event e;
  e.kind = EventKind::kCluster;
  e.op = Op::kPrefillCluster;
  e.layer = layer;
  e.bytes = static_cast<int64_t>(prefix * Hkv * rowb);
  record(e);
  return keep;
}

// Copies each head's kept positions of `kv`, in order, into the resident rows (head_rows).
void Engine::Impl::keep_resident(LayerState& st, const KvRows& kv,
                                 const std::vector<std::vector<int64_t>>& keep, int64_t spare,
                                 cudaStream_t stream) {
  int64_t most = 0;
  for (const auto& k : keep) most = std::max<int64_t>(most, static_cast<int64_t>(k.size()));
  ensure_resident(st, most + spare, stream);
  st.head_rows.assign(Hkv, 0);
  const size_t es = dtype_size(kv.dtype);
  const int64_t hs = kv.head_stride >= 0 ? kv.head_stride : kv.num_rows * kv.head_dim;
  const int64_t rs = kv.row_stride >= 0 ? kv.row_stride : kv.head_dim;
  // Runs of consecutive kept positions (a run's rows are adjacent when a row stride is one row).
  std::vector<kernels::KvChunk> runs;
  for (int32_t h = 0; h < Hkv; ++h) {
    const std::vector<int64_t>& kh = keep[h];
    for (size_t i = 0; i < kh.size();) {
      size_t j = i + 1;
      while (j < kh.size() && kh[j] == kh[j - 1] + 1 && static_cast<size_t>(rs) * es == rowb) ++j;
      const size_t src = (static_cast<size_t>(h) * hs + static_cast<size_t>(kh[i]) * rs) * es;
      const size_t dst = (static_cast<size_t>(h) * st.res_cap + st.head_rows[h]) * rowb;
      kernels::KvChunk c;
      c.k = static_cast<const std::byte*>(kv.k) + src;
      c.v = static_cast<const std::byte*>(kv.v) + src;
      c.k_copy = st.res_k.get() + dst;
      c.v_copy = st.res_v.get() + dst;
      c.num_rows = static_cast<int32_t>(j - i);
      runs.push_back(c);
      st.head_rows[h] += static_cast<int64_t>(j - i);
      i = j;
    }
  }
  if (backend == Backend::kCpu) {
    for (const kernels::KvChunk& c : runs) {
      std::memcpy(c.k_copy, c.k, static_cast<size_t>(c.num_rows) * rowb);
      std::memcpy(c.v_copy, c.v, static_cast<size_t>(c.num_rows) * rowb);
    }
    return;
  }
#if KVTIER_WITH_CUDA
  // One row-copy kernel; waits for it (the list and the caller's rows must live until it ran).
  if (runs.empty()) return;
  const bool aligned = ((reinterpret_cast<uintptr_t>(kv.k) | reinterpret_cast<uintptr_t>(kv.v) |
                         static_cast<uintptr_t>(rs * es) | static_cast<uintptr_t>(hs * es)) %
                        16) == 0;
  if (!aligned) {  // the row-copy kernel moves 16-byte vectors; copy run by run instead
    for (const kernels::KvChunk& c : runs) {
      cuda::memcpy_async(c.k_copy, c.k, static_cast<size_t>(c.num_rows) * rowb, stream);
      cuda::memcpy_async(c.v_copy, c.v, static_cast<size_t>(c.num_rows) * rowb, stream);
    }
    KVTIER_CUDA_CHECK(cudaStreamSynchronize(stream));
    return;
  }
  Buffer items = alloc(runs.size() * sizeof(kernels::KvChunk));
  cuda::memcpy_async(items.get(), runs.data(), runs.size() * sizeof(kernels::KvChunk), stream);
  scheduler::launch_copy_rows(items.as<kernels::KvChunk>(), static_cast<int32_t>(runs.size()),
                              static_cast<int32_t>(rowb), stream);
  KVTIER_CUDA_CHECK(cudaStreamSynchronize(stream));
#endif
}

// clusterattn: the observation window votes on the prompt's rows, DBAC picks ranges per KV head
// within the per-head budgets, and each head keeps the sink, its picked rows and the window, in
// position order. The rest of the prompt is dropped. On kCuda the votes and DBAC run on the device
// and prefill waits for them (the kept positions decide the copies).
void Engine::Impl::prefill_compressed(Sequence& s, int32_t layer, const KvRows& kv,
                                      const ObservationWindow& window, cudaStream_t stream) {
  LayerState& st = s.layers[layer];
  keep_resident(st, kv, dbac_keep(layer, kv, window, stream), 256, stream);
  st.rows = kv.num_rows;
  st.prefilled = true;
}

// hybrid: DBAC's rows (with the sink and the window) stay resident as in clusterattn, and every
// other prompt row is recallable as in clusterkv. All rows go to the host tier and are clustered
// by k-means per KV head; each head's resident rows are then moved to cluster 0, which the
// selection never takes (its size in the selection's table is 0), and the other clusters'
// centroids are recomputed from their recallable rows alone. No row is attended twice. On kCuda
// the votes, DBAC and k-means run on the device; the relabelling and the centroids of the
// recallable rows are computed on the host, and prefill waits for all of it (as clusterattn's
// prefill does: the kept positions decide the copies).
void Engine::Impl::prefill_hybrid(Sequence& s, int32_t layer, const KvRows& kv,
                                  const ObservationWindow& window, cudaStream_t stream) {
  LayerState& st = s.layers[layer];
  const SeqId seq = s.id;
  const int64_t n = kv.num_rows;
  const std::vector<std::vector<int64_t>> keep = dbac_keep(layer, kv, window, stream);
  keep_resident(st, kv, keep, 0, stream);
  const auto t0 = Clock::now();
  const int32_t c0 = initial_cluster_count(n);
  KVTIER_CHECK_CODE(kCapacity, c0 + 1 <= cap_c, "prompt of ", n, " rows needs ", c0 + 1,
                    " clusters per head; the table holds ", cap_c,
                    " (raise max_context or tokens_per_cluster)");
  // Head-major host copies [Hkv, n] of K and V: the host tier's rows, and the points the
  // centroids are recomputed from.
  const size_t part = static_cast<size_t>(Hkv) * n * rowb;
  std::vector<std::byte> hk(part), hv(part);
  copy_kv_rows(backend, kv, false, 0, n, hk.data(), n * rowb, 0, rowb, stream);
  copy_kv_rows(backend, kv, true, 0, n, hv.data(), n * rowb, 0, rowb, stream);
  const kernels::KmeansParams kp =
      kmeans_params(n, c0, static_cast<uint64_t>(seq) * 1000003ull + layer);
  std::vector<int32_t> labels(static_cast<size_t>(Hkv) * n);
  if (backend == Backend::kCpu) {
    std::vector<float> cent(static_cast<size_t>(Hkv) * cap_c * D);
    std::vector<int32_t> ksizes(static_cast<size_t>(Hkv) * cap_c);
    kernels::kmeans_cpu(kp, hk.data(), cent.data(), labels.data(), ksizes.data());
  }
#if KVTIER_WITH_CUDA
  else {
    Buffer dk = alloc(part), dcent = alloc(static_cast<size_t>(Hkv) * cap_c * D * sizeof(float)),
           dlab = alloc(labels.size() * sizeof(int32_t)),
           dsz = alloc(static_cast<size_t>(Hkv) * cap_c * sizeof(int32_t)),
           ws = alloc(std::max<size_t>(kernels::kmeans_workspace_bytes(kp), 16));
    copy_kv_rows(backend, kv, false, 0, n, dk.get(), n * rowb, 0, rowb, stream);
    kernels::launch_kmeans(kp, dk.get(), dcent.as<float>(), dlab.as<int32_t>(), dsz.as<int32_t>(),
                           ws.get(), nullptr, nullptr, nullptr, stream);
    KVTIER_CUDA_CHECK(cudaMemcpyAsync(labels.data(), dlab.get(), labels.size() * sizeof(int32_t),
                                      cudaMemcpyDeviceToHost, stream));
    KVTIER_CUDA_CHECK(cudaStreamSynchronize(stream));  // labels, hk and hv are complete
  }
#endif
  KvRows all{hk.data(), hv.data(), dtype, Hkv, D, n, n * D, D};
  store->append(seq, layer, all);
  // The selection's table rows [Hkv][c0 + 1] (centroids, sizes), built here and copied in.
  std::vector<float> tc(static_cast<size_t>(Hkv) * (c0 + 1) * D);
  std::vector<int32_t> ts(static_cast<size_t>(Hkv) * (c0 + 1));
  st.sizes.assign(Hkv, {});
  for (int32_t h = 0; h < Hkv; ++h) {
    int32_t* lab = labels.data() + static_cast<size_t>(h) * n;
    std::vector<uint8_t> resident(n, 0);
    for (const int64_t pos : keep[h]) resident[pos] = 1;
    for (int64_t i = 0; i < n; ++i) lab[i] = resident[i] ? 0 : lab[i] + 1;
    store->cluster(seq, layer, h, 0, n, lab, c0 + 1);
  }
  // Sizes (the host directory needs the true ones) and centroids of the recallable rows: the
  // normalized mean of their unit rows, or with mean_key_scores the mean of the rows.
  tbb::parallel_for(0, Hkv, [&](int32_t h) {
    const int32_t* lab = labels.data() + static_cast<size_t>(h) * n;
    std::vector<int32_t> sz(c0 + 1, 0);
    std::vector<double> sum(static_cast<size_t>(c0 + 1) * D, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      ++sz[lab[i]];
      if (lab[i] == 0) continue;
      const std::byte* row = hk.data() + (static_cast<size_t>(h) * n + i) * rowb;
      double inv = 1.0;  // mean keys sum the rows as they are
      if (!cfg.mean_key_scores) {
        double sq = 0;
        for (int32_t d = 0; d < D; ++d) {
          const double x = load_as_float(row, dtype, d);
          sq += x * x;
        }
        inv = sq > 0 ? 1.0 / std::sqrt(sq) : 0.0;
      }
      for (int32_t d = 0; d < D; ++d)
        sum[static_cast<size_t>(lab[i]) * D + d] += inv * load_as_float(row, dtype, d);
    }
    for (int32_t j = 0; j <= c0; ++j) {
      const double* c = &sum[static_cast<size_t>(j) * D];
      double inv = sz[j] > 0 ? 1.0 / sz[j] : 0.0;  // mean keys: the mean
      if (!cfg.mean_key_scores) {
        double sq = 0;
        for (int32_t d = 0; d < D; ++d) sq += c[d] * c[d];
        inv = sq > 0 ? 1.0 / std::sqrt(sq) : 0.0;
      }
      for (int32_t d = 0; d < D; ++d)
        tc[(static_cast<size_t>(h) * (c0 + 1) + j) * D + d] = static_cast<float>(c[d] * inv);
      ts[static_cast<size_t>(h) * (c0 + 1) + j] = j == 0 ? 0 : sz[j];  // never select cluster 0
    }
    st.sizes[h] = std::move(sz);
  });
  const size_t crow = static_cast<size_t>(c0 + 1) * D * sizeof(float);
  copy_2d(backend, centroids_row(st.table_row), cap_c * D * sizeof(float), tc.data(), crow, crow,
          Hkv, stream);
  seal_centroids(st.table_row, 0, c0 + 1, stream);
  copy_2d(backend, sizes_row(st.table_row), cap_c * sizeof(int32_t), ts.data(),
          (c0 + 1) * sizeof(int32_t), (c0 + 1) * sizeof(int32_t), Hkv, stream);
  st.num_clusters = c0 + 1;
  st.clustered = n;
  st.recall_end = n;
  alloc_window(st);
  st.rows = n;
  st.prefilled = true;
  prefill_cluster_us += static_cast<int64_t>(ms_since(t0) * 1000);
  refresh_host_directory(s, layer, 0, 0, stream, true);
#if KVTIER_WITH_CUDA
  if (backend == Backend::kCuda) KVTIER_CUDA_CHECK(cudaStreamSynchronize(stream));  // tc, ts
#endif
  auto job = std::make_shared<Job>();
  job->promise.set_value();
  st.prefill = job;
}

// ---- decode ----

namespace {

/// Ring positions [begin, begin + count) of every head as at most two slot runs.
template <typename F>
void for_ring_runs(int64_t begin, int64_t count, int64_t cap, F&& fn) {
  for (int64_t i = 0; i < count;) {
    const int64_t slot = (begin + i) % cap;
    const int64_t run = std::min(count - i, cap - slot);
    fn(slot, run, i);
    i += run;
  }
}

}  // namespace

void Engine::Impl::decode(int32_t layer, const DecodeBatch& b, cudaStream_t stream) {
  KVTIER_CHECK(layer >= 0 && layer < L, "decode_layer: layer ", layer, " out of [0, ", L, ")");
  const int32_t B = b.num_seqs;
  KVTIER_CHECK(B > 0 && B <= cfg.max_batch, "decode_layer: num_seqs ", B,
               " out of [1, max_batch = ", cfg.max_batch, "]");
  KVTIER_CHECK(b.seqs && b.q && b.k_new && b.v_new && b.out,
               "decode_layer: seqs, q, k_new, v_new and out must not be null");
  KVTIER_CHECK(backend == Backend::kCpu ||
                   ((reinterpret_cast<uintptr_t>(b.q) | reinterpret_cast<uintptr_t>(b.k_new) |
                     reinterpret_cast<uintptr_t>(b.v_new) | reinterpret_cast<uintptr_t>(b.out)) %
                    16) == 0,
               "decode_layer: q, k_new, v_new and out must be 16-byte aligned (device copies "
               "move 16-byte vectors)");
  const int32_t P = B * Hkv;
  const bool recall = recall_index[layer] >= 0;
  const bool cuda_path = backend == Backend::kCuda;
  std::vector<Sequence*> ss(B);
  for (int32_t i = 0; i < B; ++i) {
    ss[i] = &find(b.seqs[i]);
    for (int32_t j = 0; j < i; ++j) {
      KVTIER_CHECK(b.seqs[j] != b.seqs[i], "decode_layer: sequence ", b.seqs[i],
                   " appears twice in the batch");
    }
    KVTIER_CHECK_CODE(kCapacity, ss[i]->layers[layer].rows < cfg.max_context, "sequence ",
                      b.seqs[i], " reached max_context = ", cfg.max_context, " rows in layer ",
                      layer);
  }
  if (cuda_path) {
    KVTIER_CHECK(step_rows_per_layer[layer] + B <= cfg.max_batch,
                 "decode_layer: more than "
                 "max_batch = ",
                 cfg.max_batch, " sequences decoded in layer ", layer, " within one step");
  }
  // Everything this layer needs from background work.
  stream_wait(backend, stream, policy_applied);
  if (!step_open) {  // the step's first decode
    step_open = true;
    step_begin_ns = telemetry.now_ns();
    if (spans) {
      decode_span = spans->begin(stream);
      decode_span_open = true;
    }
  }
  for (int32_t i = 0; i < B; ++i) {
    LayerState& st = ss[i]->layers[layer];
    if (st.prefill) {
      wait_job(st.prefill, ss[i]->id, layer);
      stream_wait(backend, stream, st.prefill_device);
      st.prefill.reset();
    }
    if (!st.prefilled) {  // no prompt: start empty
      st.prefilled = true;
      if (st.compressed) st.head_rows.assign(Hkv, 0);
      if (st.recall) {
        alloc_window(st);
        st.sizes.assign(Hkv, {});
        refresh_host_directory(*ss[i], layer, 0, 0, stream, false);
      }
    }
    if (st.recall && st.recall_end - st.clustered >= st.win_cap) {
      // The ring is full: the window clustering in flight must land first. Committing appends
      // to st.sizes, which the policy job in flight reads.
      if (policy_job) policy_job->future.wait();
      finish_window_job(*ss[i], layer, /*wait=*/true, stream, /*admit=*/false);
      KVTIER_ASSERT(st.recall_end - st.clustered < st.win_cap);
    }
    stream_wait(backend, stream, st.centroids_ready);
  }

  // ---- append: each new row to the resident rows (a dense layer, or a sink not yet full) or
  // the window ring; rows bound for the host tier also to step_dev (kCuda).
  std::vector<void*> dst(4 * static_cast<size_t>(P));  // [k P][v P][k step P][v step P]
  std::vector<uint8_t> stored(B);
  const int32_t step_base = cuda_path ? step_rows_per_layer[layer] : 0;
  for (int32_t i = 0; i < B; ++i) {
    LayerState& st = ss[i]->layers[layer];
    const bool to_resident = !st.recall || (st.head_rows.empty() && st.res_rows < cfg.sink);
    stored[i] = !st.compressed && (!st.recall || !to_resident);  // what the host tier keeps
    if (to_resident) {
      int64_t need = st.res_rows + 1;
      for (const int64_t r : st.head_rows) need = std::max(need, r + 1);
      ensure_resident(st, need, stream);
    }
    for (int32_t h = 0; h < Hkv; ++h) {
      const size_t p = static_cast<size_t>(i) * Hkv + h;
      if (to_resident) {
        const int64_t at = st.compressed ? st.head_rows[h] : st.res_rows;
        dst[p] = st.res_k.get() + (h * st.res_cap + at) * rowb;
        dst[P + p] = st.res_v.get() + (h * st.res_cap + at) * rowb;
      } else {
        const int64_t slot = st.recall_end % st.win_cap;
        dst[p] = st.win_k.get() + (h * st.win_cap + slot) * rowb;
        dst[P + p] = st.win_v.get() + (h * st.win_cap + slot) * rowb;
      }
      if (cuda_path) {
        const size_t base =
            ((static_cast<size_t>(layer) * cfg.max_batch + step_base + i) * 2) * Hkv * rowb;
        dst[2 * P + p] = step_dev.get() + base + h * rowb;
        dst[3 * P + p] = step_dev.get() + base + (Hkv + h) * rowb;
      }
    }
  }
  const std::byte* k_new = static_cast<const std::byte*>(b.k_new);
  const std::byte* v_new = static_cast<const std::byte*>(b.v_new);
  if (!cuda_path) {
    for (int32_t p = 0; p < P; ++p) {
      std::memcpy(dst[p], k_new + p * rowb, rowb);
      std::memcpy(dst[P + p], v_new + p * rowb, rowb);
    }
    for (int32_t i = 0; i < B; ++i) {
      if (!stored[i]) continue;
      KvRows one{k_new + static_cast<size_t>(i) * Hkv * rowb,
                 v_new + static_cast<size_t>(i) * Hkv * rowb,
                 dtype,
                 Hkv,
                 D,
                 1,
                 D,
                 D};
      store->append(ss[i]->id, layer, one);
      Event e;
      e.kind = EventKind::kOffload;
      e.op = Op::kAppend;
      e.seq = ss[i]->id;
      e.layer = layer;
      e.dir = Direction::kDeviceToHost;
      e.bytes = static_cast<int64_t>(2 * Hkv * rowb);
      record(e);
    }
  }
#if KVTIER_WITH_CUDA
  else {
    // The appends: a recall layer's prologue kernel does them (decode_recall); other layers'
    // go with their attention's upload below.
    for (int32_t i = 0; i < B; ++i) {
      if (stored[i]) step_rows.push_back(StepRow{ss[i]->id, layer, step_base + i});
    }
    step_rows_per_layer[layer] += B;
  }
#endif
  for (int32_t i = 0; i < B; ++i) {
    LayerState& st = ss[i]->layers[layer];
    if (st.compressed) {
      for (int64_t& r : st.head_rows) ++r;
    } else if (!st.recall || (st.head_rows.empty() && st.res_rows < cfg.sink)) {
      ++st.res_rows;
    } else {
      ++st.recall_end;
    }
    ++st.rows;
  }

  // ---- what attention reads, per problem p = (sequence i, KV head h).
  if (recall) {
    decode_recall(layer, b, ss, dst, stream);
  } else {
    std::vector<kernels::KvChunk> chunks;
    std::vector<int32_t> indptr(P + 1, 0);
    int64_t max_rows = 0;
    for (int32_t i = 0; i < B; ++i) {
      const LayerState& st = ss[i]->layers[layer];
      for (int32_t h = 0; h < Hkv; ++h) {
        const size_t off = static_cast<size_t>(h) * st.res_cap * rowb;
        const int64_t rows = st.compressed ? st.head_rows[h] : st.res_rows;
        chunks.push_back(
            scheduler::detail::make_chunk(st.res_k.get() + off, st.res_v.get() + off, rows));
        indptr[i * Hkv + h + 1] = static_cast<int32_t>(chunks.size());
        max_rows = std::max(max_rows, rows);
        rows_attended += rows;
      }
    }
    const kernels::DecodeAttentionParams ap = attention_params(B);
    if (!cuda_path) {
      kernels::DecodeAttentionTensors t;
      t.q = b.q;
      t.chunks = chunks.data();
      t.chunk_indptr = indptr.data();
      t.out = b.out;
      t.lse = b.lse;
      kernels::decode_attention_cpu(ap, t);
    }
#if KVTIER_WITH_CUDA
    else {
      // One upload: the append targets (resident rows, then step rows when a row of the batch
      // goes to the host tier; a compressed layer keeps none there), the chunks, the indptr.
      const bool to_host = std::any_of(stored.begin(), stored.end(), [](uint8_t x) { return x; });
      const size_t dst_bytes = (to_host ? 4 : 2) * static_cast<size_t>(P) * sizeof(void*);
      const size_t ch_bytes = chunks.size() * sizeof(kernels::KvChunk);
      const size_t total = dst_bytes + ch_bytes + indptr.size() * sizeof(int32_t);
      std::byte* up = staging.acquire(total);
      std::memcpy(up, dst.data(), dst_bytes);
      std::memcpy(up + dst_bytes, chunks.data(), ch_bytes);
      std::memcpy(up + dst_bytes + ch_bytes, indptr.data(), indptr.size() * sizeof(int32_t));
      grow(segments_dev, total);
      cuda::memcpy_async(segments_dev.get(), up, total, stream);
      staging.release(stream);
      void** d = segments_dev.as<void*>();  // src row p % P
      scheduler::launch_append_rows(b.k_new, b.v_new, P, P, static_cast<int32_t>(rowb), d, d + P,
                                    stream);
      if (to_host) {
        scheduler::launch_append_rows(b.k_new, b.v_new, P, P, static_cast<int32_t>(rowb), d + 2 * P,
                                      d + 3 * P, stream);
      }
      kernels::DecodeAttentionTensors t;
      t.q = b.q;
      t.chunks = reinterpret_cast<const kernels::KvChunk*>(segments_dev.get() + dst_bytes);
      t.chunk_indptr = reinterpret_cast<const int32_t*>(segments_dev.get() + dst_bytes + ch_bytes);
      t.out = b.out;
      t.lse = b.lse;
      const size_t ws = kernels::decode_attention_workspace_bytes(ap, max_rows);
      grow(attn_ws, std::max<size_t>(ws, 16));
      if (dense_counters.size() == 0) {  // zero once; every launch leaves them zero
        dense_counters = alloc(static_cast<size_t>(cfg.max_batch) * Hq * 4);
        cuda::memset_async(dense_counters.get(), 0, dense_counters.size(), stream);
      }
      t.merge_counters = dense_counters.as<int32_t>();
      kernels::launch_decode_attention(ap, t, max_rows, attn_ws.get(), ws, stream);
    }
#endif
  }
  for (int32_t i = 0; i < B; ++i) ss[i]->layers[layer].last_decode.record(backend, stream);
  step_layer_done[layer].record(backend, stream);
  ++decode_calls;
}

// A recall layer's decode: score and select on the device, then build the chunk list there
// from the cache directory (hits read cache pages, misses read the host tier's mapped pages
// directly), then attend. The selection is read back without waiting, for the cache policy
// that runs in the background and takes effect at a later end_step.
void Engine::Impl::decode_recall(int32_t layer, const DecodeBatch& b,
                                 const std::vector<Sequence*>& ss, const std::vector<void*>& dst,
                                 cudaStream_t stream) {
  (void)stream;
  const int32_t B = b.num_seqs, P = B * Hkv, ri = recall_index[layer];
  const bool cuda_path = backend == Backend::kCuda;
  std::vector<scheduler::RecallProblem> probs(P);
  std::vector<int32_t> crow(P), ncl(P), budgets(P, cfg.budget);
  int64_t max_rows = 0;
  LayerRecord& rec = records[steps % 2][ri];
  const int32_t base = rec.problems;
  KVTIER_CHECK(base + P <= max_problems, "decode_layer: more than max_batch = ", cfg.max_batch,
               " sequences decoded in layer ", layer, " within one step");
  for (int32_t i = 0; i < B; ++i) {
    const LayerState& st = ss[i]->layers[layer];
    for (int32_t h = 0; h < Hkv; ++h) {
      const int32_t p = i * Hkv + h;
      scheduler::RecallProblem& pr = probs[p];
      pr.res_k = st.res_k.get() + static_cast<size_t>(h) * st.res_cap * rowb;
      pr.res_v = st.res_v.get() + static_cast<size_t>(h) * st.res_cap * rowb;
      pr.win_k = st.win_k.get() + static_cast<size_t>(h) * st.win_cap * rowb;
      pr.win_v = st.win_v.get() + static_cast<size_t>(h) * st.win_cap * rowb;
      pr.host_pages =
          st.host_pages.as<const std::byte*>() + static_cast<size_t>(h) * st.host_pages_cap * 2;
      pr.res_rows = st.head_rows.empty() ? st.res_rows : st.head_rows[h];
      pr.win_begin = st.clustered;
      pr.win_rows = st.recall_end - st.clustered;
      if (cfg.total_budget) {  // recall gets what the resident rows and the window leave
        budgets[p] =
            static_cast<int32_t>(std::max<int64_t>(0, cfg.budget - pr.res_rows - pr.win_rows));
      }
      pr.win_cap = st.win_cap;
      pr.table_row = static_cast<int32_t>(st.table_row + h);
      crow[p] = pr.table_row;
      ncl[p] = st.num_clusters;
      max_rows = std::max(max_rows, pr.res_rows + cfg.budget + pr.win_rows);
      rec.seq.push_back(ss[i]->id);
      rec.row.push_back(pr.table_row);
    }
  }
  rec.problems += P;
  const kernels::ClusterSelectParams sp = select_params(P);
  const int64_t per_problem = chunks_per_problem();
  const size_t slots = static_cast<size_t>(P) * cap_c;
  const kernels::DecodeAttentionParams ap = attention_params(B);
  scheduler::ChunkBuildParams bp;
  bp.num_problems = P;
  bp.sel_stride = cap_c;
  bp.dir_stride = cap_c;
  bp.page_size = cfg.page_size;
  bp.rows_per_page = static_cast<int32_t>(store->rows_per_page());
  bp.row_bytes = static_cast<int32_t>(rowb);
  bp.dir = dir_table.as<int32_t>();
  bp.page_next = page_next.as<int32_t>() + page_next_off[ri];
  bp.num_pages = static_cast<int32_t>(
      std::min<int64_t>(caches[ri]->num_pages(), std::numeric_limits<int32_t>::max()));
  bp.cluster_slot = slot_table.as<int32_t>();
  bp.k_pool = caches[ri]->k_pool();
  bp.v_pool = caches[ri]->v_pool();
  if (!cuda_path) {
    std::vector<float> q32h(static_cast<size_t>(P) * G * D);
    const std::byte* q = static_cast<const std::byte*>(b.q);
    for (size_t e = 0; e < q32h.size(); ++e) q32h[e] = load_as_float(q, dtype, e);
    std::vector<int32_t> sizes(slots), ids(slots), rows(slots), nsel(P), tot(P), counts(P),
        stats(4 * static_cast<size_t>(P)), indptr(P + 1);
    std::vector<float> sc(slots);
    for (int32_t p = 0; p < P; ++p) {
      std::memcpy(&sizes[static_cast<size_t>(p) * cap_c], sizes_row(crow[p]), cap_c * 4);
    }
    kernels::ClusterSelectTensors t;
    t.queries = q32h.data();
    t.centroids = centroid_table.as<float>();
    t.centroid_rows = crow.data();
    t.num_clusters = ncl.data();
    t.cluster_sizes = sizes.data();
    t.budgets = budgets.data();
    t.scores = sc.data();
    t.selected_ids = ids.data();
    t.selected_rows = rows.data();
    t.num_selected = nsel.data();
    t.total_rows = tot.data();
    kernels::score_and_select_clusters_cpu(sp, t);
    std::vector<kernels::KvChunk> chunks(static_cast<size_t>(P) * per_problem);
    bp.problems = probs.data();
    bp.num_sel = nsel.data();
    bp.sel_ids = ids.data();
    bp.sel_rows = rows.data();
    bp.counts = counts.data();
    bp.stats = stats.data();
    bp.chunks = chunks.data();
    bp.indptr = indptr.data();
    scheduler::build_recall_chunks_host(bp);
    for (int32_t p = 0; p < P; ++p) {
      int32_t* rr = rec.rows + static_cast<size_t>(base + p) * rec_cols;
      rr[0] = nsel[p];
      std::copy_n(&stats[4 * static_cast<size_t>(p)], 4, rr + 1);
      std::copy_n(&ids[static_cast<size_t>(p) * cap_c], std::min(nsel[p], rec_cols - 5), rr + 5);
    }
    kernels::DecodeAttentionTensors at;
    at.q = b.q;
    at.chunks = chunks.data();
    at.chunk_indptr = indptr.data();
    at.out = b.out;
    at.lse = b.lse;
    kernels::decode_attention_cpu(ap, at);
    (void)dst;  // the CPU backend appended in decode()
    return;
  }
#if KVTIER_WITH_CUDA
  KVTIER_ASSERT(max_rows <= recall_max_rows());
  ensure_recall_scratch(stream);
  // The call block: [call | problems | centroid rows | cluster counts | budgets | row targets],
  // passed to the prologue kernel by value (uploaded instead when too large).
  RecallLaunch r;
  r.layer = layer;
  r.P = P;
  r.sp = sp;
  r.bp = bp;
  r.ap = ap;
  const size_t off_prob = align16(sizeof(scheduler::RecallCall));
  const size_t off_crow = off_prob + align16(P * sizeof(scheduler::RecallProblem));
  const size_t off_ncl = off_crow + align16(P * 4), off_bud = off_ncl + align16(P * 4);
  const size_t off_dst = off_bud + align16(P * 4);
  const size_t call_bytes = align16(off_dst + dst.size() * sizeof(void*));
  KVTIER_ASSERT(call_bytes <= call_params.size());
  call_blob.assign(call_bytes / 16, {});
  std::byte* up = reinterpret_cast<std::byte*>(call_blob.data());
  scheduler::RecallCall call;
  call.q = b.q;
  call.k_new = b.k_new;
  call.v_new = b.v_new;
  call.out = b.out;
  call.lse = b.lse;
  call.record_base = base;
  std::memcpy(up, &call, sizeof call);
  std::memcpy(up + off_prob, probs.data(), P * sizeof(scheduler::RecallProblem));
  std::memcpy(up + off_crow, crow.data(), P * 4);
  std::memcpy(up + off_ncl, ncl.data(), P * 4);
  std::memcpy(up + off_bud, budgets.data(), P * 4);
  std::memcpy(up + off_dst, dst.data(), dst.size() * sizeof(void*));
  r.call_bytes = static_cast<int32_t>(call_bytes);
  r.off_rows = static_cast<int32_t>(off_crow);
  r.off_dst = static_cast<int32_t>(off_dst);
  r.blob = up;
  if (call_bytes > scheduler::kRecallBlobMax) {
    std::byte* st = staging.acquire(call_bytes);
    std::memcpy(st, up, call_bytes);
    cuda::memcpy_async(call_params.get(), st, call_bytes, stream);
    staging.release(stream);
    r.blob = nullptr;
  }
  r.call = call_params.as<scheduler::RecallCall>();
  r.problems = reinterpret_cast<const scheduler::RecallProblem*>(call_params.get() + off_prob);
  r.crow = reinterpret_cast<const int32_t*>(call_params.get() + off_crow);
  r.ncl = reinterpret_cast<const int32_t*>(call_params.get() + off_ncl);
  r.budgets = reinterpret_cast<const int32_t*>(call_params.get() + off_bud);
  bool launched = false;
#if !KVTIER_SYNC_CHECKS
  if (cfg.cuda_graphs && graphs_ok && r.blob != nullptr) {
    RecallGraph& g = recall_graphs[{layer, P}];
    if (!g.exec && g.uses++ > 0) {
      // Captured at its second use: the first, launched directly, has set up every kernel's
      // lazily initialized state (attributes, occupancy) outside capture.
      cudaStream_t cs = capture->get();
      KVTIER_CUDA_CHECK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
      bool captured = true;
      try {
        g.select_attend = launch_recall_kernels(r, cs);
      } catch (...) {
        // A launch this runtime cannot capture (or any error): no graphs from now on; the
        // launches below, one by one, throw again if the error is not the capture's.
        cudaGraph_t partial = nullptr;
        cudaStreamEndCapture(cs, &partial);
        if (partial) cudaGraphDestroy(partial);
        (void)cudaGetLastError();
        captured = false;
        graphs_ok = false;
      }
      if (captured && cudaStreamEndCapture(cs, &g.graph) == cudaSuccess && g.graph != nullptr) {
        size_t n = 0;
        KVTIER_CUDA_CHECK(cudaGraphGetNodes(g.graph, nullptr, &n));
        std::vector<cudaGraphNode_t> nodes(n);
        KVTIER_CUDA_CHECK(cudaGraphGetNodes(g.graph, nodes.data(), &n));
        for (cudaGraphNode_t node : nodes)
          if (scheduler::is_recall_prologue_node(node)) g.prologue = node;
      } else {
        (void)cudaGetLastError();  // nothing was launched: fall back to launching one by one
      }
      if (g.graph == nullptr || g.prologue == nullptr ||
          cudaGraphInstantiate(&g.exec, g.graph, 0) != cudaSuccess) {
        (void)cudaGetLastError();
        g.exec = nullptr;
        graphs_ok = false;  // launch one by one from now on
      }
    } else if (g.exec) {
      scheduler::update_recall_prologue_node(g.exec, g.prologue, prologue_params(r), r.blob);
    }
    if (g.exec) {
      KVTIER_CUDA_CHECK(cudaGraphLaunch(g.exec, stream));
      launched = true;
      ++graph_launches;
      select_attend_layers += g.select_attend ? 1 : 0;
    }
  }
#endif
  if (!launched) select_attend_layers += launch_recall_kernels(r, stream) ? 1 : 0;
#endif
}

#if KVTIER_WITH_CUDA
// Allocated once for max_batch sequences: graphs captured from these launches hold the
// addresses, so nothing here is ever reallocated.
void Engine::Impl::ensure_recall_scratch(cudaStream_t stream) {
  if (call_params.size() > 0) return;
  const size_t mp = static_cast<size_t>(max_problems);
  call_params = alloc(align16(sizeof(scheduler::RecallCall)) +
                      align16(mp * sizeof(scheduler::RecallProblem)) + 3 * align16(mp * 4) +
                      align16(4 * mp * sizeof(void*)));
  const size_t qn = mp * G * D;
  q_own = alloc(qn * dtype_size(dtype));
  // Split-merge counters: zero once, and every attention launch leaves them zero.
  merge_counters = alloc(std::max<size_t>(qn / D * 4, 16));
  cuda::memset_async(merge_counters.get(), 0, merge_counters.size(), stream);
  q32 = alloc(qn * 4);
  const size_t slots = mp * cap_c;
  if (cap_c > kernels::kMaxBlockSortClusters) scores = alloc(slots * 4);  // the fallback's
  sel_ids = alloc(slots * 4);
  sel_rows = alloc(slots * 4);
  num_sel = alloc(mp * 4);
  total_rows = alloc(mp * 4);
  size_t sws = 16, aws = 16;
  for (int32_t B = 1; B <= cfg.max_batch; ++B) {
    const kernels::ClusterSelectParams sp = select_params(B * Hkv);
    sws = std::max({sws, kernels::score_clusters_split_workspace_bytes(sp),
                    kernels::select_clusters_workspace_bytes(sp),
                    kernels::score_select_split_workspace_bytes(sp)});
    const kernels::DecodeAttentionParams ap = attention_params(B);
    aws = std::max(aws, kernels::decode_attention_workspace_bytes(ap, recall_max_rows()));
  }
  select_ws = alloc(sws);
  rattn_ws = alloc(aws);
  chunk_buf = alloc(mp * chunks_per_problem() * sizeof(kernels::KvChunk));
  build_misc = alloc((6 * mp + 1) * 4);
  capture = std::make_unique<cuda::Stream>(device);
}

// Everything a recall layer's decode runs on the device, in order; reads only device memory
// (the call's upload and the engine's tables), so it can be captured once and replayed.
bool Engine::Impl::launch_recall_kernels(const RecallLaunch& r, cudaStream_t stream) {
  const int32_t P = r.P;
  scheduler::launch_recall_prologue(prologue_params(r), r.blob, stream);
  kernels::ClusterSelectTensors t;
  t.queries = q32.as<float>();
  t.centroids = centroid_table.as<float>();
  t.centroids_f16 = centroid_f16.as<uint16_t>();
  t.centroid_rows = r.crow;
  t.num_clusters = r.ncl;
  t.cluster_sizes = size_table.as<int32_t>();  // the layer's table, read in place
  t.cluster_size_rows = r.crow;
  t.budgets = r.budgets;
  t.selected_ids = sel_ids.as<int32_t>();
  t.selected_rows = sel_rows.as<int32_t>();
  t.num_selected = num_sel.as<int32_t>();
  t.total_rows = total_rows.as<int32_t>();
  // Chunks on the device, each problem's list in its own region; the step record for the cache
  // policy.
  scheduler::ChunkBuildParams bp = r.bp;
  bp.problems = r.problems;
  bp.num_sel = num_sel.as<int32_t>();
  bp.sel_ids = sel_ids.as<int32_t>();
  bp.sel_rows = sel_rows.as<int32_t>();
  bp.chunk_end = build_misc.as<int32_t>();
  bp.stats = build_misc.as<int32_t>() + P;
  bp.indptr = build_misc.as<int32_t>() + 5 * P;
  bp.chunks = chunk_buf.as<kernels::KvChunk>();
  bp.chunk_stride = static_cast<int32_t>(chunks_per_problem());
  bp.record =
      rec_dev.as<int32_t>() + static_cast<size_t>(recall_index[r.layer]) * max_problems * rec_cols;
  bp.record_base = &r.call->record_base;
  bp.record_cols = rec_cols;
  kernels::DecodeAttentionTensors at;
  at.q = q_own.get();
  at.chunks = bp.chunks;
  at.chunk_indptr = bp.indptr;
  at.chunk_end = bp.chunk_end;
  at.out_at = &r.call->out;  // the caller's buffers of this call, read from the call block
  at.lse_at = &r.call->lse;
  at.merge_counters = merge_counters.as<int32_t>();
  if (cap_c <= kernels::kMaxBlockSortClusters) {
    // On sm_90 one kernel of thread block clusters scores, selects, builds the chunks and
    // attends; otherwise scoring is split over many blocks per problem (a batch of one sequence
    // has only Hkv problems), and the scores are aggregated, the clusters selected and the chunks
    // built by one block per problem before attention.
    if (scheduler::launch_recall_select_attend(r.sp, t, select_ws.get(), select_ws.size(), bp, r.ap,
                                               at, stream)) {
      return true;
    }
    scheduler::launch_recall_select_build(r.sp, t, select_ws.get(), select_ws.size(), bp, stream);
  } else {  // more clusters than one block selects: scores, a segmented sort, then the chunks
    t.scores = scores.as<float>();
    kernels::launch_score_clusters_split(r.sp, t, select_ws.get(), select_ws.size(), stream);
    kernels::launch_select_clusters(r.sp, t, select_ws.get(), select_ws.size(), stream);
    scheduler::launch_build_recall_chunks(bp, stream);
  }
  kernels::launch_decode_attention(r.ap, at, recall_max_rows(), rattn_ws.get(), rattn_ws.size(),
                                   stream);
  return false;
}

scheduler::RecallPrologueParams Engine::Impl::prologue_params(const RecallLaunch& r) const {
  scheduler::RecallPrologueParams pp;
  pp.num_problems = r.P;
  pp.q_per_problem = G * D;
  pp.row_bytes = static_cast<int32_t>(rowb);
  pp.dtype = dtype;
  pp.call_bytes = r.call_bytes;
  pp.off_rows = r.off_rows;
  pp.off_dst = r.off_dst;
  pp.call_block = call_params.get();
  pp.q_copy = q_own.get();
  pp.q32 = q32.as<float>();
  return pp;
}
#endif

// ---- the host-tier directory and the cache policy ----

int64_t Engine::Impl::table_row_of(SeqId seq, int32_t layer, int32_t h) const {
  const auto it = seqs.find(seq);
  if (it == seqs.end()) return -1;
  return it->second->layers[layer].table_row + h;
}

// After `layer`'s clusters from first_cluster on joined the store: their first slots (the index
// is cluster-contiguous in id order, so a cluster starts at the sum of the sizes before it) and
// the host pages' addresses, uploaded for the chunk builder. Runs in the caller's thread; on
// kCuda the upload is ordered on `stream` and waited for.
void Engine::Impl::refresh_host_directory(Sequence& s, int32_t layer, int32_t first_cluster,
                                          int64_t first_row, cudaStream_t stream, bool sync) {
  (void)stream;
  (void)sync;
  LayerState& st = s.layers[layer];
  const int64_t rpp = store->rows_per_page();
  const int64_t max_pages = (cfg.max_context + rpp - 1) / rpp + 1;
  if (st.host_pages_cap < max_pages) {
    st.host_pages = alloc(static_cast<size_t>(Hkv) * max_pages * 2 * sizeof(void*));
    st.host_pages_cap = max_pages;
    first_row = 0;
  }
  const bool dev = backend == Backend::kCuda;
  // Host pages of rows [first_row, clustered): clusters fill slots in order, so those are the
  // only entries that changed.
  const int64_t n = st.clustered;
  const int64_t pg0 = first_row / rpp, npg = n > first_row ? (n - 1) / rpp - pg0 + 1 : 0;
  std::vector<const std::byte*> pages(static_cast<size_t>(Hkv) * npg * 2, nullptr);
  for (int32_t h = 0; h < Hkv && npg > 0; ++h) {
    store->for_each_run(s.id, layer, h, first_row, n - first_row, [&](const memory::RowRun& r) {
      const int64_t pg = r.slot / rpp, off = r.slot % rpp;
      const std::byte* k = dev ? r.k_device : r.k;
      const std::byte* v = dev ? r.v_device : r.v;
      KVTIER_CHECK(k && v, "host tier rows are not mapped for device access (pinning failed)");
      pages[(static_cast<size_t>(h) * npg + pg - pg0) * 2] = k - off * rowb;
      pages[(static_cast<size_t>(h) * npg + pg - pg0) * 2 + 1] = v - off * rowb;
    });
  }
  const int32_t nc = st.num_clusters - first_cluster;
  std::vector<int32_t> slots(static_cast<size_t>(Hkv) * std::max(nc, 0));
  for (int32_t h = 0; h < Hkv; ++h) {
    int64_t slot = 0;
    for (int32_t c = 0; c < st.num_clusters; ++c) {
      if (c >= first_cluster)
        slots[static_cast<size_t>(h) * nc + c - first_cluster] = static_cast<int32_t>(slot);
      slot += st.sizes[h][c];
    }
    KVTIER_DASSERT(slot == st.clustered);
  }
  const size_t run_bytes = static_cast<size_t>(npg) * 2 * sizeof(void*);
  const size_t pitch = static_cast<size_t>(max_pages) * 2 * sizeof(void*);
  std::byte* table = st.host_pages.get() + static_cast<size_t>(pg0) * 2 * sizeof(void*);
  if (!dev) {
    for (int32_t h = 0; h < Hkv && npg > 0; ++h) {
      std::memcpy(table + h * pitch, pages.data() + static_cast<size_t>(h) * npg * 2, run_bytes);
    }
    for (int32_t h = 0; h < Hkv && nc > 0; ++h) {
      std::memcpy(slot_table.as<int32_t>() + (st.table_row + h) * cap_c + first_cluster,
                  slots.data() + static_cast<size_t>(h) * nc, nc * sizeof(int32_t));
    }
    return;
  }
#if KVTIER_WITH_CUDA
  // A per-layer pinned upload buffer, reused once its last upload has completed (a window's
  // refresh comes W steps after the previous one, so that wait is normally free).
  const size_t pbytes = pages.size() * sizeof(void*), need = pbytes + slots.size() * 4 + 16;
  if (st.dir_up.size_bytes() < need) {
    st.dir_up_done.synchronize();
    st.dir_up = memory::PinnedBuffer::allocate(std::max(need, st.dir_up.size_bytes() * 2));
  } else {
    st.dir_up_done.synchronize();
  }
  std::byte* up = st.dir_up.data();
  std::memcpy(up, pages.data(), pbytes);
  if (!slots.empty()) std::memcpy(up + pbytes, slots.data(), slots.size() * 4);
  if (npg > 0) {
    KVTIER_CUDA_CHECK(cudaMemcpy2DAsync(table, pitch, up, run_bytes, run_bytes, Hkv,
                                        cudaMemcpyHostToDevice, stream));
  }
  if (nc > 0) {
    KVTIER_CUDA_CHECK(cudaMemcpy2DAsync(
        slot_table.as<int32_t>() + st.table_row * cap_c + first_cluster, cap_c * 4, up + pbytes,
        nc * 4, nc * 4, Hkv, cudaMemcpyHostToDevice, stream));
  }
  st.dir_up_done.record(backend, stream);
  if (sync) st.dir_up_done.synchronize();
#endif
}

// Decides, in the background, what the selections of the step that just ended mean for each
// recall layer's cache: lookups (hits pinned and aged by the retention rule, pages allocated for
// misses, evictions), the fills for the misses, and the directory updates. apply_policy enqueues
// the result at the next end_step, so the device directory changes only between steps.
void Engine::Impl::launch_policy_job(cudaStream_t stream) {
  (void)stream;
  const int parity = static_cast<int>(steps % 2);  // records of the step that just ended
  // Live sequences now (Sequence objects are stable; removal waits for this job).
  std::unordered_map<SeqId, Sequence*> live;
  for (const auto& [id, sq] : seqs) live[id] = sq.get();
  auto job = std::make_shared<Job>();
  const int64_t step = steps + 1;                       // cache steps start at 1
  const int32_t decided = static_cast<int32_t>(steps);  // the step whose selections these are
  auto work = [this, parity, live, job, step, decided]() {
    try {
      tbb::parallel_for(0, num_recall_layers, [&](int32_t ri) {
        LayerRecord& rec = records[parity][ri];
        LayerPolicy& pol = policy[ri];
        pol = LayerPolicy();
        memory::ClusterCache& cache = *caches[ri];
        cache.begin_step(step);
        int32_t layer = 0;
        for (int32_t l = 0; l < L; ++l)
          if (recall_index[l] == ri) layer = l;
        // On every way out: this layer's work as a span, and its cache's occupancy after it.
        struct Done {
          Impl* m;
          memory::ClusterCache* cache;
          int32_t layer, step;
          uint64_t t0_ns = m->telemetry.now_ns();
          ~Done() {
            Event sp = span_event(Op::kPolicy, Track::kHost, Direction::kNone, 0, -1, layer);
            sp.step = step;
            m->record_host_span(sp, t0_ns);
            const memory::CacheStats cs = cache->stats();
            Event oc;
            oc.kind = EventKind::kOccupancy;
            oc.layer = layer;
            oc.step = step;
            oc.bytes = static_cast<int64_t>(cs.pages_used) * cache->page_bytes() * 2;
            oc.total = static_cast<int64_t>(cs.num_pages) * cache->page_bytes() * 2;
            m->record(oc);
          }
        } done{this, &cache, layer, decided};
        std::vector<memory::CacheRequest> req;
        std::vector<int32_t> req_row;
        int64_t hits = 0, misses = 0, read = 0;
        for (int32_t p = 0; p < rec.problems; ++p) {
          const int32_t h = (rec.row[p]) % Hkv;
          const int32_t* rr = rec.rows + static_cast<size_t>(p) * rec_cols;
          const int32_t num = rr[0], *stats = rr + 1, *ids = rr + 5;
          StepSelection& sel = last_selected[ri][rec.seq[p]];
          if (sel.step != decided) {
            sel.step = decided;
            sel.heads.resize(Hkv);
            for (auto& ids_of_head : sel.heads) ids_of_head.clear();
          }
          sel.heads[h].assign(ids, ids + std::min(num, rec_cols - 5));
          Event e;
          e.kind = EventKind::kCacheLookup;
          e.step = decided;
          e.seq = rec.seq[p];
          e.layer = layer;
          e.kv_head = h;
          e.hits = stats[0];
          e.misses = stats[1];
          e.bytes = static_cast<int64_t>(2 * rowb) * stats[2];  // read from host memory
          if (e.bytes > 0) e.dir = Direction::kHostToDevice;
          record(e);
          hits += stats[0];
          misses += stats[1];
          read += e.bytes;
          rows_attended += stats[3];
          const auto lv = live.find(rec.seq[p]);
          if (lv == live.end()) continue;  // removed before its policy ran
          const LayerState& st = lv->second->layers[layer];
          for (int32_t j = 0; j < num; ++j) {
            const int32_t id = ids[j];
            memory::CacheRequest r;
            r.key = memory::ClusterKey{rec.seq[p], layer, h, id};
            r.num_rows = st.sizes[h][id];
            req.push_back(r);
            req_row.push_back(rec.row[p]);
          }
        }
        {
          std::lock_guard<std::mutex> lock(stats_mu);
          recall_hits += hits;
          recall_misses += misses;
          host_read_bytes += read;
        }
        rec.problems = 0;
        rec.seq.clear();
        rec.row.clear();
        int64_t repeated = 0;
        std::unordered_set<memory::ClusterKey, memory::ClusterKeyHash> now;
        now.reserve(req.size());
        for (const memory::CacheRequest& r : req) {
          repeated += prev_selected[ri].count(r.key);
          now.insert(r.key);
        }
        prev_selected[ri].swap(now);
        const bool fill = 2 * repeated >= static_cast<int64_t>(req.size());
        if (req.empty()) return;
        memory::CacheLookup lk;
        try {
          lk = cache.lookup(req);
        } catch (const CapacityError&) {
          return;  // this step's selection does not fit: nothing is cached for this layer
        }
        note_evictions(pol, ri, layer, decided, lk.evicted, [&](SeqId seq) -> int64_t {
          const auto it = live.find(seq);
          return it == live.end() ? -1 : it->second->slot;
        });
        if (lk.misses.empty()) return;
        if (!fill) {
          std::vector<memory::ClusterKey> drop;
          for (const int32_t m : lk.misses) drop.push_back(req[m].key);
          cache.erase(drop.data(), drop.size());
          return;
        }
        for (const int32_t m : lk.misses) {
          pol.place(static_cast<int64_t>(req_row[m]) * cap_c + req[m].key.cluster,
                    lk.page_ids.data() + lk.page_indptr[m],
                    lk.page_indptr[m + 1] - lk.page_indptr[m]);
        }
        memory::plan_fetch(
            *store, req.data(), lk, cfg.page_size,
            backend == Backend::kCuda ? memory::HostAddress::kDevice : memory::HostAddress::kHost,
            &pol.segments);
        const int64_t bytes = memory::plan_bytes(pol.segments, rowb);
        {
          std::lock_guard<std::mutex> lock(stats_mu);
          fill_bytes += bytes;
        }
        Event e;
        e.kind = EventKind::kFetch;
        e.op = Op::kFill;
        e.step = decided;
        e.layer = layer;
        e.dir = Direction::kHostToDevice;
        e.bytes = bytes;
        record(e);
      });
    } catch (...) {
      job->promise.set_exception(std::current_exception());  // the promise is set once
    }
  };
  policy_job = job;
  if (backend == Backend::kCpu) {
    work();
    if (!job->ready()) job->promise.set_value();
    return;
  }
#if KVTIER_WITH_CUDA
  // The selections were downloaded on `stream` (made to wait for every layer's decode).
  auto ev = std::make_shared<cuda::Event>();
  ev->record(stream);
  jobs.run([this, ev, job, work = std::move(work)]() {
    try {
      cuda::DeviceGuard guard(device);
      poll_event(ev.get());
    } catch (...) {
      job->promise.set_exception(std::current_exception());
      return;
    }
    work();
    if (job->ready()) return;  // work failed and said so
    try {
      cuda::DeviceGuard guard(device);  // packing may allocate pinned memory
      pack_policy(policy_pack);
      job->promise.set_value();
    } catch (...) {
      job->promise.set_exception(std::current_exception());
    }
  });
#endif
}

// Enqueues the decisions of the last policy job on `stream`: evicted clusters leave the
// directory first, then the misses are gathered into their pages, then the pages are chained
// and the clusters enter the directory. Stream order keeps every decode before this point on
// the old directory and every decode after it on the new one.
#if KVTIER_WITH_CUDA
// The policy job's last part (background): every layer's decisions packed for one upload,
// [fills | invalidations | -1s | next idx | next val | set idx | set val]; fills are row copies
// host -> cache page.
void Engine::Impl::pack_policy(PolicyPack& pk) {
  std::vector<kernels::KvChunk> fills;
  int64_t fill_bytes = 0;
  std::vector<int32_t> inval, next_idx, next_val, set_idx, set_val;
  for (int32_t ri = 0; ri < num_recall_layers; ++ri) {
    LayerPolicy& pol = policy[ri];
    for (const memory::GatherSegment& g : pol.segments) {
      kernels::KvChunk c;
      c.k = g.src_k;
      c.v = g.src_v;
      c.k_copy = caches[ri]->k_page(g.dst_page) + static_cast<size_t>(g.dst_row) * rowb;
      c.v_copy = caches[ri]->v_page(g.dst_page) + static_cast<size_t>(g.dst_row) * rowb;
      c.num_rows = g.num_rows;
      fills.push_back(c);
      fill_bytes += static_cast<int64_t>(2 * rowb) * g.num_rows;
    }
    inval.insert(inval.end(), pol.inval_idx.begin(), pol.inval_idx.end());
    for (size_t i = 0; i < pol.next_idx.size(); ++i) {
      next_idx.push_back(static_cast<int32_t>(page_next_off[ri] + pol.next_idx[i]));
      next_val.push_back(pol.next_val[i]);
    }
    set_idx.insert(set_idx.end(), pol.set_idx.begin(), pol.set_idx.end());
    set_val.insert(set_val.end(), pol.set_val.begin(), pol.set_val.end());
  }
  pk.valid = true;
  pk.total = 0;
  if (fills.empty() && inval.empty() && set_idx.empty()) return;
  pk.fills = static_cast<int32_t>(fills.size());
  pk.fill_bytes = fill_bytes;
  pk.ni = static_cast<int32_t>(inval.size());
  pk.nn = static_cast<int32_t>(next_idx.size());
  pk.ns = static_cast<int32_t>(set_idx.size());
  const size_t fb = fills.size() * sizeof(kernels::KvChunk);
  const size_t total = fb + (2 * static_cast<size_t>(pk.ni) + 2 * pk.nn + 2 * pk.ns) * 4;
  pk.uploaded.wait_polling();  // the previous pack's upload has read the buffer
  if (pk.buf.size_bytes() < total) pk.buf = memory::PinnedBuffer::allocate(total * 2);
  std::byte* w = pk.buf.data();
  auto put = [&](const void* src, size_t bytes) {
    if (bytes) std::memcpy(w, src, bytes);
    w += bytes;
  };
  const std::vector<int32_t> minus(pk.ni, -1);
  put(fills.data(), fb);
  put(inval.data(), pk.ni * 4);
  put(minus.data(), pk.ni * 4);
  put(next_idx.data(), pk.nn * 4);
  put(next_val.data(), pk.nn * 4);
  put(set_idx.data(), pk.ns * 4);
  put(set_val.data(), pk.ns * 4);
  pk.total = total;
}
#endif

void Engine::Impl::apply_policy(cudaStream_t stream) {
  if (!policy_job) return;
  wait_job(policy_job, -1, -1);
  policy_job.reset();
  apply_decisions(policy_pack, policy_dev, Op::kFill, Direction::kHostToDevice, stream);
}

void Engine::Impl::apply_decisions(PolicyPack& pk, Buffer& dev, Op op, Direction dir,
                                   cudaStream_t stream) {
  (void)stream;
  (void)pk;
  (void)dev;
  if (backend == Backend::kCpu) {
    int32_t* dir_rows = dir_table.as<int32_t>();
    const uint64_t t0_ns = telemetry.now_ns();
    int64_t copied = 0;
    for (int32_t ri = 0; ri < num_recall_layers; ++ri) {
      LayerPolicy& pol = policy[ri];
      int32_t* next = page_next.as<int32_t>() + page_next_off[ri];
      for (const int32_t i : pol.inval_idx) dir_rows[i] = -1;
      if (!pol.segments.empty()) {
        kernels::GatherParams gp;
        gp.segments = pol.segments.data();
        gp.num_segments = static_cast<int32_t>(pol.segments.size());
        gp.row_bytes = static_cast<int32_t>(rowb);
        gp.page_size = cfg.page_size;
        gp.k_pool = caches[ri]->k_pool();
        gp.v_pool = caches[ri]->v_pool();
        kernels::gather_ref(gp);
        copied += memory::plan_bytes(pol.segments, rowb);
      }
      for (size_t i = 0; i < pol.next_idx.size(); ++i) next[pol.next_idx[i]] = pol.next_val[i];
      for (size_t i = 0; i < pol.set_idx.size(); ++i) dir_rows[pol.set_idx[i]] = pol.set_val[i];
      pol = LayerPolicy();
    }
    if (spans && copied > 0) {  // the CPU backend's copies are the caller's work
      Event e;
      e.op = op;
      e.track = Track::kCompute;
      e.dir = dir;
      e.bytes = copied;
      record_host_span(e, t0_ns);
    }
    return;
  }
#if KVTIER_WITH_CUDA
  // Packed by the job (pack_policy; again here when a removed sequence's entries were purged
  // since, or for admissions); one upload and four launches.
  if (!pk.valid) pack_policy(pk);
  pk.valid = false;
  for (LayerPolicy& pol : policy) pol = LayerPolicy();
  if (pk.total == 0) return;
  const size_t fb = pk.fills * sizeof(kernels::KvChunk);
  const int32_t ni = pk.ni, nn = pk.nn, ns = pk.ns;
  grow(dev, pk.total);
  cuda::memcpy_async(dev.get(), pk.buf.data(), pk.total, stream);
  pk.uploaded.record(backend, stream);
  pk.total = 0;
  const int32_t* d = reinterpret_cast<const int32_t*>(dev.get() + fb);
  int32_t* dir_rows = dir_table.as<int32_t>();
  scheduler::launch_scatter_i32(dir_rows, d, d + ni, ni, stream);
  if (pk.fills > 0) {
    timed(stream, span_event(op, Track::kCompute, dir, pk.fill_bytes), [&] {
      scheduler::launch_copy_rows(dev.as<kernels::KvChunk>(), pk.fills, static_cast<int32_t>(rowb),
                                  stream);
    });
  }
  scheduler::launch_scatter_i32(page_next.as<int32_t>(), d + 2 * ni, d + 2 * ni + nn, nn, stream);
  scheduler::launch_scatter_i32(dir_rows, d + 2 * ni + 2 * nn, d + 2 * ni + 2 * nn + ns, ns,
                                stream);
#endif
}

// ---- window clustering ----

void Engine::Impl::start_window_job(Sequence& s, int32_t layer) {
  LayerState& st = s.layers[layer];
  const int64_t W = cfg.window;
  const int32_t cp = cfg.window_clusters;
  KVTIER_CHECK_CODE(kCapacity, st.num_clusters + cp <= cap_c, "sequence ", s.id, " layer ", layer,
                    ": the centroid table (", cap_c, " per head) is full; raise max_context");
  std::unique_ptr<WindowJob> job =
      st.spare_window ? std::move(st.spare_window) : std::make_unique<WindowJob>();
  job->labels.clear();
  job->begin = st.clustered;
  job->first_cluster = st.num_clusters;
  const kernels::KmeansParams kp =
      kmeans_params(W, cp, static_cast<uint64_t>(s.id) * 1000003ull + layer * 7919ull + job->begin);
  float* cent = centroids_row(st.table_row) + static_cast<size_t>(job->first_cluster) * D;
  int32_t* sizes = sizes_row(st.table_row) + job->first_cluster;
  const size_t bytes = static_cast<size_t>(Hkv) * W * rowb;
  if (backend == Backend::kCpu) {
    std::vector<std::byte> points(bytes);
    for_ring_runs(job->begin, W, st.win_cap, [&](int64_t slot, int64_t run, int64_t i) {
      copy_2d(backend, points.data() + i * rowb, W * rowb, st.win_k.get() + slot * rowb,
              st.win_cap * rowb, run * rowb, Hkv, nullptr);
    });
    job->labels.resize(static_cast<size_t>(Hkv) * W);
    kernels::kmeans_cpu(kp, points.data(), cent, job->labels.data(), sizes);
    seal_centroids(st.table_row, job->first_cluster, cp, nullptr);
    job->host = std::make_shared<Job>();
    run_window_host(s, layer, *job);
    st.window = std::move(job);
    finish_window_job(s, layer, /*wait=*/true, nullptr, /*admit=*/true);  // from end_step
    return;
  }
#if KVTIER_WITH_CUDA
  const cudaStream_t side_s = side_stream();
  if (job->points.size() < bytes) job->points = alloc(bytes);
  if (job->labels_dev.size() < static_cast<size_t>(Hkv) * W * 4) {
    job->labels_dev = alloc(static_cast<size_t>(Hkv) * W * 4);
  }
  if (job->workspace.size() < kernels::kmeans_workspace_bytes(kp)) {
    job->workspace = alloc(kernels::kmeans_workspace_bytes(kp));
  }
  if (job->labels_host.size_bytes() < static_cast<size_t>(Hkv) * W * 4) {
    job->labels_host = memory::PinnedBuffer::allocate(static_cast<size_t>(Hkv) * W * 4);
  }
  // The window's rows stay in the ring until this job has finished (decode waits for it before
  // the ring wraps onto them), so its launches (a k-means is many) go out from the background
  // thread, off the decode thread's critical path.
  stream_wait(backend, side_s, st.last_decode);  // the window's last rows are in the ring
  job->host = std::make_shared<Job>();
  const std::shared_ptr<Job> appended = step_append;  // the rows are in the store after it
  WindowJob* j = job.get();
  Sequence* sp = &s;
  const std::byte* ring = st.win_k.get();
  const int64_t win_cap = st.win_cap;
  st.window = std::move(job);
  const int64_t table_row = st.table_row;
  jobs.run([this, j, sp, layer, appended, kp, cent, sizes, side_s, ring, win_cap, W, table_row] {
    try {
      cuda::DeviceGuard guard(device);
      for_ring_runs(j->begin, W, win_cap, [&](int64_t slot, int64_t run, int64_t i) {
        copy_2d(backend, j->points.get() + i * rowb, W * rowb, ring + slot * rowb, win_cap * rowb,
                run * rowb, Hkv, side_s);
      });
      kernels::launch_kmeans(kp, j->points.get(), cent, j->labels_dev.as<int32_t>(), sizes,
                             j->workspace.get(), nullptr, nullptr, nullptr, side_s);
      seal_centroids(table_row, j->first_cluster, cfg.window_clusters, side_s);
      cuda::memcpy_async(j->labels_host.data(), j->labels_dev.get(),
                         static_cast<size_t>(Hkv) * W * 4, side_s);
      j->done.record(backend, side_s);
      if (appended) appended->future.get();
      j->done.wait_polling();
      j->labels.assign(reinterpret_cast<const int32_t*>(j->labels_host.data()),
                       reinterpret_cast<const int32_t*>(j->labels_host.data()) +
                           static_cast<size_t>(Hkv) * cfg.window);
      run_window_host(*sp, layer, *j);
    } catch (...) {
      j->host->promise.set_exception(std::current_exception());
    }
  });
#endif
}

// Background half of a window job: the store's re-layout. Sets j.host.
void Engine::Impl::run_window_host(Sequence& s, int32_t layer, WindowJob& j) {
  try {
    const int64_t W = cfg.window;
    const uint64_t t0_ns = telemetry.now_ns();
    for (int32_t h = 0; h < Hkv; ++h) {
      store->cluster(s.id, layer, h, j.begin, W, j.labels.data() + static_cast<size_t>(h) * W,
                     cfg.window_clusters);
    }
    Event e;
    e.kind = EventKind::kCluster;
    e.op = Op::kWindow;
    e.seq = s.id;
    e.layer = layer;
    e.bytes = static_cast<int64_t>(W * Hkv * rowb);
    e.time_ns = t0_ns;
    e.dur_ns = telemetry.now_ns() - t0_ns;
    record(e);
    j.host->promise.set_value();
  } catch (...) {
    j.host->promise.set_exception(std::current_exception());
  }
}

// Commits a finished window job: its clusters join the index and its rows leave the window.
void Engine::Impl::finish_window_job(Sequence& s, int32_t layer, bool wait, cudaStream_t stream,
                                     bool admit) {
  LayerState& st = s.layers[layer];
  if (!st.window) return;
  WindowJob& j = *st.window;
  if (!wait && !j.host->ready()) return;
  wait_job(j.host, s.id, layer);
  const int64_t W = cfg.window;
  const int32_t cp = cfg.window_clusters;
  for (int32_t h = 0; h < Hkv; ++h) {
    std::vector<int32_t> sz(cp, 0);
    for (int64_t i = 0; i < W; ++i) ++sz[j.labels[static_cast<size_t>(h) * W + i]];
    st.sizes[h].insert(st.sizes[h].end(), sz.begin(), sz.end());
  }
  const int32_t first = st.num_clusters;
  st.num_clusters += cp;
  st.clustered += W;
  st.centroids_ready = std::move(j.done);
  if (admit && cfg.admit_window_clusters) admit_window(s, layer, j, first);
  st.spare_window = std::move(st.window);  // its buffers serve the next window
  ++window_clusterings;
  refresh_host_directory(s, layer, first, st.clustered - W, stream, false);
}

void Engine::Impl::apply_admissions(cudaStream_t stream) {
  (void)stream;
  admissions = false;
  AdmitBatch& ab = admit_batch;
  scheduler::AdmitParams ap;
  ap.count = static_cast<int32_t>(ab.items.size());
  ap.window = cfg.window;
  ap.clusters = cfg.window_clusters;
  ap.page_size = cfg.page_size;
  ap.row_bytes = static_cast<int32_t>(rowb);
  if (backend == Backend::kCpu) {
    const uint64_t t0_ns = telemetry.now_ns();
    ap.items = ab.items.data();
    ap.labels = ab.labels.data();
    ap.page_off = ab.page_off.data();
    ap.pages = ab.pages.data();
    scheduler::admit_rows_host(ap);
    if (spans && ab.rows > 0) {  // the CPU backend's copies are the caller's work
      Event e;
      e.op = Op::kAdmit;
      e.track = Track::kCompute;
      e.bytes = ab.rows * 2 * static_cast<int64_t>(rowb);
      record_host_span(e, t0_ns);
    }
  }
#if KVTIER_WITH_CUDA
  else if (ap.count > 0) {
    // [items | labels | page offsets | pages], one upload into a buffer sized by
    // reserve_admissions.
    const size_t ib = align16(ab.items.size() * sizeof(scheduler::AdmitItem));
    const size_t lb = align16(ab.labels.size() * 4), ob = align16(ab.page_off.size() * 4);
    const size_t total = ib + lb + ob + ab.pages.size() * 4;
    memory::PinnedBuffer& host = admit_host[admit_turn];
    admit_uploaded[admit_turn].synchronize();  // its upload, two admissions ago
    if (host.size_bytes() < total) host = memory::PinnedBuffer::allocate(total * 2);
    std::byte* w = host.data();
    std::memcpy(w, ab.items.data(), ab.items.size() * sizeof(scheduler::AdmitItem));
    std::memcpy(w + ib, ab.labels.data(), ab.labels.size() * 4);
    std::memcpy(w + ib + lb, ab.page_off.data(), ab.page_off.size() * 4);
    std::memcpy(w + ib + lb + ob, ab.pages.data(), ab.pages.size() * 4);
    grow(admit_rows_dev, total);
    cuda::memcpy_async(admit_rows_dev.get(), w, total, stream);
    admit_uploaded[admit_turn].record(backend, stream);
    const std::byte* d = admit_rows_dev.get();
    ap.items = reinterpret_cast<const scheduler::AdmitItem*>(d);
    ap.labels = reinterpret_cast<const int32_t*>(d + ib);
    ap.page_off = reinterpret_cast<const int32_t*>(d + ib + lb);
    ap.pages = reinterpret_cast<const int32_t*>(d + ib + lb + ob);
    timed(stream,
          span_event(Op::kAdmit, Track::kCompute, Direction::kNone,
                     ab.rows * 2 * static_cast<int64_t>(rowb)),
          [&] { scheduler::launch_admit_rows(ap, stream); });
  }
#endif
  ab.items.clear();
  ab.labels.clear();
  ab.page_off.clear();
  ab.pages.clear();
  ab.rows = 0;
  // The directory: the evicted out, the pages chained, the admitted in.
  apply_decisions(admit_pack[admit_turn], admit_dev, Op::kAdmit, Direction::kNone, stream);
  admit_turn ^= 1;
}

void Engine::Impl::reserve_admissions() {
#if KVTIER_WITH_CUDA
  if (backend != Backend::kCuda || !cfg.admit_window_clusters || num_recall_layers == 0) return;
  // For max_sequences at once (reserved on the first add_sequence), per (sequence, recall layer,
  // KV head): an item, W labels, C+ + 1 page offsets and the pages (at most W / P + C+); in the
  // directory, per page at most one evicted cluster and a link and per cluster an entry, two ints
  // each (index and value), with room to spare.
  const size_t heads = static_cast<size_t>(cfg.max_sequences) * num_recall_layers * Hkv;
  const size_t W = static_cast<size_t>(cfg.window), cp = static_cast<size_t>(cfg.window_clusters);
  const size_t pages = W / cfg.page_size + cp;
  const size_t rows_bytes = heads * (sizeof(scheduler::AdmitItem) + 4 * (W + cp + 1 + pages)) + 64;
  const size_t dir_bytes = heads * 4 * (6 * pages + 2 * cp);
  for (int k = 0; k < 2; ++k) {
    if (admit_host[k].size_bytes() < rows_bytes) {
      admit_uploaded[k].synchronize();
      admit_host[k] = memory::PinnedBuffer::allocate(rows_bytes);
    }
    if (admit_pack[k].buf.size_bytes() < dir_bytes) {
      admit_pack[k].uploaded.wait_polling();
      admit_pack[k].buf = memory::PinnedBuffer::allocate(dir_bytes);
    }
  }
  grow(admit_rows_dev, rows_bytes);
  grow(admit_dev, dir_bytes);
#endif
}

// The committed window's clusters (first, first + C+ per KV head) enter the layer's cache,
// copied from the window ring, where their rows still are: the steps after a window's
// clustering would otherwise select these recent clusters, miss, and read them over PCIe until
// the policy had filled them. Adds to `policy` (applied by end_step); nothing when the cache has
// no room for them.
void Engine::Impl::admit_window(Sequence& s, int32_t layer, const WindowJob& j, int32_t first) {
  const int32_t ri = recall_index[layer];
  if (ri < 0) return;
  LayerState& st = s.layers[layer];
  const int64_t W = cfg.window;
  const int32_t cp = cfg.window_clusters;
  std::vector<memory::CacheRequest> req;
  std::vector<int32_t> req_of(static_cast<size_t>(Hkv) * cp, -1);  // (head, cluster) -> request
  for (int32_t h = 0; h < Hkv; ++h) {
    for (int32_t c = 0; c < cp; ++c) {
      const int32_t rows = st.sizes[h][first + c];
      if (rows == 0) continue;
      req_of[static_cast<size_t>(h) * cp + c] = static_cast<int32_t>(req.size());
      req.push_back(memory::CacheRequest{memory::ClusterKey{s.id, layer, h, first + c}, rows});
    }
  }
  if (req.empty()) return;
  memory::CacheLookup lk;
  try {
    lk = caches[ri]->admit(req.data(), req.size());
  } catch (const CapacityError&) {
    return;  // recalled from the host tier when selected, as any cluster
  }
  LayerPolicy& pol = policy[ri];
  note_evictions(pol, ri, layer, -1, lk.evicted, [&](SeqId seq) -> int64_t {
    const auto it = seqs.find(seq);
    return it == seqs.end() ? -1 : it->second->slot;
  });
  for (const int32_t m : lk.misses) {  // all of them: the clusters are new
    pol.place((st.table_row + req[m].key.kv_head) * cap_c + req[m].key.cluster,
              lk.page_ids.data() + lk.page_indptr[m], lk.page_indptr[m + 1] - lk.page_indptr[m]);
  }
  // The rows: row i of the window (position j.begin + i) is the next row of its cluster, whose
  // rows are in position order in the host tier and so in its pages (admit_rows).
  AdmitBatch& ab = admit_batch;
  for (int32_t h = 0; h < Hkv; ++h) {
    scheduler::AdmitItem it;
    it.ring_k = st.win_k.get() + static_cast<size_t>(h) * st.win_cap * rowb;
    it.ring_v = st.win_v.get() + static_cast<size_t>(h) * st.win_cap * rowb;
    it.k_pool = caches[ri]->k_pool();
    it.v_pool = caches[ri]->v_pool();
    it.begin = j.begin;
    it.win_cap = st.win_cap;
    ab.items.push_back(it);
    ab.labels.insert(ab.labels.end(), j.labels.begin() + static_cast<ptrdiff_t>(h) * W,
                     j.labels.begin() + static_cast<ptrdiff_t>(h + 1) * W);
    for (int32_t c = 0; c < cp; ++c) {
      ab.page_off.push_back(static_cast<int32_t>(ab.pages.size()));
      const int32_t m = req_of[static_cast<size_t>(h) * cp + c];
      if (m < 0 || lk.hit[m]) continue;  // empty, or already cached: nothing to copy
      ab.pages.insert(ab.pages.end(), lk.page_ids.begin() + lk.page_indptr[m],
                      lk.page_ids.begin() + lk.page_indptr[m + 1]);
      ab.rows += req[m].num_rows;
    }
    ab.page_off.push_back(static_cast<int32_t>(ab.pages.size()));
  }
  admissions = true;
}

void Engine::Impl::flush_step_rows(cudaStream_t stream) {
  (void)stream;
#if KVTIER_WITH_CUDA
  if (step_rows.empty()) {  // nothing this step goes to the host tier (e.g. clusterattn)
    std::fill(step_rows_per_layer.begin(), step_rows_per_layer.end(), 0);
    return;
  }
  if (step_append) step_append->future.wait();  // step_host is free again
  for (int32_t l = 0; l < L; ++l) {
    if (step_rows_per_layer[l] > 0) stream_wait(backend, copy_stream(), step_layer_done[l]);
  }
  // Layer l's rows are at [l][0, step_rows_per_layer[l]) of [L][max_batch][2][Hkv][D]: download
  // the used prefix of every layer's slice in one 2D copy.
  const int32_t used = *std::max_element(step_rows_per_layer.begin(), step_rows_per_layer.end());
  const size_t seq_bytes = 2 * static_cast<size_t>(Hkv) * rowb;
  timed(copy_stream(),
        span_event(Op::kAppendCopy, Track::kCopy, Direction::kDeviceToHost,
                   static_cast<int64_t>(used * seq_bytes * L)),
        [&] {
          KVTIER_CUDA_CHECK(cudaMemcpy2DAsync(step_host.data(), cfg.max_batch * seq_bytes,
                                              step_dev.get(), cfg.max_batch * seq_bytes,
                                              used * seq_bytes, L, cudaMemcpyDeviceToHost,
                                              copy_stream()));
        });
  auto done = std::make_shared<MaybeEvent>();
  done->record(backend, copy_stream());
  // The next step's decodes write step_dev again: after this download (via policy_applied).
  stream_wait(backend, stream, *done);
  auto job = std::make_shared<Job>();
  auto rows = std::make_shared<std::vector<StepRow>>(std::move(step_rows));
  step_rows.clear();
  std::fill(step_rows_per_layer.begin(), step_rows_per_layer.end(), 0);
  const std::shared_ptr<Job> previous = step_append;
  const int32_t step = static_cast<int32_t>(steps);
  jobs.run([this, done, job, rows, previous, step] {
    try {
      cuda::DeviceGuard guard(device);
      if (previous) previous->future.get();
      done->wait_polling();
      const uint64_t t0_ns = telemetry.now_ns();
      for (const StepRow& r : *rows) {
        const std::byte* base =
            step_host.data() +
            ((static_cast<size_t>(r.layer) * cfg.max_batch + r.index) * 2) * Hkv * rowb;
        KvRows one{base, base + Hkv * rowb, dtype, Hkv, D, 1, D, D};
        store->append(r.seq, r.layer, one);
        Event e;
        e.kind = EventKind::kOffload;
        e.op = Op::kAppend;
        e.seq = r.seq;
        e.layer = r.layer;
        e.dir = Direction::kDeviceToHost;
        e.bytes = static_cast<int64_t>(2 * Hkv * rowb);
        e.step = step;
        record(e);
      }
      Event sp = span_event(Op::kAppend, Track::kHost, Direction::kNone,
                            static_cast<int64_t>(rows->size() * 2 * Hkv * rowb));
      sp.step = step;
      record_host_span(sp, t0_ns);
      job->promise.set_value();
    } catch (...) {
      job->promise.set_exception(std::current_exception());
    }
  });
  step_append = job;
#endif
}

// Drops pending directory updates of a slot whose sequence is being removed.
void Engine::Impl::purge_slot(int32_t slot) {
  const int64_t rows = static_cast<int64_t>(num_recall_layers) * Hkv;
  auto in_slot = [&](int32_t idx) { return idx / cap_c / rows == slot; };
  for (LayerPolicy& pol : policy) {
    std::vector<int32_t> si, sv;
    for (size_t i = 0; i < pol.set_idx.size(); ++i) {
      if (!in_slot(pol.set_idx[i])) si.push_back(pol.set_idx[i]), sv.push_back(pol.set_val[i]);
    }
    pol.set_idx.swap(si);
    pol.set_val.swap(sv);
    pol.inval_idx.erase(std::remove_if(pol.inval_idx.begin(), pol.inval_idx.end(), in_slot),
                        pol.inval_idx.end());
  }
  policy_pack.valid = false;  // apply_policy packs the purged lists again
}

// ---- Engine ----

namespace {
/// Makes the engine's device current for one public call (kCuda) and restores the caller's: a
/// model spread over GPUs calls several engines from one thread.
class OnDevice {
 public:
  OnDevice(Backend backend, int device) {
    if (backend == Backend::kCuda) guard_.emplace(device);
  }

 private:
  std::optional<cuda::DeviceGuard> guard_;
};
}  // namespace

Engine::Engine(const EngineConfig& config) {
  validate(config);
  OnDevice on(config.backend, config.device);
  impl_ = std::make_unique<Impl>(config);
}

Engine::~Engine() {
  if (!impl_) return;
  std::optional<cuda::DeviceGuard> on;
  if (impl_->backend == Backend::kCuda) {
    try {
      on.emplace(impl_->device);
    } catch (const std::exception&) {
      // Tear down on whatever device is current rather than throw from a destructor.
    }
  }
  impl_.reset();
}

void Engine::add_sequence(SeqId seq) {
  Impl& m = *impl_;
  OnDevice on(m.backend, m.device);
  KVTIER_CHECK(!m.seqs.count(seq), "sequence ", seq, " already exists");
  KVTIER_CHECK_CODE(kCapacity, !m.free_slots.empty(), "max_sequences = ", m.cfg.max_sequences,
                    " sequences are live; remove one first");
  auto s = std::make_unique<Sequence>();
  s->id = seq;
  s->slot = m.free_slots.back();
  s->layers.resize(m.L);
  for (int32_t l = 0; l < m.L; ++l) {
    LayerState& st = s->layers[l];
    st.recall = m.recall_index[l] >= 0;
    st.compressed = m.cfg.mode == Mode::kClusterAttn && l >= m.cfg.num_dense_layers;
    if (st.recall) {
      st.table_row =
          (static_cast<int64_t>(s->slot) * m.num_recall_layers + m.recall_index[l]) * m.Hkv;
    }
  }
  m.store->add_sequence(seq);
  // A reused slot's directory rows start empty.
  if (m.num_recall_layers > 0) {
    const size_t rows = static_cast<size_t>(m.num_recall_layers) * m.Hkv;
    int32_t* dir = m.dir_table.as<int32_t>() + s->slot * rows * m.cap_c;
    if (m.backend == Backend::kCpu) {
      std::fill_n(dir, rows * m.cap_c, -1);
    }
#if KVTIER_WITH_CUDA
    else {
      KVTIER_CUDA_CHECK(cudaMemsetAsync(dir, 0xff, rows * m.cap_c * 4, m.copy_stream()));
      KVTIER_CUDA_CHECK(cudaStreamSynchronize(m.copy_stream()));
    }
#endif
  }
  m.free_slots.pop_back();
  m.seqs.emplace(seq, std::move(s));
  m.reserve_admissions();
}

void Engine::remove_sequence(SeqId seq) {
  Impl& m = *impl_;
  OnDevice on(m.backend, m.device);
  Sequence& s = m.find(seq);
  if (m.step_append) m.step_append->future.wait();
  if (m.policy_job) m.policy_job->future.wait();  // it reads the sequence
  m.wait_sequence(s);
  m.store->remove_sequence(seq);
  for (const auto& c : m.caches) c->erase_sequence(seq);
  for (auto& selected : m.last_selected) selected.erase(seq);  // an id may be reused
  m.purge_slot(s.slot);
  m.free_slots.push_back(s.slot);
  m.seqs.erase(seq);
}

bool Engine::contains(SeqId seq) const { return impl_->seqs.count(seq) != 0; }

int64_t Engine::sequence_length(SeqId seq, int32_t layer) const {
  Sequence& s = impl_->find(seq);
  KVTIER_CHECK(layer >= 0 && layer < impl_->L, "layer ", layer, " out of [0, ", impl_->L, ")");
  return s.layers[layer].rows;
}

void Engine::prefill_layer(SeqId seq, int32_t layer, const KvRows& kv, cudaStream_t stream) {
  prefill_layer(seq, layer, kv, ObservationWindow{}, stream);
}

void Engine::prefill_layer(SeqId seq, int32_t layer, const KvRows& kv,
                           const ObservationWindow& window, cudaStream_t stream) {
  Impl& m = *impl_;
  OnDevice on(m.backend, m.device);
  Sequence& s = m.find(seq);
  KVTIER_CHECK(layer >= 0 && layer < m.L, "prefill_layer: layer ", layer, " out of [0, ", m.L, ")");
  KVTIER_CHECK(kv.dtype == m.dtype, "prefill_layer: dtype ", dtype_name(kv.dtype),
               " does not match the model's ", dtype_name(m.dtype));
  KVTIER_CHECK(kv.num_kv_heads == m.Hkv, "prefill_layer: num_kv_heads ", kv.num_kv_heads,
               " does not match the model's ", m.Hkv);
  KVTIER_CHECK(kv.head_dim == m.D, "prefill_layer: head_dim ", kv.head_dim,
               " does not match the model's ", m.D);
  KVTIER_CHECK(kv.num_rows >= 0, "prefill_layer: num_rows must be >= 0, got ", kv.num_rows);
  KVTIER_CHECK(kv.num_rows == 0 || (kv.k && kv.v), "prefill_layer: k and v must not be null");
  KVTIER_CHECK(!s.layers[layer].prefilled, "prefill_layer: layer ", layer, " of sequence ", seq,
               " already has rows (prefill once, before decoding)");
  KVTIER_CHECK_CODE(kCapacity, kv.num_rows <= m.cfg.max_context, "prompt of ", kv.num_rows,
                    " rows exceeds max_context = ", m.cfg.max_context);
  if (kv.num_rows == 0) return;
  if (s.layers[layer].compressed) {
    m.prefill_compressed(s, layer, kv, window, stream);
    return;
  }
  if (s.layers[layer].recall && m.cfg.mode == Mode::kHybrid) {
    m.prefill_hybrid(s, layer, kv, window, stream);
    return;
  }
  m.prefill(s, layer, kv, stream);
}

void Engine::decode_layer(int32_t layer, const DecodeBatch& batch, cudaStream_t stream) {
  OnDevice on(impl_->backend, impl_->device);
  const double t0 = thread_cpu_ms();
  impl_->decode(layer, batch, stream);
  impl_->decode_host_ms += thread_cpu_ms() - t0;
}

void Engine::end_step(cudaStream_t stream) {
  Impl& m = *impl_;
  OnDevice on(m.backend, m.device);
  const double t0 = thread_cpu_ms();
  const uint64_t t_end = m.telemetry.now_ns();
  // Everything below is ordered after every decode of the step, whatever streams they used.
  for (int32_t l = 0; l < m.L; ++l) stream_wait(m.backend, stream, m.step_layer_done[l]);
  if (m.spans && m.decode_span_open) {
    m.end_span(m.decode_span, stream,
               Impl::span_event(Op::kDecode, Track::kCompute, Direction::kNone, 0));
  }
  m.decode_span_open = false;
  if (m.backend == Backend::kCuda) m.flush_step_rows(stream);
  m.apply_policy(stream);  // the previous step's cache decisions
  for (auto& [id, s] : m.seqs) {
    for (int32_t l = 0; l < m.L; ++l) {
      LayerState& st = s->layers[l];
      if (!st.recall || !st.prefilled || st.prefill) continue;
      m.finish_window_job(*s, l, /*wait=*/false, stream, /*admit=*/true);
      if (!st.window && st.recall_end - st.clustered >= m.cfg.window) m.start_window_job(*s, l);
    }
  }
  if (m.admissions)
    m.apply_admissions(stream);  // before policy_applied: the next decodes
                                 // see them, and write the ring after the copies
#if KVTIER_WITH_CUDA
  if (m.backend == Backend::kCuda && m.num_recall_layers > 0) {
    // The step's records (selections and stats), all recall layers in one copy.
    int32_t used = 0;
    for (const auto& rec : m.records[m.steps % 2]) used = std::max(used, rec.problems);
    if (used > 0) {
      const size_t layer_bytes = static_cast<size_t>(m.max_problems) * m.rec_cols * 4;
      KVTIER_CUDA_CHECK(cudaMemcpy2DAsync(m.record_buf[m.steps % 2].data(), layer_bytes,
                                          m.rec_dev.get(), layer_bytes,
                                          static_cast<size_t>(used) * m.rec_cols * 4,
                                          m.num_recall_layers, cudaMemcpyDeviceToHost, stream));
    }
  }
#endif
  if (m.num_recall_layers > 0) m.launch_policy_job(stream);
  m.release_prefill_scratch();
  m.reserve_host_pages();
  m.policy_applied.record(m.backend, stream);
  {
    Event e;
    e.kind = EventKind::kStep;
    e.time_ns = m.step_open ? m.step_begin_ns : t_end;
    e.dur_ns = m.telemetry.now_ns() - e.time_ns;
    m.record(e);
  }
  m.step_open = false;
  ++m.steps;
  m.step_now.store(static_cast<int32_t>(m.steps), std::memory_order_relaxed);
  if (m.spans) m.spans->poll(/*wait=*/false);  // the spans that have run; the writer drains
  m.decode_host_ms += thread_cpu_ms() - t0;
}

void Engine::synchronize() {
  Impl& m = *impl_;
  OnDevice on(m.backend, m.device);
  m.jobs.wait();
  if (m.step_append) m.step_append->future.get();
  if (m.policy_job) m.policy_job->future.get();
  for (auto& [id, s] : m.seqs) {
    for (int32_t l = 0; l < m.L; ++l) {
      LayerState& st = s->layers[l];
      if (st.prefill) st.prefill->future.get();
      if (st.window) st.window->host->future.get();
    }
  }
  if (m.spans) m.spans->poll(/*wait=*/true);
}

void Engine::start_trace(const std::string& path) {
  OnDevice on(impl_->backend, impl_->device);
  impl_->start_trace(path);
}

void Engine::stop_trace() {
  OnDevice on(impl_->backend, impl_->device);
  std::exception_ptr error;
  try {
    synchronize();
  } catch (...) {
    error = std::current_exception();  // a job's error: still close the trace, then report it
  }
  impl_->stop_trace();
  if (error) std::rethrow_exception(error);
}

bool Engine::tracing() const { return impl_->spans != nullptr; }

EngineStats Engine::stats() const {
  const Impl& m = *impl_;
  EngineStats s;
  s.steps = m.steps;
  s.decode_layer_calls = m.decode_calls;
  s.sequences = static_cast<int64_t>(m.seqs.size());
  for (const auto& c : m.caches) {
    const memory::CacheStats cs = c->stats();
    s.cache.lookups += cs.lookups;
    s.cache.hits += cs.hits;
    s.cache.misses += cs.misses;
    s.cache.evictions += cs.evictions;
    s.cache.pressure_evictions += cs.pressure_evictions;
    s.cache.bytes_fetched += cs.bytes_fetched;
    s.cache.admitted += cs.admitted;
    s.cache.num_entries += cs.num_entries;
    s.cache.pages_used += cs.pages_used;
    s.cache.num_pages += cs.num_pages;
  }
  {
    std::lock_guard<std::mutex> lock(m.stats_mu);
    s.recall_hits = m.recall_hits;
    s.recall_misses = m.recall_misses;
    s.host_read_bytes = m.host_read_bytes;
    s.fill_bytes = m.fill_bytes;
  }
  s.telemetry = m.telemetry.stats();
  s.gpu_bytes = m.mem.now.load();
  s.gpu_kv_bytes = m.mem.kv.load();
  s.gpu_peak_bytes = m.mem.peak.load();
  const memory::HostArenaStats hs = m.store->arena().stats();
  s.host_bytes_used = hs.bytes_used;
  s.host_bytes_peak = hs.bytes_peak;
  s.prefill_cluster_ms = static_cast<double>(m.prefill_cluster_us.load()) / 1000.0;
  s.window_clusterings = m.window_clusterings;
  s.window_admissions = s.cache.admitted;
  s.rows_attended = m.rows_attended.load();
  s.decode_host_ms = m.decode_host_ms;
  s.graph_launches = m.graph_launches;
  s.select_attend_layers = m.select_attend_layers;
  s.decode_blocked_ms = m.staging.blocked_ms();
  return s;
}

const EngineConfig& Engine::config() const { return impl_->cfg; }
scheduler::Telemetry& Engine::telemetry() { return impl_->telemetry; }
std::vector<std::vector<int32_t>> Engine::last_selection(SeqId seq, int32_t layer) const {
  const Impl& m = *impl_;
  KVTIER_CHECK(layer >= 0 && layer < m.L, "last_selection: layer ", layer, " out of [0, ", m.L,
               ")");
  if (m.recall_index[layer] < 0) return {};
  if (m.policy_job) m.policy_job->future.wait();
  const auto& selected = m.last_selected[m.recall_index[layer]];
  const auto it = selected.find(seq);
  const bool last_step = it != selected.end() && it->second.step == m.steps - 1;
  return last_step ? it->second.heads : std::vector<std::vector<int32_t>>{};
}

bool Engine::is_recall_layer(int32_t layer) const {
  KVTIER_CHECK(layer >= 0 && layer < impl_->L, "layer ", layer, " out of [0, ", impl_->L, ")");
  return impl_->recall_index[layer] >= 0;
}

namespace scheduler {

void admit_rows_host(const AdmitParams& p) {
  std::vector<int32_t> rank(static_cast<size_t>(p.clusters));
  for (int32_t b = 0; b < p.count; ++b) {
    const AdmitItem& it = p.items[b];
    const int32_t* labels = p.labels + static_cast<size_t>(b) * p.window;
    const int32_t* off = p.page_off + static_cast<size_t>(b) * (p.clusters + 1);
    std::fill(rank.begin(), rank.end(), 0);
    for (int32_t i = 0; i < p.window; ++i) {
      const int32_t c = labels[i], r = rank[c]++;
      if (off[c] == off[c + 1]) continue;
      const int32_t page = p.pages[off[c] + r / p.page_size];
      const size_t src = static_cast<size_t>((it.begin + i) % it.win_cap) * p.row_bytes;
      const size_t dst = (static_cast<size_t>(page) * p.page_size + r % p.page_size) * p.row_bytes;
      std::memcpy(it.k_pool + dst, it.ring_k + src, p.row_bytes);
      std::memcpy(it.v_pool + dst, it.ring_v + src, p.row_bytes);
    }
  }
}

void build_recall_chunks_host(const ChunkBuildParams& p) {
  int32_t at = 0;
  for (int32_t pi = 0; pi < p.num_problems; ++pi) {
    const RecallProblem& pr = p.problems[pi];
    p.indptr[pi] = at;
    if (pr.res_rows > 0) p.chunks[at++] = detail::make_chunk(pr.res_k, pr.res_v, pr.res_rows);
    int32_t hits = 0, misses = 0, host_rows = 0, rows_total = 0;
    for (int32_t j = 0; j < p.num_sel[pi]; ++j) {
      const size_t si = static_cast<size_t>(pi) * p.sel_stride + j;
      bool hit = false;
      at += detail::cluster_chunks(p, pr, p.sel_ids[si], p.sel_rows[si], p.chunks + at, &hit);
      hits += hit ? 1 : 0;
      misses += hit ? 0 : 1;
      host_rows += hit ? 0 : p.sel_rows[si];
      rows_total += p.sel_rows[si];
    }
    at += detail::window_chunks(p, pr, p.chunks + at);
    p.counts[pi] = at - p.indptr[pi];
    int32_t* st = p.stats + 4 * pi;
    st[0] = hits;
    st[1] = misses;
    st[2] = host_rows;
    st[3] = rows_total + static_cast<int32_t>(pr.res_rows + pr.win_rows);
  }
  p.indptr[p.num_problems] = at;
}

}  // namespace scheduler
}  // namespace kvtier
