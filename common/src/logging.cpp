#include "ensemble/common/logging.hpp"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <mutex>

#include "ensemble/common/result.hpp"

namespace ensemble::common {

std::shared_ptr<spdlog::logger> component_logger(const std::string& component) {
  static std::mutex mutex;
  std::lock_guard lock(mutex);
  if (auto existing = spdlog::get(component)) return existing;
  auto logger = spdlog::stderr_color_mt(component);
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%-5l%$ [%n] %v");
  logger->set_level(spdlog::get_level());
  return logger;
}

void set_log_level(std::string_view level) {
  const auto parsed = spdlog::level::from_str(std::string(level));
  // from_str answers "off" for anything it does not know; only accept "off" when asked for.
  if (parsed == spdlog::level::off && level != "off") {
    throw config_error("--log-level", "unknown level '" + std::string(level) +
                                          "' (trace, debug, info, warn, error, critical, off)");
  }
  spdlog::set_level(parsed);
  spdlog::apply_all([parsed](const std::shared_ptr<spdlog::logger>& l) { l->set_level(parsed); });
}

}  // namespace ensemble::common
