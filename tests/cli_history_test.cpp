// What `ensemble run --wait`, `status`, `trace` and `list` print about an instance, against a
// real deployment (testkit: broker, orchestrator, a scriptable agent). One workflow per step
// kind runs to its end and every command must print its whole history — the shapes the
// engine writes for each kind — without aborting; instances left running must say, per step,
// what they wait on.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <vector>

#include "../cli/src/history_text.hpp"  // the CLI's formatter, private to it
#include "ensemble/testkit/deployment.hpp"
#include "ensemble/testkit/process.hpp"
#include "support/cli_outcome.hpp"

namespace {

namespace fs = std::filesystem;
namespace tk = ensemble::testkit;
using json = nlohmann::json;
using namespace std::chrono_literals;

// Generous: machines are shared and noisy. Nothing here asserts on timing.
constexpr auto k_deadline = 30s;

// Every workflow the tests run, one per step kind, and some that stay running.
const std::map<std::string, std::string> k_workflows = {
    {"command.json", R"({"workflow": {"name": "Command", "steps": [
       {"name": "Charge", "kind": "command", "service": "Pay", "action": "charge",
        "retry": {"max_attempts": 3, "initial_interval": "20ms"}}]}})"},
    {"publish.json", R"({"workflow": {"name": "Publish", "steps": [
       {"name": "Announce", "kind": "publish", "topic": "order.announced"}]}})"},
    // The agent answers the instance's own `started` lifecycle event with order.approved.
    {"await.json", R"({"workflow": {"name": "Await", "steps": [
       {"name": "Approved", "kind": "await", "topic": "order.approved", "timeout": "30s"}]}})"},
    {"choreography.json", R"({"workflow": {"name": "Choreography", "steps": [
       {"name": "Ship", "kind": "choreography", "start": {"topic": "ship.requested"},
        "until": ["ship.done"], "fail_on": ["ship.refused"], "timeout": "30s"}]}})"},
    {"parallel.json", R"({"workflow": {"name": "Parallel", "steps": [
       {"name": "Both", "kind": "parallel", "branches": [
         [{"name": "Left", "service": "Pay", "action": "ok"}],
         [{"name": "Right", "service": "Pay", "action": "ok"}]]}]}})"},
    {"switch.json", R"({"workflow": {"name": "Switch", "steps": [
       {"name": "Route", "kind": "switch",
        "cases": [{"when": "${workflow.input.route} == \"a\"",
                   "steps": [{"name": "A", "service": "Pay", "action": "ok"}]}],
        "default": [{"name": "B", "service": "Pay", "action": "ok"}]}]}})"},
    {"wait.json", R"({"workflow": {"name": "Wait", "steps": [
       {"name": "Pause", "kind": "wait", "duration": "20ms"}]}})"},
    {"sub.json", R"({"workflow": {"name": "Sub", "steps": [
       {"name": "Delegate", "kind": "workflow", "workflow": "Child"}]}})"},
    {"child.json", R"({"workflow": {"name": "Child", "steps": [
       {"name": "Inner", "service": "Pay", "action": "ok"}]}})"},
    // Every step waits on something that does not come while the test looks: nobody offers
    // Nobody (a request waits until its deadline), nobody publishes the awaited topics,
    // Pay.broken always fails and the retry is 10 minutes away.
    {"stuck.json", R"({"workflow": {"name": "Stuck", "steps": [
       {"name": "All", "kind": "parallel", "branches": [
         [{"name": "Approval", "kind": "await", "topic": "never.approved", "timeout": "60s"}],
         [{"name": "Segment", "kind": "choreography", "start": {"topic": "segment.start"},
           "until": ["segment.done"], "fail_on": ["segment.failed"],
           "match": "${event.payload.id} == ${workflow.input.id}", "timeout": "60s"}],
         [{"name": "Nap", "kind": "wait", "duration": "10m"}],
         [{"name": "Flaky", "service": "Pay", "action": "broken",
           "retry": {"max_attempts": 3, "initial_interval": "10m", "max_interval": "10m"}}],
         [{"name": "Call", "service": "Nobody", "action": "x", "timeout": "60s"}],
         [{"name": "Kid", "kind": "workflow", "workflow": "SlowChild", "timeout": "5m"}]]}]}})"},
    {"slow_child.json", R"({"workflow": {"name": "SlowChild", "steps": [
       {"name": "Doze", "kind": "wait", "duration": "10m"}]}})"},
};

