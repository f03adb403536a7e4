// oneTBB host path of cluster scoring and selection: problems in parallel, each one computed with
// the reference's double arithmetic in the reference's order, so the results are bitwise equal.
// Faster than the reference by reading each centroid row once for all G heads and by ranking
// with a sort of 64-bit keys instead of a comparator over indices.
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "kernels/cluster_select.h"
#include "memory/core/check.h"
#include "memory/core/half.h"

namespace kvtier::kernels {

namespace {

/// Scratch of one task, reused across the problems of its range.
struct ScoreScratch {
  std::vector<double> queries;   // [G, D]
  std::vector<double> centroid;  // [D]
  std::vector<double> logits;    // [G, n]; under kSoftmaxSum overwritten by exp(logit - max)
  std::vector<double> sum;       // [n]
};

Status score_problem_cpu(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                         int32_t problem, ScoreScratch& w) {
  const int32_t n = t.num_clusters[problem];
  if (n < 0 || n > p.max_clusters) return detail::check_score_problem(p, t, problem);
  const int32_t G = p.group_size, D = p.head_dim;
  const double scale = cluster_score_scale(p);
  const float* q = t.queries + static_cast<size_t>(problem) * G * D;
  const float* c = t.centroids + detail::centroid_row(t, problem) * p.max_clusters * D;
  float* out = t.scores + static_cast<size_t>(problem) * p.max_clusters;

  w.queries.resize(static_cast<size_t>(G) * D);
  for (size_t i = 0; i < w.queries.size(); ++i) {
    if (!std::isfinite(q[i])) return detail::check_score_problem(p, t, problem);
    w.queries[i] = q[i];
  }
  // Centroid-major: one row, converted once, serves all G heads. Each dot still sums over d in
  // order, as the reference does, so every logit is bitwise the reference's.
  w.centroid.resize(D);
  w.logits.resize(static_cast<size_t>(G) * n);
  bool finite = true;
  for (int32_t j = 0; j < n; ++j) {
    const float* cj = c + static_cast<size_t>(j) * D;
    for (int32_t d = 0; d < D; ++d) w.centroid[d] = cj[d];
    for (int32_t g = 0; g < G; ++g) {
      const double* qg = w.queries.data() + static_cast<size_t>(g) * D;
      double dot = 0.0;
      for (int32_t d = 0; d < D; ++d) dot += qg[d] * w.centroid[d];
      finite = finite && std::isfinite(dot);
      w.logits[static_cast<size_t>(g) * n + j] = scale * dot;
    }
  }
  // Finite floats cannot give a non-finite double dot (|q c| <= 1.2e77), so a non-finite one means
  // a NaN/Inf centroid value: let the shared validator name the first one.
  if (!finite) {
    Status st = detail::check_score_problem(p, t, problem);
    KVTIER_ASSERT(!st.is_ok());
    return st;
  }

  if (p.aggregation == ScoreAggregation::kMax) {
    for (int32_t j = 0; j < n; ++j) {
      double m = -std::numeric_limits<double>::infinity();
      for (int32_t g = 0; g < G; ++g) m = std::max(m, w.logits[static_cast<size_t>(g) * n + j]);
      out[j] = static_cast<float>(m);
    }
  } else {
    w.sum.assign(n, 0.0);
    for (int32_t g = 0; g < G; ++g) {
      double* lg = w.logits.data() + static_cast<size_t>(g) * n;
      double mx = -std::numeric_limits<double>::infinity();
      for (int32_t j = 0; j < n; ++j) mx = std::max(mx, lg[j]);
      double z = 0.0;
      for (int32_t j = 0; j < n; ++j) {
        lg[j] = std::exp(lg[j] - mx);
        z += lg[j];
      }
      for (int32_t j = 0; j < n; ++j) w.sum[j] += lg[j] / z;
    }
    for (int32_t j = 0; j < n; ++j) out[j] = static_cast<float>(w.sum[j]);
  }
  for (int32_t j = n; j < p.max_clusters; ++j) out[j] = -std::numeric_limits<float>::infinity();
  return detail::check_scores_finite(p, t, problem);
}

Status select_problem_cpu(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                          int32_t problem, std::vector<uint64_t>& keys) {
  Status st = detail::check_select_problem(p, t, problem);
  if (!st.is_ok()) return st;
  const int32_t n = t.num_clusters[problem];
  const size_t row = static_cast<size_t>(problem) * p.max_clusters;
  const float* s = t.scores + row;
  const int32_t* sizes = t.cluster_sizes + detail::size_row_offset(p, t, problem);
  int32_t* ids = t.selected_ids + row;
  int32_t* rows = t.selected_rows + row;

  const int id_bits = detail::cluster_id_bits(p.max_clusters);
  const uint64_t id_mask = (uint64_t{1} << id_bits) - 1;
  keys.resize(n);
  for (int32_t j = 0; j < n; ++j) {
    keys[j] = detail::cluster_sort_key(s[j], static_cast<uint32_t>(j), id_bits);
  }
  std::sort(keys.begin(), keys.end(), std::greater<uint64_t>());
  int64_t remaining = t.budgets[problem];
  int32_t count = 0;
  int64_t total = 0;
  for (const uint64_t key : keys) {
    if (remaining == 0) break;
    const int32_t j = static_cast<int32_t>(id_mask - (key & id_mask));
    const int64_t size = sizes[j];
    if (size == 0) continue;
    int64_t take = size;
    if (size > remaining) {
      if (p.overflow == BudgetOverflow::kSkip) break;
      take = remaining;
    }
    ids[count] = j;
    rows[count] = static_cast<int32_t>(take);
    ++count;
    total += take;
    remaining -= take;
  }
  std::fill(ids + count, ids + p.max_clusters, -1);
  std::fill(rows + count, rows + p.max_clusters, 0);
  t.num_selected[problem] = count;
  t.total_rows[problem] = static_cast<int32_t>(total);
  return Status::ok();
}

/// Exceptions do not cross threads: each problem leaves a Status, and the lowest failing problem
/// is thrown here, in the calling thread (the same one the reference would name first).
void throw_first_error(const std::vector<Status>& statuses) {
  for (const Status& st : statuses) st.throw_if_error();
}

}  // namespace

void score_clusters_cpu(const ClusterSelectParams& p, const ClusterSelectTensors& t) {
  check_score_params(p);
  detail::check_score_tensors(p, t);
  if (p.num_problems == 0) return;
  std::vector<Status> statuses(p.num_problems);
  tbb::parallel_for(tbb::blocked_range<int32_t>(0, p.num_problems),
                    [&](const tbb::blocked_range<int32_t>& r) {
                      ScoreScratch w;
                      for (int32_t i = r.begin(); i < r.end(); ++i) {
                        statuses[i] = score_problem_cpu(p, t, i, w);
                      }
                    });
  throw_first_error(statuses);
}

void select_clusters_cpu(const ClusterSelectParams& p, const ClusterSelectTensors& t) {
  check_select_params(p);
  detail::check_select_tensors(p, t);
  if (p.num_problems == 0) return;
  std::vector<Status> statuses(p.num_problems);
  tbb::parallel_for(tbb::blocked_range<int32_t>(0, p.num_problems),
                    [&](const tbb::blocked_range<int32_t>& r) {
                      std::vector<uint64_t> keys;
                      for (int32_t i = r.begin(); i < r.end(); ++i) {
                        statuses[i] = select_problem_cpu(p, t, i, keys);
                      }
                    });
  throw_first_error(statuses);
}

void score_and_select_clusters_cpu(const ClusterSelectParams& p, const ClusterSelectTensors& t) {
  // Two passes, like the reference, so a scoring error anywhere is reported before a selection
  // error: the same message as score_and_select_clusters_ref.
  score_clusters_cpu(p, t);
  select_clusters_cpu(p, t);
}

void round_centroids_fp16_cpu(float* centroids, uint16_t* copy, int64_t rows, int64_t cols,
                              int64_t stride) {
  KVTIER_CHECK(rows >= 0 && cols >= 0 && stride >= cols, "round_centroids_fp16_cpu: rows ", rows,
               ", cols ", cols, ", stride ", stride);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = centroids + r * stride;
    for (int64_t i = 0; i < cols; ++i) {
      const uint16_t h = float_to_fp16(row[i]);
      row[i] = fp16_to_float(h);
      if (copy != nullptr) copy[r * stride + i] = h;
    }
  }
}

}  // namespace kvtier::kernels
