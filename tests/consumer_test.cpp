// The delivery policy of durable stream consumers (broker/src/consumer.hpp) on a hand-driven
// clock, with the stream held in a vector behind the fetch callback: acks and the ack floor,
// ack_wait expiry, max_deliver and dead letters, nacks with delays and backoff, members leaving,
// competing members, max_ack_pending, ordered_by, start positions, saved state, topic filters,
// and a seeded random schedule that checks the invariants over a few thousand records.
#include "consumer.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "ensemble/common/protocol.hpp"

namespace es = ensemble::broker::streams;
using namespace std::chrono_literals;

namespace {

::testing::AssertionResult contains(const std::string& haystack, std::string_view needle) {
  if (haystack.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << haystack << "' does not contain '" << needle << "'";
}

template <class T>
std::vector<T> only(const std::vector<es::decision>& out) {
  std::vector<T> found;
  for (const auto& d : out) {
    if (const T* x = std::get_if<T>(&d)) found.push_back(*x);
  }
  return found;
}

std::vector<es::sequence> seqs(const std::vector<es::deliver>& ds) {
  std::vector<es::sequence> s;
  for (const auto& d : ds) s.push_back(d.seq);
  return s;
}

// The last floor advance in `out`, or 0.
es::sequence floor_in(const std::vector<es::decision>& out) {
  auto floors = only<es::ack_floor_advanced>(out);
  return floors.empty() ? 0 : floors.back().seq;
}

class consumer_test : public ::testing::Test {
 protected:
  // Any fixed point will do: the policy only compares and adds time points.
  const es::time_point t0_ = es::time_point{} + 1h;
  es::time_point now_ = t0_;

  static es::consumer_config config() {
    es::consumer_config c;
    c.name = "billing";
    c.stream = "ORDERS";
    return c;
  }

  // Appends a record; `key` goes into the header's correlation_id.
  es::sequence append(const std::string& topic = "order.created", const std::string& key = {},
                      std::int64_t ts_ms = 0) {
    es::record r;
    r.seq = last_ + 1;
    r.ts_ms = ts_ms != 0 ? ts_ms : 1'000'000 + static_cast<std::int64_t>(r.seq);
    r.topic = topic;
    r.event_id = "ev-" + std::to_string(r.seq);
    ensemble::common::header h;
    h.id = r.event_id;
    h.topic = topic;
    h.correlation_id = key;
    r.header = ensemble::common::encode_header(h);
    r.payload = "payload " + std::to_string(r.seq);
    last_ = r.seq;
    store_.push_back(std::move(r));
    if (c_) c_->on_records_available(last_);
    return last_;
  }
  void append_n(int n) {
    for (int i = 0; i < n; ++i) append();
  }

  // Retention: forget stored records below `seq`.
  void drop_below(es::sequence seq) {
    std::erase_if(store_, [&](const es::record& r) { return r.seq < seq; });
  }

  es::fetch_fn fetch() {
    return [this](es::sequence from,
                  std::size_t n) -> ensemble::common::result<std::vector<es::record>> {
      ++fetches_;
      if (fail_fetch_) {
        return ensemble::common::error::make(ensemble::common::errc::bad_request, "disk on fire");
      }
      std::vector<es::record> got;
      auto it = std::lower_bound(store_.begin(), store_.end(), from,
                                 [](const es::record& r, es::sequence s) { return r.seq < s; });
      for (; it != store_.end() && got.size() < n; ++it) got.push_back(*it);
      return got;
    };
  }

  es::consumer& make(es::consumer_config c = config()) {
    c_ = std::make_unique<es::consumer>(std::move(c), last_);
    return *c_;
  }
  es::consumer& c() {
    if (!c_) make();
    return *c_;
  }

  void join(const std::string& member, std::uint32_t capacity) {
    ASSERT_TRUE(c().on_member_join(member, capacity, now_).ok());
  }

  // Runs next_deliveries and returns everything it decided.
  std::vector<es::decision> pump() {
    std::vector<es::decision> out;
    auto st = c().next_deliveries(now_, fetch(), out);
    EXPECT_TRUE(st.ok()) << st.err().to_string();
    return out;
  }
  std::vector<es::deliver> deliveries() { return only<es::deliver>(pump()); }

  std::vector<es::decision> ack(const std::string& member, es::sequence seq) {
    std::vector<es::decision> out;
    auto st = c().on_ack(member, seq, now_, out);
    EXPECT_TRUE(st.ok()) << st.err().to_string();
    return out;
  }
  std::vector<es::decision> nack(const std::string& member, es::sequence seq,
                                 std::optional<std::chrono::milliseconds> delay = std::nullopt,
                                 std::string_view reason = {}) {
    std::vector<es::decision> out;
    auto st = c().on_nack(member, seq, delay, reason, now_, out);
    EXPECT_TRUE(st.ok()) << st.err().to_string();
    return out;
  }
  std::vector<es::decision> tick(std::chrono::milliseconds by) {
    now_ += by;
    std::vector<es::decision> out;
    c().on_tick(now_, out);
    return out;
  }

  std::vector<es::record> store_;
  es::sequence last_ = 0;
  bool fail_fetch_ = false;
  int fetches_ = 0;
  std::unique_ptr<es::consumer> c_;
};

TEST_F(consumer_test, AcksAdvanceTheFloorInAnyOrder) {
  append_n(5);
  join("m1", 10);
  EXPECT_EQ(seqs(deliveries()), (std::vector<es::sequence>{1, 2, 3, 4, 5}));
  EXPECT_EQ(c().ack_floor(), 0u);

  EXPECT_EQ(floor_in(ack("m1", 2)), 0u) << "2 acked, 1 still pending";
  EXPECT_EQ(floor_in(ack("m1", 1)), 2u);
  EXPECT_EQ(floor_in(ack("m1", 4)), 0u);
  EXPECT_EQ(floor_in(ack("m1", 3)), 4u);
  EXPECT_EQ(floor_in(ack("m1", 5)), 5u);
  EXPECT_EQ(c().ack_floor(), 5u);

  auto counters = c().counters();
  EXPECT_EQ(counters.acked, 5u);
  EXPECT_EQ(counters.ack_pending, 0u);
  EXPECT_EQ(counters.lag, 0u);
  EXPECT_TRUE(c().pending().empty());
}

TEST_F(consumer_test, AcksOfSequencesThatAreNotPendingAreRefusedWithTheReason) {
  append_n(3);
  join("m1", 1);
  ASSERT_EQ(seqs(deliveries()), (std::vector<es::sequence>{1}));
  ack("m1", 1);

  std::vector<es::decision> out;
  auto again = c().on_ack("m1", 1, now_, out);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.err().code, es::consumer_errc::not_pending);
  EXPECT_TRUE(contains(again.err().message, "sequence 1"));
  EXPECT_TRUE(contains(again.err().message, "already acked"));

  // Read from the stream (2 is next in line) but never delivered: the member has no room.
  auto never = c().on_ack("m1", 3, now_, out);
  ASSERT_FALSE(never.ok());
  EXPECT_EQ(never.err().code, es::consumer_errc::not_pending);
  EXPECT_TRUE(contains(never.err().message, "never delivered"));

  auto nack_other = c().on_nack("m2", 2, std::nullopt, {}, now_, out);
  ASSERT_FALSE(nack_other.ok());
  EXPECT_EQ(nack_other.err().code, es::consumer_errc::not_pending);
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(c().counters().refused, 3u);
}

TEST_F(consumer_test, AckWaitExpiryRedeliversWithTheCountRaised) {
  auto cfg = config();
  cfg.ack_wait = 10s;
  make(cfg);
  append();
  join("m1", 1);
  ASSERT_EQ(deliveries().at(0).delivery_count, 1u);
  EXPECT_EQ(c().next_deadline(), t0_ + 10s);

  EXPECT_TRUE(tick(9999ms).empty());
  EXPECT_TRUE(deliveries().empty()) << "still within ack_wait";

  EXPECT_TRUE(only<es::dead_letter>(tick(1ms)).empty());
  auto again = deliveries();
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].seq, 1u);
  EXPECT_EQ(again[0].delivery_count, 2u);
  EXPECT_EQ(c().counters().redelivered, 1u);
  EXPECT_EQ(c().next_deadline(), t0_ + 20s) << "a fresh ack_wait for the redelivery";

  EXPECT_EQ(floor_in(ack("m1", 1)), 1u);
}

