// Launchers of decode attention: dtype / head_dim / head-tile dispatch, the choice of the number
// of splits, the workspace layout and the log-sum-exp merge.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "kernels/decode_attention_kernels.cuh"
#include "kernels/dispatch.h"
#include "memory/core/check.h"

namespace kvtier::kernels {

namespace {

using decode_attention_device::dispatch_dtype;
using decode_attention_device::kMaxTileHeads;
using decode_attention_device::kThreads;

/// Splits are at least this long (enough rows to amortize a block's prologue and the merge).
/// 64 measured best for sparse decode of one sequence (sink 16 + 128 pages of 16 + window 256:
/// 22.5 us against 26.4 us at 256, H100); dense decode is wave-limited and unchanged.
constexpr int64_t kMinRowsPerSplit = 64;
/// Cost of a split in rows, in the choice below: the block prologue (two passes over the chunk
/// list) plus its share of the merge.
constexpr int64_t kSplitOverheadRows = 64;
constexpr int64_t kMaxAutoSplits = 1024;

/// Blocks of the chunked kernel variant resident on the whole current device. Cached per
/// variant at first use (kv_gather does the same): a process is assumed to use one device type.
template <typename T, int kHeadDim, int kG>
int64_t resident_blocks() {
  static const int64_t blocks = [] {
    int device = 0, sms = 0, per_sm = 0;
    KVTIER_CUDA_CHECK(cudaGetDevice(&device));
    KVTIER_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    KVTIER_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, decode_attention_kernel<T, kHeadDim, kG, ChunkedRows>, kThreads, 0));
    return static_cast<int64_t>(sms) * std::max(per_sm, 1);
  }();
  return blocks;
}

/// The split count with the least estimated time, waves x (rows per split + overhead), among
/// 1 .. max_rows / kMinRowsPerSplit. Filling the device matters (one block streams a few GB/s;
/// the device needs ~2-4 per SM), and so does not spilling a few blocks into a second wave.
int32_t choose_splits(int64_t max_rows, int64_t problem_blocks, int64_t capacity) {
  if (max_rows <= 0 || problem_blocks <= 0) return 1;
  const int64_t by_grid = std::numeric_limits<int32_t>::max() / problem_blocks;
  const int64_t limit =
      std::max<int64_t>(1, std::min({kMaxAutoSplits, max_rows / kMinRowsPerSplit, by_grid}));
  int64_t best = 1, best_cost = std::numeric_limits<int64_t>::max();
  for (int64_t s = 1; s <= limit; ++s) {
    const int64_t waves = (problem_blocks * s + capacity - 1) / capacity;
    const int64_t cost = waves * ((max_rows + s - 1) / s + kSplitOverheadRows);
    if (cost < best_cost) {
      best_cost = cost;
      best = s;
    }
  }
  return static_cast<int32_t>(best);
}

struct Plan {
  int32_t group_size = 0;
  int32_t num_tiles = 0;
  int32_t num_splits = 1;
  int64_t out_rows = 0;  // num_seqs * num_q_heads
  int64_t blocks = 0;    // grid size
};

Plan make_plan(const DecodeAttentionParams& p, int64_t max_rows) {
  check_decode_attention_params(p);
  KVTIER_CHECK(max_rows >= 0, "max_rows_per_problem must be >= 0, got ", max_rows);
  Plan plan;
  plan.group_size = p.num_q_heads / p.num_kv_heads;
  plan.num_tiles = (plan.group_size + kMaxTileHeads - 1) / kMaxTileHeads;
  plan.out_rows = static_cast<int64_t>(p.num_seqs) * p.num_q_heads;
  const int64_t problem_blocks = static_cast<int64_t>(p.num_seqs) * p.num_kv_heads * plan.num_tiles;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_head_dim(p.head_dim, [&](auto dim) {
      constexpr int kDim = decltype(dim)::value;
      dispatch_head_tile(plan.group_size, [&](auto tile) {
        constexpr int kG = decltype(tile)::value;
        if (p.num_splits > 0) {
          plan.num_splits = p.num_splits;
        } else if (problem_blocks > 0) {
          plan.num_splits = choose_splits(max_rows, problem_blocks, resident_blocks<T, kDim, kG>());
        }
      });
    });
  });
  plan.blocks = problem_blocks * plan.num_splits;
  KVTIER_CHECK(plan.blocks <= std::numeric_limits<int32_t>::max(), "num_seqs ", p.num_seqs,
               " x num_kv_heads ", p.num_kv_heads, " x head tiles ", plan.num_tiles,
               " x num_splits ", plan.num_splits, " = ", plan.blocks,
               " blocks exceeds the grid limit 2^31 - 1");
  return plan;
}

size_t align_up(size_t x) { return (x + 255) & ~size_t{255}; }

/// Workspace: part_out [out_rows, splits, head_dim] floats, then part_lse [out_rows, splits].
struct WorkspaceLayout {
  size_t part_lse = 0;  // offset
  size_t total = 0;
};

WorkspaceLayout workspace_layout(const DecodeAttentionParams& p, const Plan& plan) {
  WorkspaceLayout w;
  if (plan.num_splits <= 1 || plan.out_rows == 0) return w;
  const size_t slots = static_cast<size_t>(plan.out_rows) * static_cast<size_t>(plan.num_splits);
  w.part_lse = align_up(slots * static_cast<size_t>(p.head_dim) * sizeof(float));
  w.total = w.part_lse + align_up(slots * sizeof(float));
  return w;
}

