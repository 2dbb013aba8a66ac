// Time skipping: an orchestrator started with --clock virtual, driven by `advance` through the
// testkit (docs/testing.md, "Time skipping"). Real broker, orchestrator and agent processes;
// every wait is on a condition (an instance's view), never on real time passing.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <map>

#include "ensemble/testkit/deployment.hpp"
#include "ensemble/testkit/process.hpp"
#include "ensemble/testkit/workflow_client.hpp"
#include "support/cli_outcome.hpp"

namespace {

namespace fs = std::filesystem;
namespace tk = ensemble::testkit;
using json = nlohmann::json;
using namespace std::chrono_literals;

constexpr auto k_deadline = 30s;  // generous: machines are shared; nothing asserts on timing
constexpr std::int64_t k_hour_us = 3'600'000'000;

const std::map<std::string, std::string> k_workflows = {
    {"nap.json", R"({"workflow": {"name": "Nap", "steps": [
       {"name": "Sleep", "kind": "wait", "duration": "24h"},
       {"name": "Remind", "service": "Mail", "action": "send"}]}})"},
    // Mail.broken always fails (retryable): 4 attempts, 1 h, 2 h, 4 h apart.
    {"flaky.json", R"({"workflow": {"name": "Flaky", "steps": [
       {"name": "Send", "service": "Mail", "action": "broken",
        "retry": {"max_attempts": 4, "initial_interval": "1h", "backoff": 2.0,
                  "max_interval": "24h"}}]}})"},
    // Mail.stuck answers after a minute of real time: only the step's 1 h timeout can end it.
    {"stuck.json", R"({"workflow": {"name": "Stuck", "steps": [
       {"name": "Send", "service": "Mail", "action": "stuck", "timeout": "1h",
        "retry": {"max_attempts": 1}}]}})"},
};

const char* const k_mail_agent = R"(name: mail
services:
  Mail:
    capacity: 4
    actions:
      send: {reply: {sent: true}}
      broken:
        fail: {code: smtp_down, message: always fails}
      stuck: {latency: 60s, reply: {sent: late}}
)";

class orchestrator_clock : public ::testing::Test {
 protected:
  // A deployment with the workflows above and the mail agent; `virtual_clock` as asked.
  void start(bool virtual_clock = true,
             const std::string& store = ":memory:", bool secured = false) {
    tk::deployment_options o;
    o.virtual_clock = virtual_clock;
    o.secured = secured;
    d_ = std::make_unique<tk::deployment>(o);
    if (secured) {
      // May only act on its own instances: advance moves everyone's time.
      d_->identity("tester", ensemble::cli::rights{.call_own = {"orchestrator.*"}});
    }
    const fs::path dir = fs::path(d_->dir()) / "workflows";
    fs::create_directories(dir);
    for (const auto& [file, text] : k_workflows) std::ofstream(dir / file) << text;
    d_->orchestrator({dir.string()}, store);
    d_->scriptable_agent("mail", k_mail_agent);
    d_->start();
    wf_ = std::make_unique<tk::workflow_client>(d_->connect_as());
  }

  // `ensemble ARGS...` against the deployment's broker, run to its end.
  ensemble::test::outcome ensemble(std::vector<std::string> args) {
    std::vector<std::string> all{"--broker",   d_->router(),  "--events",
                                 d_->events(), "--log-level", "error"};
    all.insert(all.end(), args.begin(), args.end());
    auto p = tk::process::spawn({tk::binary_path("ensemble"), std::move(all), {}, {}, "ensemble"});
    return ensemble::test::finish(*p, k_deadline);
  }

  std::string start_instance(const std::string& workflow) {
    auto r = wf_->start(workflow, json::object());
    EXPECT_TRUE(r) << r.err().to_string();
    return r ? r->at("id").get<std::string>() : std::string();
  }

  json get(const std::string& id) {
    auto r = wf_->get(id);
    EXPECT_TRUE(r) << r.err().to_string();
    return r ? *r : json();
  }

  // Waits until step `step` of `id` is in backoff before attempt `attempts + 1`.
  ::testing::AssertionResult in_backoff_after(const std::string& id, const std::string& step,
                                              int attempts) {
    json last;
    const bool held = tk::wait_until(
        [&] {
          auto r = wf_->get(id);
          if (!r) return false;
          last = *r;
          const json& s = last["steps"][step];
          return s.value("attempts", 0) == attempts &&
                 s.value("waiting", json::object()).value("phase", "") == "backoff";
        },
        k_deadline, 10ms);
    if (held) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << "step " << step << " never in backoff after attempt " << attempts << "; last view:\n"
           << last.dump(2);
  }

