// Workflow definitions: the seed's JSON with its defaults, every step kind, the errors each class
// of mistake gets (asserting on the JSON pointer and the key words of the message), durations,
// retry delays, and loading files and directories from a temporary directory.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/common/config_reader.hpp"
#include "ensemble/common/result.hpp"
#include "ensemble/orchestrator/definition.hpp"

namespace eo = ensemble::orchestrator;
namespace fs = std::filesystem;
using ensemble::common::config_error;
using eo::json;
using eo::millis;
using eo::step_kind;

namespace {

::testing::AssertionResult contains(const std::string& haystack, std::string_view needle) {
  if (haystack.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << haystack << "' does not contain '" << needle << "'";
}

constexpr std::string_view k_seed = R"({"workflow": {"name": "OrderProcessing", "steps": [
  {"name": "ValidateOrder", "service": "OrderService", "action": "validate"},
  {"name": "ChargePayment", "service": "PaymentService", "action": "charge"},
  {"name": "SendConfirmation", "service": "NotificationService", "action": "send"}]}})";

eo::definition parse(std::string_view text) {
  return eo::parse_definition(json::parse(text), "orders.json");
}

// A definition {"workflow": {"name": "W", "steps": <steps>}} plus `extra` workflow keys.
std::string with_steps(std::string_view steps, std::string_view extra = "") {
  std::string doc = R"({"workflow": {"name": "W", )";
  if (!extra.empty()) doc += std::string(extra) + ", ";
  return doc + R"("steps": )" + std::string(steps) + "}}";
}

// Parses `text` expecting a config_error with a problem at `pointer` whose message has every
// one of `words` (other problems of the document may be reported too).
void expect_error(std::string_view text, const std::string& pointer,
                  const std::vector<std::string_view>& words) {
  try {
    parse(text);
    ADD_FAILURE() << "no error for " << text;
  } catch (const config_error& e) {
    const std::string expected_where = pointer.empty() ? "orders.json" : "orders.json: " + pointer;
    const auto all = ensemble::common::diagnostics_of(e);
    const auto at = std::find_if(all.begin(), all.end(),
                                 [&](const auto& d) { return d.where == expected_where; });
    ASSERT_NE(at, all.end()) << "no problem at " << expected_where << " in:\n" << e.what();
    for (std::string_view w : words) EXPECT_TRUE(contains(at->message, w));
  }
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const config_error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no config_error";
  return {};
}

constexpr std::string_view k_cmd = R"({"name": "A", "service": "S", "action": "a"})";

}  // namespace

// ---- the seed and the defaults ----------------------------------------------------------------

