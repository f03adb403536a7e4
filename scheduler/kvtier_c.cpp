// The C API (kvtier.h) over kvtier::Engine: exceptions become status codes and a thread-local
// message.
#include <algorithm>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "memory/core/check.h"
#include "memory/core/status.h"
#include "scheduler/engine.h"
#include "scheduler/kvtier.h"

struct kvtier_engine {
  explicit kvtier_engine(const kvtier::EngineConfig& c) : engine(c) {}
  kvtier::Engine engine;
};

namespace {

thread_local std::string g_last_error;

template <typename F>
kvtier_status guarded(F&& f) {
  try {
    f();
    return KVTIER_OK;
  } catch (const kvtier::Error& e) {
    g_last_error = e.what();
    switch (e.code()) {
      case kvtier::StatusCode::kInvalidArgument:
        return KVTIER_ERR_INVALID_ARGUMENT;
      case kvtier::StatusCode::kCapacity:
        return KVTIER_ERR_CAPACITY;
      case kvtier::StatusCode::kNotFound:
        return KVTIER_ERR_NOT_FOUND;
      case kvtier::StatusCode::kCuda:
        return KVTIER_ERR_CUDA;
      case kvtier::StatusCode::kIoError:
        return KVTIER_ERR_IO;
      default:
        return KVTIER_ERR_INTERNAL;
    }
  } catch (const std::bad_alloc&) {
    g_last_error = "kvtier: out of host memory";
    return KVTIER_ERR_CAPACITY;
  } catch (const std::exception& e) {
    g_last_error = e.what();
    return KVTIER_ERR_INTERNAL;
  }
}

kvtier_status null_arg(const char* what) {
  g_last_error = std::string("kvtier: ") + what + " is NULL";
  return KVTIER_ERR_INVALID_ARGUMENT;
}

kvtier::DType to_dtype(int32_t d) {
  KVTIER_CHECK(d == KVTIER_DTYPE_F16 || d == KVTIER_DTYPE_BF16 || d == KVTIER_DTYPE_F32, "dtype ",
               d,
               " is not a kvtier_dtype (KVTIER_DTYPE_F16, KVTIER_DTYPE_BF16 or KVTIER_DTYPE_F32)");
  return d == KVTIER_DTYPE_F16    ? kvtier::DType::kF16
         : d == KVTIER_DTYPE_BF16 ? kvtier::DType::kBF16
                                  : kvtier::DType::kF32;
}

kvtier::EngineConfig to_config(const kvtier_config& c) {
  kvtier::EngineConfig e;
  e.model = kvtier::ModelShape{c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim,
                               to_dtype(c.dtype)};
  KVTIER_CHECK(c.mode >= KVTIER_MODE_FULL && c.mode <= KVTIER_MODE_HYBRID, "mode ", c.mode,
               " is not a kvtier_mode");
  e.mode = static_cast<kvtier::Mode>(c.mode);
  KVTIER_CHECK(c.backend == KVTIER_BACKEND_CPU || c.backend == KVTIER_BACKEND_CUDA, "backend ",
               c.backend, " is not a kvtier_backend");
  e.backend = c.backend == KVTIER_BACKEND_CUDA ? kvtier::Backend::kCuda : kvtier::Backend::kCpu;
  e.device = c.device;
  e.budget = c.budget;
  e.sink = c.sink;
  e.window = c.window;
  e.tokens_per_cluster = c.tokens_per_cluster;
  e.initial_clusters = c.initial_clusters;
  e.window_clusters = c.window_clusters;
  e.retention_steps = c.retention_steps;
  e.page_size = c.page_size;
  e.num_dense_layers = c.num_dense_layers;
  e.kmeans_iters = c.kmeans_iters;
  e.observation_window = c.observation_window;
  e.max_sequences = c.max_sequences;
  e.max_batch = c.max_batch;
  e.max_context = c.max_context;
  e.host_bytes_limit = static_cast<size_t>(c.host_bytes_limit);
  e.cache_bytes = static_cast<size_t>(c.cache_bytes);
  if (c.telemetry_path) e.telemetry_path = c.telemetry_path;
  e.cuda_graphs = c.cuda_graphs != 0;
  e.total_budget = c.total_budget != 0;
  e.resident_budget = c.resident_budget;
  return e;
}

}  // namespace

