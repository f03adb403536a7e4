// GPU tests of decode attention against the CPU reference (decode_attention_ref):
//   shapes      G 1/3/4/8/16 (padded tiles, two tiles), head_dim 64/128/256, fp16/bf16, splits
//               forced to 1, 2 and 7 and chosen automatically; random chunk layouts (0..40 rows,
//               so many small and empty chunks) and 16-row pages; ragged batches with an empty
//               problem; outputs poisoned first, so every element must be written
//   long        up to 20000 rows per problem, as one chunk, ~1000 small chunks or pages
//   empty       every problem without rows: zeros and -inf, with and without splits
//   fused copy  misses in mapped pinned host memory copied into a guarded device pool, bitwise,
//               nothing else written, with the attention still matching the reference
//   dense       launch_dense_decode_attention on ragged seq_lens (0, 1, max_len, ...)
//   plan        splits, workspace sizing and the errors of the launcher
// Tolerances (fp32 accumulation, output rounded to dtype): |got - want| <= atol + rtol |want|
// with 1e-2 (bf16) or 1e-3 (fp16) for both, lse within 1e-3.
// Each test starts with KVTIER_REQUIRE_GPU(); without CUDA the binary builds and the tests skip.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/decode_attention.h"
#include "memory/core/half.h"
#include "memory/core/status.h"
#include "memory/pinned_buffer.h"
#include "tests/common/test_util.h"

namespace kvtier::kernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

enum class Layout { kRandomChunks, kPages, kOneChunk };

const char* layout_name(Layout l) {
  return l == Layout::kRandomChunks ? "random_chunks"
                                    : (l == Layout::kPages ? "pages" : "one_chunk");
}

/// One batch of problems on the host: q, a pool holding every chunk's rows at scattered places
/// (unused rows between chunks), the chunk list (host pointers into the pool) and indptr.
struct Case {
  DecodeAttentionParams p;
  Layout layout = Layout::kRandomChunks;
  uint64_t seed = 0;
  size_t row_bytes = 0;
  std::vector<std::byte> q, k_pool, v_pool;
  std::vector<KvChunk> chunks;
  std::vector<int32_t> indptr;
  std::vector<int32_t> chunk_end;  // optional: list ends (lists in separate regions)
  std::vector<int64_t> rows;       // per problem

  int64_t max_rows() const {
    return rows.empty() ? 0 : *std::max_element(rows.begin(), rows.end());
  }
  size_t out_elems() const {
    return static_cast<size_t>(p.num_seqs) * p.num_q_heads * static_cast<size_t>(p.head_dim);
  }
  size_t out_rows() const { return static_cast<size_t>(p.num_seqs) * p.num_q_heads; }
  std::string describe() const {
    std::ostringstream os;
    os << "test_seed " << test::test_seed() << " (case seed " << seed << ") seqs " << p.num_seqs
       << " q_heads " << p.num_q_heads << " kv_heads " << p.num_kv_heads << " head_dim "
       << p.head_dim << " dtype " << p.dtype << " scale " << p.scale << " num_splits "
       << p.num_splits << " layout " << layout_name(layout) << " chunks " << chunks.size()
       << " rows/problem [";
    for (size_t i = 0; i < rows.size() && i < 12; ++i) os << (i ? " " : "") << rows[i];
    os << (rows.size() > 12 ? " ...]" : "]");
    return os.str();
  }
};

#if KVTIER_WITH_CUDA  // the helpers below serve the GPU tests only

std::vector<std::byte> random_values(size_t n, DType dtype, float sigma, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.f, sigma);
  std::vector<std::byte> b(n * dtype_size(dtype));
  for (size_t i = 0; i < n; ++i) store_from_float(b.data(), dtype, i, normal(rng));
  return b;
}

std::vector<int32_t> chunk_sizes(int64_t n, Layout layout, std::mt19937_64& rng) {
  std::vector<int32_t> sizes;
  switch (layout) {
    case Layout::kRandomChunks:
      for (int64_t left = n; left > 0;) {
        const int32_t s = static_cast<int32_t>(std::min<int64_t>(left, rng() % 41));  // 0..40
        sizes.push_back(s);
        left -= s;
      }
      if (rng() % 2) sizes.push_back(0);
      break;
    case Layout::kPages: {  // sink | pages of 16 | window, and an empty chunk somewhere
      const int64_t sink = std::min<int64_t>(n, 16), rest = n - sink;
      const int64_t window =
          std::min<int64_t>(rest, rest % 16 + 16 * static_cast<int64_t>(rng() % 4));
      if (sink > 0) sizes.push_back(static_cast<int32_t>(sink));
      for (int64_t i = 0; i < (rest - window) / 16; ++i) sizes.push_back(16);
      if (window > 0) sizes.push_back(static_cast<int32_t>(window));
      sizes.insert(sizes.begin() + static_cast<std::ptrdiff_t>(rng() % (sizes.size() + 1)), 0);
      break;
    }
    case Layout::kOneChunk:
      sizes.push_back(static_cast<int32_t>(n));
      break;
  }
  return sizes;
}

