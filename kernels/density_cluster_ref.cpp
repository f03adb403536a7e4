// Reference of ClusterAttn's prefill compression: observation-window votes (double softmax over
// plain loops) and DBAC (direct window sums, nearest-core labels, sorts). The specification the
// oneTBB and CUDA versions are tested against; parameter validation shared by all backends.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/density_cluster.h"
#include "memory/core/check.h"
#include "memory/core/half.h"

namespace kvtier::kernels {

namespace {

std::string invalid_vote_message(int64_t head, int64_t pos, int kind) {
  static const char* const kKinds[] = {"NaN", "Inf", "negative"};
  return kvtier::detail::str_cat("DBAC votes[kv_head ", head, ", position ", pos, "] is ",
                                 kKinds[kind], " (votes must be finite and >= 0)");
}

/// Pools one head's raw votes (double) into `out` (float), as VotePool documents.
void pool_votes_ref(const ObservationVotesParams& p, const double* raw, int64_t m, float* out) {
  const int64_t r = p.pool_kernel / 2;
  for (int64_t j = 0; j < m; ++j) {
    if (p.pool == VotePool::kNone || p.pool_kernel == 1) {
      out[j] = static_cast<float>(raw[j]);
    } else if (p.pool == VotePool::kAvg) {
      double s = 0;
      for (int64_t d = -r; d <= r; ++d)
        if (j + d >= 0 && j + d < m) s += raw[j + d];
      out[j] = static_cast<float>(s / p.pool_kernel);
    } else {
      double s = -std::numeric_limits<double>::infinity();
      for (int64_t d = -r; d <= r; ++d)
        if (j + d >= 0 && j + d < m) s = std::max(s, raw[j + d]);
      out[j] = static_cast<float>(s);
    }
  }
}

}  // namespace

// ---- step 1: observation-window votes ----

void check_observation_votes_params(const ObservationVotesParams& p) {
  KVTIER_CHECK(p.dtype == DType::kF16 || p.dtype == DType::kBF16 || p.dtype == DType::kF32,
               "votes dtype ", static_cast<int>(p.dtype), " is not fp16, bf16 or fp32");
  KVTIER_CHECK(p.num_kv_heads >= 1 && p.num_kv_heads <= kMaxDbacHeads, "num_kv_heads ",
               p.num_kv_heads, " is not in [1, ", kMaxDbacHeads, "]");
  KVTIER_CHECK(p.num_q_heads >= 1 && p.num_q_heads <= kMaxDbacHeads, "num_q_heads ", p.num_q_heads,
               " is not in [1, ", kMaxDbacHeads, "]");
  KVTIER_CHECK(p.num_q_heads % p.num_kv_heads == 0, "num_q_heads ", p.num_q_heads,
               " is not a multiple of num_kv_heads ", p.num_kv_heads);
  KVTIER_CHECK(p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256, "votes head_dim ",
               p.head_dim, " is not supported (supported: 64, 128, 256)");
  KVTIER_CHECK(p.num_tokens >= 1 && p.num_tokens <= kMaxDbacTokens, "num_tokens ", p.num_tokens,
               " is not in [1, ", kMaxDbacTokens, "]");
  KVTIER_CHECK(p.window >= 1, "window (Wobs) must be >= 1, got ", p.window);
  KVTIER_CHECK(p.window <= p.num_tokens, "window (Wobs) ", p.window, " exceeds num_tokens ",
               p.num_tokens, ": the observation window is the last Wobs tokens of the prompt");
  KVTIER_CHECK(std::isfinite(p.scale), "votes scale must be finite, got ", p.scale);
  KVTIER_CHECK(p.pool == VotePool::kNone || p.pool == VotePool::kAvg || p.pool == VotePool::kMax,
               "unknown VotePool ", static_cast<int>(p.pool));
  KVTIER_CHECK(p.pool_kernel >= 1 && p.pool_kernel % 2 == 1, "pool_kernel ", p.pool_kernel,
               " must be odd and >= 1 ('same' padding)");
}

double observation_votes_scale(const ObservationVotesParams& p) {
  return p.scale != 0.f ? static_cast<double>(p.scale)
                        : 1.0 / std::sqrt(static_cast<double>(p.head_dim));
}

void check_observation_votes_inputs(const ObservationVotesParams& p, const void* q_window,
                                    const void* keys) {
  const int64_t d = p.head_dim;
  for (int64_t h = 0; h < p.num_q_heads; ++h)
    for (int64_t i = 0; i < p.window; ++i)
      for (int64_t c = 0; c < d; ++c) {
        const float v =
            load_as_float(q_window, p.dtype, static_cast<size_t>((h * p.window + i) * d + c));
        KVTIER_CHECK(std::isfinite(v), "q_window[q_head ", h, ", row ", i, ", dim ", c, "] is ",
                     std::isnan(v) ? "NaN" : "Inf");
      }
  for (int64_t h = 0; h < p.num_kv_heads; ++h)
    for (int64_t j = 0; j < p.num_tokens; ++j)
      for (int64_t c = 0; c < d; ++c) {
        const float v =
            load_as_float(keys, p.dtype, static_cast<size_t>((h * p.num_tokens + j) * d + c));
        KVTIER_CHECK(std::isfinite(v), "keys[kv_head ", h, ", token ", j, ", dim ", c, "] is ",
                     std::isnan(v) ? "NaN" : "Inf");
      }
}

void observation_votes_ref(const ObservationVotesParams& p, const void* q_window, const void* keys,
                           float* votes) {
  check_observation_votes_params(p);
  const int64_t n = p.num_tokens, m = num_prefix_tokens(p), d = p.head_dim;
  KVTIER_CHECK(q_window && keys && (votes || m == 0), "observation votes: null pointer argument");
  check_observation_votes_inputs(p, q_window, keys);
  if (m == 0) return;
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  const double scale = observation_votes_scale(p);
  std::vector<double> raw(static_cast<size_t>(p.num_kv_heads * m), 0.0), s(n);
  for (int64_t h = 0; h < p.num_q_heads; ++h) {
    const int64_t g = h / group;
    for (int64_t i = 0; i < p.window; ++i) {
      const int64_t t = m + i;  // the query's position; it attends keys 0..t
      const size_t q0 = static_cast<size_t>((h * p.window + i) * d);
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j <= t; ++j) {
        const size_t k0 = static_cast<size_t>((g * n + j) * d);
        double dot = 0;
        for (int64_t c = 0; c < d; ++c)
          dot += static_cast<double>(load_as_float(q_window, p.dtype, q0 + c)) *
                 static_cast<double>(load_as_float(keys, p.dtype, k0 + c));
        s[j] = scale * dot;
        mx = std::max(mx, s[j]);
      }
      double l = 0;
      for (int64_t j = 0; j <= t; ++j) l += std::exp(s[j] - mx);
      for (int64_t j = 0; j < m; ++j) raw[g * m + j] += std::exp(s[j] - mx) / l;
    }
  }
  for (int64_t g = 0; g < p.num_kv_heads; ++g) pool_votes_ref(p, &raw[g * m], m, votes + g * m);
}

