// The machine's NUMA layout through hwloc: which node is nearest a GPU, and node-bound allocation.
// The header includes no hwloc; one topology is loaded lazily per process.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace kvtier::memory {

/// Loaded hwloc topology with PCI devices. Thread-safe after construction (reads only).
class NumaTopology {
 public:
  /// The process-wide topology, loaded on first use.
  static const NumaTopology& instance();

  NumaTopology();
  ~NumaTopology();
  NumaTopology(const NumaTopology&) = delete;
  NumaTopology& operator=(const NumaTopology&) = delete;

  /// Number of NUMA nodes (at least 1 once loaded; 0 if hwloc failed to load).
  int num_nodes() const;
  /// OS index of the NUMA node nearest the PCI device "dddd:bb:dd.f", or -1 if unknown.
  int node_of_pci_device(const std::string& bus_id) const;
  /// OS index of the NUMA node nearest CUDA device `device`, or -1 (no GPU, or unknown).
  int node_of_gpu(int device) const;
  /// Page-aligned memory bound to `node` (hwloc_alloc_membind, strict binding), untouched;
  /// nullptr on failure. Release with free_on_node().
  void* alloc_on_node(size_t bytes, int node) const;
  void free_on_node(void* ptr, size_t bytes) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier::memory
