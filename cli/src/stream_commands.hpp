#pragma once
// Durable streams from the command line (docs/protocol.md section 11): `streams`, `consumers`,
// `dlq`, and the replay of `events --stream`. Every command is one or a few calls of the
// broker's admin actions (service `broker`); the broker's refusals are printed like every other
// command's ("ensemble: WHAT: CODE: MESSAGE", exit 1), bad arguments exit 2.
#include <chrono>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "ensemble/cli/cli.hpp"

namespace ensemble::cli {

// `streams`, `consumers`, `dlq` (registered by add_broker_commands).
void add_stream_commands(CLI::App& app, context& ctx);

// What `events --stream NAME` replays: the stored events of one stream, from `from_seq` (or
// `since`, a duration back from now; or the first retained one), up to the stream's last event
// when the replay began, each printed as one JSON line like a live event plus `stream` and
// `stream_seq`. `prefix` and `correlation` filter as they do live; `count` > 0 stops there.
struct replay_args {
  std::string stream;
  std::uint64_t from_seq = 0;
  std::string since;
  std::string prefix;
  std::string correlation;
  int count = 0;
};
int replay_stream(const context& ctx, const replay_args& a);

// "7d", "30s", "500ms" or a number of milliseconds: the broker's stream duration syntax
// (the same function reads the broker's --streams file). Throws CLI::ValidationError naming
// the option.
std::chrono::milliseconds parse_stream_duration(const std::string& option, const std::string& text);
// "1G", "512M", "64K" (powers of 1024) or a number of bytes. Throws CLI::ValidationError.
std::uint64_t parse_size_arg(const std::string& option, const std::string& text);

}  // namespace ensemble::cli
