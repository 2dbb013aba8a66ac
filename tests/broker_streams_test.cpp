// Durable streams in the broker, on the wire: a real ensemble-broker process with --data, raw
// DEALERs and a plain SUB (no SDK). What is checked is what docs/protocol.md section 11 promises:
// an acked PUBLISH is stored before its ack, names stream and stream_seq, survives a SIGKILL of
// the broker, is de-duplicated by id, still fans out to subscribers; the broker.stream_* admin
// actions; and storage errors answered per publish.
#include <sys/mount.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "ensemble/common/protocol.hpp"
#include "ensemble/testkit/process.hpp"
#include "support/event_sub.hpp"
#include "support/raw_peer.hpp"
#include "support/streams_fixture.hpp"

namespace ec = ensemble::common;
namespace fs = std::filesystem;
namespace tk = ensemble::testkit;
using ec::command;
using ec::header;
using ensemble::test::event_sub;
using ensemble::test::raw_peer;
using ensemble::test::wire_message;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

constexpr auto k_wait = 10s;

class broker_streams_test : public ensemble::test::streams_fixture {};

// ---- durable publish ----------------------------------------------------------------------

TEST_F(broker_streams_test, acked_publish_is_stored_and_the_ack_names_stream_and_stream_seq) {
  start_with_orders();
  raw_peer publisher(ctx_, broker_->router());
  header hello;
  hello.agent = "orders-service";
  publisher.send(command::hello, hello);
  publisher.expect(command::welcome);

  event_sub sub(ctx_, broker_->events());
  sub.subscribe("order.");
  sub.subscribe("invoice.");
  sub.sync(publisher, "_ensemble.sync.acked");

  for (int i = 1; i <= 3; ++i) {
    const auto id = next_id();
    publish(publisher, i == 3 ? "shipment.sent" : "order.created", id, "payload-" + id);
    auto ack = expect_ack(publisher, id);
    EXPECT_EQ(ack.hdr.stream, "orders");
    EXPECT_EQ(ack.hdr.stream_seq, static_cast<std::uint64_t>(i));
    EXPECT_FALSE(ack.hdr.duplicate);
  }
  // A topic no stream covers: acked as before, without stream fields.
  publish(publisher, "invoice.sent", "inv-1", "x");
  auto plain = expect_ack(publisher, "inv-1");
  EXPECT_TRUE(plain.hdr.stream.empty());
  EXPECT_EQ(plain.hdr.stream_seq, 0u);
  EXPECT_EQ(plain.hdr.seq, 1u);

  // The plain subscriber got the stored events (after they were stored), with their stream
  // position, and the unstored one.
  auto first = sub.next(k_wait);
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->topic, "order.created");
  EXPECT_EQ(first->hdr.stream, "orders");
  EXPECT_EQ(first->hdr.stream_seq, 1u);
  EXPECT_EQ(first->hdr.seq, 1u);
  EXPECT_EQ(first->hdr.publisher, "orders-service");
  EXPECT_EQ(first->payload, "payload-e-1");
  auto second = sub.next(k_wait);
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->hdr.stream_seq, 2u);
  auto invoice = sub.next(k_wait);
  ASSERT_TRUE(invoice.has_value());
  EXPECT_EQ(invoice->topic, "invoice.sent");
  EXPECT_TRUE(invoice->hdr.stream.empty());

  auto info = admin("stream_info", {{"name", "orders"}});
  EXPECT_EQ(info["count"], 3);
  EXPECT_EQ(info["last_seq"], 3);
  EXPECT_EQ(info["stored"], 3);
  auto stats = admin("stats");
  EXPECT_EQ(stats["streams"]["orders"]["stored"], 3);
  EXPECT_EQ(stats["streams"]["orders"]["duplicates"], 0);
}

