// The broker's dispatch policy (broker/src/registry.hpp) with a hand-driven clock and no
// sockets: least-recently-used spreading, capacity, queueing, queue limits, deadlines, worker
// loss and re-dispatch, liveness, shutdown, and memory budgets. Each test feeds the registry what
// the broker loop would and checks the decisions it returns.
#include "registry.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

namespace eb = ensemble::broker;
namespace errc = ensemble::common::errc;
using eb::decision;
using eb::request_state;
using namespace std::chrono_literals;

namespace ensemble::broker {
// Readable gtest output for state comparisons.
void PrintTo(request_state s, std::ostream* os) {
  switch (s) {
    case request_state::queued:
      *os << "queued";
      return;
    case request_state::dispatched:
      *os << "dispatched";
      return;
    case request_state::abandoned:
      *os << "abandoned";
      return;
  }
}
}  // namespace ensemble::broker

namespace {

::testing::AssertionResult contains(const std::string& haystack, std::string_view needle) {
  if (haystack.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << haystack << "' does not contain '" << needle << "'";
}

class registry_test : public ::testing::Test {
 protected:
  // Any fixed point will do: the registry only compares and subtracts time points.
  const eb::time_point t0_ = eb::time_point{} + 1h;

  void make(eb::registry_limits limits = {}) { reg_ = std::make_unique<eb::registry>(limits); }
  eb::registry& reg() {
    if (!reg_) make();
    return *reg_;
  }

  void hello(const std::string& peer, const std::string& service, std::uint32_t capacity,
             eb::time_point now) {
    ASSERT_TRUE(reg().hello(peer, "agent-" + peer, {{service, capacity}}, now, out_).ok());
  }
  void hello(const std::string& peer, const std::string& service, std::uint32_t capacity) {
    hello(peer, service, capacity, t0_);
  }

  // Submits a request from client "c" received at `now`; returns its token.
  std::uint64_t submit(const std::string& service, std::chrono::milliseconds deadline = 5s,
                       bool retryable = false, eb::time_point now = {}) {
    if (now == eb::time_point{}) now = t0_;
    eb::pending_request r;
    r.token = ++next_token_;
    r.client = "c";
    r.hdr.id = "req-" + std::to_string(r.token);
    r.hdr.service = service;
    r.hdr.action = "act";
    r.hdr.deadline_ms = static_cast<std::uint64_t>(deadline.count());
    r.hdr.retryable = retryable;
    r.payload =
        zmq::message_t(payload_bytes_ == 0 ? std::string_view("payload")
                                           : std::string_view(std::string(payload_bytes_, 'x')));
    r.received = now;
    r.deadline = now + deadline;
    reg().submit(std::move(r), out_);
    return next_token_;
  }
  // Submits a request whose payload is `bytes` long.
  std::uint64_t submit_sized(const std::string& service, std::size_t bytes,
                             std::chrono::milliseconds deadline = 5s) {
    payload_bytes_ = bytes;
    const auto token = submit(service, deadline);
    payload_bytes_ = 0;
    return token;
  }

  // The decisions since the last call, split by kind.
  struct taken {
    std::vector<std::uint64_t> dispatched;
    std::map<std::uint64_t, decision> failed;
  };
  taken take() {
    taken t;
    for (auto& d : out_) {
      if (d.what == decision::kind::dispatch) {
        t.dispatched.push_back(d.token);
      } else {
        EXPECT_EQ(t.failed.count(d.token), 0u) << "token " << d.token << " answered twice";
        t.failed.emplace(d.token, std::move(d));
      }
    }
    out_.clear();
    return t;
  }

  // Which peer a dispatched request went to.
  std::string worker_of(std::uint64_t token) {
    auto* r = reg().find(token);
    if (r == nullptr || r->assigned == nullptr) return "<none>";
    return r->assigned->owner->id;
  }
  std::vector<std::string> workers_of(const std::vector<std::uint64_t>& tokens) {
    std::vector<std::string> out;
    for (auto t : tokens) out.push_back(worker_of(t));
    return out;
  }

  // The worker replies: the broker forwards (if still dispatched) and finishes.
  void reply(const std::string& peer, std::uint64_t token) {
    auto* r = reg().reply_from(peer, token);
    ASSERT_NE(r, nullptr) << "token " << token << " was not dispatched to " << peer;
    reg().finish(token, out_);
  }

  const eb::offer* offer_of(const std::string& peer, const std::string& service) {
    auto* w = reg().find_worker(peer);
    if (w == nullptr) return nullptr;
    for (auto& o : w->offers) {
      if (o->service == service) return o.get();
    }
    return nullptr;
  }

  std::unique_ptr<eb::registry> reg_;
  std::vector<decision> out_;
  std::uint64_t next_token_ = 0;
  std::size_t payload_bytes_ = 0;
};

// ---- dispatch ------------------------------------------------------------------------------

TEST_F(registry_test, least_recently_used_worker_gets_the_next_request) {
  hello("w1", "S", 1);
  hello("w2", "S", 1);
  hello("w3", "S", 1);
  const auto a = submit("S");
  const auto b = submit("S");
  auto t = take();
  ASSERT_EQ(t.dispatched, (std::vector<std::uint64_t>{a, b}));
  EXPECT_EQ(workers_of({a, b}), (std::vector<std::string>{"w1", "w2"}));

  // w1 frees up after w3 has been idle all along: w3 is now the least recently used.
  reply("w1", a);
  const auto c = submit("S");
  const auto d = submit("S");
  t = take();
  ASSERT_EQ(t.dispatched, (std::vector<std::uint64_t>{c, d}));
  EXPECT_EQ(workers_of({c, d}), (std::vector<std::string>{"w3", "w1"}));
}

TEST_F(registry_test, requests_alternate_over_workers_with_spare_capacity) {
  hello("w1", "S", 2);
  hello("w2", "S", 2);
  std::vector<std::uint64_t> tokens;
  for (int i = 0; i < 4; ++i) tokens.push_back(submit("S"));
  auto t = take();
  EXPECT_EQ(t.dispatched, tokens);
  EXPECT_EQ(workers_of(tokens), (std::vector<std::string>{"w1", "w2", "w1", "w2"}));
  EXPECT_EQ(offer_of("w1", "S")->dispatched, 2u);
  EXPECT_EQ(offer_of("w2", "S")->dispatched, 2u);
}

TEST_F(registry_test, capacity_is_respected_and_the_queue_drains_as_slots_free) {
  hello("w1", "S", 2);
  const auto a = submit("S");
  const auto b = submit("S");
  const auto c = submit("S");
  const auto d = submit("S");
  auto t = take();
  EXPECT_EQ(t.dispatched, (std::vector<std::uint64_t>{a, b}));
  EXPECT_TRUE(t.failed.empty());
  EXPECT_EQ(offer_of("w1", "S")->in_flight, 2u);
  EXPECT_EQ(reg().queued_total(), 2u);
  EXPECT_EQ(reg().services().at("S").queued, 2u);
  EXPECT_EQ(reg().find(c)->state, request_state::queued);
  EXPECT_EQ(reg().in_flight_total(), 2u);

  // One slot frees: exactly one queued request (the oldest) takes it.
  reply("w1", b);
  t = take();
  EXPECT_EQ(t.dispatched, (std::vector<std::uint64_t>{c}));
  EXPECT_EQ(worker_of(c), "w1");
  EXPECT_EQ(offer_of("w1", "S")->in_flight, 2u);
  EXPECT_EQ(reg().find(d)->state, request_state::queued);

  reply("w1", a);
  t = take();
  EXPECT_EQ(t.dispatched, (std::vector<std::uint64_t>{d}));
  EXPECT_EQ(reg().queued_total(), 0u);

  reply("w1", c);
  reply("w1", d);
  EXPECT_TRUE(take().dispatched.empty());
  EXPECT_EQ(offer_of("w1", "S")->in_flight, 0u);
  EXPECT_EQ(reg().pending_count(), 0u);
}

TEST_F(registry_test, requests_wait_for_a_worker_that_registers_later) {
  const auto a = submit("S");
  const auto b = submit("S");
  EXPECT_TRUE(take().dispatched.empty());
  EXPECT_EQ(reg().queued_total(), 2u);
  hello("w1", "S", 1);
  auto t = take();
  EXPECT_EQ(t.dispatched, (std::vector<std::uint64_t>{a}));
  // A second HELLO raises the capacity, and the waiting request goes out at once.
  hello("w1", "S", 2);
  t = take();
  EXPECT_EQ(t.dispatched, (std::vector<std::uint64_t>{b}));
  EXPECT_EQ(offer_of("w1", "S")->capacity, 2u);
  EXPECT_EQ(reg().workers().size(), 1u);
}

TEST_F(registry_test, lowering_capacity_with_requests_in_flight_is_respected) {
  hello("w1", "S", 2);
  const auto a = submit("S");
  EXPECT_EQ(take().dispatched, (std::vector<std::uint64_t>{a}));
  // The worker now says it can only take one at a time: with one in flight it is full.
  hello("w1", "S", 1);
  const auto b = submit("S");
  auto t = take();
  ASSERT_TRUE(t.dispatched.empty()) << "dispatched beyond the declared capacity";
  EXPECT_EQ(offer_of("w1", "S")->in_flight, 1u);
  EXPECT_EQ(reg().find(b)->state, request_state::queued);
  reply("w1", a);
  EXPECT_EQ(take().dispatched, (std::vector<std::uint64_t>{b}));
}

TEST_F(registry_test, services_are_independent) {
  hello("w1", "A", 1);
  hello("w2", "B", 1);
  const auto a = submit("A");
  const auto b = submit("B");
  auto t = take();
  EXPECT_EQ(t.dispatched, (std::vector<std::uint64_t>{a, b}));
  EXPECT_EQ(workers_of({a, b}), (std::vector<std::string>{"w1", "w2"}));
}

TEST_F(registry_test, a_reply_from_another_peer_is_not_accepted) {
  hello("w1", "S", 1);
  hello("w2", "S", 1);
  const auto a = submit("S");
  (void)take();
  EXPECT_EQ(reg().reply_from("w2", a), nullptr);
  EXPECT_EQ(reg().reply_from("w1", a + 100), nullptr);
  EXPECT_NE(reg().reply_from("w1", a), nullptr);
}

// ---- queue limits --------------------------------------------------------------------------

TEST_F(registry_test, per_service_queue_full) {
  make({.queue_per_service = 2, .queue_total = 100});
  hello("w1", "S", 1);
  const auto a = submit("S");  // dispatched
  submit("S");                 // queued
  submit("S");                 // queued
  const auto d = submit("S");  // refused
  auto t = take();
  EXPECT_EQ(t.dispatched, (std::vector<std::uint64_t>{a}));
  ASSERT_EQ(t.failed.size(), 1u);
  const decision& f = t.failed.at(d);
  EXPECT_EQ(f.err.code, errc::queue_full);
  EXPECT_TRUE(f.err.retryable);
  EXPECT_TRUE(contains(f.err.message, "'S'"));
  EXPECT_EQ(f.client, "c");
  EXPECT_EQ(f.hdr.id, "req-" + std::to_string(d));
  EXPECT_EQ(reg().find(d), nullptr);
  EXPECT_EQ(reg().queued_total(), 2u);
  EXPECT_EQ(reg().services().at("S").counters.errors_by_code.at("queue_full"), 1u);
  EXPECT_EQ(reg().services().at("S").counters.requests, 4u);

  // Another service is not affected by S's full queue.
  hello("w2", "T", 1);
  submit("T");
  submit("T");
  EXPECT_TRUE(take().failed.empty());
}

TEST_F(registry_test, total_queue_full) {
  make({.queue_per_service = 10, .queue_total = 3});
  submit("A");
  submit("A");
  submit("B");
  const auto d = submit("B");
  const auto e = submit("C");
  auto t = take();
  ASSERT_EQ(t.failed.size(), 2u);
  EXPECT_EQ(t.failed.at(d).err.code, errc::queue_full);
  EXPECT_TRUE(contains(t.failed.at(d).err.message, "broker queue is full"));
  EXPECT_EQ(t.failed.at(e).err.code, errc::queue_full);
  EXPECT_EQ(reg().queued_total(), 3u);
  // A refused request for a service nobody offers leaves no service entry behind.
  EXPECT_EQ(reg().services().count("C"), 0u);
}

// ---- deadlines -----------------------------------------------------------------------------

TEST_F(registry_test, queued_request_expires_deadline_exceeded_when_the_service_has_workers) {
  hello("w1", "S", 1);
  const auto a = submit("S", 10s);
  const auto b = submit("S", 200ms);
  (void)take();
  ASSERT_TRUE(reg().next_deadline().has_value());
  EXPECT_EQ(*reg().next_deadline(), t0_ + 200ms);

  reg().expire(t0_ + 199ms, out_);
  EXPECT_TRUE(take().failed.empty());

  reg().expire(t0_ + 200ms, out_);
  auto t = take();
  ASSERT_EQ(t.failed.size(), 1u);
  const decision& f = t.failed.at(b);
  EXPECT_EQ(f.err.code, errc::deadline_exceeded);
  EXPECT_TRUE(f.err.retryable);
  EXPECT_TRUE(contains(f.err.message, "while queued"));
  EXPECT_TRUE(contains(f.err.message, "S.act"));
  EXPECT_EQ(reg().find(b), nullptr);
  EXPECT_EQ(reg().queued_total(), 0u);
  EXPECT_EQ(reg().find(a)->state, request_state::dispatched);

  // The expired request is not dispatched when the slot frees.
  reply("w1", a);
  EXPECT_TRUE(take().dispatched.empty());
}

TEST_F(registry_test, queued_request_expires_no_such_service_when_nobody_offers_it) {
  const auto a = submit("Nope", 200ms);
  EXPECT_TRUE(take().failed.empty());
  reg().expire(t0_ + 200ms, out_);
  auto t = take();
  ASSERT_EQ(t.failed.size(), 1u);
  EXPECT_EQ(t.failed.at(a).err.code, errc::no_such_service);
  EXPECT_TRUE(t.failed.at(a).err.retryable);
  EXPECT_TRUE(contains(t.failed.at(a).err.message, "'Nope'"));
  EXPECT_EQ(reg().pending_count(), 0u);
  EXPECT_EQ(reg().queued_total(), 0u);
  // A name that was only ever asked for does not stay in the table.
  EXPECT_EQ(reg().services().count("Nope"), 0u);
  EXPECT_FALSE(reg().next_deadline().has_value());
}

TEST_F(registry_test, in_flight_request_expires_abandoned_and_keeps_its_slot_until_the_reply) {
  hello("w1", "S", 1);
  const auto a = submit("S", 100ms);
  const auto b = submit("S", 10s);
  (void)take();
  reg().expire(t0_ + 100ms, out_);
  auto t = take();
  ASSERT_EQ(t.failed.size(), 1u);
  EXPECT_EQ(t.failed.at(a).err.code, errc::deadline_exceeded);
  EXPECT_TRUE(contains(t.failed.at(a).err.message, "while in flight"));
  EXPECT_TRUE(t.dispatched.empty());

  // The worker is still busy with it: the record stays, the slot stays taken, b keeps waiting.
  auto* r = reg().find(a);
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(r->state, request_state::abandoned);
  EXPECT_EQ(offer_of("w1", "S")->in_flight, 1u);
  EXPECT_EQ(reg().find(b)->state, request_state::queued);
  // Not answered twice.
  reg().expire(t0_ + 200ms, out_);
  EXPECT_TRUE(take().failed.empty());

  // The late reply is recognised as abandoned (the broker drops it) and frees the slot.
  auto* late = reg().reply_from("w1", a);
  ASSERT_NE(late, nullptr);
  EXPECT_EQ(late->state, request_state::abandoned);
  reg().finish(a, out_);
  t = take();
  EXPECT_EQ(t.dispatched, (std::vector<std::uint64_t>{b}));
  EXPECT_EQ(reg().find(a), nullptr);
}

TEST_F(registry_test, an_abandoned_slot_is_taken_back_heartbeat_times_liveness_after_the_deadline) {
  make(eb::registry_limits{});  // heartbeat 1 s, liveness 3
  hello("w1", "S", 1);
  const auto a = submit("S", 100ms);  // its DISPATCH is lost: w1 never replies
  const auto b = submit("S", 10s);
  (void)take();
  reg().expire(t0_ + 100ms, out_);  // a: deadline_exceeded, abandoned, slot kept
  (void)take();
  reg().touch("w1", t0_ + 3000ms);  // w1 keeps heartbeating
  reg().expire(t0_ + 3099ms, out_);
  EXPECT_TRUE(take().dispatched.empty());
  EXPECT_EQ(reg().abandoned_released(), 0u);
  reg().expire(t0_ + 3100ms, out_);  // deadline + 3 x 1 s
  EXPECT_EQ(take().dispatched, (std::vector<std::uint64_t>{b}));
  EXPECT_EQ(reg().find(a), nullptr);
  EXPECT_EQ(reg().abandoned_released(), 1u);
  EXPECT_EQ(reg().reply_from("w1", a), nullptr);  // a reply after that is unknown
}

TEST_F(registry_test, a_lost_peers_own_requests_are_dropped_with_it) {
  hello("w1", "S", 1);
  hello("c", "Other", 1);  // the client of submit() is a registered peer too
  const auto in_flight = submit("S");
  const auto queued = submit("S");
  (void)take();
  reg().remove_worker("c", out_);
  auto t = take();
  EXPECT_TRUE(t.failed.empty());  // nobody to answer
  EXPECT_EQ(reg().find(queued), nullptr);
  ASSERT_NE(reg().find(in_flight), nullptr);
  EXPECT_EQ(reg().find(in_flight)->state, request_state::abandoned);
  EXPECT_EQ(reg().queued_total(), 0u);
  EXPECT_EQ(reg().requests_of_lost_peers(), 2u);
  // The worker's reply frees its slot, and the dropped request is not dispatched after it.
  reply("w1", in_flight);
  EXPECT_TRUE(take().dispatched.empty());
  EXPECT_EQ(offer_of("w1", "S")->in_flight, 0u);
}

// ---- worker loss ---------------------------------------------------------------------------

TEST_F(registry_test, retryable_request_is_redispatched_once_to_another_worker) {
  hello("w1", "S", 1);
  hello("w2", "S", 1);
  const auto a = submit("S", 5s, /*retryable=*/true);
  (void)take();
  ASSERT_EQ(worker_of(a), "w1");

  reg().remove_worker("w1", out_);
  auto t = take();
  EXPECT_TRUE(t.failed.empty());
  EXPECT_EQ(t.dispatched, (std::vector<std::uint64_t>{a}));
  EXPECT_EQ(worker_of(a), "w2");
  EXPECT_TRUE(reg().find(a)->redispatched);
  EXPECT_EQ(reg().find(a)->hdr.id, "req-" + std::to_string(a));  // the same request
  EXPECT_EQ(reg().find_worker("w1"), nullptr);

  // Its second worker is lost too: no second re-dispatch.
  hello("w3", "S", 1);
  reg().remove_worker("w2", out_);
  t = take();
  EXPECT_TRUE(t.dispatched.empty());
  ASSERT_EQ(t.failed.size(), 1u);
  EXPECT_EQ(t.failed.at(a).err.code, errc::worker_lost);
  EXPECT_TRUE(t.failed.at(a).err.retryable);
  EXPECT_TRUE(contains(t.failed.at(a).err.message, "agent-w2"));
  EXPECT_EQ(reg().find(a), nullptr);
  EXPECT_EQ(offer_of("w3", "S")->in_flight, 0u);
}

TEST_F(registry_test, redispatched_request_goes_before_those_already_waiting) {
  hello("w1", "S", 1);
  hello("w2", "S", 1);
  const auto a = submit("S", 5s, true);  // w1
  const auto b = submit("S");            // w2
  const auto c = submit("S");            // queued
  (void)take();
  reg().remove_worker("w1", out_);
  EXPECT_TRUE(take().dispatched.empty());  // w2 is busy
  EXPECT_EQ(reg().queued_total(), 2u);
  reply("w2", b);
  auto t = take();
  EXPECT_EQ(t.dispatched, (std::vector<std::uint64_t>{a}));
  reply("w2", a);
  t = take();
  EXPECT_EQ(t.dispatched, (std::vector<std::uint64_t>{c}));
}

TEST_F(registry_test, non_retryable_request_gets_worker_lost) {
  hello("w1", "S", 2);
  hello("w2", "S", 1);
  const auto a = submit("S");             // w1
  const auto b = submit("S", 5s, false);  // w2
  const auto c = submit("S");             // w1
  (void)take();
  ASSERT_EQ(workers_of({a, b, c}), (std::vector<std::string>{"w1", "w2", "w1"}));
  reg().remove_worker("w1", out_);
  auto t = take();
  EXPECT_TRUE(t.dispatched.empty());
  ASSERT_EQ(t.failed.size(), 2u);
  for (auto token : {a, c}) {
    EXPECT_EQ(t.failed.at(token).err.code, errc::worker_lost);
    EXPECT_TRUE(contains(t.failed.at(token).err.message, "agent-w1"));
    EXPECT_TRUE(contains(t.failed.at(token).err.message, "S.act"));
    EXPECT_EQ(reg().find(token), nullptr);
  }
  EXPECT_EQ(reg().find(b)->state, request_state::dispatched);
  EXPECT_EQ(reg().services().at("S").offers.size(), 1u);
  EXPECT_EQ(reg().services().at("S").counters.errors_by_code.at("worker_lost"), 2u);
}

TEST_F(registry_test, losing_a_worker_with_an_abandoned_request_says_nothing_more) {
  hello("w1", "S", 1);
  const auto a = submit("S", 100ms);
  (void)take();
  reg().expire(t0_ + 100ms, out_);
  EXPECT_EQ(take().failed.size(), 1u);
  reg().remove_worker("w1", out_);
  auto t = take();
  EXPECT_TRUE(t.failed.empty());
  EXPECT_TRUE(t.dispatched.empty());
  EXPECT_EQ(reg().find(a), nullptr);
  EXPECT_EQ(reg().pending_count(), 0u);
}

TEST_F(registry_test, retryable_request_without_another_worker_waits_then_expires) {
  hello("w1", "S", 1);
  const auto a = submit("S", 1s, true);
  (void)take();
  reg().remove_worker("w1", out_);
  auto t = take();
  EXPECT_TRUE(t.failed.empty());
  EXPECT_EQ(reg().find(a)->state, request_state::queued);

  // docs/protocol.md section 5: "if no other worker frees up in time, the answer is
  // deadline_exceeded" (a worker did offer the service; it was lost while handling it).
  reg().expire(t0_ + 1s, out_);
  t = take();
  ASSERT_EQ(t.failed.size(), 1u);
  EXPECT_EQ(t.failed.at(a).err.code, errc::deadline_exceeded) << t.failed.at(a).err.message;
}

TEST_F(registry_test, retryable_request_is_picked_up_by_a_worker_that_registers_in_time) {
  hello("w1", "S", 1);
  const auto a = submit("S", 1s, true);
  (void)take();
  reg().remove_worker("w1", out_);
  EXPECT_TRUE(take().dispatched.empty());
  hello("w2", "S", 1, t0_ + 500ms);
  auto t = take();
  EXPECT_EQ(t.dispatched, (std::vector<std::uint64_t>{a}));
  EXPECT_EQ(worker_of(a), "w2");
}

// ---- liveness ------------------------------------------------------------------------------

TEST_F(registry_test, silent_worker_is_lost_after_heartbeat_times_liveness) {
  make({.heartbeat = 1000ms, .liveness = 3});
  hello("w1", "S", 1, t0_);
  hello("w2", "S", 1, t0_);
  const auto a = submit("S");  // w1, not retryable
  (void)take();
  reg().expire(t0_, out_);  // the first check

  // w2 keeps talking; w1 is silent.
  ASSERT_TRUE(reg().touch("w2", t0_ + 2500ms));
  EXPECT_FALSE(reg().touch("stranger", t0_ + 2500ms));

  // Exactly heartbeat x liveness of silence is still allowed.
  reg().expire(t0_ + 3000ms, out_);
  EXPECT_TRUE(take().failed.empty());
  EXPECT_NE(reg().find_worker("w1"), nullptr);

  // Checks run once per heartbeat; by the next one w1 is over the limit.
  reg().expire(t0_ + 4000ms, out_);
  auto t = take();
  EXPECT_EQ(reg().find_worker("w1"), nullptr);
  EXPECT_NE(reg().find_worker("w2"), nullptr);
  ASSERT_EQ(t.failed.size(), 1u);
  EXPECT_EQ(t.failed.at(a).err.code, errc::worker_lost);

  // w2 goes silent after its last touch at 2.5 s.
  reg().expire(t0_ + 5500ms, out_);
  EXPECT_NE(reg().find_worker("w2"), nullptr);
  reg().expire(t0_ + 6500ms, out_);
  EXPECT_EQ(reg().find_worker("w2"), nullptr);
  EXPECT_TRUE(reg().workers().empty());
}

// ---- shutdown ------------------------------------------------------------------------------

TEST_F(registry_test, fail_all_answers_queued_first_then_dispatched) {
  hello("w1", "S", 1);
  const auto a = submit("S");
  const auto b = submit("S");
  const auto c = submit("Nope");
  (void)take();
  const auto shutting = ensemble::common::error::make(errc::shutting_down, "broker is stopping");

  reg().fail_all(shutting, /*dispatched_too=*/false, out_);
  auto t = take();
  EXPECT_TRUE(t.dispatched.empty());
  ASSERT_EQ(t.failed.size(), 2u);
  EXPECT_EQ(t.failed.at(b).err.code, errc::shutting_down);
  EXPECT_TRUE(t.failed.at(b).err.retryable);
  EXPECT_EQ(t.failed.at(c).err.code, errc::shutting_down);
  EXPECT_EQ(reg().queued_total(), 0u);
  EXPECT_EQ(reg().find(a)->state, request_state::dispatched);

  reg().fail_all(shutting, /*dispatched_too=*/true, out_);
  t = take();
  ASSERT_EQ(t.failed.size(), 1u);
  EXPECT_EQ(t.failed.at(a).err.code, errc::shutting_down);
  // Still occupying the worker until it answers or goes.
  EXPECT_EQ(reg().find(a)->state, request_state::abandoned);
  EXPECT_EQ(reg().in_flight_total(), 1u);

  // Nothing is answered twice.
  reg().fail_all(shutting, true, out_);
  EXPECT_TRUE(take().failed.empty());
}

// ---- memory budgets --------------------------------------------------------------------------

// Each 1000-byte request charges 1000 + k_header_allowance.
constexpr std::size_t k_charge = 1000 + eb::k_header_allowance;

TEST_F(registry_test, a_worker_over_its_byte_budget_is_passed_over_then_waited_for) {
  eb::registry_limits limits;
  limits.peer_budget_bytes = 2 * k_charge + 10;  // two requests each
  make(limits);
  hello("w1", "S", 100);
  hello("w2", "S", 100);
  std::vector<std::uint64_t> tokens;
  for (int i = 0; i < 5; ++i) tokens.push_back(submit_sized("S", 1000));
  auto t = take();
  ASSERT_EQ(t.dispatched.size(), 4u);
  EXPECT_EQ(workers_of(t.dispatched), (std::vector<std::string>{"w1", "w2", "w1", "w2"}));
  EXPECT_EQ(reg().find(tokens[4])->state, request_state::queued);  // both workers are full
  EXPECT_EQ(reg().find_worker("w1")->unconfirmed_bytes, 2 * k_charge);
  EXPECT_GE(reg().budget_waits(), 1u);
  reply("w2", tokens[1]);  // w2 has read its first: room for one more
  EXPECT_EQ(take().dispatched, (std::vector<std::uint64_t>{tokens[4]}));
  EXPECT_EQ(worker_of(tokens[4]), "w2");
}

TEST_F(registry_test, a_reply_releases_the_charge_of_every_earlier_dispatch_to_that_worker) {
  eb::registry_limits limits;
  limits.peer_budget_bytes = 3 * k_charge;
  make(limits);
  hello("w1", "S", 100);
  const auto a = submit_sized("S", 1000);
  const auto b = submit_sized("S", 1000);
  (void)take();
  EXPECT_EQ(reg().find_worker("w1")->unconfirmed_bytes, 2 * k_charge);
  reply("w1", b);  // b was sent after a: w1 has read a as well
  EXPECT_EQ(reg().find_worker("w1")->unconfirmed_bytes, 0u);
  EXPECT_TRUE(reg().find_worker("w1")->unconfirmed.empty());
  EXPECT_EQ(reg().find(a)->state, request_state::dispatched);  // still its to answer
}

TEST_F(registry_test, an_abandoned_request_keeps_its_charge_after_its_slot_is_taken_back) {
  eb::registry_limits limits;  // heartbeat 1 s, liveness 3
  limits.peer_budget_messages = 1;
  make(limits);
  hello("w1", "S", 10);
  const auto a = submit("S", 100ms);  // w1 never reads it
  const auto b = submit("S", 10s);
  EXPECT_EQ(take().dispatched, (std::vector<std::uint64_t>{a}));
  reg().touch("w1", t0_ + 3000ms);
  reg().expire(t0_ + 3100ms, out_);  // a: deadline_exceeded, then its slot is taken back
  auto t = take();
  EXPECT_EQ(t.failed.count(a), 1u);
  EXPECT_TRUE(t.dispatched.empty()) << "b went to a worker that still holds a's DISPATCH";
  EXPECT_EQ(reg().abandoned_released(), 1u);
  EXPECT_EQ(reg().find_worker("w1")->unconfirmed.size(), 1u);
  EXPECT_EQ(reg().find(b)->state, request_state::queued);
  reg().touch("w1", t0_ + 9000ms);
  reg().expire(t0_ + 10s, out_);
  t = take();
  ASSERT_EQ(t.failed.count(b), 1u);
  EXPECT_EQ(t.failed.at(b).err.code, errc::deadline_exceeded);
  EXPECT_EQ(reg().queued_bytes_total(), 0u);
}

TEST_F(registry_test, a_worker_holding_nothing_takes_one_request_larger_than_its_budget) {
  eb::registry_limits limits;
  limits.peer_budget_bytes = 1024;
  make(limits);
  hello("w1", "S", 10);
  const auto a = submit_sized("S", 5000);
  const auto b = submit_sized("S", 10);
  EXPECT_EQ(take().dispatched, (std::vector<std::uint64_t>{a}));
  EXPECT_EQ(reg().find(b)->state, request_state::queued);
  reply("w1", a);
  EXPECT_EQ(take().dispatched, (std::vector<std::uint64_t>{b}));
}

TEST_F(registry_test, queued_bytes_are_bounded_per_service_and_in_all) {
  eb::registry_limits limits;
  limits.queue_bytes_per_service = 2 * k_charge;
  limits.queue_bytes_total = 3 * k_charge;
  make(limits);
  submit_sized("S", 1000, 10s);
  submit_sized("S", 1000, 10s);
  const auto s3 = submit_sized("S", 1000, 10s);
  submit_sized("T", 1000, 10s);
  const auto t2 = submit_sized("T", 1000, 10s);
  auto t = take();
  ASSERT_EQ(t.failed.size(), 2u);
  ASSERT_EQ(t.failed.count(s3), 1u);
  EXPECT_EQ(t.failed.at(s3).err.code, errc::queue_full);
  EXPECT_TRUE(contains(t.failed.at(s3).err.message, "queue of service 'S' is full"));
  EXPECT_TRUE(contains(t.failed.at(s3).err.message, "bytes waiting"));
  ASSERT_EQ(t.failed.count(t2), 1u);
  EXPECT_TRUE(contains(t.failed.at(t2).err.message, "broker queue is full"));
  EXPECT_EQ(reg().queued_bytes_total(), 3 * k_charge);
  hello("w1", "S", 10);  // dispatching gives the bytes back
  EXPECT_EQ(take().dispatched.size(), 2u);
  EXPECT_EQ(reg().queued_bytes_total(), k_charge);
  EXPECT_EQ(reg().services().at("S").queued_bytes, 0u);
}

}  // namespace
