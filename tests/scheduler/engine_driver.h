// Test driver shared by the engine's CPU and GPU suites: a dense oracle that keeps every row,
// a key generator with cluster structure, and a driver that feeds an engine and the oracle the
// same rows (device copies on the CUDA backend) and compares every output.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#if KVTIER_WITH_CUDA
#include <cuda_runtime.h>
#endif

#include "memory/core/check.h"
#include "memory/core/cuda_raii.h"
#include "memory/core/half.h"
#include "memory/core/status.h"
#include "scheduler/engine.h"
#include "tests/common/test_util.h"

namespace kvtier::test_engine {

// fp16 rows and outputs: the engine and the dense oracle differ by the output's rounding and
// fp32 accumulation order.
inline constexpr double kTol = 2e-3;

struct Shape {
  int32_t L = 3, Hq = 8, Hkv = 2, D = 64;
};

inline EngineConfig make_config(Mode mode, const Shape& s, DType dtype = DType::kF16) {
  EngineConfig c;
  c.model = ModelShape{s.L, s.Hq, s.Hkv, s.D, dtype};
  c.mode = mode;
  c.backend = Backend::kCpu;
  c.budget = 1 << 20;
  c.sink = 4;
  c.window = 16;
  c.tokens_per_cluster = 8;
  c.window_clusters = 2;
  c.retention_steps = 2;
  c.page_size = 4;
  c.num_dense_layers = 1;
  c.host_bytes_limit = 64 << 20;
  c.max_sequences = 4;
  c.max_batch = 4;
  c.max_context = 4096;
  c.kmeans_iters = 8;
  return c;
}

/// Every row of every (sequence, layer, KV head), in token order, as float: dense attention.
struct Oracle {
  Shape s;
  std::map<SeqId, std::vector<std::vector<float>>> k, v;  // [layer][head * rows * D ...]
  std::map<SeqId, std::vector<int64_t>> rows;             // [layer]

