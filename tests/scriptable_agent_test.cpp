// Scriptable agents (`ensemble agent SPEC.yaml`) against a real broker process: reply templates,
// latency, failure injection, crash_after, events published while handling, delayed reactions
// and their trace context, dedupe by idempotency key, and spec validation errors.
#include "ensemble/cli/scriptable_agent.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <csignal>
#include <deque>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/common/result.hpp"
#include "ensemble/testkit/process.hpp"

namespace ea = ensemble::agent;
namespace ec = ensemble::cli;
namespace tk = ensemble::testkit;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

// Every event of the subscribed prefixes, with a wait that has a deadline.
class event_log {
 public:
  void add(const ea::message& m) {
    std::lock_guard lock(mutex_);
    events_.push_back(m);
    cv_.notify_all();
  }
  // The first event (from the start) on `topic` for which `pred` holds, or nullopt at the deadline.
  std::optional<ea::message> wait_for(const std::string& topic,
                                      const std::function<bool(const ea::message&)>& pred,
                                      std::chrono::milliseconds deadline = 10s) {
    std::unique_lock lock(mutex_);
    std::optional<ea::message> found;
    cv_.wait_for(lock, deadline, [&] {
      for (const auto& m : events_) {
        if (m.topic() == topic && pred(m)) {
          found = m;
          return true;
        }
      }
      return false;
    });
    return found;
  }
  std::optional<ea::message> wait_for(const std::string& topic,
                                      std::chrono::milliseconds deadline = 10s) {
    return wait_for(
        topic, [](const ea::message&) { return true; }, deadline);
  }
  std::vector<ea::message> on(const std::string& topic) const {
    std::lock_guard lock(mutex_);
    std::vector<ea::message> out;
    for (const auto& m : events_) {
      if (m.topic() == topic) out.push_back(m);
    }
    return out;
  }

 private:
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<ea::message> events_;
};

json body_of(const ea::message& m) {
  auto body = ea::from_json_payload(m.payload());
  EXPECT_TRUE(body.ok());
  return body.ok() ? *body : json();
}

json reply_json(const ea::call_result& r) {
  EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.err().to_string());
  return r.ok() ? body_of(*r) : json();
}

class scriptable_agent_test : public ::testing::Test {
 protected:
  void SetUp() override { broker_ = tk::broker_process::start({"--heartbeat", "100"}); }
  void TearDown() override {
    if (HasFailure() && broker_) std::cerr << "broker output:\n" << broker_->proc().tail() << "\n";
    if (!spec_dir_.empty()) {
      std::error_code ignored;
      std::filesystem::remove_all(spec_dir_, ignored);
    }
  }

  // An in-process scriptable agent from YAML text, started.
  std::unique_ptr<ec::scriptable_agent> start_agent(const std::string& yaml,
                                                    const std::string& source = "test.yaml") {
    auto a = std::make_unique<ec::scriptable_agent>(
        ec::parse_agent_spec(yaml, source),
        ec::connection{.broker = broker_->router(), .events = broker_->events(), .name = {}});
    auto s = a->start();
    EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.err().to_string());
    return a;
  }

  // A plain SDK agent that calls and publishes, and logs the events of `prefixes`.
  std::unique_ptr<ea::agent> start_client(const std::vector<std::string>& prefixes = {}) {
    ea::options o;
    o.name = "client";
    o.broker = broker_->router();
    o.events = broker_->events();
    auto c = std::make_unique<ea::agent>(o);
    for (const auto& p : prefixes) {
      EXPECT_TRUE(c->subscribe(p, [this](const ea::message& m) { events_.add(m); }).ok());
    }
    EXPECT_TRUE(c->start().ok());
    return c;
  }

  // A spec file in a fresh temporary directory.
  std::string write_spec(const std::string& file, const std::string& yaml) {
    const auto dir = std::filesystem::temp_directory_path() /
                     ("scriptable_agent_test-" + std::to_string(::getpid()) + "-" +
                      ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir);
    spec_dir_ = dir;
    const auto path = dir / file;
    std::ofstream(path) << yaml;
    return path.string();
  }

  std::unique_ptr<tk::process> spawn_cli(std::vector<std::string> args) {
    std::vector<std::string> all{"--broker", broker_->router(), "--events", broker_->events(),
                                 "agent"};
    all.insert(all.end(), args.begin(), args.end());
    return tk::process::spawn({tk::binary_path("ensemble"), all, {}, {}, "ensemble-agent"});
  }

  std::unique_ptr<tk::broker_process> broker_;
  event_log events_;
  std::filesystem::path spec_dir_;
};

