// Reference of cluster scoring and budgeted selection: the specification. Plain loops, double
// accumulation, one problem after another; also the parameter and per-problem validation shared
// with the oneTBB path.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "kernels/cluster_select.h"
#include "memory/core/check.h"

namespace kvtier::kernels {

namespace {

/// "kvtier: problem 3: <pieces>" as an InvalidArgument status.
template <typename... Args>
Status problem_error(int32_t problem, const Args&... args) {
  return Status::invalid_argument(
      ::kvtier::detail::str_cat("kvtier: problem ", problem, ": ", args...));
}

Status num_clusters_error(const ClusterSelectParams& p, int32_t problem, int32_t n) {
  return problem_error(problem, "num_clusters ", n, " out of [0, ", p.max_clusters, "]");
}

void score_problem_ref(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                       int32_t problem) {
  const int32_t n = t.num_clusters[problem];
  const int32_t G = p.group_size, D = p.head_dim;
  const double scale = cluster_score_scale(p);
  const float* q = t.queries + static_cast<size_t>(problem) * G * D;
  const float* c = t.centroids + detail::centroid_row(t, problem) * p.max_clusters * D;
  float* out = t.scores + static_cast<size_t>(problem) * p.max_clusters;

  // logits[g][j] = scale * dot(q[g], c[j])
  std::vector<double> logits(static_cast<size_t>(G) * n);
  for (int32_t g = 0; g < G; ++g) {
    for (int32_t j = 0; j < n; ++j) {
      double dot = 0.0;
      for (int32_t d = 0; d < D; ++d) {
        dot += static_cast<double>(q[static_cast<size_t>(g) * D + d]) *
               static_cast<double>(c[static_cast<size_t>(j) * D + d]);
      }
      logits[static_cast<size_t>(g) * n + j] = scale * dot;
    }
  }

  if (p.aggregation == ScoreAggregation::kMax) {
    for (int32_t j = 0; j < n; ++j) {
      double m = -std::numeric_limits<double>::infinity();
      for (int32_t g = 0; g < G; ++g) m = std::max(m, logits[static_cast<size_t>(g) * n + j]);
      out[j] = static_cast<float>(m);
    }
  } else {
    std::vector<double> sum(n, 0.0);
    for (int32_t g = 0; g < G; ++g) {
      const double* lg = logits.data() + static_cast<size_t>(g) * n;
      double mx = -std::numeric_limits<double>::infinity();
      for (int32_t j = 0; j < n; ++j) mx = std::max(mx, lg[j]);
      double z = 0.0;
      for (int32_t j = 0; j < n; ++j) z += std::exp(lg[j] - mx);
      for (int32_t j = 0; j < n; ++j) sum[j] += std::exp(lg[j] - mx) / z;
    }
    for (int32_t j = 0; j < n; ++j) out[j] = static_cast<float>(sum[j]);
  }
  for (int32_t j = n; j < p.max_clusters; ++j) out[j] = -std::numeric_limits<float>::infinity();
}

void select_problem_ref(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                        int32_t problem) {
  const int32_t n = t.num_clusters[problem];
  const size_t row = static_cast<size_t>(problem) * p.max_clusters;
  const float* s = t.scores + row;
  const int32_t* sizes = t.cluster_sizes + detail::size_row_offset(p, t, problem);
  int32_t* ids = t.selected_ids + row;
  int32_t* rows = t.selected_rows + row;

  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [s](int32_t a, int32_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
  int64_t remaining = t.budgets[problem];
  int32_t count = 0;
  int64_t total = 0;
  for (const int32_t j : order) {
    if (remaining == 0) break;
    const int64_t size = sizes[j];
    if (size == 0) continue;  // an empty cluster is passed over, never selected
    int64_t take = size;
    if (size > remaining) {
      if (p.overflow == BudgetOverflow::kSkip) break;  // stop at the first one that does not fit
      take = remaining;
    }
    ids[count] = j;
    rows[count] = static_cast<int32_t>(take);
    ++count;
    total += take;
    remaining -= take;
  }
  for (int32_t k = count; k < p.max_clusters; ++k) {
    ids[k] = -1;
    rows[k] = 0;
  }
  t.num_selected[problem] = count;
  t.total_rows[problem] = static_cast<int32_t>(total);
}

}  // namespace

void check_score_params(const ClusterSelectParams& p) {
  KVTIER_CHECK(p.num_problems >= 0, "num_problems must be >= 0, got ", p.num_problems);
  KVTIER_CHECK(p.group_size >= 1, "group_size must be >= 1, got ", p.group_size);
  KVTIER_CHECK(p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256, "unsupported head_dim ",
               p.head_dim, " (supported: 64, 128, 256)");
  KVTIER_CHECK(p.max_clusters >= 1, "max_clusters must be >= 1, got ", p.max_clusters);
  KVTIER_CHECK(std::isfinite(p.scale) && p.scale >= 0.f,
               "scale must be finite and >= 0 (0 means 1/sqrt(head_dim)), got ", p.scale);
  KVTIER_CHECK(
      p.aggregation == ScoreAggregation::kSoftmaxSum || p.aggregation == ScoreAggregation::kMax,
      "unknown aggregation ", static_cast<int>(p.aggregation));
}

void check_select_params(const ClusterSelectParams& p) {
  KVTIER_CHECK(p.num_problems >= 0, "num_problems must be >= 0, got ", p.num_problems);
  KVTIER_CHECK(p.max_clusters >= 1, "max_clusters must be >= 1, got ", p.max_clusters);
  KVTIER_CHECK(p.overflow == BudgetOverflow::kTruncate || p.overflow == BudgetOverflow::kSkip,
               "unknown budget overflow mode ", static_cast<int>(p.overflow));
}

float cluster_score_scale(const ClusterSelectParams& p) {
  return p.scale != 0.f ? p.scale : 1.f / std::sqrt(static_cast<float>(p.head_dim));
}

namespace detail {

void check_score_tensors(const ClusterSelectParams& p, const ClusterSelectTensors& t) {
  if (p.num_problems == 0) return;
  KVTIER_CHECK(t.queries != nullptr, "queries is null");
  KVTIER_CHECK(t.centroids != nullptr, "centroids is null");
  KVTIER_CHECK(t.num_clusters != nullptr, "num_clusters is null");
  KVTIER_CHECK(t.scores != nullptr, "scores is null");
}

void check_select_tensors(const ClusterSelectParams& p, const ClusterSelectTensors& t) {
  if (p.num_problems == 0) return;
  KVTIER_CHECK(t.scores != nullptr, "scores is null");
  check_select_inputs_and_outputs(p, t);
}

void check_select_inputs_and_outputs(const ClusterSelectParams& p, const ClusterSelectTensors& t) {
  if (p.num_problems == 0) return;
  KVTIER_CHECK(t.num_clusters != nullptr, "num_clusters is null");
  KVTIER_CHECK(t.cluster_sizes != nullptr, "cluster_sizes is null");
  KVTIER_CHECK(t.budgets != nullptr, "budgets is null");
  KVTIER_CHECK(t.selected_ids != nullptr && t.selected_rows != nullptr,
               "selected_ids and selected_rows must not be null");
  KVTIER_CHECK(t.num_selected != nullptr && t.total_rows != nullptr,
               "num_selected and total_rows must not be null");
}

Status check_score_problem(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                           int32_t problem) {
  const int32_t n = t.num_clusters[problem];
  if (n < 0 || n > p.max_clusters) return num_clusters_error(p, problem, n);
  const int32_t G = p.group_size, D = p.head_dim;
  const float* q = t.queries + static_cast<size_t>(problem) * G * D;
  for (int32_t g = 0; g < G; ++g) {
    for (int32_t d = 0; d < D; ++d) {
      const float v = q[static_cast<size_t>(g) * D + d];
      if (!std::isfinite(v)) {
        return problem_error(problem, "query head ", g, " dim ", d, " is ", v);
      }
    }
  }
  const float* c = t.centroids + detail::centroid_row(t, problem) * p.max_clusters * D;
  for (int32_t j = 0; j < n; ++j) {
    for (int32_t d = 0; d < D; ++d) {
      const float v = c[static_cast<size_t>(j) * D + d];
      if (!std::isfinite(v)) {
        return problem_error(problem, "centroid ", j, " dim ", d, " is ", v);
      }
    }
  }
  return Status::ok();
}

Status check_scores_finite(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                           int32_t problem) {
  const int32_t n = t.num_clusters[problem];
  const float* s = t.scores + static_cast<size_t>(problem) * p.max_clusters;
  for (int32_t j = 0; j < n; ++j) {
    if (!std::isfinite(s[j])) {
      return problem_error(problem, "score of cluster ", j, " is ", s[j], " (overflows float)");
    }
  }
  return Status::ok();
}

Status check_select_problem(const ClusterSelectParams& p, const ClusterSelectTensors& t,
                            int32_t problem) {
  const int32_t n = t.num_clusters[problem];
  if (n < 0 || n > p.max_clusters) return num_clusters_error(p, problem, n);
  if (t.budgets[problem] < 0) {
    return problem_error(problem, "budget must be >= 0, got ", t.budgets[problem]);
  }
  const size_t row = static_cast<size_t>(problem) * p.max_clusters;
  const int32_t* sizes = t.cluster_sizes + size_row_offset(p, t, problem);
  for (int32_t j = 0; j < n; ++j) {
    if (!std::isfinite(t.scores[row + j])) {
      return problem_error(problem, "score of cluster ", j, " is ", t.scores[row + j]);
    }
    if (sizes[j] < 0) {
      return problem_error(problem, "size of cluster ", j, " must be >= 0, got ", sizes[j]);
    }
  }
  return Status::ok();
}

}  // namespace detail

void score_clusters_ref(const ClusterSelectParams& p, const ClusterSelectTensors& t) {
  check_score_params(p);
  detail::check_score_tensors(p, t);
  for (int32_t problem = 0; problem < p.num_problems; ++problem) {
    detail::check_score_problem(p, t, problem).throw_if_error();
    score_problem_ref(p, t, problem);
    detail::check_scores_finite(p, t, problem).throw_if_error();
  }
}

void select_clusters_ref(const ClusterSelectParams& p, const ClusterSelectTensors& t) {
  check_select_params(p);
  detail::check_select_tensors(p, t);
  for (int32_t problem = 0; problem < p.num_problems; ++problem) {
    detail::check_select_problem(p, t, problem).throw_if_error();
    select_problem_ref(p, t, problem);
  }
}

void score_and_select_clusters_ref(const ClusterSelectParams& p, const ClusterSelectTensors& t) {
  score_clusters_ref(p, t);
  select_clusters_ref(p, t);
}

}  // namespace kvtier::kernels
