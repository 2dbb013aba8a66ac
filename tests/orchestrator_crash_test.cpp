// Durability: an ensemble-orchestrator process is SIGKILLed with 200 instances in flight and
// started again on the same SQLite file. Every instance must end exactly once.
#include <atomic>
#include <condition_variable>
#include <set>

#include "ensemble/testkit/workflow_client.hpp"
#include "support/orchestrator_fixture.hpp"

namespace ensemble::test {
namespace {

using orchestrator_crash_test = orchestrator_fixture;

tk::process_options orchestrator_program(std::vector<std::string> args) {
  tk::process_options o;
  o.program = tk::binary_path("ensemble-orchestrator");
  o.args = std::move(args);
  o.name = "orchestrator";
  return o;
}

std::unique_ptr<tk::process> run_orchestrator(const tk::broker_process& broker,
                                              const std::string& workflows,
                                              const std::string& store) {
  auto p = tk::process::spawn(
      orchestrator_program({"--broker", broker.router(), "--events", broker.events(), "--workflows",
                            workflows, "--store", store, "--log-level", "warn"}));
  if (!p->wait_for_line("ensemble-orchestrator ready", 10s)) {
    throw std::runtime_error("orchestrator not ready:\n" + p->tail());
  }
  return p;
}

TEST_F(orchestrator_crash_test, sigkill_with_200_in_flight_then_restart_every_instance_ends_once) {
  constexpr int k_instances = 200;
  // Agents dedupe by idempotency key, as the protocol asks of them: a command re-sent after the
  // restart must not repeat its effect.
  std::mutex m;
  std::condition_variable changed;
  std::map<std::string, int> effects;  // idempotency key -> times seen
  // PaymentService holds every charge until the test opens the gate, so that the kill is sure
  // to find instances in flight (commands outstanding, others queued behind them).
  bool gate_open = false;
  int held = 0;
  auto handler = [&](const std::string& service, json reply) {
    return [&, service, reply](const ea::message& msg) -> ea::handler_result {
      std::unique_lock lock(m);
      if (service == "PaymentService") {
        ++held;
        changed.notify_all();
        if (!changed.wait_for(lock, 30s, [&] { return gate_open; })) {
          return ea::error{"gate_timeout", "the test never opened the gate", false};
        }
      }
      ++effects[msg.idempotency_key()];
      return ea::to_json_payload(reply);
    };
  };
  for (const auto& [service, action] :
       std::vector<std::pair<std::string, std::string>>{{"OrderService", "validate"},
                                                        {"PaymentService", "charge"},
                                                        {"NotificationService", "send"}}) {
    add_agent(service, [&](ea::agent& a) {
      a.handle(service, action, handler(service, {{"by", service}}));
      a.set_capacity(service, 8);
    });
  }
  tk::event_recorder lifecycle(broker_->router(), broker_->events(), {"workflow.OrderProcessing."});
  const auto workflows =
      write("seed.json", json::parse(R"({"workflow": {"name": "OrderProcessing", "steps": [
    {"name": "ValidateOrder", "service": "OrderService", "action": "validate"},
    {"name": "ChargePayment", "service": "PaymentService", "action": "charge"},
    {"name": "SendConfirmation", "service": "NotificationService", "action": "send"}]}})"));
  const auto store = dir_ + "/orders.db";
  auto orch = run_orchestrator(*broker_, workflows, store);

  auto& client = add_agent("client", [](ea::agent&) {});
  std::set<std::string> ids;
  for (int i = 0; i < k_instances; ++i) {
    auto r = client.call(
        "orchestrator", "start",
        ea::to_json_payload({{"workflow", "OrderProcessing"}, {"input", {{"order", i}}}}), 5s);
    ASSERT_TRUE(r) << r.err().to_string() << "\n" << orch->tail();
    ids.insert(ea::from_json_payload(r->payload()).value()["id"].get<std::string>());
  }
  ASSERT_EQ(ids.size(), static_cast<std::size_t>(k_instances));

