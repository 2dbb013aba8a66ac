// Secured mode from the client side (docs/protocol.md section 12, docs/agents.md "Keys"): SDK
// agents, the `ensemble` CLI and its keygen against a real ensemble-broker started with
// --curve-key and --auth. Agents with listed keys serve, call and receive events under their
// identities; a key the broker does not know, a wrong broker key, a plain agent at a secured
// broker and keys at a plain broker all make start() fail at once with `unauthorized` (the
// handshake refusal seen on the DEALER's monitor), never with the timeout of an unreachable
// broker; unusable key options fail with `bad_request` naming the option and the file.
#include <gtest/gtest.h>
#include <unistd.h>

#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <vector>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/common/curve_keys.hpp"
#include "ensemble/testkit/process.hpp"
#include "support/cli_outcome.hpp"
#include "support/message_inbox.hpp"
#include "support/temp_dir.hpp"

namespace ea = ensemble::agent;
namespace ec = ensemble::common;
namespace tk = ensemble::testkit;
namespace test = ensemble::test;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

constexpr auto k_wait = 10s;
// start() must fail on the handshake refusal, not on this: a refusal reported as a timeout has
// the code broker_lost, which the tests reject.
constexpr auto k_start_timeout = 30s;

// Who may do what (docs/protocol.md section 12, "Identities and rights").
constexpr const char* k_auth = R"(identities:
  payments:
    keys: [keys/payments.key]
    offer: [PaymentService]
    publish: [payment.]
  orders:
    keys: [keys/orders.key]
    call: ["PaymentService.*"]
    subscribe: [payment.]
  cli:
    keys: [keys/cli.key]
    call: ["*"]
    admin: ["*"]
    subscribe: [""]
    publish: [""]
)";

class sdk_security_test : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!ec::curve_available()) GTEST_SKIP() << "this libzmq has no CURVE";
    for (const char* name : {"broker", "payments", "orders", "cli", "stranger"}) keygen(name);
    dir_.write("auth.yaml", k_auth);
  }
  void TearDown() override {
    if (HasFailure() && broker_) std::cerr << "broker output:\n" << broker_->proc().tail() << "\n";
  }
  void keygen(const std::string& name) {
    ec::write_curve_key_files(dir_.file("keys"), name, ec::generate_curve_keys(), true);
  }
  void start_secured_broker() {
    broker_ = tk::broker_process::start({"--heartbeat", "100", "--curve-key",
                                         dir_.file("keys/broker.key_secret"), "--auth",
                                         dir_.file("auth.yaml")});
  }
  std::string secret(const std::string& name) const {
    return dir_.file("keys/" + name + ".key_secret");
  }
  std::string broker_public() const { return dir_.file("keys/broker.key"); }
  // An agent that takes its identity from its key (no name).
  ea::options keyed(const std::string& key_name) const {
    ea::options o;
    o.broker = broker_->router();
    o.events = broker_->events();
    o.key_file = secret(key_name);
    o.broker_key = broker_public();
    o.start_timeout = k_start_timeout;
    return o;
  }
  // `payments`, serving PaymentService.charge: answers who called.
  std::unique_ptr<ea::agent> start_payments() {
    auto a = std::make_unique<ea::agent>(keyed("payments"));
    a->handle("PaymentService", "charge", [](const ea::message& m) -> ea::handler_result {
      return ea::to_json_payload({{"caller", m.caller()}, {"scope", m.caller_scope()}});
    });
    auto s = a->start();
    EXPECT_TRUE(s.ok()) << s.err().to_string();
    return a;
  }
  test::outcome cli(std::vector<std::string> args, std::map<std::string, std::string> env = {}) {
    auto p = tk::process::spawn({tk::binary_path("ensemble"), std::move(args), std::move(env),
                                 dir_.path().string(), "cli"});
    return test::finish(*p, 30s);
  }

  test::temp_dir dir_{"ensemble-security"};
  std::unique_ptr<tk::broker_process> broker_;
};

// A refusal at the handshake, not an unreachable broker: the code says which.
void expect_refused(const ec::status& s, const std::string& detail) {
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.err().code, "unauthorized") << s.err().to_string();
  EXPECT_NE(s.err().message.find("the broker refused this key at the handshake"), std::string::npos)
      << s.err().to_string();
  EXPECT_NE(s.err().message.find(detail), std::string::npos) << s.err().to_string();
  EXPECT_FALSE(s.err().retryable);
}

