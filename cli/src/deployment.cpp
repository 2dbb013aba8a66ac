#include "ensemble/cli/deployment.hpp"

#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "ensemble/cli/scriptable_agent.hpp"
#include "ensemble/common/result.hpp"
#include "ensemble/orchestrator/definition.hpp"

extern char** environ;  // NOLINT(readability-redundant-declaration)

namespace ensemble::cli {

namespace fs = std::filesystem;

namespace {

constexpr int k_max_replicas = 100;
constexpr int k_max_restarts_limit = 1'000'000;
constexpr const char* k_default_file = "deployment.yaml";

// Walks a YAML document keeping the path of each node, so that every error names the file,
// the YAML path (agents[1].restart.backoff) and the line and column.
class reader {
 public:
  reader(std::string file, std::string dir) : file_(std::move(file)), dir_(std::move(dir)) {}

  [[noreturn]] void fail(const YAML::Node& node, const std::string& path,
                         const std::string& what) const {
    std::string message = what;
    const auto mark = node.Mark();
    if (mark.line >= 0) {
      message += " (line " + std::to_string(mark.line + 1) + ", column " +
                 std::to_string(mark.column + 1) + ")";
    }
    throw common::config_error(where(path), message);
  }

  std::string where(const std::string& path) const {
    return path.empty() ? file_ : file_ + ": " + path;
  }

  static std::string join(const std::string& path, const std::string& key) {
    return path.empty() ? key : path + "." + key;
  }
  static std::string index(const std::string& path, std::size_t i) {
    return path + "[" + std::to_string(i) + "]";
  }

  // A map whose keys are all in `allowed`; null counts as an empty map.
  void expect_map(const YAML::Node& node, const std::string& path,
                  std::initializer_list<const char*> allowed) const {
    if (node.IsNull()) return;
    if (!node.IsMap()) fail(node, path, "expected a map, found " + kind(node));
    for (auto it = node.begin(); it != node.end(); ++it) {
      if (!it->first.IsScalar()) fail(it->first, path, "keys must be strings");
      const auto key = it->first.Scalar();
      if (std::none_of(allowed.begin(), allowed.end(), [&](const char* k) { return key == k; })) {
        std::string list;
        for (const char* k : allowed) list += (list.empty() ? "" : ", ") + std::string(k);
        fail(it->first, join(path, key), "unknown key (expected one of: " + list + ")");
      }
    }
  }

  std::string string(const YAML::Node& node, const std::string& path) const {
    if (node.IsMap() && node.size() == 1 && node.begin()->second.IsNull() &&
        node.begin()->first.IsScalar()) {
      // [--broker, {broker}] is YAML for a map: the placeholder needs quotes.
      fail(node, path,
           "expected a string, found a map; write placeholders in quotes: \"{" +
               node.begin()->first.Scalar() + "}\"");
    }
    if (!node.IsScalar()) fail(node, path, "expected a string, found " + kind(node));
    return node.Scalar();
  }

  std::string nonempty_string(const YAML::Node& node, const std::string& path) const {
    auto s = string(node, path);
    if (s.empty()) fail(node, path, "must not be empty");
    return s;
  }

  std::vector<std::string> strings(const YAML::Node& node, const std::string& path) const {
    if (node.IsNull()) return {};
    if (!node.IsSequence()) fail(node, path, "expected a list of strings, found " + kind(node));
    std::vector<std::string> out;
    for (std::size_t i = 0; i < node.size(); ++i) out.push_back(string(node[i], index(path, i)));
    return out;
  }

  std::map<std::string, std::string> string_map(const YAML::Node& node,
                                                const std::string& path) const {
    std::map<std::string, std::string> out;
    if (node.IsNull()) return out;
    if (!node.IsMap()) fail(node, path, "expected a map of strings, found " + kind(node));
    for (auto it = node.begin(); it != node.end(); ++it) {
      const auto key = string(it->first, path);
      if (key.empty() || key.find('=') != std::string::npos) {
        fail(it->first, path, "invalid environment variable name '" + key + "'");
      }
      out[key] = it->second.IsNull() ? std::string() : string(it->second, join(path, key));
    }
    return out;
  }

