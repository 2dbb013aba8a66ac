// A secured deployment's model (docs/deployments.md, "Security"): the `security:` section, the
// rights derived for each process, the keys and auth file `up` and the testkit prepare, and the
// command lines that carry them.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "ensemble/cli/deployment.hpp"
#include "ensemble/common/curve_keys.hpp"
#include "ensemble/common/result.hpp"
#include "support/deployment_cases.hpp"
#include "support/temp_dir.hpp"

namespace {

namespace ec = ensemble::cli;
using ensemble::test::temp_dir;
using json = nlohmann::json;

bool has(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

// After `flag`, the argument.
std::string after(const std::vector<std::string>& argv, const std::string& flag) {
  const auto it = std::find(argv.begin(), argv.end(), flag);
  return it == argv.end() || it + 1 == argv.end() ? std::string("(absent)") : *(it + 1);
}

std::string env_of(const ec::exec_plan& p, const std::string& name) {
  for (const auto& e : p.env) {
    if (e.rfind(name + "=", 0) == 0) return e.substr(name.size() + 1);
  }
  return "(absent)";
}

// A secured deployment with an orchestrator, a program agent with 2 replicas and extra rights,
// and a scriptable agent that reacts, publishes and consumes.
struct secured_files {
  temp_dir dir{"ensemble-secured"};
  std::string file;
  secured_files() {
    dir.write("agents/inventory.yaml",
              "name: inventory\n"
              "consume: {stream: orders}\n"
              "services:\n"
              "  InventoryService:\n"
              "    actions:\n"
              "      check: {reply: {ok: true}, publish: {topic: \"stock.${request.sku}\", "
              "payload: {}}}\n"
              "reactions:\n"
              "  - on: order.paid\n"
              "    publish: {topic: inventory.reserved, payload: {}}\n");
    // Every kind of step that calls or publishes, nested ones included, a compensation of
    // each kind, an await, a choreography and a trigger.
    dir.write("workflows/fulfil.json", R"({"workflow": {"name": "Fulfil",
      "triggers": [{"topic": "order.placed"}],
      "steps": [
        {"name": "Charge", "service": "PaymentService", "action": "charge",
         "compensate": {"service": "PaymentService", "action": "refund"}},
        {"name": "Prepare", "kind": "parallel", "branches": [
          [{"name": "Reserve", "service": "InventoryService", "action": "reserve",
            "compensate": {"publish": {"topic": "stock.release"}}}],
          [{"name": "Route", "kind": "switch", "cases": [
             {"when": "${workflow.input.total} > 100",
              "steps": [{"name": "Review", "service": "ReviewService", "action": "queue"}]}],
            "default": [{"name": "Announce", "kind": "publish", "topic": "order.accepted"}]}]]},
        {"name": "Stocked", "kind": "await", "topic": "stock.reserved", "timeout": "1m"},
        {"name": "Ship", "kind": "choreography", "start": {"topic": "order.paid"},
         "until": ["shipment.dispatched"], "fail_on": ["fulfillment.failed"], "timeout": "1h"}]}})");
    file = dir.write("deployment.yaml",
                     "security: curve\n"
                     "streams: [{name: orders, topics: [order., inventory.]}]\n"
                     "orchestrator: {store: \":memory:\", workflows: [workflows/]}\n"
                     "agents:\n"
                     "  - name: payments\n"
                     "    program: /bin/true\n"
                     "    services: [PaymentService]\n"
                     "    replicas: 2\n"
                     "    rights: {publish: [payment.]}\n"
                     "  - name: inventory\n"
                     "    spec: agents/inventory.yaml\n");
  }
};

}  // namespace

