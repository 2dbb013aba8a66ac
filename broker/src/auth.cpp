#include "auth.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "ensemble/common/curve_keys.hpp"
#include "ensemble/common/protocol.hpp"
#include "ensemble/common/result.hpp"
#include "yaml_file_reader.hpp"

namespace ensemble::broker::auth {

namespace {

// The SDK's subscription probes (docs/protocol.md section 4, "Subscription"): every identity
// may publish and subscribe to them, or no secured peer could know its subscriptions are live.
constexpr std::string_view k_probe_prefix = "_ensemble.sync.";

constexpr std::string_view k_identity_keys[] = {"keys",    "offer",     "call",    "call_own",
                                                "publish", "subscribe", "consume", "admin"};

bool topic_char(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-' || c == ':' || c == '.';
}

bool any_glob(const std::vector<std::string>& patterns, std::string_view text) {
  return std::any_of(patterns.begin(), patterns.end(),
                     [&](const std::string& p) { return glob_match(p, text); });
}

// Publish and subscribe rights are topic prefixes; "" and "*" are every topic.
bool any_prefix(const std::vector<std::string>& prefixes, std::string_view topic) {
  return std::any_of(prefixes.begin(), prefixes.end(),
                     [&](const std::string& p) { return p == "*" || topic.starts_with(p); });
}

verdict of(bool allowed) {
  return allowed ? verdict::allowed : verdict::refused;
}

class reader : public yaml_file_reader {
 public:
  reader(std::string file, std::string base_dir)
      : yaml_file_reader(std::move(file)), base_dir_(std::move(base_dir)) {}

  std::string scalar(const YAML::Node& node, const std::string& path) const {
    return yaml_file_reader::scalar(node, path, "a string");
  }

  // A list of patterns; `check` says what is wrong with one (empty: fine).
  template <class Check>
  std::vector<std::string> patterns(const YAML::Node& node, const std::string& path,
                                    Check&& check) const {
    if (!node.IsSequence()) fail(node, path, "must be a list");
    std::vector<std::string> out;
    for (std::size_t i = 0; i < node.size(); ++i) {
      const auto at = path + "[" + std::to_string(i) + "]";
      auto p = scalar(node[i], at);
      if (auto problem = check(p); !problem.empty()) fail(node[i], at, problem);
      out.push_back(std::move(p));
    }
    return out;
  }

