#pragma once
// The broker's trace journal: a bounded ring of the last N requests, replies and events that
// carried a correlation id, answered by `broker.trace`.
//
// The broker is the one place every message of a deployment passes through, including the
// events services publish to each other inside a choreographed segment, which no
// orchestrator sees. Keeping a short memory of them is what lets `ensemble trace` show a
// workflow instance end to end. It costs one small record per message on the broker's thread;
// `--journal 0` turns it off, and old records are overwritten, never accumulated.

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace ensemble::broker {

struct journal_entry {
  enum class kind : std::uint8_t { request, reply, event };
  kind what = kind::request;
  std::uint64_t ts_us = 0;
  std::string id;
  std::string correlation_id;
  std::string causation_id;
  std::string service, action;  // request, reply
  std::string topic;            // event
  std::string from;             // request: the caller; event: the publisher
  std::string worker;           // reply: who answered ("broker" for broker errors)
  std::string error_code, error_message;
  std::uint64_t duration_us = 0;  // reply: since the request arrived
  std::uint64_t seq = 0;          // event
  std::uint32_t attempt = 0;      // request
  std::string payload;            // event, when at most k_journal_payload_max bytes
  bool payload_kept = false;
};

// Event payloads up to this size are kept in the journal (10,000 entries: 40 MiB at most).
inline constexpr std::size_t k_journal_payload_max = 4096;

class journal {
 public:
  explicit journal(std::size_t capacity) : capacity_(capacity) { ring_.reserve(capacity); }
  bool enabled() const { return capacity_ > 0; }
  // The slot the next entry goes into (the oldest once the ring is full), for the caller to
  // overwrite field by field: assigning into strings that already have capacity allocates
  // nothing, which keeps the journal cheap on the broker's message loop. Only when enabled().
  journal_entry& claim();
  // Entries whose correlation id is `correlation_id` (and, with `children`, those of its
  // sub-workflows: ids starting with "<correlation_id>/"), oldest first, at most `limit`.
  // {"entries": [...], "truncated": bool, "capacity": n}
  // With `payloads`, events carry their payload (msgpack bin) when it was kept.
  nlohmann::json query(std::string_view correlation_id, bool children, std::size_t limit,
                       bool payloads = false) const;

 private:
  std::size_t capacity_;
  std::vector<journal_entry> ring_;
  std::size_t next_ = 0;       // where the next entry goes once the ring is full
  std::uint64_t written_ = 0;  // entries ever added
};

}  // namespace ensemble::broker
