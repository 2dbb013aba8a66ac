// Chaos: a subscriber that stops reading must not stall the broker or the other subscribers,
// and the broker's memory must stay bounded by its per-subscriber high-water mark
// (docs/protocol.md, sections 7 and 10: "slow subscribers lose events, they never slow the
// broker or others").
//
// One real broker with --event-hwm k_hwm. Three consumers of the topic prefix:
//   - a healthy SDK subscriber that counts every event and checks `seq` has no gap;
//   - a stalled raw SUB (small receive buffer and rcvhwm) that reads the warm-up events, then
//     stops reading for the whole flood, then reads again;
//   - a watcher agent that pings the broker throughout the flood.
// An SDK publisher sends ~400 MiB of 1 KiB events with acknowledgements. Its window is the
// healthy subscriber's progress (never more than k_window events ahead of it, k_window well
// below k_hwm), so the healthy subscriber's queue in the broker can never reach the
// high-water mark and every loss the test sees belongs to the stalled subscriber alone.
//
// Every wait is on a condition with a deadline; nothing asserts on timing. The counts are
// printed, like every chaos test's.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>
#include <zmq.hpp>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/common/frames.hpp"
#include "ensemble/common/protocol.hpp"
#include "ensemble/testkit/process.hpp"

namespace ea = ensemble::agent;
namespace ec = ensemble::common;
namespace tk = ensemble::testkit;
using nlohmann::json;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

namespace {

constexpr std::uint64_t k_hwm = 10'000;            // broker --event-hwm
constexpr std::uint64_t k_payload_bytes = 1024;    // msgpack payload of every flood event
constexpr std::uint64_t k_warmup_events = 1'000;   // read by the stalled subscriber too
constexpr std::uint64_t k_flood_events = 400'000;  // the stalled subscriber reads none
constexpr std::uint64_t k_window = 2'000;          // publisher lead over the healthy one
constexpr int k_stalled_rcvhwm = 100;              // messages held by the stalled SUB
constexpr int k_stalled_rcvbuf = 64 * 1024;        // its kernel receive buffer (SO_RCVBUF)
constexpr std::uint64_t k_mib = 1024 * 1024;
// An event on the wire and in a queue: payload, header (id, topic, correlation and trace
// ids, seq, ts, publisher: ~200 B) and topic frame. Rounded up.
constexpr std::uint64_t k_event_bytes = k_payload_bytes + 256;
// The broker's RSS may grow by what the stalled subscriber's queue holds (k_hwm events), the
// healthy one's and the publisher's (k_window each), twice over for per-message allocations
// and allocator slack, plus 24 MiB for everything else (trace journal of 10,000 entries,
// libzmq batches, heap fragmentation). For hwm 10,000 of 1 KiB events: ~58 MiB, against
// ~490 MiB of events published; an unbounded queue for the stalled subscriber would hold them
// all (with --event-hwm 0 this test sees the broker grow by ~900 MiB).
constexpr std::uint64_t k_rss_bound = 2 * (k_hwm + 2 * k_window) * k_event_bytes + 24 * k_mib;
static_assert(k_flood_events * k_event_bytes >= 3 * k_rss_bound,
              "the flood must be several times the memory bound, or the bound proves nothing");
static_assert(k_window * 4 <= k_hwm, "the healthy subscriber must stay far below the hwm");

const std::string k_prefix = "chaos.slow.";
const std::string k_topic = "chaos.slow.flood";
// Subscribed after k_prefix on the stalled SUB: once the broker's stats show it, the earlier
// subscription is active too (ZeroMQ applies one connection's subscriptions in order). The
// healthy subscriber shares k_prefix, and an XPUB reports a prefix only once, so the stalled
// subscriber needs a prefix of its own to be seen.
const std::string k_stalled_marker = "_chaos.stalled-marker";

struct memory {
  std::uint64_t rss = 0;   // VmRSS, bytes
  std::uint64_t peak = 0;  // VmHWM, bytes: the largest RSS since the process started
};

std::optional<memory> read_memory(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  if (!in) return std::nullopt;
  memory m;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string key;
    std::uint64_t kib = 0;
    fields >> key >> kib;
    if (key == "VmRSS:") m.rss = kib * 1024;
    if (key == "VmHWM:") m.peak = kib * 1024;
  }
  if (m.rss == 0 || m.peak == 0) return std::nullopt;
  return m;
}

