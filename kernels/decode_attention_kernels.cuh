// Device code of decode attention. Included by decode_attention.cu and GPU tests.
// One attention kernel body, templated on where rows come from (a chunk list or a dense
// [seq, kv_head, max_len, D] layout), plus the log-sum-exp merge of splits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/decode_attention.h"
#include "kernels/dispatch.h"
#include "kernels/launch.cuh"
#include "memory/core/check.h"

namespace kvtier::kernels {

/// Arguments shared by both row sources, by value.
struct AttentionKernelParams {
  const void* q;    // [num_seqs, num_q_heads, head_dim]
  void* out;        // [num_seqs, num_q_heads, head_dim] (written when num_splits == 1)
  float* lse;       // [num_seqs, num_q_heads] or null (written when num_splits == 1)
  float* part_out;  // [num_seqs * num_q_heads, num_splits, head_dim] (num_splits > 1)
  float* part_lse;  // [num_seqs * num_q_heads, num_splits] (num_splits > 1)
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t group_size;  // G = num_q_heads / num_kv_heads
  int32_t num_tiles;   // ceil(G / kMaxTileHeads)
  int32_t num_splits;
  float qk_scale;        // scale * log2(e): logits are kept in base 2
  void* const* out_at;   // or null: out is read from here at run time
  float* const* lse_at;  // or null: lse is read from here at run time (and may be null there)
  int32_t* counters;     // [num_seqs * num_q_heads] or null: the last split of a tile merges
};

/// Rows from a chunk list (KvChunk, chunk_indptr).
struct ChunkedRows {
  const KvChunk* chunks;        // all problems' chunks
  const int32_t* chunk_indptr;  // [num_problems + 1] ([num_problems] with chunk_end)
  const int32_t* chunk_end;     // [num_problems] or null: ends of the lists
};

/// Rows from a dense layout.
struct DenseRows {
  const char* k;            // [num_seqs, num_kv_heads, max_len, head_dim]
  const char* v;            // [num_seqs, num_kv_heads, max_len, head_dim]
  const int32_t* seq_lens;  // [num_seqs]
  int64_t max_len;
};

namespace decode_attention_device {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxTileHeads = 8;  // query heads per block: q and acc live in registers
/// Split ranges start at multiples of this many rows, and warp ranges at multiples of a step's
/// rows, so 16-row cache pages are never cut into partial steps.
constexpr int kRowAlign = 16;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

/// Steps of the row pipeline in flight per warp, in shared memory (a power of two). A step is
/// 1 KiB of K and V per warp, so a block keeps up to 28 KiB of loads in flight: the register
/// version (3 steps) reached only 2.0-2.2 TB/s on an H100, being limited by bytes in flight.
constexpr int kStages = 8;
/// Most splits the attention kernel merges itself (the merge weights of a tile's heads live in
/// its shared memory); more go through merge_splits_kernel.
constexpr int kFusedMergeMaxSplits = 256;
/// Blocks per SM the register budget is set for (__launch_bounds__).
template <int kG>
constexpr int min_blocks_for() {
  return kG <= 4 ? 4 : 2;
}

/// dtype dispatch of the kernels: f(TypeTag<__half>{}) or f(TypeTag<__nv_bfloat16>{}); any other
/// dtype throws.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF16:
      f(TypeTag<__half>{});
      break;
    case DType::kBF16:
      f(TypeTag<__nv_bfloat16>{});
      break;
    default:
      KVTIER_CHECK(false, "dtype ", dtype_name(dtype),
                   " is not supported by the GPU decode attention (fp16, bf16)");
  }
}

// ---- element conversion: a 16-byte vector holds 8 elements ----

template <typename T>
__device__ __forceinline__ void to_float8(const uint4& raw, float (&f)[8]);