/// Problem 0 has max_rows rows, problem 1 (if any) none, the others random in [0, max_rows].
Case make_case(int32_t seqs, int32_t kv_heads, int32_t group, int32_t head_dim, DType dtype,
               Layout layout, int64_t max_rows, uint64_t seed, float q_sigma = 1.f) {
  Case c;
  c.seed = seed;
  c.layout = layout;
  c.p.num_seqs = seqs;
  c.p.num_kv_heads = kv_heads;
  c.p.num_q_heads = kv_heads * group;
  c.p.head_dim = head_dim;
  c.p.dtype = dtype;
  c.row_bytes = dtype_size(dtype) * static_cast<size_t>(head_dim);
  std::mt19937_64 rng(seed);
  const int32_t problems = seqs * kv_heads;
  std::vector<std::vector<int32_t>> sizes(static_cast<size_t>(problems));
  c.rows.resize(static_cast<size_t>(problems));
  size_t num_chunks = 0;
  for (int32_t i = 0; i < problems; ++i) {
    const int64_t n =
        i == 0 ? max_rows : (i == 1 ? 0 : static_cast<int64_t>(rng() % (max_rows + 1)));
    c.rows[static_cast<size_t>(i)] = n;
    sizes[static_cast<size_t>(i)] = chunk_sizes(n, layout, rng);
    num_chunks += sizes[static_cast<size_t>(i)].size();
  }
  std::vector<size_t> order(num_chunks);
  std::iota(order.begin(), order.end(), size_t{0});
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<int32_t> flat;
  for (const auto& s : sizes) flat.insert(flat.end(), s.begin(), s.end());
  std::vector<size_t> first_row(num_chunks);
  size_t pool_rows = 0;
  for (const size_t j : order) {
    pool_rows += rng() % 3;
    first_row[j] = pool_rows;
    pool_rows += static_cast<size_t>(flat[j]);
  }
  pool_rows += 1;
  const size_t elems = pool_rows * static_cast<size_t>(head_dim);
  c.k_pool = random_values(elems, dtype, 1.f, rng);
  c.v_pool = random_values(elems, dtype, 1.f, rng);
  c.q = random_values(static_cast<size_t>(seqs) * c.p.num_q_heads * head_dim, dtype, q_sigma, rng);
  c.chunks.resize(num_chunks);
  c.indptr.assign(1, 0);
  size_t j = 0;
  for (int32_t i = 0; i < problems; ++i) {
    for (const int32_t s : sizes[static_cast<size_t>(i)]) {
      c.chunks[j].k = c.k_pool.data() + first_row[j] * c.row_bytes;
      c.chunks[j].v = c.v_pool.data() + first_row[j] * c.row_bytes;
      c.chunks[j].num_rows = s;
      ++j;
    }
    c.indptr.push_back(static_cast<int32_t>(j));
  }
  return c;
}

struct Result {
  std::vector<std::byte> out;
  std::vector<float> lse;
};

Result run_ref(const Case& c) {
  Result r;
  r.out.assign(c.out_elems() * dtype_size(c.p.dtype), std::byte{0xff});
  r.lse.assign(c.out_rows(), std::numeric_limits<float>::quiet_NaN());
  DecodeAttentionTensors t;
  t.q = c.q.data();
  t.chunks = c.chunks.data();
  t.chunk_indptr = c.indptr.data();
  t.chunk_end = c.chunk_end.empty() ? nullptr : c.chunk_end.data();
  t.out = r.out.data();
  t.lse = r.lse.data();
  decode_attention_ref(c.p, t);
  return r;
}

