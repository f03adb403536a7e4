// ClusterAttn's prefill compression on the CPU: the vote reference on hand-computed cases, DBAC's
// reference on hand-made vote vectors and its invariants on random ones, the budget split, the
// oneTBB paths against the references (votes within rtol 1e-5, DBAC exactly, any thread
// count), edge cases and bad input.
#include "kernels/density_cluster.h"

#include <gtest/gtest.h>
#include <tbb/global_control.h>

#include <algorithm>
#include <cmath>
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

// ---- helpers ----

/// Rows of head_dim with `first` in column 0 and zeros elsewhere (hand-computed scores).
std::vector<float> first_column(const std::vector<float>& first, int head_dim) {
  std::vector<float> out(first.size() * head_dim, 0.f);
  for (size_t r = 0; r < first.size(); ++r) out[r * head_dim] = first[r];
  return out;
}

std::string describe(const ObservationVotesParams& p) {
  std::ostringstream os;
  os << "dtype " << p.dtype << " q_heads " << p.num_q_heads << " kv_heads " << p.num_kv_heads
     << " head_dim " << p.head_dim << " n " << p.num_tokens << " window " << p.window << " pool "
     << static_cast<int>(p.pool) << "/" << p.pool_kernel << " seed " << test::test_seed();
  return os.str();
}

std::string describe(const DbacParams& p) {
  std::ostringstream os;
  os << "kv_heads " << p.num_kv_heads << " n " << p.num_tokens << " window " << p.window << " eps "
     << p.eps << " ratio " << p.min_density_ratio << " budget " << p.total_budget << " coverage "
     << p.coverage << " floor " << p.floor_fraction << " seed " << test::test_seed();
  return os.str();
}

