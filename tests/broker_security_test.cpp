// The secured broker (docs/protocol.md section 12) against forgeries, with a real
// ensemble-broker process and raw CURVE sockets: each forgery is refused (`unauthorized`, or at
// the handshake) while the legitimate flow beside it keeps working. Also the plain mode's rules:
// loopback binds only unless --insecure, and `caller` stamped with the agent's name.
#include <gtest/gtest.h>
#include <zmq.h>

#include <csignal>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "ensemble/common/curve_keys.hpp"
#include "ensemble/common/frames.hpp"
#include "ensemble/common/protocol.hpp"
#include "ensemble/testkit/process.hpp"
#include "support/event_sub.hpp"
#include "support/raw_peer.hpp"
#include "support/temp_dir.hpp"

namespace ec = ensemble::common;
namespace tk = ensemble::testkit;
using ec::command;
using ec::header;
using ensemble::test::curve_client;
using ensemble::test::event_sub;
using ensemble::test::raw_peer;
using ensemble::test::temp_dir;
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

// Reports a socket's connection events (zmq_socket_monitor), to see a handshake refused or a
// connection closed by the broker.
class monitor {
 public:
  monitor(zmq::context_t& ctx, zmq::socket_t& socket, const std::string& name)
      : pair_(ctx, zmq::socket_type::pair) {
    const std::string endpoint = "inproc://monitor-" + name;
    EXPECT_EQ(zmq_socket_monitor(socket.handle(), endpoint.c_str(), ZMQ_EVENT_ALL), 0);
    pair_.set(zmq::sockopt::linger, 0);
    pair_.connect(endpoint);
  }
  // Waits for `event` (a ZMQ_EVENT_* bit); false at the deadline.
  bool wait_for(int event, std::chrono::milliseconds deadline = k_wait) {
    const auto until = std::chrono::steady_clock::now() + deadline;
    std::vector<zmq::message_t> frames;
    while (std::chrono::steady_clock::now() < until) {
      zmq::pollitem_t item{pair_.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, 20ms);
      while (ec::recv_frames(pair_, frames)) {
        if (frames.empty() || frames[0].size() < 2) continue;
        std::uint16_t got = 0;
        std::memcpy(&got, frames[0].data(), sizeof got);
        if ((got & event) != 0) return true;
      }
    }
    return false;
  }

 private:
  zmq::socket_t pair_;
};

// The next event that is not a subscription probe (sync() drains the probes it sees, but one
// may still be on its way).
std::optional<event_sub::event> next_event(event_sub& sub) {
  std::optional<event_sub::event> e;
  while ((e = sub.next(k_wait)) && e->topic.rfind("_ensemble.sync.", 0) == 0) {
  }
  return e;
}

struct key_pair {
  ec::curve_keys keys = ec::generate_curve_keys();
};