TEST_F(sdk_security_test, agents_with_listed_keys_serve_and_call_under_their_identities) {
  start_secured_broker();
  auto payments = start_payments();
  EXPECT_EQ(payments->name(), "payments");  // the key file's name: keygen wrote it
  ea::agent orders(keyed("orders"));
  auto started = orders.start();
  ASSERT_TRUE(started.ok()) << started.err().to_string();

  auto r = orders.call("PaymentService", "charge", ea::to_json_payload({{"amount", 3}}), k_wait);
  ASSERT_TRUE(r.ok()) << r.err().to_string();
  EXPECT_EQ(r->worker(), "payments");  // the identity the broker stamped, not a claimed name
  auto body = ea::from_json_payload(r->payload());
  ASSERT_TRUE(body.ok());
  EXPECT_EQ((*body)["caller"], "orders");
  EXPECT_EQ((*body)["scope"], "");
}

TEST_F(sdk_security_test, a_subscriber_with_keys_receives_events_stamped_with_the_publisher) {
  start_secured_broker();
  ensemble::test::message_inbox received;
  ea::agent orders(keyed("orders"));
  ASSERT_TRUE(orders.subscribe("payment.", [&](const ea::message& m) { received.add(m); }).ok());
  auto started = orders.start();  // returns once the subscription is confirmed
  ASSERT_TRUE(started.ok()) << started.err().to_string();
  auto payments = start_payments();

  auto p = payments->publish_acked("payment.done", ea::to_json_payload({{"order", "o-1"}}), k_wait);
  ASSERT_TRUE(p.ok()) << p.err().to_string();
  auto e = received.wait_for("payment.done", k_wait);
  ASSERT_TRUE(e.has_value()) << "the subscriber received nothing on payment.";
  EXPECT_EQ(e->publisher(), "payments");
  EXPECT_EQ((*ea::from_json_payload(e->payload()))["order"], "o-1");
}

TEST_F(sdk_security_test, a_key_the_broker_does_not_know_fails_start_at_once) {
  start_secured_broker();
  ea::agent stranger(keyed("stranger"));
  const auto s = stranger.start();
  expect_refused(s, "ZAP status 400");
  EXPECT_NE(s.err().message.find(secret("stranger")), std::string::npos) << s.err().message;
  EXPECT_FALSE(stranger.registered());
}

TEST_F(sdk_security_test, a_wrong_broker_key_fails_start_at_once) {
  start_secured_broker();
  auto o = keyed("orders");
  o.broker_key = dir_.file("keys/stranger.key");  // not the broker's
  ea::agent orders(o);
  expect_refused(orders.start(), "dropped the connection during the CURVE handshake");
}

TEST_F(sdk_security_test, a_plain_agent_at_a_secured_broker_and_keys_at_a_plain_one_are_refused) {
  start_secured_broker();
  ea::options plain;
  plain.broker = broker_->router();
  plain.events = broker_->events();
  plain.start_timeout = k_start_timeout;
  ea::agent a(plain);
  expect_refused(a.start(), "runs secured mode");

  broker_ = tk::broker_process::start({"--heartbeat", "100"});
  ea::agent b(keyed("orders"));
  // The plain broker may drop the connection before the agent sees the mechanism mismatch.
  const auto s = b.start();
  expect_refused(s, "secured mode");
}

TEST_F(sdk_security_test, a_name_that_is_not_the_keys_identity_is_refused) {
  start_secured_broker();
  auto o = keyed("orders");
  o.name = "payments";  // orders' key claiming another identity's name
  ea::agent impostor(o);
  const auto s = impostor.start();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.err().code, "unauthorized") << s.err().to_string();
  EXPECT_NE(s.err().message.find("orders"), std::string::npos) << s.err().message;
}

