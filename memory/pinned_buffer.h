// Host buffers for the KV tiers: pinned (page-locked, mapped for device access) when possible,
// pageable otherwise. Pinned memory gives the copy engine ~55 GB/s H2D on an H100 and lets a
// kernel read host rows directly; pageable memory makes async copies synchronous and kernels
// cannot read it, so the fallback is reported, never silent.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace kvtier::memory {

/// kAuto: pin if a CUDA device is available, else pageable. kPageable: never pin.
enum class PinMode : uint8_t { kAuto, kPageable };

/// How a buffer's memory was obtained, in the order they are tried.
enum class HostMemoryKind : uint8_t {
  kNumaPinned,    ///< hwloc_alloc_membind on the requested node, then cudaHostRegister (mapped)
  kPinned,        ///< cudaHostAlloc (mapped, portable)
  kNumaPageable,  ///< bound to the requested node, but not pinned
  kPageable,      ///< aligned_alloc
};
const char* host_memory_kind_name(HostMemoryKind kind);

/// Owner of one host allocation. Move-only; the allocator that succeeded stores its own release
/// function (Mooncake's PinnedHostBuffer), so this header needs no CUDA or hwloc.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  /// Allocates `size_bytes` (> 0). numa_node >= 0 binds to that node; -1 leaves placement to the
  /// OS. Never fails for lack of pinning: it falls back, logs a warning, and note() says why.
  /// Throws CapacityError when even pageable memory cannot be had.
  static PinnedBuffer allocate(size_t size_bytes, int numa_node = -1,
                               PinMode mode = PinMode::kAuto);
  ~PinnedBuffer();
  PinnedBuffer(PinnedBuffer&& o) noexcept { *this = static_cast<PinnedBuffer&&>(o); }
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  std::byte* data() const { return static_cast<std::byte*>(ptr_); }
  /// The same memory as a device address (mapped pinned memory), or nullptr when not pinned.
  std::byte* device_data() const { return static_cast<std::byte*>(device_ptr_); }
  size_t size_bytes() const { return bytes_; }
  bool is_pinned() const {
    return kind_ == HostMemoryKind::kNumaPinned || kind_ == HostMemoryKind::kPinned;
  }
  HostMemoryKind kind() const { return kind_; }
  /// The node the memory is bound to, or -1.
  int numa_node() const { return numa_node_; }
  /// Empty when everything asked for was granted; otherwise why it fell back.
  const std::string& note() const { return note_; }

 private:
  void* ptr_ = nullptr;
  void* device_ptr_ = nullptr;
  size_t bytes_ = 0;
  HostMemoryKind kind_ = HostMemoryKind::kPageable;
  int numa_node_ = -1;
  std::string note_;
  void (*release_)(void*, size_t) = nullptr;
};

namespace testing {
/// Fault injection for tests: while kRefuse is set, every pinning attempt is treated as refused,
/// as a driver out of pinnable memory would. Process-wide.
enum class PinFault : uint8_t { kNone, kRefuse };
void set_pin_fault(PinFault fault);
}  // namespace testing

}  // namespace kvtier::memory
