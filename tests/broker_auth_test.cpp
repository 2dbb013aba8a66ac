// The secured broker's rights decisions and auth file (broker/src/auth.*; docs/protocol.md
// section 12): every right, the patterns, the subscribe-prefix rule, the built-in allowances,
// the file's errors and what a reload changes. Pure: no sockets.
#include <gtest/gtest.h>

#include <algorithm>

#include "auth.hpp"
#include "ensemble/common/curve_keys.hpp"
#include "ensemble/common/result.hpp"
#include "support/temp_dir.hpp"

namespace auth = ensemble::broker::auth;
namespace ec = ensemble::common;
using auth::verdict;
using ensemble::test::temp_dir;

namespace {

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const ec::config_error& e) {
    return e.what();
  }
  return "(no error)";
}

::testing::AssertionResult contains(const std::string& haystack, std::string_view needle) {
  if (haystack.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << haystack << "' does not contain '" << needle << "'";
}

// An identity with one right.
auth::identity with(std::vector<std::string> auth::identity::*right,
                    std::vector<std::string> patterns) {
  auth::identity id;
  id.name = "someone";
  id.*right = std::move(patterns);
  return id;
}

struct fixture {
  temp_dir dir{"ensemble-auth"};
  ec::curve_keys payments = ec::generate_curve_keys();
  ec::curve_keys orders = ec::generate_curve_keys();
  ec::curve_keys ops = ec::generate_curve_keys();

  fixture() { ec::write_curve_key_files(dir.file("keys"), "payments", payments); }

  // The example of docs/protocol.md section 12, with real keys.
  std::string example() const {
    return "identities:\n"
           "  payments:\n"
           "    keys: [keys/payments.key]\n"
           "    offer: [PaymentService]\n"
           "    publish: [payment.]\n"
           "    subscribe: [order.]\n"
           "  orders:\n"
           "    keys: [\"" +
           orders.public_key +
           "\"]\n"
           "    call: [PaymentService.charge, \"InventoryService.*\", orchestrator.start]\n"
           "    call_own: [orchestrator.get, orchestrator.history, orchestrator.cancel]\n"
           "    consume: [orders]\n"
           "  ops:\n"
           "    keys: [\"" +
           ops.public_key +
           "\"]\n"
           "    call: [\"*\"]\n"
           "    admin: [\"*\"]\n"
           "    subscribe: [\"\"]\n";
  }
  auth::table load(const std::string& text) const {
    return auth::load_auth_file(dir.write("auth.yaml", text));
  }
};

}  // namespace

TEST(broker_auth_test, the_example_file_loads_and_keys_name_identities) {
  fixture f;
  const auto t = f.load(f.example());
  ASSERT_EQ(t.identities().size(), 3u);
  ASSERT_NE(t.by_key(f.payments.public_key), nullptr);
  EXPECT_EQ(t.by_key(f.payments.public_key)->name, "payments");  // from the key file
  EXPECT_EQ(t.by_key(f.orders.public_key)->name, "orders");      // Z85 text
  EXPECT_EQ(t.by_name("ops")->keys, std::vector<std::string>{f.ops.public_key});
  EXPECT_EQ(t.by_key(ec::generate_curve_keys().public_key), nullptr);
  EXPECT_EQ(t.by_name("rogue"), nullptr);
}

TEST(broker_auth_test, json_files_load_too) {
  fixture f;
  const auto t = f.load("{\"identities\": {\"ops\": {\"keys\": [\"" + f.ops.public_key +
                        "\"], \"admin\": [\"stats\"]}}}");
  ASSERT_NE(t.by_name("ops"), nullptr);
  EXPECT_EQ(auth::check_admin(t.by_name("ops"), "stats"), verdict::allowed);
}

TEST(broker_auth_test, offer_is_checked_per_service_with_globs) {
  fixture f;
  const auto t = f.load(f.example());
  const auto* payments = t.by_name("payments");
  EXPECT_EQ(auth::check_offer(payments, "PaymentService"), verdict::allowed);
  EXPECT_EQ(auth::check_offer(payments, "PaymentServiceX"), verdict::refused);
  EXPECT_EQ(auth::check_offer(t.by_name("orders"), "PaymentService"), verdict::refused);
  const auto glob = with(&auth::identity::offer, {"Payment*"});
  EXPECT_EQ(auth::check_offer(&glob, "PaymentService"), verdict::allowed);
  EXPECT_EQ(auth::check_offer(&glob, "Payment"), verdict::allowed);
  EXPECT_EQ(auth::check_offer(&glob, "OrderService"), verdict::refused);
  EXPECT_EQ(auth::check_offer(nullptr, "PaymentService"), verdict::refused);
}

