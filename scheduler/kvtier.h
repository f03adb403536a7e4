/* kvtier C API: the engine (scheduler/engine.h) for FFI users (Python ctypes, Rust, Go, ...).
 *
 * Every call returns a kvtier_status; on failure kvtier_last_error() returns the message of the
 * last failed call on this thread (valid until the next failing call). Pointers to K, V, q and
 * out are device pointers on the CUDA backend and host pointers on the CPU backend; `stream` is
 * a cudaStream_t (NULL: the default stream) and is ignored on the CPU backend. An engine is
 * driven by one thread at a time. */
#ifndef KVTIER_H_
#define KVTIER_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvtier_engine kvtier_engine;
typedef int64_t kvtier_seq_id;

typedef enum {
  KVTIER_OK = 0,
  KVTIER_ERR_INVALID_ARGUMENT = 1, /* bad shape, dtype, id, budget, ... */
  KVTIER_ERR_CAPACITY = 2,         /* a bounded resource is full; nothing stored was lost */
  KVTIER_ERR_NOT_FOUND = 3,        /* unknown sequence */
  KVTIER_ERR_CUDA = 4,
  KVTIER_ERR_IO = 5,
  KVTIER_ERR_INTERNAL = 6
} kvtier_status;

/* fp32: the CPU backend only. */
typedef enum { KVTIER_DTYPE_F16 = 1, KVTIER_DTYPE_BF16 = 2, KVTIER_DTYPE_F32 = 3 } kvtier_dtype;
typedef enum {
  KVTIER_MODE_FULL = 0,
  KVTIER_MODE_CLUSTERKV = 1,
  KVTIER_MODE_CLUSTERATTN = 2,
  KVTIER_MODE_HYBRID = 3
} kvtier_mode;
typedef enum { KVTIER_BACKEND_CPU = 0, KVTIER_BACKEND_CUDA = 1 } kvtier_backend;

/* Mirrors kvtier::EngineConfig; kvtier_config_default() fills the same defaults. */
typedef struct kvtier_config {
  int32_t num_layers, num_q_heads, num_kv_heads, head_dim;
  int32_t dtype;   /* kvtier_dtype */
  int32_t mode;    /* kvtier_mode */
  int32_t backend; /* kvtier_backend */
  int32_t device;
  int32_t budget, sink, window, tokens_per_cluster, initial_clusters, window_clusters;
  int32_t retention_steps, page_size, num_dense_layers, kmeans_iters;
  int32_t observation_window;
  int32_t max_sequences, max_batch;
  int64_t max_context;
  uint64_t host_bytes_limit;  /* required */
  uint64_t cache_bytes;       /* 0: the engine's default */
  const char* telemetry_path; /* NULL or "": no file */
  int32_t cuda_graphs;        /* CUDA: replay each recall layer's kernels as a graph (default 1) */
  int32_t total_budget;       /* 1: budget counts every row attended (EngineConfig::total_budget) */
  int32_t resident_budget;    /* hybrid: DBAC's rows per KV head; 0: budget */
} kvtier_config;

typedef struct kvtier_stats {
  int64_t steps, decode_layer_calls, sequences;
  int64_t recall_hits, recall_misses, host_read_bytes, fill_bytes, rows_attended;
  int64_t evictions, window_clusterings;
  uint64_t gpu_bytes, gpu_kv_bytes, gpu_peak_bytes, host_bytes_used, host_bytes_peak;
  int64_t telemetry_events, telemetry_dropped;
  double prefill_cluster_ms;
  double decode_host_ms;    /* calling thread's CPU time in decode_layer and end_step */
  double decode_blocked_ms; /* of that, spent spinning on the device */
} kvtier_stats;

void kvtier_config_default(kvtier_config* config);
const char* kvtier_last_error(void);

kvtier_status kvtier_engine_create(const kvtier_config* config, kvtier_engine** out);
void kvtier_engine_destroy(kvtier_engine* engine); /* NULL is allowed */

kvtier_status kvtier_add_sequence(kvtier_engine* engine, kvtier_seq_id seq);
kvtier_status kvtier_remove_sequence(kvtier_engine* engine, kvtier_seq_id seq);

/* One layer's prompt K and V: element (h, r, d) at k[h * head_stride + r * row_stride + d];
 * head_stride = row_stride = -1 means head-major contiguous [num_kv_heads, num_rows, head_dim]. */
kvtier_status kvtier_prefill_layer(kvtier_engine* engine, kvtier_seq_id seq, int32_t layer,
                                   const void* k, const void* v, int64_t num_rows,
                                   int64_t head_stride, int64_t row_stride, void* stream);

/* The same with the observation window's queries q_window [num_q_heads, num_window_queries,
 * head_dim], which mode clusterattn needs for its compressed layers. */
kvtier_status kvtier_prefill_layer_window(kvtier_engine* engine, kvtier_seq_id seq, int32_t layer,
                                          const void* k, const void* v, int64_t num_rows,
                                          int64_t head_stride, int64_t row_stride,
                                          const void* q_window, int32_t num_window_queries,
                                          void* stream);

/* q [num_seqs, num_q_heads, head_dim], k_new / v_new [num_seqs, num_kv_heads, head_dim],
 * out [num_seqs, num_q_heads, head_dim], all contiguous in the model dtype. */
kvtier_status kvtier_decode_layer(kvtier_engine* engine, int32_t layer, const kvtier_seq_id* seqs,
                                  int32_t num_seqs, const void* q, const void* k_new,
                                  const void* v_new, void* out, void* stream);

/* The same, also writing lse [num_seqs, num_q_heads] float (device memory on the CUDA backend):
 * the log-sum-exp (natural log) of the scaled logits over the rows each head attended. */
kvtier_status kvtier_decode_layer_lse(kvtier_engine* engine, int32_t layer,
                                      const kvtier_seq_id* seqs, int32_t num_seqs, const void* q,
                                      const void* k_new, const void* v_new, void* out, float* lse,
                                      void* stream);

/* The clusters `layer` selected for `seq` and KV head `kv_head` in the last step that ended, in
 * selection order: up to `capacity` ids into `ids` (may be null when capacity is 0), and their
 * count into *count (0 for a layer that does not recall, or a sequence not decoded then). A
 * count above capacity means the list was cut; call again with a larger buffer. */
kvtier_status kvtier_last_selection(const kvtier_engine* engine, kvtier_seq_id seq, int32_t layer,
                                    int32_t kv_head, int32_t* ids, int32_t capacity,
                                    int32_t* count);

kvtier_status kvtier_end_step(kvtier_engine* engine, void* stream);
kvtier_status kvtier_synchronize(kvtier_engine* engine);
/* Starts writing every telemetry event to `path` (truncated; JSON Lines, docs/telemetry.md, read
 * by tools/kvtier-trace); stops (waiting for the traced work and closing the file). */
kvtier_status kvtier_start_trace(kvtier_engine* engine, const char* path);
kvtier_status kvtier_stop_trace(kvtier_engine* engine);
kvtier_status kvtier_get_stats(const kvtier_engine* engine, kvtier_stats* out);
kvtier_status kvtier_sequence_length(const kvtier_engine* engine, kvtier_seq_id seq, int32_t layer,
                                     int64_t* out);

#ifdef __cplusplus
}
#endif

#endif /* KVTIER_H_ */
