// Telemetry: Boost.Lockfree bounded queue, atomic totals, JSON Lines drain and writer thread.
#include "scheduler/telemetry.h"

#include <boost/lockfree/queue.hpp>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <system_error>
#include <thread>

#if defined(__linux__)
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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
    case EventKind::kSpan:
      return "span";
    case EventKind::kStep:
      return "step";
    case EventKind::kLink:
      return "link";
    case EventKind::kOccupancy:
      return "occupancy";
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

const char* track_name(Track track) {
  switch (track) {
    case Track::kHost:
      return "host";
    case Track::kCompute:
      return "compute";
    case Track::kCopy:
      return "copy";
    case Track::kSide:
      return "side";
  }
  return "?";
}

const char* op_name(Op op) {
  switch (op) {
    case Op::kNone:
      return "none";
    case Op::kDecode:
      return "decode";
    case Op::kFill:
      return "fill";
    case Op::kAppendCopy:
      return "append_copy";
    case Op::kAppend:
      return "append";
    case Op::kPrefillCopy:
      return "prefill_copy";
    case Op::kPrefillCluster:
      return "prefill_cluster";
    case Op::kPrefillStore:
      return "prefill_store";
    case Op::kPolicy:
      return "policy";
    case Op::kWindow:
      return "window";
    case Op::kAdmit:
      return "admit";
  }
  return "?";
}

int64_t TelemetryStats::total_events() const {
  int64_t n = 0;
  for (int64_t e : events) n += e;
  return n;
}

uint16_t this_thread_index() {
  static std::atomic<uint32_t> next{0};
  thread_local const uint16_t index = static_cast<uint16_t>(next.fetch_add(1) & 0xffff);
  return index;
}

namespace {

constexpr int kFormatVersion = 2;

// Appends `e` as one JSON line. Fields at their default (docs/telemetry.md) are left out.
void append_json(const Event& e, std::string* out) {
  char buf[512];
  int n =
      std::snprintf(buf, sizeof(buf), "{\"t_ns\":%llu,\"kind\":\"%s\",\"step\":%d",
                    static_cast<unsigned long long>(e.time_ns), event_kind_name(e.kind), e.step);
  auto add = [&](const char* fmt, auto... args) {
    if (n >= 0 && n < static_cast<int>(sizeof(buf)))
      n += std::snprintf(buf + n, sizeof(buf) - static_cast<size_t>(n), fmt, args...);
  };
  if (e.dur_ns != 0) add(",\"dur_ns\":%llu", static_cast<unsigned long long>(e.dur_ns));
  if (e.seq != -1) add(",\"seq\":%lld", static_cast<long long>(e.seq));
  if (e.layer != -1) add(",\"layer\":%d", e.layer);
  if (e.kv_head != -1) add(",\"kv_head\":%d", e.kv_head);
  if (e.bytes != 0) add(",\"bytes\":%lld", static_cast<long long>(e.bytes));
  if (e.total != 0) add(",\"total\":%lld", static_cast<long long>(e.total));
  if (e.dir != Direction::kNone) add(",\"dir\":\"%s\"", direction_name(e.dir));
  if (e.hits != 0) add(",\"hits\":%d", e.hits);
  if (e.misses != 0) add(",\"misses\":%d", e.misses);
  if (e.op != Op::kNone) add(",\"op\":\"%s\"", op_name(e.op));
  add(",\"track\":\"%s\",\"thread\":%u}", track_name(e.track), static_cast<unsigned>(e.thread));
  out->append(buf, static_cast<size_t>(std::min<int>(n, static_cast<int>(sizeof(buf)) - 1)));
}

}  // namespace

struct Telemetry::Impl {
  explicit Impl(size_t capacity) : queue(capacity) {}
  boost::lockfree::queue<Event, boost::lockfree::fixed_sized<true>> queue;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  std::atomic<bool> queueing{true};
  std::atomic<int64_t> events[kNumEventKinds] = {};
  std::atomic<int64_t> bytes[kNumDirections] = {};
  std::atomic<int64_t> hits{0}, misses{0}, stall_ns{0}, dropped{0};

  // The writer: the queue's consumer while a file is open.
  std::mutex mu;  // guards the fields below and the writer's wake-ups
  std::condition_variable wake;
  std::thread writer;
  bool stop = false;
  std::FILE* file = nullptr;
  std::string path;
  int64_t written = 0;
  int64_t dropped_at_open = 0;  // the footer counts this trace's drops only
  bool queueing_before = true;  // restored when the file closes
  Status error;

  // Drains the queue into the open file. Called by the writer thread (and close_file after it
  // has joined), never by two at once.
  void write_pending(std::vector<Event>* scratch, std::string* text) {
    scratch->clear();
    Event e;
    while (queue.pop(e)) scratch->push_back(e);
    if (scratch->empty()) return;
    text->clear();
    for (const Event& ev : *scratch) {
      append_json(ev, text);
      text->push_back('\n');
    }
    if (std::fwrite(text->data(), 1, text->size(), file) != text->size() && error.is_ok())
      error = Status::io_error(
          detail::str_cat("writing telemetry file '", path, "' failed: ", std::strerror(errno)));
    written += static_cast<int64_t>(scratch->size());
  }
};

