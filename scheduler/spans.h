// Timed work for telemetry: spans of work on CUDA streams, timed by pairs of CUDA events and
// recorded once they have run, and the link bandwidth measured when tracing starts.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "memory/core/backend.h"
#include "memory/core/cuda_fwd.h"
#include "scheduler/telemetry.h"

namespace kvtier::scheduler {

/// Times spans of work and records them as events of `telemetry`. On kCuda a span is a pair of
/// timing events recorded on a stream; poll() records the spans that have finished, in the order
/// they were begun, with their GPU start and duration mapped onto the telemetry clock (anchored
/// at construction and again every second). On kCpu the work is the calling thread's and end()
/// records it at once.
/// Not thread-safe: one thread begins, ends and polls (the engine's caller).
class SpanTimer {
 public:
  SpanTimer(Telemetry* telemetry, Backend backend, int device);
  ~SpanTimer();
  SpanTimer(const SpanTimer&) = delete;
  SpanTimer& operator=(const SpanTimer&) = delete;

  struct Token {
    int32_t slot = -1;     ///< kCuda: the pair of events
    uint64_t host_ns = 0;  ///< kCpu: the start
  };
  /// Starts a span of the work enqueued on `stream` from now on.
  Token begin(cudaStream_t stream);
  /// Ends it after the work enqueued so far; `e` says what it was (kind kSpan, op, track, step,
  /// layer, bytes...). Its time and duration are filled in.
  void end(const Token& token, cudaStream_t stream, const Event& e);
  /// Records finished spans; with `wait`, waits for every pending one first.
  void poll(bool wait);
  size_t pending() const { return pending_.size(); }

 private:
  struct Pending {
    int32_t slot;
    Event event;
  };
  struct Slots;
  void reanchor();  // kCuda: a fresh anchor event and its telemetry time
  Telemetry* telemetry_;
  Backend backend_;
  int device_;
  std::unique_ptr<Slots> slots_;
  std::deque<Pending> pending_;
  std::vector<int32_t> free_;
  uint64_t anchor_ns_ = 0;  // telemetry time of the anchor event
};

/// The link's speed: the best of three rounds of `copies` back-to-back copies of `bytes`, each
/// way. kCuda: pinned host memory <-> device memory on a private stream, timed by CUDA events.
/// kCpu: host -> host memcpy (the CPU backend's reads from the host tier are copies); d2h_ns is 0.
struct LinkPeak {
  Backend backend = Backend::kCpu;
  size_t bytes = 0;  ///< per round (copies x bytes)
  uint64_t h2d_ns = 0, d2h_ns = 0;
  double h2d_gbps() const { return h2d_ns ? static_cast<double>(bytes) / h2d_ns : 0.0; }
  double d2h_gbps() const { return d2h_ns ? static_cast<double>(bytes) / d2h_ns : 0.0; }
};
LinkPeak measure_link(Backend backend, int device, size_t bytes = 64u << 20, int copies = 1);
/// Records `peak` as kLink events (h2d and d2h; one of direction none on kCpu).
void record_link(Telemetry* telemetry, const LinkPeak& peak);

}  // namespace kvtier::scheduler
