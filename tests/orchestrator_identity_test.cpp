// Who may complete a step and who may see an instance, against a real broker process and real
// SDK agents: "from" on await and choreography steps ignores (and counts) events of publishers
// it does not list, `start` records its caller as started_by, and a caller_scope "own" caller
// acts only on the instances it started (docs/workflows.md, "Who may complete a step" and "Who
// started an instance"). Plain mode: `publisher` is the agent name the publisher gave itself;
// the secured tests at the end run the same rules on identities the broker authenticated.
#include "ensemble/common/curve_keys.hpp"
#include "support/orchestrator_fixture.hpp"

namespace ensemble::test {
namespace {

using orchestrator_identity_test = orchestrator_fixture;

std::uint64_t ignored(eo::orchestrator& o, const std::string& topic = "") {
  auto s = o.request("stats", json::object());
  if (!s) return 0;
  if (topic.empty()) return s->value("events_ignored_from", std::uint64_t{0});
  return s->value("events_ignored_from_by_topic", json::object()).value(topic, std::uint64_t{0});
}

TEST_F(orchestrator_identity_test,
       await_from_ignores_other_publishers_until_a_listed_one_publishes) {
  auto& mallory = add_agent("mallory", [](ea::agent&) {});
  auto& shipping = add_agent("shipping", [](ea::agent&) {});
  const json def = json::parse(R"({"workflow": {"name": "Ship", "steps": [
    {"name": "Shipped", "kind": "await", "topic": "parcel.shipped", "from": ["shipping"],
     "timeout": "1h"}],
    "output": {"by": "${steps.Shipped.output.by}"}}})");
  auto& o = start_orchestrator({write("ship.json", def)});
  const auto id = start("Ship", json::object());
  ASSERT_TRUE(wait_awaiting(id, "Shipped"));
  const auto view = o.request("get", {{"id", id}});
  ASSERT_TRUE(view);
  EXPECT_EQ((*view)["steps"]["Shipped"]["waiting"]["from"], json::array({"shipping"}));

  ea::send_options corr;
  corr.correlation_id = id;
  ASSERT_TRUE(
      mallory.publish_acked("parcel.shipped", ea::to_json_payload({{"by", "mallory"}}), 2s, corr));
  ASSERT_TRUE(tk::wait_until([&] { return ignored(o) == 1; }, 10s, 10ms));
  auto still = o.request("get", {{"id", id}});
  ASSERT_TRUE(still);
  EXPECT_EQ((*still)["status"], "running") << "an event of an unlisted publisher completed it";
  EXPECT_EQ((*still)["steps"]["Shipped"]["status"], "running");

  ASSERT_TRUE(shipping.publish_acked("parcel.shipped", ea::to_json_payload({{"by", "shipping"}}),
                                     2s, corr));
  const json done = wait_done(id);
  ASSERT_EQ(done["status"], "completed") << done.dump(2);
  EXPECT_EQ(done["output"]["by"], "shipping");
  EXPECT_EQ(done["steps"]["Shipped"]["event"]["publisher"], "shipping");
  EXPECT_EQ(ignored(o), 1u);
  EXPECT_EQ(ignored(o, "parcel.shipped"), 1u);
  auto stats = o.request("stats", json::object());
  ASSERT_TRUE(stats);
  EXPECT_EQ((*stats)["buffered_events"], 0) << "the ignored event was buffered";
}

