// The wiring of durable consumers (broker/src/consumer_host.hpp) over a real file store in a
// temporary directory, on a hand-driven clock, with the router replaced by a vector of sent
// messages and the store wrapped to fail reads and appends on demand: the bounds on consumers
// and members, dead letters that cannot be read or appended (retried, and the consumer's state
// not saved past them), confirmations the router cannot send, and which consumers a turn of
// the loop visits.
#include "consumer_host.hpp"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "ensemble/common/logging.hpp"
#include "ensemble/common/protocol.hpp"

namespace es = ensemble::broker::streams;
namespace ec = ensemble::common;
namespace fs = std::filesystem;
using ec::command;
using ec::header;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

::testing::AssertionResult contains(const std::string& haystack, std::string_view needle) {
  if (haystack.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << haystack << "' does not contain '" << needle << "'";
}

// The file store, with reads of chosen records and appends to chosen streams failing with
// storage_failed (what an EIO looks like to the consumers) while armed.
class flaky_store final : public es::stream_store {
 public:
  explicit flaky_store(std::unique_ptr<es::stream_store> inner) : inner_(std::move(inner)) {}

  std::set<std::pair<std::string, es::sequence>> failing_reads;  // (stream, seq)
  std::set<std::string> failing_appends;                         // streams
  bool failing_saves = false;                                    // consumer states
  bool failing_flushes = false;

  ec::status create_stream(const es::stream_config& c) override { return inner_->create_stream(c); }
  ec::status delete_stream(std::string_view name) override { return inner_->delete_stream(name); }
  std::vector<es::stream_config> list_streams() const override { return inner_->list_streams(); }
  ec::result<es::stream_info> info(std::string_view name) const override {
    return inner_->info(name);
  }
  ec::result<std::vector<es::append_result>> append(std::string_view stream,
                                                    std::span<const es::record> records) override {
    if (failing_appends.contains(std::string(stream))) {
      return ec::error::make(es::errc::storage_failed,
                             "stream " + std::string(stream) + ": injected write failure");
    }
    return inner_->append(stream, records);
  }
  ec::status flush() override {
    if (failing_flushes) {
      return ec::error::make(es::errc::storage_failed, "injected flush failure");
    }
    return inner_->flush();
  }
  ec::result<std::vector<es::record>> read(std::string_view stream, es::sequence from,
                                           std::size_t max_records,
                                           std::size_t max_bytes) override {
    auto got = inner_->read(stream, from, max_records, max_bytes);
    if (!got) return got;
    for (const auto& r : got.value()) {
      if (failing_reads.contains({std::string(stream), r.seq})) {
        return ec::error::make(es::errc::storage_failed, "stream " + std::string(stream) +
                                                             ": injected read failure at #" +
                                                             std::to_string(r.seq));
      }
    }
    return got;
  }
  ec::result<es::sequence> seq_at_time(std::string_view stream, std::int64_t ts_ms) override {
    return inner_->seq_at_time(stream, ts_ms);
  }
  ec::result<std::uint64_t> expire(std::int64_t now_ms) override { return inner_->expire(now_ms); }
  ec::status save_consumer_state(std::string_view stream, std::string_view consumer,
                                 std::string_view blob) override {
    if (failing_saves) {
      return ec::error::make(es::errc::storage_failed, "consumer " + std::string(consumer) +
                                                           ": injected state write failure");
    }
    return inner_->save_consumer_state(stream, consumer, blob);
  }
  ec::status delete_consumer_state(std::string_view stream, std::string_view consumer) override {
    return inner_->delete_consumer_state(stream, consumer);
  }
  ec::result<std::map<std::string, std::string>> load_consumer_states(
      std::string_view stream) override {
    return inner_->load_consumer_states(stream);
  }
  es::store_stats stats() const override { return inner_->stats(); }

 private:
  std::unique_ptr<es::stream_store> inner_;
};

struct sent_message {
  std::string peer;
  command cmd;
  header hdr;
};

class consumer_host_test : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ensemble-consumer-host-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto inner = es::open_file_store(dir_);
    ASSERT_TRUE(inner.ok()) << inner.err().to_string();
    store_ = std::make_unique<flaky_store>(std::move(inner.value()));
    es::stream_config c;
    c.name = "orders";
    c.topic_prefixes = {"order."};
    ASSERT_TRUE(store_->create_stream(c).ok());
  }
  void TearDown() override {
    host_.reset();
    store_.reset();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  void start(es::host_limits limits = {}) {
    host_ = std::make_unique<es::consumer_host>(
        *store_,
        [this](const std::string& peer, command cmd, std::string_view encoded,
               std::string_view /*payload*/) {
          if (gone_.contains(peer)) return false;
          auto h = ec::decode_header(encoded);
          EXPECT_TRUE(h.ok()) << "an undecodable header was sent";
          sent_.push_back({peer, cmd, h.ok() ? h.value() : header{}});
          return true;
        },
        ec::component_logger("broker"), limits);
    host_->load(now_);
  }

  // Stores `n` events on `orders` and tells the host, as the broker's flush does.
  void publish(int n) {
    for (int i = 0; i < n; ++i) {
      header h;
      h.id = "ev-" + std::to_string(++events_);
      h.topic = "order.created";
      h.stream = "orders";
      es::record r;
      r.topic = h.topic;
      r.event_id = h.id;
      r.header = ec::encode_header(h);
      r.payload = "payload of " + h.id;
      ASSERT_TRUE(store_->append("orders", std::span<const es::record>(&r, 1)).ok());
    }
    ASSERT_TRUE(store_->flush().ok());
    host_->records_stored("orders", store_->info("orders")->last_seq);
  }

  ec::result<json> join(const std::string& peer, const std::string& consumer,
                        const json& config = json::object(), std::uint32_t capacity = 10) {
    header h;
    h.id = "consume-" + consumer;
    h.stream = "orders";
    h.consumer = consumer;
    h.capacity = capacity;
    return host_->join(peer, "agent-" + peer, h, config, now_);
  }

  ec::status answer(const std::string& peer, command cmd, const std::string& consumer,
                    es::sequence seq, const std::string& id = {}) {
    header h;
    h.id = id;
    h.stream = "orders";
    h.consumer = consumer;
    h.stream_seq = seq;
    return host_->answer(peer, cmd, h, now_);
  }

  void run() { host_->run(now_); }

  std::vector<sent_message> take(command cmd) {
    std::vector<sent_message> out;
    std::vector<sent_message> rest;
    for (auto& m : sent_) (m.cmd == cmd ? out : rest).push_back(std::move(m));
    sent_ = std::move(rest);
    return out;
  }

  // What a broker restarted on the same directory would load for the consumer.
  json saved_info(const std::string& consumer) {
    es::consumer_host fresh(
        *store_,
        [](const std::string&, command, std::string_view, std::string_view) { return true; },
        ec::component_logger("broker"));
    fresh.load(now_);
    auto i = fresh.info("orders", consumer);
    EXPECT_TRUE(i.ok()) << i.err().to_string();
    return i.ok() ? i.value() : json::object();
  }

  std::string dir_;
  std::unique_ptr<flaky_store> store_;
  std::unique_ptr<es::consumer_host> host_;
  std::vector<sent_message> sent_;
  std::set<std::string> gone_;  // peers the router can no longer reach
  ec::time_point now_ = ec::time_point{} + 24h;
  int events_ = 0;
};

