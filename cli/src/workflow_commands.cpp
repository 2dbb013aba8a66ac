// Workflow subcommands: validate, run, status, list, cancel, advance, graph (and trace, in
// trace.cpp).
// They drive the orchestrator through its service on the broker, like any client.
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <map>
#include <set>
#include <thread>

#include "client.hpp"
#include "ensemble/cli/deployment.hpp"
#include "ensemble/cli/graph.hpp"
#include "ensemble/orchestrator/definition.hpp"
#include "history_text.hpp"

namespace ensemble::cli {

namespace eo = ensemble::orchestrator;
using namespace std::chrono_literals;

namespace {

void print_view(const json& v) {
  std::printf("instance  %s\nworkflow  %s v%lld\nstatus    %s\n", text_field(v, "id", "?").c_str(),
              text_field(v, "workflow", "?").c_str(),
              static_cast<long long>(int_field(v, "version")),
              text_field(v, "status", "?").c_str());
  if (const auto reason = text_field(v, "reason"); !reason.empty()) {
    std::printf("reason    %s\n", reason.c_str());
  }
  if (const auto parent = text_field(v, "parent_id"); !parent.empty()) {
    std::printf("parent    %s\n", parent.c_str());
  }
  std::printf("\n%-24s %-20s %8s %10s\n", "STEP", "STATUS", "ATTEMPTS", "DURATION");
  std::vector<std::pair<std::int64_t, std::string>> order;
  const json& steps = object_field(v, "steps");
  for (const auto& [name, s] : steps.items()) order.emplace_back(int_field(s, "started_us"), name);
  std::sort(order.begin(), order.end());
  const auto now = wall_now_us();
  for (const auto& [started, name] : order) {
    const json& s = steps[name];
    const auto ended = int_field(s, "ended_us");
    std::printf("%-24s %-20s %8lld %10s\n", name.c_str(), text_field(s, "status").c_str(),
                static_cast<long long>(int_field(s, "attempts")),
                ended > 0 && started > 0 ? format_us(ended - started).c_str() : "-");
    // A running step: what it is waiting on, from the orchestrator's `waiting`.
    if (const auto waits = describe_waiting(object_field(s, "waiting"), now); !waits.empty()) {
      std::printf("  %s\n", waits.c_str());
    }
  }
  if (v.contains("output")) std::printf("\noutput %s\n", v["output"].dump(2).c_str());
}

int cmd_validate(const std::vector<std::string>& files, const std::string& deployment_path) {
  std::vector<std::string> paths = files;
  std::vector<common::diagnostic> problems;
  if (!deployment_path.empty()) problems = check_deployment(deployment_path, paths);
  return eo::validate_definition_files(paths, stdout, stderr, std::move(problems));
}

bool terminal(const std::string& status) {
  return status != "running" && status != "compensating";
}

int cmd_run(const context& ctx, const std::string& name, const std::string& input_text,
            const std::string& id, bool wait, const std::string& timeout_text) {
  const json input = input_text.empty() ? json::object() : parse_json_arg("--input", input_text);
  const auto timeout = parse_duration_arg("--timeout", timeout_text);
  client c(ctx);
  if (auto s = c.start(); !s) return report("run", s.err());
  json args = {{"workflow", name}, {"input", input}};
  if (!id.empty()) args["id"] = id;
  auto started = c.call("orchestrator", "start", args, 10s, !id.empty());
  if (!started) return report("run " + name, started.err());
  const std::string instance = text_field(*started, "id");
  std::printf("started %s (%s v%lld)\n", instance.c_str(), name.c_str(),
              static_cast<long long>(int_field(*started, "version")));
  std::fflush(stdout);
  if (!wait) return 0;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::int64_t shown = 0;
  // Prints the entries not printed yet.
  auto show = [&](const json& history) {
    for (const auto& e : array_field(history, "entries")) {
      const auto seq = int_field(e, "seq");
      if (seq <= shown) continue;
      shown = seq;
      std::printf("  %s\n", describe_entry(e).c_str());
    }
    std::fflush(stdout);
  };
  while (true) {
    if (auto h = c.call("orchestrator", "history", {{"id", instance}}, 5s)) show(*h);
    auto v = c.call("orchestrator", "get", {{"id", instance}}, 5s);
    if (!v) return report("run " + name, v.err());
    const std::string status = text_field(*v, "status", "?");
    if (terminal(status)) {
      // Show the last entries (the final one is committed with the status).
      if (auto last = c.call("orchestrator", "history", {{"id", instance}}, 5s)) show(*last);
      if (status == "completed") {
        std::printf("%s\n", v->value("output", json()).dump(2).c_str());
        return 0;
      }
      std::fprintf(stderr, "ensemble: %s %s: %s\n", instance.c_str(), status.c_str(),
                   text_field(*v, "reason", "no reason recorded").c_str());
      return 1;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      std::fprintf(stderr,
                   "ensemble: %s still %s after --timeout %s (it keeps running; `ensemble "
                   "status %s`)\n",
                   instance.c_str(), status.c_str(), timeout_text.c_str(), instance.c_str());
      return 1;
    }
    std::this_thread::sleep_for(50ms);  // polling interval of a progress display
  }
}

int cmd_status(const context& ctx, const std::string& id, bool as_json) {
  client c(ctx);
  if (auto s = c.start(); !s) return report("status", s.err());
  auto v = c.call("orchestrator", "get", {{"id", id}}, 5s);
  if (!v) return report("status " + id, v.err());
  if (as_json) {
    std::printf("%s\n", v->dump(2).c_str());
  } else {
    print_view(*v);
  }
  return 0;
}

int cmd_list(const context& ctx, const std::string& status, const std::string& workflow,
             std::size_t limit, bool as_json) {
  client c(ctx);
  if (auto s = c.start(); !s) return report("list", s.err());
  json args = {{"limit", limit}};
  if (!status.empty()) args["status"] = status;
  if (!workflow.empty()) args["workflow"] = workflow;
  auto r = c.call("orchestrator", "list", args, 5s);
  if (!r) return report("list", r.err());
  if (as_json) {
    std::printf("%s\n", array_field(*r, "instances").dump(2).c_str());
    return 0;
  }
  std::printf("%-36s %-24s %-12s %s\n", "ID", "WORKFLOW", "STATUS", "REASON");
  for (const auto& v : array_field(*r, "instances")) {
    std::printf("%-36s %-24s %-12s %s\n", text_field(v, "id", "?").c_str(),
                text_field(v, "workflow", "?").c_str(), text_field(v, "status", "?").c_str(),
                text_field(v, "reason").c_str());
  }
  return 0;
}

int cmd_cancel(const context& ctx, const std::string& id, const std::string& reason) {
  client c(ctx);
  if (auto s = c.start(); !s) return report("cancel", s.err());
  json args = {{"id", id}};
  if (!reason.empty()) args["reason"] = reason;
  auto r = c.call("orchestrator", "cancel", args, 5s, false);
  if (!r) return report("cancel " + id, r.err());
  std::printf("%s: %s\n", id.c_str(), text_field(*r, "status", "?").c_str());
  return 0;
}

// An orchestrator started with --clock virtual: moves its time forward by `by` (a duration of
// the workflow grammar), firing what fell due.
int cmd_advance(const context& ctx, const std::string& by) {
  if (!eo::parse_duration(json(by))) {
    std::fprintf(stderr,
                 "ensemble: advance: \"%s\" is not a duration (250ms, 90s, 15m, 1.5h, 24h)\n",
                 by.c_str());
    return 2;
  }
  client c(ctx);
  if (auto s = c.start(); !s) return report("advance", s.err());
  auto r = c.call("orchestrator", "advance", {{"by", by}}, 30s, false);
  if (!r) return report("advance " + by, r.err());
  // The virtual now, and how far it is from the wall clock.
  std::printf("advanced %s: %lld timer(s) fired; virtual now %s\n", by.c_str(),
              static_cast<long long>(int_field(*r, "fired")),
              format_due(int_field(*r, "now_us"), wall_now_us()).c_str());
  return 0;
}

int cmd_graph(const context& ctx, const std::string& file, const std::string& instance) {
  auto def = eo::load_definition_file(file);
  json state;
  if (!instance.empty()) {
    client c(ctx);
    if (auto s = c.start(); !s) return report("graph", s.err());
    auto v = c.call("orchestrator", "get", {{"id", instance}}, 5s);
    if (!v) return report("graph --instance " + instance, v.err());
    state = *v;
  }
  std::printf("%s", mermaid_graph(def, state).c_str());
  return 0;
}

}  // namespace

void add_workflow_commands(CLI::App& app, context& ctx) {
  {
    // Exit codes: docs/workflows.md, "Validating".
    auto* sub = app.add_subcommand("validate", "check workflow definition files");
    auto files = std::make_shared<std::vector<std::string>>();
    auto deployment_path = std::make_shared<std::string>();
    sub->add_option("files", *files, "definition files and directories");
    sub->add_option("--deployment", *deployment_path,
                    "also check this deployment, its agent specs and its workflows (which the "
                    "files' sub-workflows may use)");
    sub->callback([&ctx, files, deployment_path] {
      if (files->empty() && deployment_path->empty()) {
        throw CLI::ValidationError("validate", "give definition files, --deployment, or both");
      }
      ctx.exit_code = cmd_validate(*files, *deployment_path);
    });
  }
  {
    auto* sub = app.add_subcommand("run", "start a workflow instance (and follow it with --wait)");
    struct args_t {
      std::string name, input, id, timeout = "60s";
      bool wait = false;
    };
    auto a = std::make_shared<args_t>();
    sub->add_option("name", a->name, "workflow name")->required();
    sub->add_option("--input", a->input, "input as JSON, or @file");
    sub->add_option("--id", a->id, "instance id (idempotent: an existing id is not started twice)");
    sub->add_flag("--wait", a->wait, "show each step as it runs; exit 0 only if it completes");
    sub->add_option("--timeout", a->timeout, "how long --wait waits")->capture_default_str();
    sub->callback(
        [&ctx, a] { ctx.exit_code = cmd_run(ctx, a->name, a->input, a->id, a->wait, a->timeout); });
  }
  {
    auto* sub = app.add_subcommand("status", "show an instance: status, reason, steps, output");
    auto id = std::make_shared<std::string>();
    auto as_json = std::make_shared<bool>(false);
    sub->add_option("id", *id, "instance id")->required();
    sub->add_flag("--json", *as_json, "print the orchestrator's JSON view");
    sub->callback([&ctx, id, as_json] { ctx.exit_code = cmd_status(ctx, *id, *as_json); });
  }
  {
    auto* sub = app.add_subcommand("list", "list instances, newest first");
    struct args_t {
      std::string status, workflow;
      std::size_t limit = 50;
      bool json = false;
    };
    auto a = std::make_shared<args_t>();
    sub->add_option("--status", a->status,
                    "running, compensating, completed, failed, cancelled, timed_out")
        ->check(CLI::IsMember(
            {"running", "compensating", "completed", "failed", "cancelled", "timed_out"}));
    sub->add_option("--workflow", a->workflow, "only this workflow");
    sub->add_option("--limit", a->limit, "at most this many")->capture_default_str();
    sub->add_flag("--json", a->json, "JSON output");
    sub->callback(
        [&ctx, a] { ctx.exit_code = cmd_list(ctx, a->status, a->workflow, a->limit, a->json); });
  }
  {
    auto* sub = app.add_subcommand("cancel", "cancel a running instance (its compensations run)");
    auto id = std::make_shared<std::string>();
    auto reason = std::make_shared<std::string>();
    sub->add_option("id", *id, "instance id")->required();
    sub->add_option("--reason", *reason, "recorded as the instance's reason");
    sub->callback([&ctx, id, reason] { ctx.exit_code = cmd_cancel(ctx, *id, *reason); });
  }
  {
    auto* sub = app.add_subcommand(
        "advance", "move an orchestrator's virtual clock (--clock virtual) forward by DURATION");
    auto by = std::make_shared<std::string>();
    sub->add_option("duration", *by, "how far: 250ms, 90s, 15m, 1.5h, 24h")->required();
    sub->callback([&ctx, by] { ctx.exit_code = cmd_advance(ctx, *by); });
  }
  {
    auto* sub = app.add_subcommand("graph", "print a definition as a Mermaid flowchart");
    auto file = std::make_shared<std::string>();
    auto instance = std::make_shared<std::string>();
    sub->add_option("file", *file, "definition file")->required()->check(CLI::ExistingFile);
    sub->add_option("--instance", *instance, "style the nodes by this instance's state");
    sub->callback([&ctx, file, instance] { ctx.exit_code = cmd_graph(ctx, *file, *instance); });
  }
  add_trace_command(app, ctx);
}

}  // namespace ensemble::cli
