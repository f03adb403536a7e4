// oneTBB host path of decode attention. Problems are cut into pieces of at most kPieceRows rows
// (by row count only, so the result does not depend on the thread count); each piece converts a
// K and a V row to fp32 once for all G heads of its group and keeps an fp32 online softmax per
// head; a second pass merges each problem's pieces by log-sum-exp. Fused copies are done by the
// piece that reads the rows.
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/decode_attention.h"
#include "memory/core/check.h"
#include "memory/core/half.h"

namespace kvtier::kernels {

namespace {

/// Rows per piece: a 128K-row problem becomes 64 tasks, a 2K-row one stays whole.
constexpr int64_t kPieceRows = 2048;

struct Piece {
  int32_t problem;
  int64_t begin, end;  // rows of the problem
};

/// Converts n elements of a row of `dtype` to float.
void row_to_float(const std::byte* src, DType dtype, int32_t n, float* dst) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      break;
    case DType::kBF16: {
      const auto* h = reinterpret_cast<const uint16_t*>(src);
      for (int32_t d = 0; d < n; ++d) dst[d] = bf16_to_float(h[d]);
      break;
    }
    case DType::kF16: {
      const auto* h = reinterpret_cast<const uint16_t*>(src);
      for (int32_t d = 0; d < n; ++d) dst[d] = fp16_to_float(h[d]);
      break;
    }
  }
}

/// Online-softmax state of one piece: per head m (max logit), l (sum of exp(logit - m)) and
/// acc[D] (sum of exp(logit - m) * V). Stored as [G][D + 2] floats: m, l, acc.
void run_piece(const DecodeAttentionParams& p, const DecodeAttentionTensors& t, const Piece& pc,
               float* state) {
  const int32_t D = p.head_dim, G = p.num_q_heads / p.num_kv_heads;
  const size_t row_bytes = dtype_size(p.dtype) * static_cast<size_t>(D);
  const int32_t seq = pc.problem / p.num_kv_heads, kv_head = pc.problem % p.num_kv_heads;
  const float scale = decode_attention_scale(p);
  std::vector<float> q(static_cast<size_t>(G) * D), k(D), v(D), logit(G);
  for (int32_t g = 0; g < G; ++g) {
    const size_t row = static_cast<size_t>(seq) * p.num_q_heads + kv_head * G + g;
    row_to_float(static_cast<const std::byte*>(t.q) + row * row_bytes, p.dtype, D,
                 q.data() + static_cast<size_t>(g) * D);
    for (int32_t d = 0; d < D; ++d) q[static_cast<size_t>(g) * D + d] *= scale;
  }
  const size_t stride = static_cast<size_t>(D) + 2;
  for (int32_t g = 0; g < G; ++g) {
    float* s = state + g * stride;
    s[0] = -std::numeric_limits<float>::infinity();
    std::fill(s + 1, s + stride, 0.f);
  }
  int64_t chunk_begin = 0;  // first row of chunk c within the problem
  for (int32_t c = t.chunk_indptr[pc.problem];
       c < detail::chunk_list_end(t, pc.problem) && chunk_begin < pc.end; ++c) {
    const KvChunk& ch = t.chunks[c];
    const int64_t lo = std::max(pc.begin, chunk_begin);
    const int64_t hi = std::min(pc.end, chunk_begin + ch.num_rows);
    const int64_t first = chunk_begin;
    chunk_begin += ch.num_rows;
    if (lo >= hi) continue;
    const auto* kb = static_cast<const std::byte*>(ch.k);
    const auto* vb = static_cast<const std::byte*>(ch.v);
    const size_t off = static_cast<size_t>(lo - first) * row_bytes;
    const size_t bytes = static_cast<size_t>(hi - lo) * row_bytes;
    if (ch.k_copy != nullptr)
      std::memcpy(static_cast<std::byte*>(ch.k_copy) + off, kb + off, bytes);
    if (ch.v_copy != nullptr)
      std::memcpy(static_cast<std::byte*>(ch.v_copy) + off, vb + off, bytes);
    for (int64_t r = lo; r < hi; ++r) {
      const size_t ro = static_cast<size_t>(r - first) * row_bytes;
      row_to_float(kb + ro, p.dtype, D, k.data());
      row_to_float(vb + ro, p.dtype, D, v.data());
      for (int32_t g = 0; g < G; ++g) {
        const float* qg = q.data() + static_cast<size_t>(g) * D;
        float dot = 0.f;
        for (int32_t d = 0; d < D; ++d) dot += qg[d] * k[d];
        float* s = state + g * stride;
        float* acc = s + 2;
        if (dot > s[0]) {  // new maximum: rescale what was summed so far
          const float corr = std::exp(s[0] - dot);
          s[1] *= corr;
          for (int32_t d = 0; d < D; ++d) acc[d] *= corr;
          s[0] = dot;
        }
        const float w = std::exp(dot - s[0]);
        s[1] += w;
        for (int32_t d = 0; d < D; ++d) acc[d] += w * v[d];
      }
    }
  }
}

