// `ensemble up`: the deployment file parser, and the real launcher run as a process against
// real brokers, orchestrators and test workers — readiness, the table, calls through the
// reported endpoint, ordered shutdown, no orphans (also when `up` is SIGKILLed), restarts,
// and the errors: endpoint in use, bad file, program not found, agent dying at start-up,
// readiness timeout.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/cli/deployment.hpp"
#include "ensemble/common/result.hpp"
#include "ensemble/testkit/process.hpp"
#include "support/deployment_cases.hpp"

namespace {

namespace fs = std::filesystem;
namespace tk = ensemble::testkit;
namespace ea = ensemble::agent;
namespace ec = ensemble::cli;
using namespace std::chrono_literals;

constexpr auto k_ready_deadline = 30s;
constexpr auto k_exit_deadline = 30s;
constexpr std::string_view k_ready = "ensemble up: ready ";

// Alive means running: a zombie waiting for its parent (or init) to reap it is dead.
bool alive(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return false;
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  const auto close = text.rfind(')');
  if (close == std::string::npos || close + 2 >= text.size()) return false;
  const char state = text[close + 2];
  return state != 'Z' && state != 'X';
}

std::string worker_agent(const std::string& name, const std::string& service,
                         const std::string& extra = "") {
  return "  - name: " + name +
         "\n"
         "    program: ensemble-test-worker\n"
         "    args: [--broker, '{broker}', --events, '{events}', --name, '{name}', --service, " +
         service + "]\n" + extra;
}

class up_test : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "ensemble-up-XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    up_.reset();
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }

  void write(const std::string& yaml, const std::string& name = "deployment.yaml") {
    std::ofstream(dir_ / name) << yaml;
  }

  // Starts `ensemble up DIR` (or the given arguments) without waiting.
  std::unique_ptr<tk::process> launch(std::vector<std::string> args = {}) {
    if (args.empty()) args = {"up", dir_.string(), "--no-color", "--timeout", "30s"};
    return tk::process::spawn({tk::binary_path("ensemble"), args, {}, {}, "ensemble-up"});
  }

  // Starts `up` and waits for its ready line; fills router_, events_ and pids_ from it and the
  // table printed before it.
  void start_up() {
    up_ = launch();
    const auto line = up_->wait_for_line(k_ready, k_ready_deadline);
    ASSERT_TRUE(line) << up_->tail(60);
    std::istringstream words(line->substr(line->find(k_ready) + k_ready.size()));
    std::string word;
    while (words >> word) {
      if (word.rfind("router=", 0) == 0) router_ = word.substr(7);
      if (word.rfind("events=", 0) == 0) events_ = word.substr(7);
    }
    ASSERT_FALSE(router_.empty()) << *line;
    ASSERT_FALSE(events_.empty()) << *line;
    bool in_table = false;
    for (const auto& l : up_->lines()) {
      if (l.rfind("NAME ", 0) == 0) {
        in_table = true;
        continue;
      }
      if (l.find(k_ready) != std::string::npos) break;
      if (!in_table) continue;
      std::istringstream row(l);
      std::string name;
      pid_t pid = 0;
      row >> name >> pid;
      pids_[name] = pid;
    }
    ASSERT_FALSE(pids_.empty()) << up_->tail(60);
  }

  std::unique_ptr<ea::agent> client() {
    auto c = std::make_unique<ea::agent>(
        ea::options{.name = "up-test-client", .broker = router_, .events = events_});
    auto started = c->start();
    EXPECT_TRUE(started) << (started ? "" : started.err().to_string());
    return c;
  }

  // Runs `up` to its exit and returns the exit code; the output stays in `up_`.
  int run_to_exit(std::vector<std::string> args = {}) {
    up_ = launch(std::move(args));
    const auto code = up_->wait_exit(k_exit_deadline);
    EXPECT_TRUE(code) << "ensemble up did not exit:\n" << up_->tail(60);
    drain();
    return code.value_or(-1000);
  }

  // Once `up` has exited: waits until its output has been read to the end (the reader thread
  // may still be behind), so that what the test checks is everything it printed.
  void drain() { (void)up_->wait_for_line("\x01 no such line \x01", 10s); }

  std::string output() const {
    std::string all;
    for (const auto& l : up_->lines()) all += l + "\n";
    return all;
  }

  // Index of the first output line containing `text`, or -1.
  int line_index(const std::string& text) const {
    const auto lines = up_->lines();
    for (std::size_t i = 0; i < lines.size(); ++i) {
      if (lines[i].find(text) != std::string::npos) return static_cast<int>(i);
    }
    return -1;
  }

  fs::path dir_;
  std::unique_ptr<tk::process> up_;
  std::string router_;
  std::string events_;
  std::map<std::string, pid_t> pids_;
};