TEST(Definition, SeedParsesWithDefaults) {
  const eo::definition def = parse(k_seed);
  EXPECT_EQ(def.name, "OrderProcessing");
  EXPECT_EQ(def.version, 1u);
  EXPECT_EQ(def.source, "orders.json");
  EXPECT_FALSE(def.output.has_value());
  EXPECT_FALSE(def.timeout.has_value());
  EXPECT_TRUE(def.triggers.empty());
  EXPECT_EQ(def.raw, json::parse(k_seed));
  ASSERT_EQ(def.steps.size(), 3u);
  const char* names[] = {"ValidateOrder", "ChargePayment", "SendConfirmation"};
  const char* services[] = {"OrderService", "PaymentService", "NotificationService"};
  const char* actions[] = {"validate", "charge", "send"};
  for (std::size_t i = 0; i < 3; ++i) {
    const eo::step& s = def.steps[i];
    EXPECT_EQ(s.name, names[i]);
    EXPECT_EQ(s.kind, step_kind::command);
    EXPECT_EQ(s.service, services[i]);
    EXPECT_EQ(s.action, actions[i]);
    EXPECT_EQ(s.path, "/workflow/steps/" + std::to_string(i));
    EXPECT_FALSE(s.input.has_value());
    EXPECT_FALSE(s.timeout.has_value());
    EXPECT_FALSE(s.compensate.has_value());
    EXPECT_EQ(s.on_error.what, eo::on_error_policy::kind::fail);
    EXPECT_EQ(s.retry.max_attempts, 3u);
    EXPECT_EQ(s.retry.initial_interval, millis(200));
    EXPECT_EQ(s.retry.backoff, 2.0);
    EXPECT_EQ(s.retry.max_interval, millis(10'000));
    EXPECT_TRUE(s.retry.non_retryable.empty());
  }
  EXPECT_EQ(def.find("ChargePayment"), &def.steps[1]);
  EXPECT_EQ(def.find("Nope"), nullptr);
  EXPECT_TRUE(def.listened_topics().empty());
  EXPECT_TRUE(def.sub_workflows().empty());
}

TEST(Definition, KindNames) {
  EXPECT_EQ(eo::to_string(step_kind::command), "command");
  EXPECT_EQ(eo::to_string(step_kind::publish), "publish");
  EXPECT_EQ(eo::to_string(step_kind::await), "await");
  EXPECT_EQ(eo::to_string(step_kind::choreography), "choreography");
  EXPECT_EQ(eo::to_string(step_kind::parallel), "parallel");
  EXPECT_EQ(eo::to_string(step_kind::switch_), "switch");
  EXPECT_EQ(eo::to_string(step_kind::wait), "wait");
  EXPECT_EQ(eo::to_string(step_kind::workflow), "workflow");
}

TEST(Definition, EveryStepKindParses) {
  const eo::definition def = parse(R"({"workflow": {
    "name": "Mixed", "version": 3, "timeout": "1h", "description": "all kinds",
    "output": {"tx": "${steps.Charge.output.transactionId}", "shipped": "${steps.Ship.output}"},
    "triggers": [{"topic": "order.placed", "match": "${event.payload.total} > 0",
                  "input": {"orderId": "${event.payload.id}"}},
                 {"topic": "order.retry"}],
    "steps": [
      {"name": "Validate", "kind": "command", "service": "OrderService", "action": "validate",
       "input": {"id": "${workflow.input.orderId}"}, "timeout": "2s",
       "retry": {"max_attempts": 5, "initial_interval": "100ms", "backoff": 1.5,
                 "max_interval": "3s", "non_retryable": ["invalid_order"]},
       "description": "checks the order"},
      {"name": "Charge", "service": "PaymentService", "action": "charge",
       "compensate": {"service": "PaymentService", "action": "refund",
                      "input": {"tx": "${steps.Charge.output.transactionId}"}, "timeout": "5s"}},
      {"name": "Announce", "kind": "publish", "topic": "order.charged",
       "payload": {"orderId": "${workflow.input.orderId}"},
       "compensate": {"publish": {"topic": "order.charge_cancelled"}}},
      {"name": "AwaitStock", "kind": "await", "topic": "stock.reserved",
       "match": "${event.payload.orderId} == ${workflow.input.orderId}", "timeout": "30s",
       "on_error": "continue"},
      {"name": "Ship", "kind": "choreography",
       "start": {"topic": "shipping.requested", "payload": {"id": "${workflow.input.orderId}"}},
       "until": ["shipping.done", "shipping.partial"], "fail_on": ["shipping.failed"],
       "timeout": "10m",
       "compensate": {"publish": {"topic": "shipping.cancel", "payload": {"id": "${workflow.id}"}}}},
      {"name": "Both", "kind": "parallel", "branches": [
        [{"name": "Invoice", "service": "Billing", "action": "invoice"},
         {"name": "Email", "service": "Mail", "action": "send",
          "input": {"invoice": "${steps.Invoice.output}", "tx": "${steps.Charge.output}"}}],
        [{"name": "Points", "service": "Loyalty", "action": "add"}]]},
      {"name": "Route", "kind": "switch", "cases": [
        {"when": "${workflow.input.total} > 1000", "steps": [
          {"name": "Review", "service": "Fraud", "action": "review"}]},
        {"when": "${steps.Points.output.level} == 'gold'", "steps": [
          {"name": "Gift", "kind": "publish", "topic": "gift.send"}]}],
       "default": [{"name": "Nothing", "kind": "wait", "duration": 1}]},
      {"name": "Cool", "kind": "wait", "duration": "1.5s", "on_error": {"goto": "Archive"}},
      {"name": "Child", "kind": "workflow", "workflow": "Archiving",
       "input": "${workflow.input}", "timeout": "1m", "retry": {"max_attempts": 2}},
      {"name": "Archive", "service": "Archive", "action": "store"}
    ]}})");
  EXPECT_EQ(def.name, "Mixed");
  EXPECT_EQ(def.version, 3u);
  EXPECT_EQ(def.timeout, millis(3'600'000));
  ASSERT_TRUE(def.output.has_value());
  ASSERT_EQ(def.triggers.size(), 2u);
  EXPECT_EQ(def.triggers[0].topic, "order.placed");
  EXPECT_EQ(def.triggers[0].match, "${event.payload.total} > 0");
  ASSERT_TRUE(def.triggers[0].input.has_value());
  EXPECT_TRUE(def.triggers[1].match.empty());
  EXPECT_FALSE(def.triggers[1].input.has_value());
  ASSERT_EQ(def.steps.size(), 10u);

  const eo::step& validate = def.steps[0];
  EXPECT_EQ(validate.kind, step_kind::command);
  EXPECT_EQ(validate.timeout, millis(2000));
  EXPECT_EQ(validate.retry.max_attempts, 5u);
  EXPECT_EQ(validate.retry.initial_interval, millis(100));
  EXPECT_EQ(validate.retry.backoff, 1.5);
  EXPECT_EQ(validate.retry.max_interval, millis(3000));
  EXPECT_EQ(validate.retry.non_retryable, std::vector<std::string>{"invalid_order"});
  EXPECT_EQ(*validate.input, json::parse(R"({"id": "${workflow.input.orderId}"})"));

  const eo::step& charge = def.steps[1];
  ASSERT_TRUE(charge.compensate.has_value());
  EXPECT_EQ(charge.compensate->what, eo::compensation::kind::command);
  EXPECT_EQ(charge.compensate->service, "PaymentService");
  EXPECT_EQ(charge.compensate->action, "refund");
  EXPECT_EQ(charge.compensate->timeout, millis(5000));
  EXPECT_EQ(charge.compensate->retry.max_attempts, 3u);  // commands retry by default
  EXPECT_EQ(charge.compensate->path, "/workflow/steps/1/compensate");
  ASSERT_TRUE(charge.compensate->input.has_value());

  const eo::step& announce = def.steps[2];
  EXPECT_EQ(announce.kind, step_kind::publish);
  EXPECT_EQ(announce.event.topic, "order.charged");
  EXPECT_EQ(announce.event.payload, json::parse(R"({"orderId": "${workflow.input.orderId}"})"));
  EXPECT_EQ(announce.retry.max_attempts, 1u);  // only commands retry by default
  ASSERT_TRUE(announce.compensate.has_value());
  EXPECT_EQ(announce.compensate->what, eo::compensation::kind::event);
  EXPECT_EQ(announce.compensate->event.topic, "order.charge_cancelled");
  EXPECT_TRUE(announce.compensate->event.payload.is_null());

  const eo::step& await = def.steps[3];
  EXPECT_EQ(await.kind, step_kind::await);
  EXPECT_EQ(await.until, std::vector<std::string>{"stock.reserved"});
  EXPECT_EQ(await.match, "${event.payload.orderId} == ${workflow.input.orderId}");
  EXPECT_EQ(await.timeout, millis(30'000));
  EXPECT_EQ(await.on_error.what, eo::on_error_policy::kind::continue_);

  const eo::step& ship = def.steps[4];
  EXPECT_EQ(ship.kind, step_kind::choreography);
  EXPECT_EQ(ship.event.topic, "shipping.requested");
  EXPECT_EQ(ship.event.payload, json::parse(R"({"id": "${workflow.input.orderId}"})"));
  EXPECT_EQ(ship.until, (std::vector<std::string>{"shipping.done", "shipping.partial"}));
  EXPECT_EQ(ship.fail_on, std::vector<std::string>{"shipping.failed"});
  EXPECT_TRUE(ship.match.empty());  // correlated by correlation_id
  EXPECT_EQ(ship.timeout, millis(600'000));

  const eo::step& both = def.steps[5];
  EXPECT_EQ(both.kind, step_kind::parallel);
  ASSERT_EQ(both.branches.size(), 2u);
  ASSERT_EQ(both.branches[0].size(), 2u);
  EXPECT_EQ(both.branches[0][1].name, "Email");
  EXPECT_EQ(both.branches[0][1].path, "/workflow/steps/5/branches/0/1");
  EXPECT_EQ(both.branches[1][0].name, "Points");

  const eo::step& route = def.steps[6];
  EXPECT_EQ(route.kind, step_kind::switch_);
  ASSERT_EQ(route.cases.size(), 2u);
  EXPECT_EQ(route.cases[0].when, "${workflow.input.total} > 1000");
  EXPECT_EQ(route.cases[0].steps[0].name, "Review");
  EXPECT_EQ(route.cases[1].steps[0].kind, step_kind::publish);
  ASSERT_EQ(route.default_steps.size(), 1u);
  EXPECT_EQ(route.default_steps[0].duration, millis(1));
  EXPECT_EQ(route.default_steps[0].path, "/workflow/steps/6/default/0");

  const eo::step& cool = def.steps[7];
  EXPECT_EQ(cool.kind, step_kind::wait);
  EXPECT_EQ(cool.duration, millis(1500));
  EXPECT_EQ(cool.on_error.what, eo::on_error_policy::kind::go_to);
  EXPECT_EQ(cool.on_error.target, "Archive");

  const eo::step& child = def.steps[8];
  EXPECT_EQ(child.kind, step_kind::workflow);
  EXPECT_EQ(child.workflow, "Archiving");
  EXPECT_EQ(*child.input, "${workflow.input}");
  EXPECT_EQ(child.timeout, millis(60'000));
  EXPECT_EQ(child.retry.max_attempts, 2u);

  EXPECT_EQ(def.find("Gift"), &route.cases[1].steps[0]);
  EXPECT_EQ(def.find("Points"), &both.branches[1][0]);
  EXPECT_EQ(def.find("Nothing"), &route.default_steps[0]);
  EXPECT_EQ(def.listened_topics(),
            (std::vector<std::string>{"stock.reserved", "shipping.done", "shipping.partial",
                                      "shipping.failed", "order.placed", "order.retry"}));
  EXPECT_EQ(def.sub_workflows(), std::vector<std::string>{"Archiving"});
}

// ---- document-level mistakes ------------------------------------------------------------------

TEST(DefinitionErrors, DocumentShape) {
  expect_error("[1, 2]", "", {"JSON object", "got an array"});
  expect_error("{}", "", {"missing required key \"workflow\""});
  expect_error(
      R"({"workflows": {}})", "/workflows",
      {"unknown key \"workflows\"", "did you mean \"workflow\"", "allowed keys: workflow"});
  expect_error(R"({"workflow": []})", "/workflow", {"must be an object"});
  expect_error(R"({"workflow": {"steps": [{"name": "A", "service": "S", "action": "a"}]}})",
               "/workflow", {"missing required key \"name\""});
  expect_error(R"({"workflow": {"name": "Order Processing", "steps": []}})", "/workflow/name",
               {"Order Processing", "[A-Za-z0-9_-]"});
  expect_error(R"({"workflow": {"name": "W"}})", "/workflow", {"missing required key \"steps\""});
  expect_error(with_steps("[]"), "/workflow/steps", {"non-empty array of steps"});
  expect_error(with_steps(R"({"name": "A"})"), "/workflow/steps", {"non-empty array of steps"});
  expect_error(with_steps("[42]"), "/workflow/steps/0", {"must be a JSON object", "got 42"});
  expect_error(with_steps(std::string("[") + std::string(k_cmd) + "]", R"("version": 0)"),
               "/workflow/version", {"integer ≥ 1", "got 0"});
  expect_error(with_steps(std::string("[") + std::string(k_cmd) + "]", R"("version": "2")"),
               "/workflow/version", {"integer ≥ 1", "got \"2\""});
  expect_error(with_steps(std::string("[") + std::string(k_cmd) + "]", R"("timeout": "soon")"),
               "/workflow/timeout", {"must be a duration", "got \"soon\""});
  expect_error(with_steps(std::string("[") + std::string(k_cmd) + "]", R"("stepz": [])"),
               "/workflow/stepz",
               {"unknown key \"stepz\"", "did you mean \"steps\"",
                "allowed keys: name, version, steps, output"});
}

// ---- step-level mistakes ----------------------------------------------------------------------

TEST(DefinitionErrors, StepNames) {
  expect_error(with_steps(R"([{"service": "S", "action": "a"}])"), "/workflow/steps/0",
               {"missing required key \"name\""});
  expect_error(with_steps(R"([{"name": 7, "service": "S", "action": "a"}])"),
               "/workflow/steps/0/name", {"must be a string", "got 7"});
  expect_error(with_steps(R"([{"name": "Charge.Payment", "service": "S", "action": "a"}])"),
               "/workflow/steps/0/name", {"Charge.Payment", "[A-Za-z0-9_-]", "${steps.<name>"});
  expect_error(with_steps(R"([{"name": "", "service": "S", "action": "a"}])"),
               "/workflow/steps/0/name", {"1 to 128 characters"});
}

TEST(DefinitionErrors, DuplicateStepNamesNameBothPaths) {
  expect_error(with_steps(R"([{"name": "A", "service": "S", "action": "a"},
                              {"name": "A", "service": "S", "action": "b"}])"),
               "/workflow/steps/1/name",
               {"duplicate step name \"A\"", "/workflow/steps/0", "unique"});
  // Nested steps count too.
  expect_error(with_steps(R"([{"name": "P", "kind": "parallel", "branches": [
                                 [{"name": "X", "service": "S", "action": "a"}],
                                 [{"name": "X", "service": "S", "action": "b"}]]}])"),
               "/workflow/steps/0/branches/1/0/name",
               {"duplicate step name \"X\"", "/workflow/steps/0/branches/0/0"});
  expect_error(with_steps(R"([{"name": "P", "kind": "switch", "cases": [
                                 {"when": "true", "steps": [{"name": "P", "kind": "wait", "duration": 5}]}]}])"),
               "/workflow/steps/0/cases/0/steps/0/name",
               {"duplicate step name \"P\"", "/workflow/steps/0 "});
}