// --- replies, latency, failures ------------------------------------------------------------

TEST_F(scriptable_agent_test, reply_template_is_rendered_from_the_request_and_message) {
  auto agent = start_agent(R"y(
name: payments
services:
  PaymentService:
    actions:
      charge:
        reply:
          transactionId: "tx-${request.orderId}"
          amount: ${request.amount}
          text: "charged ${request.amount}"
          by: ${agent.name}
          action: "${message.service}.${message.action}"
          call: ${n}
          fixed: 42
          quoted: "42"
          flag: true
      "*":
        reply: {echo: "${request}", action: "${message.action}"}
)y");
  auto client = start_client();
  const json body = reply_json(client->call(
      "PaymentService", "charge", ea::to_json_payload({{"orderId", "o-1"}, {"amount", 250}}), 5s));
  EXPECT_EQ(body["transactionId"], "tx-o-1");
  EXPECT_EQ(body["amount"], 250);  // whole-value reference: stays a number
  EXPECT_EQ(body["text"], "charged 250");
  EXPECT_EQ(body["by"], "payments");
  EXPECT_EQ(body["action"], "PaymentService.charge");
  EXPECT_EQ(body["call"], 1);
  EXPECT_EQ(body["fixed"], 42);
  EXPECT_EQ(body["quoted"], "42");
  EXPECT_EQ(body["flag"], true);

  const json other =
      reply_json(client->call("PaymentService", "refund", ea::to_json_payload({{"x", 1}}), 5s));
  EXPECT_EQ(other["action"], "refund");
  EXPECT_EQ(other["echo"], json({{"x", 1}}));

  const auto c = agent->counters();
  EXPECT_EQ(c.actions.at("PaymentService.charge").calls, 1u);
  EXPECT_EQ(c.actions.at("PaymentService.*").calls, 1u);
  EXPECT_EQ(c.calls, 2u);
}

TEST_F(scriptable_agent_test, latency_delays_only_its_own_action_and_stop_wakes_it) {
  auto agent = start_agent(R"y(
services:
  Work:
    capacity: 2
    actions:
      slow: {latency: 1h, reply: slow}
      jitter: {latency: {min: 1ms, max: 5ms}, reply: jitter}
      fast: {reply: fast}
)y");
  auto client = start_client();
  auto slow = client->call_future("Work", "slow", {}, 60s);
  ASSERT_TRUE(
      tk::wait_until([&] { return agent->counters().actions.at("Work.slow").calls == 1; }, 10s));
  EXPECT_EQ(reply_json(client->call("Work", "fast", {}, 10s)), "fast");
  EXPECT_EQ(reply_json(client->call("Work", "jitter", {}, 10s)), "jitter");
  // The slow one is still sleeping while the others are answered...
  EXPECT_NE(slow.wait_for(0s), std::future_status::ready);
  // ...and stop() wakes it instead of waiting for the hour: it is answered with an error.
  agent->stop();
  const auto r = slow.get();
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.err().code == "shutting_down" || r.err().code == "worker_lost")
      << r.err().to_string();
}

TEST_F(scriptable_agent_test, fail_first_n_calls_then_succeed) {
  auto agent = start_agent(R"y(
services:
  PaymentService:
    actions:
      charge:
        reply: {ok: true, call: "${n}"}
        fail: {first: 2, code: unavailable, message: "try again (call ${n})"}
)y");
  auto client = start_client();
  for (int i = 1; i <= 2; ++i) {
    auto r = client->call("PaymentService", "charge", {}, 5s);
    ASSERT_FALSE(r.ok()) << "call " << i;
    EXPECT_EQ(r.err().code, "unavailable");
    EXPECT_EQ(r.err().message, "try again (call " + std::to_string(i) + ")");
    EXPECT_TRUE(r.err().retryable);  // injected failures are retryable unless said otherwise
  }
  EXPECT_EQ(reply_json(client->call("PaymentService", "charge", {}, 5s))["call"], 3);
  EXPECT_EQ(reply_json(client->call("PaymentService", "charge", {}, 5s))["call"], 4);
  const auto c = agent->counters().actions.at("PaymentService.charge");
  EXPECT_EQ(c.calls, 4u);
  EXPECT_EQ(c.failures, 2u);
}