const std::string k_ephemeral_broker =
    "broker:\n"
    "  router: tcp://127.0.0.1:*\n"
    "  events: tcp://127.0.0.1:*\n";

// ----- the deployment file

TEST(deployment_file, parses_sections_and_resolves_paths_against_its_directory) {
  const auto d = ec::parse_deployment(
      "broker: {router: 'tcp://127.0.0.1:*', events: 'tcp://127.0.0.1:*', args: [--heartbeat, "
      "'200']}\n"
      "orchestrator: {store: state.db, workflows: [flows/, /abs/one.json]}\n"
      "agents:\n"
      "  - name: payments\n"
      "    program: ../bin/payments-agent\n"
      "    args: ['--broker', '{broker}']\n"
      "    env: {MODE: fast}\n"
      "    replicas: 2\n"
      "    services: [PaymentService]\n"
      "    restart: {policy: on-failure, backoff: 250ms, max_restarts: 3}\n"
      "  - name: cart\n"
      "    spec: agents/cart.yaml\n"
      "    workdir: work\n"
      "    restart: on-failure\n",
      "/deploy/site/deployment.yaml");
  EXPECT_EQ(d.dir, "/deploy/site");
  EXPECT_EQ(d.broker.router, "tcp://127.0.0.1:*");
  EXPECT_EQ(d.broker.program, "ensemble-broker");
  EXPECT_EQ(d.broker.args, (std::vector<std::string>{"--heartbeat", "200"}));
  ASSERT_TRUE(d.orchestrator);
  EXPECT_EQ(d.orchestrator->store, "/deploy/site/state.db");
  EXPECT_EQ(d.orchestrator->workflows,
            (std::vector<std::string>{"/deploy/site/flows/", "/abs/one.json"}));
  ASSERT_EQ(d.agents.size(), 2u);
  const auto& p = d.agents[0];
  EXPECT_EQ(p.program, "/deploy/bin/payments-agent");
  EXPECT_EQ(p.workdir, "/deploy/site");
  EXPECT_EQ(p.env.at("MODE"), "fast");
  EXPECT_EQ(ec::replica_names(p), (std::vector<std::string>{"payments-1", "payments-2"}));
  EXPECT_EQ(p.restart.when, ec::restart_policy::mode::on_failure);
  EXPECT_EQ(p.restart.backoff, 250ms);
  EXPECT_EQ(p.restart.max_restarts, 3);
  const auto& c = d.agents[1];
  EXPECT_EQ(c.spec, "/deploy/site/agents/cart.yaml");
  EXPECT_TRUE(c.program.empty());
  EXPECT_EQ(c.workdir, "/deploy/site/work");
  EXPECT_EQ(ec::replica_names(c), (std::vector<std::string>{"cart"}));
  EXPECT_EQ(c.restart.when, ec::restart_policy::mode::on_failure);
}

TEST(deployment_file, defaults) {
  const auto d = ec::parse_deployment("agents: []\n", "/x/deployment.yaml");
  EXPECT_EQ(d.broker.router, "tcp://127.0.0.1:5555");
  EXPECT_EQ(d.broker.events, "tcp://127.0.0.1:5556");
  EXPECT_FALSE(d.orchestrator);
  EXPECT_TRUE(d.agents.empty());
}

