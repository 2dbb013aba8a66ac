// The orchestrator against a real broker process, real SDK agents and real SQLite files:
// every step kind, data mapping, retries, timeouts, compensation, buffering of early events,
// correlation under concurrency, triggers, and the admin service on the broker.
#include <atomic>
#include <set>

#include "support/orchestrator_fixture.hpp"

namespace ensemble::test {
namespace {

using orchestrator_test = orchestrator_fixture;

const json k_seed = json::parse(R"({"workflow": {"name": "OrderProcessing", "steps": [
  {"name": "ValidateOrder", "service": "OrderService", "action": "validate"},
  {"name": "ChargePayment", "service": "PaymentService", "action": "charge"},
  {"name": "SendConfirmation", "service": "NotificationService", "action": "send"}]}})");

std::vector<std::string> kinds(const json& history) {
  std::vector<std::string> out;
  for (const auto& e : history["entries"]) {
    out.push_back(e["kind"].get<std::string>() +
                  (e.contains("step") ? ":" + e["step"].get<std::string>() : ""));
  }
  return out;
}

TEST_F(orchestrator_test, seed_workflow_runs_unchanged_and_steps_see_input_and_earlier_outputs) {
  std::mutex m;
  std::vector<json> seen;
  auto record = [&](const std::string& service, json reply) {
    return [&, service, reply](const ea::message& msg) -> ea::handler_result {
      auto p = ea::from_json_payload(msg.payload());
      std::lock_guard lock(m);
      seen.push_back({{"service", service},
                      {"payload", *p},
                      {"correlation", msg.correlation_id()},
                      {"key", msg.idempotency_key()}});
      return ea::to_json_payload(reply);
    };
  };
  add_agent("orders", [&](ea::agent& a) {
    a.handle("OrderService", "validate", record("OrderService", {{"valid", true}}));
  });
  add_agent("payments", [&](ea::agent& a) {
    a.handle("PaymentService", "charge", record("PaymentService", {{"transactionId", "t-42"}}));
  });
  add_agent("notifications", [&](ea::agent& a) {
    a.handle("NotificationService", "send", record("NotificationService", {{"sent", true}}));
  });
  tk::event_recorder lifecycle(broker_->router(), broker_->events(), {"workflow."});
  start_orchestrator({write("seed.json", k_seed)}, dir_ + "/state.db");

  const auto id = start("OrderProcessing", {{"orderId", "o-1"}, {"amount", 25}});
  const json done = wait_done(id);
  ASSERT_EQ(done["status"], "completed") << done.dump(2);
  EXPECT_EQ(done["output"], json({{"sent", true}}));

  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[0]["service"], "OrderService");
  EXPECT_EQ(seen[0]["payload"]["workflow"]["input"]["orderId"], "o-1");
  EXPECT_EQ(seen[1]["payload"]["steps"]["ValidateOrder"]["output"]["valid"], true);
  EXPECT_EQ(seen[2]["payload"]["steps"]["ChargePayment"]["output"]["transactionId"], "t-42");
  for (const auto& s : seen) EXPECT_EQ(s["correlation"], id);
  EXPECT_EQ(seen[1]["key"], id + "/ChargePayment/1");

  auto history = orchestrator_->request("history", {{"id", id}});
  ASSERT_TRUE(history);
  EXPECT_EQ(kinds(*history),
            (std::vector<std::string>{
                "started", "step_started:ValidateOrder", "step_completed:ValidateOrder",
                "step_started:ChargePayment", "step_completed:ChargePayment",
                "step_started:SendConfirmation", "step_completed:SendConfirmation", "completed"}));
  ASSERT_TRUE(lifecycle.expect(tk::topic("workflow.OrderProcessing.completed").correlated(id), 5s));
  EXPECT_EQ(lifecycle.count(tk::topic("workflow.OrderProcessing.completed").correlated(id)), 1u);
  EXPECT_EQ(lifecycle.count(tk::topic("workflow.OrderProcessing.started")), 1u);
}