const char* const k_agent = R"(name: pay
services:
  Pay:
    actions:
      charge:
        reply: {charged: true}
        fail: {first: 1, code: flaky, message: first call fails}
      ok: {reply: {ok: true}}
      broken:
        fail: {code: nope, message: always fails}
reactions:
  - on: workflow.Await.started
    publish: order.approved
  - on: ship.requested
    publish: ship.done
)";

using ensemble::test::outcome;

// Whether `lines` has lines containing each of `wanted`, in this order (others between).
::testing::AssertionResult in_order(const std::vector<std::string>& lines,
                                    const std::vector<std::string>& wanted) {
  std::size_t at = 0;
  for (const auto& w : wanted) {
    while (at < lines.size() && lines[at].find(w) == std::string::npos) ++at;
    if (at == lines.size()) {
      return ::testing::AssertionFailure()
             << "no line containing \"" << w << "\" after the previous expected ones";
    }
    ++at;
  }
  return ::testing::AssertionSuccess();
}

// The line matching `pattern`, or "".
std::string matching(const std::vector<std::string>& lines, const std::string& pattern) {
  const std::regex re(pattern);
  for (const auto& l : lines) {
    if (std::regex_search(l, re)) return l;
  }
  return {};
}

class cli_history : public ::testing::Test {
 protected:
  void SetUp() override {
    const fs::path dir = fs::path(d_.dir()) / "workflows";
    fs::create_directories(dir);
    for (const auto& [file, text] : k_workflows) std::ofstream(dir / file) << text;
    d_.orchestrator({dir.string()}, ":memory:");
    d_.scriptable_agent("pay", k_agent);
    d_.start();
  }

  outcome ensemble(std::vector<std::string> args) {
    std::vector<std::string> all{"--broker",  d_.router(),   "--events",
                                 d_.events(), "--log-level", "error"};
    all.insert(all.end(), args.begin(), args.end());
    auto p = tk::process::spawn({tk::binary_path("ensemble"), std::move(all), {}, {}, "ensemble"});
    return ensemble::test::finish(*p, k_deadline);
  }

  // `ensemble run NAME --wait`: must complete; returns the output and the instance id.
  std::pair<outcome, std::string> run_to_end(const std::string& name, const json& input = {}) {
    std::vector<std::string> args{"run", name, "--wait", "--timeout", "20s"};
    if (!input.is_null()) {
      args.push_back("--input");
      args.push_back(input.dump());
    }
    auto o = ensemble(args);
    std::smatch m;
    std::string id;
    const std::regex started(R"(^started (\S+) \()");
    for (const auto& l : o.lines) {
      if (std::regex_search(l, m, started)) id = m[1];
    }
    return {o, id};
  }

  // The status table's row of `step` has this status and number of attempts.
  static ::testing::AssertionResult row(const outcome& status, const std::string& step,
                                        const std::string& state, int attempts) {
    const std::string pattern = "^" + step + " +" + state + " +" + std::to_string(attempts) + " ";
    if (!matching(status.lines, pattern).empty()) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "no row /" << pattern << "/ in\n" << status.text();
  }

  tk::deployment d_;
};

// Each step kind's run: `run --wait` prints every entry and exits 0, `status` shows the steps
// (`trace`, below, too).
struct kind_case {
  std::string workflow;
  json input;
  std::vector<std::string> run_lines;               // in this order
  std::vector<std::tuple<std::string, int>> steps;  // completed, with attempts
  std::vector<std::string> trace_lines;             // in this order
};

// For ctest's test names and failure messages.
void PrintTo(const kind_case& k, std::ostream* os) {
  *os << k.workflow;
}

class cli_history_kind : public cli_history, public ::testing::WithParamInterface<kind_case> {};