/// Throws unless fn() throws InvalidArgumentError whose message contains `needle`.
template <typename Fn>
::testing::AssertionResult throws_naming(Fn fn, const std::string& needle) {
  try {
    fn();
  } catch (const InvalidArgumentError& e) {
    if (std::string(e.what()).find(needle) != std::string::npos)
      return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "message '" << e.what() << "' lacks '" << needle << "'";
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "wrong exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "no exception (wanted one naming '" << needle << "')";
}

std::vector<float> run_votes_ref(const ObservationVotesParams& p, const void* q, const void* k) {
  std::vector<float> v(
      static_cast<size_t>(p.num_kv_heads * std::max<int64_t>(num_prefix_tokens(p), 0)), -7.f);
  observation_votes_ref(p, q, k, v.data());
  return v;
}

/// Random q_window and keys of p's dtype (normal, unit variance), as raw bytes.
struct VoteInputs {
  std::vector<float> qf, kf;
  std::vector<uint16_t> qh, kh;
  const void* q() const { return qh.empty() ? static_cast<const void*>(qf.data()) : qh.data(); }
  const void* k() const { return kh.empty() ? static_cast<const void*>(kf.data()) : kh.data(); }
};

VoteInputs random_inputs(const ObservationVotesParams& p, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  VoteInputs in;
  in.qf.resize(static_cast<size_t>(p.num_q_heads) * p.window * p.head_dim);
  in.kf.resize(static_cast<size_t>(p.num_kv_heads) * p.num_tokens * p.head_dim);
  for (auto& x : in.qf) x = g(rng);
  for (auto& x : in.kf) x = g(rng);
  if (p.dtype != DType::kF32) {
    auto cvt = [&](const std::vector<float>& f, std::vector<uint16_t>* h) {
      h->resize(f.size());
      for (size_t i = 0; i < f.size(); ++i)
        (*h)[i] = p.dtype == DType::kF16 ? float_to_fp16(f[i]) : float_to_bf16(f[i]);
    };
    cvt(in.qf, &in.qh);
    cvt(in.kf, &in.kh);
  }
  return in;
}

struct DbacResult {
  std::vector<TokenRange> ranges;
  std::vector<int32_t> num_ranges, num_tokens, head_budget, concentration, kept, num_kept;
  DbacOutput out() {
    return {ranges.data(),        num_ranges.data(), num_tokens.data(), head_budget.data(),
            concentration.data(), kept.data(),       num_kept.data()};
  }
};

DbacResult make_result(const DbacParams& p) {
  DbacResult r;
  const size_t h = static_cast<size_t>(p.num_kv_heads);
  r.ranges.assign(h * std::max<int64_t>(dbac_range_capacity(p), 1), TokenRange{-7, -7});
  r.num_ranges.assign(h, -7);
  r.num_tokens.assign(h, -7);
  r.head_budget.assign(h, -7);
  r.concentration.assign(h, -7);
  r.kept.assign(h * std::max<int64_t>(dbac_kept_capacity(p), 1), -7);
  r.num_kept.assign(h, -7);
  return r;
}

template <typename Fn>
DbacResult run_dbac(Fn fn, const DbacParams& p, const std::vector<float>& votes) {
  DbacResult r = make_result(p);
  fn(p, votes.data(), r.out());
  return r;
}

/// The valid ranges of head h.
std::vector<std::pair<int32_t, int32_t>> head_ranges(const DbacParams& p, const DbacResult& r,
                                                     int32_t h) {
  std::vector<std::pair<int32_t, int32_t>> out;
  for (int32_t i = 0; i < r.num_ranges[h]; ++i) {
    const TokenRange& t = r.ranges[h * dbac_range_capacity(p) + i];
    out.emplace_back(t.begin, t.end);
  }
  return out;
}

using Ranges = std::vector<std::pair<int32_t, int32_t>>;

/// Exact equality of every output DBAC defines; the message names the first difference.
::testing::AssertionResult same_dbac(const DbacParams& p, const DbacResult& a,
                                     const DbacResult& b) {
  for (int32_t h = 0; h < p.num_kv_heads; ++h) {
    if (a.head_budget[h] != b.head_budget[h] || a.concentration[h] != b.concentration[h] ||
        a.num_tokens[h] != b.num_tokens[h] || a.num_kept[h] != b.num_kept[h])
      return ::testing::AssertionFailure()
             << "head " << h << ": budget " << a.head_budget[h] << "/" << b.head_budget[h]
             << " concentration " << a.concentration[h] << "/" << b.concentration[h] << " tokens "
             << a.num_tokens[h] << "/" << b.num_tokens[h] << " kept " << a.num_kept[h] << "/"
             << b.num_kept[h] << "; " << describe(p);
    const Ranges ra = head_ranges(p, a, h), rb = head_ranges(p, b, h);
    for (size_t i = 0; i < std::max(ra.size(), rb.size()); ++i)
      if (i >= ra.size() || i >= rb.size() || ra[i] != rb[i])
        return ::testing::AssertionFailure()
               << "head " << h << ": first differing range index " << i << " of " << ra.size()
               << "/" << rb.size() << "; " << describe(p);
    for (int32_t i = 0; i < a.num_kept[h]; ++i) {
      const int64_t at = h * dbac_kept_capacity(p) + i;
      if (a.kept[at] != b.kept[at])
        return ::testing::AssertionFailure()
               << "head " << h << ": first differing kept index " << i << "; " << describe(p);
    }
  }
  return ::testing::AssertionSuccess();
}

/// Votes with structure: a low floor, a few bursts of varied width and height, sometimes a sink
/// at position 0. `integer` rounds them to small integers (exact densities in tests).
std::vector<float> structured_votes(int32_t heads, int64_t m, std::mt19937_64& rng, bool integer) {
  std::vector<float> v(static_cast<size_t>(heads * m));
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::exponential_distribution<float> e(1.f);
  for (int32_t h = 0; h < heads; ++h) {
    float* x = v.data() + h * m;  // m may be 0: no element to take the address of
    for (int64_t i = 0; i < m; ++i) x[i] = 0.05f * u(rng);
    const int bursts = 1 + static_cast<int>(rng() % 8);
    for (int b = 0; b < bursts && m > 0; ++b) {
      const int64_t c = static_cast<int64_t>(rng() % m), w = 1 + static_cast<int64_t>(rng() % 12);
      const float height = 0.2f + 2.f * e(rng);
      for (int64_t i = std::max<int64_t>(0, c - w); i < std::min(m, c + w + 1); ++i)
        x[i] += height * (0.5f + 0.5f * u(rng));
    }
    if (m > 0 && rng() % 2) x[0] += 5.f;
    if (integer)
      for (int64_t i = 0; i < m; ++i) x[i] = std::floor(x[i] * 10.f);
  }
  return v;
}

// ---- step 1: the vote reference ----

TEST(ObservationVotesRef, SingleQueryHandComputed) {
  ObservationVotesParams p;
  p.dtype = DType::kF32;
  p.num_q_heads = p.num_kv_heads = 1;
  p.head_dim = 64;
  p.num_tokens = 4;
  p.window = 1;
  p.scale = 1.f;
  // Scores [0, ln 2, 0, ln 3]: exp = [1, 2, 1, 3], sum 7; votes for the 3 prefix keys.
  const std::vector<float> q = first_column({1.f}, 64);
  const std::vector<float> k = first_column({0.f, std::log(2.f), 0.f, std::log(3.f)}, 64);
  const std::vector<float> v = run_votes_ref(p, q.data(), k.data());
  const double want[] = {1.0 / 7, 2.0 / 7, 1.0 / 7};
  for (int j = 0; j < 3; ++j) EXPECT_NEAR(v[j], want[j], 1e-6) << "position " << j;
}

TEST(ObservationVotesRef, CausalWindowSummedOverGroupHandComputed) {
  ObservationVotesParams p;
  p.dtype = DType::kF32;
  p.num_q_heads = 2;
  p.num_kv_heads = 1;
  p.head_dim = 64;
  p.num_tokens = 6;
  p.window = 2;
  p.scale = 1.f;
  // Query head 0 is zero (uniform attention); query head 1 scores [0, ln 2, 0, 0, ln 2, 0].
  // Window query 0 sits at position 4 (keys 0..4), query 1 at position 5 (keys 0..5).
  const std::vector<float> q = first_column({0.f, 0.f, 1.f, 1.f}, 64);
  const float l2 = std::log(2.f);
  const std::vector<float> k = first_column({0.f, l2, 0.f, 0.f, l2, 0.f}, 64);
  const std::vector<float> v = run_votes_ref(p, q.data(), k.data());
  ASSERT_EQ(v.size(), 4u);
  const double uniform = 1.0 / 5 + 1.0 / 6;  // head 0, both window queries
  const double want[] = {uniform + 1.0 / 7 + 1.0 / 8, uniform + 2.0 / 7 + 2.0 / 8,
                         uniform + 1.0 / 7 + 1.0 / 8, uniform + 1.0 / 7 + 1.0 / 8};
  for (int j = 0; j < 4; ++j) EXPECT_NEAR(v[j], want[j], 1e-6) << "position " << j;
}

TEST(ObservationVotesRef, GqaHeadMapping) {
  ObservationVotesParams p;
  p.dtype = DType::kF32;
  p.num_q_heads = 4;
  p.num_kv_heads = 2;
  p.head_dim = 64;
  p.num_tokens = 5;
  p.window = 1;
  p.scale = 1.f;
  // KV head 0: zero keys (uniform over 5 keys) for query heads 0 and 1. KV head 1: key 0 scores
  // ln 4, the rest 0 (weights [4, 1, 1, 1, 1] / 8) for query heads 2 and 3.
  const std::vector<float> q = first_column({1.f, 1.f, 1.f, 1.f}, 64);
  const std::vector<float> k =
      first_column({0.f, 0.f, 0.f, 0.f, 0.f, std::log(4.f), 0.f, 0.f, 0.f, 0.f}, 64);
  const std::vector<float> v = run_votes_ref(p, q.data(), k.data());
  ASSERT_EQ(v.size(), 8u);
  for (int j = 0; j < 4; ++j) EXPECT_NEAR(v[j], 2.0 / 5, 1e-6) << "kv head 0, position " << j;
  EXPECT_NEAR(v[4], 1.0, 1e-6);
  for (int j = 1; j < 4; ++j) EXPECT_NEAR(v[4 + j], 0.25, 1e-6) << "kv head 1, position " << j;
}

TEST(ObservationVotesRef, DefaultScaleIsInverseSqrtHeadDim) {
  ObservationVotesParams p;
  p.dtype = DType::kF32;
  p.num_q_heads = p.num_kv_heads = 1;
  p.head_dim = 64;
  p.num_tokens = 3;
  p.window = 1;
  // scale 1/8: key 1 scores ln 2; weights [1, 2, 1].
  const std::vector<float> q = first_column({1.f}, 64);
  const std::vector<float> k = first_column({0.f, 8.f * std::log(2.f), 0.f}, 64);
  const std::vector<float> v = run_votes_ref(p, q.data(), k.data());
  EXPECT_NEAR(v[0], 0.25, 1e-6);
  EXPECT_NEAR(v[1], 0.5, 1e-6);
  EXPECT_DOUBLE_EQ(observation_votes_scale(p), 0.125);
}

TEST(ObservationVotesRef, PoolingHandComputed) {
  ObservationVotesParams p;
  p.dtype = DType::kF32;
  p.num_q_heads = p.num_kv_heads = 1;
  p.head_dim = 64;
  p.num_tokens = 5;
  p.window = 1;
  p.scale = 1.f;
  // Weights [1, 2, 3, 4, 1] / 11: raw votes [1, 2, 3, 4] / 11.
  const std::vector<float> q = first_column({1.f}, 64);
  const std::vector<float> k =
      first_column({0.f, std::log(2.f), std::log(3.f), std::log(4.f), 0.f}, 64);
  p.pool = VotePool::kAvg;
  p.pool_kernel = 3;
  std::vector<float> v = run_votes_ref(p, q.data(), k.data());
  const double avg[] = {3.0 / 3, 6.0 / 3, 9.0 / 3, 7.0 / 3};  // zero padded, divided by 3
  for (int j = 0; j < 4; ++j) EXPECT_NEAR(v[j], avg[j] / 11, 1e-6) << "avg, position " << j;
  p.pool = VotePool::kMax;
  v = run_votes_ref(p, q.data(), k.data());
  const double mx[] = {2, 3, 4, 4};
  for (int j = 0; j < 4; ++j) EXPECT_NEAR(v[j], mx[j] / 11, 1e-6) << "max, position " << j;
  p.pool_kernel = 1;  // no-op whatever the mode
  v = run_votes_ref(p, q.data(), k.data());
  for (int j = 0; j < 4; ++j) EXPECT_NEAR(v[j], (j + 1) / 11.0, 1e-6) << "kernel 1, position " << j;
}

TEST(ObservationVotesRef, VotesSumToWindowMassOutsideTheWindow) {
  // Each window query's probabilities sum to 1, so a head's votes sum to group * window minus
  // the mass the queries put on window keys: in (0, group * window].
  ObservationVotesParams p;
  p.dtype = DType::kBF16;
  p.num_q_heads = 6;
  p.num_kv_heads = 2;
  p.head_dim = 128;
  p.num_tokens = 77;
  p.window = 5;
  const VoteInputs in = random_inputs(p, test::test_seed());
  const std::vector<float> v = run_votes_ref(p, in.q(), in.k());
  for (int32_t g = 0; g < 2; ++g) {
    double s = 0;
    for (int64_t j = 0; j < 72; ++j) {
      EXPECT_GE(v[g * 72 + j], 0.f);
      s += v[g * 72 + j];
    }
    EXPECT_GT(s, 0.0) << describe(p);
    EXPECT_LE(s, 3.0 * 5 + 1e-5) << describe(p);
  }
}

TEST(ObservationVotesRef, WindowCoveringThePromptWritesNothing) {
  ObservationVotesParams p;
  p.dtype = DType::kF32;
  p.num_q_heads = p.num_kv_heads = 1;
  p.head_dim = 64;
  for (int64_t n : {1, 5}) {
    p.num_tokens = n;
    p.window = static_cast<int32_t>(n);
    const std::vector<float> q(static_cast<size_t>(n) * 64, 0.5f), k(q.size(), 0.25f);
    float sentinel = -7.f;
    EXPECT_EQ(num_prefix_tokens(p), 0);
    observation_votes_ref(p, q.data(), k.data(), &sentinel);
    observation_votes_cpu(p, q.data(), k.data(), &sentinel);
    EXPECT_EQ(sentinel, -7.f) << "n " << n;
  }
}

TEST(ObservationVotesRef, RejectsBadParams) {
  ObservationVotesParams good;
  good.dtype = DType::kF32;
  good.num_q_heads = 4;
  good.num_kv_heads = 2;
  good.head_dim = 64;
  good.num_tokens = 8;
  good.window = 2;
  EXPECT_NO_THROW(check_observation_votes_params(good));
  ObservationVotesParams p = good;
  p.window = 9;
  EXPECT_TRUE(throws_naming([&] { check_observation_votes_params(p); }, "exceeds num_tokens 8"));
  p = good;
  p.window = 0;
  EXPECT_TRUE(throws_naming([&] { check_observation_votes_params(p); }, "window"));
  p = good;
  p.num_q_heads = 3;
  EXPECT_TRUE(throws_naming([&] { check_observation_votes_params(p); }, "num_q_heads 3"));
  p = good;
  p.head_dim = 100;
  EXPECT_TRUE(throws_naming([&] { check_observation_votes_params(p); }, "head_dim 100"));
  p = good;
  p.pool = VotePool::kAvg;
  p.pool_kernel = 4;
  EXPECT_TRUE(throws_naming([&] { check_observation_votes_params(p); }, "pool_kernel 4"));
  p = good;
  p.num_tokens = 0;
  EXPECT_TRUE(throws_naming([&] { check_observation_votes_params(p); }, "num_tokens 0"));
  p = good;
  p.scale = std::nanf("");
  EXPECT_TRUE(throws_naming([&] { check_observation_votes_params(p); }, "scale"));
}

TEST(ObservationVotesRef, RejectsNonFiniteInputsNamingThem) {
  ObservationVotesParams p;
  p.dtype = DType::kF32;
  p.num_q_heads = 2;
  p.num_kv_heads = 1;
  p.head_dim = 64;
  p.num_tokens = 6;
  p.window = 2;
  std::vector<float> q(2 * 2 * 64, 0.1f), k(6 * 64, 0.2f), v(4);
  q[(1 * 2 + 1) * 64 + 5] = std::nanf("");
  for (auto fn : {observation_votes_ref, observation_votes_cpu})
    EXPECT_TRUE(throws_naming([&] { fn(p, q.data(), k.data(), v.data()); },
                              "q_window[q_head 1, row 1, dim 5] is NaN"));
  q[(1 * 2 + 1) * 64 + 5] = 0.f;
  k[3 * 64 + 9] = -INFINITY;
  for (auto fn : {observation_votes_ref, observation_votes_cpu})
    EXPECT_TRUE(throws_naming([&] { fn(p, q.data(), k.data(), v.data()); },
                              "keys[kv_head 0, token 3, dim 9] is Inf"));
}

// ---- step 1: the oneTBB path against the reference ----

struct VoteCase {
  DType dtype;
  int32_t q_heads, kv_heads, head_dim;
  int64_t n;
  int32_t window;
  VotePool pool;
  int32_t kernel;
};

/// How GoogleTest (and so CTest's test names) print a case.
void PrintTo(const VoteCase& c, std::ostream* os) {
  *os << "n " << c.n << " window " << c.window << " q_heads " << c.q_heads << " kv_heads "
      << c.kv_heads << " head_dim " << c.head_dim << " pool " << static_cast<int>(c.pool) << "/"
      << c.kernel;
}

/// "fp16_q4_kv2_d128_n257_w8_max3": the test name of a case.
std::string vote_case_name(const ::testing::TestParamInfo<VoteCase>& info) {
  const VoteCase& c = info.param;
  static const char* const kPools[] = {"none", "avg", "max"};
  return std::string(dtype_name(c.dtype)) + "_q" + std::to_string(c.q_heads) + "_kv" +
         std::to_string(c.kv_heads) + "_d" + std::to_string(c.head_dim) + "_n" +
         std::to_string(c.n) + "_w" + std::to_string(c.window) + "_" +
         kPools[static_cast<int>(c.pool)] + std::to_string(c.kernel);
}

class ObservationVotesCpu : public ::testing::TestWithParam<VoteCase> {};

TEST_P(ObservationVotesCpu, MatchesReference) {
  const VoteCase c = GetParam();
  ObservationVotesParams p;
  p.dtype = c.dtype;
  p.num_q_heads = c.q_heads;
  p.num_kv_heads = c.kv_heads;
  p.head_dim = c.head_dim;
  p.num_tokens = c.n;
  p.window = c.window;
  p.pool = c.pool;
  p.pool_kernel = c.kernel;
  const VoteInputs in = random_inputs(p, test::test_seed() + c.n);
  const std::vector<float> want = run_votes_ref(p, in.q(), in.k());
  std::vector<float> got(want.size(), -7.f);
  observation_votes_cpu(p, in.q(), in.k(), got.data());
  double max_err = 0;
  int64_t first_bad = -1;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    max_err = std::max(max_err, err);
    if (first_bad < 0 && !(err <= 1e-5 * std::abs(want[i]) + 1e-6))
      first_bad = static_cast<int64_t>(i);
  }
  EXPECT_EQ(first_bad, -1) << "first bad vote " << first_bad << " (head "
                           << first_bad / std::max<int64_t>(num_prefix_tokens(p), 1)
                           << "), max abs error " << max_err << "; " << describe(p);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ObservationVotesCpu,
    ::testing::Values(VoteCase{DType::kF32, 4, 2, 64, 1, 1, VotePool::kNone, 1},
                      VoteCase{DType::kF32, 4, 2, 64, 2, 1, VotePool::kNone, 1},
                      VoteCase{DType::kF32, 4, 2, 64, 17, 16, VotePool::kNone, 1},
                      VoteCase{DType::kF32, 8, 2, 128, 300, 32, VotePool::kAvg, 5},
                      VoteCase{DType::kF32, 4, 4, 64, 1000, 7, VotePool::kMax, 7},
                      VoteCase{DType::kF16, 4, 1, 128, 257, 8, VotePool::kMax, 3},
                      VoteCase{DType::kBF16, 2, 2, 256, 130, 64, VotePool::kNone, 1},
                      VoteCase{DType::kBF16, 8, 1, 64, 1500, 63, VotePool::kAvg, 7}),
    vote_case_name);

