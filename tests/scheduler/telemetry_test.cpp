// Telemetry: many producers and a concurrent consumer lose nothing that was accepted, totals are
// exact, a full queue drops and counts, the JSON Lines file round-trips, the writer thread streams
// every accepted event, host spans and the link measurement are recorded.
#include "scheduler/telemetry.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>

#include "memory/core/status.h"
#include "scheduler/spans.h"
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
  e.step = 4;
  t.record(e);
  Event s;
  s.kind = EventKind::kStall;
  s.dur_ns = 250000;
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
  const std::string thread = std::to_string(this_thread_index());
  EXPECT_EQ(
      l1,
      "{\"t_ns\":123,\"kind\":\"fetch\",\"step\":4,\"seq\":7,\"layer\":2,\"kv_head\":3,"
      "\"bytes\":4096,\"dir\":\"h2d\",\"hits\":5,\"misses\":2,\"track\":\"host\",\"thread\":" +
          thread + "}");
  EXPECT_EQ(l2,
            "{\"t_ns\":456,\"kind\":\"stall\",\"step\":-1,\"dur_ns\":250000,\"track\":\"host\","
            "\"thread\":" +
                thread + "}");
  EXPECT_EQ(t.stats().stall_us, 250);
  std::remove(path.c_str());
  t.record(e);
  const Status st = t.drain_to_file("/nonexistent-dir/telemetry.jsonl");
  EXPECT_EQ(st.code(), StatusCode::kIoError);
  EXPECT_NE(st.message().find("1 events lost"), std::string::npos) << st.message();
}

TEST(Telemetry, OnlyTransfersAddBytes) {
  Telemetry t(16);
  Event span = fetch_event(1, 0, 1000);
  span.kind = EventKind::kSpan;
  span.op = Op::kFill;
  t.record(span);
  t.record(fetch_event(1, 0, 300));
  const TelemetryStats s = t.stats();
  EXPECT_EQ(s.bytes[static_cast<int>(Direction::kHostToDevice)], 300);
  EXPECT_EQ(s.events[static_cast<int>(EventKind::kSpan)], 1);
  EXPECT_EQ(s.total_events(), 2);
}

// An eviction's `misses` field counts the clusters it evicted: not cache misses.
TEST(Telemetry, EvictionsAddNoMisses) {
  Telemetry t(16);
  Event evict;
  evict.kind = EventKind::kEvict;
  evict.misses = 7;
  t.record(evict);
  Event lookup;
  lookup.kind = EventKind::kCacheLookup;
  lookup.hits = 3;
  lookup.misses = 2;
  t.record(lookup);
  const TelemetryStats s = t.stats();
  EXPECT_EQ(s.hits, 3);
  EXPECT_EQ(s.misses, 2);
  EXPECT_EQ(s.events[static_cast<int>(EventKind::kEvict)], 1);
}

TEST(Telemetry, QueueingOffOnlyCounts) {
  Telemetry t(2);
  t.set_queueing(false);
  for (int i = 0; i < 10; ++i) EXPECT_TRUE(t.record(fetch_event(0, i, 10)));
  std::vector<Event> got;
  EXPECT_EQ(t.drain(&got), 0u);
  EXPECT_EQ(t.stats().dropped, 0);
  EXPECT_EQ(t.stats().bytes[static_cast<int>(Direction::kHostToDevice)], 100);
}