  json advance(std::chrono::milliseconds by) {
    auto r = d_->advance(by);
    EXPECT_TRUE(r) << r.err().to_string();
    return r ? *r : json();
  }

  std::unique_ptr<tk::deployment> d_;
  std::unique_ptr<tk::workflow_client> wf_;
};

TEST_F(orchestrator_clock, a_day_long_wait_completes_after_advancing_a_day_and_not_before) {
  start();
  const std::string id = start_instance("Nap");
  const json before = get(id);
  ASSERT_EQ(before["steps"]["Sleep"]["status"], "running");

  const json a = advance(23h);
  EXPECT_EQ(a.value("now_us", std::int64_t{0}) - a.value("from_us", std::int64_t{0}),
            23 * k_hour_us);
  EXPECT_EQ(a.value("fired", -1), 0);
  // The answer comes after the commit: an hour short, the step is still waiting.
  const json still = get(id);
  EXPECT_EQ(still["status"], "running");
  EXPECT_EQ(still["steps"]["Sleep"]["status"], "running") << still.dump(2);

  const json b = advance(1h);
  EXPECT_EQ(b.value("fired", 0), 1);
  auto done = wf_->wait(id, k_deadline);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "completed") << done->dump(2);
  EXPECT_EQ(done->at("output"), (json{{"sent", true}}));
  // In workflow time the wait took exactly its day.
  const json& sleep = done->at("steps").at("Sleep");
  EXPECT_EQ(sleep["ended_us"].get<std::int64_t>() - sleep["started_us"].get<std::int64_t>(),
            24 * k_hour_us);
}

TEST_F(orchestrator_clock, a_retry_backoff_follows_its_schedule_in_virtual_time) {
  start();
  const std::string id = start_instance("Flaky");
  const std::vector<std::chrono::hours> delays{1h, 2h, 4h};
  for (std::size_t i = 0; i < delays.size(); ++i) {
    const int attempts = static_cast<int>(i) + 1;
    ASSERT_TRUE(in_backoff_after(id, "Send", attempts));
    // A second short of the delay the attempt is not made; at the delay it is.
    advance(delays[i] - 1s);
    ASSERT_TRUE(in_backoff_after(id, "Send", attempts)) << "retried before its delay";
    const json a = advance(1s);
    EXPECT_EQ(a.value("fired", 0), 1) << "attempt " << attempts + 1;
  }
  auto done = wf_->wait(id, k_deadline);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "failed");
  EXPECT_EQ(done->at("steps").at("Send").at("attempts"), 4);
  auto history = wf_->call("history", {{"id", id}});
  ASSERT_TRUE(history) << history.err().to_string();
  std::vector<std::int64_t> scheduled;
  for (const auto& e : history->at("entries")) {
    if (e["kind"] == "retry_scheduled") scheduled.push_back(e["data"]["delay_ms"]);
  }
  EXPECT_EQ(scheduled, (std::vector<std::int64_t>{3'600'000, 7'200'000, 14'400'000}));
}

TEST_F(orchestrator_clock, a_step_timeout_fires_in_virtual_time) {
  start();
  const std::string id = start_instance("Stuck");
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto r = wf_->get(id);
        return r && r->at("steps").at("Send").value("waiting", json::object()).value("phase", "") ==
                        "calling";
      },
      k_deadline, 10ms));
  advance(59min);
  EXPECT_EQ(get(id)["status"], "running");
  const json a = advance(1min);
  EXPECT_EQ(a.value("fired", 0), 1);
  auto done = wf_->wait(id, k_deadline);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "failed") << done->dump(2);
  EXPECT_EQ(done->at("steps").at("Send").at("error").at("code"), "deadline_exceeded")
      << done->dump(2);
}

TEST_F(orchestrator_clock, advance_is_refused_on_a_wall_clock) {
  start(false);
  auto r = d_->advance(1h);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.err().code, "bad_request");
  EXPECT_NE(r.err().message.find("--clock virtual"), std::string::npos) << r.err().message;
  auto stats = wf_->call("stats", json::object());
  ASSERT_TRUE(stats) << stats.err().to_string();
  EXPECT_EQ(stats->at("clock"), "wall");
}