TEST(DefinitionErrors, Kinds) {
  expect_error(with_steps(R"([{"name": "A", "kind": "cmd", "service": "S", "action": "a"}])"),
               "/workflow/steps/0/kind",
               {"unknown step kind \"cmd\"",
                "command, publish, await, choreography, parallel, switch, wait, workflow"});
  expect_error(with_steps(R"([{"name": "A", "topic": "t"}])"), "/workflow/steps/0",
               {"missing required key \"kind\"", "command, publish", "\"service\""});
  expect_error(with_steps(R"([{"name": "A", "kind": 3}])"), "/workflow/steps/0/kind",
               {"must be a string"});
}

TEST(DefinitionErrors, UnknownKeysNameTheKeyAndTheAllowedOnes) {
  expect_error(with_steps(R"([{"name": "A", "servce": "S", "kind": "command", "action": "a"}])"),
               "/workflow/steps/0/servce",
               {"unknown key \"servce\" in a command step", "did you mean \"service\"",
                "allowed keys: name, kind, service, action, input, timeout, retry, compensate, "
                "on_error, description"});
  expect_error(
      with_steps(R"([{"name": "A", "kind": "publish", "topic": "t", "input": {}}])"),
      "/workflow/steps/0/input",
      {"unknown key \"input\" in a publish step", "allowed keys: name, kind, topic, payload"});
  expect_error(with_steps(R"([{"name": "W", "kind": "wait", "duration": "1s", "timeout": "2s"}])"),
               "/workflow/steps/0/timeout", {"unknown key \"timeout\" in a wait step", "duration"});
  expect_error(
      with_steps(
          R"([{"name": "P", "kind": "parallel", "timeout": "2s", "branches": [[{"name": "A", "service": "S", "action": "a"}]]}])"),
      "/workflow/steps/0/timeout",
      {"unknown key \"timeout\" in a parallel step", "steps inside it"});
  expect_error(
      with_steps(
          R"([{"name": "A", "kind": "await", "topic": "t", "timeout": "1s", "payload": 1}])"),
      "/workflow/steps/0/payload", {"unknown key \"payload\" in an await step"});
}

TEST(DefinitionErrors, CommandFields) {
  expect_error(with_steps(R"([{"name": "A", "service": "S"}])"), "/workflow/steps/0",
               {"missing required key \"action\"", "service and an action"});
  expect_error(with_steps(R"([{"name": "A", "kind": "command", "action": "a"}])"),
               "/workflow/steps/0", {"missing required key \"service\""});
  expect_error(with_steps(R"([{"name": "A", "service": "Order Service", "action": "a"}])"),
               "/workflow/steps/0/service", {"service 'Order Service'", "printable ASCII"});
  expect_error(with_steps(R"([{"name": "A", "service": "S", "action": ""}])"),
               "/workflow/steps/0/action", {"action is empty"});
  expect_error(with_steps(R"([{"name": "A", "service": ["S"], "action": "a"}])"),
               "/workflow/steps/0/service", {"must be a string", "got an array"});
}

