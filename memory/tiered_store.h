// The host tier of the KV store: per (sequence, layer, KV head), the K and V rows of every token,
// in arena pages. Rows arrive in token order and are re-laid out cluster-contiguously once
// labelled, so each cluster is one run of rows (a gather needs few, large pieces). Layout of one
// KV head, by slot (storage index):
//
//   [ prefix (sinks) | index: clusters 0..C-1, each contiguous | tail (unclustered) ]
//     slot == pos      slot -> pos through the permutation        slot == pos
//
// The index always covers a contiguous range of positions [index_begin, index_end), permuted
// within itself; clustering takes the oldest rows of the tail and appends clusters to the index.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "memory/core/dtype.h"
#include "memory/host_arena.h"

namespace kvtier::memory {

using SeqId = int64_t;

/// Shape of the KV cache of one model.
struct KvShape {
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  DType dtype = DType::kBF16;

  size_t row_bytes() const { return kv_row_bytes(dtype, head_dim); }
};
/// Throws InvalidArgumentError naming the bad field.
void check_kv_shape(const KvShape& shape);

struct TieredStoreConfig {
  KvShape shape;
  HostArenaConfig host;
};

/// Rows to append for every KV head of one layer. Element (h, r, d) of K is at
/// k[h * head_stride + r * row_stride + d], in elements of `dtype`. Defaults (-1) mean
/// head-major contiguous [num_kv_heads, num_rows, head_dim]; token-major [num_rows, num_kv_heads,
/// head_dim] is head_stride = head_dim, row_stride = num_kv_heads * head_dim.
struct KvRows {
  const void* k = nullptr;
  const void* v = nullptr;
  DType dtype = DType::kBF16;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int64_t num_rows = 0;
  int64_t head_stride = -1;
  int64_t row_stride = -1;
};

/// One run of consecutive slots that lie in one host page (K and V alike).
struct RowRun {
  int64_t slot = 0;  ///< first slot of the run
  int32_t num_rows = 0;
  const std::byte* k = nullptr;  ///< host address of the first K row
  const std::byte* v = nullptr;
  const std::byte* k_device = nullptr;  ///< the same as a device address; nullptr if not pinned
  const std::byte* v_device = nullptr;
};

/// Cluster layout of one KV head.
struct HeadLayout {
  int64_t num_rows = 0;
  int64_t index_begin = 0;  ///< first indexed position (== num_sink rows); 0 before any clustering
  int64_t index_end = 0;    ///< one past the last indexed position; == index_begin if none
  int32_t num_clusters = 0;
};

/// A cluster's rows: slots [slot_begin, slot_begin + num_rows).
struct ClusterSpan {
  int64_t slot_begin = 0;
  int32_t num_rows = 0;
};

/// Thread-safe: any thread may add, remove, append to and read any sequence; operations on one
/// sequence are serialized by its own lock (reads share it). The store must outlive every call.
class TieredStore {
 public:
  explicit TieredStore(const TieredStoreConfig& config);
  ~TieredStore();
  TieredStore(const TieredStore&) = delete;
  TieredStore& operator=(const TieredStore&) = delete;

  // ---- sequences ----
  /// Throws InvalidArgumentError if `seq` already exists.
  void add_sequence(SeqId seq);
  /// Frees the sequence's pages. Throws NotFoundError if unknown.
  void remove_sequence(SeqId seq);
  bool contains(SeqId seq) const;
  size_t num_sequences() const;

  // ---- appending ----
  /// Appends rows to every KV head of `layer` (the tail of each head). All or nothing: when the
  /// arena is full it throws CapacityError and the sequence is unchanged.
  void append(SeqId seq, int32_t layer, const KvRows& rows);