TEST_F(consumer_test, ProgressFromTheHolderPostponesTheAckDeadline) {
  auto cfg = config();
  cfg.ack_wait = 10s;
  make(cfg);
  append();
  join("m1", 1);
  join("m2", 1);
  ASSERT_EQ(deliveries().at(0).member, "m1");

  now_ += 8s;
  ASSERT_TRUE(c().on_progress("m1", 1, now_).ok());
  EXPECT_EQ(c().next_deadline(), t0_ + 18s);
  auto foreign = c().on_progress("m2", 1, now_);
  ASSERT_FALSE(foreign.ok());
  EXPECT_EQ(foreign.err().code, es::consumer_errc::not_held);

  tick(9s);  // past the first deadline, within the new one
  EXPECT_TRUE(deliveries().empty());
  tick(1s);
  auto again = deliveries();
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].delivery_count, 2u);
}

TEST_F(consumer_test, ARecordRemovedByRetentionWhilePendingIsForgotten) {
  append_n(2);
  join("m1", 2);
  ASSERT_EQ(deliveries().size(), 2u);
  std::vector<es::decision> out;
  c().on_record_gone(1, out);  // the broker found it gone when it went to redeliver it
  EXPECT_EQ(floor_in(out), 1u);
  EXPECT_EQ(c().in_flight_of("m1"), 1u);
  EXPECT_EQ(c().counters().gone, 1u);
  EXPECT_FALSE(c().on_ack("m1", 1, now_, out).ok());
}

