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

}  // namespace kvtier::kernels
