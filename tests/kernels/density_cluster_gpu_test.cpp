// GPU observation votes and DBAC against the references: votes for fp16/bf16 inputs within
// rtol = atol = 1e-3 / 1e-2 relative to the largest vote, at awkward prompt lengths and one long
// one; DBAC bit-exact on identical votes (ranges, budgets, concentrations, kept positions); the
// error words for non-finite inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/density_cluster.h"
#include "memory/core/cuda_raii.h"
#include "memory/core/half.h"
#include "memory/core/status.h"
#include "tests/common/test_util.h"

namespace kvtier::kernels {
namespace {

// Helpers for the device runs; without CUDA every test skips (or fails under
// KVTIER_REQUIRE_GPU=1) before using them.
#if KVTIER_WITH_CUDA
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

/// Random q_window and keys (normal, unit variance) as p.dtype bytes.
std::vector<std::byte> random_tensor(size_t count, DType dtype, std::mt19937_64& rng) {
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<std::byte> out(count * dtype_size(dtype));
  for (size_t i = 0; i < count; ++i) store_from_float(out.data(), dtype, i, g(rng));
  return out;
}

struct DbacResult {
  std::vector<TokenRange> ranges;
  std::vector<int32_t> num_ranges, num_tokens, head_budget, concentration, kept, num_kept;
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

DbacResult dbac_on_host(const DbacParams& p, const std::vector<float>& votes) {
  DbacResult r = make_result(p);
  dbac_ref(p, votes.data(),
           {r.ranges.data(), r.num_ranges.data(), r.num_tokens.data(), r.head_budget.data(),
            r.concentration.data(), r.kept.data(), r.num_kept.data()});
  return r;
}

/// Exact equality of every output DBAC defines; the message names the first difference.
::testing::AssertionResult same_dbac(const DbacParams& p, const DbacResult& a,
                                     const DbacResult& b) {
  const int64_t rc = dbac_range_capacity(p), kc = dbac_kept_capacity(p);
  for (int32_t h = 0; h < p.num_kv_heads; ++h) {
    if (a.head_budget[h] != b.head_budget[h] || a.concentration[h] != b.concentration[h] ||
        a.num_ranges[h] != b.num_ranges[h] || a.num_tokens[h] != b.num_tokens[h] ||
        a.num_kept[h] != b.num_kept[h])
      return ::testing::AssertionFailure()
             << "head " << h << " (want/got): budget " << a.head_budget[h] << "/"
             << b.head_budget[h] << " concentration " << a.concentration[h] << "/"
             << b.concentration[h] << " ranges " << a.num_ranges[h] << "/" << b.num_ranges[h]
             << " tokens " << a.num_tokens[h] << "/" << b.num_tokens[h] << " kept " << a.num_kept[h]
             << "/" << b.num_kept[h] << "; " << describe(p);
    for (int32_t i = 0; i < a.num_ranges[h]; ++i) {
      const TokenRange x = a.ranges[h * rc + i], y = b.ranges[h * rc + i];
      if (x.begin != y.begin || x.end != y.end)
        return ::testing::AssertionFailure()
               << "head " << h << ": first differing range " << i << " [" << x.begin << ", "
               << x.end << ") vs [" << y.begin << ", " << y.end << "); " << describe(p);
    }
    for (int32_t i = 0; i < a.num_kept[h]; ++i)
      if (a.kept[h * kc + i] != b.kept[h * kc + i])
        return ::testing::AssertionFailure()
               << "head " << h << ": first differing kept index " << i << "; " << describe(p);
  }
  return ::testing::AssertionSuccess();
}

/// Votes with structure: a low floor, bursts of varied width and height, sometimes a sink at 0;
/// `integer` rounds them to small integers (many equal masses: ties in the ranking).
std::vector<float> structured_votes(int32_t heads, int64_t m, std::mt19937_64& rng, bool integer) {
  std::vector<float> v(static_cast<size_t>(heads * m));
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::exponential_distribution<float> e(1.f);
  for (int32_t h = 0; h < heads; ++h) {
    float* x = &v[h * m];
    for (int64_t i = 0; i < m; ++i) x[i] = 0.05f * u(rng);
    const int bursts = 1 + static_cast<int>(rng() % 8 + m / 500);
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

/// Votes computed on the device (copied back); nonfinite receives the kernel's flag.
std::vector<float> votes_on_device(const ObservationVotesParams& p, const std::vector<std::byte>& q,
                                   const std::vector<std::byte>& k, int32_t* nonfinite) {
  cuda::Stream s(0);
  const size_t nv = static_cast<size_t>(p.num_kv_heads * num_prefix_tokens(p));
  cuda::DeviceAllocation dq(q.size(), 0), dk(k.size(), 0),
      ws(std::max<size_t>(observation_votes_workspace_bytes(p), 1), 0);
  cuda::DeviceBuffer<float> dv(std::max<size_t>(nv, 1), 0);
  cuda::DeviceBuffer<int32_t> flag(1, 0);
  cuda::memcpy_async(dq.get(), q.data(), q.size(), s.get());
  cuda::memcpy_async(dk.get(), k.data(), k.size(), s.get());
  launch_observation_votes(p, dq.get(), dk.get(), dv.get(), ws.get(), flag.get(), s.get());
  std::vector<float> out(nv);
  if (nv > 0) cuda::memcpy_async(out.data(), dv.get(), nv * 4, s.get());
  cuda::memcpy_async(nonfinite, flag.get(), 4, s.get());
  s.synchronize();
  return out;
}

/// DBAC on the device on `votes` (uploaded); invalid receives the error word.
DbacResult dbac_on_device(const DbacParams& p, const std::vector<float>& votes,
                          int64_t* invalid = nullptr) {
  cuda::Stream s(0);
  DbacResult r = make_result(p);
  const size_t h = static_cast<size_t>(p.num_kv_heads);
  cuda::DeviceBuffer<float> dv(std::max<size_t>(votes.size(), 1), 0);
  cuda::DeviceBuffer<TokenRange> ranges(r.ranges.size(), 0);
  cuda::DeviceBuffer<int32_t> nr(h, 0), nt(h, 0), hb(h, 0), conc(h, 0), kept(r.kept.size(), 0),
      nk(h, 0);
  cuda::DeviceBuffer<int64_t> err(1, 0);
  cuda::DeviceAllocation ws(std::max<size_t>(dbac_workspace_bytes(p), 1), 0);
  if (!votes.empty()) cuda::memcpy_async(dv.get(), votes.data(), votes.size() * 4, s.get());
  // Untouched rows must stay untouched: start from the same sentinels as the host result.
  cuda::memcpy_async(ranges.get(), r.ranges.data(), ranges.size_bytes(), s.get());
  cuda::memcpy_async(kept.get(), r.kept.data(), kept.size_bytes(), s.get());
  launch_dbac(p, dv.get(),
              {ranges.get(), nr.get(), nt.get(), hb.get(), conc.get(), kept.get(), nk.get()},
              ws.get(), err.get(), s.get());
  cuda::memcpy_async(r.ranges.data(), ranges.get(), ranges.size_bytes(), s.get());
  cuda::memcpy_async(r.num_ranges.data(), nr.get(), h * 4, s.get());
  cuda::memcpy_async(r.num_tokens.data(), nt.get(), h * 4, s.get());
  cuda::memcpy_async(r.head_budget.data(), hb.get(), h * 4, s.get());
  cuda::memcpy_async(r.concentration.data(), conc.get(), h * 4, s.get());
  cuda::memcpy_async(r.kept.data(), kept.get(), kept.size_bytes(), s.get());
  cuda::memcpy_async(r.num_kept.data(), nk.get(), h * 4, s.get());
  int64_t word = 0;
  cuda::memcpy_async(&word, err.get(), 8, s.get());
  s.synchronize();
  if (invalid) *invalid = word;
  return r;
}
#endif

// ---- observation votes ----

struct VoteCase {
  int64_t n;
  int32_t window, q_heads, kv_heads, head_dim;
  VotePool pool;
  int32_t kernel;
};

/// Compares GPU votes with the reference: |got - want| <= tol * (max vote + |want|).
void check_votes_case(const ObservationVotesParams& p, double tol) {
#if KVTIER_WITH_CUDA
  std::mt19937_64 rng(test::test_seed() + static_cast<uint64_t>(p.num_tokens));
  const std::vector<std::byte> q =
      random_tensor(static_cast<size_t>(p.num_q_heads) * p.window * p.head_dim, p.dtype, rng);
  const std::vector<std::byte> k =
      random_tensor(static_cast<size_t>(p.num_kv_heads) * p.num_tokens * p.head_dim, p.dtype, rng);
  std::vector<float> want(static_cast<size_t>(p.num_kv_heads * num_prefix_tokens(p)));
  observation_votes_ref(p, q.data(), k.data(), want.data());
  int32_t nonfinite = -1;
  const std::vector<float> got = votes_on_device(p, q, k, &nonfinite);
  EXPECT_EQ(nonfinite, 0) << describe(p);
  ASSERT_EQ(got.size(), want.size());
  double max_vote = 0, max_err = 0;
  for (float w : want) max_vote = std::max(max_vote, static_cast<double>(w));
  int64_t first_bad = -1;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    max_err = std::max(max_err, err);
    if (first_bad < 0 && !(err <= tol * (max_vote + std::abs(want[i]))))
      first_bad = static_cast<int64_t>(i);
  }
  EXPECT_EQ(first_bad, -1) << "first bad vote " << first_bad << " (got "
                           << (first_bad >= 0 ? got[first_bad] : 0.f) << ", want "
                           << (first_bad >= 0 ? want[first_bad] : 0.f) << "), max abs error "
                           << max_err << ", max vote " << max_vote << "; " << describe(p);
#else
  (void)p, (void)tol;
  FAIL() << "built without CUDA";
#endif
}

/// How GoogleTest (and so CTest's test names) print a case.
void PrintTo(const VoteCase& c, std::ostream* os) {
  *os << "n " << c.n << " window " << c.window << " q_heads " << c.q_heads << " kv_heads "
      << c.kv_heads << " head_dim " << c.head_dim << " pool " << static_cast<int>(c.pool) << "/"
      << c.kernel;
}

/// "bf16_n4099_w64_q4_kv2_d64_max3": the test name of a case.
std::string vote_case_name(const ::testing::TestParamInfo<std::tuple<DType, VoteCase>>& info) {
  const auto& [dtype, c] = info.param;
  static const char* const kPools[] = {"none", "avg", "max"};
  return std::string(dtype_name(dtype)) + "_n" + std::to_string(c.n) + "_w" +
         std::to_string(c.window) + "_q" + std::to_string(c.q_heads) + "_kv" +
         std::to_string(c.kv_heads) + "_d" + std::to_string(c.head_dim) + "_" +
         kPools[static_cast<int>(c.pool)] + std::to_string(c.kernel);
}

class ObservationVotesGpu : public ::testing::TestWithParam<std::tuple<DType, VoteCase>> {};

TEST_P(ObservationVotesGpu, MatchesReference) {
  KVTIER_REQUIRE_GPU();
  const auto [dtype, c] = GetParam();
  ObservationVotesParams p;
  p.dtype = dtype;
  p.num_q_heads = c.q_heads;
  p.num_kv_heads = c.kv_heads;
  p.head_dim = c.head_dim;
  p.num_tokens = c.n;
  p.window = c.window;
  p.pool = c.pool;
  p.pool_kernel = c.kernel;
  check_votes_case(p, dtype == DType::kF16 ? 1e-3 : 1e-2);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ObservationVotesGpu,
    ::testing::Combine(::testing::Values(DType::kF16, DType::kBF16),
                       ::testing::Values(VoteCase{1, 1, 4, 2, 64, VotePool::kNone, 1},
                                         VoteCase{2, 1, 4, 2, 64, VotePool::kNone, 1},
                                         VoteCase{17, 16, 8, 2, 128, VotePool::kNone, 1},
                                         VoteCase{17, 1, 2, 1, 256, VotePool::kAvg, 3},
                                         VoteCase{1000, 32, 4, 1, 128, VotePool::kAvg, 5},
                                         VoteCase{1000, 7, 6, 3, 64, VotePool::kNone, 1},
                                         VoteCase{4099, 64, 4, 2, 64, VotePool::kMax, 3},
                                         VoteCase{700, 24, 2, 2, 256, VotePool::kNone, 1})),
    vote_case_name);

TEST(ObservationVotesGpuLong, MatchesReferenceAt32K) {
  KVTIER_REQUIRE_GPU();
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    ObservationVotesParams p;
    p.dtype = dtype;
    p.num_q_heads = 4;
    p.num_kv_heads = 1;
    p.head_dim = 64;
    p.num_tokens = 32768;
    p.window = 16;
    check_votes_case(p, dtype == DType::kF16 ? 1e-3 : 1e-2);
  }
}

TEST(ObservationVotesGpuEdge, Fp32InputsAndTheNonFiniteFlag) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  ObservationVotesParams p;
  p.dtype = DType::kF32;
  p.num_q_heads = 4;
  p.num_kv_heads = 2;
  p.head_dim = 128;
  p.num_tokens = 333;
  p.window = 9;
  check_votes_case(p, 1e-4);
  std::mt19937_64 rng(test::test_seed());
  const std::vector<std::byte> q = random_tensor(4 * 9 * 128, p.dtype, rng);
  std::vector<std::byte> k = random_tensor(2 * 333 * 128, p.dtype, rng);
  store_from_float(k.data(), p.dtype, (1 * 333 + 200) * 128 + 3, std::nanf(""));
  int32_t nonfinite = -1;
  votes_on_device(p, q, k, &nonfinite);
  EXPECT_EQ(nonfinite, 1);
  // The window covering the prompt: nothing to compute, the flag still cleared.
  p.num_tokens = p.window = 9;
  std::vector<std::byte> k9(k.begin(), k.begin() + 2 * 9 * 128 * 4);
  EXPECT_TRUE(votes_on_device(p, q, k9, &nonfinite).empty());
  EXPECT_EQ(nonfinite, 0);
#else
  FAIL() << "built without CUDA";
#endif
}

// ---- DBAC ----

TEST(DbacGpu, EqualsReferenceExactlyOnRandomVotes) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  std::mt19937_64 rng(test::test_seed());
  for (int trial = 0; trial < 60; ++trial) {
    DbacParams p;
    p.num_kv_heads = 1 + static_cast<int32_t>(rng() % 8);
    const int64_t m = static_cast<int64_t>(rng() % 3 == 0 ? rng() % 40 : rng() % 6000);
    p.window = static_cast<int32_t>(rng() % 65);
    p.num_tokens = std::max<int64_t>(m + p.window, 1);
    p.eps = static_cast<int32_t>(rng() % 10);
    p.min_density_ratio = 0.25f * static_cast<float>(rng() % 16);
    p.total_budget = static_cast<int64_t>(rng() % (p.num_kv_heads * (m + 1) + 10));
    p.coverage = 0.05f * static_cast<float>(1 + rng() % 20);
    p.floor_fraction = 0.1f * static_cast<float>(rng() % 11);
    const int64_t mm = num_prefix_tokens(p);
    std::vector<float> v = structured_votes(p.num_kv_heads, mm, rng, rng() % 2 == 0);
    if (trial % 10 == 3) std::fill(v.begin(), v.begin() + mm, 0.375f);  // all-equal head
    if (trial % 10 == 7) std::fill(v.begin(), v.begin() + mm, 0.f);     // all-zero head
    int64_t invalid = 0;
    const DbacResult got = dbac_on_device(p, v, &invalid);
    EXPECT_EQ(invalid, -1) << "trial " << trial;
    ASSERT_TRUE(same_dbac(p, dbac_on_host(p, v), got)) << "trial " << trial;
  }
#else
  FAIL() << "built without CUDA";
#endif
}

TEST(DbacGpu, EqualsReferenceOnEdgeCases) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  std::mt19937_64 rng(test::test_seed() + 5);
  struct Case {
    int32_t heads;
    int64_t n;
    int32_t window, eps;
    int64_t budget;
  };
  for (const Case& c : {Case{2, 1, 1, 4, 10},          // n = 1, the window is the prompt
                        Case{1, 1, 0, 0, 10},          // n = 1, one vote
                        Case{3, 64, 64, 4, 10},        // Wobs == n
                        Case{4, 500, 16, 4, 0},        // budget 0
                        Case{4, 500, 16, 4, 1 << 20},  // budget above the context
                        Case{2, 1000, 0, 0, 300},      // eps 0: single-position clusters
                        Case{2, 1000, 8, 40, 300}}) {  // eps wider than most gaps
    DbacParams p;
    p.num_kv_heads = c.heads;
    p.num_tokens = c.n;
    p.window = c.window;
    p.eps = c.eps;
    p.total_budget = c.budget;
    const std::vector<float> v = structured_votes(c.heads, num_prefix_tokens(p), rng, false);
    EXPECT_TRUE(same_dbac(p, dbac_on_host(p, v), dbac_on_device(p, v)));
  }
#else
  FAIL() << "built without CUDA";
#endif
}