TEST_F(orchestrator_test, input_and_output_mappings_substitute_whole_values_and_strings) {
  add_agent("pricing", [&](ea::agent& a) {
    a.handle("Pricing", "quote", [](const ea::message& m) -> ea::handler_result {
      auto p = ea::from_json_payload(m.payload());
      return ea::to_json_payload({{"total", (*p)["qty"].get<int>() * 10}, {"echo", *p}});
    });
  });
  const json def = json::parse(R"({"workflow": {"name": "Quote", "steps": [
    {"name": "Price", "service": "Pricing", "action": "quote",
     "input": {"qty": "${workflow.input.qty}", "label": "order ${workflow.input.id} x${workflow.input.qty}",
               "items": "${workflow.input.items}"}}],
    "output": {"total": "${steps.Price.output.total}", "label": "${steps.Price.output.echo.label}",
               "first": "${steps.Price.output.echo.items[0]}"}}})");
  start_orchestrator({write("quote.json", def)});
  const auto id = start("Quote", {{"qty", 3}, {"id", "A7"}, {"items", {"x", "y"}}});
  const json done = wait_done(id);
  ASSERT_EQ(done["status"], "completed") << done.dump(2);
  EXPECT_EQ(done["output"], json({{"total", 30}, {"label", "order A7 x3"}, {"first", "x"}}));
}

TEST_F(orchestrator_test, retries_with_backoff_until_success_and_records_each_attempt) {
  std::atomic<int> calls{0};
  add_agent("flaky", [&](ea::agent& a) {
    a.handle("Flaky", "do", [&](const ea::message& m) -> ea::handler_result {
      if (++calls <= 2)
        return ea::error{"busy", "try again (attempt " + std::to_string(m.attempt()) + ")", true};
      return ea::to_json_payload({{"attempt", m.attempt()}, {"key", m.idempotency_key()}});
    });
  });
  const json def = json::parse(R"({"workflow": {"name": "Retry", "steps": [
    {"name": "Do", "service": "Flaky", "action": "do",
     "retry": {"max_attempts": 4, "initial_interval": "20ms", "backoff": 3, "max_interval": "50ms"}}]}})");
  start_orchestrator({write("retry.json", def)});
  const auto id = start("Retry", json::object());
  const json done = wait_done(id);
  ASSERT_EQ(done["status"], "completed") << done.dump(2);
  EXPECT_EQ(calls.load(), 3);
  EXPECT_EQ(done["steps"]["Do"]["attempts"], 3);
  EXPECT_EQ(done["output"]["attempt"], 3);
  EXPECT_EQ(done["output"]["key"], id + "/Do/3");
  auto history = orchestrator_->request("history", {{"id", id}});
  std::vector<std::int64_t> delays;
  for (const auto& e : (*history)["entries"]) {
    if (e["kind"] == "retry_scheduled") delays.push_back(e["data"]["delay_ms"]);
  }
  EXPECT_EQ(delays, (std::vector<std::int64_t>{20, 50}));  // 20, then 60 capped at 50
}

TEST_F(orchestrator_test, non_retryable_errors_fail_at_once_with_the_step_code_and_attempts) {
  std::atomic<int> calls{0};
  add_agent("strict", [&](ea::agent& a) {
    a.handle("Strict", "do", [&](const ea::message&) -> ea::handler_result {
      ++calls;
      return ea::error{"invalid_card", "card 4242 is blocked", false};
    });
  });
  const json def = json::parse(R"({"workflow": {"name": "Strict", "steps": [
    {"name": "Charge", "service": "Strict", "action": "do", "retry": {"max_attempts": 5, "initial_interval": "10ms"}}]}})");
  start_orchestrator({write("strict.json", def)});
  const json done = wait_done(start("Strict", json::object()));
  ASSERT_EQ(done["status"], "failed");
  EXPECT_EQ(calls.load(), 1);
  EXPECT_EQ(done["error"]["step"], "Charge");
  EXPECT_EQ(done["error"]["code"], "invalid_card");
  EXPECT_EQ(done["error"]["attempts"], 1);
  EXPECT_NE(done["reason"].get<std::string>().find("card 4242 is blocked"), std::string::npos);
}

