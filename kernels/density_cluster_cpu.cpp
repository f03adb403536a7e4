// oneTBB path of ClusterAttn's prefill compression. Votes: KV heads x key tiles in parallel, a
// per-tile (max, sum) pass, a fixed-order combine, then a second pass that sums probabilities
// per key, so the result does not depend on the thread count. DBAC: heads in parallel, with the
// algorithm of the CUDA kernels (prefix sums, cluster bounds from neighbouring core points,
// radix selection of the concentration and of the budget cut), all on exact integers.
#include <tbb/blocked_range.h>
#include <tbb/blocked_range2d.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/density_cluster.h"
#include "memory/core/check.h"
#include "memory/core/half.h"

namespace kvtier::kernels {

namespace {

constexpr int64_t kTileKeys = 64;  // keys per task and per score vector

/// Elements [offset, offset + count) of a fp32/fp16/bf16 array as double.
void load_doubles(const void* base, DType t, size_t offset, size_t count, double* out) {
  switch (t) {
    case DType::kF32: {
      const float* x = static_cast<const float*>(base) + offset;
      for (size_t i = 0; i < count; ++i) out[i] = x[i];
      break;
    }
    case DType::kF16: {
      const uint16_t* x = static_cast<const uint16_t*>(base) + offset;
      for (size_t i = 0; i < count; ++i) out[i] = fp16_to_float(x[i]);
      break;
    }
    case DType::kBF16: {
      const uint16_t* x = static_cast<const uint16_t*>(base) + offset;
      for (size_t i = 0; i < count; ++i) out[i] = bf16_to_float(x[i]);
      break;
    }
  }
}

/// Keys [key0, key0 + count) of one KV head, transposed to [head_dim][kTileKeys], zero padded.
void load_key_tile(const ObservationVotesParams& p, const void* keys, int64_t g, int64_t key0,
                   int64_t count, std::vector<double>* row, std::vector<double>* kt) {
  const int64_t d = p.head_dim;
  std::fill(kt->begin(), kt->end(), 0.0);
  for (int64_t j = 0; j < count; ++j) {
    load_doubles(keys, p.dtype, static_cast<size_t>((g * p.num_tokens + key0 + j) * d),
                 static_cast<size_t>(d), row->data());
    for (int64_t c = 0; c < d; ++c) (*kt)[c * kTileKeys + j] = (*row)[c];
  }
}

/// s[j] = scale * dot(q, key j) with the dot summed over dims in order (as the reference does),
/// vectorized across the tile's keys.
void tile_scores(const double* q, const std::vector<double>& kt, int64_t d, double scale,
                 double* s) {
  double acc[kTileKeys] = {};
  for (int64_t c = 0; c < d; ++c) {
    const double qc = q[c];
    const double* k = &kt[c * kTileKeys];
    for (int64_t j = 0; j < kTileKeys; ++j) acc[j] += qc * k[j];
  }
  for (int64_t j = 0; j < kTileKeys; ++j) s[j] = scale * acc[j];
}

struct RadixPick {
  int64_t key = 0;           ///< the largest key v with weight(keys >= v) >= target
  int64_t weight_above = 0;  ///< weight of the items with key > v
  int64_t count_above = 0;   ///< number of items with key > v
};

/// Radix selection by weight, 8 bits per pass from the top: the same digits, bins and choices as
/// the CUDA kernels' block_radix_pick. keys in [0, 2^top_bits); 0 < target <= total weight.
template <typename Item>
RadixPick radix_pick(int64_t n, int top_bits, int64_t target, Item item) {
  RadixPick r;
  int64_t prefix = 0;
  for (int hi = top_bits; hi > 0;) {
    const int lo = hi > 8 ? hi - 8 : 0, width = hi - lo;
    std::array<int64_t, 256> bin_w{}, bin_c{};
    for (int64_t i = 0; i < n; ++i) {
      int64_t k = 0, w = 0;
      item(i, &k, &w);
      if ((k == 0 && w == 0) || (k >> hi) != prefix) continue;
      const int64_t b = (k >> lo) & ((int64_t{1} << width) - 1);
      bin_w[b] += w;
      bin_c[b] += 1;
    }
    int64_t b = (int64_t{1} << width) - 1;
    for (; b > 0; --b) {
      if (r.weight_above + bin_w[b] >= target) break;
      r.weight_above += bin_w[b];
      r.count_above += bin_c[b];
    }
    prefix = (prefix << width) | b;
    hi = lo;
  }
  r.key = prefix;
  return r;
}

}  // namespace

// ---- step 1: observation-window votes ----

void observation_votes_cpu(const ObservationVotesParams& p, const void* q_window, const void* keys,
                           float* votes) {
  check_observation_votes_params(p);
  const int64_t n = p.num_tokens, m = num_prefix_tokens(p), d = p.head_dim, w = p.window;
  KVTIER_CHECK(q_window && keys && (votes || m == 0), "observation votes: null pointer argument");
  check_observation_votes_inputs(p, q_window, keys);
  if (m == 0) return;
  const int64_t num_heads = p.num_kv_heads, rows = int64_t{p.num_q_heads} * w;
  const int64_t rows_per_head = rows / num_heads;  // the group's query heads x window, h-major
  const double scale = observation_votes_scale(p);
  std::vector<double> q(static_cast<size_t>(rows * d));
  load_doubles(q_window, p.dtype, 0, q.size(), q.data());

  // Pass 1: per (key tile, query row) the max and the sum of exp(s - max) over the tile's keys
  // that the row may attend (j <= t).
  const int64_t num_tiles = (n + kTileKeys - 1) / kTileKeys;
  std::vector<double> part_max(static_cast<size_t>(num_tiles * rows)),
      part_sum(static_cast<size_t>(num_tiles * rows));
  tbb::parallel_for(
      tbb::blocked_range2d<int64_t>(0, num_heads, 1, 0, num_tiles, 4),
      [&](const tbb::blocked_range2d<int64_t>& r) {
        std::vector<double> kt(static_cast<size_t>(d * kTileKeys)), row(d), s(kTileKeys);
        for (int64_t g = r.rows().begin(); g < r.rows().end(); ++g)
          for (int64_t tile = r.cols().begin(); tile < r.cols().end(); ++tile) {
            const int64_t key0 = tile * kTileKeys, count = std::min(kTileKeys, n - key0);
            load_key_tile(p, keys, g, key0, count, &row, &kt);
            for (int64_t rr = 0; rr < rows_per_head; ++rr) {
              const int64_t qrow = g * rows_per_head + rr, t = m + rr % w;
              const int64_t valid = std::min(count, t - key0 + 1);
              double mx = -std::numeric_limits<double>::infinity(), sum = 0;
              if (valid > 0) {
                tile_scores(&q[qrow * d], kt, d, scale, s.data());
                for (int64_t j = 0; j < valid; ++j) mx = std::max(mx, s[j]);
                for (int64_t j = 0; j < valid; ++j) sum += std::exp(s[j] - mx);
              }
              part_max[tile * rows + qrow] = mx;
              part_sum[tile * rows + qrow] = sum;
            }
          }
      });
  // Combine the tiles of each row in tile order.
  std::vector<double> row_max(rows), row_sum(rows);
  tbb::parallel_for(int64_t{0}, rows, [&](int64_t qrow) {
    double mx = -std::numeric_limits<double>::infinity(), l = 0;
    for (int64_t tile = 0; tile < num_tiles; ++tile)
      mx = std::max(mx, part_max[tile * rows + qrow]);
    for (int64_t tile = 0; tile < num_tiles; ++tile)
      if (part_sum[tile * rows + qrow] > 0)
        l += part_sum[tile * rows + qrow] * std::exp(part_max[tile * rows + qrow] - mx);
    row_max[qrow] = mx;
    row_sum[qrow] = l;
  });
  // Pass 2: each prefix key's probabilities summed over the group's rows (h-major, as the
  // reference does), one tile per task, so no two tasks write the same vote.
  const int64_t num_prefix_tiles = (m + kTileKeys - 1) / kTileKeys;
  std::vector<double> raw(static_cast<size_t>(num_heads * m));
  tbb::parallel_for(
      tbb::blocked_range2d<int64_t>(0, num_heads, 1, 0, num_prefix_tiles, 4),
      [&](const tbb::blocked_range2d<int64_t>& r) {
        std::vector<double> kt(static_cast<size_t>(d * kTileKeys)), row(d), s(kTileKeys);
        for (int64_t g = r.rows().begin(); g < r.rows().end(); ++g)
          for (int64_t tile = r.cols().begin(); tile < r.cols().end(); ++tile) {
            const int64_t key0 = tile * kTileKeys, count = std::min(kTileKeys, m - key0);
            load_key_tile(p, keys, g, key0, count, &row, &kt);
            double acc[kTileKeys] = {};
            for (int64_t rr = 0; rr < rows_per_head; ++rr) {
              const int64_t qrow = g * rows_per_head + rr;
              tile_scores(&q[qrow * d], kt, d, scale, s.data());
              for (int64_t j = 0; j < count; ++j)
                acc[j] += std::exp(s[j] - row_max[qrow]) / row_sum[qrow];
            }
            for (int64_t j = 0; j < count; ++j) raw[g * m + key0 + j] = acc[j];
          }
      });
  // Pooling, per head.
  const int64_t half = p.pool_kernel / 2;
  tbb::parallel_for(int64_t{0}, num_heads, [&](int64_t g) {
    const double* x = &raw[g * m];
    float* out = votes + g * m;
    for (int64_t j = 0; j < m; ++j) {
      if (p.pool == VotePool::kNone || p.pool_kernel == 1) {
        out[j] = static_cast<float>(x[j]);
        continue;
      }
      const int64_t lo = std::max<int64_t>(0, j - half), hi = std::min(m - 1, j + half);
      if (p.pool == VotePool::kAvg) {
        double s = 0;
        for (int64_t i = lo; i <= hi; ++i) s += x[i];
        out[j] = static_cast<float>(s / p.pool_kernel);
      } else {
        double s = x[lo];
        for (int64_t i = lo + 1; i <= hi; ++i) s = std::max(s, x[i]);
        out[j] = static_cast<float>(s);
      }
    }
  });
}

// ---- step 2: DBAC ----

void dbac_cpu(const DbacParams& p, const float* votes, const DbacOutput& out) {
  check_dbac_params(p);
  check_dbac_output(out);
  check_dbac_votes(p, votes);
  const int32_t num_heads = p.num_kv_heads;
  const int64_t m = num_prefix_tokens(p), eps = p.eps;
  std::vector<int32_t> shift(num_heads, 0), conc(num_heads, 0), budget(num_heads, 0);
  std::vector<int64_t> total(num_heads, 0);

  // Per head: fixed-point scale, total, concentration (radix selection of the coverage cut).
  tbb::parallel_for(int32_t{0}, num_heads, [&](int32_t h) {
    const float* v = votes + h * m;
    float mx = 0.f;
    for (int64_t i = 0; i < m; ++i) mx = std::max(mx, v[i]);
    const int s = detail::dbac_quant_shift(mx, m);
    int64_t t = 0;
    for (int64_t i = 0; i < m; ++i) t += detail::dbac_quantize(v[i], s);
    shift[h] = s;
    total[h] = t;
    if (t == 0) return;
    const int64_t target = detail::dbac_coverage_target(t, p.coverage);
    const RadixPick pick = radix_pick(
        m, detail::dbac_quant_bits(m), target,
        [&](int64_t i, int64_t* k, int64_t* w) { *k = *w = detail::dbac_quantize(v[i], s); });
    // The top count_above positions hold weight_above; the rest comes from positions of value
    // pick.key (>= 1, since only positive votes carry weight).
    conc[h] = static_cast<int32_t>(pick.count_above +
                                   (target - pick.weight_above + pick.key - 1) / pick.key);
  });
  dbac_split_budgets_ref(p, conc.data(), budget.data());

  const int64_t range_cap = dbac_range_capacity(p), kept_cap = dbac_kept_capacity(p);
  tbb::parallel_for(int32_t{0}, num_heads, [&](int32_t h) {
    const float* v = votes + h * m;
    std::vector<int64_t> pre(m + 1, 0);  // pre[i] = q[0] + ... + q[i - 1]
    for (int64_t i = 0; i < m; ++i) pre[i + 1] = pre[i] + detail::dbac_quantize(v[i], shift[h]);
    const int64_t thr =
        total[h] > 0 ? detail::dbac_core_threshold(total[h], m, p.eps, p.min_density_ratio) : 0;
    auto is_core = [&](int64_t i) {
      const int64_t dens = pre[std::min(m, i + eps + 1)] - pre[std::max<int64_t>(0, i - eps)];
      return dens > 0 && dens >= thr;
    };
    // Clusters as (first core, last core): a core point more than eps after the previous one
    // starts a cluster, and that previous one ends the cluster before.
    std::vector<int64_t> first, last;
    int64_t prev = -1;
    for (int64_t i = 0; i < m; ++i) {
      if (!is_core(i)) continue;
      if (prev < 0 || i - prev > eps) {
        if (prev >= 0) last.push_back(prev);
        first.push_back(i);
      }
      prev = i;
    }
    if (prev >= 0) last.push_back(prev);
    const int64_t num_clusters = static_cast<int64_t>(first.size());
    // Bounds: border points within eps, split at the midpoint between neighbouring clusters'
    // core points (a tie goes to the left cluster).
    std::vector<int64_t> begin(num_clusters), end(num_clusters), mass(num_clusters),
        taken(num_clusters, 0);
    int64_t all = 0;
    for (int64_t c = 0; c < num_clusters; ++c) {
      begin[c] = std::max<int64_t>(first[c] - eps, 0);
      if (c > 0) begin[c] = std::max(begin[c], (last[c - 1] + first[c]) / 2 + 1);
      end[c] = std::min(last[c] + eps + 1, m);
      if (c + 1 < num_clusters) end[c] = std::min(end[c], (last[c] + first[c + 1]) / 2 + 1);
      mass[c] = pre[end[c]] - pre[begin[c]];
      all += end[c] - begin[c];
    }
    // The cut: clusters with mass above mu are taken whole; those with mass mu are taken in
    // position order while they fit, the first that does not is truncated, the rest dropped.
    const int64_t b = budget[h];
    int64_t mu = -1, above = 0;
    if (all > b) {
      const RadixPick pick =
          radix_pick(num_clusters, 52, b + 1, [&](int64_t c, int64_t* k, int64_t* w) {
            *k = mass[c];
            *w = end[c] - begin[c];
          });
      mu = pick.key;
      above = pick.weight_above;
    }
    int64_t x = 0;
    for (int64_t c = 0; c < num_clusters; ++c) {
      const int64_t size = end[c] - begin[c];
      if (mass[c] > mu) {
        taken[c] = size;
      } else if (mass[c] == mu) {
        if (above + x + size <= b) {
          taken[c] = size;
        } else if (above + x < b) {
          // The densest window of the remaining length (ties: leftmost).
          const int64_t r = b - above - x;
          int64_t best = -1, best_s = begin[c];
          for (int64_t s = begin[c]; s + r <= end[c]; ++s)
            if (pre[s + r] - pre[s] > best) best = pre[s + r] - pre[s], best_s = s;
          begin[c] = best_s;
          end[c] = best_s + r;
          taken[c] = r;
        }
        x += size;
      }
    }
    int32_t nr = 0, nt = 0;
    TokenRange* ranges = out.ranges + h * range_cap;
    int32_t* kept = out.kept_positions ? out.kept_positions + h * kept_cap : nullptr;
    for (int64_t c = 0; c < num_clusters; ++c) {
      if (taken[c] == 0) continue;
      ranges[nr++] = {static_cast<int32_t>(begin[c]), static_cast<int32_t>(end[c])};
      if (kept)
        for (int64_t pos = begin[c]; pos < end[c]; ++pos) kept[nt++] = static_cast<int32_t>(pos);
      else
        nt += static_cast<int32_t>(end[c] - begin[c]);
    }
    out.num_ranges[h] = nr;
    out.num_tokens[h] = nt;
    out.head_budget[h] = budget[h];
    if (out.concentration) out.concentration[h] = conc[h];
    if (kept) {
      for (int64_t i = 0; i < p.window; ++i) kept[nt + i] = static_cast<int32_t>(m + i);
      out.num_kept[h] = static_cast<int32_t>(nt + p.window);
    }
  });
}

}  // namespace kvtier::kernels