  // ---- clustering ----
  /// Re-lays out positions [pos_begin, pos_begin + num_rows) of one KV head as clusters
  /// `first .. first + num_clusters - 1`, where first is the head's cluster count before the
  /// call (returned). labels[i] in [0, num_clusters) is the cluster of position pos_begin + i.
  /// The first call fixes the sink prefix [0, pos_begin); later calls must start at index_end.
  /// Rows keep their token order within a cluster. Empty clusters are allowed.
  int32_t cluster(SeqId seq, int32_t layer, int32_t kv_head, int64_t pos_begin, int64_t num_rows,
                  const int32_t* labels, int32_t num_clusters);
  /// append() then cluster() of the appended rows in every KV head of `layer`, in one pass: each
  /// row is written once, straight to its cluster slot (a prompt's layer, whose labels k-means
  /// gave before it reached the host). labels: [num_kv_heads][rows.num_rows], in [0,
  /// num_clusters). The layer's heads must have no unclustered rows (the appended rows are
  /// clustered from the current end). Returns the first new cluster's index (the same in every
  /// head). Throws CapacityError as append() does, with the sequence unchanged.
  int32_t append_clustered(SeqId seq, int32_t layer, const KvRows& rows, const int32_t* labels,
                           int32_t num_clusters);

  // ---- reading ----
  HeadLayout layout(SeqId seq, int32_t layer, int32_t kv_head) const;
  ClusterSpan cluster_span(SeqId seq, int32_t layer, int32_t kv_head, int32_t cluster) const;
  /// Copies slots [slot_begin, slot_begin + count) into k_out / v_out (count rows each).
  void read_slots(SeqId seq, int32_t layer, int32_t kv_head, int64_t slot_begin, int64_t count,
                  void* k_out, void* v_out) const;
  /// Copies positions [pos_begin, pos_begin + count), in token order, into k_out / v_out.
  void read_positions(SeqId seq, int32_t layer, int32_t kv_head, int64_t pos_begin, int64_t count,
                      void* k_out, void* v_out) const;
  /// Token position of each slot in [slot_begin, slot_begin + count).
  void slot_positions(SeqId seq, int32_t layer, int32_t kv_head, int64_t slot_begin, int64_t count,
                      int64_t* positions_out) const;
  /// Calls fn for each page-contained run of slots [slot_begin, slot_begin + count), in order,
  /// under the sequence's shared lock (fn must not call back into the store for this sequence).
  void for_each_run(SeqId seq, int32_t layer, int32_t kv_head, int64_t slot_begin, int64_t count,
                    const std::function<void(const RowRun&)>& fn) const;

  /// for_each_run over one cluster's slots, under one lookup and one lock; returns its span.
  /// Throws InvalidArgumentError for a cluster id out of range.
  ClusterSpan for_each_cluster_run(SeqId seq, int32_t layer, int32_t kv_head, int32_t cluster,
                                   const std::function<void(const RowRun&)>& fn) const;

  // ---- accounting ----
  const KvShape& shape() const { return shape_; }
  size_t row_bytes() const { return row_bytes_; }
  int64_t rows_per_page() const { return rows_per_page_; }
  const HostArena& arena() const { return arena_; }
  HostArena& arena() { return arena_; }  ///< e.g. to reserve() pages ahead of appends
  /// Host bytes held by one sequence (whole pages, K and V).
  size_t sequence_bytes(SeqId seq) const;

 private:
  struct Head;
  struct Sequence;
  std::shared_ptr<Sequence> find(SeqId seq) const;  // throws NotFoundError
  void check_head(SeqId seq, int32_t layer, int32_t kv_head) const;
  void check_rows(const KvRows& rows) const;
  template <typename Fill>
  void grow_layer(Sequence& s, SeqId seq, int32_t layer, const KvRows& rows, const Fill& fill);
  ClusterSpan cluster_span_locked(const Head& h, SeqId seq, int32_t layer, int32_t kv_head,
                                  int32_t cluster) const;
  void runs_locked(const Head& h, int64_t slot_begin, int64_t count,
                   const std::function<void(const RowRun&)>& fn) const;

  const KvShape shape_;
  const size_t row_bytes_;
  HostArena arena_;
  const int64_t rows_per_page_;
  struct Map;
  std::unique_ptr<Map> map_;
};

}  // namespace kvtier::memory