TEST(sdk_security_options_test, unusable_key_options_fail_start_naming_the_option_and_file) {
  test::temp_dir dir{"ensemble-security-options"};
  const auto files = ec::write_curve_key_files(dir.path().string(), "a", ec::generate_curve_keys());
  auto start = [](const std::string& key_file, const std::string& broker_key) {
    ea::options o;
    o.broker = "tcp://127.0.0.1:1";  // never reached: the keys are checked first
    o.events = "tcp://127.0.0.1:2";
    o.key_file = key_file;
    o.broker_key = broker_key;
    ea::agent a(o);
    return a.start();
  };

  auto half = start(files.secret_file, "");
  ASSERT_FALSE(half.ok());
  EXPECT_EQ(half.err().code, "bad_request");
  EXPECT_NE(half.err().message.find("options.key_file is set but not options.broker_key"),
            std::string::npos)
      << half.err().message;

  auto public_file = start(files.public_file, files.public_file);
  ASSERT_FALSE(public_file.ok());
  EXPECT_EQ(public_file.err().code, "bad_request");
  EXPECT_NE(public_file.err().message.find("options.key_file '" + files.public_file +
                                           "': holds no secret-key"),
            std::string::npos)
      << public_file.err().message;

  std::filesystem::permissions(files.secret_file, std::filesystem::perms::group_read,
                               std::filesystem::perm_options::add);
  auto open = start(files.secret_file, files.public_file);
  ASSERT_FALSE(open.ok());
  EXPECT_NE(open.err().message.find("mode is 0640"), std::string::npos) << open.err().message;

  auto bad_broker_key = start(dir.file("missing"), "not-a-key");
  ASSERT_FALSE(bad_broker_key.ok());
  EXPECT_NE(bad_broker_key.err().message.find("options.key_file '" + dir.file("missing") +
                                              "': no such file"),
            std::string::npos)
      << bad_broker_key.err().message;
}

TEST_F(sdk_security_test, cli_keygen_writes_a_pair_and_refuses_to_overwrite_it) {
  auto made = cli({"keygen", "ops", "--dir", "more-keys"});
  ASSERT_EQ(made.code, 0) << made;
  const auto keys = ec::read_curve_key_file(dir_.file("more-keys/ops.key_secret"), "", true);
  EXPECT_TRUE(made.has("public key: " + keys.public_key)) << made;
  EXPECT_TRUE(made.has("more-keys/ops.key_secret")) << made;
  EXPECT_EQ(ec::read_public_key(dir_.file("more-keys/ops.key"), ""), keys.public_key);

  auto again = cli({"keygen", "ops", "--dir", "more-keys"});
  EXPECT_EQ(again.code, 2) << again;
  EXPECT_TRUE(again.has("exists already")) << again;
  EXPECT_TRUE(again.has("--force")) << again;
  EXPECT_EQ(ec::read_curve_key_file(dir_.file("more-keys/ops.key_secret"), "", true).secret_key,
            keys.secret_key);  // untouched

  auto forced = cli({"keygen", "ops", "--dir", "more-keys", "--force"});
  EXPECT_EQ(forced.code, 0) << forced;
  EXPECT_NE(ec::read_curve_key_file(dir_.file("more-keys/ops.key_secret"), "", true).secret_key,
            keys.secret_key);
}