TEST_F(consumer_test, MaxDeliverDeadLettersWithTheLastReasonAndCount) {
  auto cfg = config();
  cfg.max_deliver = 3;
  cfg.ack_wait = 5s;
  make(cfg);
  append();
  append();
  join("m1", 1);

  ASSERT_EQ(deliveries().at(0).seq, 1u);
  nack("m1", 1, std::nullopt, "timeout talking to the bank");
  ASSERT_EQ(deliveries().at(0).delivery_count, 2u);
  nack("m1", 1, std::nullopt, "bank said 503");
  ASSERT_EQ(deliveries().at(0).delivery_count, 3u);
  auto out = nack("m1", 1, std::nullopt, "bank said 502");
  auto dead = only<es::dead_letter>(out);
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0].seq, 1u);
  EXPECT_EQ(dead[0].delivery_count, 3u);
  EXPECT_EQ(dead[0].reason, "bank said 502");
  EXPECT_EQ(floor_in(out), 1u) << "a dead letter is done for the consumer";
  EXPECT_EQ(c().counters().dead_lettered, 1u);

  // The next record runs out of attempts by ack_wait expiries; the reason says so.
  for (std::uint32_t n = 1; n <= 3; ++n) {
    auto d = deliveries();
    ASSERT_EQ(d.size(), 1u);
    EXPECT_EQ(d[0].seq, 2u);
    EXPECT_EQ(d[0].delivery_count, n);
    out = tick(5s);
  }
  dead = only<es::dead_letter>(out);
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0].seq, 2u);
  EXPECT_EQ(dead[0].delivery_count, 3u);
  EXPECT_TRUE(contains(dead[0].reason, "ack_wait of 5000 ms expired on member 'm1'"));
  EXPECT_EQ(floor_in(out), 2u);
  EXPECT_TRUE(deliveries().empty());
}

TEST_F(consumer_test, TermDeadLettersAtOnceAndOnlyFromTheHolder) {
  append();
  join("m1", 1);
  join("m2", 1);
  ASSERT_EQ(deliveries().at(0).member, "m1");

  std::vector<es::decision> out;
  auto foreign = c().on_term("m2", 1, "not mine", now_, out);
  ASSERT_FALSE(foreign.ok());
  EXPECT_EQ(foreign.err().code, es::consumer_errc::not_held);

  ASSERT_TRUE(c().on_term("m1", 1, "unknown currency XTS", now_, out).ok());
  auto dead = only<es::dead_letter>(out);
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0].reason, "unknown currency XTS");
  EXPECT_EQ(dead[0].delivery_count, 1u);
  EXPECT_EQ(floor_in(out), 1u);
  EXPECT_EQ(c().in_flight_of("m1"), 0u);
}

TEST_F(consumer_test, NackWithADelayRedeliversWhenItIsDue) {
  append();
  append();
  join("m1", 1);
  ASSERT_EQ(deliveries().at(0).seq, 1u);
  nack("m1", 1, 5s);

  auto next = deliveries();
  ASSERT_EQ(next.size(), 1u);
  EXPECT_EQ(next[0].seq, 2u) << "1 waits out its delay; the member's room goes to 2";
  ack("m1", 2);
  EXPECT_TRUE(deliveries().empty());
  EXPECT_EQ(c().ack_floor(), 0u) << "1 is still pending";

  tick(4999ms);
  EXPECT_TRUE(deliveries().empty());
  tick(1ms);
  auto again = deliveries();
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].seq, 1u);
  EXPECT_EQ(again[0].delivery_count, 2u);
  EXPECT_EQ(floor_in(ack("m1", 1)), 2u);
}

TEST_F(consumer_test, NacksWithoutADelayFollowTheBackoffSchedule) {
  auto cfg = config();
  cfg.backoff = {1s, 4s};
  cfg.max_deliver = 10;
  make(cfg);
  append();
  join("m1", 1);

  // After delivery 1 the first delay, after every later one the last.
  const std::vector<std::chrono::milliseconds> expected = {1s, 4s, 4s};
  for (std::size_t i = 0; i < expected.size(); ++i) {
    ASSERT_EQ(deliveries().size(), 1u);
    nack("m1", 1);
    EXPECT_EQ(c().next_deadline(), now_ + expected[i]) << "after delivery " << i + 1;
    tick(expected[i] - 1ms);
    EXPECT_TRUE(deliveries().empty());
    tick(1ms);
  }
  auto d = deliveries();
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].delivery_count, 4u);

  // An explicit delay of zero wins over the schedule.
  nack("m1", 1, 0ms);
  EXPECT_EQ(deliveries().size(), 1u);
}