TEST_P(cli_history_kind, run_wait_status_and_trace_print_the_whole_history) {
  const kind_case& k = GetParam();
  auto [run, id] = run_to_end(k.workflow, k.input);
  ASSERT_EQ(run.code, 0) << run;
  ASSERT_FALSE(id.empty()) << run;
  std::vector<std::string> expected{"  started"};
  expected.insert(expected.end(), k.run_lines.begin(), k.run_lines.end());
  expected.push_back("  completed");
  EXPECT_TRUE(in_order(run.lines, expected)) << run;

  auto status = ensemble({"status", id});
  ASSERT_EQ(status.code, 0) << status;
  EXPECT_TRUE(in_order(status.lines, {"instance  " + id, "status    completed"})) << status;
  for (const auto& [step, attempts] : k.steps)
    EXPECT_TRUE(row(status, step, "completed", attempts));

  auto trace = ensemble({"trace", id});
  ASSERT_EQ(trace.code, 0) << trace;
  std::vector<std::string> trace_expected{id + "  " + k.workflow + " v1  completed"};
  trace_expected.insert(trace_expected.end(), k.trace_lines.begin(), k.trace_lines.end());
  trace_expected.push_back("history of " + id + ":");
  for (const auto& l : expected) trace_expected.push_back(l.substr(2));  // same words, timed
  EXPECT_TRUE(in_order(trace.lines, trace_expected)) << trace;
}

INSTANTIATE_TEST_SUITE_P(
    every_step_kind, cli_history_kind,
    ::testing::Values(
        kind_case{
            "Command",
            {},
            {"  step_started Charge (Pay.charge, attempt 1)",
             "  attempt_failed Charge: flaky: first call fails (after 1 attempt(s))",
             "  retry_scheduled Charge (attempt 2 in 20 ms)",
             "  step_started Charge (Pay.charge, attempt 2)", "  step_completed Charge (by pay"},
            {{"Charge", 2}},
            // The attempts in time order, each under its step.
            {"ERROR flaky: first call fails  [step Charge]",
             "command Pay.charge attempt 2 from orchestrator -> pay"}},
        kind_case{
            "Publish",
            {},
            {"  step_started Announce (publish order.announced)", "  step_completed Announce"},
            {{"Announce", 1}},
            {"[step Announce]"}},
        kind_case{
            "Await",
            {},
            {"  step_started Approved (await order.approved, attempt 1)",
             "  event_matched Approved (order.approved from pay)", "  step_completed Approved"},
            {{"Approved", 1}},
            {"[awaited by step Approved]"}},
        kind_case{"Choreography",
                  {},
                  {"  step_started Ship (choreography: publish ship.requested, await ship.done, "
                   "fails on ship.refused, attempt 1)",
                   "  event_matched Ship (ship.done from pay)", "  step_completed Ship"},
                  {{"Ship", 1}},
                  {"[step Ship]", "[awaited by step Ship]"}},
        kind_case{"Parallel",
                  {},
                  {"  step_started Both (parallel)", "  step_completed Both"},
                  {{"Both", 1}, {"Left", 1}, {"Right", 1}},
                  {"command Pay.ok", "command Pay.ok"}},
        kind_case{"Switch",
                  {{"route", "b"}},
                  {"  step_started Route (switch: no case holds, default)",
                   "  step_started B (Pay.ok, attempt 1)", "  step_completed B (by pay)",
                   "  step_completed Route"},
                  {{"Route", 1}, {"B", 1}},
                  {"[step B]"}},
        kind_case{"Wait",
                  {},
                  {"  step_started Pause (wait 20.0ms)", "  step_completed Pause"},
                  {{"Pause", 1}},
                  {}},
        kind_case{
            "Sub",
            {},
            {"  step_started Delegate (sub-workflow Child, instance ", "  step_completed Delegate"},
            {{"Delegate", 1}},
            {"[step Inner, sub-workflow Child of step Delegate]"}}),
    [](const ::testing::TestParamInfo<kind_case>& p) { return p.param.workflow; });