  void add(SeqId id) {
    k[id].assign(s.L, {});
    v[id].assign(s.L, {});
    rows[id].assign(s.L, 0);
  }
  void remove(SeqId id) {
    k.erase(id);
    v.erase(id);
    rows.erase(id);
  }
  // kv given token-major [n, Hkv, D].
  void append(SeqId id, int32_t l, const std::vector<float>& kk, const std::vector<float>& vv,
              int64_t n) {
    std::vector<float>& K = k[id][l];
    std::vector<float>& V = v[id][l];
    const int64_t old = rows[id][l];
    std::vector<float> nk(static_cast<size_t>(s.Hkv) * (old + n) * s.D),
        nv(static_cast<size_t>(s.Hkv) * (old + n) * s.D);
    for (int32_t h = 0; h < s.Hkv; ++h) {
      for (int64_t r = 0; r < old + n; ++r) {
        for (int32_t d = 0; d < s.D; ++d) {
          const size_t dst = (static_cast<size_t>(h) * (old + n) + r) * s.D + d;
          if (r < old) {
            nk[dst] = K[(static_cast<size_t>(h) * old + r) * s.D + d];
            nv[dst] = V[(static_cast<size_t>(h) * old + r) * s.D + d];
          } else {
            nk[dst] = kk[((r - old) * s.Hkv + h) * s.D + d];
            nv[dst] = vv[((r - old) * s.Hkv + h) * s.D + d];
          }
        }
      }
    }
    K.swap(nk);
    V.swap(nv);
    rows[id][l] = old + n;
  }
  // out [Hq, D] for query q [Hq, D]; lse [Hq] (natural log of the scaled logits' exp sum).
  std::vector<float> attend(SeqId id, int32_t l, const float* q,
                            std::vector<double>* lse = nullptr) const {
    const int32_t G = s.Hq / s.Hkv;
    const int64_t n = rows.at(id)[l];
    const std::vector<float>& K = k.at(id)[l];
    const std::vector<float>& V = v.at(id)[l];
    std::vector<float> out(static_cast<size_t>(s.Hq) * s.D, 0.f);
    const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
    for (int32_t qh = 0; qh < s.Hq; ++qh) {
      const int32_t h = qh / G;
      std::vector<double> logit(n);
      double mx = -1e300;
      for (int64_t r = 0; r < n; ++r) {
        double dot = 0;
        for (int32_t d = 0; d < s.D; ++d)
          dot += static_cast<double>(q[qh * s.D + d]) * K[(h * n + r) * s.D + d];
        logit[r] = dot * scale;
        mx = std::max(mx, logit[r]);
      }
      double sum = 0;
      for (int64_t r = 0; r < n; ++r) sum += std::exp(logit[r] - mx);
      if (lse) lse->push_back(n > 0 ? mx + std::log(sum) : -INFINITY);
      for (int32_t d = 0; d < s.D; ++d) {
        double acc = 0;
        for (int64_t r = 0; r < n; ++r) acc += std::exp(logit[r] - mx) * V[(h * n + r) * s.D + d];
        out[qh * s.D + d] = static_cast<float>(acc / sum);
      }
    }
    return out;
  }
};

/// How keys are drawn: around `num_dirs` directions, each of norm `norm` (0: Gaussian
/// directions with entries of std 1.5), plus Gaussian noise of std `noise`. Queries are drawn
/// the same way, so a large norm with little noise makes attention peaked on one direction's
/// rows. Values are Gaussian.
struct GenParams {
  int num_dirs = 6;
  float norm = 0.f;
  float noise = 0.3f;
};

struct Gen {
  std::mt19937_64 rng;
  std::normal_distribution<float> g{0.f, 1.f};
  GenParams p;
  std::vector<std::vector<float>> dirs;
  Gen(uint64_t seed, int32_t D, GenParams params = {}) : rng(seed), p(params) {
    for (int i = 0; i < p.num_dirs; ++i) {
      std::vector<float> d(D);
      float sq = 0.f;
      for (float& x : d) x = g(rng) * 1.5f, sq += x * x;
      if (p.norm > 0.f) {
        for (float& x : d) x *= p.norm / std::sqrt(sq);
      }
      dirs.push_back(d);
    }
  }
  std::vector<float> keys(int64_t n, int32_t Hkv, int32_t D) {
    std::vector<float> out(static_cast<size_t>(n) * Hkv * D);
    for (int64_t r = 0; r < n * Hkv; ++r) {
      const std::vector<float>& d = dirs[rng() % dirs.size()];
      for (int32_t t = 0; t < D; ++t) out[r * D + t] = d[t] + p.noise * g(rng);
    }
    return out;
  }
  std::vector<float> normal(size_t n) {
    std::vector<float> out(n);
    for (float& x : out) x = g(rng);
    return out;
  }
};

inline std::vector<uint16_t> to_dtype16(const std::vector<float>& x, DType t) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    out[i] = t == DType::kBF16 ? float_to_bf16(x[i]) : float_to_fp16(x[i]);
  }
  return out;
}
/// x in dtype t, as the engine reads it.
inline std::vector<std::byte> encode(const std::vector<float>& x, DType t) {
  std::vector<std::byte> out(x.size() * dtype_size(t));
  for (size_t i = 0; i < x.size(); ++i) store_from_float(out.data(), t, i, x[i]);
  return out;
}
inline std::vector<float> round_trip(const std::vector<float>& x, DType t) {
  if (t == DType::kF32) return x;
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    out[i] =
        t == DType::kBF16 ? bf16_to_float(float_to_bf16(x[i])) : fp16_to_float(float_to_fp16(x[i]));
  }
  return out;
}

/// Drives an engine and the oracle with the same rows; checks every output.
class Driver {
 public:
  Driver(const EngineConfig& c, uint64_t seed, GenParams gp = {})
      : cfg_(c), e_(c), gen_(seed, c.model.head_dim, gp) {
    s_.L = c.model.num_layers;
    s_.Hq = c.model.num_q_heads;
    s_.Hkv = c.model.num_kv_heads;
    s_.D = c.model.head_dim;
    oracle_.s = s_;
  }
  Engine& engine() { return e_; }

