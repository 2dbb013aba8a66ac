#include "ensemble/testkit/deployment.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <stdexcept>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/common/curve_keys.hpp"
#include "ensemble/common/ids.hpp"
#include "ensemble/common/result.hpp"
#include "own_agent.hpp"

namespace ensemble::testkit {

namespace {

using detail::left_until;
using steady = std::chrono::steady_clock;
using json = nlohmann::json;
using namespace std::chrono_literals;

constexpr auto k_services_poll = 20ms;  // while waiting for registrations
constexpr auto k_probe_call = 2s;

std::string make_temp_dir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "ensemble-testkit-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) {
    throw std::runtime_error("deployment: cannot create a temp dir " + tmpl);
  }
  return tmpl;
}

process_options options_of(const cli::exec_plan& plan, const std::string& name) {
  process_options o;
  o.program = plan.path;
  o.args.assign(plan.argv.begin() + (plan.argv.empty() ? 0 : 1), plan.argv.end());
  for (const auto& kv : plan.env) {
    const auto eq = kv.find('=');
    if (eq != std::string::npos) o.env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  o.working_dir = plan.workdir;
  o.name = name;
  return o;
}

}  // namespace

struct deployment::impl {
  struct member {
    cli::planned_process plan;
    std::unique_ptr<process> proc;
    std::unique_ptr<fault_proxy> proxy;
  };

  deployment_options opts;
  cli::deployment model;
  std::string dir;
  std::set<std::string> proxied;
  std::vector<member> members;  // in start order; planned by start()
  std::string router, events;
  std::unique_ptr<agent::agent> probe;  // asks the broker which services are registered
  bool started = false;

  ~impl() {
    teardown();
    std::error_code ec;
    if (!dir.empty()) std::filesystem::remove_all(dir, ec);
  }

  member& find(const std::string& name) {
    for (auto& m : members) {
      if (m.plan.name == name) return m;
    }
    std::string known;
    for (const auto& m : members) known += (known.empty() ? "" : ", ") + m.plan.name;
    throw std::invalid_argument("deployment: no process named '" + name + "' (processes: " +
                                (known.empty() ? "none; start() first" : known) + ")");
  }

  // Service name -> registered workers, from the broker's own service.
  common::result<std::map<std::string, std::size_t>> registered() {
    auto r =
        probe->call("broker", "services", agent::to_json_payload(json::object()), k_probe_call);
    if (!r) return r.err();
    auto body = agent::from_json_payload(r->payload());
    if (!body) return body.err();
    std::map<std::string, std::size_t> out;
    for (const auto& s : body->value("services", json::array())) {
      out[s.value("service", "")] = s.value("workers", json::array()).size();
    }
    return out;
  }

  // What `m` still lacks to be ready ("" when ready): its ready line, and its services
  // registered as often as the members started so far offer them.
  std::string missing(const member& m) {
    if (!m.proc->running()) {
      auto code = m.proc->wait_exit(0ms);
      return "exited" + (code ? " with " + std::to_string(*code) : std::string());
    }
    if (!m.plan.ready_text.empty() &&
        m.proc->wait_for_line(m.plan.ready_text, 0ms) == std::nullopt) {
      return "no line containing \"" + m.plan.ready_text + "\" yet";
    }
    if (m.plan.kind != cli::process_role::agent || m.plan.services.empty()) return {};
    std::map<std::string, std::size_t> need;
    for (const auto& other : members) {
      if (!other.proc || other.plan.kind != cli::process_role::agent) continue;
      for (const auto& s : other.plan.services) ++need[s];
    }
    auto have = registered();
    if (!have) return "the broker does not answer: " + have.err().to_string();
    std::string lacking;
    for (const auto& s : m.plan.services) {
      const auto it = have->find(s);
      if (it == have->end() || it->second < need[s]) {
        lacking += (lacking.empty() ? "" : ", ") + s;
      }
    }
    return lacking.empty() ? std::string()
                           : "service(s) not registered with the broker: " + lacking;
  }