class broker_security_test : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(ec::curve_available());
    ec::write_curve_key_files(dir_.file("keys"), "broker", broker_key_.keys);
    write_auth(auth_text());
    // Raw peers answer heartbeats only while they wait for something: a long liveness keeps an
    // idle worker registered.
    broker_ = tk::broker_process::start({"--curve-key", dir_.file("keys/broker.key_secret"),
                                         "--auth", dir_.file("auth.yaml"), "--data",
                                         dir_.file("data"), "--liveness", "100"});
  }
  void TearDown() override {
    if (HasFailure() && broker_)
      std::cerr << "broker output:\n" << broker_->proc().tail(60) << "\n";
  }

  std::string auth_text(const std::string& orders_key = {}, bool payments_may_offer = true) const {
    return "identities:\n"
           "  payments:\n"
           "    keys: [\"" +
           payments_.keys.public_key + "\"]\n" +
           (payments_may_offer ? "    offer: [PaymentService]\n" : "    offer: [Other]\n") +
           "    publish: [payment.]\n"
           "  orders:\n"
           "    keys: [\"" +
           (orders_key.empty() ? orders_.keys.public_key : orders_key) +
           "\"]\n"
           "    call: [PaymentService.charge]\n"
           "    call_own: [PaymentService.history]\n"
           "    subscribe: [payment.]\n"
           "    consume: [orders]\n"
           "  rogue:\n"
           "    keys: [\"" +
           rogue_.keys.public_key +
           "\"]\n"
           "    offer: [RogueService]\n"
           "    publish: [rogue.]\n"
           "    subscribe: [rogue.]\n"
           "  ops:\n"
           "    keys: [\"" +
           ops_.keys.public_key +
           "\"]\n"
           "    call: [\"*\"]\n"
           "    admin: [\"*\"]\n"
           "    subscribe: [\"\"]\n";
  }
  void write_auth(const std::string& text) { dir_.write("auth.yaml", text); }

  curve_client as(const key_pair& k) const {
    return {broker_key_.keys.public_key, k.keys.public_key, k.keys.secret_key};
  }
  std::unique_ptr<raw_peer> peer(const key_pair& k) {
    return std::make_unique<raw_peer>(ctx_, broker_->router(), as(k));
  }
  std::unique_ptr<event_sub> sub(const key_pair& k) {
    return std::make_unique<event_sub>(ctx_, broker_->events(), as(k));
  }

  // HELLO offering `service`; the WELCOME (or the refusal).
  static wire_message hello(raw_peer& p, const std::string& agent, const std::string& service) {
    header h;
    h.agent = agent;
    if (!service.empty()) h.services = {{service, 4}};
    p.send(command::hello, h);
    auto m = p.next(k_wait);
    EXPECT_TRUE(m.has_value()) << "no answer to HELLO";
    return m ? *m : wire_message{};
  }

  static header request(const std::string& id, const std::string& service,
                        const std::string& action) {
    header h;
    h.id = id;
    h.service = service;
    h.action = action;
    h.deadline_ms = 5000;
    return h;
  }

  // A broker action's answer, by the ops identity (which holds admin: ["*"]).
  json admin(const std::string& action, const json& args = json::object()) {
    if (!ops_peer_) ops_peer_ = peer(ops_);
    const auto id = "admin-" + std::to_string(++admin_seq_);
    const auto bytes = json::to_msgpack(args);
    ops_peer_->send(command::request, request(id, "broker", action),
                    std::string(bytes.begin(), bytes.end()));
    auto r = ops_peer_->expect(command::reply);
    EXPECT_EQ(r.hdr.id, id);
    EXPECT_TRUE(r.hdr.error_code.empty()) << r.hdr.error_code << ": " << r.hdr.error_message;
    if (r.payload.empty()) return json::object();
    return json::from_msgpack(r.payload);
  }
  json auth_stats() { return admin("stats")["auth"]; }

  // Sends SIGHUP and waits until the broker counted the reload (or its failure).
  void reload(const std::string& counter = "reloads") {
    const auto before = auth_stats()[counter].get<std::uint64_t>();
    broker_->proc().signal(SIGHUP);
    ASSERT_TRUE(
        tk::wait_until([&] { return auth_stats()[counter].get<std::uint64_t>() > before; }, k_wait))
        << "the broker did not count the reload";
  }

  temp_dir dir_{"ensemble-security"};
  key_pair broker_key_, payments_, orders_, rogue_, ops_;
  zmq::context_t ctx_{1};
  std::unique_ptr<tk::broker_process> broker_;
  std::unique_ptr<raw_peer> ops_peer_;
  int admin_seq_ = 0;
};

TEST_F(broker_security_test, a_rogue_service_registration_is_refused_and_the_real_worker_gets_all) {
  auto worker = peer(payments_);
  ASSERT_EQ(hello(*worker, "payments", "PaymentService").cmd, command::welcome);
  auto rogue = peer(rogue_);
  const auto refused = hello(*rogue, "rogue", "PaymentService");
  EXPECT_EQ(refused.cmd, command::error);
  EXPECT_EQ(refused.hdr.error_code, "unauthorized");
  EXPECT_EQ(refused.hdr.error_message,
            "identity 'rogue' has no 'offer' right for service 'PaymentService'");
  // A HELLO that offers one allowed and one forbidden service registers nothing.
  header both;
  both.services = {{"RogueService", 1}, {"PaymentService", 1}};
  rogue->send(command::hello, both);
  EXPECT_EQ(rogue->expect(command::error).hdr.error_code, "unauthorized");

  auto client = peer(orders_);
  for (int i = 0; i < 20; ++i) {
    client->send(command::request, request("c-" + std::to_string(i), "PaymentService", "charge"));
    const auto d = worker->expect(command::dispatch);
    header r;
    r.id = d.hdr.id;
    r.token = d.hdr.token;
    worker->send(command::reply, r);
    const auto reply = client->expect(command::reply);
    EXPECT_EQ(reply.hdr.id, "c-" + std::to_string(i));
    EXPECT_EQ(reply.hdr.worker, "payments");
    EXPECT_TRUE(reply.hdr.error_code.empty()) << reply.hdr.error_message;
  }
  const auto services = admin("services")["services"];
  for (const auto& s : services) {
    if (s["service"] != "PaymentService") continue;
    ASSERT_EQ(s["workers"].size(), 1u) << s.dump();
    EXPECT_EQ(s["workers"][0]["agent"], "payments");
    EXPECT_EQ(s["workers"][0]["dispatched"], 20);
  }
  EXPECT_EQ(auth_stats()["refused"]["offer"], 2);
}