/// Every output element within tolerance (and written: the poison is NaN), every lse within 1e-3
/// or both -inf.
void expect_close(const Case& c, const Result& want, const Result& got, const std::string& what) {
  const double tol = c.p.dtype == DType::kBF16 ? 1e-2 : 1e-3;
  double max_err = 0;
  int64_t first_bad = -1;
  for (size_t i = 0; i < c.out_elems(); ++i) {
    const double w = load_as_float(want.out.data(), c.p.dtype, i);
    const double g = load_as_float(got.out.data(), c.p.dtype, i);
    const double err = std::fabs(g - w);
    if (std::isfinite(err)) max_err = std::max(max_err, err);
    if (!(err <= tol + tol * std::fabs(w)) && first_bad < 0) first_bad = static_cast<int64_t>(i);
  }
  EXPECT_EQ(first_bad, -1) << what << ": first bad out element (row " << first_bad / c.p.head_dim
                           << ", dim " << first_bad % c.p.head_dim << "), max error " << max_err
                           << "; " << c.describe();
  int64_t first_bad_lse = -1;
  double max_lse_err = 0;
  for (size_t i = 0; i < want.lse.size(); ++i) {
    if (want.lse[i] == -kInf && got.lse[i] == -kInf) continue;
    const double err = std::fabs(static_cast<double>(got.lse[i]) - want.lse[i]);
    if (std::isfinite(err)) max_lse_err = std::max(max_lse_err, err);
    if (!(err <= 1e-3) && first_bad_lse < 0) first_bad_lse = static_cast<int64_t>(i);
  }
  EXPECT_EQ(first_bad_lse, -1) << what << ": first bad lse (got "
                               << (first_bad_lse >= 0 ? got.lse[first_bad_lse] : 0.f) << ", want "
                               << (first_bad_lse >= 0 ? want.lse[first_bad_lse] : 0.f)
                               << "), max lse error " << max_lse_err << "; " << c.describe();
}

template <typename T>
cuda::DeviceBuffer<T> upload(const std::vector<T>& v, cudaStream_t stream) {
  cuda::DeviceBuffer<T> b(std::max<size_t>(v.size(), 1), 0);
  if (!v.empty()) cuda::memcpy_async(b.get(), v.data(), v.size() * sizeof(T), stream);
  return b;
}

template <typename T>
std::vector<T> download(const cuda::DeviceBuffer<T>& b, size_t n, cudaStream_t stream) {
  std::vector<T> v(n);
  if (n > 0) cuda::memcpy_async(v.data(), b.get(), n * sizeof(T), stream);
  return v;
}

/// Where a chunk's rows are on the device side.
enum class Residence { kDevice, kMappedHost };

/// The case's data on the device: pools in device memory (and, for fused-copy runs, a mapped
/// pinned copy of them), q, and chunk lists rebased onto them.
struct DeviceCase {
  cuda::DeviceBuffer<std::byte> q, k_pool, v_pool;
  memory::PinnedBuffer host_k, host_v;  // mapped pinned copies (fused-copy runs only)

  DeviceCase(const Case& c, cudaStream_t s, bool with_mapped_copy)
      : q(upload(c.q, s)), k_pool(upload(c.k_pool, s)), v_pool(upload(c.v_pool, s)) {
    if (with_mapped_copy) {
      host_k = memory::PinnedBuffer::allocate(c.k_pool.size());
      host_v = memory::PinnedBuffer::allocate(c.v_pool.size());
      std::memcpy(host_k.data(), c.k_pool.data(), c.k_pool.size());
      std::memcpy(host_v.data(), c.v_pool.data(), c.v_pool.size());
    }
  }

  /// Chunk j of `c` with its k/v rebased to `where`.
  KvChunk rebase(const Case& c, size_t j, Residence where) const {
    KvChunk ch = c.chunks[j];
    const size_t ko = static_cast<const std::byte*>(ch.k) - c.k_pool.data();
    const size_t vo = static_cast<const std::byte*>(ch.v) - c.v_pool.data();
    if (where == Residence::kDevice) {
      ch.k = k_pool.get() + ko;
      ch.v = v_pool.get() + vo;
    } else {
      ch.k = host_k.device_data() + ko;
      ch.v = host_v.device_data() + vo;
    }
    return ch;
  }
};

/// How launch() hands over the output: `out` directly, or through out_at and merge counters
/// (the fused split merge), the counters checked to be left zero.
enum class Output { kDirect, kIndirectFusedMerge };

