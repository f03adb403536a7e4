// Minimal leveled logging to stderr. The level comes from KVTIER_LOG (error, warn, info, debug;
// default warn). Thread-safe. Tests may install a sink to observe warnings.
#pragma once

#include <functional>
#include <string>

#include "memory/core/status.h"

namespace kvtier {

enum class LogLevel : uint8_t { kError = 0, kWarn = 1, kInfo = 2, kDebug = 3 };

/// Current threshold (read once from KVTIER_LOG, then settable).
LogLevel log_level();
void set_log_level(LogLevel level);
/// Replaces the stderr writer; pass nullptr to restore it. Returns the previous sink.
using LogSink = std::function<void(LogLevel, const std::string&)>;
LogSink set_log_sink(LogSink sink);
void log_message(LogLevel level, const std::string& message);

}  // namespace kvtier

#define KVTIER_LOG(level, ...)                                                                  \
  do {                                                                                          \
    if (static_cast<int>(::kvtier::LogLevel::level) <= static_cast<int>(::kvtier::log_level())) \
      ::kvtier::log_message(::kvtier::LogLevel::level, ::kvtier::detail::str_cat(__VA_ARGS__)); \
  } while (0)