TEST(deployment_security, the_section_short_and_long_and_its_errors) {
  const auto plain = ec::parse_deployment("agents: []\n", "/x/deployment.yaml");
  EXPECT_EQ(plain.security.kind, ec::security_section::mode::none);

  const auto short_form = ec::parse_deployment("security: curve\n", "/x/deployment.yaml");
  EXPECT_EQ(short_form.security.kind, ec::security_section::mode::curve);
  EXPECT_EQ(short_form.security.keys_dir, "/x/.ensemble/keys");

  const auto long_form = ec::parse_deployment(
      "security:\n  mode: curve\n  keys: secrets\n  identities:\n"
      "    auditor: {call: [orchestrator.get], subscribe: [order.]}\n",
      "/x/deployment.yaml");
  EXPECT_EQ(long_form.security.keys_dir, "/x/secrets");
  ASSERT_EQ(long_form.security.identities.count("auditor"), 1u);
  EXPECT_EQ(long_form.security.identities.at("auditor").call,
            std::vector<std::string>{"orchestrator.get"});

  const std::vector<ensemble::test::refused_deployment> cases = {
      {"security: tls\n", "d.yaml: security", "unknown security mode \"tls\""},
      {"security: {mode: curve, key: x}\n", "d.yaml: security.key", "unknown key"},
      {"security: {keys: x}\n", "d.yaml: security", "missing required key \"mode\""},
      {"security: {mode: curve, identities: {\"a b\": {}}}\n", "d.yaml: security.identities.a b",
       "not a valid identity name"},
      {"security: {mode: curve, identities: {a: {cal: []}}}\n", "d.yaml: security.identities.a.cal",
       "unknown key"},
      {"agents:\n  - name: a\n    program: x\n    rights: {publish: order.}\n",
       "d.yaml: agents[0].rights.publish", "must be a list of strings"},
  };
  ensemble::test::expect_each_refused(cases);
}

