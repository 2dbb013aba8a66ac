// The chaos suite (ctest -L fault): the order-fulfillment example — orchestrated validate and
// charge, a choreographed fulfilment — running 500 instances while processes are killed and
// restarted and messages are duplicated and delayed. Whatever happens, every instance must end,
// exactly once. Each test prints its counts.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <map>
#include <set>
#include <thread>

#include "ensemble/common/protocol.hpp"
#include "ensemble/testkit/deployment.hpp"
#include "ensemble/testkit/event_recorder.hpp"
#include "ensemble/testkit/fault_proxy.hpp"
#include "ensemble/testkit/workflow_client.hpp"

namespace {

namespace tk = ensemble::testkit;
using json = nlohmann::json;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

constexpr int k_instances = 500;
constexpr int k_out_of_stock_every = 5;  // every 5th order fails fulfilment and is compensated
const std::string k_example = std::string(ENSEMBLE_SOURCE_DIR) + "/examples/order-fulfillment";
const std::string k_lifecycle = "workflow.OrderFulfillment.";

std::string id_of(int i) {
  return "chaos-" + std::to_string(i);
}

json order(int i) {
  const bool out_of_stock = i % k_out_of_stock_every == 0;
  return {{"orderId", id_of(i)},
          {"items", json::array({{{"sku", out_of_stock ? "OUT-OF-STOCK" : "BOOK-1"}, {"qty", 1}}})},
          {"amount", 10 + i % 90}};
}

bool terminal_topic(const std::string& topic) {
  return topic == k_lifecycle + "completed" || topic == k_lifecycle + "failed" ||
         topic == k_lifecycle + "cancelled" || topic == k_lifecycle + "timed_out";
}

// Instance id -> the distinct ids of its terminal lifecycle events (more than one: it ended
// twice), and how many terminal events were redeliveries of an id already seen.
struct endings {
  std::map<std::string, std::set<std::string>> by_instance;
  std::size_t redelivered = 0;
};

endings endings_of(const std::vector<tk::recorded_event>& events) {
  endings out;
  for (const auto& e : events) {
    if (!terminal_topic(e.topic)) continue;
    auto& ids = out.by_instance[e.payload.value("instance_id", e.correlation_id)];
    if (!ids.insert(e.id).second) ++out.redelivered;
  }
  return out;
}

struct tally {
  int started = 0;
  int completed = 0;
  int compensated = 0;       // failed, and the charge was refunded
  int failed = 0;            // failed otherwise
  int other = 0;             // cancelled, timed_out
  int duplicates = 0;        // instances that ended more than once
  int stuck = 0;             // not ended when the run was over
  int lost = 0;              // started but unknown to the orchestrator
  int unexplained = 0;       // failed without a stated reason
  int timeouts = 0;          // failed because a step timed out (a lost event, when nothing is slow)
  int wrongly_refunded = 0;  // compensated although its items were in stock (it was shipped)
  std::size_t redelivered = 0;
  double seconds = 0;                  // from the first start to the last end
  std::map<std::string, int> reasons;  // failure reasons, first line, for the printout

  void print(const std::string& scenario, const std::string& faults) const {
    std::printf(
        "[chaos] %s: started %d, completed %d, compensated %d, failed %d, other %d, "
        "duplicates %d, stuck %d, lost %d, unexplained %d, timeouts %d, in-stock refunded %d "
        "(lifecycle redeliveries %zu; %s; %.1f s)\n",
        scenario.c_str(), started, completed, compensated, failed, other, duplicates, stuck, lost,
        unexplained, timeouts, wrongly_refunded, redelivered, faults.c_str(), seconds);
    for (const auto& [reason, n] : reasons) std::printf("[chaos]   %4d x %s\n", n, reason.c_str());
    std::fflush(stdout);
  }
};

class chaos : public ::testing::Test {
 protected:
  // The example, with failover tuned for the test: workers are declared lost after 3 x 100 ms.
  tk::deployment example() {
    auto d = tk::deployment::from_file(k_example);
    d.broker_args({"--heartbeat", "100", "--log-level", "warn"});
    return d;
  }

