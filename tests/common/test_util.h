// Shared test helpers: GPU requirement, reproducible seeds, random KV rows, failure context.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "memory/core/cuda_raii.h"

namespace kvtier::test {

/// True when KVTIER_REQUIRE_GPU is set to anything but "0": a GPU test that would skip fails.
bool gpu_required();
/// KVTIER_TEST_SEED if set, else a fixed default; printed with every failure that uses it.
uint64_t test_seed();
/// Random bytes (any bit pattern: data movement is compared bitwise).
std::vector<std::byte> random_bytes(size_t n, std::mt19937_64& rng);
/// Index of the first differing byte, or -1.
int64_t first_difference(const void* a, const void* b, size_t n);

}  // namespace kvtier::test

#define KVTIER_REQUIRE_GPU()                                                       \
  do {                                                                             \
    if (!::kvtier::cuda::device_available()) {                                     \
      if (::kvtier::test::gpu_required())                                          \
        FAIL() << "KVTIER_REQUIRE_GPU=1 but no CUDA device: "                      \
               << ::kvtier::cuda::device_description(0);                           \
      GTEST_SKIP() << "no CUDA device: " << ::kvtier::cuda::device_description(0); \
    }                                                                              \
  } while (0)
