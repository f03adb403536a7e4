// A recall layer's scoring, selection, chunk lists and attention in one kernel of thread block
// clusters (kernels/select_attend_kernels.cuh), with the engine's chunk builder as the epilogue.
// A file of its own: its instantiations (dtype x head_dim x group x block tier) take longer to
// compile than the rest of the engine's kernels together.
#include <cuda_runtime.h>

#include "kernels/select_attend_kernels.cuh"
#include "memory/core/check.h"
#include "scheduler/engine_chunks.cuh"
#include "scheduler/engine_kernels.h"

namespace kvtier::scheduler {

bool launch_recall_select_attend(const kernels::ClusterSelectParams& sp,
                                 const kernels::ClusterSelectTensors& t, void* workspace,
                                 size_t workspace_bytes, const ChunkBuildParams& bp,
                                 const kernels::DecodeAttentionParams& ap,
                                 const kernels::DecodeAttentionTensors& at, cudaStream_t stream) {
  KVTIER_CHECK(t.nonfinite_problem == nullptr,
               "launch_recall_select_attend: nonfinite_problem is not supported (it is not reset)");
  KVTIER_CHECK(
      at.chunks == bp.chunks && at.chunk_indptr == bp.indptr && at.chunk_end == bp.chunk_end,
      "launch_recall_select_attend: attention must read the lists the builder writes");
  (void)kernels::detail::check_score_select_split(sp, t, workspace, workspace_bytes);
  kernels::SelectKernelParams kp = kernels::detail::select_kernel_params(sp, t);
  kp.scores = nullptr;
  kp.scores_out = t.scores;
  return kernels::detail::launch_score_select_attend(
      sp, t, kp, chunks_device::BuildChunksEpilogue::for_clusters(bp), ap, at, stream);
}

}  // namespace kvtier::scheduler
