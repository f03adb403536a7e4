// Decode-attention benchmarks (kernels/decode_attention.h) at the Llama-3.1-8B shape of
// bench/model_shapes.h: 32 query heads, 8 KV heads (G = 4), head_dim 128, bf16; one layer.
// Every case is checked once against decode_attention_ref (on three of its problems: the first,
// a middle and the last) before it is timed; fused-fetch cases also check the copied pages
// bitwise. Then one launch (or launch sequence) per iteration is timed with CUDA events, after a
// warm-up; an untimed 128 MiB memset runs ahead of the start event, so L2 starts cold and the
// host's launch overhead is not in the figure (as in bench_selection).
//   BM_CopyCeiling/MiB                  cudaMemcpyAsync device to device: TB_per_s counts bytes
//       read plus written, the HBM ceiling for a streaming kernel.
//   BM_DenseDecode/batch                launch_dense_decode_attention at 131072 rows per
//       sequence (512 MiB of K+V per sequence and layer), batch 1 and 4. TB_per_s = K+V bytes
//       read / time; splits = the split count chosen.
//   BM_DenseDecodeChunked/batch         the same rows through launch_decode_attention, one chunk
//       per problem.
//   BM_SparseDecode/batch               sink 16 + 128 pages of 16 rows (2048) at random positions
//       of a page pool + window 256 per problem (2320 rows), batch 1, 8 and 32.
//   BM_FusedFetch/batch/hit_pct         the sparse problem where (100 - hit_pct)% of the 128
//       pages are misses: their rows are read from mapped pinned host memory by the attention,
//       which also writes them into free pool pages (one launch).
//   BM_GatherThenAttend/batch/hit_pct   the same misses fetched by launch_gather (kv_gather.h)
//       into the pool pages first, then attention over pool pages only (two launches).
//   Counters of the fetch cases: miss_MB (K+V bytes from the host) and host_GB_per_s (that over
//   the whole time).
// Environment:
//   KVTIER_BENCH_L2_FLUSH=memset|read   how L2 is emptied before each timed launch. memset (the
//       default, as in bench_selection) leaves L2 full of dirty lines, whose write-back (up to
//       ~50 MB) shares HBM with the timed kernel; read streams a 256 MiB buffer through attention
//       instead, leaving clean lines.
//   KVTIER_BENCH_SPLITS=N   forces num_splits (0 or unset: the launcher's choice).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "bench/model_shapes.h"
#include "kernels/decode_attention.h"
#include "kernels/kv_gather.h"
#include "memory/core/check.h"
#include "memory/core/cuda_raii.h"
#include "memory/core/half.h"
#include "memory/pinned_buffer.h"

namespace kvtier::bench {
namespace {

#if KVTIER_WITH_CUDA
constexpr ModelShape kModel = kModelShapes[0];  // Llama-3.1-8B
constexpr int32_t kGroup = kModel.num_q_heads / kModel.num_kv_heads;
constexpr int64_t kDenseRows = 131072;
constexpr int32_t kDenseMaxBatch = 4;
constexpr int32_t kSink = 16, kPages = 128, kPageRows = 16, kWindow = 256;
constexpr int32_t kSparseRows = kSink + kPages * kPageRows + kWindow;  // 2320
constexpr int32_t kSparseMaxBatch = 32;
constexpr size_t kRowBytes = 2 * kModel.head_dim;  // bf16
constexpr size_t kPageBytes = kPageRows * kRowBytes;

using kernels::DecodeAttentionParams;
using kernels::KvChunk;

template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

/// splitmix64, and bf16 values from it: N(0, 1)-ish (sum of 4 uniforms, scaled), fast enough for
/// gigabytes.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint16_t bf16() {
    const uint64_t x = next();
    float s = 0;
    for (int i = 0; i < 4; ++i) s += static_cast<float>((x >> (16 * i)) & 0xffff) * (1.f / 65536.f);
    return float_to_bf16((s - 2.f) * 1.7320508f);  // variance 4/12 -> 1
  }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }

 private:
  uint64_t s_;
};

/// bytes of random bf16 rows.
void fill_bf16(std::byte* dst, size_t bytes, Rng& rng) {
  auto* h = reinterpret_cast<uint16_t*>(dst);
  for (size_t i = 0; i < bytes / 2; ++i) h[i] = rng.bf16();
}

DecodeAttentionParams layer_params(int32_t batch);

int32_t forced_splits() {
  const char* v = std::getenv("KVTIER_BENCH_SPLITS");
  return v != nullptr ? std::atoi(v) : 0;
}

bool read_flush() {
  const char* v = std::getenv("KVTIER_BENCH_L2_FLUSH");
  return v != nullptr && std::string(v) == "read";
}