TEST_F(scriptable_agent_test, fail_when_condition_holds_and_rate_one_always_fails) {
  auto agent = start_agent(R"y(
seed: 7
services:
  PaymentService:
    actions:
      charge:
        reply: {charged: "${request.amount}"}
        fail:
          - when: "${request.amount} > 1000"
            code: card_declined
            message: "amount ${request.amount} is over the limit"
            retryable: false
          - when: "${request.card} == 'broken'"
            rate: 1
            code: gateway_error
)y");
  auto client = start_client();
  auto declined = client->call("PaymentService", "charge",
                               ea::to_json_payload({{"amount", 5000}, {"card", "ok"}}), 5s);
  ASSERT_FALSE(declined.ok());
  EXPECT_EQ(declined.err().code, "card_declined");
  EXPECT_EQ(declined.err().message, "amount 5000 is over the limit");
  EXPECT_FALSE(declined.err().retryable);

  auto broken = client->call("PaymentService", "charge",
                             ea::to_json_payload({{"amount", 5}, {"card", "broken"}}), 5s);
  ASSERT_FALSE(broken.ok());
  EXPECT_EQ(broken.err().code, "gateway_error");
  EXPECT_NE(broken.err().message.find("fail[1]"), std::string::npos) << broken.err().message;

  EXPECT_EQ(reply_json(client->call("PaymentService", "charge",
                                    ea::to_json_payload({{"amount", 10}, {"card", "ok"}}),
                                    5s))["charged"],
            10);
  // A condition that cannot be evaluated for this request is an error reply, not a crash.
  auto bad = client->call("PaymentService", "charge", ea::to_json_payload({{"card", "ok"}}), 5s);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.err().message.find("services.PaymentService.actions.charge.fail[0].when"),
            std::string::npos)
      << bad.err().message;
  EXPECT_EQ(agent->counters().actions.at("PaymentService.charge").failures, 2u);
}

// --- events --------------------------------------------------------------------------------

TEST_F(scriptable_agent_test, events_published_while_handling_carry_the_request_trace) {
  auto agent = start_agent(R"y(
services:
  PaymentService:
    actions:
      charge:
        reply: {transactionId: "tx-${request.orderId}"}
        publish:
          - topic: payment.charged
            payload: {orderId: "${request.orderId}", transactionId: "${reply.transactionId}"}
          - topic: payment.large
            when: "${request.amount} > 100"
          - payment.audit.${request.orderId}
)y");
  auto client = start_client({"payment."});
  ea::send_options so;
  so.id = "request-1";
  so.correlation_id = "order-corr-1";
  auto r = client->call("PaymentService", "charge",
                        ea::to_json_payload({{"orderId", "o-7"}, {"amount", 50}}), 5s, so);
  ASSERT_TRUE(r.ok()) << r.err().to_string();

  auto charged = events_.wait_for("payment.charged");
  ASSERT_TRUE(charged);
  EXPECT_EQ(charged->correlation_id(), "order-corr-1");
  EXPECT_EQ(charged->causation_id(), "request-1");
  EXPECT_EQ(body_of(*charged), json({{"orderId", "o-7"}, {"transactionId", "tx-o-7"}}));

  auto audit = events_.wait_for("payment.audit.o-7");
  ASSERT_TRUE(audit);
  EXPECT_EQ(audit->correlation_id(), "order-corr-1");
  EXPECT_EQ(body_of(*audit)["orderId"], "o-7");  // default payload: the request
  // payment.large was skipped (amount 50): the audit event was published after it would have
  // been, and events from one publisher arrive in order.
  EXPECT_TRUE(events_.on("payment.large").empty());
  EXPECT_EQ(agent->counters().actions.at("PaymentService.charge").events_published, 2u);
}