void check_aligned(const void* ptr, const char* name) {
  KVTIER_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, name, " must be 16-byte aligned, got ",
               ptr);
}

template <typename Rows>
void launch_impl(const DecodeAttentionParams& p, const Plan& plan, const Rows& rows, const void* q,
                 void* out, void* const* out_at, int32_t* counters, float* lse,
                 float* const* lse_at, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream) {
  if (plan.blocks == 0) return;
  check_aligned(q, "q");
  if (out_at == nullptr) check_aligned(out, "out");
  const WorkspaceLayout w = workspace_layout(p, plan);
  if (w.total > 0) {
    KVTIER_CHECK(workspace != nullptr && workspace_bytes >= w.total, "workspace of ",
                 workspace_bytes, " bytes is smaller than the ", w.total,
                 " that decode_attention_workspace_bytes() asks for (", plan.num_splits,
                 " splits)");
  }
  AttentionKernelParams kp{};
  kp.q = q;
  kp.out = out;
  kp.lse = lse;
  kp.part_out = static_cast<float*>(workspace);
  kp.part_lse = w.total > 0
                    ? reinterpret_cast<float*>(static_cast<std::byte*>(workspace) + w.part_lse)
                    : nullptr;
  kp.num_q_heads = p.num_q_heads;
  kp.num_kv_heads = p.num_kv_heads;
  kp.group_size = plan.group_size;
  kp.num_tiles = plan.num_tiles;
  kp.num_splits = plan.num_splits;
  kp.qk_scale = decode_attention_scale(p) * decode_attention_device::kLog2e;
  kp.out_at = out_at;
  kp.lse_at = lse_at;
  const bool fused_merge =
      counters != nullptr && plan.num_splits <= decode_attention_device::kFusedMergeMaxSplits;
  kp.counters = fused_merge ? counters : nullptr;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_head_dim(p.head_dim, [&](auto dim) {
      constexpr int kDim = decltype(dim)::value;
      dispatch_head_tile(plan.group_size, [&](auto tile) {
        constexpr int kG = decltype(tile)::value;
        launch_pdl(decode_attention_kernel<T, kDim, kG, Rows>,
                   dim3(static_cast<unsigned>(plan.blocks)), kThreads, 0, stream, kp, rows);
        KVTIER_CUDA_CHECK_LAUNCH("decode_attention_kernel");
      });
      if (plan.num_splits > 1 && !fused_merge) {
        // Enough warps per row for about 4 splits each (one batch of loads in flight).
        const int32_t warps_per_row = plan.num_splits <= 4    ? 1
                                      : plan.num_splits <= 8  ? 2
                                      : plan.num_splits <= 16 ? 4
                                                              : kMergeWarps;
        const int64_t rows_per_block = kMergeWarps / warps_per_row;
        const auto grid =
            static_cast<unsigned>((plan.out_rows + rows_per_block - 1) / rows_per_block);
        launch_pdl(merge_splits_kernel<T, kDim>, dim3(grid), kMergeWarps * 32, 0, stream,
                   static_cast<const float*>(kp.part_out), static_cast<const float*>(kp.part_lse),
                   static_cast<int32_t>(plan.out_rows), plan.num_splits, warps_per_row,
                   static_cast<T*>(out), reinterpret_cast<T* const*>(out_at), lse, lse_at);
        KVTIER_CUDA_CHECK_LAUNCH("merge_splits_kernel");
      }
    });
  });
}

}  // namespace

int32_t decode_attention_num_splits(const DecodeAttentionParams& p, int64_t max_rows_per_problem) {
  return make_plan(p, max_rows_per_problem).num_splits;
}

size_t decode_attention_workspace_bytes(const DecodeAttentionParams& p,
                                        int64_t max_rows_per_problem) {
  return workspace_layout(p, make_plan(p, max_rows_per_problem)).total;
}

void launch_decode_attention(const DecodeAttentionParams& p, const DecodeAttentionTensors& t,
                             int64_t max_rows_per_problem, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  const Plan plan = make_plan(p, max_rows_per_problem);
  detail::check_decode_attention_tensors(p, t);
  const ChunkedRows rows{t.chunks, t.chunk_indptr, t.chunk_end};
  launch_impl(p, plan, rows, t.q, t.out, t.out_at, t.merge_counters, t.lse, t.lse_at, workspace,
              workspace_bytes, stream);
}

void launch_dense_decode_attention(const DecodeAttentionParams& p, const DenseDecodeTensors& t,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  detail::check_dense_tensors(p, t);
  const Plan plan = make_plan(p, t.max_len);
  if (plan.blocks > 0 && t.max_len > 0) {
    check_aligned(t.k, "k");
    check_aligned(t.v, "v");
  }
  const DenseRows rows{static_cast<const char*>(t.k), static_cast<const char*>(t.v), t.seq_lens,
                       t.max_len};
  launch_impl(p, plan, rows, t.q, t.out, nullptr, nullptr, t.lse, nullptr, workspace,
              workspace_bytes, stream);
}

}  // namespace kvtier::kernels