/// Launches the chunked kernel on `device_chunks` (already rebased) with outputs poisoned, and
/// waits for it.
Result launch(const Case& c, const DeviceCase& d, const std::vector<KvChunk>& device_chunks,
              cuda::Stream& stream, Output mode = Output::kDirect) {
  const cudaStream_t s = stream.get();
  auto chunks = upload(device_chunks, s);
  auto indptr = upload(c.indptr, s);
  auto ends = upload(c.chunk_end.empty() ? std::vector<int32_t>{0} : c.chunk_end, s);
  cuda::DeviceBuffer<std::byte> out(std::max<size_t>(c.out_elems() * dtype_size(c.p.dtype), 1), 0);
  cuda::DeviceBuffer<float> lse(std::max<size_t>(c.out_rows(), 1), 0);
  cuda::memset_async(out.get(), 0xff, out.size_bytes(), s);
  cuda::memset_async(lse.get(), 0xff, lse.size_bytes(), s);  // NaN
  const size_t ws_bytes = decode_attention_workspace_bytes(c.p, c.max_rows());
  cuda::DeviceBuffer<std::byte> ws(std::max<size_t>(ws_bytes, 1), 0);
  cuda::memset_async(ws.get(), 0xff, ws.size_bytes(), s);  // partials must all be written
  DecodeAttentionTensors t;
  t.q = d.q.get();
  t.chunks = chunks.get();
  t.chunk_indptr = indptr.get();
  t.chunk_end = c.chunk_end.empty() ? nullptr : ends.get();
  t.out = out.get();
  t.lse = lse.get();
  const size_t num_counters = std::max<size_t>(c.out_rows(), 1);
  cuda::DeviceBuffer<void*> out_at(1, 0);
  cuda::DeviceBuffer<int32_t> counters(num_counters, 0);
  if (mode == Output::kIndirectFusedMerge) {
    void* const target = out.get();
    cuda::memcpy_async(out_at.get(), &target, sizeof(void*), s);
    cuda::memset_async(counters.get(), 0, counters.size_bytes(), s);
    t.out = nullptr;
    t.out_at = out_at.get();
    t.merge_counters = counters.get();
  }
  launch_decode_attention(c.p, t, c.max_rows(), ws_bytes ? ws.get() : nullptr, ws_bytes, s);
  if (mode == Output::kIndirectFusedMerge) {
    EXPECT_EQ(download(counters, num_counters, s), std::vector<int32_t>(num_counters, 0))
        << "the merge counters must be left zero";
  }
  Result r;
  r.out = download(out, c.out_elems() * dtype_size(c.p.dtype), s);
  r.lse = download(lse, c.out_rows(), s);
  stream.synchronize();
  return r;
}

Result run_on_gpu(const Case& c, Output mode = Output::kDirect) {
  cuda::Stream stream(0);
  const DeviceCase d(c, stream.get(), false);
  std::vector<KvChunk> chunks(c.chunks.size());
  for (size_t j = 0; j < chunks.size(); ++j) chunks[j] = d.rebase(c, j, Residence::kDevice);
  return launch(c, d, chunks, stream, mode);
}

#endif  // KVTIER_WITH_CUDA

// ---- shapes: every head_dim, group size, dtype and split count ----

class DecodeAttentionGpu : public ::testing::TestWithParam<std::tuple<int32_t, int32_t, DType>> {};

TEST_P(DecodeAttentionGpu, MatchesReference) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  const auto [group, head_dim, dtype] = GetParam();
  const uint64_t seed = test::test_seed() + 31 * group + head_dim + static_cast<int>(dtype);
  const Layout layout = (group + head_dim / 64) % 2 ? Layout::kPages : Layout::kRandomChunks;
  // 2 sequences x 2 KV heads: problem 0 at max_rows, problem 1 empty, the others random.
  Case c = make_case(2, 2, group, head_dim, dtype, layout, 1200 + 4800 / group, seed, 2.f);
  const Result want = run_ref(c);
  for (const int32_t splits : {1, 2, 7, 0}) {
    c.p.num_splits = splits;
    expect_close(c, want, run_on_gpu(c), "gpu vs ref");
  }
#endif
}

INSTANTIATE_TEST_SUITE_P(Shapes, DecodeAttentionGpu,
                         ::testing::Combine(::testing::Values(1, 3, 4, 8, 16),
                                            ::testing::Values(64, 128, 256),
                                            ::testing::Values(DType::kF16, DType::kBF16)),
                         [](const auto& info) {
                           return "G" + std::to_string(std::get<0>(info.param)) + "_d" +
                                  std::to_string(std::get<1>(info.param)) + "_" +
                                  dtype_name(std::get<2>(info.param));
                         });

TEST(DecodeAttentionGpuLayouts, PagedBatchOfSparseProblems) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // The engine's shape: 8 sequences x 8 KV heads, G = 4, sink 16 + pages of 16 + window.
  Case c = make_case(8, 8, 4, 128, DType::kBF16, Layout::kPages, 2320, test::test_seed() + 3, 2.f);
  const Result want = run_ref(c);
  for (const int32_t splits : {0, 1, 3}) {
    c.p.num_splits = splits;
    expect_close(c, want, run_on_gpu(c), "gpu vs ref");
  }