TEST_F(consumer_test, ALeavingMembersDeliveriesGoToAnotherWithTheirCounts) {
  append_n(2);
  join("m1", 2);
  ASSERT_EQ(seqs(deliveries()), (std::vector<es::sequence>{1, 2}));
  join("m2", 5);
  EXPECT_TRUE(deliveries().empty());

  std::vector<es::decision> out;
  c().on_member_leave("m1", now_, out);
  EXPECT_TRUE(out.empty());
  auto moved = deliveries();
  ASSERT_EQ(moved.size(), 2u);
  for (const auto& d : moved) {
    EXPECT_EQ(d.member, "m2");
    EXPECT_EQ(d.delivery_count, 2u);
  }

  // m1's late ack (say, it finished just before it went) is accepted: the work is done.
  // m2's ack of the same record then finds nothing pending.
  ack("m1", 1);
  EXPECT_EQ(c().in_flight_of("m2"), 1u) << "the ack frees m2's room too";
  auto late = c().on_ack("m2", 1, now_, out);
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.err().code, es::consumer_errc::not_pending);
  EXPECT_EQ(floor_in(ack("m2", 2)), 2u);
}

TEST_F(consumer_test, ALeaveOnTheLastAllowedDeliveryDeadLetters) {
  // A record that makes its member crash every time must end, not loop.
  auto cfg = config();
  cfg.max_deliver = 2;
  make(cfg);
  append();
  std::vector<es::decision> out;
  for (int i = 0; i < 2; ++i) {
    join("m" + std::to_string(i), 1);
    ASSERT_EQ(deliveries().size(), 1u);
    out.clear();
    c().on_member_leave("m" + std::to_string(i), now_, out);
  }
  auto dead = only<es::dead_letter>(out);
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0].delivery_count, 2u);
  EXPECT_TRUE(contains(dead[0].reason, "member 'm1' left"));
}

TEST_F(consumer_test, CompetingMembersShareTheStreamWithoutHoldingOneRecordTwice) {
  append_n(30);
  join("a", 2);
  join("b", 2);
  join("c", 2);
  std::map<std::string, int> got;
  int rounds = 0;
  while (c().ack_floor() < 30) {
    ASSERT_LT(++rounds, 100) << "no progress; floor " << c().ack_floor();
    auto ds = deliveries();
    std::set<es::sequence> in_flight;
    for (const auto& [seq, e] : c().pending()) {
      if (e.st == es::pending_entry::state::in_flight) {
        EXPECT_TRUE(in_flight.insert(seq).second);
      }
    }
    for (const auto& m : {"a", "b", "c"}) EXPECT_LE(c().in_flight_of(m), 2u);
    for (const auto& d : ds) {
      ++got[d.member];
      EXPECT_EQ(d.delivery_count, 1u);
    }
    for (const auto& d : ds) ack(d.member, d.seq);
  }
  EXPECT_EQ(got["a"] + got["b"] + got["c"], 30);
  EXPECT_GT(got["a"], 0);
  EXPECT_GT(got["b"], 0);
  EXPECT_GT(got["c"], 0);
}

TEST_F(consumer_test, MaxAckPendingStopsDeliveriesUntilAcks) {
  auto cfg = config();
  cfg.max_ack_pending = 3;
  make(cfg);
  append_n(10);
  join("m1", 100);
  EXPECT_EQ(seqs(deliveries()), (std::vector<es::sequence>{1, 2, 3}));
  EXPECT_TRUE(deliveries().empty());
  auto counters = c().counters();
  EXPECT_EQ(counters.ack_pending, 3u);
  EXPECT_EQ(counters.pending, 7u);
  EXPECT_EQ(counters.lag, 10u);
  EXPECT_EQ(c().next_sequence(), 4u) << "nothing read beyond the window";

  ack("m1", 2);
  EXPECT_EQ(seqs(deliveries()), (std::vector<es::sequence>{4}));
  ack("m1", 1);
  ack("m1", 3);
  EXPECT_EQ(seqs(deliveries()), (std::vector<es::sequence>{5, 6}));
  EXPECT_EQ(c().counters().lag, 7u);
}

TEST_F(consumer_test, OrderedByKeepsOneOfAKeyInFlightAndItsOrderAcrossRedeliveries) {
  auto cfg = config();
  cfg.ordered_by = "correlation_id";
  cfg.ack_wait = 10s;
  make(cfg);
  append("order.created", "A");  // 1
  append("order.created", "B");  // 2
  append("order.paid", "A");     // 3
  append("order.created");       // 4: no key, unordered
  append("order.shipped", "A");  // 5
  join("m1", 5);
  join("m2", 5);

  auto d = deliveries();
  EXPECT_EQ(seqs(d), (std::vector<es::sequence>{1, 2, 4}));
  EXPECT_EQ(c().counters().waiting_for_key, 2u);
  for (const auto& x : d) {
    if (x.seq != 1) ack(x.member, x.seq);
  }

  ack(d[0].member, 1);
  d = deliveries();
  ASSERT_EQ(seqs(d), (std::vector<es::sequence>{3}));
  const std::string holder = d[0].member;

  // A nack puts 3 back at the head of A: it comes again before 5.
  nack(holder, 3, 2s);
  EXPECT_TRUE(deliveries().empty()) << "5 must wait for 3";
  tick(2s);
  d = deliveries();
  ASSERT_EQ(seqs(d), (std::vector<es::sequence>{3}));
  EXPECT_EQ(d[0].delivery_count, 2u);

  // So does an ack_wait expiry.
  tick(10s);
  d = deliveries();
  ASSERT_EQ(seqs(d), (std::vector<es::sequence>{3}));
  EXPECT_EQ(d[0].delivery_count, 3u);
  EXPECT_TRUE(deliveries().empty());

  ack(d[0].member, 3);
  EXPECT_EQ(seqs(deliveries()), (std::vector<es::sequence>{5}));
  EXPECT_EQ(c().counters().waiting_for_key, 0u);
}

