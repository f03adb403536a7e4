// Reference of decode attention: the specification. Every (sequence, query head) on its own, with
// logits, softmax and the weighted sum of V in double; then the fused copies (one memcpy per chunk
// side). Also the parameter and chunk-list validation shared with the oneTBB path, and the dense
// entry points (one chunk per problem).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/decode_attention.h"
#include "memory/core/check.h"
#include "memory/core/half.h"

namespace kvtier::kernels {

void check_decode_attention_params(const DecodeAttentionParams& p) {
  KVTIER_CHECK(p.num_seqs >= 0, "num_seqs must be >= 0, got ", p.num_seqs);
  KVTIER_CHECK(p.num_kv_heads >= 1, "num_kv_heads must be >= 1, got ", p.num_kv_heads);
  KVTIER_CHECK(p.num_q_heads >= 1, "num_q_heads must be >= 1, got ", p.num_q_heads);
  KVTIER_CHECK(p.num_q_heads % p.num_kv_heads == 0, "num_q_heads ", p.num_q_heads,
               " is not a multiple of num_kv_heads ", p.num_kv_heads);
  KVTIER_CHECK(p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256, "head_dim ", p.head_dim,
               " is not supported (supported: 64, 128, 256)");
  KVTIER_CHECK(p.dtype == DType::kF16 || p.dtype == DType::kBF16 || p.dtype == DType::kF32,
               "dtype ", static_cast<int>(p.dtype), " is not fp16, bf16 or fp32");
  KVTIER_CHECK(std::isfinite(p.scale) && p.scale >= 0.f,
               "scale must be finite and >= 0 (0 means 1/sqrt(head_dim)), got ", p.scale);
  KVTIER_CHECK(p.num_splits >= 0, "num_splits must be >= 0 (0 chooses), got ", p.num_splits);
  const int64_t out_rows = static_cast<int64_t>(p.num_seqs) * p.num_q_heads;
  KVTIER_CHECK(out_rows <= std::numeric_limits<int32_t>::max(), "num_seqs ", p.num_seqs,
               " x num_q_heads ", p.num_q_heads, " = ", out_rows, " exceeds 2^31 - 1");
}

float decode_attention_scale(const DecodeAttentionParams& p) {
  return p.scale != 0.f ? p.scale : 1.f / std::sqrt(static_cast<float>(p.head_dim));
}

namespace detail {

void check_decode_attention_tensors(const DecodeAttentionParams& p,
                                    const DecodeAttentionTensors& t) {
  if (p.num_seqs == 0) return;
  KVTIER_CHECK(t.q != nullptr, "q is null");
  KVTIER_CHECK(t.out != nullptr || t.out_at != nullptr, "out is null");
  KVTIER_CHECK(t.chunks != nullptr, "chunks is null");
  KVTIER_CHECK(t.chunk_indptr != nullptr, "chunk_indptr is null");
}

void check_chunk_lists(const DecodeAttentionParams& p, const DecodeAttentionTensors& t,
                       int64_t* problem_rows) {
  const int32_t problems = p.num_seqs * p.num_kv_heads;
  if (problems == 0) return;
  KVTIER_CHECK(t.out != nullptr, "out is null (out_at is read by the GPU path only)");
  const int32_t* indptr = t.chunk_indptr;
  KVTIER_CHECK(indptr[0] >= 0, "chunk_indptr[0] must be >= 0, got ", indptr[0]);
  for (int32_t i = 0; i < problems; ++i) {
    const int32_t end = chunk_list_end(t, i);
    if (t.chunk_end != nullptr) {
      KVTIER_CHECK(indptr[i] >= 0, "chunk_indptr[", i, "] must be >= 0, got ", indptr[i]);
      KVTIER_CHECK(end >= indptr[i], "chunk_end[", i, "] = ", end, " is below chunk_indptr[", i,
                   "] = ", indptr[i]);
    } else {
      KVTIER_CHECK(end >= indptr[i], "chunk_indptr[", i + 1, "] = ", end, " is below chunk_indptr[",
                   i, "] = ", indptr[i], " (problem ", i, ")");
    }
    int64_t rows = 0;
    for (int32_t c = indptr[i]; c < end; ++c) {
      const KvChunk& ch = t.chunks[c];
      KVTIER_CHECK(ch.num_rows >= 0, "problem ", i, ": chunk ", c, " has num_rows ", ch.num_rows);
      KVTIER_CHECK(ch.num_rows == 0 || (ch.k != nullptr && ch.v != nullptr), "problem ", i,
                   ": chunk ", c, " has ", ch.num_rows, " rows and a null ",
                   ch.k == nullptr ? "k" : "v");
      rows += ch.num_rows;
    }
    problem_rows[i] = rows;
  }
}

void check_dense_tensors(const DecodeAttentionParams& p, const DenseDecodeTensors& t) {
  KVTIER_CHECK(t.max_len >= 0, "max_len must be >= 0, got ", t.max_len);
  KVTIER_CHECK(t.max_len <= std::numeric_limits<int32_t>::max(), "max_len ", t.max_len,
               " exceeds 2^31 - 1");
  if (p.num_seqs == 0) return;
  KVTIER_CHECK(t.q != nullptr, "q is null");
  KVTIER_CHECK(t.out != nullptr, "out is null");
  KVTIER_CHECK(t.seq_lens != nullptr, "seq_lens is null");
  KVTIER_CHECK(t.max_len == 0 || (t.k != nullptr && t.v != nullptr), "k or v is null");
}

DenseAsChunks dense_as_chunks(const DecodeAttentionParams& p, const DenseDecodeTensors& t) {
  check_decode_attention_params(p);
  check_dense_tensors(p, t);
  DenseAsChunks d;
  const int32_t problems = p.num_seqs * p.num_kv_heads;
  d.chunks.resize(static_cast<size_t>(problems));
  d.indptr.resize(static_cast<size_t>(problems) + 1);
  const size_t row_bytes = dtype_size(p.dtype) * static_cast<size_t>(p.head_dim);
  for (int32_t s = 0; s < p.num_seqs; ++s) {
    const int32_t len = t.seq_lens[s];
    KVTIER_CHECK(len >= 0 && len <= t.max_len, "seq_lens[", s, "] = ", len, " is not in [0, ",
                 t.max_len, "] (max_len)");
    for (int32_t h = 0; h < p.num_kv_heads; ++h) {
      const int32_t i = s * p.num_kv_heads + h;
      const size_t offset = static_cast<size_t>(i) * static_cast<size_t>(t.max_len) * row_bytes;
      KvChunk& c = d.chunks[static_cast<size_t>(i)];
      c.k = static_cast<const std::byte*>(t.k) + offset;
      c.v = static_cast<const std::byte*>(t.v) + offset;
      c.num_rows = len;
    }
  }
  for (int32_t i = 0; i <= problems; ++i) d.indptr[static_cast<size_t>(i)] = i;
  d.tensors.q = t.q;
  d.tensors.chunks = d.chunks.data();
  d.tensors.chunk_indptr = d.indptr.data();
  d.tensors.out = t.out;
  d.tensors.lse = t.lse;
  return d;
}

}  // namespace detail

void decode_attention_ref(const DecodeAttentionParams& p, const DecodeAttentionTensors& t) {
  check_decode_attention_params(p);
  detail::check_decode_attention_tensors(p, t);
  const int32_t problems = p.num_seqs * p.num_kv_heads;
  std::vector<int64_t> problem_rows(static_cast<size_t>(problems));
  detail::check_chunk_lists(p, t, problem_rows.data());

  const int32_t D = p.head_dim, G = p.num_q_heads / p.num_kv_heads;
  const size_t row_bytes = dtype_size(p.dtype) * static_cast<size_t>(D);
  const double scale = decode_attention_scale(p);
  std::vector<const std::byte*> k_rows, v_rows;
  std::vector<double> logits;
  for (int32_t i = 0; i < problems; ++i) {
    const int32_t seq = i / p.num_kv_heads, kv_head = i % p.num_kv_heads;
    // The problem's rows, in chunk order.
    k_rows.clear();
    v_rows.clear();
    for (int32_t c = t.chunk_indptr[i]; c < detail::chunk_list_end(t, i); ++c) {
      const KvChunk& ch = t.chunks[c];
      for (int32_t r = 0; r < ch.num_rows; ++r) {
        k_rows.push_back(static_cast<const std::byte*>(ch.k) + static_cast<size_t>(r) * row_bytes);
        v_rows.push_back(static_cast<const std::byte*>(ch.v) + static_cast<size_t>(r) * row_bytes);
      }
    }
    const size_t n = k_rows.size();
    for (int32_t g = 0; g < G; ++g) {
      const size_t out_row = static_cast<size_t>(seq) * p.num_q_heads + kv_head * G + g;
      const size_t q0 = out_row * D;
      if (n == 0) {
        for (int32_t d = 0; d < D; ++d) store_from_float(t.out, p.dtype, q0 + d, 0.f);
        if (t.lse) t.lse[out_row] = -std::numeric_limits<float>::infinity();
        continue;
      }
      logits.resize(n);
      double mx = -std::numeric_limits<double>::infinity();
      for (size_t r = 0; r < n; ++r) {
        double dot = 0.0;
        for (int32_t d = 0; d < D; ++d) {
          dot += static_cast<double>(load_as_float(t.q, p.dtype, q0 + d)) *
                 static_cast<double>(load_as_float(k_rows[r], p.dtype, static_cast<size_t>(d)));
        }
        logits[r] = scale * dot;
        mx = std::max(mx, logits[r]);
      }
      double sum = 0.0;
      for (size_t r = 0; r < n; ++r) sum += std::exp(logits[r] - mx);
      for (int32_t d = 0; d < D; ++d) {
        double o = 0.0;
        for (size_t r = 0; r < n; ++r) {
          o += std::exp(logits[r] - mx) *
               static_cast<double>(load_as_float(v_rows[r], p.dtype, static_cast<size_t>(d)));
        }
        store_from_float(t.out, p.dtype, q0 + d, static_cast<float>(o / sum));
      }
      if (t.lse) t.lse[out_row] = static_cast<float>(mx + std::log(sum));
    }
  }
  // Fused fetch: every row of a chunk with a destination lands there, once.
  for (int32_t i = 0; i < problems; ++i) {
    for (int32_t c = t.chunk_indptr[i]; c < detail::chunk_list_end(t, i); ++c) {
      const KvChunk& ch = t.chunks[c];
      const size_t bytes = static_cast<size_t>(ch.num_rows) * row_bytes;
      if (ch.k_copy != nullptr && bytes > 0) std::memcpy(ch.k_copy, ch.k, bytes);
      if (ch.v_copy != nullptr && bytes > 0) std::memcpy(ch.v_copy, ch.v, bytes);
    }
  }
}

void dense_decode_attention_ref(const DecodeAttentionParams& p, const DenseDecodeTensors& t) {
  const detail::DenseAsChunks d = detail::dense_as_chunks(p, t);
  decode_attention_ref(p, d.tensors);
}

}  // namespace kvtier::kernels
