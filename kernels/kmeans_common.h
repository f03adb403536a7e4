// Pieces of spherical k-means shared by the reference, the oneTBB path and the CUDA launcher, so
// every backend starts from the same rows and re-seeds by the same rule. Internal to kernels/.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/kmeans.h"
#include "memory/core/host_device.h"

namespace kvtier::kernels::detail {

/// splitmix64's finalizer: a bijective 64-bit mix.
KVTIER_HOST_DEVICE inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// Seed of one problem's random stream.
KVTIER_HOST_DEVICE inline uint64_t problem_seed(uint64_t seed, int32_t problem) {
  return mix64(seed + 0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(problem) + 1));
}

/// k-means++ draws are counter-based: draw number `trial` for centre `j` of a problem is a hash of
/// (plus_plus_stream(seed, problem), j, trial), so every backend computes any draw on its own,
/// in any order. Centre 0 is sample row plus_plus_draw(stream, 0, 0) % m; trial t of centre
/// j >= 1 uses plus_plus_uniform(plus_plus_draw(stream, j, t)).
KVTIER_HOST_DEVICE inline uint64_t plus_plus_stream(uint64_t seed, int32_t problem) {
  return problem_seed(seed, problem) ^ 0x5eed5eedull;
}
KVTIER_HOST_DEVICE inline uint64_t plus_plus_draw(uint64_t stream, int64_t j, int32_t trial) {
  const uint64_t z = mix64(stream + 0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(j) + 1));
  return mix64(z + 0xD1B54A32D192ED03ull * (static_cast<uint64_t>(trial) + 1));
}
/// The top 53 bits of a draw as a double in [0, 1) (exact, the same on every backend).
KVTIER_HOST_DEVICE inline double plus_plus_uniform(uint64_t draw) {
  return static_cast<double>(draw >> 11) * (1.0 / 9007199254740992.0);
}
/// Candidates per k-means++ centre: 2 + floor(ln k), at most 23 (k < 2^31).
inline int plus_plus_trials(int32_t k) {
  return 2 + static_cast<int>(std::log(static_cast<double>(std::max<int32_t>(k, 1))));
}

/// A k-means++ candidate wins if it is the first whose gain is within this relative tolerance of
/// the largest. Exact ties are common late in the seeding (two mutually nearest untaken rows each
/// gain best[a] + best[b] - d(a, b)); the tolerance, far above the fp32-vs-double difference of
/// such gains, makes every backend break them the same way.
constexpr double kPlusPlusGainTolerance = 1e-5;

/// Number of rows k-means++ draws from: min(n, init_sample), but at least the effective k.
inline int64_t init_sample_size(const KmeansParams& p) {
  return std::max<int64_t>(std::min(p.num_points, p.init_sample), kmeans_effective_k(p));
}

/// Rows k-means++ draws its centres from: all rows if n <= init_sample, else an evenly strided
/// subset (deterministic, covers the whole context): sample row s is row floor(s * n / m).
inline std::vector<int32_t> init_sample_rows(const KmeansParams& p, int32_t /*problem*/) {
  const int64_t n = p.num_points;
  const int64_t m = init_sample_size(p);
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

/// Each non-empty cluster's mean of problem `prob`'s raw rows (in double) over centroids c
/// [k_eff, dim] (KmeansCentroids::kMeanRow); empty clusters keep theirs.
void mean_rows(const KmeansParams& p, const void* points, int32_t prob,
               const std::vector<int32_t>& lab, std::vector<double>* c);

/// Writes one problem's results: centroids c [k_eff, dim] (zero rows past k_eff; with
/// KmeansCentroids::kMeanRow, the non-empty clusters' means of the rows of `points`), sizes
/// counted from `lab`, and the labels, at the problem's offsets in the output arrays.
template <typename T>
void write_problem_outputs(const KmeansParams& p, const void* points, int32_t prob,
                           const std::vector<T>& c, const std::vector<int32_t>& lab,
                           float* centroids, int32_t* labels, int32_t* sizes) {
  const int32_t k = kmeans_effective_k(p), stride = kmeans_centroid_stride(p);
  const int d = p.dim;
  std::vector<double> means;  // kMeanRow: c with the non-empty clusters' means
  if (p.output == KmeansCentroids::kMeanRow) {
    means.assign(c.begin(), c.end());
    mean_rows(p, points, prob, lab, &means);
  }
  std::vector<int32_t> cnt(static_cast<size_t>(k), 0);
  for (int32_t l : lab) ++cnt[l];
  float* cout = centroids + static_cast<size_t>(prob) * stride * d;
  for (int32_t j = 0; j < p.num_clusters; ++j) {
    for (int t = 0; t < d; ++t) {
      const size_t i = static_cast<size_t>(j) * d + t;
      cout[i] = j >= k ? 0.f : static_cast<float>(means.empty() ? c[i] : means[i]);
    }
    sizes[static_cast<size_t>(prob) * stride + j] = j < k ? cnt[j] : 0;
  }
  std::copy(lab.begin(), lab.end(), labels + static_cast<size_t>(prob) * p.num_points);
}

/// Problem `prob`'s rows as unit vectors in double (zero rows stay zero). Throws
/// InvalidArgumentError on NaN or Inf, naming problem, row and column.
void load_unit_rows(const KmeansParams& p, const void* points, int32_t prob,
                    std::vector<double>* out);

/// Greedy k-means++ seeding over init_sample_rows() (see kmeans_ref.cpp): the first centre
/// uniformly, then for each next one plus_plus_trials(k) candidates drawn with probability
/// proportional to (1 - best cos) to the centres so far, keeping the one that lowers the total
/// the most. x: unit rows (double). Returns the k_eff chosen rows, in order.
std::vector<int32_t> plus_plus_rows(const KmeansParams& p, const std::vector<double>& x,
                                    int32_t prob);

}  // namespace kvtier::kernels::detail
