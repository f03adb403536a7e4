// Checks: KVTIER_ASSERT for our own invariants (abort), KVTIER_CHECK for caller errors (throw),
// KVTIER_CUDA_CHECK for CUDA runtime calls (throw CudaError). No CUDA header is needed here; the
// CUDA macro expands only in files that include cuda_runtime.h.
#pragma once

#include "memory/core/status.h"

namespace kvtier::detail {
[[noreturn]] void assert_fail(const char* cond, const char* file, int line);
[[noreturn]] void check_fail(StatusCode code, const char* cond, const char* file, int line,
                             const std::string& message);
[[noreturn]] void throw_cuda_error(int err, const char* expr, const char* file, int line);
/// With KVTIER_SYNC_CHECKS=ON: synchronizes the device so an asynchronous fault names `what`.
void sync_check(const char* what, const char* file, int line);
}  // namespace kvtier::detail

/// Our bug: print and abort, in every build type.
#define KVTIER_ASSERT(cond)                                                \
  do {                                                                     \
    if (!(cond)) ::kvtier::detail::assert_fail(#cond, __FILE__, __LINE__); \
  } while (0)

#ifndef NDEBUG
#define KVTIER_DASSERT(cond) KVTIER_ASSERT(cond)
#else
#define KVTIER_DASSERT(cond) \
  do {                       \
  } while (0)
#endif

/// Caller error: throw InvalidArgumentError with the message pieces concatenated.
#define KVTIER_CHECK(cond, ...)                                                             \
  do {                                                                                      \
    if (!(cond))                                                                            \
      ::kvtier::detail::check_fail(::kvtier::StatusCode::kInvalidArgument, #cond, __FILE__, \
                                   __LINE__, ::kvtier::detail::str_cat(__VA_ARGS__));       \
  } while (0)

/// Like KVTIER_CHECK with an explicit code (kCapacity, kNotFound, ...).
#define KVTIER_CHECK_CODE(code, cond, ...)                                                \
  do {                                                                                    \
    if (!(cond))                                                                          \
      ::kvtier::detail::check_fail(::kvtier::StatusCode::code, #cond, __FILE__, __LINE__, \
                                   ::kvtier::detail::str_cat(__VA_ARGS__));               \
  } while (0)

/// Throws CudaError naming the expression, the CUDA error and the place.
#define KVTIER_CUDA_CHECK(expr)                                                          \
  do {                                                                                   \
    const cudaError_t kvtier_err_ = (expr);                                              \
    if (kvtier_err_ != cudaSuccess)                                                      \
      ::kvtier::detail::throw_cuda_error(static_cast<int>(kvtier_err_), #expr, __FILE__, \
                                         __LINE__);                                      \
  } while (0)

/// After a kernel launch: checks the launch error; with KVTIER_SYNC_CHECKS also synchronizes.
#define KVTIER_CUDA_CHECK_LAUNCH(what)                      \
  do {                                                      \
    KVTIER_CUDA_CHECK(cudaGetLastError());                  \
    ::kvtier::detail::sync_check(what, __FILE__, __LINE__); \
  } while (0)