// ---- step 2: DBAC ----

void check_dbac_params(const DbacParams& p) {
  KVTIER_CHECK(p.num_kv_heads >= 1 && p.num_kv_heads <= kMaxDbacHeads, "num_kv_heads ",
               p.num_kv_heads, " is not in [1, ", kMaxDbacHeads, "]");
  KVTIER_CHECK(p.num_tokens >= 1 && p.num_tokens <= kMaxDbacTokens, "num_tokens ", p.num_tokens,
               " is not in [1, ", kMaxDbacTokens, "]");
  KVTIER_CHECK(p.window >= 0, "window (Wobs) must be >= 0, got ", p.window);
  KVTIER_CHECK(p.window <= p.num_tokens, "window (Wobs) ", p.window, " exceeds num_tokens ",
               p.num_tokens, ": the observation window is the last Wobs tokens of the prompt");
  KVTIER_CHECK(p.eps >= 0 && p.eps <= kMaxDbacTokens, "eps ", p.eps, " is not in [0, ",
               kMaxDbacTokens, "]");
  KVTIER_CHECK(std::isfinite(p.min_density_ratio) && p.min_density_ratio >= 0.f,
               "min_density_ratio must be finite and >= 0, got ", p.min_density_ratio);
  KVTIER_CHECK(p.total_budget >= 0, "total_budget must be >= 0, got ", p.total_budget);
  KVTIER_CHECK(p.coverage > 0.f && p.coverage <= 1.f, "coverage (tau) must be in (0, 1], got ",
               p.coverage);
  KVTIER_CHECK(p.floor_fraction >= 0.f && p.floor_fraction <= 1.f,
               "floor_fraction must be in [0, 1], got ", p.floor_fraction);
}