template <>
__device__ __forceinline__ void to_float8<__nv_bfloat16>(const uint4& raw, float (&f)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

template <>
__device__ __forceinline__ void to_float8<__half>(const uint4& raw, float (&f)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x =
        __half22float2(__halves2half2(__ushort_as_half(static_cast<uint16_t>(w[i])),
                                      __ushort_as_half(static_cast<uint16_t>(w[i] >> 16))));
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

__device__ __forceinline__ void store_elem(__nv_bfloat16* p, float x) {
  *p = __float2bfloat16_rn(x);
}
__device__ __forceinline__ void store_elem(__half* p, float x) { *p = __float2half_rn(x); }

/// 2^x in one MUFU instruction (exp2f adds a denormal fix-up around it); results below 2^-126
/// flush to 0, which the softmax weights tolerate.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/// Sums kT values over the kL lanes of a row (kT <= kL, both powers of two) so that each lane ends
/// with one total: that of value (lane % kL) / (kL / kT), its "own" value. The first log2(kT)
/// stages exchange half of the remaining values each (a transpose), so the cost is kT - 1 +
/// log2(kL / kT) shuffles instead of kT log2(kL). Lanes of a row that own the same value get the
/// same bits.
template <int kT, int kL>
__device__ __forceinline__ float reduce_transpose(float (&v)[kT], int lane) {
  int o = kL / 2;
#pragma unroll
  for (int c = kT; c > 1; c >>= 1, o >>= 1) {
    const bool up = (lane & o) != 0;
#pragma unroll
    for (int i = 0; i < c / 2; ++i) {
      const float send = up ? v[i] : v[i + c / 2];
      const float keep = up ? v[i + c / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, o);
    }
  }
  float x = v[0];
#pragma unroll
  for (; o >= 1; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

/// Asynchronous 16-byte copy global -> shared (a shared-window address) that bypasses L1 (rows
/// are read once); with `valid` false nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
/// Waits until at most kPending of this thread's most recent groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

__device__ __forceinline__ void store16(void* ptr, const uint4& v) {
  *static_cast<uint4*>(ptr) = v;
}

template <typename P>
__device__ __forceinline__ P* shfl_ptr(P* ptr, int src_lane) {
  return reinterpret_cast<P*>(__shfl_sync(
      kFullMask, static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(ptr)), src_lane));
}

/// Row bounds of piece i of n of a range of `total` rows: multiples of `align` except the end.
__device__ __forceinline__ int64_t aligned_bound(int64_t total, int i, int n,
                                                 int align = kRowAlign) {
  if (i >= n) return total;
  const int64_t b = total * i / n;
  return b - b % align;
}

/// Rows of one step of a warp's row pipeline: 16 bytes of a row per lane.
template <int kHeadDim>
constexpr int rows_per_step() {
  return 32 / (kHeadDim / 8);
}

/// One step of a warp: up to R consecutive rows of one chunk. Pointers are those of the step's
/// first row; the copy pointers are null when the chunk has no copy destination.
struct Step {
  int nrows;
  const char* k;
  const char* v;
  char* k_copy;
  char* v_copy;
};

// ---- row sources: warp-collective cursors over one problem's rows ----

/// A load of chunk-list data: through the read-only cache, or, for lists written earlier in the
/// same kernel (kCoherent), from L2.
template <bool kCoherent, typename V>
__device__ __forceinline__ V load_list(const V* p) {
  if constexpr (kCoherent) {
    return __ldcg(p);
  } else {
    return __ldg(p);
  }
}

/// Walks a chunk list. The warp's lanes cache 32 consecutive descriptors (lane j holds chunk
/// window + j); the cursor's current chunk is read from its lane by shuffles, and the next
/// non-empty one is found with one ballot, so runs of empty chunks cost nothing. kCoherent: the
/// list was written by other blocks of the running kernel (read from L2, not the read-only
/// cache).
template <int kRowBytes, bool kCoherent = false>
class ChunkCursor {
 public:
  static constexpr bool kHasCopy = true;

  __device__ ChunkCursor(const ChunkedRows& src, int problem, int /*seq*/, int /*kv_head*/,
                         int lane)
      : chunks_(src.chunks), lane_(lane) {
    begin_ = load_list<kCoherent>(src.chunk_indptr + problem);
    end_ = load_list<kCoherent>((src.chunk_end != nullptr ? src.chunk_end : src.chunk_indptr + 1) +
                                problem);
    if (end_ < begin_) end_ = begin_;
  }

  /// Sum of the problem's num_rows (negative ones count as 0). Each lane loads 8 chunks per
  /// round, so a list of up to 256 chunks costs one round of loads.
  __device__ int64_t total_rows() const {
    int64_t total = 0;
    for (int base = begin_; base < end_; base += 32 * kBatch) {
      int n[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) n[i] = rows_of(base + lane_ * kBatch + i);
      int64_t s = 0;
#pragma unroll
      for (int i = 0; i < kBatch; ++i) s += n[i];
      total += warp_sum(s);
    }
    return total;
  }

  /// Chunks in the problem's list, and the rows of its i-th (0 if negative).
  __device__ int num_chunks() const { return end_ - begin_; }
  __device__ int chunk_rows(int i) const { return rows_of(begin_ + i); }

  /// Has seek() search `prefix` (shared memory, num_chunks() entries: prefix[i] the rows of
  /// chunks 0..i) instead of loading the list's row counts: a block that computed the prefix once
  /// spares each warp a pass over the list (and many warps the same lines of L2).
  __device__ void use_prefix(const int32_t* prefix) { prefix_ = prefix; }

  /// Positions the cursor at `row` (< total_rows()) with `count` rows to walk.
  __device__ void seek(int64_t row, int64_t count) {
    left_ = count;
    if (prefix_ != nullptr) {  // the first chunk whose inclusive prefix passes row
      int lo = 0, hi = num_chunks();
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (prefix_[mid] <= row) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      if (lo == num_chunks()) {
        left_ = 0;  // row beyond the problem
        return;
      }
      load_window(begin_ + lo);
      select(0);
      off_ = static_cast<int>(row - (lo > 0 ? prefix_[lo - 1] : 0));
      return;
    }
    int64_t prefix = 0;  // rows before chunk `base`
    for (int base = begin_; base < end_; base += 32 * kBatch) {
      int n[kBatch];
      int64_t lane_rows = 0;
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        n[i] = rows_of(base + lane_ * kBatch + i);
        lane_rows += n[i];
      }
      // Exclusive scan of lane_rows: the lane's first chunk starts at prefix + before.
      int64_t incl = lane_rows;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t x = __shfl_up_sync(kFullMask, incl, o);
        if (lane_ >= o) incl += x;
      }
      const int64_t before = prefix + incl - lane_rows;
      const unsigned hit = __ballot_sync(kFullMask, before <= row && row < before + lane_rows);
      if (hit != 0) {
        const int src = __ffs(hit) - 1;
        int chunk = 0;
        int64_t offset = 0;
        if (lane_ == src) {  // the one chunk of this lane's 8 that holds `row` (it has rows)
          int64_t start = before;
#pragma unroll
          for (int i = 0; i < kBatch; ++i) {
            if (start <= row && row < start + n[i]) {
              chunk = base + lane_ * kBatch + i;
              offset = row - start;
            }
            start += n[i];
          }
        }
        chunk = __shfl_sync(kFullMask, chunk, src);
        offset = __shfl_sync(kFullMask, offset, src);
        load_window(chunk);
        select(0);
        off_ = static_cast<int>(offset);
        return;
      }
      prefix += __shfl_sync(kFullMask, incl, 31);
    }
    left_ = 0;  // row beyond the problem: nothing to walk (cannot happen for row < total)
  }

  /// The next step of at most max_rows rows, all in one chunk; nrows == 0 once the range is
  /// walked.
  __device__ Step next(int max_rows) {
    Step s{0, nullptr, nullptr, nullptr, nullptr};
    if (left_ <= 0) return s;
    int n = cur_rows_ - off_;
    if (n > max_rows) n = max_rows;
    if (n > left_) n = static_cast<int>(left_);
    const size_t o = static_cast<size_t>(off_) * kRowBytes;
    s.nrows = n;
    s.k = cur_k_ + o;
    s.v = cur_v_ + o;
    s.k_copy = cur_kc_ != nullptr ? cur_kc_ + o : nullptr;
    s.v_copy = cur_vc_ != nullptr ? cur_vc_ + o : nullptr;
    off_ += n;
    left_ -= n;
    if (left_ > 0 && off_ >= cur_rows_) advance();
    return s;
  }

 private:
  static constexpr int kBatch = 8;

  __device__ int rows_of(int chunk) const {
    if (chunk >= end_) return 0;
    const int n = load_list<kCoherent>(&chunks_[chunk].num_rows);
    return n > 0 ? n : 0;
  }

  __device__ static int64_t warp_sum(int64_t x) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
    return x;
  }

  /// Lane j caches chunk window + j (or an empty slot past the end).
  __device__ void load_window(int window) {
    window_ = window;
    const int c = window + lane_;
    if (c < end_) {
      const int4* d = reinterpret_cast<const int4*>(chunks_ + c);
      const int4 a = load_list<kCoherent>(d), b = load_list<kCoherent>(d + 1),
                 e = load_list<kCoherent>(d + 2);
      w_k_ = reinterpret_cast<const char*>(static_cast<uintptr_t>(
          static_cast<uint32_t>(a.x) | (static_cast<uint64_t>(static_cast<uint32_t>(a.y)) << 32)));
      w_v_ = reinterpret_cast<const char*>(static_cast<uintptr_t>(
          static_cast<uint32_t>(a.z) | (static_cast<uint64_t>(static_cast<uint32_t>(a.w)) << 32)));
      w_kc_ = reinterpret_cast<char*>(static_cast<uintptr_t>(
          static_cast<uint32_t>(b.x) | (static_cast<uint64_t>(static_cast<uint32_t>(b.y)) << 32)));
      w_vc_ = reinterpret_cast<char*>(static_cast<uintptr_t>(
          static_cast<uint32_t>(b.z) | (static_cast<uint64_t>(static_cast<uint32_t>(b.w)) << 32)));
      w_rows_ = e.x > 0 ? e.x : 0;
    } else {
      w_k_ = w_v_ = nullptr;
      w_kc_ = w_vc_ = nullptr;
      w_rows_ = 0;
    }
  }

  /// Makes window lane `i` the current chunk.
  __device__ void select(int i) {
    cur_lane_ = i;
    cur_k_ = shfl_ptr(w_k_, i);
    cur_v_ = shfl_ptr(w_v_, i);
    cur_kc_ = shfl_ptr(w_kc_, i);
    cur_vc_ = shfl_ptr(w_vc_, i);
    cur_rows_ = __shfl_sync(kFullMask, w_rows_, i);
    off_ = 0;
  }

  /// Moves to the next chunk with rows; loads the next window when this one has none left.
  __device__ void advance() {
    for (;;) {
      const int shift = cur_lane_ + 1;  // lanes after the current one
      const unsigned after = shift >= 32 ? 0u : (kFullMask << shift);
      const unsigned nonempty = __ballot_sync(kFullMask, w_rows_ > 0) & after;
      if (nonempty != 0) {
        select(__ffs(nonempty) - 1);
        return;
      }
      if (window_ + 32 >= end_) {  // no rows left in the list: inconsistent with left_
        left_ = 0;
        return;
      }
      load_window(window_ + 32);
      cur_lane_ = -1;
    }
  }

  const KvChunk* chunks_;
  int lane_;
  int begin_ = 0, end_ = 0;
  const int32_t* prefix_ = nullptr;  // see use_prefix
  int64_t left_ = 0;
  // The window of descriptors (lane j: chunk window_ + j).
  int window_ = 0;
  const char* w_k_ = nullptr;
  const char* w_v_ = nullptr;
  char* w_kc_ = nullptr;
  char* w_vc_ = nullptr;
  int w_rows_ = 0;
  // The current chunk (warp-uniform).
  int cur_lane_ = 0;
  const char* cur_k_ = nullptr;
  const char* cur_v_ = nullptr;
  char* cur_kc_ = nullptr;
  char* cur_vc_ = nullptr;
  int cur_rows_ = 0;
  int off_ = 0;
};