  // Starts every instance from its own thread and client, each with a fixed id, so that a start
  // retried across a restart is not started twice. Starts are spread over the run (one every
  // `pace`: 500 take 10 s), so that the faults hit instances at every stage.
  void start_all(const tk::deployment& d, std::chrono::milliseconds pace = 20ms) {
    t0_ = steady::now();
    starter_ = std::thread([this, pace, connect = d.connect_as()] {
      tk::workflow_client wf(connect);
      for (int i = 0; i < k_instances; ++i) {
        std::this_thread::sleep_until(t0_ + i * pace);  // the load's rate, not a synchronisation
        auto r = wf.start("OrderFulfillment", order(i), id_of(i), 60s);
        if (r) {
          ++started_;
        } else {
          std::lock_guard lock(mutex_);
          start_errors_.push_back(id_of(i) + ": " + r.err().to_string());
        }
      }
      starting_done_ = true;
    });
  }

  void TearDown() override {
    if (starter_.joinable()) starter_.join();
  }

  // Instances that published a terminal lifecycle event among `events`.
  static std::size_t ended(const std::vector<tk::recorded_event>& events) {
    return endings_of(events).by_instance.size();
  }

  // Waits for every instance to end (asking the orchestrator, which is the truth; events may
  // have been lost with a broker) and counts the outcomes.
  tally settle(const tk::deployment& d, const tk::event_recorder& rec,
               std::chrono::milliseconds deadline) {
    if (starter_.joinable()) starter_.join();
    {
      std::lock_guard lock(mutex_);
      for (const auto& e : start_errors_) ADD_FAILURE() << "start failed: " << e;
    }
    tk::workflow_client wf(d.connect_as());
    const auto until = steady::now() + deadline;
    tally t;
    t.started = started_;
    for (int i = 0; i < k_instances; ++i) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(
          std::max(until - steady::now(), steady::duration::zero()));
      auto view = wf.wait(id_of(i), std::max(left, 1000ms));
      if (!view) {
        (view.err().code == "not_found" ? t.lost : t.stuck) += 1;
        if (view.err().code != "not_found")
          ADD_FAILURE() << id_of(i) << ": " << view.err().to_string();
        continue;
      }
      const std::string status = view->value("status", "");
      if (status == "completed") {
        ++t.completed;
        continue;
      }
      if (status != "failed") {
        ++t.other;
        continue;
      }
      const std::string reason = view->value("reason", "");
      if (reason.empty()) ++t.unexplained;
      ++t.reasons[reason.substr(0, reason.find('\n')).substr(0, 100)];
      const bool refunded =
          view->value("/steps/ChargePayment/status"_json_pointer, "") == "compensated";
      ++(refunded ? t.compensated : t.failed);
      if (refunded && i % k_out_of_stock_every != 0) ++t.wrongly_refunded;
      if (reason.find("timed out") != std::string::npos ||
          reason.find("timeout") != std::string::npos) {
        ++t.timeouts;
      }
    }
    const auto ends = endings_of(rec.events());
    for (const auto& [id, ids] : ends.by_instance) {
      if (ids.size() > 1) {
        ++t.duplicates;
        ADD_FAILURE() << id << " ended " << ids.size() << " times";
      }
    }
    t.redelivered = ends.redelivered;
    t.seconds = std::chrono::duration<double>(steady::now() - t0_).count();
    return t;
  }

  // What every scenario demands: each instance started, ended, exactly once, failures explained.
  static void expect_each_ended_once(const tally& t) {
    EXPECT_EQ(t.started, k_instances);
    EXPECT_EQ(t.completed + t.compensated + t.failed + t.other, k_instances);
    EXPECT_EQ(t.duplicates, 0);
    EXPECT_EQ(t.stuck, 0);
    EXPECT_EQ(t.lost, 0);
    EXPECT_EQ(t.unexplained, 0);
  }

  steady::time_point t0_;
  std::thread starter_;
  std::atomic<int> started_{0};
  std::atomic<bool> starting_done_{false};
  std::mutex mutex_;
  std::vector<std::string> start_errors_;
};

