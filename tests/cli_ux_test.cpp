// What a new user of the `ensemble` CLI runs into, against real processes: Ctrl-C ends a
// waiting command at once (exit 130, SIGTERM 143); `ensemble up` records its endpoints in
// .ensemble/up.json so that a second terminal in the same directory needs no --broker, and a
// stale record is reported by name; an unknown command or option is named with the nearest
// one; `call --retryable`, `events --correlation`, `publish --id`.
//
// The README's command blocks are run by readme_test.cpp.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/testkit/deployment.hpp"
#include "ensemble/testkit/process.hpp"
#include "support/cli_outcome.hpp"

namespace {

namespace fs = std::filesystem;
namespace tk = ensemble::testkit;
namespace ea = ensemble::agent;
using json = nlohmann::json;
using namespace std::chrono_literals;

// Bounds on waiting, generous for shared machines; nothing here asserts on timing.
constexpr auto k_deadline = 30s;

// The environment of a CLI run that must find its broker by itself: no inherited endpoints.
const std::map<std::string, std::string> k_no_endpoints = {{"ENSEMBLE_BROKER", ""},
                                                           {"ENSEMBLE_EVENTS", ""}};

using ensemble::test::outcome;

std::unique_ptr<tk::process> spawn_cli(std::vector<std::string> args,
                                       std::map<std::string, std::string> env = {},
                                       std::string dir = {}) {
  return tk::process::spawn(
      {tk::binary_path("ensemble"), std::move(args), std::move(env), std::move(dir), "ensemble"});
}

outcome finish(tk::process& p, std::chrono::milliseconds deadline = k_deadline) {
  return ensemble::test::finish(p, deadline);
}

outcome run_cli(std::vector<std::string> args, std::map<std::string, std::string> env = {},
                std::string dir = {}) {
  auto p = spawn_cli(std::move(args), std::move(env), std::move(dir));
  return finish(*p);
}

std::vector<std::string> with_broker(const tk::deployment& d, std::vector<std::string> args) {
  std::vector<std::string> all{"--broker", d.router(),    "--events",
                               d.events(), "--log-level", "error"};
  all.insert(all.end(), args.begin(), args.end());
  return all;
}

class temp_dir {
 public:
  temp_dir() {
    std::string pattern = (fs::temp_directory_path() / "ensemble-ux-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~temp_dir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  std::string write(const std::string& name, const std::string& text) const {
    const auto p = path_ / name;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
    return p.string();
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// A service that never answers within any test: calls to it stay in flight.
constexpr const char* k_slow_spec =
    "name: slow\n"
    "services:\n"
    "  Slow:\n"
    "    actions:\n"
    "      wait: {latency: 10m}\n";

// ---------------------------------------------------------------------------------------------
// Ctrl-C

TEST(cli_signals, events_for_a_long_time_ends_at_once_on_sigint) {
  tk::deployment d;
  d.start();
  auto events = spawn_cli(with_broker(d, {"events", "--for", "600s"}));
  ASSERT_TRUE(events->wait_for_line("ensemble: listening", k_deadline)) << events->tail();
  events->signal(SIGINT);
  const auto o = finish(*events);
  EXPECT_EQ(o.code, 130) << o;
}

TEST(cli_signals, events_ends_on_sigterm_with_143) {
  tk::deployment d;
  d.start();
  auto events = spawn_cli(with_broker(d, {"events", "order.", "--count", "1000"}));
  ASSERT_TRUE(events->wait_for_line("ensemble: listening", k_deadline)) << events->tail();
  events->signal(SIGTERM);
  const auto o = finish(*events);
  EXPECT_EQ(o.code, 143) << o;
}

TEST(cli_signals, call_with_a_long_deadline_ends_on_sigint) {
  tk::deployment d;
  d.scriptable_agent("slow", k_slow_spec);
  d.start();
  auto call = spawn_cli(with_broker(d, {"call", "Slow", "wait", "{}", "--timeout", "10m"}));
  // Condition: the broker has the call in flight on the slow worker.
  ea::agent probe({.name = "ux-probe", .broker = d.router(), .events = d.events()});
  ASSERT_TRUE(probe.start());
  const bool in_flight = tk::wait_until(
      [&] {
        auto r = probe.call("broker", "services", ea::to_json_payload(json::object()), 5s);
        if (!r) return false;
        const auto answer = ea::from_json_payload(r->payload());
        if (!answer) return false;
        for (const auto& s : (*answer)["services"]) {
          if (s["service"] == "Slow" && s.value("in_flight", 0) > 0) return true;
        }
        return false;
      },
      k_deadline, 20ms);
  ASSERT_TRUE(in_flight) << call->tail();
  call->signal(SIGINT);
  const auto o = finish(*call);
  EXPECT_EQ(o.code, 130) << o;
}

TEST(cli_signals, run_wait_ends_on_sigint_and_the_instance_keeps_running) {
  temp_dir dir;
  const auto flow = dir.write("sleepy.json", R"({"workflow": {"name": "Sleepy", "steps": [
      {"name": "Nap", "kind": "wait", "duration": "10m"}]}})");
  tk::deployment d;
  d.orchestrator({flow}, ":memory:");
  d.start();
  auto run = spawn_cli(with_broker(d, {"run", "Sleepy", "--id", "nap-1", "--wait"}));
  ASSERT_TRUE(run->wait_for_line("started nap-1", k_deadline)) << run->tail();
  run->signal(SIGINT);
  const auto o = finish(*run);
  EXPECT_EQ(o.code, 130) << o;
  const auto status = run_cli(with_broker(d, {"status", "nap-1", "--json"}));
  EXPECT_EQ(status.code, 0) << status;
  EXPECT_TRUE(status.has("\"running\"")) << status;
}

// ---------------------------------------------------------------------------------------------
// The two-terminal flow: `up` in one, commands in another, same directory

constexpr const char* k_greeter_spec =
    "name: greeter\n"
    "services:\n"
    "  Greeter:\n"
    "    actions:\n"
    "      hello: {reply: {greeting: hi}}\n";

constexpr const char* k_deployment =
    "broker: {router: 'tcp://127.0.0.1:*', events: 'tcp://127.0.0.1:*'}\n"
    "agents:\n"
    "  - name: greeter\n"
    "    spec: greeter.yaml\n";

TEST(cli_run_file, commands_in_the_directory_of_up_use_its_deployment) {
  temp_dir dir;
  dir.write("greeter.yaml", k_greeter_spec);
  dir.write("deployment.yaml", k_deployment);
  auto up = spawn_cli({"up", "--no-color"}, k_no_endpoints, dir.path().string());
  const auto ready = up->wait_for_line("ensemble up: ready ", k_deadline);
  ASSERT_TRUE(ready) << up->tail(60);
  const auto file = dir.path() / ".ensemble" / "up.json";
  // Written before the ready line, announced just after it.
  EXPECT_TRUE(up->wait_for_line("ensemble up: endpoints recorded in " + file.string(), k_deadline))
      << up->tail(60);
  ASSERT_TRUE(fs::exists(file));

  // No --broker, no ENSEMBLE_BROKER: the run file says where.
  const auto call = run_cli({"call", "Greeter", "hello"}, k_no_endpoints, dir.path().string());
  EXPECT_EQ(call.code, 0) << call;
  EXPECT_TRUE(call.has("\"greeting\": \"hi\"")) << call;
  // Events come through the recorded events endpoint too.
  auto events =
      spawn_cli({"events", "greet.", "--count", "1"}, k_no_endpoints, dir.path().string());
  ASSERT_TRUE(events->wait_for_line("ensemble: listening", k_deadline)) << events->tail();
  const auto published =
      run_cli({"publish", "greet.sent", "{}"}, k_no_endpoints, dir.path().string());
  EXPECT_EQ(published.code, 0) << published;
  const auto tail = finish(*events);
  EXPECT_EQ(tail.code, 0) << tail;
  EXPECT_TRUE(tail.has("\"topic\":\"greet.sent\"")) << tail;

  up->signal(SIGINT);
  ASSERT_TRUE(up->wait_exit(k_deadline)) << up->tail(60);
  EXPECT_FALSE(fs::exists(file)) << "the run file outlived `up`";
}

TEST(cli_run_file, a_stale_run_file_is_named_in_the_error) {
  temp_dir dir;
  // The pid of a process that has exited and been reaped.
  auto gone = tk::process::spawn({"true", {}, {}, {}, "true"});
  ASSERT_TRUE(gone->wait_exit(k_deadline));
  const auto file = dir.write(".ensemble/up.json", json{{"router", "tcp://127.0.0.1:1"},
                                                        {"events", "tcp://127.0.0.1:2"},
                                                        {"deployment", "/x/deployment.yaml"},
                                                        {"pid", gone->pid()}}
                                                       .dump());
  const auto o = run_cli({"services"}, k_no_endpoints, dir.path().string());
  EXPECT_EQ(o.code, 1) << o;
  EXPECT_TRUE(o.has(file)) << o;
  EXPECT_TRUE(o.has("no longer running")) << o;

  // --broker wins over the file.
  const auto given =
      run_cli({"--broker", "tcp://127.0.0.1:1", "services"}, k_no_endpoints, dir.path().string());
  EXPECT_EQ(given.code, 1) << given;
  EXPECT_TRUE(given.has("cannot reach the broker at tcp://127.0.0.1:1 (")) << given;
  EXPECT_FALSE(given.has(file)) << given;

  const auto garbage = dir.write(".ensemble/up.json", "not json");
  const auto bad = run_cli({"services"}, k_no_endpoints, dir.path().string());
  EXPECT_EQ(bad.code, 1) << bad;
  EXPECT_TRUE(bad.has(garbage + ": not a run file")) << bad;
}

TEST(cli_run_file, without_a_run_file_the_error_says_how_to_find_a_deployment) {
  temp_dir dir;
  const auto o = run_cli({"--log-level", "off", "services"},
                         {{"ENSEMBLE_BROKER", "tcp://127.0.0.1:1"}, {"ENSEMBLE_EVENTS", ""}},
                         dir.path().string());
  EXPECT_EQ(o.code, 1) << o;
  EXPECT_TRUE(o.has("cannot reach the broker at tcp://127.0.0.1:1 (")) << o;
  EXPECT_TRUE(o.has("ENSEMBLE_BROKER")) << o;
}

// ---------------------------------------------------------------------------------------------
// Unknown commands and options

TEST(cli_suggestions, an_unknown_command_is_named_with_the_nearest_one) {
  const auto typo = run_cli({"evnets"});
  EXPECT_EQ(typo.code, 2) << typo;
  EXPECT_TRUE(typo.has("unknown command 'evnets'; did you mean 'events'?")) << typo;

  const auto far = run_cli({"--broker", "tcp://127.0.0.1:1", "frobnicate"});
  EXPECT_EQ(far.code, 2) << far;
  EXPECT_TRUE(far.has("unknown command 'frobnicate'")) << far;
  EXPECT_TRUE(far.has("commands: ")) << far;
  EXPECT_FALSE(far.has("A subcommand is required")) << far;
}

TEST(cli_suggestions, an_unknown_option_is_named_with_the_nearest_one) {
  const auto sub = run_cli({"run", "OrderProcessing", "--wiat"});
  EXPECT_EQ(sub.code, 2) << sub;
  EXPECT_TRUE(sub.has("ensemble run: unknown option '--wiat'; did you mean '--wait'?")) << sub;

  const auto global = run_cli({"--brokr", "tcp://127.0.0.1:1", "services"});
  EXPECT_EQ(global.code, 2) << global;
  EXPECT_TRUE(global.has("unknown option '--brokr'; did you mean '--broker'?")) << global;
}

// ---------------------------------------------------------------------------------------------
// call --retryable, events --correlation, publish --id

TEST(cli_broker_commands, a_retryable_call_survives_the_loss_of_its_worker) {
  temp_dir dir;
  const auto steady_spec = dir.write("steady.yaml",
                                     "name: steady\n"
                                     "services:\n"
                                     "  Flaky:\n"
                                     "    actions:\n"
                                     "      go: {reply: {answered: yes}}\n");
  constexpr const char* k_crashy =
      "name: crashy\n"
      "services:\n"
      "  Flaky:\n"
      "    actions:\n"
      "      go: {crash_after: 1}\n";
  {
    // Without --retryable, the death of the worker is the answer.
    tk::deployment d;
    d.scriptable_agent("crashy", k_crashy);
    d.start();
    const auto lost = run_cli(with_broker(d, {"call", "Flaky", "go", "{}", "--timeout", "30s"}));
    EXPECT_EQ(lost.code, 1) << lost;
    EXPECT_TRUE(lost.has("worker_lost")) << lost << d.logs();
  }
  // With it, the broker puts the request back in the queue once, where it waits for another
  // worker: the one started here after the crash answers it.
  tk::deployment d;
  d.scriptable_agent("crashy", k_crashy);
  d.start();
  auto call =
      spawn_cli(with_broker(d, {"call", "Flaky", "go", "{}", "--timeout", "60s", "--retryable"}));
  ASSERT_TRUE(d.proc("crashy").wait_exit(k_deadline)) << call->tail() << d.logs();
  auto steady = spawn_cli(with_broker(d, {"agent", steady_spec}));
  ASSERT_TRUE(steady->wait_for_line("ensemble-agent ready", k_deadline)) << steady->tail();
  const auto o = finish(*call, 60s);
  EXPECT_EQ(o.code, 0) << o << d.logs();
  EXPECT_TRUE(o.has("\"answered\": \"yes\"")) << o;
  steady->signal(SIGTERM);
  EXPECT_EQ(steady->wait_exit(k_deadline), 0) << steady->tail();
}

TEST(cli_broker_commands, events_with_a_correlation_id_shows_only_those) {
  tk::deployment d;
  d.start();
  auto events =
      spawn_cli(with_broker(d, {"events", "cart.", "--correlation", "c-2", "--count", "1"}));
  ASSERT_TRUE(events->wait_for_line("ensemble: listening", k_deadline)) << events->tail();
  for (const char* c : {"c-1", "c-2"}) {
    const auto p = run_cli(
        with_broker(d, {"publish", "cart.item_added", R"({"sku": "X"})", "--correlation", c}));
    ASSERT_EQ(p.code, 0) << p;
  }
  const auto o = finish(*events);
  EXPECT_EQ(o.code, 0) << o;
  int shown = 0;
  for (const auto& l : o.lines) {
    if (l.empty() || l[0] != '{') continue;
    ++shown;
    EXPECT_EQ(json::parse(l)["correlation_id"], "c-2") << l;
  }
  EXPECT_EQ(shown, 1) << o;
}

TEST(cli_broker_commands, publish_with_an_id_starts_a_triggered_workflow_once) {
  temp_dir dir;
  const auto flow = dir.write("on_placed.json", R"({"workflow": {"name": "OnPlaced",
      "triggers": [{"topic": "order.placed"}],
      "steps": [{"name": "Note", "kind": "publish", "topic": "order.noted"}]}})");
  tk::deployment d;
  d.orchestrator({flow}, ":memory:");
  d.start();
  for (int i = 0; i < 2; ++i) {
    const auto p = run_cli(
        with_broker(d, {"publish", "order.placed", R"({"id": "o-1"})", "--id", "placed-o-1"}));
    ASSERT_EQ(p.code, 0) << p;
    EXPECT_TRUE(p.has("published order.placed id=placed-o-1 ")) << p;
  }
  // A third event with a new id: once its instance is listed, the first one's would be too.
  ASSERT_EQ(run_cli(with_broker(d, {"publish", "order.placed", "{}", "--id", "placed-o-2"})).code,
            0);
  std::optional<json> listed;
  ASSERT_TRUE(tk::wait_until(
      [&] {
        const auto l = run_cli(with_broker(d, {"list", "--workflow", "OnPlaced", "--json"}));
        const auto text = l.text();
        const auto at = text.find('[');
        if (l.code != 0 || at == std::string::npos) return false;
        listed = json::parse(text.substr(at), nullptr, false);
        return listed->is_array() && listed->size() >= 2;
      },
      k_deadline, 50ms))
      << (listed ? listed->dump(2) : std::string("nothing listed")) << d.logs();
  EXPECT_EQ(listed->size(), 2u) << listed->dump(2);
}

}  // namespace
