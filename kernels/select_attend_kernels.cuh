// Device code and launcher of a recall layer's scoring, selection and sparse attention in one
// kernel of thread block clusters (sm_90). Included by the engine's kernels and GPU tests.
//
// score_select_attend_kernel runs score_select_in_cluster (cluster_select_kernels.cuh): each
// problem's CTAs score their slices of its centroids and CTA 0 selects and runs the epilogue,
// which builds the problem's chunk list in global memory. After a cluster barrier every CTA of the
// cluster attends one contiguous split of the problem's rows with all of its warps (the row
// pipeline of decode_attention_kernels.cuh, with the queries already in shared memory), sends its
// partial output and log-sum-exp to CTA 0's shared memory, and after a last barrier CTA 0 merges
// the splits and writes the output. Nothing waits on the whole grid between selection and
// attention, and no partials travel through global memory.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "kernels/cluster_select_kernels.cuh"
#include "kernels/decode_attention_kernels.cuh"

namespace kvtier::kernels {

namespace select_attend_device {
/// Row pipeline stages per warp: a block has up to 16 warps, each with kStages steps (1 KiB of K
/// and V) in flight, which keeps HBM and the host link busy with one block per multiprocessor.
constexpr int kStages = 4;
/// Chunks of a list whose row prefix a CTA keeps in shared memory; a longer list is walked from
/// global memory by each warp.
constexpr int kPrefixChunks = 1024;
}  // namespace select_attend_device

/// Dynamic shared memory of score_select_attend_kernel, in bytes from its start: the problem's
/// queries [G][head_dim] floats (as in ClusterSelectSmem, which overlays everything after them
/// until the chunk list is built); at `attend` the block's attention area (BlockSmem: the warps'
/// rings, then their partials); at `parts` the CTAs' split outputs [cluster][kG][head_dim] floats
/// and at `parts_lse` their base-2 log-sum-exps [cluster][kG], read by CTA 0; at `prefix` the
/// chunk list's row prefix [kPrefixChunks] (int32).
struct SelectAttendSmem {
  int32_t attend, parts, parts_lse, prefix, total;
  __host__ __device__ static SelectAttendSmem of(const ClusterSelectSmem& sel, int group_size,
                                                 int head_dim, int cluster, int tile_heads,
                                                 int attend_bytes) {
    SelectAttendSmem l;
    l.attend = (group_size * head_dim * 4 + 15) / 16 * 16;
    l.parts = l.attend + (attend_bytes + 15) / 16 * 16;
    l.parts_lse = l.parts + cluster * tile_heads * head_dim * 4;
    l.prefix = (l.parts_lse + cluster * tile_heads * 4 + 15) / 16 * 16;
    const int32_t end = l.prefix + select_attend_device::kPrefixChunks * 4;
    l.total = end > sel.total ? end : sel.total;
    return l;
  }
};

/// Grid and cluster as score_select_cluster_kernel (grid.x = problem * cluster + rank), kThreads
/// threads, dynamic shared memory SelectAttendSmem. kG: query heads per KV head rounded up to a
/// power of two (the group is one head tile, G <= 8); T: the dtype of K, V and the output. `ap`
/// gives the output (out_at / lse_at or out / lse), the heads and qk_scale; `rows` the chunk lists
/// the epilogue writes (problem p at chunk_indptr[p] .. chunk_end[p]).
template <typename T, int kDim, int kThreads, int kItems, int kG, typename Epilogue>
__global__ void __launch_bounds__(kThreads, 1)
    score_select_attend_kernel(ScoreKernelParams sk, SelectKernelParams kp, Epilogue epi, int slice,
                               AttentionKernelParams ap, ChunkedRows rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using namespace decode_attention_device;
  constexpr int kW = kThreads / 32;
  constexpr int kS = select_attend_device::kStages;
  using Attend = BlockSmem<kG, kDim, kW, kS>;
  __shared__ cluster_select_device::BlockSelectShared<kThreads, kItems> sh;
  __shared__ float s_head_m[cluster_select_device::kMaxSplitGroup],
      s_head_inv[cluster_select_device::kMaxSplitGroup];
  extern __shared__ float4 smem4[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(smem4);
  score_select_in_cluster<kDim, kThreads, kItems>(sk, kp, epi, slice, sh, s_head_m, s_head_inv,
                                                  smem);

  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  // Release / acquire at cluster scope: CTA 0's chunk list is visible to every CTA after this.
  cluster.sync();
  const int cs = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int problem = static_cast<int>(blockIdx.x) / cs;
  const int heads = ap.group_size;  // <= kG
  const int seq = problem / ap.num_kv_heads, kv_head = problem % ap.num_kv_heads;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int col = lane % (kDim / 8);
  const SelectAttendSmem lay = SelectAttendSmem::of(
      ClusterSelectSmem::of(heads, kDim, cs, slice, kp.max_clusters, epi.stage_bytes()), heads,
      kDim, cs, kG, static_cast<int>(sizeof(Attend)));

  // The queries the scoring used: the prologue's fp32 copy of the caller's T values, so these are
  // the values decode_attention_kernel converts.
  const float* qs = reinterpret_cast<const float*>(smem);
  float q[kG][8];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      q[g][i] = g < heads ? qs[g * kDim + col * 8 + i] * ap.qk_scale : 0.f;
  }

  Attend& am = *reinterpret_cast<Attend*>(smem + lay.attend);
  WarpSoftmax<kG> st;
  st.init();
  ChunkCursor<kDim * 2, true> cur(rows, problem, seq, kv_head, lane);
  // The list's row prefix, once per CTA: the warps seek in shared memory (int32: a problem
  // attends fewer than 2^31 rows).
  int64_t total = 0;
  const int chunks = cur.num_chunks();
  if (chunks <= select_attend_device::kPrefixChunks) {  // block-uniform
    // The scan's storage is the selection's (done; the static shared memory is at its limit).
    using PrefixScan = cub::BlockScan<int32_t, kThreads>;
    static_assert(sizeof(typename PrefixScan::TempStorage) <= sizeof(sh) &&
                      alignof(typename PrefixScan::TempStorage) <= alignof(decltype(sh)),
                  "scan storage");
    auto& prefix_scan = reinterpret_cast<typename PrefixScan::TempStorage&>(sh);
    int32_t* prefix = reinterpret_cast<int32_t*>(smem + lay.prefix);
    int32_t carry = 0;
    for (int base = 0; base < chunks; base += kThreads) {
      const int i = base + static_cast<int>(threadIdx.x);
      int32_t incl = 0, tile = 0;
      PrefixScan(prefix_scan).InclusiveSum(i < chunks ? cur.chunk_rows(i) : 0, incl, tile);
      if (i < chunks) prefix[i] = carry + incl;
      carry += tile;
      __syncthreads();  // the prefix is complete and the scan's storage free again
    }
    cur.use_prefix(prefix);
    total = carry;
  } else {
    total = cur.total_rows();
  }
  const int64_t s0 = aligned_bound(total, rank, cs);
  const int64_t s1 = aligned_bound(total, rank + 1, cs);
  const int64_t w0 = s0 + aligned_bound(s1 - s0, warp, kW, rows_per_step<kDim>());
  const int64_t w1 = s0 + aligned_bound(s1 - s0, warp + 1, kW, rows_per_step<kDim>());
  if (w1 > w0) {
    attend_warp_rows<T, kDim, kG, kS>(cur, w0, w1, q, &am.ring.kv[warp][0][0][lane],
                                      am.ring.rec[warp], lane, st);
  }
  float* parts0 = cluster.map_shared_rank(reinterpret_cast<float*>(smem + lay.parts), 0);
  float* lse0 = cluster.map_shared_rank(reinterpret_cast<float*>(smem + lay.parts_lse), 0);
  merge_block_warps<kDim, kG, kW>(st, am.merge, heads, lane, warp,
                                  [&](int g, int d, float o, float lse2) {
                                    parts0[(rank * kG + g) * kDim + d] = o;
                                    if (d == 0) lse0[rank * kG + g] = lse2;
                                  });
  cluster.sync();  // CTA 0 holds every split; no CTA touches another's memory after this
  if (rank != 0) return;

  // The splits' log-sum-exp merge, one (head, column) per thread.
  const float* parts = reinterpret_cast<const float*>(smem + lay.parts);
  const float* plse = reinterpret_cast<const float*>(smem + lay.parts_lse);
  T* out = static_cast<T*>(ap.out_at != nullptr ? *ap.out_at : ap.out);
  float* lse_out = ap.lse_at != nullptr ? *ap.lse_at : ap.lse;
  for (int idx = static_cast<int>(threadIdx.x); idx < heads * kDim; idx += kThreads) {
    const int g = idx / kDim, d = idx % kDim;
    float mx = -INFINITY;
    for (int r = 0; r < cs; ++r) mx = fmaxf(mx, plse[r * kG + g]);
    float o = 0.f, wsum = 0.f;
    if (mx != -INFINITY) {
      for (int r = 0; r < cs; ++r) {
        const float l = plse[r * kG + g];
        if (l != -INFINITY) {
          const float f = ex2(l - mx);
          wsum += f;
          o = fmaf(f, parts[(r * kG + g) * kDim + d], o);
        }
      }
      o /= wsum;
    }
    const size_t row = static_cast<size_t>(seq) * ap.num_q_heads + kv_head * heads + g;
    store_elem(out + row * kDim + d, o);
    if (d == 0 && lse_out != nullptr) {
      lse_out[row] = wsum > 0.f ? (mx + log2f(wsum)) * kLn2 : -INFINITY;
    }
  }
#endif
}

namespace detail {

/// How score_select_attend_kernel runs a call (cluster 0: it does not run).
using SelectAttendPlan = ClusterSelectPlan;

/// The plan of one instantiation: plan_cluster_kernel with the attention's shared memory
/// (SelectAttendSmem); cluster 0 with KVTIER_SELECT_ATTEND=0 or more problems than
/// multiprocessors.
template <int kDim, int kG, int kThreads>
SelectAttendPlan plan_score_select_attend(const ClusterSelectParams& p, const void* kernel,
                                          int stage_bytes) {
  using Attend =
      decode_attention_device::BlockSmem<kG, kDim, kThreads / 32, select_attend_device::kStages>;
  if (!select_attend_enabled() || p.num_problems > sm_count()) return SelectAttendPlan{};
  return plan_cluster_kernel(p, kernel, kThreads, [&](int cs, int slice) {
    return static_cast<size_t>(
        SelectAttendSmem::of(
            ClusterSelectSmem::of(p.group_size, kDim, cs, slice, p.max_clusters, stage_bytes),
            p.group_size, kDim, cs, kG, static_cast<int>(sizeof(Attend)))
            .total);
  });
}

/// Calls f(dim, tile, threads, kernel) with the instantiation of score_select_attend_kernel (as a
/// function pointer; dim, tile and threads as integral constants) for the call's dtype, head_dim,
/// group and block tier; nothing for a group above 8 heads, a group above 4 with more than 1024
/// clusters (the 512-thread tier), or a dtype other than fp16 / bf16.
template <typename Epilogue, typename F>
void dispatch_score_select_attend(const ClusterSelectParams& p, DType dtype, F&& f) {
  if (p.group_size > decode_attention_device::kMaxTileHeads) return;
  if (dtype != DType::kF16 && dtype != DType::kBF16) return;
  decode_attention_device::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_head_dim(p.head_dim, [&](auto dim) {
      constexpr int kDim = decltype(dim)::value;
      dispatch_head_tile(p.group_size, [&](auto tile) {
        constexpr int kG = decltype(tile)::value;
        if (p.max_clusters <= 256) {
          f(dim, tile, std::integral_constant<int, 128>{},
            score_select_attend_kernel<T, kDim, 128, 2, kG, Epilogue>);
        } else if (p.max_clusters <= 1024) {
          f(dim, tile, std::integral_constant<int, 256>{},
            score_select_attend_kernel<T, kDim, 256, 4, kG, Epilogue>);
        } else if constexpr (kG <= 4) {
          // At 512 threads a thread has 128 registers: queries and accumulators of 8 heads alone
          // take them all (the loop would run from local memory), so such groups attend apart.
          f(dim, tile, std::integral_constant<int, 512>{},
            score_select_attend_kernel<T, kDim, 512, 8, kG, Epilogue>);
        }
      });
    });
  });
}