TEST_F(orchestrator_clock, advance_names_a_bad_argument) {
  start();
  for (const json& args :
       {json::object(), json{{"by", "soon"}}, json{{"by_ms", -1}}, json{{"by", "1h"}, {"by_ms", 5}},
        json{{"by_ms", std::numeric_limits<std::int64_t>::max()}}}) {
    auto r = wf_->call("advance", args);
    ASSERT_FALSE(r) << args.dump();
    EXPECT_EQ(r.err().code, "bad_request") << args.dump();
    EXPECT_NE(r.err().message.find("by"), std::string::npos) << r.err().message;
  }
  auto r = wf_->call("advance", {{"by", "90m"}});
  ASSERT_TRUE(r) << r.err().to_string();
  EXPECT_EQ(r->at("now_us").get<std::int64_t>() - r->at("from_us").get<std::int64_t>(),
            k_hour_us * 3 / 2);
}

// Virtual now is kept in the store: a restarted orchestrator goes on from where it stood, so
// the 23 h advanced before the restart still count.
TEST_F(orchestrator_clock, virtual_time_goes_on_from_where_it_stood_after_a_restart) {
  start(true, "file");
  const std::string id = start_instance("Nap");
  const json a = advance(23h);
  const std::int64_t stood = a.value("now_us", std::int64_t{0});
  d_->restart("orchestrator");
  auto stats = wf_->call("stats", json::object());
  ASSERT_TRUE(stats) << stats.err().to_string();
  EXPECT_EQ(stats->at("clock"), "virtual");
  EXPECT_EQ(stats->at("now_us").get<std::int64_t>(), stood);
  EXPECT_EQ(get(id)["steps"]["Sleep"]["status"], "running");
  const json b = advance(1h);
  EXPECT_EQ(b.value("from_us", std::int64_t{0}), stood);
  auto done = wf_->wait(id, k_deadline);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "completed") << done->dump(2);
}

TEST_F(orchestrator_clock, ensemble_advance_moves_the_clock_from_a_shell) {
  start();
  const std::string id = start_instance("Nap");
  auto o = ensemble({"advance", "24h"});
  ASSERT_EQ(o.code, 0) << o;
  EXPECT_TRUE(o.has("advanced 24h: 1 timer(s) fired; virtual now ")) << o;
  auto done = wf_->wait(id, k_deadline);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "completed") << done->dump(2);

  auto bad = ensemble({"advance", "a while"});
  EXPECT_EQ(bad.code, 2) << bad;
  EXPECT_TRUE(bad.has("\"a while\" is not a duration")) << bad;
}

TEST_F(orchestrator_clock, ensemble_advance_on_a_wall_clock_says_why_it_is_refused) {
  start(false);
  auto o = ensemble({"advance", "1h"});
  EXPECT_EQ(o.code, 1) << o;
  EXPECT_TRUE(o.has("ensemble: advance 1h: bad_request: ")) << o;
  EXPECT_TRUE(o.has("--clock virtual")) << o;
}

// Secured: a caller whose right on the orchestrator is only call_own may not move everyone's
// time; one with a call right may.
TEST_F(orchestrator_clock, advance_is_refused_to_a_caller_scope_own_caller) {
  start(true, ":memory:", true);
  tk::workflow_client own(d_->connect_as("tester"));
  auto refused = own.call("advance", {{"by", "1h"}});
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.err().code, "unauthorized") << refused.err().message;
  EXPECT_NE(refused.err().message.find("tester"), std::string::npos) << refused.err().message;
  EXPECT_EQ(refused.err().message,
            "caller 'tester' may act only on the instances it started; advance moves the time of "
            "every instance (caller_scope own)");
  auto allowed = wf_->call("advance", {{"by", "1h"}});
  ASSERT_TRUE(allowed) << allowed.err().to_string();
}

// A deployment file's orchestrator.clock is checked like the rest of the file.
TEST(orchestrator_clock_file, a_deployment_file_names_a_bad_clock) {
  const fs::path dir = fs::temp_directory_path() / ("ensemble-clock-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "deployment.yaml") << "orchestrator:\n  clock: sometimes\n";
  auto p = tk::process::spawn({tk::binary_path("ensemble"),
                               {"validate", "--deployment", (dir / "deployment.yaml").string()},
                               {},
                               {},
                               "ensemble"});
  const auto o = ensemble::test::finish(*p, k_deadline);
  fs::remove_all(dir);
  EXPECT_EQ(o.code, 1) << o;
  EXPECT_TRUE(o.has("orchestrator.clock: must be \"wall\" or \"virtual\", not \"sometimes\"")) << o;
}

}  // namespace