TEST(DefinitionErrors, EventStepFields) {
  expect_error(with_steps(R"([{"name": "A", "kind": "publish", "topic": "order..created"}])"),
               "/workflow/steps/0/topic", {"empty segment"});
  expect_error(with_steps(R"([{"name": "A", "kind": "publish"}])"), "/workflow/steps/0",
               {"missing required key \"topic\""});
  expect_error(with_steps(R"([{"name": "A", "kind": "await", "topic": "stock.reserved"}])"),
               "/workflow/steps/0", {"missing required key \"timeout\"", "how long to wait"});
  expect_error(with_steps(R"([{"name": "A", "kind": "await", "topic": "t", "timeout": "0s"}])"),
               "/workflow/steps/0/timeout", {"greater than 0"});
  expect_error(
      with_steps(R"([{"name": "A", "kind": "await", "topic": "t", "timeout": "1s", "match": ""}])"),
      "/workflow/steps/0/match", {"must be a condition", "empty string"});
  expect_error(with_steps(R"([{"name": "C", "kind": "choreography", "start": {"topic": "a"},
                              "until": ["b"]}])"),
               "/workflow/steps/0", {"missing required key \"timeout\""});
  expect_error(with_steps(R"([{"name": "C", "kind": "choreography", "start": {"topic": "a"},
                              "timeout": "1s"}])"),
               "/workflow/steps/0", {"missing required key \"until\""});
  expect_error(with_steps(R"([{"name": "C", "kind": "choreography", "start": {"topic": "a"},
                              "until": [], "timeout": "1s"}])"),
               "/workflow/steps/0/until", {"non-empty array of topics"});
  expect_error(with_steps(R"([{"name": "C", "kind": "choreography", "start": {"topic": "a"},
                              "until": ["b", "c"], "fail_on": ["c"], "timeout": "1s"}])"),
               "/workflow/steps/0/until/1", {"\"c\"", "both \"until\" and \"fail_on\""});
  expect_error(with_steps(R"([{"name": "C", "kind": "choreography", "start": {"topic": "a"},
                              "until": ["a"], "timeout": "1s"}])"),
               "/workflow/steps/0/until/0", {"start topic"});
  expect_error(
      with_steps(R"([{"name": "C", "kind": "choreography", "start": {"topic": "a", "body": 1},
                              "until": ["b"], "timeout": "1s"}])"),
      "/workflow/steps/0/start/body", {"unknown key \"body\"", "allowed keys: topic, payload"});
  expect_error(with_steps(R"([{"name": "C", "kind": "choreography", "start": "a",
                              "until": ["b"], "timeout": "1s"}])"),
               "/workflow/steps/0/start", {"must be an object"});
  expect_error(with_steps(R"([{"name": "C", "kind": "choreography", "start": {"topic": "a"},
                              "until": ["b", 4], "timeout": "1s"}])"),
               "/workflow/steps/0/until/1", {"must be a string"});
}

TEST(Definition, FromListsWhoMayCompleteAnAwaitOrAChoreography) {
  const auto def = parse(with_steps(R"([
    {"name": "A", "kind": "await", "topic": "t.a", "timeout": "1s", "from": ["shipping"]},
    {"name": "C", "kind": "choreography", "start": {"topic": "c.start"}, "until": ["c.done"],
     "timeout": "1s", "from": ["shipping", "shipping-eu"]},
    {"name": "D", "kind": "await", "topic": "t.d", "timeout": "1s"}])"));
  EXPECT_EQ(def.steps[0].from, std::vector<std::string>{"shipping"});
  EXPECT_EQ(def.steps[1].from, (std::vector<std::string>{"shipping", "shipping-eu"}));
  EXPECT_TRUE(def.steps[2].from.empty()) << "no \"from\": anyone";
}

TEST(DefinitionErrors, FromOnlyOnAwaitAndChoreographyAndOnlyNames) {
  expect_error(with_steps(R"([{"name": "A", "service": "S", "action": "a", "from": ["x"]}])"),
               "/workflow/steps/0/from",
               {"unknown key \"from\" in a command step", "only await and choreography"});
  expect_error(with_steps(R"([{"name": "A", "kind": "publish", "topic": "t", "from": ["x"]}])"),
               "/workflow/steps/0/from", {"unknown key \"from\" in a publish step"});
  expect_error(with_steps(R"([{"name": "W", "kind": "wait", "duration": "1s", "from": ["x"]}])"),
               "/workflow/steps/0/from", {"unknown key \"from\"", "only await and choreography"});
  expect_error(
      with_steps(R"([{"name": "A", "kind": "await", "topic": "t", "timeout": "1s", "from": []}])"),
      "/workflow/steps/0/from", {"non-empty array of publisher names"});
  expect_error(
      with_steps(R"([{"name": "A", "kind": "await", "topic": "t", "timeout": "1s", "from": "x"}])"),
      "/workflow/steps/0/from", {"non-empty array of publisher names", "got \"x\""});
  expect_error(with_steps(R"([{"name": "A", "kind": "await", "topic": "t", "timeout": "1s",
                               "from": ["ok", 7]}])"),
               "/workflow/steps/0/from/1", {"must be a string"});
  expect_error(with_steps(R"([{"name": "A", "kind": "await", "topic": "t", "timeout": "1s",
                               "from": ["two words"]}])"),
               "/workflow/steps/0/from/0", {"publisher name", "without spaces"});
  expect_error(with_steps(R"([{"name": "C", "kind": "choreography", "start": {"topic": "a"},
                               "until": ["b"], "timeout": "1s", "from": ["x", ""]}])"),
               "/workflow/steps/0/from/1", {"publisher name is empty"});
  expect_error(with_steps(R"([{"name": "C", "kind": "choreography", "start": {"topic": "a"},
                               "until": ["b"], "timeout": "1s", "from": ["x", "x"]}])"),
               "/workflow/steps/0/from/1", {"\"x\" is listed twice"});
}

TEST(DefinitionErrors, GroupStepFields) {
  expect_error(with_steps(R"([{"name": "P", "kind": "parallel", "branches": []}])"),
               "/workflow/steps/0/branches", {"non-empty array of branches"});
  expect_error(with_steps(R"([{"name": "P", "kind": "parallel", "branches": [[]]}])"),
               "/workflow/steps/0/branches/0", {"non-empty array of steps"});
  expect_error(with_steps(R"([{"name": "P", "kind": "parallel"}])"), "/workflow/steps/0",
               {"missing required key \"branches\""});
  expect_error(with_steps(R"([{"name": "S", "kind": "switch", "cases": []}])"),
               "/workflow/steps/0/cases", {"non-empty array"});
  expect_error(
      with_steps(
          R"([{"name": "S", "kind": "switch", "cases": [{"steps": [{"name": "A", "service": "S", "action": "a"}]}]}])"),
      "/workflow/steps/0/cases/0", {"missing required key \"when\""});
  expect_error(
      with_steps(
          R"([{"name": "S", "kind": "switch", "cases": [{"when": "true", "steps": [{"name": "A", "service": "S", "action": "a"}], "then": 1}]}])"),
      "/workflow/steps/0/cases/0/then", {"unknown key \"then\" in a switch case"});
  expect_error(
      with_steps(
          R"([{"name": "S", "kind": "switch", "cases": [{"when": "true", "steps": [{"name": "A", "service": "S", "action": "a"}]}], "default": []}])"),
      "/workflow/steps/0/default", {"non-empty array of steps"});
  expect_error(with_steps(R"([{"name": "W", "kind": "wait"}])"), "/workflow/steps/0",
               {"missing required key \"duration\""});
  expect_error(with_steps(R"([{"name": "W", "kind": "wait", "duration": 0}])"),
               "/workflow/steps/0/duration", {"greater than 0"});
  expect_error(with_steps(R"([{"name": "W", "kind": "wait", "duration": "5 s"}])"),
               "/workflow/steps/0/duration", {"must be a duration such as", "got \"5 s\""});
  expect_error(with_steps(R"([{"name": "C", "kind": "workflow"}])"), "/workflow/steps/0",
               {"missing required key \"workflow\""});
}