  void add(SeqId id, int64_t prompt, bool head_major) {
    e_.add_sequence(id);
    oracle_.add(id);
    for (int32_t l = 0; l < s_.L; ++l) {
      const std::vector<float> k = round_trip(gen_.keys(prompt, s_.Hkv, s_.D), cfg_.model.dtype);
      const std::vector<float> v =
          round_trip(gen_.normal(static_cast<size_t>(prompt) * s_.Hkv * s_.D), cfg_.model.dtype);
      oracle_.append(id, l, k, v, prompt);
      // The engine gets token-major rows, or head-major ones through strides.
      std::vector<float> kk = k, vv = v;
      memory::KvRows rows;
      rows.dtype = cfg_.model.dtype;
      rows.num_kv_heads = s_.Hkv;
      rows.head_dim = s_.D;
      rows.num_rows = prompt;
      if (head_major) {
        for (int64_t r = 0; r < prompt; ++r)
          for (int32_t h = 0; h < s_.Hkv; ++h)
            for (int32_t d = 0; d < s_.D; ++d) {
              kk[(h * prompt + r) * s_.D + d] = k[(r * s_.Hkv + h) * s_.D + d];
              vv[(h * prompt + r) * s_.D + d] = v[(r * s_.Hkv + h) * s_.D + d];
            }
      } else {
        rows.head_stride = s_.D;
        rows.row_stride = static_cast<int64_t>(s_.Hkv) * s_.D;
      }
      prefill(id, l, kk, vv, rows);
    }
  }
  void remove(SeqId id) {
    e_.remove_sequence(id);
    oracle_.remove(id);
  }

  /// One decode step for `batch`; returns the largest |engine - dense| over all outputs.
  double step(const std::vector<SeqId>& batch) {
    double worst = 0;
    const int32_t B = static_cast<int32_t>(batch.size());
    for (int32_t l = 0; l < s_.L; ++l) {
      const std::vector<float> q = round_trip(
          gen_.keys(static_cast<int64_t>(B) * s_.Hq / s_.Hkv, s_.Hkv, s_.D), cfg_.model.dtype);
      const std::vector<float> k = round_trip(gen_.keys(B, s_.Hkv, s_.D), cfg_.model.dtype);
      const std::vector<float> v =
          round_trip(gen_.normal(static_cast<size_t>(B) * s_.Hkv * s_.D), cfg_.model.dtype);
      for (int32_t i = 0; i < B; ++i) {
        oracle_.append(
            batch[i], l,
            std::vector<float>(k.begin() + i * s_.Hkv * s_.D, k.begin() + (i + 1) * s_.Hkv * s_.D),
            std::vector<float>(v.begin() + i * s_.Hkv * s_.D, v.begin() + (i + 1) * s_.Hkv * s_.D),
            1);
      }
      std::vector<float> lse;
      const std::vector<float> out = decode(l, batch, q, k, v, &lse);
      outputs_.insert(outputs_.end(), out.begin(), out.end());
      for (int32_t i = 0; i < B; ++i) {
        std::vector<double> want_lse;
        const std::vector<float> want =
            oracle_.attend(batch[i], l, &q[i * s_.Hq * s_.D], &want_lse);
        for (size_t j = 0; j < want.size(); ++j) {
          worst =
              std::max(worst, static_cast<double>(std::fabs(want[j] - out[i * s_.Hq * s_.D + j])));
        }
        // The log-sum-exp the engine reports, over the same rows (scaled by 1/8 so that the
        // tolerance compares like the outputs'; it is fp32 either way).
        for (int32_t h = 0; h < s_.Hq; ++h) {
          const double got = lse[static_cast<size_t>(i) * s_.Hq + h], w = want_lse[h];
          const double err = std::isinf(w) && got == w ? 0.0 : std::fabs(got - w) / 8;
          worst = std::max(worst, std::isnan(err) ? 1e9 : err);
        }
      }
    }
    e_.end_step();
    return worst;
  }
  /// Every decode output so far, in call order.
  const std::vector<float>& outputs() const { return outputs_; }

