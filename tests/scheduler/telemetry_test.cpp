// Telemetry: many producers and a concurrent consumer lose nothing that was accepted, totals are
// exact, a full queue drops and counts, the JSON Lines file round-trips.
#include "scheduler/telemetry.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "memory/core/status.h"
#include "tests/common/test_util.h"

namespace kvtier::scheduler {
namespace {

Event fetch_event(int64_t seq, int32_t layer, int64_t bytes) {
  Event e;
  e.kind = EventKind::kFetch;
  e.dir = Direction::kHostToDevice;
  e.seq = seq;
  e.layer = layer;
  e.kv_head = 3;
  e.bytes = bytes;
  e.misses = 2;
  e.hits = 5;
  return e;
}

TEST(Telemetry, ProducersAndConsumerLoseNothingAccepted) {
  Telemetry t(1024);
  constexpr int kProducers = 6, kPerProducer = 20000;
  std::atomic<int> accepted{0};
  std::atomic<bool> done{false};
  std::vector<Event> got;
  std::thread consumer([&] {
    while (!done.load()) t.drain(&got);
    t.drain(&got);
  });
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      for (int i = 0; i < kPerProducer; ++i)
        if (t.record(fetch_event(p, i, 1000 + p))) ++accepted;
    });
  }
  for (auto& th : producers) th.join();
  done = true;
  consumer.join();
  const TelemetryStats s = t.stats();
  EXPECT_EQ(static_cast<int64_t>(got.size()), accepted.load());
  EXPECT_EQ(s.total_events(), accepted.load());
  EXPECT_EQ(s.events[static_cast<int>(EventKind::kFetch)], accepted.load());
  EXPECT_EQ(s.total_events() + s.dropped, int64_t{kProducers} * kPerProducer);
  EXPECT_EQ(s.hits, 5 * int64_t{accepted.load()});
  EXPECT_EQ(s.misses, 2 * int64_t{accepted.load()});
  int64_t bytes = 0;
  std::vector<int> last(kProducers, -1);
  bool in_order = true;
  for (const Event& e : got) {
    bytes += e.bytes;
    // One producer's events come out in the order it recorded them (a FIFO queue).
    in_order = in_order && e.layer > last[e.seq];
    last[e.seq] = e.layer;
    EXPECT_GT(e.time_ns, 0u);
  }
  EXPECT_TRUE(in_order);
  EXPECT_EQ(s.bytes[static_cast<int>(Direction::kHostToDevice)], bytes);
}

TEST(Telemetry, FullQueueDropsAndCounts) {
  Telemetry t(4);
  int accepted = 0;
  for (int i = 0; i < 10; ++i) accepted += t.record(fetch_event(0, i, 10)) ? 1 : 0;
  EXPECT_EQ(accepted, 4);
  const TelemetryStats s = t.stats();
  EXPECT_EQ(s.dropped, 6);
  EXPECT_EQ(s.total_events(), 4);
  EXPECT_EQ(s.bytes[static_cast<int>(Direction::kHostToDevice)], 40);
  std::vector<Event> got;
  EXPECT_EQ(t.drain(&got), 4u);
  EXPECT_TRUE(t.record(fetch_event(0, 99, 10)));  // room again
  EXPECT_THROW(Telemetry(0), InvalidArgumentError);
  EXPECT_THROW(Telemetry(70000), InvalidArgumentError);
}

TEST(Telemetry, JsonLinesFile) {
  Telemetry t(64);
  Event e = fetch_event(7, 2, 4096);
  e.time_ns = 123;
  t.record(e);
  Event s;
  s.kind = EventKind::kStall;
  s.stall_us = 250;
  s.time_ns = 456;
  t.record(s);
  const std::string path = ::testing::TempDir() + "kvtier_telemetry_test.jsonl";
  std::remove(path.c_str());
  ASSERT_TRUE(t.drain_to_file(path).is_ok());
  std::ifstream f(path);
  std::string l1, l2, l3;
  ASSERT_TRUE(std::getline(f, l1));
  ASSERT_TRUE(std::getline(f, l2));
  EXPECT_FALSE(std::getline(f, l3));
  EXPECT_EQ(l1,
            "{\"t_ns\":123,\"kind\":\"fetch\",\"seq\":7,\"layer\":2,\"kv_head\":3,\"bytes\":4096,"
            "\"dir\":\"h2d\",\"hits\":5,\"misses\":2,\"stall_us\":0}");
  EXPECT_EQ(l2,
            "{\"t_ns\":456,\"kind\":\"stall\",\"seq\":-1,\"layer\":-1,\"kv_head\":-1,\"bytes\":0,"
            "\"dir\":\"none\",\"hits\":0,\"misses\":0,\"stall_us\":250}");
  std::remove(path.c_str());
  t.record(e);
  const Status st = t.drain_to_file("/nonexistent-dir/telemetry.jsonl");
  EXPECT_EQ(st.code(), StatusCode::kIoError);
  EXPECT_NE(st.message().find("1 events lost"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace kvtier::scheduler
