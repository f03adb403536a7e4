// Launchers of ClusterAttn's prefill compression: the observation votes (two flash-style passes
// over key tiles plus a combine, fp32 on CUDA cores) and DBAC (stats, budget split, selection;
// one block per KV head, exact integer decisions, so the results equal dbac_ref bit for bit).
// NOTE: the vote scores run on CUDA cores (~1.4e11 FMA for n = 128K, 32 query heads, Wobs 64,
// head_dim 128: a few ms on an H100, once per layer at the end of prefill); tensor cores are the
// next step if that shows up in profiles.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernels/density_cluster.h"
#include "kernels/density_cluster_kernels.cuh"
#include "kernels/dispatch.h"
#include "memory/core/check.h"

namespace kvtier::kernels {

namespace {

size_t align_up(size_t v) { return (v + 255) / 256 * 256; }

/// Carves `base` into aligned pieces, or only adds up their sizes when `base` is null.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<std::byte*>(base)) {}
  template <typename T>
  T* take(size_t count) {
    T* ptr = base_ ? reinterpret_cast<T*>(base_ + off_) : nullptr;
    off_ += align_up(count * sizeof(T));
    return ptr;
  }
  size_t bytes() const { return off_; }

 private:
  std::byte* base_;
  size_t off_ = 0;
};

bool pools(const ObservationVotesParams& p) {
  return p.pool != VotePool::kNone && p.pool_kernel > 1;
}

int64_t num_key_tiles(int64_t keys) {
  return (keys + dbac_device::kVoteTileKeys - 1) / dbac_device::kVoteTileKeys;
}

struct VotesWorkspace {
  float2* partial;
  float2* row_stats;
  float* raw;
};

VotesWorkspace carve_votes(const ObservationVotesParams& p, void* base, size_t* bytes) {
  const int64_t rows = int64_t{p.num_q_heads} * p.window, m = num_prefix_tokens(p);
  Carver c(base);
  VotesWorkspace w;
  w.partial = c.take<float2>(static_cast<size_t>(num_key_tiles(p.num_tokens) * rows));
  w.row_stats = c.take<float2>(static_cast<size_t>(rows));
  w.raw = c.take<float>(pools(p) ? static_cast<size_t>(int64_t{p.num_kv_heads} * m) : 0);
  *bytes = c.bytes();
  return w;
}

template <typename T, int kHeadDim>
void run_votes(const ObservationVotesParams& p, const dbac_device::VoteKernelParams& k,
               float* votes, cudaStream_t stream) {
  using namespace dbac_device;
  const int64_t num_tiles = num_key_tiles(p.num_tokens);
  const int64_t num_prefix_tiles = num_key_tiles(k.num_prefix);
  votes_partial_kernel<T, kHeadDim>
      <<<dim3(static_cast<unsigned>(num_tiles), static_cast<unsigned>(p.num_kv_heads)),
         kVoteThreads, 0, stream>>>(k);
  KVTIER_CUDA_CHECK_LAUNCH("votes_partial_kernel");
  votes_combine_kernel<<<static_cast<unsigned>((k.num_rows + 255) / 256), 256, 0, stream>>>(
      k, static_cast<int32_t>(num_tiles));
  KVTIER_CUDA_CHECK_LAUNCH("votes_combine_kernel");
  votes_accumulate_kernel<T, kHeadDim>
      <<<dim3(static_cast<unsigned>(num_prefix_tiles), static_cast<unsigned>(p.num_kv_heads)),
         kVoteThreads, 0, stream>>>(k);
  KVTIER_CUDA_CHECK_LAUNCH("votes_accumulate_kernel");
  if (pools(p)) {
    const int64_t count = int64_t{p.num_kv_heads} * k.num_prefix;
    votes_pool_kernel<<<static_cast<unsigned>((count + 255) / 256), 256, 0, stream>>>(
        k.votes, k.num_prefix, count, p.pool, p.pool_kernel, votes);
    KVTIER_CUDA_CHECK_LAUNCH("votes_pool_kernel");
  }
}

/// dtype here, head_dim through dispatch_head_dim; the default fails loudly
/// (check_observation_votes_params has already rejected anything else).
template <typename F>
void dispatch_votes(DType dtype, int head_dim, F&& f) {
  auto with_dim = [&](auto tag) { dispatch_head_dim(head_dim, [&](auto dim) { f(tag, dim); }); };
  switch (dtype) {
    case DType::kF32:
      with_dim(float{});
      break;
    case DType::kF16:
      with_dim(__half{});
      break;
    case DType::kBF16:
      with_dim(__nv_bfloat16{});
      break;
    default:
      KVTIER_CHECK(false, "unsupported votes dtype ", static_cast<int>(dtype));
  }
}

struct DbacWorkspace {
  int32_t* shift;
  int64_t* total;
  int64_t* work;
  int32_t* concentration;
  int64_t* prefix;
  int32_t* cl_first;
  int32_t* cl_last;
  int32_t* cl_begin;
  int32_t* cl_end;
  int32_t* cl_taken;
  int64_t* cl_mass;
};

int64_t cluster_capacity(const DbacParams& p) {
  const int64_t m = num_prefix_tokens(p);
  return m > 0 ? (m - 1) / (int64_t{p.eps} + 1) + 1 : 0;
}

DbacWorkspace carve_dbac(const DbacParams& p, void* base, size_t* bytes) {
  const size_t heads = static_cast<size_t>(p.num_kv_heads);
  const size_t m = static_cast<size_t>(num_prefix_tokens(p));
  const size_t cap = heads * static_cast<size_t>(cluster_capacity(p));
  Carver c(base);
  DbacWorkspace w;
  w.shift = c.take<int32_t>(heads);
  w.total = c.take<int64_t>(heads);
  w.work = c.take<int64_t>(heads);
  w.concentration = c.take<int32_t>(heads);
  w.prefix = c.take<int64_t>(heads * (m + 1));
  w.cl_first = c.take<int32_t>(cap);
  w.cl_last = c.take<int32_t>(cap);
  w.cl_begin = c.take<int32_t>(cap);
  w.cl_end = c.take<int32_t>(cap);
  w.cl_taken = c.take<int32_t>(cap);
  w.cl_mass = c.take<int64_t>(cap);
  *bytes = c.bytes();
  return w;
}

}  // namespace