/// Walks one (sequence, KV head) slab of a dense layout.
template <int kRowBytes>
class DenseCursor {
 public:
  static constexpr bool kHasCopy = false;

  __device__ DenseCursor(const DenseRows& src, int problem, int seq, int /*kv_head*/,
                         int /*lane*/) {
    const size_t base = static_cast<size_t>(problem) * static_cast<size_t>(src.max_len) * kRowBytes;
    k_ = src.k + base;
    v_ = src.v + base;
    const int64_t n = __ldg(src.seq_lens + seq);
    rows_ = n < 0 ? 0 : (n > src.max_len ? src.max_len : n);
  }

  __device__ int64_t total_rows() const { return rows_; }

  __device__ void seek(int64_t row, int64_t count) {
    row_ = row;
    left_ = count;
  }

  __device__ Step next(int max_rows) {
    Step s{0, nullptr, nullptr, nullptr, nullptr};
    if (left_ <= 0) return s;
    const int n = left_ < max_rows ? static_cast<int>(left_) : max_rows;
    const size_t o = static_cast<size_t>(row_) * kRowBytes;
    s.nrows = n;
    s.k = k_ + o;
    s.v = v_ + o;
    row_ += n;
    left_ -= n;
    return s;
  }

 private:
  const char* k_;
  const char* v_;
  int64_t rows_ = 0, row_ = 0, left_ = 0;
};