TEST_F(consumer_host_test, consumers_per_stream_are_bounded) {
  es::host_limits limits;
  limits.max_consumers_per_stream = 3;
  start(limits);
  ASSERT_TRUE(join("p1", "a").ok());
  ASSERT_TRUE(host_->add("orders", "b", json::object(), now_).ok());
  ASSERT_TRUE(join("p1", "c").ok());

  auto refused = join("p1", "d");
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.err().code, es::consumer_errc::too_many);
  EXPECT_TRUE(contains(refused.err().message, "'orders'"));
  EXPECT_TRUE(contains(refused.err().message, "'d'"));
  EXPECT_TRUE(contains(refused.err().message, "--max-consumers 3"));
  auto added = host_->add("orders", "e", json::object(), now_);
  ASSERT_FALSE(added.ok());
  EXPECT_EQ(added.err().code, es::consumer_errc::too_many);
  EXPECT_TRUE(contains(added.err().message, "'e'"));
  EXPECT_EQ(host_->counters().consumers_refused, 2u);
  // Nothing of the refused ones was saved, and the existing ones are still joinable.
  EXPECT_EQ(store_->load_consumer_states("orders")->size(), 3u);
  EXPECT_EQ(host_->size(), 3u);
  EXPECT_TRUE(join("p2", "a").ok());
  EXPECT_TRUE(host_->add("orders", "b", json::object(), now_).ok()) << "the same one is accepted";

  // Removing one makes room.
  ASSERT_TRUE(host_->remove("orders", "c").ok());
  EXPECT_TRUE(join("p1", "d").ok());
}