  identity entry(const std::string& name, const YAML::Node& name_node, const YAML::Node& node,
                 const std::string& path) const {
    if (auto problem = common::check_name("identity name", name); !problem.empty()) {
      fail(name_node, path, problem + " (an identity's name is its peers' agent name)");
    }
    if (!node.IsMap()) fail(node, path, "must be a map {keys, offer, call, ...}");
    identity id;
    id.name = name;
    bool has_keys = false;
    const auto name_pattern = [](std::string_view rule) {
      return [rule](const std::string& p) -> std::string {
        if (auto problem = common::check_name("pattern", p); !problem.empty()) {
          return "bad pattern: " + problem + "; " + std::string(rule);
        }
        return {};
      };
    };
    const auto call_pattern = [](const std::string& p) -> std::string {
      if (auto problem = common::check_name("pattern", p); !problem.empty()) {
        return "bad pattern: " + problem + "; a call pattern is Service.action ('*' anywhere)";
      }
      if (p.find('.') == std::string::npos && p.find('*') == std::string::npos) {
        return "bad pattern '" + p +
               "': a call pattern is Service.action ('PaymentService.charge', "
               "'InventoryService.*', '*'); to allow every action of a service write '" +
               p + ".*'";
      }
      return {};
    };
    const auto topic_prefix = [](const std::string& p) -> std::string {
      if (p == "*") return {};
      if (p.size() > common::k_max_topic_length) {
        return "bad pattern: topic prefix longer than " +
               std::to_string(common::k_max_topic_length) + " bytes";
      }
      for (std::size_t i = 0; i < p.size(); ++i) {
        if (!topic_char(p[i])) {
          return "bad pattern '" + p + "': a topic prefix has only topic characters " +
                 "[A-Za-z0-9_:-.] (byte " + std::to_string(i) + " is not one); \"\" or '*' is " +
                 "every topic";
        }
      }
      return {};
    };
    for (const auto& kv : node) {
      const auto key = kv.first.as<std::string>();
      const auto at = path + "." + key;
      if (key == "keys") {
        has_keys = true;
        if (!kv.second.IsSequence()) {
          fail(kv.second, at, "must be a list of public keys (Z85 text or key files)");
        }
        for (std::size_t i = 0; i < kv.second.size(); ++i) {
          const auto where = at + "[" + std::to_string(i) + "]";
          const auto value = scalar(kv.second[i], where);
          std::string line;
          if (kv.second[i].Mark().line >= 0) {
            line = " (line " + std::to_string(kv.second[i].Mark().line + 1) + ")";
          }
          id.keys.push_back(
              common::read_public_key(value, file() + ": " + where + line, base_dir_));
        }
      } else if (key == "offer") {
        id.offer = patterns(kv.second, at, name_pattern("an offer pattern is a service name"));
      } else if (key == "call") {
        id.call = patterns(kv.second, at, call_pattern);
      } else if (key == "call_own") {
        id.call_own = patterns(kv.second, at, call_pattern);
      } else if (key == "publish") {
        id.publish = patterns(kv.second, at, topic_prefix);
      } else if (key == "subscribe") {
        id.subscribe = patterns(kv.second, at, topic_prefix);
      } else if (key == "consume") {
        id.consume = patterns(kv.second, at, name_pattern("a consume pattern is a stream name"));
      } else if (key == "admin") {
        id.admin = patterns(kv.second, at,
                            name_pattern("an admin pattern is an action of service 'broker'"));
      } else {
        fail(kv.first, at,
             "unknown key; an identity has keys, offer, call, call_own, publish, subscribe, "
             "consume, admin");
      }
    }
    if (!has_keys) fail(node, path, "has no 'keys': the public keys that authenticate as it");
    return id;
  }

 private:
  std::string base_dir_;
};

}  // namespace

std::string_view right_name(right r) {
  switch (r) {
    case right::offer:
      return "offer";
    case right::call:
      return "call";
    case right::call_own:
      return "call_own";
    case right::publish:
      return "publish";
    case right::subscribe:
      return "subscribe";
    case right::consume:
      return "consume";
    case right::admin:
      return "admin";
    case right::name:
      return "name";
  }
  return "?";
}

table::table(std::vector<identity> identities) : identities_(std::move(identities)) {
  for (std::size_t i = 0; i < identities_.size(); ++i) {
    by_name_.emplace(identities_[i].name, i);
    for (const auto& k : identities_[i].keys) by_key_.emplace(k, i);
  }
}

const identity* table::by_key(std::string_view z85_key) const {
  const auto it = by_key_.find(z85_key);
  return it == by_key_.end() ? nullptr : &identities_[it->second];
}

const identity* table::by_name(std::string_view name) const {
  const auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &identities_[it->second];
}

table load_auth_file(const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    throw common::config_error(path, "cannot read the auth file");
  } catch (const YAML::Exception& e) {
    throw common::config_error(path, std::string("not valid YAML or JSON: ") + e.what());
  }
  reader r(path, std::filesystem::path(path).parent_path().string());
  if (!root.IsMap() || !root["identities"]) {
    r.fail(root, "", "must be a map with an 'identities' map");
  }
  for (const auto& kv : root) {
    if (kv.first.as<std::string>() != "identities") {
      r.fail(kv.first, kv.first.as<std::string>(), "unknown key; the file has 'identities'");
    }
  }
  const auto list = root["identities"];
  if (!list.IsMap()) r.fail(list, "identities", "must be a map of identity name to its entry");
  std::vector<identity> out;
  std::map<std::string, std::string> key_owner;  // key -> identity
  std::set<std::string> names;
  for (const auto& kv : list) {
    const auto name = r.scalar(kv.first, "identities");
    const auto at = "identities." + name;
    if (!names.insert(name).second) {
      r.fail(kv.first, at, "identity '" + name + "' is listed twice; a name may be listed once");
    }
    auto id = r.entry(name, kv.first, kv.second, at);
    for (std::size_t i = 0; i < id.keys.size(); ++i) {
      const auto [it, fresh] = key_owner.emplace(id.keys[i], name);
      if (!fresh) {
        r.fail(kv.second["keys"][i], at + ".keys[" + std::to_string(i) + "]",
               it->second == name ? "key " + id.keys[i] + " is listed twice for '" + name + "'"
                                  : "key " + id.keys[i] + " belongs to identity '" + it->second +
                                        "' already; a key may belong to one identity only");
      }
    }
    out.push_back(std::move(id));
  }
  return table(std::move(out));
}