 private:
  void prefill(SeqId id, int32_t l, const std::vector<float>& k, const std::vector<float>& v,
               memory::KvRows rows) {
    const std::vector<std::byte> k16 = encode(k, cfg_.model.dtype);
    const std::vector<std::byte> v16 = encode(v, cfg_.model.dtype);
    rows.k = k16.data();
    rows.v = v16.data();
#if KVTIER_WITH_CUDA
    if (cfg_.backend == Backend::kCuda) {
      Dev dk(k16), dv(v16);
      rows.k = dk.get();
      rows.v = dv.get();
      e_.prefill_layer(id, l, rows, stream());
      KVTIER_CUDA_CHECK(cudaStreamSynchronize(stream()));
      return;
    }
#endif
    e_.prefill_layer(id, l, rows);
  }
  std::vector<float> decode(int32_t l, const std::vector<SeqId>& batch, const std::vector<float>& q,
                            const std::vector<float>& k, const std::vector<float>& v,
                            std::vector<float>* lse) {
    DecodeBatch b;
    lse->assign(batch.size() * static_cast<size_t>(s_.Hq), std::nanf(""));
    b.lse = lse->data();
    b.seqs = batch.data();
    b.num_seqs = static_cast<int32_t>(batch.size());
    std::vector<float> out(q.size());
    const std::vector<std::byte> q16 = encode(q, cfg_.model.dtype);
    const std::vector<std::byte> k16 = encode(k, cfg_.model.dtype);
    const std::vector<std::byte> v16 = encode(v, cfg_.model.dtype);
    std::vector<std::byte> o16(q16.size());
    b.q = q16.data();
    b.k_new = k16.data();
    b.v_new = v16.data();
    b.out = o16.data();
#if KVTIER_WITH_CUDA
    if (cfg_.backend == Backend::kCuda) {
      std::vector<std::byte> lse_bytes(lse->size() * sizeof(float));
      std::memcpy(lse_bytes.data(), lse->data(), lse_bytes.size());
      Dev dq(q16), dk(k16), dv(v16), dout(o16), dlse(lse_bytes);
      b.q = dq.get();
      b.k_new = dk.get();
      b.v_new = dv.get();
      b.out = dout.get();
      b.lse = static_cast<float*>(dlse.get());
      e_.decode_layer(l, b, stream());
      KVTIER_CUDA_CHECK(cudaStreamSynchronize(stream()));
      dout.download(o16);
      dlse.download(lse_bytes);
      std::memcpy(lse->data(), lse_bytes.data(), lse_bytes.size());
    } else {
      e_.decode_layer(l, b);
    }
#else
    e_.decode_layer(l, b);
#endif
    for (size_t i = 0; i < out.size(); ++i) out[i] = load_as_float(o16.data(), cfg_.model.dtype, i);
    return out;
  }

#if KVTIER_WITH_CUDA
  /// A device copy of a host vector, complete on return (upload_complete).
  struct Dev {
    explicit Dev(const std::vector<std::byte>& h) : buf(std::max<size_t>(h.size(), 16), 0) {
      test::upload_complete(buf.get(), h.data(), h.size());
    }
    void download(std::vector<std::byte>& h) const {
      KVTIER_CUDA_CHECK(cudaMemcpy(h.data(), buf.get(), h.size(), cudaMemcpyDeviceToHost));
    }
    void* get() const { return buf.get(); }
    cuda::DeviceBuffer<std::byte> buf;
  };
  std::unique_ptr<cuda::Stream> stream_;  // CUDA backend only: a CPU run needs no driver
  cudaStream_t stream() {
    if (!stream_) stream_ = std::make_unique<cuda::Stream>(0);
    return stream_->get();
  }
#endif
  EngineConfig cfg_;
  std::vector<float> outputs_;
  Shape s_;
  Engine e_;
  Gen gen_;
  Oracle oracle_;
};