extern "C" {

void kvtier_config_default(kvtier_config* c) {
  if (!c) return;
  const kvtier::EngineConfig d;
  *c = kvtier_config{};
  c->dtype = KVTIER_DTYPE_BF16;
  c->mode = KVTIER_MODE_CLUSTERKV;
  c->backend = KVTIER_BACKEND_CUDA;
  c->device = d.device;
  c->budget = d.budget;
  c->total_budget = d.total_budget ? 1 : 0;
  c->resident_budget = d.resident_budget;
  c->sink = d.sink;
  c->window = d.window;
  c->tokens_per_cluster = d.tokens_per_cluster;
  c->initial_clusters = d.initial_clusters;
  c->window_clusters = d.window_clusters;
  c->retention_steps = d.retention_steps;
  c->page_size = d.page_size;
  c->num_dense_layers = d.num_dense_layers;
  c->kmeans_iters = d.kmeans_iters;
  c->observation_window = d.observation_window;
  c->max_sequences = d.max_sequences;
  c->max_batch = d.max_batch;
  c->max_context = d.max_context;
  c->host_bytes_limit = 0;
  c->cache_bytes = 0;
  c->telemetry_path = nullptr;
  c->cuda_graphs = d.cuda_graphs ? 1 : 0;
}

const char* kvtier_last_error(void) { return g_last_error.c_str(); }

kvtier_status kvtier_engine_create(const kvtier_config* config, kvtier_engine** out) {
  if (!config) return null_arg("config");
  if (!out) return null_arg("out");
  *out = nullptr;
  return guarded([&] { *out = new kvtier_engine(to_config(*config)); });
}

void kvtier_engine_destroy(kvtier_engine* engine) { delete engine; }

kvtier_status kvtier_add_sequence(kvtier_engine* e, kvtier_seq_id seq) {
  if (!e) return null_arg("engine");
  return guarded([&] { e->engine.add_sequence(seq); });
}

kvtier_status kvtier_remove_sequence(kvtier_engine* e, kvtier_seq_id seq) {
  if (!e) return null_arg("engine");
  return guarded([&] { e->engine.remove_sequence(seq); });
}

kvtier_status kvtier_prefill_layer(kvtier_engine* e, kvtier_seq_id seq, int32_t layer,
                                   const void* k, const void* v, int64_t num_rows,
                                   int64_t head_stride, int64_t row_stride, void* stream) {
  if (!e) return null_arg("engine");
  return guarded([&] {
    const kvtier::ModelShape& m = e->engine.config().model;
    kvtier::memory::KvRows rows{k,          v,        m.dtype,     m.num_kv_heads,
                                m.head_dim, num_rows, head_stride, row_stride};
    e->engine.prefill_layer(seq, layer, rows, static_cast<cudaStream_t>(stream));
  });
}

kvtier_status kvtier_prefill_layer_window(kvtier_engine* e, kvtier_seq_id seq, int32_t layer,
                                          const void* k, const void* v, int64_t num_rows,
                                          int64_t head_stride, int64_t row_stride,
                                          const void* q_window, int32_t num_window_queries,
                                          void* stream) {
  if (!e) return null_arg("engine");
  return guarded([&] {
    const kvtier::ModelShape& m = e->engine.config().model;
    kvtier::memory::KvRows rows{k,          v,        m.dtype,     m.num_kv_heads,
                                m.head_dim, num_rows, head_stride, row_stride};
    e->engine.prefill_layer(seq, layer, rows,
                            kvtier::ObservationWindow{q_window, num_window_queries},
                            static_cast<cudaStream_t>(stream));
  });
}

kvtier_status kvtier_decode_layer(kvtier_engine* e, int32_t layer, const kvtier_seq_id* seqs,
                                  int32_t num_seqs, const void* q, const void* k_new,
                                  const void* v_new, void* out, void* stream) {
  if (!e) return null_arg("engine");
  return guarded([&] {
    kvtier::DecodeBatch b{seqs, num_seqs, q, k_new, v_new, out};
    e->engine.decode_layer(layer, b, static_cast<cudaStream_t>(stream));
  });
}

kvtier_status kvtier_decode_layer_lse(kvtier_engine* e, int32_t layer, const kvtier_seq_id* seqs,
                                      int32_t num_seqs, const void* q, const void* k_new,
                                      const void* v_new, void* out, float* lse, void* stream) {
  if (!e) return null_arg("engine");
  if (!lse) return null_arg("lse");
  return guarded([&] {
    kvtier::DecodeBatch b{seqs, num_seqs, q, k_new, v_new, out, lse};
    e->engine.decode_layer(layer, b, static_cast<cudaStream_t>(stream));
  });
}

kvtier_status kvtier_last_selection(const kvtier_engine* e, kvtier_seq_id seq, int32_t layer,
                                    int32_t kv_head, int32_t* ids, int32_t capacity,
                                    int32_t* count) {
  if (!e) return null_arg("engine");
  if (!count) return null_arg("count");
  if (capacity > 0 && !ids) return null_arg("ids");
  return guarded([&] {
    const int32_t heads = e->engine.config().model.num_kv_heads;
    KVTIER_CHECK(kv_head >= 0 && kv_head < heads, "kv_head ", kv_head, " out of [0, ", heads, ")");
    const std::vector<std::vector<int32_t>> sel = e->engine.last_selection(seq, layer);
    const std::vector<int32_t> none;
    const std::vector<int32_t>& mine = sel.empty() ? none : sel[static_cast<size_t>(kv_head)];
    *count = static_cast<int32_t>(mine.size());
    std::copy_n(mine.begin(), std::min<size_t>(mine.size(), std::max(capacity, 0)), ids);
  });
}

kvtier_status kvtier_end_step(kvtier_engine* e, void* stream) {
  if (!e) return null_arg("engine");
  return guarded([&] { e->engine.end_step(static_cast<cudaStream_t>(stream)); });
}

kvtier_status kvtier_synchronize(kvtier_engine* e) {
  if (!e) return null_arg("engine");
  return guarded([&] { e->engine.synchronize(); });
}

kvtier_status kvtier_start_trace(kvtier_engine* e, const char* path) {
  if (!e) return null_arg("engine");
  if (!path) return null_arg("path");
  return guarded([&] { e->engine.start_trace(path); });
}

kvtier_status kvtier_stop_trace(kvtier_engine* e) {
  if (!e) return null_arg("engine");
  return guarded([&] { e->engine.stop_trace(); });
}

kvtier_status kvtier_get_stats(const kvtier_engine* e, kvtier_stats* out) {
  if (!e) return null_arg("engine");
  if (!out) return null_arg("out");
  return guarded([&] {
    const kvtier::EngineStats s = e->engine.stats();
    *out = kvtier_stats{};
    out->steps = s.steps;
    out->decode_layer_calls = s.decode_layer_calls;
    out->sequences = s.sequences;
    out->recall_hits = s.recall_hits;
    out->recall_misses = s.recall_misses;
    out->host_read_bytes = s.host_read_bytes;
    out->fill_bytes = s.fill_bytes;
    out->rows_attended = s.rows_attended;
    out->evictions = s.cache.evictions;
    out->window_clusterings = s.window_clusterings;
    out->gpu_bytes = s.gpu_bytes;
    out->gpu_kv_bytes = s.gpu_kv_bytes;
    out->gpu_peak_bytes = s.gpu_peak_bytes;
    out->host_bytes_used = s.host_bytes_used;
    out->host_bytes_peak = s.host_bytes_peak;
    out->telemetry_events = s.telemetry.total_events();
    out->telemetry_dropped = s.telemetry.dropped;
    out->prefill_cluster_ms = s.prefill_cluster_ms;
    out->decode_host_ms = s.decode_host_ms;
    out->decode_blocked_ms = s.decode_blocked_ms;
  });
}

kvtier_status kvtier_sequence_length(const kvtier_engine* e, kvtier_seq_id seq, int32_t layer,
                                     int64_t* out) {
  if (!e) return null_arg("engine");
  if (!out) return null_arg("out");
  return guarded([&] { *out = e->engine.sequence_length(seq, layer); });
}

}  // extern "C"
