// Status codes, the Status value for expected outcomes, and the exception types thrown for caller
// errors and failed environments. The split follows faiss (assert vs throw) plus Mooncake's Status:
// expected outcomes (tier full, key missing) are returned, caller errors are thrown.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace kvtier {

enum class StatusCode : uint8_t {
  kOk,
  kInvalidArgument,  ///< a caller passed a bad value (shape, dtype, id, budget)
  kCapacity,         ///< a bounded resource is full (host arena, cluster cache)
  kNotFound,         ///< unknown sequence or key
  kTimeout,
  kIoError,
  kCuda,      ///< a CUDA runtime call failed
  kInternal,  ///< a broken invariant reported as an error rather than an abort
};

/// Human-readable name of a code ("capacity", "not found", ...).
const char* status_code_name(StatusCode code);

namespace detail {
template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

/// Base of every exception kvtier throws. A std::runtime_error whose code says which kind.
class Error : public std::runtime_error {
 public:
  Error(StatusCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  StatusCode code() const noexcept { return code_; }

 private:
  StatusCode code_;
};

/// A bad argument: wrong shape, dtype, head_dim, id or budget (Python: ValueError).
class InvalidArgumentError : public Error {
 public:
  explicit InvalidArgumentError(const std::string& m) : Error(StatusCode::kInvalidArgument, m) {}
};
/// A bounded resource is full (Python: MemoryError). What was stored before is intact.
class CapacityError : public Error {
 public:
  explicit CapacityError(const std::string& m) : Error(StatusCode::kCapacity, m) {}
};
/// An unknown sequence or key (Python: KeyError).
class NotFoundError : public Error {
 public:
  explicit NotFoundError(const std::string& m) : Error(StatusCode::kNotFound, m) {}
};
/// A CUDA runtime failure; the message names the call, the error and the place.
class CudaError : public Error {
 public:
  explicit CudaError(const std::string& m) : Error(StatusCode::kCuda, m) {}
};

/// Throws the Error subclass that matches `code` (InvalidArgumentError for kInvalidArgument, ...).
[[noreturn]] void throw_error(StatusCode code, const std::string& message);

/// Result of an operation whose failure is an expected outcome. Cheap to move; ok() allocates no
/// message.
class [[nodiscard]] Status {
 public:
  Status() = default;
  static Status ok() { return Status(); }
  static Status invalid_argument(std::string m) {
    return Status(StatusCode::kInvalidArgument, std::move(m));
  }
  static Status capacity(std::string m) { return Status(StatusCode::kCapacity, std::move(m)); }
  static Status not_found(std::string m) { return Status(StatusCode::kNotFound, std::move(m)); }
  static Status timeout(std::string m) { return Status(StatusCode::kTimeout, std::move(m)); }
  static Status io_error(std::string m) { return Status(StatusCode::kIoError, std::move(m)); }

  bool is_ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  /// "capacity: host arena exhausted ..." or "ok".
  std::string to_string() const;
  /// Throws the matching Error subclass unless ok().
  void throw_if_error() const {
    if (!is_ok()) throw_error(code_, message_);
  }

 private:
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

}  // namespace kvtier
