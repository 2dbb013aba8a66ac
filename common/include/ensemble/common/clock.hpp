#pragma once
// Time helpers. Deadlines and timers use the monotonic clock; timestamps that leave the
// process (event `ts`) use the wall clock in microseconds since the Unix epoch.

#include <chrono>
#include <cstdint>

namespace ensemble::common {

using steady_clock = std::chrono::steady_clock;
using time_point = steady_clock::time_point;
using millis = std::chrono::milliseconds;

inline std::uint64_t wall_clock_us() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

// Milliseconds from `now` until `deadline`, at least 0.
inline std::uint64_t millis_until(time_point deadline, time_point now) {
  if (deadline <= now) return 0;
  return static_cast<std::uint64_t>(
      std::chrono::ceil<millis>(deadline - now).count());
}

}  // namespace ensemble::common