TEST(DefinitionErrors, Retry) {
  // The example of the format's reference.
  expect_error(with_steps(R"([{"name": "A", "service": "S", "action": "a"},
                              {"name": "B", "service": "S", "action": "b"},
                              {"name": "C", "service": "S", "action": "c", "retry": {"backoff": "fast"}}])"),
               "/workflow/steps/2/retry/backoff", {"must be a number ≥ 1.0, got \"fast\""});
  expect_error(
      with_steps(R"([{"name": "A", "service": "S", "action": "a", "retry": {"backoff": 0.5}}])"),
      "/workflow/steps/0/retry/backoff", {"≥ 1.0", "got 0.5"});
  expect_error(
      with_steps(R"([{"name": "A", "service": "S", "action": "a", "retry": {"max_attempts": 0}}])"),
      "/workflow/steps/0/retry/max_attempts", {"integer from 1 to 100", "got 0"});
  expect_error(
      with_steps(
          R"([{"name": "A", "service": "S", "action": "a", "retry": {"max_attempts": 101}}])"),
      "/workflow/steps/0/retry/max_attempts", {"integer from 1 to 100"});
  expect_error(
      with_steps(
          R"([{"name": "A", "service": "S", "action": "a", "retry": {"max_attempts": 2.5}}])"),
      "/workflow/steps/0/retry/max_attempts", {"integer from 1 to 100", "got 2.5"});
  expect_error(
      with_steps(
          R"([{"name": "A", "service": "S", "action": "a", "retry": {"initial_interval": "2m"}}])"),
      "/workflow/steps/0/retry/initial_interval",
      {"max_interval (10s) is shorter than initial_interval (2m)"});
  expect_error(
      with_steps(
          R"([{"name": "A", "service": "S", "action": "a", "retry": {"max_intervall": "1s"}}])"),
      "/workflow/steps/0/retry/max_intervall",
      {"unknown key \"max_intervall\" in retry", "did you mean \"max_interval\""});
  expect_error(
      with_steps(
          R"([{"name": "A", "service": "S", "action": "a", "retry": {"non_retryable": "x"}}])"),
      "/workflow/steps/0/retry/non_retryable", {"array of error codes"});
  expect_error(with_steps(R"([{"name": "A", "service": "S", "action": "a", "retry": 3}])"),
               "/workflow/steps/0/retry", {"must be an object"});
  // A given retry starts from the kind's defaults.
  const auto def =
      parse(with_steps(R"([{"name": "A", "service": "S", "action": "a", "retry": {"backoff": 3}},
                                        {"name": "P", "kind": "publish", "topic": "t", "retry": {"backoff": 3}}])"));
  EXPECT_EQ(def.steps[0].retry.max_attempts, 3u);
  EXPECT_EQ(def.steps[0].retry.backoff, 3.0);
  EXPECT_EQ(def.steps[1].retry.max_attempts, 1u);
}

TEST(DefinitionErrors, Compensate) {
  expect_error(
      with_steps(
          R"([{"name": "A", "service": "S", "action": "a", "compensate": {"service": "S"}}])"),
      "/workflow/steps/0/compensate", {"missing required key \"action\""});
  expect_error(with_steps(R"([{"name": "A", "service": "S", "action": "a", "compensate": {}}])"),
               "/workflow/steps/0/compensate", {"\"service\"", "\"publish\""});
  expect_error(
      with_steps(R"([{"name": "A", "service": "S", "action": "a", "compensate": "undo"}])"),
      "/workflow/steps/0/compensate", {"must be", "got \"undo\""});
  expect_error(
      with_steps(
          R"([{"name": "A", "service": "S", "action": "a", "compensate": {"publish": {"topic": "a b"}}}])"),
      "/workflow/steps/0/compensate/publish/topic", {"character outside"});
  expect_error(
      with_steps(
          R"([{"name": "A", "service": "S", "action": "a", "compensate": {"publish": {"topic": "t"}, "service": "S"}}])"),
      "/workflow/steps/0/compensate/service", {"unknown key \"service\" in a compensating event"});
  expect_error(
      with_steps(
          R"([{"name": "A", "service": "S", "action": "a", "compensate": {"service": "S", "action": "u", "timeout": "x"}}])"),
      "/workflow/steps/0/compensate/timeout", {"must be a duration"});
}

TEST(DefinitionErrors, OnError) {
  expect_error(
      with_steps(R"([{"name": "A", "service": "S", "action": "a", "on_error": "ignore"}])"),
      "/workflow/steps/0/on_error", {"\"fail\", \"continue\"", "goto", "got \"ignore\""});
  expect_error(
      with_steps(R"([{"name": "A", "service": "S", "action": "a", "on_error": {"jump": "B"}},
                              {"name": "B", "service": "S", "action": "b"}])"),
      "/workflow/steps/0/on_error/jump", {"unknown key \"jump\"", "allowed keys: goto"});
  // Backward jumps could loop.
  expect_error(with_steps(R"([{"name": "A", "service": "S", "action": "a"},
                              {"name": "B", "service": "S", "action": "b", "on_error": {"goto": "A"}}])"),
               "/workflow/steps/1/on_error/goto",
               {"step \"A\" (at /workflow/steps/0) comes before this step", "only jump forward"});
  expect_error(
      with_steps(R"([{"name": "A", "service": "S", "action": "a", "on_error": {"goto": "A"}}])"),
      "/workflow/steps/0/on_error/goto", {"cannot go to itself", "only jump forward"});
  expect_error(
      with_steps(R"([{"name": "A", "service": "S", "action": "a", "on_error": {"goto": "Z"}}])"),
      "/workflow/steps/0/on_error/goto", {"no step named \"Z\""});
  expect_error(with_steps(R"([{"name": "P", "kind": "parallel", "branches": [
                                [{"name": "A", "service": "S", "action": "a", "on_error": {"goto": "B"}}]]},
                              {"name": "B", "service": "S", "action": "b"}])"),
               "/workflow/steps/0/branches/0/0/on_error/goto",
               {"step \"B\" (at /workflow/steps/1) is not in the same sequence", "later step"});
  // Forward, in the same (nested) sequence: fine.
  const auto def = parse(with_steps(R"([{"name": "P", "kind": "parallel", "branches": [
      [{"name": "A", "service": "S", "action": "a", "on_error": {"goto": "C"}},
       {"name": "B", "service": "S", "action": "b"}, {"name": "C", "service": "S", "action": "c"}]]}])"));
  EXPECT_EQ(def.find("A")->on_error.target, "C");
}

TEST(DefinitionErrors, Expressions) {
  expect_error(with_steps(R"([{"name": "A", "service": "S", "action": "a",
                              "input": {"order": {"id": "${workflow.input.id"}}}])"),
               "/workflow/steps/0/input/order/id", {"invalid expression", "unterminated"});
  expect_error(with_steps(R"([{"name": "A", "kind": "await", "topic": "t", "timeout": "1s",
                              "match": "${event.payload.id} = ${workflow.input.id}"}])"),
               "/workflow/steps/0/match",
               {"invalid condition", "'=' is not an operator; compare with =="});
  expect_error(
      with_steps(
          R"([{"name": "S", "kind": "switch", "cases": [{"when": "${workflow.input.x} >", "steps": [
                                {"name": "A", "service": "S", "action": "a"}]}]}])"),
      "/workflow/steps/0/cases/0/when", {"invalid condition", "expected a value"});
  expect_error(
      with_steps(R"([{"name": "A", "service": "S", "action": "a", "input": "${input.id}"}])"),
      "/workflow/steps/0/input", {"unknown root \"input\"", "workflow or steps"});
  expect_error(
      with_steps(
          R"([{"name": "A", "service": "S", "action": "a", "input": "${workflow.inputs}"}])"),
      "/workflow/steps/0/input", {"no field \"inputs\"", "workflow.input"});
  expect_error(with_steps(R"([{"name": "A", "service": "S", "action": "a"},
                              {"name": "B", "service": "S", "action": "b", "input": ["${steps.A.result}"]}])"),
               "/workflow/steps/1/input/0", {"no field \"result\"", "steps.<name>.output"});
}