/// The stream, the timing events and the L2 flush shared by every case.
struct Gpu {
  static constexpr int64_t kFlushRows = 65536;  // x 8 KV heads x 256 B: 128 MiB of K, of V
  cuda::Stream stream{0};
  cuda::Event start{cuda::EventTiming::kEnabled}, stop{cuda::EventTiming::kEnabled};
  cuda::DeviceAllocation filler{size_t{256} << 20, 0};  // > 50 MiB of H100 L2
  cuda::DeviceAllocation flush_q{size_t{64} << 10, 0}, flush_out{size_t{64} << 10, 0};
  cuda::DeviceAllocation flush_ws{size_t{4} << 20, 0}, flush_lens{64, 0};
  bool read = read_flush();

  Gpu() {
    cuda::memset_async(filler.get(), 0, filler.size_bytes(), stream.get());
    cuda::memset_async(flush_q.get(), 0, flush_q.size_bytes(), stream.get());
    const std::vector<int32_t> lens = {static_cast<int32_t>(kFlushRows)};
    cuda::memcpy_async(flush_lens.get(), lens.data(), 4, stream.get());
    stream.synchronize();
  }
  /// Empties L2 of the timed case's data (see KVTIER_BENCH_L2_FLUSH).
  void flush_l2() {
    if (!read) {
      cuda::memset_async(filler.get(), 0x5a, filler.size_bytes() / 2, stream.get());
      return;
    }
    DecodeAttentionParams p = layer_params(1);
    p.num_splits = 64;
    const std::byte* base = static_cast<const std::byte*>(filler.get());
    kernels::launch_dense_decode_attention(
        p,
        {flush_q.get(), base, base + filler.size_bytes() / 2,
         static_cast<const int32_t*>(flush_lens.get()), kFlushRows, flush_out.get(), nullptr},
        flush_ws.get(), flush_ws.size_bytes(), stream.get());
  }
};

/// Times `launch` once per iteration with CUDA events after one warm-up; returns the mean in ms.
template <typename F>
double time_launches(benchmark::State& state, Gpu& gpu, F&& launch) {
  launch();
  gpu.stream.synchronize();
  double total_ms = 0;
  for (auto _ : state) {
    gpu.flush_l2();
    gpu.start.record(gpu.stream.get());
    launch();
    gpu.stop.record(gpu.stream.get());
    gpu.stop.synchronize();
    const double ms = cuda::elapsed_ms(gpu.start, gpu.stop);
    total_ms += ms;
    state.SetIterationTime(ms * 1e-3);
  }
  return state.iterations() > 0 ? total_ms / static_cast<double>(state.iterations()) : 0.0;
}

DecodeAttentionParams layer_params(int32_t batch) {
  DecodeAttentionParams p;
  p.num_seqs = batch;
  p.num_q_heads = kModel.num_q_heads;
  p.num_kv_heads = kModel.num_kv_heads;
  p.head_dim = kModel.head_dim;
  p.dtype = DType::kBF16;
  p.num_splits = forced_splits();
  return p;
}

/// The outputs of one call on the device, with a workspace for `max_rows`.
struct Outputs {
  cuda::DeviceBuffer<std::byte> out;
  cuda::DeviceBuffer<float> lse;
  cuda::DeviceAllocation workspace;
  size_t workspace_bytes = 0;
  int32_t splits = 0;

  Outputs(const DecodeAttentionParams& p, int64_t max_rows)
      : out(static_cast<size_t>(p.num_seqs) * p.num_q_heads * kRowBytes, 0),
        lse(static_cast<size_t>(p.num_seqs) * p.num_q_heads, 0) {
    workspace_bytes = kernels::decode_attention_workspace_bytes(p, max_rows);
    workspace = cuda::DeviceAllocation(std::max<size_t>(workspace_bytes, 1), 0);
    splits = kernels::decode_attention_num_splits(p, max_rows);
  }
};

/// One problem of a layer on the host: its chunk list over host rows, for the reference.
using HostChunks = std::vector<KvChunk>;