void attention_cpu(const DecodeAttentionParams& p, const DecodeAttentionTensors& t) {
  check_decode_attention_params(p);
  detail::check_decode_attention_tensors(p, t);
  const int32_t problems = p.num_seqs * p.num_kv_heads;
  if (problems == 0) return;
  std::vector<int64_t> rows(static_cast<size_t>(problems));
  detail::check_chunk_lists(p, t, rows.data());

  // Pieces in problem order; problem i's pieces are [piece_begin[i], piece_begin[i + 1]).
  std::vector<Piece> pieces;
  std::vector<size_t> piece_begin(static_cast<size_t>(problems) + 1);
  for (int32_t i = 0; i < problems; ++i) {
    piece_begin[static_cast<size_t>(i)] = pieces.size();
    const int64_t n = rows[static_cast<size_t>(i)];
    for (int64_t b = 0; b < n; b += kPieceRows)
      pieces.push_back({i, b, std::min(n, b + kPieceRows)});
  }
  piece_begin[static_cast<size_t>(problems)] = pieces.size();

  const int32_t D = p.head_dim, G = p.num_q_heads / p.num_kv_heads;
  const size_t stride = static_cast<size_t>(D) + 2, piece_floats = static_cast<size_t>(G) * stride;
  std::vector<float> states(pieces.size() * piece_floats);
  tbb::parallel_for(tbb::blocked_range<size_t>(0, pieces.size(), 1),
                    [&](const tbb::blocked_range<size_t>& r) {
                      for (size_t i = r.begin(); i != r.end(); ++i)
                        run_piece(p, t, pieces[i], states.data() + i * piece_floats);
                    });

  tbb::parallel_for(
      tbb::blocked_range<int32_t>(0, problems), [&](const tbb::blocked_range<int32_t>& r) {
        std::vector<double> o(D);
        for (int32_t i = r.begin(); i != r.end(); ++i) {
          const int32_t seq = i / p.num_kv_heads, kv_head = i % p.num_kv_heads;
          const size_t first = piece_begin[static_cast<size_t>(i)];
          const size_t last = piece_begin[static_cast<size_t>(i) + 1];
          for (int32_t g = 0; g < G; ++g) {
            const size_t out_row = static_cast<size_t>(seq) * p.num_q_heads + kv_head * G + g;
            double m = -std::numeric_limits<double>::infinity();
            for (size_t j = first; j < last; ++j)
              m = std::max<double>(m, states[j * piece_floats + g * stride]);
            std::fill(o.begin(), o.end(), 0.0);
            double l = 0.0;
            if (m > -std::numeric_limits<double>::infinity()) {
              for (size_t j = first; j < last; ++j) {
                const float* s = states.data() + j * piece_floats + g * stride;
                const double w = std::exp(static_cast<double>(s[0]) - m);
                l += w * s[1];
                for (int32_t d = 0; d < D; ++d) o[d] += w * s[2 + d];
              }
            }
            for (int32_t d = 0; d < D; ++d) {
              store_from_float(t.out, p.dtype, out_row * D + d,
                               l > 0 ? static_cast<float>(o[d] / l) : 0.f);
            }
            if (t.lse) {
              t.lse[out_row] = l > 0 ? static_cast<float>(m + std::log(l))
                                     : -std::numeric_limits<float>::infinity();
            }
          }
        }
      });
}

}  // namespace

void decode_attention_cpu(const DecodeAttentionParams& p, const DecodeAttentionTensors& t) {
  attention_cpu(p, t);
}

void dense_decode_attention_cpu(const DecodeAttentionParams& p, const DenseDecodeTensors& t) {
  const detail::DenseAsChunks d = detail::dense_as_chunks(p, t);
  attention_cpu(p, d.tensors);
}

}  // namespace kvtier::kernels