// The largest size the kernel lets a loopback TCP send buffer grow to (tcp_wmem's maximum):
// what the broker's side of the stalled connection can hold beyond the high-water mark.
std::uint64_t tcp_send_buffer_max() {
  std::ifstream in("/proc/sys/net/ipv4/tcp_wmem");
  std::uint64_t min = 0, def = 0, max = 0;
  if (in >> min >> def >> max) return max;
  return 4 * k_mib;
}

double mib(std::uint64_t bytes) {
  return static_cast<double>(bytes) / static_cast<double>(k_mib);
}

// Per-topic sequence bookkeeping (docs/protocol.md, section 7).
struct seq_tracker {
  std::uint64_t received = 0;
  std::uint64_t last = 0;
  std::uint64_t gaps = 0;          // places where seq jumped forward
  std::uint64_t missed = 0;        // events skipped over by those jumps
  std::uint64_t out_of_order = 0;  // seq not above the previous one
  void see(std::uint64_t seq) {
    ++received;
    if (seq <= last) {
      ++out_of_order;
      return;
    }
    if (seq != last + 1) {
      ++gaps;
      missed += seq - last - 1;
    }
    last = seq;
  }
};

// The healthy subscriber's view, shared with the SDK's event thread.
struct healthy_view {
  std::mutex m;
  std::condition_variable cv;
  seq_tracker seqs;
};

// The publishing agent. It publishes with acknowledgements, never more than k_window events
// ahead of the healthy subscriber; acks are counted on the SDK's I/O thread. Owning the agent
// (declared last, so stopped first) keeps the ack callbacks from outliving the counters when
// a test fails early.
class windowed_publisher {
 public:
  windowed_publisher(ea::options opts, healthy_view& healthy, std::string payload)
      : healthy_(healthy), payload_(std::move(payload)), agent_(std::move(opts)) {}

  ea::status start() { return agent_.start(); }

  // Returns false (with the reason) if the healthy subscriber made no progress for `stall`.
  bool publish(std::uint64_t n, std::chrono::milliseconds stall, std::string& why) {
    for (std::uint64_t i = 0; i < n; ++i) {
      {
        std::unique_lock lock(healthy_.m);
        if (!healthy_.cv.wait_for(lock, stall,
                                  [&] { return sent_ - healthy_.seqs.received < k_window; })) {
          why = "the healthy subscriber received " + std::to_string(healthy_.seqs.received) +
                " of " + std::to_string(sent_) + " events and made no progress for " +
                std::to_string(stall.count()) + " ms";
          return false;
        }
      }
      ++sent_;
      agent_.publish_async(k_topic, payload_, 30s, [this](ea::call_result r) {
        if (r) {
          ++acked_;
          return;
        }
        std::lock_guard lock(error_mutex_);
        if (ack_errors_++ == 0) first_error_ = r.err().to_string();
      });
    }
    return true;
  }

  // One event, waiting for its acknowledgement; returns its seq, or 0 on error.
  std::uint64_t publish_acked(std::chrono::milliseconds deadline) {
    ++sent_;
    auto r = agent_.publish_acked(k_topic, payload_, deadline);
    if (!r) {
      std::lock_guard lock(error_mutex_);
      if (ack_errors_++ == 0) first_error_ = r.err().to_string();
      return 0;
    }
    ++acked_;
    return r->seq;
  }

  bool all_acknowledged(std::chrono::milliseconds deadline) const {
    return tk::wait_until([&] { return acked_ + ack_errors_ == sent_; }, deadline, 10ms);
  }
  std::uint64_t sent() const { return sent_; }
  std::uint64_t acked() const { return acked_; }
  std::uint64_t ack_errors() const { return ack_errors_; }
  std::string first_error() const {
    std::lock_guard lock(error_mutex_);
    return first_error_;
  }
  void stop() { agent_.stop(); }

 private:
  healthy_view& healthy_;
  const std::string payload_;
  std::atomic<std::uint64_t> sent_{0};
  std::atomic<std::uint64_t> acked_{0};
  std::atomic<std::uint64_t> ack_errors_{0};
  mutable std::mutex error_mutex_;
  std::string first_error_;
  ea::agent agent_;
};