/// GPU outputs of `problems` (indices into `host`) against decode_attention_ref: "" if all are
/// within bf16 tolerance (1e-2 + 1e-2 |want|; lse 1e-3).
std::string check_against_ref(const DecodeAttentionParams& p, const std::vector<uint16_t>& q,
                              const std::vector<HostChunks>& host, const Outputs& o, Gpu& gpu) {
  const size_t out_rows = static_cast<size_t>(p.num_seqs) * p.num_q_heads;
  std::vector<uint16_t> out(out_rows * kModel.head_dim);
  std::vector<float> lse(out_rows);
  cuda::memcpy_async(out.data(), o.out.get(), out.size() * 2, gpu.stream.get());
  cuda::memcpy_async(lse.data(), o.lse.get(), lse.size() * 4, gpu.stream.get());
  gpu.stream.synchronize();
  const int32_t last = static_cast<int32_t>(host.size()) - 1;
  for (const int32_t problem : {0, last / 2, last}) {
    DecodeAttentionParams one = p;
    one.num_seqs = 1;
    one.num_kv_heads = 1;
    one.num_q_heads = kGroup;
    one.num_splits = 0;
    const size_t first_row = static_cast<size_t>(problem) * kGroup;  // (seq, kv_head) -> heads
    std::vector<uint16_t> want(static_cast<size_t>(kGroup) * kModel.head_dim);
    std::vector<float> want_lse(kGroup);
    const int32_t indptr[2] = {0, static_cast<int32_t>(host[problem].size())};
    kernels::decode_attention_ref(
        one, {q.data() + first_row * kModel.head_dim, host[problem].data(), indptr, want.data(),
              want_lse.data()});
    for (size_t i = 0; i < want.size(); ++i) {
      const double w = bf16_to_float(want[i]);
      const double g = bf16_to_float(out[first_row * kModel.head_dim + i]);
      if (!(std::abs(g - w) <= 1e-2 + 1e-2 * std::abs(w)))
        return str_cat("problem ", problem, " head ", i / kModel.head_dim, " dim ",
                       i % kModel.head_dim, ": ", g, ", reference ", w);
    }
    for (int32_t g = 0; g < kGroup; ++g) {
      if (!(std::abs(static_cast<double>(lse[first_row + g]) - want_lse[g]) <= 1e-3))
        return str_cat("problem ", problem, " head ", g, ": lse ", lse[first_row + g],
                       ", reference ", want_lse[g]);
    }
  }
  return "";
}

// ---- dense ----

/// K/V of kDenseMaxBatch sequences at kDenseRows rows, on host (for the check) and device;
/// batch b uses the first b sequences.
struct DenseLayer {
  std::vector<std::byte> k, v;
  std::vector<uint16_t> q;
  cuda::DeviceBuffer<std::byte> dk, dv;
  cuda::DeviceBuffer<uint16_t> dq;
  cuda::DeviceBuffer<int32_t> dlens;
  cuda::DeviceBuffer<KvChunk> dchunks;  // one chunk per problem (device rows)
  cuda::DeviceBuffer<int32_t> dindptr;
  std::map<int, std::string> verdicts;

  size_t problem_bytes() const { return static_cast<size_t>(kDenseRows) * kRowBytes; }
  std::vector<HostChunks> host_chunks(int32_t batch) const {
    std::vector<HostChunks> h(static_cast<size_t>(batch) * kModel.num_kv_heads);
    for (size_t i = 0; i < h.size(); ++i)
      h[i] = {{k.data() + i * problem_bytes(), v.data() + i * problem_bytes(), nullptr, nullptr,
               static_cast<int32_t>(kDenseRows)}};
    return h;
  }
};

std::unique_ptr<DenseLayer> make_dense(Gpu& gpu) {
  auto d = std::make_unique<DenseLayer>();
  const size_t problems = static_cast<size_t>(kDenseMaxBatch) * kModel.num_kv_heads;
  const size_t bytes = problems * d->problem_bytes();
  Rng rng(1234);
  // A random 64 MiB block repeated at rotating offsets: random enough for a bandwidth test, and
  // the check reads the same host bytes.
  std::vector<std::byte> block(size_t{64} << 20);
  fill_bf16(block.data(), block.size(), rng);
  d->k.resize(bytes);
  d->v.resize(bytes);
  for (size_t off = 0, i = 0; off < bytes; off += block.size() / 2, ++i) {
    const size_t n = std::min(block.size() / 2, bytes - off);
    std::memcpy(d->k.data() + off, block.data() + (i * 7919 * 256) % (block.size() / 2), n);
    std::memcpy(d->v.data() + off, block.data() + (i * 104729 * 256 + 4096) % (block.size() / 2),
                n);
  }
  d->q.resize(static_cast<size_t>(kDenseMaxBatch) * kModel.num_q_heads * kModel.head_dim);
  for (auto& x : d->q) x = rng.bf16();
  d->dk = cuda::DeviceBuffer<std::byte>(bytes, 0);
  d->dv = cuda::DeviceBuffer<std::byte>(bytes, 0);
  d->dq = cuda::DeviceBuffer<uint16_t>(d->q.size(), 0);
  cuda::memcpy_async(d->dk.get(), d->k.data(), bytes, gpu.stream.get());
  cuda::memcpy_async(d->dv.get(), d->v.data(), bytes, gpu.stream.get());
  cuda::memcpy_async(d->dq.get(), d->q.data(), d->q.size() * 2, gpu.stream.get());
  const std::vector<int32_t> lens(kDenseMaxBatch, static_cast<int32_t>(kDenseRows));
  d->dlens = cuda::DeviceBuffer<int32_t>(lens.size(), 0);
  cuda::memcpy_async(d->dlens.get(), lens.data(), lens.size() * 4, gpu.stream.get());
  std::vector<KvChunk> chunks(problems);
  std::vector<int32_t> indptr(problems + 1);
  for (size_t i = 0; i < problems; ++i) {
    chunks[i] = {d->dk.get() + i * d->problem_bytes(), d->dv.get() + i * d->problem_bytes(),
                 nullptr, nullptr, static_cast<int32_t>(kDenseRows)};
    indptr[i + 1] = static_cast<int32_t>(i + 1);
  }
  d->dchunks = cuda::DeviceBuffer<KvChunk>(problems, 0);
  d->dindptr = cuda::DeviceBuffer<int32_t>(problems + 1, 0);
  cuda::memcpy_async(d->dchunks.get(), chunks.data(), problems * sizeof(KvChunk), gpu.stream.get());
  cuda::memcpy_async(d->dindptr.get(), indptr.data(), indptr.size() * 4, gpu.stream.get());
  gpu.stream.synchronize();
  return d;
}