TEST_F(orchestrator_test, step_timeout_answers_deadline_exceeded_and_is_retried_then_fails) {
  std::atomic<int> calls{0};
  add_agent("slow", [&](ea::agent& a) {
    a.handle("Slow", "do", [&](const ea::message& m) -> ea::handler_result {
      ++calls;
      std::this_thread::sleep_until(m.deadline() + 100ms);  // always too slow
      return ea::to_json_payload(json::object());
    });
    a.set_capacity("Slow", 4);
  });
  const json def = json::parse(R"({"workflow": {"name": "Slow", "steps": [
    {"name": "Do", "service": "Slow", "action": "do", "timeout": "100ms",
     "retry": {"max_attempts": 2, "initial_interval": "10ms"}}]}})");
  start_orchestrator({write("slow.json", def)});
  const json done = wait_done(start("Slow", json::object()));
  ASSERT_EQ(done["status"], "failed") << done.dump(2);
  EXPECT_EQ(done["error"]["code"], "deadline_exceeded");
  EXPECT_EQ(done["error"]["attempts"], 2);
  EXPECT_EQ(calls.load(), 2);
}

TEST_F(orchestrator_test, failure_in_step_three_of_four_compensates_in_reverse_with_an_event) {
  std::mutex m;
  std::vector<std::string> order;
  auto note = [&](std::string what) {
    std::lock_guard lock(m);
    order.push_back(std::move(what));
  };
  add_agent("svc", [&](ea::agent& a) {
    a.handle("Svc", "*", [&](const ea::message& msg) -> ea::handler_result {
      note(msg.action());
      if (msg.action() == "step3") return ea::error{"broken", "step 3 cannot work", false};
      return ea::to_json_payload({{"did", msg.action()}});
    });
    a.set_capacity("Svc", 2);
    (void)a.subscribe("undo.", [&](const ea::message& e) { note("event:" + e.topic()); });
  });
  const json def = json::parse(R"({"workflow": {"name": "Saga", "steps": [
    {"name": "One", "service": "Svc", "action": "step1", "compensate": {"publish": {"topic": "undo.one", "payload": {"of": "${steps.One.output.did}"}}}},
    {"name": "Two", "service": "Svc", "action": "step2", "compensate": {"service": "Svc", "action": "undo2"}},
    {"name": "Three", "service": "Svc", "action": "step3", "compensate": {"service": "Svc", "action": "undo3"}},
    {"name": "Four", "service": "Svc", "action": "step4"}]}})");
  start_orchestrator({write("saga.json", def)}, dir_ + "/saga.db");
  const auto id = start("Saga", json::object());
  const json done = wait_done(id);
  ASSERT_EQ(done["status"], "failed") << done.dump(2);
  EXPECT_EQ(done["error"]["step"], "Three");
  EXPECT_EQ(done["steps"]["One"]["status"], "compensated");
  EXPECT_EQ(done["steps"]["Two"]["status"], "compensated");
  EXPECT_EQ(done["steps"]["Three"]["status"], "failed");
  EXPECT_FALSE(done["steps"].contains("Four"));
  // The compensating event is fanned out before the instance ends (it is acknowledged), but
  // reaches the subscriber asynchronously: wait for it.
  ASSERT_TRUE(tk::wait_until(
      [&] {
        std::lock_guard lock(m);
        return order.size() >= 5;
      },
      5s));
  std::lock_guard lock(m);
  EXPECT_EQ(order,
            (std::vector<std::string>{"step1", "step2", "step3", "undo2", "event:undo.one"}));
}

TEST_F(orchestrator_test, choreography_outcome_that_arrives_before_the_await_is_not_lost) {
  // Reserve publishes the outcome of the segment while handling the command, i.e. before the
  // orchestrator even starts the await step that waits for it.
  add_agent("inventory", [&](ea::agent& a) {
    a.handle("Inventory", "reserve", [&a](const ea::message&) -> ea::handler_result {
      auto p = a.publish_acked("stock.reserved", ea::to_json_payload({{"sku", "s-1"}}), 2s);
      if (!p) return p.err();
      return ea::to_json_payload({{"ok", true}});
    });
  });
  const json def = json::parse(R"({"workflow": {"name": "Early", "steps": [
    {"name": "Reserve", "service": "Inventory", "action": "reserve"},
    {"name": "Reserved", "kind": "await", "topic": "stock.reserved", "timeout": "5s"}],
    "output": {"sku": "${steps.Reserved.output.sku}"}}})");
  start_orchestrator({write("early.json", def)});
  const json done = wait_done(start("Early", json::object()));
  ASSERT_EQ(done["status"], "completed") << done.dump(2);
  EXPECT_EQ(done["output"]["sku"], "s-1");
  EXPECT_EQ(done["steps"]["Reserved"]["event"]["topic"], "stock.reserved");
}

