#pragma once
// The streams a broker declares at start (`ensemble-broker --streams FILE`), and the checks a
// stream's configuration passes whether it comes from that file or from broker.stream_add.
//
// The file is YAML or JSON (JSON is YAML):
//
//   streams:
//     - name: orders                  # [A-Za-z0-9_-]{1,64}
//       topics: [order., shipment.]   # topic prefixes; no two streams may overlap
//       max_age: 7d                   # 500ms, 30s, 5m, 24h, 7d or milliseconds; 0: unlimited
//       max_bytes: 1073741824         # 0: unlimited
//       max_events: 0                 # 0: unlimited
//
// Errors throw common::config_error naming the file, the path in it (streams[1].topics[0])
// and the line.

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/broker/stream_types.hpp"

namespace ensemble::broker::streams {

std::vector<stream_config> load_streams_file(const std::string& path);

// A stream name: empty when valid, otherwise what is wrong.
std::string check_stream_name(std::string_view name);
// A topic prefix: 1..256 bytes of topic characters ([A-Za-z0-9_:-] and '.'); empty when valid.
std::string check_topic_prefix(std::string_view prefix);
// "500ms", "30s", "5m", "24h", "7d" or a number of milliseconds; nullopt otherwise.
std::optional<std::chrono::milliseconds> parse_duration(std::string_view text);
// The other stream whose prefixes overlap `config`'s (one is a prefix of the other), if any:
// a topic is stored by at most one stream.
std::optional<std::string> overlapping_stream(const stream_config& config,
                                              const std::vector<stream_config>& others);

}  // namespace ensemble::broker::streams