// ---- sparse: sink | pages | window ----

/// A layer of kSparseMaxBatch sequences: sink and window rows per problem in a resident buffer,
/// 128 pages per problem at distinct random positions of a pool of twice the pages needed. For
/// the fetch cases, also a mapped pinned host tier holding every page's rows (at other random
/// positions) and, per hit rate, the list of miss pages.
struct SparseLayer {
  int64_t pool_pages = 0;
  std::vector<std::byte> k_pool, v_pool, k_resident, v_resident;  // host copies
  std::vector<uint16_t> q;
  std::vector<int64_t> page_of;    // [problem, kPages] pool page of each selected page
  std::vector<int64_t> host_page;  // [problem, kPages] host-tier page holding the same rows
  cuda::DeviceBuffer<std::byte> dk_pool, dv_pool, dk_resident, dv_resident;
  cuda::DeviceBuffer<uint16_t> dq;
  memory::PinnedBuffer host_k, host_v;  // the host tier (filled on first use)
  std::map<int, std::string> verdicts;

  static int32_t problems(int32_t batch) { return batch * kModel.num_kv_heads; }
  static size_t resident_bytes() { return static_cast<size_t>(kSink + kWindow) * kRowBytes; }

  /// Chunks of problem i with every page in the pool, over host or device addresses.
  std::vector<KvChunk> pool_chunks(int32_t i, bool device) const {
    const std::byte* kp = device ? dk_pool.get() : k_pool.data();
    const std::byte* vp = device ? dv_pool.get() : v_pool.data();
    const std::byte* kr = (device ? dk_resident.get() : k_resident.data()) + i * resident_bytes();
    const std::byte* vr = (device ? dv_resident.get() : v_resident.data()) + i * resident_bytes();
    std::vector<KvChunk> c;
    c.push_back({kr, vr, nullptr, nullptr, kSink});
    for (int32_t j = 0; j < kPages; ++j) {
      const size_t off =
          static_cast<size_t>(page_of[static_cast<size_t>(i) * kPages + j]) * kPageBytes;
      c.push_back({kp + off, vp + off, nullptr, nullptr, kPageRows});
    }
    c.push_back({kr + kSink * kRowBytes, vr + kSink * kRowBytes, nullptr, nullptr, kWindow});
    return c;
  }
  std::vector<HostChunks> host_chunks(int32_t batch) const {
    std::vector<HostChunks> h(static_cast<size_t>(problems(batch)));
    for (int32_t i = 0; i < problems(batch); ++i) h[static_cast<size_t>(i)] = pool_chunks(i, false);
    return h;
  }
};

