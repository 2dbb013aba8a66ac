// Durable consumers on the wire: a real ensemble-broker with --data and raw DEALER members (no
// SDK), checked against docs/protocol.md section 11 "Durable consumers": CONSUME, DELIVER,
// ACK/NACK/TERM/PROGRESS, capacity, member loss, dead letters and their replay, the admin
// actions, a consumer's state across a SIGKILL of the broker, and the refusals.
#include <map>
#include <set>
#include <string>
#include <vector>

#include "support/required_fields.hpp"
#include "support/streams_fixture.hpp"

namespace ec = ensemble::common;
using ec::command;
using ec::header;
using ensemble::test::raw_peer;
using ensemble::test::wire_message;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

constexpr auto k_wait = 10s;  // generous: only reached when something is broken

class broker_consumers_test : public ensemble::test::streams_fixture {
 protected:
  // A registered peer (HELLO answered).
  std::unique_ptr<raw_peer> member(const std::string& agent) {
    auto p = std::make_unique<raw_peer>(ctx_, broker_->router());
    header hello;
    hello.agent = agent;
    p->send(command::hello, hello);
    p->expect(command::welcome, k_wait);
    return p;
  }

  // CONSUME; the REPLY's header (payload in *body when given).
  header consume(raw_peer& p, const std::string& consumer, std::uint32_t capacity,
                 const json& config = json(), json* body = nullptr,
                 const std::string& stream = "orders") {
    header h;
    h.id = next_id("consume-");
    h.stream = stream;
    h.consumer = consumer;
    h.capacity = capacity;
    std::string payload;
    if (!config.is_null()) {
      const auto bytes = json::to_msgpack(config);
      payload.assign(bytes.begin(), bytes.end());
    }
    p.send(command::consume, h, payload);
    auto r = p.expect(command::reply, k_wait);
    EXPECT_EQ(r.hdr.id, h.id);
    if (body != nullptr && !r.hdr.is_error()) *body = json::from_msgpack(r.payload);
    return r.hdr;
  }

  void answer(raw_peer& p, command cmd, std::uint64_t seq, const std::string& consumer,
              const std::string& reason = {}, std::uint64_t delay_ms = 0,
              const std::string& id = {}) {
    header h;
    h.id = id;
    h.stream = "orders";
    h.consumer = consumer;
    h.stream_seq = seq;
    h.error_message = reason;
    h.delay_ms = delay_ms;
    p.send(cmd, h);
  }

  void publish_orders(int n, const std::string& topic = "order.created") {
    for (int i = 0; i < n; ++i) {
      const auto id = next_id("ev-");
      publish(*client_, topic, id, "payload-" + id);
      expect_ack(*client_, id);
    }
  }

  json info(const std::string& consumer) {
    return admin("consumer_info", {{"stream", "orders"}, {"name", consumer}});
  }
};

