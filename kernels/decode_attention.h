// Decode attention: one query token per sequence against its KV rows, for a batch of sequences,
// GQA-aware. A problem is one (sequence, KV head); its KV is a list of chunks, each a run of
// consecutive rows of that head, so sparse attention over [sink | selected cache pages | local
// window] and dense attention (one chunk per problem) are the same call.
//   decode_attention_ref     the specification: plain loops, double accumulation
//   decode_attention_cpu     oneTBB, fp32 online softmax, each KV row read once for the group
//   launch_decode_attention  CUDA split-KV (flash-decoding) with a log-sum-exp merge; optionally
//                            copies the rows it reads into the cache ("fused fetch")
// The dense_* entry points take K/V stored contiguously per problem ([seq, kv_head, max_len, D])
// and run the same code through another row-address source.
// Nothing here holds state: concurrent calls are safe when their outputs do not overlap.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "memory/core/cuda_fwd.h"
#include "memory/core/dtype.h"

namespace kvtier::kernels {

/// num_rows consecutive rows of one KV head: K row r at k + r * head_dim elements, V row r at
/// v + r * head_dim elements. If k_copy (v_copy) is not null, the attention also writes every K
/// (V) row it reads there, same layout, bitwise: this is "fused fetch", where k/v point at mapped
/// pinned host memory (a cache miss) and k_copy/v_copy at the cache pages the rows must land in,
/// so the miss is fetched in the same pass that attends to it. The copy must not overlap any
/// row a call reads. 48 bytes, 16-byte aligned; shared with device code.
struct alignas(16) KvChunk {
  const void* k = nullptr;  ///< [num_rows, head_dim] of dtype
  const void* v = nullptr;  ///< [num_rows, head_dim] of dtype
  void* k_copy = nullptr;   ///< [num_rows, head_dim] or null
  void* v_copy = nullptr;   ///< [num_rows, head_dim] or null
  int32_t num_rows = 0;     ///< >= 0; 0 is allowed anywhere in a list
  int32_t reserved = 0;
  int64_t reserved2 = 0;
};
static_assert(sizeof(KvChunk) == 48, "KvChunk is shared with device code");
static_assert(alignof(KvChunk) == 16, "KvChunk is loaded with 16-byte vectors");

/// Shapes and options of one call.
struct DecodeAttentionParams {
  int32_t num_seqs = 0;        ///< >= 0
  int32_t num_q_heads = 0;     ///< a multiple of num_kv_heads
  int32_t num_kv_heads = 0;    ///< >= 1; query head qh uses KV head qh / G, G = q / kv heads
  int32_t head_dim = 0;        ///< 64, 128 or 256
  DType dtype = DType::kBF16;  ///< of q, K, V and out: kF16 or kBF16 (the CPU paths also kF32)
  float scale = 0.f;           ///< logit = scale * dot(q, k); 0 means 1/sqrt(head_dim)
  /// GPU only: splits of each problem's rows (split-KV); 0 chooses from the device's size and
  /// the rows. Any value >= 1 is honoured (splits beyond the rows are empty, and correct).
  int32_t num_splits = 0;
};

/// The arrays of a chunked call: host pointers for the CPU paths, device pointers for the GPU
/// (chunk k/v may also be mapped pinned host memory there). Nothing is owned.
struct DecodeAttentionTensors {
  const void* q = nullptr;          ///< [num_seqs, num_q_heads, head_dim] of dtype
  const KvChunk* chunks = nullptr;  ///< all problems' chunks; problem p = seq * num_kv_heads + h
  /// [num_seqs * num_kv_heads + 1]: problem p's chunks are [indptr[p], indptr[p + 1]) in order;
  /// its rows are the concatenation of those chunks' rows.
  const int32_t* chunk_indptr = nullptr;
  void* out = nullptr;   ///< [num_seqs, num_q_heads, head_dim] of dtype
  float* lse = nullptr;  ///< optional [num_seqs, num_q_heads]; see below
  /// Optional [num_seqs * num_kv_heads]: problem p's chunks are [indptr[p], chunk_end[p]) instead,
  /// so the problems' lists need not be adjacent (a builder that writes each problem's list into
  /// a fixed region of its own needs no scan over the problems; indptr[p + 1] is then not read).
  const int32_t* chunk_end = nullptr;
  /// GPU only, optional: a device address holding the output pointer, read when the kernels run
  /// instead of `out` (a captured CUDA graph then writes to whatever buffer the caller put there
  /// before the replay). The CPU paths write `out`.
  void* const* out_at = nullptr;
  /// GPU only, optional: likewise for lse (the address read there may be null: no lse).
  float* const* lse_at = nullptr;
  /// GPU only, optional [num_seqs * num_q_heads] int32, all zero before the first launch that
  /// uses them (every launch leaves them zero): with several splits, the last split block of each
  /// (problem, head tile) merges the tile's splits itself (up to 256 splits), instead of a second
  /// kernel. Calls that may run concurrently need counters of their own.
  int32_t* merge_counters = nullptr;
};

/// The arrays of a dense call: every problem's rows are contiguous at a fixed stride.
struct DenseDecodeTensors {
  const void* q = nullptr;  ///< [num_seqs, num_q_heads, head_dim] of dtype
  /// [num_seqs, num_kv_heads, max_len, head_dim] of dtype: row r of problem (s, h) at
  /// ((s * num_kv_heads + h) * max_len + r) * head_dim elements. V likewise.
  const void* k = nullptr;
  const void* v = nullptr;
  const int32_t* seq_lens = nullptr;  ///< [num_seqs] rows of each sequence, in [0, max_len]
  int64_t max_len = 0;                ///< rows per (sequence, KV head) slab; host-known
  void* out = nullptr;                ///< [num_seqs, num_q_heads, head_dim] of dtype
  float* lse = nullptr;               ///< optional [num_seqs, num_q_heads]
};

// What every path computes, per sequence s and query head qh (KV head h = qh / G, problem
// p = s * num_kv_heads + h, rows r of p in chunk order):
//   logit_r = scale * dot(q[s, qh], K_r);  out[s, qh] = sum_r softmax(logit)_r * V_r
//   lse[s, qh] = log(sum_r exp(logit_r))     (natural log; the "scaled logits" above)
// A problem with no rows writes zeros to out and -inf to lse. The CPU and GPU paths accumulate
// in fp32 with an online softmax; out is rounded to dtype once. NaN or Inf in q, K or V are not
// detected: they propagate into out.

/// Throws InvalidArgumentError naming the value unless: num_seqs >= 0, num_kv_heads >= 1,
/// num_q_heads >= 1 and a multiple of num_kv_heads, head_dim in {64, 128, 256}, dtype one of
/// kF16/kBF16/kF32, scale finite and >= 0, num_splits >= 0, and the output sizes fit int32 rows.
void check_decode_attention_params(const DecodeAttentionParams& p);
/// The scale actually applied: p.scale, or 1/sqrt(head_dim) when p.scale == 0.
float decode_attention_scale(const DecodeAttentionParams& p);

// ---- CPU (host pointers) ----
//
// Both CPU paths validate the chunk lists before reading anything: indptr[0] >= 0 and
// non-decreasing (with chunk_end: each indptr[p] >= 0 and chunk_end[p] >= indptr[p]), chunk
// num_rows >= 0, k and v non-null for a non-empty chunk. A bad value throws InvalidArgumentError
// naming the problem and chunk ("problem 3: chunk 17 has num_rows -2"). Fused copies
// (k_copy/v_copy) are done by both: each row exactly once.

/// Reference: every (sequence, query head) separately, logits and sums in double.
void decode_attention_ref(const DecodeAttentionParams& p, const DecodeAttentionTensors& t);
/// oneTBB: problems, and pieces of long problems, in parallel; each KV row is converted once for
/// the G heads of its group; fp32 online softmax; pieces merged by log-sum-exp. The result does
/// not depend on the number of threads. Runs in the calling thread's task arena.
void decode_attention_cpu(const DecodeAttentionParams& p, const DecodeAttentionTensors& t);
/// The dense layout through the reference (one chunk per problem). Throws unless seq_lens are in
/// [0, max_len] and k, v are non-null when max_len > 0.
void dense_decode_attention_ref(const DecodeAttentionParams& p, const DenseDecodeTensors& t);
/// The dense layout through the oneTBB path.
void dense_decode_attention_cpu(const DecodeAttentionParams& p, const DenseDecodeTensors& t);

// ---- GPU (device pointers, ordered on `stream`) ----
//
// Split-KV: a grid of (problem, tile of up to 8 query heads, split) thread blocks. Each block
// reads its slice of the problem's rows once for all heads of its tile (G <= 8: the whole group),
// keeps fp32 online-softmax state per head, and writes either out and lse directly (one split) or
// a partial output and lse into the workspace, which a second kernel merges by log-sum-exp.
// dtype must be kF16 or kBF16. q, out (and dense k, v) must be 16-byte aligned; so must every
// chunk's k, v, k_copy and v_copy (they are device memory and are not checked on the host).
// Device arrays are not validated: a negative num_rows counts as 0, a decreasing indptr as an
// empty problem, a dense seq_len is clamped to [0, max_len]. Results are deterministic (no
// atomics): the same inputs and splits give bitwise the same outputs.

#if KVTIER_WITH_CUDA
/// Splits per problem that a launch with these params will use: p.num_splits if set, else a
/// number that fills the device (resident blocks of the current device, several waves avoided)
/// with at least 64 rows per split of a max_rows_per_problem-row problem. Queries the current
/// device once per process and kernel variant; launches nothing.
int32_t decode_attention_num_splits(const DecodeAttentionParams& p, int64_t max_rows_per_problem);

/// Bytes of device workspace a launch needs: 0 with one split, else
/// num_seqs * num_q_heads * splits * (head_dim + 1) floats (plus alignment).
size_t decode_attention_workspace_bytes(const DecodeAttentionParams& p,
                                        int64_t max_rows_per_problem);

/// Chunked decode attention on `stream`. max_rows_per_problem is a host-known upper bound on any
/// problem's total rows (>= 0); it only chooses the number of splits, so a problem that exceeds
/// it is still computed correctly. `workspace` is device memory of at least
/// decode_attention_workspace_bytes(p, max_rows_per_problem) bytes (null when that is 0); it must
/// not be used by other work until the launch completes. Chunk descriptors and indptr must be
/// device-readable; the chunk rows may be device memory or mapped pinned host memory.
void launch_decode_attention(const DecodeAttentionParams& p, const DecodeAttentionTensors& t,
                             int64_t max_rows_per_problem, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

/// Dense decode attention on `stream` (t.seq_lens in device memory, t.max_len host-known and used
/// as max_rows_per_problem). Workspace: decode_attention_workspace_bytes(p, t.max_len).
void launch_dense_decode_attention(const DecodeAttentionParams& p, const DenseDecodeTensors& t,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream);
#endif

namespace detail {
/// End of problem p's chunk list: chunk_end[p] when given, else chunk_indptr[p + 1].
inline int32_t chunk_list_end(const DecodeAttentionTensors& t, int32_t problem) {
  return t.chunk_end != nullptr ? t.chunk_end[problem] : t.chunk_indptr[problem + 1];
}
/// Throws InvalidArgumentError when q, out, chunks or chunk_indptr is null while there is work.
void check_decode_attention_tensors(const DecodeAttentionParams& p,
                                    const DecodeAttentionTensors& t);
/// Validates the host chunk lists (see "CPU" above); returns each problem's total rows.
void check_chunk_lists(const DecodeAttentionParams& p, const DecodeAttentionTensors& t,
                       int64_t* problem_rows);
/// Validates a dense call's pointers and max_len (not seq_lens, which may be device memory).
void check_dense_tensors(const DecodeAttentionParams& p, const DenseDecodeTensors& t);
/// A dense call as a chunked one: one chunk per problem over host arrays. Checks p, t and the
/// host seq_lens. `tensors` points into `chunks` and `indptr`: keep the object alive while used.
struct DenseAsChunks {
  std::vector<KvChunk> chunks;
  std::vector<int32_t> indptr;
  DecodeAttentionTensors tensors;
};
DenseAsChunks dense_as_chunks(const DecodeAttentionParams& p, const DenseDecodeTensors& t);
}  // namespace detail

}  // namespace kvtier::kernels