TEST(broker_auth_test, call_and_call_own) {
  fixture f;
  const auto t = f.load(f.example());
  const auto* orders = t.by_name("orders");
  EXPECT_EQ(auth::check_call(orders, "PaymentService", "charge"), verdict::allowed);
  EXPECT_EQ(auth::check_call(orders, "PaymentService", "refund"), verdict::refused);
  EXPECT_EQ(auth::check_call(orders, "InventoryService", "reserve"), verdict::allowed);
  EXPECT_EQ(auth::check_call(orders, "orchestrator", "start"), verdict::allowed);
  EXPECT_EQ(auth::check_call(orders, "orchestrator", "get"), verdict::allowed_own);
  EXPECT_EQ(auth::check_call(orders, "orchestrator", "list"), verdict::refused);
  // A call right wins over a call_own right for the same action.
  auto both = with(&auth::identity::call, {"*.get"});
  both.call_own = {"orchestrator.*"};
  EXPECT_EQ(auth::check_call(&both, "orchestrator", "get"), verdict::allowed);
  EXPECT_EQ(auth::check_call(&both, "orchestrator", "cancel"), verdict::allowed_own);
  EXPECT_EQ(auth::check_call(&both, "Shipping", "get"), verdict::allowed);
  // "*" is every service but the broker's own: that takes the admin right.
  const auto* ops = t.by_name("ops");
  EXPECT_EQ(auth::check_call(ops, "Anything", "at_all"), verdict::allowed);
  EXPECT_EQ(auth::check_call(orders, "broker", "stats"), verdict::refused);
  EXPECT_EQ(auth::check_call(ops, "broker", "stats"), verdict::allowed);
}

TEST(broker_auth_test, admin_and_the_ping_everybody_may_send) {
  fixture f;
  const auto t = f.load(f.example());
  const auto some = with(&auth::identity::admin, {"stream_*", "stats"});
  EXPECT_EQ(auth::check_admin(&some, "stream_add"), verdict::allowed);
  EXPECT_EQ(auth::check_admin(&some, "stats"), verdict::allowed);
  EXPECT_EQ(auth::check_admin(&some, "consumer_rm"), verdict::refused);
  EXPECT_EQ(auth::check_admin(t.by_name("payments"), "services"), verdict::refused);
  EXPECT_EQ(auth::check_admin(t.by_name("payments"), "ping"), verdict::allowed);
  EXPECT_EQ(auth::check_call(nullptr, "broker", "ping"), verdict::allowed);
  EXPECT_EQ(auth::check_admin(nullptr, "stats"), verdict::refused);
}

TEST(broker_auth_test, publish_is_by_topic_prefix) {
  fixture f;
  const auto t = f.load(f.example());
  const auto* payments = t.by_name("payments");
  EXPECT_EQ(auth::check_publish(payments, "payment.done"), verdict::allowed);
  EXPECT_EQ(auth::check_publish(payments, "payments.done"), verdict::refused);  // "payment."
  EXPECT_EQ(auth::check_publish(payments, "order.created"), verdict::refused);
  const auto all = with(&auth::identity::publish, {""});
  const auto star = with(&auth::identity::publish, {"*"});
  EXPECT_EQ(auth::check_publish(&all, "x.y"), verdict::allowed);
  EXPECT_EQ(auth::check_publish(&star, "x.y"), verdict::allowed);
  // The SDK's subscription probes: every identity, even one with no rights at all.
  EXPECT_EQ(auth::check_publish(t.by_name("orders"), "_ensemble.sync.abc"), verdict::allowed);
  EXPECT_EQ(auth::check_publish(nullptr, "_ensemble.sync.abc"), verdict::allowed);
  EXPECT_EQ(auth::check_publish(t.by_name("orders"), "_ensemble.other"), verdict::refused);
}

TEST(broker_auth_test, a_subscription_must_start_with_an_allowed_prefix) {
  fixture f;
  const auto t = f.load(f.example());
  const auto* payments = t.by_name("payments");  // subscribe: [order.]
  EXPECT_EQ(auth::check_subscribe(payments, "order."), verdict::allowed);
  EXPECT_EQ(auth::check_subscribe(payments, "order.created"), verdict::allowed);
  EXPECT_EQ(auth::check_subscribe(payments, "ord"), verdict::refused);  // wider than allowed
  EXPECT_EQ(auth::check_subscribe(payments, ""), verdict::refused);     // everything
  EXPECT_EQ(auth::check_subscribe(payments, "payment."), verdict::refused);
  EXPECT_EQ(auth::check_subscribe(t.by_name("ops"), ""), verdict::allowed);  // subscribe: [""]
  EXPECT_EQ(auth::check_subscribe(t.by_name("ops"), "any.thing"), verdict::allowed);
  EXPECT_EQ(auth::check_subscribe(t.by_name("orders"), "_ensemble.sync.me"), verdict::allowed);
  EXPECT_EQ(auth::check_subscribe(t.by_name("orders"), "_ensemble."), verdict::refused);
}

