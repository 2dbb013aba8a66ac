// agent::consume against a real ensemble-broker with --data: the SDK's durable consumer as
// docs/agents.md "Durable consumers" describes it. A handler's ok acks, a retryable error is
// redelivered (deliveries 2), a non-retryable one and a handler that keeps throwing end in the
// dead letters, two agents share one consumer without exceeding their capacity, and a broker
// killed with SIGKILL and restarted on the same data directory is joined again by the agent,
// which then receives everything that was not acked (duplicates allowed and counted, nothing
// lost), as is an agent that replaced its connection to a silent broker. The broker's view
// (broker.consumer_info, broker.stream_read) is the judge.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "support/streams_fixture.hpp"

namespace ea = ensemble::agent;
namespace tk = ensemble::testkit;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

constexpr auto k_wait = 20s;  // generous: only reached when something is broken

// What a consumer handler saw, for the test thread to wait on.
struct seen {
  std::uint64_t seq = 0;
  std::uint32_t deliveries = 0;
  std::string agent, id, topic, correlation_id, causation_id, stream, payload;
};

// A door a handler waits at, with a deadline, until the test opens it.
class gate {
 public:
  ~gate() { open(); }
  void open() {
    {
      std::lock_guard lock(mutex_);
      open_ = true;
    }
    cv_.notify_all();
  }
  void wait(std::chrono::milliseconds deadline) {
    std::unique_lock lock(mutex_);
    cv_.wait_for(lock, deadline, [this] { return open_; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool open_ = false;
};

class delivery_log {
 public:
  void add(const std::string& agent, const ea::message& m) {
    std::lock_guard lock(mutex_);
    all_.push_back({m.stream_seq(), m.deliveries(), agent, m.id(), m.topic(), m.correlation_id(),
                    m.causation_id(), m.stream(), m.payload()});
    ++times_[m.stream_seq()];
  }
  std::size_t distinct() {
    std::lock_guard lock(mutex_);
    return times_.size();
  }
  std::size_t total() {
    std::lock_guard lock(mutex_);
    return all_.size();
  }
  std::vector<seen> all() {
    std::lock_guard lock(mutex_);
    return all_;
  }
  std::map<std::uint64_t, int> times() {
    std::lock_guard lock(mutex_);
    return times_;
  }

 private:
  std::mutex mutex_;
  std::vector<seen> all_;
  std::map<std::uint64_t, int> times_;
};

// A dead letter names the code the member gave: docs/protocol.md has it in `error_code`; the
// broker currently stores it as the prefix `code: ` of `error_message`. Either says it.
bool carries_code(const json& dead_letter_header, const std::string& code) {
  return dead_letter_header.value("error_code", std::string()) == code ||
         dead_letter_header.value("error_message", std::string()).rfind(code + ": ", 0) == 0;
}

class sdk_consume_test : public ensemble::test::streams_fixture {
 protected:
  void TearDown() override {
    agents_.clear();  // before the broker goes
    streams_fixture::TearDown();
  }

  ea::agent& make_agent(const std::string& name, bool start = true, bool inline_handlers = false) {
    ea::options o;
    o.name = name;
    o.inline_handlers = inline_handlers;
    o.broker = broker_->router();
    o.events = broker_->events();
    agents_.push_back(std::make_unique<ea::agent>(o));
    if (start) {
      auto s = agents_.back()->start();
      EXPECT_TRUE(s.ok()) << name << ": " << s.err().to_string();
    }
    return *agents_.back();
  }

  // Publishes `n` acked events on `topic` with payloads {n: first..first+n-1}; their stream
  // positions.
  std::vector<ea::published> publish_n(ea::agent& pub, const std::string& topic, int n,
                                       int first = 0) {
    std::vector<ea::published> out;
    for (int i = first; i < first + n; ++i) {
      auto p = pub.publish_acked(topic, ea::to_json_payload({{"n", i}}), k_wait);
      EXPECT_TRUE(p.ok()) << p.err().to_string();
      if (p.ok()) out.push_back(*p);
    }
    return out;
  }

  // Publishes {n: first..last-1} acked, again after a retryable error (the publisher meets a
  // broker restart or a replaced connection with broker_lost): every one is stored once acked.
  void publish_acked_through(ea::agent& pub, int first, int last) {
    for (int n = first; n < last;) {
      auto p = pub.publish_acked("order.created", ea::to_json_payload({{"n", n}}), k_wait);
      if (p.ok()) {
        ++n;
      } else {
        ASSERT_TRUE(p.err().retryable) << p.err().to_string();
      }
    }
  }

  json info(const std::string& consumer) {
    return admin("consumer_info", {{"stream", "orders"}, {"name", consumer}});
  }
  // Waits until the broker counts `acked` acks for the consumer; its consumer_info then.
  json wait_acked(const std::string& consumer, std::uint64_t acked) {
    json last;
    tk::wait_until(
        [&] {
          last = info(consumer);
          return last.value("acked", 0ULL) >= acked;
        },
        k_wait, 20ms);
    return last;
  }

  std::vector<std::unique_ptr<ea::agent>> agents_;
};

TEST_F(sdk_consume_test, a_handler_that_returns_ok_acks_and_sees_the_stored_event) {
  start_with_orders();
  // A plain subscriber sees the stored events' stream positions too.
  auto& watcher = make_agent("watcher", false);
  delivery_log fanned;
  for (const char* prefix : {"order.", "audit."}) {
    ASSERT_TRUE(
        watcher.subscribe(prefix, [&](const ea::message& m) { fanned.add("watcher", m); }).ok());
  }
  ASSERT_TRUE(watcher.start().ok());

  auto& pub = make_agent("orders-pub");
  // publish_acked on a stream topic returns where the stream stored the event.
  auto stored = publish_n(pub, "order.created", 5);
  ASSERT_EQ(stored.size(), 5u);
  for (std::size_t i = 0; i < stored.size(); ++i) {
    EXPECT_EQ(stored[i].stream, "orders");
    EXPECT_EQ(stored[i].stream_seq, i + 1);
    EXPECT_FALSE(stored[i].duplicate);
  }
  // The same id again: a duplicate, with the original's stream_seq.
  ea::send_options again;
  again.id = "order-dup";
  auto first = pub.publish_acked("order.created", ea::to_json_payload({{"n", 5}}), k_wait, again);
  ASSERT_TRUE(first.ok()) << first.err().to_string();
  auto dup = pub.publish_acked("order.created", ea::to_json_payload({{"n", 5}}), k_wait, again);
  ASSERT_TRUE(dup.ok()) << dup.err().to_string();
  EXPECT_TRUE(dup->duplicate);
  EXPECT_EQ(dup->stream_seq, first->stream_seq);

  auto& billing = make_agent("billing-1", false);
  delivery_log got;
  std::atomic<int> outside_context{0};
  ea::consume_options co;
  co.stream = "orders";
  co.consumer = "billing";
  co.capacity = 2;
  ASSERT_TRUE(billing
                  .consume(co,
                           [&](const ea::message& m) -> ea::status {
                             if (ea::current_message() != &m) ++outside_context;
                             got.add("billing-1", m);
                             // Still working: accepted from the holder (refused counts below).
                             if (auto p = billing.progress(m); !p) return p.err();
                             // Caused by the delivery: same correlation, causation = its id.
                             auto p = billing.publish(
                                 "audit.billed", ea::to_json_payload({{"seq", m.stream_seq()}}));
                             if (!p) return p.err();
                             return ensemble::common::ok_status();
                           })
                  .ok());
  ASSERT_TRUE(billing.start().ok());  // joins the consumer

  auto i = wait_acked("billing", 6);
  EXPECT_EQ(i["acked"], 6) << i.dump();
  EXPECT_EQ(i["ack_floor"], 6) << i.dump();
  EXPECT_EQ(i["redelivered"], 0) << i.dump();
  EXPECT_EQ(i["refused"], 0) << i.dump();  // six PROGRESS and six ACK
  ASSERT_EQ(i["members"].size(), 1u) << i.dump();
  EXPECT_EQ(i["members"][0]["agent"], "billing-1");
  EXPECT_EQ(i["members"][0]["capacity"], 2);

  EXPECT_EQ(outside_context.load(), 0);
  auto deliveries = got.all();
  ASSERT_EQ(deliveries.size(), 6u);
  std::sort(deliveries.begin(), deliveries.end(),
            [](const seen& x, const seen& y) { return x.seq < y.seq; });
  for (std::size_t k = 0; k < 5; ++k) {
    const auto& d = deliveries[k];
    EXPECT_EQ(d.seq, k + 1);
    EXPECT_EQ(d.deliveries, 1u);
    EXPECT_EQ(d.id, stored[k].id);
    EXPECT_EQ(d.topic, "order.created");
    EXPECT_EQ(d.stream, "orders");
    EXPECT_EQ(json::from_msgpack(d.payload), json({{"n", k}}));
  }
  auto stats = billing.consumer_stats("orders", "billing");
  ASSERT_TRUE(stats.has_value());
  EXPECT_EQ(stats->delivered, 6u);
  EXPECT_EQ(stats->acked, 6u);
  EXPECT_EQ(stats->nacked + stats->termed + stats->refused, 0u);
  EXPECT_EQ(stats->joins, 1u);
  EXPECT_FALSE(billing.consumer_stats("orders", "nobody").has_value());
  ea::message not_a_delivery;
  EXPECT_EQ(billing.progress(not_a_delivery).err().code, "bad_request");

  // 6 stored events (the duplicate was not fanned out) and 6 audit events.
  ASSERT_TRUE(tk::wait_until([&] { return fanned.total() >= 12; }, k_wait));
  std::size_t audits = 0;
  for (const auto& e : fanned.all()) {
    SCOPED_TRACE(e.topic + " " + e.id);
    if (e.topic == "order.created") {
      EXPECT_EQ(e.stream, "orders");
      EXPECT_GE(e.seq, 1u);
      continue;
    }
    ++audits;
    EXPECT_TRUE(e.stream.empty());
    const auto& cause = deliveries.at(json::from_msgpack(e.payload)["seq"].get<std::size_t>() - 1);
    EXPECT_EQ(e.causation_id, cause.id);
    EXPECT_EQ(e.correlation_id, cause.correlation_id);
  }
  EXPECT_EQ(audits, 6u);
}

TEST_F(sdk_consume_test, a_retryable_error_is_redelivered_with_deliveries_2) {
  start_with_orders();
  auto& pub = make_agent("orders-pub");
  publish_n(pub, "order.created", 3);
  auto& worker = make_agent("retry-1");
  delivery_log got;
  ea::consume_options co;
  co.stream = "orders";
  co.consumer = "retrying";
  co.config.max_deliver = 3;
  ASSERT_TRUE(worker
                  .consume(co,
                           [&](const ea::message& m) -> ea::status {
                             got.add("retry-1", m);
                             if (m.deliveries() == 1) {
                               return ea::error{"gateway_busy", "try again later", true};
                             }
                             return ensemble::common::ok_status();
                           })
                  .ok());
  auto i = wait_acked("retrying", 3);
  EXPECT_EQ(i["acked"], 3) << i.dump();
  EXPECT_EQ(i["redelivered"], 3) << i.dump();
  EXPECT_EQ(i["dead_lettered"], 0) << i.dump();
  EXPECT_EQ(i["config"]["max_deliver"], 3) << i.dump();
  const auto times = got.times();
  ASSERT_EQ(times.size(), 3u);
  for (const auto& [seq, n] : times) EXPECT_EQ(n, 2) << "stream_seq " << seq;
  for (const auto& d : got.all()) {
    if (d.deliveries == 2) continue;
    EXPECT_EQ(d.deliveries, 1u) << "stream_seq " << d.seq;
  }
  auto stats = worker.consumer_stats("orders", "retrying");
  ASSERT_TRUE(stats.has_value());
  EXPECT_EQ(stats->nacked, 3u);
  EXPECT_EQ(stats->acked, 3u);
  EXPECT_EQ(stats->redelivered, 3u);
}

TEST_F(sdk_consume_test, a_non_retryable_error_and_a_handler_that_keeps_throwing_are_dead_letters) {
  start_with_orders();
  auto& pub = make_agent("orders-pub");
  publish_n(pub, "order.created", 3);  // n = 0 ok, 1 refused for good, 2 throws every time
  auto& worker = make_agent("checker-1");
  ea::consume_options co;
  co.stream = "orders";
  co.consumer = "checker";
  co.config.max_deliver = 2;
  ASSERT_TRUE(worker
                  .consume(co,
                           [&](const ea::message& m) -> ea::status {
                             const int n = json::from_msgpack(m.payload())["n"];
                             if (n == 1) return ea::error{"bad_order", "order 1 is invalid", false};
                             if (n == 2) throw std::runtime_error("boom on order 2");
                             return ensemble::common::ok_status();
                           })
                  .ok());
  json i;
  ASSERT_TRUE(tk::wait_until(
      [&] {
        i = info("checker");
        return i.value("ack_floor", 0ULL) >= 3;
      },
      k_wait, 20ms))
      << i.dump();
  EXPECT_EQ(i["acked"], 1) << i.dump();
  EXPECT_EQ(i["dead_lettered"], 2) << i.dump();

  const auto dead = read_all("orders-dlq");
  ASSERT_EQ(dead.size(), 2u);
  std::map<std::uint64_t, json> by_seq;
  for (const auto& r : dead) by_seq[r["header"]["stream_seq"].get<std::uint64_t>()] = r["header"];
  ASSERT_TRUE(by_seq.count(2) && by_seq.count(3)) << json(dead).dump();
  // TERM: at once, with the handler's code and message.
  EXPECT_EQ(by_seq[2]["consumer"], "checker");
  EXPECT_EQ(by_seq[2]["deliveries"], 1);
  EXPECT_TRUE(carries_code(by_seq[2], "bad_order")) << by_seq[2].dump();
  EXPECT_NE(by_seq[2]["error_message"].get<std::string>().find("order 1 is invalid"),
            std::string::npos)
      << by_seq[2].dump();
  // A throwing handler is NACKed with the exception's text until max_deliver.
  EXPECT_EQ(by_seq[3]["deliveries"], 2);
  EXPECT_NE(by_seq[3]["error_message"].get<std::string>().find("boom on order 2"),
            std::string::npos)
      << by_seq[3].dump();

  auto stats = worker.consumer_stats("orders", "checker");
  ASSERT_TRUE(stats.has_value());
  EXPECT_EQ(stats->termed, 1u);
  EXPECT_EQ(stats->threw, 2u);
  EXPECT_EQ(stats->nacked, 2u);
}

TEST_F(sdk_consume_test, two_agents_share_a_consumer_within_their_capacity) {
  start_with_orders();
  constexpr int k_events = 40;
  constexpr std::uint32_t k_capacity = 2;
  delivery_log got;
  std::atomic<int> running{0};
  std::atomic<int> most{0};
  ea::consume_options co;
  co.stream = "orders";
  co.consumer = "shared";
  co.capacity = k_capacity;
  // shared-2 runs its handlers on its I/O thread (options.inline_handlers).
  for (const std::string name : {"shared-1", "shared-2"}) {
    auto& a = make_agent(name, true, name == "shared-2");
    ASSERT_TRUE(a.consume(co, [&, name](const ea::message& m) -> ea::status {
                   const int now = ++running;
                   int seen_most = most.load();
                   while (now > seen_most && !most.compare_exchange_weak(seen_most, now)) {
                   }
                   got.add(name, m);
                   --running;
                   return ensemble::common::ok_status();
                 }).ok());
  }
  auto before = info("shared");
  ASSERT_EQ(before["members"].size(), 2u) << before.dump();

  auto& pub = make_agent("orders-pub");
  publish_n(pub, "order.created", k_events);
  auto i = wait_acked("shared", k_events);
  EXPECT_EQ(i["acked"], k_events) << i.dump();
  EXPECT_EQ(got.distinct(), static_cast<std::size_t>(k_events));
  std::map<std::string, int> per_agent;
  for (const auto& d : got.all()) ++per_agent[d.agent];
  std::cout << "shared-1 handled " << per_agent["shared-1"] << ", shared-2 "
            << per_agent["shared-2"] << "; at most " << most.load() << " at once in all\n";
  EXPECT_GT(per_agent["shared-1"], 0);
  EXPECT_GT(per_agent["shared-2"], 0);
  EXPECT_LE(most.load(), static_cast<int>(2 * k_capacity));
}

TEST_F(sdk_consume_test, the_agent_joins_again_after_a_broker_restart_and_nothing_is_lost) {
  start_with_orders({"--heartbeat", "100"});
  constexpr int k_before = 60, k_after = 40;
  constexpr std::uint64_t k_held_seq = 5;
  auto& worker = make_agent("restart-1");
  delivery_log got;
  // The first delivery of k_held_seq is still being handled when the broker dies: its handler
  // waits for `gate`, opened once the new broker delivered that event again.
  gate held;
  std::atomic<bool> holding{false};
  ea::consume_options co;
  co.stream = "orders";
  co.consumer = "durable";
  co.capacity = 4;
  ASSERT_TRUE(worker
                  .consume(co,
                           [&](const ea::message& m) -> ea::status {
                             if (m.stream_seq() == k_held_seq && !holding.exchange(true)) {
                               held.wait(k_wait);
                             }
                             got.add("restart-1", m);
                             return ensemble::common::ok_status();
                           })
                  .ok());
  auto& pub = make_agent("orders-pub");
  publish_n(pub, "order.created", k_before);
  // Some were handled, perhaps not all, one is in the middle: kill the broker.
  ASSERT_TRUE(tk::wait_until([&] { return holding.load() && got.total() >= 10; }, k_wait));
  const auto first_broker = worker.broker_id();
  broker_->restart();

  // The agent notices the new broker run and joins again by itself.
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto s = worker.consumer_stats("orders", "durable");
        return s && s->joins >= 2;
      },
      k_wait))
      << "the agent did not join the consumer again";
  EXPECT_NE(worker.broker_id(), first_broker);

