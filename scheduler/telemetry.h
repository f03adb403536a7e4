// Telemetry: every transfer and cache decision as a fixed-size event in a bounded lock-free
// multi-producer queue (Boost.Lockfree), drained by one consumer to memory or to a JSON Lines
// file (format: docs/telemetry.md). Recording never blocks and never allocates: when the queue is
// full the event is counted as dropped. Totals (stats()) are kept at record time, so they are
// exact whether or not anybody drains.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "memory/core/status.h"

namespace kvtier::scheduler {

enum class EventKind : uint8_t {
  kFetch,        ///< misses gathered host -> cache
  kOffload,      ///< KV rows written to the host tier (prefill D2H, decode appends)
  kCacheLookup,  ///< one lookup: hits and misses
  kEvict,        ///< clusters evicted from the cache
  kCluster,      ///< a clustering job (prefill k-means, window re-clustering)
  kStall,        ///< the decode critical path waited (on a fetch, a clustering event, ...)
};
constexpr int kNumEventKinds = 6;
const char* event_kind_name(EventKind kind);

enum class Direction : uint8_t { kNone, kHostToDevice, kDeviceToHost, kHostToDisk, kDiskToHost };
constexpr int kNumDirections = 5;
const char* direction_name(Direction dir);

/// One event, 48 bytes, trivially copyable. Fields that do not apply are 0 (-1 for seq/layer/head).
struct Event {
  uint64_t time_ns = 0;  ///< steady-clock nanoseconds since the Telemetry was created
  int64_t seq = -1;
  int32_t layer = -1;
  int32_t kv_head = -1;
  int64_t bytes = 0;
  int32_t hits = 0;
  int32_t misses = 0;
  uint32_t stall_us = 0;
  EventKind kind = EventKind::kFetch;
  Direction dir = Direction::kNone;
  uint16_t reserved = 0;
};
static_assert(sizeof(Event) == 48, "Event is a fixed 48-byte record");

/// Sums over every recorded (not dropped) event.
struct TelemetryStats {
  int64_t events[kNumEventKinds] = {};
  int64_t bytes[kNumDirections] = {};  ///< by direction
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t stall_us = 0;
  int64_t dropped = 0;  ///< events refused because the queue was full
  int64_t total_events() const;
};

/// Thread-safe for any number of producers (record) and one consumer (drain*) at a time.
class Telemetry {
 public:
  /// `capacity` events can wait in the queue (1 to 65534).
  explicit Telemetry(size_t capacity = 16384);
  ~Telemetry();
  Telemetry(const Telemetry&) = delete;
  Telemetry& operator=(const Telemetry&) = delete;

  /// Nanoseconds since construction, for Event::time_ns.
  uint64_t now_ns() const;
  /// Queues `e` (time_ns filled in if 0). Lock-free, no allocation. False if the queue is full,
  /// in which case the event is counted in stats().dropped and not in the sums.
  bool record(Event e) noexcept;
  /// Moves every queued event to the end of `out`; returns how many. One consumer at a time.
  size_t drain(std::vector<Event>* out);
  /// Drains into `path`, one JSON object per line, appending. kIoError if the file cannot be
  /// written (the drained events are then lost, and the status says how many).
  Status drain_to_file(const std::string& path);
  TelemetryStats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// One event as a JSON object on one line (no trailing newline).
std::string event_to_json(const Event& e);

}  // namespace kvtier::scheduler