TEST_F(broker_streams_test, every_acked_event_survives_a_sigkill_of_the_broker_exactly_once) {
  start_with_orders();
  raw_peer publisher(ctx_, broker_->router());
  // Pipelined: the acks of one poll batch come after one flush.
  constexpr int k_events = 500;
  std::map<std::string, std::string> sent;  // id -> payload
  for (int i = 0; i < k_events; ++i) {
    const auto id = next_id();
    sent[id] =
        std::string(static_cast<std::size_t>(100 + i % 300), static_cast<char>('a' + i % 26)) +
        "#" + id;
    publish(publisher, i % 2 == 0 ? "order.created" : "shipment.sent", id, sent[id]);
  }
  std::map<std::string, std::uint64_t> acked;
  for (int i = 0; i < k_events; ++i) {
    auto a = publisher.expect(command::publish_ack, k_wait);
    ASSERT_EQ(a.cmd, command::publish_ack);
    EXPECT_EQ(a.hdr.stream, "orders");
    EXPECT_TRUE(acked.emplace(a.hdr.id, a.hdr.stream_seq).second) << "acked twice: " << a.hdr.id;
  }
  std::set<std::uint64_t> seqs;
  for (const auto& [id, seq] : acked) seqs.insert(seq);
  ASSERT_EQ(seqs.size(), static_cast<std::size_t>(k_events));
  EXPECT_EQ(*seqs.begin(), 1u);
  EXPECT_EQ(*seqs.rbegin(), static_cast<std::uint64_t>(k_events));

  broker_->restart();  // SIGKILL, then a new broker on the same endpoints and --data
  client_ = std::make_unique<raw_peer>(ctx_, broker_->router());

  auto records = read_all("orders");
  ASSERT_EQ(records.size(), static_cast<std::size_t>(k_events));
  std::set<std::string> seen;
  for (const auto& r : records) {
    const auto id = r["id"].get<std::string>();
    ASSERT_TRUE(sent.contains(id)) << "unknown id " << id;
    EXPECT_TRUE(seen.insert(id).second) << "stored twice: " << id;
    EXPECT_EQ(r["stream_seq"].get<std::uint64_t>(), acked[id]) << id;
    const auto& bin = r["payload"].get_binary();
    EXPECT_EQ(std::string(bin.begin(), bin.end()), sent[id]) << id;
    EXPECT_EQ(r["header"]["correlation_id"], "corr-" + id);
    EXPECT_EQ(r["header"]["stream"], "orders");
    EXPECT_EQ(r["header"]["topic"], r["topic"]);
  }
  // Sequences go on where they stopped.
  raw_peer again(ctx_, broker_->router());
  publish(again, "order.created", "after-restart", "x");
  auto a = expect_ack(again, "after-restart");
  EXPECT_EQ(a.hdr.stream_seq, static_cast<std::uint64_t>(k_events + 1));
}

TEST_F(broker_streams_test,
       a_duplicate_id_gets_the_original_seq_and_is_neither_stored_nor_fanned_out) {
  start_with_orders();
  raw_peer publisher(ctx_, broker_->router());
  event_sub sub(ctx_, broker_->events());
  sub.subscribe("order.");
  sub.sync(publisher, "_ensemble.sync.dup");

  publish(publisher, "order.created", "order-1", "first");
  auto original = expect_ack(publisher, "order-1");
  EXPECT_EQ(original.hdr.stream_seq, 1u);
  publish(publisher, "order.created", "order-1", "again");
  auto dup = expect_ack(publisher, "order-1");
  EXPECT_EQ(dup.hdr.stream_seq, 1u);
  EXPECT_TRUE(dup.hdr.duplicate);
  EXPECT_EQ(dup.hdr.seq, 0u);
  // The same id twice in one batch: the second one is the duplicate.
  publish(publisher, "order.created", "order-2", "a");
  publish(publisher, "order.created", "order-2", "b");
  auto a2 = expect_ack(publisher, "order-2");
  auto b2 = expect_ack(publisher, "order-2");
  EXPECT_EQ(a2.hdr.stream_seq, 2u);
  EXPECT_FALSE(a2.hdr.duplicate);
  EXPECT_EQ(b2.hdr.stream_seq, 2u);
  EXPECT_TRUE(b2.hdr.duplicate);
  publish(publisher, "order.created", "order-3", "c");
  expect_ack(publisher, "order-3");

  // The subscriber sees order-1, order-2, order-3 once each: the last one is the marker that
  // nothing else is on its way before it.
  std::vector<std::string> got;
  while (got.empty() || got.back() != "order-3") {
    auto e = sub.next(k_wait);
    ASSERT_TRUE(e.has_value()) << "events so far: " << got.size();
    got.push_back(e->hdr.id);
  }
  EXPECT_EQ(got, (std::vector<std::string>{"order-1", "order-2", "order-3"}));
  auto records = read_all("orders");
  ASSERT_EQ(records.size(), 3u);
  const auto& payload = records[0]["payload"].get_binary();
  EXPECT_EQ(std::string(payload.begin(), payload.end()), "first");
  EXPECT_EQ(admin("stats")["streams"]["orders"]["duplicates"], 2);
}