TEST(DefinitionErrors, StepReferences) {
  // Unknown step.
  expect_error(
      with_steps(
          R"([{"name": "A", "service": "S", "action": "a", "input": {"x": "${steps.Nope.output}"}}])"),
      "/workflow/steps/0/input/x", {"step \"Nope\"", "does not exist"});
  // Later step.
  expect_error(
      with_steps(
          R"([{"name": "A", "service": "S", "action": "a", "input": "id ${steps.B.output.id}"},
                              {"name": "B", "service": "S", "action": "b"}])"),
      "/workflow/steps/0/input", {"step \"B\" (at /workflow/steps/1)", "does not complete before"});
  // Itself.
  expect_error(
      with_steps(R"([{"name": "A", "service": "S", "action": "a", "input": "${steps.A.output}"}])"),
      "/workflow/steps/0/input", {"the step itself"});
  // A sibling parallel branch.
  expect_error(with_steps(R"([{"name": "P", "kind": "parallel", "branches": [
                                [{"name": "X", "service": "S", "action": "a"}],
                                [{"name": "Y", "service": "S", "action": "b", "input": "${steps.X.output}"}]]}])"),
               "/workflow/steps/0/branches/1/0/input", {"step \"X\"", "another parallel branch"});
  // The group itself, from inside.
  expect_error(with_steps(R"([{"name": "P", "kind": "parallel", "branches": [
                                [{"name": "X", "service": "S", "action": "a", "input": "${steps.P.output}"}]]}])"),
               "/workflow/steps/0/branches/0/0/input", {"step \"P\"", "does not complete before"});
  // A switch condition cannot use the steps of its own cases.
  expect_error(
      with_steps(
          R"([{"name": "S", "kind": "switch", "cases": [{"when": "${steps.A.output}", "steps": [
                                {"name": "A", "service": "S", "action": "a"}]}]}])"),
      "/workflow/steps/0/cases/0/when", {"step \"A\"", "does not complete before"});
  // Earlier steps, of this sequence and of enclosing ones, and completed groups: fine.
  EXPECT_NO_THROW(parse(with_steps(R"([
      {"name": "A", "service": "S", "action": "a"},
      {"name": "P", "kind": "parallel", "branches": [
        [{"name": "X", "service": "S", "action": "x", "input": "${steps.A.output}"},
         {"name": "X2", "service": "S", "action": "x", "input": "${steps.X.output} ${steps.A.error}"}],
        [{"name": "Y", "service": "S", "action": "y", "input": "${steps.A.attempts}"}]]},
      {"name": "B", "service": "S", "action": "b",
       "input": {"x": "${steps.X2.output}", "y": "${steps.Y.output}", "p": "${steps.P}",
                 "all": "${steps}", "wf": "${workflow}"}}])")));
  // The output may use any step; a compensation may use its own step.
  EXPECT_NO_THROW(parse(with_steps(
      R"([{"name": "A", "service": "S", "action": "a",
           "compensate": {"service": "S", "action": "undo", "input": "${steps.A.output.id}"}},
          {"name": "B", "service": "S", "action": "b"}])",
      R"("output": {"a": "${steps.A.output}", "b": "${steps.B.output}"})")));
  expect_error(with_steps(std::string("[") + std::string(k_cmd) + "]",
                          R"("output": "${steps.Missing.output}")"),
               "/workflow/output", {"step \"Missing\"", "does not exist"});
}

TEST(DefinitionErrors, EventOnlyInMatchesAndTriggers) {
  expect_error(
      with_steps(R"([{"name": "A", "service": "S", "action": "a", "input": "${event.payload}"}])"),
      "/workflow/steps/0/input", {"${event.payload}", "only available in the \"match\""});
  expect_error(
      with_steps(R"([{"name": "S", "kind": "switch", "cases": [{"when": "${event.x}", "steps": [
                                {"name": "A", "service": "S", "action": "a"}]}]}])"),
      "/workflow/steps/0/cases/0/when", {"only available in the \"match\""});
  expect_error(
      with_steps(
          R"([{"name": "C", "kind": "choreography", "start": {"topic": "a", "payload": "${event.id}"},
                              "until": ["b"], "timeout": "1s"}])"),
      "/workflow/steps/0/start/payload", {"only available"});
  expect_error(
      with_steps(std::string("[") + std::string(k_cmd) + "]", R"("output": "${event.payload}")"),
      "/workflow/output", {"only available"});
  EXPECT_NO_THROW(
      parse(with_steps(R"([{"name": "C", "kind": "choreography", "start": {"topic": "a"},
      "until": ["b"], "timeout": "1s", "match": "${event.payload.id} == ${workflow.id}"}])")));
}

TEST(DefinitionErrors, Triggers) {
  const std::string steps = std::string("[") + std::string(k_cmd) + "]";
  expect_error(with_steps(steps, R"("triggers": {"topic": "a"})"), "/workflow/triggers",
               {"must be an array"});
  expect_error(with_steps(steps, R"("triggers": [{"match": "true"}])"), "/workflow/triggers/0",
               {"missing required key \"topic\""});
  expect_error(with_steps(steps, R"("triggers": [{"topic": "order.*"}])"),
               "/workflow/triggers/0/topic", {"character outside"});
  expect_error(with_steps(steps, R"("triggers": [{"topic": "a", "filter": "true"}])"),
               "/workflow/triggers/0/filter", {"unknown key \"filter\" in a trigger"});
  expect_error(
      with_steps(steps, R"("triggers": [{"topic": "a", "input": {"id": "${workflow.id}"}}])"),
      "/workflow/triggers/0/input/id", {"before the instance exists", "${event"});
  expect_error(with_steps(steps, R"("triggers": [{"topic": "a", "match": "${steps.A.output}"}])"),
               "/workflow/triggers/0/match", {"before the instance exists"});
  expect_error(with_steps(steps, R"("triggers": [{"topic": "a", "match": "${evnt.x}"}])"),
               "/workflow/triggers/0/match", {"unknown root \"evnt\"", "starts with event"});
}

// ---- durations and retry delays ---------------------------------------------------------------

