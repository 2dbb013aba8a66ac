// The agent SDK against a real broker process: request/reply across workers, worker loss,
// broker restart, pub/sub ordering, trace-context propagation, errors.
#include <gtest/gtest.h>

#include <atomic>
#include <csignal>
#include <future>
#include <map>
#include <mutex>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/testkit/process.hpp"

namespace ea = ensemble::agent;
namespace tk = ensemble::testkit;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

class sdk_test : public ::testing::Test {
 protected:
  void start_broker(std::vector<std::string> args = {"--heartbeat", "100"}) {
    broker_ = tk::broker_process::start(std::move(args));
  }
  ea::options agent_options(const std::string& name) {
    ea::options o;
    o.name = name;
    o.broker = broker_->router();
    o.events = broker_->events();
    return o;
  }
  std::unique_ptr<tk::process> start_worker(const std::string& name,
                                            std::vector<std::string> extra = {}) {
    std::vector<std::string> args{"--broker",        broker_->router(), "--events",
                                  broker_->events(), "--name",          name};
    args.insert(args.end(), extra.begin(), extra.end());
    auto p = tk::process::spawn({tk::binary_path("ensemble-test-worker"), args, {}, {}, name});
    if (!p->wait_for_line("test-worker ready", 10s)) {
      ADD_FAILURE() << name << " did not start:\n" << p->tail();
    }
    return p;
  }
  void TearDown() override {
    if (HasFailure() && broker_) std::cerr << "broker output:\n" << broker_->proc().tail() << "\n";
  }
  std::unique_ptr<tk::broker_process> broker_;
};

json reply_json(const ea::call_result& r) {
  EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.err().to_string());
  if (!r.ok()) return {};
  auto body = ea::from_json_payload(r->payload());
  EXPECT_TRUE(body.ok());
  return body.ok() ? *body : json();
}

TEST_F(sdk_test, every_call_is_answered_and_load_spreads_over_two_workers) {
  start_broker();
  auto w1 = start_worker("w1");
  auto w2 = start_worker("w2");
  ea::agent client(agent_options("client"));
  ASSERT_TRUE(client.start().ok());

  constexpr int k_calls = 400;
  std::vector<std::future<ea::call_result>> futures;
  for (int i = 0; i < k_calls; ++i) {
    futures.push_back(client.call_future("Echo", "ping", ea::to_json_payload({{"i", i}}), 10s));
  }
  std::map<std::string, int> by_worker;
  for (int i = 0; i < k_calls; ++i) {
    auto r = futures[i].get();
    ASSERT_TRUE(r.ok()) << "call " << i << ": " << r.err().to_string();
    json body = reply_json(r);
    EXPECT_EQ(body["request"]["i"], i);
    EXPECT_EQ(body["worker"], r->worker());
    ++by_worker[r->worker()];
  }
  ASSERT_EQ(by_worker.size(), 2u);
  // Least-recently-used dispatch with capacity 1 alternates; allow wide slack for scheduling.
  EXPECT_GE(by_worker["w1"], k_calls / 4);
  EXPECT_GE(by_worker["w2"], k_calls / 4);
}

TEST_F(sdk_test, killed_worker_mid_request_retryable_call_is_redispatched) {
  start_broker({"--heartbeat", "100", "--liveness", "5"});
  auto hanging = start_worker("hanging", {"--mode", "hang"});
  ea::agent client(agent_options("client"));
  ASSERT_TRUE(client.start().ok());

  ea::send_options retryable;
  retryable.retryable = true;
  const auto started = std::chrono::steady_clock::now();
  auto pending = client.call_future("Echo", "work", ea::to_json_payload({{"n", 1}}), 8s, retryable);
  ASSERT_TRUE(hanging->wait_for_line("handling Echo.work", 10s)) << hanging->tail();
  auto healthy = start_worker("healthy");
  hanging->kill();

  auto r = pending.get();
  const auto waited = std::chrono::steady_clock::now() - started;
  ASSERT_TRUE(r.ok()) << r.err().to_string();
  EXPECT_EQ(r->worker(), "healthy");
  EXPECT_LT(waited, 8s + 1s) << "the caller waited past its deadline";
}