/// last_selection: per KV head, the clusters of the last step in selection order, each once
/// (budget 4096 covers the context: every non-empty cluster; run_churn's lse checks cover that
/// attention used all their rows); dense layers and sequences not decoded in that step have
/// none; a layer out of range throws.
inline void check_last_selection(Backend backend) {
  for (const int32_t budget : {4096, 40}) {
    EngineConfig c = make_config(Mode::kClusterKV, Shape{});
    c.backend = backend;
    c.budget = budget;
    Driver d(c, test::test_seed() + 60);
    d.add(7, 150, false);
    d.add(8, 90, true);
    EXPECT_LT(d.step({7, 8}), budget == 4096 ? kTol : 10.0);
    d.step({7});
    const Engine& e = d.engine();
    bool any_recall = false;
    for (int32_t l = 0; l < c.model.num_layers; ++l) {
      const auto sel7 = e.last_selection(7, l), sel8 = e.last_selection(8, l);
      EXPECT_TRUE(sel8.empty()) << "sequence 8 was not decoded in the last step; layer " << l;
      if (!e.is_recall_layer(l)) {
        EXPECT_TRUE(sel7.empty()) << "dense layer " << l;
        continue;
      }
      any_recall = true;
      ASSERT_EQ(sel7.size(), static_cast<size_t>(c.model.num_kv_heads)) << "layer " << l;
      for (const auto& ids : sel7) {
        EXPECT_FALSE(ids.empty()) << "layer " << l;
        const std::set<int32_t> unique(ids.begin(), ids.end());
        EXPECT_EQ(unique.size(), ids.size()) << "layer " << l;
        EXPECT_GE(*unique.begin(), 0) << "layer " << l;
      }
    }
    EXPECT_TRUE(any_recall);
    EXPECT_TRUE(e.last_selection(999, c.num_dense_layers).empty());
    EXPECT_THROW((void)e.last_selection(7, c.model.num_layers), InvalidArgumentError);
  }
}

/// A committed window's clusters enter the cache from the window's rows: with a budget covering
/// the context (every cluster selected every step), once the prompt's clusters are cached (a few
/// steps) no step misses, where without admission each window's clusters miss when first
/// selected. Outputs equal dense attention either way. The engine settles after every step, so
/// each window commits at a step fixed by the backend (kCpu: where its job starts; kCuda: at the
/// next end_step).
inline void check_window_admission(Backend backend) {
  for (const bool admit : {true, false}) {
    SCOPED_TRACE(admit ? "admitted" : "recalled");
    EngineConfig c = make_config(Mode::kClusterKV, Shape{});
    c.backend = backend;
    c.budget = 4096;
    c.admit_window_clusters = admit;
    Driver d(c, test::test_seed() + 61);
    d.add(1, 150, true);
    d.add(2, 93, false);
    double worst = 0;
    int64_t late_misses = 0;  // from step 6 on, when the prompts' clusters are cached
    for (int t = 0; t < 64; ++t) {
      const EngineStats before = d.engine().stats();
      worst = std::max(worst, d.step({1, 2}));
      d.engine().synchronize();  // the step's lookups are counted
      if (t < 6) continue;
      const int64_t m = d.engine().stats().recall_misses - before.recall_misses;
      if (admit) {
        EXPECT_EQ(m, 0) << "step " << t;
      }
      late_misses += m;
    }
    EXPECT_LT(worst, kTol);
    const EngineStats s = d.engine().stats();
    // W = 16: each sequence's first window fills at step 15 - (prompt rows past the sink) % 16,
    // then every 16 steps: 4 windows per sequence and recall layer in 64 steps.
    EXPECT_EQ(s.window_clusterings, 2 * 2 * 4);
    if (admit) {
      EXPECT_EQ(s.window_admissions, s.cache.admitted);
      EXPECT_GT(s.window_admissions, 0);
    } else {
      EXPECT_EQ(s.window_admissions, 0);
      EXPECT_GT(late_misses, 0);  // each window's clusters, when first selected
    }
  }
}