TEST(ObservationVotesCpu, SameResultAtOneAndManyThreads) {
  ObservationVotesParams p;
  p.dtype = DType::kF16;
  p.num_q_heads = 8;
  p.num_kv_heads = 2;
  p.head_dim = 128;
  p.num_tokens = 901;
  p.window = 16;
  p.pool = VotePool::kAvg;
  p.pool_kernel = 5;
  const VoteInputs in = random_inputs(p, test::test_seed());
  std::vector<float> one(2 * 885), many(2 * 885);
  {
    tbb::global_control c(tbb::global_control::max_allowed_parallelism, 1);
    observation_votes_cpu(p, in.q(), in.k(), one.data());
  }
  observation_votes_cpu(p, in.q(), in.k(), many.data());
  EXPECT_EQ(test::first_difference(one.data(), many.data(), one.size() * 4), -1) << describe(p);
}

// ---- step 2: DBAC reference on hand-made votes ----

DbacParams one_head(int64_t m, int32_t window, int32_t eps, int64_t budget) {
  DbacParams p;
  p.num_kv_heads = 1;
  p.num_tokens = m + window;
  p.window = window;
  p.eps = eps;
  p.total_budget = budget;
  return p;
}

/// m = 32 (a power of two, so the mean is exact), eps 1, ratio 1: threshold 40 / 32 * 3 = 3.75.
/// Cores 2..6 (cluster A, mass 27), 11..13 (B, mass 5), 25..28 (C, mass 8); ranges with border
/// points [1, 8), [10, 15), [24, 30).
std::vector<float> three_clusters() {
  std::vector<float> v(32, 0.f);
  v[3] = v[4] = v[5] = 9.f;
  v[12] = 5.f;
  v[26] = v[27] = 4.f;
  return v;
}