TEST_F(broker_consumers_test, deliveries_carry_the_event_and_acks_move_the_floor) {
  start_with_orders();
  publish_orders(5);
  auto m = member("billing-1");
  json body;
  auto r = consume(*m, "billing", 10, json::object(), &body);
  ASSERT_FALSE(r.is_error()) << r.error_code << " " << r.error_message;
  EXPECT_EQ(body["consumer"], "billing");
  EXPECT_EQ(body["last_seq"], 5);

  for (std::uint64_t seq = 1; seq <= 5; ++seq) {
    auto d = m->expect(command::deliver, k_wait);
    EXPECT_EQ(d.hdr.stream, "orders");
    EXPECT_EQ(d.hdr.consumer, "billing");
    EXPECT_EQ(d.hdr.stream_seq, seq);
    EXPECT_EQ(d.hdr.deliveries, 1u);
    EXPECT_EQ(d.hdr.topic, "order.created");
    EXPECT_EQ(d.hdr.correlation_id, "corr-" + d.hdr.id);
    EXPECT_EQ(d.payload, "payload-" + d.hdr.id);
    answer(*m, command::ack, seq, "billing");
  }
  // An ACK with an id is confirmed; one for a done sequence is refused not_pending.
  answer(*m, command::ack, 3, "billing", {}, 0, "ack-again");
  auto refused = m->expect(command::reply, k_wait);
  EXPECT_EQ(refused.hdr.id, "ack-again");
  EXPECT_EQ(refused.hdr.error_code, "not_pending");
  EXPECT_EQ(refused.hdr.stream_seq, 3u);
  EXPECT_EQ(refused.hdr.consumer, "billing");

  auto i = info("billing");
  EXPECT_EQ(i["ack_floor"], 5);
  EXPECT_EQ(i["acked"], 5);
  EXPECT_EQ(i["lag"], 0);
  ASSERT_EQ(i["members"].size(), 1u);
  EXPECT_EQ(i["members"][0]["agent"], "billing-1");

  // New events reach the member as they are stored.
  publish_orders(1, "shipment.sent");
  auto d = m->expect(command::deliver, k_wait);
  EXPECT_EQ(d.hdr.stream_seq, 6u);
  EXPECT_EQ(d.hdr.topic, "shipment.sent");
}

TEST_F(broker_consumers_test, capacity_bounds_what_a_member_holds) {
  start_with_orders();
  publish_orders(4);
  auto m = member("slow");
  ASSERT_FALSE(consume(*m, "slow", 2).is_error());
  auto a = m->expect(command::deliver, k_wait);
  auto b = m->expect(command::deliver, k_wait);
  EXPECT_EQ(a.hdr.stream_seq, 1u);
  EXPECT_EQ(b.hdr.stream_seq, 2u);
  // Nothing more until one is answered: an admin round trip orders the check after the
  // broker's turn, and no third DELIVER is queued for this member.
  auto i = info("slow");
  EXPECT_EQ(i["members"][0]["in_flight"], 2);
  EXPECT_EQ(i["delivered"], 2) << "a delivery beyond capacity 2";
  answer(*m, command::ack, 1, "slow");
  auto c = m->expect(command::deliver, k_wait);
  EXPECT_EQ(c.hdr.stream_seq, 3u);
  EXPECT_EQ(info("slow")["delivered"], 3);
}