  // The new broker delivers the held event again (it was in flight) to a free slot; then the first
  // handler finishes and ACKs it too, and one of the two ACKs is refused not_pending: counted,
  // harmless.
  ASSERT_TRUE(tk::wait_until([&] { return got.times().count(k_held_seq) != 0; }, k_wait))
      << "stream_seq " << k_held_seq << " was not delivered again";
  held.open();
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto s = worker.consumer_stats("orders", "durable");
        return s && s->refused >= 1;
      },
      k_wait))
      << "no ACK was refused";

  // Events stored after the restart reach it too.
  publish_acked_through(pub, k_before, k_before + k_after);
  const std::size_t k_total = k_before + k_after;
  ASSERT_TRUE(tk::wait_until([&] { return got.distinct() >= k_total; }, k_wait))
      << "handled " << got.distinct() << " of " << k_total << " events";
  auto i = wait_acked("durable", 1);
  ASSERT_TRUE(tk::wait_until(
      [&] {
        i = info("durable");
        return i.value("ack_floor", 0ULL) >= k_total;
      },
      k_wait, 20ms))
      << i.dump();
  const auto times = got.times();
  EXPECT_EQ(times.size(), k_total);
  std::size_t duplicates = 0;
  for (const auto& [seq, n] : times) duplicates += static_cast<std::size_t>(n - 1);
  auto stats = worker.consumer_stats("orders", "durable");
  ASSERT_TRUE(stats.has_value());
  std::cout << "handled " << got.total() << " deliveries of " << k_total
            << " events: " << duplicates << " duplicate(s) after the restart; " << stats->refused
            << " ack(s) refused, " << stats->dropped << " delivery(ies) dropped, " << stats->joins
            << " joins\n";
  EXPECT_EQ(times.at(k_held_seq), 2);
  EXPECT_GE(stats->refused, 1u);
  EXPECT_EQ(times.begin()->first, 1u);
  EXPECT_EQ(times.rbegin()->first, k_total);
  ASSERT_EQ(i["members"].size(), 1u) << i.dump();
  EXPECT_EQ(i["members"][0]["agent"], "restart-1");
}