TEST(DbacRef, HandMadeClustersRankedByMass) {
  const std::vector<float> v = three_clusters();
  DbacParams p = one_head(32, 2, 1, 100);
  DbacResult r = run_dbac(dbac_ref, p, v);
  EXPECT_EQ(head_ranges(p, r, 0), (Ranges{{1, 8}, {10, 15}, {24, 30}}));
  EXPECT_EQ(r.num_tokens[0], 18);
  EXPECT_EQ(r.head_budget[0], 32);   // one head: min(budget, m)
  EXPECT_EQ(r.concentration[0], 5);  // 9 + 9 + 9 + 5 + 4 >= ceil(0.9 * 40)
  // Budget 13: A (7) and C (6) fit exactly; B is not reached.
  p.total_budget = 13;
  r = run_dbac(dbac_ref, p, v);
  EXPECT_EQ(head_ranges(p, r, 0), (Ranges{{1, 8}, {24, 30}}));
  EXPECT_EQ(r.num_tokens[0], 13);
  ASSERT_EQ(r.num_kept[0], 15);
  const std::vector<int32_t> kept(r.kept.begin(), r.kept.begin() + 15);
  EXPECT_EQ(kept, (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 24, 25, 26, 27, 28, 29, 32, 33}));
  // Budget 10: A, then C truncated to its densest 3 tokens, leftmost among equals: [25, 28).
  p.total_budget = 10;
  r = run_dbac(dbac_ref, p, v);
  EXPECT_EQ(head_ranges(p, r, 0), (Ranges{{1, 8}, {25, 28}}));
  EXPECT_EQ(r.num_tokens[0], 10);
  // Budget 6: A itself is truncated; [1, 7) and [2, 8) both hold 27: the leftmost wins.
  p.total_budget = 6;
  r = run_dbac(dbac_ref, p, v);
  EXPECT_EQ(head_ranges(p, r, 0), (Ranges{{1, 7}}));
}

