// Device code of decode attention. Included by decode_attention.cu and GPU tests.
// One attention kernel body, templated on where rows come from (a chunk list or a dense
// [seq, kv_head, max_len, D] layout), plus the log-sum-exp merge of splits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/decode_attention.h"

namespace kvtier::kernels {

/// Arguments shared by both row sources, by value.
struct AttentionKernelParams {
  const void* q;     // [num_seqs, num_q_heads, head_dim]
  void* out;         // [num_seqs, num_q_heads, head_dim] (written when num_splits == 1)
  float* lse;        // [num_seqs, num_q_heads] or null (written when num_splits == 1)
  float* part_out;   // [num_seqs * num_q_heads, num_splits, head_dim] (num_splits > 1)
  float* part_lse;   // [num_seqs * num_q_heads, num_splits] (num_splits > 1)
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t group_size;  // G = num_q_heads / num_kv_heads
  int32_t num_tiles;   // ceil(G / kMaxTileHeads)
  int32_t num_splits;
  float qk_scale;  // scale * log2(e): logits are kept in base 2
};

/// Rows from a chunk list (KvChunk, chunk_indptr).
struct ChunkedRows {
  const KvChunk* chunks;         // all problems' chunks
  const int32_t* chunk_indptr;   // [num_problems + 1]
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
/// Split and warp ranges start at multiples of this many rows, so 16-row cache pages are never
/// cut into partial steps.
constexpr int kRowAlign = 16;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

/// Register stages of the row pipeline (each holds one 16-byte vector of K and of V per lane).
template <int kG>
constexpr int stages_for() {
  return kG <= 4 ? 4 : 3;
}
/// Blocks per SM the register budget is set for (__launch_bounds__).
template <int kG>
constexpr int min_blocks_for() {
  return kG <= 1 ? 4 : (kG <= 4 ? 3 : 2);
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
    const float2 x = __half22float2(__halves2half2(__ushort_as_half(static_cast<uint16_t>(w[i])),
                                                   __ushort_as_half(static_cast<uint16_t>(w[i] >> 16))));
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

__device__ __forceinline__ void store_elem(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store_elem(__half* p, float x) { *p = __float2half_rn(x); }

/// Streaming 16-byte load: read once, so it skips L1; rows are whole 128/256-byte lines.
__device__ __forceinline__ uint4 load_stream(const void* ptr) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(ptr));
  return r;
}

__device__ __forceinline__ void store16(void* ptr, const uint4& v) {
  *static_cast<uint4*>(ptr) = v;
}

template <typename P>
__device__ __forceinline__ P* shfl_ptr(P* ptr, int src_lane) {
  return reinterpret_cast<P*>(__shfl_sync(
      kFullMask, static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(ptr)), src_lane));
}

/// Row bounds of piece i of n of a range of `total` rows: multiples of kRowAlign except the end.
__device__ __forceinline__ int64_t aligned_bound(int64_t total, int i, int n) {
  if (i >= n) return total;
  const int64_t b = total * i / n;
  return b - b % kRowAlign;
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

/// Walks a chunk list. The warp's lanes cache 32 consecutive descriptors (lane j holds chunk
/// window + j); the cursor's current chunk is read from its lane by shuffles, and the next
/// non-empty one is found with one ballot, so runs of empty chunks cost nothing.
template <int kRowBytes>
class ChunkCursor {
 public:
  static constexpr bool kHasCopy = true;

  __device__ ChunkCursor(const ChunkedRows& src, int problem, int /*seq*/, int /*kv_head*/,
                         int lane)
      : chunks_(src.chunks), lane_(lane) {
    begin_ = __ldg(src.chunk_indptr + problem);
    end_ = __ldg(src.chunk_indptr + problem + 1);
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

  /// Positions the cursor at `row` (< total_rows()) with `count` rows to walk.
  __device__ void seek(int64_t row, int64_t count) {
    left_ = count;
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
    const int n = __ldg(&chunks_[chunk].num_rows);
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
      const int4 a = __ldg(d), b = __ldg(d + 1), e = __ldg(d + 2);
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

/// One pipeline stage of a lane: its 16 bytes of a K row and of a V row, the step's row count
/// (warp-uniform) and where the lane's bytes are copied to (fused fetch).
struct Stage {
  uint4 k, v;
  int nrows;
  char* k_copy;
  char* v_copy;
};

}  // namespace decode_attention_device

/// Decode attention over the rows of `rows`: one block per (problem, head tile, split).
/// Grid: blockIdx.x = (problem * num_tiles + tile) * num_splits + split; problem =
/// seq * num_kv_heads + kv_head; the tile holds query heads [tile * 8, tile * 8 + 8) of the
/// group (all of it when G <= 8). Block: 4 warps; the split's rows (multiples of 16) are cut into
/// 4 contiguous ranges, one per warp. A warp walks its range in steps of R = 256 / kHeadDim
/// consecutive rows: lane l holds 16 bytes (8 elements, column l % (kHeadDim / 8)) of row
/// l / (kHeadDim / 8) of the step, for K and V. Loads run kStages - 1 steps ahead of the math in
/// registers. Per step: G dot products reduced over the row's lanes by shuffles, an fp32 online
/// softmax whose running max is warp-uniform (the rescale is a warp-uniform branch, rarely taken
/// once the max settles), and the V update. Each KV row is loaded once for all heads of the tile.
/// Warps are merged in shared memory at the end; out/lse are written directly with one split,
/// else a partial (normalized out, lse) per split.
template <typename T, int kHeadDim, int kG, typename Rows>
__global__ void __launch_bounds__(decode_attention_device::kThreads,
                                  decode_attention_device::min_blocks_for<kG>())
    decode_attention_kernel(AttentionKernelParams kp, Rows rows) {
  using namespace decode_attention_device;
  constexpr int kLanesPerRow = kHeadDim / 8;
  constexpr int kRowsPerStep = 32 / kLanesPerRow;
  constexpr int kRowBytes = kHeadDim * 2;
  constexpr int kStages = stages_for<kG>();
  using Cursor = typename CursorOf<Rows, kRowBytes>::type;

  __shared__ float sm_acc[kWarps][kG][kHeadDim];
  __shared__ float sm_m[kWarps][kG];
  __shared__ float sm_l[kWarps][kG];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slot = lane / kLanesPerRow;  // row of the step
  const int col = lane % kLanesPerRow;   // 16-byte column of the row
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

  float m[kG], l[kG], acc[kG][8];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  }

  Cursor cur(rows, problem, seq, kv_head, lane);
  const int64_t total = cur.total_rows();
  const int64_t s0 = aligned_bound(total, split, kp.num_splits);
  const int64_t s1 = aligned_bound(total, split + 1, kp.num_splits);
  const int64_t w0 = s0 + aligned_bound(s1 - s0, warp, kWarps);
  const int64_t w1 = s0 + aligned_bound(s1 - s0, warp + 1, kWarps);

  if (w1 > w0) {
    cur.seek(w0, w1 - w0);
    Stage st[kStages];
    const size_t lane_off = static_cast<size_t>(slot) * kRowBytes + col * 16;
    auto load = [&](Stage& s) {
      const Step step = cur.next(kRowsPerStep);
      s.nrows = step.nrows;
      const bool valid = slot < step.nrows;
      if (valid) {
        s.k = load_stream(step.k + lane_off);
        s.v = load_stream(step.v + lane_off);
      } else {
        s.k = make_uint4(0, 0, 0, 0);
        s.v = make_uint4(0, 0, 0, 0);
      }
      if constexpr (Cursor::kHasCopy) {
        s.k_copy = valid && step.k_copy != nullptr ? step.k_copy + lane_off : nullptr;
        s.v_copy = valid && step.v_copy != nullptr ? step.v_copy + lane_off : nullptr;
      }
    };
    auto consume = [&](const Stage& s) {
      if constexpr (Cursor::kHasCopy) {
        if (s.k_copy != nullptr) store16(s.k_copy, s.k);
        if (s.v_copy != nullptr) store16(s.v_copy, s.v);
      }
      const bool valid = slot < s.nrows;
      float kf[8];
      to_float8<T>(s.k, kf);
      float sc[kG];
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        float a = 0.f, b = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i += 2) {
          a = fmaf(q[g][i], kf[i], a);
          b = fmaf(q[g][i + 1], kf[i + 1], b);
        }
        sc[g] = a + b;
      }
      // Sum over the row's lanes (butterfly: every lane of the row gets the same bits).
#pragma unroll
      for (int o = kLanesPerRow / 2; o >= 1; o >>= 1) {
#pragma unroll
        for (int g = 0; g < kG; ++g) sc[g] += __shfl_xor_sync(kFullMask, sc[g], o);
      }
      // Max over the step's rows: warp-uniform, so the rescale branch below does not diverge.
      float mx[kG];
#pragma unroll
      for (int g = 0; g < kG; ++g) mx[g] = valid ? sc[g] : -INFINITY;
#pragma unroll
      for (int o = 16; o >= kLanesPerRow; o >>= 1) {
#pragma unroll
        for (int g = 0; g < kG; ++g) mx[g] = fmaxf(mx[g], __shfl_xor_sync(kFullMask, mx[g], o));
      }
      bool grow = false;
#pragma unroll
      for (int g = 0; g < kG; ++g) grow |= mx[g] > m[g];
      if (grow) {
#pragma unroll
        for (int g = 0; g < kG; ++g) {
          const float mn = fmaxf(m[g], mx[g]);
          const float corr = exp2f(m[g] - mn);  // 0 while m is -inf; 1 if unchanged
          l[g] *= corr;
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[g][i] *= corr;
          m[g] = mn;
        }
      }
      float vf[8];
      to_float8<T>(s.v, vf);
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        const float pr = valid ? exp2f(sc[g] - m[g]) : 0.f;
        l[g] += pr;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(pr, vf[i], acc[g][i]);
      }
    };

#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) load(st[i]);
    bool done = false;
    while (!done) {
#pragma unroll
      for (int u = 0; u < kStages; ++u) {
        if (!done) {
          load(st[(u + kStages - 1) % kStages]);
          if (st[u].nrows == 0) {
            done = true;
          } else {
            consume(st[u]);
          }
        }
      }
    }
  }

