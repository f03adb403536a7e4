#include "tests/common/test_util.h"

#include <cstdlib>
#include <cstring>

#if KVTIER_WITH_CUDA
#include <cuda_runtime.h>

#include "memory/core/check.h"
#endif

namespace kvtier::test {

#if KVTIER_WITH_CUDA
void upload_complete(void* dst, const void* src, size_t n) {
  if (n == 0) return;
  KVTIER_CUDA_CHECK(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice));
  KVTIER_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
}
#endif

bool gpu_required() {
  const char* v = std::getenv("KVTIER_REQUIRE_GPU");
  return v != nullptr && std::strcmp(v, "0") != 0 && v[0] != '\0';
}

ScopedEnv::ScopedEnv(const char* name, const std::string& value) : name_(name) {
  if (const char* old = std::getenv(name)) {
    had_ = true;
    old_ = old;
  }
  setenv(name, value.c_str(), 1);
}

ScopedEnv::~ScopedEnv() {
  if (had_) {
    setenv(name_.c_str(), old_.c_str(), 1);
  } else {
    unsetenv(name_.c_str());
  }
}

uint64_t test_seed() {
  if (const char* v = std::getenv("KVTIER_TEST_SEED")) return std::strtoull(v, nullptr, 10);
  return 20261122;
}

std::vector<std::byte> random_bytes(size_t n, std::mt19937_64& rng) {
  std::vector<std::byte> out(n);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint64_t x = rng();
    std::memcpy(out.data() + i, &x, 8);
  }
  for (; i < n; ++i) out[i] = static_cast<std::byte>(rng());
  return out;
}

int64_t first_difference(const void* a, const void* b, size_t n) {
  const auto* x = static_cast<const unsigned char*>(a);
  const auto* y = static_cast<const unsigned char*>(b);
  for (size_t i = 0; i < n; ++i)
    if (x[i] != y[i]) return static_cast<int64_t>(i);
  return -1;
}

}  // namespace kvtier::test