// 1. One of two payment agents is SIGKILLed every 200 ms and restarted. Requests in flight on
// it are re-dispatched by the broker (the orchestrator's commands are retryable) or retried by
// the step's policy: every instance completes, or fails fulfilment and is compensated.
TEST_F(chaos, PaymentAgentKilledEvery200ms) {
  auto d = example();
  d.model().agents.at(0).replicas = 2;  // orders-1 and orders-2 serve PaymentService
  d.start();
  tk::event_recorder rec(d.connect_as(), {k_lifecycle});
  start_all(d);

  int kills = 0;
  const auto give_up = steady::now() + 240s;
  while (!rec.wait(
             [&](const auto& events) {
               return starting_done_ && ended(events) >= static_cast<std::size_t>(started_.load());
             },
             200ms) &&
         steady::now() < give_up) {
    d.restart("orders-2", /*wait_ready=*/false);  // SIGKILL, and start again at once
    ++kills;
  }
  const auto t = settle(d, rec, 60s);
  t.print("payment agent SIGKILLed every 200 ms", std::to_string(kills) + " kills");

  EXPECT_GT(kills, 0);
  expect_each_ended_once(t);
  EXPECT_EQ(t.completed + t.compensated, k_instances)
      << "some ended neither completed nor compensated";
  EXPECT_EQ(t.compensated, k_instances / k_out_of_stock_every);
}

// 2. The orchestrator is SIGKILLed three times while 500 instances run, and restarted on its
// SQLite file each time: every instance resumes and ends exactly once.
TEST_F(chaos, OrchestratorKilledThreeTimes) {
  auto d = example();
  d.model().orchestrator->store = d.dir() + "/orchestrator.db";
  d.start();
  tk::event_recorder rec(d.connect_as(), {k_lifecycle});
  start_all(d);

  int kills = 0;
  for (const std::size_t at : {100U, 250U, 400U}) {
    // Kill at a point where instances are in flight: after `at` of them have ended.
    ASSERT_TRUE(rec.wait([&](const auto& events) { return ended(events) >= at; }, 120s))
        << "only " << ended(rec.events()) << " instances ended";
    d.restart("orchestrator");
    ++kills;
  }
  const auto t = settle(d, rec, 120s);
  tk::workflow_client wf(d.connect_as());
  auto last_run = wf.call("stats", json::object());
  t.print("orchestrator SIGKILLed 3 times",
          std::to_string(kills) + " kills; events caught up after the last restart: " +
              (last_run ? std::to_string(last_run->value("events_caught_up", 0)) : "?"));

  EXPECT_EQ(kills, 3);
  expect_each_ended_once(t);
  // Events the choreography published while the orchestrator was down are caught up from the
  // broker's journal after each restart: no fulfilment is mistaken for a timeout.
  EXPECT_EQ(t.completed + t.compensated, k_instances);
  EXPECT_EQ(t.compensated, k_instances / k_out_of_stock_every);
}

// 3. The broker is restarted while 500 instances run. It keeps no state: requests and events in
// flight are lost. Every instance still ends — completed, or failed with a stated reason — and
// none is left running.
TEST_F(chaos, BrokerRestarted) {
  auto d = example();
  d.start();
  tk::event_recorder rec(d.connect_as(), {k_lifecycle});
  start_all(d);

  ASSERT_TRUE(rec.wait([&](const auto& events) { return ended(events) >= 150; }, 120s));
  d.restart("broker");
  const auto t = settle(d, rec, 120s);
  t.print("broker restarted once", "1 restart");

  expect_each_ended_once(t);
  tk::workflow_client wf(d.connect_as());
  auto running = wf.call("list", {{"status", "running"}});
  ASSERT_TRUE(running) << running.err().to_string();
  EXPECT_TRUE(running->at("instances").empty()) << running->dump();
}

