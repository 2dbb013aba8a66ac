#pragma once
// One spdlog logger per component ("broker", "agent", ...), all writing to stderr with the
// same pattern, so that a launcher can multiplex several processes' output line by line.

#include <spdlog/spdlog.h>

#include <memory>
#include <string>
#include <string_view>

namespace ensemble::common {

// Returns the component's logger, creating it on first use.
std::shared_ptr<spdlog::logger> component_logger(const std::string& component);

// Sets the level of every logger: trace, debug, info, warn, error, critical, off.
// Throws config_error naming the bad value.
void set_log_level(std::string_view level);

}  // namespace ensemble::common
