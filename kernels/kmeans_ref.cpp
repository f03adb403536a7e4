// Reference spherical k-means: plain loops, double accumulation, deterministic. The specification
// the oneTBB and CUDA versions are tested against.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <unordered_set>

#include "kernels/kmeans.h"
#include "kernels/kmeans_common.h"
#include "memory/core/check.h"
#include "memory/core/half.h"

namespace kvtier::kernels {

void check_kmeans_params(const KmeansParams& p) {
  KVTIER_CHECK(p.num_problems >= 1, "num_problems must be >= 1, got ", p.num_problems);
  KVTIER_CHECK(p.num_points >= 1, "num_points must be >= 1, got ", p.num_points);
  KVTIER_CHECK(p.num_points <= (int64_t{1} << 31) - 1, "num_points ", p.num_points,
               " is too large");
  KVTIER_CHECK(p.dim == 64 || p.dim == 128 || p.dim == 256, "k-means dim ", p.dim,
               " is not supported (supported: 64, 128, 256)");
  KVTIER_CHECK(p.num_clusters >= 1, "num_clusters must be >= 1, got ", p.num_clusters);
  KVTIER_CHECK(p.max_iters >= 0, "max_iters must be >= 0, got ", p.max_iters);
  KVTIER_CHECK(p.rel_tol >= 0.f && std::isfinite(p.rel_tol),
               "rel_tol must be finite and >= 0, got ", p.rel_tol);
  KVTIER_CHECK(p.init_sample >= 1, "init_sample must be >= 1, got ", p.init_sample);
  KVTIER_CHECK(kmeans_centroid_stride(p) >= p.num_clusters, "centroid_stride ", p.centroid_stride,
               " is below num_clusters ", p.num_clusters);
}

std::vector<int32_t> kmeans_random_init_rows(const KmeansParams& p) {
  check_kmeans_params(p);
  const int32_t k = kmeans_effective_k(p);
  std::vector<int32_t> rows(static_cast<size_t>(p.num_problems) * k);
  for (int32_t prob = 0; prob < p.num_problems; ++prob) {
    // Floyd's algorithm: k distinct values in [0, n) with k draws, whatever n is.
    std::mt19937_64 rng(detail::problem_seed(p.seed, prob));
    std::vector<int32_t> picked;
    picked.reserve(k);
    std::unordered_set<int64_t> seen;
    const int64_t n = p.num_points;
    for (int64_t j = n - k; j < n; ++j) {
      const int64_t t = static_cast<int64_t>(rng() % static_cast<uint64_t>(j + 1));
      const int64_t v = seen.count(t) ? j : t;
      seen.insert(v);
      picked.push_back(static_cast<int32_t>(v));
    }
    std::copy(picked.begin(), picked.end(), rows.begin() + static_cast<size_t>(prob) * k);
  }
  return rows;
}

namespace detail {

void load_unit_rows(const KmeansParams& p, const void* points, int32_t prob,
                    std::vector<double>* out) {
  const int64_t n = p.num_points;
  const int d = p.dim;
  out->assign(static_cast<size_t>(n) * d, 0.0);
  const size_t base = static_cast<size_t>(prob) * n * d;
  for (int64_t i = 0; i < n; ++i) {
    double norm2 = 0;
    for (int c = 0; c < d; ++c) {
      const float v = load_as_float(points, p.dtype, base + i * d + c);
      KVTIER_CHECK(std::isfinite(v), "k-means input is not finite (", v, ") at problem ", prob,
                   ", row ", i, ", column ", c);
      (*out)[i * d + c] = v;
      norm2 += static_cast<double>(v) * v;
    }
    const double inv = norm2 > 0 ? 1.0 / std::sqrt(norm2) : 0.0;  // a zero row stays zero
    for (int c = 0; c < d; ++c) (*out)[i * d + c] *= inv;
  }
}

void mean_rows(const KmeansParams& p, const void* points, int32_t prob,
               const std::vector<int32_t>& lab, std::vector<double>* c) {
  const int64_t n = p.num_points;
  const int d = p.dim;
  const int32_t k = kmeans_effective_k(p);
  std::vector<double> sum(static_cast<size_t>(k) * d, 0.0);
  std::vector<int64_t> cnt(static_cast<size_t>(k), 0);
  const size_t base = static_cast<size_t>(prob) * n * d;
  for (int64_t i = 0; i < n; ++i) {
    ++cnt[lab[i]];
    for (int t = 0; t < d; ++t)
      sum[static_cast<size_t>(lab[i]) * d + t] += load_as_float(points, p.dtype, base + i * d + t);
  }
  for (int32_t j = 0; j < k; ++j)
    if (cnt[j] > 0)
      for (int t = 0; t < d; ++t)
        (*c)[static_cast<size_t>(j) * d + t] = sum[static_cast<size_t>(j) * d + t] / cnt[j];
}

}  // namespace detail

namespace detail {

// Greedy k-means++ over a sample (as scikit-learn does): the first centre is a uniformly drawn
// row; for each next one, 2 + ln(k) candidates are drawn with probability proportional to
// (1 - best cos) to the centres so far, and the candidate that lowers the total the most is kept.
// The extra candidates make a second centre in one well-separated blob vanishingly rare.
//
// Every random number is counter-based (plus_plus_draw of (problem stream, j, trial)), so the
// GPU draws the same numbers in parallel; what it computes differently is only the order of the
// floating-point sums below. The rules, written so a parallel scan can follow them exactly:
//  - w[s] = best[s] for untaken rows, 0 for taken ones; total = sum of w.
//  - Centre 0: sample row plus_plus_draw(stream, 0, 0) % m; best[s] = min(2, 1 - cos).
//  - If total is 0 (every untaken row coincides with a centre), the first untaken row.
//  - Trial t: u = total * uniform(draw(stream, j, t)); the candidate is the first row with
//    w > 0 whose running sum of w exceeds u (the last row with w > 0 if rounding leaves u past
//    the end).
//  - Its gain is best[cand] + sum over the other untaken rows of (best - min(best, 1 - cos)),
//    the amount the total drops if it is taken; the first trial whose gain is within
//    kPlusPlusGainTolerance (relative) of the highest wins.
//  - Then best[s] = min(best[s], max(0, 1 - cos to the winner)) and the winner is taken.
std::vector<int32_t> plus_plus_rows(const KmeansParams& p, const std::vector<double>& x,
                                    int32_t prob) {
  const int32_t k = kmeans_effective_k(p);
  const int d = p.dim;
  const uint64_t stream = plus_plus_stream(p.seed, prob);
  const std::vector<int32_t> sample = init_sample_rows(p, prob);
  const int64_t m = static_cast<int64_t>(sample.size());
  const int trials = plus_plus_trials(k);
  std::vector<double> best(static_cast<size_t>(m), 2.0), keep(best.size());
  std::vector<std::vector<double>> cand_nb(static_cast<size_t>(trials), keep);
  std::vector<double> gains(static_cast<size_t>(trials));
  std::vector<int64_t> cands(static_cast<size_t>(trials));
  std::vector<uint8_t> taken(static_cast<size_t>(m), 0);
  std::vector<int32_t> out;
  // nb[s] = max(0, 1 - cos(row s, row c)) for every sample row.
  auto distances_to = [&](int64_t c_row, std::vector<double>* nb) {
    const double* c = &x[static_cast<size_t>(sample[c_row]) * d];
    for (int64_t s = 0; s < m; ++s) {
      const double* r = &x[static_cast<size_t>(sample[s]) * d];
      double dot = 0;
      for (int t = 0; t < d; ++t) dot += r[t] * c[t];
      (*nb)[s] = std::max(0.0, 1.0 - dot);
    }
  };
  for (int32_t j = 0; j < k; ++j) {
    double total = 0;
    for (int64_t s = 0; s < m; ++s) total += taken[s] ? 0.0 : best[s];
    int64_t pick = -1;
    if (j == 0) {
      pick = static_cast<int64_t>(plus_plus_draw(stream, 0, 0) % static_cast<uint64_t>(m));
      distances_to(pick, &keep);
    } else if (total <= 0) {  // every remaining row coincides with a centre: the first untaken
      pick = 0;
      while (taken[pick]) ++pick;
      std::fill(keep.begin(), keep.end(), 0.0);  // nothing changes: best is already 0
    } else {
      for (int trial = 0; trial < trials; ++trial) {
        const double u = total * plus_plus_uniform(plus_plus_draw(stream, j, trial));
        int64_t cand = -1, last = -1;
        double acc = 0;
        for (int64_t s = 0; s < m; ++s) {
          if (taken[s] || !(best[s] > 0)) continue;
          last = s;
          acc += best[s];
          if (u < acc) {
            cand = s;
            break;
          }
        }
        if (cand < 0) cand = last;  // total > 0, so some row has w > 0
        std::vector<double>& nb = cand_nb[trial];
        distances_to(cand, &nb);
        double gain = best[cand];
        for (int64_t s = 0; s < m; ++s)
          if (!taken[s] && s != cand) gain += best[s] - std::min(best[s], nb[s]);
        cands[trial] = cand;
        gains[trial] = gain;
      }
      const double top = *std::max_element(gains.begin(), gains.end());
      int win = 0;
      while (!(gains[win] >= top * (1.0 - kPlusPlusGainTolerance))) ++win;
      pick = cands[win];
      keep.swap(cand_nb[win]);
    }
    taken[pick] = 1;
    out.push_back(sample[pick]);
    for (int64_t s = 0; s < m; ++s) best[s] = std::min(best[s], keep[s]);
  }
  return out;
}

}  // namespace detail

std::vector<KmeansReport> kmeans_ref(const KmeansParams& p, const void* points, float* centroids,
                                     int32_t* labels, int32_t* sizes) {
  check_kmeans_params(p);
  KVTIER_CHECK(points && centroids && labels && sizes, "k-means: null pointer argument");
  const int64_t n = p.num_points;
  const int d = p.dim;
  const int32_t k = kmeans_effective_k(p);
  const std::vector<int32_t> random_rows =
      p.init == KmeansInit::kRandomRows ? kmeans_random_init_rows(p) : std::vector<int32_t>();
  std::vector<KmeansReport> reports(static_cast<size_t>(p.num_problems));
  std::vector<double> x, c(static_cast<size_t>(k) * d), sum(static_cast<size_t>(k) * d), cosv(n);
  std::vector<int32_t> lab(n), cnt(k);

  for (int32_t prob = 0; prob < p.num_problems; ++prob) {
    detail::load_unit_rows(p, points, prob, &x);
    std::vector<int32_t> init =
        p.init == KmeansInit::kRandomRows
            ? std::vector<int32_t>(random_rows.begin() + static_cast<size_t>(prob) * k,
                                   random_rows.begin() + static_cast<size_t>(prob + 1) * k)
            : detail::plus_plus_rows(p, x, prob);
    for (int32_t j = 0; j < k; ++j)
      for (int t = 0; t < d; ++t) c[j * d + t] = x[static_cast<size_t>(init[j]) * d + t];

    // Assignment: nearest centroid by cosine, ties to the lower id; returns the objective.
    auto assign = [&]() {
      double obj = 0;
      for (int64_t i = 0; i < n; ++i) {
        double best = -3.0;
        int32_t arg = 0;
        for (int32_t j = 0; j < k; ++j) {
          double dot = 0;
          for (int t = 0; t < d; ++t) dot += x[i * d + t] * c[j * d + t];
          if (dot > best) {
            best = dot;
            arg = j;
          }
        }
        lab[i] = arg;
        cosv[i] = best;
        obj += 1.0 - best;
      }
      return obj;
    };
    KmeansReport& rep = reports[prob];
    double obj = assign();
    rep.history.push_back(obj);
    for (int32_t it = 1; it <= p.max_iters; ++it) {
      // Update: normalized sum of each cluster's unit rows.
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(cnt.begin(), cnt.end(), 0);
      for (int64_t i = 0; i < n; ++i) {
        ++cnt[lab[i]];
        for (int t = 0; t < d; ++t) sum[lab[i] * d + t] += x[i * d + t];
      }
      std::vector<int32_t> empty;
      for (int32_t j = 0; j < k; ++j) {
        double norm2 = 0;
        for (int t = 0; t < d; ++t) norm2 += sum[j * d + t] * sum[j * d + t];
        if (cnt[j] == 0) {
          empty.push_back(j);
        } else if (norm2 > 0) {
          const double inv = 1.0 / std::sqrt(norm2);
          for (int t = 0; t < d; ++t) c[j * d + t] = sum[j * d + t] * inv;
        }  // a cluster whose rows cancel out keeps its centroid
      }
      // Re-seed empty clusters with the worst-fitting rows (largest 1 - cos), lowest index first
      // among equals, each row used once.
      if (!empty.empty()) {
        const std::vector<int64_t> worst = detail::worst_fit_rows(cosv, empty.size());
        for (size_t e = 0; e < empty.size(); ++e)
          for (int t = 0; t < d; ++t) c[empty[e] * d + t] = x[worst[e] * d + t];
      }
      const double prev = obj;
      obj = assign();
      rep.history.push_back(obj);
      rep.iterations = it;
      if (prev - obj <= static_cast<double>(p.rel_tol) * prev) break;
    }
    rep.objective = obj;
    detail::write_problem_outputs(p, points, prob, c, lab, centroids, labels, sizes);
  }
  return reports;
}

}  // namespace kvtier::kernels