/// Scores, selects (the epilogue building problem p's chunk list at at.chunks from
/// at.chunk_indptr[p] to at.chunk_end[p]) and attends in one launch of score_select_attend_kernel
/// when its plan runs it; false (nothing launched) otherwise. p.num_problems must be
/// ap.num_seqs * ap.num_kv_heads.
template <typename Epilogue>
bool launch_score_select_attend(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                                const SelectKernelParams& kp, const Epilogue& epi,
                                const DecodeAttentionParams& ap, const DecodeAttentionTensors& at,
                                cudaStream_t stream) {
  if (p.num_problems == 0 || at.chunk_end == nullptr) return false;
  KVTIER_CHECK(static_cast<int64_t>(ap.num_seqs) * ap.num_kv_heads == p.num_problems &&
                   ap.num_q_heads == ap.num_kv_heads * p.group_size && ap.head_dim == p.head_dim,
               "launch_score_select_attend: attention of ", ap.num_seqs, " sequences x ",
               ap.num_kv_heads, " KV heads (", ap.num_q_heads,
               " query heads) does not match selection of ", p.num_problems, " problems, group ",
               p.group_size);
  const ScoreKernelParams sk = score_kernel_params(p, t);
  AttentionKernelParams akp{};
  akp.out = at.out;
  akp.lse = at.lse;
  akp.num_q_heads = ap.num_q_heads;
  akp.num_kv_heads = ap.num_kv_heads;
  akp.group_size = p.group_size;
  akp.num_tiles = 1;
  akp.num_splits = 1;
  akp.qk_scale = decode_attention_scale(ap) * decode_attention_device::kLog2e;
  akp.out_at = at.out_at;
  akp.lse_at = at.lse_at;
  const ChunkedRows rows{at.chunks, at.chunk_indptr, at.chunk_end};
  bool launched = false;
  dispatch_score_select_attend<Epilogue>(
      p, ap.dtype, [&](auto dim, auto tile, auto tier, auto kernel) {
        constexpr int kDim = decltype(dim)::value;
        constexpr int kG = decltype(tile)::value;
        constexpr int threads = decltype(tier)::value;
        const auto [plan, e] = plan_with_stage(epi, [&](int stage_bytes) {
          return plan_score_select_attend<kDim, kG, threads>(
              p, reinterpret_cast<const void*>(kernel), stage_bytes);
        });
        if (plan.cluster == 0) return;
        const cudaError_t err = launch_pdl_cluster(
            kernel, dim3(static_cast<unsigned>(p.num_problems * plan.cluster)), threads, plan.bytes,
            stream, static_cast<unsigned>(plan.cluster), sk, kp, e, plan.slice, akp, rows);
        KVTIER_CHECK(err == cudaSuccess, "score_select_attend_kernel: ", cudaGetErrorString(err),
                     " (problems ", p.num_problems, ", cluster ", plan.cluster, ", threads ",
                     threads, ", dynamic shared memory ", plan.bytes, " bytes, max_clusters ",
                     p.max_clusters, ", group ", p.group_size, ")");
        launched = true;
      });
  return launched;
}

}  // namespace detail

}  // namespace kvtier::kernels