  auto terminal = [&](const std::vector<tk::recorded_event>& evs) {
    std::map<std::string, std::set<std::string>> by_instance;  // instance -> terminal event ids
    for (const auto& e : evs) {
      if (e.topic.ends_with(".completed") || e.topic.ends_with(".failed")) {
        by_instance[e.correlation_id].insert(e.id);
      }
    }
    return by_instance;
  };
  {
    std::unique_lock lock(m);
    ASSERT_TRUE(changed.wait_for(lock, 10s, [&] { return held >= 8; }))
        << "PaymentService never got its 8 charges in flight";
  }
  const std::size_t ended_before = terminal(lifecycle.events()).size();
  orch->kill();
  ASSERT_TRUE(orch->wait_exit(5s).has_value());
  ASSERT_LT(ended_before, ids.size()) << "every instance ended before the kill: nothing tested";

  orch = run_orchestrator(*broker_, workflows, store);
  {
    std::lock_guard lock(m);
    gate_open = true;
  }
  changed.notify_all();
  const bool all_ended = lifecycle.wait(
      [&](const std::vector<tk::recorded_event>& evs) {
        return terminal(evs).size() >= ids.size();
      },
      60s);
  const auto events = lifecycle.events();
  const auto ended = terminal(events);
  std::size_t completed = 0, failed = 0, redelivered = 0;
  for (const auto& e : events) {
    completed += e.topic.ends_with(".completed") ? 1 : 0;
    failed += e.topic.ends_with(".failed") ? 1 : 0;
  }
  std::set<std::string> distinct_ids;
  for (const auto& e : events) {
    if (!distinct_ids.insert(e.id).second) ++redelivered;
  }
  std::size_t repeated_effects = 0;
  {
    std::lock_guard lock(m);
    for (const auto& [key, n] : effects) repeated_effects += static_cast<std::size_t>(n - 1);
  }
  std::printf(
      "instances=%d ended_before_kill=%zu ended=%zu completed_events=%zu failed_events=%zu "
      "redelivered_lifecycle_events=%zu commands_resent_after_restart=%zu\n",
      k_instances, ended_before, ended.size(), completed, failed, redelivered, repeated_effects);
  ASSERT_TRUE(all_ended) << orch->tail();
  for (const auto& id : ids) {
    auto it = ended.find(id);
    ASSERT_NE(it, ended.end()) << id << " never ended";
    EXPECT_EQ(it->second.size(), 1u) << id << " ended more than once";
  }
  EXPECT_EQ(ended.size(), ids.size()) << "events for instances nobody started";

  // The store agrees: nothing is left running, every instance completed. (Queries are safe to
  // re-dispatch: the broker may still hold the killed orchestrator's registration.)
  ea::send_options retryable;
  retryable.retryable = true;
  auto listed =
      client.call("orchestrator", "list",
                  ea::to_json_payload({{"status", "completed"}, {"limit", 1000}}), 5s, retryable);
  ASSERT_TRUE(listed) << listed.err().to_string();
  EXPECT_EQ(ea::from_json_payload(listed->payload()).value()["instances"].size(), ids.size());
  auto running = client.call("orchestrator", "list", ea::to_json_payload({{"status", "running"}}),
                             5s, retryable);
  ASSERT_TRUE(running);
  EXPECT_TRUE(ea::from_json_payload(running->payload()).value()["instances"].empty());
}