TEST_F(orchestrator_test,
       choreography_runs_a_segment_of_reacting_services_and_fails_on_its_failure_topic) {
  // Two services react to each other; the orchestrator only starts and awaits the segment.
  add_agent("warehouse", [&](ea::agent& a) {
    (void)a.subscribe("fulfil.requested", [&a](const ea::message& e) {
      auto p = ea::from_json_payload(e.payload());
      if ((*p)["qty"].get<int>() > 5) {
        (void)a.publish("fulfil.failed", ea::to_json_payload({{"why", "not enough stock"}}));
      } else {
        (void)a.publish(
            "parcel.packed",
            ea::to_json_payload({{"parcel", "p-" + std::to_string((*p)["qty"].get<int>())}}));
      }
    });
  });
  add_agent("shipping", [&](ea::agent& a) {
    (void)a.subscribe("parcel.packed", [&a](const ea::message& e) {
      auto p = ea::from_json_payload(e.payload());
      (void)a.publish(
          "shipment.dispatched",
          ea::to_json_payload({{"tracking", "T-" + (*p)["parcel"].get<std::string>()}}));
    });
  });
  const json def = json::parse(R"({"workflow": {"name": "Ship", "steps": [
    {"name": "Fulfil", "kind": "choreography", "start": {"topic": "fulfil.requested", "payload": {"qty": "${workflow.input.qty}"}},
     "until": ["shipment.dispatched"], "fail_on": ["fulfil.failed"], "timeout": "5s"}],
    "output": {"tracking": "${steps.Fulfil.output.tracking}"}}})");
  start_orchestrator({write("ship.json", def)});
  const auto ok = start("Ship", {{"qty", 2}});
  const auto bad = start("Ship", {{"qty", 9}});
  const json done_ok = wait_done(ok);
  const json done_bad = wait_done(bad);
  ASSERT_EQ(done_ok["status"], "completed") << done_ok.dump(2);
  EXPECT_EQ(done_ok["output"]["tracking"], "T-p-2");
  ASSERT_EQ(done_bad["status"], "failed") << done_bad.dump(2);
  EXPECT_EQ(done_bad["error"]["code"], "choreography_failed");
  EXPECT_NE(done_bad["reason"].get<std::string>().find("fulfil.failed"), std::string::npos);
}

TEST_F(orchestrator_test, two_hundred_concurrent_instances_each_get_their_own_events) {
  // The payment service answers at once but confirms through an event a little later; with
  // 200 instances waiting on the same topic, every confirmation must reach its own instance.
  add_agent("payments", [&](ea::agent& a) {
    a.handle("Payments", "charge", [&a](const ea::message& m) -> ea::handler_result {
      auto p = ea::from_json_payload(m.payload());
      (void)a.publish("payment.confirmed", ea::to_json_payload({{"order", (*p)["order"]}}));
      return ea::to_json_payload({{"accepted", (*p)["order"]}});
    });
    a.set_capacity("Payments", 32);
  });
  const json def = json::parse(R"({"workflow": {"name": "Pay", "steps": [
    {"name": "Charge", "service": "Payments", "action": "charge", "input": {"order": "${workflow.input.order}"}},
    {"name": "Confirmed", "kind": "await", "topic": "payment.confirmed", "timeout": "20s"}],
    "output": {"accepted": "${steps.Charge.output.accepted}", "confirmed": "${steps.Confirmed.output.order}"}}})");
  start_orchestrator({write("pay.json", def)}, dir_ + "/pay.db");
  std::map<std::string, int> ids;
  for (int i = 0; i < 200; ++i) ids[start("Pay", {{"order", i}})] = i;
  ASSERT_EQ(ids.size(), 200u);
  for (const auto& [id, order] : ids) {
    const json done = wait_done(id, 30s);
    ASSERT_EQ(done["status"], "completed") << done.dump(2);
    EXPECT_EQ(done["output"]["accepted"], order);
    EXPECT_EQ(done["output"]["confirmed"], order) << "event matched to the wrong instance";
  }
}

