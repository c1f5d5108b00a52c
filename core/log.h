// Logging: one line per message to stderr, prefixed with the level and, under MPI,
// the rank. Rank 0 alone prints info by default so multi-GPU jobs stay readable.
#pragma once

#include <sstream>
#include <string>

namespace flashmoe {

enum class LogLevel { debug = 0, info = 1, warn = 2, error = 3 };

void set_log_level(LogLevel level);
void set_log_rank(int rank);  // -1: no rank prefix
bool log_enabled(LogLevel level);
void log_line(LogLevel level, const std::string& message);

#define FLASHMOE_LOG(level, msg)                                                 \
  do {                                                                           \
    if (::flashmoe::log_enabled(::flashmoe::LogLevel::level)) {                  \
      std::ostringstream flashmoe_log_os_;                                       \
      flashmoe_log_os_ << msg;                                                   \
      ::flashmoe::log_line(::flashmoe::LogLevel::level, flashmoe_log_os_.str()); \
    }                                                                            \
  } while (0)

}  // namespace flashmoe