// An event an await is waiting for is published while the orchestrator is down: after the
// restart, the orchestrator finds it in the broker's journal and the instance completes (the
// await's timeout is an hour: only the catch-up can end it).
TEST_F(orchestrator_crash_test, an_event_published_while_down_is_caught_up_from_the_journal) {
  const auto workflows = write("wait.json", json::parse(R"({"workflow": {"name": "WaitForIt",
    "steps": [{"name": "Done", "kind": "await", "topic": "thing.done", "timeout": "1h"}],
    "output": {"answer": "${steps.Done.output.answer}"}}})"));
  const auto store = dir_ + "/store.db";
  auto orch = run_orchestrator(*broker_, workflows, store);
  tk::workflow_client wf(broker_->router(), broker_->events());
  ea::agent publisher(
      ea::options{.name = "publisher", .broker = broker_->router(), .events = broker_->events()});
  ASSERT_TRUE(publisher.start());
  auto started = wf.start("WaitForIt", json::object(), "w-1");
  ASSERT_TRUE(started) << started.err().to_string();
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto v = wf.get("w-1");
        return v && v->value("/steps/Done/status"_json_pointer, "") == "running";
      },
      10s, 10ms));

  orch->kill();
  ASSERT_TRUE(orch->wait_exit(5s).has_value());
  ea::send_options correlated;
  correlated.correlation_id = "w-1";
  ASSERT_TRUE(
      publisher.publish_acked("thing.done", ea::to_json_payload({{"answer", 42}}), 5s, correlated));
  orch = run_orchestrator(*broker_, workflows, store);
  auto done = wf.wait("w-1", 20s);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "completed");
  EXPECT_EQ(done->at("output").at("answer"), 42);
  auto stats = wf.call("stats", json::object());
  ASSERT_TRUE(stats) << stats.err().to_string();
  EXPECT_EQ(stats->value("events_caught_up", 0), 1);
}

// The journal keeps each event's publisher: the catch-up honours "from" as live delivery does.
TEST_F(orchestrator_crash_test, the_catch_up_ignores_events_of_publishers_from_does_not_list) {
  const auto workflows = write("ship.json", json::parse(R"({"workflow": {"name": "Ship",
    "steps": [{"name": "Shipped", "kind": "await", "topic": "thing.shipped",
               "from": ["shipping"], "timeout": "1h"}],
    "output": {"by": "${steps.Shipped.output.by}"}}})"));
  const auto store = dir_ + "/store.db";
  auto orch = run_orchestrator(*broker_, workflows, store);
  tk::workflow_client wf(broker_->router(), broker_->events());
  ASSERT_TRUE(wf.start("Ship", json::object(), "s-1"));
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto v = wf.get("s-1");
        return v && v->value("/steps/Shipped/status"_json_pointer, "") == "running";
      },
      10s, 10ms));
  orch->kill();
  ASSERT_TRUE(orch->wait_exit(5s).has_value());
  // While it is down: first a forged answer, then the real one.
  ea::send_options correlated;
  correlated.correlation_id = "s-1";
  for (const std::string name : {"mallory", "shipping"}) {
    ea::agent a(
        ea::options{.name = name, .broker = broker_->router(), .events = broker_->events()});
    ASSERT_TRUE(a.start());
    ASSERT_TRUE(
        a.publish_acked("thing.shipped", ea::to_json_payload({{"by", name}}), 5s, correlated));
  }
  orch = run_orchestrator(*broker_, workflows, store);
  auto done = wf.wait("s-1", 20s);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "completed");
  EXPECT_EQ(done->at("output").at("by"), "shipping");
  auto stats = wf.call("stats", json::object());
  ASSERT_TRUE(stats) << stats.err().to_string();
  EXPECT_EQ(stats->value("events_caught_up", 0), 1);
  EXPECT_EQ(stats->value("events_ignored_from", 0), 1);
}

TEST_F(orchestrator_crash_test, validate_flag_checks_files_and_names_the_problem) {
  const auto good = write("good.json", json::parse(R"({"workflow": {"name": "Ok", "steps": [
    {"name": "A", "service": "S", "action": "a"}]}})"));
  const auto bad = write("bad.json", json::parse(R"({"workflow": {"name": "Bad", "steps": [
    {"name": "A", "service": "S", "action": "a", "retry": {"max_attempts": "lots"}}]}})"));
  auto ok = tk::process::spawn(orchestrator_program({"--validate", good}));
  EXPECT_EQ(ok->wait_exit(10s), 0) << ok->tail();
  auto fails = tk::process::spawn(orchestrator_program({"--validate", good, bad}));
  EXPECT_EQ(fails->wait_exit(10s), 1) << fails->tail();
  EXPECT_TRUE(fails->wait_for_line("/workflow/steps/0/retry/max_attempts", 1s)) << fails->tail();
  EXPECT_TRUE(fails->wait_for_line("bad.json", 1s)) << fails->tail();
}

}  // namespace
}  // namespace ensemble::test
