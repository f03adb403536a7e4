// CUDA resource owners and the device probe. Built with or without the toolkit: without it every
// owner throws on construction and device_available() is false.
#include "memory/core/cuda_raii.h"

#include <cstdlib>
#include <cstring>
#include <mutex>

#include "memory/core/check.h"
#include "memory/core/log.h"

#if KVTIER_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace kvtier {
namespace detail {

#if KVTIER_WITH_CUDA
void throw_cuda_error(int err, const char* expr, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  throw CudaError(str_cat("kvtier: CUDA error ", cudaGetErrorName(static_cast<cudaError_t>(err)),
                          " (", cudaGetErrorString(static_cast<cudaError_t>(err)), ") in ", expr,
                          " at ", base ? base + 1 : file, ":", line));
}
void sync_check(const char* what, const char* file, int line) {
#if KVTIER_SYNC_CHECKS
  const cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) throw_cuda_error(static_cast<int>(err), what, file, line);
#else
  (void)what, (void)file, (void)line;
#endif
}
#else
void throw_cuda_error(int err, const char* expr, const char* file, int line) {
  throw CudaError(str_cat("kvtier: CUDA error ", err, " in ", expr, " at ", file, ":", line));
}
void sync_check(const char*, const char*, int) {}
#endif

}  // namespace detail

namespace cuda {

bool built_with_cuda() { return KVTIER_WITH_CUDA != 0; }

#if KVTIER_WITH_CUDA

namespace {
struct Probe {
  int count = 0;
  std::string reason;
};
const Probe& probe() {
  static const Probe p = [] {
    Probe r;
    if (const char* v = std::getenv("KVTIER_FORCE_CPU"); v && std::strcmp(v, "0") != 0) {
      r.reason = "KVTIER_FORCE_CPU is set";
      return r;
    }
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      // cudaErrorNoDevice, cudaErrorInsufficientDriver and friends: CPU mode, not failure.
      r.reason = detail::str_cat(cudaGetErrorName(err), ": ", cudaGetErrorString(err));
      (void)cudaGetLastError();  // clear the sticky error
      return r;
    }
    r.count = n;
    if (n == 0) r.reason = "no CUDA device";
    return r;
  }();
  return p;
}
}  // namespace

bool device_available() { return probe().count > 0; }
int device_count() { return probe().count; }

std::string device_pci_bus_id(int device) {
  if (!device_available()) return "";
  char buf[32] = {0};
  if (cudaDeviceGetPCIBusId(buf, sizeof(buf), device) != cudaSuccess) {
    (void)cudaGetLastError();
    return "";
  }
  return buf;
}

std::string device_description(int device) {
  if (!device_available()) return "no CUDA device (" + probe().reason + ")";
  cudaDeviceProp prop{};
  KVTIER_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return detail::str_cat(prop.name, ", sm_", prop.major, prop.minor, ", ", prop.multiProcessorCount,
                         " SMs, ", prop.totalGlobalMem >> 20, " MiB");
}

DeviceGuard::DeviceGuard(int device) {
  KVTIER_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device) KVTIER_CUDA_CHECK(cudaSetDevice(device));
}
DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0 && cudaSetDevice(previous_) != cudaSuccess) {
    KVTIER_LOG(kError, "DeviceGuard: cudaSetDevice(", previous_, ") failed");
  }
}