  void wait_ready(member& m, steady::time_point until) {
    std::string why;
    wait_until([&] { return (why = missing(m)).empty() || !m.proc->running(); }, left_until(until),
               k_services_poll);
    if (why.empty()) return;
    why = missing(m);  // again: the process may have exited since it was last asked
    if (why.empty()) return;
    throw std::runtime_error("deployment: " + m.plan.name + " is not ready: " + why + "\n" +
                             m.proc->tail(opts.log_lines));
  }

  void launch(member& m) {
    std::string r = router;
    std::string e = events;
    if (proxied.count(m.plan.name) != 0) {
      if (!m.proxy) m.proxy = fault_proxy::start(router, events);
      r = m.proxy->router();
      e = m.proxy->events();
    }
    m.proc = process::spawn(options_of(cli::command_for(m.plan, model, r, e), m.plan.name));
  }

  void launch_broker_member(member& m, const std::string& want_router,
                            const std::string& want_events, steady::time_point until) {
    auto launched = testkit::launch_broker(
        [&](const std::string& r, const std::string& e) {
          return options_of(cli::command_for(m.plan, model, r, e), m.plan.name);
        },
        want_router, want_events, left_until(until));
    m.proc = std::move(launched.proc);
    router = std::move(launched.router);
    events = std::move(launched.events);
  }

  void teardown() {
    probe.reset();
    // Agents, then the orchestrator, then the broker, as `ensemble up` stops them.
    for (auto role :
         {cli::process_role::agent, cli::process_role::orchestrator, cli::process_role::broker}) {
      std::vector<member*> group;
      for (auto& m : members) {
        if (m.plan.kind == role && m.proc && m.proc->running()) {
          m.proc->signal(SIGTERM);
          group.push_back(&m);
        }
      }
      const auto until = steady::now() + opts.stop_grace;
      for (auto* m : group) {
        if (!m->proc->wait_exit(left_until(until))) {
          m->proc->kill();
          (void)m->proc->wait_exit(5s);
        }
      }
    }
    for (auto& m : members) m.proxy.reset();
  }

  std::string logs(std::size_t lines) const {
    std::ostringstream out;
    for (const auto& m : members) {
      if (!m.proc) continue;
      out << "----- " << m.plan.name << " (pid " << m.proc->pid() << "), last lines:\n"
          << m.proc->tail(lines);
      if (m.proxy) {
        const auto c = m.proxy->stats();
        out << "  (fault proxy: forwarded " << c.forwarded << ", dropped " << c.dropped
            << ", duplicated " << c.duplicated << ", delayed " << c.delayed << ")\n";
      }
    }
    return out.str();
  }
};

deployment::deployment(deployment_options opts) : impl_(std::make_unique<impl>()) {
  impl_->opts = opts;
  impl_->dir = make_temp_dir();
  impl_->model.dir = impl_->dir;
  impl_->model.file = impl_->dir + "/deployment (built in code)";
  impl_->model.broker.program = "ensemble-broker";
  impl_->model.broker.where = "broker";
}

deployment deployment::from_file(const std::string& path, deployment_options opts) {
  deployment d(opts);
  d.impl_->model = cli::load_deployment(path);
  return d;
}

deployment::~deployment() {
  if (!impl_) return;
  const auto* unit = ::testing::UnitTest::GetInstance();
  const bool failed = unit->current_test_info() != nullptr ? ::testing::Test::HasFailure()
                                                           : unit->failed_test_count() > 0;
  if (failed && !impl_->members.empty()) {
    std::cerr << "deployment " << impl_->dir << ": the test failed; each process's log:\n"
              << impl_->logs(impl_->opts.log_lines) << std::flush;
  }
}

deployment::deployment(deployment&&) noexcept = default;
deployment& deployment::operator=(deployment&&) noexcept = default;

cli::deployment& deployment::model() {
  if (impl_->started) throw std::logic_error("deployment: model() after start()");
  return impl_->model;
}

deployment& deployment::broker_args(std::vector<std::string> args) {
  auto& a = model().broker.args;
  a.insert(a.end(), args.begin(), args.end());
  return *this;
}