TEST_F(scriptable_agent_test, delayed_reaction_publishes_a_correlated_event_caused_by_the_trigger) {
  auto agent = start_agent(R"y(
reactions:
  - on: inventory.reserved
    when: "${event.payload.qty} > 0"
    delay: 50ms
    publish:
      topic: shipment.dispatched
      payload: {tracking: "T-${event.payload.orderId}", after: "${event.topic}"}
)y");
  auto client = start_client({"shipment."});
  ea::send_options so;
  so.correlation_id = "wf-1";
  auto skipped = client->publish("inventory.reserved",
                                 ea::to_json_payload({{"orderId", "o-0"}, {"qty", 0}}), so);
  ASSERT_TRUE(skipped.ok());
  auto trigger = client->publish("inventory.reserved",
                                 ea::to_json_payload({{"orderId", "o-1"}, {"qty", 2}}), so);
  ASSERT_TRUE(trigger.ok());
  // Not a reaction: an exact `on` does not match longer topics.
  ASSERT_TRUE(client
                  ->publish("inventory.reserved_twice",
                            ea::to_json_payload({{"orderId", "o-2"}, {"qty", 2}}), so)
                  .ok());

  auto shipped = events_.wait_for("shipment.dispatched");
  ASSERT_TRUE(shipped);
  EXPECT_EQ(body_of(*shipped),
            json({{"tracking", "T-o-1"}, {"after", "inventory.reserved"}}));  // not o-0
  EXPECT_EQ(shipped->correlation_id(), "wf-1");
  EXPECT_EQ(shipped->causation_id(), trigger->id);
  // The counters move just after the publish: wait for them rather than read them at once.
  ASSERT_TRUE(tk::wait_until(
      [&] {
        const auto c = agent->counters().reactions[0];
        return c.events == 2 && c.events_published == 1;
      },
      10s));
  EXPECT_EQ(agent->counters().reactions[0].triggered, 1u);
}

TEST_F(scriptable_agent_test, a_long_delay_does_not_hold_back_other_reactions) {
  auto agent = start_agent(R"y(
reactions:
  - on: slow.
    delay: 1h
    publish: {topic: out.slow}
  - on: [fast.go, fast.]          # overlapping entries: still one reaction per event
    publish: {topic: out.fast, payload: {n: "${n}"}}
)y");
  auto client = start_client({"out."});
  ASSERT_TRUE(client->publish("slow.go", ea::to_json_payload({{"i", 1}})).ok());
  ASSERT_TRUE(client->publish("fast.go", ea::to_json_payload({{"i", 2}})).ok());
  auto fast = events_.wait_for("out.fast");
  ASSERT_TRUE(fast);
  EXPECT_EQ(body_of(*fast)["n"], 1);
  EXPECT_TRUE(events_.on("out.slow").empty());
  ASSERT_TRUE(tk::wait_until([&] { return agent->counters().reactions[0].triggered == 1; }, 10s));
  agent->stop();
  const auto c = agent->counters();
  EXPECT_EQ(c.reactions[0].dropped, 1u);  // the pending delayed publish was dropped at stop
  EXPECT_EQ(c.reactions[1].events, 1u);
  EXPECT_EQ(c.reactions[1].events_published, 1u);
}

TEST_F(scriptable_agent_test, reaction_failure_outcome_publishes_the_alternative_event) {
  auto agent = start_agent(R"y(
reactions:
  - on: inventory.reserved
    publish: {topic: shipment.dispatched, payload: {orderId: "${event.payload.orderId}"}}
    fail:
      when: "${event.payload.qty} > 10"
      publish:
        topic: fulfillment.failed
        payload: {orderId: "${event.payload.orderId}", reason: too many}
)y");
  auto client = start_client({"shipment.", "fulfillment."});
  ea::send_options so;
  so.correlation_id = "wf-big";
  auto big = client->publish("inventory.reserved",
                             ea::to_json_payload({{"orderId", "big"}, {"qty", 50}}), so);
  ASSERT_TRUE(big.ok());
  ASSERT_TRUE(
      client->publish("inventory.reserved", ea::to_json_payload({{"orderId", "small"}, {"qty", 1}}))
          .ok());
  auto failed = events_.wait_for("fulfillment.failed");
  ASSERT_TRUE(failed);
  EXPECT_EQ(body_of(*failed), json({{"orderId", "big"}, {"reason", "too many"}}));
  EXPECT_EQ(failed->correlation_id(), "wf-big");
  EXPECT_EQ(failed->causation_id(), big->id);
  auto shipped = events_.wait_for("shipment.dispatched");
  ASSERT_TRUE(shipped);
  EXPECT_EQ(body_of(*shipped)["orderId"], "small");
  EXPECT_EQ(events_.on("shipment.dispatched").size(), 1u);
  EXPECT_EQ(agent->counters().reactions[0].failures, 1u);
}