void check_dbac_output(const DbacOutput& out) {
  KVTIER_CHECK(out.ranges != nullptr, "DBAC output ranges is null");
  KVTIER_CHECK(out.num_ranges != nullptr, "DBAC output num_ranges is null");
  KVTIER_CHECK(out.num_tokens != nullptr, "DBAC output num_tokens is null");
  KVTIER_CHECK(out.head_budget != nullptr, "DBAC output head_budget is null");
  KVTIER_CHECK(out.kept_positions == nullptr || out.num_kept != nullptr,
               "DBAC output num_kept is null but kept_positions is set");
}

void check_dbac_votes(const DbacParams& p, const float* votes) {
  const int64_t m = num_prefix_tokens(p);
  KVTIER_CHECK(votes != nullptr || m == 0, "DBAC votes is null");
  for (int64_t h = 0; h < p.num_kv_heads; ++h)
    for (int64_t i = 0; i < m; ++i) {
      const int kind = detail::dbac_vote_defect(votes[h * m + i]);
      if (kind >= 0) throw InvalidArgumentError(invalid_vote_message(h, i, kind));
    }
}

void throw_if_invalid_vote(const DbacParams& p, int64_t invalid_vote) {
  if (invalid_vote < 0) return;
  const int64_t m = std::max<int64_t>(num_prefix_tokens(p), 1);
  const int64_t flat = invalid_vote / 4;
  throw InvalidArgumentError(
      invalid_vote_message(flat / m, flat % m, static_cast<int>(invalid_vote % 4)));
}

int64_t dbac_range_capacity(const DbacParams& p) {
  const int64_t m = num_prefix_tokens(p);
  if (m <= 0) return 0;
  const int64_t max_clusters = (m - 1) / (int64_t{p.eps} + 1) + 1;
  return std::min(max_clusters, std::min(p.total_budget, m));
}

int64_t dbac_kept_capacity(const DbacParams& p) {
  return std::min(p.total_budget, num_prefix_tokens(p)) + p.window;
}

int64_t dbac_budget_floor(const DbacParams& p) {
  const double even = static_cast<double>(p.total_budget) / static_cast<double>(p.num_kv_heads);
  const int64_t f = static_cast<int64_t>(std::floor(static_cast<double>(p.floor_fraction) * even));
  return std::min(f, num_prefix_tokens(p));
}

void dbac_split_budgets_ref(const DbacParams& p, const int32_t* concentration,
                            int32_t* head_budget) {
  check_dbac_params(p);
  KVTIER_CHECK(concentration && head_budget, "dbac_split_budgets_ref: null pointer argument");
  for (int32_t h = 0; h < p.num_kv_heads; ++h)
    KVTIER_CHECK(concentration[h] >= 0, "concentration[", h, "] is negative: ", concentration[h]);
  std::vector<int64_t> work(p.num_kv_heads);
  detail::dbac_split_budgets(p.num_kv_heads, num_prefix_tokens(p), p.total_budget,
                             dbac_budget_floor(p), concentration, work.data(), head_budget);
}