TEST(Duration, Parses) {
  EXPECT_EQ(eo::parse_duration("250ms"), millis(250));
  EXPECT_EQ(eo::parse_duration("2s"), millis(2000));
  EXPECT_EQ(eo::parse_duration("1.5s"), millis(1500));
  EXPECT_EQ(eo::parse_duration("0.25s"), millis(250));
  EXPECT_EQ(eo::parse_duration("1m"), millis(60'000));
  EXPECT_EQ(eo::parse_duration("1.5m"), millis(90'000));
  EXPECT_EQ(eo::parse_duration("1h"), millis(3'600'000));
  EXPECT_EQ(eo::parse_duration("0s"), millis(0));
  EXPECT_EQ(eo::parse_duration(1500), millis(1500));
  EXPECT_EQ(eo::parse_duration(0), millis(0));
  EXPECT_EQ(eo::parse_duration(json(std::uint64_t{42})), millis(42));
}

TEST(Duration, RejectsEverythingElse) {
  for (const json& bad :
       {json("fast"), json(""),      json("5"),      json("5 s"),    json(" 5s"),
        json("-1s"),  json("1.s"),   json(".5s"),    json("1.2.3s"), json("5sec"),
        json("1d"),   json("2S"),    json("1e3ms"),  json(-5),       json(1.5),
        json(true),   json(nullptr), json::object(), json::array(),  json("99999999999h")}) {
    EXPECT_FALSE(eo::parse_duration(bad).has_value()) << bad.dump();
  }
}

TEST(Retry, DelaysGrowByBackoffUpToTheCap) {
  eo::retry_policy r;
  r.initial_interval = millis(200);
  r.backoff = 2.0;
  r.max_interval = millis(1000);
  EXPECT_EQ(r.delay_after(1), millis(200));
  EXPECT_EQ(r.delay_after(2), millis(400));
  EXPECT_EQ(r.delay_after(3), millis(800));
  EXPECT_EQ(r.delay_after(4), millis(1000));
  EXPECT_EQ(r.delay_after(60), millis(1000));
  EXPECT_EQ(r.delay_after(4'000'000'000u), millis(1000));  // no overflow
  r.backoff = 1.0;
  EXPECT_EQ(r.delay_after(5), millis(200));
  r.backoff = 1.5;
  r.initial_interval = millis(100);
  EXPECT_EQ(r.delay_after(3), millis(225));
  r.initial_interval = millis(0);
  EXPECT_EQ(r.delay_after(3), millis(0));
}

TEST(Retry, WhichErrorsRetry) {
  eo::retry_policy r;
  r.non_retryable = {"card_declined", "worker_lost"};
  EXPECT_TRUE(r.allows("no_such_service", false));  // broker errors retry by default
  EXPECT_TRUE(r.allows("deadline_exceeded", false));
  EXPECT_FALSE(r.allows("worker_lost", true));  // ... unless listed
  EXPECT_TRUE(r.allows("out_of_stock", true));  // the agent said so
  EXPECT_FALSE(r.allows("out_of_stock", false));
  EXPECT_FALSE(r.allows("card_declined", true));
}

// ---- files ------------------------------------------------------------------------------------

class DefinitionFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    static std::atomic<int> counter{0};
    std::random_device rd;
    dir_ = fs::temp_directory_path() / ("ensemble-defs-" + std::to_string(::getpid()) + "-" +
                                        std::to_string(counter++) + "-" + std::to_string(rd()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string write(const std::string& relative, std::string_view text) {
    const fs::path p = dir_ / relative;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
    return p.string();
  }
  static std::string named(std::string_view name, int version = 1, std::string_view step = k_cmd) {
    return R"({"workflow": {"name": ")" + std::string(name) + R"(", "version": )" +
           std::to_string(version) + R"(, "steps": [)" + std::string(step) + "]}}";
  }
  fs::path dir_;
};

TEST_F(DefinitionFiles, LoadsAFile) {
  const std::string path = write("orders.json", k_seed);
  const eo::definition def = eo::load_definition_file(path);
  EXPECT_EQ(def.name, "OrderProcessing");
  EXPECT_EQ(def.source, path);
  EXPECT_EQ(def.steps.size(), 3u);
}

TEST_F(DefinitionFiles, ValidationErrorsNameTheFile) {
  const std::string path =
      write("bad.json",
            with_steps(
                R"([{"name": "A", "service": "S", "action": "a", "retry": {"backoff": "fast"}}])"));
  try {
    eo::load_definition_file(path);
    FAIL() << "no error";
  } catch (const config_error& e) {
    EXPECT_EQ(e.where(), path + ": /workflow/steps/0/retry/backoff");
    EXPECT_TRUE(contains(e.what(), "must be a number ≥ 1.0, got \"fast\""));
  }
}

TEST_F(DefinitionFiles, JsonSyntaxErrorsNameLineAndColumn) {
  const std::string path = write("broken.json",
                                 "{\"workflow\": {\n"
                                 "  \"name\": \"W\",\n"
                                 "  \"steps\": [}\n"
                                 "}}\n");
  try {
    eo::load_definition_file(path);
    FAIL() << "no error";
  } catch (const config_error& e) {
    EXPECT_EQ(e.where(), path + ":3:13");
    EXPECT_TRUE(contains(e.what(), "invalid JSON"));
    EXPECT_TRUE(contains(e.what(), "unexpected '}'"));
    EXPECT_FALSE(contains(e.what(), "[json.exception"));
  }
  const std::string empty = write("empty.json", "");
  EXPECT_TRUE(
      contains(error_of([&] { eo::load_definition_file(empty); }), empty + ":1:1: invalid JSON"));
}

TEST_F(DefinitionFiles, MissingFilesAndPaths) {
  const std::string missing = (dir_ / "nope.json").string();
  EXPECT_TRUE(
      contains(error_of([&] { eo::load_definition_file(missing); }), missing + ": cannot open"));
  EXPECT_TRUE(contains(error_of([&] { eo::load_definitions({missing}); }),
                       missing + ": no such file or directory"));
  EXPECT_TRUE(
      contains(error_of([&] { eo::load_definition_file(dir_.string()); }), "is a directory"));
}

TEST_F(DefinitionFiles, LoadsDirectoriesSortedAndFiles) {
  write("defs/b.json", named("Beta"));
  write("defs/a.json", named("Alpha"));
  write("defs/notes.txt", "not json");
  write("defs/c.json",
        named("Gamma", 1, R"({"name": "G", "kind": "workflow", "workflow": "Alpha"})"));
  const std::string extra = write("extra/one.json", named("Alpha", 2));
  const auto defs = eo::load_definitions({(dir_ / "defs").string(), extra});
  ASSERT_EQ(defs.size(), 4u);
  EXPECT_EQ(defs[0].name, "Alpha");
  EXPECT_EQ(defs[1].name, "Beta");
  EXPECT_EQ(defs[2].name, "Gamma");
  EXPECT_EQ(defs[3].name, "Alpha");
  EXPECT_EQ(defs[3].version, 2u);
  EXPECT_EQ(defs[0].source, (dir_ / "defs" / "a.json").string());
  EXPECT_TRUE(eo::load_definitions({(dir_ / "extra").string(), (dir_ / "defs" / "a.json").string()})
                  .size() == 2);
}

TEST_F(DefinitionFiles, DuplicateNameAndVersionNamesBothFiles) {
  const std::string a = write("a.json", named("Orders"));
  const std::string b = write("b.json", named("Orders"));
  const std::string msg = error_of([&] { eo::load_definitions({dir_.string()}); });
  EXPECT_TRUE(contains(msg, b + ": /workflow/name"));
  EXPECT_TRUE(contains(msg, "workflow \"Orders\" version 1 is also defined in " + a));
}

TEST_F(DefinitionFiles, SubWorkflowsMustExistAndNotLoop) {
  const std::string parent = write(
      "p.json", named("Parent", 1, R"({"name": "Kid", "kind": "workflow", "workflow": "Child"})"));
  std::string msg = error_of([&] { eo::load_definitions({parent}); });
  EXPECT_TRUE(contains(msg, parent + ": /workflow/steps/0/workflow"));
  EXPECT_TRUE(contains(msg, "no definition provides workflow \"Child\""));
  EXPECT_TRUE(contains(msg, "loaded: Parent"));

  const std::string child = write(
      "c.json", named("Child", 1, R"({"name": "Back", "kind": "workflow", "workflow": "Parent"})"));
  msg = error_of([&] { eo::load_definitions({parent, child}); });
  EXPECT_TRUE(contains(msg, "sub-workflows form a cycle"));
  EXPECT_TRUE(contains(msg, "Child -> Parent -> Child"));

  // check_definition_set works on definitions built otherwise, too.
  const auto p = eo::parse_definition(
      json::parse(
          named("Parent", 1, R"({"name": "Kid", "kind": "workflow", "workflow": "Child"})")),
      "<inline>");
  const auto c = eo::parse_definition(json::parse(named("Child")), "<inline>");
  EXPECT_NO_THROW(eo::check_definition_set({p, c}));
  EXPECT_THROW(eo::check_definition_set({p}), config_error);
}

// ---- every problem in one pass --------------------------------------------------------------

// The problems a definition has, as "<where>: <message>" lines, in file order.
std::vector<ensemble::common::diagnostic> problems_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const config_error& e) {
    return ensemble::common::diagnostics_of(e);
  }
  ADD_FAILURE() << "no config_error";
  return {};
}

TEST(DefinitionErrors, EveryProblemOfADocumentIsReportedInOneRun) {
  // A duplicate step name and a bad duration in another step: both, in document order.
  const auto both = problems_of([] {
    parse(with_steps(R"([{"name": "A", "service": "S", "action": "a"},
                         {"name": "A", "service": "S", "action": "b"},
                         {"name": "B", "kind": "wait", "duration": "soon"}])"));
  });
  ASSERT_EQ(both.size(), 2u);
  EXPECT_EQ(both[0].where, "orders.json: /workflow/steps/1/name");
  EXPECT_TRUE(contains(both[0].message, "duplicate step name \"A\""));
  EXPECT_EQ(both[1].where, "orders.json: /workflow/steps/2/duration");
  EXPECT_TRUE(contains(both[1].message, "got \"soon\""));

  // In one step too, and the exception's message has one line per problem.
  const std::string text = error_of([] {
    parse(with_steps(R"([{"name": "A", "service": "S", "action": "a"},
        {"name": "A", "service": "S", "action": "b", "timeout": "-1s", "retri": {}}])"));
  });
  EXPECT_TRUE(contains(text, "orders.json: /workflow/steps/1/name: duplicate step name"));
  EXPECT_TRUE(contains(text, "\norders.json: /workflow/steps/1/retri: unknown key \"retri\""));
  EXPECT_TRUE(contains(text, "did you mean \"retry\""));
  EXPECT_TRUE(contains(text, "\norders.json: /workflow/steps/1/timeout: must be a duration"));

  // Problems of the first pass and of the expressions, sorted by path (indexes as numbers).
  const auto sorted = problems_of([] {
    parse(with_steps(R"([{"name": "A", "service": "S", "action": "a"},
        {"name": "B", "service": "S", "action": "a"},
        {"name": "C", "service": "S", "action": "a", "input": "${steps.Z}"},
        {"name": "D", "service": "S", "action": "a"}, {"name": "E", "service": "S", "action": "a"},
        {"name": "F", "service": "S", "action": "a"}, {"name": "G", "service": "S", "action": "a"},
        {"name": "H", "service": "S", "action": "a"}, {"name": "I", "service": "S", "action": "a"},
        {"name": "J", "service": "S", "action": "a"}, {"name": "K", "kind": "wait"}])",
                     R"("timeout": 0)"));
  });
  ASSERT_EQ(sorted.size(), 3u);
  EXPECT_EQ(sorted[0].where, "orders.json: /workflow/steps/2/input");
  EXPECT_EQ(sorted[1].where, "orders.json: /workflow/steps/10");
  EXPECT_EQ(sorted[2].where, "orders.json: /workflow/timeout");
}

TEST(DefinitionErrors, ATypoIsNamedEvenWhenItLeavesTheStepWithoutAKind) {
  // "servce": without "service" the step has no kind, but the typo is what to fix.
  const auto typo =
      problems_of([] { parse(with_steps(R"([{"name": "A", "servce": "S", "action": "a"}])")); });
  ASSERT_EQ(typo.size(), 1u);
  EXPECT_EQ(typo[0].where, "orders.json: /workflow/steps/0/servce");
  EXPECT_TRUE(contains(typo[0].message, "unknown key \"servce\""));
  EXPECT_TRUE(contains(typo[0].message, "did you mean \"service\"?"));
  EXPECT_FALSE(contains(typo[0].message, "missing required key \"kind\""));
  // "knd" too; with nothing close, the missing kind is the problem.
  expect_error(with_steps(R"([{"name": "A", "knd": "wait", "duration": 5}])"),
               "/workflow/steps/0/knd", {"did you mean \"kind\"?"});
  expect_error(with_steps(R"([{"name": "A", "topic": "a.b"}])"), "/workflow/steps/0",
               {"missing required key \"kind\""});
  // A misspelt kind is suggested, too.
  expect_error(with_steps(R"([{"name": "A", "kind": "wiat", "duration": 5}])"),
               "/workflow/steps/0/kind", {"unknown step kind \"wiat\"", "did you mean \"wait\"?"});
}

TEST_F(DefinitionFiles, ProblemsOfAFileNameTheirLineAndColumnInFileOrder) {
  const std::string path = write("two.json",
                                 "{\"workflow\": {\"name\": \"W\", \"timeout\": \"soon\",\n"
                                 "  \"steps\": [\n"
                                 "    {\"name\": \"A\", \"kind\": \"wait\", \"duration\": 0},\n"
                                 "    {\"name\": \"A\", \"kind\": \"wait\", \"duration\": 5}]}}\n");
  const auto found = problems_of([&] { eo::load_definition_file(path); });
  ASSERT_EQ(found.size(), 3u);
  EXPECT_EQ(found[0].where, path + ": /workflow/timeout");
  EXPECT_TRUE(contains(found[0].message, "(line 1, column 28)"));
  EXPECT_EQ(found[1].where, path + ": /workflow/steps/0/duration");
  EXPECT_TRUE(contains(found[1].message, "(line 3, column 35)"));
  EXPECT_EQ(found[2].where, path + ": /workflow/steps/1/name");
  EXPECT_TRUE(contains(found[2].message, "(line 4, column 6)"));
}

TEST_F(DefinitionFiles, AMissingSubWorkflowIsAProblemOfASingleFile) {
  const auto p = eo::parse_definition(
      json::parse(
          named("Parent", 1, R"({"name": "Kid", "kind": "workflow", "workflow": "Shiping"})")),
      "p.json");
  const auto alone = eo::definition_set_problems({p});
  ASSERT_EQ(alone.size(), 1u);
  EXPECT_EQ(alone[0].where, "p.json: /workflow/steps/0/workflow");
  EXPECT_TRUE(contains(alone[0].message, "no definition provides workflow \"Shiping\""));
  // Provided elsewhere (a deployment's workflows): no problem.
  EXPECT_TRUE(eo::definition_set_problems({p}, {"Shiping"}).empty());
  const auto s = eo::parse_definition(json::parse(named("Shipping")), "s.json");
  const auto close = eo::definition_set_problems({p, s});
  ASSERT_EQ(close.size(), 1u);
  EXPECT_TRUE(contains(close[0].message, "did you mean \"Shipping\"?"));
}

// ---- the reference ----------------------------------------------------------------------------

// Every complete definition in docs/workflows.md is valid, so the examples stay runnable.
TEST(WorkflowsDoc, EveryExampleDefinitionIsValid) {
  const std::string path = std::string(ENSEMBLE_SOURCE_DIR) + "/docs/workflows.md";
  std::ifstream in(path);
  ASSERT_TRUE(in) << path;
  std::string line, block;
  bool in_json = false;
  int checked = 0;
  while (std::getline(in, line)) {
    if (!in_json && line == "```json") {
      in_json = true;
      block.clear();
    } else if (in_json && line == "```") {
      in_json = false;
      if (block.find("{\"workflow\"") != 0) continue;
      SCOPED_TRACE(block);
      EXPECT_NO_THROW(eo::parse_definition(json::parse(block), "docs/workflows.md"));
      ++checked;
    } else if (in_json) {
      block += line + "\n";
    }
  }
  EXPECT_GE(checked, 10);
}