TEST(DbacGpu, EqualsReferenceOnLongPrompts) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  std::mt19937_64 rng(test::test_seed() + 9);
  for (const auto& [heads, m, eps] : {std::tuple<int32_t, int64_t, int32_t>{8, 32768, 4},
                                      std::tuple<int32_t, int64_t, int32_t>{8, 32768, 0},
                                      std::tuple<int32_t, int64_t, int32_t>{2, 131072, 4}}) {
    DbacParams p;
    p.num_kv_heads = heads;
    p.num_tokens = m + 64;
    p.window = 64;
    p.eps = eps;
    p.total_budget = int64_t{heads} * 2048;
    const std::vector<float> v = structured_votes(heads, m, rng, eps == 0);
    EXPECT_TRUE(same_dbac(p, dbac_on_host(p, v), dbac_on_device(p, v))) << "m " << m;
  }
#else
  FAIL() << "built without CUDA";
#endif
}

TEST(DbacGpu, ReportsTheFirstInvalidVote) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  DbacParams p;
  p.num_kv_heads = 3;
  p.num_tokens = 2000;
  p.window = 8;
  p.total_budget = 300;
  const int64_t m = 1992;
  std::vector<float> v(3 * m, 0.5f);
  v[2 * m + 7] = -1.f;
  v[1 * m + 1500] = INFINITY;
  v[1 * m + 5] = std::nanf("");
  int64_t invalid = 0;
  dbac_on_device(p, v, &invalid);
  EXPECT_EQ(invalid, 4 * (1 * m + 5) + 0);
  try {
    throw_if_invalid_vote(p, invalid);
    ADD_FAILURE() << "no error for a NaN vote";
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("votes[kv_head 1, position 5] is NaN"), std::string::npos)
        << e.what();
  }
  v[1 * m + 5] = 0.5f;
  dbac_on_device(p, v, &invalid);
  EXPECT_EQ(invalid, 4 * (1 * m + 1500) + 1);
  v[1 * m + 1500] = 0.5f;
  dbac_on_device(p, v, &invalid);
  EXPECT_EQ(invalid, 4 * (2 * m + 7) + 2);
  v[2 * m + 7] = 0.5f;
  dbac_on_device(p, v, &invalid);
  EXPECT_EQ(invalid, -1);
