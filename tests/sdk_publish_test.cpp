// agent::publish under backpressure, against a real broker process: an event the SDK accepted
// is delivered, and one it cannot take is refused with an error — never dropped in silence.
//
// Counts, not timings: the publisher tallies what publish() said went out and what it refused,
// a subscriber tallies what it got, and the two must agree.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <future>
#include <mutex>
#include <vector>

#include "ensemble/agent/agent.hpp"
#include "ensemble/testkit/process.hpp"

namespace ea = ensemble::agent;
namespace tk = ensemble::testkit;
using namespace std::chrono_literals;

namespace {

constexpr std::string_view k_topic = "bp.event";

// 64-byte payloads carrying their index in the first 8 bytes.
std::string payload_of(std::uint64_t index) {
  std::string p(64, 'x');
  std::memcpy(p.data(), &index, sizeof index);
  return p;
}

// What a subscriber got: which indices, how often.
class tally {
 public:
  explicit tally(std::size_t capacity) : seen_(capacity, 0) {}
  void add(const ea::message& m) {
    std::uint64_t index = UINT64_MAX;
    if (m.payload().size() >= sizeof index) std::memcpy(&index, m.payload().data(), sizeof index);
    std::lock_guard lock(mutex_);
    if (index >= seen_.size()) {
      ++unexpected_;
    } else if (seen_[index]++ > 0) {
      ++duplicates_;
    }
    received_.fetch_add(1, std::memory_order_release);
  }
  std::uint64_t received() const { return received_.load(std::memory_order_acquire); }
  std::uint64_t duplicates() {
    std::lock_guard lock(mutex_);
    return duplicates_;
  }
  std::uint64_t unexpected() {
    std::lock_guard lock(mutex_);
    return unexpected_;
  }
  // How many of `indices` were never received.
  std::uint64_t missing(const std::vector<std::uint64_t>& indices) {
    std::lock_guard lock(mutex_);
    std::uint64_t n = 0;
    for (auto i : indices) n += seen_[i] == 0 ? 1 : 0;
    return n;
  }

 private:
  std::mutex mutex_;
  std::vector<std::uint8_t> seen_;
  std::uint64_t duplicates_ = 0;
  std::uint64_t unexpected_ = 0;
  std::atomic<std::uint64_t> received_{0};
};

class sdk_publish_test : public ::testing::Test {
 protected:
  // The broker's per-subscriber queue is made large enough for the whole test: a slow
  // subscriber losing events at the broker is a documented policy (docs/protocol.md), not the
  // publisher's loss that these tests are about.
  void start_broker() { broker_ = tk::broker_process::start({"--event-hwm", "3000000"}); }
  ea::options agent_options(const std::string& name) {
    ea::options o;
    o.name = name;
    o.broker = broker_->router();
    o.events = broker_->events();
    // A paused broker sends no heartbeats: the agents must not replace their connections
    // (and what the old one queued) while it is stopped.
    o.liveness = 100'000;
    return o;
  }
  void TearDown() override {
    if (HasFailure() && broker_) std::cerr << "broker output:\n" << broker_->proc().tail() << "\n";
  }
  std::unique_ptr<tk::broker_process> broker_;
};

TEST_F(sdk_publish_test,
       a_paused_broker_makes_publish_fail_after_its_timeout_and_no_event_is_lost) {
  start_broker();
  constexpr std::size_t k_limit = 5'000'000;  // far beyond what the queues can hold
  tally got(k_limit);
  ea::agent sub(agent_options("bp-sub"));
  ASSERT_TRUE(sub.subscribe("bp.", [&](const ea::message& m) { got.add(m); }).ok());
  ASSERT_TRUE(sub.start().ok());

  auto po = agent_options("bp-pub");
  po.send_queue = 1'000;
  po.publish_timeout = 200ms;
  ea::agent pub(po);
  ASSERT_TRUE(pub.start().ok());

  ASSERT_TRUE(broker_->proc().stop());  // SIGSTOP: the broker reads nothing until resumed
  std::vector<std::uint64_t> accepted;
  std::optional<ea::error> refusal;
  for (std::uint64_t i = 0; i < k_limit && !refusal; ++i) {
    if (auto r = pub.publish(std::string(k_topic), payload_of(i)); r) {
      accepted.push_back(i);
    } else {
      refusal = r.err();
    }
  }
  ASSERT_TRUE(refusal.has_value())
      << "publish accepted all " << accepted.size() << " events while the broker was stopped";
  EXPECT_EQ(refusal->code, "queue_full") << refusal->to_string();
  EXPECT_TRUE(refusal->retryable);
  EXPECT_EQ(pub.queued_events(), po.send_queue);

  // publish_async never blocks: with the queue full it is told at once.
  std::promise<ea::call_result> async_answer;
  pub.publish_async(std::string(k_topic), payload_of(k_limit - 1), 10s,
                    [&](ea::call_result r) { async_answer.set_value(std::move(r)); });
  auto async_result = async_answer.get_future().get();
  ASSERT_FALSE(async_result.ok());
  EXPECT_EQ(async_result.err().code, "queue_full");

  ASSERT_TRUE(broker_->proc().resume());
  std::cout << "accepted " << accepted.size() << " events before publish failed with "
            << refusal->to_string() << "\n";
  const bool all = tk::wait_until([&] { return got.received() >= accepted.size(); }, 60s);
  std::cout << "received " << got.received() << " of " << accepted.size() << "\n";
  EXPECT_TRUE(all) << "received " << got.received() << " of " << accepted.size()
                   << " accepted events";
  EXPECT_EQ(got.missing(accepted), 0u);
  EXPECT_EQ(got.duplicates(), 0u);
  EXPECT_EQ(got.unexpected(), 0u);

  // The queue drained: publishing works again. The acknowledged event comes after every other
  // in the subscriber's stream, so once it is in, nothing refused above can still arrive.
  EXPECT_TRUE(tk::wait_until([&] { return pub.queued_events() == 0; }, 30s));
  const std::uint64_t marker = k_limit - 2;
  auto again = pub.publish_acked(std::string(k_topic), payload_of(marker), 10s);
  ASSERT_TRUE(again.ok()) << again.err().to_string();
  EXPECT_TRUE(tk::wait_until([&] { return got.missing({marker}) == 0; }, 30s));
  EXPECT_EQ(got.received(), accepted.size() + 1);
  // Refused by publish() and by publish_async(): never sent.
  EXPECT_EQ(got.missing({accepted.size(), k_limit - 1}), 2u);
}

TEST_F(sdk_publish_test, every_event_of_a_burst_is_either_delivered_or_refused) {
  start_broker();
  constexpr std::uint64_t k_events = 200'000;
  tally got(k_events);
  ea::agent sub(agent_options("burst-sub"));
  ASSERT_TRUE(sub.subscribe("bp.", [&](const ea::message& m) { got.add(m); }).ok());
  ASSERT_TRUE(sub.start().ok());
  ea::agent pub(agent_options("burst-pub"));
  ASSERT_TRUE(pub.start().ok());

  std::vector<std::uint64_t> accepted;
  accepted.reserve(k_events);
  std::uint64_t refused = 0;
  std::string first_refusal;
  for (std::uint64_t i = 0; i < k_events; ++i) {
    if (auto r = pub.publish(std::string(k_topic), payload_of(i)); r) {
      accepted.push_back(i);
    } else if (refused++ == 0) {
      first_refusal = r.err().to_string();
    }
  }
  const bool all = tk::wait_until([&] { return got.received() >= accepted.size(); }, 90s);
  std::cout << "published " << k_events << ": accepted " << accepted.size() << ", refused "
            << refused << (refused > 0 ? " (first: " + first_refusal + ")" : "") << "; received "
            << got.received() << "\n";
  EXPECT_TRUE(all) << "received " << got.received() << " of " << accepted.size()
                   << " accepted events";
  EXPECT_EQ(accepted.size() + refused, k_events);
  EXPECT_EQ(got.missing(accepted), 0u);
  EXPECT_EQ(got.duplicates(), 0u);
  EXPECT_EQ(got.unexpected(), 0u);
}

}  // namespace