// The unlisted publisher answers while the command runs, i.e. possibly before the await starts:
// whether the event is met by the waiting step or found in the buffer when the step starts, it
// is not the step's answer.
TEST_F(orchestrator_identity_test,
       an_early_event_of_an_unlisted_publisher_is_not_taken_from_the_buffer) {
  add_agent("mallory", [](ea::agent& a) {
    a.handle("Inventory", "reserve", [&a](const ea::message&) -> ea::handler_result {
      auto p = a.publish_acked("stock.reserved", ea::to_json_payload({{"by", "mallory"}}), 2s);
      if (!p) return p.err();
      return ea::to_json_payload({{"ok", true}});
    });
  });
  auto& inventory = add_agent("inventory", [](ea::agent&) {});
  const json def = json::parse(R"({"workflow": {"name": "Reserve", "steps": [
    {"name": "Ask", "service": "Inventory", "action": "reserve"},
    {"name": "Reserved", "kind": "await", "topic": "stock.reserved", "from": ["inventory"],
     "timeout": "1h"}],
    "output": {"by": "${steps.Reserved.output.by}"}}})");
  auto& o = start_orchestrator({write("reserve.json", def)});
  const auto id = start("Reserve", json::object());
  ASSERT_TRUE(tk::wait_until([&] { return ignored(o, "stock.reserved") == 1; }, 10s, 10ms));
  auto still = o.request("get", {{"id", id}});
  ASSERT_TRUE(still);
  EXPECT_EQ((*still)["steps"]["Reserved"]["status"], "running") << still->dump(2);

  ea::send_options corr;
  corr.correlation_id = id;
  ASSERT_TRUE(inventory.publish_acked("stock.reserved", ea::to_json_payload({{"by", "inventory"}}),
                                      2s, corr));
  const json done = wait_done(id);
  ASSERT_EQ(done["status"], "completed") << done.dump(2);
  EXPECT_EQ(done["output"]["by"], "inventory");
  EXPECT_EQ(ignored(o), 1u);
}

// A choreography's outcome topics, `fail_on` included: a failure announced by an unlisted
// publisher does not fail the step. The listed publisher reacts to that very event, so the
// orchestrator sees the forged failure first (the broker fans it out before the reaction is
// even published).
TEST_F(orchestrator_identity_test,
       choreography_from_ignores_a_forged_failure_and_ends_on_the_real_outcome) {
  add_agent("mallory", [](ea::agent& a) {
    (void)a.subscribe("ship.requested", [&a](const ea::message&) {
      (void)a.publish("ship.refused", ea::to_json_payload({{"by", "mallory"}}));
    });
  });
  add_agent("shipping", [](ea::agent& a) {
    (void)a.subscribe("ship.refused", [&a](const ea::message& e) {
      if (e.publisher() != "mallory") return;
      (void)a.publish("ship.dispatched", ea::to_json_payload({{"by", "shipping"}}));
    });
  });
  const json def = json::parse(R"({"workflow": {"name": "Fulfil", "steps": [
    {"name": "Ship", "kind": "choreography", "start": {"topic": "ship.requested"},
     "until": ["ship.dispatched"], "fail_on": ["ship.refused"], "from": ["shipping"],
     "timeout": "1h"}],
    "output": {"by": "${steps.Ship.output.by}"}}})");
  auto& o = start_orchestrator({write("fulfil.json", def)});
  const json done = wait_done(start("Fulfil", json::object()));
  ASSERT_EQ(done["status"], "completed") << done.dump(2);
  EXPECT_EQ(done["output"]["by"], "shipping");
  EXPECT_EQ(ignored(o, "ship.refused"), 1u);
  EXPECT_EQ(ignored(o), 1u);
}