TEST(deployment_file, errors_name_the_file_and_the_yaml_path) {
  const std::vector<ensemble::test::refused_deployment> cases = {
      {"agents:\n  - name: a\n    program: x\n    replica: 2\n", "d.yaml: agents[0].replica",
       "unknown key"},
      {"agents:\n  - name: a\n    program: x\n    replicas: many\n", "d.yaml: agents[0].replicas",
       "must be an integer from 1 to 100, got \"many\""},
      {"agents:\n  - name: a\n    program: x\n    restart: {policy: always}\n",
       "d.yaml: agents[0].restart.policy", "unknown restart policy"},
      {"agents:\n  - name: a\n    program: x\n    restart: {backoff: soon}\n",
       "d.yaml: agents[0].restart.backoff", "not a duration"},
      {"agents:\n  - name: a\n", "d.yaml: agents[0]", "needs \"program\" or \"spec\""},
      {"agents:\n  - name: a\n    program: x\n  - name: a\n    program: y\n",
       "d.yaml: agents[1].name", "already taken"},
      {"brokr: {}\n", "d.yaml: brokr", "unknown key"},
      {"broker: {router: nowhere}\n", "d.yaml: broker.router", "not a ZeroMQ endpoint"},
      {"agents: [\n", "d.yaml", "invalid YAML"},
      {"agents:\n  - name: a\n    program: x\n    args: [--broker, {broker}]\n",
       "d.yaml: agents[0].args[1]", "write placeholders in quotes: \"{broker}\""},
  };
  ensemble::test::expect_each_refused(cases);
}

TEST(deployment_file, substitutes_known_placeholders_only) {
  EXPECT_EQ(ec::substitute("{broker}/{name}/{other}/{", {{"broker", "b"}, {"name", "n"}}),
            "b/n/{other}/{");
}

// ----- the launcher

TEST_F(up_test, starts_reports_ready_serves_calls_and_stops_in_order_on_sigterm) {
  write(k_ephemeral_broker +
        "orchestrator: {}\n"
        "agents:\n" +
        worker_agent("echo", "Echo", "    replicas: 2\n    services: [Echo]\n"));
  start_up();
  ASSERT_EQ(pids_.size(), 4u) << up_->tail(60);
  for (const auto* name : {"broker", "orchestrator", "echo-1", "echo-2"}) {
    ASSERT_TRUE(pids_.count(name)) << name << "\n" << up_->tail(60);
    EXPECT_TRUE(alive(pids_[name])) << name;
  }

  // Through the reported endpoint, the agents serve and the orchestrator answers.
  auto c = client();
  std::set<std::string> workers;
  for (int i = 0; i < 4; ++i) {
    auto reply = c->call("Echo", "hello", ea::to_json_payload({{"i", i}}), 5s);
    ASSERT_TRUE(reply) << reply.err().to_string();
    auto body = ea::from_json_payload(reply->payload());
    ASSERT_TRUE(body);
    workers.insert((*body)["worker"].get<std::string>());
  }
  EXPECT_EQ(workers, (std::set<std::string>{"echo-1", "echo-2"}));
  auto definitions =
      c->call("orchestrator", "definitions", ea::to_json_payload(nlohmann::json::object()), 5s);
  EXPECT_TRUE(definitions) << definitions.err().to_string();
  c->stop();

  up_->signal(SIGTERM);
  const auto code = up_->wait_exit(k_exit_deadline);
  ASSERT_TRUE(code) << up_->tail(60);
  drain();
  EXPECT_EQ(*code, 0) << up_->tail(60);
  for (const auto& [name, pid] : pids_) EXPECT_FALSE(alive(pid)) << name << " survived";
  // Agents first, then the orchestrator, then the broker.
  const int agents = line_index("stopping echo-1");
  const int orchestrator = line_index("stopping orchestrator");
  const int broker = line_index("stopping broker");
  EXPECT_GE(agents, 0) << output();
  EXPECT_LT(agents, orchestrator) << output();
  EXPECT_LT(orchestrator, broker) << output();
  EXPECT_GE(line_index("ensemble up: stopped"), 0) << output();
}

