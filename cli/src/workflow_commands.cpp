// Workflow subcommands: validate, run, status, list, cancel, graph (and trace, in trace.cpp).
// They drive the orchestrator through its service on the broker, like any client.
#include <cstdio>
#include <iostream>
#include <map>
#include <set>
#include <thread>

#include "client.hpp"
#include "ensemble/cli/deployment.hpp"
#include "ensemble/cli/graph.hpp"
#include "ensemble/orchestrator/definition.hpp"

namespace ensemble::cli {

namespace eo = ensemble::orchestrator;
using namespace std::chrono_literals;

namespace {

std::string format_us(std::int64_t us) {
  char buf[32];
  if (us < 1000) {
    std::snprintf(buf, sizeof buf, "%lldus", static_cast<long long>(us));
  } else if (us < 1'000'000) {
    std::snprintf(buf, sizeof buf, "%.1fms", static_cast<double>(us) / 1e3);
  } else {
    std::snprintf(buf, sizeof buf, "%.2fs", static_cast<double>(us) / 1e6);
  }
  return buf;
}

// One history entry as a line for `run --wait` and `status`.
std::string describe_entry(const json& e) {
  const std::string kind = e["kind"];
  const std::string step = e.value("step", "");
  const json data = e.value("data", json::object());
  std::string line = kind;
  if (!step.empty()) line += " " + step;
  if (kind == "step_started") {
    if (data.value("kind", "") == "choreography") {
      line += " (choreography: publish " + data.value("topic", std::string("?")) + ", until " +
              data["until"].dump() +
              (data.value("fail_on", json::array()).empty() ? std::string()
                                                            : ", fails on " + data["fail_on"].dump()) +
              ")";
    } else if (data.contains("service")) {
      line += " (" + data["service"].get<std::string>() + "." + data["action"].get<std::string>() +
              ", attempt " + std::to_string(data.value("attempt", 1)) + ")";
    } else if (data.contains("topic")) {
      line += " (publish " + data["topic"].get<std::string>() + ")";
    } else if (data.contains("until")) {
      line += " (await " + data["until"].dump() + ")";
    } else if (data.contains("kind")) {
      line += " (" + data["kind"].get<std::string>() + ")";
    }
  } else if (kind == "step_completed" && data.contains("worker")) {
    line += " (by " + data["worker"].get<std::string>() + ")";
  } else if (kind == "attempt_failed" || kind == "step_failed" ||
             kind == "compensation_failed") {
    line += ": " + data.value("code", std::string()) + ": " + data.value("message", std::string());
  } else if (kind == "compensation_started") {
    line += data.contains("service") ? " (" + data["service"].get<std::string>() + "." +
                                           data["action"].get<std::string>() + ")"
                                     : " (publish " + data.value("topic", std::string()) + ")";
  } else if (kind == "retry_scheduled") {
    line += " (attempt " + std::to_string(data.value("attempt", 0)) + " in " +
            std::to_string(data.value("delay_ms", 0)) + " ms)";
  } else if (kind == "event_matched") {
    line += " (" + data.value("topic", std::string()) + " from " +
            data.value("publisher", std::string()) + ")";
  }
  return line;
}

void print_view(const json& v) {
  std::printf("instance  %s\nworkflow  %s v%d\nstatus    %s\n", v["id"].get<std::string>().c_str(),
              v["workflow"].get<std::string>().c_str(), v["version"].get<int>(),
              v["status"].get<std::string>().c_str());
  if (v.contains("reason")) std::printf("reason    %s\n", v["reason"].get<std::string>().c_str());
  if (v.contains("parent_id")) {
    std::printf("parent    %s\n", v["parent_id"].get<std::string>().c_str());
  }
  std::printf("\n%-24s %-20s %8s %10s\n", "STEP", "STATUS", "ATTEMPTS", "DURATION");
  std::vector<std::pair<std::int64_t, std::string>> order;
  // A named copy: items() of a temporary would dangle in the range-for.
  const json steps = v.value("steps", json::object());
  for (const auto& [name, s] : steps.items()) {
    order.emplace_back(s.value("started_us", std::int64_t{0}), name);
  }
  std::sort(order.begin(), order.end());
  for (const auto& [started, name] : order) {
    const auto& s = steps[name];
    const auto ended = s.value("ended_us", std::int64_t{0});
    std::printf("%-24s %-20s %8d %10s\n", name.c_str(), s.value("status", "").c_str(),
                s.value("attempts", 0),
                ended > 0 && started > 0 ? format_us(ended - started).c_str() : "-");
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
  const std::string instance = (*started)["id"];
  std::printf("started %s (%s v%d)\n", instance.c_str(), name.c_str(),
              (*started)["version"].get<int>());
  std::fflush(stdout);
  if (!wait) return 0;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::uint64_t shown = 0;
  while (true) {
    auto h = c.call("orchestrator", "history", {{"id", instance}}, 5s);
    if (h) {
      for (const auto& e : (*h)["entries"]) {
        if (e["seq"].get<std::uint64_t>() <= shown) continue;
        shown = e["seq"];
        std::printf("  %s\n", describe_entry(e).c_str());
      }
      std::fflush(stdout);
    }
    auto v = c.call("orchestrator", "get", {{"id", instance}}, 5s);
    if (!v) return report("run " + name, v.err());
    const std::string status = (*v)["status"];
    if (terminal(status)) {
      // Show the last entries (the final one is committed with the status).
      if (auto last = c.call("orchestrator", "history", {{"id", instance}}, 5s)) {
        for (const auto& e : (*last)["entries"]) {
          if (e["seq"].get<std::uint64_t>() <= shown) continue;
          shown = e["seq"];
          std::printf("  %s\n", describe_entry(e).c_str());
        }
      }
      if (status == "completed") {
        std::printf("%s\n", v->value("output", json()).dump(2).c_str());
        return 0;
      }
      std::fprintf(stderr, "ensemble: %s %s: %s\n", instance.c_str(), status.c_str(),
                   v->value("reason", std::string("no reason recorded")).c_str());
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
    std::printf("%s\n", (*r)["instances"].dump(2).c_str());
    return 0;
  }
  std::printf("%-36s %-24s %-12s %s\n", "ID", "WORKFLOW", "STATUS", "REASON");
  for (const auto& v : (*r)["instances"]) {
    std::printf("%-36s %-24s %-12s %s\n", v["id"].get<std::string>().c_str(),
                v["workflow"].get<std::string>().c_str(), v["status"].get<std::string>().c_str(),
                v.value("reason", "").c_str());
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
  std::printf("%s: %s\n", id.c_str(), (*r)["status"].get<std::string>().c_str());
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
    sub->callback([&ctx, a] {
      ctx.exit_code = cmd_run(ctx, a->name, a->input, a->id, a->wait, a->timeout);
    });
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
    sub->add_option("--status", a->status, "running, compensating, completed, failed, cancelled, timed_out")
        ->check(CLI::IsMember({"running", "compensating", "completed", "failed", "cancelled",
                               "timed_out"}));
    sub->add_option("--workflow", a->workflow, "only this workflow");
    sub->add_option("--limit", a->limit, "at most this many")->capture_default_str();
    sub->add_flag("--json", a->json, "JSON output");
    sub->callback([&ctx, a] {
      ctx.exit_code = cmd_list(ctx, a->status, a->workflow, a->limit, a->json);
    });
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