TEST_F(orchestrator_test, await_with_a_key_match_takes_the_event_of_its_own_order) {
  add_agent("bank", [](ea::agent&) {});
  auto& bank = *agents_.back();
  const json def = json::parse(R"({"workflow": {"name": "Wire", "steps": [
    {"name": "Received", "kind": "await", "topic": "bank.received", "timeout": "5s",
     "match": "${event.payload.orderId} == ${workflow.input.orderId}"}],
    "output": "${steps.Received.output.amount}"}})");
  start_orchestrator({write("wire.json", def)});
  const auto a = start("Wire", {{"orderId", "A"}});
  const auto b = start("Wire", {{"orderId", "B"}});
  // Uncorrelated events (no correlation id of ours): matched by the key expression.
  ASSERT_TRUE(bank.publish_acked("bank.received",
                                 ea::to_json_payload({{"orderId", "B"}, {"amount", 2}}), 2s));
  ASSERT_TRUE(bank.publish_acked("bank.received",
                                 ea::to_json_payload({{"orderId", "A"}, {"amount", 1}}), 2s));
  EXPECT_EQ(wait_done(a)["output"], 1);
  EXPECT_EQ(wait_done(b)["output"], 2);
}

TEST_F(orchestrator_test, parallel_switch_wait_and_sub_workflow) {
  add_agent("svc", [](ea::agent& a) {
    a.handle("Svc", "*", [](const ea::message& m) -> ea::handler_result {
      return ea::to_json_payload({{"action", m.action()}});
    });
    a.set_capacity("Svc", 4);
  });
  const json child = json::parse(R"({"workflow": {"name": "Child", "steps": [
    {"name": "Inner", "service": "Svc", "action": "inner"}],
    "output": {"child_saw": "${workflow.input.tier}"}}})");
  const json parent = json::parse(R"({"workflow": {"name": "Parent", "steps": [
    {"name": "Both", "kind": "parallel", "branches": [
      [{"name": "Left", "service": "Svc", "action": "left"}],
      [{"name": "Pause", "kind": "wait", "duration": "30ms"}, {"name": "Right", "service": "Svc", "action": "right"}]]},
    {"name": "Route", "kind": "switch", "cases": [
      {"when": "${workflow.input.tier} == 'gold'", "steps": [{"name": "Gold", "service": "Svc", "action": "gold"}]},
      {"when": "${workflow.input.amount} > 100", "steps": [{"name": "Big", "service": "Svc", "action": "big"}]}],
     "default": [{"name": "Plain", "service": "Svc", "action": "plain"}]},
    {"name": "Sub", "kind": "workflow", "workflow": "Child", "input": {"tier": "${workflow.input.tier}"}}],
    "output": {"both": "${steps.Both.output}", "route": "${steps.Route.output.action}", "sub": "${steps.Sub.output.child_saw}"}}})");
  start_orchestrator({write("child.json", child), write("parent.json", parent)});
  const json gold = wait_done(start("Parent", {{"tier", "gold"}, {"amount", 5}}));
  ASSERT_EQ(gold["status"], "completed") << gold.dump(2);
  EXPECT_EQ(gold["output"]["route"], "gold");
  EXPECT_EQ(gold["output"]["sub"], "gold");
  EXPECT_EQ(gold["output"]["both"], json::parse(R"([{"action":"left"},{"action":"right"}])"));
  EXPECT_EQ(gold["steps"]["Pause"]["status"], "completed");
  const json big = wait_done(start("Parent", {{"tier", "silver"}, {"amount", 500}}));
  EXPECT_EQ(big["output"]["route"], "big");
  const json plain = wait_done(start("Parent", {{"tier", "bronze"}, {"amount", 1}}));
  EXPECT_EQ(plain["output"]["route"], "plain");
  EXPECT_FALSE(plain["steps"].contains("Gold"));
}