TEST_F(sdk_test, killed_worker_mid_request_plain_call_gets_worker_lost_before_deadline) {
  start_broker({"--heartbeat", "100", "--liveness", "5"});
  auto hanging = start_worker("hanging", {"--mode", "hang"});
  ea::agent client(agent_options("client"));
  ASSERT_TRUE(client.start().ok());

  const auto started = std::chrono::steady_clock::now();
  auto pending = client.call_future("Echo", "work", {}, 8s);
  ASSERT_TRUE(hanging->wait_for_line("handling Echo.work", 10s)) << hanging->tail();
  auto healthy = start_worker("healthy");
  hanging->kill();

  auto r = pending.get();
  const auto waited = std::chrono::steady_clock::now() - started;
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.err().code, "worker_lost") << r.err().message;
  EXPECT_TRUE(r.err().retryable);
  EXPECT_NE(r.err().message.find("hanging"), std::string::npos) << r.err().message;
  EXPECT_LT(waited, 8s) << "worker_lost should come from the heartbeat, not the deadline";
}

TEST_F(sdk_test, call_to_a_busy_worker_is_answered_deadline_exceeded_at_its_deadline) {
  start_broker();
  auto hanging = start_worker("hanging", {"--mode", "hang"});
  ea::agent client(agent_options("client"));
  ASSERT_TRUE(client.start().ok());
  auto r = client.call("Echo", "work", {}, 300ms);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.err().code, "deadline_exceeded") << r.err().message;
}

TEST_F(sdk_test, agents_register_again_after_a_broker_restart) {
  start_broker({"--heartbeat", "200"});
  auto worker = start_worker("w1");
  ea::agent client(agent_options("client"));
  std::atomic<int> events_after_restart{0};
  ASSERT_TRUE(client.subscribe("after.", [&](const ea::message&) { ++events_after_restart; }).ok());
  ASSERT_TRUE(client.start().ok());
  ASSERT_TRUE(client.call("Echo", "ping", {}, 5s).ok());
  const auto first_broker = client.broker_id();
  ASSERT_EQ(client.registrations(), 1u);

  broker_->restart();
  // Within 3 heartbeat intervals of the new broker being up, both agents are registered.
  const auto budget = 3 * 200ms;
  EXPECT_TRUE(tk::wait_until([&] { return client.registrations() >= 2; }, budget + 500ms))
      << "client did not register again";
  EXPECT_NE(client.broker_id(), first_broker);
  EXPECT_TRUE(tk::wait_until(
      [&] {
        auto r = client.call("broker", "services", {}, 1s);
        if (!r) return false;
        auto body = ea::from_json_payload(r->payload());
        if (!body) return false;
        for (const auto& s : (*body)["services"]) {
          if (s["service"] == "Echo" && !s["workers"].empty()) return true;
        }
        return false;
      },
      budget + 500ms))
      << "worker did not register again";
  auto r = client.call("Echo", "ping", ea::to_json_payload({{"after", "restart"}}), 5s);
  ASSERT_TRUE(r.ok()) << r.err().to_string();
  EXPECT_EQ(reply_json(r)["request"]["after"], "restart");
  // The SUB socket reconnected by itself and re-sent its subscription; once it is applied,
  // events flow again. Publish until one arrives (each publish is a fresh probe).
  EXPECT_TRUE(tk::wait_until(
      [&] {
        (void)client.publish("after.restart", {});
        return events_after_restart.load() > 0;
      },
      5s, 20ms))
      << "subscription did not resume after the broker restart";
}