template <typename Rows, int kRowBytes>
struct CursorOf;
template <int kRowBytes>
struct CursorOf<ChunkedRows, kRowBytes> {
  using type = ChunkCursor<kRowBytes>;
};
template <int kRowBytes>
struct CursorOf<DenseRows, kRowBytes> {
  using type = DenseCursor<kRowBytes>;
};

/// What a warp's consumer needs to know of a chunk-list step besides the data: its row count and
/// where its rows are copied (fused fetch). Written by lane 0 when the step's loads are issued.
/// (Dense steps are R rows until the range ends, so the consumer counts them itself.)
struct StepRecord {
  char* k_copy;
  char* v_copy;
  int nrows;
};

/// Shared memory of a block of kW warps: the warps' pipelines of kS stages while rows stream,
/// then the warps' partial results for the merge (the two are never live together).
template <int kG, int kHeadDim, int kW = kWarps, int kS = kStages>
union BlockSmem {
  struct {
    uint4 kv[kW][kS][2][32];  // [warp][stage][K, V][lane]: each lane's own 16 bytes
    StepRecord rec[kW][kS];
  } ring;
  struct {
    float acc[kW][kG][kHeadDim];
    float m[kW][kG];
    float l[kW][kG];
  } merge;
};

/// A warp's online-softmax state over its rows. acc: this lane's 8 columns for every head of its
/// row slot. m_own and l_own belong to the lane's own head (col / kLanesPerHead): m_own is the
/// same in every lane that owns the head (the max runs over all rows of the warp), l_own sums
/// this row slot's weights.
template <int kG>
struct WarpSoftmax {
  float m_own, l_own, acc[kG][8];
  __device__ __forceinline__ void init() {
    m_own = -INFINITY;
    l_own = 0.f;
#pragma unroll
    for (int g = 0; g < kG; ++g) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
    }
  }
};