deployment& deployment::orchestrator(std::vector<std::string> workflows, std::string store) {
  cli::orchestrator_section o;
  o.program = "ensemble-orchestrator";
  o.where = "orchestrator";
  o.workflows = std::move(workflows);
  o.store = store == "file" ? impl_->dir + "/orchestrator.db" : std::move(store);
  model().orchestrator = std::move(o);
  return *this;
}

deployment& deployment::agent(const std::string& name, const std::string& program,
                              std::vector<std::string> args, std::vector<std::string> services,
                              int replicas, std::string ready_line) {
  cli::agent_section a;
  a.name = name;
  a.program = program;
  a.args = std::move(args);
  a.services = std::move(services);
  a.replicas = replicas;
  a.ready_line = std::move(ready_line);
  a.where = "agents." + name;
  model().agents.push_back(std::move(a));
  return *this;
}

deployment& deployment::scriptable_agent(const std::string& name, const std::string& spec,
                                         int replicas) {
  std::error_code ec;
  std::string path = spec;
  if (!std::filesystem::is_regular_file(spec, ec)) {
    path = impl_->dir + "/" + name + ".agent.yaml";
    std::ofstream(path) << spec;
  }
  cli::agent_section a;
  a.name = name;
  a.spec = path;
  a.replicas = replicas;
  a.where = "agents." + name;
  model().agents.push_back(std::move(a));
  return *this;
}

common::result<json> deployment::advance(std::chrono::milliseconds by,
                                         std::chrono::milliseconds deadline) {
  if (!impl_->started || !impl_->probe)
    throw std::logic_error("deployment: advance() before start()");
  auto r = impl_->probe->call("orchestrator", "advance",
                              agent::to_json_payload(json{{"by_ms", by.count()}}), deadline);
  if (!r) return r.err();
  return agent::from_json_payload(r->payload());
}

deployment& deployment::identity(const std::string& name, cli::rights r) {
  model().security.identities[name] = std::move(r);
  return *this;
}

bool deployment::secured() const {
  return impl_->model.security.kind == cli::security_section::mode::curve;
}

agent::options deployment::connect_as(const std::string& identity) const {
  if (!impl_->started) throw std::logic_error("deployment: connect_as() before start()");
  agent::options o;
  o.broker = impl_->router;
  o.events = impl_->events;
  o.name = identity;
  if (secured()) {
    const auto& keys = impl_->model.keys;
    const auto it = keys.secret_files.find(identity);
    if (it == keys.secret_files.end()) {
      std::string known;
      for (const auto& [name, file] : keys.secret_files)
        known += (known.empty() ? "" : ", ") + name;
      throw std::invalid_argument("deployment: no identity '" + identity +
                                  "' (identities: " + known + ")");
    }
    o.key_file = it->second;
    o.broker_key = keys.broker_public;
  }
  return o;
}

agent::options deployment::connect_as_stranger() const {
  auto o = connect_as();
  o.name = "stranger";
  if (secured()) {
    auto keys = common::generate_curve_keys();
    keys.name = "stranger-" + common::random_id().substr(0, 8);
    o.key_file =
        common::write_curve_key_files(impl_->dir + "/strangers", keys.name, keys).secret_file;
  }
  return o;
}

deployment& deployment::through_proxy(const std::string& name) {
  if (impl_->started) throw std::logic_error("deployment: through_proxy() after start()");
  impl_->proxied.insert(name);
  return *this;
}