TEST_F(sdk_test, prefix_subscriptions_receive_matching_events_in_order_with_sequence_numbers) {
  start_broker();
  ea::agent publisher(agent_options("publisher"));
  ea::agent orders(agent_options("orders"));
  ea::agent created_only(agent_options("created-only"));
  std::mutex mutex;
  std::vector<std::pair<std::string, std::uint64_t>> orders_seen;
  std::vector<json> orders_payloads;
  std::vector<std::string> created_seen;
  std::promise<void> all_in;
  constexpr int k_each = 200;
  ASSERT_TRUE(orders
                  .subscribe("order.",
                             [&](const ea::message& e) {
                               std::lock_guard lock(mutex);
                               orders_seen.emplace_back(e.topic(), e.seq());
                               orders_payloads.push_back(*ea::from_json_payload(e.payload()));
                               if (orders_seen.size() == 2 * k_each) all_in.set_value();
                             })
                  .ok());
  ASSERT_TRUE(created_only
                  .subscribe("order.created",
                             [&](const ea::message& e) {
                               std::lock_guard lock(mutex);
                               created_seen.push_back(e.topic());
                             })
                  .ok());
  ASSERT_TRUE(publisher.start().ok());
  ASSERT_TRUE(orders.start().ok());
  ASSERT_TRUE(created_only.start().ok());

  for (int i = 0; i < k_each; ++i) {
    ASSERT_TRUE(publisher.publish("order.created", ea::to_json_payload({{"i", i}})).ok());
    ASSERT_TRUE(publisher.publish("order.shipped", ea::to_json_payload({{"i", i}})).ok());
    ASSERT_TRUE(publisher.publish("orders.misfiled", ea::to_json_payload({{"i", i}})).ok());
    ASSERT_TRUE(publisher.publish("payment.taken", ea::to_json_payload({{"i", i}})).ok());
  }
  // A final acknowledged publish: once acknowledged, everything before it was fanned out.
  ASSERT_TRUE(publisher.publish_acked("order.created.last", {}, 5s).ok());
  ASSERT_EQ(all_in.get_future().wait_for(10s), std::future_status::ready);

  {
    std::lock_guard lock(mutex);
    std::map<std::string, std::uint64_t> last_seq;
    std::map<std::string, int> next_index;
    for (std::size_t k = 0; k < orders_seen.size(); ++k) {
      const auto& [topic, seq] = orders_seen[k];
      ASSERT_TRUE(topic == "order.created" || topic == "order.shipped" ||
                  topic == "order.created.last")
          << topic;
      if (topic == "order.created.last") continue;
      EXPECT_EQ(seq, last_seq[topic] + 1) << topic << " skipped or reordered a sequence number";
      last_seq[topic] = seq;
      EXPECT_EQ(orders_payloads[k]["i"], next_index[topic]++) << topic << " out of order";
    }
    EXPECT_EQ(last_seq["order.created"], static_cast<std::uint64_t>(k_each));
    EXPECT_EQ(last_seq["order.shipped"], static_cast<std::uint64_t>(k_each));
  }
  EXPECT_TRUE(tk::wait_until(
      [&] {
        std::lock_guard lock(mutex);
        return created_seen.size() >= static_cast<std::size_t>(k_each) + 1;
      },
      5s));
  std::lock_guard lock(mutex);
  for (const auto& t : created_seen) EXPECT_EQ(t.rfind("order.created", 0), 0u) << t;
}

TEST_F(sdk_test, trace_context_flows_from_a_handled_request_into_its_calls_and_events) {
  start_broker();
  ea::agent downstream(agent_options("downstream"));
  ea::agent middle(agent_options("middle"));
  ea::agent client(agent_options("client"));
  std::promise<std::tuple<std::string, std::string, std::string>> seen_by_downstream;
  std::promise<std::tuple<std::string, std::string, std::string>> event_seen;
  std::promise<std::string> middle_request_id;
  downstream.handle("Downstream", "do", [&](const ea::message& m) -> ea::handler_result {
    seen_by_downstream.set_value({m.correlation_id(), m.causation_id(), m.trace_id()});
    return ea::bytes{};
  });
  middle.handle("Middle", "go", [&](const ea::message& m) -> ea::handler_result {
    middle_request_id.set_value(m.id());
    auto r = middle.call("Downstream", "do", {}, 5s);  // no trace fields given: inherited
    if (!r) return r.err();
    if (auto p = middle.publish("middle.done", {}); !p) return p.err();
    return ea::bytes{};
  });
  ASSERT_TRUE(
      client
          .subscribe("middle.",
                     [&](const ea::message& e) {
                       event_seen.set_value({e.correlation_id(), e.causation_id(), e.trace_id()});
                     })
          .ok());
  ASSERT_TRUE(downstream.start().ok());
  ASSERT_TRUE(middle.start().ok());
  ASSERT_TRUE(client.start().ok());

  ea::send_options so;
  so.correlation_id = "order-42";
  so.trace_id = "trace-7";
  auto r = client.call("Middle", "go", {}, 5s, so);
  ASSERT_TRUE(r.ok()) << r.err().to_string();
  const std::string request_id = middle_request_id.get_future().get();

  auto [corr, cause, trace] = seen_by_downstream.get_future().get();
  EXPECT_EQ(corr, "order-42");
  EXPECT_EQ(cause, request_id);
  EXPECT_EQ(trace, "trace-7");
  auto event = event_seen.get_future();
  ASSERT_EQ(event.wait_for(5s), std::future_status::ready);
  auto [ecorr, ecause, etrace] = event.get();
  EXPECT_EQ(ecorr, "order-42");
  EXPECT_EQ(ecause, request_id);
  EXPECT_EQ(etrace, "trace-7");
}