/// Sequences join (prompts of 0 to 150 rows, both layouts) and leave; ragged batches; many
/// steps, so windows are clustered and appended several times. With `settle`, the engine's
/// background work finishes after every step, so a window's clusters join the index at the same
/// step in every run (otherwise when its job happens to land): two settled runs of one seed sum
/// the same rows in the same order wherever their kernels do.
inline double run_churn(const EngineConfig& c, uint64_t seed, int steps,
                        std::vector<float>* outputs = nullptr, EngineStats* stats = nullptr,
                        bool settle = false) {
  Driver d(c, seed);
  std::mt19937_64 rng(seed);
  std::vector<SeqId> live;
  SeqId next = 100;
  const int64_t prompts[] = {0, 3, 37, 150, 64};
  for (int i = 0; i < 3; ++i) {
    d.add(next, prompts[i], i % 2 == 0);
    live.push_back(next++);
  }
  double worst = 0;
  for (int t = 0; t < steps; ++t) {
    if (t % 17 == 9 && live.size() > 1) {  // one leaves
      const size_t victim = rng() % live.size();
      d.remove(live[victim]);
      live.erase(live.begin() + static_cast<int64_t>(victim));
    }
    if (t % 13 == 5 && live.size() < 4) {  // one joins
      d.add(next, prompts[rng() % 5], rng() % 2 == 0);
      live.push_back(next++);
    }
    std::vector<SeqId> batch;
    for (const SeqId id : live) {
      if (rng() % 4 != 0 || batch.empty()) batch.push_back(id);
    }
    worst = std::max(worst, d.step(batch));
    if (settle) d.engine().synchronize();
  }
  if (outputs) *outputs = d.outputs();
  if (stats) *stats = d.engine().stats();
  return worst;
}

/// Peaked attention (keys in 32 well-separated groups, each query head aimed at one group) and a
/// budget of about 1/5 of the context: the selected clusters must carry nearly all attention
/// mass. Returns the largest |engine - dense| over 20 steps of 2 layers.
inline double run_peaked(EngineConfig c, uint64_t seed, EngineStats* stats,
                         const Shape& shape = Shape{2, 4, 1, 64}) {
  c.model = ModelShape{shape.L, shape.Hq, shape.Hkv, shape.D, c.model.dtype};
  c.budget = 384;
  c.num_dense_layers = 0;
  c.window = 32;
  // One row per window cluster: decode rows come from random groups, and a window cluster that
  // mixed groups would hide its rows from any query (a real ClusterKV approximation, not what
  // this test is about).
  c.window_clusters = 32;
  Driver d(c, seed, GenParams{32, 10.f, 0.05f});
  d.add(1, 2048, true);
  double worst = 0;
  for (int t = 0; t < 20; ++t) worst = std::max(worst, d.step({1}));
  if (stats) *stats = d.engine().stats();
  return worst;
}

/// What the engine reads or writes: the host vector itself (kCpu) or a device copy (kCuda).
class EngineBuf {
 public:
  EngineBuf(Backend backend, std::vector<uint16_t>& host) : host_(&host) {
#if KVTIER_WITH_CUDA
    if (backend == Backend::kCuda) {
      dev_ = std::make_unique<cuda::DeviceBuffer<uint16_t>>(std::max<size_t>(host.size(), 1), 0);
      test::upload_complete(dev_->get(), host.data(), host.size() * 2);
    }
#else
    (void)backend;
#endif
  }
  void* get() const {
#if KVTIER_WITH_CUDA
    if (dev_) return dev_->get();
#endif
    return host_->data();
  }
  /// Waits for the device (kCuda): the engine's work on this buffer has finished.
  void sync() const {
#if KVTIER_WITH_CUDA
    if (dev_) KVTIER_CUDA_CHECK(cudaDeviceSynchronize());
#endif
  }
  /// The device copy back into the host vector (after sync).
  void download() const {
    sync();
#if KVTIER_WITH_CUDA
    if (dev_) {
      KVTIER_CUDA_CHECK(
          cudaMemcpy(host_->data(), dev_->get(), host_->size() * 2, cudaMemcpyDeviceToHost));
    }
#endif
  }

 private:
  std::vector<uint16_t>* host_;
#if KVTIER_WITH_CUDA
  std::unique_ptr<cuda::DeviceBuffer<uint16_t>> dev_;
#endif
};