TEST(DbacRef, BorderPointGoesToTheNearestCorePointTiesLeft) {
  // eps 3, spikes at 1 and 11: cores 0..4 and 8..14 (gap 4 > eps: two clusters). Position 6 is
  // 2 from core 4 and 2 from core 8: the left cluster gets it; 7 is nearer to 8.
  std::vector<float> v(16, 0.f);
  v[1] = v[11] = 10.f;
  DbacParams p = one_head(16, 0, 3, 16);
  DbacResult r = run_dbac(dbac_ref, p, v);
  EXPECT_EQ(head_ranges(p, r, 0), (Ranges{{0, 7}, {7, 16}}));
  // Equal masses rank by position: A (7 tokens) whole, B truncated to 2: [10, 12) and [11, 13)
  // both hold the spike; the leftmost wins.
  p.total_budget = 9;
  r = run_dbac(dbac_ref, p, v);
  EXPECT_EQ(head_ranges(p, r, 0), (Ranges{{0, 7}, {10, 12}}));
  EXPECT_EQ(r.num_kept[0], 9);
}

TEST(DbacRef, AllEqualVotesMakeOneClusterOfTheWholePrefix) {
  // Every interior density equals the threshold (mean * (2 eps + 1)), so it is core; the two
  // positions at each edge see a truncated window and are border points.
  const std::vector<float> v(3 * 20, 0.5f);
  DbacParams p;
  p.num_kv_heads = 3;
  p.num_tokens = 24;
  p.window = 4;
  p.eps = 2;
  p.total_budget = 60;
  DbacResult r = run_dbac(dbac_ref, p, v);
  for (int32_t h = 0; h < 3; ++h) {
    EXPECT_EQ(head_ranges(p, r, h), (Ranges{{0, 20}})) << "head " << h;
    EXPECT_EQ(r.head_budget[h], 20);
    EXPECT_EQ(r.concentration[h], 18);  // ceil(0.9 * 20) positions
  }
  p.total_budget = 21;  // floors 1; equal concentrations: 7 each
  r = run_dbac(dbac_ref, p, v);
  for (int32_t h = 0; h < 3; ++h) {
    EXPECT_EQ(r.head_budget[h], 7);
    EXPECT_EQ(head_ranges(p, r, h), (Ranges{{0, 7}})) << "equal windows: leftmost";
  }
}

TEST(DbacRef, BudgetZeroKeepsOnlyTheWindow) {
  std::mt19937_64 rng(test::test_seed());
  DbacParams p;
  p.num_kv_heads = 2;
  p.num_tokens = 108;
  p.window = 8;
  p.total_budget = 0;
  const std::vector<float> v = structured_votes(2, 100, rng, false);
  for (auto fn : {dbac_ref, dbac_cpu}) {
    const DbacResult r = run_dbac(fn, p, v);
    for (int32_t h = 0; h < 2; ++h) {
      EXPECT_EQ(r.head_budget[h], 0);
      EXPECT_EQ(r.num_ranges[h], 0);
      EXPECT_EQ(r.num_tokens[h], 0);
      ASSERT_EQ(r.num_kept[h], 8);
      for (int32_t i = 0; i < 8; ++i) EXPECT_EQ(r.kept[h * dbac_kept_capacity(p) + i], 100 + i);
    }
  }
}

TEST(DbacRef, BudgetLargerThanTheContextTakesEveryCluster) {
  std::mt19937_64 rng(test::test_seed());
  DbacParams p;
  p.num_kv_heads = 3;
  p.num_tokens = 250;
  p.window = 10;
  p.total_budget = 100000;
  const std::vector<float> v = structured_votes(3, 240, rng, false);
  const DbacResult r = run_dbac(dbac_ref, p, v);
  for (int32_t h = 0; h < 3; ++h) EXPECT_EQ(r.head_budget[h], 240);  // capped at the prefix
  // With unlimited budget, every cluster is taken whole: the same ranges as a huge budget on one
  // head alone.
  for (int32_t h = 0; h < 3; ++h) {
    DbacParams q = one_head(240, 10, p.eps, 240);
    const std::vector<float> vh(v.begin() + h * 240, v.begin() + (h + 1) * 240);
    const DbacResult rh = run_dbac(dbac_ref, q, vh);
    EXPECT_EQ(head_ranges(p, r, h), head_ranges(q, rh, 0)) << "head " << h;
  }
}