TEST_F(orchestrator_identity_test, started_by_is_recorded_shown_and_inherited_by_sub_workflows) {
  const json parent = json::parse(R"({"workflow": {"name": "Parent", "steps": [
    {"name": "Child", "kind": "workflow", "workflow": "Child"}]}})");
  const json child = json::parse(R"({"workflow": {"name": "Child", "steps": [
    {"name": "Hold", "kind": "wait", "duration": "1h"}]}})");
  auto& o = start_orchestrator({write("parent.json", parent), write("child.json", child)},
                               dir_ + "/store.db");
  const eo::requester alice{.caller = "alice", .scope = ""};
  auto started = o.request("start", {{"workflow", "Parent"}, {"id", "p-1"}}, 5s, alice);
  ASSERT_TRUE(started) << started.err().to_string();
  auto view = o.request("get", {{"id", "p-1"}});
  ASSERT_TRUE(view);
  EXPECT_EQ((*view)["started_by"], "alice");
  const std::string child_id = (*view)["steps"]["Child"]["waiting"]["child_id"];
  auto child_view = o.request("get", {{"id", child_id}});
  ASSERT_TRUE(child_view);
  EXPECT_EQ((*child_view)["started_by"], "alice") << "a sub-workflow has its parent's started_by";
  auto listed = o.request("list", json::object());
  ASSERT_TRUE(listed);
  ASSERT_EQ((*listed)["instances"].size(), 2u);
  for (const auto& i : (*listed)["instances"]) EXPECT_EQ(i["started_by"], "alice") << i.dump();
  auto history = o.request("history", {{"id", "p-1"}});
  ASSERT_TRUE(history);
  EXPECT_EQ((*history)["entries"][0]["kind"], "started");
  EXPECT_EQ((*history)["entries"][0]["data"]["started_by"], "alice");

  // Without a requester nobody is recorded; and started_by survives a restart (it is stored).
  auto anonymous = o.request("start", {{"workflow", "Child"}, {"id", "anon"}});
  ASSERT_TRUE(anonymous);
  orchestrator_.reset();
  auto& again = start_orchestrator({write("parent.json", parent), write("child.json", child)},
                                   dir_ + "/store.db");
  auto reread = again.request("get", {{"id", "p-1"}});
  ASSERT_TRUE(reread);
  EXPECT_EQ((*reread)["started_by"], "alice");
  auto anon_view = again.request("get", {{"id", "anon"}});
  ASSERT_TRUE(anon_view);
  EXPECT_FALSE(anon_view->contains("started_by")) << anon_view->dump();
}

// Through the broker: the DISPATCH's `caller` (in plain mode the calling agent's name) is who
// started the instance. Plain mode never sets caller_scope, so every caller sees everything.
TEST_F(orchestrator_identity_test, the_service_records_the_dispatch_caller_as_started_by) {
  const json slow = json::parse(R"({"workflow": {"name": "Slowly", "steps": [
    {"name": "Hold", "kind": "wait", "duration": "1h"}]}})");
  start_orchestrator({write("slowly.json", slow)});
  auto& alice = add_agent("alice", [](ea::agent&) {});
  auto& bob = add_agent("bob", [](ea::agent&) {});
  auto call = [](ea::agent& as, const std::string& action, const json& args) -> json {
    auto r = as.call("orchestrator", action, ea::to_json_payload(args), 5s);
    EXPECT_TRUE(r) << action << ": " << (r ? "" : r.err().to_string());
    if (!r) return json::object();
    auto body = ea::from_json_payload(r->payload());
    return body ? *body : json::object();
  };
  call(alice, "start", {{"workflow", "Slowly"}, {"id", "by-alice"}});
  call(bob, "start", {{"workflow", "Slowly"}, {"id", "by-bob"}});
  EXPECT_EQ(call(bob, "get", {{"id", "by-alice"}}).value("started_by", ""), "alice");
  EXPECT_EQ(call(alice, "get", {{"id", "by-bob"}}).value("started_by", ""), "bob");
  const json listed = call(alice, "list", json::object());
  std::map<std::string, std::string> starters;
  for (const auto& i : listed.value("instances", json::array())) {
    starters[i.value("id", "")] = i.value("started_by", "");
  }
  EXPECT_EQ(starters,
            (std::map<std::string, std::string>{{"by-alice", "alice"}, {"by-bob", "bob"}}));
  EXPECT_EQ(call(alice, "cancel", {{"id", "by-bob"}}).value("status", ""), "cancelled");
}