/// A warp's rows [w0, w1) of its problem (w1 > w0) through the cursor, folded into st: the row
/// pipeline of decode_attention_kernel (kS stages of one step each, cp.async into the warp's ring
/// at `ring`, this lane's slot of stage 0; `rec`, the warp's kS step records). q: the lane's 8
/// columns of each head, fp32, pre-scaled by qk_scale. Returns with every load landed.
template <typename T, int kHeadDim, int kG, int kS, typename Cursor>
__device__ __forceinline__ void attend_warp_rows(Cursor& cur, int64_t w0, int64_t w1,
                                                 const float (&q)[kG][8], const uint4* ring,
                                                 StepRecord* rec, int lane, WarpSoftmax<kG>& st) {
  constexpr int kLanesPerRow = kHeadDim / 8;
  constexpr int kRowsPerStep = rows_per_step<kHeadDim>();
  constexpr int kRowBytes = kHeadDim * 2;
  constexpr int kLanesPerHead = kLanesPerRow / kG;  // lanes of a row that own one head's score
  constexpr uint32_t kStageBytes = 2 * 32 * 16;     // K then V, 512 bytes each
  static_assert((kS & (kS - 1)) == 0, "stages: a power of two");
  const int slot = lane / kLanesPerRow;              // row of the step
  const int col = lane % kLanesPerRow;               // 16-byte column of the row
  const int row_lane0 = lane & ~(kLanesPerRow - 1);  // first lane of this lane's row slot
  float& m_own = st.m_own;
  float& l_own = st.l_own;
  float(&acc)[kG][8] = st.acc;
  cur.seek(w0, w1 - w0);
  const size_t lane_off = static_cast<size_t>(slot) * kRowBytes + col * 16;
  const uint32_t ring_addr = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  // Issues the next step's loads into ring stage s (nothing once the range is walked).
  auto produce = [&](int s) {
    const Step step = cur.next(kRowsPerStep);
    if constexpr (Cursor::kHasCopy) {
      if (lane == 0) rec[s] = StepRecord{step.k_copy, step.v_copy, step.nrows};
    }
    if (step.nrows > 0) {
      const bool valid = slot < step.nrows;
      const size_t off = valid ? lane_off : 0;  // a zero-filled lane reads nothing
      const uint32_t dst = ring_addr + s * kStageBytes;
      cp_async16(dst, step.k + off, valid);
      cp_async16(dst + kStageBytes / 2, step.v + off, valid);
    }
    cp_async_commit();
  };
  int64_t left = w1 - w0;  // rows not yet consumed (dense steps)
#pragma unroll 1
  for (int i = 0; i < kS - 1; ++i) produce(i);
#pragma unroll 1
  for (int t = 0;; ++t) {
    // Orders lane 0's record writes before the reads below, and this step's reads of the stage
    // refilled next before its refill.
    __syncwarp();
    produce((t + kS - 1) & (kS - 1));
    cp_async_wait<kS - 1>();  // step t's group has landed
    const int s = t & (kS - 1);
    int nrows;
    char* k_copy = nullptr;
    char* v_copy = nullptr;
    if constexpr (Cursor::kHasCopy) {
      const StepRecord r = rec[s];
      nrows = r.nrows;
      k_copy = r.k_copy;
      v_copy = r.v_copy;
    } else {
      nrows = left < kRowsPerStep ? static_cast<int>(left) : kRowsPerStep;
      left -= nrows;
    }
    if (nrows == 0) break;
    const uint4 kraw = ring[s * (kStageBytes / 16)];
    const uint4 vraw = ring[s * (kStageBytes / 16) + kStageBytes / 32];
    const bool valid = slot < nrows;
    if constexpr (Cursor::kHasCopy) {
      if (valid && k_copy != nullptr) store16(k_copy + lane_off, kraw);
      if (valid && v_copy != nullptr) store16(v_copy + lane_off, vraw);
    }
    float kf[8];
    to_float8<T>(kraw, kf);
    float sc[kG];
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      float a = q[g][0] * kf[0];
#pragma unroll
      for (int i = 1; i < 8; ++i) a = fmaf(q[g][i], kf[i], a);
      sc[g] = a;
    }
    // This lane's head's logit of this lane's row, then its max over the step's rows.
    const float s_own = reduce_transpose<kG, kLanesPerRow>(sc, lane);
    float mx = valid ? s_own : -INFINITY;
#pragma unroll
    for (int o = 16; o >= kLanesPerRow; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, o));
    if (__any_sync(kFullMask, mx > m_own)) {  // rare once the maxima settle
      const float mn = fmaxf(m_own, mx);
      const float corr = ex2(m_own - mn);  // 0 while m is -inf, 1 if unchanged
      m_own = mn;
      l_own *= corr;
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        const float c =
            kG == 1 ? corr : __shfl_sync(kFullMask, corr, row_lane0 + g * kLanesPerHead);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] *= c;
      }
    }
    const float p_own = valid ? ex2(s_own - m_own) : 0.f;
    l_own += p_own;
    float vf[8];
    to_float8<T>(vraw, vf);
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      const float pr =
          kG == 1 ? p_own : __shfl_sync(kFullMask, p_own, row_lane0 + g * kLanesPerHead);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(pr, vf[i], acc[g][i]);
    }
  }
  cp_async_wait_all();
}