TEST_F(consumer_test, OrderedByWorksOnTheTopicAndTheEventId) {
  auto cfg = config();
  cfg.ordered_by = "topic";
  make(cfg);
  append("order.a");
  append("order.a");
  append("order.b");
  join("m1", 10);
  EXPECT_EQ(seqs(deliveries()), (std::vector<es::sequence>{1, 3}));
}

TEST_F(consumer_test, StartAllBeginsAtTheFirstStoredRecord) {
  append_n(5);
  drop_below(3);  // retention already removed 1 and 2
  make();
  join("m1", 10);
  auto out = pump();
  EXPECT_EQ(seqs(only<es::deliver>(out)), (std::vector<es::sequence>{3, 4, 5}));
  EXPECT_EQ(floor_in(out), 2u) << "the removed records are behind the floor";
}

TEST_F(consumer_test, StartNewOnlySeesRecordsAppendedAfterCreation) {
  append_n(5);
  auto cfg = config();
  cfg.start = es::start_position::new_only;
  make(cfg);
  EXPECT_EQ(c().ack_floor(), 5u);
  join("m1", 10);
  EXPECT_TRUE(deliveries().empty());
  append();
  EXPECT_EQ(seqs(deliveries()), (std::vector<es::sequence>{6}));
}

TEST_F(consumer_test, StartFromASequence) {
  append_n(5);
  auto cfg = config();
  cfg.start = es::start_position::from_sequence;
  cfg.start_sequence = 4;
  make(cfg);
  EXPECT_EQ(c().ack_floor(), 3u);
  join("m1", 10);
  EXPECT_EQ(seqs(deliveries()), (std::vector<es::sequence>{4, 5}));
}

TEST_F(consumer_test, StartFromATimeSkipsOlderRecords) {
  append("order.created", {}, 1000);
  append("order.created", {}, 2000);
  append("order.created", {}, 3000);
  append("order.created", {}, 4000);
  auto cfg = config();
  cfg.start = es::start_position::from_time;
  cfg.start_time_ms = 2500;
  make(cfg);
  join("m1", 10);
  auto out = pump();
  EXPECT_EQ(seqs(only<es::deliver>(out)), (std::vector<es::sequence>{3, 4}));
  EXPECT_EQ(floor_in(out), 2u);
}

TEST_F(consumer_test, TopicFilterSkipsRecordsAndTheFloorPassesThem) {
  auto cfg = config();
  cfg.topic_filter = {"order.", "refund."};
  make(cfg);
  append("shipment.sent");  // 1
  append("shipment.lost");  // 2
  append("order.created");  // 3
  append("audit.login");    // 4
  append("refund.issued");  // 5
  append("audit.logout");   // 6
  join("m1", 10);
  auto out = pump();
  EXPECT_EQ(seqs(only<es::deliver>(out)), (std::vector<es::sequence>{3, 5}));
  EXPECT_EQ(floor_in(out), 2u);
  EXPECT_EQ(floor_in(ack("m1", 3)), 4u);
  EXPECT_EQ(floor_in(ack("m1", 5)), 6u);
}

