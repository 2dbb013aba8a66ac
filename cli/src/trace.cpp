// `ensemble trace ID`: an instance's whole story as a causal tree with timings.
//
// Two sources, merged: the broker's journal (`broker.trace`: every request, reply and event
// carrying the instance's correlation id — including the events services published to each
// other inside choreographed segments, which the orchestrator never sees) and the
// orchestrator's history (which step each command and event belongs to, retries,
// compensations). Messages form a tree through their causation ids; the histories (the
// instance's and its sub-workflows') follow, timed, with what sends no message: waits,
// switches, scheduled retries.
#include <algorithm>
#include <cstdio>
#include <functional>
#include <map>
#include <set>

#include "client.hpp"
#include "history_text.hpp"

namespace ensemble::cli {

using namespace std::chrono_literals;

namespace {

struct node {
  json entry;  // the journal's request or event entry
  json reply;  // requests: the reply entry, if any
  std::vector<std::string> children;
};

std::string ms(std::int64_t us) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1fms", static_cast<double>(us) / 1000.0);
  return buf;
}

// "+12.3ms" padded to 10 columns, with at least one space after it (also past 10 s).
std::string time_column(std::int64_t us) {
  std::string t = "+" + ms(us);
  t.resize(std::max<std::size_t>(t.size() + 1, 10), ' ');
  return t;
}

// The orchestrator's history of an instance and of its sub-workflows (whose messages the
// broker's journal returns with the parent's, `children`): the instance first, then each
// child after its parent.
struct histories {
  struct one {
    std::string instance;
    std::string label;  // "" for the instance itself, else "sub-workflow <name> of step <step>"
    json entries;
  };
  std::vector<one> all;
};

// Adds an instance's history entries, then fetches its sub-workflows' histories.
void add_history(client& c, const std::string& id, const std::string& label, json entries,
                 histories& out, int depth) {
  out.all.push_back({id, label, std::move(entries)});
  if (depth >= 8) return;  // sub-workflows cannot form cycles; this only bounds the calls
  const json mine = out.all.back().entries;  // a copy: `out.all` grows below
  for (const auto& e : mine) {
    const json& d = object_field(e, "data");
    const std::string child = text_field(d, "child");
    if (text_field(e, "kind") != "step_started" || text_field(d, "kind") != "workflow" ||
        child.empty()) {
      continue;
    }
    if (auto h = c.call("orchestrator", "history", {{"id", child}}, 5s)) {
      add_history(c, child,
                  "sub-workflow " + text_field(d, "workflow", "?") + " of step " +
                      text_field(e, "step", "?"),
                  array_field(*h, "entries"), out, depth + 1);
    }
  }
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
  histories hs;
  if (history) add_history(c, id, "", array_field(*history, "entries"), hs, 0);

  // Which step each message id belongs to, from the orchestrator's histories; and which step
  // awaited each event it matched.
  std::map<std::string, std::string> step_of, awaited_by;
  for (const auto& h : hs.all) {
    const std::string where = h.label.empty() ? "" : ", " + h.label;
    for (const auto& e : h.entries) {
      const json& d = object_field(e, "data");
      const std::string kind = text_field(e, "kind");
      // A compensation's request is not the step's own command: say so.
      const std::string step =
          (kind.rfind("compensation", 0) == 0 ? "compensate " : "step ") + text_field(e, "step");
      for (const char* key : {"request_id", "event_id"}) {
        if (const auto mid = text_field(d, key); !mid.empty()) step_of[mid] = step + where;
      }
      if (kind == "event_matched") {
        if (const auto mid = text_field(d, "id"); !mid.empty()) {
          awaited_by[mid] = "awaited by step " + text_field(e, "step") + where;
        }
      }
    }
  }

  std::map<std::string, node> nodes;
  std::vector<std::string> order;
  for (const auto& e : array_field(*journal, "entries")) {
    const std::string kind = text_field(e, "kind");
    const std::string mid = text_field(e, "id");
    if (kind == "reply") {
      if (nodes.count(mid) != 0) nodes[mid].reply = e;
      continue;
    }
    if (nodes.count(mid) == 0) order.push_back(mid);
    nodes[mid].entry = e;
  }
  // Children and roots in time order (a retried step's attempts one after the other), the
  // journal's order where times are equal.
  std::stable_sort(order.begin(), order.end(), [&](const std::string& a, const std::string& b) {
    return int_field(nodes[a].entry, "ts_us") < int_field(nodes[b].entry, "ts_us");
  });
  std::vector<std::string> roots;
  for (const auto& mid : order) {
    const std::string cause = text_field(nodes[mid].entry, "causation_id");
    if (!cause.empty() && nodes.count(cause) != 0 && cause != mid) {
      nodes[cause].children.push_back(mid);
    } else {
      roots.push_back(mid);
    }
  }
  // Times are relative to the first message or history entry, whichever came first.
  std::int64_t t0 = order.empty() ? 0 : int_field(nodes[order.front()].entry, "ts_us");
  if (!hs.all.empty() && !hs.all.front().entries.empty()) {
    const auto first = int_field(hs.all.front().entries.front(), "ts_us");
    if (first > 0 && (t0 == 0 || first < t0)) t0 = first;
  }

  if (view) {
    std::printf("%s  %s v%lld  %s", id.c_str(), text_field(*view, "workflow", "?").c_str(),
                static_cast<long long>(int_field(*view, "version")),
                text_field(*view, "status", "?").c_str());
    if (const auto reason = text_field(*view, "reason"); !reason.empty()) {
      std::printf("  (%s)", reason.c_str());
    }
    std::printf("\n");
  } else {
    std::printf("%s (not known to the orchestrator: %s)\n", id.c_str(), view.err().message.c_str());
  }
  std::size_t commands = 0, events = 0, choreographed = 0;
  std::set<std::string> printed;  // a causation cycle in a damaged journal must not loop
  std::function<void(const std::string&, int)> print = [&](const std::string& mid, int depth) {
    if (!printed.insert(mid).second) return;
    const node& n = nodes[mid];
    const auto& e = n.entry;
    const std::string kind = text_field(e, "kind");
    std::string line = time_column(int_field(e, "ts_us") - t0);
    line += std::string(static_cast<std::size_t>(depth) * 2, ' ');
    const std::string from = text_field(e, "from");
    if (kind == "request") {
      ++commands;
      line += "command " + text_field(e, "service") + "." + text_field(e, "action");
      if (const auto attempt = int_field(e, "attempt", 1); attempt > 1) {
        line += " attempt " + std::to_string(attempt);
      }
      if (!from.empty()) line += " from " + from;
      if (n.reply.is_object()) {
        const std::string worker = text_field(n.reply, "worker");
        if (!worker.empty()) line += " -> " + worker;
        line += " " + ms(int_field(n.reply, "duration_us"));
        const std::string code = text_field(n.reply, "error_code");
        line +=
            code.empty() ? " ok" : " ERROR " + code + ": " + text_field(n.reply, "error_message");
      } else {
        line += " (no reply yet)";
      }
    } else {
      ++events;
      line += "event " + text_field(e, "topic") + " by " + from +
              " seq=" + std::to_string(int_field(e, "seq"));
      if (!step_of.count(mid) && from != "orchestrator") {
        ++choreographed;
        line += "  [choreography]";
      }
    }
    if (auto s = step_of.find(mid); s != step_of.end()) line += "  [" + s->second + "]";
    if (auto s = awaited_by.find(mid); s != awaited_by.end()) line += "  [" + s->second + "]";
    std::printf("%s\n", line.c_str());
    for (const auto& child : n.children) print(child, depth + 1);
  };
  for (const auto& r : roots) print(r, 0);
  std::printf(
      "%zu command(s), %zu event(s), %zu published by services outside the "
      "orchestrator's calls%s\n",
      commands, events, choreographed,
      text_field(*journal, "truncated") == "true" ? " (the broker's journal was truncated)" : "");
  // What the orchestrator recorded, in order: also what sends no message (waits, switches,
  // retries being scheduled, timeouts).
  for (const auto& h : hs.all) {
    std::printf("\nhistory of %s%s:\n", h.instance.c_str(),
                h.label.empty() ? "" : (" (" + h.label + ")").c_str());
    for (const auto& e : h.entries) {
      std::printf("%s%s\n", time_column(int_field(e, "ts_us") - t0).c_str(),
                  describe_entry(e).c_str());
    }
  }
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