#endif
}

TEST(DecodeAttentionGpuLayouts, ListsInSeparateRegionsWithEnds) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // Each problem's list in a region of its own, in reverse problem order, with poison chunks
  // (rows but no data) between them: through chunk_indptr + chunk_end, the same results as the
  // adjacent lists, on the reference and the GPU.
  // (The lists are rebuilt in place: chunks point into the case's own pools.)
  Case d = make_case(3, 4, 4, 128, DType::kBF16, Layout::kPages, 900, test::test_seed() + 5, 2.f);
  const Result want = run_ref(d);
  const std::vector<KvChunk> chunks = d.chunks;
  const std::vector<int32_t> indptr = d.indptr;
  const int32_t problems = d.p.num_seqs * d.p.num_kv_heads;
  KvChunk poison = chunks[0];  // a valid address, far too many rows
  poison.num_rows = 1 << 20;
  d.chunks.clear();
  d.indptr.assign(problems, 0);
  d.chunk_end.assign(problems, 0);
  for (int32_t i = problems - 1; i >= 0; --i) {
    d.chunks.insert(d.chunks.end(), 3, poison);
    d.indptr[i] = static_cast<int32_t>(d.chunks.size());
    d.chunks.insert(d.chunks.end(), chunks.begin() + indptr[i], chunks.begin() + indptr[i + 1]);
    d.chunk_end[i] = static_cast<int32_t>(d.chunks.size());
  }
  d.chunks.push_back(poison);
  expect_close(d, want, run_ref(d), "ref with chunk_end vs adjacent lists");
  for (const int32_t splits : {0, 1, 4}) {
    d.p.num_splits = splits;
    expect_close(d, want, run_on_gpu(d), "gpu with chunk_end vs adjacent lists");
  }
#endif
}

TEST(DecodeAttentionGpuLayouts, FusedMergeThroughOutAt) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // The output pointer read from device memory, and the splits merged by each tile's last block
  // (counters left zero); above 256 splits the merge kernel runs and reads out_at too. G = 12
  // has two head tiles, the second one partial.
  for (const int32_t group : {4, 12}) {
    Case c = make_case(3, 2, group, 128, DType::kBF16, Layout::kPages, 3000,
                       test::test_seed() + 40 + group, 2.f);
    const Result want = run_ref(c);
    for (const int32_t splits : {1, 2, 7, 40, 0, 300}) {
      c.p.num_splits = splits;
      expect_close(c, want, run_on_gpu(c, Output::kIndirectFusedMerge),
                   "fused merge, splits " + std::to_string(splits));
    }
  }
#endif
}

TEST(DecodeAttentionGpuLayouts, LongProblems) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // 20000 rows: one chunk, ~1000 chunks of 0..40 rows (many descriptor windows), or pages.
  for (const Layout layout : {Layout::kOneChunk, Layout::kRandomChunks, Layout::kPages}) {
    for (const DType dtype : {DType::kBF16, DType::kF16}) {
      Case c = make_case(2, 2, 4, 128, dtype, layout, 20000,
                         test::test_seed() + 17 + static_cast<int>(layout), 3.f);
      const Result want = run_ref(c);
      for (const int32_t splits : {1, 2, 7, 0}) {
        c.p.num_splits = splits;
        expect_close(c, want, run_on_gpu(c), "gpu vs ref");
      }
    }
  }
#endif
}

TEST(DecodeAttentionGpuLayouts, TinyChunksAndOddSizes) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  // Rows that never fill a step: 1..3-row chunks between empty ones, totals around 16 and 256.
  for (const int64_t rows : {1, 15, 17, 255, 257, 1000}) {
    Case c = make_case(3, 2, 2, 64, DType::kF16, Layout::kRandomChunks, rows,
                       test::test_seed() + static_cast<uint64_t>(rows), 2.f);
    std::mt19937_64 rng(c.seed);
    std::vector<KvChunk> tiny;
    std::vector<int32_t> indptr{0};
    for (size_t i = 0; i + 1 < c.indptr.size(); ++i) {
      for (int32_t j = c.indptr[i]; j < c.indptr[i + 1]; ++j) {
        for (int32_t r = 0; r < c.chunks[j].num_rows;) {
          const int32_t n = std::min<int32_t>(c.chunks[j].num_rows - r, 1 + rng() % 3);
          KvChunk ch = c.chunks[j];
          ch.k = static_cast<const std::byte*>(ch.k) + static_cast<size_t>(r) * c.row_bytes;
          ch.v = static_cast<const std::byte*>(ch.v) + static_cast<size_t>(r) * c.row_bytes;
          ch.num_rows = n;
          tiny.push_back(ch);
          if (rng() % 3 == 0) tiny.push_back({ch.k, ch.v, nullptr, nullptr, 0});
          r += n;
        }
      }
      indptr.push_back(static_cast<int32_t>(tiny.size()));
    }
    c.chunks = tiny;
    c.indptr = indptr;
    const Result want = run_ref(c);
    for (const int32_t splits : {1, 2, 7, 0}) {
      c.p.num_splits = splits;
      expect_close(c, want, run_on_gpu(c), "gpu vs ref");
    }
  }