  // Rows of a step went to different lanes: sum them (m is warp-uniform, so no rescaling).
#pragma unroll
  for (int o = 16; o >= kLanesPerRow; o >>= 1) {
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      l[g] += __shfl_xor_sync(kFullMask, l[g], o);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] += __shfl_xor_sync(kFullMask, acc[g][i], o);
    }
  }
  if (slot == 0) {
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      float4* dst = reinterpret_cast<float4*>(&sm_acc[warp][g][col * 8]);
      dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
      dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = l[g];
    }
  }
  __syncthreads();

  // Merge the warps: out = sum_w acc_w 2^(m_w - M) / sum_w l_w 2^(m_w - M).
  for (int idx = threadIdx.x; idx < heads * kHeadDim; idx += kThreads) {
    const int g = idx / kHeadDim, d = idx % kHeadDim;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w][g]);
    float o = 0.f, lsum = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float mw = sm_m[w][g];
        if (mw != -INFINITY) {
          const float f = exp2f(mw - mx);
          lsum += sm_l[w][g] * f;
          o += sm_acc[w][g][d] * f;
        }
      }
      o /= lsum;
    }
    const float lse = lsum > 0.f ? (mx + log2f(lsum)) * kLn2 : -INFINITY;
    const size_t row = static_cast<size_t>(seq) * kp.num_q_heads + head0 + g;
    if (kp.num_splits == 1) {
      store_elem(static_cast<T*>(kp.out) + row * kHeadDim + d, o);
      if (d == 0 && kp.lse != nullptr) kp.lse[row] = lse;
    } else {
      const size_t part = row * kp.num_splits + split;
      kp.part_out[part * kHeadDim + d] = o;
      if (d == 0) kp.part_lse[part] = lse;
    }
  }
}

