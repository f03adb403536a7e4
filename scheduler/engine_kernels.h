// Small device kernels of the engine's decode path (CUDA builds only): appending the step's K/V
// rows, the fused prologue of a recall layer, the chunk builder (alone, or as the epilogue of the
// cluster selection), and the cache policy's row copies and scatters.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cluster_select.h"
#include "kernels/decode_attention.h"
#include "memory/core/cuda_fwd.h"
#include "memory/core/dtype.h"

namespace kvtier::scheduler {

struct RecallCall;

#if KVTIER_WITH_CUDA
/// Row p % src_rows (row_bytes, a multiple of 16) of k_src / v_src goes to k_dst[p] / v_dst[p],
/// p < count. The pointer arrays are device-readable.
void launch_append_rows(const void* k_src, const void* v_src, int32_t src_rows, int32_t count,
                        int32_t row_bytes, void* const* k_dst, void* const* v_dst,
                        cudaStream_t stream);

/// One kernel for everything a recall layer's decode needs before scoring: the queries copied
/// (for attention) and widened to fp32 (for scoring), the new K/V rows appended to their ring or
/// resident rows and to the step rows bound for the host tier. One block per problem p =
/// (sequence, KV head).
///
/// Its inputs are the call block [RecallCall | ... | table rows at off_rows | 4P row targets at
/// off_dst], passed by value as a kernel argument (up to kRecallBlobMax bytes; block 0 also
/// stores it at `call_block` for the kernels that follow), or, with no blob, read from
/// `call_block` (uploaded by the caller). By value, a call costs no copy-engine operation, and a
/// captured graph takes a new call through cudaGraphExecKernelNodeSetParams.
struct RecallPrologueParams {
  int32_t num_problems = 0;
  int32_t q_per_problem = 0;  ///< G * head_dim elements
  int32_t row_bytes = 0;      ///< a multiple of 16
  DType dtype = DType::kBF16;
  int32_t call_bytes = 0;  ///< size of the call block (a multiple of 16)
  int32_t off_rows = 0;    ///< byte offset of the table rows [P] in the block (read by scoring)
  int32_t off_dst = 0;     ///< byte offset of the row targets [4P]: K, V ring/resident, K, V step
  void* call_block = nullptr;  ///< device copy of the block
  void* q_copy = nullptr;      ///< [P, G, head_dim], model dtype
  float* q32 = nullptr;        ///< [P, G, head_dim]
};
inline constexpr size_t kRecallBlobMax = 32 * 1024 - 1024;
/// `blob` of p.call_bytes bytes (<= kRecallBlobMax), or null to read p.call_block.
void launch_recall_prologue(const RecallPrologueParams& p, const void* blob, cudaStream_t stream);
/// CUDA graphs: whether `node` is a prologue launched with a blob, and pointing such a node of
/// an instantiated graph at a new blob of the same size.
bool is_recall_prologue_node(cudaGraphNode_t node);
void update_recall_prologue_node(cudaGraphExec_t exec, cudaGraphNode_t node,
                                 const RecallPrologueParams& p, const void* blob);

#endif

}  // namespace kvtier::scheduler