void deployment::start() {
  auto& d = *impl_;
  if (d.started) throw std::logic_error("deployment: start() twice");
  d.started = true;
  const auto until = steady::now() + d.opts.ready_timeout;

  auto& broker = d.model.broker;
  if (d.opts.transport == transport::ipc) {
    broker.router = "ipc://" + d.dir + "/router";
    broker.events = "ipc://" + d.dir + "/events";
  } else {
    broker.router = "tcp://127.0.0.1:*";
    broker.events = "tcp://127.0.0.1:*";
  }
  // Durable streams (a file's `streams:` or `broker.data`) are stored in this deployment's own
  // temporary directory, never beside the file: two tests of one file must not share a data
  // directory (the broker locks it), and a test starts from empty streams.
  if (!d.model.streams.empty() || !broker.data.empty()) broker.data = d.dir + "/data";
  if (!d.model.streams.empty()) {
    broker.streams_file = d.dir + "/streams.json";
    cli::write_streams_file(d.model, broker.streams_file);
  }
  if (d.opts.virtual_clock && d.model.orchestrator) d.model.orchestrator->clock = "virtual";
  auto plan = cli::plan_processes(d.model, binary_path("ensemble"));
  if (d.opts.secured) d.model.security.kind = cli::security_section::mode::curve;
  // Keys live in the deployment's temp dir, never beside a file: a test starts from its own.
  d.model.security.keys_dir = d.dir + "/keys";
  cli::prepare_security(d.model, plan);
  for (auto& p : plan) d.members.push_back({std::move(p), nullptr, nullptr});
  for (const auto& name : d.proxied) (void)d.find(name);  // a typo fails here, by name

  try {
    d.launch_broker_member(d.members.front(), broker.router, broker.events, until);
    agent::options probe;
    probe.broker = d.router;
    probe.events = d.events;
    if (secured()) probe = connect_as();  // the probe asks broker.services: admin rights
    d.probe = detail::start_own_agent("probe", probe, left_until(until));
    // The orchestrator before the agents (it must not miss their first events), each group
    // started together and then awaited.
    for (auto role : {cli::process_role::orchestrator, cli::process_role::agent}) {
      for (auto& m : d.members) {
        if (m.plan.kind == role) d.launch(m);
      }
      for (auto& m : d.members) {
        if (m.plan.kind == role) d.wait_ready(m, until);
      }
    }
  } catch (const std::exception& e) {
    const std::string logs = d.logs(d.opts.log_lines);
    d.teardown();
    throw std::runtime_error(std::string(e.what()) + "\nlogs:\n" + logs);
  }
}

void deployment::stop() {
  impl_->teardown();
}

const std::string& deployment::router() const {
  return impl_->router;
}
const std::string& deployment::events() const {
  return impl_->events;
}
const std::string& deployment::dir() const {
  return impl_->dir;
}

std::vector<std::string> deployment::names() const {
  std::vector<std::string> out;
  for (const auto& m : impl_->members) out.push_back(m.plan.name);
  return out;
}

process& deployment::proc(const std::string& name) {
  auto& m = impl_->find(name);
  if (!m.proc) throw std::logic_error("deployment: " + name + " was never started");
  return *m.proc;
}

fault_proxy& deployment::proxy(const std::string& name) {
  auto& m = impl_->find(name);
  if (!m.proxy) {
    throw std::logic_error("deployment: " + name +
                           " has no fault proxy (through_proxy() before start())");
  }
  return *m.proxy;
}

void deployment::kill(const std::string& name) {
  auto& p = proc(name);
  p.kill();
  if (!p.wait_exit(10s)) throw std::runtime_error("deployment: " + name + " survived SIGKILL");
}

void deployment::pause(const std::string& name) {
  if (!proc(name).stop(10s)) {
    throw std::runtime_error("deployment: " + name + " did not stop within 10 s of SIGSTOP (" +
                             (proc(name).running() ? "still running" : "not running") + ")");
  }
}

void deployment::resume(const std::string& name) {
  if (!proc(name).resume(10s)) {
    throw std::runtime_error("deployment: " + name + " did not continue within 10 s of SIGCONT (" +
                             (proc(name).running() ? "still stopped" : "not running") + ")");
  }
}

void deployment::restart(const std::string& name, bool wait_ready) {
  auto& d = *impl_;
  auto& m = d.find(name);
  const auto until = steady::now() + d.opts.ready_timeout;
  if (m.proc && m.proc->running()) kill(name);
  if (m.plan.kind == cli::process_role::broker) {
    d.launch_broker_member(m, d.router, d.events, until);  // the same endpoints: peers come back
    return;
  }
  d.launch(m);
  if (wait_ready) d.wait_ready(m, until);
}

std::string deployment::logs(std::size_t lines) const {
  return impl_->logs(lines);
}

}  // namespace ensemble::testkit