// ---- step 1: observation-window votes ----

size_t observation_votes_workspace_bytes(const ObservationVotesParams& p) {
  check_observation_votes_params(p);
  size_t bytes = 0;
  carve_votes(p, nullptr, &bytes);
  return bytes;
}

void launch_observation_votes(const ObservationVotesParams& p, const void* q_window,
                              const void* keys, float* votes, void* workspace,
                              int32_t* nonfinite_dev, cudaStream_t stream) {
  check_observation_votes_params(p);
  const int64_t m = num_prefix_tokens(p);
  KVTIER_CHECK(q_window && keys && workspace && (votes || m == 0),
               "launch_observation_votes: null pointer argument");
  if (nonfinite_dev) KVTIER_CUDA_CHECK(cudaMemsetAsync(nonfinite_dev, 0, 4, stream));
  if (m == 0) return;
  size_t bytes = 0;
  const VotesWorkspace w = carve_votes(p, workspace, &bytes);
  dbac_device::VoteKernelParams k;
  k.q_window = q_window;
  k.keys = keys;
  k.partial = w.partial;
  k.row_stats = w.row_stats;
  k.votes = pools(p) ? w.raw : votes;
  k.nonfinite = nonfinite_dev;
  k.num_tokens = p.num_tokens;
  k.num_prefix = m;
  k.window = p.window;
  k.rows_per_head = p.num_q_heads / p.num_kv_heads * p.window;
  k.num_rows = int64_t{p.num_q_heads} * p.window;
  k.scale_log2 = static_cast<float>(observation_votes_scale(p) * 1.4426950408889634);  // log2(e)
  dispatch_votes(p.dtype, p.head_dim, [&](auto tag, auto dim) {
    run_votes<decltype(tag), decltype(dim)::value>(p, k, votes, stream);
  });
}

// ---- step 2: DBAC ----

size_t dbac_workspace_bytes(const DbacParams& p) {
  check_dbac_params(p);
  size_t bytes = 0;
  carve_dbac(p, nullptr, &bytes);
  return bytes;
}

void launch_dbac(const DbacParams& p, const float* votes, const DbacOutput& out, void* workspace,
                 int64_t* invalid_vote_dev, cudaStream_t stream) {
  check_dbac_params(p);
  check_dbac_output(out);
  const int64_t m = num_prefix_tokens(p);
  KVTIER_CHECK(workspace && (votes || m == 0), "launch_dbac: null pointer argument");
  size_t bytes = 0;
  const DbacWorkspace w = carve_dbac(p, workspace, &bytes);
  if (invalid_vote_dev) KVTIER_CUDA_CHECK(cudaMemsetAsync(invalid_vote_dev, 0xff, 8, stream));
  dbac_device::DbacKernelParams k;
  k.votes = votes;
  k.num_kv_heads = p.num_kv_heads;
  k.m = static_cast<int32_t>(m);
  k.window = p.window;
  k.eps = p.eps;
  k.ratio = p.min_density_ratio;
  k.coverage = p.coverage;
  k.total_budget = p.total_budget;
  k.budget_floor = dbac_budget_floor(p);
  k.cluster_capacity = cluster_capacity(p);
  k.range_capacity = dbac_range_capacity(p);
  k.kept_capacity = dbac_kept_capacity(p);
  k.ranges = out.ranges;
  k.num_ranges = out.num_ranges;
  k.num_tokens = out.num_tokens;
  k.head_budget = out.head_budget;
  k.concentration = out.concentration ? out.concentration : w.concentration;
  k.kept = out.kept_positions;
  k.num_kept = out.num_kept;
  static_assert(sizeof(int64_t) == sizeof(unsigned long long), "64-bit error word");
  k.invalid_vote = reinterpret_cast<unsigned long long*>(invalid_vote_dev);
  k.shift = w.shift;
  k.total = w.total;
  k.work = w.work;
  k.prefix = w.prefix;
  k.cl_first = w.cl_first;
  k.cl_last = w.cl_last;
  k.cl_begin = w.cl_begin;
  k.cl_end = w.cl_end;
  k.cl_taken = w.cl_taken;
  k.cl_mass = w.cl_mass;
  const unsigned heads = static_cast<unsigned>(p.num_kv_heads);
  dbac_device::dbac_stats_kernel<<<heads, dbac_device::kDbacThreads, 0, stream>>>(k);
  KVTIER_CUDA_CHECK_LAUNCH("dbac_stats_kernel");
  dbac_device::dbac_budget_kernel<<<1, 32, 0, stream>>>(k);
  KVTIER_CUDA_CHECK_LAUNCH("dbac_budget_kernel");
  dbac_device::dbac_select_kernel<<<heads, dbac_device::kDbacThreads, 0, stream>>>(k);
  KVTIER_CUDA_CHECK_LAUNCH("dbac_select_kernel");
}

}  // namespace kvtier::kernels