// The writer thread is the consumer while a file is open: producers racing with it lose nothing
// it accepted, the file has a header, every accepted event in order per producer, and a footer
// that counts them.
TEST(Telemetry, WriterThreadStreamsEveryAcceptedEvent) {
  Telemetry t(4096);
  t.set_queueing(false);
  const std::string path = ::testing::TempDir() + "kvtier_telemetry_writer.jsonl";
  ASSERT_TRUE(t.open_file(path, 1).is_ok());
  EXPECT_TRUE(t.file_open());
  EXPECT_TRUE(t.queueing());
  EXPECT_EQ(t.open_file(path).code(), StatusCode::kInvalidArgument);
  constexpr int kProducers = 4, kPerProducer = 5000;
  std::atomic<int> accepted{0};
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      for (int i = 0; i < kPerProducer; ++i) {
        if (t.record(fetch_event(p, i, 1))) ++accepted;
        if (i % 64 == 0) std::this_thread::yield();
      }
    });
  }
  for (auto& th : producers) th.join();
  ASSERT_TRUE(t.close_file().is_ok());
  EXPECT_FALSE(t.file_open());
  EXPECT_TRUE(t.close_file().is_ok());  // no file: nothing to do
  std::ifstream f(path);
  std::string line;
  ASSERT_TRUE(std::getline(f, line));
  EXPECT_NE(line.find("\"kind\":\"begin\",\"format\":\"kvtier-telemetry\",\"version\":2"),
            std::string::npos)
      << line;
  int events = 0;
  std::vector<int> last(kProducers, -1);
  bool in_order = true;
  std::string footer;
  while (std::getline(f, line)) {
    if (line.find("\"kind\":\"end\"") != std::string::npos) {
      footer = line;
      continue;
    }
    EXPECT_TRUE(footer.empty()) << "an event after the footer: " << line;
    const auto num = [&](const char* key) {
      const size_t at = line.find(key);
      return at == std::string::npos ? -100 : std::stoi(line.substr(at + std::strlen(key)));
    };
    const int seq = num("\"seq\":"), layer = num("\"layer\":");
    ASSERT_GE(seq, 0) << line;
    in_order = in_order && layer > last[seq];
    last[seq] = layer;
    ++events;
  }
  EXPECT_TRUE(in_order);
  EXPECT_EQ(events, accepted.load());
  const TelemetryStats s = t.stats();
  EXPECT_EQ(footer, "{\"t_ns\":" + footer.substr(8, footer.find(',') - 8) +
                        ",\"kind\":\"end\",\"events\":" + std::to_string(events) +
                        ",\"dropped\":" + std::to_string(s.dropped) + "}");
  EXPECT_EQ(events + s.dropped, kProducers * kPerProducer);
  std::remove(path.c_str());
  EXPECT_EQ(t.open_file("/nonexistent-dir/t.jsonl").code(), StatusCode::kIoError);
}

TEST(SpanTimer, HostSpansAreRecordedAtEnd) {
  Telemetry t(16);
  SpanTimer spans(&t, Backend::kCpu, 0);
  const SpanTimer::Token tk = spans.begin(nullptr);
  std::this_thread::sleep_for(std::chrono::milliseconds(2));
  Event e;
  e.kind = EventKind::kSpan;
  e.op = Op::kFill;
  e.bytes = 64;
  spans.end(tk, nullptr, e);
  EXPECT_EQ(spans.pending(), 0u);
  std::vector<Event> got;
  ASSERT_EQ(t.drain(&got), 1u);
  EXPECT_EQ(got[0].op, Op::kFill);
  EXPECT_GE(got[0].dur_ns, 2000000u);
  EXPECT_EQ(got[0].time_ns, tk.host_ns);
}

TEST(SpanTimer, MeasureLinkRecordsTheCopy) {
  Telemetry t(16);
  const LinkPeak peak = measure_link(Backend::kCpu, 0, 1 << 20, 2);
  EXPECT_EQ(peak.bytes, 2u << 20);
  EXPECT_GT(peak.h2d_gbps(), 0.0);
  record_link(&t, peak);
  std::vector<Event> got;
  ASSERT_EQ(t.drain(&got), 1u);
  EXPECT_EQ(got[0].kind, EventKind::kLink);
  EXPECT_EQ(got[0].bytes, 2 << 20);
  EXPECT_EQ(got[0].dir, Direction::kNone);
  EXPECT_GT(got[0].dur_ns, 0u);
  EXPECT_EQ(t.stats().bytes[0], 0);  // not a transfer of the run
}

}  // namespace
}  // namespace kvtier::scheduler