/// The merge of a block's kW warps: a barrier (every warp is done with the ring, which the merge
/// area m overlays), the row slots of each warp summed (m_own is the same in every row slot, so
/// no rescaling), the warps' partials into m, a barrier, then for each (head g < heads, column d)
/// over the block's threads out = sum_w acc_w 2^(m_w - M) / sum_w l_w 2^(m_w - M) and
/// emit(g, d, out, lse2), lse2 the log-sum-exp in base 2 of the block's logits (-inf without
/// rows, out then 0).
template <int kHeadDim, int kG, int kW, typename Merge, typename Emit>
__device__ __forceinline__ void merge_block_warps(WarpSoftmax<kG>& st, Merge& m, int heads,
                                                  int lane, int warp, Emit&& emit) {
  constexpr int kLanesPerRow = kHeadDim / 8;
  constexpr int kLanesPerHead = kLanesPerRow / kG;
  const int slot = lane / kLanesPerRow, col = lane % kLanesPerRow;
  __syncthreads();  // every warp is done with the ring before it becomes the merge area
#pragma unroll
  for (int o = 16; o >= kLanesPerRow; o >>= 1) {
    st.l_own += __shfl_xor_sync(kFullMask, st.l_own, o);
#pragma unroll
    for (int g = 0; g < kG; ++g) {
#pragma unroll
      for (int i = 0; i < 8; ++i) st.acc[g][i] += __shfl_xor_sync(kFullMask, st.acc[g][i], o);
    }
  }
  if (slot == 0) {
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      float4* dst = reinterpret_cast<float4*>(&m.acc[warp][g][col * 8]);
      dst[0] = make_float4(st.acc[g][0], st.acc[g][1], st.acc[g][2], st.acc[g][3]);
      dst[1] = make_float4(st.acc[g][4], st.acc[g][5], st.acc[g][6], st.acc[g][7]);
    }
  }
  if (slot == 0 && col % kLanesPerHead == 0) {
    m.m[warp][col / kLanesPerHead] = st.m_own;
    m.l[warp][col / kLanesPerHead] = st.l_own;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < heads * kHeadDim; idx += kW * 32) {
    const int g = idx / kHeadDim, d = idx % kHeadDim;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kW; ++w) mx = fmaxf(mx, m.m[w][g]);
    float o = 0.f, lsum = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kW; ++w) {
        const float mw = m.m[w][g];
        if (mw != -INFINITY) {
          const float f = ex2(mw - mx);
          lsum += m.l[w][g] * f;
          o += m.acc[w][g][d] * f;
        }
      }
      o /= lsum;
    }
    emit(g, d, o, lsum > 0.f ? mx + log2f(lsum) : -INFINITY);
  }
}

}  // namespace decode_attention_device

namespace decode_attention_device {

/// The log-sum-exp merge of the kp.num_splits partials of query heads [row0, row0 + heads) (one
/// head tile of one sequence), by one block: per head, the splits' weights 2^(lse_s - max) / sum
/// in shared memory (one warp per head), then each thread folds float4 columns over the splits,
/// eight loads in flight. Writes out (and lse); the partials were written by this kernel's blocks
/// and made visible by the caller's fences. w: shared memory for kG x kFusedMergeMaxSplits floats.
template <typename T, int kHeadDim, int kG>
__device__ void merge_tile_splits(const AttentionKernelParams& kp, size_t row0, int heads, T* out,
                                  float* lse, float (*w)[kFusedMergeMaxSplits]) {
  constexpr int kVecs = kHeadDim / 4;
  const int S = kp.num_splits, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int g = warp; g < heads; g += kWarps) {
    const float* pl = kp.part_lse + (row0 + g) * S;
    float m = -INFINITY;
    for (int s = lane; s < S; s += 32) m = fmaxf(m, __ldcg(pl + s));
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, o));
    float sum = 0.f;
    for (int s = lane; s < S; s += 32) {
      const float ls = __ldcg(pl + s);  // written by other blocks of this grid: from L2
      const float e = m == -INFINITY || ls == -INFINITY ? 0.f : expf(ls - m);
      w[g][s] = e;
      sum += e;
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;  // no rows in any split: zeros
    __syncwarp();
    for (int s = lane; s < S; s += 32) w[g][s] *= inv;
    if (lane == 0 && lse != nullptr) lse[row0 + g] = sum > 0.f ? m + logf(sum) : -INFINITY;
  }
  __syncthreads();
  const float4* po = reinterpret_cast<const float4*>(kp.part_out);
  for (int idx = threadIdx.x; idx < heads * kVecs; idx += kThreads) {
    const int g = idx / kVecs, c = idx % kVecs;
    const float4* src = po + (row0 + g) * S * kVecs + c;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < S; s0 += 8) {
      float4 x[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        x[u] = s0 + u < S ? __ldcg(src + static_cast<size_t>(s0 + u) * kVecs)
                          : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const float f = s0 + u < S ? w[g][s0 + u] : 0.f;
        acc.x = fmaf(f, x[u].x, acc.x);
        acc.y = fmaf(f, x[u].y, acc.y);
        acc.z = fmaf(f, x[u].z, acc.z);
        acc.w = fmaf(f, x[u].w, acc.w);
      }
    }
    T* dst = out + (row0 + g) * kHeadDim + c * 4;
    store_elem(dst + 0, acc.x);
    store_elem(dst + 1, acc.y);
    store_elem(dst + 2, acc.z);
    store_elem(dst + 3, acc.w);
  }
}

}  // namespace decode_attention_device

