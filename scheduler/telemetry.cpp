// Telemetry: Boost.Lockfree bounded queue, atomic totals, JSON Lines drain.
#include "scheduler/telemetry.h"

#include <boost/lockfree/queue.hpp>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "memory/core/check.h"

namespace kvtier::scheduler {

const char* event_kind_name(EventKind kind) {
  switch (kind) {
    case EventKind::kFetch:
      return "fetch";
    case EventKind::kOffload:
      return "offload";
    case EventKind::kCacheLookup:
      return "lookup";
    case EventKind::kEvict:
      return "evict";
    case EventKind::kCluster:
      return "cluster";
    case EventKind::kStall:
      return "stall";
  }
  return "?";
}

const char* direction_name(Direction dir) {
  switch (dir) {
    case Direction::kNone:
      return "none";
    case Direction::kHostToDevice:
      return "h2d";
    case Direction::kDeviceToHost:
      return "d2h";
    case Direction::kHostToDisk:
      return "h2disk";
    case Direction::kDiskToHost:
      return "disk2h";
  }
  return "?";
}

int64_t TelemetryStats::total_events() const {
  int64_t n = 0;
  for (int64_t e : events) n += e;
  return n;
}

struct Telemetry::Impl {
  explicit Impl(size_t capacity) : queue(capacity) {}
  boost::lockfree::queue<Event, boost::lockfree::fixed_sized<true>> queue;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  std::atomic<int64_t> events[kNumEventKinds] = {};
  std::atomic<int64_t> bytes[kNumDirections] = {};
  std::atomic<int64_t> hits{0}, misses{0}, stall_us{0}, dropped{0};
};

Telemetry::Telemetry(size_t capacity) {
  KVTIER_CHECK(capacity >= 1 && capacity <= 65534, "telemetry capacity ", capacity,
               " is out of range [1, 65534]");
  impl_ = std::make_unique<Impl>(capacity);
}

Telemetry::~Telemetry() = default;

uint64_t Telemetry::now_ns() const {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now() - impl_->start)
                                   .count());
}

bool Telemetry::record(Event e) noexcept {
  if (e.time_ns == 0) e.time_ns = now_ns();
  if (!impl_->queue.bounded_push(e)) {
    impl_->dropped.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  const auto kind = static_cast<size_t>(e.kind);
  const auto dir = static_cast<size_t>(e.dir);
  if (kind < kNumEventKinds) impl_->events[kind].fetch_add(1, std::memory_order_relaxed);
  if (dir < kNumDirections) impl_->bytes[dir].fetch_add(e.bytes, std::memory_order_relaxed);
  impl_->hits.fetch_add(e.hits, std::memory_order_relaxed);
  impl_->misses.fetch_add(e.misses, std::memory_order_relaxed);
  impl_->stall_us.fetch_add(e.stall_us, std::memory_order_relaxed);
  return true;
}

size_t Telemetry::drain(std::vector<Event>* out) {
  KVTIER_CHECK(out != nullptr, "Telemetry::drain: out is null");
  size_t n = 0;
  Event e;
  while (impl_->queue.pop(e)) {
    out->push_back(e);
    ++n;
  }
  return n;
}

std::string event_to_json(const Event& e) {
  char buf[320];
  std::snprintf(buf, sizeof(buf),
                "{\"t_ns\":%llu,\"kind\":\"%s\",\"seq\":%lld,\"layer\":%d,\"kv_head\":%d,"
                "\"bytes\":%lld,\"dir\":\"%s\",\"hits\":%d,\"misses\":%d,\"stall_us\":%u}",
                static_cast<unsigned long long>(e.time_ns), event_kind_name(e.kind),
                static_cast<long long>(e.seq), e.layer, e.kv_head, static_cast<long long>(e.bytes),
                direction_name(e.dir), e.hits, e.misses, e.stall_us);
  return buf;
}

Status Telemetry::drain_to_file(const std::string& path) {
  std::vector<Event> events;
  drain(&events);
  if (events.empty()) return Status::ok();
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (f == nullptr)
    return Status::io_error(detail::str_cat("cannot open telemetry file '", path,
                                            "': ", std::strerror(errno), "; ", events.size(),
                                            " events lost"));
  bool ok = true;
  for (const Event& e : events) {
    const std::string line = event_to_json(e);
    ok = ok && std::fprintf(f, "%s\n", line.c_str()) > 0;
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!ok)
    return Status::io_error(
        detail::str_cat("writing telemetry file '", path, "' failed: ", std::strerror(errno)));
  return Status::ok();
}

TelemetryStats Telemetry::stats() const {
  TelemetryStats s;
  for (int i = 0; i < kNumEventKinds; ++i) s.events[i] = impl_->events[i].load();
  for (int i = 0; i < kNumDirections; ++i) s.bytes[i] = impl_->bytes[i].load();
  s.hits = impl_->hits.load();
  s.misses = impl_->misses.load();
  s.stall_us = impl_->stall_us.load();
  s.dropped = impl_->dropped.load();
  return s;
}

}  // namespace kvtier::scheduler