// Reads every event waiting on the stalled SUB (or arriving within `wait`) into `seqs`.
void drain(zmq::socket_t& sub, seq_tracker& seqs, std::chrono::milliseconds wait) {
  std::vector<zmq::message_t> frames;
  std::array<zmq::pollitem_t, 1> items{{{sub.handle(), 0, ZMQ_POLLIN, 0}}};
  if (zmq::poll(items.data(), items.size(), wait) == 0) return;
  while (ec::recv_frames(sub, frames)) {
    if (frames.size() < 2 || ec::as_view(frames[0]) != k_topic) continue;
    auto h = ec::decode_header(ec::as_view(frames[1]));
    if (!h.ok()) {
      ADD_FAILURE() << "undecodable event header: " << h.err().message;
      continue;
    }
    seqs.see(h->seq);
  }
}

class chaos_slow_subscriber : public ::testing::Test {
 protected:
  void TearDown() override {
    if (HasFailure() && broker_) std::cerr << "broker output:\n" << broker_->proc().tail() << "\n";
  }
  ea::options agent_options(const std::string& name) const {
    ea::options o;
    o.name = name;
    o.broker = broker_->router();
    o.events = broker_->events();
    return o;
  }
  static json call_broker(ea::agent& a, const std::string& action) {
    auto r = a.call("broker", action, {}, 10s);
    EXPECT_TRUE(r.ok()) << "broker." << action << ": " << (r.ok() ? "" : r.err().to_string());
    if (!r.ok()) return json();
    auto body = ea::from_json_payload(r->payload());
    EXPECT_TRUE(body.ok());
    return body.ok() ? *body : json();
  }
  std::unique_ptr<tk::broker_process> broker_;
};

