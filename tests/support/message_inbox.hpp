#pragma once
// Messages an agent's handler received (an event subscription, a consumer), for the test
// thread to wait on.

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "ensemble/agent/agent.hpp"

namespace ensemble::test {

class message_inbox {
 public:
  // The handler's side: keep `m`, wake the waiters.
  void add(const agent::message& m) {
    {
      std::lock_guard lock(mutex_);
      messages_.push_back(m);
    }
    changed_.notify_all();
  }
  // The first message of `topic`, waiting for it up to `deadline`; nullopt if none came.
  std::optional<agent::message> wait_for(const std::string& topic,
                                         std::chrono::milliseconds deadline) {
    std::unique_lock lock(mutex_);
    std::optional<agent::message> found;
    changed_.wait_for(lock, deadline, [&] {
      for (const auto& m : messages_) {
        if (m.topic() == topic) {
          found = m;
          return true;
        }
      }
      return false;
    });
    return found;
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<agent::message> messages_;
};

}  // namespace ensemble::test