TEST_F(broker_security_test, nobody_registers_under_another_agent_name) {
  auto rogue = peer(rogue_);
  const auto refused = hello(*rogue, "payments", "");
  EXPECT_EQ(refused.cmd, command::error);
  EXPECT_EQ(refused.hdr.error_code, "unauthorized");
  EXPECT_TRUE(contains(refused.hdr.error_message, "identity 'rogue' has no 'name' right"));
  EXPECT_TRUE(contains(refused.hdr.error_message, "'payments'"));
  // Without a name, the identity's is used; a worker's REPLY is stamped with it whatever it
  // writes in `worker`.
  auto worker = peer(payments_);
  ASSERT_EQ(hello(*worker, "", "PaymentService").cmd, command::welcome);
  auto client = peer(orders_);
  client->send(command::request, request("c-1", "PaymentService", "charge"));
  const auto d = worker->expect(command::dispatch);
  header r;
  r.id = d.hdr.id;
  r.token = d.hdr.token;
  r.worker = "somebody-else";
  worker->send(command::reply, r);
  EXPECT_EQ(client->expect(command::reply).hdr.worker, "payments");
  EXPECT_EQ(auth_stats()["refused"]["name"], 1);
}

TEST_F(broker_security_test, caller_and_caller_scope_are_stamped_and_calls_checked) {
  auto worker = peer(payments_);
  ASSERT_EQ(hello(*worker, "payments", "PaymentService").cmd, command::welcome);
  auto client = peer(orders_);
  // A client that claims to be ops with full scope: the worker sees who it is.
  auto forged = request("c-1", "PaymentService", "charge");
  forged.caller = "ops";
  forged.caller_scope = "own";
  client->send(command::request, forged);
  auto d = worker->expect(command::dispatch);
  EXPECT_EQ(d.hdr.caller, "orders");
  EXPECT_EQ(d.hdr.caller_scope, "");
  header r;
  r.id = d.hdr.id;
  r.token = d.hdr.token;
  worker->send(command::reply, r);
  EXPECT_TRUE(client->expect(command::reply).hdr.error_code.empty());
  // Allowed by call_own only: the worker is told to act on what the caller owns.
  client->send(command::request, request("c-2", "PaymentService", "history"));
  d = worker->expect(command::dispatch);
  EXPECT_EQ(d.hdr.caller, "orders");
  EXPECT_EQ(d.hdr.caller_scope, "own");
  r.id = d.hdr.id;
  r.token = d.hdr.token;
  worker->send(command::reply, r);
  EXPECT_TRUE(client->expect(command::reply).hdr.error_code.empty());
  // Not allowed at all: a REPLY unauthorized with the request's id, never dispatched.
  client->send(command::request, request("c-3", "PaymentService", "refund"));
  const auto refused = client->expect(command::reply);
  EXPECT_EQ(refused.hdr.id, "c-3");
  EXPECT_EQ(refused.hdr.error_code, "unauthorized");
  EXPECT_FALSE(refused.hdr.retryable);
  EXPECT_EQ(refused.hdr.error_message,
            "identity 'orders' has no 'call' right for action 'PaymentService.refund'");
  // The worker's next DISPATCH is the next allowed request, not the refused one.
  client->send(command::request, request("c-4", "PaymentService", "charge"));
  EXPECT_EQ(worker->expect(command::dispatch).hdr.id, "c-4");
  EXPECT_EQ(auth_stats()["refused"]["call"], 1);
}