/// mean_key_scores: after a sink of 4 rows, a prompt of two clusters of 32 rows, short keys
/// along e0 (norm 1) and long keys along e1 (norm 8), and the query 8 e0 + 4 e1. Its direction
/// is nearer the short keys' (scores 8 against 4), its logits are higher on the long keys (4
/// against 1 after the 1/8 scale: they hold 95% of the attention). With a recall budget of one
/// cluster, the mean keys recall the long keys and the unit centroids the short ones: the output
/// is attention over the sink, that cluster and the decoded row, exactly.
inline void check_mean_key_scores(Backend backend) {
  constexpr int32_t D = 64, kSink = 4, kRows = 32;
  constexpr int64_t n = kSink + 2 * kRows;
  std::mt19937_64 rng(test::test_seed() + 90);
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> k(n * D, 0.f), v(n * D), q(D, 0.f), kn(D, 0.f), vn(D);
  for (int64_t i = 0; i < kSink * D; ++i) k[i] = 0.1f * g(rng);
  for (int64_t r = 0; r < kRows; ++r) {
    k[(kSink + r) * D + 0] = 1.f;
    k[(kSink + kRows + r) * D + 1] = 8.f;
  }
  for (float& x : v) x = g(rng);
  for (float& x : vn) x = g(rng);
  q[0] = 8.f;
  q[1] = 4.f;
  k = round_trip(k, DType::kF16);
  v = round_trip(v, DType::kF16);
  vn = round_trip(vn, DType::kF16);
  // Dense attention over the sink, one cluster's rows and the decoded row.
  auto attend = [&](int64_t first) {
    Oracle o;
    o.s = Shape{1, 1, 1, D};
    o.add(1);
    auto rows = [&](const std::vector<float>& x, int64_t from, int64_t count) {
      return std::vector<float>(x.begin() + from * D, x.begin() + (from + count) * D);
    };
    o.append(1, 0, rows(k, 0, kSink), rows(v, 0, kSink), kSink);
    o.append(1, 0, rows(k, first, kRows), rows(v, first, kRows), kRows);
    o.append(1, 0, kn, vn, 1);
    return o.attend(1, 0, q.data());
  };
  for (const bool mean_keys : {true, false}) {
    SCOPED_TRACE(mean_keys ? "mean keys" : "unit centroids");
    EngineConfig c = make_config(Mode::kClusterKV, Shape{1, 1, 1, D});
    c.backend = backend;
    c.num_dense_layers = 0;
    c.budget = kRows;
    c.tokens_per_cluster = kRows;
    c.mean_key_scores = mean_keys;
    Engine e(c);
    e.add_sequence(1);
    std::vector<uint16_t> hk = to_dtype16(k, DType::kF16), hv = to_dtype16(v, DType::kF16),
                          hq = to_dtype16(q, DType::kF16), hkn = to_dtype16(kn, DType::kF16),
                          hvn = to_dtype16(vn, DType::kF16), ho(D, 0);
    const EngineBuf bk(backend, hk), bv(backend, hv), bq(backend, hq), bkn(backend, hkn),
        bvn(backend, hvn), bo(backend, ho);
    memory::KvRows rows{bk.get(), bv.get(), DType::kF16, 1, D, n};
    e.prefill_layer(1, 0, rows);
    const SeqId seq = 1;
    DecodeBatch b;
    b.seqs = &seq;
    b.num_seqs = 1;
    b.q = bq.get();
    b.k_new = bkn.get();
    b.v_new = bvn.get();
    b.out = bo.get();
    e.decode_layer(0, b);
    bo.download();
    e.end_step();
    const std::vector<float> want = attend(mean_keys ? kSink + kRows : kSink);
    double worst = 0;
    for (int32_t d = 0; d < D; ++d)
      worst = std::max(worst, static_cast<double>(std::fabs(fp16_to_float(ho[d]) - want[d])));
    EXPECT_LT(worst, kTol);
    const std::vector<std::vector<int32_t>> sel = e.last_selection(1, 0);
    ASSERT_EQ(sel.size(), 1u);
    EXPECT_EQ(sel[0].size(), 1u);
  }
}