TEST(broker_auth_test, consume_is_by_stream_name) {
  fixture f;
  const auto t = f.load(f.example());
  EXPECT_EQ(auth::check_consume(t.by_name("orders"), "orders"), verdict::allowed);
  EXPECT_EQ(auth::check_consume(t.by_name("orders"), "orders-dlq"), verdict::refused);
  EXPECT_EQ(auth::check_consume(t.by_name("payments"), "orders"), verdict::refused);
  const auto glob = with(&auth::identity::consume, {"order*"});
  EXPECT_EQ(auth::check_consume(&glob, "orders-dlq"), verdict::allowed);
}

TEST(broker_auth_test, glob_matching) {
  EXPECT_TRUE(auth::glob_match("*", ""));
  EXPECT_TRUE(auth::glob_match("*", "abc"));
  EXPECT_TRUE(auth::glob_match("a*c", "ac"));
  EXPECT_TRUE(auth::glob_match("a*c", "abbbc"));
  EXPECT_FALSE(auth::glob_match("a*c", "abcd"));
  EXPECT_TRUE(auth::glob_match("*.get", "orchestrator.get"));
  EXPECT_FALSE(auth::glob_match("*.get", "orchestrator.getx"));
  EXPECT_TRUE(auth::glob_match("a*b*c", "a-b-b-c"));
  EXPECT_TRUE(auth::glob_match("**", "x"));
  EXPECT_FALSE(auth::glob_match("abc", "ab"));
  EXPECT_FALSE(auth::glob_match("", "a"));
  EXPECT_TRUE(auth::glob_match("", ""));
}

TEST(broker_auth_test, refusal_messages_name_identity_right_and_action) {
  EXPECT_EQ(auth::refusal_message("rogue", auth::right::offer, "service 'PaymentService'"),
            "identity 'rogue' has no 'offer' right for service 'PaymentService'");
}

TEST(broker_auth_test, file_errors_name_file_path_line_and_rule) {
  fixture f;
  const auto file = f.dir.file("auth.yaml");
  const auto k = "\"" + f.orders.public_key + "\"";
  // Unknown key in an identity.
  auto e = error_of([&] { f.load("identities:\n  a:\n    keys: [" + k + "]\n    ofer: [X]\n"); });
  EXPECT_TRUE(contains(e, file + ": identities.a.ofer")) << e;
  EXPECT_TRUE(contains(e, "unknown key")) << e;
  EXPECT_TRUE(contains(e, "(line 4)")) << e;
  // Unknown top-level key.
  e = error_of([&] { f.load("identities: {}\nidentity: {}\n"); });
  EXPECT_TRUE(contains(e, "identity: unknown key")) << e;
  // A key of two identities.
  e = error_of(
      [&] { f.load("identities:\n  a:\n    keys: [" + k + "]\n  b:\n    keys: [" + k + "]\n"); });
  EXPECT_TRUE(contains(e, "identities.b.keys[0]")) << e;
  EXPECT_TRUE(contains(e, "belongs to identity 'a'")) << e;
  EXPECT_TRUE(contains(e, "(line 5)")) << e;
  // A name listed twice.
  e = error_of([&] { f.load("identities:\n  a:\n    keys: [" + k + "]\n  a:\n    keys: []\n"); });
  EXPECT_TRUE(contains(e, "identities.a")) << e;
  EXPECT_TRUE(contains(e, "listed twice")) << e;
  // A bad name.
  e = error_of([&] { f.load("identities:\n  \"pay ments\":\n    keys: [" + k + "]\n"); });
  EXPECT_TRUE(contains(e, "identities.pay ments")) << e;
  EXPECT_TRUE(contains(e, "space")) << e;
  // Bad patterns.
  e = error_of([&] { f.load("identities:\n  a:\n    keys: [" + k + "]\n    call: [Payment]\n"); });
  EXPECT_TRUE(contains(e, "identities.a.call[0]")) << e;
  EXPECT_TRUE(contains(e, "bad pattern 'Payment'")) << e;
  e = error_of(
      [&] { f.load("identities:\n  a:\n    keys: [" + k + "]\n    subscribe: [\"or der\"]\n"); });
  EXPECT_TRUE(contains(e, "identities.a.subscribe[0]")) << e;
  EXPECT_TRUE(contains(e, "bad pattern")) << e;
  e = error_of([&] { f.load("identities:\n  a:\n    keys: [" + k + "]\n    offer: [\"\"]\n"); });
  EXPECT_TRUE(contains(e, "identities.a.offer[0]")) << e;
  // A key that is neither Z85 nor a readable file.
  e = error_of([&] { f.load("identities:\n  a:\n    keys: [keys/nobody.key]\n"); });
  EXPECT_TRUE(contains(e, "identities.a.keys[0]")) << e;
  // No keys at all, and not a list of identities.
  e = error_of([&] { f.load("identities:\n  a:\n    offer: [X]\n"); });
  EXPECT_TRUE(contains(e, "identities.a: has no 'keys'")) << e;
  e = error_of([&] { f.load("identities: [a, b]\n"); });
  EXPECT_TRUE(contains(e, "identities: must be a map")) << e;
  e = error_of([&] { auth::load_auth_file(f.dir.file("missing.yaml")); });
  EXPECT_TRUE(contains(e, "cannot read")) << e;
}

