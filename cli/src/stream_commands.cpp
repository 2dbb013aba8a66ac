// `ensemble streams`, `consumers`, `dlq` and the replay of `events --stream`: the broker's
// stream admin actions (docs/protocol.md sections 8 and 11) as tables and JSON.
#include "stream_commands.hpp"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <ctime>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>

#include "client.hpp"
#include "ensemble/common/result.hpp"
#include "stream_config_file.hpp"

namespace ensemble::cli {

using namespace std::chrono_literals;

namespace {

constexpr auto k_admin_deadline = 5s;
constexpr auto k_read_deadline = 15s;
constexpr std::uint64_t k_page = 1000;  // records per stream_read while paging

const char* const k_ordered_by[] = {"correlation_id", "causation_id", "trace_id", "idempotency_key",
                                    "publisher",      "topic",        "event_id"};

std::int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// ----- text

// 604800000 -> "7d", 120000 -> "2m", 1500 -> "1500ms".
std::string duration_text(std::int64_t ms) {
  struct unit {
    std::int64_t ms;
    const char* suffix;
  };
  for (const auto u :
       {unit{86'400'000, "d"}, unit{3'600'000, "h"}, unit{60'000, "m"}, unit{1000, "s"}}) {
    if (ms > 0 && ms % u.ms == 0) return std::to_string(ms / u.ms) + u.suffix;
  }
  return std::to_string(ms) + "ms";
}

// 1073741824 -> "1G", 3500 -> "3.4K", 12 -> "12B".
std::string size_text(std::uint64_t bytes) {
  static const char* const suffixes[] = {"K", "M", "G", "T"};
  if (bytes < 1024) return std::to_string(bytes) + "B";
  std::size_t i = 0;
  double value = static_cast<double>(bytes) / 1024;
  bool exact = bytes % 1024 == 0;
  std::uint64_t whole = bytes / 1024;
  while (value >= 1024 && i + 1 < std::size(suffixes)) {
    exact = exact && whole % 1024 == 0;
    whole /= 1024;
    value /= 1024;
    ++i;
  }
  if (exact) return std::to_string(whole) + suffixes[i];
  char text[32];
  std::snprintf(text, sizeof text, "%.1f%s", value, suffixes[i]);
  return text;
}

// Milliseconds since the epoch as UTC: "2026-11-30T03:19:24.123Z"; "-" for 0.
std::string time_text(std::int64_t ms) {
  if (ms <= 0) return "-";
  const std::time_t seconds = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  ::gmtime_r(&seconds, &tm);
  char text[64];
  std::snprintf(text, sizeof text, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<int>(ms % 1000));
  return text;
}

std::string hex(const std::vector<std::uint8_t>& bytes, std::size_t max) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < bytes.size() && i < max; ++i) {
    out += digits[bytes[i] >> 4];
    out += digits[bytes[i] & 0xf];
  }
  if (bytes.size() > max) out += "...";
  return out;
}

// A stored payload (a msgpack bin in stream_read) as JSON when it is msgpack, else its size and
// the first bytes in hex: {"size": N, "hex": "..."}.
json payload_value(const json& payload, bool* decoded = nullptr) {
  if (decoded != nullptr) *decoded = false;
  if (!payload.is_binary()) return payload;
  const auto& bytes = payload.get_binary();
  if (bytes.empty()) return nullptr;
  try {
    auto value = json::from_msgpack(bytes);
    if (decoded != nullptr) *decoded = true;
    return value;
  } catch (const json::exception&) {
    return {{"size", bytes.size()}, {"hex", hex(bytes, 256)}};
  }
}

std::string join(const json& list, const char* sep = ",") {
  std::string out;
  for (const auto& v : list) {
    out += (out.empty() ? "" : sep) + (v.is_string() ? v.get<std::string>() : v.dump());
  }
  return out;
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    const auto first = item.find_first_not_of(' ');
    const auto last = item.find_last_not_of(' ');
    if (first != std::string::npos) out.push_back(item.substr(first, last - first + 1));
  }
  return out;
}

std::uint64_t u64(const json& j, const char* key) {
  const auto it = j.find(key);
  return it != j.end() && it->is_number_unsigned() ? it->get<std::uint64_t>() : 0;
}
std::int64_t i64(const json& j, const char* key) {
  const auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<std::int64_t>() : 0;
}
std::string str(const json& j, const char* key) {
  const auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

void print_json(const json& j) {
  std::printf("%s\n", j.dump(2, ' ', false, json::error_handler_t::replace).c_str());
}

// ----- a connected client, or the exit code of the failure to connect

struct session {
  explicit session(const context& ctx) : c(ctx) {}
  client c;
  common::result<json> call(const std::string& action, const json& args,
                            std::chrono::milliseconds deadline = k_admin_deadline) {
    return c.call("broker", action, args, deadline);
  }
};

// ----- streams

std::string limits_text(const json& s) {
  std::string out;
  auto add = [&](const std::string& part) { out += (out.empty() ? "" : " ") + part; };
  if (i64(s, "max_age_ms") > 0) add("max_age=" + duration_text(i64(s, "max_age_ms")));
  if (u64(s, "max_bytes") > 0) add("max_bytes=" + size_text(u64(s, "max_bytes")));
  if (u64(s, "max_events") > 0) add("max_events=" + std::to_string(u64(s, "max_events")));
  return out.empty() ? "unlimited" : out;
}

std::string range_text(const json& s) {
  if (u64(s, "count") == 0) return "-";
  return std::to_string(u64(s, "first_seq")) + ".." + std::to_string(u64(s, "last_seq"));
}

int streams_disabled_note(const context& ctx) {
  std::fprintf(stderr,
               "ensemble: the broker at %s stores no streams: it was started without --data DIR "
               "(in a deployment: declare streams: or broker.data, docs/deployments.md)\n",
               ctx.broker.c_str());
  return 0;
}

int cmd_streams(const context& ctx, bool as_json) {
  session s(ctx);
  if (auto st = s.c.start(); !st) return report("streams", st.err());
  auto r = s.call("streams", json::object());
  if (!r) return report("streams", r.err());
  if (as_json) {
    print_json(*r);
    return 0;
  }
  if (!r->value("enabled", false)) return streams_disabled_note(ctx);
  const auto& list = (*r)["streams"];
  if (list.empty()) {
    std::fprintf(stderr, "ensemble: no streams yet (ensemble streams add NAME --topics P,...)\n");
    return 0;
  }
  std::printf("%-20s %-24s %9s %8s %-17s %s\n", "STREAM", "TOPICS", "EVENTS", "BYTES", "SEQ",
              "LIMITS");
  for (const auto& st : list) {
    if (st.contains("error_code")) {
      std::printf("%-20s error %s: %s\n", str(st, "name").c_str(), str(st, "error_code").c_str(),
                  str(st, "error_message").c_str());
      continue;
    }
    std::printf("%-20s %-24s %9llu %8s %-17s %s\n", str(st, "name").c_str(),
                join(st.value("topics", json::array())).c_str(),
                static_cast<unsigned long long>(u64(st, "count")),
                size_text(u64(st, "bytes")).c_str(), range_text(st).c_str(),
                limits_text(st).c_str());
  }
  return 0;
}

void print_stream_info(const json& st) {
  auto row = [](const char* key, const std::string& value) {
    std::printf("%-18s %s\n", key, value.c_str());
  };
  auto limit = [](std::uint64_t n, const std::string& text) {
    return n == 0 ? std::string("unlimited") : text;
  };
  row("stream", str(st, "name"));
  row("topics", join(st.value("topics", json::array()), ", "));
  row("events", std::to_string(u64(st, "count")) + " (seq " + range_text(st) + ")");
  row("bytes", size_text(u64(st, "bytes")) + " (" + std::to_string(u64(st, "bytes")) + ")");
  row("first stored", time_text(i64(st, "first_ts_ms")));
  row("last stored", time_text(i64(st, "last_ts_ms")));
  row("max_age", limit(u64(st, "max_age_ms"), duration_text(i64(st, "max_age_ms"))));
  row("max_bytes", limit(u64(st, "max_bytes"), size_text(u64(st, "max_bytes"))));
  row("max_events", limit(u64(st, "max_events"), std::to_string(u64(st, "max_events"))));
  row("duplicate_window", duration_text(i64(st, "duplicate_window_ms")));
  row("since start", std::to_string(u64(st, "stored")) + " stored, " +
                         std::to_string(u64(st, "duplicates")) + " duplicates, " +
                         std::to_string(u64(st, "storage_errors")) + " storage errors");
}

int cmd_stream_info(const context& ctx, const std::string& name, bool as_json) {
  const std::string what = "streams info " + name;
  session s(ctx);
  if (auto st = s.c.start(); !st) return report(what, st.err());
  auto r = s.call("stream_info", {{"name", name}});
  if (!r) return report(what, r.err());
  if (as_json) {
    print_json(*r);
  } else {
    print_stream_info(*r);
  }
  return 0;
}

struct stream_add_args {
  std::string name, topics, max_age, max_bytes, max_events, duplicate_window;
  bool as_json = false;
};

int cmd_stream_add(const context& ctx, const stream_add_args& a) {
  json args = {{"name", a.name}};
  const auto topics = split_list(a.topics);
  if (topics.empty()) {
    throw CLI::ValidationError("--topics",
                               "give one or more topic prefixes, e.g. order.,shipment.");
  }
  args["topics"] = topics;
  if (!a.max_age.empty())
    args["max_age_ms"] = parse_stream_duration("--max-age", a.max_age).count();
  if (!a.max_bytes.empty()) args["max_bytes"] = parse_size_arg("--max-bytes", a.max_bytes);
  if (!a.max_events.empty()) args["max_events"] = parse_size_arg("--max-events", a.max_events);
  if (!a.duplicate_window.empty()) {
    args["duplicate_window_ms"] =
        parse_stream_duration("--duplicate-window", a.duplicate_window).count();
  }
  const std::string what = "streams add " + a.name;
  session s(ctx);
  if (auto st = s.c.start(); !st) return report(what, st.err());
  auto r = s.call("stream_add", args);
  if (!r) return report(what, r.err());
  if (a.as_json) {
    print_json(*r);
    return 0;
  }
  std::printf("added stream %s\n", a.name.c_str());
  print_stream_info(*r);
  return 0;
}

int cmd_stream_rm(const context& ctx, const std::string& name) {
  const std::string what = "streams rm " + name;
  session s(ctx);
  if (auto st = s.c.start(); !st) return report(what, st.err());
  auto r = s.call("stream_rm", {{"name", name}});
  if (!r) return report(what, r.err());
  std::printf("removed stream %s\n", name.c_str());
  return 0;
}

// ----- reading a stream

// Pages through `name` with stream_read from `first` (the args' from_seq or since_ms) up to the
// stream's last sequence when the read began; `each` gets every record and returns false to
// stop. The error of the first failed read, if any.
std::optional<common::error> read_stream(session& s, const std::string& name, json first,
                                         const std::function<bool(const json&)>& each) {
  first["name"] = name;
  first["limit"] = k_page;
  std::optional<std::uint64_t> end;
  json args = std::move(first);
  while (true) {
    auto r = s.call("stream_read", args, k_read_deadline);
    if (!r) return r.err();
    if (!end) end = u64(*r, "last_seq");
    const auto& records = (*r)["records"];
    for (const auto& rec : records) {
      if (u64(rec, "stream_seq") > *end) return std::nullopt;
      if (!each(rec)) return std::nullopt;
    }
    const auto next = u64(*r, "next_seq");
    if (records.empty() || next > *end || next <= u64(args, "from_seq")) return std::nullopt;
    args = {{"name", name}, {"from_seq", next}, {"limit", k_page}};
  }
}

// ----- consumers

std::string policy_text(const json& config) {
  std::string out;
  auto add = [&](const std::string& part) { out += (out.empty() ? "" : " ") + part; };
  if (!config.value("filter", json::array()).empty()) add("filter=" + join(config["filter"]));
  if (config.contains("ordered_by") && config["ordered_by"].is_string()) {
    add("ordered_by=" + config["ordered_by"].get<std::string>());
  }
  return out;
}

int cmd_consumers(const context& ctx, const std::string& stream, bool as_json) {
  const std::string what = "consumers " + stream;
  session s(ctx);
  if (auto st = s.c.start(); !st) return report(what, st.err());
  auto r = s.call("consumers", {{"stream", stream}});
  if (!r) return report(what, r.err());
  if (as_json) {
    print_json(*r);
    return 0;
  }
  const auto& list = r->value("consumers", json::array());
  if (list.empty()) {
    std::fprintf(stderr, "ensemble: stream %s has no consumers\n", stream.c_str());
    return 0;
  }
  std::printf("%-20s %7s %8s %11s %11s %13s %8s %9s  %s\n", "CONSUMER", "MEMBERS", "PENDING",
              "ACK_PENDING", "REDELIVERED", "DEAD_LETTERED", "LAG", "ACK_FLOOR", "POLICY");
  for (const auto& c : list) {
    std::printf("%-20s %7zu %8llu %11llu %11llu %13llu %8llu %9llu  %s\n",
                str(c, "consumer").c_str(), c.value("members", json::array()).size(),
                static_cast<unsigned long long>(u64(c, "pending")),
                static_cast<unsigned long long>(u64(c, "ack_pending")),
                static_cast<unsigned long long>(u64(c, "redelivered")),
                static_cast<unsigned long long>(u64(c, "dead_lettered")),
                static_cast<unsigned long long>(u64(c, "lag")),
                static_cast<unsigned long long>(u64(c, "ack_floor")),
                policy_text(c.value("config", json::object())).c_str());
  }
  return 0;
}

void print_consumer_info(const json& c) {
  auto row = [](const char* key, const std::string& value) {
    std::printf("%-16s %s\n", key, value.c_str());
  };
  const json config = c.value("config", json::object());
  row("consumer", str(c, "consumer"));
  row("stream", str(c, "stream"));
  const auto filter = config.value("filter", json::array());
  row("filter", filter.empty() ? std::string("(every event)") : join(filter, ", "));
  std::string start = str(config, "start");
  if (start == "seq") start += ":" + std::to_string(u64(config, "start_seq"));
  if (start == "time") start += ":" + time_text(i64(config, "start_time_ms"));
  row("start", start);
  row("ack_wait", duration_text(i64(config, "ack_wait_ms")));
  row("max_deliver", std::to_string(u64(config, "max_deliver")));
  row("max_ack_pending", std::to_string(u64(config, "max_ack_pending")));
  row("ordered_by", config.contains("ordered_by") && config["ordered_by"].is_string()
                        ? config["ordered_by"].get<std::string>()
                        : std::string("-"));
  std::string backoff;
  for (const auto& b : config.value("backoff_ms", json::array())) {
    backoff += (backoff.empty() ? "" : ",") +
               duration_text(b.is_number() ? b.get<std::int64_t>() : std::int64_t{0});
  }
  row("backoff", backoff.empty() ? std::string("-") : backoff);
  row("ack floor", std::to_string(u64(c, "ack_floor")));
  row("next seq", std::to_string(u64(c, "next_seq")));
  row("last seq", std::to_string(u64(c, "last_seq")));
  for (const char* key : {"pending", "ack_pending", "redelivered", "dead_lettered", "lag",
                          "delivered", "acked", "refused", "gone", "waiting_for_key"}) {
    if (c.contains(key)) row(key, c[key].is_string() ? c[key].get<std::string>() : c[key].dump());
  }
  const auto members = c.value("members", json::array());
  if (members.empty()) {
    row("members", "none");
  } else {
    std::string list;
    for (const auto& m : members) {
      list += (list.empty() ? "" : ", ") + str(m, "agent") + " (" +
              std::to_string(u64(m, "in_flight")) + "/" + std::to_string(u64(m, "capacity")) + ")";
    }
    row("members", list);
  }
}

int cmd_consumer_info(const context& ctx, const std::string& stream, const std::string& name,
                      bool as_json) {
  const std::string what = "consumers " + stream + " info " + name;
  session s(ctx);
  if (auto st = s.c.start(); !st) return report(what, st.err());
  auto r = s.call("consumer_info", {{"stream", stream}, {"name", name}});
  if (!r) return report(what, r.err());
  if (as_json) {
    print_json(*r);
  } else {
    print_consumer_info(*r);
  }
  return 0;
}

struct consumer_add_args {
  std::string name, filter, ack_wait, max_deliver, max_ack_pending, ordered_by, backoff, start;
  bool as_json = false;
};

// --start all | new | seq:N | time:DURATION (that long ago) into the config's start keys.
void parse_start(const std::string& text, json& config) {
  auto bad = [&]() {
    return CLI::ValidationError(
        "--start", "\"" + text +
                       "\" is not a start position: all, new, seq:N (N >= 1) or time:DURATION "
                       "(that long ago, e.g. time:10m)");
  };
  if (text == "all" || text == "new") {
    config["start"] = text;
  } else if (text.starts_with("seq:")) {
    const std::string_view n = std::string_view(text).substr(4);
    std::uint64_t seq = 0;
    const auto [end, ec] = std::from_chars(n.data(), n.data() + n.size(), seq);
    if (ec != std::errc{} || end != n.data() + n.size() || seq == 0) throw bad();
    config["start"] = "seq";
    config["start_seq"] = seq;
  } else if (text.starts_with("time:")) {
    const auto ago = broker::streams::parse_duration(std::string_view(text).substr(5));
    if (!ago || ago->count() > now_ms()) throw bad();
    config["start"] = "time";
    config["start_time_ms"] = static_cast<std::uint64_t>(now_ms() - ago->count());
  } else {
    throw bad();
  }
}

int cmd_consumer_add(const context& ctx, const std::string& stream, const consumer_add_args& a) {
  json args = {{"stream", stream}, {"name", a.name}};
  if (!a.filter.empty()) args["filter"] = split_list(a.filter);
  if (!a.ack_wait.empty()) {
    const auto d = parse_stream_duration("--ack-wait", a.ack_wait);
    if (d.count() == 0) throw CLI::ValidationError("--ack-wait", "must be at least 1ms");
    args["ack_wait_ms"] = d.count();
  }
  if (!a.max_deliver.empty()) args["max_deliver"] = parse_size_arg("--max-deliver", a.max_deliver);
  if (!a.max_ack_pending.empty()) {
    args["max_ack_pending"] = parse_size_arg("--max-ack-pending", a.max_ack_pending);
  }
  if (!a.ordered_by.empty()) args["ordered_by"] = a.ordered_by;
  if (!a.backoff.empty()) {
    json list = json::array();
    for (const auto& d : split_list(a.backoff)) {
      list.push_back(parse_stream_duration("--backoff", d).count());
    }
    args["backoff_ms"] = list;
  }
  if (!a.start.empty()) parse_start(a.start, args);
  const std::string what = "consumers " + stream + " add " + a.name;
  session s(ctx);
  if (auto st = s.c.start(); !st) return report(what, st.err());
  auto r = s.call("consumer_add", args);
  if (!r) return report(what, r.err());
  if (a.as_json) {
    print_json(*r);
    return 0;
  }
  std::printf("added consumer %s on stream %s\n", a.name.c_str(), stream.c_str());
  print_consumer_info(*r);
  return 0;
}

int cmd_consumer_rm(const context& ctx, const std::string& stream, const std::string& name) {
  const std::string what = "consumers " + stream + " rm " + name;
  session s(ctx);
  if (auto st = s.c.start(); !st) return report(what, st.err());
  auto r = s.call("consumer_rm", {{"stream", stream}, {"name", name}});
  if (!r) return report(what, r.err());
  std::printf("removed consumer %s of stream %s\n", name.c_str(), stream.c_str());
  return 0;
}

// ----- dead letters

std::string dlq_name(const std::string& stream) {
  return stream.ends_with("-dlq") ? stream : stream + "-dlq";
}
std::string base_name(const std::string& stream) {
  return stream.ends_with("-dlq") ? stream.substr(0, stream.size() - 4) : stream;
}

// The original event's sequence in its stream: the dead letter's header keeps it; its id,
// "<stream>:<stream_seq>:<consumer>", says it too (docs/protocol.md section 11, "Dead letters").
std::uint64_t original_seq(const json& rec) {
  const json header = rec.value("header", json::object());
  if (const auto seq = u64(header, "stream_seq"); seq > 0) return seq;
  const auto id = str(rec, "id");
  const auto first = id.find(':');
  const auto second = first == std::string::npos ? first : id.find(':', first + 1);
  if (second == std::string::npos) return 0;
  std::uint64_t seq = 0;
  const auto [end, ec] = std::from_chars(id.data() + first + 1, id.data() + second, seq);
  return ec == std::errc{} && end == id.data() + second ? seq : 0;
}

std::string reason_of(const json& header) {
  std::string reason = str(header, "error_message");
  const auto code = str(header, "error_code");
  if (!code.empty()) reason = code + (reason.empty() ? "" : ": " + reason);
  return reason;
}

int cmd_dlq(const context& ctx, const std::string& stream, bool as_json) {
  const std::string what = "dlq " + stream;
  session s(ctx);
  if (auto st = s.c.start(); !st) return report(what, st.err());
  json all = json::array();
  if (auto e = read_stream(s, dlq_name(stream), json::object(), [&](const json& rec) {
        all.push_back(rec);
        return true;
      })) {
    return report(what, *e);
  }
  if (as_json) {
    for (auto& rec : all) rec["payload"] = payload_value(rec["payload"]);
    print_json(all);
    return 0;
  }
  if (all.empty()) {
    std::fprintf(stderr, "ensemble: no dead letters in %s\n", dlq_name(stream).c_str());
    return 0;
  }
  std::printf("%6s %-24s %-24s %10s %-16s %10s  %s\n", "SEQ", "TIME", "TOPIC", "STREAM_SEQ",
              "CONSUMER", "DELIVERIES", "REASON");
  for (const auto& rec : all) {
    const json header = rec.value("header", json::object());
    std::printf("%6llu %-24s %-24s %10llu %-16s %10llu  %s\n",
                static_cast<unsigned long long>(u64(rec, "stream_seq")),
                time_text(i64(rec, "ts_ms")).c_str(), str(rec, "topic").c_str(),
                static_cast<unsigned long long>(original_seq(rec)), str(header, "consumer").c_str(),
                static_cast<unsigned long long>(u64(header, "deliveries")),
                reason_of(header).c_str());
  }
  return 0;
}

int cmd_dlq_show(const context& ctx, const std::string& stream, std::uint64_t seq, bool as_json) {
  const std::string what = "dlq " + stream + " show " + std::to_string(seq);
  session s(ctx);
  if (auto st = s.c.start(); !st) return report(what, st.err());
  auto r = s.call("stream_read", {{"name", dlq_name(stream)}, {"from_seq", seq}, {"limit", 1}},
                  k_read_deadline);
  if (!r) return report(what, r.err());
  const auto& records = (*r)["records"];
  if (records.empty() || u64(records[0], "stream_seq") != seq) {
    const std::string range =
        u64(*r, "last_seq") >= u64(*r, "first_seq") && u64(*r, "last_seq") > 0
            ? std::to_string(u64(*r, "first_seq")) + ".." + std::to_string(u64(*r, "last_seq"))
            : std::string("none");
    return report(what, common::error{"not_found",
                                      "no dead letter " + std::to_string(seq) + " in " +
                                          dlq_name(stream) + " (it holds " + range + ")",
                                      false});
  }
  json rec = records[0];
  bool decoded = false;
  const auto size = rec["payload"].is_binary() ? rec["payload"].get_binary().size() : 0;
  rec["payload"] = payload_value(rec["payload"], &decoded);
  if (as_json) {
    print_json(rec);
    return 0;
  }
  const json header = rec.value("header", json::object());
  auto row = [](const char* key, const std::string& value) {
    std::printf("%-14s %s\n", key, value.c_str());
  };
  row("dead letter", dlq_name(stream) + " #" + std::to_string(seq));
  row("stored", time_text(i64(rec, "ts_ms")));
  row("topic", str(rec, "topic"));
  row("event", base_name(stream) + " #" + std::to_string(original_seq(rec)));
  row("event id", str(header, "id"));
  row("consumer", str(header, "consumer"));
  row("deliveries", std::to_string(u64(header, "deliveries")));
  row("reason", reason_of(header));
  for (const char* key : {"correlation_id", "causation_id", "publisher"}) {
    if (!str(header, key).empty()) row(key, str(header, key));
  }
  std::printf("header\n%s\n", header.dump(2, ' ', false, json::error_handler_t::replace).c_str());
  if (decoded || rec["payload"].is_null()) {
    std::printf("payload (%zu bytes)\n%s\n", size,
                rec["payload"].dump(2, ' ', false, json::error_handler_t::replace).c_str());
  } else {
    std::printf("payload (%zu bytes, not msgpack)\n%s\n", size, str(rec["payload"], "hex").c_str());
  }
  return 0;
}

int cmd_dlq_replay(const context& ctx, const std::string& stream, std::uint64_t seq, bool as_json) {
  const std::string what = "dlq " + stream + " replay " + std::to_string(seq);
  session s(ctx);
  if (auto st = s.c.start(); !st) return report(what, st.err());
  auto r = s.call("dlq_replay", {{"stream", stream}, {"seq", seq}});
  if (!r) return report(what, r.err());
  if (as_json) {
    print_json(*r);
    return 0;
  }
  std::printf("replayed %s #%llu to %s #%llu for consumer %s%s\n", dlq_name(stream).c_str(),
              static_cast<unsigned long long>(seq), str(*r, "stream").c_str(),
              static_cast<unsigned long long>(u64(*r, "stream_seq")), str(*r, "consumer").c_str(),
              r->value("duplicate", false) ? " (already replayed: a duplicate, stored once)" : "");
  return 0;
}

}  // namespace

// ----- public helpers

std::chrono::milliseconds parse_stream_duration(const std::string& option,
                                                const std::string& text) {
  auto d = broker::streams::parse_duration(text);
  if (!d) {
    throw CLI::ValidationError(option, "\"" + text +
                                           "\" is not a duration (500ms, 30s, 5m, 24h, 7d, or "
                                           "milliseconds)");
  }
  return *d;
}

std::uint64_t parse_size_arg(const std::string& option, const std::string& text) {
  std::uint64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  const std::string_view unit(end, static_cast<std::size_t>(text.data() + text.size() - end));
  std::uint64_t factor = 0;
  if (unit.empty()) factor = 1;
  if (unit == "K" || unit == "k") factor = 1ULL << 10;
  if (unit == "M" || unit == "m") factor = 1ULL << 20;
  if (unit == "G" || unit == "g") factor = 1ULL << 30;
  if (unit == "T" || unit == "t") factor = 1ULL << 40;
  if (ec != std::errc{} || end == text.data() || factor == 0 ||
      value > std::numeric_limits<std::uint64_t>::max() / factor) {
    throw CLI::ValidationError(option, "\"" + text +
                                           "\" is not a whole number, optionally with K, M, G or "
                                           "T (powers of 1024), e.g. 1G");
  }
  return value * factor;
}

int replay_stream(const context& ctx, const replay_args& a) {
  json first = json::object();
  if (!a.since.empty()) {
    const auto ago = parse_stream_duration("--since", a.since);
    first["since_ms"] =
        static_cast<std::uint64_t>(std::max<std::int64_t>(0, now_ms() - ago.count()));
  } else if (a.from_seq > 0) {
    first["from_seq"] = a.from_seq;
  }
  const std::string what = "events --stream " + a.stream;
  session s(ctx);
  if (auto st = s.c.start(); !st) return report(what, st.err());
  int seen = 0;
  auto e = read_stream(s, a.stream, first, [&](const json& rec) {
    const std::string topic = str(rec, "topic");
    const json header = rec.value("header", json::object());
    if (!topic.starts_with(a.prefix)) return true;
    if (!a.correlation.empty() && str(header, "correlation_id") != a.correlation) return true;
    json line = {{"topic", topic},
                 {"id", str(rec, "id")},
                 {"ts", u64(header, "ts")},
                 {"publisher", str(header, "publisher")},
                 {"correlation_id", str(header, "correlation_id")},
                 {"causation_id", str(header, "causation_id")},
                 {"stream", a.stream},
                 {"stream_seq", u64(rec, "stream_seq")},
                 {"payload", payload_value(rec.value("payload", json()))}};
    std::printf("%s\n", line.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
    ++seen;
    return a.count <= 0 || seen < a.count;
  });
  std::fflush(stdout);
  if (e) return report(what, *e);
  return a.count > 0 && seen < a.count ? 1 : 0;
}

void add_stream_commands(CLI::App& app, context& ctx) {
  {
    auto* cmd = app.add_subcommand(
        "streams", "durable streams: list; info, add, rm (docs/protocol.md section 11)");
    auto as_json = std::make_shared<bool>(false);
    cmd->add_flag("--json", *as_json, "the broker's JSON answer");
    cmd->require_subcommand(0, 1);

    auto* info = cmd->add_subcommand("info", "one stream: range, bytes, limits, counters");
    auto info_name = std::make_shared<std::string>();
    auto info_json = std::make_shared<bool>(false);
    info->add_option("name", *info_name, "stream name")->required();
    info->add_flag("--json", *info_json, "the broker's JSON answer");
    info->callback([&ctx, info_name, info_json, as_json] {
      ctx.exit_code = cmd_stream_info(ctx, *info_name, *info_json || *as_json);
    });

    auto* add = cmd->add_subcommand("add", "add a stream (stored from now on)");
    auto a = std::make_shared<stream_add_args>();
    add->add_option("name", a->name, "stream name ([A-Za-z0-9_-], at most 64)")->required();
    add->add_option("--topics", a->topics,
                    "topic prefixes it stores, comma-separated: order.,shipment.")
        ->required();
    add->add_option("--max-age", a->max_age,
                    "drop events older than this (e.g. 7d; default unlimited)");
    add->add_option("--max-bytes", a->max_bytes, "keep at most this many bytes (e.g. 1G)");
    add->add_option("--max-events", a->max_events, "keep at most this many events");
    add->add_option("--duplicate-window", a->duplicate_window,
                    "de-duplicate by event id within this window (default 2m)");
    add->add_flag("--json", a->as_json, "the broker's JSON answer");
    add->callback([&ctx, a, as_json] {
      auto args = *a;
      args.as_json = args.as_json || *as_json;
      ctx.exit_code = cmd_stream_add(ctx, args);
    });

    auto* rm = cmd->add_subcommand("rm", "remove a stream and its stored events");
    auto rm_name = std::make_shared<std::string>();
    rm->add_option("name", *rm_name, "stream name")->required();
    rm->callback([&ctx, rm_name] { ctx.exit_code = cmd_stream_rm(ctx, *rm_name); });

    cmd->callback([&ctx, cmd, as_json] {
      if (cmd->get_subcommands().empty()) ctx.exit_code = cmd_streams(ctx, *as_json);
    });
  }
  {
    auto* cmd = app.add_subcommand(
        "consumers",
        "durable consumers of a stream: list; info, add, rm (docs/streams-consumers.md)");
    auto stream = std::make_shared<std::string>();
    auto as_json = std::make_shared<bool>(false);
    cmd->add_option("stream", *stream, "stream name")->required();
    cmd->add_flag("--json", *as_json, "the broker's JSON answer");
    cmd->require_subcommand(0, 1);

    auto* info = cmd->add_subcommand("info", "one consumer: policy, position, counters, members");
    auto info_name = std::make_shared<std::string>();
    auto info_json = std::make_shared<bool>(false);
    info->add_option("name", *info_name, "consumer name")->required();
    info->add_flag("--json", *info_json, "the broker's JSON answer");
    info->callback([&ctx, stream, info_name, info_json, as_json] {
      ctx.exit_code = cmd_consumer_info(ctx, *stream, *info_name, *info_json || *as_json);
    });

    auto* add = cmd->add_subcommand("add", "add a consumer (its members join it by name)");
    auto a = std::make_shared<consumer_add_args>();
    add->add_option("name", a->name, "consumer name ([A-Za-z0-9_-], at most 64)")->required();
    add->add_option("--filter", a->filter,
                    "topic prefixes to deliver, comma-separated (default: all)");
    add->add_option("--ack-wait", a->ack_wait,
                    "time to ack a delivery before it is redelivered (30s)");
    add->add_option("--max-deliver", a->max_deliver,
                    "deliveries before an event is dead-lettered (5)");
    add->add_option("--max-ack-pending", a->max_ack_pending,
                    "events held unanswered at once, all members together (1000)");
    add->add_option("--ordered-by", a->ordered_by,
                    "events with the same value of this field are handled one at a time, in order")
        ->check(CLI::IsMember(
            std::vector<std::string>(std::begin(k_ordered_by), std::end(k_ordered_by))));
    add->add_option("--backoff", a->backoff,
                    "delays before redeliveries after failed attempts, comma-separated: 1s,5s");
    add->add_option("--start", a->start,
                    "where a new consumer starts: all (default), new, seq:N, time:DURATION (ago)");
    add->add_flag("--json", a->as_json, "the broker's JSON answer");
    add->callback([&ctx, stream, a, as_json] {
      auto args = *a;
      args.as_json = args.as_json || *as_json;
      ctx.exit_code = cmd_consumer_add(ctx, *stream, args);
    });

    auto* rm = cmd->add_subcommand("rm", "remove a consumer and its state");
    auto rm_name = std::make_shared<std::string>();
    rm->add_option("name", *rm_name, "consumer name")->required();
    rm->callback(
        [&ctx, stream, rm_name] { ctx.exit_code = cmd_consumer_rm(ctx, *stream, *rm_name); });

    cmd->callback([&ctx, cmd, stream, as_json] {
      if (cmd->get_subcommands().empty()) ctx.exit_code = cmd_consumers(ctx, *stream, *as_json);
    });
  }
  {
    auto* cmd = app.add_subcommand(
        "dlq", "dead letters of a stream (STREAM-dlq): list; show SEQ, replay SEQ");
    auto stream = std::make_shared<std::string>();
    auto as_json = std::make_shared<bool>(false);
    cmd->add_option("stream", *stream, "stream name (or its dead-letter stream, NAME-dlq)")
        ->required();
    cmd->add_flag("--json", *as_json, "JSON instead of a table");
    cmd->require_subcommand(0, 1);

    auto* show = cmd->add_subcommand("show", "one dead letter: why, where from, its payload");
    auto show_seq = std::make_shared<std::uint64_t>(0);
    auto show_json = std::make_shared<bool>(false);
    show->add_option("seq", *show_seq, "its sequence in STREAM-dlq")->required();
    show->add_flag("--json", *show_json, "the record as JSON");
    show->callback([&ctx, stream, show_seq, show_json, as_json] {
      ctx.exit_code = cmd_dlq_show(ctx, *stream, *show_seq, *show_json || *as_json);
    });

    auto* replay = cmd->add_subcommand(
        "replay", "put a dead letter back in its stream, for the consumer that gave it up");
    auto replay_seq = std::make_shared<std::uint64_t>(0);
    auto replay_json = std::make_shared<bool>(false);
    replay->add_option("seq", *replay_seq, "its sequence in STREAM-dlq")->required();
    replay->add_flag("--json", *replay_json, "the broker's JSON answer");
    replay->callback([&ctx, stream, replay_seq, replay_json, as_json] {
      ctx.exit_code = cmd_dlq_replay(ctx, *stream, *replay_seq, *replay_json || *as_json);
    });

    cmd->callback([&ctx, cmd, stream, as_json] {
      if (cmd->get_subcommands().empty()) ctx.exit_code = cmd_dlq(ctx, *stream, *as_json);
    });
  }
}

}  // namespace ensemble::cli