TEST(DbacRef, AllZeroVotesSelectNothing) {
  DbacParams p;
  p.num_kv_heads = 2;
  p.num_tokens = 40;
  p.window = 4;
  p.total_budget = 30;
  std::vector<float> v(2 * 36, 0.f);
  for (auto fn : {dbac_ref, dbac_cpu}) {
    const DbacResult r = run_dbac(fn, p, v);
    for (int32_t h = 0; h < 2; ++h) {
      EXPECT_EQ(r.concentration[h], 0);
      EXPECT_EQ(r.head_budget[h], 15);  // no concentration anywhere: equal shares
      EXPECT_EQ(r.num_ranges[h], 0);
      EXPECT_EQ(r.num_kept[h], 4);
    }
  }
}

TEST(DbacRef, WindowCoveringThePromptKeepsTheWindow) {
  for (int64_t n : {1, 6}) {
    DbacParams p;
    p.num_kv_heads = 2;
    p.num_tokens = n;
    p.window = static_cast<int32_t>(n);
    p.total_budget = 50;
    EXPECT_EQ(dbac_range_capacity(p), 0);
    for (auto fn : {dbac_ref, dbac_cpu}) {
      const DbacResult r = run_dbac(fn, p, {});
      for (int32_t h = 0; h < 2; ++h) {
        EXPECT_EQ(r.head_budget[h], 0);
        EXPECT_EQ(r.num_ranges[h], 0);
        ASSERT_EQ(r.num_kept[h], n);
        for (int64_t i = 0; i < n; ++i) EXPECT_EQ(r.kept[h * dbac_kept_capacity(p) + i], i);
      }
    }
  }
  // n = 1 with no window: one position, one vote. With eps 4 its window is truncated (mass q
  // against a threshold of 9 q): no core point, nothing selected. With eps 0 it is core.
  DbacParams p = one_head(1, 0, 4, 5);
  for (auto fn : {dbac_ref, dbac_cpu}) {
    p.eps = 4;
    DbacResult r = run_dbac(fn, p, {3.f});
    EXPECT_EQ(r.num_ranges[0], 0);
    EXPECT_EQ(r.head_budget[0], 1);
    p.eps = 0;
    r = run_dbac(fn, p, {3.f});
    EXPECT_EQ(head_ranges(p, r, 0), (Ranges{{0, 1}}));
    EXPECT_EQ(r.concentration[0], 1);
  }
}

TEST(DbacRef, RejectsNonFiniteOrNegativeVotesNamingThem) {
  DbacParams p;
  p.num_kv_heads = 2;
  p.num_tokens = 12;
  p.window = 2;
  p.total_budget = 8;
  std::vector<float> v(20, 1.f);
  v[13] = std::nanf("");
  for (auto fn : {dbac_ref, dbac_cpu}) {
    DbacResult r = make_result(p);
    EXPECT_TRUE(
        throws_naming([&] { fn(p, v.data(), r.out()); }, "votes[kv_head 1, position 3] is NaN"));
  }
  v[13] = 1.f;
  v[4] = INFINITY;
  DbacResult r = make_result(p);
  EXPECT_TRUE(throws_naming([&] { dbac_ref(p, v.data(), r.out()); }, "position 4] is Inf"));
  v[4] = -0.5f;
  EXPECT_TRUE(throws_naming([&] { dbac_cpu(p, v.data(), r.out()); }, "position 4] is negative"));
  // The GPU's error word decodes to the same message.
  EXPECT_NO_THROW(throw_if_invalid_vote(p, -1));
  EXPECT_TRUE(throws_naming([&] { throw_if_invalid_vote(p, 4 * 13 + 0); },
                            "votes[kv_head 1, position 3] is NaN"));
  EXPECT_TRUE(throws_naming([&] { throw_if_invalid_vote(p, 4 * 4 + 2); }, "is negative"));
}

TEST(DbacRef, RejectsBadParams) {
  DbacParams good = one_head(10, 2, 4, 5);
  EXPECT_NO_THROW(check_dbac_params(good));
  DbacParams p = good;
  p.window = 13;
  EXPECT_TRUE(throws_naming([&] { check_dbac_params(p); }, "exceeds num_tokens 12"));
  p = good;
  p.eps = -1;
  EXPECT_TRUE(throws_naming([&] { check_dbac_params(p); }, "eps -1"));
  p = good;
  p.total_budget = -3;
  EXPECT_TRUE(throws_naming([&] { check_dbac_params(p); }, "total_budget"));
  p = good;
  p.coverage = 0.f;
  EXPECT_TRUE(throws_naming([&] { check_dbac_params(p); }, "coverage"));
  p = good;
  p.min_density_ratio = std::nanf("");
  EXPECT_TRUE(throws_naming([&] { check_dbac_params(p); }, "min_density_ratio"));
  p = good;
  p.num_kv_heads = 0;
  EXPECT_TRUE(throws_naming([&] { check_dbac_params(p); }, "num_kv_heads 0"));
  p = good;
  p.floor_fraction = 1.5f;
  EXPECT_TRUE(throws_naming([&] { check_dbac_params(p); }, "floor_fraction"));
  DbacResult r = make_result(good);
  DbacOutput out = r.out();
  out.head_budget = nullptr;
  const std::vector<float> v(10, 1.f);
  EXPECT_TRUE(throws_naming([&] { dbac_ref(good, v.data(), out); }, "head_budget is null"));
}

// ---- step 2: the budget split ----

std::vector<int32_t> split(int32_t heads, int64_t m, int64_t total, float floor_fraction,
                           std::vector<int32_t> conc) {
  DbacParams p;
  p.num_kv_heads = heads;
  p.num_tokens = m;
  p.total_budget = total;
  p.floor_fraction = floor_fraction;
  std::vector<int32_t> b(heads, -7);
  dbac_split_budgets_ref(p, conc.data(), b.data());
  return b;
}

