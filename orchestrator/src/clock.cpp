// Names of the clock kinds, for --clock and the docs.
#include "ensemble/orchestrator/clock.hpp"

namespace ensemble::orchestrator {

std::string_view to_string(clock_kind k) {
  return k == clock_kind::virtual_ ? "virtual" : "wall";
}

std::optional<clock_kind> parse_clock_kind(std::string_view s) {
  for (auto v : {clock_kind::wall, clock_kind::virtual_}) {
    if (to_string(v) == s) return v;
  }
  return std::nullopt;
}

}  // namespace ensemble::orchestrator