// ---- configuration ------------------------------------------------------------------------

TEST_F(broker_streams_test, a_bad_streams_file_stops_the_broker_naming_file_and_path) {
  const auto file = write_streams_file(
      "streams:\n"
      "  - name: orders\n"
      "    topics: [order.]\n"
      "  - name: late\n"
      "    topics: [order.late.]\n");
  auto p = tk::process::spawn({tk::binary_path("ensemble-broker"),
                               {"--router", "tcp://127.0.0.1:*", "--events", "tcp://127.0.0.1:*",
                                "--data", data_dir(), "--streams", file},
                               {},
                               {},
                               "broker"});
  auto code = p->wait_exit(k_wait);
  ASSERT_TRUE(code.has_value());
  EXPECT_EQ(*code, 2);
  EXPECT_NE(p->tail().find(file + ": streams[1].topics"), std::string::npos) << p->tail();
  EXPECT_NE(p->tail().find("overlaps stream orders"), std::string::npos) << p->tail();

  const auto bad_age =
      write_streams_file("streams:\n  - name: x\n    topics: [a.]\n    max_age: soon\n");
  auto q = tk::process::spawn({tk::binary_path("ensemble-broker"),
                               {"--router", "tcp://127.0.0.1:*", "--events", "tcp://127.0.0.1:*",
                                "--data", data_dir(), "--streams", bad_age},
                               {},
                               {},
                               "broker"});
  code = q->wait_exit(k_wait);
  ASSERT_TRUE(code.has_value());
  EXPECT_EQ(*code, 2);
  EXPECT_NE(q->tail().find("streams[0].max_age"), std::string::npos) << q->tail();

  auto r = tk::process::spawn(
      {tk::binary_path("ensemble-broker"),
       {"--router", "tcp://127.0.0.1:*", "--events", "tcp://127.0.0.1:*", "--streams", file},
       {},
       {},
       "broker"});
  code = r->wait_exit(k_wait);
  ASSERT_TRUE(code.has_value());
  EXPECT_EQ(*code, 2);
  EXPECT_NE(r->tail().find("needs --data"), std::string::npos) << r->tail();
}

TEST_F(broker_streams_test, without_data_streams_cannot_be_created_and_publishing_is_unchanged) {
  start({});
  auto list = admin("streams");
  EXPECT_EQ(list["enabled"], false);
  auto refused = admin_error("stream_add", {{"name", "orders"}, {"topics", {"order."}}});
  EXPECT_EQ(refused.error_code, "streams_disabled");
  EXPECT_NE(refused.error_message.find("--data"), std::string::npos) << refused.error_message;
  raw_peer publisher(ctx_, broker_->router());
  publish(publisher, "order.created", "e-1", "x");
  auto ack = expect_ack(publisher, "e-1");
  EXPECT_TRUE(ack.hdr.stream.empty());
  EXPECT_EQ(ack.hdr.seq, 1u);
}

// ---- admin --------------------------------------------------------------------------------

