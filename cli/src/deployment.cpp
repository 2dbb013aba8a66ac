#include "ensemble/cli/deployment.hpp"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "ensemble/cli/scriptable_agent.hpp"
#include "ensemble/common/config_reader.hpp"
#include "ensemble/common/result.hpp"
#include "ensemble/orchestrator/clock.hpp"
#include "ensemble/orchestrator/definition.hpp"
#include "stream_config_file.hpp"
#include "yaml_json.hpp"

extern char** environ;  // NOLINT(readability-redundant-declaration)

namespace ensemble::cli {

namespace fs = std::filesystem;

namespace {

using json = nlohmann::json;

constexpr int k_max_replicas = 100;
constexpr int k_max_restarts_limit = 1'000'000;
constexpr const char* k_default_file = "deployment.yaml";

// The deployment's reading helpers over common::config_reader. Every scalar of the document is
// a string (yaml_scalars::strings): numbers and durations are read from their text.
class reader {
 public:
  reader(common::config_reader& r, std::string dir) : r_(r), dir_(std::move(dir)) {}

  common::config_reader& base() const { return r_; }
  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    r_.fail(path, what);
  }
  std::string where(const std::string& path) const { return r_.where(path); }
  std::string child(const std::string& path, std::string_view key) const {
    return r_.child(path, key);
  }
  std::string child(const std::string& path, std::size_t i) const { return r_.child(path, i); }
  template <class F>
  bool with_key(const json& v, const std::string& path, std::string_view key, F&& f) const {
    return r_.with_key(v, path, key, std::forward<F>(f));
  }

  // A mapping whose keys are all in `allowed` (unknown ones are reported); null counts as an
  // empty mapping.
  void expect_map(const json& node, const std::string& path,
                  const std::vector<std::string_view>& allowed, std::string_view what) const {
    if (node.is_null()) return;
    if (!node.is_object()) fail(path, "must be a mapping, got " + r_.got(node));
    r_.check_keys(node, path, allowed, what);
  }

  std::string string(const json& node, const std::string& path) const {
    return r_.string_at(node, path);
  }

  std::string nonempty_string(const json& node, const std::string& path) const {
    auto s = string(node, path);
    if (s.empty()) fail(path, "must not be empty");
    return s;
  }

  std::vector<std::string> strings(const json& node, const std::string& path) const {
    if (node.is_null()) return {};
    if (!node.is_array()) fail(path, "must be a list of strings, got " + r_.got(node));
    std::vector<std::string> out;
    for (std::size_t i = 0; i < node.size(); ++i) {
      r_.attempt([&] { out.push_back(string(node[i], child(path, i))); });
    }
    return out;
  }

  std::map<std::string, std::string> string_map(const json& node, const std::string& path) const {
    std::map<std::string, std::string> out;
    if (node.is_null()) return out;
    if (!node.is_object()) fail(path, "must be a mapping of strings, got " + r_.got(node));
    for (const auto& [key, value] : node.items()) {
      const std::string at = child(path, key);
      if (key.empty() || key.find('=') != std::string::npos) {
        r_.report(at, "invalid environment variable name \"" + key + "\"");
        continue;
      }
      r_.attempt([&, &key = key, &value = value] {
        out[key] = value.is_null() ? std::string() : string(value, at);
      });
    }
    return out;
  }