#else
  FAIL() << "built without CUDA";
#endif
}

TEST(DensityClusterGpu, DeviceVotesThenDeviceDbacEqualsReferenceDbacOnThoseVotes) {
  KVTIER_REQUIRE_GPU();
#if KVTIER_WITH_CUDA
  ObservationVotesParams vp;
  vp.dtype = DType::kBF16;
  vp.num_q_heads = 8;
  vp.num_kv_heads = 2;
  vp.head_dim = 128;
  vp.num_tokens = 4099;
  vp.window = 32;
  std::mt19937_64 rng(test::test_seed());
  const std::vector<std::byte> q = random_tensor(8 * 32 * 128, vp.dtype, rng);
  const std::vector<std::byte> k = random_tensor(2 * 4099 * 128, vp.dtype, rng);
  int32_t nonfinite = -1;
  const std::vector<float> votes = votes_on_device(vp, q, k, &nonfinite);
  ASSERT_EQ(nonfinite, 0);
  DbacParams p;
  p.num_kv_heads = 2;
  p.num_tokens = 4099;
  p.window = 32;
  p.total_budget = 2 * 512;
  EXPECT_TRUE(same_dbac(p, dbac_on_host(p, votes), dbac_on_device(p, votes)));
#else
  FAIL() << "built without CUDA";
#endif
}

}  // namespace
}  // namespace kvtier::kernels