// A step kind's run: also the sub-workflow's own history in `trace`.
TEST_F(cli_history, trace_shows_the_history_of_sub_workflows) {
  auto [run, id] = run_to_end("Sub");
  ASSERT_EQ(run.code, 0) << run;
  auto trace = ensemble({"trace", id});
  ASSERT_EQ(trace.code, 0) << trace;
  EXPECT_TRUE(in_order(trace.lines, {"history of " + id + ":",
                                     "history of " + id +
                                         "/Delegate/1 (sub-workflow "
                                         "Child of step Delegate):",
                                     "started (sub-workflow of " + id + ")",
                                     "step_started Inner (Pay.ok, attempt 1)",
                                     "step_completed Inner (by pay)", "completed"}))
      << trace;
}

TEST_F(cli_history, status_shows_what_each_running_step_waits_on) {
  auto started = ensemble({"run", "Stuck", "--input", R"({"id": 7})"});
  ASSERT_EQ(started.code, 0) << started;
  std::smatch m;
  const std::string first = started.lines.empty() ? "" : started.lines.front();
  ASSERT_TRUE(std::regex_search(first, m, std::regex(R"(^started (\S+) \()"))) << started;
  const std::string id = m[1];

  // Until Flaky's first attempt has failed (the others wait from the start).
  json view;
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto o = ensemble({"status", id, "--json"});
        view = o.code == 0 ? o.document() : json();
        const json phase = view.is_object() ? view["steps"]["Flaky"]["waiting"]["phase"] : json();
        return phase == "backoff";
      },
      k_deadline, 50ms))
      << view.dump(2);
  // The orchestrator's answer, typed. (Copies: a missing key reads as null.)
  json steps = view["steps"];
  EXPECT_EQ(steps["All"]["waiting"], (json{{"kind", "parallel"}, {"phase", "branches"}}));
  json approval = steps["Approval"]["waiting"];
  EXPECT_EQ(approval["phase"], "awaiting");
  EXPECT_EQ(approval["until"], json::array({"never.approved"}));
  EXPECT_EQ(approval["correlation_id"], id);
  EXPECT_EQ(approval["attempt"], 1);
  EXPECT_TRUE(
      approval["deadline_us"].is_number_integer() && approval["since_us"].is_number_integer() &&
      approval["deadline_us"].get<std::int64_t>() > approval["since_us"].get<std::int64_t>())
      << approval.dump();
  json segment = steps["Segment"]["waiting"];
  EXPECT_EQ(segment["kind"], "choreography");
  EXPECT_EQ(segment["fail_on"], json::array({"segment.failed"}));
  EXPECT_EQ(segment["match"], "${event.payload.id} == ${workflow.input.id}");
  EXPECT_FALSE(segment.contains("correlation_id"));
  EXPECT_TRUE(steps["Nap"]["waiting"]["due_us"].is_number_integer());
  EXPECT_EQ(steps["Nap"]["attempts"], 1);
  json flaky = steps["Flaky"]["waiting"];
  EXPECT_EQ(flaky["attempt"], 2);  // the next one
  EXPECT_EQ(flaky["service"], "Pay");
  EXPECT_TRUE(flaky["due_us"].is_number_integer());
  json call = steps["Call"]["waiting"];
  EXPECT_EQ(call["phase"], "calling");
  EXPECT_EQ(call["service"], "Nobody");
  EXPECT_EQ(call["action"], "x");
  EXPECT_EQ(call["attempt"], 1);
  EXPECT_TRUE(call["deadline_us"].is_number_integer()) << call.dump();
  json kid = steps["Kid"]["waiting"];
  EXPECT_EQ(kid["child_id"], id + "/Kid/1");
  EXPECT_TRUE(kid["deadline_us"].is_number_integer()) << kid.dump();

  // And in words, under each step's row.
  auto status = ensemble({"status", id});
  ASSERT_EQ(status.code, 0) << status;
  const std::string due = R"([0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3} UTC \(in [^)]+\))";
  const auto under = [&](const std::string& step, const std::string& state, int attempts,
                         const std::string& waits) -> ::testing::AssertionResult {
    for (std::size_t i = 0; i + 1 < status.lines.size(); ++i) {
      if (!std::regex_search(status.lines[i], std::regex("^" + step + " +" + state + " +" +
                                                         std::to_string(attempts) + " "))) {
        continue;
      }
      if (std::regex_search(status.lines[i + 1], std::regex("^  " + waits + "$"))) {
        return ::testing::AssertionSuccess();
      }
      return ::testing::AssertionFailure() << "under " << step << ": \"" << status.lines[i + 1]
                                           << "\" does not match /" << waits << "/";
    }
    return ::testing::AssertionFailure() << "no row for " << step << " in\n" << status.text();
  };
  EXPECT_TRUE(under("All", "running", 1, "waits for the steps inside it"));
  EXPECT_TRUE(under("Approval", "running", 1,
                    "waits for an event on never\\.approved with correlation_id " + id +
                        " \\(attempt 1\\), deadline " + due));
  EXPECT_TRUE(under("Segment", "running", 1,
                    "waits for an event on segment\\.done \\(fails on segment\\.failed\\) matching "
                    "\\$\\{event\\.payload\\.id\\} == \\$\\{workflow\\.input\\.id\\} "
                    "\\(attempt 1\\), deadline " +
                        due));
  EXPECT_TRUE(under("Nap", "running", 1, "waits until " + due));
  EXPECT_TRUE(under("Flaky", "running", 1, "retry: attempt 2 of Pay\\.broken, due " + due));
  EXPECT_TRUE(
      under("Call", "running", 1,
            "waits for the reply of Nobody\\.x \\(attempt 1, request \\S+\\), deadline " + due));
  EXPECT_TRUE(under("Kid", "running", 1,
                    "waits for sub-workflow SlowChild instance " + id + "/Kid/1, deadline " + due));

  // trace prints a running instance too: what was sent, and the history so far.
  auto trace = ensemble({"trace", id});
  ASSERT_EQ(trace.code, 0) << trace;
  EXPECT_TRUE(
      in_order(trace.lines, {"command Nobody.x from orchestrator (no reply yet)  [step Call]",
                             "history of " + id + ":", "step_started Nap (wait 10m00s)",
                             "attempt_failed Flaky: nope: always fails (after 1 attempt(s))",
                             "retry_scheduled Flaky (attempt 2 in 600000 ms)"}))
      << trace;
}

