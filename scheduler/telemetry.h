// Telemetry: every transfer, cache decision and timed piece of work as a fixed-size event in a
// bounded lock-free multi-producer queue (Boost.Lockfree). One consumer drains it: the caller
// (drain, drain_to_file) or a writer thread that streams JSON Lines to a file (open_file;
// format: docs/telemetry.md). Recording never blocks and never allocates: when the queue is full
// the event is counted as dropped. Totals (stats()) are kept at record time, so they are exact
// whether or not anybody drains; with queueing off, record() only adds to them.
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
  kFetch,        ///< host -> device rows gathered into the cache (fills)
  kOffload,      ///< KV rows written to the host tier (prefill D2H, decode appends)
  kCacheLookup,  ///< one lookup: hits, misses, and the bytes attention read for the misses
  kEvict,        ///< clusters evicted from the cache
  kCluster,      ///< a clustering job (prefill k-means, window re-clustering)
  kStall,        ///< the decode critical path waited (on a prefill job, a window clustering)
  kSpan,         ///< a timed piece of work on a GPU stream or a host thread (see Op)
  kStep,         ///< one decode step on the caller's thread: first decode_layer to end_step
  kLink,         ///< the link measured when tracing started: `bytes` copied in `dur_ns`
  kOccupancy,    ///< a recall layer's GPU cluster cache: `bytes` in use of `total`
};
constexpr int kNumEventKinds = 10;
const char* event_kind_name(EventKind kind);
/// Whether `kind` moves data: only these add to TelemetryStats::bytes.
constexpr bool is_transfer(EventKind kind) {
  return kind == EventKind::kFetch || kind == EventKind::kCacheLookup ||
         kind == EventKind::kOffload || kind == EventKind::kCluster;
}

enum class Direction : uint8_t { kNone, kHostToDevice, kDeviceToHost, kHostToDisk, kDiskToHost };
constexpr int kNumDirections = 5;
const char* direction_name(Direction dir);

/// Where a timed event ran: the recording host thread, or one of the engine's CUDA streams.
enum class Track : uint8_t { kHost, kCompute, kCopy, kSide };
const char* track_name(Track track);

/// What a kSpan timed, or what an accounting event belongs to: fetch kFill (planned gathers into
/// the cache); offload kPrefillStore or kAppend; cluster kPrefillCluster or kWindow.
enum class Op : uint8_t {
  kNone,
  kDecode,          ///< a decode step's kernels on the caller's stream, all layers
  kFill,            ///< the cache policy's gathers of missed clusters into cache pages
  kAppendCopy,      ///< a step's new K/V rows downloaded for the host tier
  kAppend,          ///< a worker writing a step's rows into the host tier
  kPrefillCopy,     ///< a prefill layer's rows downloaded for the host tier
  kPrefillCluster,  ///< a prefill layer's clustering on the side stream (k-means, votes, DBAC)
  kPrefillStore,    ///< a worker storing a prefill layer's rows in the host tier
  kPolicy,          ///< a worker deciding one recall layer's cache lookups, evictions and fills
  kWindow,          ///< a worker re-clustering a window of W decoded rows
  kAdmit,           ///< a committed window's clusters copied from its rows into cache pages
};
const char* op_name(Op op);

/// One event, 72 bytes, trivially copyable. Fields that do not apply are 0 (-1 for
/// seq/layer/kv_head/step).
struct Event {
  uint64_t time_ns = 0;  ///< start (or the instant): steady-clock ns since the Telemetry began
  uint64_t dur_ns = 0;   ///< 0 for an instant
  int64_t seq = -1;
  int64_t bytes = 0;
  int64_t total = 0;  ///< kOccupancy: the cache's capacity in bytes
  int32_t layer = -1;
  int32_t kv_head = -1;
  int32_t hits = 0;
  int32_t misses = 0;
  int32_t step = -1;    ///< decode steps ended before the work was issued
  uint16_t thread = 0;  ///< index of the recording thread (set by record)
  EventKind kind = EventKind::kFetch;
  Direction dir = Direction::kNone;
  Track track = Track::kHost;
  Op op = Op::kNone;
  uint8_t reserved[6] = {};
};
static_assert(sizeof(Event) == 72, "Event is a fixed 72-byte record");

/// Sums over every recorded (not dropped) event.
struct TelemetryStats {
  int64_t events[kNumEventKinds] = {};
  int64_t bytes[kNumDirections] = {};  ///< by direction, transfer events only (is_transfer)
  /// hits and misses of every event but evictions (an eviction's `misses` are the clusters it
  /// evicted).
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t stall_us = 0;  ///< sum of the stall events' durations
  int64_t dropped = 0;   ///< events refused because the queue was full
  int64_t total_events() const;
};

/// Small index of the calling thread (0, 1, ... in order of first use), as in Event::thread.
uint16_t this_thread_index();

/// Thread-safe for any number of producers (record) and one consumer at a time: the caller of
/// drain / drain_to_file, or the writer thread while a file is open.
class Telemetry {
 public:
  /// `capacity` events can wait in the queue (1 to 65534).
  explicit Telemetry(size_t capacity = 16384);
  ~Telemetry();  ///< closes an open file (its errors are lost: call close_file to see them)
  Telemetry(const Telemetry&) = delete;
  Telemetry& operator=(const Telemetry&) = delete;

  /// Nanoseconds since construction, for Event::time_ns.
  uint64_t now_ns() const;
  /// Adds `e` to the totals and, if queueing, queues it (time_ns filled in if 0, thread always).
  /// Lock-free, no allocation. False if the queue is full, in which case the event is counted
  /// in stats().dropped and not in the sums.
  bool record(Event e) noexcept;
  /// Off: record() only adds to the totals (nobody consumes). On by default.
  void set_queueing(bool on);
  bool queueing() const;

  /// Moves every queued event to the end of `out`; returns how many. One consumer at a time.
  size_t drain(std::vector<Event>* out);
  /// Drains into `path`, one JSON object per line, appending. kIoError if the file cannot be
  /// written (the drained events are then lost, and the status says how many).
  Status drain_to_file(const std::string& path);

  /// Truncates `path`, writes a header line and turns queueing on; a writer thread then drains
  /// the queue to it as JSON Lines every `period_ms`, off the producers' paths. kIoError if the
  /// file cannot be opened; kInvalidArgument if one is open already.
  Status open_file(const std::string& path, int period_ms = 10);
  /// Drains what is left, writes the footer line (events written, events dropped since the file
  /// opened), stops the writer, closes the file and puts queueing back as it was before
  /// open_file. The first write error, if any. No-op when no file is open.
  Status close_file();
  bool file_open() const;

  TelemetryStats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// One event as a JSON object on one line (no trailing newline).
std::string event_to_json(const Event& e);

}  // namespace kvtier::scheduler