TEST_F(sdk_consume_test, an_agent_that_replaced_its_connection_joins_again) {
  start_with_orders({"--heartbeat", "100"});
  auto& worker = make_agent("reconnect-1");
  delivery_log got;
  ea::consume_options co;
  co.stream = "orders";
  co.consumer = "reconnecting";
  co.capacity = 2;
  ASSERT_TRUE(worker
                  .consume(co,
                           [&](const ea::message& m) -> ea::status {
                             got.add("reconnect-1", m);
                             return ensemble::common::ok_status();
                           })
                  .ok());
  auto& pub = make_agent("orders-pub");
  publish_acked_through(pub, 0, 5);
  ASSERT_TRUE(tk::wait_until([&] { return got.distinct() >= 5; }, k_wait));

  // A silent broker (SIGSTOP): after `liveness` heartbeats the agent replaces its connection;
  // the broker, resumed, registers it as a new peer, which must join the consumer again.
  const auto broker_id = worker.broker_id();
  ASSERT_TRUE(broker_->proc().stop());
  const bool replaced = tk::wait_until([&] { return !worker.registered(); }, k_wait);
  ASSERT_TRUE(broker_->proc().resume());
  ASSERT_TRUE(replaced) << "the agent did not notice the silent broker";
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto s = worker.consumer_stats("orders", "reconnecting");
        return s && s->joins >= 2;
      },
      k_wait))
      << "the agent did not join the consumer again";
  EXPECT_EQ(worker.broker_id(), broker_id);  // the same broker run

  publish_acked_through(pub, 5, 10);
  json i;
  ASSERT_TRUE(tk::wait_until(
      [&] {
        i = info("reconnecting");
        return i.value("ack_floor", 0ULL) >= 10 && i["members"].size() == 1;
      },
      k_wait, 20ms))
      << i.dump();
  EXPECT_EQ(got.distinct(), 10u);
  EXPECT_EQ(i["members"][0]["agent"], "reconnect-1");
}

