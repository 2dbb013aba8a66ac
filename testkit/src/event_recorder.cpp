#include "ensemble/testkit/event_recorder.hpp"

#include <sstream>
#include <stdexcept>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "own_agent.hpp"

namespace ensemble::testkit {

namespace {

using steady = std::chrono::steady_clock;

bool topic_matches(const std::string& want, const std::string& topic) {
  if (want.empty()) return true;
  if (want.back() == '.') return topic.rfind(want, 0) == 0;
  return topic == want;
}

}  // namespace

bool event_match::matches(const recorded_event& e) const {
  if (!topic_matches(topic, e.topic)) return false;
  if (!correlation_id.empty() && e.correlation_id != correlation_id) return false;
  return !condition || condition(e);
}

std::string event_match::describe() const {
  std::string out =
      topic.empty() ? "any topic" : "topic " + topic + (topic.back() == '.' ? "*" : "");
  if (!correlation_id.empty()) out += ", correlation_id " + correlation_id;
  if (condition) out += ", with a condition";
  return out;
}

namespace {
agent::options endpoints(const std::string& router, const std::string& events) {
  agent::options o;
  o.broker = router;
  o.events = events;
  return o;
}
}  // namespace

event_recorder::event_recorder(const std::string& router, const std::string& events,
                               std::vector<std::string> prefixes,
                               std::chrono::milliseconds deadline)
    : event_recorder(endpoints(router, events), std::move(prefixes), deadline) {}

event_recorder::event_recorder(const agent::options& connect, std::vector<std::string> prefixes,
                               std::chrono::milliseconds deadline) {
  agent_ = detail::start_own_agent("recorder", connect, deadline);
  for (const auto& prefix : prefixes) {
    // After start(), subscribe() returns once the broker fans the prefix out to us.
    auto s = agent_->subscribe(
        prefix,
        [this](const agent::message& m) {
          auto payload = agent::from_json_payload(m.payload());
          recorded_event e{m.id(),
                           m.topic(),
                           m.correlation_id(),
                           m.causation_id(),
                           m.publisher(),
                           m.seq(),
                           payload ? std::move(*payload) : nlohmann::json(),
                           steady::now()};
          std::lock_guard lock(mutex_);
          events_.push_back(std::move(e));
          changed_.notify_all();
        },
        deadline);
    if (!s) {
      throw std::runtime_error("event_recorder: subscribing to '" + prefix +
                               "': " + s.err().to_string());
    }
  }
}

event_recorder::~event_recorder() {
  agent_->stop(std::chrono::milliseconds(0));
}

std::string event_recorder::summary_locked(std::size_t limit) const {
  std::ostringstream out;
  out << events_.size() << " event(s) recorded";
  if (events_.empty()) return out.str();
  out << (events_.size() > limit ? ", the last " + std::to_string(limit) : std::string()) << ":";
  const std::size_t from = events_.size() > limit ? events_.size() - limit : 0;
  for (std::size_t i = from; i < events_.size(); ++i) {
    const auto& e = events_[i];
    out << "\n  " << e.topic << " id=" << e.id << " correlation_id=" << e.correlation_id
        << " payload=" << e.payload.dump();
  }
  return out.str();
}

::testing::AssertionResult event_recorder::expect(const event_match& m,
                                                  std::chrono::milliseconds deadline) {
  std::unique_lock lock(mutex_);
  const bool found = changed_.wait_for(lock, deadline, [&] {
    for (const auto& e : events_) {
      if (m.matches(e)) return true;
    }
    return false;
  });
  if (found) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "no event with " << m.describe() << " within "
                                       << deadline.count() << " ms; " << summary_locked(20);
}

::testing::AssertionResult event_recorder::expect_sequence(const std::vector<event_match>& ms,
                                                           std::chrono::milliseconds deadline) {
  std::size_t matched = 0;
  auto progress = [&] {
    matched = 0;
    for (const auto& e : events_) {
      if (matched < ms.size() && ms[matched].matches(e)) ++matched;
    }
    return matched == ms.size();
  };
  std::unique_lock lock(mutex_);
  if (changed_.wait_for(lock, deadline, progress)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "sequence not seen within " << deadline.count() << " ms: matched " << matched << " of "
         << ms.size() << ", missing " << ms[matched].describe() << "; " << summary_locked(20);
}

::testing::AssertionResult event_recorder::expect_none(const event_match& m,
                                                       std::chrono::milliseconds window) {
  std::unique_lock lock(mutex_);
  const std::size_t from = events_.size();
  const recorded_event* seen = nullptr;
  changed_.wait_for(lock, window, [&] {
    for (std::size_t i = from; i < events_.size(); ++i) {
      if (m.matches(events_[i])) {
        seen = &events_[i];
        return true;
      }
    }
    return false;
  });
  if (seen == nullptr) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "an event with " << m.describe() << " arrived within " << window.count()
         << " ms: " << seen->topic << " id=" << seen->id << " payload=" << seen->payload.dump();
}

bool event_recorder::wait(const std::function<bool(const std::vector<recorded_event>&)>& pred,
                          std::chrono::milliseconds deadline) {
  std::unique_lock lock(mutex_);
  return changed_.wait_for(lock, deadline, [&] { return pred(events_); });
}

std::vector<recorded_event> event_recorder::events() const {
  std::lock_guard lock(mutex_);
  return events_;
}

std::vector<recorded_event> event_recorder::matching(const event_match& m) const {
  std::lock_guard lock(mutex_);
  std::vector<recorded_event> out;
  for (const auto& e : events_) {
    if (m.matches(e)) out.push_back(e);
  }
  return out;
}

std::size_t event_recorder::count(const event_match& m) const {
  std::lock_guard lock(mutex_);
  std::size_t n = 0;
  for (const auto& e : events_) n += m.matches(e) ? 1 : 0;
  return n;
}

}  // namespace ensemble::testkit
