// The admin API: the table of actions, engine::admin that looks them up, one handler per
// action; see admin.hpp.
#include "admin.hpp"

#include <algorithm>

#include "ensemble/common/protocol.hpp"

namespace ensemble::orchestrator::detail {

error bad_admin_args(std::string what) {
  return error{std::string(common::errc::bad_request), std::move(what), false};
}

namespace {

error bad(std::string what) {
  return bad_admin_args(std::move(what));
}

// Argument `key` of `args` (an object or null): empty if it is absent and not `required`.
result<std::string> string_arg(const json& args, const char* key, bool required) {
  if (!args.is_object() || !args.contains(key)) {
    if (required) return bad(std::string("missing \"") + key + "\"");
    return std::string();
  }
  if (!args[key].is_string()) return bad(std::string("\"") + key + "\" must be a string");
  return args[key].get<std::string>();
}

error not_found(const std::string& id) {
  return error{"not_found", "no instance with id \"" + id + "\"", false};
}

// Refuses the call's action on instance `id`, started by `started_by`, to an own-scope caller
// that did not start it.
std::optional<error> owned(const admin_call& c, const std::string& id,
                           const std::string& started_by) {
  if (!c.own || started_by == c.from.caller) return std::nullopt;
  return error{"unauthorized",
               "caller '" + c.from.caller + "' may " + std::string(c.action) +
                   " only the instances it started; instance \"" + id +
                   "\" was not (caller_scope own)",
               false};
}

}  // namespace

std::span<const admin_action> engine::admin_actions() {
  // The order is the one the unknown_action answer lists them in.
  static const admin_action table[] = {
      {"start", &engine::admin_start, own_scope::checked, true, {}},
      {"get", &engine::admin_get, own_scope::checked, false, {}},
      {"list", &engine::admin_list, own_scope::checked, false, {}},
      {"cancel", &engine::admin_cancel, own_scope::checked, true, {}},
      {"history", &engine::admin_history, own_scope::checked, false, {}},
      {"definitions", &engine::admin_definitions, own_scope::any, false, {}},
      {"stats", &engine::admin_stats, own_scope::any, false, {}},
      {"advance", &engine::admin_advance, own_scope::refused, true,
       "advance moves the time of every instance"},
  };
  return table;
}

const admin_action* engine::find_admin_action(std::string_view name) {
  const auto actions = admin_actions();
  const auto it = std::find_if(actions.begin(), actions.end(),
                               [&](const admin_action& a) { return a.name == name; });
  return it == actions.end() ? nullptr : &*it;
}

result<json> engine::admin(std::string_view action, const json& args, const origin& from,
                           std::function<result<json>()>& later) {
  if (!args.is_object() && !args.is_null()) return bad("arguments must be a JSON object");
  // caller_scope "own" (docs/protocol.md section 12): the caller acts only on the instances it
  // started. A scope this orchestrator does not know grants nothing.
  const bool own = !from.caller_scope.empty();
  if (own && (from.caller_scope != "own" || from.caller.empty())) {
    return error{
        "unauthorized",
        from.caller_scope != "own"
            ? "caller '" + from.caller + "' has the caller_scope '" + from.caller_scope +
                  "', which this orchestrator does not know; refusing " + std::string(action)
            : "a request with caller_scope 'own' names no caller; refusing " + std::string(action),
        false};
  }
  const admin_action* a = find_admin_action(action);
  if (a == nullptr) {
    std::string offered;
    for (const auto& known : admin_actions()) {
      offered += (offered.empty() ? "" : ", ") + std::string(known.name);
    }
    return error{
        std::string(common::errc::unknown_action),
        "unknown action \"" + std::string(action) + "\"; the orchestrator offers " + offered,
        false};
  }
  if (own && a->own == own_scope::refused) {
    return error{"unauthorized",
                 "caller '" + from.caller + "' may act only on the instances it started; " +
                     std::string(a->own_refusal) + " (caller_scope own)",
                 false};
  }
  return (this->*(a->handle))(admin_call{action, args, from, own, later});
}

result<std::optional<instance_record>> engine::snapshot(const std::string& id) {
  if (auto it = live_.find(id); it != live_.end()) {
    instance& in = *it->second;
    instance_record r = record_of(in);
    r.state = in.document();
    return std::optional<instance_record>(std::move(r));
  }
  return db_->get(id);
}

result<json> engine::admin_start(const admin_call& c) {
  const json& args = c.args;
  auto name = string_arg(args, "workflow", true);
  if (!name) return name.err();
  auto id = string_arg(args, "id", false);
  if (!id) return id.err();
  std::shared_ptr<const definition> def;
  if (args.contains("version")) {
    if (!args["version"].is_number_unsigned()) return bad("\"version\" must be a positive integer");
    def = find_definition(*name, args["version"].get<std::uint32_t>());
  } else if (auto it = latest_.find(*name); it != latest_.end()) {
    def = it->second;
  }
  if (!def) {
    std::string known;
    for (const auto& [n, d] : latest_) known += (known.empty() ? "" : ", ") + n;
    return error{"not_found",
                 "no workflow named \"" + *name + "\"" +
                     (args.contains("version") ? " with that version" : "") +
                     " (loaded: " + (known.empty() ? "none" : known) + ")",
                 false};
  }
  if (!id->empty()) {
    auto found = snapshot(*id);
    if (!found) return found.err();
    if (auto& existing = *found) {
      if (auto refused = owned(c, *id, existing->started_by)) return *refused;
      if (existing->workflow != def->name) {
        return error{"conflict", "instance \"" + *id + "\" exists and runs " + existing->workflow,
                     false};
      }
      return json{{"id", *id},
                  {"workflow", existing->workflow},
                  {"version", existing->version},
                  {"status", to_string(existing->status)},
                  {"created", false}};
    }
    if (auto problem = common::check_name("id", *id); !problem.empty()) return bad(problem);
  }
  const std::string instance_id = id->empty() ? ids_.next() : *id;
  instance& in = create_instance(def, instance_id, args.value("input", json::object()), "", "",
                                 c.from.trace_id, c.from.message_id, c.from.caller);
  advance(in);
  return json{{"id", instance_id},
              {"workflow", def->name},
              {"version", def->version},
              {"status", to_string(in.status)},
              {"created", true}};
}

result<json> engine::admin_get(const admin_call& c) {
  auto id = string_arg(c.args, "id", true);
  if (!id) return id.err();
  auto r = snapshot(*id);
  if (!r) return r.err();
  if (!*r) return not_found(*id);
  if (auto refused = owned(c, *id, (*r)->started_by)) return *refused;
  json v = view(**r);
  if (auto it = live_.find(*id); it != live_.end() && v["steps"].is_object()) {
    for (auto& [name, step_view] : v["steps"].items()) {
      const step* s = it->second->def->find(name);
      if (s != nullptr && step_view.value("status", "") == k_running) {
        step_view["waiting"] = waiting_of(*it->second, *s);
      }
    }
  }
  return v;
}

result<json> engine::admin_list(const admin_call& c) {
  const json& args = c.args;
  list_filter f;
  if (auto s = string_arg(args, "status", false); !s) {
    return s.err();
  } else if (!s->empty()) {
    f.status = parse_instance_status(*s);
    if (!f.status) {
      return bad(
          "\"status\" must be one of running, compensating, completed, failed, "
          "cancelled, timed_out; got \"" +
          *s + "\"");
    }
  }
  auto wf = string_arg(args, "workflow", false);
  if (!wf) return wf.err();
  f.workflow = *wf;
  if (c.own) f.started_by = c.from.caller;
  if (args.is_object() && args.contains("limit")) {
    if (!args["limit"].is_number_unsigned()) return bad("\"limit\" must be a positive integer");
    f.limit = args["limit"].get<std::size_t>();
  }
  c.later = [this, f]() -> result<json> {
    json out = json::array();
    auto rows = db_->list(f);
    if (!rows) return rows.err();
    for (const auto& r : *rows) {
      json v = view(r);
      v.erase("steps");
      out.push_back(std::move(v));
    }
    return json{{"instances", std::move(out)}};
  };
  return json();
}

result<json> engine::admin_cancel(const admin_call& c) {
  auto id = string_arg(c.args, "id", true);
  if (!id) return id.err();
  auto reason = string_arg(c.args, "reason", false);
  if (!reason) return reason.err();
  auto it = live_.find(*id);
  if (it == live_.end()) {
    auto r = db_->get(*id);
    if (!r) return r.err();
    if (!*r) return not_found(*id);
    if (auto refused = owned(c, *id, (*r)->started_by)) return *refused;
    return error{"conflict",
                 "instance \"" + *id + "\" already ended " + std::string(to_string((*r)->status)),
                 false};
  }
  instance& in = *it->second;
  if (auto refused = owned(c, *id, in.started_by)) return *refused;
  if (in.status == instance_status::running) {
    abandon(in, in.def->steps);
    begin_compensation(in, instance_status::cancelled,
                       json{{"code", "cancelled"},
                            {"message", reason->empty() ? "cancelled by request" : *reason}});
  } else if (is_terminal(in.status)) {
    return error{"conflict",
                 "instance \"" + *id + "\" already ended " + std::string(to_string(in.status)),
                 false};
  }
  return json{{"id", *id}, {"status", to_string(in.status)}};
}

result<json> engine::admin_history(const admin_call& c) {
  auto id = string_arg(c.args, "id", true);
  if (!id) return id.err();
  if (auto it = live_.find(*id); it != live_.end()) {
    if (auto refused = owned(c, *id, it->second->started_by)) return *refused;
  } else {
    auto r = db_->get(*id);
    if (!r) return r.err();
    if (!*r) return not_found(*id);
    if (auto refused = owned(c, *id, (*r)->started_by)) return *refused;
  }
  c.later = [this, id = *id]() -> result<json> {
    json entries = json::array();
    auto rows = db_->history(id);
    if (!rows) return rows.err();
    for (const auto& h : *rows) {
      json e = {{"seq", h.seq}, {"ts_us", h.ts_us}, {"kind", h.kind}};
      if (!h.step.empty()) e["step"] = h.step;
      if (!h.data.is_null()) e["data"] = h.data;
      entries.push_back(std::move(e));
    }
    return json{{"id", id}, {"entries", std::move(entries)}};
  };
  return json();
}

result<json> engine::admin_definitions(const admin_call&) {
  json out = json::array();
  for (const auto& [key, d] : defs_) {
    out.push_back(json{
        {"name", d->name}, {"version", d->version}, {"source", d->source}, {"definition", d->raw}});
  }
  return json{{"definitions", std::move(out)}};
}

result<json> engine::admin_stats(const admin_call&) {
  auto s = counters();
  return json{{"started", s.started},
              {"completed", s.completed},
              {"failed", s.failed},
              {"cancelled", s.cancelled},
              {"timed_out", s.timed_out},
              {"commands_sent", s.commands_sent},
              {"events_published", s.events_published},
              {"events_matched", s.events_matched},
              {"events_caught_up", s.events_caught_up},
              {"events_ignored_from", s.events_ignored_from},
              {"events_ignored_from_by_topic", s.events_ignored_from_by_topic},
              {"commits", s.commits},
              {"active", live_.size()},
              {"buffered_events", buffer_.size()},
              {"clock", std::string(clock_->is_virtual() ? "virtual" : "wall")},
              {"now_us", now_us()}};
}

result<json> engine::admin_advance(const admin_call& c) {
  return advance_clock(c.args);
}

// ---------------------------------------------------------------------------------------------
// Views of instances, for get and list

json engine::view(const instance_record& r) const {
  json v = {{"id", r.id},
            {"workflow", r.workflow},
            {"version", r.version},
            {"status", to_string(r.status)},
            {"created_us", r.created_us},
            {"updated_us", r.updated_us}};
  if (!r.parent_id.empty()) v["parent_id"] = r.parent_id;
  if (!r.started_by.empty()) v["started_by"] = r.started_by;
  if (r.state.is_object()) {
    v["input"] = r.state["workflow"].value("input", json());
    v["steps"] = r.state.value("steps", json::object());
    const auto& run = r.state["run"];
    if (run.contains("output")) v["output"] = run["output"];
    if (run.contains("error")) {
      v["error"] = run["error"];
      v["reason"] = describe(run["error"]);
    }
    v["trace_id"] = run.value("trace_id", "");
  }
  return v;
}

json engine::waiting_of(const instance& in, const step& s) const {
  static const step_run none;
  const auto found = in.run.steps.find(s.name);
  const step_run& rs = found == in.run.steps.end() ? none : found->second;
  const step_phase phase = rs.phase;
  const auto attempts = peek(in, s.name).value("attempts", 0U);
  json w = {{"kind", to_string(s.kind)}};
  if (s.kind == step_kind::parallel || s.kind == step_kind::switch_) {
    w["phase"] = "branches";
    return w;
  }
  w["phase"] = phase_name(phase);
  if (s.kind == step_kind::command) {
    w["service"] = s.service;
    w["action"] = s.action;
  }
  if (phase == step_phase::calling) {
    w["attempt"] = attempts;
    w["request_id"] = rs.request_id.value_or("");
    if (rs.deadline_us) w["deadline_us"] = *rs.deadline_us;
  } else if (phase == step_phase::backoff) {
    w["attempt"] = attempts + 1;  // the next one
    w["due_us"] = rs.due_us.value_or(0);
  } else if (phase == step_phase::awaiting) {
    w["until"] = s.until;
    w["fail_on"] = s.fail_on;
    if (s.match.empty()) {
      w["correlation_id"] = in.id;
    } else {
      w["match"] = s.match;
    }
    if (!s.from.empty()) w["from"] = s.from;
    w["attempt"] = attempts;
    w["since_us"] = rs.since_us.value_or(0);
    w["deadline_us"] = rs.due_us.value_or(0);
  } else if (phase == step_phase::waiting) {
    w["due_us"] = rs.due_us.value_or(0);
  } else if (phase == step_phase::publishing) {
    w["topic"] = s.event.topic;
    w["event_id"] = rs.key.value_or("");
  } else if (phase == step_phase::child) {
    const std::string child_id = rs.child_id.value_or("");
    w["workflow"] = s.workflow;
    w["child_id"] = child_id;
    if (auto child = live_.find(child_id); child != live_.end()) {
      const auto& child_deadline = child->second->run.deadline_us;
      if (child_deadline) w["deadline_us"] = *child_deadline;
    }
  }
  return w;
}

}  // namespace ensemble::orchestrator::detail
