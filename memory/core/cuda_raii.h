// Move-only owners of CUDA resources (stream, event, device allocation) and the device probe.
// The header includes no CUDA: it builds without the toolkit, where every constructor throws and
// device_available() is false. Destructors never throw; they log and carry on (CUTLASS).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "memory/core/cuda_fwd.h"

namespace kvtier::cuda {

/// True when the library was built with CUDA.
bool built_with_cuda();

/// True when CUDA is built in and at least one device is usable. "No device" and "no driver" mean
/// CPU mode, not failure (the sticky error is cleared). Lazy and cached; thread-safe.
bool device_available();
/// Number of usable devices (0 in CPU mode).
int device_count();
/// "0000:1b:00.0"-style PCI bus id of `device`, or "" when unknown.
std::string device_pci_bus_id(int device);
/// "NVIDIA H100 80GB HBM3, sm_90, 132 SMs" or "no CUDA device (reason)".
std::string device_description(int device);

/// Sets the current device for its scope and restores the previous one (faiss DeviceScope).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

enum class Priority : uint8_t { kNormal, kHigh };

class Event;

/// Non-blocking stream on one device. Move-only.
class Stream {
 public:
  explicit Stream(int device = 0, Priority priority = Priority::kNormal);
  ~Stream();
  Stream(Stream&& o) noexcept { *this = std::move(o); }
  Stream& operator=(Stream&& o) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  cudaStream_t get() const { return stream_; }
  int device() const { return device_; }
  /// cudaStreamWaitEvent: later work on this stream waits for `event`, without a host sync.
  void wait(const Event& event);
  /// Blocks the calling thread until all work on this stream is done.
  void synchronize();

 private:
  cudaStream_t stream_ = nullptr;
  int device_ = -1;
};

enum class EventTiming : uint8_t { kDisabled, kEnabled };

/// A CUDA event. Move-only. Timing is disabled unless asked for (cheaper to record and wait on).
class Event {
 public:
  explicit Event(EventTiming timing = EventTiming::kDisabled);
  ~Event();
  Event(Event&& o) noexcept { *this = std::move(o); }
  Event& operator=(Event&& o) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  cudaEvent_t get() const { return event_; }
  void record(cudaStream_t stream);
  void synchronize();
  /// Non-blocking: true once the recorded work has completed.
  bool query() const;

 private:
  cudaEvent_t event_ = nullptr;
};

/// Milliseconds between two recorded, completed, timing-enabled events.
float elapsed_ms(const Event& start, const Event& stop);

/// Untyped device allocation (cudaMalloc). Move-only; contents are uninitialized.
class DeviceAllocation {
 public:
  DeviceAllocation() = default;
  DeviceAllocation(size_t size_bytes, int device);
  ~DeviceAllocation();
  DeviceAllocation(DeviceAllocation&& o) noexcept { *this = std::move(o); }
  DeviceAllocation& operator=(DeviceAllocation&& o) noexcept;
  DeviceAllocation(const DeviceAllocation&) = delete;
  DeviceAllocation& operator=(const DeviceAllocation&) = delete;

  void* get() const { return ptr_; }
  size_t size_bytes() const { return bytes_; }
  int device() const { return device_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  int device_ = -1;
};

/// Typed view over a DeviceAllocation of `count` elements of T.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t count, int device) : alloc_(count * sizeof(T), device), count_(count) {}
  T* get() const { return static_cast<T*>(alloc_.get()); }
  size_t size() const { return count_; }
  size_t size_bytes() const { return alloc_.size_bytes(); }

 private:
  DeviceAllocation alloc_;
  size_t count_ = 0;
};

/// cudaMemcpyAsync with cudaMemcpyDefault (direction inferred from unified addressing).
void memcpy_async(void* dst, const void* src, size_t bytes, cudaStream_t stream);
/// cudaMemsetAsync.
void memset_async(void* dst, int value, size_t bytes, cudaStream_t stream);

}  // namespace kvtier::cuda