void dbac_ref(const DbacParams& p, const float* votes, const DbacOutput& out) {
  check_dbac_params(p);
  check_dbac_output(out);
  check_dbac_votes(p, votes);
  const int32_t num_heads = p.num_kv_heads;
  const int64_t m = num_prefix_tokens(p), eps = p.eps;
  // Votes to fixed point (exact sums from here on), totals and concentrations.
  std::vector<std::vector<int64_t>> q(num_heads, std::vector<int64_t>(m));
  std::vector<int64_t> total(num_heads, 0);
  std::vector<int32_t> conc(num_heads, 0);
  for (int32_t h = 0; h < num_heads; ++h) {
    float mx = 0.f;
    for (int64_t i = 0; i < m; ++i) mx = std::max(mx, votes[h * m + i]);
    const int shift = detail::dbac_quant_shift(mx, m);
    for (int64_t i = 0; i < m; ++i) {
      q[h][i] = detail::dbac_quantize(votes[h * m + i], shift);
      total[h] += q[h][i];
    }
    if (total[h] > 0) {
      std::vector<int64_t> sorted = q[h];
      std::sort(sorted.begin(), sorted.end(), std::greater<int64_t>());
      const int64_t target = detail::dbac_coverage_target(total[h], p.coverage);
      int64_t acc = 0, k = 0;
      while (acc < target) acc += sorted[k++];
      conc[h] = static_cast<int32_t>(k);
    }
  }
  std::vector<int32_t> budget(num_heads);
  dbac_split_budgets_ref(p, conc.data(), budget.data());

  const int64_t range_cap = dbac_range_capacity(p), kept_cap = dbac_kept_capacity(p);
  for (int32_t h = 0; h < num_heads; ++h) {
    const std::vector<int64_t>& v = q[h];
    // Core points: density (vote mass within +-eps) >= threshold and > 0.
    const int64_t thr =
        total[h] > 0 ? detail::dbac_core_threshold(total[h], m, p.eps, p.min_density_ratio) : 0;
    std::vector<char> core(m, 0);
    for (int64_t i = 0; i < m; ++i) {
      int64_t dens = 0;
      for (int64_t j = std::max<int64_t>(0, i - eps); j <= std::min(m - 1, i + eps); ++j)
        dens += v[j];
      core[i] = dens > 0 && dens >= thr;
    }
    // Clusters: runs of core points whose consecutive members are at most eps apart.
    std::vector<int64_t> label(m, -1);
    int64_t num_clusters = 0, last_core = -1;
    for (int64_t i = 0; i < m; ++i) {
      if (!core[i]) continue;
      if (last_core < 0 || i - last_core > eps) ++num_clusters;
      label[i] = num_clusters - 1;
      last_core = i;
    }
    // Border points: the cluster of the nearest core point within eps (ties to the left one).
    for (int64_t i = 0; i < m; ++i) {
      if (core[i]) continue;
      for (int64_t d = 1; d <= eps; ++d) {
        if (i - d >= 0 && core[i - d]) {
          label[i] = label[i - d];
          break;
        }
        if (i + d < m && core[i + d]) {
          label[i] = label[i + d];
          break;
        }
      }
    }
    struct Cluster {
      int64_t begin = -1, end = -1, mass = 0;
    };
    std::vector<Cluster> cl(num_clusters);
    for (int64_t i = 0; i < m; ++i) {
      if (label[i] < 0) continue;
      Cluster& c = cl[label[i]];
      if (c.begin < 0) c.begin = i;
      c.end = i + 1;
      c.mass += v[i];
    }
    // Rank by mass (ties: lower position first), take while the budget allows, truncate the
    // first one that does not fit to its densest window of the remaining length, then stop.
    std::vector<int64_t> order(num_clusters);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return cl[a].mass > cl[b].mass; });
    std::vector<TokenRange> chosen(num_clusters);  // end == begin: not taken
    int64_t used = 0;
    for (int64_t c : order) {
      const int64_t size = cl[c].end - cl[c].begin;
      if (used + size <= budget[h]) {
        chosen[c] = {static_cast<int32_t>(cl[c].begin), static_cast<int32_t>(cl[c].end)};
        used += size;
        continue;
      }
      const int64_t r = budget[h] - used;
      if (r > 0) {
        int64_t best = -1, best_s = cl[c].begin;
        for (int64_t s = cl[c].begin; s + r <= cl[c].end; ++s) {
          int64_t mass = 0;
          for (int64_t j = s; j < s + r; ++j) mass += v[j];
          if (mass > best) best = mass, best_s = s;
        }
        chosen[c] = {static_cast<int32_t>(best_s), static_cast<int32_t>(best_s + r)};
        used += r;
      }
      break;
    }
    // Outputs, in position order (cluster ids are in position order).
    int32_t nr = 0, nt = 0;
    for (int64_t c = 0; c < num_clusters; ++c) {
      if (chosen[c].end == chosen[c].begin) continue;
      out.ranges[h * range_cap + nr++] = chosen[c];
      nt += chosen[c].end - chosen[c].begin;
    }
    out.num_ranges[h] = nr;
    out.num_tokens[h] = nt;
    out.head_budget[h] = budget[h];
    if (out.concentration) out.concentration[h] = conc[h];
    if (out.kept_positions) {
      int32_t* kept = out.kept_positions + h * kept_cap;
      int64_t k = 0;
      for (int32_t r = 0; r < nr; ++r)
        for (int32_t pos = out.ranges[h * range_cap + r].begin;
             pos < out.ranges[h * range_cap + r].end; ++pos)
          kept[k++] = pos;
      for (int64_t pos = m; pos < p.num_tokens; ++pos) kept[k++] = static_cast<int32_t>(pos);
      out.num_kept[h] = static_cast<int32_t>(k);
    }
  }
}

}  // namespace kvtier::kernels