  int integer(const json& node, const std::string& path, int min, int max) const {
    const auto text = string(node, path);
    int value = 0;
    std::size_t used = 0;
    try {
      value = std::stoi(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != text.size() || value < min || value > max) {
      fail(path, "must be an integer from " + std::to_string(min) + " to " + std::to_string(max) +
                     ", got \"" + text + "\"");
    }
    return value;
  }

  std::chrono::milliseconds duration(const json& node, const std::string& path) const {
    const auto text = string(node, path);
    json value = text;
    if (!text.empty() && text.size() < 16 &&
        std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      value = std::stoll(text);
    }
    auto d = orchestrator::parse_duration(value);
    if (!d) fail(path, "\"" + text + "\" is not a duration (e.g. 500ms, 2s, 1m)");
    return *d;
  }

  // Relative paths are relative to the deployment file's directory.
  std::string path_in_dir(const std::string& p) const {
    if (p.empty()) return dir_;
    return fs::path(p).is_absolute() ? fs::path(p).lexically_normal().string()
                                     : (fs::path(dir_) / p).lexically_normal().string();
  }

  const std::string& dir() const { return dir_; }

 private:
  common::config_reader& r_;
  std::string dir_;
};

restart_policy parse_restart(const reader& r, const json& node, const std::string& path) {
  restart_policy p;
  auto parse_mode = [&](const json& n, const std::string& at) {
    const auto text = r.string(n, at);
    if (text == "never" || text == "no") return restart_policy::mode::never;
    if (text == "on-failure" || text == "on_failure") return restart_policy::mode::on_failure;
    r.fail(at, "unknown restart policy \"" + text + "\" (expected never or on-failure)");
  };
  if (node.is_string()) {
    p.when = parse_mode(node, path);
    return p;
  }
  r.expect_map(node, path, {"policy", "backoff", "max_backoff", "max_restarts"},
               "a restart policy");
  if (node.is_null()) return p;
  r.with_key(node, path, "policy",
             [&](const json& v, const std::string& at) { p.when = parse_mode(v, at); });
  r.with_key(node, path, "backoff",
             [&](const json& v, const std::string& at) { p.backoff = r.duration(v, at); });
  r.with_key(node, path, "max_backoff",
             [&](const json& v, const std::string& at) { p.max_backoff = r.duration(v, at); });
  r.with_key(node, path, "max_restarts", [&](const json& v, const std::string& at) {
    p.max_restarts = r.integer(v, at, 0, k_max_restarts_limit);
  });
  if (p.max_backoff < p.backoff) p.max_backoff = p.backoff;
  return p;
}

// The keys every process section shares (program, args, env, workdir, restart).
void parse_process(const reader& r, const json& node, const std::string& path, process_spec& out) {
  out.where = r.where(path);
  out.workdir = r.dir();
  if (!node.is_object()) return;
  r.with_key(node, path, "program", [&](const json& v, const std::string& at) {
    out.program = r.nonempty_string(v, at);
    // A path (not a bare name) is relative to the deployment file.
    if (out.program.find('/') != std::string::npos) out.program = r.path_in_dir(out.program);
  });
  r.with_key(node, path, "args",
             [&](const json& v, const std::string& at) { out.args = r.strings(v, at); });
  r.with_key(node, path, "env",
             [&](const json& v, const std::string& at) { out.env = r.string_map(v, at); });
  r.with_key(node, path, "workdir", [&](const json& v, const std::string& at) {
    out.workdir = r.path_in_dir(r.nonempty_string(v, at));
  });
  r.with_key(node, path, "restart",
             [&](const json& v, const std::string& at) { out.restart = parse_restart(r, v, at); });
}

std::string endpoint(const reader& r, const json& node, const std::string& path) {
  std::string e = r.nonempty_string(node, path);
  const auto sep = e.find("://");
  if (sep == std::string::npos || sep == 0 || sep + 3 >= e.size()) {
    r.fail(path, "\"" + e +
                     "\" is not a ZeroMQ endpoint (e.g. tcp://127.0.0.1:5555, "
                     "tcp://127.0.0.1:* for a free port, ipc:///tmp/ensemble.sock)");
  }
  return e;
}

bool valid_name(const std::string& name) {
  return !name.empty() && name.size() <= 64 &&
         std::all_of(name.begin(), name.end(), [](unsigned char c) {
           return std::isalnum(c) != 0 || c == '-' || c == '_' || c == '.';
         });
}

void parse_broker(const reader& r, const json& root, deployment& d) {
  d.broker.program = "ensemble-broker";
  const json b = root.value("broker", json());
  r.expect_map(b, "broker",
               {"router", "events", "data", "program", "args", "env", "workdir", "restart"},
               "the broker");
  parse_process(r, b, "broker", d.broker);
  r.with_key(b, "broker", "data", [&](const json& v, const std::string& at) {
    d.broker.data = r.path_in_dir(r.nonempty_string(v, at));
  });
  const bool router_ok = r.with_key(
      b, "broker", "router",
      [&](const json& v, const std::string& at) { d.broker.router = endpoint(r, v, at); });
  const bool events_ok = r.with_key(
      b, "broker", "events",
      [&](const json& v, const std::string& at) { d.broker.events = endpoint(r, v, at); });
  if (router_ok && events_ok && d.broker.router == d.broker.events &&
      d.broker.router.find('*') == std::string::npos) {
    r.base().report("broker.events", "must differ from broker.router");
  }
}

void parse_orchestrator(const reader& r, const json& o, deployment& d) {
  r.expect_map(o, "orchestrator",
               {"store", "workflows", "clock", "program", "args", "env", "workdir", "restart"},
               "the orchestrator");
  orchestrator_section os;
  os.program = "ensemble-orchestrator";
  parse_process(r, o, "orchestrator", os);
  r.with_key(o, "orchestrator", "store", [&](const json& v, const std::string& at) {
    os.store = r.nonempty_string(v, at);
    if (os.store != ":memory:") os.store = r.path_in_dir(os.store);
  });
  r.with_key(o, "orchestrator", "clock", [&](const json& v, const std::string& at) {
    os.clock = r.string(v, at);
    if (!orchestrator::parse_clock_kind(os.clock)) {
      r.base().report(at, "must be \"wall\" or \"virtual\", not \"" + os.clock + "\"");
    }
  });
  r.with_key(o, "orchestrator", "workflows", [&](const json& v, const std::string& at) {
    // One path or a list of paths.
    const bool one = v.is_string();
    const auto list = one ? std::vector<std::string>{r.string(v, at)} : r.strings(v, at);
    for (std::size_t i = 0; i < list.size(); ++i) {
      if (list[i].empty()) {
        r.base().report(one ? at : r.child(at, i), "must not be empty");
        continue;
      }
      os.workflows.push_back(r.path_in_dir(list[i]));
    }
  });
  d.orchestrator = std::move(os);
}

// One item of `streams:`, checked with the broker's own rules (stream_config_file.hpp) so that
// what validates here is what the broker accepts from the --streams file `up` writes.
stream_section parse_stream(const reader& r, const json& node, const std::string& path) {
  r.expect_map(node, path,
               {"name", "topics", "max_age", "max_bytes", "max_events", "duplicate_window"},
               "a stream");
  if (node.is_null()) r.fail(path, "a stream needs a name and topics");
  stream_section s;
  s.where = r.where(path);
  if (!node.contains("name")) r.base().report(path, "missing required key \"name\"");
  if (!node.contains("topics")) {
    r.base().report(path, "missing required key \"topics\" (the topic prefixes it stores)");
  }
  r.with_key(node, path, "name", [&](const json& v, const std::string& at) {
    s.name = r.string(v, at);
    if (auto problem = broker::streams::check_stream_name(s.name); !problem.empty()) {
      r.fail(at, problem);
    }
  });
  r.with_key(node, path, "topics", [&](const json& v, const std::string& at) {
    if (!v.is_array() || v.empty()) {
      r.fail(at, "must be a non-empty list of topic prefixes, got " + r.base().got(v));
    }
    for (std::size_t i = 0; i < v.size(); ++i) {
      r.base().attempt([&] {
        auto prefix = r.string(v[i], r.child(at, i));
        if (auto problem = broker::streams::check_topic_prefix(prefix); !problem.empty()) {
          r.fail(r.child(at, i), problem);
        }
        s.topics.push_back(std::move(prefix));
      });
    }
  });
  auto duration = [&](const json& v, const std::string& at) {
    const auto text = r.string(v, at);
    const auto d = broker::streams::parse_duration(text);
    if (!d) {
      r.fail(at, "\"" + text + "\" is not a duration (500ms, 30s, 5m, 24h, 7d, or milliseconds)");
    }
    return *d;
  };
  auto count = [&](const json& v, const std::string& at) {
    const auto text = r.string(v, at);
    std::uint64_t n = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
    if (text.empty() || ec != std::errc{} || end != text.data() + text.size()) {
      r.fail(at, "\"" + text + "\" is not a whole number >= 0 (0: unlimited)");
    }
    return n;
  };
  r.with_key(node, path, "max_age",
             [&](const json& v, const std::string& at) { s.max_age = duration(v, at); });
  r.with_key(node, path, "duplicate_window",
             [&](const json& v, const std::string& at) { s.duplicate_window = duration(v, at); });
  r.with_key(node, path, "max_bytes",
             [&](const json& v, const std::string& at) { s.max_bytes = count(v, at); });
  r.with_key(node, path, "max_events",
             [&](const json& v, const std::string& at) { s.max_events = count(v, at); });
  return s;
}

void parse_streams(const reader& r, const json& list, const std::string& path, deployment& d) {
  if (list.is_null()) return;
  if (!list.is_array()) r.fail(path, "must be a list of streams, got " + r.base().got(list));
  std::vector<broker::streams::stream_config> earlier;
  for (std::size_t i = 0; i < list.size(); ++i) {
    const auto at = r.child(path, i);
    r.base().attempt([&] {
      auto s = parse_stream(r, list[i], at);
      if (s.name.empty() || s.topics.empty()) return;  // already reported
      for (const auto& e : earlier) {
        if (e.name == s.name) {
          r.fail(r.child(at, "name"), "stream '" + s.name + "' is declared twice");
        }
      }
      broker::streams::stream_config c{.name = s.name, .topic_prefixes = s.topics};
      if (auto other = broker::streams::overlapping_stream(c, earlier)) {
        r.fail(r.child(at, "topics"),
               "overlaps stream " + *other + ": a topic is stored by one stream");
      }
      earlier.push_back(std::move(c));
      d.streams.push_back(std::move(s));
    });
  }
}

// A `rights:` mapping: the lists of the broker's auth file (docs/protocol.md section 12).
rights parse_rights(const reader& r, const json& node, const std::string& path) {
  r.expect_map(node, path,
               {"offer", "call", "call_own", "publish", "subscribe", "consume", "admin"}, "rights");
  rights out;
  const std::pair<const char*, std::vector<std::string>*> lists[] = {
      {"offer", &out.offer},     {"call", &out.call},           {"call_own", &out.call_own},
      {"publish", &out.publish}, {"subscribe", &out.subscribe}, {"consume", &out.consume},
      {"admin", &out.admin}};
  for (const auto& [key, list] : lists) {
    r.with_key(node, path, key, [&, list = list](const json& v, const std::string& at) {
      *list = r.strings(v, at);
    });
  }
  return out;
}

// `security: curve` or `security: {mode: curve, keys: DIR, identities: {NAME: rights}}`.
void parse_security(const reader& r, const json& node, const std::string& path, deployment& d) {
  auto& sec = d.security;
  sec.where = r.where(path);
  sec.keys_dir = (fs::path(d.dir) / ".ensemble" / "keys").string();
  auto mode = [&](const json& v, const std::string& at) {
    const auto text = r.string(v, at);
    if (text == "curve") return security_section::mode::curve;
    if (text == "none") return security_section::mode::none;
    r.fail(at, "unknown security mode \"" + text + "\" (expected curve or none)");
  };
  if (node.is_string()) {
    sec.kind = mode(node, path);
    return;
  }
  r.expect_map(node, path, {"mode", "keys", "identities"}, "the security section");
  if (node.is_null()) return;
  if (!node.contains("mode")) r.base().report(path, "missing required key \"mode\" (curve)");
  r.with_key(node, path, "mode",
             [&](const json& v, const std::string& at) { sec.kind = mode(v, at); });
  r.with_key(node, path, "keys", [&](const json& v, const std::string& at) {
    sec.keys_dir = r.path_in_dir(r.nonempty_string(v, at));
  });
  r.with_key(node, path, "identities", [&](const json& v, const std::string& at) {
    if (!v.is_object()) r.fail(at, "must be a mapping of names to rights, got " + r.base().got(v));
    for (const auto& [name, rights_node] : v.items()) {
      const auto name_at = r.child(at, name);
      r.base().attempt([&, &name = name, &rights_node = rights_node] {
        if (!valid_name(name)) {
          r.fail(name_at, "\"" + name +
                              "\" is not a valid identity name (letters, digits, '-', "
                              "'_', '.'; at most 64)");
        }
        sec.identities[name] = parse_rights(r, rights_node, name_at);
      });
    }
  });
}

agent_section parse_agent(const reader& r, const json& node, const std::string& path,
                          std::set<std::string>& names) {
  r.expect_map(node, path,
               {"name", "program", "spec", "args", "env", "workdir", "replicas", "services",
                "ready_line", "restart", "rights"},
               "an agent");
  if (node.is_null()) r.fail(path, "an agent needs at least a name and a program or spec");
  agent_section a;
  const std::string name_path = r.child(path, "name");
  bool named = false;
  if (!node.contains("name")) {
    r.base().report(path, "missing required key \"name\"");
  } else {
    named = r.base().attempt([&] {
      a.name = r.nonempty_string(node["name"], name_path);
      if (!valid_name(a.name)) {
        r.fail(name_path, "\"" + a.name +
                              "\" is not a valid name (letters, digits, '-', '_', '.'; at most "
                              "64)");
      }
    });
  }
  parse_process(r, node, path, a);
  if (node.contains("spec")) {
    r.with_key(node, path, "spec", [&](const json& v, const std::string& at) {
      if (node.contains("program")) {
        r.fail(at, "give either \"program\" or \"spec\" (a scriptable agent), not both");
      }
      a.spec = r.path_in_dir(r.nonempty_string(v, at));
    });
  } else if (!node.contains("program")) {
    r.base().report(path, "agent \"" + a.name + "\" needs \"program\" or \"spec\"");
  }
  r.with_key(node, path, "replicas", [&](const json& v, const std::string& at) {
    a.replicas = r.integer(v, at, 1, k_max_replicas);
  });
  r.with_key(node, path, "services", [&](const json& v, const std::string& at) {
    a.services = r.strings(v, at);
    for (std::size_t s = 0; s < a.services.size(); ++s) {
      if (a.services[s].empty()) r.base().report(r.child(at, s), "must not be empty");
    }
  });
  r.with_key(node, path, "ready_line", [&](const json& v, const std::string& at) {
    a.ready_line = r.nonempty_string(v, at);
  });
  r.with_key(node, path, "rights",
             [&](const json& v, const std::string& at) { a.rights = parse_rights(r, v, at); });
  if (named) {
    for (const auto& n : replica_names(a)) {
      if (!names.insert(n).second) {
        r.base().report(name_path, "the name \"" + n + "\" is already taken" +
                                       (n == "broker" || n == "orchestrator" ? " (reserved)" : "") +
                                       "; every process needs its own name");
      }
    }
  }
  return a;
}

}  // namespace

deployment parse_deployment(const std::string& yaml, const std::string& file) {
  const fs::path file_path = fs::absolute(file).lexically_normal();
  deployment d;
  d.file = file_path.string();
  d.dir = file_path.parent_path().string();
  common::config_reader base(file, common::path_style::dotted);
  const json root = yaml_to_json(yaml, base, yaml_scalars::strings);
  if (root.is_null()) {
    throw common::config_error(file,
                               "the deployment is empty (expected a mapping with broker, "
                               "orchestrator and agents)");
  }
  const reader r(base, d.dir);
  base.attempt([&] {
    r.expect_map(root, "", {"broker", "orchestrator", "agents", "streams", "security"},
                 "a deployment");
    base.attempt([&] { parse_broker(r, root, d); });
    r.with_key(root, "", "orchestrator",
               [&](const json& o, const std::string&) { parse_orchestrator(r, o, d); });
    r.with_key(root, "", "agents", [&](const json& agents, const std::string& at) {
      if (!agents.is_null() && !agents.is_array()) {
        r.fail(at, "must be a list of agents, got " + base.got(agents));
      }
      std::set<std::string> names{"broker", "orchestrator"};
      for (std::size_t i = 0; i < agents.size(); ++i) {
        base.attempt([&] { d.agents.push_back(parse_agent(r, agents[i], r.child(at, i), names)); });
      }
    });
    r.with_key(root, "", "streams",
               [&](const json& list, const std::string& at) { parse_streams(r, list, at, d); });
    r.with_key(root, "", "security",
               [&](const json& v, const std::string& at) { parse_security(r, v, at, d); });
  });
  if (d.security.keys_dir.empty())
    d.security.keys_dir = (fs::path(d.dir) / ".ensemble" / "keys").string();
  base.throw_if_any();
  return d;
}

deployment load_deployment(const std::string& path) {
  std::string file = path.empty() ? k_default_file : path;
  std::error_code ec;
  if (fs::is_directory(file, ec)) file = (fs::path(file) / k_default_file).string();
  std::ifstream in(file);
  if (!in) {
    throw common::config_error(
        file, fs::exists(file, ec) ? "cannot read the deployment file" : "no such deployment file");
  }
  std::stringstream text;
  text << in.rdbuf();
  return parse_deployment(text.str(), file);
}

std::string default_data_dir(const deployment& d) {
  if (!d.orchestrator || d.orchestrator->store == ":memory:") return {};
  return (fs::path(d.dir) / ".ensemble" / "data").string();
}

void write_streams_file(const deployment& d, const std::string& path) {
  json list = json::array();
  for (const auto& s : d.streams) {
    json item = {{"name", s.name},
                 {"topics", s.topics},
                 {"max_age", s.max_age.count()},
                 {"max_bytes", s.max_bytes},
                 {"max_events", s.max_events}};
    if (s.duplicate_window) item["duplicate_window"] = s.duplicate_window->count();
    list.push_back(std::move(item));
  }
  std::ofstream out(path, std::ios::trunc);
  out << json{{"streams", list}}.dump(2) << "\n";
  out.close();
  if (!out) throw common::config_error(path, "cannot write the broker's streams file");
}

std::vector<common::diagnostic> check_deployment(const std::string& path,
                                                 std::vector<std::string>& workflows) {
  deployment d;
  try {
    d = load_deployment(path);
  } catch (const common::config_error& e) {
    return common::diagnostics_of(e);
  }
  std::vector<common::diagnostic> problems;
  if (d.orchestrator) {
    workflows.insert(workflows.end(), d.orchestrator->workflows.begin(),
                     d.orchestrator->workflows.end());
  }
  for (const auto& a : d.agents) {
    if (a.spec.empty()) continue;
    try {
      (void)load_agent_spec(a.spec);
    } catch (const common::config_error& e) {
      for (auto& p : common::diagnostics_of(e)) problems.push_back(std::move(p));
    }
  }
  return problems;
}

program_location find_program(const std::string& program) {
  program_location where;
  auto executable = [](const std::string& p) {
    std::error_code ec;
    return fs::is_regular_file(p, ec) && ::access(p.c_str(), X_OK) == 0;
  };
  if (program.find('/') != std::string::npos) {
    where.searched.push_back(fs::path(program).parent_path().string());
    if (executable(program)) where.path = program;
    return where;
  }
  std::vector<std::string> dirs;
  std::error_code ec;
  const auto self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) dirs.push_back(self.parent_path().string());
  const char* bin_dir = std::getenv("ENSEMBLE_BIN_DIR");
#ifdef ENSEMBLE_BUILD_BIN_DIR
  dirs.push_back(bin_dir != nullptr && *bin_dir != '\0' ? bin_dir : ENSEMBLE_BUILD_BIN_DIR);
#else
  if (bin_dir != nullptr && *bin_dir != '\0') dirs.push_back(bin_dir);
#endif
  if (const char* path = std::getenv("PATH")) {
    std::stringstream list(path);
    std::string dir;
    while (std::getline(list, dir, ':')) dirs.push_back(dir.empty() ? "." : dir);
  }
  for (const auto& dir : dirs) {
    if (std::find(where.searched.begin(), where.searched.end(), dir) != where.searched.end()) {
      continue;
    }
    where.searched.push_back(dir);
    const auto candidate = (fs::path(dir) / program).string();
    if (executable(candidate)) {
      where.path = candidate;
      break;
    }
  }
  return where;
}