TEST_F(broker_streams_test, stream_admin_round_trip) {
  start({"--data", data_dir()});
  EXPECT_TRUE(admin("streams")["streams"].empty());
  auto added = admin("stream_add", {{"name", "audit"},
                                    {"topics", {"audit.", "login."}},
                                    {"max_age_ms", 3'600'000},
                                    {"max_bytes", 1 << 20},
                                    {"max_events", 1000}});
  EXPECT_EQ(added["name"], "audit");
  EXPECT_EQ(added["topics"], json({"audit.", "login."}));
  EXPECT_EQ(added["max_age_ms"], 3'600'000);
  EXPECT_EQ(added["max_events"], 1000);
  EXPECT_EQ(added["last_seq"], 0);

  raw_peer publisher(ctx_, broker_->router());
  for (int i = 1; i <= 5; ++i) {
    const auto id = next_id();
    publish(publisher, "login.ok", id, "user-" + std::to_string(i));
    EXPECT_EQ(expect_ack(publisher, id).hdr.stream_seq, static_cast<std::uint64_t>(i));
  }
  auto list = admin("streams");
  ASSERT_EQ(list["streams"].size(), 1u);
  EXPECT_EQ(list["streams"][0]["name"], "audit");
  EXPECT_EQ(list["streams"][0]["count"], 5);

  auto page = admin("stream_read", {{"name", "audit"}, {"from_seq", 2}, {"limit", 2}});
  ASSERT_EQ(page["records"].size(), 2u);
  EXPECT_EQ(page["records"][0]["stream_seq"], 2);
  EXPECT_EQ(page["records"][1]["stream_seq"], 3);
  EXPECT_EQ(page["records"][0]["topic"], "login.ok");
  EXPECT_EQ(page["records"][0]["header"]["stream_seq"], 2);
  EXPECT_EQ(page["next_seq"], 4);
  EXPECT_EQ(page["first_seq"], 1);
  EXPECT_EQ(page["last_seq"], 5);
  // since_ms: from the first record stored at or after that time (all of them, from 0).
  auto since = admin("stream_read", {{"name", "audit"}, {"since_ms", 0}});
  EXPECT_EQ(since["records"].size(), 5u);
  const auto last_ts = since["records"][4]["ts_ms"].get<std::uint64_t>();
  auto later = admin("stream_read", {{"name", "audit"}, {"since_ms", last_ts + 1}});
  EXPECT_TRUE(later["records"].empty());
  EXPECT_EQ(later["next_seq"], 6);

  EXPECT_EQ(admin("stream_rm", {{"name", "audit"}})["removed"], true);
  EXPECT_EQ(admin_error("stream_info", {{"name", "audit"}}).error_code, "not_found");
  EXPECT_TRUE(admin("streams")["streams"].empty());
  // Its topics are plain events again.
  publish(publisher, "login.ok", "after-rm", "x");
  EXPECT_TRUE(expect_ack(publisher, "after-rm").hdr.stream.empty());
}

TEST_F(broker_streams_test, stream_admin_refuses_bad_input_naming_the_field) {
  start_with_orders();
  struct bad_case {
    std::string action;
    json args;
    std::string code;
    std::string says;
  };
  const std::vector<bad_case> cases{
      {"stream_add", {{"topics", {"x."}}}, "bad_request", "needs 'name'"},
      {"stream_add", {{"name", "bad.name"}, {"topics", {"x."}}}, "bad_request", "[A-Za-z0-9_-]"},
      {"stream_add", {{"name", "x"}}, "bad_request", "needs 'topics'"},
      {"stream_add", {{"name", "x"}, {"topics", "x."}}, "bad_request", "needs 'topics'"},
      {"stream_add", {{"name", "x"}, {"topics", {7}}}, "bad_request", "topics[0] must be a str"},
      {"stream_add", {{"name", "x"}, {"topics", {"a b"}}}, "bad_request", "topics[0]"},
      {"stream_add", {{"name", "x"}, {"topics", {"_ensemble."}}}, "bad_request", "control"},
      {"stream_add",
       {{"name", "x"}, {"topics", {"x."}}, {"max_bytes", -1}},
       "bad_request",
       "'max_bytes' must be"},
      {"stream_add",
       {{"name", "x"}, {"topics", {"x."}}, {"max_bytes", "\xff\xfe"}},
       "bad_request",
       "'max_bytes' must be"},
      {"stream_add",
       {{"name", "x"}, {"topics", {"x.", std::string("\xff", 1)}}},
       "bad_request",
       "topics[1]"},
      {"stream_add",
       {{"name", "x"}, {"topics", {"x."}}, {"maxbytes", 1}},
       "bad_request",
       "unknown field 'maxbytes'"},
      {"stream_add",
       {{"name", "x"}, {"topics", {"order.paid."}}},
       "bad_request",
       "overlaps stream orders"},
      {"stream_add", {{"name", "orders"}, {"topics", {"y."}}}, "already_exists", "orders"},
      {"stream_info", {{"name", "nope"}}, "not_found", "nope"},
      {"stream_info", json::array({1}), "bad_request", "must be a map"},
      {"stream_rm", {{"name", "nope"}}, "not_found", "nope"},
      {"stream_read", {{"name", "nope"}}, "not_found", "nope"},
      {"stream_read",
       {{"name", "orders"}, {"from_seq", 1}, {"since_ms", 1}},
       "bad_request",
       "not both"},
      {"stream_read", {{"name", "orders"}, {"limit", 0}}, "bad_request", "'limit' must be"},
      {"stream_read", {{"name", "orders"}, {"from_seq", "1"}}, "bad_request", "'from_seq'"},
      {"stream_nope", json::object(), "unknown_action", "stream_nope"},
  };
  for (const auto& c : cases) {
    auto h = admin_error(c.action, c.args);
    EXPECT_EQ(h.error_code, c.code)
        << c.action << " " << c.args.dump(-1, ' ', false, json::error_handler_t::replace) << ": "
        << h.error_message;
    EXPECT_NE(h.error_message.find(c.says), std::string::npos)
        << c.action << " " << c.args.dump(-1, ' ', false, json::error_handler_t::replace) << ": '"
        << h.error_message << "' should say '" << c.says << "'";
  }
  // Nothing of that changed the streams.
  auto list = admin("streams");
  ASSERT_EQ(list["streams"].size(), 1u);
  EXPECT_EQ(list["streams"][0]["name"], "orders");
}