/// Decode attention over the rows of `rows`: one block per (problem, head tile, split).
/// Grid: blockIdx.x = (problem * num_tiles + tile) * num_splits + split; problem =
/// seq * num_kv_heads + kv_head; the tile holds query heads [tile * 8, tile * 8 + 8) of the
/// group (all of it when G <= 8). Block: 4 warps; the split's rows (multiples of 16) are cut into
/// 4 contiguous ranges, one per warp. A warp walks its range in steps of R = 256 / kHeadDim
/// consecutive rows: lane l holds 16 bytes (8 elements, column l % (kHeadDim / 8)) of row
/// l / (kHeadDim / 8) of the step, for K and V. Loads run kStages - 1 steps ahead of the math
/// (cp.async into a per-warp ring in shared memory; each lane reads back only its own bytes, so
/// a warp needs no block barrier, only __syncwarp for the step records). Per step: G dot products
/// over the lane's 8 columns, reduced over the row's lanes by a transposing shuffle reduction that
/// leaves each lane with the logit of one head (its "own" head); one exp per lane; an fp32 online
/// softmax whose running max is the same in every row slot (the rescale is a warp-uniform branch,
/// rarely taken once the maxima settle); the G weights broadcast back by shuffles; and the V
/// update. Each KV row is loaded once for all heads of the tile. Warps are merged in shared memory
/// at the end; out/lse are written directly with one split, else a partial (normalized out, lse)
/// per split.
template <typename T, int kHeadDim, int kG, typename Rows>
__global__ void __launch_bounds__(decode_attention_device::kThreads,
                                  decode_attention_device::min_blocks_for<kG>())
    decode_attention_kernel(AttentionKernelParams kp, Rows rows) {
  using namespace decode_attention_device;
  constexpr int kRowBytes = kHeadDim * 2;
  using Cursor = typename CursorOf<Rows, kRowBytes>::type;
  __shared__ BlockSmem<kG, kHeadDim> sm;
  pdl_wait();
  pdl_launch_dependents();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int col = lane % (kHeadDim / 8);  // 16-byte column of a row
  const int split = static_cast<int>(blockIdx.x % static_cast<unsigned>(kp.num_splits));
  const int problem_tile = static_cast<int>(blockIdx.x / static_cast<unsigned>(kp.num_splits));
  const int tile = problem_tile % kp.num_tiles, problem = problem_tile / kp.num_tiles;
  const int seq = problem / kp.num_kv_heads, kv_head = problem % kp.num_kv_heads;
  const int head0 = kv_head * kp.group_size + tile * kMaxTileHeads;  // first query head
  const int heads = min(kG, kp.group_size - tile * kMaxTileHeads);

  // Queries: the lane's 8 elements of each head, fp32, pre-scaled (padding heads are zero).
  float q[kG][8];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    if (g < heads) {
      const size_t e = (static_cast<size_t>(seq) * kp.num_q_heads + head0 + g) * kHeadDim + col * 8;
      to_float8<T>(__ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(kp.q) + e)), q[g]);
#pragma unroll
      for (int i = 0; i < 8; ++i) q[g][i] *= kp.qk_scale;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) q[g][i] = 0.f;
    }
  }

  WarpSoftmax<kG> st;
  st.init();
  Cursor cur(rows, problem, seq, kv_head, lane);
  const int64_t total = cur.total_rows();
  const int64_t s0 = aligned_bound(total, split, kp.num_splits);
  const int64_t s1 = aligned_bound(total, split + 1, kp.num_splits);
  // Warps at step boundaries, not at kRowAlign: a split of a few hundred rows would otherwise
  // give some warps twice the rows of others.
  const int64_t w0 = s0 + aligned_bound(s1 - s0, warp, kWarps, rows_per_step<kHeadDim>());
  const int64_t w1 = s0 + aligned_bound(s1 - s0, warp + 1, kWarps, rows_per_step<kHeadDim>());
  if (w1 > w0) {
    attend_warp_rows<T, kHeadDim, kG, kStages>(cur, w0, w1, q, &sm.ring.kv[warp][0][0][lane],
                                               sm.ring.rec[warp], lane, st);
  }
  merge_block_warps<kHeadDim, kG, kWarps>(
      st, sm.merge, heads, lane, warp, [&](int g, int d, float o, float lse2) {
        const float lse = lse2 * kLn2;
        const size_t row = static_cast<size_t>(seq) * kp.num_q_heads + head0 + g;
        if (kp.num_splits == 1) {
          T* out = static_cast<T*>(kp.out_at != nullptr ? *kp.out_at : kp.out);
          float* lse_out = kp.lse_at != nullptr ? *kp.lse_at : kp.lse;
          store_elem(out + row * kHeadDim + d, o);
          if (d == 0 && lse_out != nullptr) lse_out[row] = lse;
        } else {
          const size_t part = row * kp.num_splits + split;
          kp.part_out[part * kHeadDim + d] = o;
          if (d == 0) kp.part_lse[part] = lse;
        }
      });
  if (kp.num_splits > 1 && kp.counters != nullptr) {
    // The last split block of this (problem, tile) to finish merges the tile: its partials and
    // everyone else's are visible after the fences around the counter.
    __shared__ int s_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      s_last = atomicAdd(kp.counters + problem_tile, 1) == kp.num_splits - 1 ? 1 : 0;
    }
    __syncthreads();
    if (s_last) {
      __threadfence();
      T* out = static_cast<T*>(kp.out_at != nullptr ? *kp.out_at : kp.out);
      float* lse_out = kp.lse_at != nullptr ? *kp.lse_at : kp.lse;
      // The weights reuse the warps' merge area (every warp is past it).
      static_assert(sizeof(sm.merge.acc) >= sizeof(float) * kG * kFusedMergeMaxSplits,
                    "merge weights fit the merge area");
      merge_tile_splits<T, kHeadDim, kG>(
          kp, static_cast<size_t>(seq) * kp.num_q_heads + head0, heads, out, lse_out,
          reinterpret_cast<float(*)[kFusedMergeMaxSplits]>(&sm.merge.acc[0][0][0]));
      if (threadIdx.x == 0) kp.counters[problem_tile] = 0;  // ready for the next launch
    }
  }
}