std::vector<std::string> replica_names(const agent_section& agent) {
  if (agent.replicas <= 1) return {agent.name};
  std::vector<std::string> names;
  for (int i = 1; i <= agent.replicas; ++i) names.push_back(agent.name + "-" + std::to_string(i));
  return names;
}

std::string substitute(const std::string& text, const std::map<std::string, std::string>& values) {
  std::string out;
  out.reserve(text.size());
  std::size_t i = 0;
  while (i < text.size()) {
    if (text[i] == '{') {
      const auto close = text.find('}', i + 1);
      if (close != std::string::npos) {
        const auto it = values.find(text.substr(i + 1, close - i - 1));
        if (it != values.end()) {
          out += it->second;
          i = close + 1;
          continue;
        }
      }
    }
    out += text[i++];
  }
  return out;
}

namespace {

std::string resolve_program(const std::string& program, const std::string& where) {
  const auto found = find_program(program);
  if (found.path) return *found.path;
  if (program.find('/') != std::string::npos) {
    throw common::config_error(where + ".program",
                               "program " + program + " not found (or not executable)");
  }
  std::string searched;
  for (const auto& dir : found.searched) searched += (searched.empty() ? "" : ", ") + dir;
  throw common::config_error(where + ".program",
                             "program '" + program + "' not found; looked in: " + searched);
}

}  // namespace