TEST_F(broker_consumers_test, nack_redelivers_and_term_dead_letters_then_replay_returns_it) {
  start_with_orders();
  publish_orders(2);
  auto m = member("worker-a");
  ASSERT_FALSE(consume(*m, "audit", 5, {{"max_deliver", 3}}).is_error());
  auto first = m->expect(command::deliver, k_wait);
  auto second = m->expect(command::deliver, k_wait);
  ASSERT_EQ(first.hdr.stream_seq, 1u);
  answer(*m, command::nack, 1, "audit", "database busy");
  auto again = m->expect(command::deliver, k_wait);
  EXPECT_EQ(again.hdr.stream_seq, 1u);
  EXPECT_EQ(again.hdr.deliveries, 2u);
  answer(*m, command::ack, 1, "audit");
  answer(*m, command::term, 2, "audit", "invalid order: no items");

  // The dead letter: in orders-dlq with the reason, the count and where it came from.
  std::vector<json> dead;
  ASSERT_TRUE(ensemble::testkit::wait_until(
      [&] {
        dead = read_all("orders-dlq");
        return !dead.empty();
      },
      k_wait));
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0]["topic"], "order.created");
  EXPECT_EQ(dead[0]["id"], "orders:2:audit");
  EXPECT_EQ(dead[0]["header"]["error_message"], "invalid order: no items");
  EXPECT_EQ(dead[0]["header"]["consumer"], "audit");
  EXPECT_EQ(dead[0]["header"]["stream"], "orders");
  EXPECT_EQ(dead[0]["header"]["stream_seq"], 2);
  EXPECT_EQ(dead[0]["header"]["deliveries"], 1);
  EXPECT_EQ(dead[0]["header"]["id"], second.hdr.id);
  auto i = info("audit");
  EXPECT_EQ(i["dead_lettered"], 1);
  EXPECT_EQ(i["ack_floor"], 2);

  // Another consumer of the stream: it must not get the replay.
  auto other = member("other");
  ASSERT_FALSE(consume(*other, "other", 10).is_error());
  EXPECT_EQ(other->expect(command::deliver, k_wait).hdr.stream_seq, 1u);
  EXPECT_EQ(other->expect(command::deliver, k_wait).hdr.stream_seq, 2u);
  answer(*other, command::ack, 1, "other");
  answer(*other, command::ack, 2, "other");

  auto replayed = admin("dlq_replay", {{"stream", "orders"}, {"seq", dead[0]["stream_seq"]}});
  EXPECT_EQ(replayed["stream"], "orders");
  EXPECT_EQ(replayed["stream_seq"], 3);
  EXPECT_EQ(replayed["consumer"], "audit");
  EXPECT_EQ(replayed["duplicate"], false);
  auto back = m->expect(command::deliver, k_wait);
  EXPECT_EQ(back.hdr.stream_seq, 3u);
  EXPECT_EQ(back.hdr.deliveries, 1u);
  EXPECT_EQ(back.hdr.id, second.hdr.id + "~replay1");
  EXPECT_EQ(back.payload, second.payload);
  answer(*m, command::ack, 3, "audit");
  // Replaying the same dead letter again within the window stores nothing new.
  auto twice = admin("dlq_replay", {{"stream", "orders-dlq"}, {"seq", 1}});
  EXPECT_EQ(twice["duplicate"], true);
  EXPECT_EQ(twice["stream_seq"], 3);
  // The other consumer skipped it: its floor passes 3 without a delivery.
  ASSERT_TRUE(
      ensemble::testkit::wait_until([&] { return info("other")["ack_floor"] == 3; }, k_wait));
  EXPECT_EQ(info("other")["delivered"], 2) << "the replay went to another consumer too";
}

TEST_F(broker_consumers_test, ack_wait_expiry_redelivers_and_max_deliver_dead_letters) {
  start_with_orders();
  publish_orders(1);
  auto m = member("sleepy");
  ASSERT_FALSE(consume(*m, "sleepy", 1, {{"ack_wait_ms", 100}, {"max_deliver", 2}}).is_error());
  EXPECT_EQ(m->expect(command::deliver, k_wait).hdr.deliveries, 1u);
  auto again = m->expect(command::deliver, k_wait);  // after ack_wait, unanswered
  EXPECT_EQ(again.hdr.deliveries, 2u);
  std::vector<json> dead;
  ASSERT_TRUE(ensemble::testkit::wait_until(
      [&] {
        dead = read_all("orders-dlq");
        return !dead.empty();
      },
      k_wait));
  EXPECT_EQ(dead[0]["header"]["deliveries"], 2);
  EXPECT_NE(dead[0]["header"]["error_message"].get<std::string>().find("ack_wait of 100 ms"),
            std::string::npos)
      << dead[0]["header"]["error_message"];
}

TEST_F(broker_consumers_test, a_member_that_leaves_hands_its_deliveries_to_the_others) {
  start_with_orders();
  publish_orders(4);
  auto a = member("a");
  ASSERT_FALSE(consume(*a, "shipping", 4).is_error());
  for (int i = 0; i < 4; ++i) a->expect(command::deliver, k_wait);
  auto b = member("b");
  ASSERT_FALSE(consume(*b, "shipping", 4).is_error());
  a->send(command::bye, header{});
  std::set<std::uint64_t> got;
  for (int i = 0; i < 4; ++i) {
    auto d = b->expect(command::deliver, k_wait);
    EXPECT_EQ(d.hdr.deliveries, 2u);
    got.insert(d.hdr.stream_seq);
    answer(*b, command::ack, d.hdr.stream_seq, "shipping");
  }
  EXPECT_EQ(got, (std::set<std::uint64_t>{1, 2, 3, 4}));
  ASSERT_TRUE(
      ensemble::testkit::wait_until([&] { return info("shipping")["ack_floor"] == 4; }, k_wait));
  EXPECT_EQ(info("shipping")["members"].size(), 1u);
}

