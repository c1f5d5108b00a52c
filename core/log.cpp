#include "core/log.h"

#include <cstdio>
#include <mutex>

namespace flashmoe {

namespace {
LogLevel g_level = LogLevel::info;
int g_rank = -1;
std::mutex g_mutex;
}  // namespace

void set_log_level(LogLevel level) { g_level = level; }
void set_log_rank(int rank) { g_rank = rank; }

bool log_enabled(LogLevel level) {
  if (level < g_level) return false;
  // Non-zero ranks report only warnings and errors.
  return g_rank <= 0 || level >= LogLevel::warn;
}

void log_line(LogLevel level, const std::string& message) {
  static const char* names[] = {"debug", "info", "warn", "error"};
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_rank >= 0) {
    std::fprintf(stderr, "[%s r%d] %s\n", names[static_cast<int>(level)], g_rank, message.c_str());
  } else {
    std::fprintf(stderr, "[%s] %s\n", names[static_cast<int>(level)], message.c_str());
  }
  std::fflush(stderr);
}

}  // namespace flashmoe