std::vector<planned_process> plan_processes(const deployment& d, const std::string& ensemble_exe) {
  std::vector<planned_process> out;

  planned_process b;
  b.name = "broker";
  b.kind = process_role::broker;
  b.spec = &d.broker;
  b.program = resolve_program(d.broker.program, d.broker.where);
  b.services = {"broker"};
  b.ready_text = broker_ready_text;
  out.push_back(std::move(b));

  if (d.orchestrator) {
    planned_process o;
    o.name = "orchestrator";
    o.kind = process_role::orchestrator;
    o.spec = &*d.orchestrator;
    o.program = resolve_program(d.orchestrator->program, d.orchestrator->where);
    o.ready_text = orchestrator_ready_text;
    out.push_back(std::move(o));
  }

  for (const auto& a : d.agents) {
    const std::string program =
        a.spec.empty() ? resolve_program(a.program, a.where) : std::string();
    std::vector<std::string> spec_services;
    if (!a.spec.empty()) {
      std::error_code exists_ec;
      if (!fs::is_regular_file(a.spec, exists_ec)) {
        throw common::config_error(a.where + ".spec", "no such agent spec file " + a.spec);
      }
      if (ensemble_exe.empty()) {
        throw common::config_error(
            a.where + ".spec", "cannot find the ensemble executable to run the scriptable agent");
      }
      // Validated now, before anything starts; its services are what readiness waits for.
      try {
        spec_services = load_agent_spec(a.spec).service_names();
      } catch (const common::config_error& e) {
        throw common::config_error(a.where + ".spec", e.what());
      }
    }
    const auto names = replica_names(a);
    for (std::size_t i = 0; i < names.size(); ++i) {
      planned_process c;
      c.name = names[i];
      c.kind = process_role::agent;
      c.spec = &a;
      c.replica = static_cast<int>(i + 1);
      c.services = a.services;
      if (a.spec.empty()) {
        c.program = program;
        c.ready_text = a.ready_line;
      } else {
        c.program = ensemble_exe;
        c.extra = {"agent", a.spec, "--name", c.name};
        if (c.services.empty()) c.services = spec_services;
        c.ready_text = a.ready_line.empty() ? std::string(agent_ready_text) : a.ready_line;
      }
      out.push_back(std::move(c));
    }
  }
  return out;
}