/// Keys in 32 segments of 64 positions, each segment around its own direction (norm 10); the
/// observation window's queries and every decode query aim at segments 5 and 20.
struct SegmentPrompt {
  static constexpr int32_t D = 64, n = 2048, groups = 32, W = 16, Hq = 4;
  std::vector<std::vector<float>> dirs;
  std::mt19937_64 rng;
  std::normal_distribution<float> g{0.f, 1.f};
  explicit SegmentPrompt(uint64_t seed) : dirs(groups, std::vector<float>(D)), rng(seed) {
    for (auto& d : dirs) {
      float sq = 0;
      for (float& x : d) x = g(rng), sq += x * x;
      for (float& x : d) x *= 10.f / std::sqrt(sq);
    }
  }
  std::vector<float> queries(int32_t count) {  // [Hq, count, D]; head h aims at target h % 2
    std::vector<float> q(static_cast<size_t>(Hq) * count * D);
    for (int32_t h = 0; h < Hq; ++h)
      for (int32_t i = 0; i < count; ++i)
        for (int32_t t = 0; t < D; ++t)
          q[(static_cast<size_t>(h) * count + i) * D + t] =
              dirs[h % 2 == 0 ? 5 : 20][t] + 0.05f * g(rng);
    return round_trip(q, DType::kF16);
  }
};

/// Two layers of one sequence in mode clusterattn or hybrid over a SegmentPrompt, 12 decode
/// steps; returns the largest |engine - dense| (either backend).
inline double run_clusterattn(EngineConfig c, uint64_t seed, EngineStats* stats) {
  using SP = SegmentPrompt;
  c.model = ModelShape{2, SP::Hq, 1, SP::D, DType::kF16};
  c.num_dense_layers = 0;
  c.observation_window = SP::W;
  Engine e(c);
  SP sp(seed);
  Oracle o;
  o.s = Shape{2, SP::Hq, 1, SP::D};
  o.add(1);
  e.add_sequence(1);
  for (int32_t l = 0; l < 2; ++l) {
    std::vector<float> k(static_cast<size_t>(SP::n) * SP::D), v(k.size());
    for (int32_t r = 0; r < SP::n; ++r)
      for (int32_t t = 0; t < SP::D; ++t) {
        k[r * SP::D + t] = sp.dirs[r / 64][t] + 0.05f * sp.g(sp.rng);
        v[r * SP::D + t] = sp.g(sp.rng);
      }
    k = round_trip(k, DType::kF16);
    v = round_trip(v, DType::kF16);
    o.append(1, l, k, v, SP::n);
    auto k16 = to_dtype16(k, DType::kF16), v16 = to_dtype16(v, DType::kF16);
    auto q16 = to_dtype16(sp.queries(SP::W), DType::kF16);
    EngineBuf dk(c.backend, k16), dv(c.backend, v16), dq(c.backend, q16);
    e.prefill_layer(1, l, memory::KvRows{dk.get(), dv.get(), DType::kF16, 1, SP::D, SP::n, -1, -1},
                    ObservationWindow{dq.get(), SP::W});
    dk.sync();
  }
  double worst = 0;
  for (int step = 0; step < 12; ++step) {
    for (int32_t l = 0; l < 2; ++l) {
      const std::vector<float> q = sp.queries(1);  // [Hq, 1, D] == [1, Hq, D]
      std::vector<float> kn(SP::D), vn(SP::D);
      for (int32_t t = 0; t < SP::D; ++t) kn[t] = sp.dirs[step % 32][t], vn[t] = sp.g(sp.rng);
      kn = round_trip(kn, DType::kF16);
      vn = round_trip(vn, DType::kF16);
      o.append(1, l, kn, vn, 1);
      auto q16 = to_dtype16(q, DType::kF16), k16 = to_dtype16(kn, DType::kF16),
           v16 = to_dtype16(vn, DType::kF16);
      std::vector<uint16_t> o16(q.size());
      EngineBuf dq(c.backend, q16), dk(c.backend, k16), dv(c.backend, v16), dout(c.backend, o16);
      const SeqId id = 1;
      e.decode_layer(l, DecodeBatch{&id, 1, dq.get(), dk.get(), dv.get(), dout.get()});
      dout.download();
      const std::vector<float> want = o.attend(1, l, q.data());
      for (size_t j = 0; j < want.size(); ++j) {
        worst = std::max(worst, static_cast<double>(std::fabs(want[j] - fp16_to_float(o16[j]))));
      }
    }
    e.end_step();
  }
  if (stats) *stats = e.stats();
  return worst;
}

}  // namespace kvtier::test_engine