TEST(broker_auth_test, diff_names_changed_identities_and_closed_keys) {
  fixture f;
  const auto before = f.load(f.example());
  // Unchanged file: nothing to do.
  auto d = auth::diff(before, f.load(f.example()));
  EXPECT_TRUE(d.changed.empty());
  EXPECT_TRUE(d.subscribe_changed.empty());
  EXPECT_TRUE(d.closed_keys.empty());

  // payments loses publish (rights changed, subscribe not); orders' key is replaced (revoked);
  // ops is removed (its key goes with it); a new identity appears (nothing to undo).
  const auto fresh = ec::generate_curve_keys();
  const auto after = f.load(
      "identities:\n"
      "  payments:\n"
      "    keys: [keys/payments.key]\n"
      "    offer: [PaymentService]\n"
      "    subscribe: [order.]\n"
      "  orders:\n"
      "    keys: [\"" +
      fresh.public_key +
      "\"]\n"
      "    call: [PaymentService.charge, \"InventoryService.*\", orchestrator.start]\n"
      "    call_own: [orchestrator.get, orchestrator.history, orchestrator.cancel]\n"
      "    consume: [orders]\n"
      "  newcomer:\n"
      "    keys: [\"" +
      ec::generate_curve_keys().public_key + "\"]\n");
  d = auth::diff(before, after);
  std::sort(d.changed.begin(), d.changed.end());
  EXPECT_EQ(d.changed, (std::vector<std::string>{"ops", "payments"}));
  EXPECT_EQ(d.subscribe_changed, std::vector<std::string>{"ops"});
  std::sort(d.closed_keys.begin(), d.closed_keys.end());
  std::vector<std::string> expected{f.orders.public_key, f.ops.public_key};
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(d.closed_keys, expected);
}

TEST(broker_auth_test, a_key_moved_to_another_identity_is_closed) {
  fixture f;
  const auto k = "\"" + f.orders.public_key + "\"";
  const auto before = f.load("identities:\n  a:\n    keys: [" + k + "]\n  b:\n    keys: []\n");
  const auto after = f.load("identities:\n  a:\n    keys: []\n  b:\n    keys: [" + k + "]\n");
  const auto d = auth::diff(before, after);
  EXPECT_EQ(d.closed_keys, std::vector<std::string>{f.orders.public_key});
  EXPECT_TRUE(d.changed.empty());  // rights are the same: peers keep their registrations
}

TEST(broker_auth_test, refusal_lines_are_limited_per_identity_and_second) {
  auth::refusal_log_limiter limiter;
  const auto t0 = std::chrono::steady_clock::time_point{} + std::chrono::hours(1);
  std::uint64_t suppressed = 0;
  std::uint32_t logged = 0;
  for (int i = 0; i < 100; ++i) logged += limiter.admit("rogue", t0, suppressed) ? 1 : 0;
  EXPECT_EQ(logged, auth::refusal_log_limiter::k_lines_per_second);
  // Another identity has its own allowance.
  EXPECT_TRUE(limiter.admit("other", t0, suppressed));
  EXPECT_EQ(suppressed, 0u);
  // The next second, the first line reports what was left out.
  EXPECT_TRUE(limiter.admit("rogue", t0 + std::chrono::seconds(1), suppressed));
  EXPECT_EQ(suppressed, 100u - auth::refusal_log_limiter::k_lines_per_second);
  EXPECT_TRUE(limiter.admit("rogue", t0 + std::chrono::seconds(1), suppressed));
  EXPECT_EQ(suppressed, 0u);
}
