// `ensemble validate` and `ensemble-orchestrator --validate`, run as the real binaries: every
// problem of a file in one run (file, JSON path, in file order, then a count), the likely typo
// when a step has no kind, sub-workflows that no file provides, deployments' workflows and
// problems, and exit codes that are the same for both commands (docs/workflows.md, "Validating").
#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/orchestrator/definition.hpp"
#include "ensemble/testkit/process.hpp"
#include "support/cli_outcome.hpp"

namespace tk = ensemble::testkit;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

constexpr auto k_deadline = 30s;

using ensemble::test::outcome;

outcome run(const std::string& program, std::vector<std::string> args) {
  auto p = tk::process::spawn({tk::binary_path(program), std::move(args), {}, {}, program});
  return ensemble::test::finish(*p, k_deadline);
}

// Both commands on the same arguments.
outcome validate(std::vector<std::string> args) {
  args.insert(args.begin(), "validate");
  return run("ensemble", std::move(args));
}
outcome orchestrator_validate(std::vector<std::string> files, std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"--validate"};
  args.insert(args.end(), files.begin(), files.end());
  args.insert(args.end(), extra.begin(), extra.end());
  return run("ensemble-orchestrator", std::move(args));
}

class validate_cli : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "ensemble-validate-XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }
  std::string write(const std::string& name, const std::string& text) const {
    const auto p = dir_ / name;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
    return p.string();
  }
  static std::string workflow(const std::string& name, const std::string& steps) {
    return R"({"workflow": {"name": ")" + name + R"(", "steps": )" + steps + "}}\n";
  }

  fs::path dir_;
};

TEST_F(validate_cli, reports_every_problem_of_a_file_in_order_then_a_count) {
  // A duplicate step name and a bad duration: both, with file, JSON path, line and column.
  const auto bad = write("bad.json", workflow("Bad", R"([
  {"name": "A", "service": "S", "action": "a"},
  {"name": "A", "service": "S", "action": "b"},
  {"name": "W", "kind": "wait", "duration": "soon"}])"));
  const auto good =
      write("good.json", workflow("Good", R"([{"name": "A", "kind": "wait", "duration": 5}])"));
  for (const auto& o : {validate({good, bad}), orchestrator_validate({good, bad})}) {
    EXPECT_EQ(o.code, ensemble::orchestrator::k_invalid) << o;
    EXPECT_TRUE(o.has(good + ": ok (Good v1, 1 top-level step(s))")) << o;
    const int name = o.index(bad + ": /workflow/steps/1/name: duplicate step name \"A\"");
    const int duration = o.index(bad + ": /workflow/steps/2/duration: must be a duration");
    const int count = o.index("2 problems found");
    EXPECT_GE(name, 0) << o;
    EXPECT_GT(duration, name) << o;
    EXPECT_GT(count, duration) << o;
    EXPECT_TRUE(o.has("(line 3, column 4)")) << o;
    EXPECT_FALSE(o.has(bad + ": ok")) << o;
  }
}

TEST_F(validate_cli, names_the_likely_typo_when_a_step_has_no_kind) {
  const auto typo =
      write("typo.json", workflow("Typo", R"([{"name": "A", "servce": "S", "action": "a"}])"));
  for (const auto& o : {validate({typo}), orchestrator_validate({typo})}) {
    EXPECT_EQ(o.code, 1) << o;
    EXPECT_TRUE(o.has(typo + ": /workflow/steps/0/servce: unknown key \"servce\" in a step "
                             "(did you mean \"service\"?)"))
        << o;
    EXPECT_FALSE(o.has("missing required key \"kind\"")) << o;
    EXPECT_TRUE(o.has("1 problem found")) << o;
  }
}