TEST_F(sdk_test, handler_errors_reach_the_caller_with_code_message_and_retryable) {
  start_broker();
  ea::agent worker(agent_options("worker"));
  worker.handle("Pay", "charge", [](const ea::message&) -> ea::handler_result {
    return ea::error{"card_declined", "the card was declined", false};
  });
  worker.handle("Pay", "flaky", [](const ea::message&) -> ea::handler_result {
    return ea::error{"gateway_timeout", "try again", true};
  });
  worker.handle("Pay", "explode",
                [](const ea::message&) -> ea::handler_result { throw std::runtime_error("boom"); });
  ASSERT_TRUE(worker.start().ok());
  ea::agent client(agent_options("client"));
  ASSERT_TRUE(client.start().ok());

  auto declined = client.call("Pay", "charge", {}, 5s);
  ASSERT_FALSE(declined.ok());
  EXPECT_EQ(declined.err().code, "card_declined");
  EXPECT_EQ(declined.err().message, "the card was declined");
  EXPECT_FALSE(declined.err().retryable);

  auto flaky = client.call("Pay", "flaky", {}, 5s);
  ASSERT_FALSE(flaky.ok());
  EXPECT_EQ(flaky.err().code, "gateway_timeout");
  EXPECT_TRUE(flaky.err().retryable);

  auto exploded = client.call("Pay", "explode", {}, 5s);
  ASSERT_FALSE(exploded.ok());
  EXPECT_EQ(exploded.err().code, "handler_failed");
  EXPECT_NE(exploded.err().message.find("boom"), std::string::npos);

  auto unknown = client.call("Pay", "refund", {}, 5s);
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.err().code, "unknown_action");
  EXPECT_NE(unknown.err().message.find("Pay.refund"), std::string::npos);
}

