// PinnedBuffer: hwloc node binding + cudaHostRegister, else cudaHostAlloc, else pageable.
#include "memory/pinned_buffer.h"

#include <atomic>
#include <cstdlib>
#include <utility>

#include "memory/core/check.h"
#include "memory/core/cuda_raii.h"
#include "memory/core/log.h"
#include "memory/numa_topology.h"

#if KVTIER_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace kvtier::memory {

namespace {

std::atomic<testing::PinFault> g_pin_fault{testing::PinFault::kNone};

constexpr size_t kHostAlignment = 4096;

size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

void release_pageable(void* p, size_t) { std::free(p); }
void release_numa_pageable(void* p, size_t bytes) {
  NumaTopology::instance().free_on_node(p, bytes);
}
#if KVTIER_WITH_CUDA
void release_numa_pinned(void* p, size_t bytes) {
  if (cudaHostUnregister(p) != cudaSuccess) {
    (void)cudaGetLastError();
    KVTIER_LOG(kError, "cudaHostUnregister failed");
  }
  NumaTopology::instance().free_on_node(p, bytes);
}
void release_cuda_host(void* p, size_t) {
  if (cudaFreeHost(p) != cudaSuccess) {
    (void)cudaGetLastError();
    KVTIER_LOG(kError, "cudaFreeHost failed");
  }
}
#endif

bool pin_refused_by_fault() {
  return g_pin_fault.load(std::memory_order_relaxed) == testing::PinFault::kRefuse;
}

}  // namespace

const char* host_memory_kind_name(HostMemoryKind kind) {
  switch (kind) {
    case HostMemoryKind::kNumaPinned:
      return "pinned (NUMA-bound, registered)";
    case HostMemoryKind::kPinned:
      return "pinned (cudaHostAlloc)";
    case HostMemoryKind::kNumaPageable:
      return "pageable (NUMA-bound)";
    case HostMemoryKind::kPageable:
      return "pageable";
  }
  return "?";
}

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
  std::swap(ptr_, o.ptr_);
  std::swap(device_ptr_, o.device_ptr_);
  std::swap(bytes_, o.bytes_);
  std::swap(kind_, o.kind_);
  std::swap(numa_node_, o.numa_node_);
  std::swap(note_, o.note_);
  std::swap(release_, o.release_);
  return *this;
}

PinnedBuffer::~PinnedBuffer() {
  if (ptr_ != nullptr && release_ != nullptr) release_(ptr_, bytes_);
}

PinnedBuffer PinnedBuffer::allocate(size_t size_bytes, int numa_node, PinMode mode) {
  KVTIER_CHECK(size_bytes > 0, "PinnedBuffer::allocate: size_bytes must be > 0");
  const size_t bytes = round_up(size_bytes, kHostAlignment);
  PinnedBuffer b;
  b.bytes_ = bytes;
  std::string why;  // accumulated reasons for each fallback

  const bool want_pin = mode == PinMode::kAuto;
  const bool can_pin = want_pin && cuda::device_available() && !pin_refused_by_fault();
  if (want_pin && !cuda::device_available()) {
    why = "no CUDA device, so nothing to pin for";
  } else if (want_pin && pin_refused_by_fault()) {
    why = "pinning refused (injected fault)";
  }

  // 1. NUMA-bound memory, registered with CUDA.
  if (numa_node >= 0) {
    void* p = NumaTopology::instance().alloc_on_node(bytes, numa_node);
    if (p == nullptr) {
      why +=
          detail::str_cat(why.empty() ? "" : "; ", "binding to NUMA node ", numa_node, " failed");
    } else {
#if KVTIER_WITH_CUDA
      if (can_pin) {
        const cudaError_t err =
            cudaHostRegister(p, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
        void* dp = nullptr;
        if (err == cudaSuccess && cudaHostGetDevicePointer(&dp, p, 0) == cudaSuccess) {
          b.ptr_ = p;
          b.device_ptr_ = dp;
          b.kind_ = HostMemoryKind::kNumaPinned;
          b.numa_node_ = numa_node;
          b.release_ = release_numa_pinned;
          return b;
        }
        if (err == cudaSuccess) (void)cudaHostUnregister(p);
        why += detail::str_cat(why.empty() ? "" : "; ", "cudaHostRegister of ", bytes,
                               " bytes refused (", cudaGetErrorName(err), ")");
        (void)cudaGetLastError();  // tolerated on purpose: clear the sticky error
      }
#endif
      if (!can_pin) {
        b.ptr_ = p;
        b.kind_ = HostMemoryKind::kNumaPageable;
        b.numa_node_ = numa_node;
        b.release_ = release_numa_pageable;
        b.note_ = why;
        if (want_pin && cuda::device_available())
          KVTIER_LOG(kWarn, "host buffer of ", bytes, " bytes is pageable: ", why);
        return b;
      }
      NumaTopology::instance().free_on_node(p, bytes);
    }
  }

  // 2. cudaHostAlloc, placed wherever the driver likes.
#if KVTIER_WITH_CUDA
  if (can_pin) {
    void* p = nullptr;
    const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
    void* dp = nullptr;
    if (err == cudaSuccess && cudaHostGetDevicePointer(&dp, p, 0) == cudaSuccess) {
      b.ptr_ = p;
      b.device_ptr_ = dp;
      b.kind_ = HostMemoryKind::kPinned;
      b.release_ = release_cuda_host;
      b.note_ = why;  // e.g. the NUMA binding failed but pinning worked
      return b;
    }
    if (err == cudaSuccess) (void)cudaFreeHost(p);
    why += detail::str_cat(why.empty() ? "" : "; ", "cudaHostAlloc of ", bytes, " bytes refused (",
                           cudaGetErrorName(err), ")");
    (void)cudaGetLastError();
  }
#endif

  // 3. Pageable.
  void* p = std::aligned_alloc(kHostAlignment, bytes);
  if (p == nullptr) {
    throw CapacityError(
        detail::str_cat("kvtier: cannot allocate ", bytes, " bytes of host memory (", why, ")"));
  }
  b.ptr_ = p;
  b.kind_ = HostMemoryKind::kPageable;
  b.release_ = release_pageable;
  b.note_ = why.empty() ? "pageable memory was asked for" : why;
  if (want_pin && cuda::device_available())
    KVTIER_LOG(kWarn, "host buffer of ", bytes, " bytes is pageable: ", b.note_);
  return b;
}

namespace testing {
void set_pin_fault(PinFault fault) { g_pin_fault.store(fault, std::memory_order_relaxed); }
}  // namespace testing

}  // namespace kvtier::memory