std::unique_ptr<SparseLayer> make_sparse(Gpu& gpu) {
  auto s = std::make_unique<SparseLayer>();
  const int32_t problems = SparseLayer::problems(kSparseMaxBatch);
  s->pool_pages = 2 * static_cast<int64_t>(problems) * kPages;
  Rng rng(777);
  std::vector<int64_t> perm(static_cast<size_t>(s->pool_pages));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  for (size_t i = perm.size(); i-- > 1;)
    std::swap(perm[i], perm[static_cast<size_t>(rng.below(static_cast<int64_t>(i) + 1))]);
  s->page_of.assign(perm.begin(), perm.begin() + static_cast<std::ptrdiff_t>(problems) * kPages);
  for (size_t i = perm.size(); i-- > 1;)
    std::swap(perm[i], perm[static_cast<size_t>(rng.below(static_cast<int64_t>(i) + 1))]);
  s->host_page.assign(perm.begin(), perm.begin() + static_cast<std::ptrdiff_t>(problems) * kPages);
  const size_t pool_bytes = static_cast<size_t>(s->pool_pages) * kPageBytes;
  s->k_pool.resize(pool_bytes);
  s->v_pool.resize(pool_bytes);
  fill_bf16(s->k_pool.data(), pool_bytes, rng);
  fill_bf16(s->v_pool.data(), pool_bytes, rng);
  const size_t res_bytes = static_cast<size_t>(problems) * SparseLayer::resident_bytes();
  s->k_resident.resize(res_bytes);
  s->v_resident.resize(res_bytes);
  fill_bf16(s->k_resident.data(), res_bytes, rng);
  fill_bf16(s->v_resident.data(), res_bytes, rng);
  s->q.resize(static_cast<size_t>(kSparseMaxBatch) * kModel.num_q_heads * kModel.head_dim);
  for (auto& x : s->q) x = rng.bf16();
  auto up = [&](cuda::DeviceBuffer<std::byte>& d, const std::vector<std::byte>& h) {
    d = cuda::DeviceBuffer<std::byte>(h.size(), 0);
    cuda::memcpy_async(d.get(), h.data(), h.size(), gpu.stream.get());
  };
  up(s->dk_pool, s->k_pool);
  up(s->dv_pool, s->v_pool);
  up(s->dk_resident, s->k_resident);
  up(s->dv_resident, s->v_resident);
  s->dq = cuda::DeviceBuffer<uint16_t>(s->q.size(), 0);
  cuda::memcpy_async(s->dq.get(), s->q.data(), s->q.size() * 2, gpu.stream.get());
  gpu.stream.synchronize();
  return s;
}

/// The host tier: every selected page's rows at its host_page position (mapped pinned memory).
void ensure_host_tier(SparseLayer& s) {
  if (s.host_k.size_bytes() > 0) return;
  const size_t bytes = static_cast<size_t>(s.pool_pages) * kPageBytes;
  s.host_k = memory::PinnedBuffer::allocate(bytes);
  s.host_v = memory::PinnedBuffer::allocate(bytes);
  KVTIER_CHECK(s.host_k.is_pinned() && s.host_v.is_pinned(),
               "the host tier could not be pinned: ", s.host_k.note());
  for (size_t i = 0; i < s.page_of.size(); ++i) {
    const size_t from = static_cast<size_t>(s.page_of[i]) * kPageBytes;
    const size_t to = static_cast<size_t>(s.host_page[i]) * kPageBytes;
    std::memcpy(s.host_k.data() + to, s.k_pool.data() + from, kPageBytes);
    std::memcpy(s.host_v.data() + to, s.v_pool.data() + from, kPageBytes);
  }
}

/// Device chunk lists of one batch and hit rate; for the fetch cases the miss pages and their
/// gather segments. Misses are the first (100 - hit_pct)% of each problem's pages, in a random
/// order per problem; a miss's pool page is poisoned before the check.
struct SparseCall {
  DecodeAttentionParams p;
  cuda::DeviceBuffer<KvChunk> chunks;        // attention over the pool (hits + fetched misses)
  cuda::DeviceBuffer<KvChunk> fused_chunks;  // misses read from the host tier, copied to pool
  cuda::DeviceBuffer<int32_t> indptr;
  cuda::DeviceBuffer<memory::GatherSegment> segments;
  int32_t num_segments = 0;
  int64_t miss_pages = 0;
  std::unique_ptr<Outputs> out;
  std::map<int, std::string> verdicts;
};

