#include "stream_config_file.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <limits>

#include "ensemble/common/protocol.hpp"
#include "ensemble/common/result.hpp"
#include "yaml_file_reader.hpp"

namespace ensemble::broker::streams {

namespace {

bool name_char(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-';
}

class reader : public yaml_file_reader {
 public:
  using yaml_file_reader::yaml_file_reader;

  std::uint64_t count(const YAML::Node& node, const std::string& path) const {
    const auto text = scalar(node, path);
    std::uint64_t value = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (ec != std::errc{} || end != text.data() + text.size() || text.empty()) {
      fail(node, path, "'" + text + "' is not a whole number >= 0 (0: unlimited)");
    }
    return value;
  }

  stream_config stream(const YAML::Node& node, const std::string& path) const {
    if (!node.IsMap()) fail(node, path, "must be a map {name, topics, max_age, ...}");
    stream_config c;
    for (const auto& kv : node) {
      const auto key = kv.first.as<std::string>();
      const auto at = path + "." + key;
      if (key == "name") {
        c.name = scalar(kv.second, at);
        if (auto problem = check_stream_name(c.name); !problem.empty())
          fail(kv.second, at, problem);
      } else if (key == "topics") {
        if (!kv.second.IsSequence() || kv.second.size() == 0) {
          fail(kv.second, at, "must be a non-empty list of topic prefixes");
        }
        for (std::size_t i = 0; i < kv.second.size(); ++i) {
          const auto where = at + "[" + std::to_string(i) + "]";
          auto prefix = scalar(kv.second[i], where);
          if (auto problem = check_topic_prefix(prefix); !problem.empty()) {
            fail(kv.second[i], where, problem);
          }
          c.topic_prefixes.push_back(std::move(prefix));
        }
      } else if (key == "max_age" || key == "duplicate_window") {
        const auto text = scalar(kv.second, at);
        auto d = parse_duration(text);
        if (!d) fail(kv.second, at, "'" + text + "' is not a duration (500ms, 30s, 5m, 24h, 7d)");
        (key == "max_age" ? c.max_age : c.duplicate_window) = *d;
      } else if (key == "max_bytes") {
        c.max_bytes = count(kv.second, at);
      } else if (key == "max_events") {
        c.max_events = count(kv.second, at);
      } else if (key == "duplicate_ids_max") {
        c.duplicate_ids_max = count(kv.second, at);
        if (c.duplicate_ids_max == 0) fail(kv.second, at, "must be at least 1");
      } else {
        fail(kv.first, at,
             "unknown key; a stream has name, topics, max_age, max_bytes, max_events, "
             "duplicate_window, duplicate_ids_max");
      }
    }
    if (c.name.empty()) fail(node, path, "has no 'name'");
    if (c.topic_prefixes.empty()) fail(node, path, "has no 'topics'");
    return c;
  }
};

}  // namespace

std::string check_stream_name(std::string_view name) {
  if (name.empty() || name.size() > 64) {
    return "stream name '" + std::string(name) + "' must be 1..64 characters of [A-Za-z0-9_-]";
  }
  for (std::size_t i = 0; i < name.size(); ++i) {
    if (!name_char(name[i])) {
      return "stream name '" + std::string(name) + "' has a character outside [A-Za-z0-9_-] at " +
             std::to_string(i);
    }
  }
  if (name.ends_with("-dlq")) {
    return "stream name '" + std::string(name) +
           "' ends in -dlq, which is reserved for the dead letters of stream '" +
           std::string(name.substr(0, name.size() - 4)) + "'";
  }
  return {};
}

std::string check_topic_prefix(std::string_view prefix) {
  if (prefix.empty() || prefix.size() > common::k_max_topic_length) {
    return "topic prefix '" + std::string(prefix) + "' must be 1..256 bytes";
  }
  for (std::size_t i = 0; i < prefix.size(); ++i) {
    if (!name_char(prefix[i]) && prefix[i] != ':' && prefix[i] != '.') {
      return "topic prefix '" + std::string(prefix) +
             "' has a character outside the topic characters [A-Za-z0-9_:-.] at " +
             std::to_string(i);
    }
  }
  if (prefix.front() == '_') {
    return "topic prefix '" + std::string(prefix) +
           "' starts with '_': control topics are not stored";
  }
  return {};
}

std::optional<std::chrono::milliseconds> parse_duration(std::string_view text) {
  std::uint64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc{} || end == text.data()) return std::nullopt;
  const std::string_view unit(end, static_cast<std::size_t>(text.data() + text.size() - end));
  std::uint64_t factor = 0;
  if (unit.empty() || unit == "ms") {
    factor = 1;
  } else if (unit == "s") {
    factor = 1000;
  } else if (unit == "m") {
    factor = 60'000;
  } else if (unit == "h") {
    factor = 3'600'000;
  } else if (unit == "d") {
    factor = 86'400'000;
  } else {
    return std::nullopt;
  }
  if (value > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / factor) {
    return std::nullopt;
  }
  return std::chrono::milliseconds(static_cast<std::int64_t>(value * factor));
}

std::optional<std::string> overlapping_stream(const stream_config& config,
                                              const std::vector<stream_config>& others) {
  for (const auto& other : others) {
    if (other.name == config.name) continue;
    for (const auto& a : config.topic_prefixes) {
      for (const auto& b : other.topic_prefixes) {
        if (a.starts_with(b) || b.starts_with(a)) {
          return other.name + " (its prefix '" + b + "' overlaps '" + a + "')";
        }
      }
    }
  }
  return std::nullopt;
}

std::vector<stream_config> load_streams_file(const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    throw common::config_error(path, "cannot read the streams file");
  } catch (const YAML::Exception& e) {
    throw common::config_error(path, std::string("not valid YAML or JSON: ") + e.what());
  }
  reader r(path);
  if (!root.IsMap() || !root["streams"]) {
    r.fail(root, "", "must be a map with a 'streams' list");
  }
  for (const auto& kv : root) {
    if (kv.first.as<std::string>() != "streams") {
      r.fail(kv.first, kv.first.as<std::string>(), "unknown key; the file has 'streams'");
    }
  }
  const auto list = root["streams"];
  if (!list.IsSequence()) r.fail(list, "streams", "must be a list of streams");
  std::vector<stream_config> out;
  for (std::size_t i = 0; i < list.size(); ++i) {
    const auto at = "streams[" + std::to_string(i) + "]";
    auto c = r.stream(list[i], at);
    for (const auto& earlier : out) {
      if (earlier.name == c.name)
        r.fail(list[i], at + ".name", "stream '" + c.name + "' is declared twice");
    }
    if (auto other = overlapping_stream(c, out)) {
      r.fail(list[i], at + ".topics",
             "overlaps stream " + *other + ": a topic is stored by one stream");
    }
    out.push_back(std::move(c));
  }
  return out;
}

}  // namespace ensemble::broker::streams
