// head_dim dispatch in one place (FlashInfer's DISPATCH_HEAD_DIM, without macros): kernels are
// instantiated for 64, 128 and 256, and anything else fails loudly.
#pragma once

#include <type_traits>

#include "memory/core/check.h"

namespace kvtier::kernels {

/// Calls f(std::integral_constant<int, head_dim>{}) for a supported head_dim; otherwise throws
/// InvalidArgumentError naming the value.
template <typename F>
void dispatch_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 64:
      f(std::integral_constant<int, 64>{});
      break;
    case 128:
      f(std::integral_constant<int, 128>{});
      break;
    case 256:
      f(std::integral_constant<int, 256>{});
      break;
    default:
      KVTIER_CHECK(false, "head_dim ", head_dim, " is not supported (supported: 64, 128, 256)");
  }
}

/// Calls f(std::integral_constant<int, T>{}) with T the group of query heads per KV head rounded
/// up to a power of two, at most 8: the heads a kernel keeps in registers at once (decode
/// attention's head tile, scoring's heads per centroid read; larger groups are cut into tiles of
/// 8, and more would spill).
template <typename F>
void dispatch_head_tile(int group_size, F&& f) {
  if (group_size <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if (group_size <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (group_size <= 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

}  // namespace kvtier::kernels
