// TieredStore: per-head page lists in the host arena, cluster-contiguous re-layout.
#include "memory/tiered_store.h"

#include <tbb/concurrent_hash_map.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <shared_mutex>

#include "memory/core/check.h"

namespace kvtier::memory {

void check_kv_shape(const KvShape& s) {
  KVTIER_CHECK(s.num_layers > 0, "num_layers must be > 0, got ", s.num_layers);
  KVTIER_CHECK(s.num_kv_heads > 0, "num_kv_heads must be > 0, got ", s.num_kv_heads);
  check_kv_row_shape(s.dtype, s.head_dim);
}

struct TieredStore::Head {
  std::vector<HostPageId> k_pages, v_pages;
  int64_t num_rows = 0;
  int64_t index_begin = 0, index_end = 0;
  bool indexed = false;
  std::vector<int32_t> perm;             // slot - index_begin -> position - index_begin
  std::vector<int64_t> cluster_offsets;  // slots; size num_clusters + 1 once indexed
};

struct TieredStore::Sequence {
  explicit Sequence(HostArena& a, size_t n) : arena(a), heads(n) {}
  ~Sequence() {
    for (Head& h : heads) {
      arena.release(h.k_pages.data(), h.k_pages.size());
      arena.release(h.v_pages.data(), h.v_pages.size());
    }
  }
  HostArena& arena;
  mutable std::shared_mutex mu;
  std::vector<Head> heads;  // [num_layers * num_kv_heads]
};

struct TieredStore::Map {
  tbb::concurrent_hash_map<SeqId, std::shared_ptr<Sequence>> seqs;
};

namespace {
HostArenaConfig validated(const TieredStoreConfig& c) {
  check_kv_shape(c.shape);
  return c.host;
}
}  // namespace

TieredStore::TieredStore(const TieredStoreConfig& config)
    : shape_(config.shape),
      row_bytes_(config.shape.row_bytes()),
      arena_(validated(config)),
      rows_per_page_(static_cast<int64_t>(arena_.page_bytes() / row_bytes_)),
      map_(std::make_unique<Map>()) {
  KVTIER_CHECK(arena_.page_bytes() % row_bytes_ == 0, "host page_bytes ", arena_.page_bytes(),
               " is not a multiple of the row size ", row_bytes_);
}

TieredStore::~TieredStore() { map_->seqs.clear(); }

void TieredStore::add_sequence(SeqId seq) {
  auto s = std::make_shared<Sequence>(
      arena_, static_cast<size_t>(shape_.num_layers) * static_cast<size_t>(shape_.num_kv_heads));
  decltype(map_->seqs)::accessor acc;
  KVTIER_CHECK(map_->seqs.insert(acc, seq), "sequence ", seq, " already exists");
  acc->second = std::move(s);
}

void TieredStore::remove_sequence(SeqId seq) {
  std::shared_ptr<Sequence> victim;
  {
    decltype(map_->seqs)::accessor acc;
    if (!map_->seqs.find(acc, seq))
      throw NotFoundError(detail::str_cat("kvtier: unknown sequence ", seq));
    victim = std::move(acc->second);
    map_->seqs.erase(acc);
  }
  // Pages go back to the arena when the last reader lets go of the sequence.
}

bool TieredStore::contains(SeqId seq) const {
  decltype(map_->seqs)::const_accessor acc;
  return map_->seqs.find(acc, seq);
}

size_t TieredStore::num_sequences() const { return map_->seqs.size(); }

std::shared_ptr<TieredStore::Sequence> TieredStore::find(SeqId seq) const {
  decltype(map_->seqs)::const_accessor acc;
  if (!map_->seqs.find(acc, seq))
    throw NotFoundError(detail::str_cat("kvtier: unknown sequence ", seq));
  return acc->second;
}

void TieredStore::check_head(SeqId seq, int32_t layer, int32_t kv_head) const {
  KVTIER_CHECK(layer >= 0 && layer < shape_.num_layers, "layer ", layer, " of sequence ", seq,
               " is out of range [0, ", shape_.num_layers, ")");
  KVTIER_CHECK(kv_head >= 0 && kv_head < shape_.num_kv_heads, "kv_head ", kv_head, " of sequence ",
               seq, " is out of range [0, ", shape_.num_kv_heads, ")");
}

namespace {
int64_t pages_for(int64_t rows, int64_t rows_per_page) {
  return (rows + rows_per_page - 1) / rows_per_page;
}
}  // namespace

namespace {
// Appends with at least this many rows copy their KV heads in parallel (a prompt's layer);
// smaller ones (a decode step's rows) stay on the calling thread.
constexpr int64_t kParallelRows = 2048;
}  // namespace

void TieredStore::check_rows(const KvRows& rows) const {
  KVTIER_CHECK(rows.dtype == shape_.dtype, "dtype ", dtype_name(rows.dtype),
               " does not match the store's ", dtype_name(shape_.dtype));
  KVTIER_CHECK(rows.head_dim == shape_.head_dim, "head_dim ", rows.head_dim,
               " does not match the store's ", shape_.head_dim);
  KVTIER_CHECK(rows.num_kv_heads == shape_.num_kv_heads, "num_kv_heads ", rows.num_kv_heads,
               " does not match the store's ", shape_.num_kv_heads);
  KVTIER_CHECK(rows.num_rows >= 0, "num_rows must be >= 0, got ", rows.num_rows);
  KVTIER_CHECK(rows.num_rows == 0 || (rows.k != nullptr && rows.v != nullptr),
               "append: k and v must not be null");
  const int64_t row_stride = rows.row_stride >= 0 ? rows.row_stride : shape_.head_dim;
  KVTIER_CHECK(row_stride >= shape_.head_dim, "row_stride ", row_stride, " is below head_dim ",
               shape_.head_dim);
}

// Grows every head of `layer` by rows.num_rows slots (all or nothing), then calls
// fill(head index, Head&, old_rows, K source, V source, row stride in bytes) for each head, in
// parallel for large appends. Runs under the sequence's lock.
template <typename Fill>
void TieredStore::grow_layer(Sequence& s, SeqId seq, int32_t layer, const KvRows& rows,
                             const Fill& fill) {
  const size_t base = static_cast<size_t>(layer) * shape_.num_kv_heads;
  const int64_t old_rows = s.heads[base].num_rows;  // all heads of a layer grow together
  const int64_t new_pages_per_head =
      pages_for(old_rows + rows.num_rows, rows_per_page_) - pages_for(old_rows, rows_per_page_);
  std::vector<HostPageId> fresh;
  if (new_pages_per_head > 0) {
    const size_t need = static_cast<size_t>(new_pages_per_head) * 2 * shape_.num_kv_heads;
    Status st = arena_.allocate(need, &fresh);
    if (!st.is_ok()) {
      throw CapacityError(detail::str_cat("kvtier: appending ", rows.num_rows, " rows to sequence ",
                                          seq, " layer ", layer, ": ", st.message(),
                                          "; the stored KV is unchanged"));
    }
  }
  const size_t esize = dtype_size(shape_.dtype);
  const int64_t row_stride = rows.row_stride >= 0 ? rows.row_stride : shape_.head_dim;
  const int64_t head_stride = rows.head_stride >= 0 ? rows.head_stride : rows.num_rows * row_stride;
  for (int32_t h = 0; h < shape_.num_kv_heads; ++h) {
    Head& head = s.heads[base + h];
    KVTIER_ASSERT(head.num_rows == old_rows);
    for (int64_t i = 0; i < new_pages_per_head; ++i) {
      head.k_pages.push_back(fresh[static_cast<size_t>((h * new_pages_per_head + i) * 2)]);
      head.v_pages.push_back(fresh[static_cast<size_t>((h * new_pages_per_head + i) * 2 + 1)]);
    }
  }
  auto one = [&](int32_t h) {
    const auto* k = static_cast<const std::byte*>(rows.k) + h * head_stride * esize;
    const auto* v = static_cast<const std::byte*>(rows.v) + h * head_stride * esize;
    fill(h, s.heads[base + h], old_rows, k, v, static_cast<size_t>(row_stride) * esize);
  };
  if (rows.num_rows >= kParallelRows && shape_.num_kv_heads > 1) {
    // Isolated: this thread holds the sequence's lock, and while it waits for the loop it must
    // not pick up an unrelated task (say another layer's append to this sequence) that would
    // take the lock again.
    tbb::this_task_arena::isolate([&] { tbb::parallel_for(0, shape_.num_kv_heads, one); });
  } else {
    for (int32_t h = 0; h < shape_.num_kv_heads; ++h) one(h);
  }
  for (int32_t h = 0; h < shape_.num_kv_heads; ++h) s.heads[base + h].num_rows += rows.num_rows;
}

void TieredStore::append(SeqId seq, int32_t layer, const KvRows& rows) {
  check_head(seq, layer, 0);
  check_rows(rows);
  if (rows.num_rows == 0) return;
  auto s = find(seq);
  std::unique_lock<std::shared_mutex> lock(s->mu);
  const int64_t n = rows.num_rows;
  grow_layer(*s, seq, layer, rows,
             [&](int32_t, Head& head, int64_t old_rows, const std::byte* k, const std::byte* v,
                 size_t src_row) {
               // Page by page: rows contiguous in the source (src_row == row_bytes_) go in one
               // copy per page.
               for (int64_t r = 0; r < n;) {
                 const int64_t slot = old_rows + r;
                 const int64_t run = std::min(n - r, rows_per_page_ - slot % rows_per_page_);
                 const size_t off = static_cast<size_t>(slot % rows_per_page_) * row_bytes_;
                 std::byte* dk = arena_.host_ptr(head.k_pages[slot / rows_per_page_]) + off;
                 std::byte* dv = arena_.host_ptr(head.v_pages[slot / rows_per_page_]) + off;
                 if (src_row == row_bytes_) {
                   std::memcpy(dk, k + r * src_row, run * row_bytes_);
                   std::memcpy(dv, v + r * src_row, run * row_bytes_);
                 } else {
                   for (int64_t i = 0; i < run; ++i) {
                     std::memcpy(dk + i * row_bytes_, k + (r + i) * src_row, row_bytes_);
                     std::memcpy(dv + i * row_bytes_, v + (r + i) * src_row, row_bytes_);
                   }
                 }
                 r += run;
               }
             });
}

int32_t TieredStore::append_clustered(SeqId seq, int32_t layer, const KvRows& rows,
                                      const int32_t* labels, int32_t num_clusters) {
  check_head(seq, layer, 0);
  check_rows(rows);
  KVTIER_CHECK(num_clusters > 0, "num_clusters must be > 0, got ", num_clusters);
  const int64_t n = rows.num_rows;
  const int32_t H = shape_.num_kv_heads;
  KVTIER_CHECK(n == 0 || labels != nullptr, "labels must not be null");
  for (int64_t i = 0; i < n * H; ++i) {
    KVTIER_CHECK(labels[i] >= 0 && labels[i] < num_clusters, "label ", labels[i], " of row ", i % n,
                 " of KV head ", i / n, " is out of range [0, ", num_clusters, ")");
  }
  auto s = find(seq);
  std::unique_lock<std::shared_mutex> lock(s->mu);
  const size_t base = static_cast<size_t>(layer) * H;
  const int64_t old_rows = s->heads[base].num_rows;
  for (int32_t h = 0; h < H; ++h) {
    const Head& head = s->heads[base + h];
    KVTIER_CHECK(!head.indexed || head.index_end == old_rows, "append_clustered: KV head ", h,
                 " of layer ", layer, " has unclustered rows [", head.index_end, ", ", old_rows,
                 "); clustering must continue at the oldest unclustered row");
    KVTIER_CHECK(head.index_end - head.index_begin + n <= INT32_MAX, "index too large");
  }
  auto clusters_of = [](const Head& head) {
    return head.indexed ? static_cast<int32_t>(head.cluster_offsets.size() - 1) : 0;
  };
  const int32_t first = clusters_of(s->heads[base]);
  for (int32_t h = 1; h < H; ++h) {
    KVTIER_CHECK(clusters_of(s->heads[base + h]) == first, "append_clustered: KV head ", h,
                 " of layer ", layer, " has ", clusters_of(s->heads[base + h]),
                 " clusters and head 0 has ", first, "; they must be clustered together");
  }
  if (n == 0) return first;
  grow_layer(*s, seq, layer, rows,
             [&](int32_t h, Head& head, int64_t old, const std::byte* k, const std::byte* v,
                 size_t src_row) {
               const int32_t* lab = labels + static_cast<size_t>(h) * n;
               // Stable counting sort by label, as cluster() lays rows out.
               std::vector<int64_t> counts(static_cast<size_t>(num_clusters) + 1, 0);
               for (int64_t i = 0; i < n; ++i) ++counts[lab[i] + 1];
               for (int32_t c = 0; c < num_clusters; ++c) counts[c + 1] += counts[c];
               std::vector<int64_t> order(static_cast<size_t>(n));
               {
                 std::vector<int64_t> cursor(counts.begin(), counts.end() - 1);
                 for (int64_t i = 0; i < n; ++i) order[cursor[lab[i]]++] = i;
               }
               if (!head.indexed) {
                 head.indexed = true;
                 head.index_begin = head.index_end = old;
                 head.cluster_offsets.assign(1, old);
               }
               head.perm.reserve(head.perm.size() + n);
               for (int64_t j = 0; j < n; ++j) {
                 const int64_t slot = old + j;
                 const size_t off = static_cast<size_t>(slot % rows_per_page_) * row_bytes_;
                 std::memcpy(arena_.host_ptr(head.k_pages[slot / rows_per_page_]) + off,
                             k + order[j] * src_row, row_bytes_);
                 std::memcpy(arena_.host_ptr(head.v_pages[slot / rows_per_page_]) + off,
                             v + order[j] * src_row, row_bytes_);
                 head.perm.push_back(static_cast<int32_t>(old - head.index_begin + order[j]));
               }
               for (int32_t c = 0; c < num_clusters; ++c) {
                 head.cluster_offsets.push_back(old + counts[c + 1]);
               }
               head.index_end = old + n;
             });
  return first;
}

int32_t TieredStore::cluster(SeqId seq, int32_t layer, int32_t kv_head, int64_t pos_begin,
                             int64_t num_rows, const int32_t* labels, int32_t num_clusters) {
  check_head(seq, layer, kv_head);
  KVTIER_CHECK(num_clusters > 0, "num_clusters must be > 0, got ", num_clusters);
  KVTIER_CHECK(num_rows >= 0, "num_rows must be >= 0, got ", num_rows);
  KVTIER_CHECK(num_rows == 0 || labels != nullptr, "labels must not be null");
  for (int64_t i = 0; i < num_rows; ++i) {
    KVTIER_CHECK(labels[i] >= 0 && labels[i] < num_clusters, "label ", labels[i], " of row ", i,
                 " is out of range [0, ", num_clusters, ")");
  }
  auto s = find(seq);
  std::unique_lock<std::shared_mutex> lock(s->mu);
  Head& h = s->heads[static_cast<size_t>(layer) * shape_.num_kv_heads + kv_head];
  if (h.indexed) {
    KVTIER_CHECK(pos_begin == h.index_end, "clustering must continue at position ", h.index_end,
                 " (the oldest unclustered row), got ", pos_begin);
  } else {
    KVTIER_CHECK(pos_begin >= 0, "pos_begin must be >= 0, got ", pos_begin);
  }
  KVTIER_CHECK(pos_begin + num_rows <= h.num_rows, "rows [", pos_begin, ", ", pos_begin + num_rows,
               ") are past the ", h.num_rows, " rows stored");
  KVTIER_CHECK(h.index_end - h.index_begin + num_rows <= INT32_MAX, "index too large");

  if (!h.indexed) {
    h.indexed = true;
    h.index_begin = h.index_end = pos_begin;
    h.cluster_offsets.assign(1, pos_begin);
  }
  const int32_t first = static_cast<int32_t>(h.cluster_offsets.size() - 1);

  // Stable counting sort by label: order[j] = position offset of the row that lands in slot j.
  std::vector<int64_t> counts(static_cast<size_t>(num_clusters) + 1, 0);
  for (int64_t i = 0; i < num_rows; ++i) ++counts[labels[i] + 1];
  for (int32_t c = 0; c < num_clusters; ++c) counts[c + 1] += counts[c];
  std::vector<int64_t> order(static_cast<size_t>(num_rows));
  {
    std::vector<int64_t> cursor(counts.begin(), counts.end() - 1);
    for (int64_t i = 0; i < num_rows; ++i) order[cursor[labels[i]]++] = i;
  }

  // The range is still in token order (it is the tail's head), so slot == position here.
  std::vector<std::byte> k_tmp(static_cast<size_t>(num_rows) * row_bytes_);
  std::vector<std::byte> v_tmp(k_tmp.size());
  auto row = [&](std::vector<HostPageId>& pages, int64_t slot) {
    return arena_.host_ptr(pages[slot / rows_per_page_]) +
           static_cast<size_t>(slot % rows_per_page_) * row_bytes_;
  };
  for (int64_t i = 0; i < num_rows; ++i) {
    std::memcpy(k_tmp.data() + i * row_bytes_, row(h.k_pages, pos_begin + i), row_bytes_);
    std::memcpy(v_tmp.data() + i * row_bytes_, row(h.v_pages, pos_begin + i), row_bytes_);
  }
  for (int64_t j = 0; j < num_rows; ++j) {
    std::memcpy(row(h.k_pages, pos_begin + j), k_tmp.data() + order[j] * row_bytes_, row_bytes_);
    std::memcpy(row(h.v_pages, pos_begin + j), v_tmp.data() + order[j] * row_bytes_, row_bytes_);
    h.perm.push_back(static_cast<int32_t>(pos_begin - h.index_begin + order[j]));
  }
  for (int32_t c = 0; c < num_clusters; ++c) h.cluster_offsets.push_back(pos_begin + counts[c + 1]);
  h.index_end = pos_begin + num_rows;
  return first;
}

HeadLayout TieredStore::layout(SeqId seq, int32_t layer, int32_t kv_head) const {
  check_head(seq, layer, kv_head);
  auto s = find(seq);
  std::shared_lock<std::shared_mutex> lock(s->mu);
  const Head& h = s->heads[static_cast<size_t>(layer) * shape_.num_kv_heads + kv_head];
  HeadLayout l;
  l.num_rows = h.num_rows;
  l.index_begin = h.index_begin;
  l.index_end = h.index_end;
  l.num_clusters = h.indexed ? static_cast<int32_t>(h.cluster_offsets.size() - 1) : 0;
  return l;
}

ClusterSpan TieredStore::cluster_span_locked(const Head& h, SeqId seq, int32_t layer,
                                             int32_t kv_head, int32_t cluster) const {
  const int32_t n = h.indexed ? static_cast<int32_t>(h.cluster_offsets.size() - 1) : 0;
  KVTIER_CHECK(cluster >= 0 && cluster < n, "cluster ", cluster, " of sequence ", seq, " layer ",
               layer, " kv_head ", kv_head, " is out of range [0, ", n, ")");
  return {h.cluster_offsets[cluster],
          static_cast<int32_t>(h.cluster_offsets[cluster + 1] - h.cluster_offsets[cluster])};
}

ClusterSpan TieredStore::cluster_span(SeqId seq, int32_t layer, int32_t kv_head,
                                      int32_t cluster) const {
  check_head(seq, layer, kv_head);
  auto s = find(seq);
  std::shared_lock<std::shared_mutex> lock(s->mu);
  return cluster_span_locked(s->heads[static_cast<size_t>(layer) * shape_.num_kv_heads + kv_head],
                             seq, layer, kv_head, cluster);
}

void TieredStore::runs_locked(const Head& h, int64_t slot_begin, int64_t count,
                              const std::function<void(const RowRun&)>& fn) const {
  int64_t slot = slot_begin;
  const int64_t end = slot_begin + count;
  while (slot < end) {
    const int64_t page = slot / rows_per_page_;
    const int64_t in_page = slot % rows_per_page_;
    const int64_t n = std::min(end - slot, rows_per_page_ - in_page);
    const size_t off = static_cast<size_t>(in_page) * row_bytes_;
    RowRun run;
    run.slot = slot;
    run.num_rows = static_cast<int32_t>(n);
    run.k = arena_.host_ptr(h.k_pages[page]) + off;
    run.v = arena_.host_ptr(h.v_pages[page]) + off;
    if (std::byte* kd = arena_.device_ptr(h.k_pages[page])) run.k_device = kd + off;
    if (std::byte* vd = arena_.device_ptr(h.v_pages[page])) run.v_device = vd + off;
    fn(run);
    slot += n;
  }
}

void TieredStore::for_each_run(SeqId seq, int32_t layer, int32_t kv_head, int64_t slot_begin,
                               int64_t count, const std::function<void(const RowRun&)>& fn) const {
  check_head(seq, layer, kv_head);
  auto s = find(seq);
  std::shared_lock<std::shared_mutex> lock(s->mu);
  const Head& h = s->heads[static_cast<size_t>(layer) * shape_.num_kv_heads + kv_head];
  KVTIER_CHECK(slot_begin >= 0 && count >= 0 && slot_begin + count <= h.num_rows, "slots [",
               slot_begin, ", ", slot_begin + count, ") are out of range [0, ", h.num_rows, ")");
  runs_locked(h, slot_begin, count, fn);
}

ClusterSpan TieredStore::for_each_cluster_run(SeqId seq, int32_t layer, int32_t kv_head,
                                              int32_t cluster,
                                              const std::function<void(const RowRun&)>& fn) const {
  check_head(seq, layer, kv_head);
  auto s = find(seq);
  std::shared_lock<std::shared_mutex> lock(s->mu);
  const Head& h = s->heads[static_cast<size_t>(layer) * shape_.num_kv_heads + kv_head];
  const ClusterSpan span = cluster_span_locked(h, seq, layer, kv_head, cluster);
  runs_locked(h, span.slot_begin, span.num_rows, fn);
  return span;
}

void TieredStore::read_slots(SeqId seq, int32_t layer, int32_t kv_head, int64_t slot_begin,
                             int64_t count, void* k_out, void* v_out) const {
  auto* k = static_cast<std::byte*>(k_out);
  auto* v = static_cast<std::byte*>(v_out);
  for_each_run(seq, layer, kv_head, slot_begin, count, [&](const RowRun& r) {
    const size_t off = static_cast<size_t>(r.slot - slot_begin) * row_bytes_;
    std::memcpy(k + off, r.k, r.num_rows * row_bytes_);
    std::memcpy(v + off, r.v, r.num_rows * row_bytes_);
  });
}

void TieredStore::slot_positions(SeqId seq, int32_t layer, int32_t kv_head, int64_t slot_begin,
                                 int64_t count, int64_t* positions_out) const {
  check_head(seq, layer, kv_head);
  auto s = find(seq);
  std::shared_lock<std::shared_mutex> lock(s->mu);
  const Head& h = s->heads[static_cast<size_t>(layer) * shape_.num_kv_heads + kv_head];
  KVTIER_CHECK(slot_begin >= 0 && count >= 0 && slot_begin + count <= h.num_rows, "slots [",
               slot_begin, ", ", slot_begin + count, ") are out of range [0, ", h.num_rows, ")");
  for (int64_t i = 0; i < count; ++i) {
    const int64_t slot = slot_begin + i;
    positions_out[i] = (slot >= h.index_begin && slot < h.index_end)
                           ? h.index_begin + h.perm[slot - h.index_begin]
                           : slot;
  }
}

void TieredStore::read_positions(SeqId seq, int32_t layer, int32_t kv_head, int64_t pos_begin,
                                 int64_t count, void* k_out, void* v_out) const {
  check_head(seq, layer, kv_head);
  auto s = find(seq);
  std::shared_lock<std::shared_mutex> lock(s->mu);
  const Head& h = s->heads[static_cast<size_t>(layer) * shape_.num_kv_heads + kv_head];
  KVTIER_CHECK(pos_begin >= 0 && count >= 0 && pos_begin + count <= h.num_rows, "positions [",
               pos_begin, ", ", pos_begin + count, ") are out of range [0, ", h.num_rows, ")");
  // Invert the permutation over the part of the index the request touches.
  std::vector<int64_t> slot_of(static_cast<size_t>(count), -1);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t pos = pos_begin + i;
    if (pos < h.index_begin || pos >= h.index_end) slot_of[i] = pos;
  }
  const int64_t lo = std::max(pos_begin, h.index_begin),
                hi = std::min(pos_begin + count, h.index_end);
  if (lo < hi) {
    for (int64_t j = 0; j < h.index_end - h.index_begin; ++j) {
      const int64_t pos = h.index_begin + h.perm[j];
      if (pos >= lo && pos < hi) slot_of[pos - pos_begin] = h.index_begin + j;
    }
  }
  auto* k = static_cast<std::byte*>(k_out);
  auto* v = static_cast<std::byte*>(v_out);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t slot = slot_of[i];
    KVTIER_ASSERT(slot >= 0);
    const size_t off = static_cast<size_t>(slot % rows_per_page_) * row_bytes_;
    std::memcpy(k + i * row_bytes_, arena_.host_ptr(h.k_pages[slot / rows_per_page_]) + off,
                row_bytes_);
    std::memcpy(v + i * row_bytes_, arena_.host_ptr(h.v_pages[slot / rows_per_page_]) + off,
                row_bytes_);
  }
}

size_t TieredStore::sequence_bytes(SeqId seq) const {
  auto s = find(seq);
  std::shared_lock<std::shared_mutex> lock(s->mu);
  size_t pages = 0;
  for (const Head& h : s->heads) pages += h.k_pages.size() + h.v_pages.size();
  return pages * arena_.page_bytes();
}

}  // namespace kvtier::memory