TEST_F(chaos_slow_subscriber, stalled_subscriber_loses_events_and_slows_no_one) {
  const auto started = steady::now();
  broker_ =
      tk::broker_process::start({"--log-level", "warn", "--event-hwm", std::to_string(k_hwm)});
  const pid_t broker_pid = broker_->proc().pid();

  healthy_view healthy;
  ea::agent healthy_agent(agent_options("healthy-subscriber"));
  ASSERT_TRUE(healthy_agent
                  .subscribe(k_prefix,
                             [&](const ea::message& e) {
                               if (e.topic() != k_topic) return;
                               {
                                 std::lock_guard lock(healthy.m);
                                 healthy.seqs.see(e.seq());
                               }
                               healthy.cv.notify_all();
                             })
                  .ok());
  ASSERT_TRUE(healthy_agent.start().ok());
  const std::string payload = ea::to_json_payload({{"pad", std::string(k_payload_bytes - 8, 'x')}});
  ASSERT_EQ(payload.size(), k_payload_bytes);
  windowed_publisher pub(agent_options("flood-publisher"), healthy, payload);
  ASSERT_TRUE(pub.start().ok());
  ea::agent watcher(agent_options("watcher"));
  ASSERT_TRUE(watcher.start().ok());

  zmq::context_t ctx(1);
  zmq::socket_t stalled(ctx, zmq::socket_type::sub);
  stalled.set(zmq::sockopt::linger, 0);
  stalled.set(zmq::sockopt::rcvhwm, k_stalled_rcvhwm);
  stalled.set(zmq::sockopt::rcvbuf, k_stalled_rcvbuf);
  stalled.connect(broker_->events());
  stalled.set(zmq::sockopt::subscribe, k_prefix);
  stalled.set(zmq::sockopt::subscribe, k_stalled_marker);
  ASSERT_TRUE(tk::wait_until(
      [&] {
        const json stats = call_broker(watcher, "stats");
        return stats.contains("subscriptions") && stats["subscriptions"].contains(k_stalled_marker);
      },
      10s, 20ms))
      << "the stalled subscriber's subscription never reached the broker";

  std::string why;

  // 1. Warm-up: the soon-stalled subscriber still reads, and gets every event.
  seq_tracker stalled_seqs;
  ASSERT_TRUE(pub.publish(k_warmup_events, 60s, why)) << why;
  const auto warmup_deadline = steady::now() + 30s;
  while (stalled_seqs.last < k_warmup_events && steady::now() < warmup_deadline) {
    drain(stalled, stalled_seqs, 100ms);
  }
  ASSERT_EQ(stalled_seqs.received, k_warmup_events);
  ASSERT_EQ(stalled_seqs.gaps, 0u);
  const std::uint64_t stalled_before_stall = stalled_seqs.received;

  // 2. The flood: the stalled subscriber reads nothing; a watcher pings the broker meanwhile.
  const memory before = read_memory(broker_pid).value_or(memory{});
  ASSERT_GT(before.rss, 0u);
  std::atomic<bool> flooding{true};
  std::mutex ping_mutex;
  std::condition_variable ping_cv;
  std::uint64_t pings_ok = 0, pings_failed = 0;
  std::string ping_error;
  steady::duration slowest_ping{};
  std::uint64_t rss_sampled_peak = before.rss;
  std::thread pinger([&] {
    std::unique_lock lock(ping_mutex);
    while (flooding) {
      lock.unlock();
      const auto t0 = steady::now();
      auto r = watcher.call("broker", "ping", {}, 5s);
      const auto took = steady::now() - t0;
      const auto mem = read_memory(broker_pid);
      lock.lock();
      if (r.ok()) {
        ++pings_ok;
      } else if (pings_failed++ == 0) {
        ping_error = r.err().to_string();
      }
      slowest_ping = std::max(slowest_ping, took);
      if (mem) rss_sampled_peak = std::max(rss_sampled_peak, mem->rss);
      ping_cv.wait_for(lock, 20ms, [&] { return !flooding; });  // pacing, not synchronisation
    }
  });
  const bool flood_ok = pub.publish(k_flood_events, 60s, why);
  {
    std::unique_lock lock(healthy.m);
    healthy.cv.wait_for(lock, 120s, [&] { return healthy.seqs.last >= pub.sent(); });
  }
  {
    std::lock_guard lock(ping_mutex);
    flooding = false;
  }
  ping_cv.notify_all();
  pinger.join();
  ASSERT_TRUE(flood_ok) << why;
  // Only this publisher uses k_topic, so its count of events sent is the last seq.
  const std::uint64_t flood_end = pub.sent();
  const memory after_flood = read_memory(broker_pid).value_or(memory{});

  // The broker still answers at once, and counted the events.
  const json stats = call_broker(watcher, "stats");
  ASSERT_TRUE(stats.contains("events"));
  EXPECT_GE(stats["events"].get<std::uint64_t>(), flood_end);
  EXPECT_TRUE(stats["subscriptions"].contains(k_prefix)) << stats["subscriptions"].dump();

  // 3. The stalled subscriber reads again: it finds what its queue held, then nothing until
  // the next event published. Publish single events until one reaches it (like a
  // subscription probe: its queue may still be flagged full when the first ones go out).
  const auto resume_deadline = steady::now() + 60s;
  drain(stalled, stalled_seqs, 0ms);
  while (stalled_seqs.last <= flood_end && steady::now() < resume_deadline) {
    drain(stalled, stalled_seqs, 0ms);
    if (stalled_seqs.last > flood_end) break;
    ASSERT_NE(pub.publish_acked(10s), 0u) << pub.first_error();
    drain(stalled, stalled_seqs, 20ms);
  }
  const std::uint64_t total = pub.sent();
  const std::uint64_t stalled_backlog =
      stalled_seqs.received - stalled_before_stall;  // includes the tail events it got
  ASSERT_TRUE(pub.all_acknowledged(30s));
  {
    std::unique_lock lock(healthy.m);
    healthy.cv.wait_for(lock, 60s, [&] { return healthy.seqs.last >= total; });
  }
  const memory after = read_memory(broker_pid).value_or(memory{});
  const json ping = call_broker(watcher, "ping");
  const auto elapsed = std::chrono::duration<double>(steady::now() - started).count();

  seq_tracker healthy_seqs;
  {
    std::lock_guard lock(healthy.m);
    healthy_seqs = healthy.seqs;
  }
  const std::uint64_t growth = after_flood.peak > before.rss ? after_flood.peak - before.rss : 0;
  // What the stalled subscriber can have received from the flood: its broker queue (hwm),
  // its own rcvhwm, and the kernel's buffers on both ends of its connection, +25%.
  const std::uint64_t stalled_bound =
      (k_hwm + k_stalled_rcvhwm + (tcp_send_buffer_max() + 2 * k_stalled_rcvbuf) / k_event_bytes) *
      5 / 4;
  std::printf(
      "[chaos_slow_subscriber] hwm=%llu payload=%lluB published=%llu (%.0f MiB) acked=%llu "
      "ack_errors=%llu\n"
      "[chaos_slow_subscriber] healthy: received=%llu last_seq=%llu gaps=%llu out_of_order=%llu\n"
      "[chaos_slow_subscriber] stalled: before_stall=%llu after_resume=%llu (bound %llu) "
      "last_seq=%llu gaps=%llu missed=%llu\n"
      "[chaos_slow_subscriber] broker: events=%llu pings_during_flood ok=%llu failed=%llu "
      "slowest=%.1f ms\n"
      "[chaos_slow_subscriber] broker RSS: before=%.1f MiB peak=%.1f MiB (sampled %.1f) "
      "after_flood=%.1f MiB end=%.1f MiB growth=%.1f MiB bound=%.1f MiB\n"
      "[chaos_slow_subscriber] broker stats subscriptions=%s\n"
      "[chaos_slow_subscriber] elapsed=%.1f s\n",
      static_cast<unsigned long long>(k_hwm), static_cast<unsigned long long>(k_payload_bytes),
      static_cast<unsigned long long>(total), mib(total * k_payload_bytes),
      static_cast<unsigned long long>(pub.acked()),
      static_cast<unsigned long long>(pub.ack_errors()),
      static_cast<unsigned long long>(healthy_seqs.received),
      static_cast<unsigned long long>(healthy_seqs.last),
      static_cast<unsigned long long>(healthy_seqs.gaps),
      static_cast<unsigned long long>(healthy_seqs.out_of_order),
      static_cast<unsigned long long>(stalled_before_stall),
      static_cast<unsigned long long>(stalled_backlog),
      static_cast<unsigned long long>(stalled_bound),
      static_cast<unsigned long long>(stalled_seqs.last),
      static_cast<unsigned long long>(stalled_seqs.gaps),
      static_cast<unsigned long long>(stalled_seqs.missed),
      static_cast<unsigned long long>(stats["events"].get<std::uint64_t>()),
      static_cast<unsigned long long>(pings_ok), static_cast<unsigned long long>(pings_failed),
      std::chrono::duration<double, std::milli>(slowest_ping).count(), mib(before.rss),
      mib(after_flood.peak), mib(rss_sampled_peak), mib(after_flood.rss), mib(after.rss),
      mib(growth), mib(k_rss_bound), stats["subscriptions"].dump().c_str(), elapsed);
  std::fflush(stdout);

  // The publisher was never refused nor slowed into its deadlines.
  EXPECT_EQ(pub.acked(), total);
  EXPECT_EQ(pub.ack_errors(), 0u) << pub.first_error();
  // The healthy subscriber got every event, in order, without a gap.
  EXPECT_EQ(healthy_seqs.received, total);
  EXPECT_EQ(healthy_seqs.last, total);
  EXPECT_EQ(healthy_seqs.gaps, 0u);
  EXPECT_EQ(healthy_seqs.out_of_order, 0u);
  // The broker answered throughout.
  EXPECT_GT(pings_ok, 0u);
  EXPECT_EQ(pings_failed, 0u) << ping_error;
  EXPECT_TRUE(ping.contains("uptime_ms")) << ping.dump();
  // The stalled subscriber lost events (a seq gap) instead of holding anyone up, got at most
  // what its queue and buffers could hold, and receives new events once it reads again.
  EXPECT_GT(stalled_seqs.last, flood_end) << "the stalled subscriber never got an event again";
  EXPECT_GE(stalled_seqs.gaps, 1u);
  EXPECT_GT(stalled_seqs.missed, 0u);
  EXPECT_EQ(stalled_seqs.out_of_order, 0u);
  EXPECT_LT(stalled_backlog, k_flood_events);
  EXPECT_LE(stalled_backlog, stalled_bound);
  // The broker's memory stayed bounded by the high-water mark, not by what was published.
  EXPECT_LT(growth, k_rss_bound) << "broker RSS grew by " << mib(growth) << " MiB while "
                                 << mib(total * k_payload_bytes) << " MiB were published";

  healthy_agent.stop();
  pub.stop();
  watcher.stop();
}

}  // namespace