TEST(DbacSplit, HandComputed) {
  // Floors floor(0.2 * 60 / 3) = 4; the other 48 by concentration 1 : 2 : 5.
  EXPECT_EQ(split(3, 100, 60, 0.2f, {1, 2, 5}), (std::vector<int32_t>{10, 16, 34}));
  // Head 0's share (14 * 9 / 10) passes its room (9): capped at m = 10, its excess to head 1.
  EXPECT_EQ(split(2, 10, 16, 0.2f, {9, 1}), (std::vector<int32_t>{10, 6}));
  // 10 / 3 each, one token left over: the largest remainders tie, the lower head gets it.
  EXPECT_EQ(split(3, 100, 10, 0.f, {1, 1, 1}), (std::vector<int32_t>{4, 3, 3}));
  // No concentration anywhere (all-zero votes): equal shares.
  EXPECT_EQ(split(2, 100, 10, 0.f, {0, 0}), (std::vector<int32_t>{5, 5}));
  // A head with zero concentration keeps its floor while others have weight...
  EXPECT_EQ(split(2, 100, 40, 0.5f, {0, 3}), (std::vector<int32_t>{10, 30}));
  // ... and takes the rest once they are full.
  EXPECT_EQ(split(2, 10, 20, 0.f, {0, 3}), (std::vector<int32_t>{10, 10}));
  // More than the context: every head gets m; the sum is H * m.
  EXPECT_EQ(split(3, 7, 1000, 0.2f, {1, 5, 2}), (std::vector<int32_t>{7, 7, 7}));
  EXPECT_EQ(split(3, 7, 0, 0.2f, {1, 5, 2}), (std::vector<int32_t>{0, 0, 0}));
}

TEST(DbacSplit, InvariantsOnRandomConcentrations) {
  std::mt19937_64 rng(test::test_seed());
  for (int trial = 0; trial < 300; ++trial) {
    const int32_t heads = 1 + static_cast<int32_t>(rng() % 12);
    const int64_t m = 1 + static_cast<int64_t>(rng() % 300);
    const int64_t total = static_cast<int64_t>(rng() % (heads * m * 3 / 2 + 2));
    const float ff = static_cast<float>(rng() % 11) / 10.f;
    std::vector<int32_t> conc(heads);
    for (auto& c : conc) c = rng() % 4 == 0 ? 0 : static_cast<int32_t>(1 + rng() % m);
    const std::vector<int32_t> b = split(heads, m, total, ff, conc);
    DbacParams p;
    p.num_kv_heads = heads;
    p.num_tokens = m;
    p.total_budget = total;
    p.floor_fraction = ff;
    const int64_t floor_b = dbac_budget_floor(p);
    int64_t sum = 0;
    for (int32_t h = 0; h < heads; ++h) {
      sum += b[h];
      ASSERT_GE(b[h], floor_b) << "trial " << trial << " head " << h << "; " << describe(p);
      ASSERT_LE(b[h], m) << "trial " << trial << " head " << h << "; " << describe(p);
      for (int32_t g = 0; g < heads; ++g) {
        if (conc[g] > conc[h]) {
          ASSERT_GE(b[g], b[h]) << "more concentrated tokens, less budget: heads " << g << ", " << h
                                << "; trial " << trial << "; " << describe(p);
        }
      }
    }
    ASSERT_EQ(sum, std::min(total, heads * m)) << "trial " << trial << "; " << describe(p);
  }
}

// ---- step 2: invariants of the reference on random votes ----

TEST(DbacRef, InvariantsOnRandomVotes) {
  std::mt19937_64 rng(test::test_seed());
  for (int trial = 0; trial < 120; ++trial) {
    DbacParams p;
    p.num_kv_heads = 1 + static_cast<int32_t>(rng() % 4);
    const int64_t m = 1 + static_cast<int64_t>(rng() % 400);
    p.window = static_cast<int32_t>(rng() % 9);
    p.num_tokens = m + p.window;
    p.eps = static_cast<int32_t>(rng() % 7);
    p.min_density_ratio = 0.25f * static_cast<float>(1 + rng() % 12);
    p.total_budget = static_cast<int64_t>(rng() % (p.num_kv_heads * m + 20));
    p.coverage = 0.05f * static_cast<float>(1 + rng() % 20);
    // Integer votes: densities are exact in double, so the core rule can be checked directly.
    const std::vector<float> v = structured_votes(p.num_kv_heads, m, rng, true);
    const DbacResult r = run_dbac(dbac_ref, p, v);
    const std::string ctx = "trial " + std::to_string(trial) + "; " + describe(p);
    int64_t budget_sum = 0;
    for (int32_t h = 0; h < p.num_kv_heads; ++h) {
      budget_sum += r.head_budget[h];
      const float* x = &v[h * m];
      double total = 0;
      for (int64_t i = 0; i < m; ++i) total += x[i];
      const double thr = total / static_cast<double>(m) * static_cast<double>(2 * p.eps + 1) *
                         static_cast<double>(p.min_density_ratio);
      std::vector<char> core(m);
      for (int64_t i = 0; i < m; ++i) {
        double dens = 0;
        for (int64_t j = std::max<int64_t>(0, i - p.eps); j <= std::min(m - 1, i + p.eps); ++j)
          dens += x[j];
        core[i] = dens > 0 && dens >= thr;
      }
      const Ranges rr = head_ranges(p, r, h);
      int64_t tokens = 0, prev_end = 0;
      for (size_t i = 0; i < rr.size(); ++i) {
        ASSERT_LT(rr[i].first, rr[i].second) << "empty range " << i << " head " << h << "; " << ctx;
        ASSERT_GE(rr[i].first, prev_end)
            << "unsorted or overlapping range " << i << " head " << h << "; " << ctx;
        ASSERT_LE(rr[i].second, m) << "range " << i << " out of bounds, head " << h << "; " << ctx;
        prev_end = rr[i].second;
        tokens += rr[i].second - rr[i].first;
        // Every position is a core point or within eps of one (a border point).
        for (int32_t pos = rr[i].first; pos < rr[i].second; ++pos) {
          bool near = false;
          for (int64_t j = std::max<int64_t>(0, pos - p.eps);
               j <= std::min<int64_t>(m - 1, pos + p.eps); ++j)
            near |= core[j] != 0;
          ASSERT_TRUE(near) << "position " << pos << " of range " << i << " is neither core nor "
                            << "border, head " << h << "; " << ctx;
        }
      }
      ASSERT_EQ(tokens, r.num_tokens[h]) << "head " << h << "; " << ctx;
      ASSERT_LE(tokens, r.head_budget[h]) << "head " << h << "; " << ctx;
      // A head that could fill its budget from its clusters does: the cut truncates.
      int64_t clustered = 0;
      {
        DbacParams all = p;
        all.num_kv_heads = 1;
        all.total_budget = m;
        const std::vector<float> vh(x, x + m);
        const DbacResult ra = run_dbac(dbac_ref, all, vh);
        clustered = ra.num_tokens[0];
      }
      ASSERT_EQ(tokens, std::min<int64_t>(clustered, r.head_budget[h]))
          << "head " << h << "; " << ctx;
      // Kept: the ranges' positions, then the window, ascending.
      ASSERT_EQ(r.num_kept[h], tokens + p.window) << "head " << h << "; " << ctx;
      std::vector<int32_t> want;
      for (const auto& x2 : rr)
        for (int32_t pos = x2.first; pos < x2.second; ++pos) want.push_back(pos);
      for (int32_t i = 0; i < p.window; ++i) want.push_back(static_cast<int32_t>(m + i));
      const int32_t* kept = &r.kept[h * dbac_kept_capacity(p)];
      ASSERT_EQ(std::vector<int32_t>(kept, kept + r.num_kept[h]), want)
          << "head " << h << "; " << ctx;
    }
    ASSERT_EQ(budget_sum, std::min<int64_t>(p.total_budget, p.num_kv_heads * m)) << ctx;
  }
}