TEST_F(orchestrator_test, a_trigger_starts_one_instance_per_event_id_even_when_replayed) {
  add_agent("svc", [](ea::agent& a) {
    a.handle("Svc", "*", [](const ea::message& m) -> ea::handler_result {
      return ea::to_json_payload(ea::from_json_payload(m.payload()).value());
    });
  });
  auto& publisher = add_agent("shop", [](ea::agent&) {});
  tk::event_recorder lifecycle(broker_->router(), broker_->events(), {"workflow.OnOrder."});
  const json def = json::parse(R"({"workflow": {"name": "OnOrder",
    "triggers": [{"topic": "order.placed", "input": {"order": "${event.payload.id}"}}],
    "steps": [{"name": "Ack", "service": "Svc", "action": "ack", "input": {"order": "${workflow.input.order}"}}]}})");
  start_orchestrator({write("on-order.json", def)}, dir_ + "/trig.db");
  ea::send_options same_id;
  same_id.id = "evt-1";
  ASSERT_TRUE(
      publisher.publish_acked("order.placed", ea::to_json_payload({{"id", "o-9"}}), 2s, same_id));
  ASSERT_TRUE(
      publisher.publish_acked("order.placed", ea::to_json_payload({{"id", "o-9"}}), 2s, same_id));
  ea::send_options other_id;
  other_id.id = "evt-2";
  ASSERT_TRUE(
      publisher.publish_acked("order.placed", ea::to_json_payload({{"id", "o-10"}}), 2s, other_id));
  ASSERT_TRUE(lifecycle.wait(
      [](const std::vector<tk::recorded_event>& evs) {
        return std::count_if(evs.begin(), evs.end(), [](const tk::recorded_event& e) {
                 return e.topic == "workflow.OnOrder.completed";
               }) >= 2;
      },
      10s));
  // The replayed event is handled before evt-2 (same publisher, in order), so by now a second
  // instance for evt-1 would exist: list them all.
  auto list = orchestrator_->request("list", {{"workflow", "OnOrder"}});
  ASSERT_TRUE(list);
  EXPECT_EQ((*list)["instances"].size(), 2u) << list->dump(2);
  std::set<json> orders;
  for (const auto& e : lifecycle.events()) {
    if (e.topic == "workflow.OnOrder.completed") orders.insert(e.payload["output"]["order"]);
  }
  EXPECT_EQ(orders, (std::set<json>{"o-9", "o-10"}));
}

TEST_F(orchestrator_test, the_orchestrator_service_on_the_broker_starts_inspects_and_cancels) {
  const json def = json::parse(R"({"workflow": {"name": "Slowly", "steps": [
    {"name": "Hold", "kind": "wait", "duration": "1h"}]}})");
  start_orchestrator({write("slowly.json", def)});
  auto& client = add_agent("cli", [](ea::agent&) {});
  auto call = [&](const std::string& action, const json& args) {
    return client.call("orchestrator", action, ea::to_json_payload(args), 5s);
  };
  auto started = call("start", {{"workflow", "Slowly"}, {"input", {{"x", 1}}}, {"id", "my-run-1"}});
  ASSERT_TRUE(started) << started.err().to_string();
  EXPECT_EQ(ea::from_json_payload(started->payload()).value()["id"], "my-run-1");
  // Starting again with the same id is idempotent.
  auto again = call("start", {{"workflow", "Slowly"}, {"id", "my-run-1"}});
  ASSERT_TRUE(again);
  EXPECT_EQ(ea::from_json_payload(again->payload()).value()["created"], false);

  auto got = call("get", {{"id", "my-run-1"}});
  ASSERT_TRUE(got);
  EXPECT_EQ(ea::from_json_payload(got->payload()).value()["status"], "running");
  auto cancelled = call("cancel", {{"id", "my-run-1"}, {"reason", "operator said so"}});
  ASSERT_TRUE(cancelled) << cancelled.err().to_string();
  const json done = wait_done("my-run-1");
  EXPECT_EQ(done["status"], "cancelled");
  EXPECT_EQ(done["error"]["message"], "operator said so");
  auto listed = call("list", {{"status", "cancelled"}});
  ASSERT_TRUE(listed);
  EXPECT_EQ(ea::from_json_payload(listed->payload()).value()["instances"].size(), 1u);

  auto unknown = call("start", {{"workflow", "Nope"}});
  ASSERT_FALSE(unknown);
  EXPECT_EQ(unknown.err().code, "not_found");
  EXPECT_NE(unknown.err().message.find("Slowly"), std::string::npos);  // lists what is loaded
  auto bad = call("get", json::object());
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.err().code, "bad_request");
  EXPECT_NE(bad.err().message.find("\"id\""), std::string::npos);
  auto nope = call("frobnicate", json::object());
  ASSERT_FALSE(nope);
  EXPECT_EQ(nope.err().code, "unknown_action");
  EXPECT_EQ(nope.err().message,
            "unknown action \"frobnicate\"; the orchestrator offers start, get, list, cancel, "
            "history, definitions, stats, advance");
}

