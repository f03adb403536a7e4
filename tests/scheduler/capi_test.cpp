// The C API drives the same engine: outputs equal the C++ engine's bitwise for the same calls,
// and errors come back as status codes with the engine's message.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "memory/core/half.h"
#include "scheduler/engine.h"
#include "scheduler/kvtier.h"
#include "tests/common/test_util.h"

namespace kvtier {
namespace {

kvtier_config c_config() {
  kvtier_config c;
  kvtier_config_default(&c);
  c.num_layers = 3;
  c.num_q_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.dtype = KVTIER_DTYPE_F16;
  c.backend = KVTIER_BACKEND_CPU;
  c.mode = KVTIER_MODE_CLUSTERKV;
  c.budget = 64;
  c.sink = 4;
  c.window = 16;
  c.tokens_per_cluster = 8;
  c.window_clusters = 2;
  c.page_size = 4;
  c.num_dense_layers = 1;
  c.max_sequences = 2;
  c.max_batch = 2;
  c.max_context = 2048;
  c.host_bytes_limit = 32u << 20;
  return c;
}

EngineConfig cpp_config() {
  EngineConfig e;
  e.model = ModelShape{3, 8, 2, 64, DType::kF16};
  e.backend = Backend::kCpu;
  e.mode = Mode::kClusterKV;
  e.budget = 64;
  e.sink = 4;
  e.window = 16;
  e.tokens_per_cluster = 8;
  e.window_clusters = 2;
  e.page_size = 4;
  e.num_dense_layers = 1;
  e.max_sequences = 2;
  e.max_batch = 2;
  e.max_context = 2048;
  e.host_bytes_limit = 32u << 20;
  return e;
}

std::vector<uint16_t> random_f16(size_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = float_to_fp16(g(rng));
  return v;
}

TEST(CApi, SameOutputsAsTheCppEngine) {
  const kvtier_config cc = c_config();
  kvtier_engine* ce = nullptr;
  ASSERT_EQ(kvtier_engine_create(&cc, &ce), KVTIER_OK) << kvtier_last_error();
  Engine e(cpp_config());
  std::mt19937_64 rng(test::test_seed());
  const int64_t n = 200;
  const kvtier_seq_id ids[2] = {3, 9};
  for (const kvtier_seq_id id : ids) {
    ASSERT_EQ(kvtier_add_sequence(ce, id), KVTIER_OK);
    e.add_sequence(id);
    for (int32_t l = 0; l < 3; ++l) {
      const auto k = random_f16(2 * n * 64, rng), v = random_f16(2 * n * 64, rng);
      ASSERT_EQ(kvtier_prefill_layer(ce, id, l, k.data(), v.data(), n, -1, -1, nullptr), KVTIER_OK)
          << kvtier_last_error();
      e.prefill_layer(id, l, memory::KvRows{k.data(), v.data(), DType::kF16, 2, 64, n, -1, -1});
    }
  }
  for (int step = 0; step < 40; ++step) {
    for (int32_t l = 0; l < 3; ++l) {
      const auto q = random_f16(2 * 8 * 64, rng), k = random_f16(2 * 2 * 64, rng),
                 v = random_f16(2 * 2 * 64, rng);
      std::vector<uint16_t> out_c(q.size()), out_cpp(q.size());
      std::vector<float> lse_c(2 * 8, -1.f), lse_cpp(2 * 8, -2.f);
      if (step % 2 == 0) {
        ASSERT_EQ(
            kvtier_decode_layer(ce, l, ids, 2, q.data(), k.data(), v.data(), out_c.data(), nullptr),
            KVTIER_OK)
            << kvtier_last_error();
      } else {  // with the log-sum-exp
        ASSERT_EQ(kvtier_decode_layer_lse(ce, l, ids, 2, q.data(), k.data(), v.data(), out_c.data(),
                                          lse_c.data(), nullptr),
                  KVTIER_OK)
            << kvtier_last_error();
      }
      DecodeBatch b{ids, 2, q.data(), k.data(), v.data(), out_cpp.data(), lse_cpp.data()};
      e.decode_layer(l, b);
      ASSERT_EQ(std::memcmp(out_c.data(), out_cpp.data(), out_c.size() * 2), 0)
          << "step " << step << " layer " << l;
      if (step % 2 == 1) {
        ASSERT_EQ(std::memcmp(lse_c.data(), lse_cpp.data(), lse_c.size() * 4), 0)
            << "step " << step << " layer " << l;
      }
    }
    ASSERT_EQ(kvtier_end_step(ce, nullptr), KVTIER_OK);
    e.end_step();
    // The step's selections, through the C API, as the C++ engine reports them.
    for (int32_t l = 0; l < 3; ++l) {
      const auto want = e.last_selection(ids[1], l);
      for (int32_t h = 0; h < 2; ++h) {
        int32_t count = -1;
        ASSERT_EQ(kvtier_last_selection(ce, ids[1], l, h, nullptr, 0, &count), KVTIER_OK);
        std::vector<int32_t> got(static_cast<size_t>(count));
        ASSERT_EQ(kvtier_last_selection(ce, ids[1], l, h, got.data(), count, &count), KVTIER_OK);
        EXPECT_EQ(got, want.empty() ? std::vector<int32_t>{} : want[h]) << "layer " << l;
        EXPECT_EQ(want.empty(), l < 1) << "layer " << l;  // layer 0 is dense
      }
    }
  }
  kvtier_stats s;
  ASSERT_EQ(kvtier_get_stats(ce, &s), KVTIER_OK);
  const EngineStats want = e.stats();
  EXPECT_EQ(s.steps, 40);
  EXPECT_EQ(s.recall_hits, want.recall_hits);
  EXPECT_EQ(s.recall_misses, want.recall_misses);
  EXPECT_EQ(s.host_bytes_used, want.host_bytes_used);
  EXPECT_GT(s.window_clusterings, 0);
  EXPECT_GT(s.decode_host_ms, 0.0);  // the calling thread's time inside the engine
  EXPECT_GE(s.decode_host_ms, s.decode_blocked_ms);
  int64_t len = 0;
  ASSERT_EQ(kvtier_sequence_length(ce, 3, 2, &len), KVTIER_OK);
  EXPECT_EQ(len, n + 40);
  kvtier_engine_destroy(ce);
}

TEST(CApi, ErrorsAreStatusCodesWithMessages) {
  kvtier_config cc = c_config();
  kvtier_engine* ce = nullptr;
  EXPECT_EQ(kvtier_engine_create(nullptr, &ce), KVTIER_ERR_INVALID_ARGUMENT);
  cc.budget = 0;
  EXPECT_EQ(kvtier_engine_create(&cc, &ce), KVTIER_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(kvtier_last_error()).find("budget"), std::string::npos);
  EXPECT_EQ(ce, nullptr);
  cc = c_config();
  cc.dtype = 7;
  EXPECT_EQ(kvtier_engine_create(&cc, &ce), KVTIER_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(kvtier_last_error()).find("dtype"), std::string::npos);
  cc = c_config();
  ASSERT_EQ(kvtier_engine_create(&cc, &ce), KVTIER_OK);
  EXPECT_EQ(kvtier_add_sequence(ce, 1), KVTIER_OK);
  EXPECT_EQ(kvtier_add_sequence(ce, 1), KVTIER_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvtier_add_sequence(ce, 2), KVTIER_OK);
  EXPECT_EQ(kvtier_add_sequence(ce, 3), KVTIER_ERR_CAPACITY);  // max_sequences = 2
  EXPECT_EQ(kvtier_remove_sequence(ce, 42), KVTIER_ERR_NOT_FOUND);
  EXPECT_NE(std::string(kvtier_last_error()).find("42"), std::string::npos);
  std::vector<uint16_t> x(8 * 64);
  const kvtier_seq_id one = 1;
  EXPECT_EQ(kvtier_decode_layer(ce, 9, &one, 1, x.data(), x.data(), x.data(), x.data(), nullptr),
            KVTIER_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(
      kvtier_decode_layer(nullptr, 0, &one, 1, x.data(), x.data(), x.data(), x.data(), nullptr),
      KVTIER_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvtier_decode_layer_lse(ce, 0, &one, 1, x.data(), x.data(), x.data(), x.data(), nullptr,
                                    nullptr),
            KVTIER_ERR_INVALID_ARGUMENT);  // lse is null
  int32_t count = 0, id = 0;
  EXPECT_EQ(kvtier_last_selection(ce, 1, 1, 0, nullptr, 0, nullptr), KVTIER_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvtier_last_selection(ce, 1, 1, 0, nullptr, 1, &count), KVTIER_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvtier_last_selection(ce, 1, 1, 2, &id, 1, &count), KVTIER_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(kvtier_last_error()).find("kv_head 2"), std::string::npos);
  EXPECT_EQ(kvtier_last_selection(ce, 1, 7, 0, &id, 1, &count), KVTIER_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvtier_last_selection(ce, 1, 1, 0, &id, 1, &count), KVTIER_OK);  // no step yet
  EXPECT_EQ(count, 0);
  EXPECT_EQ(kvtier_get_stats(ce, nullptr), KVTIER_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(kvtier_start_trace(ce, nullptr), KVTIER_ERR_INVALID_ARGUMENT);
  EXPECT_NE(kvtier_start_trace(ce, "/nonexistent-dir/trace.jsonl"), KVTIER_OK);
  const std::string trace = ::testing::TempDir() + "kvtier_capi_trace.jsonl";
  EXPECT_EQ(kvtier_start_trace(ce, trace.c_str()), KVTIER_OK);
  EXPECT_EQ(kvtier_start_trace(ce, trace.c_str()), KVTIER_ERR_INVALID_ARGUMENT);  // running
  EXPECT_EQ(kvtier_stop_trace(ce), KVTIER_OK);
  EXPECT_EQ(kvtier_stop_trace(ce), KVTIER_OK);  // nothing to stop
  std::remove(trace.c_str());
  kvtier_engine_destroy(ce);
  kvtier_engine_destroy(nullptr);
}

}  // namespace
}  // namespace kvtier
