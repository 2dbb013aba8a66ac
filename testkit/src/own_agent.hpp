#pragma once
// What the testkit's own pieces (the event recorder, the workflow client, a deployment's probe)
// share: an SDK agent of their own, and deadline arithmetic.
#include <algorithm>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>

#include "ensemble/agent/agent.hpp"
#include "ensemble/common/ids.hpp"

namespace ensemble::testkit::detail {

// Time left until `until`, never negative.
inline std::chrono::milliseconds left_until(std::chrono::steady_clock::time_point until) {
  return std::chrono::ceil<std::chrono::milliseconds>(std::max(
      until - std::chrono::steady_clock::now(), std::chrono::steady_clock::duration::zero()));
}

// A started agent connected as `o` says (endpoints, keys, name: "testkit-<role>-<random>" when
// empty). Throws std::runtime_error naming `role` if the broker does not welcome it within
// `deadline`.
inline std::unique_ptr<agent::agent> start_own_agent(const std::string& role, agent::options o,
                                                     std::chrono::milliseconds deadline) {
  if (o.name.empty()) o.name = "testkit-" + role + "-" + common::random_id().substr(0, 8);
  o.start_timeout = deadline;
  auto a = std::make_unique<agent::agent>(o);
  if (auto s = a->start(); !s) {
    throw std::runtime_error(role + ": the broker at " + o.broker +
                             " does not answer: " + s.err().to_string());
  }
  return a;
}

inline std::unique_ptr<agent::agent> start_own_agent(const std::string& role,
                                                     const std::string& router,
                                                     const std::string& events,
                                                     std::chrono::milliseconds deadline) {
  agent::options o;
  o.broker = router;
  o.events = events;
  return start_own_agent(role, std::move(o), deadline);
}

}  // namespace ensemble::testkit::detail