TEST_F(consumer_test, ALongRunOfSkippedRecordsIsReadOverSeveralCalls) {
  auto cfg = config();
  cfg.topic_filter = {"order."};
  make(cfg);
  for (int i = 0; i < 20'000; ++i) append("audit.login");
  const es::sequence wanted = append("order.created");
  join("m1", 1);

  // Each call reads a bounded share of the stream and says whether there is more to read.
  int calls = 0;
  std::vector<es::deliver> got;
  es::sequence floor = 0;
  do {
    ASSERT_LT(++calls, 100);
    const int fetches_before = fetches_;
    auto out = pump();
    EXPECT_LE(fetches_ - fetches_before, 20) << "call " << calls;
    floor = std::max(floor, floor_in(out));
    got = only<es::deliver>(out);
  } while (got.empty() && c().more_to_read());
  EXPECT_GT(calls, 1);
  ASSERT_EQ(seqs(got), (std::vector<es::sequence>{wanted}));
  EXPECT_EQ(floor, wanted - 1);
  EXPECT_FALSE(c().more_to_read());
}

TEST_F(consumer_test, RestoredStateRedeliversWhatWasPendingWithItsCounts) {
  auto cfg = config();
  cfg.ordered_by = "correlation_id";
  make(cfg);
  append("order.created", "A");  // 1
  append("order.created", "B");  // 2
  append("order.created", "C");  // 3
  append("order.created", "A");  // 4: waits behind 1
  append("order.created", "D");  // 5
  join("m1", 3);
  ASSERT_EQ(seqs(deliveries()), (std::vector<es::sequence>{1, 2, 3}));
  ack("m1", 2);
  nack("m1", 3, 1h);  // delayed: pending with 1 delivery
  ASSERT_EQ(seqs(deliveries()), (std::vector<es::sequence>{5}));
  const std::string saved = c().encode_state();
  EXPECT_LT(saved.size(), 40u) << "compact: a few bytes per pending record";

  // A restarted broker: a fresh consumer, the saved state, one more record.
  make(cfg);
  ASSERT_TRUE(c().restore(saved).ok());
  EXPECT_EQ(c().ack_floor(), 0u);
  EXPECT_EQ(c().next_sequence(), 6u);
  append("order.created", "E");  // 6
  join("m2", 10);
  auto d = deliveries();
  std::map<es::sequence, std::uint32_t> counts;
  for (const auto& x : d) counts[x.seq] = x.delivery_count;
  EXPECT_EQ(counts, (std::map<es::sequence, std::uint32_t>{{1, 2}, {3, 2}, {5, 2}, {6, 1}}))
      << "2 was acked; 4 still waits behind 1";
  EXPECT_EQ(c().counters().redelivered, 3u);
  EXPECT_EQ(c().counters().acked, 1u);
  EXPECT_EQ(floor_in(ack("m2", 1)), 2u);
  EXPECT_EQ(seqs(deliveries()), (std::vector<es::sequence>{4}));
}

TEST_F(consumer_test, RestoreForgetsRemovedRecordsAndEndsThoseOutOfDeliveries) {
  auto cfg = config();
  cfg.max_deliver = 2;
  make(cfg);
  append_n(3);
  join("m1", 3);
  ASSERT_EQ(deliveries().size(), 3u);
  nack("m1", 3);
  ASSERT_EQ(deliveries().at(0).delivery_count, 2u);  // 3's last allowed delivery
  const std::string saved = c().encode_state();

  make(cfg);
  ASSERT_TRUE(c().restore(saved).ok());
  drop_below(2);  // retention removed 1 while the broker was down
  join("m1", 3);
  auto out = pump();
  EXPECT_EQ(seqs(only<es::deliver>(out)), (std::vector<es::sequence>{2}));
  auto dead = only<es::dead_letter>(out);
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0].seq, 3u);
  EXPECT_EQ(dead[0].delivery_count, 2u);
  EXPECT_EQ(floor_in(out), 1u);
  EXPECT_EQ(c().counters().gone, 1u);
}

TEST_F(consumer_test, RestoreRefusesDamagedStateAndSaysWhere) {
  append_n(3);
  join("m1", 3);
  ASSERT_EQ(deliveries().size(), 3u);
  const std::string saved = c().encode_state();

  auto truncated = c().restore(saved.substr(0, saved.size() - 1));
  ASSERT_FALSE(truncated.ok());
  EXPECT_TRUE(contains(truncated.err().message, "consumer 'billing'"));
  EXPECT_TRUE(contains(truncated.err().message, "truncated in pending entry 2"));

  std::string wrong_version = saved;
  wrong_version[0] = 9;
  EXPECT_TRUE(contains(c().restore(wrong_version).err().message, "version 9"));
  EXPECT_TRUE(contains(c().restore(saved + "x").err().message, "unexpected bytes"));
  EXPECT_TRUE(contains(c().restore("").err().message, "truncated in version"));

  // A refused restore leaves the state as it was.
  EXPECT_EQ(c().pending().size(), 3u);
  EXPECT_EQ(c().in_flight_of("m1"), 3u);
}

TEST_F(consumer_test, AFailedReadIsReportedAndRetried) {
  append_n(2);
  join("m1", 5);
  fail_fetch_ = true;
  std::vector<es::decision> out;
  auto st = c().next_deliveries(now_, fetch(), out);
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(contains(st.err().message, "disk on fire"));
  EXPECT_TRUE(out.empty());
  fail_fetch_ = false;
  EXPECT_EQ(seqs(deliveries()), (std::vector<es::sequence>{1, 2}));
}

TEST_F(consumer_test, NothingIsReadWhileNoMemberHasRoom) {
  append_n(100);
  EXPECT_TRUE(deliveries().empty());
  EXPECT_EQ(fetches_, 0);
  EXPECT_TRUE(c().pending().empty());
}

