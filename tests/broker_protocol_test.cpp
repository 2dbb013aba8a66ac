// The broker's wire behaviour, checked against docs/protocol.md with raw sockets: a real
// ensemble-broker process, DEALERs and a SUB that speak the protocol by hand (no SDK), so that
// what is tested is what another-language implementation would see.
#include <gtest/gtest.h>

#include <csignal>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "ensemble/common/frames.hpp"
#include "ensemble/common/protocol.hpp"
#include "ensemble/testkit/process.hpp"
#include "support/event_sub.hpp"
#include "support/raw_peer.hpp"

namespace ec = ensemble::common;
namespace tk = ensemble::testkit;
using ec::command;
using ec::header;
using ensemble::test::event_sub;
using ensemble::test::raw_peer;
using ensemble::test::to_string;
using ensemble::test::wire_message;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

constexpr auto k_wait = 5s;  // generous: only reached when something is broken

::testing::AssertionResult contains(const std::string& haystack, std::string_view needle) {
  if (haystack.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << haystack << "' does not contain '" << needle << "'";
}

// A registered worker offering one service.
class raw_worker : public raw_peer {
 public:
  raw_worker(zmq::context_t& ctx, const std::string& endpoint, std::string agent,
             const std::string& service, std::uint32_t capacity = 1)
      : raw_peer(ctx, endpoint), agent_(std::move(agent)) {
    header hello;
    hello.agent = agent_;
    hello.services = {{service, capacity}};
    send(command::hello, hello);
    welcome_ = expect(command::welcome);
  }
  const wire_message& welcome() const { return welcome_; }

  // Takes the next DISPATCH and answers it with its payload, echoing the token.
  wire_message serve_one() {
    auto d = expect(command::dispatch);
    header h;
    h.id = d.hdr.id;
    h.token = d.hdr.token;
    send(command::reply, h, d.payload);
    return d;
  }

 private:
  std::string agent_;
  wire_message welcome_;
};

class broker_protocol_test : public ::testing::Test {
 protected:
  void start(std::vector<std::string> args = {}) {
    broker_ = tk::broker_process::start(std::move(args));
    client_ = std::make_unique<raw_peer>(ctx_, broker_->router());
  }
  void TearDown() override {
    if (HasFailure() && broker_) std::cerr << "broker output:\n" << broker_->proc().tail() << "\n";
  }

  std::string next_id() { return "c-" + std::to_string(++ids_); }

  header request(const std::string& service, const std::string& action,
                 std::uint64_t deadline_ms = 5000) {
    header h;
    h.id = next_id();
    h.service = service;
    h.action = action;
    h.deadline_ms = deadline_ms;
    return h;
  }

  // Sends a REQUEST from the client and waits for the REPLY to it.
  wire_message call(const header& h, std::string_view payload = {}) {
    client_->send(command::request, h, payload);
    auto r = client_->expect(command::reply);
    EXPECT_EQ(r.hdr.id, h.id);
    return r;
  }

  json admin(const std::string& action) {
    auto r = call(request("broker", action));
    EXPECT_FALSE(r.hdr.is_error()) << r.hdr.error_code << ": " << r.hdr.error_message;
    EXPECT_EQ(r.hdr.worker, "broker");
    if (r.hdr.is_error()) return {};
    return json::from_msgpack(r.payload);
  }

  zmq::context_t ctx_{1};
  std::unique_ptr<tk::broker_process> broker_;
  std::unique_ptr<raw_peer> client_;
  int ids_ = 0;
};

// ---- registration --------------------------------------------------------------------------

TEST_F(broker_protocol_test, hello_is_answered_with_welcome) {
  start({"--heartbeat", "250"});
  raw_worker w(ctx_, broker_->router(), "w1", "Echo", 3);
  const header& welcome = w.welcome().hdr;
  EXPECT_EQ(welcome.heartbeat_ms, 250u);
  EXPECT_EQ(welcome.max_message_size, 1024u * 1024u);
  EXPECT_FALSE(welcome.broker.empty());
  EXPECT_FALSE(welcome.is_error());

  // The broker id is the one its own service reports.
  EXPECT_EQ(admin("ping")["broker"], welcome.broker);

  // A second HELLO on the same connection is welcomed again, by the same broker run.
  header again;
  again.agent = "w1";
  again.services = {{"Other", 1}};
  w.send(command::hello, again);
  EXPECT_EQ(w.expect(command::welcome).hdr.broker, welcome.broker);

  // Registered peers get heartbeats.
  EXPECT_EQ(w.expect(command::heartbeat).hdr.extra_count, 0u);

  // Both services are listed under the one agent, with the declared capacities.
  const json services = admin("services")["services"];
  std::map<std::string, json> by_name;
  for (const auto& s : services) by_name[s["service"]] = s;
  ASSERT_EQ(by_name.count("Echo"), 1u) << services.dump();
  ASSERT_EQ(by_name.count("Other"), 1u) << services.dump();
  EXPECT_EQ(by_name["Echo"]["capacity"], 3);
  EXPECT_EQ(by_name["Echo"]["workers"][0]["agent"], "w1");
  EXPECT_EQ(by_name["Other"]["workers"][0]["agent"], "w1");
  EXPECT_EQ(admin("stats")["workers"], 1);
}

TEST_F(broker_protocol_test, heartbeat_or_reply_from_an_unregistered_peer_is_not_registered) {
  start();
  client_->send(command::heartbeat, header{});
  auto e = client_->expect(command::error);
  EXPECT_EQ(e.hdr.error_code, "not_registered");
  EXPECT_TRUE(contains(e.hdr.error_message, "HELLO"));

  header reply;
  reply.id = "r-1";
  reply.token = 1;
  client_->send(command::reply, reply);
  e = client_->expect(command::error);
  EXPECT_EQ(e.hdr.error_code, "not_registered");
  EXPECT_EQ(e.hdr.id, "r-1");

  // After HELLO the same connection is known.
  header hello;
  hello.agent = "late";
  client_->send(command::hello, hello);
  client_->expect(command::welcome);
  client_->send(command::heartbeat, header{});
  EXPECT_EQ(admin("stats")["errors_by_code"]["not_registered"], 2);
}

// ---- request / reply -----------------------------------------------------------------------

TEST_F(broker_protocol_test, request_is_dispatched_and_the_reply_forwarded) {
  start();
  raw_worker w(ctx_, broker_->router(), "w1", "Echo");

  header h = request("Echo", "say");
  h.correlation_id = "wf-42";
  h.causation_id = "c-0";
  h.trace_id = "t-9";
  h.attempt = 2;
  h.idempotency_key = "wf-42/say/2";
  h.retryable = true;
  // An unknown key, as a newer peer might send: passed on unchanged.
  const std::string custom_pair = std::string("\xa8x_custom\xa5value", 15);
  h.extra = custom_pair;
  h.extra_count = 1;
  client_->send(command::request, h, "hello");

  auto d = w.expect(command::dispatch);
  EXPECT_EQ(d.hdr.id, h.id);
  EXPECT_EQ(d.hdr.service, "Echo");
  EXPECT_EQ(d.hdr.action, "say");
  EXPECT_EQ(d.hdr.correlation_id, "wf-42");
  EXPECT_EQ(d.hdr.causation_id, "c-0");
  EXPECT_EQ(d.hdr.trace_id, "t-9");
  EXPECT_EQ(d.hdr.attempt, 2u);
  EXPECT_EQ(d.hdr.idempotency_key, "wf-42/say/2");
  EXPECT_TRUE(d.hdr.retryable);
  EXPECT_NE(d.hdr.token, 0u);
  EXPECT_GT(d.hdr.deadline_ms, 0u);
  EXPECT_LE(d.hdr.deadline_ms, 5000u);
  EXPECT_EQ(d.hdr.extra, custom_pair);
  EXPECT_EQ(d.hdr.extra_count, 1u);
  EXPECT_EQ(d.payload, "hello");

  // The worker echoes the token but not the id: the broker puts the client's id back and
  // fills in the worker's name.
  header reply;
  reply.token = d.hdr.token;
  reply.correlation_id = "wf-42";
  w.send(command::reply, reply, "world");
  auto r = client_->expect(command::reply);
  EXPECT_EQ(r.hdr.id, h.id);
  EXPECT_EQ(r.hdr.worker, "w1");
  EXPECT_EQ(r.hdr.token, 0u);
  EXPECT_EQ(r.hdr.correlation_id, "wf-42");
  EXPECT_FALSE(r.hdr.is_error());
  EXPECT_EQ(r.payload, "world");
}

TEST_F(broker_protocol_test, worker_error_reply_is_forwarded_as_sent) {
  start();
  raw_worker w(ctx_, broker_->router(), "payments", "PaymentService");
  const header h = request("PaymentService", "charge");
  client_->send(command::request, h);
  auto d = w.expect(command::dispatch);

  header reply;
  reply.id = "whatever-the-worker-says";
  reply.token = d.hdr.token;
  reply.worker = "payments-7";
  reply.error_code = "card_declined";
  reply.error_message = "insufficient funds";
  reply.retryable = true;
  w.send(command::reply, reply);
  auto r = client_->expect(command::reply);
  EXPECT_EQ(r.hdr.id, h.id);
  EXPECT_EQ(r.hdr.worker, "payments-7");
  EXPECT_EQ(r.hdr.error_code, "card_declined");
  EXPECT_EQ(r.hdr.error_message, "insufficient funds");
  EXPECT_TRUE(r.hdr.retryable);

  const json stats = admin("stats");
  EXPECT_EQ(stats["services"]["PaymentService"]["errors_by_code"]["card_declined"], 1);
  EXPECT_EQ(stats["services"]["PaymentService"]["replies"], 1);
}

TEST_F(broker_protocol_test, deadline_is_clamped_to_the_maximum) {
  start();
  raw_worker w(ctx_, broker_->router(), "w1", "Echo");
  client_->send(command::request, request("Echo", "x", 10ULL * 3600 * 1000));
  auto d = w.expect(command::dispatch);
  EXPECT_GT(d.hdr.deadline_ms, 0u);
  EXPECT_LE(d.hdr.deadline_ms, 3'600'000u);
}

TEST_F(broker_protocol_test, requests_spread_over_workers_and_every_one_is_answered) {
  start();
  raw_worker w1(ctx_, broker_->router(), "w1", "Echo");
  raw_worker w2(ctx_, broker_->router(), "w2", "Echo");
  // Two requests, both workers idle: one each (least recently used first).
  const header a = request("Echo", "x");
  const header b = request("Echo", "x");
  client_->send(command::request, a, "a");
  client_->send(command::request, b, "b");
  auto da = w1.serve_one();
  auto db = w2.serve_one();
  EXPECT_EQ(da.hdr.id, a.id);
  EXPECT_EQ(db.hdr.id, b.id);
  std::map<std::string, wire_message> replies;
  for (int i = 0; i < 2; ++i) {
    auto r = client_->expect(command::reply);
    replies[r.hdr.id] = r;
  }
  EXPECT_EQ(replies[a.id].hdr.worker, "w1");
  EXPECT_EQ(replies[a.id].payload, "a");
  EXPECT_EQ(replies[b.id].hdr.worker, "w2");
  EXPECT_EQ(replies[b.id].payload, "b");
}

TEST_F(broker_protocol_test, unknown_service_is_answered_no_such_service_at_the_deadline) {
  start();
  const header h = request("Nope", "x", 200);
  client_->send(command::request, h);
  auto r = client_->expect(command::reply);
  EXPECT_EQ(r.hdr.id, h.id);
  EXPECT_EQ(r.hdr.error_code, "no_such_service");
  EXPECT_TRUE(r.hdr.retryable);
  EXPECT_TRUE(contains(r.hdr.error_message, "'Nope'"));
  // The broker's own answers say so (docs/protocol.md section 3, `worker`).
  EXPECT_EQ(r.hdr.worker, "broker");
}

TEST_F(broker_protocol_test, a_worker_registering_before_the_deadline_gets_the_waiting_request) {
  start();
  const header h = request("Late", "x", 10'000);
  client_->send(command::request, h, "p");
  // The ping is answered after the broker has read (and queued) the request before it.
  admin("ping");
  raw_worker w(ctx_, broker_->router(), "late-worker", "Late");
  auto d = w.serve_one();
  EXPECT_EQ(d.hdr.id, h.id);
  auto r = client_->expect(command::reply);
  EXPECT_EQ(r.hdr.id, h.id);
  EXPECT_EQ(r.hdr.worker, "late-worker");
  EXPECT_EQ(r.payload, "p");
}

// ---- worker loss (docs/protocol.md section 5) ------------------------------------------------

TEST_F(broker_protocol_test, silent_worker_is_lost_and_its_retryable_request_redispatched) {
  start({"--heartbeat", "50", "--liveness", "2"});
  raw_worker silent(ctx_, broker_->router(), "silent", "Echo");
  header r1 = request("Echo", "x", 10'000);
  r1.retryable = true;
  r1.idempotency_key = "k-1";
  r1.attempt = 1;
  client_->send(command::request, r1, "p1");
  const auto first = silent.expect(command::dispatch);
  EXPECT_EQ(first.hdr.id, r1.id);

  // A second worker registers after the first took the request; from now on `silent` reads
  // nothing and answers no heartbeat.
  raw_worker other(ctx_, broker_->router(), "other", "Echo");
  const auto again = other.expect(command::dispatch);  // answers heartbeats while it waits
  EXPECT_EQ(again.hdr.id, r1.id);
  EXPECT_EQ(again.hdr.idempotency_key, "k-1");
  EXPECT_EQ(again.hdr.attempt, 1u);
  EXPECT_EQ(again.payload, "p1");
  header reply;
  reply.token = again.hdr.token;
  other.send(command::reply, reply, "done");
  auto r = client_->expect(command::reply);
  EXPECT_EQ(r.hdr.id, r1.id);
  EXPECT_FALSE(r.hdr.is_error()) << r.hdr.error_code << ": " << r.hdr.error_message;
  EXPECT_EQ(r.hdr.worker, "other");
  EXPECT_EQ(r.payload, "done");

  // A non-retryable request on a worker that goes silent: worker_lost.
  header r2 = request("Echo", "y", 10'000);
  client_->send(command::request, r2);
  const auto d2 = other.expect(command::dispatch);
  EXPECT_EQ(d2.hdr.id, r2.id);
  auto lost = client_->expect(command::reply);  // `other` is silent from here on
  EXPECT_EQ(lost.hdr.id, r2.id);
  EXPECT_EQ(lost.hdr.error_code, "worker_lost");
  EXPECT_TRUE(lost.hdr.retryable);
  EXPECT_TRUE(contains(lost.hdr.error_message, "'other'"));

  const json stats = admin("stats");
  EXPECT_EQ(stats["workers_lost"], 2);
  EXPECT_EQ(stats["redispatched"], 1);
  EXPECT_EQ(stats["workers"], 0);

  // The original worker's answer, were it to come now, is not forwarded a second time.
  header late;
  late.token = first.hdr.token;
  silent.send(command::reply, late);
  auto e = silent.expect(command::error);
  EXPECT_EQ(e.hdr.error_code, "not_registered");
}

TEST_F(broker_protocol_test, bye_with_a_request_in_flight_answers_worker_lost_at_once) {
  start();
  raw_worker w(ctx_, broker_->router(), "leaving", "Echo");
  const header h = request("Echo", "x", 60'000);
  client_->send(command::request, h);
  w.expect(command::dispatch);
  w.send(command::bye, header{});
  auto r = client_->expect(command::reply);
  EXPECT_EQ(r.hdr.id, h.id);
  EXPECT_EQ(r.hdr.error_code, "worker_lost");
  EXPECT_EQ(r.hdr.worker, "broker");
  EXPECT_EQ(admin("stats")["workers"], 0);
  // It is the worker that goes: its service stays listed, with no workers and capacity 0.
  const json services = admin("services")["services"];
  ASSERT_EQ(services.size(), 1u) << services.dump();
  EXPECT_EQ(services[0]["service"], "Echo");
  EXPECT_EQ(services[0]["capacity"], 0);
  EXPECT_TRUE(services[0]["workers"].empty());
  // Its services are gone: a new request waits for another worker until its deadline, and
  // since nobody offered the service meanwhile it is answered no_such_service
  // (docs/protocol.md, sections 4 and 6).
  auto none = call(request("Echo", "x", 100));
  EXPECT_EQ(none.hdr.error_code, "no_such_service") << none.hdr.error_message;
}

// ---- the broker's own service --------------------------------------------------------------

TEST_F(broker_protocol_test, broker_service_ping_services_stats) {
  start();
  raw_worker w(ctx_, broker_->router(), "w1", "Echo", 2);
  client_->send(command::request, request("Echo", "x"));
  w.serve_one();
  client_->expect(command::reply);

  const json ping = admin("ping");
  EXPECT_TRUE(ping["broker"].is_string());
  EXPECT_EQ(ping["protocol"], 1);
  EXPECT_TRUE(ping["uptime_ms"].is_number_integer());

  const json services = admin("services");
  ASSERT_TRUE(services["services"].is_array()) << services.dump();
  const json* echo = nullptr;
  for (const auto& s : services["services"]) {
    if (s["service"] == "Echo") echo = &s;
  }
  ASSERT_NE(echo, nullptr) << services.dump();
  EXPECT_EQ((*echo)["capacity"], 2);
  EXPECT_EQ((*echo)["in_flight"], 0);
  EXPECT_EQ((*echo)["queued"], 0);
  EXPECT_EQ((*echo)["requests"], 1);
  EXPECT_EQ((*echo)["replies"], 1);
  EXPECT_EQ((*echo)["errors"], 0);
  ASSERT_EQ((*echo)["workers"].size(), 1u);
  EXPECT_EQ((*echo)["workers"][0]["agent"], "w1");
  EXPECT_EQ((*echo)["workers"][0]["capacity"], 2);
  EXPECT_EQ((*echo)["workers"][0]["in_flight"], 0);
  EXPECT_EQ((*echo)["workers"][0]["dispatched"], 1);

  const json stats = admin("stats");
  for (const char* key :
       {"broker",          "uptime_ms",     "messages_in",  "messages_out",  "bytes_in",
        "requests",        "replies",       "events",       "malformed",     "late_replies",
        "unknown_replies", "undeliverable", "workers_lost", "redispatched",  "errors_by_code",
        "workers",         "pending",       "queued",       "subscriptions", "services"}) {
    EXPECT_TRUE(stats.contains(key)) << key << " missing from " << stats.dump();
  }
  EXPECT_EQ(stats["broker"], ping["broker"]);
  EXPECT_EQ(stats["workers"], 1);
  EXPECT_EQ(stats["replies"], 1);
  EXPECT_EQ(stats["malformed"], 0);
  EXPECT_EQ(stats["pending"], 0);
  EXPECT_EQ(stats["services"]["Echo"]["requests"], 1);

  auto r = call(request("broker", "reboot"));
  EXPECT_EQ(r.hdr.error_code, "unknown_action");
  EXPECT_FALSE(r.hdr.retryable);
  EXPECT_TRUE(contains(r.hdr.error_message, "'reboot'"));
  EXPECT_EQ(r.hdr.worker, "broker");
}

// ---- the broker's log (docs/protocol.md, "Registration") -----------------------------------

// The connection id the broker logged for `agent`'s registration, from a line such as
// "registered w1 (connection 006b8b4567) offering [Echo x1]"; empty if none.
std::vector<std::string> logged_connections(const tk::process& broker, const std::string& agent) {
  std::vector<std::string> out;
  const std::string marker = "registered " + agent + " (connection ";
  for (const auto& line : broker.lines()) {
    const auto at = line.find(marker);
    if (at == std::string::npos) continue;
    const auto from = at + marker.size();
    out.push_back(line.substr(from, line.find(')', from) - from));
  }
  return out;
}

// Peers that offer no service (each `ensemble` CLI call is one) register and leave at debug;
// workers at info. At the default level only the worker shows.
TEST_F(broker_protocol_test, clients_register_and_leave_at_debug_workers_at_info) {
  start();
  raw_peer cli(ctx_, broker_->router());
  header hello;
  hello.agent = "short-lived-cli";
  cli.send(command::hello, hello);
  cli.expect(command::welcome);
  cli.send(command::bye, header{});
  // Answered after the BYE before it on the same connection was handled.
  header ping = request("broker", "ping");
  cli.send(command::request, ping);
  EXPECT_EQ(cli.expect(command::reply).hdr.id, ping.id);

  raw_worker w(ctx_, broker_->router(), "long-lived-worker", "Echo");
  w.send(command::bye, header{});
  ASSERT_TRUE(broker_->proc().wait_for_line("long-lived-worker (connection", k_wait));
  ASSERT_TRUE(broker_->proc().wait_for_line("said goodbye", k_wait));
  for (const auto& line : broker_->proc().lines()) {
    EXPECT_EQ(line.find("short-lived-cli"), std::string::npos) << line;
  }
}

// An agent that restarts registers on a new connection while the broker still holds its
// previous one; when a DISPATCH to the previous one fails, the log must say that it is the
// previous connection that goes, and name both.
TEST_F(broker_protocol_test, unreachable_previous_connection_is_named_beside_the_new_one) {
  start({"--heartbeat", "60000"});  // the previous connection is not declared lost meanwhile
  auto before = std::make_unique<raw_worker>(ctx_, broker_->router(), "orch", "Orch", 1000);
  raw_worker after(ctx_, broker_->router(), "orch", "Orch", 1000);
  std::vector<std::string> connections;
  ASSERT_TRUE(tk::wait_until(
      [&] { return (connections = logged_connections(broker_->proc(), "orch")).size() == 2; },
      k_wait))
      << broker_->proc().tail();
  before.reset();  // the previous process is gone; its connection closes

  // Requests alternate over the two connections (least recently used first); once the
  // ROUTER has noticed that the first is closed, a DISPATCH to it fails.
  std::optional<std::string> line;
  const auto until = std::chrono::steady_clock::now() + k_wait;
  while (!line && std::chrono::steady_clock::now() < until) {
    client_->send(command::request, request("Orch", "x", 200));
    while (auto m = after.next(20ms)) {
      if (m->cmd != command::dispatch) continue;
      header reply;
      reply.id = m->hdr.id;
      reply.token = m->hdr.token;
      after.send(command::reply, reply);
    }
    line = broker_->proc().wait_for_line("is unreachable", 0ms);
  }
  ASSERT_TRUE(line.has_value()) << "no DISPATCH to the closed connection failed";
  EXPECT_TRUE(contains(*line, "previous connection " + connections[0])) << *line;
  EXPECT_TRUE(contains(*line, "registered again on connection " + connections[1])) << *line;
}

// ---- events --------------------------------------------------------------------------------

TEST_F(broker_protocol_test, publish_is_fanned_out_with_seq_ts_publisher_and_acked) {
  start();
  raw_peer publisher(ctx_, broker_->router());
  header hello;
  hello.agent = "orders";
  publisher.send(command::hello, hello);
  publisher.expect(command::welcome);

  event_sub sub(ctx_, broker_->events());
  sub.subscribe("order.");
  sub.sync(publisher, "_ensemble.sync.t1");

  header e;
  e.id = "e-7";
  e.topic = "order.created";
  e.correlation_id = "o-1";
  e.ack = true;
  e.seq = 99;              // overwritten by the broker
  e.publisher = "forged";  // likewise
  e.extra = std::string("\xa6x_note\xa1n", 9);
  e.extra_count = 1;
  publisher.send(command::publish, e, "payload-1");

  auto ack = publisher.expect(command::publish_ack);
  EXPECT_EQ(ack.hdr.id, "e-7");
  EXPECT_EQ(ack.hdr.topic, "order.created");
  EXPECT_EQ(ack.hdr.seq, 1u);

  auto got = sub.next(k_wait);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->topic, "order.created");
  EXPECT_EQ(got->hdr.id, "e-7");
  EXPECT_EQ(got->hdr.topic, "order.created");
  EXPECT_EQ(got->hdr.correlation_id, "o-1");
  EXPECT_EQ(got->hdr.seq, 1u);
  EXPECT_GT(got->hdr.ts, 0u);
  EXPECT_EQ(got->hdr.publisher, "orders");
  EXPECT_FALSE(got->hdr.ack);
  EXPECT_EQ(got->hdr.extra, e.extra);
  EXPECT_EQ(got->payload, "payload-1");

  // seq counts per topic; no ack unless asked for.
  header shipped;
  shipped.id = "e-8";
  shipped.topic = "order.shipped";
  publisher.send(command::publish, shipped);
  header created2 = e;
  created2.id = "e-9";
  publisher.send(command::publish, created2, "payload-2");
  auto ack2 = publisher.expect(command::publish_ack);
  EXPECT_EQ(ack2.hdr.id, "e-9");  // not e-8: it did not ask
  EXPECT_EQ(ack2.hdr.seq, 2u);

  got = sub.next(k_wait);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->hdr.id, "e-8");
  EXPECT_EQ(got->hdr.seq, 1u);
  got = sub.next(k_wait);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->hdr.id, "e-9");
  EXPECT_EQ(got->hdr.seq, 2u);

  // An anonymous publisher (no HELLO) has an empty publisher field.
  header anon;
  anon.id = "e-10";
  anon.topic = "order.cancelled";
  anon.ack = true;
  client_->send(command::publish, anon);
  EXPECT_EQ(client_->expect(command::publish_ack).hdr.seq, 1u);
  got = sub.next(k_wait);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->hdr.id, "e-10");
  EXPECT_TRUE(got->hdr.publisher.empty());

  const json stats = admin("stats");
  EXPECT_GE(stats["events"], 4);
  EXPECT_EQ(stats["subscriptions"]["order."], 1);
}

// ---- restart -------------------------------------------------------------------------------

TEST_F(broker_protocol_test, restarted_broker_forgets_peers_and_restarts_seq) {
  start();
  raw_worker w(ctx_, broker_->router(), "w1", "Echo");
  const std::string old_broker_id = w.welcome().hdr.broker;
  header e;
  e.id = "e-1";
  e.topic = "order.created";
  e.ack = true;
  for (int i = 0; i < 2; ++i) client_->send(command::publish, e);
  client_->expect(command::publish_ack);
  EXPECT_EQ(client_->expect(command::publish_ack).hdr.seq, 2u);

  const std::string router = broker_->router();
  const std::string events = broker_->events();
  const pid_t old_pid = broker_->proc().pid();
  broker_->restart();
  EXPECT_EQ(broker_->router(), router);
  EXPECT_EQ(broker_->events(), events);
  EXPECT_NE(broker_->proc().pid(), old_pid);

  // The DEALER reconnects by itself; what was written on the dead connection is lost, so
  // heartbeat until the new broker answers that it does not know this peer.
  bool told = false;
  const auto until = std::chrono::steady_clock::now() + k_wait;
  while (!told && std::chrono::steady_clock::now() < until) {
    w.send(command::heartbeat, header{});
    while (auto m = w.next(50ms)) {
      if (m->cmd == command::error && m->hdr.error_code == "not_registered") told = true;
    }
  }
  ASSERT_TRUE(told) << "no not_registered from the restarted broker";

  header hello;
  hello.agent = "w1";
  hello.services = {{"Echo", 1}};
  w.send(command::hello, hello);
  EXPECT_NE(w.expect(command::welcome).hdr.broker, old_broker_id);

  const header h = request("Echo", "after-restart");
  client_->send(command::request, h, "again");
  w.serve_one();
  auto r = client_->expect(command::reply);
  EXPECT_EQ(r.hdr.id, h.id);
  EXPECT_EQ(r.payload, "again");

  e.id = "e-2";
  client_->send(command::publish, e);
  EXPECT_EQ(client_->expect(command::publish_ack).hdr.seq, 1u);
}

// ---- limits and shutdown -------------------------------------------------------------------

TEST_F(broker_protocol_test, queue_full_when_the_service_queue_is_at_its_limit) {
  start({"--queue-per-service", "2"});
  raw_worker w(ctx_, broker_->router(), "slow", "Slow", 1);
  std::vector<header> sent;
  for (int i = 0; i < 4; ++i) {
    sent.push_back(request("Slow", "x", 500));
    client_->send(command::request, sent.back());
  }
  // The first is dispatched, two wait, the fourth is refused at once; the three others are
  // answered at their deadlines. Each exactly once.
  auto d = w.expect(command::dispatch);
  EXPECT_EQ(d.hdr.id, sent[0].id);
  std::map<std::string, wire_message> answers;
  for (int i = 0; i < 4; ++i) {
    auto r = client_->expect(command::reply);
    EXPECT_EQ(answers.count(r.hdr.id), 0u) << r.hdr.id << " answered twice";
    answers[r.hdr.id] = r;
  }
  ASSERT_EQ(answers.size(), 4u);
  const header& refused = answers[sent[3].id].hdr;
  EXPECT_EQ(refused.error_code, "queue_full");
  EXPECT_TRUE(refused.retryable);
  EXPECT_TRUE(contains(refused.error_message, "'Slow'"));
  EXPECT_EQ(answers[sent[0].id].hdr.error_code, "deadline_exceeded");
  EXPECT_TRUE(contains(answers[sent[0].id].hdr.error_message, "in flight"));
  EXPECT_EQ(answers[sent[1].id].hdr.error_code, "deadline_exceeded");
  EXPECT_TRUE(contains(answers[sent[1].id].hdr.error_message, "queued"));
  EXPECT_EQ(answers[sent[2].id].hdr.error_code, "deadline_exceeded");

  // The worker's answer now comes too late: dropped and counted, the client hears nothing.
  header late;
  late.id = d.hdr.id;
  late.token = d.hdr.token;
  w.send(command::reply, late);
  EXPECT_TRUE(tk::wait_until([&] { return admin("stats")["late_replies"] == 1; }, k_wait, 10ms));
  const json stats = admin("stats");
  EXPECT_EQ(stats["errors_by_code"]["queue_full"], 1);
  EXPECT_EQ(stats["errors_by_code"]["deadline_exceeded"], 3);
  EXPECT_EQ(stats["pending"], 0);
}

TEST_F(broker_protocol_test, sigterm_answers_queued_requests_shutting_down_and_exits_zero) {
  start({"--shutdown-grace", "200"});
  raw_worker w(ctx_, broker_->router(), "stuck", "Stuck", 1);
  std::vector<header> sent;
  for (int i = 0; i < 3; ++i) {
    sent.push_back(request("Stuck", "x", 60'000));
    client_->send(command::request, sent.back());
  }
  EXPECT_EQ(w.expect(command::dispatch).hdr.id, sent[0].id);
  // Once this is answered the broker has read the three requests before it.
  EXPECT_EQ(admin("stats")["queued"], 2);

  broker_->proc().signal(SIGTERM);
  std::vector<wire_message> answers;
  for (int i = 0; i < 3; ++i) answers.push_back(client_->expect(command::reply));
  for (const auto& r : answers) {
    EXPECT_EQ(r.hdr.error_code, "shutting_down") << r.hdr.id;
    EXPECT_TRUE(r.hdr.retryable);
  }
  // The queued ones are answered at once; the one in flight only when its grace is over.
  const std::set<std::string> first_two{answers[0].hdr.id, answers[1].hdr.id};
  EXPECT_EQ(first_two, (std::set<std::string>{sent[1].id, sent[2].id}));
  EXPECT_EQ(answers[2].hdr.id, sent[0].id);
  const auto code = broker_->proc().wait_exit(k_wait);
  ASSERT_TRUE(code.has_value()) << "broker did not exit";
  EXPECT_EQ(*code, 0);
}

}  // namespace