std::unique_ptr<SparseCall> make_sparse_call(SparseLayer& s, int32_t batch, int hit_pct, Gpu& gpu) {
  auto c = std::make_unique<SparseCall>();
  c->p = layer_params(batch);
  const int32_t problems = SparseLayer::problems(batch);
  std::vector<KvChunk> chunks, fused;
  std::vector<int32_t> indptr{0};
  std::vector<memory::GatherSegment> segs;
  Rng rng(99 + static_cast<uint64_t>(batch) * 131 + static_cast<uint64_t>(hit_pct));
  const int32_t misses_per_problem = hit_pct < 0 ? 0 : kPages * (100 - hit_pct) / 100;
  for (int32_t i = 0; i < problems; ++i) {
    const std::vector<KvChunk> pc = s.pool_chunks(i, true);
    std::vector<int32_t> order(kPages);
    std::iota(order.begin(), order.end(), 0);
    for (size_t a = order.size(); a-- > 1;)
      std::swap(order[a], order[static_cast<size_t>(rng.below(static_cast<int64_t>(a) + 1))]);
    std::vector<bool> miss(kPages, false);
    for (int32_t m = 0; m < misses_per_problem; ++m)
      miss[static_cast<size_t>(order[static_cast<size_t>(m)])] = true;
    for (size_t j = 0; j < pc.size(); ++j) {
      chunks.push_back(pc[j]);
      KvChunk f = pc[j];
      const bool is_page = j >= 1 && j <= kPages;
      if (is_page && miss[j - 1]) {
        const size_t sel = static_cast<size_t>(i) * kPages + (j - 1);
        const size_t host_off = static_cast<size_t>(s.host_page[sel]) * kPageBytes;
        f.k = s.host_k.device_data() + host_off;
        f.v = s.host_v.device_data() + host_off;
        f.k_copy = const_cast<void*>(pc[j].k);
        f.v_copy = const_cast<void*>(pc[j].v);
        memory::GatherSegment g;
        g.src_k = f.k;
        g.src_v = f.v;
        g.dst_page = static_cast<int32_t>(s.page_of[sel]);
        g.dst_row = 0;
        g.num_rows = kPageRows;
        segs.push_back(g);
        ++c->miss_pages;
      }
      fused.push_back(f);
    }
    indptr.push_back(static_cast<int32_t>(chunks.size()));
  }
  auto up = [&](auto& d, const auto& h) {
    using T = typename std::decay_t<decltype(h)>::value_type;
    d = cuda::DeviceBuffer<T>(std::max<size_t>(h.size(), 1), 0);
    if (!h.empty()) cuda::memcpy_async(d.get(), h.data(), h.size() * sizeof(T), gpu.stream.get());
  };
  up(c->chunks, chunks);
  up(c->fused_chunks, fused);
  up(c->indptr, indptr);
  up(c->segments, segs);
  c->num_segments = static_cast<int32_t>(segs.size());
  c->out = std::make_unique<Outputs>(c->p, kSparseRows);
  gpu.stream.synchronize();
  return c;
}

// ---- fixtures, built on first use and kept for the whole run ----

struct Registry {
  std::unique_ptr<Gpu> gpu;
  std::unique_ptr<DenseLayer> dense;
  std::map<int32_t, std::unique_ptr<Outputs>> dense_out;  // by batch
  std::unique_ptr<SparseLayer> sparse;
  std::map<int64_t, std::unique_ptr<SparseCall>> sparse_calls;  // by batch * 1000 + hit_pct + 1
  std::unique_ptr<cuda::DeviceAllocation> copy_src, copy_dst;
};

Registry& registry() {
  static Registry r;
  return r;
}

Gpu& gpu() {
  auto& g = registry().gpu;
  if (!g) g = std::make_unique<Gpu>();
  return *g;
}

DenseLayer& dense() {
  auto& d = registry().dense;
  if (!d) d = make_dense(gpu());
  return *d;
}

SparseLayer& sparse() {
  auto& s = registry().sparse;
  if (!s) s = make_sparse(gpu());
  return *s;
}

/// hit_pct -1: no fetch (every page in the pool).
SparseCall& sparse_call(int32_t batch, int hit_pct) {
  auto& slot = registry().sparse_calls[static_cast<int64_t>(batch) * 1000 + hit_pct + 1];
  if (!slot) {
    if (hit_pct >= 0) ensure_host_tier(sparse());
    slot = make_sparse_call(sparse(), batch, hit_pct, gpu());
  }
  return *slot;
}

bool skip_without_gpu(benchmark::State& state) {
  if (cuda::device_available()) return false;
  state.SkipWithError("no CUDA device");
  return true;
}

void report_bandwidth(benchmark::State& state, double bytes, double ms, int32_t splits) {
  if (ms > 0) state.counters["TB_per_s"] = bytes / (ms * 1e-3) / 1e12;
  state.counters["MiB"] = bytes / (1 << 20);
  state.counters["splits"] = splits;
}

// ---- benchmarks ----