TEST_F(sdk_security_test, cli_calls_a_secured_broker_with_key_flags_or_environment) {
  // The CLI's own key comes from `ensemble keygen`, as a user makes it.
  auto made = cli({"keygen", "cli", "--dir", "keys", "--force"});
  ASSERT_EQ(made.code, 0) << made;
  start_secured_broker();
  auto payments = start_payments();
  const std::vector<std::string> where{"--broker", broker_->router(), "--events",
                                       broker_->events()};
  auto with = [&](std::vector<std::string> args) {
    args.insert(args.begin(), where.begin(), where.end());
    return args;
  };

  // Flags, after the command.
  auto flags = cli(with({"call", "PaymentService", "charge", "{}", "--key", "keys/cli.key_secret",
                         "--broker-key", "keys/broker.key"}));
  ASSERT_EQ(flags.code, 0) << flags;
  EXPECT_TRUE(flags.has("\"caller\": \"cli\"")) << flags;

  // The environment; the broker's key as its 40 characters.
  const auto broker_key = ec::read_public_key(broker_public(), "");
  auto env = cli(with({"call", "PaymentService", "charge", "{}"}),
                 {{"ENSEMBLE_KEY", "keys/cli.key_secret"}, {"ENSEMBLE_BROKER_KEY", broker_key}});
  ASSERT_EQ(env.code, 0) << env;
  EXPECT_TRUE(env.has("\"caller\": \"cli\"")) << env;

  // No flags in the directory of a secured `ensemble up`: its run file gives the endpoints, the
  // broker's key and the key its commands use (docs/deployments.md). The pid it records must be
  // alive: this test's.
  dir_.write(".ensemble/up.json", json{{"router", broker_->router()},
                                       {"events", broker_->events()},
                                       {"pid", ::getpid()},
                                       {"broker_key", broker_key},
                                       {"key", "keys/cli.key_secret"}}
                                      .dump());
  auto run_file = cli({"call", "PaymentService", "charge", "{}"});
  ASSERT_EQ(run_file.code, 0) << run_file;
  EXPECT_TRUE(run_file.has("\"caller\": \"cli\"")) << run_file;

  // A public file given as --key: one line naming the flag and the file, exit 2.
  auto public_key = cli(
      with({"--key", "keys/cli.key", "--broker-key", broker_key, "call", "PaymentService", "x"}));
  EXPECT_EQ(public_key.code, 2) << public_key;
  EXPECT_TRUE(public_key.has("ensemble: --key 'keys/cli.key': holds no secret-key")) << public_key;

  // Half of the pair.
  auto half = cli(with({"--key", "keys/cli.key_secret", "call", "PaymentService", "x"}));
  EXPECT_EQ(half.code, 2) << half;
  EXPECT_TRUE(half.has("--broker-key")) << half;

  // A key the broker does not know: refused, and said so (not "cannot reach").
  auto stranger = cli(with({"--key", "keys/stranger.key_secret", "--broker-key", "keys/broker.key",
                            "call", "PaymentService", "charge"}));
  EXPECT_EQ(stranger.code, 1) << stranger;
  EXPECT_TRUE(stranger.has("unauthorized: the broker refused this key at the handshake"))
      << stranger;
  EXPECT_FALSE(stranger.has("cannot reach")) << stranger;
}

TEST_F(sdk_security_test, a_scriptable_agent_and_the_orchestrator_connect_with_their_keys) {
  start_secured_broker();
  const auto spec = dir_.write("payments.yaml",
                               "name: payments\n"
                               "services:\n"
                               "  PaymentService:\n"
                               "    actions:\n"
                               "      charge: {reply: {charged: true}}\n");
  auto agent =
      tk::process::spawn({tk::binary_path("ensemble"),
                          {"--broker", broker_->router(), "--events", broker_->events(), "agent",
                           spec, "--key", secret("payments"), "--broker-key", broker_public()},
                          {},
                          dir_.path().string(),
                          "ensemble agent"});
  ASSERT_TRUE(agent->wait_for_line("ensemble-agent ready name=payments", k_wait)) << agent->tail();
  ea::agent orders(keyed("orders"));
  auto started = orders.start();
  ASSERT_TRUE(started.ok()) << started.err().to_string();
  auto r = orders.call("PaymentService", "charge", ea::to_json_payload(json::object()), k_wait);
  ASSERT_TRUE(r.ok()) << r.err().to_string();
  EXPECT_EQ(r->worker(), "payments");

  // The orchestrator checks its key options before it starts: one line, exit 2.
  auto orchestrator =
      tk::process::spawn({tk::binary_path("ensemble-orchestrator"),
                          {"--broker", broker_->router(), "--events", broker_->events(), "--key",
                           dir_.file("keys/cli.key"), "--broker-key", broker_public()},
                          {},
                          {},
                          "ensemble-orchestrator"});
  const auto o = test::finish(*orchestrator, 30s);
  EXPECT_EQ(o.code, 2) << o;
  EXPECT_TRUE(o.has("--key '" + dir_.file("keys/cli.key") + "': holds no secret-key")) << o;
  // With its own key and no identity named `orchestrator`, the broker refuses its HELLO.
  auto refused = tk::process::spawn({tk::binary_path("ensemble-orchestrator"),
                                     {"--broker", broker_->router(), "--events", broker_->events(),
                                      "--key", secret("cli"), "--broker-key", broker_public()},
                                     {},
                                     {},
                                     "ensemble-orchestrator"});
  const auto ro = test::finish(*refused, 30s);
  EXPECT_EQ(ro.code, 1) << ro;
  EXPECT_TRUE(ro.has("unauthorized")) << ro;
}

}  // namespace
