// Spherical k-means on oneTBB: the reference's algorithm with float dot products, double sums,
// problems and rows in parallel. Results equal the reference's up to summation order.
#include <tbb/blocked_range.h>
#include <tbb/combinable.h>
#include <tbb/parallel_for.h>
#include <tbb/parallel_reduce.h>

#include <cmath>

#include "kernels/kmeans.h"
#include "kernels/kmeans_common.h"
#include "memory/core/check.h"

namespace kvtier::kernels {

namespace {

// k-means++ is inherently sequential in k; the reference's version is reused (it runs on the
// sample only).
std::vector<int32_t> initial_rows(const KmeansParams& p, const std::vector<double>& xd,
                                  const std::vector<int32_t>& random_rows, int32_t prob);

}  // namespace

std::vector<KmeansReport> kmeans_cpu(const KmeansParams& p, const void* points, float* centroids,
                                     int32_t* labels, int32_t* sizes) {
  check_kmeans_params(p);
  KVTIER_CHECK(points && centroids && labels && sizes, "k-means: null pointer argument");
  const int64_t n = p.num_points;
  const int d = p.dim;
  const int32_t k = kmeans_effective_k(p);
  const std::vector<int32_t> random_rows =
      p.init == KmeansInit::kRandomRows ? kmeans_random_init_rows(p) : std::vector<int32_t>();
  std::vector<KmeansReport> reports(static_cast<size_t>(p.num_problems));

  tbb::parallel_for(0, p.num_problems, [&](int32_t prob) {
    std::vector<double> xd;
    detail::load_unit_rows(p, points, prob, &xd);  // validates; double unit rows
    std::vector<float> x(xd.begin(), xd.end());
    std::vector<float> c(static_cast<size_t>(k) * d);
    const std::vector<int32_t> init = initial_rows(p, xd, random_rows, prob);
    for (int32_t j = 0; j < k; ++j)
      for (int t = 0; t < d; ++t) c[j * d + t] = x[static_cast<size_t>(init[j]) * d + t];
    std::vector<int32_t> lab(n);
    std::vector<float> cosv(n);

    auto assign = [&]() {
      return tbb::parallel_reduce(
          tbb::blocked_range<int64_t>(0, n, 256), 0.0,
          [&](const tbb::blocked_range<int64_t>& r, double acc) {
            for (int64_t i = r.begin(); i < r.end(); ++i) {
              const float* xi = &x[i * d];
              float best = -3.f;
              int32_t arg = 0;
              for (int32_t j = 0; j < k; ++j) {
                const float* cj = &c[static_cast<size_t>(j) * d];
                float dot = 0.f;
                for (int t = 0; t < d; ++t) dot += xi[t] * cj[t];
                if (dot > best) {
                  best = dot;
                  arg = j;
                }
              }
              lab[i] = arg;
              // The objective term in double from the double rows, as the reference does.
              double dd = 0;
              for (int t = 0; t < d; ++t)
                dd += xd[i * d + t] * static_cast<double>(c[static_cast<size_t>(arg) * d + t]);
              cosv[i] = static_cast<float>(dd);
              acc += 1.0 - dd;
            }
            return acc;
          },
          std::plus<double>());
    };

    KmeansReport& rep = reports[prob];
    double obj = assign();
    rep.history.push_back(obj);
    for (int32_t it = 1; it <= p.max_iters; ++it) {
      tbb::combinable<std::vector<double>> sums(
          [&] { return std::vector<double>(static_cast<size_t>(k) * d + k, 0.0); });
      tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, 1024),
                        [&](const tbb::blocked_range<int64_t>& r) {
                          std::vector<double>& s = sums.local();
                          for (int64_t i = r.begin(); i < r.end(); ++i) {
                            double* sj = &s[static_cast<size_t>(lab[i]) * d];
                            for (int t = 0; t < d; ++t) sj[t] += xd[i * d + t];
                            s[static_cast<size_t>(k) * d + lab[i]] += 1.0;
                          }
                        });
      std::vector<double> total(static_cast<size_t>(k) * d + k, 0.0);
      sums.combine_each([&](const std::vector<double>& s) {
        for (size_t q = 0; q < total.size(); ++q) total[q] += s[q];
      });
      std::vector<int32_t> empty;
      for (int32_t j = 0; j < k; ++j) {
        if (total[static_cast<size_t>(k) * d + j] == 0) {
          empty.push_back(j);
          continue;
        }
        double norm2 = 0;
        for (int t = 0; t < d; ++t) norm2 += total[j * d + t] * total[j * d + t];
        if (norm2 > 0) {
          const double inv = 1.0 / std::sqrt(norm2);
          for (int t = 0; t < d; ++t) c[j * d + t] = static_cast<float>(total[j * d + t] * inv);
        }
      }
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
  });
  return reports;
}

namespace {
std::vector<int32_t> initial_rows(const KmeansParams& p, const std::vector<double>& xd,
                                  const std::vector<int32_t>& random_rows, int32_t prob) {
  const int32_t k = kmeans_effective_k(p);
  if (p.init == KmeansInit::kRandomRows)
    return std::vector<int32_t>(random_rows.begin() + static_cast<size_t>(prob) * k,
                                random_rows.begin() + static_cast<size_t>(prob + 1) * k);
  return detail::plus_plus_rows(p, xd, prob);
}
}  // namespace

}  // namespace kvtier::kernels