void BM_CopyCeiling(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  try {
    const size_t bytes = static_cast<size_t>(state.range(0)) << 20;
    Registry& r = registry();
    if (!r.copy_src || r.copy_src->size_bytes() != bytes) {
      r.copy_src = std::make_unique<cuda::DeviceAllocation>(bytes, 0);
      r.copy_dst = std::make_unique<cuda::DeviceAllocation>(bytes, 0);
    }
    Gpu& g = gpu();
    const double ms = time_launches(state, g, [&] {
      cuda::memcpy_async(r.copy_dst->get(), r.copy_src->get(), bytes, g.stream.get());
    });
    if (ms > 0) state.counters["TB_per_s"] = 2.0 * bytes / (ms * 1e-3) / 1e12;
    state.SetLabel("device-to-device copy; TB_per_s counts read + written bytes");
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}
BENCHMARK(BM_CopyCeiling)
    ->ArgNames({"MiB"})
    ->Arg(256)
    ->Arg(1024)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

enum class DensePath { kDense, kChunked };

void run_dense(benchmark::State& state, DensePath path) {
  if (skip_without_gpu(state)) return;
  try {
    const int32_t batch = static_cast<int32_t>(state.range(0));
    Gpu& g = gpu();
    DenseLayer& d = dense();
    const DecodeAttentionParams p = layer_params(batch);
    auto& o = registry().dense_out[batch];
    if (!o) o = std::make_unique<Outputs>(p, kDenseRows);
    const kernels::DenseDecodeTensors dt{d.dq.get(), d.dk.get(),   d.dv.get(),  d.dlens.get(),
                                         kDenseRows, o->out.get(), o->lse.get()};
    const kernels::DecodeAttentionTensors ct{d.dq.get(), d.dchunks.get(), d.dindptr.get(),
                                             o->out.get(), o->lse.get()};
    auto launch = [&] {
      if (path == DensePath::kDense) {
        kernels::launch_dense_decode_attention(p, dt, o->workspace.get(), o->workspace_bytes,
                                               g.stream.get());
      } else {
        kernels::launch_decode_attention(p, ct, kDenseRows, o->workspace.get(), o->workspace_bytes,
                                         g.stream.get());
      }
    };
    const int key = batch * 10 + static_cast<int>(path);
    auto it = d.verdicts.find(key);
    if (it == d.verdicts.end()) {
      launch();
      it = d.verdicts.emplace(key, check_against_ref(p, d.q, d.host_chunks(batch), *o, g)).first;
    }
    if (!it->second.empty()) {
      state.SkipWithError(("GPU output differs from decode_attention_ref: " + it->second).c_str());
      return;
    }
    const double ms = time_launches(state, g, launch);
    report_bandwidth(state,
                     static_cast<double>(batch) * kModel.num_kv_heads * d.problem_bytes() * 2, ms,
                     o->splits);
    state.SetLabel(str_cat(kModel.name, ", ", kDenseRows, " rows, ",
                           path == DensePath::kDense ? "dense layout" : "one chunk per problem"));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void BM_DenseDecode(benchmark::State& state) { run_dense(state, DensePath::kDense); }
BENCHMARK(BM_DenseDecode)
    ->ArgNames({"batch"})
    ->Arg(1)
    ->Arg(4)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

void BM_DenseDecodeChunked(benchmark::State& state) { run_dense(state, DensePath::kChunked); }
BENCHMARK(BM_DenseDecodeChunked)
    ->ArgNames({"batch"})
    ->Arg(1)
    ->Arg(4)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

void BM_SparseDecode(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  try {
    const int32_t batch = static_cast<int32_t>(state.range(0));
    Gpu& g = gpu();
    SparseLayer& s = sparse();
    SparseCall& c = sparse_call(batch, -1);
    const kernels::DecodeAttentionTensors t{s.dq.get(), c.chunks.get(), c.indptr.get(),
                                            c.out->out.get(), c.out->lse.get()};
    auto launch = [&] {
      kernels::launch_decode_attention(c.p, t, kSparseRows, c.out->workspace.get(),
                                       c.out->workspace_bytes, g.stream.get());
    };
    auto it = c.verdicts.find(0);
    if (it == c.verdicts.end()) {
      launch();
      it =
          c.verdicts.emplace(0, check_against_ref(c.p, s.q, s.host_chunks(batch), *c.out, g)).first;
    }
    if (!it->second.empty()) {
      state.SkipWithError(("GPU output differs from decode_attention_ref: " + it->second).c_str());
      return;
    }
    const double ms = time_launches(state, g, launch);
    report_bandwidth(
        state, static_cast<double>(SparseLayer::problems(batch)) * kSparseRows * kRowBytes * 2, ms,
        c.out->splits);
    state.SetLabel(str_cat("sink ", kSink, " + ", kPages, " pages of ", kPageRows, " + window ",
                           kWindow, " rows per problem"));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}
BENCHMARK(BM_SparseDecode)
    ->ArgNames({"batch"})
    ->Arg(1)
    ->Arg(8)
    ->Arg(32)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

enum class FetchPath { kFused, kGatherThenAttend };

/// Poisons the miss pages in the pool, runs `launch` once, and checks the attention against the
/// reference and the fetched pages bitwise against the host tier.
std::string check_fetch(SparseLayer& s, SparseCall& c, int32_t batch, Gpu& g,
                        const std::function<void()>& launch) {
  std::vector<memory::GatherSegment> segs(static_cast<size_t>(c.num_segments));
  if (!segs.empty()) {
    cuda::memcpy_async(segs.data(), c.segments.get(), segs.size() * sizeof(memory::GatherSegment),
                       g.stream.get());
    g.stream.synchronize();
  }
  for (const auto& sg : segs) {
    cuda::memset_async(s.dk_pool.get() + static_cast<size_t>(sg.dst_page) * kPageBytes, 0xff,
                       kPageBytes, g.stream.get());
    cuda::memset_async(s.dv_pool.get() + static_cast<size_t>(sg.dst_page) * kPageBytes, 0xff,
                       kPageBytes, g.stream.get());
  }
  launch();
  std::string bad = check_against_ref(c.p, s.q, s.host_chunks(batch), *c.out, g);
  if (!bad.empty()) return bad;
  std::vector<std::byte> page(kPageBytes);
  for (const auto& sg : segs) {
    const size_t off = static_cast<size_t>(sg.dst_page) * kPageBytes;
    for (int side = 0; side < 2; ++side) {
      cuda::memcpy_async(page.data(), (side ? s.dv_pool.get() : s.dk_pool.get()) + off, kPageBytes,
                         g.stream.get());
      g.stream.synchronize();
      if (std::memcmp(page.data(), (side ? s.v_pool.data() : s.k_pool.data()) + off, kPageBytes) !=
          0)
        return str_cat(side ? "V" : "K", " pool page ", sg.dst_page, " differs from the host tier");
    }
  }
  return "";
}

void run_fetch(benchmark::State& state, FetchPath path) {
  if (skip_without_gpu(state)) return;
  try {
    const int32_t batch = static_cast<int32_t>(state.range(0));
    const int hit_pct = static_cast<int>(state.range(1));
    Gpu& g = gpu();
    SparseLayer& s = sparse();
    SparseCall& c = sparse_call(batch, hit_pct);
    const kernels::DecodeAttentionTensors fused{s.dq.get(), c.fused_chunks.get(), c.indptr.get(),
                                                c.out->out.get(), c.out->lse.get()};
    const kernels::DecodeAttentionTensors plain{s.dq.get(), c.chunks.get(), c.indptr.get(),
                                                c.out->out.get(), c.out->lse.get()};
    const kernels::GatherParams gp{
        c.segments.get(), c.num_segments,  static_cast<int32_t>(kRowBytes),
        kPageRows,        s.dk_pool.get(), s.dv_pool.get()};
    std::function<void()> launch = [&] {
      if (path == FetchPath::kFused) {
        kernels::launch_decode_attention(c.p, fused, kSparseRows, c.out->workspace.get(),
                                         c.out->workspace_bytes, g.stream.get());
      } else {
        kernels::launch_gather(gp, g.stream.get());
        kernels::launch_decode_attention(c.p, plain, kSparseRows, c.out->workspace.get(),
                                         c.out->workspace_bytes, g.stream.get());
      }
    };
    const int key = static_cast<int>(path);
    auto it = c.verdicts.find(key);
    if (it == c.verdicts.end())
      it = c.verdicts.emplace(key, check_fetch(s, c, batch, g, launch)).first;
    if (!it->second.empty()) {
      state.SkipWithError(("fetch check failed: " + it->second).c_str());
      return;
    }
    const double ms = time_launches(state, g, launch);
    const double miss_bytes = static_cast<double>(c.miss_pages) * kPageBytes * 2;
    report_bandwidth(
        state, static_cast<double>(SparseLayer::problems(batch)) * kSparseRows * kRowBytes * 2, ms,
        c.out->splits);
    state.counters["miss_MB"] = miss_bytes / 1e6;
    if (ms > 0) state.counters["host_GB_per_s"] = miss_bytes / (ms * 1e-3) / 1e9;
    state.SetLabel(str_cat(hit_pct, "% of ", kPages,
                           " pages per problem hit; misses from mapped "
                           "pinned host memory; ",
                           path == FetchPath::kFused ? "fused fetch" : "gather, then attention"));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void BM_FusedFetch(benchmark::State& state) { run_fetch(state, FetchPath::kFused); }
BENCHMARK(BM_FusedFetch)
    ->ArgNames({"batch", "hit_pct"})
    ->ArgsProduct({{1, 8}, {0, 50, 90}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

void BM_GatherThenAttend(benchmark::State& state) {
  run_fetch(state, FetchPath::kGatherThenAttend);
}
BENCHMARK(BM_GatherThenAttend)
    ->ArgNames({"batch", "hit_pct"})
    ->ArgsProduct({{1, 8}, {0, 50, 90}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

#endif  // KVTIER_WITH_CUDA

}  // namespace

/// Frees the fixtures' device and pinned memory while the CUDA runtime is still up.
void release_fixtures() {
#if KVTIER_WITH_CUDA
  Registry& r = registry();
  r.sparse_calls.clear();
  r.sparse.reset();
  r.dense_out.clear();
  r.dense.reset();
  r.copy_src.reset();
  r.copy_dst.reset();
  r.gpu.reset();
#endif
}

}  // namespace kvtier::bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("kvtier_device", kvtier::cuda::device_description(0));
  benchmark::RunSpecifiedBenchmarks();
  kvtier::bench::release_fixtures();
  benchmark::Shutdown();
  return 0;
}