TEST_F(broker_consumers_test, position_and_delivery_counts_survive_a_sigkill_of_the_broker) {
  start_with_orders();
  publish_orders(3);
  {
    auto m = member("before");
    ASSERT_FALSE(consume(*m, "durable", 3).is_error());
    for (int i = 0; i < 3; ++i) m->expect(command::deliver, k_wait);
    answer(*m, command::ack, 1, "durable", {}, 0, "ack-1");  // confirmed: saved after this turn
    EXPECT_FALSE(m->expect(command::reply, k_wait).hdr.is_error());
    ASSERT_TRUE(
        ensemble::testkit::wait_until([&] { return info("durable")["ack_floor"] == 1; }, k_wait));
  }
  broker_->restart();
  client_ = std::make_unique<raw_peer>(ctx_, broker_->router());
  auto m = member("after");
  json body;
  ASSERT_FALSE(consume(*m, "durable", 3, json(), &body).is_error());
  EXPECT_EQ(body["ack_floor"], 1);
  std::set<std::uint64_t> seqs;
  for (int i = 0; i < 2; ++i) {
    auto d = m->expect(command::deliver, k_wait);
    EXPECT_EQ(d.hdr.deliveries, 2u) << "#" << d.hdr.stream_seq << " was in flight at the kill";
    seqs.insert(d.hdr.stream_seq);
  }
  EXPECT_EQ(seqs, (std::set<std::uint64_t>{2, 3}));
}

// The reasons stored with dead letters, and the refusals, name a member by its agent name and
// connection ("sleeper#<hex>"; docs/protocol.md section 11), printable: the raw ROUTER routing
// id they used to carry began with a NUL and was not UTF-8, so dumping such a dead letter as
// JSON threw.
TEST_F(broker_consumers_test, dead_letter_reasons_and_refusals_name_the_member_by_agent) {
  start_with_orders();
  publish_orders(2);
  {
    auto m = member("leaver");
    ASSERT_FALSE(consume(*m, "once", 1, {{"max_deliver", 1}, {"ack_wait_ms", 100}}).is_error());
    EXPECT_EQ(m->expect(command::deliver, k_wait).hdr.stream_seq, 1u);
    m->send(command::bye, header{});  // leaves while holding #1: its last allowed delivery
  }
  auto m = member("sleeper");
  ASSERT_FALSE(consume(*m, "once", 1).is_error());
  EXPECT_EQ(m->expect(command::deliver, k_wait).hdr.stream_seq, 2u);  // never answered
  std::vector<json> dead;
  ASSERT_TRUE(ensemble::testkit::wait_until(
      [&] {
        dead = read_all("orders-dlq");
        return dead.size() == 2;
      },
      k_wait));
  const auto left = dead[0]["header"]["error_message"].get<std::string>();
  EXPECT_TRUE(left.starts_with("member 'leaver#") && left.ends_with("' left while holding it"))
      << ::testing::PrintToString(left);
  const auto expired = dead[1]["header"]["error_message"].get<std::string>();
  EXPECT_TRUE(expired.starts_with("ack_wait of 100 ms expired on member 'sleeper#"))
      << ::testing::PrintToString(expired);
  EXPECT_NO_THROW((void)dead[0].dump());
  answer(*m, command::ack, 2, "once", {}, 0, "late-ack");
  auto refused = m->expect(command::reply, k_wait);
  EXPECT_EQ(refused.hdr.error_code, "not_pending");
  EXPECT_NE(refused.hdr.error_message.find("member 'sleeper#"), std::string::npos)
      << ::testing::PrintToString(refused.hdr.error_message);
}