TEST_F(consumer_test, BadConfigurationsNameTheField) {
  auto expect_refused = [](es::consumer_config cfg, std::string_view needle) {
    try {
      es::consumer c(std::move(cfg), 0);
      ADD_FAILURE() << "accepted; expected an error about " << needle;
    } catch (const ensemble::common::config_error& e) {
      EXPECT_TRUE(contains(e.what(), needle));
      EXPECT_TRUE(contains(e.what(), "consumer"));
    }
  };
  auto cfg = config();
  cfg.ordered_by = "colour";
  expect_refused(cfg, "ordered_by 'colour'");
  cfg = config();
  cfg.max_deliver = 0;
  expect_refused(cfg, "max_deliver");
  cfg = config();
  cfg.max_ack_pending = 0;
  expect_refused(cfg, "max_ack_pending");
  cfg = config();
  cfg.name = "bad name";
  expect_refused(cfg, "name 'bad name'");
  cfg = config();
  cfg.start = es::start_position::from_sequence;
  expect_refused(cfg, "start_sequence");
  cfg = config();
  cfg.backoff = {1s, -1s};
  expect_refused(cfg, "backoff[1]");

  EXPECT_FALSE(c().on_member_join("m1", 0, now_).ok());
}

// A seeded random schedule of appends, acks, nacks, terms, progress notes, members joining and
// leaving, and clock jumps over a few thousand records. Checked after every step: no record is
// in flight twice, never two of one key, a key's records are delivered in sequence order, the
// consumer holds at most max_ack_pending records, members stay within their capacity, the
// floor only moves up and everything at or below it is done. At the end every record for the
// consumer was acked or dead-lettered exactly once, and no other was ever delivered.
class consumer_schedule_test : public consumer_test,
                               public ::testing::WithParamInterface<std::uint32_t> {};

