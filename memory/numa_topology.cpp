// hwloc-backed NUMA topology: nearest node of a PCI device and node-bound allocation.
#include "memory/numa_topology.h"

#include <hwloc.h>

#include <algorithm>
#include <cctype>
#include <fstream>

#include "memory/core/cuda_raii.h"
#include "memory/core/log.h"

namespace kvtier::memory {

struct NumaTopology::Impl {
  hwloc_topology_t topo = nullptr;
  bool loaded = false;
};

const NumaTopology& NumaTopology::instance() {
  static const NumaTopology topology;
  return topology;
}

NumaTopology::NumaTopology() : impl_(std::make_unique<Impl>()) {
  if (hwloc_topology_init(&impl_->topo) != 0) {
    KVTIER_LOG(kWarn, "hwloc_topology_init failed; NUMA placement disabled");
    impl_->topo = nullptr;
    return;
  }
  // PCI devices are filtered out by default; keep the important ones (GPUs) so a GPU's locality
  // can be looked up by bus id.
  hwloc_topology_set_io_types_filter(impl_->topo, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
  if (hwloc_topology_load(impl_->topo) != 0) {
    KVTIER_LOG(kWarn, "hwloc_topology_load failed; NUMA placement disabled");
    return;
  }
  impl_->loaded = true;
}

NumaTopology::~NumaTopology() {
  if (impl_->topo != nullptr) hwloc_topology_destroy(impl_->topo);
}

int NumaTopology::num_nodes() const {
  if (!impl_->loaded) return 0;
  return std::max(1, hwloc_get_nbobjs_by_type(impl_->topo, HWLOC_OBJ_NUMANODE));
}

int NumaTopology::node_of_pci_device(const std::string& bus_id) const {
  if (bus_id.empty()) return -1;
  if (impl_->loaded) {
    hwloc_obj_t pci = hwloc_get_pcidev_by_busidstring(impl_->topo, bus_id.c_str());
    if (pci != nullptr) {
      hwloc_obj_t anc = hwloc_get_non_io_ancestor_obj(impl_->topo, pci);
      if (anc != nullptr && anc->nodeset != nullptr && !hwloc_bitmap_iszero(anc->nodeset) &&
          hwloc_bitmap_weight(anc->nodeset) == 1) {
        return hwloc_bitmap_first(anc->nodeset);
      }
    }
  }
  // Fallback: the kernel's own view (virtual machines often hide the PCI tree from hwloc).
  std::string lower = bus_id;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  std::ifstream f("/sys/bus/pci/devices/" + lower + "/numa_node");
  int node = -1;
  if (f >> node && node >= 0) return node;
  return -1;
}

int NumaTopology::node_of_gpu(int device) const {
  if (!cuda::device_available()) return -1;
  return node_of_pci_device(cuda::device_pci_bus_id(device));
}

void* NumaTopology::alloc_on_node(size_t bytes, int node) const {
  if (!impl_->loaded || node < 0 || bytes == 0) return nullptr;
  hwloc_bitmap_t set = hwloc_bitmap_alloc();
  hwloc_bitmap_only(set, static_cast<unsigned>(node));
  void* p = hwloc_alloc_membind(impl_->topo, bytes, set, HWLOC_MEMBIND_BIND,
                                HWLOC_MEMBIND_BYNODESET | HWLOC_MEMBIND_STRICT);
  hwloc_bitmap_free(set);
  return p;
}

void NumaTopology::free_on_node(void* ptr, size_t bytes) const {
  if (ptr != nullptr) hwloc_free(impl_->topo, ptr, bytes);
}

}  // namespace kvtier::memory