TEST_F(up_test, runs_scriptable_agents_and_the_orchestrator_with_its_workflows) {
  write(
      "services:\n"
      "  Greeter:\n"
      "    actions:\n"
      "      hello:\n"
      "        reply: {greeting: hi}\n",
      "greeter.yaml");
  fs::create_directory(dir_ / "flows");
  write(R"({"workflow": {"name": "Greet", "steps": [)"
        R"({"name": "Hello", "service": "Greeter", "action": "hello"}]}})",
        "flows/greet.json");
  write(k_ephemeral_broker +
        "orchestrator: {store: state.db, workflows: [flows/]}\n"
        "agents:\n"
        "  - name: greeter\n"
        "    spec: greeter.yaml\n"
        "    replicas: 2\n");
  start_up();
  ASSERT_TRUE(pids_.count("greeter-1") && pids_.count("greeter-2")) << up_->tail(60);
  // The services come from the spec: the table shows them.
  EXPECT_GE(line_index("Greeter"), 0) << output();
  EXPECT_GE(line_index("ensemble-agent ready name=greeter-2 services=Greeter"), 0) << output();
  EXPECT_TRUE(fs::exists(dir_ / "state.db"));

  auto c = client();
  auto reply = c->call("Greeter", "hello", ea::to_json_payload(nlohmann::json::object()), 5s);
  ASSERT_TRUE(reply) << reply.err().to_string();
  EXPECT_EQ((*ea::from_json_payload(reply->payload()))["greeting"], "hi");
  auto definitions =
      c->call("orchestrator", "definitions", ea::to_json_payload(nlohmann::json::object()), 5s);
  ASSERT_TRUE(definitions) << definitions.err().to_string();
  EXPECT_NE(ea::from_json_payload(definitions->payload())->dump().find("Greet"), std::string::npos);
  c->stop();

  up_->signal(SIGINT);
  const auto code = up_->wait_exit(k_exit_deadline);
  ASSERT_TRUE(code) << up_->tail(60);
  drain();
  EXPECT_EQ(*code, 0) << up_->tail(60);
  for (const auto& [name, pid] : pids_) EXPECT_FALSE(alive(pid)) << name << " survived";
}

TEST_F(up_test, invalid_agent_spec_is_reported_before_anything_starts) {
  write("services: {Greeter: {actions: {hello: {replay: 1}}}}\n", "greeter.yaml");
  write(k_ephemeral_broker + "agents:\n  - name: greeter\n    spec: greeter.yaml\n");
  EXPECT_EQ(run_to_exit(), 2);
  const auto out = output();
  EXPECT_NE(out.find("deployment.yaml: agents[0].spec: "), std::string::npos) << out;
  EXPECT_NE(out.find("replay"), std::string::npos) << out;
  EXPECT_EQ(line_index("broker |"), -1) << "nothing should start:\n" << out;
}

TEST_F(up_test, sigkill_of_up_leaves_no_orphans) {
  write(k_ephemeral_broker + "orchestrator: {}\nagents:\n" +
        worker_agent("echo", "Echo", "    replicas: 2\n    services: [Echo]\n"));
  start_up();
  ASSERT_EQ(pids_.size(), 4u) << up_->tail(60);
  up_->kill();
  ASSERT_TRUE(up_->wait_exit(k_exit_deadline));
  for (const auto& [name, pid] : pids_) {
    EXPECT_TRUE(tk::wait_until([pid = pid] { return !alive(pid); }, 10s, 10ms))
        << name << " (pid " << pid << ") outlived ensemble up";
  }
}

TEST_F(up_test, on_failure_restarts_a_crashed_agent_and_never_leaves_it_down) {
  write(k_ephemeral_broker + "agents:\n" +
        worker_agent("echo", "Echo",
                     "    services: [Echo]\n"
                     "    restart: {policy: on-failure, backoff: 50ms, max_restarts: 3}\n") +
        worker_agent("fragile", "Fragile", "    services: [Fragile]\n    restart: never\n"));
  start_up();
  ASSERT_TRUE(pids_.count("echo") && pids_.count("fragile")) << up_->tail(60);
  const pid_t old_pid = pids_["echo"];

  ASSERT_EQ(::kill(old_pid, SIGKILL), 0);
  const auto restarted = up_->wait_for_line("echo restarted pid=", 20s);
  ASSERT_TRUE(restarted) << up_->tail(60);
  const pid_t new_pid = std::stoi(restarted->substr(restarted->find("pid=") + 4));
  EXPECT_NE(new_pid, old_pid);
  EXPECT_TRUE(alive(new_pid));
  EXPECT_GE(line_index("restarting echo in 50ms (restart 1 of 3)"), 0) << output();

  // The new process serves the service (the dead one may still be listed until the broker's
  // heartbeat gives up on it: ask until a reply comes).
  auto c = client();
  bool served = false;
  const auto until = std::chrono::steady_clock::now() + 20s;
  while (!served && std::chrono::steady_clock::now() < until) {
    ensemble::agent::send_options retry;
    retry.retryable = true;
    auto reply = c->call("Echo", "again", ea::to_json_payload(nlohmann::json::object()), 5s, retry);
    served = reply.ok();
  }
  EXPECT_TRUE(served) << up_->tail(60);

  ASSERT_EQ(::kill(pids_["fragile"], SIGKILL), 0);
  EXPECT_TRUE(up_->wait_for_line("stays down (restart: never)", 20s)) << up_->tail(60);
  EXPECT_TRUE(up_->running());

  c->stop();
  up_->signal(SIGTERM);
  const auto code = up_->wait_exit(k_exit_deadline);
  ASSERT_TRUE(code);
  EXPECT_EQ(*code, 0) << up_->tail(60);
  EXPECT_FALSE(alive(new_pid));
}

