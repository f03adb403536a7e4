// Shared test helpers: GPU requirement, reproducible seeds, random KV rows, failure context.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
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

#if KVTIER_WITH_CUDA
/// Copies n bytes of pageable host memory to the device and returns once they are there.
/// cudaMemcpy alone may return while the copy is still in flight on the legacy default stream,
/// which orders nothing on the non-blocking streams the library and the tests run their work on.
void upload_complete(void* dst, const void* src, size_t n);
#endif

/// `rows` consecutive rows of `row` values each, placed in a table of rows + spare rows in
/// reverse order (row p at table row rows + spare - 1 - p; the first `spare` rows hold `fill`);
/// `index` receives each row's table row. Tests of kernels that read per-problem rows of an
/// engine's table in place.
template <typename T>
std::vector<T> reversed_table(const std::vector<T>& data, size_t row, int32_t rows, int32_t spare,
                              T fill, std::vector<int32_t>& index) {
  std::vector<T> table(static_cast<size_t>(rows + spare) * row, fill);
  index.clear();
  for (int32_t p = 0; p < rows; ++p) {
    index.push_back(rows + spare - 1 - p);
    std::copy_n(data.begin() + static_cast<std::ptrdiff_t>(p * row), row,
                table.begin() + static_cast<std::ptrdiff_t>(index.back() * row));
  }
  return table;
}

/// Sets an environment variable for a scope; restores (or unsets) it at the end. For tests of
/// switches the library reads from the environment at each call.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value);
  ~ScopedEnv();
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_, old_;
  bool had_ = false;
};

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
