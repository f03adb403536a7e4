// HostArena: lazily grown slabs of pinned memory, one free list of fixed-size pages.
#include "memory/host_arena.h"

#include <algorithm>

#include "memory/core/check.h"
#include "memory/core/log.h"
#include "memory/numa_topology.h"

namespace kvtier::memory {

HostArena::HostArena(const HostArenaConfig& config)
    : page_bytes_(config.page_bytes), pin_(config.pin) {
  KVTIER_CHECK(config.bytes_limit > 0, "host arena bytes_limit must be > 0");
  KVTIER_CHECK(page_bytes_ >= 4096 && page_bytes_ % 4096 == 0, "host arena page_bytes ",
               page_bytes_, " must be a positive multiple of 4096");
  KVTIER_CHECK(config.bytes_limit >= page_bytes_, "host arena bytes_limit ", config.bytes_limit,
               " is smaller than one page (", page_bytes_, " bytes)");
  num_pages_limit_ = config.bytes_limit / page_bytes_;
  KVTIER_CHECK(num_pages_limit_ <= (size_t{1} << 31), "host arena bytes_limit ", config.bytes_limit,
               " holds more than 2^31 pages of ", page_bytes_, " bytes");
  pages_per_slab_ = std::max<size_t>(1, config.slab_bytes / page_bytes_);
  pages_per_slab_ = std::min(pages_per_slab_, num_pages_limit_);
  max_slabs_ = (num_pages_limit_ + pages_per_slab_ - 1) / pages_per_slab_;
  slabs_ = std::make_unique<std::atomic<Slab*>[]>(max_slabs_);
  for (size_t i = 0; i < max_slabs_; ++i) slabs_[i].store(nullptr, std::memory_order_relaxed);

  numa_node_ = config.numa_node;
  if (numa_node_ == kNumaNearestGpu)
    numa_node_ = NumaTopology::instance().node_of_gpu(config.device);
  if (numa_node_ < kNumaAny) numa_node_ = kNumaAny;
}

HostArena::~HostArena() {
  const size_t used = pages_used_.load();
  if (used != 0) KVTIER_LOG(kWarn, "host arena destroyed with ", used, " pages still in use");
}

bool HostArena::add_slab_locked() {
  if (owned_slabs_.size() >= max_slabs_) return false;
  const size_t pages = std::min(pages_per_slab_, num_pages_limit_ - pages_carved_);
  auto slab = std::make_unique<Slab>();
  try {
    slab->buffer = PinnedBuffer::allocate(pages * page_bytes_, numa_node_, pin_);
  } catch (const CapacityError&) {
    return false;
  }
  return install_slab_locked(std::move(slab), pages);
}

bool HostArena::install_slab_locked(std::unique_ptr<Slab> slab, size_t pages) {
  const size_t index = owned_slabs_.size();
  if (index >= max_slabs_ || pages == 0 || pages > num_pages_limit_ - pages_carved_) return false;
  slab->num_pages = static_cast<uint32_t>(pages);
  if (!slab->buffer.note().empty() && pin_note_.empty()) pin_note_ = slab->buffer.note();
  // Push in reverse so the LIFO free list hands out low addresses first.
  const HostPageId first = static_cast<HostPageId>(index * pages_per_slab_);
  for (size_t i = pages; i-- > 0;) free_list_.push_back(first + static_cast<HostPageId>(i));
  pages_carved_ += pages;
  slabs_[index].store(slab.get(), std::memory_order_release);
  owned_slabs_.push_back(std::move(slab));
  return true;
}

Status HostArena::allocate(size_t count, std::vector<HostPageId>* out) {
  KVTIER_CHECK(out != nullptr, "HostArena::allocate: out is null");
  if (count == 0) return Status::ok();
  std::lock_guard<std::mutex> lock(mu_);
  const size_t used = pages_used_.load(std::memory_order_relaxed);
  if (used + count > num_pages_limit_) {
    return Status::capacity(
        detail::str_cat("host arena exhausted: ", count, " pages (", count * page_bytes_,
                        " bytes) requested, ", num_pages_limit_ - used, " of ", num_pages_limit_,
                        " pages free (limit ", num_pages_limit_ * page_bytes_, " bytes)"));
  }
  while (free_list_.size() < count) {
    if (!add_slab_locked()) {
      return Status::capacity(detail::str_cat(
          "host arena could not obtain another slab of ", pages_per_slab_ * page_bytes_,
          " bytes from the system (", count, " pages requested, ", free_list_.size(), " free)"));
    }
  }
  out->reserve(out->size() + count);
  for (size_t i = 0; i < count; ++i) {
    out->push_back(free_list_.back());
    free_list_.pop_back();
  }
  pages_used_.store(used + count, std::memory_order_relaxed);
  pages_peak_ = std::max(pages_peak_, used + count);
  return Status::ok();
}

size_t HostArena::reserve(size_t min_free) {
  for (;;) {
    size_t pages = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (free_list_.size() >= min_free || owned_slabs_.size() >= max_slabs_) {
        return free_list_.size();
      }
      pages = std::min(pages_per_slab_, num_pages_limit_ - pages_carved_);
    }
    auto slab = std::make_unique<Slab>();
    try {
      slab->buffer = PinnedBuffer::allocate(pages * page_bytes_, numa_node_, pin_);
    } catch (const CapacityError&) {
      return free_pages();
    }
    std::lock_guard<std::mutex> lock(mu_);
    // Another thread may have added slabs meanwhile: this one then goes back if it no longer
    // fits the limit (its memory is freed outside the lock, by the unique_ptr).
    const size_t left = num_pages_limit_ - pages_carved_;
    if (owned_slabs_.size() >= max_slabs_ || left == 0) return free_list_.size();
    if (pages > left) return free_list_.size();
    install_slab_locked(std::move(slab), pages);
  }
}

size_t HostArena::free_pages() const {
  std::lock_guard<std::mutex> lock(mu_);
  return free_list_.size();
}

void HostArena::release(const HostPageId* pages, size_t count) {
  if (count == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  const size_t used = pages_used_.load(std::memory_order_relaxed);
  KVTIER_ASSERT(count <= used);
  for (size_t i = 0; i < count; ++i) {
    KVTIER_DASSERT(pages[i] / pages_per_slab_ < owned_slabs_.size());
    free_list_.push_back(pages[i]);
  }
  pages_used_.store(used - count, std::memory_order_relaxed);
}

HostArenaStats HostArena::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  HostArenaStats s;
  s.bytes_used = pages_used_.load(std::memory_order_relaxed) * page_bytes_;
  s.bytes_peak = pages_peak_ * page_bytes_;
  s.bytes_limit = num_pages_limit_ * page_bytes_;
  s.bytes_reserved = pages_carved_ * page_bytes_;
  s.num_slabs = owned_slabs_.size();
  for (const auto& slab : owned_slabs_) s.num_pinned_slabs += slab->buffer.is_pinned() ? 1 : 0;
  return s;
}

bool HostArena::is_pinned() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (owned_slabs_.empty()) return false;
  for (const auto& slab : owned_slabs_)
    if (!slab->buffer.is_pinned()) return false;
  return true;
}

std::string HostArena::pin_note() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pin_note_;
}

}  // namespace kvtier::memory
