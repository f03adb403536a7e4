// CPU tests of decode attention:
//   reference   against softmax written out by hand on tiny inputs; invariants (one row gives that
//               V row, uniform logits give the mean of V, lse of both)
//   oneTBB      within dtype tolerance of the reference for G 1/4/8, head_dim 64/128/256,
//               fp16/bf16/fp32, random chunk layouts (0..40 rows), 16-row pages, ragged batches
//               with an empty problem, problems long enough to be cut into pieces; the same bits
//               at 1 and N threads
//   fused copy  k_copy/v_copy bitwise equal to the rows, nothing else written (guard bytes)
//   dense       the dense entry points equal the chunked reference on the same rows
//   errors      bad params, null arrays, malformed chunk lists and seq_lens, each named
#include "kernels/decode_attention.h"

#include <gtest/gtest.h>
#include <tbb/global_control.h>
#include <tbb/info.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "memory/core/half.h"
#include "memory/core/status.h"
#include "tests/common/test_util.h"

namespace kvtier::kernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

enum class Layout { kRandomChunks, kPages, kOneChunk };

const char* layout_name(Layout l) {
  return l == Layout::kRandomChunks ? "random_chunks"
                                    : (l == Layout::kPages ? "pages" : "one_chunk");
}

/// For gtest's parameter printing.
void PrintTo(Layout l, std::ostream* os) { *os << layout_name(l); }

/// One batch of problems on the host: q, a pool holding every chunk's rows at scattered places
/// (with unused rows between chunks), the chunk list and indptr.
struct Case {
  DecodeAttentionParams p;
  Layout layout = Layout::kRandomChunks;
  uint64_t seed = 0;
  size_t row_bytes = 0;
  std::vector<std::byte> q, k_pool, v_pool;
  std::vector<KvChunk> chunks;
  std::vector<int32_t> indptr;
  std::vector<int64_t> rows;  // per problem

  int32_t problems() const { return p.num_seqs * p.num_kv_heads; }
  size_t out_elems() const {
    return static_cast<size_t>(p.num_seqs) * p.num_q_heads * static_cast<size_t>(p.head_dim);
  }
  std::string describe() const {
    std::ostringstream os;
    os << "test_seed " << test::test_seed() << " (case seed " << seed << ") seqs " << p.num_seqs
       << " q_heads " << p.num_q_heads << " kv_heads " << p.num_kv_heads << " head_dim "
       << p.head_dim << " dtype " << p.dtype << " scale " << p.scale << " layout "
       << layout_name(layout) << " chunks " << chunks.size() << " rows/problem [";
    for (size_t i = 0; i < rows.size() && i < 12; ++i) os << (i ? " " : "") << rows[i];
    os << (rows.size() > 12 ? " ...]" : "]");
    return os.str();
  }
  DecodeAttentionTensors tensors(std::vector<std::byte>& out, std::vector<float>& lse) const {
    DecodeAttentionTensors t;
    t.q = q.data();
    t.chunks = chunks.data();
    t.chunk_indptr = indptr.data();
    t.out = out.data();
    t.lse = lse.data();
    return t;
  }
};

/// Random values of `dtype` (normal, standard deviation `sigma`), as raw bytes.
std::vector<std::byte> random_values(size_t n, DType dtype, float sigma, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.f, sigma);
  std::vector<std::byte> b(n * dtype_size(dtype));
  for (size_t i = 0; i < n; ++i) store_from_float(b.data(), dtype, i, normal(rng));
  return b;
}

/// Chunk sizes of one problem of n rows.
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
  // Place the chunks in the pool in shuffled order with 0..2 unused rows before each.
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
      KvChunk& ch = c.chunks[j];
      ch.k = c.k_pool.data() + first_row[j] * c.row_bytes;
      ch.v = c.v_pool.data() + first_row[j] * c.row_bytes;
      ch.num_rows = s;
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