TEST_F(broker_consumers_test, refusals_name_what_is_wrong) {
  start_with_orders();
  // No HELLO: members are tracked by heartbeat.
  {
    raw_peer anon(ctx_, broker_->router());
    auto r = consume(anon, "x", 1);
    EXPECT_EQ(r.error_code, "not_registered");
  }
  auto m = member("m");
  auto r = consume(*m, "x", 1, json(), nullptr, "nope");
  EXPECT_EQ(r.error_code, "not_found");
  r = consume(*m, "x", 1, {{"ack_wait", "30s"}});
  EXPECT_EQ(r.error_code, "bad_request");
  EXPECT_NE(r.error_message.find("unknown key 'ack_wait'"), std::string::npos) << r.error_message;
  r = consume(*m, "x", 1, {{"max_deliver", -1}});
  EXPECT_EQ(r.error_code, "bad_request");
  EXPECT_NE(r.error_message.find("'max_deliver'"), std::string::npos) << r.error_message;
  r = consume(*m, "x", 1, {{"ordered_by", "colour"}});
  EXPECT_NE(r.error_message.find("ordered_by 'colour'"), std::string::npos) << r.error_message;
  ASSERT_FALSE(consume(*m, "x", 1, {{"ack_wait_ms", 5000}}).is_error());
  r = consume(*m, "x", 1, {{"ack_wait_ms", 6000}});
  EXPECT_EQ(r.error_code, "bad_request");
  EXPECT_NE(r.error_message.find("ack_wait_ms 5000"), std::string::npos) << r.error_message;
  EXPECT_FALSE(consume(*m, "x", 1, {{"ack_wait_ms", 5000}}).is_error()) << "the same config joins";
  r = consume(*m, "x", 1, json(), nullptr, "orders-dlq");
  EXPECT_EQ(r.error_code, "bad_request");
  EXPECT_NE(r.error_message.find("dead letters"), std::string::npos) << r.error_message;

  // An answer without stream_seq, and one for an unknown consumer: ERRORs that name them.
  answer(*m, command::ack, 0, "x");
  auto e = m->expect(command::error, k_wait);
  EXPECT_EQ(e.hdr.error_code, "bad_request");
  EXPECT_NE(e.hdr.error_message.find("stream_seq"), std::string::npos);
  answer(*m, command::nack, 7, "ghost");
  e = m->expect(command::error, k_wait);
  EXPECT_EQ(e.hdr.error_code, "not_found");
  EXPECT_EQ(e.hdr.consumer, "ghost");
  EXPECT_EQ(e.hdr.stream_seq, 7u);
  // DELIVER is the broker's to send.
  m->send(command::deliver, header{});
  EXPECT_EQ(m->expect(command::error, k_wait).hdr.error_code, "bad_request");

  auto bad = admin_error("stream_add", {{"name", "x-dlq"}, {"topics", {"x."}}});
  EXPECT_NE(bad.error_message.find("reserved"), std::string::npos) << bad.error_message;
  auto list = admin("consumers", {{"stream", "orders"}});
  ASSERT_EQ(list["consumers"].size(), 1u);
  EXPECT_EQ(list["consumers"][0]["config"]["ack_wait_ms"], 5000);
  auto rm = admin("consumer_rm", {{"stream", "orders"}, {"name", "x"}});
  EXPECT_EQ(rm["removed"], true);
  EXPECT_EQ(admin_error("consumer_info", {{"stream", "orders"}, {"name", "x"}}).error_code,
            "not_found");
}