// --- dedupe --------------------------------------------------------------------------------

TEST_F(scriptable_agent_test, a_duplicate_idempotency_key_gets_the_first_answer_again) {
  auto agent = start_agent(R"y(
services:
  PaymentService:
    actions:
      charge:
        reply: {call: "${n}"}
        publish: {topic: payment.charged}
      flaky:
        fail: {first: 1, code: unavailable}
        reply: ok
)y");
  auto client = start_client({"payment."});
  ea::send_options k1;
  k1.idempotency_key = "wf-1/Charge/1";
  const json first = reply_json(client->call("PaymentService", "charge", {}, 5s, k1));
  const json again = reply_json(client->call("PaymentService", "charge", {}, 5s, k1));
  EXPECT_EQ(first["call"], 1);
  EXPECT_EQ(again, first);  // not re-run: the action would have answered call 2
  ea::send_options k2;
  k2.idempotency_key = "wf-1/Charge/2";
  EXPECT_EQ(reply_json(client->call("PaymentService", "charge", {}, 5s, k2))["call"], 3);
  // Without a key, nothing is deduplicated.
  EXPECT_EQ(reply_json(client->call("PaymentService", "charge", {}, 5s))["call"], 4);

  // A failure is replayed too, and does not count as another injected failure.
  auto f1 = client->call("PaymentService", "flaky", {}, 5s, k1);
  auto f2 = client->call("PaymentService", "flaky", {}, 5s, k1);
  ASSERT_FALSE(f1.ok());
  ASSERT_FALSE(f2.ok());
  EXPECT_EQ(f2.err().code, "unavailable");
  EXPECT_EQ(reply_json(client->call("PaymentService", "flaky", {}, 5s, k2)), "ok");

  const auto c = agent->counters();
  EXPECT_EQ(c.actions.at("PaymentService.charge").calls, 4u);
  EXPECT_EQ(c.actions.at("PaymentService.charge").duplicates, 1u);
  EXPECT_EQ(c.actions.at("PaymentService.charge").events_published, 3u);
  EXPECT_EQ(c.actions.at("PaymentService.flaky").duplicates, 1u);
  EXPECT_EQ(c.actions.at("PaymentService.flaky").failures, 1u);
  EXPECT_EQ(c.duplicates, 2u);
}

TEST_F(scriptable_agent_test, a_duplicate_of_a_request_in_flight_waits_for_its_answer) {
  auto agent =
      start_agent("services: {S: {capacity: 2, actions: {a: {latency: 200ms, reply: '${n}'}}}}\n");
  auto client = start_client();
  ea::send_options k;
  k.idempotency_key = "same";
  auto first = client->call_future("S", "a", {}, 10s, k);
  auto second = client->call_future("S", "a", {}, 10s, k);
  const json a = reply_json(first.get());
  const json b = reply_json(second.get());
  EXPECT_EQ(a, b);
  EXPECT_EQ(agent->counters().duplicates, 1u);
  EXPECT_EQ(agent->counters().calls, 2u);
}

TEST_F(scriptable_agent_test, dedupe_false_runs_every_request) {
  auto agent = start_agent("dedupe: false\nservices: {S: {actions: {a: {reply: '${n}'}}}}\n");
  auto client = start_client();
  ea::send_options k;
  k.idempotency_key = "same";
  EXPECT_EQ(reply_json(client->call("S", "a", {}, 5s, k)), 1);
  EXPECT_EQ(reply_json(client->call("S", "a", {}, 5s, k)), 2);
  EXPECT_EQ(agent->counters().duplicates, 0u);
}

// --- the real `ensemble agent` process -----------------------------------------------------

TEST_F(scriptable_agent_test, ensemble_agent_process_serves_until_sigterm_and_exits_0) {
  const auto spec = write_spec("payments.yaml", R"y(
services:
  PaymentService:
    capacity: 2
    actions:
      charge: {reply: {transactionId: "tx-${request.orderId}"}}
  Audit:
    actions:
      log: {}
)y");
  auto proc = spawn_cli({spec, "--name", "pay-1"});
  auto ready = proc->wait_for_line("ensemble-agent ready", 10s);
  ASSERT_TRUE(ready) << proc->tail();
  EXPECT_NE(ready->find("name=pay-1 services=Audit,PaymentService"), std::string::npos) << *ready;

  auto client = start_client();
  auto r = client->call("PaymentService", "charge", ea::to_json_payload({{"orderId", "o-3"}}), 5s);
  EXPECT_EQ(reply_json(r)["transactionId"], "tx-o-3");
  EXPECT_EQ(r->worker(), "pay-1");

  proc->signal(SIGTERM);
  EXPECT_EQ(proc->wait_exit(10s), 0) << proc->tail();
}