#endif
}

TEST(DecodeAttentionGpuLayouts, EveryProblemEmpty) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  for (const int32_t splits : {1, 5}) {
    Case c = make_case(2, 2, 4, 128, DType::kBF16, Layout::kRandomChunks, 0, test::test_seed());
    c.p.num_splits = splits;
    const Result got = run_on_gpu(c);
    for (size_t i = 0; i < c.out_elems(); ++i)
      ASSERT_EQ(load_as_float(got.out.data(), c.p.dtype, i), 0.f) << "splits " << splits;
    for (const float x : got.lse) ASSERT_EQ(x, -kInf) << "splits " << splits;
  }
#endif
}

TEST(DecodeAttentionGpuLayouts, SameBitsOnEveryRun) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  Case c = make_case(4, 8, 4, 128, DType::kBF16, Layout::kPages, 6000, test::test_seed() + 4);
  const Result a = run_on_gpu(c), b = run_on_gpu(c);
  EXPECT_EQ(test::first_difference(a.out.data(), b.out.data(), a.out.size()), -1);
  EXPECT_EQ(test::first_difference(a.lse.data(), b.lse.data(), a.lse.size() * 4), -1);
#endif
}

// ---- fused fetch ----

TEST(DecodeAttentionGpuFusedCopy, MissesFromMappedHostMemoryLandBitwise) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  for (const Layout layout : {Layout::kPages, Layout::kRandomChunks}) {
    for (const int32_t splits : {1, 4, 0}) {
      Case c = make_case(2, 4, 4, 128, DType::kBF16, layout, 3000,
                         test::test_seed() + 23 + static_cast<int>(layout), 2.f);
      c.p.num_splits = splits;
      const Result want = run_ref(c);
      cuda::Stream stream(0);
      const cudaStream_t s = stream.get();
      const DeviceCase d(c, s, true);
      ASSERT_TRUE(d.host_k.is_pinned() && d.host_v.is_pinned()) << d.host_k.note();
      // Every other chunk is a miss: read from mapped host memory, copied into a guarded
      // destination pool (chunks in reverse order, a guard row between them). The rest are hits
      // in device memory.
      constexpr unsigned char kGuard = 0xAB;
      std::vector<size_t> dst_row(c.chunks.size(), SIZE_MAX);
      size_t pool_rows = 1;
      for (size_t j = c.chunks.size(); j-- > 0;) {
        if (j % 2 == 1) continue;
        dst_row[j] = pool_rows;
        pool_rows += static_cast<size_t>(c.chunks[j].num_rows) + 1;
      }
      const size_t pool_bytes = pool_rows * c.row_bytes;
      std::vector<std::byte> k_want(pool_bytes, std::byte{kGuard}), v_want = k_want;
      cuda::DeviceBuffer<std::byte> k_dst(pool_bytes, 0), v_dst(pool_bytes, 0);
      cuda::memset_async(k_dst.get(), kGuard, pool_bytes, s);
      cuda::memset_async(v_dst.get(), kGuard, pool_bytes, s);
      std::vector<KvChunk> chunks(c.chunks.size());
      for (size_t j = 0; j < chunks.size(); ++j) {
        if (dst_row[j] == SIZE_MAX) {
          chunks[j] = d.rebase(c, j, Residence::kDevice);
          continue;
        }
        chunks[j] = d.rebase(c, j, Residence::kMappedHost);
        const size_t off = dst_row[j] * c.row_bytes;
        const size_t n = static_cast<size_t>(c.chunks[j].num_rows) * c.row_bytes;
        chunks[j].k_copy = k_dst.get() + off;
        chunks[j].v_copy = v_dst.get() + off;
        std::memcpy(k_want.data() + off, c.chunks[j].k, n);
        std::memcpy(v_want.data() + off, c.chunks[j].v, n);
      }
      const Result got = launch(c, d, chunks, stream);
      const std::vector<std::byte> k_got = download(k_dst, pool_bytes, s);
      const std::vector<std::byte> v_got = download(v_dst, pool_bytes, s);
      stream.synchronize();
      expect_close(c, want, got, "fused fetch vs ref");
      const int64_t dk = test::first_difference(k_got.data(), k_want.data(), pool_bytes);
      const int64_t dv = test::first_difference(v_got.data(), v_want.data(), pool_bytes);
      EXPECT_EQ(dk, -1) << "first bad K byte at destination row "
                        << dk / static_cast<int64_t>(c.row_bytes) << "; " << c.describe();
      EXPECT_EQ(dv, -1) << "first bad V byte at destination row "
                        << dv / static_cast<int64_t>(c.row_bytes) << "; " << c.describe();
    }
  }