TEST_F(cli_history, list_json_includes_each_instances_input) {
  const json input = {{"orderId", "A-1"}, {"total", 42}};
  auto [run, id] = run_to_end("Wait", input);
  ASSERT_EQ(run.code, 0) << run;
  auto list = ensemble({"list", "--json"});
  ASSERT_EQ(list.code, 0) << list;
  const json instances = list.document();
  ASSERT_TRUE(instances.is_array()) << list;
  bool found = false;
  for (const auto& v : instances) {
    if (v.value("id", "") != id) continue;
    found = true;
    ASSERT_TRUE(v.contains("input")) << v.dump(2);
    EXPECT_EQ(v.at("input"), input);
    EXPECT_FALSE(v.contains("steps")) << "list stays a summary: " << v.dump(2);
  }
  EXPECT_TRUE(found) << list;
}

// The formatter itself, on every entry shape the engine writes, each field also missing, null
// or of another type: a line, never an exception. (A history written by another version of
// the orchestrator, or damaged, must still print.)
TEST(cli_history_text, every_entry_shape_prints_even_with_fields_missing_or_of_another_type) {
  const std::vector<json> entries = {
      {{"kind", "started"}, {"data", {{"input", json::object()}, {"parent", ""}}}},
      {{"kind", "step_started"},
       {"step", "C"},
       {"data",
        {{"kind", "command"},
         {"service", "S"},
         {"action", "a"},
         {"attempt", 2},
         {"request_id", "r"}}}},
      {{"kind", "step_started"},
       {"step", "P"},
       {"data", {{"kind", "publish"}, {"topic", "t"}, {"event_id", "e"}}}},
      {{"kind", "step_started"},
       {"step", "A"},
       {"data",
        {{"kind", "await"},
         {"until", {"t"}},
         {"fail_on", json::array()},
         {"attempt", 1},
         {"topic", nullptr},
         {"event_id", nullptr}}}},
      {{"kind", "step_started"},
       {"step", "Ch"},
       {"data",
        {{"kind", "choreography"},
         {"until", {"ok"}},
         {"fail_on", {"no"}},
         {"attempt", 1},
         {"topic", "go"},
         {"event_id", "e"}}}},
      {{"kind", "step_started"}, {"step", "Pa"}, {"data", {{"kind", "parallel"}}}},
      {{"kind", "step_started"}, {"step", "Sw"}, {"data", {{"kind", "switch"}, {"case", -1}}}},
      {{"kind", "step_started"}, {"step", "W"}, {"data", {{"kind", "wait"}, {"ms", 1500}}}},
      {{"kind", "step_started"},
       {"step", "Sub"},
       {"data", {{"kind", "workflow"}, {"workflow", "Child"}, {"child", "x/Sub/1"}}}},
      {{"kind", "step_completed"},
       {"step", "C"},
       {"data", {{"attempts", 2}, {"output", 1}, {"worker", "w"}}}},
      {{"kind", "attempt_failed"},
       {"step", "C"},
       {"data", {{"code", "c"}, {"message", "m"}, {"attempts", 1}}}},
      {{"kind", "retry_scheduled"}, {"step", "C"}, {"data", {{"attempt", 2}, {"delay_ms", 200}}}},
      {{"kind", "step_failed"},
       {"step", "C"},
       {"data", {{"step", "C"}, {"code", "c"}, {"message", "m"}, {"attempts", 3}}}},
      {{"kind", "step_skipped"}, {"step", "D"}, {"data", {{"goto", "E"}}}},
      {{"kind", "step_cancelled"}, {"step", "D"}, {"data", nullptr}},
      {{"kind", "event_matched"},
       {"step", "A"},
       {"data", {{"id", "e"}, {"topic", "t"}, {"publisher", "p"}, {"seq", 3}}}},
      {{"kind", "compensating"},
       {"data", {{"reason", {{"code", "c"}, {"message", "m"}}}, {"steps", {"C"}}}}},
      {{"kind", "compensation_started"},
       {"step", "C"},
       {"data", {{"service", "S"}, {"action", "undo"}, {"attempt", 1}, {"request_id", "r"}}}},
      {{"kind", "compensation_started"},
       {"step", "P"},
       {"data", {{"topic", "t.undo"}, {"event_id", "e"}}}},
      {{"kind", "compensation_attempt_failed"},
       {"step", "C"},
       {"data", {{"code", "c"}, {"message", "m"}, {"attempts", 1}}}},
      {{"kind", "compensation_failed"},
       {"step", "C"},
       {"data", {{"code", "c"}, {"message", "m"}, {"attempts", 5}}}},
      {{"kind", "compensated"}, {"step", "C"}, {"data", {{"worker", "w"}}}},
      {{"kind", "completed"}, {"data", {{"output", {{"ok", true}}}}}},
      {{"kind", "failed"}, {"data", {{"error", {{"code", "c"}, {"message", "m"}}}}}},
      {{"kind", "timed_out"}, {"data", {{"error", {{"code", "timeout"}, {"message", "m"}}}}}},
  };
  const std::vector<json> odd_values = {
      nullptr, 7, -1.5, true, "text", json::array({1, "a"}), json::object({{"x", 1}})};
  std::size_t printed = 0;
  for (const auto& entry : entries) {
    // As written: a line that starts with its kind and step.
    const std::string line = ensemble::cli::describe_entry(entry);
    std::string head = entry["kind"].get<std::string>();
    if (entry.contains("step")) head += " " + entry["step"].get<std::string>();
    EXPECT_EQ(line.rfind(head, 0), 0u) << line;
    ++printed;
    // Each field of the entry and of its data missing, or replaced by each odd value.
    std::vector<json> variants;
    for (const auto& [key, value] : entry.items()) {
      json without = entry;
      without.erase(key);
      variants.push_back(without);
      for (const auto& odd : odd_values) {
        json changed = entry;
        changed[key] = odd;
        variants.push_back(changed);
      }
    }
    if (entry["data"].is_object()) {
      for (const auto& [key, value] : entry["data"].items()) {
        json without = entry;
        without["data"].erase(key);
        variants.push_back(without);
        for (const auto& odd : odd_values) {
          json changed = entry;
          changed["data"][key] = odd;
          variants.push_back(changed);
        }
      }
    }
    for (const auto& v : variants) {
      EXPECT_NO_THROW({
        const std::string odd_line = ensemble::cli::describe_entry(v);
        EXPECT_FALSE(odd_line.empty()) << v.dump();
      }) << v.dump();
      ++printed;
    }
  }
  EXPECT_GT(printed, entries.size());
  // And the lines a user reads for the await that used to abort `run --wait`.
  EXPECT_EQ(ensemble::cli::describe_entry(entries[3]), "step_started A (await t, attempt 1)");
  EXPECT_EQ(ensemble::cli::describe_entry(entries[4]),
            "step_started Ch (choreography: publish go, await ok, fails on no, attempt 1)");
  EXPECT_EQ(ensemble::cli::describe_entry(entries[12]), "step_failed C: c: m (after 3 attempt(s))");
  EXPECT_EQ(ensemble::cli::describe_entry(entries[16]), "compensating: c: m (compensating C)");
}