/// Outputs poisoned (0xFF bytes: NaN in every dtype; lse NaN) so an unwritten element shows.
Result poisoned(const Case& c) {
  Result r;
  r.out.assign(c.out_elems() * dtype_size(c.p.dtype), std::byte{0xff});
  r.lse.assign(static_cast<size_t>(c.p.num_seqs) * c.p.num_q_heads,
               std::numeric_limits<float>::quiet_NaN());
  return r;
}

using AttentionFn = void (*)(const DecodeAttentionParams&, const DecodeAttentionTensors&);

Result run(AttentionFn fn, const Case& c) {
  Result r = poisoned(c);
  fn(c.p, c.tensors(r.out, r.lse));
  return r;
}

struct Tolerance {
  double atol, rtol, lse;
};
/// fp32 accumulation against double: the output's rounding to dtype dominates for fp16/bf16.
Tolerance tolerance(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return {1e-2, 1e-2, 1e-3};
    case DType::kF16:
      return {1e-3, 1e-3, 1e-3};
    default:
      return {1e-5, 1e-4, 1e-4};
  }
}

/// Every output element within tolerance of the reference (and written: poison is NaN), every
/// lse within tolerance or both -inf.
void expect_close(const Case& c, const Result& want, const Result& got, const std::string& what) {
  const Tolerance tol = tolerance(c.p.dtype);
  double max_err = 0;
  int64_t first_bad = -1;
  for (size_t i = 0; i < c.out_elems(); ++i) {
    const double w = load_as_float(want.out.data(), c.p.dtype, i);
    const double g = load_as_float(got.out.data(), c.p.dtype, i);
    const double err = std::fabs(g - w);
    if (std::isfinite(err)) max_err = std::max(max_err, err);
    if (!(err <= tol.atol + tol.rtol * std::fabs(w)) && first_bad < 0) {
      first_bad = static_cast<int64_t>(i);
    }
  }
  EXPECT_EQ(first_bad, -1) << what << ": first bad out element (row " << first_bad / c.p.head_dim
                           << ", dim " << first_bad % c.p.head_dim << ") max error " << max_err
                           << "; " << c.describe();
  int64_t first_bad_lse = -1;
  for (size_t i = 0; i < want.lse.size(); ++i) {
    const bool both_empty = want.lse[i] == -kInf && got.lse[i] == -kInf;
    if (!both_empty && !(std::fabs(static_cast<double>(got.lse[i]) - want.lse[i]) <= tol.lse)) {
      first_bad_lse = static_cast<int64_t>(i);
      break;
    }
  }
  EXPECT_EQ(first_bad_lse, -1) << what << ": first bad lse (got "
                               << (first_bad_lse >= 0 ? got.lse[first_bad_lse] : 0.f) << ", want "
                               << (first_bad_lse >= 0 ? want.lse[first_bad_lse] : 0.f) << "); "
                               << c.describe();
}

float out_value(const Case& c, const Result& r, int32_t seq, int32_t q_head, int32_t d) {
  return load_as_float(r.out.data(), c.p.dtype,
                       (static_cast<size_t>(seq) * c.p.num_q_heads + q_head) * c.p.head_dim + d);
}

// ---- the reference against the formula ----