#endif
}

// ---- dense ----

class DecodeAttentionGpuDense
    : public ::testing::TestWithParam<std::tuple<int32_t, int32_t, DType>> {};

TEST_P(DecodeAttentionGpuDense, MatchesReferenceOnRaggedLengths) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  const auto [group, head_dim, dtype] = GetParam();
  DecodeAttentionParams p;
  p.num_seqs = 6;
  p.num_kv_heads = 2;
  p.num_q_heads = 2 * group;
  p.head_dim = head_dim;
  p.dtype = dtype;
  const int64_t max_len = 3000;
  const std::vector<int32_t> seq_lens = {3000, 0, 1, 777, 2999, 16};
  std::mt19937_64 rng(test::test_seed() + group * 7 + head_dim);
  const size_t kv_elems = static_cast<size_t>(p.num_seqs) * p.num_kv_heads * max_len * head_dim;
  const std::vector<std::byte> q =
      random_values(static_cast<size_t>(p.num_seqs) * p.num_q_heads * head_dim, dtype, 2.f, rng);
  const std::vector<std::byte> k = random_values(kv_elems, dtype, 1.f, rng);
  const std::vector<std::byte> v = random_values(kv_elems, dtype, 1.f, rng);
  Case c;  // for the comparison and its description
  c.p = p;
  c.seed = test::test_seed();
  c.layout = Layout::kOneChunk;
  for (const int32_t len : seq_lens)
    for (int32_t h = 0; h < p.num_kv_heads; ++h) c.rows.push_back(len);
  Result want;
  want.out.assign(c.out_elems() * dtype_size(dtype), std::byte{0xff});
  want.lse.assign(c.out_rows(), 0.f);
  dense_decode_attention_ref(p, {q.data(), k.data(), v.data(), seq_lens.data(), max_len,
                                 want.out.data(), want.lse.data()});

  cuda::Stream stream(0);
  const cudaStream_t s = stream.get();
  auto dq = upload(q, s);
  auto dk = upload(k, s);
  auto dv = upload(v, s);
  auto dlens = upload(seq_lens, s);
  for (const int32_t splits : {1, 3, 0}) {
    c.p.num_splits = p.num_splits = splits;
    cuda::DeviceBuffer<std::byte> out(want.out.size(), 0);
    cuda::DeviceBuffer<float> lse(want.lse.size(), 0);
    cuda::memset_async(out.get(), 0xff, out.size_bytes(), s);
    cuda::memset_async(lse.get(), 0xff, lse.size_bytes(), s);
    const size_t ws_bytes = decode_attention_workspace_bytes(p, max_len);
    cuda::DeviceBuffer<std::byte> ws(std::max<size_t>(ws_bytes, 1), 0);
    launch_dense_decode_attention(
        p, {dq.get(), dk.get(), dv.get(), dlens.get(), max_len, out.get(), lse.get()},
        ws_bytes ? ws.get() : nullptr, ws_bytes, s);
    Result got;
    got.out = download(out, want.out.size(), s);
    got.lse = download(lse, want.lse.size(), s);
    stream.synchronize();
    expect_close(c, want, got, "dense gpu vs ref");
  }
#endif
}

INSTANTIATE_TEST_SUITE_P(Shapes, DecodeAttentionGpuDense,
                         ::testing::Values(std::make_tuple(4, 128, DType::kBF16),
                                           std::make_tuple(8, 64, DType::kF16),
                                           std::make_tuple(1, 256, DType::kBF16),
                                           std::make_tuple(5, 128, DType::kF16)),
                         [](const auto& info) {
                           return "G" + std::to_string(std::get<0>(info.param)) + "_d" +
                                  std::to_string(std::get<1>(info.param)) + "_" +
                                  dtype_name(std::get<2>(info.param));
                         });

// ---- plan: splits, workspace, errors ----

