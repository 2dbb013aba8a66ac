// The orchestrator on durable streams: awaited and triggering topics that a broker stream
// stores come from the orchestrator's own durable consumer, so an event published while the
// orchestrator is down — even across a broker restart, which empties the broker's journal —
// still reaches its instance, and the journal catch-up is not needed (events_caught_up 0).
// Real processes: an ensemble-broker with --data and an ensemble-orchestrator, SIGKILLed.
#include <fstream>

#include "ensemble/testkit/workflow_client.hpp"
#include "support/orchestrator_fixture.hpp"

namespace ensemble::test {
namespace {

class orchestrator_streams_test : public orchestrator_fixture {
 protected:
  void SetUp() override {
    orchestrator_fixture::SetUp();
    // The fixture's broker has no streams: replace it by one that stores thing. and order.
    broker_.reset();
    const auto streams = dir_ + "/streams.yaml";
    std::ofstream(streams) << "streams:\n  - name: things\n    topics: [thing., order.]\n";
    broker_ = tk::broker_process::start({"--heartbeat", "200", "--log-level", "warn", "--data",
                                         dir_ + "/data", "--streams", streams});
  }

  std::unique_ptr<tk::process> run_orchestrator(const std::string& workflows) {
    tk::process_options o;
    o.program = tk::binary_path("ensemble-orchestrator");
    o.args = {"--broker", broker_->router(), "--events",         broker_->events(), "--workflows",
              workflows,  "--store",         dir_ + "/store.db", "--log-level",     "info"};
    o.name = "orchestrator";
    auto p = tk::process::spawn(std::move(o));
    if (!p->wait_for_line("ensemble-orchestrator ready", 10s)) {
      throw std::runtime_error("orchestrator not ready:\n" + p->tail());
    }
    return p;
  }

  json admin(const std::string& action, const json& args) {
    ea::agent a(ea::options{
        .name = "admin-" + action, .broker = broker_->router(), .events = broker_->events()});
    EXPECT_TRUE(a.start());
    auto r = a.call("broker", action, ea::to_json_payload(args), 5s);
    EXPECT_TRUE(r) << action << ": " << (r ? "" : r.err().to_string());
    if (!r) return json::object();
    auto body = ea::from_json_payload(r->payload());
    return body ? *body : json::object();
  }
};

// The await's timeout is an hour: only a delivery can end it.
TEST_F(orchestrator_streams_test,
       an_event_stored_while_down_reaches_its_await_across_a_broker_restart) {
  const auto workflows = write("wait.json", json::parse(R"({"workflow": {"name": "WaitForIt",
    "steps": [{"name": "Done", "kind": "await", "topic": "thing.done", "timeout": "1h"}],
    "output": {"answer": "${steps.Done.output.answer}"}}})"));
  auto orch = run_orchestrator(workflows);
  ASSERT_TRUE(orch->wait_for_line("events of stream things come from durable consumer", 5s))
      << orch->tail();
  {
    tk::workflow_client wf(broker_->router(), broker_->events());
    ASSERT_TRUE(wf.start("WaitForIt", json::object(), "w-1"));
    ASSERT_TRUE(tk::wait_until(
        [&] {
          auto v = wf.get("w-1");
          return v && v->value("/steps/Done/status"_json_pointer, "") == "running";
        },
        10s, 10ms));
  }
  orch->kill();
  ASSERT_TRUE(orch->wait_exit(5s).has_value());
  {
    ea::agent publisher(
        ea::options{.name = "publisher", .broker = broker_->router(), .events = broker_->events()});
    ASSERT_TRUE(publisher.start());
    ea::send_options correlated;
    correlated.correlation_id = "w-1";
    auto stored = publisher.publish_acked("thing.done", ea::to_json_payload({{"answer", 42}}), 5s,
                                          correlated);
    ASSERT_TRUE(stored) << stored.err().to_string();
    EXPECT_EQ(stored->stream, "things");
  }
  // The broker's journal is gone with it; the stream and the consumer's position are not.
  broker_->restart();
  orch = run_orchestrator(workflows);
  tk::workflow_client wf(broker_->router(), broker_->events());
  auto done = wf.wait("w-1", 20s);
  ASSERT_TRUE(done) << done.err().to_string() << "\n" << orch->tail();
  EXPECT_EQ(done->at("status"), "completed");
  EXPECT_EQ(done->at("output").at("answer"), 42);
  auto stats = wf.call("stats", json::object());
  ASSERT_TRUE(stats) << stats.err().to_string();
  EXPECT_EQ(stats->value("events_caught_up", -1), 0) << "the journal was not needed";
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto info = admin("consumer_info", {{"stream", "things"}, {"name", "orchestrator"}});
        return info.value("acked", 0) >= 1 && info.value("lag", 1) == 0;
      },
      10s, 20ms));
}

