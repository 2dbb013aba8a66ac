#pragma once
// The per-topic `seq` of fanned-out events (docs/protocol.md section 7), with bounded memory.
//
// Every topic ever published used to keep its counter for the broker's life (~90 B each, so a
// peer publishing a million distinct topics grew the broker by ~93 MiB). Counters now live in
// two generations of at most `max_topics / 2` topics each: a topic published in the current
// generation, or moved up from the previous one, keeps counting; when the current generation
// is full it becomes the previous one and the old previous one is dropped. A topic that was
// not published while max_topics / 2 to max_topics other topics were starts again at 1, as
// after a broker restart. Memory: at most max_topics counters.

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>

namespace ensemble::broker {

class topic_sequencer {
 public:
  explicit topic_sequencer(std::size_t max_topics) : half_(max_topics < 2 ? 1 : max_topics / 2) {}

  // The next seq of `topic`: 1 for a topic not (or no longer) tracked.
  std::uint64_t next(std::string_view topic) {
    key_.assign(topic);
    if (auto it = current_.find(key_); it != current_.end()) return ++it->second;
    std::uint64_t seq = 1;
    if (auto old = previous_.find(key_); old != previous_.end()) {
      seq = old->second + 1;
      previous_.erase(old);
    }
    if (current_.size() >= half_) {
      previous_ = std::move(current_);
      current_ = {};
      ++generations_;
    }
    current_.emplace(key_, seq);
    return seq;
  }

  std::size_t tracked() const { return current_.size() + previous_.size(); }
  // How often a generation was dropped (topics may have restarted at 1 since).
  std::uint64_t generations() const { return generations_; }

 private:
  std::size_t half_;
  std::unordered_map<std::string, std::uint64_t> current_;
  std::unordered_map<std::string, std::uint64_t> previous_;
  std::uint64_t generations_ = 0;
  std::string key_;
};

}  // namespace ensemble::broker