TEST(DecodeAttentionRef, HandCheckedTinyCase) {
  // One sequence, one KV head, G = 2, head_dim 64, fp32, scale 1. K rows are log(1), log(2),
  // log(3) times e0 (in chunks of 2 and 1 around an empty one). Head 0 has q = e0: logits
  // log(1..3), weights 1:2:3, lse = log 6. Head 1 has q = 0: uniform weights, lse = log 3.
  DecodeAttentionParams p;
  p.num_seqs = 1;
  p.num_kv_heads = 1;
  p.num_q_heads = 2;
  p.head_dim = 64;
  p.dtype = DType::kF32;
  p.scale = 1.f;
  std::vector<float> q(2 * 64, 0.f), k(3 * 64, 0.f), v(3 * 64);
  q[0] = 1.f;
  for (int r = 0; r < 3; ++r) {
    k[r * 64] = std::log(static_cast<float>(r + 1));
    for (int d = 0; d < 64; ++d) v[r * 64 + d] = static_cast<float>(r) + 0.01f * d;
  }
  const std::vector<KvChunk> chunks = {{k.data(), v.data(), nullptr, nullptr, 2},
                                       {nullptr, nullptr, nullptr, nullptr, 0},
                                       {k.data() + 128, v.data() + 128, nullptr, nullptr, 1}};
  const std::vector<int32_t> indptr = {0, 3};
  for (const AttentionFn fn : {&decode_attention_ref, &decode_attention_cpu}) {
    std::vector<float> out(2 * 64, -1.f), lse(2, -1.f);
    fn(p, {q.data(), chunks.data(), indptr.data(), out.data(), lse.data()});
    for (int d = 0; d < 64; ++d) {
      const double w0 = (1.0 * v[d] + 2.0 * v[64 + d] + 3.0 * v[128 + d]) / 6.0;
      const double w1 = (1.0 * v[d] + 1.0 * v[64 + d] + 1.0 * v[128 + d]) / 3.0;
      EXPECT_NEAR(out[d], w0, 1e-6) << "head 0 dim " << d;
      EXPECT_NEAR(out[64 + d], w1, 1e-6) << "head 1 dim " << d;
    }
    EXPECT_NEAR(lse[0], std::log(6.0), 1e-6);
    EXPECT_NEAR(lse[1], std::log(3.0), 1e-6);
  }
}

TEST(DecodeAttentionRef, MatchesSoftmaxWrittenOut) {
  // A few rows, G = 2, two KV heads, fp32: softmax(scale q.k) . V computed here directly.
  Case c = make_case(2, 2, 2, 64, DType::kF32, Layout::kRandomChunks, 7, test::test_seed());
  c.p.scale = 0.3f;
  const Result r = run(&decode_attention_ref, c);
  for (int32_t s = 0; s < 2; ++s) {
    for (int32_t qh = 0; qh < 4; ++qh) {
      const int32_t prob = s * 2 + qh / 2;
      std::vector<const float*> kr, vr;
      for (int32_t j = c.indptr[prob]; j < c.indptr[prob + 1]; ++j) {
        for (int32_t row = 0; row < c.chunks[j].num_rows; ++row) {
          kr.push_back(static_cast<const float*>(c.chunks[j].k) + row * 64);
          vr.push_back(static_cast<const float*>(c.chunks[j].v) + row * 64);
        }
      }
      const float* q = reinterpret_cast<const float*>(c.q.data()) + (s * 4 + qh) * 64;
      std::vector<double> e(kr.size());
      double z = 0;
      for (size_t i = 0; i < kr.size(); ++i) {
        double dot = 0;
        for (int d = 0; d < 64; ++d) dot += static_cast<double>(q[d]) * kr[i][d];
        e[i] = std::exp(0.3 * dot);
        z += e[i];
      }
      for (int d = 0; d < 64; ++d) {
        double o = 0;
        for (size_t i = 0; i < kr.size(); ++i) o += e[i] / z * vr[i][d];
        if (kr.empty()) o = 0;
        EXPECT_NEAR(out_value(c, r, s, qh, d), o, 1e-6) << "seq " << s << " head " << qh;
      }
      const float want_lse = kr.empty() ? -kInf : static_cast<float>(std::log(z));
      if (kr.empty()) {
        EXPECT_EQ(r.lse[s * 4 + qh], -kInf);
      } else {
        EXPECT_NEAR(r.lse[s * 4 + qh], want_lse, 1e-6);
      }
    }
  }
}

class DecodeAttentionInvariants : public ::testing::TestWithParam<DType> {};