TEST_F(scriptable_agent_test, crash_after_n_calls_exits_the_process_abruptly) {
  const auto spec = write_spec("crashy.yaml", R"y(
name: crashy
services:
  Work:
    actions:
      job: {reply: done, crash_after: 3}
)y");
  auto proc = spawn_cli({spec});
  ASSERT_TRUE(proc->wait_for_line("ensemble-agent ready name=crashy", 10s)) << proc->tail();
  auto client = start_client();
  EXPECT_EQ(reply_json(client->call("Work", "job", {}, 5s)), "done");
  EXPECT_EQ(reply_json(client->call("Work", "job", {}, 5s)), "done");
  auto third = client->call_future("Work", "job", {}, 5s);
  EXPECT_EQ(proc->wait_exit(10s), 3) << proc->tail();
  EXPECT_FALSE(third.get().ok());  // never answered by the agent: worker_lost or the deadline
}

TEST_F(scriptable_agent_test, ensemble_agent_with_a_bad_spec_exits_2_naming_file_and_path) {
  const auto spec = write_spec("bad.yaml", R"y(
services:
  PaymentService:
    actions:
      charge:
        latency: soon
)y");
  auto proc = spawn_cli({spec});
  // The message first (it is read until the output closes), then the exit code.
  EXPECT_TRUE(proc->wait_for_line(
      "bad.yaml: services.PaymentService.actions.charge.latency: must be a duration", 10s))
      << proc->tail();
  EXPECT_EQ(proc->wait_exit(10s), 2) << proc->tail();
}

// --- validation ----------------------------------------------------------------------------