TEST_F(up_test, endpoint_in_use_is_reported_with_the_endpoint) {
  auto taken = tk::broker_process::start();
  write("broker: {router: '" + taken->router() + "', events: 'tcp://127.0.0.1:*'}\n");
  EXPECT_NE(run_to_exit(), 0);
  const auto out = output();
  EXPECT_NE(out.find("endpoint " + taken->router() + " is already in use"), std::string::npos)
      << out;
}

TEST_F(up_test, bad_deployment_file_names_file_and_path) {
  write(k_ephemeral_broker + "agents:\n" + worker_agent("echo", "Echo", "    replica: 2\n"));
  EXPECT_EQ(run_to_exit(), 2);
  const auto out = output();
  EXPECT_NE(out.find("deployment.yaml: agents[0].replica: unknown key"), std::string::npos) << out;
  EXPECT_EQ(line_index("broker |"), -1) << "nothing should start:\n" << out;
}

TEST_F(up_test, missing_deployment_file_is_an_error) {
  EXPECT_EQ(run_to_exit({"up", (dir_ / "nowhere.yaml").string()}), 2);
  EXPECT_NE(output().find("nowhere.yaml: no such deployment file"), std::string::npos) << output();
}

TEST_F(up_test, program_not_found_names_it_and_where_it_looked) {
  write(k_ephemeral_broker +
        "agents:\n"
        "  - name: ghost\n"
        "    program: ensemble-no-such-program\n");
  EXPECT_EQ(run_to_exit(), 2);
  const auto out = output();
  EXPECT_NE(
      out.find("agents[0].program: program 'ensemble-no-such-program' not found; looked in: "),
      std::string::npos)
      << out;
  EXPECT_NE(out.find(fs::path(tk::binary_path("ensemble")).parent_path().string()),
            std::string::npos)
      << out;
  EXPECT_EQ(line_index("broker |"), -1) << "nothing should start:\n" << out;
}

TEST_F(up_test, agent_exiting_at_start_up_shows_its_output_and_stops_the_rest) {
  write(k_ephemeral_broker +
        "agents:\n"
        "  - name: broken\n"
        "    program: ensemble-test-worker\n"
        "    args: [--broker, '{broker}', --events, '{events}', --name, '{name}', --mode, bogus]\n"
        "    services: [Echo]\n");
  EXPECT_EQ(run_to_exit(), 1);
  const auto out = output();
  EXPECT_NE(out.find("agent broken exited with code"), std::string::npos) << out;
  EXPECT_NE(out.find("during start-up; its last output:"), std::string::npos) << out;
  EXPECT_NE(out.find("  broken | "), std::string::npos) << out;
  EXPECT_NE(out.find("broker stopped"), std::string::npos) << out;
}

TEST_F(up_test, readiness_timeout_says_what_was_not_ready) {
  write(k_ephemeral_broker + "agents:\n" +
        worker_agent("echo", "Echo", "    services: [Echo, Missing]\n"));
  EXPECT_EQ(run_to_exit({"up", dir_.string(), "--no-color", "--timeout", "3s"}), 1);
  const auto out = output();
  EXPECT_NE(out.find("not ready within 3s"), std::string::npos) << out;
  EXPECT_NE(out.find("echo: service(s) not registered with the broker: Missing"), std::string::npos)
      << out;
}

}  // namespace