// "from" on a topic a stream stores: the event comes through the durable consumer, whose
// DELIVER carries the publisher the broker stamped and stored.
TEST_F(orchestrator_streams_test, from_ignores_a_delivered_event_of_an_unlisted_publisher) {
  const auto workflows = write("ship.json", json::parse(R"({"workflow": {"name": "Ship",
    "steps": [{"name": "Shipped", "kind": "await", "topic": "thing.shipped",
               "from": ["shipping"], "timeout": "1h"}],
    "output": {"by": "${steps.Shipped.output.by}"}}})"));
  auto orch = run_orchestrator(workflows);
  ASSERT_TRUE(orch->wait_for_line("events of stream things come from durable consumer", 5s))
      << orch->tail();
  tk::workflow_client wf(broker_->router(), broker_->events());
  ASSERT_TRUE(wf.start("Ship", json::object(), "s-1"));
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto v = wf.get("s-1");
        return v && v->value("/steps/Shipped/waiting/phase"_json_pointer, "") == "awaiting";
      },
      10s, 10ms));
  ea::send_options correlated;
  correlated.correlation_id = "s-1";
  auto publish_as = [&](const std::string& name) {
    ea::agent a(
        ea::options{.name = name, .broker = broker_->router(), .events = broker_->events()});
    ASSERT_TRUE(a.start());
    auto stored =
        a.publish_acked("thing.shipped", ea::to_json_payload({{"by", name}}), 5s, correlated);
    ASSERT_TRUE(stored) << stored.err().to_string();
    EXPECT_EQ(stored->stream, "things");
  };
  publish_as("mallory");
  json stats;
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto r = wf.call("stats", json::object());
        if (r) stats = *r;
        return r && r->value("events_ignored_from", 0) == 1;
      },
      10s, 20ms))
      << stats.dump() << "\n"
      << orch->tail();
  EXPECT_EQ(stats["events_ignored_from_by_topic"]["thing.shipped"], 1);
  EXPECT_NE(orch->tail().find("from publisher 'mallory' ignored"), std::string::npos)
      << orch->tail();
  auto running = wf.get("s-1");
  ASSERT_TRUE(running);
  EXPECT_EQ(running->at("status"), "running");
  publish_as("shipping");
  auto done = wf.wait("s-1", 20s);
  ASSERT_TRUE(done) << done.err().to_string() << "\n" << orch->tail();
  EXPECT_EQ(done->at("status"), "completed");
  EXPECT_EQ(done->at("output").at("by"), "shipping");
  // Both deliveries were acked: the ignored one is not redelivered.
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto info = admin("consumer_info", {{"stream", "things"}, {"name", "orchestrator"}});
        return info.value("acked", 0) >= 2 && info.value("lag", 1) == 0;
      },
      10s, 20ms));
}

// A trigger: an event that arrives while the orchestrator is down starts its instance when it
// comes back (plain subscriptions could not, and the journal catch-up never covered triggers).
TEST_F(orchestrator_streams_test, a_trigger_published_while_down_starts_its_instance_once) {
  const auto workflows = write("placed.json", json::parse(R"({"workflow": {"name": "OnPlaced",
    "triggers": [{"topic": "order.placed", "input": {"order": "${event.payload.id}"}}],
    "steps": [{"name": "Noted", "kind": "wait", "duration": "1ms"}],
    "output": {"order": "${workflow.input.order}"}}})"));
  auto orch = run_orchestrator(workflows);
  orch->kill();
  ASSERT_TRUE(orch->wait_exit(5s).has_value());
  {
    ea::agent publisher(
        ea::options{.name = "shop", .broker = broker_->router(), .events = broker_->events()});
    ASSERT_TRUE(publisher.start());
    ea::send_options o;
    o.id = "placed-7";
    ASSERT_TRUE(
        publisher.publish_acked("order.placed", ea::to_json_payload({{"id", "o-7"}}), 5s, o));
    // The same event again (a publisher retrying): stored once, one instance.
    auto again =
        publisher.publish_acked("order.placed", ea::to_json_payload({{"id", "o-7"}}), 5s, o);
    ASSERT_TRUE(again);
    EXPECT_TRUE(again->duplicate);
  }
  orch = run_orchestrator(workflows);
  tk::workflow_client wf(broker_->router(), broker_->events());
  json list;
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto r = wf.call("list", {{"workflow", "OnPlaced"}});
        if (!r) return false;
        list = *r;
        const auto& items = list.value("instances", json::array());
        return items.size() == 1 && items[0].value("status", "") == "completed";
      },
      20s, 20ms))
      << list.dump() << "\n"
      << orch->tail();
}

}  // namespace
}  // namespace ensemble::test