TEST_F(orchestrator_identity_test, an_own_scope_caller_acts_only_on_the_instances_it_started) {
  const json slow = json::parse(R"({"workflow": {"name": "Slowly", "steps": [
    {"name": "Hold", "kind": "wait", "duration": "1h"}]}})");
  auto& o = start_orchestrator({write("slowly.json", slow)});
  const eo::requester alice{.caller = "alice", .scope = "own"};
  const eo::requester bob{.caller = "bob", .scope = "own"};
  const eo::requester ops{.caller = "ops", .scope = ""};
  ASSERT_TRUE(o.request("start", {{"workflow", "Slowly"}, {"id", "a-1"}}, 5s, alice));
  ASSERT_TRUE(o.request("start", {{"workflow", "Slowly"}, {"id", "a-2"}}, 5s, alice));
  ASSERT_TRUE(o.request("start", {{"workflow", "Slowly"}, {"id", "b-1"}}, 5s, bob));

  auto expect_refused = [&](const std::string& action, const json& args) {
    auto r = o.request(action, args, 5s, bob);
    ASSERT_FALSE(r) << action << " of alice's instance was allowed to bob: " << r->dump();
    EXPECT_EQ(r.err().code, "unauthorized") << r.err().to_string();
    EXPECT_FALSE(r.err().retryable);
    for (const std::string& word : std::vector<std::string>{"'bob'", action, "\"a-1\""}) {
      EXPECT_NE(r.err().message.find(word), std::string::npos)
          << "'" << word << "' not in: " << r.err().message;
    }
  };
  expect_refused("get", {{"id", "a-1"}});
  expect_refused("history", {{"id", "a-1"}});
  expect_refused("cancel", {{"id", "a-1"}});
  expect_refused("start", {{"workflow", "Slowly"}, {"id", "a-1"}});  // would show its status
  auto still = o.request("get", {{"id", "a-1"}});
  ASSERT_TRUE(still);
  EXPECT_EQ((*still)["status"], "running") << "the refused cancel changed the instance";

  // Its own instances: everything as usual.
  auto own_get = o.request("get", {{"id", "b-1"}}, 5s, bob);
  ASSERT_TRUE(own_get) << own_get.err().to_string();
  EXPECT_EQ((*own_get)["started_by"], "bob");
  ASSERT_TRUE(o.request("history", {{"id", "b-1"}}, 5s, bob));
  auto bob_list = o.request("list", json::object(), 5s, bob);
  ASSERT_TRUE(bob_list);
  ASSERT_EQ((*bob_list)["instances"].size(), 1u);
  EXPECT_EQ((*bob_list)["instances"][0]["id"], "b-1");
  auto alice_list = o.request("list", {{"status", "running"}}, 5s, alice);
  ASSERT_TRUE(alice_list);
  EXPECT_EQ((*alice_list)["instances"].size(), 2u);
  auto unknown = o.request("get", {{"id", "nobody-has-it"}}, 5s, bob);
  ASSERT_FALSE(unknown);
  EXPECT_EQ(unknown.err().code, "not_found");
  EXPECT_TRUE(o.request("definitions", json::object(), 5s, bob));
  EXPECT_TRUE(o.request("stats", json::object(), 5s, bob));
  auto cancelled = o.request("cancel", {{"id", "b-1"}}, 5s, bob);
  ASSERT_TRUE(cancelled) << cancelled.err().to_string();

  // Without caller_scope every caller may act on every instance, as before.
  auto by_ops = o.request("cancel", {{"id", "a-1"}}, 5s, ops);
  ASSERT_TRUE(by_ops) << by_ops.err().to_string();
  auto all = o.request("list", json::object(), 5s, ops);
  ASSERT_TRUE(all);
  EXPECT_EQ((*all)["instances"].size(), 3u);

  // A scope this orchestrator does not know grants nothing; nor does "own" without a caller.
  auto odd = o.request("list", json::object(), 5s, eo::requester{.caller = "bob", .scope = "team"});
  ASSERT_FALSE(odd);
  EXPECT_EQ(odd.err().code, "unauthorized");
  EXPECT_NE(odd.err().message.find("'team'"), std::string::npos) << odd.err().message;
  auto nobody = o.request("get", {{"id", "a-2"}}, 5s, eo::requester{.caller = "", .scope = "own"});
  ASSERT_FALSE(nobody);
  EXPECT_EQ(nobody.err().code, "unauthorized");
}

