#pragma once
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>
namespace ensemble::broker::streams {
using sequence = std::uint64_t;  // 1-based; 0 means "none"
struct stream_config {
  std::string name;                         // [A-Za-z0-9_-]{1,64}
  std::vector<std::string> topic_prefixes;  // "order.", "shipment."
  std::chrono::milliseconds max_age{0};     // 0 = unlimited
  std::uint64_t max_bytes = 0;              // 0 = unlimited
  std::uint64_t max_events = 0;             // 0 = unlimited
  std::chrono::milliseconds duplicate_window{std::chrono::minutes(2)};
  // Event ids remembered for de-duplication, at most: past it the oldest are forgotten before
  // their window ends (counted in store_stats::dedup_evicted), so that a publisher of many
  // distinct ids cannot grow the broker without bound. At least 1.
  std::uint64_t duplicate_ids_max = 1'000'000;
};
struct record {  // one stored event
  sequence seq = 0;
  std::int64_t ts_ms = 0;  // broker time it was stored
  std::string topic;
  std::string event_id;  // the publisher's id; de-duplication key
  std::string header;    // the event's msgpack header as fanned out
  std::string payload;   // opaque bytes
};
}  // namespace ensemble::broker::streams