// 3b. Both at once, on the example's durable streams: the orchestrator is SIGKILLed three times
// and the broker SIGKILLed and restarted once (on its data directory) while 500 instances run.
// The choreography's events are stored and consumed durably by the orchestrator and the
// scriptable agents, so none is lost: every in-stock order completes, every out-of-stock one is
// compensated, no fulfilment times out and no shipped order is refunded.
TEST_F(chaos, OrchestratorKilledThreeTimesAndBrokerRestartedOnStreams) {
  auto d = example();
  ASSERT_FALSE(d.model().streams.empty()) << "the example declares its streams";
  d.model().orchestrator->store = d.dir() + "/orchestrator.db";
  d.start();
  tk::event_recorder rec(d.connect_as(), {k_lifecycle});
  start_all(d);

  int kills = 0;
  for (const std::size_t at : {100U, 250U, 400U}) {
    ASSERT_TRUE(rec.wait([&](const auto& events) { return ended(events) >= at; }, 120s))
        << "only " << ended(rec.events()) << " instances ended";
    d.restart("orchestrator");
    ++kills;
    if (at == 100U) d.restart("broker");
  }
  const auto t = settle(d, rec, 120s);
  t.print("orchestrator SIGKILLed 3 times and broker restarted, on streams",
          std::to_string(kills) + " orchestrator kills, 1 broker restart");

  expect_each_ended_once(t);
  EXPECT_EQ(t.completed, k_instances - k_instances / k_out_of_stock_every);
  EXPECT_EQ(t.compensated, k_instances / k_out_of_stock_every);
  EXPECT_EQ(t.timeouts, 0);
  EXPECT_EQ(t.wrongly_refunded, 0);
}

// 4. The orchestrator talks to the broker through a fault proxy that duplicates a fifth of its
// commands and of the replies to them, and duplicates and delays (reordering) the events it
// receives. No instance ends twice, and the payment service charges once per idempotency key.
TEST_F(chaos, DuplicatedAndDelayedMessages) {
  auto d = example();
  // The fault proxy forwards messages, so it cannot sit inside an encrypted connection: this
  // scenario runs the example plain (the others run it secured, as its file says).
  d.model().security.kind = ensemble::cli::security_section::mode::none;
  d.through_proxy("orchestrator");
  d.start();
  auto& proxy = d.proxy("orchestrator");
  tk::fault_rule requests;
  requests.chan = tk::channel::commands;
  requests.dir = tk::direction::to_broker;
  requests.commands = tk::command_bytes({ensemble::common::command::request});
  requests.duplicate = 0.2;
  proxy.add_rule(requests);
  tk::fault_rule replies = requests;
  replies.dir = tk::direction::from_broker;
  replies.commands = tk::command_bytes({ensemble::common::command::reply});
  proxy.add_rule(replies);
  tk::fault_rule events;
  events.chan = tk::channel::events;
  events.duplicate = 0.3;
  events.jitter = 50ms;
  proxy.add_rule(events);

  tk::event_recorder rec(d.connect_as(), {k_lifecycle});
  start_all(d);
  const auto t = settle(d, rec, 120s);
  const auto c = proxy.stats();
  t.print("duplicated and delayed messages", "proxy: " + std::to_string(c.duplicated) +
                                                 " duplicated, " + std::to_string(c.delayed) +
                                                 " delayed of " + std::to_string(c.forwarded));

  // The payment service's effects, from its own log: one charge per idempotency key.
  std::map<std::string, int> charges;
  for (const auto& line : d.proc("orders").lines()) {
    const auto at = line.find("[orders] charged ");
    const auto key = line.find("key ");
    if (at != std::string::npos && key != std::string::npos) {
      ++charges[line.substr(key + 4, line.find(')', key) - key - 4)];
    }
  }
  int charged_twice = 0;
  for (const auto& [key, n] : charges) {
    if (n > 1) {
      ++charged_twice;
      ADD_FAILURE() << "charged " << n << " times for key " << key;
    }
  }
  std::printf("[chaos]   charges %zu, keys charged more than once %d\n", charges.size(),
              charged_twice);

  EXPECT_GT(c.duplicated, 0U);
  EXPECT_GT(c.delayed, 0U);
  expect_each_ended_once(t);
  EXPECT_EQ(t.completed + t.compensated, k_instances);
  EXPECT_EQ(t.compensated, k_instances / k_out_of_stock_every);
  EXPECT_EQ(charged_twice, 0);
  EXPECT_GE(charges.size(), static_cast<std::size_t>(k_instances));
}

}  // namespace
