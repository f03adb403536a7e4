// Launchers of the fetch gather: the GPU kernel and the copy-engine path.
#include <algorithm>
#include <vector>

#include "kernels/kv_gather_kernels.cuh"
#include "memory/core/check.h"

namespace kvtier::kernels {

namespace {
constexpr int kGatherThreads = 256;

/// Loads in flight per lane before the first store. Measured on an H100 (bench/RESULTS.md):
/// 8 and 16 reach the same bandwidth within noise, so the variant with fewer registers stays.
constexpr int kGatherUnroll = 8;

template <int kUnroll>
int max_resident_blocks() {
  static const int blocks = [] {
    int device = 0, sms = 0, per_sm = 0;
    KVTIER_CUDA_CHECK(cudaGetDevice(&device));
    KVTIER_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    KVTIER_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, gather_segments_kernel<kUnroll>, kGatherThreads, 0));
    return sms * std::max(per_sm, 1);
  }();
  return blocks;
}

template <int kUnroll>
void launch_gather_unrolled(const GatherParams& p, cudaStream_t stream) {
  const int warps_per_block = kGatherThreads / 32;
  const int64_t want =
      (static_cast<int64_t>(p.num_segments) + warps_per_block - 1) / warps_per_block;
  const int blocks = static_cast<int>(std::min<int64_t>(want, max_resident_blocks<kUnroll>()));
  gather_segments_kernel<kUnroll><<<blocks, kGatherThreads, 0, stream>>>(p);
  KVTIER_CUDA_CHECK_LAUNCH("gather_segments_kernel");
}
}  // namespace

void launch_gather(const GatherParams& p, cudaStream_t stream) {
  check_gather_params(p);
  if (p.num_segments == 0) return;
  launch_gather_unrolled<kGatherUnroll>(p, stream);
}

int64_t launch_gather_copy_engine(const memory::GatherSegment* segs, int32_t num_segments,
                                  int32_t row_bytes, int32_t page_size, std::byte* k_pool,
                                  std::byte* v_pool, cudaStream_t stream) {
  GatherParams p;
  p.segments = segs;
  p.num_segments = num_segments;
  p.row_bytes = row_bytes;
  p.page_size = page_size;
  p.k_pool = k_pool;
  p.v_pool = v_pool;
  check_gather_params(p);
  if (num_segments == 0) return 0;
  const size_t page_bytes = static_cast<size_t>(page_size) * row_bytes;
  // Merge runs that are contiguous on both sides (cluster rows are contiguous in the host tier;
  // pages of one cluster are contiguous in the pool when they were allocated together).
  struct Piece {
    const std::byte* src_k;
    const std::byte* src_v;
    size_t dst_off;
    size_t bytes;
  };
  std::vector<Piece> pieces;
  pieces.reserve(static_cast<size_t>(num_segments));
  for (int32_t i = 0; i < num_segments; ++i) {
    const memory::GatherSegment& s = segs[i];
    Piece q{
        static_cast<const std::byte*>(s.src_k), static_cast<const std::byte*>(s.src_v),
        static_cast<size_t>(s.dst_page) * page_bytes + static_cast<size_t>(s.dst_row) * row_bytes,
        static_cast<size_t>(s.num_rows) * row_bytes};
    if (!pieces.empty()) {
      Piece& b = pieces.back();
      if (b.src_k + b.bytes == q.src_k && b.src_v + b.bytes == q.src_v &&
          b.dst_off + b.bytes == q.dst_off) {
        b.bytes += q.bytes;
        continue;
      }
    }
    pieces.push_back(q);
  }
  // One copy per merged piece: cluster runs are rarely longer than a few pages, which is why this
  // path is slow (per-copy overhead dominates) and the gather kernel is the default.
  for (const Piece& q : pieces) {
    KVTIER_CUDA_CHECK(
        cudaMemcpyAsync(k_pool + q.dst_off, q.src_k, q.bytes, cudaMemcpyDefault, stream));
    KVTIER_CUDA_CHECK(
        cudaMemcpyAsync(v_pool + q.dst_off, q.src_v, q.bytes, cudaMemcpyDefault, stream));
  }
  return static_cast<int64_t>(2 * pieces.size());
}

}  // namespace kvtier::kernels