// The receiving side: a subscriber whose handler stalls holds at most options.event_queue events
// in its own memory; the rest wait in ZeroMQ's queues (here the subscriber's socket, whose
// queue is far larger than the burst), and every one is handled once the handler resumes.
TEST_F(sdk_publish_test, a_stalled_event_handler_holds_at_most_event_queue_events_and_loses_none) {
  start_broker();
  constexpr std::uint64_t k_events = 2'000;
  tally got(k_events);
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  auto so = agent_options("stall-sub");
  so.event_queue = 10;
  ea::agent sub(so);
  // However the test ends, the handler is let go before the agent stops (stop() waits for it).
  struct release_on_exit {
    std::promise<void>& p;
    bool done = false;
    void now() {
      if (!done) p.set_value();
      done = true;
    }
    ~release_on_exit() { now(); }
  } releaser{release};
  ASSERT_TRUE(sub.subscribe("bp.",
                            [&](const ea::message& m) {
                              released.wait();
                              got.add(m);
                            })
                  .ok());
  ASSERT_TRUE(sub.start().ok());

  ea::agent pub(agent_options("stall-pub"));
  ASSERT_TRUE(pub.start().ok());
  for (std::uint64_t i = 0; i + 1 < k_events; ++i) {
    ASSERT_TRUE(pub.publish(std::string(k_topic), payload_of(i)).ok());
  }
  auto last = pub.publish_acked(std::string(k_topic), payload_of(k_events - 1), 10s);
  ASSERT_TRUE(last.ok()) << last.err().to_string();

  // The handler holds its batch; behind it the agent reads events up to its bound and stops.
  ASSERT_TRUE(tk::wait_until([&] { return sub.waiting_events() == so.event_queue; }, 10s))
      << "waiting events: " << sub.waiting_events();
  // The agent's I/O thread still serves calls while its events wait, and by the time the
  // round trip is done every event the broker fanned out has had time to reach the agent's
  // socket: without the bound they would all be in the inbox now.
  auto ping = sub.call("broker", "ping", {}, 5s);
  ASSERT_TRUE(ping.ok()) << ping.err().to_string();
  EXPECT_EQ(sub.waiting_events(), so.event_queue);

  releaser.now();
  EXPECT_TRUE(tk::wait_until([&] { return got.received() >= k_events; }, 30s))
      << "received " << got.received() << " of " << k_events;
  std::vector<std::uint64_t> all(k_events);
  for (std::uint64_t i = 0; i < k_events; ++i) all[i] = i;
  EXPECT_EQ(got.missing(all), 0u);
  EXPECT_EQ(got.duplicates(), 0u);
  EXPECT_EQ(sub.waiting_events(), 0u);
}