// Secured mode, end to end: a broker with CURVE keys and an auth file, the orchestrator and its
// callers connected with their keys. The broker stamps the authenticated identity as `caller`
// and `publisher`, and `caller_scope: own` on requests that only a call_own right allows.
constexpr const char* k_auth = R"(identities:
  orchestrator:
    keys: [keys/orchestrator.key]
    offer: [orchestrator]
    publish: [""]
    subscribe: [""]
    admin: ["*"]
  alice:
    keys: [keys/alice.key]
    call: [orchestrator.start]
    call_own: ["orchestrator.*"]
  bob:
    keys: [keys/bob.key]
    call: [orchestrator.start]
    call_own: ["orchestrator.*"]
  ops:
    keys: [keys/ops.key]
    call: ["orchestrator.*"]
  shipping:
    keys: [keys/shipping.key]
    publish: [parcel.]
  mallory:
    keys: [keys/mallory.key]
    publish: [parcel.]
)";

class orchestrator_secured_test : public orchestrator_fixture {
 protected:
  void SetUp() override {
    if (!common::curve_available()) GTEST_SKIP() << "this libzmq has no CURVE";
    orchestrator_fixture::SetUp();
    broker_.reset();
    for (const char* name :
         {"broker", "orchestrator", "alice", "bob", "ops", "shipping", "mallory"}) {
      common::write_curve_key_files(dir_ + "/keys", name, common::generate_curve_keys(), true);
    }
    std::ofstream(dir_ + "/auth.yaml") << k_auth;
    broker_ = tk::broker_process::start({"--heartbeat", "200", "--log-level", "warn", "--curve-key",
                                         dir_ + "/keys/broker.key_secret", "--auth",
                                         dir_ + "/auth.yaml"});
  }

  eo::orchestrator& start_secured_orchestrator(const std::vector<std::string>& workflows) {
    eo::options o;
    o.broker = broker_->router();
    o.events = broker_->events();
    o.workflows = workflows;
    o.key_file = dir_ + "/keys/orchestrator.key_secret";
    o.broker_key = dir_ + "/keys/broker.key";
    orchestrator_ = std::make_unique<eo::orchestrator>(o);
    auto s = orchestrator_->start();
    EXPECT_TRUE(s) << (s ? "" : s.err().to_string());
    return *orchestrator_;
  }

  // An agent known by its key: no name, it takes its identity's.
  ea::agent& keyed(const std::string& identity) {
    ea::options o;
    o.broker = broker_->router();
    o.events = broker_->events();
    o.key_file = dir_ + "/keys/" + identity + ".key_secret";
    o.broker_key = dir_ + "/keys/broker.key";
    auto a = std::make_unique<ea::agent>(o);
    auto s = a->start();
    EXPECT_TRUE(s) << identity << ": " << (s ? "" : s.err().to_string());
    agents_.push_back(std::move(a));
    return *agents_.back();
  }

  static common::result<json> call(ea::agent& as, const std::string& action, const json& args) {
    auto r = as.call("orchestrator", action, ea::to_json_payload(args), 5s);
    if (!r) return r.err();
    return ea::from_json_payload(r->payload());
  }
};

