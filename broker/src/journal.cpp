#include "journal.hpp"

namespace ensemble::broker {

journal_entry& journal::claim() {
  ++written_;
  if (ring_.size() < capacity_) return ring_.emplace_back();
  journal_entry& slot = ring_[next_];
  next_ = (next_ + 1) % capacity_;
  return slot;
}

nlohmann::json journal::query(std::string_view correlation_id, bool children, std::size_t limit,
                              bool payloads) const {
  using nlohmann::json;
  json entries = json::array();
  const std::string child_prefix = std::string(correlation_id) + "/";
  const std::size_t n = ring_.size();
  const std::size_t start = n < capacity_ ? 0 : next_;
  for (std::size_t i = 0; i < n && entries.size() < limit; ++i) {
    const journal_entry& e = ring_[(start + i) % n];
    const bool mine = e.correlation_id == correlation_id ||
                      (children && e.correlation_id.rfind(child_prefix, 0) == 0);
    if (!mine) continue;
    json j = {{"ts_us", e.ts_us}, {"id", e.id}, {"correlation_id", e.correlation_id}};
    if (!e.causation_id.empty()) j["causation_id"] = e.causation_id;
    switch (e.what) {
      case journal_entry::kind::request:
        j["kind"] = "request";
        j["service"] = e.service;
        j["action"] = e.action;
        j["from"] = e.from;
        j["attempt"] = e.attempt == 0 ? 1 : e.attempt;
        break;
      case journal_entry::kind::reply:
        j["kind"] = "reply";
        j["service"] = e.service;
        j["action"] = e.action;
        j["worker"] = e.worker;
        j["duration_us"] = e.duration_us;
        if (!e.error_code.empty()) {
          j["error_code"] = e.error_code;
          j["error_message"] = e.error_message;
        }
        break;
      case journal_entry::kind::event:
        j["kind"] = "event";
        j["topic"] = e.topic;
        j["from"] = e.from;
        j["seq"] = e.seq;
        if (payloads) {
          if (e.payload_kept) {
            j["payload"] =
                json::binary(std::vector<std::uint8_t>(e.payload.begin(), e.payload.end()));
          } else {
            j["payload_omitted"] = true;  // larger than k_journal_payload_max
          }
        }
        break;
    }
    entries.push_back(std::move(j));
  }
  // Older entries may have been overwritten: say so when the ring has wrapped.
  return json{{"entries", std::move(entries)},
              {"truncated", written_ > capacity_},
              {"capacity", capacity_}};
}

}  // namespace ensemble::broker
