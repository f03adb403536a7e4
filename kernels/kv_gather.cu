// Launchers of the fetch gather: the GPU kernel and the copy-engine path.
#include <algorithm>
#include <atomic>
#include <vector>

#include "kernels/kv_gather_kernels.cuh"
#include "memory/core/check.h"
#include "memory/core/log.h"

namespace kvtier::kernels {

namespace {
constexpr int kGatherThreads = 256;
constexpr int kGatherUnroll = 8;

int max_resident_blocks() {
  static const int blocks = [] {
    int device = 0, sms = 0, per_sm = 0;
    KVTIER_CUDA_CHECK(cudaGetDevice(&device));
    KVTIER_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    KVTIER_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, gather_segments_kernel<kGatherUnroll>, kGatherThreads, 0));
    return sms * std::max(per_sm, 1);
  }();
  return blocks;
}
}  // namespace

void launch_gather(const GatherParams& p, cudaStream_t stream) {
  check_gather_params(p);
  if (p.num_segments == 0) return;
  const int warps_per_block = kGatherThreads / 32;
  const int64_t want = (static_cast<int64_t>(p.num_segments) + warps_per_block - 1) / warps_per_block;
  const int blocks = static_cast<int>(std::min<int64_t>(want, max_resident_blocks()));
  gather_segments_kernel<kGatherUnroll><<<blocks, kGatherThreads, 0, stream>>>(p);
  KVTIER_CUDA_CHECK_LAUNCH("gather_segments_kernel");
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
    Piece q{static_cast<const std::byte*>(s.src_k), static_cast<const std::byte*>(s.src_v),
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
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  dsts.reserve(2 * pieces.size());
  srcs.reserve(2 * pieces.size());
  sizes.reserve(2 * pieces.size());
  for (const Piece& q : pieces) {
    dsts.push_back(k_pool + q.dst_off);
    srcs.push_back(q.src_k);
    sizes.push_back(q.bytes);
    dsts.push_back(v_pool + q.dst_off);
    srcs.push_back(q.src_v);
    sizes.push_back(q.bytes);
  }
  cudaMemcpyAttributes attr{};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attr.flags = cudaMemcpyFlagDefault;
  size_t attr_index = 0;
  const cudaError_t err = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(),
                                               &attr, &attr_index, 1, stream);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // tolerated: fall back to one copy per piece
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true)) {
      KVTIER_LOG(kWarn, "cudaMemcpyBatchAsync failed (", cudaGetErrorName(err),
                 "); using one cudaMemcpyAsync per piece");
    }
    for (size_t i = 0; i < dsts.size(); ++i)
      KVTIER_CUDA_CHECK(cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, stream));
  }
  return static_cast<int64_t>(dsts.size());
}

}  // namespace kvtier::kernels