TEST_F(broker_security_test, admin_actions_need_the_admin_right_but_ping_does_not) {
  auto client = peer(orders_);
  client->send(command::request, request("p-1", "broker", "ping"));
  auto r = client->expect(command::reply);
  EXPECT_EQ(r.hdr.id, "p-1");
  EXPECT_TRUE(r.hdr.error_code.empty()) << r.hdr.error_message;
  client->send(command::request, request("s-1", "broker", "stats"));
  r = client->expect(command::reply);
  EXPECT_EQ(r.hdr.id, "s-1");
  EXPECT_EQ(r.hdr.error_code, "unauthorized");
  EXPECT_EQ(r.hdr.error_message,
            "identity 'orders' has no 'admin' right for action 'broker.stats'");
  const auto stats = admin("stats");  // ops may
  ASSERT_TRUE(stats.contains("auth")) << stats.dump();
  EXPECT_EQ(stats["auth"]["refused"]["admin"], 1);
  EXPECT_EQ(stats["auth"]["identities"], 4);
}

TEST_F(broker_security_test, publish_needs_the_right_and_publisher_is_the_identity) {
  auto subscriber = sub(orders_);
  subscriber->subscribe("payment.");
  auto orders_dealer = peer(orders_);
  subscriber->sync(*orders_dealer, "_ensemble.sync.orders-1");  // probes: every identity may

  auto rogue = peer(rogue_);
  header forged;
  forged.id = "r-1";
  forged.topic = "payment.done";
  forged.ack = true;
  rogue->send(command::publish, forged);
  const auto refused = rogue->expect(command::error);
  EXPECT_EQ(refused.hdr.id, "r-1");
  EXPECT_EQ(refused.hdr.error_code, "unauthorized");
  EXPECT_EQ(refused.hdr.error_message,
            "identity 'rogue' has no 'publish' right for topic 'payment.done'");

  auto payments = peer(payments_);  // never sent HELLO: publisher is still its identity
  header real;
  real.id = "p-1";
  real.topic = "payment.done";
  real.publisher = "ops";  // a forged publisher is overwritten
  real.ack = true;
  payments->send(command::publish, real);
  EXPECT_EQ(payments->expect(command::publish_ack).hdr.id, "p-1");
  const auto e = next_event(*subscriber);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->hdr.id, "p-1");  // the rogue's event, refused before, never went out
  EXPECT_EQ(e->hdr.publisher, "payments");
  EXPECT_EQ(auth_stats()["refused"]["publish"], 1);
}

TEST_F(broker_security_test, stored_events_keep_the_stamped_publisher) {
  admin("stream_add", {{"name", "payments"}, {"topics", json::array({"payment."})}});
  auto payments = peer(payments_);
  header real;
  real.id = "p-1";
  real.topic = "payment.done";
  real.publisher = "ops";
  real.ack = true;
  payments->send(command::publish, real);
  const auto ack = payments->expect(command::publish_ack);
  EXPECT_EQ(ack.hdr.stream_seq, 1u);
  const auto read = admin("stream_read", {{"name", "payments"}});
  ASSERT_EQ(read["records"].size(), 1u) << read.dump();
  EXPECT_EQ(read["records"][0]["header"]["publisher"], "payments");
}

TEST_F(broker_security_test, a_forbidden_subscription_receives_nothing) {
  auto allowed = sub(orders_);  // subscribe: [payment.]
  allowed->subscribe("payment.");
  auto orders_dealer = peer(orders_);
  allowed->sync(*orders_dealer, "_ensemble.sync.orders-2");
  auto forbidden = sub(rogue_);  // subscribe: [rogue.]
  forbidden->subscribe("payment.");
  forbidden->subscribe("");  // everything: refused too
  auto rogue_dealer = peer(rogue_);
  forbidden->sync(*rogue_dealer, "_ensemble.sync.rogue-1");  // applied after the refused ones
  ASSERT_TRUE(tk::wait_until([&] { return auth_stats()["refused"]["subscribe"] == 2; }, k_wait))
      << auth_stats().dump();

  auto payments = peer(payments_);
  header e;
  e.id = "p-1";
  e.topic = "payment.done";
  e.ack = true;
  payments->send(command::publish, e);
  payments->expect(command::publish_ack);
  const auto got = next_event(*allowed);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->hdr.id, "p-1");
  // The XPUB keeps one subscriber's events in order: had payment.done gone to the forbidden
  // subscriber, it would arrive before this probe (its probe topic is still subscribed).
  header probe;
  probe.id = "probe-after";
  probe.topic = "_ensemble.sync.rogue-1";
  rogue_dealer->send(command::publish, probe);
  std::optional<event_sub::event> next;
  while ((next = forbidden->next(k_wait)) && next->hdr.id != "probe-after") {
    EXPECT_EQ(next->topic.rfind("_ensemble.sync.", 0), 0u) << "received " << next->topic;
  }
  ASSERT_TRUE(next.has_value()) << "the probe after the event never arrived";
  EXPECT_EQ(admin("stats")["subscriptions"].value("payment.", 0), 1);  // the allowed one
}