TEST(deployment_security, rights_are_derived_from_what_the_deployment_declares) {
  secured_files f;
  const auto d = ec::load_deployment(f.file);
  const auto plan = ec::plan_processes(d, "/bin/true");
  const auto rights = ec::derive_rights(d, plan);

  // Every process but the broker, each replica on its own, and the user.
  std::vector<std::string> names;
  for (const auto& [name, r] : rights) names.push_back(name);
  EXPECT_EQ(names, (std::vector<std::string>{"inventory", "orchestrator", "payments-1",
                                             "payments-2", "user"}));

  const auto& pay = rights.at("payments-2");
  EXPECT_EQ(pay.offer, std::vector<std::string>{"PaymentService"});
  EXPECT_EQ(pay.publish, std::vector<std::string>{"payment."});  // its `rights:`
  EXPECT_TRUE(pay.call.empty());
  EXPECT_TRUE(pay.subscribe.empty());

  const auto& inv = rights.at("inventory");
  EXPECT_EQ(inv.offer, std::vector<std::string>{"InventoryService"});
  EXPECT_TRUE(has(inv.publish, "stock.")) << "a template's fixed part";
  EXPECT_TRUE(has(inv.publish, "inventory.reserved"));
  EXPECT_EQ(inv.subscribe, std::vector<std::string>{"order.paid"});
  EXPECT_EQ(inv.consume, std::vector<std::string>{"orders"});
  EXPECT_TRUE(inv.admin.empty());

  // The orchestrator: what its workflows do, nothing more.
  auto sorted = [](std::vector<std::string> v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  const auto& orch = rights.at("orchestrator");
  EXPECT_EQ(orch.offer, std::vector<std::string>{"orchestrator"});
  EXPECT_EQ(sorted(orch.call),
            (std::vector<std::string>{"InventoryService.reserve", "PaymentService.charge",
                                      "PaymentService.refund", "ReviewService.queue"}));
  EXPECT_EQ(sorted(orch.publish), (std::vector<std::string>{"order.accepted", "order.paid",
                                                            "stock.release", "workflow.Fulfil."}));
  EXPECT_EQ(sorted(orch.subscribe),
            (std::vector<std::string>{"fulfillment.failed", "order.placed", "shipment.dispatched",
                                      "stock.reserved"}));
  EXPECT_EQ(orch.consume, std::vector<std::string>{"*"});
  EXPECT_TRUE(has(orch.admin, "trace"));
  EXPECT_FALSE(has(orch.admin, "*"));

  const auto& user = rights.at("user");
  EXPECT_EQ(user.admin, std::vector<std::string>{"*"});
  EXPECT_EQ(user.subscribe, std::vector<std::string>{""});
}

TEST(deployment_security, keys_are_generated_once_and_reused_and_commands_carry_them) {
  secured_files f;
  auto d = ec::load_deployment(f.file);
  d.security.keys_dir = f.dir.file("keys");
  const auto plan = ec::plan_processes(d, "/bin/true");
  ec::prepare_security(d, plan);

  ASSERT_FALSE(d.keys.auth_file.empty());
  const auto first =
      ensemble::common::read_curve_key_file(d.keys.secret_files.at("inventory"), "inventory", true);
  struct stat st {};
  ASSERT_EQ(::stat(d.keys.secret_files.at("inventory").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  std::ifstream in(d.keys.auth_file);
  const auto auth = json::parse(in);
  ASSERT_TRUE(auth.contains("identities"));
  EXPECT_EQ(auth["identities"]["inventory"]["keys"], json::array({"inventory.key"}));
  EXPECT_EQ(auth["identities"]["inventory"]["consume"], json::array({"orders"}));
  EXPECT_FALSE(auth["identities"].contains("broker"));
  EXPECT_EQ(ensemble::common::read_public_key("inventory.key", "auth", f.dir.file("keys")),
            first.public_key);

  // A second start reuses the keys: identities outlive a run.
  auto again = ec::load_deployment(f.file);
  again.security.keys_dir = f.dir.file("keys");
  ec::prepare_security(again, ec::plan_processes(again, "/bin/true"));
  EXPECT_EQ(ensemble::common::read_curve_key_file(again.keys.secret_files.at("inventory"),
                                                  "inventory", true)
                .public_key,
            first.public_key);

  for (const auto& p : plan) {
    const auto cmd = ec::command_for(p, d, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2");
    if (p.kind == ec::process_role::broker) {
      EXPECT_EQ(after(cmd.argv, "--curve-key"), d.keys.broker_secret);
      EXPECT_EQ(after(cmd.argv, "--auth"), d.keys.auth_file);
      EXPECT_EQ(env_of(cmd, "ENSEMBLE_KEY"), "(absent)");
      continue;
    }
    EXPECT_EQ(env_of(cmd, "ENSEMBLE_KEY"), d.keys.secret_files.at(p.name)) << p.name;
    EXPECT_EQ(env_of(cmd, "ENSEMBLE_BROKER_KEY"), d.keys.broker_public) << p.name;
    if (p.kind == ec::process_role::orchestrator || p.name == "inventory") {
      EXPECT_EQ(after(cmd.argv, "--key"), d.keys.secret_files.at(p.name)) << p.name;
      EXPECT_EQ(after(cmd.argv, "--broker-key"), d.keys.broker_public) << p.name;
    }
  }
}

TEST(deployment_security, a_plain_deployment_gets_no_keys) {
  temp_dir dir("ensemble-plain");
  const auto file = dir.write("deployment.yaml", "orchestrator: {}\n");
  auto d = ec::load_deployment(file);
  const auto plan = ec::plan_processes(d, "/bin/true");
  ec::prepare_security(d, plan);
  EXPECT_TRUE(d.keys.auth_file.empty());
  EXPECT_FALSE(std::filesystem::exists(dir.file(".ensemble/keys")));
  for (const auto& p : plan) {
    const auto cmd = ec::command_for(p, d, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2");
    EXPECT_EQ(after(cmd.argv, "--curve-key"), "(absent)");
    EXPECT_EQ(after(cmd.argv, "--key"), "(absent)");
    EXPECT_EQ(env_of(cmd, "ENSEMBLE_KEY"), "(absent)");
  }
}
