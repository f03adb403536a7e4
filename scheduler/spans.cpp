// SpanTimer and measure_link.
#include "scheduler/spans.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "memory/core/check.h"
#include "memory/core/cuda_raii.h"
#include "memory/pinned_buffer.h"

#if KVTIER_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace kvtier::scheduler {

struct SpanTimer::Slots {
#if KVTIER_WITH_CUDA
  std::unique_ptr<cuda::Stream> stream;  // private and idle: an anchor runs as it is issued
  std::unique_ptr<cuda::Event> anchor;
  std::vector<std::pair<cuda::Event, cuda::Event>> events;  // [begin, end] per slot
#endif
};

namespace {
// GPU times are float milliseconds from the anchor: re-anchored every second, they keep
// sub-microsecond resolution and follow any drift between the GPU and host clocks.
constexpr uint64_t kReanchorNs = 1000000000ull;
}  // namespace

void SpanTimer::reanchor() {
#if KVTIER_WITH_CUDA
  cuda::DeviceGuard guard(device_);
  if (!slots_->stream) slots_->stream = std::make_unique<cuda::Stream>(device_);
  auto anchor = std::make_unique<cuda::Event>(cuda::EventTiming::kEnabled);
  const uint64_t t0 = telemetry_->now_ns();
  anchor->record(slots_->stream->get());
  anchor->synchronize();
  const uint64_t t1 = telemetry_->now_ns();
  // GPU time 0 of the anchor = the midpoint of issue and completion, within a few microseconds.
  slots_->anchor = std::move(anchor);
  anchor_ns_ = t0 + (t1 - t0) / 2;
#endif
}

SpanTimer::SpanTimer(Telemetry* telemetry, Backend backend, int device)
    : telemetry_(telemetry), backend_(backend), device_(device), slots_(new Slots) {
  KVTIER_CHECK(telemetry != nullptr, "SpanTimer: telemetry is null");
  if (backend_ == Backend::kCuda) reanchor();
}

SpanTimer::~SpanTimer() = default;

SpanTimer::Token SpanTimer::begin(cudaStream_t stream) {
  Token t;
#if KVTIER_WITH_CUDA
  if (backend_ == Backend::kCuda) {
    if (free_.empty()) {
      slots_->events.emplace_back(cuda::Event(cuda::EventTiming::kEnabled),
                                  cuda::Event(cuda::EventTiming::kEnabled));
      free_.push_back(static_cast<int32_t>(slots_->events.size() - 1));
    }
    t.slot = free_.back();
    free_.pop_back();
    slots_->events[t.slot].first.record(stream);
    return t;
  }
#endif
  (void)stream;
  t.host_ns = telemetry_->now_ns();
  return t;
}

void SpanTimer::end(const Token& token, cudaStream_t stream, const Event& e) {
  if (token.slot < 0) {  // host work, done by now
    Event ev = e;
    ev.time_ns = token.host_ns;
    ev.dur_ns = telemetry_->now_ns() - token.host_ns;
    telemetry_->record(ev);
    return;
  }
#if KVTIER_WITH_CUDA
  slots_->events[token.slot].second.record(stream);
  pending_.push_back(Pending{token.slot, e});
#else
  (void)stream;
#endif
}

void SpanTimer::poll(bool wait) {
#if KVTIER_WITH_CUDA
  if (!pending_.empty() && telemetry_->now_ns() - anchor_ns_ > kReanchorNs) reanchor();
  while (!pending_.empty()) {
    const Pending& p = pending_.front();
    auto& [b, e] = slots_->events[p.slot];
    if (wait)
      e.synchronize();
    else if (!e.query())
      return;
    Event ev = p.event;
    const double start_ms = cuda::elapsed_ms(*slots_->anchor, b);
    const double dur_ms = cuda::elapsed_ms(b, e);
    // Work begun before the latest anchor has a negative offset from it.
    ev.time_ns =
        static_cast<uint64_t>(std::max(0.0, static_cast<double>(anchor_ns_) + start_ms * 1e6));
    ev.dur_ns = static_cast<uint64_t>(std::max(0.0, dur_ms) * 1e6);
    telemetry_->record(ev);
    free_.push_back(p.slot);
    pending_.pop_front();
  }
#else
  (void)wait;
#endif
}

LinkPeak measure_link(Backend backend, int device, size_t bytes, int copies) {
  KVTIER_CHECK(bytes > 0 && copies > 0, "measure_link: bytes and copies must be > 0");
  LinkPeak peak;
  peak.backend = backend;
#if KVTIER_WITH_CUDA
  if (backend == Backend::kCuda) {
    cuda::DeviceGuard guard(device);
    memory::PinnedBuffer host = memory::PinnedBuffer::allocate(bytes);
    cuda::DeviceAllocation dev(bytes, device);
    cuda::Stream s(device);
    cuda::Event b(cuda::EventTiming::kEnabled), e(cuda::EventTiming::kEnabled);
    std::memset(host.data(), 1, bytes);
    cuda::memcpy_async(dev.get(), host.data(), bytes, s.get());  // warm-up
    for (const bool h2d : {true, false}) {
      double best = 1e30;
      for (int round = 0; round < 3; ++round) {
        b.record(s.get());
        for (int i = 0; i < copies; ++i) {
          if (h2d)
            cuda::memcpy_async(dev.get(), host.data(), bytes, s.get());
          else
            cuda::memcpy_async(host.data(), dev.get(), bytes, s.get());
        }
        e.record(s.get());
        e.synchronize();
        best = std::min<double>(best, cuda::elapsed_ms(b, e));
      }
      (h2d ? peak.h2d_ns : peak.d2h_ns) = std::max<uint64_t>(1, static_cast<uint64_t>(best * 1e6));
    }
    peak.bytes = bytes * static_cast<size_t>(copies);
    return peak;
  }
#endif
  (void)device;
  bytes = std::min<size_t>(bytes, 16u << 20);
  std::vector<std::byte> src(bytes, std::byte{1}), dst(bytes);
  uint64_t best = ~uint64_t{0};
  for (int round = 0; round < 3; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < copies; ++i) std::memcpy(dst.data(), src.data(), bytes);
    const auto ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0)
            .count();
    best = std::min(best, static_cast<uint64_t>(std::max<int64_t>(ns, 1)));
  }
  peak.bytes = bytes * static_cast<size_t>(copies);
  peak.h2d_ns = best;
  return peak;
}

void record_link(Telemetry* telemetry, const LinkPeak& peak) {
  KVTIER_CHECK(telemetry != nullptr, "record_link: telemetry is null");
  auto emit = [&](Direction dir, uint64_t ns) {
    Event e;
    e.kind = EventKind::kLink;
    e.dir = dir;
    e.bytes = static_cast<int64_t>(peak.bytes);
    e.dur_ns = ns;
    telemetry->record(e);
  };
  if (peak.backend == Backend::kCuda) {
    emit(Direction::kHostToDevice, peak.h2d_ns);
    emit(Direction::kDeviceToHost, peak.d2h_ns);
  } else {
    emit(Direction::kNone, peak.h2d_ns);
  }
}

}  // namespace kvtier::scheduler