exec_plan command_for(const planned_process& c, const deployment& d, const std::string& router,
                      const std::string& events) {
  const process_spec& s = *c.spec;
  std::map<std::string, std::string> values{{"name", c.name},
                                            {"replica", std::to_string(c.replica)},
                                            {"dir", d.dir},
                                            {"broker", router.empty() ? d.broker.router : router},
                                            {"events", events.empty() ? d.broker.events : events}};
  // Secured: the process's own secret key and the broker's public key ({key}, {broker_key}).
  std::string key;
  std::string broker_key;
  if (!d.keys.auth_file.empty() && c.kind != process_role::broker) {
    const auto found = d.keys.secret_files.find(c.name);
    if (found != d.keys.secret_files.end()) key = found->second;
    broker_key = d.keys.broker_public;
  }
  values["key"] = key;
  values["broker_key"] = broker_key;
  const std::string& r = values["broker"];
  const std::string& e = values["events"];

  exec_plan p;
  p.path = c.program;
  p.workdir = s.workdir;
  p.argv.push_back(c.program);
  switch (c.kind) {
    case process_role::broker:
      p.argv.insert(p.argv.end(), {"--router", r, "--events", e});
      if (!d.keys.auth_file.empty()) {
        p.argv.insert(p.argv.end(),
                      {"--curve-key", d.keys.broker_secret, "--auth", d.keys.auth_file});
      }
      if (!d.broker.data.empty()) p.argv.insert(p.argv.end(), {"--data", d.broker.data});
      if (!d.broker.streams_file.empty()) {
        p.argv.insert(p.argv.end(), {"--streams", d.broker.streams_file});
      }
      break;
    case process_role::orchestrator:
      p.argv.insert(p.argv.end(), {"--broker", r, "--events", e, "--store", d.orchestrator->store});
      for (const auto& w : d.orchestrator->workflows)
        p.argv.insert(p.argv.end(), {"--workflows", w});
      if (!d.orchestrator->clock.empty()) {
        p.argv.insert(p.argv.end(), {"--clock", d.orchestrator->clock});
      }
      if (!key.empty()) p.argv.insert(p.argv.end(), {"--key", key, "--broker-key", broker_key});
      break;
    case process_role::agent:
      if (!c.extra.empty()) {
        // The scriptable agent: `ensemble --broker B --events E agent SPEC [args]`.
        p.argv.insert(p.argv.end(), {"--broker", r, "--events", e});
        if (!key.empty()) p.argv.insert(p.argv.end(), {"--key", key, "--broker-key", broker_key});
      }
      break;
  }
  p.argv.insert(p.argv.end(), c.extra.begin(), c.extra.end());
  for (const auto& a : s.args) p.argv.push_back(substitute(a, values));

  std::map<std::string, std::string> env;
  for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
    std::string_view text(*entry);
    const auto eq = text.find('=');
    if (eq != std::string_view::npos) {
      env[std::string(text.substr(0, eq))] = std::string(text.substr(eq + 1));
    }
  }
  if (c.kind != process_role::broker) {
    env["ENSEMBLE_BROKER"] = r;
    env["ENSEMBLE_EVENTS"] = e;
  }
  if (c.kind == process_role::agent) env["ENSEMBLE_AGENT_NAME"] = c.name;
  if (!key.empty()) {
    env["ENSEMBLE_KEY"] = key;
    env["ENSEMBLE_BROKER_KEY"] = broker_key;
  }
  for (const auto& [k, v] : s.env) env[k] = substitute(v, values);
  for (const auto& [k, v] : env) p.env.push_back(k + "=" + v);
  return p;
}

}  // namespace ensemble::cli