TEST_F(consumer_host_test, members_per_consumer_are_bounded) {
  es::host_limits limits;
  limits.max_members_per_consumer = 2;
  start(limits);
  ASSERT_TRUE(join("p1", "billing").ok());
  ASSERT_TRUE(join("p2", "billing").ok());
  auto refused = join("p3", "billing");
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.err().code, es::consumer_errc::too_many);
  EXPECT_TRUE(contains(refused.err().message, "'orders'"));
  EXPECT_TRUE(contains(refused.err().message, "'billing'"));
  EXPECT_TRUE(contains(refused.err().message, "--max-consumer-members 2"));
  EXPECT_EQ(host_->counters().members_refused, 1u);
  // A member already there may change its capacity.
  EXPECT_TRUE(join("p2", "billing", json::object(), 5).ok());
  auto i = host_->info("orders", "billing");
  ASSERT_TRUE(i.ok());
  EXPECT_EQ(i->at("members").size(), 2u);

  // One leaves (or is lost): the third gets in.
  host_->peer_gone("p1", now_);
  EXPECT_TRUE(join("p3", "billing").ok());
  EXPECT_EQ(host_->info("orders", "billing")->at("members").size(), 2u);
}

TEST_F(consumer_host_test, a_dead_letter_whose_record_cannot_be_read_is_retried_not_lost) {
  start();
  ASSERT_TRUE(join("p1", "billing", {{"max_deliver", 1u}}).ok());
  publish(3);
  run();
  ASSERT_EQ(take(command::deliver).size(), 3u);

  store_->failing_reads.insert({"orders", 1});
  ASSERT_TRUE(answer("p1", command::term, "billing", 1, "term-1").ok());
  ASSERT_TRUE(answer("p1", command::ack, "billing", 2, "ack-2").ok());
  ASSERT_TRUE(answer("p1", command::ack, "billing", 3).ok());
  run();
  EXPECT_EQ(store_->info("orders-dlq")->last_seq, 0u);
  EXPECT_GE(host_->counters().dead_letter_retries, 1u);
  // Not confirmed, and the saved state is not past #1: a crash now makes it a dead letter again.
  EXPECT_TRUE(take(command::reply).empty());
  EXPECT_EQ(saved_info("billing")["ack_floor"], 0);
  auto deadline = host_->next_deadline();
  ASSERT_TRUE(deadline.has_value()) << "nothing would retry it";
  EXPECT_LE(*deadline, now_ + es::k_dead_letter_retry_interval);

  // Still failing at the next attempt: still kept.
  now_ += es::k_dead_letter_retry_interval;
  run();
  EXPECT_EQ(store_->info("orders-dlq")->last_seq, 0u);
  EXPECT_EQ(saved_info("billing")["ack_floor"], 0);

  store_->failing_reads.clear();
  now_ += es::k_dead_letter_retry_interval;
  run();
  auto dead = store_->read("orders-dlq", 1, 10, 1 << 20);
  ASSERT_TRUE(dead.ok());
  ASSERT_EQ(dead->size(), 1u);
  auto h = ec::decode_header(dead->front().header);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->stream_seq, 1u);
  EXPECT_EQ(h->consumer, "billing");
  EXPECT_EQ(host_->counters().dead_letters_stored, 1u);
  EXPECT_EQ(saved_info("billing")["ack_floor"], 3);
  std::set<std::string> confirmed;
  for (const auto& m : take(command::reply)) confirmed.insert(m.hdr.id);
  EXPECT_EQ(confirmed, (std::set<std::string>{"term-1", "ack-2"}));
}

TEST_F(consumer_host_test, a_dead_letter_that_cannot_be_appended_is_retried_not_lost) {
  start();
  ASSERT_TRUE(join("p1", "billing", {{"max_deliver", 1u}}).ok());
  publish(2);
  run();
  ASSERT_EQ(take(command::deliver).size(), 2u);

  store_->failing_appends.insert("orders-dlq");
  ASSERT_TRUE(answer("p1", command::term, "billing", 1, "term-1").ok());
  ASSERT_TRUE(answer("p1", command::ack, "billing", 2).ok());
  run();
  EXPECT_EQ(store_->info("orders-dlq")->last_seq, 0u);
  EXPECT_TRUE(take(command::reply).empty());
  EXPECT_EQ(saved_info("billing")["ack_floor"], 0);

  store_->failing_appends.clear();
  run();
  EXPECT_EQ(store_->info("orders-dlq")->last_seq, 1u);
  EXPECT_EQ(host_->counters().dead_letters_stored, 1u);
  EXPECT_EQ(saved_info("billing")["ack_floor"], 2);
  ASSERT_EQ(take(command::reply).size(), 1u);
}