// What a running step waits on, for each phase, and with fields missing or of another type.
TEST(cli_history_text, waiting_is_described_for_every_phase_and_tolerates_odd_fields) {
  const std::int64_t now = 1'800'000'000'000'000;
  const std::vector<json> waits = {
      {{"kind", "command"},
       {"phase", "calling"},
       {"service", "S"},
       {"action", "a"},
       {"attempt", 1},
       {"request_id", "r"},
       {"deadline_us", now + 2'000'000}},
      {{"kind", "command"},
       {"phase", "backoff"},
       {"service", "S"},
       {"action", "a"},
       {"attempt", 2},
       {"due_us", now + 500'000}},
      {{"kind", "await"},
       {"phase", "awaiting"},
       {"until", {"t"}},
       {"fail_on", json::array()},
       {"correlation_id", "i"},
       {"attempt", 1},
       {"since_us", now},
       {"deadline_us", now + 90'000'000}},
      {{"kind", "wait"}, {"phase", "waiting"}, {"due_us", now - 1000}},
      {{"kind", "publish"}, {"phase", "publishing"}, {"topic", "t"}, {"event_id", "e"}},
      {{"kind", "workflow"}, {"phase", "child"}, {"workflow", "C"}, {"child_id", "i/S/1"}},
      {{"kind", "parallel"}, {"phase", "branches"}},
  };
  const std::vector<std::string> expected = {
      "waits for the reply of S.a (attempt 1, request r), deadline ",
      "retry: attempt 2 of S.a, due ",
      "waits for an event on t with correlation_id i (attempt 1), deadline ",
      "waits until ",
      "publishes t (event e), waits for the broker's acknowledgement",
      "waits for sub-workflow C instance i/S/1",
      "waits for the steps inside it",
  };
  for (std::size_t i = 0; i < waits.size(); ++i) {
    const std::string line = ensemble::cli::describe_waiting(waits[i], now);
    EXPECT_EQ(line.rfind(expected[i], 0), 0u) << line;
    for (const auto& [key, value] : waits[i].items()) {
      for (const json& odd : {json(), json(3), json("x"), json::array({1}), json::object()}) {
        json changed = waits[i];
        changed[key] = odd;
        EXPECT_NO_THROW((void)ensemble::cli::describe_waiting(changed, now)) << changed.dump();
      }
    }
  }
  EXPECT_EQ(ensemble::cli::describe_waiting(waits[0], now),
            "waits for the reply of S.a (attempt 1, request r), deadline 08:00:02.000 UTC (in "
            "2.00s)");
  EXPECT_EQ(ensemble::cli::describe_waiting(waits[2], now),
            "waits for an event on t with correlation_id i (attempt 1), deadline 08:01:30.000 UTC "
            "(in 1m30s)");
  EXPECT_EQ(ensemble::cli::describe_waiting(waits[3], now),
            "waits until 07:59:59.999 UTC (1.0ms ago)");
  EXPECT_EQ(ensemble::cli::describe_waiting(json(), now), "");
  EXPECT_EQ(ensemble::cli::describe_waiting(json::array(), now), "");
}

}  // namespace