Stream::Stream(int device, Priority priority) : device_(device) {
  DeviceGuard guard(device);
  int least = 0, greatest = 0;
  KVTIER_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  KVTIER_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking,
                                                 priority == Priority::kHigh ? greatest : least));
}
Stream::~Stream() {
  if (stream_ != nullptr && cudaStreamDestroy(stream_) != cudaSuccess)
    KVTIER_LOG(kError, "cudaStreamDestroy failed");
}
Stream& Stream::operator=(Stream&& o) noexcept {
  std::swap(stream_, o.stream_);
  std::swap(device_, o.device_);
  return *this;
}
void Stream::wait(const Event& event) {
  KVTIER_CUDA_CHECK(cudaStreamWaitEvent(stream_, event.get(), 0));
}
void Stream::synchronize() { KVTIER_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

Event::Event(EventTiming timing) {
  KVTIER_CUDA_CHECK(cudaEventCreateWithFlags(
      &event_, timing == EventTiming::kEnabled ? cudaEventDefault : cudaEventDisableTiming));
}
Event::~Event() {
  if (event_ != nullptr && cudaEventDestroy(event_) != cudaSuccess)
    KVTIER_LOG(kError, "cudaEventDestroy failed");
}
Event& Event::operator=(Event&& o) noexcept {
  std::swap(event_, o.event_);
  return *this;
}
void Event::record(cudaStream_t stream) { KVTIER_CUDA_CHECK(cudaEventRecord(event_, stream)); }
void Event::synchronize() { KVTIER_CUDA_CHECK(cudaEventSynchronize(event_)); }
bool Event::query() const {
  const cudaError_t err = cudaEventQuery(event_);
  if (err == cudaErrorNotReady) return false;
  KVTIER_CUDA_CHECK(err);
  return true;
}
float elapsed_ms(const Event& start, const Event& stop) {
  float ms = 0.f;
  KVTIER_CUDA_CHECK(cudaEventElapsedTime(&ms, start.get(), stop.get()));
  return ms;
}

DeviceAllocation::DeviceAllocation(size_t size_bytes, int device)
    : bytes_(size_bytes), device_(device) {
  if (size_bytes == 0) return;
  DeviceGuard guard(device);
  const cudaError_t err = cudaMalloc(&ptr_, size_bytes);
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    throw CapacityError(detail::str_cat("kvtier: cudaMalloc of ", size_bytes,
                                        " bytes failed on device ", device, ": out of memory"));
  }
  KVTIER_CUDA_CHECK(err);
}
DeviceAllocation::~DeviceAllocation() {
  if (ptr_ != nullptr && cudaFree(ptr_) != cudaSuccess) KVTIER_LOG(kError, "cudaFree failed");
}
DeviceAllocation& DeviceAllocation::operator=(DeviceAllocation&& o) noexcept {
  std::swap(ptr_, o.ptr_);
  std::swap(bytes_, o.bytes_);
  std::swap(device_, o.device_);
  return *this;
}

void memcpy_async(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  KVTIER_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream));
}
void memset_async(void* dst, int value, size_t bytes, cudaStream_t stream) {
  KVTIER_CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, stream));
}

#else  // !KVTIER_WITH_CUDA

namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw CudaError(detail::str_cat("kvtier: ", what,
                                  " needs CUDA, but kvtier was built without it "
                                  "(KVTIER_WITH_CUDA=OFF or no nvcc at configure time)"));
}
}  // namespace

bool device_available() { return false; }
int device_count() { return 0; }
std::string device_pci_bus_id(int) { return ""; }
std::string device_description(int) { return "no CUDA device (built without CUDA)"; }
DeviceGuard::DeviceGuard(int) { no_cuda("DeviceGuard"); }
DeviceGuard::~DeviceGuard() = default;
Stream::Stream(int, Priority) { no_cuda("Stream"); }
Stream::~Stream() = default;
Stream& Stream::operator=(Stream&& o) noexcept {
  std::swap(stream_, o.stream_);
  std::swap(device_, o.device_);
  return *this;
}
void Stream::wait(const Event&) { no_cuda("Stream::wait"); }
void Stream::synchronize() { no_cuda("Stream::synchronize"); }
Event::Event(EventTiming) { no_cuda("Event"); }
Event::~Event() = default;
Event& Event::operator=(Event&& o) noexcept {
  std::swap(event_, o.event_);
  return *this;
}
void Event::record(cudaStream_t) { no_cuda("Event::record"); }
void Event::synchronize() { no_cuda("Event::synchronize"); }
bool Event::query() const { no_cuda("Event::query"); }
float elapsed_ms(const Event&, const Event&) { no_cuda("elapsed_ms"); }
DeviceAllocation::DeviceAllocation(size_t, int) { no_cuda("DeviceAllocation"); }
DeviceAllocation::~DeviceAllocation() = default;
DeviceAllocation& DeviceAllocation::operator=(DeviceAllocation&& o) noexcept {
  std::swap(ptr_, o.ptr_);
  std::swap(bytes_, o.bytes_);
  std::swap(device_, o.device_);
  return *this;
}
void memcpy_async(void*, const void*, size_t, cudaStream_t) { no_cuda("memcpy_async"); }
void memset_async(void*, int, size_t, cudaStream_t) { no_cuda("memset_async"); }

#endif

}  // namespace cuda
}  // namespace kvtier
