// Bounded host arena for the KV store: slabs of pinned (mapped) memory placed on the NUMA node
// nearest the GPU, obtained lazily up to a byte limit and sub-allocated in fixed-size pages.
// A full arena is an expected outcome (Status kCapacity), so callers can fail without damage.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "memory/core/status.h"
#include "memory/pinned_buffer.h"

namespace kvtier::memory {

/// Index of one arena page.
using HostPageId = uint32_t;

/// Place the arena on the NUMA node nearest `HostArenaConfig::device` (when it can be found).
constexpr int kNumaNearestGpu = -2;
/// Leave placement to the OS.
constexpr int kNumaAny = -1;

struct HostArenaConfig {
  size_t bytes_limit = 0;           ///< hard cap on the arena's memory; required, > 0
  size_t page_bytes = 64 << 10;     ///< sub-allocation unit; a multiple of 4 KiB
  size_t slab_bytes = 256 << 20;    ///< granularity of pinning (rounded to whole pages)
  int numa_node = kNumaNearestGpu;  ///< kNumaNearestGpu, kNumaAny, or an OS node index
  int device = 0;                   ///< GPU whose locality decides kNumaNearestGpu
  PinMode pin = PinMode::kAuto;
};

/// Snapshot of the arena's accounting, in bytes.
struct HostArenaStats {
  size_t bytes_used = 0;      ///< pages handed out
  size_t bytes_peak = 0;      ///< high-water mark of bytes_used
  size_t bytes_limit = 0;     ///< the configured cap, rounded down to whole pages
  size_t bytes_reserved = 0;  ///< slabs obtained from the OS/driver so far
  size_t num_slabs = 0;
  size_t num_pinned_slabs = 0;
};

/// Thread-safe: allocate/release take a mutex; page address lookups are lock-free.
class HostArena {
 public:
  explicit HostArena(const HostArenaConfig& config);
  ~HostArena();
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  /// Appends `count` pages to `out`, all or nothing. kCapacity (nothing changed) when the limit
  /// would be passed, with a message naming the request and the arena's state.
  Status allocate(size_t count, std::vector<HostPageId>* out);
  /// Returns pages to the free list. Each page must have come from allocate() and not be freed yet.
  void release(const HostPageId* pages, size_t count);
  /// Obtains slabs until at least `min_free` pages are free (or the limit is reached). A slab is
  /// allocated and pinned (tens of milliseconds for 256 MiB) outside the arena's lock, so
  /// allocate() and release() on other threads go on meanwhile: call it from a background thread
  /// ahead of need, so that allocate() finds pages instead of pinning a slab itself. Returns the
  /// pages free afterwards.
  size_t reserve(size_t min_free);
  /// Pages on the free list now.
  size_t free_pages() const;

  /// Host address of a page; valid until the arena is destroyed.
  std::byte* host_ptr(HostPageId page) const {
    const Slab& s = *slabs_[page / pages_per_slab_].load(std::memory_order_acquire);
    return s.buffer.data() + static_cast<size_t>(page % pages_per_slab_) * page_bytes_;
  }
  /// Device address of a page (mapped pinned memory), or nullptr if its slab is not pinned.
  std::byte* device_ptr(HostPageId page) const {
    const Slab& s = *slabs_[page / pages_per_slab_].load(std::memory_order_acquire);
    if (s.buffer.device_data() == nullptr) return nullptr;
    return s.buffer.device_data() + static_cast<size_t>(page % pages_per_slab_) * page_bytes_;
  }

  size_t page_bytes() const { return page_bytes_; }
  size_t bytes_limit() const { return num_pages_limit_ * page_bytes_; }
  size_t bytes_used() const { return pages_used_.load(std::memory_order_relaxed) * page_bytes_; }
  HostArenaStats stats() const;
  /// True when every slab obtained so far is pinned (and at least one exists).
  bool is_pinned() const;
  /// The NUMA node the arena aims for (-1 when none).
  int numa_node() const { return numa_node_; }
  /// Why slabs fell back to pageable memory, empty if none did.
  std::string pin_note() const;

 private:
  struct Slab {
    PinnedBuffer buffer;
    uint32_t num_pages = 0;
  };
  bool add_slab_locked();  // false when the limit or the allocator says no
  // Installs an allocated slab of `pages` pages as the next one; false (nothing changed) when the
  // limit no longer leaves room for it.
  bool install_slab_locked(std::unique_ptr<Slab> slab, size_t pages);

  const size_t page_bytes_;
  size_t pages_per_slab_ = 0;
  size_t num_pages_limit_ = 0;
  size_t max_slabs_ = 0;
  int numa_node_ = -1;
  PinMode pin_;

  mutable std::mutex mu_;
  std::unique_ptr<std::atomic<Slab*>[]> slabs_;  // [max_slabs_], filled in order
  std::vector<std::unique_ptr<Slab>> owned_slabs_;
  std::vector<HostPageId> free_list_;  // LIFO: recently freed pages are reused first
  size_t pages_carved_ = 0;            // pages ever placed on the free list
  std::atomic<size_t> pages_used_{0};
  size_t pages_peak_ = 0;
  std::string pin_note_;
};

}  // namespace kvtier::memory