  int integer(const YAML::Node& node, const std::string& path, int min, int max) const {
    const auto text = string(node, path);
    int value = 0;
    std::size_t used = 0;
    try {
      value = std::stoi(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != text.size())
      fail(node, path, "expected an integer, found '" + text + "'");
    if (value < min || value > max) {
      fail(node, path,
           "must be between " + std::to_string(min) + " and " + std::to_string(max) + ", found " +
               text);
    }
    return value;
  }

  std::chrono::milliseconds duration(const YAML::Node& node, const std::string& path) const {
    const auto text = string(node, path);
    nlohmann::json value = text;
    if (!text.empty() && std::all_of(text.begin(), text.end(), ::isdigit)) {
      value = std::stoll(text);
    }
    auto d = orchestrator::parse_duration(value);
    if (!d) fail(node, path, "'" + text + "' is not a duration (e.g. 500ms, 2s, 1m)");
    return *d;
  }

  // Relative paths are relative to the deployment file's directory.
  std::string path_in_dir(const std::string& p) const {
    if (p.empty()) return dir_;
    return fs::path(p).is_absolute() ? fs::path(p).lexically_normal().string()
                                     : (fs::path(dir_) / p).lexically_normal().string();
  }

  static std::string kind(const YAML::Node& node) {
    switch (node.Type()) {
      case YAML::NodeType::Null:
        return "nothing";
      case YAML::NodeType::Scalar:
        return "'" + node.Scalar() + "'";
      case YAML::NodeType::Sequence:
        return "a list";
      case YAML::NodeType::Map:
        return "a map";
      default:
        return "an undefined value";
    }
  }

  const std::string& file() const { return file_; }
  const std::string& dir() const { return dir_; }

 private:
  std::string file_;
  std::string dir_;
};

restart_policy parse_restart(const reader& r, const YAML::Node& node, const std::string& path) {
  restart_policy p;
  auto parse_mode = [&](const YAML::Node& n, const std::string& at) {
    const auto text = r.string(n, at);
    if (text == "never" || text == "no") return restart_policy::mode::never;
    if (text == "on-failure" || text == "on_failure") return restart_policy::mode::on_failure;
    r.fail(n, at, "unknown restart policy '" + text + "' (expected never or on-failure)");
  };
  if (node.IsScalar()) {
    p.when = parse_mode(node, path);
    return p;
  }
  r.expect_map(node, path, {"policy", "backoff", "max_backoff", "max_restarts"});
  if (node.IsNull()) return p;
  if (node["policy"]) p.when = parse_mode(node["policy"], reader::join(path, "policy"));
  if (node["backoff"]) p.backoff = r.duration(node["backoff"], reader::join(path, "backoff"));
  if (node["max_backoff"]) {
    p.max_backoff = r.duration(node["max_backoff"], reader::join(path, "max_backoff"));
  }
  if (node["max_restarts"]) {
    p.max_restarts = r.integer(node["max_restarts"], reader::join(path, "max_restarts"), 0,
                               k_max_restarts_limit);
  }
  if (p.max_backoff < p.backoff) p.max_backoff = p.backoff;
  return p;
}

// The keys every process section shares (program, args, env, workdir, restart).
void parse_process(const reader& r, const YAML::Node& node, const std::string& path,
                   process_spec& out) {
  out.where = r.where(path);
  out.workdir = r.dir();
  if (node.IsNull()) return;
  if (node["program"]) {
    out.program = r.nonempty_string(node["program"], reader::join(path, "program"));
    // A path (not a bare name) is relative to the deployment file.
    if (out.program.find('/') != std::string::npos) out.program = r.path_in_dir(out.program);
  }
  if (node["args"]) out.args = r.strings(node["args"], reader::join(path, "args"));
  if (node["env"]) out.env = r.string_map(node["env"], reader::join(path, "env"));
  if (node["workdir"]) {
    out.workdir = r.path_in_dir(r.nonempty_string(node["workdir"], reader::join(path, "workdir")));
  }
  if (node["restart"])
    out.restart = parse_restart(r, node["restart"], reader::join(path, "restart"));
}

void check_endpoint(const reader& r, const YAML::Node& node, const std::string& path,
                    const std::string& endpoint) {
  const auto sep = endpoint.find("://");
  if (sep == std::string::npos || sep == 0 || sep + 3 >= endpoint.size()) {
    r.fail(node, path,
           "'" + endpoint +
               "' is not a ZeroMQ endpoint (e.g. tcp://127.0.0.1:5555, "
               "tcp://127.0.0.1:* for a free port, ipc:///tmp/ensemble.sock)");
  }
}

bool valid_name(const std::string& name) {
  return !name.empty() && name.size() <= 64 &&
         std::all_of(name.begin(), name.end(), [](unsigned char c) {
           return std::isalnum(c) != 0 || c == '-' || c == '_' || c == '.';
         });
}

}  // namespace

deployment parse_deployment(const std::string& yaml, const std::string& file) {
  const fs::path file_path = fs::absolute(file).lexically_normal();
  deployment d;
  d.file = file_path.string();
  d.dir = file_path.parent_path().string();
  reader r(file, d.dir);

  YAML::Node loaded;
  try {
    loaded = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    std::string what = "not valid YAML: " + e.msg;
    if (e.mark.line >= 0) {
      what += " (line " + std::to_string(e.mark.line + 1) + ", column " +
              std::to_string(e.mark.column + 1) + ")";
    }
    throw common::config_error(file, what);
  }
  const YAML::Node root = loaded;  // const: lookups of absent keys must not add them
  if (!root || root.IsNull()) {
    throw common::config_error(file,
                               "the deployment is empty (expected a map with broker, "
                               "orchestrator and agents)");
  }
  r.expect_map(root, "", {"broker", "orchestrator", "agents"});

  // broker
  d.broker.program = "ensemble-broker";
  if (const auto b = root["broker"]) {
    r.expect_map(b, "broker", {"router", "events", "program", "args", "env", "workdir", "restart"});
    parse_process(r, b, "broker", d.broker);
    if (b["router"]) {
      d.broker.router = r.nonempty_string(b["router"], "broker.router");
      check_endpoint(r, b["router"], "broker.router", d.broker.router);
    }
    if (b["events"]) {
      d.broker.events = r.nonempty_string(b["events"], "broker.events");
      check_endpoint(r, b["events"], "broker.events", d.broker.events);
    }
  } else {
    parse_process(r, YAML::Node(), "broker", d.broker);
  }
  if (d.broker.router == d.broker.events && d.broker.router.find('*') == std::string::npos) {
    r.fail(root["broker"], "broker.events", "must differ from broker.router");
  }

  // orchestrator
  if (const auto o = root["orchestrator"]) {
    r.expect_map(o, "orchestrator",
                 {"store", "workflows", "program", "args", "env", "workdir", "restart"});
    orchestrator_section os;
    os.program = "ensemble-orchestrator";
    parse_process(r, o, "orchestrator", os);
    if (o["store"]) {
      os.store = r.nonempty_string(o["store"], "orchestrator.store");
      if (os.store != ":memory:") os.store = r.path_in_dir(os.store);
    }
    if (o["workflows"]) {
      // One path or a list of paths.
      auto list = o["workflows"].IsScalar()
                      ? std::vector<std::string>{r.string(o["workflows"], "orchestrator.workflows")}
                      : r.strings(o["workflows"], "orchestrator.workflows");
      for (std::size_t i = 0; i < list.size(); ++i) {
        if (list[i].empty()) {
          r.fail(o["workflows"], reader::index("orchestrator.workflows", i), "must not be empty");
        }
        os.workflows.push_back(r.path_in_dir(list[i]));
      }
    }
    d.orchestrator = std::move(os);
  }

  // agents
  std::set<std::string> names{"broker", "orchestrator"};
  if (const auto agents = root["agents"]) {
    if (!agents.IsNull() && !agents.IsSequence()) {
      r.fail(agents, "agents", "expected a list of agents, found " + reader::kind(agents));
    }
    for (std::size_t i = 0; i < agents.size(); ++i) {
      const auto node = agents[i];
      const auto path = reader::index("agents", i);
      r.expect_map(node, path,
                   {"name", "program", "spec", "args", "env", "workdir", "replicas", "services",
                    "ready_line", "restart"});
      if (node.IsNull()) r.fail(node, path, "an agent needs at least a name and a program or spec");
      agent_section a;
      if (!node["name"]) r.fail(node, path, "missing key 'name'");
      a.name = r.nonempty_string(node["name"], reader::join(path, "name"));
      if (!valid_name(a.name)) {
        r.fail(node["name"], reader::join(path, "name"),
               "'" + a.name + "' is not a valid name (letters, digits, '-', '_', '.'; at most 64)");
      }
      parse_process(r, node, path, a);
      if (node["spec"]) {
        if (node["program"]) {
          r.fail(node["spec"], reader::join(path, "spec"),
                 "give either 'program' or 'spec' (a scriptable agent), not both");
        }
        a.spec = r.path_in_dir(r.nonempty_string(node["spec"], reader::join(path, "spec")));
      } else if (!node["program"]) {
        r.fail(node, path, "agent '" + a.name + "' needs 'program' or 'spec'");
      }
      if (node["replicas"]) {
        a.replicas = r.integer(node["replicas"], reader::join(path, "replicas"), 1, k_max_replicas);
      }
      if (node["services"]) {
        a.services = r.strings(node["services"], reader::join(path, "services"));
        for (std::size_t s = 0; s < a.services.size(); ++s) {
          if (a.services[s].empty()) {
            r.fail(node["services"][s], reader::index(reader::join(path, "services"), s),
                   "must not be empty");
          }
        }
      }
      if (node["ready_line"]) {
        a.ready_line = r.nonempty_string(node["ready_line"], reader::join(path, "ready_line"));
      }
      for (const auto& n : replica_names(a)) {
        if (!names.insert(n).second) {
          r.fail(node["name"], reader::join(path, "name"),
                 "the name '" + n + "' is already taken" +
                     (n == "broker" || n == "orchestrator" ? " (reserved)" : "") +
                     "; every process needs its own name");
        }
      }
      d.agents.push_back(std::move(a));
    }
  }
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
  const std::string& r = values["broker"];
  const std::string& e = values["events"];

  exec_plan p;
  p.path = c.program;
  p.workdir = s.workdir;
  p.argv.push_back(c.program);
  switch (c.kind) {
    case process_role::broker:
      p.argv.insert(p.argv.end(), {"--router", r, "--events", e});
      break;
    case process_role::orchestrator:
      p.argv.insert(p.argv.end(), {"--broker", r, "--events", e, "--store", d.orchestrator->store});
      for (const auto& w : d.orchestrator->workflows)
        p.argv.insert(p.argv.end(), {"--workflows", w});
      break;
    case process_role::agent:
      if (!c.extra.empty()) {
        // The scriptable agent: `ensemble --broker B --events E agent SPEC [args]`.
        p.argv.insert(p.argv.end(), {"--broker", r, "--events", e});
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
  for (const auto& [k, v] : s.env) env[k] = substitute(v, values);
  for (const auto& [k, v] : env) p.env.push_back(k + "=" + v);
  return p;
}

}  // namespace ensemble::cli