TEST_F(consumer_host_test, each_dead_letter_counts_one_retry_per_failed_attempt) {
  start();
  ASSERT_TRUE(join("p1", "billing", {{"max_deliver", 1u}}).ok());
  publish(2);
  run();
  ASSERT_EQ(take(command::deliver).size(), 2u);

  // Both the appends and the flush fail in the same turn: two dead letters, two retries (the
  // failed flush does not count them again).
  store_->failing_appends.insert("orders-dlq");
  store_->failing_flushes = true;
  ASSERT_TRUE(answer("p1", command::term, "billing", 1).ok());
  ASSERT_TRUE(answer("p1", command::term, "billing", 2).ok());
  run();
  EXPECT_EQ(host_->counters().dead_letter_retries, 2u);
  EXPECT_EQ(store_->info("orders-dlq")->last_seq, 0u);

  store_->failing_appends.clear();
  store_->failing_flushes = false;
  run();
  EXPECT_EQ(store_->info("orders-dlq")->last_seq, 2u);
  EXPECT_EQ(host_->counters().dead_letters_stored, 2u);
  EXPECT_EQ(host_->counters().dead_letter_retries, 2u);
}

TEST_F(consumer_host_test, a_confirmation_that_cannot_be_sent_is_counted_and_the_answer_stands) {
  start();
  ASSERT_TRUE(join("p1", "billing").ok());
  publish(2);
  run();
  ASSERT_EQ(take(command::deliver).size(), 2u);

  ASSERT_TRUE(answer("p1", command::ack, "billing", 1, "ack-1").ok());
  ASSERT_TRUE(answer("p1", command::term, "billing", 2, "term-2").ok());
  gone_.insert("p1");
  run();
  EXPECT_TRUE(take(command::reply).empty());
  EXPECT_EQ(host_->counters().confirmations_unsent, 2u);
  EXPECT_EQ(saved_info("billing")["ack_floor"], 2);

  // Sent again (from a new connection, as a member that lost its own would): refused
  // not_pending, and nothing changes.
  ASSERT_TRUE(join("p2", "billing").ok());
  auto again = answer("p2", command::ack, "billing", 1, "ack-1");
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.err().code, es::consumer_errc::not_pending);
  auto term_again = answer("p2", command::term, "billing", 2, "term-2");
  ASSERT_FALSE(term_again.ok());
  EXPECT_EQ(term_again.err().code, es::consumer_errc::not_pending);
  run();
  EXPECT_EQ(host_->info("orders", "billing")->at("acked"), 1);
  EXPECT_EQ(host_->info("orders", "billing")->at("dead_lettered"), 1);
  EXPECT_EQ(store_->info("orders-dlq")->last_seq, 1u) << "the dead letter was stored once";
}

// A NACK repeated because its confirmation was lost must not fail the delivery the member got
// since: with `deliveries` it names the delivery it answers, and a repeat is refused.
TEST_F(consumer_host_test, an_answer_naming_its_delivery_does_not_touch_a_later_one) {
  start();
  ASSERT_TRUE(join("p1", "billing", {{"max_deliver", 5u}}).ok());
  publish(1);
  run();
  ASSERT_EQ(take(command::deliver).size(), 1u);

  auto nack = [&](std::uint32_t deliveries, command cmd = command::nack) {
    header h;
    h.id = "nack-" + std::to_string(deliveries);
    h.stream = "orders";
    h.consumer = "billing";
    h.stream_seq = 1;
    h.deliveries = deliveries;
    return host_->answer("p1", cmd, h, now_);
  };
  ASSERT_TRUE(nack(1).ok());
  run();
  auto again = take(command::deliver);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].hdr.deliveries, 2u);

  // The first NACK once more: delivery 2 is held, not 1.
  auto repeated = nack(1);
  ASSERT_FALSE(repeated.ok());
  EXPECT_EQ(repeated.err().code, es::consumer_errc::not_held);
  EXPECT_TRUE(contains(repeated.err().message, "answers delivery 1"));
  EXPECT_TRUE(contains(repeated.err().message, "holds delivery 2"));
  EXPECT_FALSE(nack(1, command::term).ok());
  EXPECT_FALSE(nack(1, command::progress).ok());
  run();
  EXPECT_TRUE(take(command::deliver).empty()) << "delivery 2 was failed by a stale answer";
  auto i = host_->info("orders", "billing");
  EXPECT_EQ(i->at("members")[0]["in_flight"], 1);
  EXPECT_EQ(i->at("refused"), 3);
  // The answer for delivery 2 is accepted.
  EXPECT_TRUE(nack(2, command::term).ok());
}