// ---- step 2: the oneTBB path against the reference ----

TEST(DbacCpu, EqualsReferenceExactly) {
  std::mt19937_64 rng(test::test_seed());
  for (int trial = 0; trial < 150; ++trial) {
    DbacParams p;
    p.num_kv_heads = 1 + static_cast<int32_t>(rng() % 6);
    const int64_t m = static_cast<int64_t>(rng() % 3 == 0 ? rng() % 40 : rng() % 3000);
    p.window = static_cast<int32_t>(rng() % 65);
    p.num_tokens = std::max<int64_t>(m + p.window, 1);
    p.eps = static_cast<int32_t>(rng() % 10);
    p.min_density_ratio = 0.25f * static_cast<float>(rng() % 16);
    p.total_budget = static_cast<int64_t>(rng() % (p.num_kv_heads * (m + 1) + 10));
    p.coverage = 0.05f * static_cast<float>(1 + rng() % 20);
    p.floor_fraction = 0.1f * static_cast<float>(rng() % 11);
    const int64_t mm = num_prefix_tokens(p);
    std::vector<float> v = structured_votes(p.num_kv_heads, mm, rng, rng() % 2 == 0);
    if (trial % 10 == 3)  // a head of all-equal votes
      std::fill(v.begin(), v.begin() + mm, 0.375f);
    if (trial % 10 == 7)  // a head of zeros
      std::fill(v.begin(), v.begin() + mm, 0.f);
    const DbacResult want = run_dbac(dbac_ref, p, v);
    const DbacResult got = run_dbac(dbac_cpu, p, v);
    ASSERT_TRUE(same_dbac(p, want, got)) << "trial " << trial;
  }
}

TEST(DbacCpu, EqualsReferenceOnALongPrompt) {
  std::mt19937_64 rng(test::test_seed() + 1);
  DbacParams p;
  p.num_kv_heads = 4;
  p.num_tokens = 32768 + 64;
  p.window = 64;
  p.total_budget = 4 * 1024;
  for (int32_t eps : {0, 4}) {
    p.eps = eps;
    const std::vector<float> v = structured_votes(4, 32768, rng, false);
    ASSERT_TRUE(same_dbac(p, run_dbac(dbac_ref, p, v), run_dbac(dbac_cpu, p, v))) << "eps " << eps;
  }
}

TEST(DbacCpu, SameResultAtOneAndManyThreads) {
  std::mt19937_64 rng(test::test_seed());
  DbacParams p;
  p.num_kv_heads = 8;
  p.num_tokens = 5000;
  p.window = 32;
  p.total_budget = 8 * 300;
  const std::vector<float> v = structured_votes(8, 4968, rng, false);
  DbacResult one;
  {
    tbb::global_control c(tbb::global_control::max_allowed_parallelism, 1);
    one = run_dbac(dbac_cpu, p, v);
  }
  EXPECT_TRUE(same_dbac(p, one, run_dbac(dbac_cpu, p, v)));
}

// ---- both steps: a planted dense region is found ----

TEST(DensityClusterPipeline, PlantedRegionIsSelected) {
  // Keys 40..49 point along the window queries; the rest is noise. The votes concentrate on
  // 40..49 and DBAC's first-ranked cluster covers them.
  ObservationVotesParams vp;
  vp.dtype = DType::kF32;
  vp.num_q_heads = 4;
  vp.num_kv_heads = 2;
  vp.head_dim = 64;
  vp.num_tokens = 300;
  vp.window = 8;
  std::mt19937_64 rng(test::test_seed());
  std::normal_distribution<float> g(0.f, 0.3f);
  std::vector<float> q(4 * 8 * 64), k(2 * 300 * 64);
  for (auto& x : q) x = g(rng);
  for (auto& x : k) x = g(rng);
  for (int i = 0; i < 4 * 8; ++i) q[i * 64] = 8.f;  // scaled score of a planted key: ~8
  for (int h = 0; h < 2; ++h)
    for (int j = 40; j < 50; ++j) k[(h * 300 + j) * 64] = 8.f;
  std::vector<float> votes(2 * 292);
  observation_votes_cpu(vp, q.data(), k.data(), votes.data());
  DbacParams p;
  p.num_kv_heads = 2;
  p.num_tokens = 300;
  p.window = 8;
  p.total_budget = 2 * 24;
  const DbacResult r = run_dbac(dbac_cpu, p, votes);
  for (int32_t h = 0; h < 2; ++h) {
    int covered = 0;
    for (const auto& x : head_ranges(p, r, h))
      for (int32_t pos = x.first; pos < x.second; ++pos) covered += pos >= 40 && pos < 50;
    EXPECT_EQ(covered, 10) << "head " << h << "; " << describe(p);
  }
}

}  // namespace
}  // namespace kvtier::kernels