TEST_P(DecodeAttentionInvariants, OneRowGivesThatVRow) {
  const DType dtype = GetParam();
  for (const AttentionFn fn : {&decode_attention_ref, &decode_attention_cpu}) {
    const Case c = make_case(1, 2, 4, 128, dtype, Layout::kRandomChunks, 1, test::test_seed() + 1);
    const Result r = run(fn, c);
    const double scale = 1.0 / std::sqrt(128.0);
    for (int32_t qh = 0; qh < 4; ++qh) {
      const KvChunk* one = nullptr;
      for (int32_t j = c.indptr[0]; j < c.indptr[1]; ++j)
        if (c.chunks[j].num_rows == 1) one = &c.chunks[j];
      ASSERT_NE(one, nullptr);
      // out is V bitwise (weight exactly 1); lse is the one logit.
      EXPECT_EQ(std::memcmp(r.out.data() + qh * c.row_bytes, one->v, c.row_bytes), 0)
          << "head " << qh << "; " << c.describe();
      double dot = 0;
      for (int d = 0; d < 128; ++d) {
        dot += static_cast<double>(load_as_float(c.q.data(), dtype, qh * 128 + d)) *
               load_as_float(one->k, dtype, d);
      }
      EXPECT_NEAR(r.lse[qh], scale * dot, 1e-5 * (1 + std::fabs(scale * dot)));
    }
    // KV head 1 (problem 1) is empty: zeros and -inf.
    for (int32_t qh = 4; qh < 8; ++qh) {
      for (int d = 0; d < 128; ++d) EXPECT_EQ(out_value(c, r, 0, qh, d), 0.f);
      EXPECT_EQ(r.lse[qh], -kInf);
    }
  }
}