namespace kvtier::scheduler {

/// The per-call inputs of a recall layer's decode that its kernels read from device memory, so
/// the layer's launches can be replayed as one CUDA graph while these change every call.
struct RecallCall {
  const void* q = nullptr;      ///< [P, G, head_dim] the caller's queries (model dtype)
  const void* k_new = nullptr;  ///< [P, head_dim] the step's new rows
  const void* v_new = nullptr;
  void* out = nullptr;      ///< [P, G, head_dim] the caller's output
  int32_t record_base = 0;  ///< record row of this call's first problem (the layer's step record)
  int32_t reserved = 0;
  float* lse = nullptr;  ///< [P / Hkv, Hq] the caller's log-sum-exp output, or null
  void* reserved2 = nullptr;
};

/// One (sequence, KV head) of a recall layer, as the chunk builder sees it.
struct RecallProblem {
  const std::byte* res_k = nullptr;  ///< resident (sink) rows of this head
  const std::byte* res_v = nullptr;
  const std::byte* win_k = nullptr;  ///< window ring of this head: position q at slot q % win_cap
  const std::byte* win_v = nullptr;
  const std::byte* const* host_pages = nullptr;  ///< [max_pages][2]: K, V base of host page i
  int64_t res_rows = 0;
  int64_t win_begin = 0;  ///< first unclustered position
  int64_t win_rows = 0;
  int64_t win_cap = 0;
  int32_t table_row = 0;  ///< row of this head in the directory tables
  int32_t reserved = 0;
};

/// Everything the chunk builder reads: the selection, the GPU cache directory (cluster -> first
/// cache page, pages chained by page_next), and the host-tier directory (cluster -> first slot;
/// slots are in host pages of rows_per_page rows).
struct ChunkBuildParams {
  int32_t num_problems = 0;
  int32_t sel_stride = 0;  ///< row stride of sel_ids / sel_rows
  int32_t dir_stride = 0;  ///< row stride of dir / cluster_slot (clusters per head)
  int32_t page_size = 0;
  int32_t rows_per_page = 0;  ///< host page rows
  int32_t row_bytes = 0;
  const RecallProblem* problems = nullptr;
  const int32_t* num_sel = nullptr;
  const int32_t* sel_ids = nullptr;
  const int32_t* sel_rows = nullptr;
  const int32_t* dir = nullptr;           ///< [rows, dir_stride]: first cache page or -1
  const int32_t* page_next = nullptr;     ///< [num_pages]: next page of the cluster or -1
  int32_t num_pages = 0;                  ///< the layer's cache pages (staging only)
  const int32_t* cluster_slot = nullptr;  ///< [rows, dir_stride]: first host slot
  const std::byte* k_pool = nullptr;
  const std::byte* v_pool = nullptr;
  int32_t* counts = nullptr;  ///< [num_problems] chunks (host builder only)
  /// [num_problems, 4]: clusters found in the cache, not found, rows read from the host, rows
  /// attended.
  int32_t* stats = nullptr;
  kernels::KvChunk* chunks = nullptr;  ///< out
  /// out: the host builder writes the lists adjacently, indptr [num_problems + 1]; the device
  /// builder writes problem p's list at chunks + p * chunk_stride, with indptr[p] and chunk_end[p]
  /// its bounds ([num_problems] each: attention reads them as chunk_indptr and chunk_end).
  int32_t* indptr = nullptr;
  int32_t* chunk_end = nullptr;  ///< device builder only
  int32_t chunk_stride = 0;      ///< device builder only: chunks per problem's region
  /// Optional (device builder only): the layer's step record, rows of record_cols ints, one per
  /// problem from row *record_base on: [selected count, the 4 stats, selected ids...]. The
  /// record is what the background cache policy reads after the step.
  int32_t* record = nullptr;
  const int32_t* record_base = nullptr;
  int32_t record_cols = 0;
};

#if defined(__CUDACC__)
#define KVTIER_HD __host__ __device__ __forceinline__
#else
#define KVTIER_HD inline
#endif

namespace detail {

KVTIER_HD kernels::KvChunk make_chunk(const std::byte* k, const std::byte* v, int64_t rows) {
  kernels::KvChunk c;
  c.k = k;
  c.v = v;
  c.num_rows = static_cast<int32_t>(rows);
  return c;
}

/// Where a cluster's rows are: its first cache page (>= 0) when the directory has the cluster,
/// else -1 - its first host slot.
KVTIER_HD int64_t cluster_location(const ChunkBuildParams& p, const RecallProblem& pr, int32_t id) {
  const size_t di = static_cast<size_t>(pr.table_row) * p.dir_stride + id;
  const int32_t page = p.dir[di];
  return page >= 0 ? page : -1 - static_cast<int64_t>(p.cluster_slot[di]);
}

/// Chunks of one selected cluster (its first `rows` rows) at `where` (cluster_location), written
/// to `out` unless null: cache pages for a hit, else host pages (mapped memory). *hit says which.
KVTIER_HD int32_t cluster_chunks_at(const ChunkBuildParams& p, const RecallProblem& pr,
                                    int64_t where, int32_t rows, kernels::KvChunk* out, bool* hit) {
  int32_t n = 0;
  if (where >= 0) {
    *hit = true;
    if (out == nullptr) return (rows + p.page_size - 1) / p.page_size;
    int32_t page = static_cast<int32_t>(where);
    const size_t page_bytes = static_cast<size_t>(p.page_size) * p.row_bytes;
    for (int32_t left = rows; left > 0; left -= p.page_size, page = p.page_next[page]) {
      out[n++] = make_chunk(p.k_pool + page * page_bytes, p.v_pool + page * page_bytes,
                            left < p.page_size ? left : p.page_size);
    }
    return n;
  }
  *hit = false;
  int64_t slot = -1 - where;
  for (int32_t left = rows; left > 0;) {
    const int64_t pg = slot / p.rows_per_page, off = slot % p.rows_per_page;
    const int64_t r = left < p.rows_per_page - off ? left : p.rows_per_page - off;
    if (out) {
      out[n] = make_chunk(pr.host_pages[2 * pg] + off * p.row_bytes,
                          pr.host_pages[2 * pg + 1] + off * p.row_bytes, r);
    }
    ++n;
    left -= static_cast<int32_t>(r);
    slot += r;
  }
  return n;
}

/// cluster_chunks_at the cluster's location.
KVTIER_HD int32_t cluster_chunks(const ChunkBuildParams& p, const RecallProblem& pr, int32_t id,
                                 int32_t rows, kernels::KvChunk* out, bool* hit) {
  return cluster_chunks_at(p, pr, cluster_location(p, pr, id), rows, out, hit);
}

/// Window ring runs of a problem (0, 1 or 2 chunks), written unless null.
KVTIER_HD int32_t window_chunks(const ChunkBuildParams& p, const RecallProblem& pr,
                                kernels::KvChunk* out) {
  int32_t n = 0;
  for (int64_t i = 0; i < pr.win_rows;) {
    const int64_t slot = (pr.win_begin + i) % pr.win_cap;
    const int64_t run = pr.win_rows - i < pr.win_cap - slot ? pr.win_rows - i : pr.win_cap - slot;
    if (out) {
      out[n] = make_chunk(pr.win_k + slot * p.row_bytes, pr.win_v + slot * p.row_bytes, run);
    }
    ++n;
    i += run;
  }
  return n;
}

}  // namespace detail

/// Host version: counts, stats, chunks and indptr in one pass (host pointers).
void build_recall_chunks_host(const ChunkBuildParams& p);

/// One (sequence, layer, KV head) whose committed window's clusters enter the GPU cache: its
/// window ring (position q at slot q % win_cap) and the layer's cache pools.
struct AdmitItem {
  const std::byte* ring_k = nullptr;
  const std::byte* ring_v = nullptr;
  std::byte* k_pool = nullptr;
  std::byte* v_pool = nullptr;
  int64_t begin = 0;  ///< position of the window's first row
  int64_t win_cap = 0;
};

/// Window admission: row i of item b's window (positions begin + i, i < window) has label
/// labels[b * window + i] < clusters; the r-th row of cluster c in window order goes to row
/// r % page_size of page pages[page_off[b * (clusters + 1) + c] + r / page_size] (K and V). A
/// cluster with an empty page range is skipped.
struct AdmitParams {
  int32_t count = 0;  ///< items
  int32_t window = 0;
  int32_t clusters = 0;
  int32_t page_size = 0;
  int32_t row_bytes = 0;  ///< a multiple of 16
  const AdmitItem* items = nullptr;
  const int32_t* labels = nullptr;    ///< [count, window]
  const int32_t* page_off = nullptr;  ///< [count, clusters + 1]
  const int32_t* pages = nullptr;
};

/// Host version (kCpu, and the reference of the kernel).
void admit_rows_host(const AdmitParams& p);

#if KVTIER_WITH_CUDA
/// One block per problem builds its chunk list in its region (chunk_stride chunks; the caller
/// bounds a list by it) and its step-record row.
void launch_build_recall_chunks(const ChunkBuildParams& p, cudaStream_t stream);

/// A recall layer's scoring, selection and chunk lists (kernels::launch_score_select_split with the
/// builder as its epilogue): one kernel of thread block clusters on sm_90, else the split logits
/// and then per problem one block that aggregates the scores, selects, and builds the chunks.
/// Requires what that requires (group_size <= 32, max_clusters <= kMaxBlockSortClusters); t's
/// selection outputs must be bp's sel_ids / sel_rows / num_sel.
void launch_recall_select_build(const kernels::ClusterSelectParams& sp,
                                const kernels::ClusterSelectTensors& t, void* workspace,
                                size_t workspace_bytes, const ChunkBuildParams& bp,
                                cudaStream_t stream);

/// launch_recall_select_build and the layer's attention over the lists it builds (ap, at: chunks,
/// chunk_indptr and chunk_end those of bp) in one kernel of thread block clusters
/// (kernels/select_attend_kernels.cuh), when the device, the shapes and KVTIER_SELECT_ATTEND allow
/// it; false, with nothing launched, otherwise.
bool launch_recall_select_attend(const kernels::ClusterSelectParams& sp,
                                 const kernels::ClusterSelectTensors& t, void* workspace,
                                 size_t workspace_bytes, const ChunkBuildParams& bp,
                                 const kernels::DecodeAttentionParams& ap,
                                 const kernels::DecodeAttentionTensors& at, cudaStream_t stream);

/// For each item: copy num_rows rows (row_bytes each, a multiple of 16) from k to k_copy and
/// from v to v_copy (sources may be mapped host memory). One launch for any number of items.
void launch_copy_rows(const kernels::KvChunk* items, int32_t count, int32_t row_bytes,
                      cudaStream_t stream);

/// admit_rows_host on the device: one block per item (device pointers).
void launch_admit_rows(const AdmitParams& p, cudaStream_t stream);

/// dir[idx[i]] = val[i] for i < count (count 0: nothing).
void launch_scatter_i32(int32_t* dst, const int32_t* idx, const int32_t* val, int32_t count,
                        cudaStream_t stream);
#endif

}  // namespace kvtier::scheduler