/// Merges the splits of every output row by log-sum-exp. Grid: one warp per (sequence, query
/// head) row, 4 rows per block; lane l holds float4 columns l, l + 32 of the row.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(128)
    merge_splits_kernel(const float* __restrict__ part_out,  // [rows, splits, kHeadDim]
                        const float* __restrict__ part_lse,  // [rows, splits]
                        int32_t num_rows, int32_t num_splits,
                        T* __restrict__ out,     // [rows, kHeadDim]
                        float* __restrict__ lse  // [rows] or null
    ) {
  using namespace decode_attention_device;
  constexpr int kVecs = kHeadDim / 4;
  constexpr int kPerLane = (kVecs + 31) / 32;
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * 4 + (threadIdx.x >> 5);
  if (row >= num_rows) return;
  const float* pl = part_lse + static_cast<size_t>(row) * num_splits;
  float mx = -INFINITY;
  for (int s = lane; s < num_splits; s += 32) mx = fmaxf(mx, pl[s]);
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, o));
  T* dst = out + static_cast<size_t>(row) * kHeadDim;
  if (mx == -INFINITY) {  // no rows in any split
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int c = lane + 32 * j;
      if (c < kVecs) {
#pragma unroll
        for (int i = 0; i < 4; ++i) store_elem(dst + c * 4 + i, 0.f);
      }
    }
    if (lane == 0 && lse != nullptr) lse[row] = -INFINITY;
    return;
  }
  float sum = 0.f;
  for (int s = lane; s < num_splits; s += 32) sum += expf(pl[s] - mx);
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
  float4 acc[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
  const float4* po = reinterpret_cast<const float4*>(part_out + static_cast<size_t>(row) *
                                                                    num_splits * kHeadDim);
#pragma unroll 4
  for (int s = 0; s < num_splits; ++s) {
    const float w = expf(pl[s] - mx);  // 0 for an empty split
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int c = lane + 32 * j;
      if (c < kVecs && w != 0.f) {
        const float4 x = po[static_cast<size_t>(s) * kVecs + c];
        acc[j].x = fmaf(w, x.x, acc[j].x);
        acc[j].y = fmaf(w, x.y, acc[j].y);
        acc[j].z = fmaf(w, x.z, acc[j].z);
        acc[j].w = fmaf(w, x.w, acc[j].w);
      }
    }
  }
  const float inv = 1.f / sum;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int c = lane + 32 * j;
    if (c < kVecs) {
      store_elem(dst + c * 4 + 0, acc[j].x * inv);
      store_elem(dst + c * 4 + 1, acc[j].y * inv);
      store_elem(dst + c * 4 + 2, acc[j].z * inv);
      store_elem(dst + c * 4 + 3, acc[j].w * inv);
    }
  }
  if (lane == 0 && lse != nullptr) lse[row] = mx + logf(sum);
}

}  // namespace kvtier::kernels