TEST_P(DecodeAttentionInvariants, UniformLogitsGiveTheMeanOfV) {
  const DType dtype = GetParam();
  for (const AttentionFn fn : {&decode_attention_ref, &decode_attention_cpu}) {
    Case c = make_case(1, 1, 3, 64, dtype, Layout::kRandomChunks, 2500, test::test_seed() + 2);
    std::fill(c.q.begin(), c.q.end(), std::byte{0});  // q = 0: every logit is 0
    const Result r = run(fn, c);
    std::vector<double> mean(64, 0.0);
    for (int32_t j = c.indptr[0]; j < c.indptr[1]; ++j)
      for (int32_t row = 0; row < c.chunks[j].num_rows; ++row)
        for (int d = 0; d < 64; ++d)
          mean[d] += load_as_float(c.chunks[j].v, dtype, static_cast<size_t>(row) * 64 + d);
    const Tolerance tol = tolerance(dtype);
    for (int32_t qh = 0; qh < 3; ++qh) {
      for (int d = 0; d < 64; ++d) {
        const double want = mean[d] / 2500.0;
        EXPECT_NEAR(out_value(c, r, 0, qh, d), want, tol.atol + tol.rtol * std::fabs(want))
            << "head " << qh << " dim " << d << "; " << c.describe();
      }
      EXPECT_NEAR(r.lse[qh], std::log(2500.0), 1e-4);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, DecodeAttentionInvariants,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// ---- the oneTBB path against the reference ----

class DecodeAttentionCpu
    : public ::testing::TestWithParam<std::tuple<int32_t, int32_t, DType, Layout>> {};

TEST_P(DecodeAttentionCpu, MatchesReference) {
  const auto [group, head_dim, dtype, layout] = GetParam();
  // 3 sequences x 2 KV heads, ragged rows with problem 1 empty; fewer rows for larger groups
  // (the reference costs G x rows x head_dim per problem).
  const int64_t max_rows = 600 + 2400 / group;
  for (const float q_sigma : {1.f, 3.f}) {  // softmax spread out, and peaked
    const uint64_t seed = test::test_seed() + 97 * group + head_dim + static_cast<int>(dtype) * 7 +
                          static_cast<int>(layout) * 13 + static_cast<uint64_t>(q_sigma);
    const Case c = make_case(3, 2, group, head_dim, dtype, layout, max_rows, seed, q_sigma);
    expect_close(c, run(&decode_attention_ref, c), run(&decode_attention_cpu, c), "cpu vs ref");
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DecodeAttentionCpu,
    ::testing::Combine(::testing::Values(1, 4, 8), ::testing::Values(64, 128),
                       ::testing::Values(DType::kF16, DType::kBF16, DType::kF32),
                       ::testing::Values(Layout::kRandomChunks, Layout::kPages)),
    [](const auto& info) {
      return "G" + std::to_string(std::get<0>(info.param)) + "_d" +
             std::to_string(std::get<1>(info.param)) + "_" + dtype_name(std::get<2>(info.param)) +
             "_" + layout_name(std::get<3>(info.param));
    });

TEST(DecodeAttentionCpuEdge, HeadDim256AndOddGroup) {
  const Case c =
      make_case(2, 3, 3, 256, DType::kBF16, Layout::kRandomChunks, 700, test::test_seed() + 5);
  expect_close(c, run(&decode_attention_ref, c), run(&decode_attention_cpu, c), "cpu vs ref");
}

TEST(DecodeAttentionCpuEdge, LongProblemsAreCutIntoPiecesAndMerged) {
  // 9000 rows: pieces of 2048 rows merged by log-sum-exp; one chunk and many chunks.
  for (const Layout layout : {Layout::kOneChunk, Layout::kRandomChunks, Layout::kPages}) {
    const Case c = make_case(1, 1, 4, 64, DType::kF16, layout, 9000, test::test_seed() + 6, 2.f);
    expect_close(c, run(&decode_attention_ref, c), run(&decode_attention_cpu, c), "cpu vs ref");
  }
}

TEST(DecodeAttentionCpuEdge, SameBitsAtOneAndManyThreads) {
  const Case c = make_case(4, 2, 4, 128, DType::kBF16, Layout::kPages, 5000, test::test_seed() + 8);
  Result one, many;
  {
    tbb::global_control limit(tbb::global_control::max_allowed_parallelism, 1);
    one = run(&decode_attention_cpu, c);
  }
  {
    tbb::global_control limit(tbb::global_control::max_allowed_parallelism,
                              std::max(4, tbb::info::default_concurrency()));
    many = run(&decode_attention_cpu, c);
  }
  EXPECT_EQ(test::first_difference(one.out.data(), many.out.data(), one.out.size()), -1);
  EXPECT_EQ(test::first_difference(one.lse.data(), many.lse.data(), one.lse.size() * 4), -1);
}

TEST(DecodeAttentionCpuEdge, ScaleZeroMeansOneOverSqrtHeadDim) {
  Case c = make_case(1, 2, 2, 64, DType::kF32, Layout::kRandomChunks, 300, test::test_seed());
  for (const AttentionFn fn : {&decode_attention_ref, &decode_attention_cpu}) {
    c.p.scale = 0.f;
    const Result a = run(fn, c);
    c.p.scale = 1.f / std::sqrt(64.f);
    const Result b = run(fn, c);
    c.p.scale = 0.5f;
    const Result d = run(fn, c);
    EXPECT_EQ(test::first_difference(a.out.data(), b.out.data(), a.out.size()), -1);
    EXPECT_NE(test::first_difference(a.out.data(), d.out.data(), a.out.size()), -1);
  }
  EXPECT_EQ(decode_attention_scale(c.p), 0.5f);
}

TEST(DecodeAttentionCpuEdge, ZeroSequencesIsANoOp) {
  DecodeAttentionParams p;
  p.num_kv_heads = 1;
  p.num_q_heads = 1;
  p.head_dim = 64;
  EXPECT_NO_THROW(decode_attention_ref(p, DecodeAttentionTensors{}));
  EXPECT_NO_THROW(decode_attention_cpu(p, DecodeAttentionTensors{}));
  EXPECT_NO_THROW(dense_decode_attention_ref(p, DenseDecodeTensors{}));
  EXPECT_NO_THROW(dense_decode_attention_cpu(p, DenseDecodeTensors{}));
}

TEST(DecodeAttentionCpuEdge, AllProblemsEmpty) {
  Case c = make_case(2, 2, 2, 64, DType::kBF16, Layout::kRandomChunks, 0, test::test_seed());
  for (const AttentionFn fn : {&decode_attention_ref, &decode_attention_cpu}) {
    const Result r = run(fn, c);
    for (size_t i = 0; i < c.out_elems(); ++i)
      EXPECT_EQ(load_as_float(r.out.data(), c.p.dtype, i), 0.f);
    for (const float x : r.lse) EXPECT_EQ(x, -kInf);
  }
}

// ---- fused copy ----

TEST(DecodeAttentionFusedCopy, RowsLandBitwiseAndNothingElseIsWritten) {
  for (const DType dtype : {DType::kBF16, DType::kF32}) {
    for (const AttentionFn fn : {&decode_attention_ref, &decode_attention_cpu}) {
      Case c = make_case(2, 2, 4, 64, dtype, Layout::kRandomChunks, 3000, test::test_seed() + 11);
      const Result plain = run(fn, c);
      // Every other chunk (empty ones included) gets destinations in a guarded pool, laid out
      // in reverse chunk order with a guard row between chunks.
      constexpr std::byte kGuard{0xAB};
      std::vector<size_t> dst_row(c.chunks.size(), SIZE_MAX);
      size_t pool_rows = 1;
      for (size_t j = c.chunks.size(); j-- > 0;) {
        if (j % 2 == 0) continue;
        dst_row[j] = pool_rows;
        pool_rows += static_cast<size_t>(c.chunks[j].num_rows) + 1;
      }
      std::vector<std::byte> k_dst(pool_rows * c.row_bytes, kGuard), v_dst = k_dst;
      std::vector<std::byte> k_want = k_dst, v_want = v_dst;
      for (size_t j = 0; j < c.chunks.size(); ++j) {
        if (dst_row[j] == SIZE_MAX) continue;
        const size_t off = dst_row[j] * c.row_bytes, n = c.chunks[j].num_rows * c.row_bytes;
        c.chunks[j].k_copy = k_dst.data() + off;
        c.chunks[j].v_copy = v_dst.data() + off;
        std::memcpy(k_want.data() + off, c.chunks[j].k, n);
        std::memcpy(v_want.data() + off, c.chunks[j].v, n);
      }
      const Result fused = run(fn, c);
      EXPECT_EQ(test::first_difference(k_dst.data(), k_want.data(), k_dst.size()), -1)
          << "K destination pool; " << c.describe();
      EXPECT_EQ(test::first_difference(v_dst.data(), v_want.data(), v_dst.size()), -1)
          << "V destination pool; " << c.describe();
      // The attention itself is unchanged by the copies.
      EXPECT_EQ(test::first_difference(plain.out.data(), fused.out.data(), plain.out.size()), -1);
      EXPECT_EQ(test::first_difference(plain.lse.data(), fused.lse.data(), plain.lse.size() * 4),
                -1);
    }
  }
}

// ---- dense entry points ----

TEST(DecodeAttentionDense, EqualsChunkedReferenceWithRaggedLengths) {
  for (const int32_t head_dim : {64, 128}) {
    DecodeAttentionParams p;
    p.num_seqs = 5;
    p.num_kv_heads = 2;
    p.num_q_heads = 8;
    p.head_dim = head_dim;
    p.dtype = DType::kF16;
    const int64_t max_len = 1500;
    const std::vector<int32_t> seq_lens = {1500, 0, 1, 777, 1499};
    std::mt19937_64 rng(test::test_seed() + head_dim);
    const size_t row_elems = static_cast<size_t>(head_dim);
    const size_t kv_elems = static_cast<size_t>(p.num_seqs) * p.num_kv_heads * max_len * row_elems;
    const std::vector<std::byte> q = random_values(5 * 8 * row_elems, p.dtype, 1.5f, rng);
    const std::vector<std::byte> k = random_values(kv_elems, p.dtype, 1.f, rng);
    const std::vector<std::byte> v = random_values(kv_elems, p.dtype, 1.f, rng);
    // The same rows as a chunk list, one chunk per problem.
    Case c;
    c.p = p;
    c.seed = test::test_seed() + head_dim;
    c.row_bytes = row_elems * 2;
    c.q = q;
    c.indptr.assign(1, 0);
    for (int32_t s = 0; s < p.num_seqs; ++s) {
      for (int32_t h = 0; h < p.num_kv_heads; ++h) {
        const size_t off = (static_cast<size_t>(s) * p.num_kv_heads + h) * max_len * c.row_bytes;
        c.chunks.push_back({k.data() + off, v.data() + off, nullptr, nullptr, seq_lens[s]});
        c.indptr.push_back(static_cast<int32_t>(c.chunks.size()));
        c.rows.push_back(seq_lens[s]);
      }
    }
    const Result want = run(&decode_attention_ref, c);
    for (const auto fn : {&dense_decode_attention_ref, &dense_decode_attention_cpu}) {
      Result got = poisoned(c);
      fn(p,
         {q.data(), k.data(), v.data(), seq_lens.data(), max_len, got.out.data(), got.lse.data()});
      expect_close(c, want, got, "dense vs chunked reference");
    }
  }
}

// ---- errors ----

/// The InvalidArgumentError message of f() ("" if nothing was thrown).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const InvalidArgumentError& e) {
    return e.what();
  }
  return "";
}

::testing::AssertionResult names(const std::string& message, const std::string& needle) {
  if (message.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "message '" << message << "' lacks '" << needle << "'";
}

TEST(DecodeAttentionErrors, BadParamsAreNamed) {
  DecodeAttentionParams good;
  good.num_seqs = 1;
  good.num_kv_heads = 2;
  good.num_q_heads = 8;
  good.head_dim = 128;
  EXPECT_NO_THROW(check_decode_attention_params(good));
  struct Bad {
    void (*edit)(DecodeAttentionParams&);
    const char* needle;
  };
  const Bad bad[] = {
      {[](DecodeAttentionParams& p) { p.num_seqs = -1; }, "num_seqs must be >= 0, got -1"},
      {[](DecodeAttentionParams& p) { p.num_kv_heads = 0; }, "num_kv_heads must be >= 1, got 0"},
      {[](DecodeAttentionParams& p) { p.num_q_heads = 0; }, "num_q_heads must be >= 1, got 0"},
      {[](DecodeAttentionParams& p) { p.num_q_heads = 7; },
       "num_q_heads 7 is not a multiple of num_kv_heads 2"},
      {[](DecodeAttentionParams& p) { p.head_dim = 96; }, "head_dim 96 is not supported"},
      {[](DecodeAttentionParams& p) { p.dtype = static_cast<DType>(9); }, "dtype 9 is not"},
      {[](DecodeAttentionParams& p) { p.scale = -1.f; }, "got -1"},
      {[](DecodeAttentionParams& p) { p.scale = std::numeric_limits<float>::quiet_NaN(); },
       "got nan"},
      {[](DecodeAttentionParams& p) { p.num_splits = -3; }, "num_splits must be >= 0"},
      {[](DecodeAttentionParams& p) {
         p.num_seqs = 1 << 20;
         p.num_q_heads = 1 << 12;
         p.num_kv_heads = 1;
       },
       "exceeds 2^31 - 1"},
  };
  for (const Bad& b : bad) {
    DecodeAttentionParams p = good;
    b.edit(p);
    EXPECT_TRUE(names(error_of([&] { check_decode_attention_params(p); }), b.needle));
    EXPECT_TRUE(
        names(error_of([&] { decode_attention_ref(p, DecodeAttentionTensors{}); }), b.needle));
    EXPECT_TRUE(
        names(error_of([&] { decode_attention_cpu(p, DecodeAttentionTensors{}); }), b.needle));
  }
}

TEST(DecodeAttentionErrors, NullArraysAndBadChunkListsAreNamed) {
  const Case base =
      make_case(2, 2, 2, 64, DType::kBF16, Layout::kRandomChunks, 50, test::test_seed());
  for (const AttentionFn fn : {&decode_attention_ref, &decode_attention_cpu}) {
    Result r = poisoned(base);
    {
      DecodeAttentionTensors t = base.tensors(r.out, r.lse);
      t.q = nullptr;
      EXPECT_TRUE(names(error_of([&] { fn(base.p, t); }), "q is null"));
      t = base.tensors(r.out, r.lse);
      t.out = nullptr;
      EXPECT_TRUE(names(error_of([&] { fn(base.p, t); }), "out is null"));
      void* const holder = r.out.data();
      t.out_at = &holder;  // read by the GPU path only: the CPU paths still need out
      EXPECT_TRUE(names(error_of([&] { fn(base.p, t); }), "out is null (out_at"));
      t = base.tensors(r.out, r.lse);
      t.chunks = nullptr;
      EXPECT_TRUE(names(error_of([&] { fn(base.p, t); }), "chunks is null"));
      t = base.tensors(r.out, r.lse);
      t.chunk_indptr = nullptr;
      EXPECT_TRUE(names(error_of([&] { fn(base.p, t); }), "chunk_indptr is null"));
    }
    Case c = base;
    c.indptr[2] = c.indptr[1] - 1;  // decreasing
    EXPECT_TRUE(names(error_of([&] { fn(c.p, c.tensors(r.out, r.lse)); }),
                      "chunk_indptr[2] = " + std::to_string(c.indptr[2]) + " is below"));
    c = base;
    c.indptr[0] = -1;
    EXPECT_TRUE(names(error_of([&] { fn(c.p, c.tensors(r.out, r.lse)); }),
                      "chunk_indptr[0] must be >= 0, got -1"));
    c = base;
    const int32_t j = c.indptr[2];  // first chunk of problem 2
    c.chunks[j].num_rows = -2;
    EXPECT_TRUE(names(error_of([&] { fn(c.p, c.tensors(r.out, r.lse)); }),
                      "problem 2: chunk " + std::to_string(j) + " has num_rows -2"));
    c = base;
    c.chunks[j].num_rows = 3;
    c.chunks[j].v = nullptr;
    EXPECT_TRUE(names(error_of([&] { fn(c.p, c.tensors(r.out, r.lse)); }),
                      "problem 2: chunk " + std::to_string(j) + " has 3 rows and a null v"));
  }
}

TEST(DecodeAttentionErrors, DenseSeqLensAndPointersAreChecked) {
  DecodeAttentionParams p;
  p.num_seqs = 2;
  p.num_kv_heads = 1;
  p.num_q_heads = 1;
  p.head_dim = 64;
  std::vector<uint16_t> q(2 * 64), kv(2 * 10 * 64), out(2 * 64);
  std::vector<int32_t> lens = {3, 11};
  DenseDecodeTensors t{q.data(), kv.data(), kv.data(), lens.data(), 10, out.data(), nullptr};
  for (const auto fn : {&dense_decode_attention_ref, &dense_decode_attention_cpu}) {
    EXPECT_TRUE(names(error_of([&] { fn(p, t); }), "seq_lens[1] = 11 is not in [0, 10]"));
    DenseDecodeTensors u = t;
    lens[1] = -1;
    EXPECT_TRUE(names(error_of([&] { fn(p, u); }), "seq_lens[1] = -1"));
    lens[1] = 2;
    u.k = nullptr;
    EXPECT_TRUE(names(error_of([&] { fn(p, u); }), "k or v is null"));
    u = t;
    u.seq_lens = nullptr;
    EXPECT_TRUE(names(error_of([&] { fn(p, u); }), "seq_lens is null"));
    u = t;
    u.max_len = -5;
    EXPECT_TRUE(names(error_of([&] { fn(p, u); }), "max_len must be >= 0, got -5"));
    lens[1] = 11;
  }
}

}  // namespace
}  // namespace kvtier::kernels
