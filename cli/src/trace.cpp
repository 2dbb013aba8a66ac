// `ensemble trace ID`: an instance's whole story as a causal tree with timings.
//
// Two sources, merged: the broker's journal (`broker.trace`: every request, reply and event
// carrying the instance's correlation id — including the events services published to each
// other inside choreographed segments, which the orchestrator never sees) and the
// orchestrator's history (which step each command and event belongs to, retries,
// compensations). Messages form a tree through their causation ids.
#include <cstdio>
#include <map>
#include <functional>
#include <set>

#include "client.hpp"

namespace ensemble::cli {

using namespace std::chrono_literals;

namespace {

struct node {
  json entry;                       // the journal's request or event entry
  json reply;                       // requests: the reply entry, if any
  std::vector<std::string> children;
};

std::string ms(std::int64_t us) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1fms", static_cast<double>(us) / 1000.0);
  return buf;
}

int cmd_trace(const context& ctx, const std::string& id, bool as_json) {
  client c(ctx);
  if (auto s = c.start(); !s) return report("trace", s.err());
  auto journal = c.call("broker", "trace", {{"correlation_id", id}, {"children", true}}, 5s);
  if (!journal) return report("trace " + id + " (broker journal)", journal.err());
  auto history = c.call("orchestrator", "history", {{"id", id}}, 5s);
  // Same service: when history got no answer (no orchestrator), get would wait in vain too.
  auto view = history ? c.call("orchestrator", "get", {{"id", id}}, 5s)
                      : common::result<json>(history.err());
  if (as_json) {
    json out = {{"journal", *journal}};
    if (history) out["history"] = *history;
    if (view) out["instance"] = *view;
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }

  // Which step each message id belongs to, from the orchestrator's history.
  std::map<std::string, std::string> step_of;
  if (history) {
    for (const auto& e : (*history)["entries"]) {
      const auto& d = e.value("data", json::object());
      // A compensation's request is not the step's own command: say so.
      const std::string step =
          (e.value("kind", "").rfind("compensation", 0) == 0 ? "compensate " : "step ") +
          e.value("step", "");
      for (const char* key : {"request_id", "event_id"}) {
        if (d.contains(key) && d[key].is_string()) step_of[d[key]] = step;
      }
    }
  }

  std::map<std::string, node> nodes;
  std::vector<std::string> order;
  for (const auto& e : (*journal)["entries"]) {
    const std::string kind = e["kind"];
    const std::string mid = e.value("id", "");
    if (kind == "reply") {
      if (nodes.count(mid) != 0) nodes[mid].reply = e;
      continue;
    }
    if (nodes.count(mid) == 0) order.push_back(mid);
    nodes[mid].entry = e;
  }
  std::vector<std::string> roots;
  for (const auto& mid : order) {
    const std::string cause = nodes[mid].entry.value("causation_id", "");
    if (!cause.empty() && nodes.count(cause) != 0 && cause != mid) {
      nodes[cause].children.push_back(mid);
    } else {
      roots.push_back(mid);
    }
  }
  const std::int64_t t0 = order.empty() ? 0 : nodes[order.front()].entry.value("ts_us", std::int64_t{0});

  if (view) {
    std::printf("%s  %s v%d  %s", id.c_str(), (*view)["workflow"].get<std::string>().c_str(),
                (*view)["version"].get<int>(), (*view)["status"].get<std::string>().c_str());
    if (view->contains("reason")) std::printf("  (%s)", (*view)["reason"].get<std::string>().c_str());
    std::printf("\n");
  } else {
    std::printf("%s (not known to the orchestrator: %s)\n", id.c_str(), view.err().message.c_str());
  }
  std::size_t commands = 0, events = 0, choreographed = 0;
  std::function<void(const std::string&, int)> print = [&](const std::string& mid, int depth) {
    const node& n = nodes[mid];
    const auto& e = n.entry;
    const std::string kind = e["kind"];
    std::string line = "+" + ms(e.value("ts_us", std::int64_t{0}) - t0);
    // At least one space after the time, also past 10 s ("+12345.6ms").
    line.resize(std::max<std::size_t>(line.size() + 1, 10), ' ');
    line += std::string(static_cast<std::size_t>(depth) * 2, ' ');
    const std::string from = e.value("from", "");
    if (kind == "request") {
      ++commands;
      line += "command " + e.value("service", "") + "." + e.value("action", "");
      if (e.value("attempt", 1) > 1) line += " attempt " + std::to_string(e.value("attempt", 1));
      if (!from.empty()) line += " from " + from;
      if (n.reply.is_object()) {
        const std::string worker = n.reply.value("worker", "");
        if (!worker.empty()) line += " -> " + worker;
        line += " " + ms(n.reply.value("duration_us", std::int64_t{0}));
        const std::string code = n.reply.value("error_code", "");
        line += code.empty() ? " ok" : " ERROR " + code + ": " + n.reply.value("error_message", "");
      } else {
        line += " (no reply yet)";
      }
    } else {
      ++events;
      line += "event " + e.value("topic", "") + " by " + e.value("from", "") + " seq=" +
              std::to_string(e.value("seq", 0));
      if (!step_of.count(mid) && from != "orchestrator") {
        ++choreographed;
        line += "  [choreography]";
      }
    }
    if (auto s = step_of.find(mid); s != step_of.end()) line += "  [" + s->second + "]";
    std::printf("%s\n", line.c_str());
    for (const auto& child : n.children) print(child, depth + 1);
  };
  for (const auto& r : roots) print(r, 0);
  std::printf("%zu command(s), %zu event(s), %zu published by services outside the "
              "orchestrator's calls%s\n",
              commands, events, choreographed,
              journal->value("truncated", false) ? " (the broker's journal was truncated)" : "");
  return 0;
}

}  // namespace

void add_trace_command(CLI::App& app, context& ctx) {
  auto* sub = app.add_subcommand(
      "trace", "an instance's commands and events as a causal tree, choreography included");
  auto id = std::make_shared<std::string>();
  auto as_json = std::make_shared<bool>(false);
  sub->add_option("id", *id, "instance id")->required();
  sub->add_flag("--json", *as_json, "the raw journal and history");
  sub->callback([&ctx, id, as_json] { ctx.exit_code = cmd_trace(ctx, *id, *as_json); });
}

}  // namespace ensemble::cli