Telemetry::Telemetry(size_t capacity) {
  KVTIER_CHECK(capacity >= 1 && capacity <= 65534, "telemetry capacity ", capacity,
               " is out of range [1, 65534]");
  impl_ = std::make_unique<Impl>(capacity);
}

Telemetry::~Telemetry() { (void)close_file(); }

uint64_t Telemetry::now_ns() const {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now() - impl_->start)
                                   .count());
}

void Telemetry::set_queueing(bool on) { impl_->queueing = on; }
bool Telemetry::queueing() const { return impl_->queueing.load(); }

bool Telemetry::record(Event e) noexcept {
  if (e.time_ns == 0) e.time_ns = now_ns();
  e.thread = this_thread_index();
  if (impl_->queueing.load(std::memory_order_relaxed) && !impl_->queue.bounded_push(e)) {
    impl_->dropped.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  const auto kind = static_cast<size_t>(e.kind);
  const auto dir = static_cast<size_t>(e.dir);
  if (kind < kNumEventKinds) impl_->events[kind].fetch_add(1, std::memory_order_relaxed);
  if (is_transfer(e.kind) && dir < kNumDirections)
    impl_->bytes[dir].fetch_add(e.bytes, std::memory_order_relaxed);
  if (e.kind != EventKind::kEvict) {  // an eviction's `misses` are the clusters it evicted
    if (e.hits) impl_->hits.fetch_add(e.hits, std::memory_order_relaxed);
    if (e.misses) impl_->misses.fetch_add(e.misses, std::memory_order_relaxed);
  }
  if (e.kind == EventKind::kStall)
    impl_->stall_ns.fetch_add(static_cast<int64_t>(e.dur_ns), std::memory_order_relaxed);
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
  std::string s;
  append_json(e, &s);
  return s;
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
  std::string text;
  for (const Event& e : events) {
    append_json(e, &text);
    text.push_back('\n');
  }
  bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  ok = (std::fclose(f) == 0) && ok;
  if (!ok)
    return Status::io_error(
        detail::str_cat("writing telemetry file '", path, "' failed: ", std::strerror(errno)));
  return Status::ok();
}

Status Telemetry::open_file(const std::string& path, int period_ms) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  if (m.file != nullptr)
    return Status::invalid_argument(
        detail::str_cat("telemetry file '", m.path, "' is open already"));
  if (period_ms < 1) return Status::invalid_argument("telemetry writer period must be >= 1 ms");
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr)
    return Status::io_error(
        detail::str_cat("cannot open telemetry file '", path, "': ", std::strerror(errno)));
  std::fprintf(
      f, "{\"t_ns\":%llu,\"kind\":\"begin\",\"format\":\"kvtier-telemetry\",\"version\":%d}\n",
      static_cast<unsigned long long>(now_ns()), kFormatVersion);
  m.file = f;
  m.path = path;
  m.written = 0;
  m.dropped_at_open = m.dropped.load();
  m.error = Status::ok();
  m.stop = false;
  m.queueing_before = m.queueing.exchange(true);
  try {
    m.writer = std::thread([&m, period_ms] {
#if defined(__linux__)
      // Background work: the scheduler should prefer the engine's workers and the caller.
      (void)setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
#endif
      std::vector<Event> scratch;
      std::string text;
      std::unique_lock<std::mutex> lk(m.mu);
      while (!m.stop) {
        m.wake.wait_for(lk, std::chrono::milliseconds(period_ms), [&m] { return m.stop; });
        lk.unlock();
        m.write_pending(&scratch, &text);
        lk.lock();
      }
    });
  } catch (const std::system_error& e) {
    std::fclose(f);
    m.file = nullptr;
    m.queueing = m.queueing_before;
    return Status::io_error(detail::str_cat("telemetry writer thread: ", e.what()));
  }
  return Status::ok();
}

Status Telemetry::close_file() {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    if (m.file == nullptr) return Status::ok();
    m.stop = true;
  }
  m.wake.notify_all();
  m.writer.join();
  std::vector<Event> scratch;
  std::string text;
  m.write_pending(&scratch, &text);  // what came in after the writer's last pass
  std::fprintf(m.file, "{\"t_ns\":%llu,\"kind\":\"end\",\"events\":%lld,\"dropped\":%lld}\n",
               static_cast<unsigned long long>(now_ns()), static_cast<long long>(m.written),
               static_cast<long long>(m.dropped.load() - m.dropped_at_open));
  const bool closed = std::fclose(m.file) == 0;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    m.file = nullptr;
  }
  m.queueing = m.queueing_before;
  Status st = m.error;
  if (st.is_ok() && !closed)
    st = Status::io_error(
        detail::str_cat("closing telemetry file '", m.path, "' failed: ", std::strerror(errno)));
  return st;
}

bool Telemetry::file_open() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->file != nullptr;
}

TelemetryStats Telemetry::stats() const {
  TelemetryStats s;
  for (int i = 0; i < kNumEventKinds; ++i) s.events[i] = impl_->events[i].load();
  for (int i = 0; i < kNumDirections; ++i) s.bytes[i] = impl_->bytes[i].load();
  s.hits = impl_->hits.load();
  s.misses = impl_->misses.load();
  s.stall_us = impl_->stall_ns.load() / 1000;
  s.dropped = impl_->dropped.load();
  return s;
}

}  // namespace kvtier::scheduler