bool glob_match(std::string_view pattern, std::string_view text) {
  // Iterative wildcard matching with backtracking to the last '*': linear in practice.
  std::size_t p = 0;
  std::size_t t = 0;
  std::size_t star = std::string_view::npos;
  std::size_t resume = 0;
  while (t < text.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      resume = t;
    } else if (p < pattern.size() && pattern[p] == text[t]) {
      ++p;
      ++t;
    } else if (star != std::string_view::npos) {
      p = star + 1;
      t = ++resume;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

verdict check_offer(const identity* who, std::string_view service) {
  return of(who != nullptr && any_glob(who->offer, service));
}

verdict check_call(const identity* who, std::string_view service, std::string_view action) {
  if (service == "broker") return check_admin(who, action);
  if (who == nullptr) return verdict::refused;
  std::string target;
  target.reserve(service.size() + 1 + action.size());
  target.append(service).append(".").append(action);
  if (any_glob(who->call, target)) return verdict::allowed;
  if (any_glob(who->call_own, target)) return verdict::allowed_own;
  return verdict::refused;
}

verdict check_admin(const identity* who, std::string_view action) {
  if (action == "ping") return verdict::allowed;
  return of(who != nullptr && any_glob(who->admin, action));
}

verdict check_publish(const identity* who, std::string_view topic) {
  if (topic.starts_with(k_probe_prefix)) return verdict::allowed;
  return of(who != nullptr && any_prefix(who->publish, topic));
}

verdict check_subscribe(const identity* who, std::string_view prefix) {
  if (prefix.starts_with(k_probe_prefix)) return verdict::allowed;
  return of(who != nullptr && any_prefix(who->subscribe, prefix));
}

verdict check_consume(const identity* who, std::string_view stream) {
  return of(who != nullptr && any_glob(who->consume, stream));
}

std::string refusal_message(std::string_view identity, right r, std::string_view what) {
  return "identity '" + std::string(identity) + "' has no '" + std::string(right_name(r)) +
         "' right for " + std::string(what);
}

table_diff diff(const table& before, const table& after) {
  table_diff d;
  for (const auto& old : before.identities()) {
    const identity* now = after.by_name(old.name);
    if (now == nullptr || !now->same_rights(old)) d.changed.push_back(old.name);
    if (now == nullptr || now->subscribe != old.subscribe) d.subscribe_changed.push_back(old.name);
    for (const auto& key : old.keys) {
      const identity* owner = after.by_key(key);
      if (owner == nullptr || owner->name != old.name) d.closed_keys.push_back(key);
    }
  }
  return d;
}

bool refusal_log_limiter::admit(std::string_view identity,
                                std::chrono::steady_clock::time_point now,
                                std::uint64_t& suppressed) {
  auto it = windows_.find(identity);
  if (it == windows_.end()) it = windows_.emplace(std::string(identity), window{now, 0, 0}).first;
  window& w = it->second;
  if (now - w.start >= std::chrono::seconds(1)) {
    w.start = now;
    w.logged = 0;
  }
  if (w.logged >= k_lines_per_second) {
    ++w.suppressed;
    return false;
  }
  ++w.logged;
  suppressed = std::exchange(w.suppressed, 0);
  return true;
}

}  // namespace ensemble::broker::auth
