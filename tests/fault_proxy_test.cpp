// The testkit's fault proxy between SDK agents and a real broker process: with no rules it is
// invisible; drop, duplicate and delay rules do what they say on the router and on the events
// path, and only to the peers behind the proxy; the same seed gives the same faults; garbage is
// forwarded unchanged and the proxy keeps working.
#include "ensemble/testkit/fault_proxy.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <zmq.hpp>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/common/frames.hpp"
#include "ensemble/common/protocol.hpp"
#include "ensemble/testkit/process.hpp"
#include "support/raw_peer.hpp"

namespace ea = ensemble::agent;
namespace ec = ensemble::common;
namespace tk = ensemble::testkit;
using ec::command;
using ensemble::test::raw_peer;
using namespace std::chrono_literals;

namespace {

constexpr auto k_wait = 10s;  // generous: only reached when something is broken

// Events received by one subscriber, counted by event id, in arrival order.
class event_log {
 public:
  ea::event_handler handler() {
    return [this](const ea::message& e) {
      std::lock_guard lock(mutex_);
      ++count_[e.id()];
      order_.push_back(e.id());
    };
  }
  int count(const std::string& id) const {
    std::lock_guard lock(mutex_);
    auto it = count_.find(id);
    return it == count_.end() ? 0 : it->second;
  }
  std::size_t total() const {
    std::lock_guard lock(mutex_);
    return order_.size();
  }
  std::map<std::string, int> counts() const {
    std::lock_guard lock(mutex_);
    return count_;
  }

 private:
  mutable std::mutex mutex_;
  std::map<std::string, int> count_;
  std::vector<std::string> order_;
};

class fault_proxy_test : public ::testing::Test {
 protected:
  void SetUp() override {
    broker_ = tk::broker_process::start({"--heartbeat", "200", "--log-level", "warn"});
    proxy_ = tk::fault_proxy::start(broker_->router(), broker_->events(), 42);
  }
  void TearDown() override {
    if (HasFailure() && broker_) std::cerr << "broker output:\n" << broker_->proc().tail() << "\n";
  }
  ea::options direct(const std::string& name) const {
    ea::options o;
    o.name = name;
    o.broker = broker_->router();
    o.events = broker_->events();
    return o;
  }
  ea::options proxied(const std::string& name, const tk::fault_proxy& proxy) const {
    ea::options o;
    o.name = name;
    o.broker = proxy.router();
    o.events = proxy.events();
    return o;
  }
  ea::options proxied(const std::string& name) const { return proxied(name, *proxy_); }