TEST_F(validate_cli, a_sub_workflow_no_file_provides_is_an_error) {
  const auto parent = write(
      "parent.json",
      workflow("Parent", R"([{"name": "Ship", "kind": "workflow", "workflow": "Shipping"}])"));
  const auto child =
      write("flows/shipping.json",
            workflow("Shipping", R"([{"name": "S", "kind": "wait", "duration": 5}])"));
  for (const auto& o : {validate({parent}), orchestrator_validate({parent})}) {
    EXPECT_EQ(o.code, 1) << o;
    EXPECT_TRUE(o.has(parent + ": /workflow/steps/0/workflow: no definition provides workflow "
                               "\"Shipping\""))
        << o;
    EXPECT_FALSE(o.has(parent + ": ok")) << o;
  }
  // Among the files given; among the orchestrator's --workflows; among a deployment's.
  const auto deployment =
      write("deployment.yaml", "orchestrator:\n  workflows: flows/\nagents: []\n");
  for (const auto& o : {validate({parent, child}), orchestrator_validate({parent, child}),
                        orchestrator_validate({parent}, {"--workflows", (dir_ / "flows").string()}),
                        validate({parent, "--deployment", deployment})}) {
    EXPECT_EQ(o.code, 0) << o;
    EXPECT_TRUE(o.has(parent + ": ok (Parent v1, 1 top-level step(s))")) << o;
    EXPECT_FALSE(o.has("problem")) << o;
  }
}

TEST_F(validate_cli, reports_every_problem_of_a_deployment_and_its_specs) {
  write("payments.yaml",
        "services:\n  P:\n    actions:\n      charge:\n        latncy: 20ms\n"
        "        crash_after: 0\n");
  const auto deployment = write("deployment.yaml",
                                "brokr: {}\n"
                                "agents:\n"
                                "  - name: a\n"
                                "    program: x\n"
                                "    replicas: many\n"
                                "  - name: pay\n"
                                "    spec: payments.yaml\n");
  const auto o = validate({"--deployment", deployment});
  EXPECT_EQ(o.code, 1) << o;
  EXPECT_TRUE(o.has(deployment + ": brokr: unknown key \"brokr\" in a deployment (did you mean "
                                 "\"broker\"?)"))
      << o;
  EXPECT_TRUE(o.has(deployment + ": agents[0].replicas: must be an integer from 1 to 100, got "
                                 "\"many\" (line 5, column 5)"))
      << o;
  // The deployment is invalid, so its specs are not read yet: fix it, then the spec's two.
  const auto fixed = write("deployment.yaml", "agents:\n  - name: pay\n    spec: payments.yaml\n");
  const auto s = validate({"--deployment", fixed});
  EXPECT_EQ(s.code, 1) << s;
  EXPECT_TRUE(s.has("payments.yaml: services.P.actions.charge.latncy: unknown key")) << s;
  EXPECT_TRUE(s.has("payments.yaml: services.P.actions.charge.crash_after: must be a whole")) << s;
  EXPECT_TRUE(s.has("2 problems found")) << s;
}

TEST_F(validate_cli, both_commands_exit_with_the_documented_codes) {
  const auto good =
      write("good.json", workflow("Good", R"([{"name": "A", "kind": "wait", "duration": 5}])"));
  const auto bad = write("bad.json", workflow("Bad", R"([{"name": "A", "kind": "wait"}])"));
  const auto missing = (dir_ / "missing.json").string();
  // 0: valid.
  EXPECT_EQ(validate({good}).code, 0);
  EXPECT_EQ(orchestrator_validate({good}).code, 0);
  // 1: a problem, or a file that does not exist (still reported with the others).
  EXPECT_EQ(validate({good, bad}).code, 1);
  EXPECT_EQ(orchestrator_validate({good, bad}).code, 1);
  for (const auto& o : {validate({missing, good}), orchestrator_validate({missing, good})}) {
    EXPECT_EQ(o.code, 1) << o;
    EXPECT_TRUE(o.has(missing + ": no such file or directory")) << o;
    EXPECT_TRUE(o.has(good + ": ok")) << o;
  }
  // 2: a bad command line; nothing is checked.
  for (const auto& o : {validate({good, "--frobnicate"}),
                        orchestrator_validate({good}, {"--frobnicate"}), validate({})}) {
    EXPECT_EQ(o.code, ensemble::orchestrator::k_usage_error) << o;
    EXPECT_FALSE(o.has(": ok")) << o;
  }
}

}  // namespace