TEST_F(orchestrator_test, instance_timeout_compensates_and_ends_timed_out) {
  std::atomic<int> undone{0};
  add_agent("svc", [&](ea::agent& a) {
    a.handle("Svc", "*", [&](const ea::message& m) -> ea::handler_result {
      if (m.action() == "undo") ++undone;
      return ea::to_json_payload(json::object());
    });
  });
  const json def = json::parse(R"({"workflow": {"name": "Bounded", "timeout": "200ms", "steps": [
    {"name": "Do", "service": "Svc", "action": "do", "compensate": {"service": "Svc", "action": "undo"}},
    {"name": "Forever", "kind": "await", "topic": "never.happens", "timeout": "1h"}]}})");
  start_orchestrator({write("bounded.json", def)});
  const json done = wait_done(start("Bounded", json::object()));
  ASSERT_EQ(done["status"], "timed_out") << done.dump(2);
  EXPECT_EQ(done["steps"]["Forever"]["status"], "cancelled");
  EXPECT_EQ(done["steps"]["Do"]["status"], "compensated");
  EXPECT_EQ(undone.load(), 1);
}

TEST_F(orchestrator_test, a_restarted_orchestrator_resumes_timers_and_awaits_from_its_file) {
  auto& publisher = add_agent("pub", [](ea::agent&) {});
  const json def = json::parse(R"({"workflow": {"name": "Resume", "steps": [
    {"name": "Nap", "kind": "wait", "duration": "300ms"},
    {"name": "Go", "kind": "await", "topic": "go.now", "timeout": "10s"}]}})");
  const auto file = write("resume.json", def);
  const auto store = dir_ + "/resume.db";
  start_orchestrator({file}, store);
  const auto id = start("Resume", json::object());
  orchestrator_.reset();  // stop: state is in the file
  start_orchestrator({file}, store);
  // Wait until the timer has fired after the restart and the await is registered.
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto r = orchestrator_->request("get", {{"id", id}});
        return r && (*r)["steps"].contains("Go");
      },
      5s));
  ea::send_options corr;
  corr.correlation_id = id;
  ASSERT_TRUE(publisher.publish_acked("go.now", ea::to_json_payload({{"ok", 1}}), 2s, corr));
  const json done = wait_done(id);
  EXPECT_EQ(done["status"], "completed") << done.dump(2);
}

TEST_F(orchestrator_test, publish_steps_emit_correlated_events_and_on_error_continues_or_jumps) {
  add_agent("svc", [](ea::agent& a) {
    a.handle("Svc", "*", [](const ea::message& m) -> ea::handler_result {
      if (m.action() == "broken") return ea::error{"nope", "broken by design", false};
      return ea::to_json_payload({{"action", m.action()}});
    });
  });
  tk::event_recorder news(broker_->router(), broker_->events(), {"news."});
  const json def = json::parse(R"({"workflow": {"name": "Flow", "steps": [
    {"name": "Announce", "kind": "publish", "topic": "news.started", "payload": {"who": "${workflow.input.who}"}},
    {"name": "Optional", "service": "Svc", "action": "broken", "on_error": "continue"},
    {"name": "Risky", "service": "Svc", "action": "broken", "on_error": {"goto": "Recover"}},
    {"name": "Skipped", "service": "Svc", "action": "never"},
    {"name": "Recover", "service": "Svc", "action": "recover"}],
    "output": {"optional_error": "${steps.Optional.error.code}", "last": "${steps.Recover.output.action}"}}})");
  start_orchestrator({write("flow.json", def)});
  const auto id = start("Flow", {{"who", "ada"}});
  const json done = wait_done(id);
  ASSERT_EQ(done["status"], "completed") << done.dump(2);
  EXPECT_EQ(done["output"], json({{"optional_error", "nope"}, {"last", "recover"}}));
  EXPECT_EQ(done["steps"]["Optional"]["status"], "failed");
  EXPECT_EQ(done["steps"]["Skipped"]["status"], "skipped");
  ASSERT_TRUE(news.expect(tk::topic("news."), 5s));
  const auto ev = news.events().front();
  EXPECT_EQ(ev.topic, "news.started");
  EXPECT_EQ(ev.payload["who"], "ada");
  EXPECT_EQ(ev.correlation_id, id);
  EXPECT_EQ(ev.id, id + "/Announce/1");  // the idempotency key doubles as the event id
  EXPECT_EQ(done["steps"]["Announce"]["output"]["id"], ev.id);
}

}  // namespace
}  // namespace ensemble::test