TEST_F(consumer_host_test, a_turn_visits_only_consumers_with_input_or_a_due_timer) {
  start();
  constexpr int k_consumers = 1000;
  auto name = [](int i) {
    std::string n = std::to_string(i);
    return "c" + std::string(4 - n.size(), '0') + n;
  };
  // 1,000 consumers on one stream, one of them with a member.
  for (int i = 0; i < k_consumers; ++i) {
    ASSERT_TRUE(host_->add("orders", name(i), {{"ack_wait_ms", 30000u}}, now_).ok());
  }
  ASSERT_TRUE(join("p1", name(0), {{"ack_wait_ms", 30000u}}).ok());
  run();
  EXPECT_EQ(host_->counters().last_run_visits, 1u);
  run();
  EXPECT_EQ(host_->counters().last_run_visits, 0u) << "nothing happened";

  // A new record: only the consumer with a member reads it.
  publish(1);
  run();
  EXPECT_EQ(host_->counters().last_run_visits, 1u);
  ASSERT_EQ(take(command::deliver).size(), 1u);
  run();
  EXPECT_EQ(host_->counters().last_run_visits, 0u);

  // Its ack_wait expires: its timer brings it back, alone, and it redelivers.
  now_ += 30s;
  run();
  EXPECT_EQ(host_->counters().last_run_visits, 1u);
  auto again = take(command::deliver);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].hdr.deliveries, 2u);

  // An answer: that consumer only.
  ASSERT_TRUE(answer("p1", command::ack, name(0), 1, "ack-1").ok());
  run();
  EXPECT_EQ(host_->counters().last_run_visits, 1u);
  EXPECT_EQ(take(command::reply).size(), 1u);

  // Every consumer gets a member: each is visited once for it, then none while idle.
  for (int i = 1; i < k_consumers; ++i) ASSERT_TRUE(join("p1", name(i)).ok());
  run();
  EXPECT_EQ(host_->counters().last_run_visits, static_cast<std::uint64_t>(k_consumers - 1));
  EXPECT_EQ(take(command::deliver).size(), static_cast<std::size_t>(k_consumers - 1))
      << "each new one starts at the stream's first record";
  for (int turn = 0; turn < 3; ++turn) {
    now_ += 1s;
    run();
    EXPECT_EQ(host_->counters().last_run_visits, 0u) << "turn " << turn;
  }
  // A record now concerns all of them; the member's loss too.
  publish(1);
  run();
  EXPECT_EQ(host_->counters().last_run_visits, static_cast<std::uint64_t>(k_consumers));
  EXPECT_EQ(take(command::deliver).size(), static_cast<std::size_t>(k_consumers));
  host_->peer_gone("p1", now_);
  run();
  EXPECT_EQ(host_->counters().last_run_visits, static_cast<std::uint64_t>(k_consumers));
  run();
  EXPECT_EQ(host_->counters().last_run_visits, 0u);
}

}  // namespace

// Answers with an id wait for the consumer's state to be saved before they are confirmed.
// While saving fails they cannot pile up without a bound: past k_max_unconfirmed_answers an
// answer with an id is refused queue_full before it changes anything, and once saving works
// again every waiting answer is confirmed.
TEST_F(consumer_host_test, answers_waiting_for_a_save_are_bounded_and_then_confirmed) {
  start();
  ASSERT_TRUE(join("p1", "billing").ok());
  publish(1);
  run();
  ASSERT_EQ(take(command::deliver).size(), 1u);

  store_->failing_saves = true;
  for (std::size_t i = 0; i < es::k_max_unconfirmed_answers; ++i) {
    ASSERT_TRUE(answer("p1", command::progress, "billing", 1, "progress-" + std::to_string(i)).ok())
        << i;
    if (i % 1000 == 0) run();  // saves are tried, and fail
  }
  auto refused = answer("p1", command::ack, "billing", 1, "ack-1");
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.err().code, ec::errc::queue_full);
  EXPECT_TRUE(contains(refused.err().message, "wait for the consumer's state to be saved"));
  EXPECT_TRUE(take(command::reply).empty()) << "nothing is confirmed before it is saved";
  EXPECT_EQ(host_->info("orders", "billing")->at("acked"), 0) << "the refused ACK changed nothing";

  store_->failing_saves = false;
  now_ += 1s;  // past the retry interval of a failed save
  run();
  EXPECT_EQ(take(command::reply).size(), es::k_max_unconfirmed_answers);
  ASSERT_TRUE(answer("p1", command::ack, "billing", 1, "ack-1").ok());
  run();
  EXPECT_EQ(take(command::reply).size(), 1u);
  EXPECT_EQ(host_->info("orders", "billing")->at("acked"), 1);
}