TEST_F(sdk_test, bad_calls_are_refused_locally_with_a_clear_error) {
  start_broker({"--max-message-size", "4096"});
  ea::agent client(agent_options("client"));
  ASSERT_TRUE(client.start().ok());

  auto too_large = client.call("Echo", "x", ea::bytes(10'000, 'x'), 5s);
  ASSERT_FALSE(too_large.ok());
  EXPECT_EQ(too_large.err().code, "too_large");
  EXPECT_NE(too_large.err().message.find("4096"), std::string::npos) << too_large.err().message;

  auto bad_service = client.call("has space", "x", {}, 5s);
  ASSERT_FALSE(bad_service.ok());
  EXPECT_EQ(bad_service.err().code, "bad_request");

  auto bad_topic = client.publish("order..created", {});
  ASSERT_FALSE(bad_topic.ok());
  EXPECT_NE(bad_topic.err().message.find("empty segment"), std::string::npos);

  auto nobody = client.call("NoSuchService", "x", {}, 200ms);
  ASSERT_FALSE(nobody.ok());
  EXPECT_EQ(nobody.err().code, "no_such_service");
}

// The SDK finds a call's answer by the number in the ids it makes; ids the caller chose (any
// text, including one shaped like another agent's ids) are found by name. Both kinds, in flight
// together, each get their own answer, and so do their errors and publish acknowledgements.
TEST_F(sdk_test, calls_with_ids_the_caller_chose_are_answered_beside_generated_ones) {
  start_broker();
  auto wo = agent_options("echo");
  wo.inline_handlers = true;
  ea::agent worker(wo);
  worker.handle("Echo", "echo", [](const ea::message& m) -> ea::handler_result {
    return m.id() + "|" + m.payload();
  });
  ASSERT_TRUE(worker.start().ok());
  ea::agent client(agent_options("client"));
  ASSERT_TRUE(client.start().ok());

  constexpr int k_calls = 200;
  std::vector<std::string> given(k_calls);  // empty: the SDK makes the id
  std::vector<std::future<ea::call_result>> futures;
  for (int i = 0; i < k_calls; ++i) {
    ea::send_options so;
    if (i % 3 == 1) so.id = "order-" + std::to_string(i);
    if (i % 3 == 2) so.id = "0123456789abcdef-" + std::to_string(i);  // another generator's shape
    given[i] = so.id;
    futures.push_back(client.call_future("Echo", "echo", "payload-" + std::to_string(i), 10s, so));
  }
  for (int i = 0; i < k_calls; ++i) {
    auto r = futures[i].get();
    ASSERT_TRUE(r.ok()) << "call " << i << ": " << r.err().to_string();
    const std::string& body = r->payload();
    const auto bar = body.find('|');
    ASSERT_NE(bar, std::string::npos) << body;
    EXPECT_EQ(body.substr(bar + 1), "payload-" + std::to_string(i));
    EXPECT_EQ(r->id(), body.substr(0, bar)) << "call " << i;
    if (!given[i].empty()) {
      EXPECT_EQ(r->id(), given[i]);
    }
  }

  ea::send_options named;
  named.id = "lookup-1";
  // The broker answers no_such_service at the deadline, just before the local backstop would.
  auto nobody = client.call("NoSuchService", "x", {}, 300ms, named);
  ASSERT_FALSE(nobody.ok());
  EXPECT_EQ(nobody.err().code, "no_such_service") << nobody.err().to_string();

  named.id = "event-1";
  auto acked = client.publish_acked("ids.test", {}, 10s, named);
  ASSERT_TRUE(acked.ok()) << acked.err().to_string();
  EXPECT_EQ(acked->id, "event-1");
  EXPECT_GT(acked->seq, 0u);
}

TEST_F(sdk_test, a_call_with_the_id_of_a_call_in_flight_is_refused_at_once) {
  start_broker();
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  ea::agent worker(agent_options("slow"));
  worker.handle("Slow", "hold", [released](const ea::message& m) -> ea::handler_result {
    released.wait_for(10s);
    return m.payload();
  });
  ASSERT_TRUE(worker.start().ok());
  ea::agent client(agent_options("client"));
  ASSERT_TRUE(client.start().ok());

  ea::send_options so;
  so.id = "order-7";
  auto first = client.call_future("Slow", "hold", "first", 10s, so);
  // Both would be answered with id order-7: the second is refused before it is sent.
  auto second = client.call("Slow", "hold", "second", 10s, so);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.err().code, "bad_request") << second.err().to_string();
  EXPECT_NE(second.err().message.find("'order-7'"), std::string::npos) << second.err().message;

  release.set_value();
  auto r = first.get();
  ASSERT_TRUE(r.ok()) << r.err().to_string();
  EXPECT_EQ(r->payload(), "first");
  // Answered, its id is free again.
  auto third = client.call("Slow", "hold", "third", 10s, so);
  ASSERT_TRUE(third.ok()) << third.err().to_string();
  EXPECT_EQ(third->payload(), "third");
}

TEST_F(sdk_test, start_fails_with_a_clear_error_when_no_broker_answers) {
  ea::options o;
  o.name = "lonely";
  o.broker = "tcp://127.0.0.1:1";  // nothing listens on port 1
  o.events = "tcp://127.0.0.1:2";
  o.start_timeout = 300ms;
  ea::agent a(o);
  auto s = a.start();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.err().code, "broker_lost");
  EXPECT_NE(s.err().message.find("tcp://127.0.0.1:1"), std::string::npos) << s.err().message;
}

}  // namespace
