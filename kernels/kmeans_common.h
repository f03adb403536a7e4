// Pieces of spherical k-means shared by the reference, the oneTBB path and the CUDA launcher, so
// every backend starts from the same rows and re-seeds by the same rule. Internal to kernels/.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/kmeans.h"

namespace kvtier::kernels::detail {

/// Seed of one problem's random stream.
inline uint64_t problem_seed(uint64_t seed, int32_t problem) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(problem) + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// Rows k-means++ draws its centres from: all rows if n <= init_sample, else an evenly strided
/// subset (deterministic, covers the whole context).
inline std::vector<int32_t> init_sample_rows(const KmeansParams& p, int32_t /*problem*/) {
  const int64_t n = p.num_points;
  const int64_t m = std::max<int64_t>(std::min(n, p.init_sample), kmeans_effective_k(p));
  std::vector<int32_t> rows(static_cast<size_t>(m));
  for (int64_t s = 0; s < m; ++s) rows[s] = static_cast<int32_t>(s * n / m);
  return rows;
}

/// The `count` rows with the lowest cosine to their centroid (worst fit), lowest index first among
/// equals. Used to re-seed empty clusters.
template <typename T>
std::vector<int64_t> worst_fit_rows(const std::vector<T>& cos_to_centroid, size_t count) {
  std::vector<int64_t> idx(cos_to_centroid.size());
  std::iota(idx.begin(), idx.end(), 0);
  count = std::min(count, idx.size());
  std::partial_sort(idx.begin(), idx.begin() + count, idx.end(), [&](int64_t a, int64_t b) {
    return cos_to_centroid[a] < cos_to_centroid[b] ||
           (cos_to_centroid[a] == cos_to_centroid[b] && a < b);
  });
  idx.resize(count);
  return idx;
}

/// Writes one problem's results: centroids c [k_eff, dim] (zero rows past k_eff), sizes counted
/// from `lab`, and the labels, at the problem's offsets in the output arrays.
template <typename T>
void write_problem_outputs(const KmeansParams& p, int32_t prob, const std::vector<T>& c,
                           const std::vector<int32_t>& lab, float* centroids, int32_t* labels,
                           int32_t* sizes) {
  const int32_t k = kmeans_effective_k(p), stride = kmeans_centroid_stride(p);
  const int d = p.dim;
  std::vector<int32_t> cnt(static_cast<size_t>(k), 0);
  for (int32_t l : lab) ++cnt[l];
  float* cout = centroids + static_cast<size_t>(prob) * stride * d;
  for (int32_t j = 0; j < p.num_clusters; ++j) {
    for (int t = 0; t < d; ++t) cout[j * d + t] = j < k ? static_cast<float>(c[j * d + t]) : 0.f;
    sizes[static_cast<size_t>(prob) * stride + j] = j < k ? cnt[j] : 0;
  }
  std::copy(lab.begin(), lab.end(), labels + static_cast<size_t>(prob) * p.num_points);
}

/// Problem `prob`'s rows as unit vectors in double (zero rows stay zero). Throws
/// InvalidArgumentError on NaN or Inf, naming problem, row and column.
void load_unit_rows(const KmeansParams& p, const void* points, int32_t prob,
                    std::vector<double>* out);

/// k-means++ seeding over init_sample_rows(): the first centre uniformly, each next one drawn with
/// probability proportional to (1 - best cos) to the centres so far. x: unit rows (double).
std::vector<int32_t> plus_plus_rows(const KmeansParams& p, const std::vector<double>& x,
                                    int32_t prob);

}  // namespace kvtier::kernels::detail
