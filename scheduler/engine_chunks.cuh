// Device code of the engine's chunk builder (CUDA builds only): one problem's attention chunk
// list and step record, built by a whole thread block, alone (build_chunks_kernel) or as the
// epilogue of the cluster selection. Included by the engine's .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "kernels/cluster_select_kernels.cuh"
#include "scheduler/engine_kernels.h"

namespace kvtier::scheduler {
namespace chunks_device {

constexpr int kBuildThreads = 256;

static_assert(sizeof(RecallProblem) % 4 == 0, "RecallProblem is staged in 4-byte words");

/// What build_problem_chunks can read from shared memory instead of global memory, staged while
/// the selection runs (BuildChunksEpilogue::prefetch): [the problem's RecallProblem | its
/// directory row (first cache page per cluster) | its host-slot row | with `pages`, the layer's
/// page_next], 16-byte aligned; the rows hold the problem's clusters (dir_stride entries each).
struct ChunkStage {
  int32_t dir, slot, pages, total;
  __host__ __device__ static ChunkStage of(const ChunkBuildParams& p, bool pages) {
    ChunkStage s;
    s.dir = static_cast<int32_t>((sizeof(RecallProblem) + 15) / 16 * 16);
    s.slot = s.dir + p.dir_stride * 4;
    s.pages = s.slot + p.dir_stride * 4;
    s.total = (s.pages + (pages ? p.num_pages * 4 : 0) + 15) / 16 * 16;
    return s;
  }
  /// The directory and slot rows are staged up to this many bytes, the page chains (the whole
  /// layer's, copied by every problem) up to kMaxPageBytes; beyond, they are read from global
  /// memory.
  static constexpr int64_t kMaxRowBytes = 48 * 1024;
  static constexpr int64_t kMaxPageBytes = 16 * 1024;
};

/// Problem pi's chunk list, built by a whole block of kThreads threads after its selection is
/// written: [resident rows | each selected cluster's cache pages (a hit) or host pages (a miss) |
/// the window's ring runs] at chunks + pi * chunk_stride, indptr[pi] and chunk_end[pi] its
/// bounds; then the problem's row of the step record. Begins with a barrier (the selection may
/// have been written by other threads of the block). `stage`: null, or the problem's ChunkStage
/// in shared memory, landed (with the page chains if `pages`): the directory lookups (and the
/// page-chain walks) then cost no global round trip.
template <int kThreads>
__device__ void build_problem_chunks(const ChunkBuildParams& p, int pi,
                                     const unsigned char* stage = nullptr, bool pages = false) {
  using Scan = cub::BlockScan<int32_t, kThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int32_t s_base, s_stats[4];
  __syncthreads();
  ChunkBuildParams q = p;  // where the directory lookups read
  RecallProblem pr, at;    // the problem, and its row in q's tables
  if (stage != nullptr) {
    const ChunkStage l = ChunkStage::of(p, pages);
    pr = *reinterpret_cast<const RecallProblem*>(stage);
    q.dir = reinterpret_cast<const int32_t*>(stage + l.dir);
    q.cluster_slot = reinterpret_cast<const int32_t*>(stage + l.slot);
    if (pages) q.page_next = reinterpret_cast<const int32_t*>(stage + l.pages);
    at = pr;
    at.table_row = 0;  // the staged rows are the problem's own
  } else {
    pr = p.problems[pi];
    at = pr;
  }
  kernels::KvChunk* out = p.chunks + static_cast<size_t>(pi) * p.chunk_stride;
  if (threadIdx.x < 4) s_stats[threadIdx.x] = 0;
  if (threadIdx.x == 0) {
    s_base = 0;
    if (pr.res_rows > 0) out[s_base++] = detail::make_chunk(pr.res_k, pr.res_v, pr.res_rows);
  }
  __syncthreads();
  const int32_t n = p.num_sel[pi];
  const size_t sel = static_cast<size_t>(pi) * p.sel_stride;
  int32_t hits = 0, misses = 0, host_rows = 0, rows_total = 0;
  for (int32_t t0 = 0; t0 < n; t0 += kThreads) {  // block-uniform trip count
    const int32_t j = t0 + static_cast<int32_t>(threadIdx.x);
    int32_t c = 0, rows = 0;
    int64_t where = 0;  // looked up once for both passes
    bool hit = false;
    if (j < n) {
      rows = p.sel_rows[sel + j];
      where = detail::cluster_location(q, at, p.sel_ids[sel + j]);
      c = detail::cluster_chunks_at(q, pr, where, rows, nullptr, &hit);
      hits += hit ? 1 : 0;
      misses += hit ? 0 : 1;
      host_rows += hit ? 0 : rows;
      rows_total += rows;
    }
    int32_t excl, total;
    __syncthreads();  // scan is free again (after the first tile)
    Scan(scan).ExclusiveSum(c, excl, total);
    if (j < n) detail::cluster_chunks_at(q, pr, where, rows, out + s_base + excl, &hit);
    __syncthreads();
    if (threadIdx.x == 0) s_base += total;
  }
  const int32_t v[4] = {hits, misses, host_rows, rows_total};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int32_t w =
        static_cast<int32_t>(__reduce_add_sync(0xffffffffu, static_cast<unsigned>(v[i])));
    if ((threadIdx.x & 31) == 0 && w != 0) atomicAdd(&s_stats[i], w);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int32_t count = s_base + detail::window_chunks(p, pr, out + s_base);
    const int32_t begin = static_cast<int32_t>(static_cast<int64_t>(pi) * p.chunk_stride);
    p.indptr[pi] = begin;
    p.chunk_end[pi] = begin + count;
    s_stats[3] += static_cast<int32_t>(pr.res_rows + pr.win_rows);
    for (int i = 0; i < 4; ++i) p.stats[4 * pi + i] = s_stats[i];
  }
  if (p.record != nullptr) {
    __syncthreads();
    int32_t* rec = p.record + static_cast<size_t>(*p.record_base + pi) * p.record_cols;
    if (threadIdx.x == 0) rec[0] = n;
    if (threadIdx.x < 4) rec[1 + threadIdx.x] = s_stats[threadIdx.x];
    const int32_t ids = n < p.record_cols - 5 ? n : p.record_cols - 5;
    for (int32_t j = threadIdx.x; j < ids; j += kThreads) rec[5 + j] = p.sel_ids[sel + j];
  }
}

/// The chunk builder as the epilogue of the selection (one launch for both). With `staged` (in a
/// kernel of thread block clusters), the selecting CTA copies the problem's ChunkStage into its
/// shared memory once its logits are done, while the cluster aggregates and selects.
struct BuildChunksEpilogue {
  ChunkBuildParams p;
  bool staged = false;       ///< the problem, its directory and host-slot rows
  bool stage_pages = false;  ///< and the layer's page chains