TEST_F(sdk_consume_test, refusals_name_the_problem_and_stop_consuming_leaves) {
  start_with_orders();
  auto& a = make_agent("refused-1");
  auto ok = [](const ea::message&) -> ea::status { return ensemble::common::ok_status(); };

  ea::consume_options nowhere;
  nowhere.stream = "nowhere";
  nowhere.consumer = "c";
  auto missing = a.consume(nowhere, ok);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.err().code, "not_found") << missing.err().to_string();
  EXPECT_FALSE(a.consumer_stats("nowhere", "c").has_value());

  ea::consume_options bad_name;
  bad_name.stream = "orders";
  bad_name.consumer = "no spaces";
  auto named = a.consume(bad_name, ok);
  ASSERT_FALSE(named.ok());
  EXPECT_EQ(named.err().code, "bad_request");
  EXPECT_NE(named.err().message.find("no spaces"), std::string::npos) << named.err().message;

  ea::consume_options co;
  co.stream = "orders";
  co.consumer = "audit";
  co.config.ack_wait = 2s;
  ASSERT_TRUE(a.consume(co, ok).ok());
  auto twice = a.consume(co, ok);
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(twice.err().code, "bad_request");

  // Another agent asking for another configuration of the same consumer is refused, naming
  // the field.
  auto& b = make_agent("refused-2");
  co.config.ack_wait = 3s;
  auto differs = b.consume(co, ok);
  ASSERT_FALSE(differs.ok());
  EXPECT_EQ(differs.err().code, "bad_request");
  EXPECT_NE(differs.err().message.find("ack_wait_ms"), std::string::npos) << differs.err().message;
  // Without a configuration it joins the consumer as it is.
  co.config = {};
  ASSERT_TRUE(b.consume(co, ok).ok());
  EXPECT_EQ(info("audit")["members"].size(), 2u);
  EXPECT_EQ(info("audit")["config"]["ack_wait_ms"], 2000);

  ASSERT_TRUE(a.stop_consuming("orders", "audit").ok());
  auto i = info("audit");
  ASSERT_EQ(i["members"].size(), 1u) << i.dump();
  EXPECT_EQ(i["members"][0]["agent"], "refused-2");
  EXPECT_EQ(a.stop_consuming("orders", "audit").err().code, "not_found");

  // stop(): the member leaves with the agent's BYE.
  b.stop();
  ASSERT_TRUE(tk::wait_until([&] { return info("audit")["members"].empty(); }, k_wait, 20ms));

  // Before start(): start() fails when the broker refuses the consumer, naming it.
  auto& c = make_agent("refused-3", false);
  ASSERT_TRUE(c.consume(nowhere, ok).ok());
  auto started = c.start();
  ASSERT_FALSE(started.ok());
  EXPECT_EQ(started.err().code, "not_found") << started.err().to_string();
  EXPECT_NE(started.err().message.find("nowhere"), std::string::npos) << started.err().message;
}

}  // namespace