std::string load_error(const std::string& yaml, const std::string& source = "payments.yaml") {
  try {
    (void)ec::parse_agent_spec(yaml, source);
  } catch (const ensemble::common::config_error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(scriptable_agent_spec, unknown_keys_are_named_with_file_and_path) {
  EXPECT_EQ(load_error("services:\n  P:\n    actions:\n      charge:\n        latncy: 20ms\n"),
            "payments.yaml: services.P.actions.charge.latncy: unknown key \"latncy\" in an action "
            "(did you mean \"latency\"?); allowed keys: reply, latency, fail, crash_after, "
            "publish (line 5, column 9)");
  EXPECT_NE(load_error("nme: x\nservices: {P: {actions: {a: {}}}}\n")
                .find("payments.yaml: nme: unknown key"),
            std::string::npos);
  EXPECT_NE(load_error("reactions:\n  - on: a.b\n    publish: x.y\n    dely: 5ms\n")
                .find("payments.yaml: reactions[0].dely: unknown key"),
            std::string::npos);
  // code/message/retryable belong to actions' failures, not to reactions'.
  EXPECT_NE(load_error("reactions:\n  - on: a.b\n    publish: x.y\n    fail: {code: x}\n")
                .find("payments.yaml: reactions[0].fail.code: unknown key"),
            std::string::npos);
}

TEST(scriptable_agent_spec, every_problem_is_reported_in_one_run_in_file_order) {
  const std::string text = load_error(
      "services:\n"
      "  P:\n"
      "    capacity: many\n"
      "    actions:\n"
      "      charge:\n"
      "        latency: soon\n"
      "      refund:\n"
      "        latncy: 20ms\n"
      "reactions:\n"
      "  - on: a.b\n");
  const std::vector<std::string> expected = {
      "payments.yaml: services.P.capacity: must be a whole number of at least 1, got \"many\" "
      "(line 3, column 5)",
      "payments.yaml: services.P.actions.charge.latency: must be a duration",
      "payments.yaml: services.P.actions.refund.latncy: unknown key \"latncy\" in an action (did "
      "you mean \"latency\"?)",
      "payments.yaml: reactions[0]: a reaction needs `publish`"};
  std::size_t at = 0;
  for (const auto& line : expected) {
    const auto found = text.find(line, at);
    ASSERT_NE(found, std::string::npos) << "missing or out of order: " << line << "\nin:\n" << text;
    at = found + line.size();
  }
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 3) << text;  // four lines
}

TEST(scriptable_agent_spec, bad_values_are_named_with_file_and_path) {
  const std::string base = "services:\n  P:\n    actions:\n      charge:\n";
  EXPECT_NE(load_error(base + "        latency: fast\n")
                .find("payments.yaml: services.P.actions.charge.latency: must be a duration"),
            std::string::npos);
  EXPECT_NE(load_error(base + "        latency: {min: 50ms, max: 10ms}\n")
                .find("services.P.actions.charge.latency.max: must not be less than min"),
            std::string::npos);
  EXPECT_NE(load_error(base + "        fail: {rate: 2}\n")
                .find("services.P.actions.charge.fail.rate: must be a fraction"),
            std::string::npos);
  EXPECT_NE(load_error(base + "        crash_after: 0\n")
                .find("services.P.actions.charge.crash_after: must be a whole number"),
            std::string::npos);
  EXPECT_NE(load_error(base + "        fail: {when: \"${request.a} >\"}\n")
                .find("services.P.actions.charge.fail.when: "),
            std::string::npos);
  EXPECT_NE(load_error(base + "        reply: \"${requst.a}\"\n")
                .find("services.P.actions.charge.reply: unknown reference ${requst.a}"),
            std::string::npos);
  EXPECT_NE(load_error(base + "        publish: {topic: \"bad topic\"}\n")
                .find("services.P.actions.charge.publish.topic: "),
            std::string::npos);
  EXPECT_NE(load_error("services:\n  P:\n    capacity: many\n    actions: {a: {}}\n")
                .find("services.P.capacity: must be a whole number"),
            std::string::npos);
  EXPECT_NE(load_error("reactions:\n  - on: a.b\n    delay: -5ms\n    publish: x.y\n")
                .find("reactions[0].delay: must be a duration"),
            std::string::npos);
  EXPECT_NE(load_error("reactions:\n  - on: a.b\n    when: \"${request.x}\"\n    publish: x.y\n")
                .find("reactions[0].when: unknown reference ${request.x}"),
            std::string::npos);
  EXPECT_NE(load_error("reactions:\n  - on: a.b\n").find("reactions[0]: a reaction needs"),
            std::string::npos);
  EXPECT_NE(load_error("name: x\n").find("payments.yaml: an agent spec needs"), std::string::npos);
  EXPECT_NE(load_error("").find("payments.yaml: the spec is empty"), std::string::npos);
  EXPECT_NE(load_error("services:\n  P: {actions: {a: {}}}\n  P: {actions: {b: {}}}\n")
                .find("services.P: duplicate key"),
            std::string::npos);
  EXPECT_NE(load_error("services: {P: [").find("payments.yaml: invalid YAML at line 1"),
            std::string::npos);
}

TEST(scriptable_agent_spec, a_missing_file_is_named) {
  try {
    (void)ec::load_agent_spec("/nonexistent/agents/payments.yaml");
    FAIL() << "no error";
  } catch (const ensemble::common::config_error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/agents/payments.yaml: cannot read"),
              std::string::npos)
        << e.what();
  }
}

TEST(scriptable_agent_spec, defaults_and_name_from_the_file) {
  const auto spec = ec::parse_agent_spec(
      "services: {S: {actions: {a: {latency: 20, fail: {first: 1}}}}}\n", "dir/billing.yaml");
  EXPECT_EQ(spec.name, "billing");
  EXPECT_TRUE(spec.dedupe);
  ASSERT_EQ(spec.services.size(), 1u);
  EXPECT_EQ(spec.services[0].capacity, 1u);
  const auto& a = spec.services[0].actions[0];
  ASSERT_TRUE(a.latency);
  EXPECT_EQ(a.latency->min, 20ms);
  EXPECT_EQ(a.latency->max, 20ms);
  ASSERT_EQ(a.fail.size(), 1u);
  EXPECT_EQ(a.fail[0].code, "injected_failure");
  EXPECT_TRUE(a.fail[0].retryable);
  EXPECT_EQ(spec.service_names(), std::vector<std::string>{"S"});
}

}  // namespace