// ---- storage errors -----------------------------------------------------------------------

TEST_F(broker_streams_test, a_full_disk_answers_storage_full_per_publish_and_fans_nothing_out) {
  fs::create_directories(data_dir());
  if (::mount("tmpfs", data_dir().c_str(), "tmpfs", 0, "size=1m") != 0) {
    GTEST_SKIP() << "cannot mount a small tmpfs at " << data_dir() << " (" << std::strerror(errno)
                 << "): storage_full is covered by stream_store_test's failing writer only";
  }
  mounted_ = true;
  // Most of the space taken by another file, given back later.
  const auto filler = data_dir() + "/filler";
  {
    std::ofstream f(filler, std::ios::binary);
    const std::string block(64 * 1024, 'f');
    for (int i = 0; i < 12; ++i) f << block;
  }
  start_with_orders();
  raw_peer publisher(ctx_, broker_->router());
  event_sub sub(ctx_, broker_->events());
  sub.subscribe("order.");
  sub.sync(publisher, "_ensemble.sync.full");

  const std::string payload(32 * 1024, 'p');
  std::uint64_t stored = 0;
  std::optional<header> refusal;
  std::string refused_id;
  for (int i = 0; i < 64 && !refusal; ++i) {
    refused_id = next_id();
    publish(publisher, "order.created", refused_id, payload);
    auto m = publisher.next(k_wait);
    ASSERT_TRUE(m.has_value()) << "no answer to " << refused_id;
    if (m->cmd == command::publish_ack) {
      EXPECT_EQ(m->hdr.stream_seq, ++stored);
    } else {
      ASSERT_EQ(m->cmd, command::error);
      refusal = m->hdr;
    }
  }
  ASSERT_TRUE(refusal.has_value()) << "the disk never filled up";
  EXPECT_EQ(refusal->error_code, "storage_full") << refusal->error_message;
  EXPECT_TRUE(refusal->retryable);
  EXPECT_EQ(refusal->id, refused_id);
  ASSERT_GT(stored, 0u);

  // The subscriber got the stored events and not the refused one.
  for (std::uint64_t i = 1; i <= stored; ++i) {
    auto e = sub.next(k_wait);
    ASSERT_TRUE(e.has_value());
    EXPECT_EQ(e->hdr.stream_seq, i);
  }
  EXPECT_FALSE(sub.next(0ms).has_value());
  auto stats = admin("stats");
  EXPECT_EQ(stats["streams"]["orders"]["storage_errors"], 1);
  EXPECT_EQ(stats["streams"]["orders"]["errors_by_code"]["storage_full"], 1);

  // Space comes back: the retry is stored with the next sequence (the refused one was never
  // handed out), and fanned out.
  fs::remove(filler);
  publish(publisher, "order.created", refused_id, "small");
  auto ack = expect_ack(publisher, refused_id);
  EXPECT_EQ(ack.hdr.stream_seq, stored + 1);
  EXPECT_FALSE(ack.hdr.duplicate);
  auto e = sub.next(k_wait);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->hdr.id, refused_id);
  EXPECT_EQ(read_all("orders").size(), stored + 1);
}

TEST_F(broker_streams_test, sync_always_acks_after_the_batch_is_synced) {
  start_with_orders({"--sync", "always"});
  raw_peer publisher(ctx_, broker_->router());
  for (int i = 0; i < 50; ++i) publish(publisher, "order.created", "s-" + std::to_string(i), "x");
  for (int i = 0; i < 50; ++i) {
    auto a = publisher.expect(command::publish_ack, k_wait);
    EXPECT_EQ(a.hdr.stream, "orders");
  }
  broker_->restart();
  client_ = std::make_unique<raw_peer>(ctx_, broker_->router());
  EXPECT_EQ(read_all("orders").size(), 50u);
}

}  // namespace