// Refused prefixes are held by nobody but the broker's count of them: a peer that keeps
// subscribing to new ones must not grow it. Every refusal is still counted.
TEST_F(broker_security_test, refused_subscriptions_are_counted_within_a_bound) {
  // Two subscribers of 600 prefixes each: one SUB sends at most about 1,000 subscription
  // messages before its queue to the broker (its high-water mark) drops the rest.
  std::vector<std::unique_ptr<event_sub>> subs;
  int sent = 0;
  for (int s = 0; s < 2; ++s) {
    subs.push_back(sub(rogue_));  // subscribe: [rogue.]
    for (int i = 0; i < 600; ++i) subs.back()->subscribe("payment." + std::to_string(sent++) + ".");
    ASSERT_TRUE(
        tk::wait_until([&] { return auth_stats()["refused"]["subscribe"] == sent; }, k_wait))
        << auth_stats()["refused"].dump();
  }
  EXPECT_EQ(auth_stats()["refused_subscriptions"].size(), 1'000u);
}

TEST_F(broker_security_test, an_unknown_key_is_refused_at_the_handshake) {
  key_pair stranger;
  auto p = peer(stranger);
  monitor events(ctx_, p->socket(), "stranger");
  p->send(command::request, request("x-1", "broker", "ping"));
  EXPECT_TRUE(events.wait_for(ZMQ_EVENT_HANDSHAKE_FAILED_AUTH));
  ASSERT_TRUE(tk::wait_until([&] { return auth_stats()["handshakes_refused"] >= 1; }, k_wait));
  EXPECT_TRUE(broker_->proc().wait_for_line(
      "handshake refused (unknown key): key " + stranger.keys.public_key, k_wait));
  // A plain (unencrypted) peer does not get through either.
  raw_peer plain(ctx_, broker_->router());
  monitor plain_events(ctx_, plain.socket(), "plain");
  plain.send(command::request, request("x-2", "broker", "ping"));
  EXPECT_TRUE(plain_events.wait_for(ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                                    ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL));
}

TEST_F(broker_security_test, consume_needs_the_right) {
  auto rogue = peer(rogue_);
  ASSERT_EQ(hello(*rogue, "rogue", "").cmd, command::welcome);
  header c;
  c.id = "c-1";
  c.stream = "orders";
  c.consumer = "steal";
  rogue->send(command::consume, c);
  const auto r = rogue->expect(command::reply);
  EXPECT_EQ(r.hdr.id, "c-1");
  EXPECT_EQ(r.hdr.stream, "orders");
  EXPECT_EQ(r.hdr.consumer, "steal");
  EXPECT_EQ(r.hdr.error_code, "unauthorized");
  EXPECT_EQ(r.hdr.error_message, "identity 'rogue' has no 'consume' right for stream 'orders'");
  // orders may: it gets past the rights check (to not_found: there is no such stream).
  auto orders = peer(orders_);
  ASSERT_EQ(hello(*orders, "orders", "").cmd, command::welcome);
  c.consumer = "billing";
  orders->send(command::consume, c);
  EXPECT_EQ(orders->expect(command::reply).hdr.error_code, "not_found");
  EXPECT_EQ(auth_stats()["refused"]["consume"], 1);
}

TEST_F(broker_security_test, a_revoked_key_is_disconnected_and_refused_while_others_go_on) {
  auto worker = peer(payments_);
  ASSERT_EQ(hello(*worker, "payments", "PaymentService").cmd, command::welcome);
  auto client = peer(orders_);
  client->send(command::request, request("p-0", "broker", "ping"));
  ASSERT_EQ(client->expect(command::reply).hdr.id, "p-0");  // connected and known
  auto orders_sub = sub(orders_);
  orders_sub->subscribe("payment.");
  orders_sub->sync(*client, "_ensemble.sync.orders-3");
  monitor client_events(ctx_, client->socket(), "orders");
  // A SUB of orders that is connected but has sent nothing yet: the reload cannot know it.
  zmq::socket_t silent_sub(ctx_, zmq::socket_type::sub);
  silent_sub.set(zmq::sockopt::linger, 0);
  as(orders_).apply(silent_sub);
  monitor silent_events(ctx_, silent_sub, "orders-silent");  // before connect: no event missed
  silent_sub.connect(broker_->events());
  ASSERT_TRUE(silent_events.wait_for(ZMQ_EVENT_HANDSHAKE_SUCCEEDED));

  write_auth(auth_text(key_pair{}.keys.public_key));  // orders gets a new key: the old is revoked
  reload();
  EXPECT_TRUE(client_events.wait_for(ZMQ_EVENT_DISCONNECTED));
  // libzmq reconnects by itself; the handshake is refused now.
  EXPECT_TRUE(client_events.wait_for(ZMQ_EVENT_HANDSHAKE_FAILED_AUTH));
  // Both of orders' connections were closed: the events one is gone from the subscriptions.
  ASSERT_TRUE(tk::wait_until(
      [&] { return admin("stats")["subscriptions"].value("payment.", 0) == 0; }, k_wait));

  // The silent one is closed as soon as it shows itself.
  silent_sub.set(zmq::sockopt::subscribe, "payment.");
  EXPECT_TRUE(silent_events.wait_for(ZMQ_EVENT_DISCONNECTED));
  EXPECT_TRUE(silent_events.wait_for(ZMQ_EVENT_HANDSHAKE_FAILED_AUTH));

  // payments (unchanged) still serves ops.
  auto ops = peer(ops_);
  ops->send(command::request, request("o-1", "PaymentService", "charge"));
  const auto d = worker->expect(command::dispatch);
  EXPECT_EQ(d.hdr.caller, "ops");
  header r;
  r.id = d.hdr.id;
  r.token = d.hdr.token;
  worker->send(command::reply, r);
  EXPECT_EQ(ops->expect(command::reply).hdr.worker, "payments");
  EXPECT_TRUE(broker_->proc().wait_for_line("closed the router connection of orders", k_wait));
}

TEST_F(broker_security_test, a_changed_right_unregisters_the_identity_and_is_checked_again) {
  auto worker = peer(payments_);
  ASSERT_EQ(hello(*worker, "payments", "PaymentService").cmd, command::welcome);
  auto rogue = peer(rogue_);
  ASSERT_EQ(hello(*rogue, "rogue", "RogueService").cmd, command::welcome);

  write_auth(auth_text({}, /*payments_may_offer=*/false));
  reload();
  // payments was unregistered: its heartbeat is answered not_registered, and its HELLO is
  // checked against the new rights.
  worker->send(command::heartbeat, header{});
  EXPECT_EQ(worker->expect(command::error).hdr.error_code, "not_registered");
  EXPECT_EQ(hello(*worker, "payments", "PaymentService").hdr.error_code, "unauthorized");
  EXPECT_EQ(hello(*worker, "payments", "Other").cmd, command::welcome);
  // rogue's entry did not change: it is still registered.
  const auto services = admin("services")["services"];
  bool rogue_listed = false;
  for (const auto& s : services) {
    if (s["service"] == "RogueService" && s["workers"].size() == 1) rogue_listed = true;
  }
  EXPECT_TRUE(rogue_listed) << services.dump();
}

TEST_F(broker_security_test, a_file_that_does_not_load_leaves_the_rights_in_force) {
  write_auth("identities:\n  broken: [\n");
  reload("reload_failures");
  EXPECT_EQ(auth_stats()["reloads"], 0);
  auto client = peer(orders_);
  client->send(command::request, request("p-1", "broker", "ping"));
  EXPECT_TRUE(client->expect(command::reply).hdr.error_code.empty());
}

TEST(broker_security_start_test, keys_and_auth_go_together_and_bad_files_stop_the_broker) {
  temp_dir dir("ensemble-security-start");
  ec::write_curve_key_files(dir.file("keys"), "broker", ec::generate_curve_keys());
  const auto key = dir.file("keys/broker.key_secret");
  const auto auth = dir.write("auth.yaml", "identities:\n  a:\n    keys: []\n    ofer: [X]\n");
  const auto run = [&](std::vector<std::string> args) {
    auto p = tk::process::spawn({tk::binary_path("ensemble-broker"), std::move(args), {}, {}, {}});
    const auto code = p->wait_exit(k_wait);
    std::string out;
    for (const auto& l : p->lines()) out += l + "\n";
    return std::pair{code, out};
  };
  auto [code, out] =
      run({"--router", "tcp://127.0.0.1:*", "--events", "tcp://127.0.0.1:*", "--curve-key", key});
  EXPECT_EQ(code, 2);
  EXPECT_TRUE(contains(out, "needs --auth FILE")) << out;
  std::tie(code, out) =
      run({"--router", "tcp://127.0.0.1:*", "--events", "tcp://127.0.0.1:*", "--auth", auth});
  EXPECT_EQ(code, 2);
  EXPECT_TRUE(contains(out, "needs --curve-key FILE")) << out;
  std::tie(code, out) = run({"--router", "tcp://127.0.0.1:*", "--events", "tcp://127.0.0.1:*",
                             "--curve-key", key, "--auth", auth});
  EXPECT_EQ(code, 2);
  EXPECT_TRUE(contains(out, auth + ": identities.a.ofer: unknown key")) << out;
}

TEST(broker_plain_mode_test, a_non_loopback_bind_needs_insecure) {
  auto p = tk::process::spawn({tk::binary_path("ensemble-broker"),
                               {"--router", "tcp://0.0.0.0:*", "--events", "tcp://127.0.0.1:*"},
                               {},
                               {},
                               {}});
  EXPECT_EQ(p->wait_exit(k_wait), 2);
  std::string out;
  for (const auto& l : p->lines()) out += l + "\n";
  EXPECT_TRUE(contains(out, "--router: tcp://0.0.0.0:* is not a loopback endpoint")) << out;
  EXPECT_TRUE(contains(out, "--insecure")) << out;
  // With --insecure it serves.
  auto launched = tk::launch_broker(
      [](const std::string& router, const std::string& events) {
        return tk::process_options{tk::binary_path("ensemble-broker"),
                                   {"--router", router, "--events", events, "--insecure"},
                                   {},
                                   {},
                                   "ensemble-broker"};
      },
      "tcp://0.0.0.0:*", "tcp://127.0.0.1:*", k_wait);
  ASSERT_TRUE(launched.proc);
  EXPECT_TRUE(contains(launched.router, "tcp://0.0.0.0:")) << launched.router;
}

TEST(broker_plain_mode_test, caller_is_the_agent_name_or_the_connection) {
  auto broker = tk::broker_process::start();
  zmq::context_t ctx(1);
  raw_peer worker(ctx, broker->router());
  header hello;
  hello.agent = "payments";
  hello.services = {{"PaymentService", 1}};
  worker.send(command::hello, hello);
  worker.expect(command::welcome);

  raw_peer named(ctx, broker->router());
  header named_hello;
  named_hello.agent = "alice";
  named.send(command::hello, named_hello);
  named.expect(command::welcome);
  raw_peer anonymous(ctx, broker->router());

  const auto call = [&](raw_peer& client, const std::string& id) {
    header h;
    h.id = id;
    h.service = "PaymentService";
    h.action = "charge";
    h.deadline_ms = 5000;
    h.caller = "forged";
    h.caller_scope = "own";
    client.send(command::request, h);
    auto d = worker.expect(command::dispatch);
    header r;
    r.id = d.hdr.id;
    r.token = d.hdr.token;
    worker.send(command::reply, r);
    client.expect(command::reply);
    return d.hdr;
  };
  const auto a = call(named, "a-1");
  EXPECT_EQ(a.caller, "alice");
  EXPECT_EQ(a.caller_scope, "");
  const auto b = call(anonymous, "b-1");
  EXPECT_EQ(b.caller.rfind("peer:", 0), 0u) << b.caller;
  EXPECT_GT(b.caller.size(), 5u);
}

}  // namespace
