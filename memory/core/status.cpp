// Status, Error, logging and dtype helpers: the host-only part of memory/core.
#include "memory/core/status.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <ostream>

#include "memory/core/check.h"
#include "memory/core/dtype.h"
#include "memory/core/log.h"

namespace kvtier {

const char* status_code_name(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "ok";
    case StatusCode::kInvalidArgument:
      return "invalid argument";
    case StatusCode::kCapacity:
      return "capacity";
    case StatusCode::kNotFound:
      return "not found";
    case StatusCode::kTimeout:
      return "timeout";
    case StatusCode::kIoError:
      return "I/O error";
    case StatusCode::kCuda:
      return "CUDA error";
    case StatusCode::kInternal:
      return "internal error";
  }
  return "unknown";
}

std::string Status::to_string() const {
  if (is_ok()) return "ok";
  return std::string(status_code_name(code_)) + ": " + message_;
}

void throw_error(StatusCode code, const std::string& message) {
  switch (code) {
    case StatusCode::kInvalidArgument:
      throw InvalidArgumentError(message);
    case StatusCode::kCapacity:
      throw CapacityError(message);
    case StatusCode::kNotFound:
      throw NotFoundError(message);
    case StatusCode::kCuda:
      throw CudaError(message);
    default:
      throw Error(code, message);
  }
}

namespace detail {

void assert_fail(const char* cond, const char* file, int line) {
  std::fprintf(stderr, "kvtier: internal assertion `%s` failed at %s:%d\n", cond, file, line);
  std::fflush(stderr);
  std::abort();
}

void check_fail(StatusCode code, const char* cond, const char* file, int line,
                const std::string& message) {
  // The message is for the caller; the condition and place help whoever reads the report.
  const char* base = std::strrchr(file, '/');
  throw_error(code, str_cat("kvtier: ", message.empty() ? std::string(cond) : message, " [", cond,
                            " at ", base ? base + 1 : file, ":", line, "]"));
}

}  // namespace detail

// ---- logging ----

namespace {
struct LogState {
  std::mutex mu;
  LogSink sink;
  int level = -1;
};
LogState& log_state() {
  static LogState s;
  return s;
}
LogLevel level_from_env() {
  const char* v = std::getenv("KVTIER_LOG");
  if (v == nullptr) return LogLevel::kWarn;
  if (!std::strcmp(v, "error")) return LogLevel::kError;
  if (!std::strcmp(v, "info")) return LogLevel::kInfo;
  if (!std::strcmp(v, "debug")) return LogLevel::kDebug;
  return LogLevel::kWarn;
}
const char* level_name(LogLevel l) {
  switch (l) {
    case LogLevel::kError:
      return "error";
    case LogLevel::kWarn:
      return "warning";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kDebug:
      return "debug";
  }
  return "?";
}
}  // namespace

LogLevel log_level() {
  LogState& s = log_state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.level < 0) s.level = static_cast<int>(level_from_env());
  return static_cast<LogLevel>(s.level);
}

void set_log_level(LogLevel level) {
  LogState& s = log_state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.level = static_cast<int>(level);
}

LogSink set_log_sink(LogSink sink) {
  LogState& s = log_state();
  std::lock_guard<std::mutex> lock(s.mu);
  std::swap(s.sink, sink);
  return sink;
}

void log_message(LogLevel level, const std::string& message) {
  LogState& s = log_state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.sink) {
    s.sink(level, message);
    return;
  }
  std::fprintf(stderr, "kvtier %s: %s\n", level_name(level), message.c_str());
}

// ---- dtype ----

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF16:
      return "fp16";
    case DType::kBF16:
      return "bf16";
    case DType::kF32:
      return "fp32";
  }
  return "?";
}

std::ostream& operator<<(std::ostream& os, DType t) { return os << dtype_name(t); }

DType parse_dtype(const std::string& name) {
  if (name == "fp16" || name == "float16" || name == "half") return DType::kF16;
  if (name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "fp32" || name == "float32" || name == "float") return DType::kF32;
  throw InvalidArgumentError("kvtier: unknown dtype '" + name + "' (expected fp16, bf16 or fp32)");
}

void check_kv_row_shape(DType dtype, int head_dim) {
  KVTIER_CHECK(dtype == DType::kF16 || dtype == DType::kBF16 || dtype == DType::kF32, "KV dtype ",
               dtype_name(dtype), " is not supported (supported: fp16, bf16, fp32)");
  bool ok = false;
  for (int d : kSupportedHeadDims) ok = ok || d == head_dim;
  KVTIER_CHECK(ok, "head_dim ", head_dim, " is not supported (supported: 64, 128, 256)");
}

}  // namespace kvtier
