// ClusterAttn's prefill-time compression, per KV head, in two steps:
//   1. observation-window votes: softmax attention of the last Wobs prompt queries over all
//      earlier keys, summed over the window and the GQA group, optionally pooled
//      (observation_votes_ref / observation_votes_cpu / launch_observation_votes);
//   2. DBAC, density-based attention clustering: DBSCAN over prompt positions weighted by votes,
//      clusters ranked by vote mass and taken until each head's adaptive budget is met
//      (dbac_ref / dbac_cpu / launch_dbac).
// The _ref functions are the specification (plain loops, double or exact integer sums,
// deterministic). Parameter choices and why: docs/dbac.md.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "memory/core/cuda_fwd.h"
#include "memory/core/dtype.h"
#include "memory/core/host_device.h"

namespace kvtier::kernels {

/// Longest prompt either step accepts: positions fit int32 and every fixed-point vote sum of a
/// head stays below 2^52 with at least 28 fraction bits (docs/dbac.md, "Exactness").
constexpr int64_t kMaxDbacTokens = int64_t{1} << 24;
/// Most KV heads (and query heads) either step accepts.
constexpr int32_t kMaxDbacHeads = 1024;

// ---- step 1: observation-window votes ----

/// Smoothing of each KV head's vote vector, applied after the sums over window and group.
enum class VotePool : uint8_t {
  kNone,  ///< raw votes
  kAvg,   ///< mean over the kernel with zero padding, always divided by the kernel size
          ///< (PyTorch avg_pool1d with count_include_pad, as SnapKV uses it)
  kMax,   ///< max over the in-bounds part of the kernel (max_pool1d)
};

/// Shapes and options of the vote computation. The prompt has num_tokens positions; the
/// observation window is its last `window` positions, and votes are collected for the
/// num_prefix_tokens(p) = num_tokens - window positions before it.
struct ObservationVotesParams {
  DType dtype = DType::kBF16;  ///< element type of q_window and keys (kF32 for tests)
  int32_t num_q_heads = 0;     ///< a multiple of num_kv_heads
  int32_t num_kv_heads = 0;    ///< query head h uses KV head h / (num_q_heads / num_kv_heads)
  int32_t head_dim = 0;        ///< 64, 128 or 256
  int64_t num_tokens = 0;      ///< n: prompt length, window included; 1 <= n <= kMaxDbacTokens
  int32_t window = 0;          ///< Wobs, 1 <= Wobs <= n (Wobs == n: nothing to vote on)
  float scale = 0.f;           ///< softmax scale; 0 means 1/sqrt(head_dim)
  VotePool pool = VotePool::kNone;
  int32_t pool_kernel = 1;  ///< odd kernel size with 'same' padding; 1 leaves votes unchanged
};

/// Positions that receive votes: num_tokens - window.
inline int64_t num_prefix_tokens(const ObservationVotesParams& p) {
  return p.num_tokens - p.window;
}

/// Throws InvalidArgumentError naming the bad field (window > num_tokens included).
void check_observation_votes_params(const ObservationVotesParams& p);

/// The scale actually applied: p.scale, or 1/sqrt(head_dim) when p.scale == 0.
double observation_votes_scale(const ObservationVotesParams& p);

/// Throws InvalidArgumentError naming the tensor, head, row and column of the first NaN or Inf
/// in q_window or keys (host pointers).
void check_observation_votes_inputs(const ObservationVotesParams& p, const void* q_window,
                                    const void* keys);

/// Reference. Host pointers: q_window [num_q_heads, window, head_dim] and keys [num_kv_heads,
/// num_tokens, head_dim] of p.dtype, row-major; votes [num_kv_heads, num_prefix_tokens(p)] fp32.
/// The window query at position t = num_prefix + i attends keys 0..t (causal); its softmax
/// probabilities of keys j < num_prefix are summed over i and over the query heads of the KV
/// head's group, then pooled. Scores, softmax and sums in double. Throws InvalidArgumentError on
/// bad params or on NaN/Inf in the inputs. With window == num_tokens nothing is written.
void observation_votes_ref(const ObservationVotesParams& p, const void* q_window, const void* keys,
                           float* votes);

/// Same contract on oneTBB (KV heads x key tiles in parallel, double sums); equal to the
/// reference up to summation order, and the same for any number of threads.
void observation_votes_cpu(const ObservationVotesParams& p, const void* q_window, const void* keys,
                           float* votes);

#if KVTIER_WITH_CUDA
/// Device workspace launch_observation_votes needs, in bytes: 8 * ceil(n / 64) * num_q_heads *
/// window for the per-tile softmax statistics (32 MiB at n = 128K, 32 query heads, Wobs 64),
/// plus the row statistics and, when pooling, one unpooled vote vector.
size_t observation_votes_workspace_bytes(const ObservationVotesParams& p);

/// Same contract on device pointers, ordered on `stream`, no host synchronization; fp32
/// accumulation. `workspace` holds observation_votes_workspace_bytes(p) bytes. nonfinite_dev [1]
/// may be null; if not, it is set to 1 when q_window or keys hold a NaN or Inf (the votes are then
/// meaningless: launch_dbac reports them), else 0.
void launch_observation_votes(const ObservationVotesParams& p, const void* q_window,
                              const void* keys, float* votes, void* workspace,
                              int32_t* nonfinite_dev, cudaStream_t stream);
#endif

// ---- step 2: DBAC (density-based attention clustering) ----

/// Prompt positions [begin, end).
struct TokenRange {
  int32_t begin = 0;
  int32_t end = 0;
};

/// Shapes and options of DBAC. Votes cover the num_prefix_tokens(p) = num_tokens - window
/// positions before the observation window; the window is always kept and counts against no
/// budget. Defaults and their reasons: docs/dbac.md.
struct DbacParams {
  int32_t num_kv_heads = 0;  ///< 1 <= num_kv_heads <= kMaxDbacHeads
  int64_t num_tokens = 0;    ///< n: prompt length, window included; 1 <= n <= kMaxDbacTokens
  int32_t window = 0;        ///< Wobs, 0 <= Wobs <= n
  /// Neighbourhood radius in positions (DBSCAN's eps): a position's density is the vote mass of
  /// positions within +-eps; core points at most eps apart share a cluster; a non-core position
  /// within eps of a core point is a border point of the nearest one's cluster. >= 0.
  int32_t eps = 4;
  /// A position is a core point when its density >= min_density_ratio * mean vote * (2 eps + 1)
  /// (DBSCAN's min_pts, relative to the head's mean vote) and > 0. Finite, >= 0.
  float min_density_ratio = 1.f;
  /// Tokens to keep before the window, summed over all KV heads (>= 0; 0 keeps the window only).
  int64_t total_budget = 0;
  /// tau: a head's concentration is the number of its highest-vote positions that cover this
  /// share of its vote mass. In (0, 1].
  float coverage = 0.9f;
  /// Each head's floor is this share of the even split total_budget / num_kv_heads. In [0, 1].
  float floor_fraction = 0.2f;
};

/// Positions that carry votes: num_tokens - window.
inline int64_t num_prefix_tokens(const DbacParams& p) { return p.num_tokens - p.window; }

/// The arrays DBAC writes: host pointers for dbac_ref / dbac_cpu, device pointers for launch_dbac.
/// Nothing is owned. Rows past a head's count are left untouched.
struct DbacOutput {
  /// [num_kv_heads, dbac_range_capacity(p)]: the first num_ranges[h] entries of row h are the
  /// selected ranges of head h, disjoint and sorted by begin.
  TokenRange* ranges = nullptr;
  int32_t* num_ranges = nullptr;     ///< [num_kv_heads]
  int32_t* num_tokens = nullptr;     ///< [num_kv_heads] tokens in the ranges, <= head_budget[h]
  int32_t* head_budget = nullptr;    ///< [num_kv_heads] the split of total_budget
  int32_t* concentration = nullptr;  ///< optional [num_kv_heads] (see DbacParams::coverage)
  /// Optional [num_kv_heads, dbac_kept_capacity(p)]: the first num_kept[h] entries of row h are
  /// the positions head h keeps, ascending: its ranges' positions, then the window's.
  int32_t* kept_positions = nullptr;
  int32_t* num_kept = nullptr;  ///< [num_kv_heads], required with kept_positions
};

/// Throws InvalidArgumentError naming the bad field.
void check_dbac_params(const DbacParams& p);

/// Throws InvalidArgumentError naming the first required pointer that is null (ranges,
/// num_ranges, num_tokens, head_budget; num_kept when kept_positions is set).
void check_dbac_output(const DbacOutput& out);

/// Throws InvalidArgumentError naming head and position of the first NaN, Inf or negative vote
/// (votes: host [num_kv_heads, num_prefix_tokens(p)]).
void check_dbac_votes(const DbacParams& p, const float* votes);

/// Row stride of DbacOutput::ranges: the most ranges a head can get, min(max clusters,
/// min(total_budget, num_prefix)), where max clusters = ceil(num_prefix / (eps + 1)).
int64_t dbac_range_capacity(const DbacParams& p);

/// Row stride of DbacOutput::kept_positions: min(total_budget, num_prefix) + window.
int64_t dbac_kept_capacity(const DbacParams& p);

/// Each head's budget floor: min(floor(floor_fraction * total_budget / num_kv_heads), num_prefix).
int64_t dbac_budget_floor(const DbacParams& p);

/// The per-head budget split of DBAC, given the heads' concentrations ([num_kv_heads], >= 0).
/// Budgets sum to min(total_budget, num_kv_heads * num_prefix); each is in [floor, num_prefix].
/// The rest above the floors goes in proportion to concentration (largest remainders, ties to the
/// lower head); a head that would pass num_prefix is capped and its excess shared by the others;
/// when no head that can still grow has a concentration > 0, those heads share equally.
void dbac_split_budgets_ref(const DbacParams& p, const int32_t* concentration,
                            int32_t* head_budget);

/// Reference DBAC. votes: host [num_kv_heads, num_prefix_tokens(p)] fp32, finite and >= 0 (else
/// InvalidArgumentError naming the first bad one). Per head: votes to fixed point, concentration,
/// then the budget split over heads, then core points, clusters (with border points), ranking by
/// mass, selection until the head's budget with the first cluster that does not fit truncated to
/// its densest window of the remaining length (ties: leftmost); nothing after it is taken.
/// The exact rules: docs/dbac.md.
void dbac_ref(const DbacParams& p, const float* votes, const DbacOutput& out);

/// Same contract on oneTBB (heads in parallel; prefix sums and radix selection instead of the
/// reference's sorts). Bitwise equal to the reference: all decisions are made on exact integers.
void dbac_cpu(const DbacParams& p, const float* votes, const DbacOutput& out);

/// For launch_dbac's invalid_vote_dev: throws InvalidArgumentError naming the head, position and
/// kind (NaN, Inf, negative) encoded in `invalid_vote` unless it is -1.
void throw_if_invalid_vote(const DbacParams& p, int64_t invalid_vote);

#if KVTIER_WITH_CUDA
/// Device workspace launch_dbac needs, in bytes (about 8 (n + 1) + 28 max clusters bytes per
/// head).
size_t dbac_workspace_bytes(const DbacParams& p);

/// Same contract and results (bitwise) as dbac_ref on device pointers, ordered on `stream`, no
/// host synchronization. `workspace` holds dbac_workspace_bytes(p) bytes. invalid_vote_dev [1]
/// may be null; if not, it is set to -1, or to 4 * (h * num_prefix + i) + kind for the first bad
/// vote (kind 0 NaN, 1 Inf, 2 negative; then the outputs are meaningless): pass its value to
/// throw_if_invalid_vote().
void launch_dbac(const DbacParams& p, const float* votes, const DbacOutput& out, void* workspace,
                 int64_t* invalid_vote_dev, cudaStream_t stream);
#endif

// ---- internals shared by the backends (not API): one definition on host and device ----

namespace detail {

/// -1 for a valid vote, else 0 NaN, 1 Inf, 2 negative.
KVTIER_HOST_DEVICE inline int dbac_vote_defect(float v) {
  if (v != v) return 0;
  if (v == INFINITY || v == -INFINITY) return 1;
  return v < 0.f ? 2 : -1;
}

/// Fraction bits of the fixed-point votes of a head of m positions: 52 - ceil(log2 m), so every
/// sum of a head's fixed-point votes is below 2^52 (exact in int64 and in double).
KVTIER_HOST_DEVICE inline int dbac_quant_bits(int64_t m) {
  int l = 0;
  while ((int64_t{1} << l) < m) ++l;
  return 52 - l;
}

/// Exponent s with the head's largest vote times 2^s in [2^(bits-1), 2^bits).
KVTIER_HOST_DEVICE inline int dbac_quant_shift(float max_vote, int64_t m) {
  if (!(max_vote > 0.f)) return 0;
  int e = 0;
  frexpf(max_vote, &e);  // max_vote = f * 2^e, f in [0.5, 1)
  return dbac_quant_bits(m) - e;
}

/// Fixed-point vote: floor(v * 2^shift). A float times a power of two is exact in double and the
/// conversion truncates, so host and device agree bit for bit. Invalid votes count as 0.
KVTIER_HOST_DEVICE inline int64_t dbac_quantize(float v, int shift) {
  if (dbac_vote_defect(v) >= 0) return 0;
  return static_cast<int64_t>(ldexp(static_cast<double>(v), shift));
}

/// Smallest density of a core point, in fixed point: ceil(total / m * (2 eps + 1) * ratio),
/// evaluated in this order in double (no fused operations, so host and device agree).
KVTIER_HOST_DEVICE inline int64_t dbac_core_threshold(int64_t total, int64_t m, int32_t eps,
                                                      float ratio) {
  const double mean = static_cast<double>(total) / static_cast<double>(m);
  const double t = mean * static_cast<double>(2 * int64_t{eps} + 1) * static_cast<double>(ratio);
  if (t >= 4.0e18) return INT64_MAX;
  return static_cast<int64_t>(ceil(t));
}

/// Fixed-point vote mass a head's top positions must reach: ceil(coverage * total), in
/// [1, total] for total > 0.
KVTIER_HOST_DEVICE inline int64_t dbac_coverage_target(int64_t total, float coverage) {
  const int64_t t =
      static_cast<int64_t>(ceil(static_cast<double>(coverage) * static_cast<double>(total)));
  return t < 1 ? 1 : (t > total ? total : t);
}

/// Weight of head h in a round of the budget split: 0 once it holds m tokens.
KVTIER_HOST_DEVICE inline int64_t dbac_budget_weight(int64_t budget, int64_t m, int32_t conc,
                                                     bool any_weight) {
  if (budget >= m) return 0;
  return any_weight ? static_cast<int64_t>(conc) : 1;
}

/// The split documented at dbac_split_budgets_ref. work: [num_heads] scratch. Products stay below
/// 2^58 for num_heads <= kMaxDbacHeads and m <= kMaxDbacTokens.
KVTIER_HOST_DEVICE inline void dbac_split_budgets(int32_t num_heads, int64_t m,
                                                  int64_t total_budget, int64_t floor_tokens,
                                                  const int32_t* concentration, int64_t* work,
                                                  int32_t* head_budget) {
  const int64_t cap = static_cast<int64_t>(num_heads) * m;
  const int64_t total = total_budget < cap ? total_budget : cap;
  for (int32_t h = 0; h < num_heads; ++h) work[h] = floor_tokens;
  int64_t rest = total - static_cast<int64_t>(num_heads) * floor_tokens;
  while (rest > 0) {
    bool any_weight = false;
    for (int32_t h = 0; h < num_heads; ++h) any_weight |= work[h] < m && concentration[h] > 0;
    int64_t wsum = 0;
    for (int32_t h = 0; h < num_heads; ++h)
      wsum += dbac_budget_weight(work[h], m, concentration[h], any_weight);
    // Cap every head whose proportional share reaches its room; then split again.
    const int64_t rest0 = rest;
    bool capped = false;
    for (int32_t h = 0; h < num_heads; ++h) {
      const int64_t w = dbac_budget_weight(work[h], m, concentration[h], any_weight);
      if (w > 0 && rest0 * w >= (m - work[h]) * wsum) {
        rest -= m - work[h];
        work[h] = m;
        capped = true;
      }
    }
    if (capped) continue;
    // No head reaches m: floor(rest * w / wsum) each, then one more to the `left` heads with the
    // largest remainders (ties to the lower head). Each share + 1 still fits its room.
    int64_t left = rest;
    for (int32_t h = 0; h < num_heads; ++h)
      left -= rest * dbac_budget_weight(work[h], m, concentration[h], any_weight) / wsum;
    for (int32_t h = 0; h < num_heads; ++h) {
      const int64_t w = dbac_budget_weight(work[h], m, concentration[h], any_weight);
      int64_t add = rest * w / wsum;
      const int64_t rem = rest * w % wsum;
      if (left > 0 && rem > 0) {
        int64_t rank = 0;
        for (int32_t g = 0; g < num_heads; ++g) {
          const int64_t rg =
              rest * dbac_budget_weight(work[g], m, concentration[g], any_weight) % wsum;
          rank += rg > rem || (rg == rem && g < h);
        }
        add += rank < left;
      }
      head_budget[h] = static_cast<int32_t>(work[h] + add);
    }
    return;
  }
  for (int32_t h = 0; h < num_heads; ++h) head_budget[h] = static_cast<int32_t>(work[h]);
}

}  // namespace detail

}  // namespace kvtier::kernels