TEST_F(orchestrator_secured_test,
       a_call_own_caller_sees_and_cancels_only_the_instances_it_started) {
  const json slow = json::parse(R"({"workflow": {"name": "Slowly", "steps": [
    {"name": "Hold", "kind": "wait", "duration": "1h"}]}})");
  start_secured_orchestrator({write("slowly.json", slow)});
  auto& alice = keyed("alice");
  auto& bob = keyed("bob");
  auto& ops = keyed("ops");
  ASSERT_TRUE(call(alice, "start", {{"workflow", "Slowly"}, {"id", "a-1"}}));
  ASSERT_TRUE(call(bob, "start", {{"workflow", "Slowly"}, {"id", "b-1"}}));

  auto mine = call(alice, "get", {{"id", "a-1"}});
  ASSERT_TRUE(mine) << mine.err().to_string();
  EXPECT_EQ((*mine)["started_by"], "alice");
  for (const std::string action : {"get", "history", "cancel"}) {
    auto refused = call(bob, action, {{"id", "a-1"}});
    ASSERT_FALSE(refused) << action << " of alice's instance was allowed to bob";
    EXPECT_EQ(refused.err().code, "unauthorized") << refused.err().to_string();
    EXPECT_NE(refused.err().message.find("'bob'"), std::string::npos) << refused.err().message;
    EXPECT_NE(refused.err().message.find(action), std::string::npos) << refused.err().message;
    EXPECT_NE(refused.err().message.find("\"a-1\""), std::string::npos) << refused.err().message;
  }
  auto bob_list = call(bob, "list", json::object());
  ASSERT_TRUE(bob_list) << bob_list.err().to_string();
  ASSERT_EQ((*bob_list)["instances"].size(), 1u) << bob_list->dump();
  EXPECT_EQ((*bob_list)["instances"][0]["id"], "b-1");
  // A `call` right (no caller_scope) acts on everything.
  auto all = call(ops, "list", json::object());
  ASSERT_TRUE(all) << all.err().to_string();
  EXPECT_EQ((*all)["instances"].size(), 2u);
  auto by_ops = call(ops, "get", {{"id", "a-1"}});
  ASSERT_TRUE(by_ops) << by_ops.err().to_string();
  EXPECT_EQ((*by_ops)["status"], "running") << "bob's refused cancel changed it";
  auto cancelled = call(bob, "cancel", {{"id", "b-1"}});
  ASSERT_TRUE(cancelled) << cancelled.err().to_string();
}

// `publisher` is the authenticated identity: an agent cannot pass for `shipping` (its HELLO
// would be refused), so "from" tells the real shipping service from anyone else allowed to
// publish the topic.
TEST_F(orchestrator_secured_test, from_names_identities_that_no_other_peer_can_pass_for) {
  const json def = json::parse(R"({"workflow": {"name": "Ship", "steps": [
    {"name": "Shipped", "kind": "await", "topic": "parcel.shipped", "from": ["shipping"],
     "timeout": "1h"}],
    "output": {"by": "${steps.Shipped.output.by}"}}})");
  auto& o = start_secured_orchestrator({write("ship.json", def)});
  auto& mallory = keyed("mallory");
  auto& shipping = keyed("shipping");
  const auto id = start("Ship", json::object());
  ASSERT_TRUE(wait_awaiting(id, "Shipped"));
  ea::send_options corr;
  corr.correlation_id = id;
  ASSERT_TRUE(
      mallory.publish_acked("parcel.shipped", ea::to_json_payload({{"by", "mallory"}}), 2s, corr));
  ASSERT_TRUE(tk::wait_until([&] { return ignored(o, "parcel.shipped") == 1; }, 10s, 10ms));
  ASSERT_TRUE(shipping.publish_acked("parcel.shipped", ea::to_json_payload({{"by", "shipping"}}),
                                     2s, corr));
  const json done = wait_done(id);
  ASSERT_EQ(done["status"], "completed") << done.dump(2);
  EXPECT_EQ(done["output"]["by"], "shipping");
  EXPECT_EQ(done["steps"]["Shipped"]["event"]["publisher"], "shipping");
}

}  // namespace
}  // namespace ensemble::test