TEST(DecodeAttentionGpuPlan, SplitsAndWorkspace) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  DecodeAttentionParams p;
  p.num_seqs = 1;
  p.num_kv_heads = 8;
  p.num_q_heads = 32;
  p.head_dim = 128;
  p.dtype = DType::kBF16;
  // One batch-1 layer at 128K rows must be split to fill the device; a short one need not be.
  EXPECT_GT(decode_attention_num_splits(p, 131072), 1);
  EXPECT_EQ(decode_attention_num_splits(p, 60), 1);
  EXPECT_EQ(decode_attention_workspace_bytes(p, 60), 0u);
  EXPECT_EQ(decode_attention_num_splits(p, 0), 1);
  const int32_t auto_splits = decode_attention_num_splits(p, 131072);
  EXPECT_GE(decode_attention_workspace_bytes(p, 131072),
            static_cast<size_t>(32) * auto_splits * (128 + 1) * sizeof(float));
  // Each split has at least 64 rows when chosen automatically.
  EXPECT_LE(static_cast<int64_t>(auto_splits) * 64, 131072);
  EXPECT_LE(static_cast<int64_t>(decode_attention_num_splits(p, 2320)) * 64, 2320);
  p.num_splits = 7;
  EXPECT_EQ(decode_attention_num_splits(p, 100), 7);
  EXPECT_EQ(decode_attention_workspace_bytes(p, 100),
            (static_cast<size_t>(32) * 7 * 128 * 4 + 255) / 256 * 256 +
                (static_cast<size_t>(32) * 7 * 4 + 255) / 256 * 256);
  p.num_splits = 1;
  EXPECT_EQ(decode_attention_workspace_bytes(p, 131072), 0u);
#endif
}

TEST(DecodeAttentionGpuPlan, LauncherErrors) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  Case c = make_case(1, 2, 2, 64, DType::kBF16, Layout::kRandomChunks, 600, test::test_seed());
  cuda::Stream stream(0);
  const cudaStream_t s = stream.get();
  const DeviceCase d(c, s, false);
  cuda::DeviceBuffer<std::byte> out(c.out_elems() * 2 + 16, 0);
  cuda::DeviceBuffer<int32_t> indptr = upload(c.indptr, s);
  cuda::DeviceBuffer<KvChunk> chunks(c.chunks.size(), 0);
  DecodeAttentionTensors t;
  t.q = d.q.get();
  t.chunks = chunks.get();
  t.chunk_indptr = indptr.get();
  t.out = out.get();
  auto message = [&](auto&& f) -> std::string {
    try {
      f();
    } catch (const InvalidArgumentError& e) {
      return e.what();
    }
    return "";
  };
  c.p.num_splits = 3;
  const size_t need = decode_attention_workspace_bytes(c.p, 600);
  ASSERT_GT(need, 0u);
  cuda::DeviceBuffer<std::byte> ws(need, 0);
  EXPECT_NE(message([&] {
              launch_decode_attention(c.p, t, 600, ws.get(), need - 1, s);
            }).find("smaller than the"),
            std::string::npos);
  EXPECT_NE(message([&] {
              launch_decode_attention(c.p, t, 600, nullptr, 0, s);
            }).find("smaller than the"),
            std::string::npos);
  EXPECT_NE(message([&] {
              launch_decode_attention(c.p, t, -1, ws.get(), need, s);
            }).find("max_rows_per_problem must be >= 0, got -1"),
            std::string::npos);
  DecodeAttentionTensors bad = t;
  bad.q = d.q.get() + 2;
  EXPECT_NE(message([&] {
              launch_decode_attention(c.p, bad, 600, ws.get(), need, s);
            }).find("q must be 16-byte aligned"),
            std::string::npos);
  bad = t;
  bad.out = out.get() + 8;
  EXPECT_NE(message([&] {
              launch_decode_attention(c.p, bad, 600, ws.get(), need, s);
            }).find("out must be 16-byte aligned"),
            std::string::npos);
  DecodeAttentionParams f32 = c.p;
  f32.dtype = DType::kF32;
  EXPECT_NE(message([&] {
              launch_decode_attention(f32, t, 600, ws.get(), need, s);
            }).find("dtype fp32 is not supported by the GPU"),
            std::string::npos);
  EXPECT_NE(message([&] { decode_attention_workspace_bytes(f32, 600); }).find("dtype fp32"),
            std::string::npos);
  bad = t;
  bad.chunk_indptr = nullptr;
  EXPECT_NE(message([&] {
              launch_decode_attention(c.p, bad, 600, ws.get(), need, s);
            }).find("chunk_indptr is null"),
            std::string::npos);
  stream.synchronize();
#endif
}

}  // namespace
}  // namespace kvtier::kernels