TEST_P(consumer_schedule_test, InvariantsHoldUnderARandomSchedule) {
  std::mt19937 rng(GetParam());
  auto chance = [&](int percent) { return static_cast<int>(rng() % 100) < percent; };
  auto pick = [&](std::size_t n) { return static_cast<std::size_t>(rng() % n); };

  constexpr es::sequence k_records = 3000;
  auto cfg = config();
  cfg.topic_filter = {"order."};
  cfg.ordered_by = "correlation_id";
  cfg.ack_wait = 1s;
  cfg.max_deliver = 4;
  cfg.max_ack_pending = 40;
  cfg.backoff = {200ms, 700ms};
  make(cfg);

  std::map<es::sequence, std::string> key_of;  // records for the consumer, and their keys
  std::set<es::sequence> done;                 // acked or dead-lettered, per the harness
  std::map<es::sequence, int> endings;         // accepted acks + dead letters, per record
  std::map<es::sequence, std::uint32_t> delivered_count;
  std::map<std::string, std::set<es::sequence>> held;  // what each member believes it holds
  std::map<std::string, std::uint32_t> capacity;
  es::sequence floor = 0;
  std::uint64_t dead = 0;

  auto check = [&](const std::vector<es::decision>& out) {
    for (const auto& d : out) {
      if (const auto* x = std::get_if<es::deliver>(&d)) {
        ASSERT_TRUE(key_of.contains(x->seq)) << "record " << x->seq << " is not for this consumer";
        ASSERT_FALSE(done.contains(x->seq)) << "record " << x->seq << " delivered after its end";
        ASSERT_EQ(x->delivery_count, ++delivered_count[x->seq]) << "record " << x->seq;
        ASSERT_LE(x->delivery_count, cfg.max_deliver);
        ASSERT_TRUE(capacity.contains(x->member)) << "delivered to absent " << x->member;
        const std::string& key = key_of[x->seq];
        if (!key.empty()) {
          // Every earlier record of the key has ended.
          for (const auto& [s, k] : key_of) {
            if (s >= x->seq) break;
            if (k == key) {
              ASSERT_TRUE(done.contains(s))
                  << "record " << x->seq << " of key " << key << " delivered before " << s;
            }
          }
        }
        held[x->member].insert(x->seq);
      } else if (const auto* dl = std::get_if<es::dead_letter>(&d)) {
        ASSERT_TRUE(done.insert(dl->seq).second) << "record " << dl->seq << " ended twice";
        ++endings[dl->seq];
        ++dead;
        ASSERT_FALSE(dl->reason.empty());
      } else if (const auto* fl = std::get_if<es::ack_floor_advanced>(&d)) {
        ASSERT_GT(fl->seq, floor);
        for (auto it = key_of.upper_bound(floor); it != key_of.end() && it->first <= fl->seq;
             ++it) {
          ASSERT_TRUE(done.contains(it->first)) << "floor " << fl->seq << " passes " << it->first;
        }
        floor = fl->seq;
      }
    }
    // The consumer's own view.
    ASSERT_LE(c().pending().size(), cfg.max_ack_pending);
    std::set<std::string> keys_in_flight;
    for (const auto& [seq, e] : c().pending()) {
      if (e.st != es::pending_entry::state::in_flight) continue;
      if (!e.key.empty()) {
        ASSERT_TRUE(keys_in_flight.insert(e.key).second) << "two of key " << e.key << " in flight";
      }
    }
  };
  auto step = [&](auto&& fn) {
    std::vector<es::decision> out;
    fn(out);
    check(out);
    // A member whose capacity was lowered keeps what it holds, but gets nothing new until it
    // is below its capacity.
    std::map<std::string, std::uint32_t> before;
    for (const auto& [m, cap] : capacity) before[m] = std::max(cap, c().in_flight_of(m));
    out.clear();
    auto st = c().next_deliveries(now_, fetch(), out);
    ASSERT_TRUE(st.ok()) << st.err().to_string();
    check(out);
    for (const auto& [m, most] : before) ASSERT_LE(c().in_flight_of(m), most) << m;
  };
  auto acked = [&](es::sequence seq, const ensemble::common::status& st) {
    if (!st.ok()) return;
    ASSERT_TRUE(done.insert(seq).second) << "record " << seq << " acked after its end";
    ++endings[seq];
  };

  const std::vector<std::string> names = {"m0", "m1", "m2", "m3", "m4"};
  auto append_some = [&](std::size_t n) {
    for (std::size_t i = 0; i < n && last_ < k_records; ++i) {
      const bool for_us = !chance(15);
      const std::string key = chance(20) ? "" : "k" + std::to_string(pick(12));
      const es::sequence s = append(for_us ? "order.event" : "audit.event", key);
      if (for_us) key_of[s] = key;
    }
  };

  int steps = 0;
  while (last_ < k_records || steps < 20'000) {
    ++steps;
    ASSERT_LT(steps, 200'000);
    if (capacity.empty() || chance(2)) {
      const std::string m = names[pick(names.size())];
      const auto cap = static_cast<std::uint32_t>(1 + pick(8));
      capacity[m] = cap;
      step([&](auto&) { ASSERT_TRUE(c().on_member_join(m, cap, now_).ok()); });
    } else if (chance(25)) {
      step([&](auto&) { append_some(1 + pick(20)); });
    } else if (chance(15)) {
      step([&](auto& out) {
        now_ += std::chrono::milliseconds(pick(1500));
        c().on_tick(now_, out);
      });
    } else if (chance(2) && capacity.size() > 1) {
      auto it = capacity.begin();
      std::advance(it, static_cast<long>(pick(capacity.size())));
      const std::string m = it->first;
      step([&](auto& out) { c().on_member_leave(m, now_, out); });
      capacity.erase(m);
      held.erase(m);
    } else {
      std::vector<std::string> busy;
      for (const auto& [m, s] : held) {
        if (!s.empty()) busy.push_back(m);
      }
      if (busy.empty()) continue;
      const std::string m = busy[pick(busy.size())];
      auto& mine = held[m];
      auto it = mine.begin();
      std::advance(it, static_cast<long>(pick(mine.size())));
      const es::sequence seq = *it;
      mine.erase(it);
      const int what = static_cast<int>(pick(100));
      step([&](auto& out) {
        if (what < 70) {
          acked(seq, c().on_ack(m, seq, now_, out));
        } else if (what < 88) {
          std::optional<std::chrono::milliseconds> delay;
          if (chance(50)) delay = std::chrono::milliseconds(pick(800));
          (void)c().on_nack(m, seq, delay, "try again", now_, out);
        } else if (what < 92) {
          (void)c().on_term(m, seq, "cannot be done", now_, out);
        } else if (what < 96) {
          (void)c().on_progress(m, seq, now_);
          mine.insert(seq);
        }
        // else: the member drops it and never answers; ack_wait brings it back.
      });
    }
    if (HasFatalFailure()) return;
  }

  // Drain: a well-behaved member acks whatever it gets until everything has ended.
  capacity["drain"] = 50;
  step([&](auto&) { ASSERT_TRUE(c().on_member_join("drain", 50, now_).ok()); });
  for (int round = 0; c().ack_floor() < last_; ++round) {
    ASSERT_LT(round, 10'000) << "no progress; floor " << c().ack_floor() << " of " << last_;
    std::map<std::string, std::set<es::sequence>> all;
    all.swap(held);
    for (const auto& [m, s] : all) {
      for (es::sequence seq : s) {
        step([&](auto& out) { acked(seq, c().on_ack(m, seq, now_, out)); });
      }
    }
    step([&](auto& out) {
      now_ += 1s;
      c().on_tick(now_, out);
    });
    if (HasFatalFailure()) return;
  }

  for (const auto& [seq, key] : key_of) {
    ASSERT_EQ(endings[seq], 1) << "record " << seq;
  }
  EXPECT_EQ(endings.size(), key_of.size());
  const auto counters = c().counters();
  EXPECT_EQ(counters.dead_lettered, dead);
  EXPECT_EQ(counters.acked + counters.dead_lettered, key_of.size());
  EXPECT_EQ(counters.lag, 0u);
  EXPECT_EQ(counters.ack_pending, 0u);
  EXPECT_GT(counters.redelivered, 0u);
  EXPECT_GT(dead, 0u);
  RecordProperty("records", static_cast<int>(last_));
  RecordProperty("redelivered", static_cast<int>(counters.redelivered));
  RecordProperty("dead_lettered", static_cast<int>(dead));
}

INSTANTIATE_TEST_SUITE_P(Seeds, consumer_schedule_test, ::testing::Values(1u, 2u, 3u, 42u));

}  // namespace