/// Warps of a merge block.
constexpr int kMergeWarps = 8;

/// Merges the splits of every output row by log-sum-exp. Grid: a block of 8 warps merges
/// 8 / warps_per_row rows (warps_per_row in {1, 2, 4, 8}, more for more splits); warp j of a
/// row folds splits j, j + warps_per_row, ... into an online (max, sum, acc) in batches of 4
/// splits whose loads are issued together, lane l holding float4 columns l, l + 32. The row's
/// warps are then combined in shared memory. The partials are in L2, so the time is latency:
/// a 66-split row takes two or three round trips.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kMergeWarps * 32)
    merge_splits_kernel(const float* __restrict__ part_out,  // [rows, splits, kHeadDim]
                        const float* __restrict__ part_lse,  // [rows, splits]
                        int32_t num_rows, int32_t num_splits, int32_t warps_per_row,
                        T* out,               // [rows, kHeadDim]
                        T* const* out_at,     // or null: out is read from here
                        float* lse,           // [rows] or null
                        float* const* lse_at  // or null: lse is read from here
    ) {
  using namespace decode_attention_device;
  constexpr int kVecs = kHeadDim / 4;
  constexpr int kPerLane = (kVecs + 31) / 32;
  constexpr int kBatch = 4;
  __shared__ float4 sm_acc[kMergeWarps][kVecs];
  __shared__ float sm_m[kMergeWarps], sm_sum[kMergeWarps];
  pdl_wait();
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int first_warp = warp - warp % warps_per_row;  // of this warp's row
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (kMergeWarps / warps_per_row) + warp / warps_per_row;
  const bool active = row < num_rows;

  float m = -INFINITY, sum = 0.f;
  float4 acc[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (active) {
    const float* pl = part_lse + row * num_splits;
    const float4* po = reinterpret_cast<const float4*>(part_out + row * num_splits * kHeadDim);
    for (int base = warp % warps_per_row; base < num_splits; base += warps_per_row * kBatch) {
      float ls[kBatch];
      float4 x[kBatch][kPerLane];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int s = base + u * warps_per_row;
        ls[u] = s < num_splits ? pl[s] : -INFINITY;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int c = lane + 32 * j;
          x[u][j] = s < num_splits && c < kVecs ? po[static_cast<size_t>(s) * kVecs + c]
                                                : make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (ls[u] == -INFINITY) continue;  // an empty split (or past the end)
        if (ls[u] > m) {
          const float corr = expf(m - ls[u]);
          sum *= corr;
#pragma unroll
          for (int j = 0; j < kPerLane; ++j) {
            acc[j].x *= corr;
            acc[j].y *= corr;
            acc[j].z *= corr;
            acc[j].w *= corr;
          }
          m = ls[u];
        }
        const float w = expf(ls[u] - m);
        sum += w;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          acc[j].x = fmaf(w, x[u][j].x, acc[j].x);
          acc[j].y = fmaf(w, x[u][j].y, acc[j].y);
          acc[j].z = fmaf(w, x[u][j].z, acc[j].z);
          acc[j].w = fmaf(w, x[u][j].w, acc[j].w);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int c = lane + 32 * j;
    if (c < kVecs) sm_acc[warp][c] = acc[j];
  }
  if (lane == 0) {
    sm_m[warp] = m;
    sm_sum[warp] = sum;
  }
  __syncthreads();
  if (!active) return;
  float mx = -INFINITY;
  for (int w = first_warp; w < first_warp + warps_per_row; ++w) mx = fmaxf(mx, sm_m[w]);
  float total = 0.f;
  for (int w = first_warp; w < first_warp + warps_per_row; ++w) {
    if (sm_m[w] != -INFINITY) total += sm_sum[w] * expf(sm_m[w] - mx);
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;  // no rows in any split: zeros
  T* dst = (out_at != nullptr ? *out_at : out) + row * kHeadDim;
  for (int c = (warp - first_warp) * 32 + lane; c < kVecs; c += warps_per_row * 32) {
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int w = first_warp; w < first_warp + warps_per_row; ++w) {
      if (sm_m[w] == -INFINITY) continue;
      const float f = expf(sm_m[w] - mx);
      const float4 a = sm_acc[w][c];
      o.x = fmaf(f, a.x, o.x);
      o.y = fmaf(f, a.y, o.y);
      o.z = fmaf(f, a.z, o.z);
      o.w = fmaf(f, a.w, o.w);
    }
    store_elem(dst + c * 4 + 0, o.x * inv);
    store_elem(dst + c * 4 + 1, o.y * inv);
    store_elem(dst + c * 4 + 2, o.z * inv);
    store_elem(dst + c * 4 + 3, o.w * inv);
  }
  float* const lse_out = lse_at != nullptr ? *lse_at : lse;
  if (warp == first_warp && lane == 0 && lse_out != nullptr) {
    lse_out[row] = total > 0.f ? mx + logf(total) : -INFINITY;
  }
}

}  // namespace kvtier::kernels
