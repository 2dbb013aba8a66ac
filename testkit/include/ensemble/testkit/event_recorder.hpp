#pragma once
// Records the events a deployment publishes and answers what a test wants to know of them,
// within deadlines:
//
//   testkit::event_recorder rec(d.router(), d.events(), {"order.", "workflow."});
//   EXPECT_TRUE(rec.expect(testkit::topic("shipment.dispatched").correlated(id), 10s));
//   EXPECT_TRUE(rec.expect_sequence({testkit::topic("order.paid"),
//                                    testkit::topic("inventory.reserved"),
//                                    testkit::topic("shipment.dispatched")}, 10s));
//   EXPECT_TRUE(rec.expect_none(testkit::topic("payment.refunded"), 500ms));
//
// The expectations return ::testing::AssertionResult: on failure the message says what was
// awaited and lists what was recorded instead. The recorder is subscribed (the broker fans out
// its prefixes to it) when the constructor returns.

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "ensemble/agent/agent.hpp"

namespace ensemble::testkit {

struct recorded_event {
  std::string id;
  std::string topic;
  std::string correlation_id;
  std::string causation_id;
  std::string publisher;
  std::uint64_t seq = 0;
  nlohmann::json payload;  // decoded from msgpack; null if the payload is not msgpack
  std::chrono::steady_clock::time_point at;  // when the recorder received it
};

// Which events an expectation is about: topic("order.paid").correlated("o-1").where(...).
// Empty fields match anything.
struct event_match {
  std::string topic;                                     // exact, or a prefix when it ends with '.'
  std::string correlation_id;                            // exact
  std::function<bool(const recorded_event&)> condition;  // any further condition

  event_match& correlated(std::string id) {
    correlation_id = std::move(id);
    return *this;
  }
  event_match& where(std::function<bool(const recorded_event&)> c) {
    condition = std::move(c);
    return *this;
  }
  bool matches(const recorded_event& e) const;
  std::string describe() const;
};

// The events of one topic (or of a prefix ending with '.'; "" for any).
inline event_match topic(std::string t) {
  event_match m;
  m.topic = std::move(t);
  return m;
}

class event_recorder {
 public:
  // Subscribes to `prefixes` (e.g. "workflow." or "" for everything). Throws std::runtime_error
  // if the broker cannot be reached within `deadline`.
  event_recorder(const std::string& router, const std::string& events,
                 std::vector<std::string> prefixes,
                 std::chrono::milliseconds deadline = std::chrono::seconds(10));
  // Connected as `connect` says: a secured deployment's deployment::connect_as().
  event_recorder(const agent::options& connect, std::vector<std::string> prefixes,
                 std::chrono::milliseconds deadline = std::chrono::seconds(10));
  ~event_recorder();
  event_recorder(const event_recorder&) = delete;
  event_recorder& operator=(const event_recorder&) = delete;

  // An event matching `m` was recorded (before or during the wait).
  ::testing::AssertionResult expect(const event_match& m, std::chrono::milliseconds deadline);
  // Events matching each of `ms`, in this order (others may come in between).
  ::testing::AssertionResult expect_sequence(const std::vector<event_match>& ms,
                                             std::chrono::milliseconds deadline);
  // No event matching `m` arrives for `window` (from now; events recorded before are ignored).
  ::testing::AssertionResult expect_none(const event_match& m, std::chrono::milliseconds window);

  // Waits until `pred` holds of everything recorded; false at the deadline.
  bool wait(const std::function<bool(const std::vector<recorded_event>&)>& pred,
            std::chrono::milliseconds deadline);
  std::vector<recorded_event> events() const;  // a copy, in arrival order
  std::vector<recorded_event> matching(const event_match& m) const;
  std::size_t count(const event_match& m) const;

 private:
  std::string summary_locked(std::size_t limit) const;
  std::unique_ptr<agent::agent> agent_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<recorded_event> events_;
};

}  // namespace ensemble::testkit