  std::unique_ptr<tk::broker_process> broker_;
  std::unique_ptr<tk::fault_proxy> proxy_;
};

ea::request_handler echo(const std::string& worker_name) {
  return [worker_name](const ea::message& m) -> ea::handler_result {
    return ea::to_json_payload({{"worker", worker_name}, {"bytes", m.payload().size()}});
  };
}

TEST_F(fault_proxy_test, without_rules_calls_and_events_pass_through_unchanged) {
  ea::agent worker(proxied("worker"));
  worker.handle("Echo", "ping", echo("worker"));
  ASSERT_TRUE(worker.start().ok());
  ea::agent client(proxied("client"));
  ASSERT_TRUE(client.start().ok());
  event_log seen;
  ea::agent subscriber(proxied("subscriber"));
  ASSERT_TRUE(subscriber.subscribe("pass.", seen.handler()).ok());
  ASSERT_TRUE(subscriber.start().ok());
  ea::agent publisher(direct("publisher"));
  ASSERT_TRUE(publisher.start().ok());

  for (int i = 0; i < 20; ++i) {
    auto r = client.call("Echo", "ping", ea::bytes(static_cast<std::size_t>(i), 'x'), 5s);
    ASSERT_TRUE(r.ok()) << "call " << i << ": " << r.err().to_string();
    EXPECT_EQ(r->worker(), "worker");
    EXPECT_EQ((*ea::from_json_payload(r->payload()))["bytes"], i);
  }
  // The broker sees the proxied worker under its own name, as a peer of its own.
  auto services = client.call("broker", "services", {}, 5s);
  ASSERT_TRUE(services.ok()) << services.err().to_string();
  auto body = ea::from_json_payload(services->payload());
  ASSERT_TRUE(body.ok());
  bool worker_listed = false;
  for (const auto& s : (*body)["services"]) {
    if (s["service"] != "Echo") continue;
    ASSERT_EQ(s["workers"].size(), 1u);
    worker_listed = s["workers"][0]["agent"] == "worker";
  }
  EXPECT_TRUE(worker_listed) << body->dump();

  std::vector<std::string> ids;
  for (int i = 0; i < 10; ++i) {
    auto p = publisher.publish("pass.through", ea::to_json_payload({{"i", i}}));
    ASSERT_TRUE(p.ok()) << p.err().to_string();
    ids.push_back(p->id);
  }
  ASSERT_TRUE(tk::wait_until([&] { return seen.total() >= ids.size(); }, k_wait))
      << "the subscriber behind the proxy got " << seen.total() << " of " << ids.size();
  for (const auto& id : ids) EXPECT_EQ(seen.count(id), 1) << id;

  const auto s = proxy_->stats();
  EXPECT_GT(s.forwarded, 0u);
  EXPECT_EQ(s.dropped, 0u);
  EXPECT_EQ(s.duplicated, 0u);
  EXPECT_EQ(s.delayed, 0u);
  EXPECT_EQ(s.unparsed, 0u);
  EXPECT_GE(s.peers, 3u);  // worker, client, subscriber (its probes go out on its DEALER)
}

TEST_F(fault_proxy_test, dropped_dispatches_never_reach_the_worker_and_the_calls_time_out) {
  ea::agent worker(proxied("worker"));
  std::atomic<int> handled{0};
  worker.handle("Echo", "ping", [&](const ea::message& m) -> ea::handler_result {
    ++handled;
    return echo("worker")(m);
  });
  // A DISPATCH the worker never gets keeps its slot busy at the broker (the worker never
  // replies), so leave room for the ones that are dropped.
  worker.set_capacity("Echo", 4);
  ASSERT_TRUE(worker.start().ok());
  ea::agent client(direct("client"));
  ASSERT_TRUE(client.start().ok());

  std::atomic<int> to_drop{2};
  proxy_->add_rule({.chan = tk::channel::commands,
                    .dir = tk::direction::from_broker,
                    .commands = tk::command_bytes({command::dispatch}),
                    .match = [&](const tk::message_view&) { return to_drop.fetch_sub(1) > 0; },
                    .drop = 1.0});

  for (int i = 0; i < 2; ++i) {
    auto r = client.call("Echo", "ping", {}, 300ms);
    ASSERT_FALSE(r.ok()) << "call " << i << " was answered by " << r->worker();
    EXPECT_EQ(r.err().code, "deadline_exceeded") << r.err().message;
  }
  EXPECT_EQ(proxy_->stats().dropped, 2u);
  EXPECT_EQ(handled.load(), 0);

  auto r = client.call("Echo", "ping", {}, 5s);
  ASSERT_TRUE(r.ok()) << r.err().to_string();
  EXPECT_EQ(handled.load(), 1);
  EXPECT_EQ(proxy_->stats().dropped, 2u);
}

// A worker of capacity 1 whose DISPATCH is lost keeps heartbeating: the broker takes its slot
// back heartbeat x liveness (here 3 x 200 ms) after the request's deadline, and the next
// request reaches it.
TEST_F(fault_proxy_test, a_lost_dispatch_gives_the_workers_slot_back_after_its_deadline) {
  ea::agent worker(proxied("worker"));
  std::atomic<int> handled{0};
  worker.handle("Echo", "ping", [&](const ea::message& m) -> ea::handler_result {
    ++handled;
    return echo("worker")(m);
  });
  ASSERT_TRUE(worker.start().ok());  // capacity 1
  ea::agent client(direct("client"));
  ASSERT_TRUE(client.start().ok());

  std::atomic<int> to_drop{1};
  proxy_->add_rule({.chan = tk::channel::commands,
                    .dir = tk::direction::from_broker,
                    .commands = tk::command_bytes({command::dispatch}),
                    .match = [&](const tk::message_view&) { return to_drop.fetch_sub(1) > 0; },
                    .drop = 1.0});
  auto lost = client.call("Echo", "ping", {}, 300ms);
  ASSERT_FALSE(lost.ok());
  EXPECT_EQ(lost.err().code, "deadline_exceeded");

  // Queued behind the lost one until the broker gives the slot back, then handled.
  auto r = client.call("Echo", "ping", {}, 10s);
  ASSERT_TRUE(r.ok()) << r.err().to_string();
  EXPECT_EQ(handled.load(), 1);
  auto stats = client.call("broker", "stats", {}, 5s);
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ((*ea::from_json_payload(stats->payload()))["abandoned_released"], 1);
}

TEST_F(fault_proxy_test, duplicated_events_reach_the_proxied_subscriber_twice_and_others_once) {
  proxy_->add_rule({.chan = tk::channel::events, .topic_prefix = "dup.", .duplicate = 1.0});
  event_log behind_proxy, direct_seen;
  ea::agent proxied_sub(proxied("proxied-sub"));
  ASSERT_TRUE(proxied_sub.subscribe("dup.", behind_proxy.handler()).ok());
  ASSERT_TRUE(proxied_sub.start().ok());
  ea::agent direct_sub(direct("direct-sub"));
  ASSERT_TRUE(direct_sub.subscribe("dup.", direct_seen.handler()).ok());
  ASSERT_TRUE(direct_sub.start().ok());
  ea::agent publisher(direct("publisher"));
  ASSERT_TRUE(publisher.start().ok());

  constexpr int k_events = 20;
  std::vector<std::string> ids;
  for (int i = 0; i < k_events; ++i) {
    auto p = publisher.publish("dup.x", ea::to_json_payload({{"i", i}}));
    ASSERT_TRUE(p.ok()) << p.err().to_string();
    ids.push_back(p->id);
  }
  // One publisher, one connection per subscriber, no delay: events arrive in order, so once
  // the last one is in (twice behind the proxy), every earlier one is too.
  const std::string last = ids.back();
  ASSERT_TRUE(tk::wait_until([&] { return behind_proxy.count(last) == 2; }, k_wait))
      << "the last event reached the proxied subscriber " << behind_proxy.count(last) << " times";
  ASSERT_TRUE(tk::wait_until([&] { return direct_seen.count(last) == 1; }, k_wait));

  EXPECT_EQ(behind_proxy.counts().size(), ids.size());
  EXPECT_EQ(direct_seen.counts().size(), ids.size());
  for (const auto& id : ids) {
    EXPECT_EQ(behind_proxy.count(id), 2) << id;
    EXPECT_EQ(direct_seen.count(id), 1) << id;
  }
  EXPECT_EQ(proxy_->stats().duplicated, static_cast<std::uint64_t>(k_events));
}

TEST_F(fault_proxy_test, a_duplicated_request_is_dispatched_twice_with_the_same_idempotency_key) {
  std::mutex mutex;
  std::vector<std::pair<std::string, std::string>> dispatched;  // (request id, key)
  ea::agent worker(direct("worker"));
  worker.handle("Pay", "charge", [&](const ea::message& m) -> ea::handler_result {
    std::lock_guard lock(mutex);
    dispatched.emplace_back(m.id(), m.idempotency_key());
    return ea::bytes{};
  });
  ASSERT_TRUE(worker.start().ok());
  ea::agent client(proxied("client"));
  ASSERT_TRUE(client.start().ok());
  proxy_->add_rule({.chan = tk::channel::commands,
                    .dir = tk::direction::to_broker,
                    .commands = tk::command_bytes({command::request}),
                    .duplicate = 1.0});

  ea::send_options so;
  so.idempotency_key = "order-7/charge/1";
  auto r = client.call("Pay", "charge", {}, 5s, so);
  ASSERT_TRUE(r.ok()) << r.err().to_string();
  ASSERT_TRUE(tk::wait_until(
      [&] {
        std::lock_guard lock(mutex);
        return dispatched.size() >= 2;
      },
      k_wait))
      << "the worker saw the request only once";
  {
    std::lock_guard lock(mutex);
    ASSERT_EQ(dispatched.size(), 2u);
    EXPECT_EQ(dispatched[0].second, "order-7/charge/1");
    EXPECT_EQ(dispatched[1].second, "order-7/charge/1");
    EXPECT_EQ(dispatched[0].first, dispatched[1].first);
  }
  EXPECT_EQ(proxy_->stats().duplicated, 1u);
  // The second reply reached the client after its call was answered and was ignored; the
  // client goes on working.
  proxy_->clear_rules();
  auto again = client.call("Pay", "charge", {}, 5s);
  ASSERT_TRUE(again.ok()) << again.err().to_string();
}

TEST_F(fault_proxy_test, delayed_messages_are_held_back_then_delivered) {
  // "held." waits far longer than any test runs: while it sits in the proxy's queue, whether
  // the proxied subscriber has it is decided by the rule, not by how fast the machine is.
  proxy_->add_rule({.chan = tk::channel::events, .topic_prefix = "held.", .delay = 1h});
  proxy_->add_rule(
      {.chan = tk::channel::events, .topic_prefix = "slow.", .delay = 100ms, .jitter = 100ms});
  proxy_->add_rule({.chan = tk::channel::commands,
                    .dir = tk::direction::from_broker,
                    .commands = tk::command_bytes({command::reply}),
                    .delay = 100ms});
  event_log behind_proxy, direct_seen;
  ea::agent proxied_sub(proxied("proxied-sub"));
  ASSERT_TRUE(proxied_sub.subscribe("held.", behind_proxy.handler()).ok());
  ASSERT_TRUE(proxied_sub.subscribe("slow.", behind_proxy.handler()).ok());
  ASSERT_TRUE(proxied_sub.start().ok());
  ea::agent direct_sub(direct("direct-sub"));
  ASSERT_TRUE(direct_sub.subscribe("held.", direct_seen.handler()).ok());
  ASSERT_TRUE(direct_sub.start().ok());
  ea::agent publisher(direct("publisher"));
  ASSERT_TRUE(publisher.start().ok());

  auto held = publisher.publish_acked("held.a", {}, 5s);
  ASSERT_TRUE(held.ok()) << held.err().to_string();
  ASSERT_TRUE(tk::wait_until([&] { return direct_seen.count(held->id) == 1; }, k_wait));
  ASSERT_TRUE(tk::wait_until([&] { return proxy_->stats().waiting == 1; }, k_wait))
      << "the event never reached the proxy's delay queue";
  EXPECT_EQ(behind_proxy.count(held->id), 0) << "a held event was delivered";
  EXPECT_EQ(proxy_->stats().delayed, 1u);

  // Short delays with jitter: every event arrives exactly once, in whatever order.
  constexpr int k_events = 30;
  std::set<std::string> ids;
  for (int i = 0; i < k_events; ++i) {
    auto p = publisher.publish("slow.x", ea::to_json_payload({{"i", i}}));
    ASSERT_TRUE(p.ok()) << p.err().to_string();
    ids.insert(p->id);
  }
  ASSERT_TRUE(tk::wait_until(
      [&] { return behind_proxy.total() >= static_cast<std::size_t>(k_events); }, k_wait))
      << "the proxied subscriber got " << behind_proxy.total() << " of " << k_events;
  EXPECT_EQ(proxy_->stats().delayed, 1u + k_events);
  for (const auto& id : ids) EXPECT_EQ(behind_proxy.count(id), 1) << id;
  EXPECT_EQ(behind_proxy.count(held->id), 0);
  EXPECT_EQ(proxy_->stats().waiting, 1u);  // the held one, still

  // A delayed REPLY still answers the call.
  ea::agent worker(direct("worker"));
  worker.handle("Echo", "ping", echo("worker"));
  ASSERT_TRUE(worker.start().ok());
  ea::agent client(proxied("client"));
  ASSERT_TRUE(client.start().ok());
  auto r = client.call("Echo", "ping", {}, 5s);
  ASSERT_TRUE(r.ok()) << r.err().to_string();
  EXPECT_EQ(proxy_->stats().delayed, 2u + k_events);
}

TEST_F(fault_proxy_test, the_same_seed_drops_the_same_events) {
  auto second = tk::fault_proxy::start(broker_->router(), broker_->events(), 42);
  // The first matching rule decides: "rnd.last" is exempt from the drop rule after it.
  for (auto* p : {proxy_.get(), second.get()}) {
    p->add_rule({.chan = tk::channel::events, .topic_prefix = "rnd.last"});
    p->add_rule({.chan = tk::channel::events, .topic_prefix = "rnd.", .drop = 0.5});
  }
  event_log first_seen, second_seen;
  ea::agent first_sub(proxied("first-sub"));
  ASSERT_TRUE(first_sub.subscribe("rnd.", first_seen.handler()).ok());
  ASSERT_TRUE(first_sub.start().ok());
  ea::agent second_sub(proxied("second-sub", *second));
  ASSERT_TRUE(second_sub.subscribe("rnd.", second_seen.handler()).ok());
  ASSERT_TRUE(second_sub.start().ok());
  ea::agent publisher(direct("publisher"));
  ASSERT_TRUE(publisher.start().ok());

  constexpr int k_events = 40;
  for (int i = 0; i < k_events; ++i) {
    ASSERT_TRUE(publisher.publish("rnd.data", ea::to_json_payload({{"i", i}})).ok());
  }
  auto last = publisher.publish("rnd.last", {});
  ASSERT_TRUE(last.ok()) << last.err().to_string();
  ASSERT_TRUE(tk::wait_until(
      [&] { return first_seen.count(last->id) == 1 && second_seen.count(last->id) == 1; }, k_wait));

  EXPECT_EQ(first_seen.counts(), second_seen.counts());
  const auto s = proxy_->stats();
  EXPECT_EQ(s.dropped, second->stats().dropped);
  EXPECT_GT(s.dropped, 0u);
  EXPECT_LT(s.dropped, static_cast<std::uint64_t>(k_events));
  EXPECT_EQ(first_seen.total(), 1 + k_events - s.dropped);
}

TEST_F(fault_proxy_test, peers_behind_the_proxy_recover_from_a_broker_restart) {
  ea::agent worker(proxied("worker"));
  worker.handle("Echo", "ping", echo("worker"));
  ASSERT_TRUE(worker.start().ok());
  event_log seen;
  ea::agent client(proxied("client"));
  ASSERT_TRUE(client.subscribe("after.", seen.handler()).ok());
  ASSERT_TRUE(client.start().ok());
  ASSERT_TRUE(client.call("Echo", "ping", {}, 5s).ok());

  broker_->restart();
  // The proxy's DEALERs and XSUB reconnect by themselves; the agents register again through
  // them and the XSUB re-sends the subscriptions it carries.
  ASSERT_TRUE(tk::wait_until([&] { return client.registrations() >= 2; }, k_wait))
      << "the client did not register again";
  EXPECT_TRUE(tk::wait_until([&] { return client.call("Echo", "ping", {}, 1s).ok(); }, k_wait))
      << "the worker did not register again";
  EXPECT_TRUE(tk::wait_until(
      [&] {
        (void)client.publish("after.restart", {});  // each publish is a fresh probe
        return seen.total() > 0;
      },
      k_wait, 20ms))
      << "events did not flow through the proxy after the restart";
}

TEST_F(fault_proxy_test, garbage_is_forwarded_unchanged_and_the_proxy_keeps_working) {
  // A predicate that throws does not match (and does not stop the proxy); the rule after it
  // matches everything parseable, and garbage must get past it unharmed.
  proxy_->add_rule({.match = [](const tk::message_view&) -> bool {
                      throw std::runtime_error("predicate failed");
                    },
                    .drop = 1.0});
  proxy_->add_rule({.duplicate = 0.0});
  zmq::context_t ctx;
  raw_peer raw(ctx, proxy_->router());
  const std::string tag(ec::k_protocol_tag);
  const std::vector<std::vector<std::string>> garbage{
      {"garbage"},
      {""},
      {tag, std::string(1, '\x10'), "\xc1"},  // 0xc1 is never valid msgpack
      {tag, std::string(1, '\x10')},
      {tag, std::string(2, '\x10'), "\x80"},
      {tag, std::string(1, '\x55'), "\x80"},  // parses (an empty map) but no such command
  };
  for (const auto& g : garbage) {
    raw.send_raw(g);
    auto answer = raw.next_answer(k_wait);
    ASSERT_TRUE(answer.has_value())
        << "no answer through the proxy to garbage #" << (&g - garbage.data());
    EXPECT_EQ(answer->error_code, "bad_request") << answer->error_message;
  }
  EXPECT_EQ(proxy_->stats().unparsed, 5u);

  // Junk from a subscriber's side goes upstream unchanged too.
  zmq::socket_t junk_sub(ctx, zmq::socket_type::xsub);
  junk_sub.set(zmq::sockopt::linger, 0);
  junk_sub.connect(proxy_->events());
  ASSERT_TRUE(junk_sub.send(zmq::str_buffer("\x07junk"), zmq::send_flags::none));
  ASSERT_TRUE(junk_sub.send(zmq::message_t(), zmq::send_flags::none));

  // And the proxy still carries real traffic both ways.
  ea::agent worker(proxied("worker"));
  worker.handle("Echo", "ping", echo("worker"));
  ASSERT_TRUE(worker.start().ok());
  event_log seen;
  ea::agent client(proxied("client"));
  ASSERT_TRUE(client.subscribe("after.", seen.handler()).ok());
  ASSERT_TRUE(client.start().ok());
  auto r = client.call("Echo", "ping", {}, 5s);
  ASSERT_TRUE(r.ok()) << r.err().to_string();
  auto p = client.publish_acked("after.garbage", {}, 5s);
  ASSERT_TRUE(p.ok()) << p.err().to_string();
  EXPECT_TRUE(tk::wait_until([&] { return seen.count(p->id) == 1; }, k_wait));
  EXPECT_EQ(proxy_->stats().unparsed, 5u);
}

}  // namespace