// docs/protocol.md section 3: a command without a field that k_header_fields requires of it is
// refused bad_request, naming the command and the field, and the broker keeps serving. Driven by
// the table, so a field made required there is covered here without a change.
TEST_F(broker_consumers_test, every_required_field_is_refused_when_missing) {
  start_with_orders();
  auto m = member("m");
  int refused = 0;
  for (command c : ec::k_commands) {
    for (const auto& f : ec::k_header_field_infos) {
      if (!f.required.contains(c)) continue;
      const std::string name = ec::command_name(static_cast<std::uint8_t>(c));
      SCOPED_TRACE(name + " without " + std::string(f.key));
      header h = ensemble::test::with_required_fields(c, f.key);
      if (!h.id.empty()) h.id = next_id("missing-");
      m->send(c, h);
      auto answer = m->next_answer(k_wait);
      ASSERT_TRUE(answer.has_value()) << "no answer";
      EXPECT_EQ(answer->id, h.id);
      EXPECT_EQ(answer->error_code, "bad_request");
      EXPECT_NE(answer->error_message.find(name + " without '" + std::string(f.key) + "'"),
                std::string::npos)
          << answer->error_message;
      ++refused;
    }
  }
  EXPECT_GT(refused, 0);
  // Still serving, and still registered: a refused message is not a lost peer.
  EXPECT_FALSE(consume(*m, "after", 1).is_error());
}

// docs/protocol.md sections 10 and 11: --max-consumers and --max-consumer-members bound what
// peers can make the broker hold; over them CONSUME and consumer_add are refused too_many.
TEST_F(broker_consumers_test, consumers_and_members_over_the_bounds_are_refused_too_many) {
  start_with_orders({"--max-consumers", "2", "--max-consumer-members", "1"});
  auto m1 = member("m1");
  auto m2 = member("m2");
  ASSERT_FALSE(consume(*m1, "a", 1).is_error());
  ASSERT_FALSE(consume(*m1, "b", 1).is_error());

  auto r = consume(*m1, "c", 1);
  EXPECT_EQ(r.error_code, "too_many");
  EXPECT_EQ(r.stream, "orders");
  EXPECT_EQ(r.consumer, "c");
  EXPECT_NE(r.error_message.find("stream 'orders'"), std::string::npos) << r.error_message;
  EXPECT_NE(r.error_message.find("'c'"), std::string::npos) << r.error_message;
  EXPECT_NE(r.error_message.find("--max-consumers 2"), std::string::npos) << r.error_message;
  auto added = admin_error("consumer_add", {{"stream", "orders"}, {"name", "c"}});
  EXPECT_EQ(added.error_code, "too_many");
  EXPECT_NE(added.error_message.find("--max-consumers 2"), std::string::npos)
      << added.error_message;

  r = consume(*m2, "a", 1);
  EXPECT_EQ(r.error_code, "too_many");
  EXPECT_NE(r.error_message.find("consumer 'a' of stream 'orders'"), std::string::npos)
      << r.error_message;
  EXPECT_NE(r.error_message.find("--max-consumer-members 1"), std::string::npos) << r.error_message;
  EXPECT_FALSE(consume(*m1, "a", 3).is_error()) << "a member already there changes its capacity";

  auto stats = admin("stats");
  EXPECT_EQ(stats["consumers"]["count"], 2);
  EXPECT_EQ(stats["consumers"]["consumers_refused"], 2);
  EXPECT_EQ(stats["consumers"]["members_refused"], 1);
  EXPECT_EQ(stats["consumers"]["max_consumers"], 2);
  EXPECT_EQ(stats["consumers"]["max_consumer_members"], 1);
  EXPECT_EQ(stats["errors_by_code"]["too_many"], 3);

  // Room comes back when a consumer is removed or a member leaves.
  admin("consumer_rm", {{"stream", "orders"}, {"name", "b"}});
  EXPECT_FALSE(consume(*m2, "c", 1).is_error());
  header stop;
  stop.id = next_id("stop-");
  stop.stream = "orders";
  stop.consumer = "a";
  m1->send(command::consume_stop, stop);
  EXPECT_FALSE(m1->expect(command::reply, k_wait).hdr.is_error());
  EXPECT_FALSE(consume(*m2, "a", 1).is_error());
}

}  // namespace