  /// The epilogue of a kernel of thread block clusters: staged as far as ChunkStage's caps allow.
  static BuildChunksEpilogue for_clusters(const ChunkBuildParams& p) {
    BuildChunksEpilogue e{p};
    e.staged = 8 * static_cast<int64_t>(p.dir_stride) <= ChunkStage::kMaxRowBytes;
    e.stage_pages = e.staged && p.num_pages > 0 &&
                    4 * static_cast<int64_t>(p.num_pages) <= ChunkStage::kMaxPageBytes;
    return e;
  }
  /// The same epilogue reading global memory only (a kernel whose shared memory the stage would
  /// overfill).
  BuildChunksEpilogue without_stage() const {
    BuildChunksEpilogue e = *this;
    e.staged = e.stage_pages = false;
    return e;
  }
  __host__ __device__ int stage_bytes() const {
    return staged ? ChunkStage::of(p, stage_pages).total : 0;
  }

  /// The problem's directory row.
  __device__ int stage_key(int problem) const { return staged ? p.problems[problem].table_row : 0; }

  /// Issues the stage's copies (cp.async, 4 bytes each: the call block and the tables are only
  /// 4-byte aligned in general); the caller commits and waits. table_row: stage_key(problem).
  template <int kThreads>
  __device__ void prefetch(const kernels::SelectKernelParams&, int problem, int n, int table_row,
                           void* stage) const {
    if (!staged) return;
    const ChunkStage l = ChunkStage::of(p, stage_pages);
    unsigned char* s = static_cast<unsigned char*>(stage);
    const int32_t* src = reinterpret_cast<const int32_t*>(p.problems + problem);
    constexpr int kWords = static_cast<int>(sizeof(RecallProblem) / 4);
    const int tid = static_cast<int>(threadIdx.x);
    if (tid < kWords) __pipeline_memcpy_async(reinterpret_cast<int32_t*>(s) + tid, src + tid, 4);
    const size_t row = static_cast<size_t>(table_row) * p.dir_stride;
    int32_t* dir = reinterpret_cast<int32_t*>(s + l.dir);
    int32_t* slot = reinterpret_cast<int32_t*>(s + l.slot);
    const int m = n < p.dir_stride ? n : p.dir_stride;  // selected ids are < n
    for (int j = tid; j < m; j += kThreads) {
      __pipeline_memcpy_async(dir + j, p.dir + row + j, 4);
      __pipeline_memcpy_async(slot + j, p.cluster_slot + row + j, 4);
    }
    if (!stage_pages) return;
    int32_t* pages = reinterpret_cast<int32_t*>(s + l.pages);
    for (int j = tid; j < p.num_pages; j += kThreads) {
      __pipeline_memcpy_async(pages + j, p.page_next + j, 4);
    }
  }

  template <int kThreads>
  __device__ void run(const kernels::SelectKernelParams&, int problem, const void* stage) const {
    build_problem_chunks<kThreads>(
        p, problem, staged && stage != nullptr ? static_cast<const unsigned char*>(stage) : nullptr,
        stage_pages);
  }
};

}  // namespace chunks_device
}  // namespace kvtier::scheduler
