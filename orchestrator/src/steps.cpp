// The workflow walk: starting instances, stepping through their sequences, each step kind's
// attempts, retries and timeouts, failure policies, compensation in reverse order, and the end of
// an instance (its lifecycle event, its parent's step); and what moves them on: the replies to
// steps' and compensations' commands, the broker's acknowledgements of their events, and their
// timers. See engine.hpp for the state document.
#include <algorithm>

#include "engine.hpp"
#include "ensemble/common/logging.hpp"
#include "ensemble/orchestrator/expression.hpp"

namespace ensemble::orchestrator::detail {

using namespace std::chrono_literals;
using millis = std::chrono::milliseconds;

namespace {

// A step's bookkeeping, to read: unlike engine::run_of(), it neither creates the entry nor marks
// the step changed (which would rewrite its row at the instance's next commit). nullptr if none.
const step_run* find_run(const instance_run& run, const std::string& step) {
  const auto it = run.steps.find(step);
  return it == run.steps.end() ? nullptr : &it->second;
}

// An event the broker did not acknowledge is published again after this long.
constexpr std::int64_t k_republish_us = 1'000'000;

// Finds the sequence that holds the step named `name`, and its index there.
bool locate(const sequence& seq, const std::string& name, const sequence*& where,
            std::size_t& index) {
  for (std::size_t i = 0; i < seq.size(); ++i) {
    const step& s = seq[i];
    if (s.name == name) {
      where = &seq;
      index = i;
      return true;
    }
    for (const auto& b : s.branches) {
      if (locate(b, name, where, index)) return true;
    }
    for (const auto& c : s.cases) {
      if (locate(c.steps, name, where, index)) return true;
    }
    if (locate(s.default_steps, name, where, index)) return true;
  }
  return false;
}

}  // namespace

std::shared_ptr<const definition> engine::find_definition(const std::string& name,
                                                          std::uint32_t version) {
  if (auto it = defs_.find({name, version}); it != defs_.end()) return it->second;
  auto doc = db_->load_definition(name, version);
  if (!doc) return nullptr;
  try {
    auto def = std::make_shared<const definition>(
        parse_definition(*doc, "store:" + name + "@" + std::to_string(version)));
    defs_[{name, version}] = def;
    return def;
  } catch (const common::config_error& e) {
    log_->error("stored definition {} v{} no longer parses: {}", name, version, e.what());
    return nullptr;
  }
}

engine::instance& engine::create_instance(std::shared_ptr<const definition> def,
                                          const std::string& id, json wf_input,
                                          const std::string& parent_id,
                                          const std::string& parent_step,
                                          const std::string& trace_id, const std::string& cause,
                                          const std::string& started_by) {
  auto in = std::make_unique<instance>();
  in->id = id;
  in->def = def;
  in->parent_id = parent_id;
  in->started_by = started_by;
  in->created_us = in->updated_us = now_us();
  in->state = json{{"workflow",
                    {{"id", id},
                     {"name", def->name},
                     {"version", def->version},
                     {"input", std::move(wf_input)}}},
                   {"steps", json::object()}};
  in->run.trace_id = trace_id.empty() ? common::random_id() : trace_id;
  in->run.cause = cause;
  if (!parent_step.empty()) in->run.parent_step = parent_step;
  instance& ref = *in;
  live_[id] = std::move(in);
  touch(ref);
  json started = {{"input", ref.state["workflow"]["input"]}, {"parent", parent_id}};
  if (!started_by.empty()) started["started_by"] = started_by;
  history(ref, "started", "", std::move(started));
  add_outbox(ref, "workflow." + def->name + ".started",
             json{{"instance_id", id},
                  {"workflow", def->name},
                  {"version", def->version},
                  {"status", "running"},
                  {"input", ref.state["workflow"]["input"]}},
             id + "/started", "lifecycle", "");
  if (def->timeout) {
    const auto due = ref.created_us + def->timeout->count() * 1000;
    ref.run.deadline_us = due;
    arm(ref, timer_kind::deadline, due);
  }
  {
    std::lock_guard lock(stats_mutex_);
    ++stats_.started;
  }
  log_->debug("instance {}: started {} v{}", id, def->name, def->version);
  return ref;
}

void engine::advance(instance& in) {
  if (in.status == instance_status::compensating) return;
  if (in.status != instance_status::running) return;
  json failure;
  switch (walk(in, in.def->steps, failure)) {
    case walk_state::running:
      return;
    case walk_state::failed:
      begin_compensation(in, instance_status::failed, std::move(failure));
      return;
    case walk_state::completed:
      break;
  }
  json output;
  if (in.def->output) {
    auto r = render(*in.def->output, in.state);
    if (!r) {
      begin_compensation(in, instance_status::failed,
                         json{{"code", "bad_output"}, {"message", r.err().message}});
      return;
    }
    output = std::move(*r);
  } else if (!in.def->steps.empty()) {
    output = peek(in, in.def->steps.back().name).value("output", json());
  }
  finish(in, instance_status::completed, std::move(output));
}

engine::walk_state engine::walk(instance& in, const sequence& seq, json& failure) {
  for (std::size_t i = 0; i < seq.size(); ++i) {
    const step& s = seq[i];
    if (!peek(in, s.name).contains("status")) {
      start_step(in, s);
      if (in.status != instance_status::running) return walk_state::running;
    }
    std::string status = peek(in, s.name).value("status", "");
    if (status == k_running && (s.kind == step_kind::parallel || s.kind == step_kind::switch_)) {
      if (s.kind == step_kind::parallel) {
        bool all_done = true;
        json output = json::array();
        for (const auto& branch : s.branches) {
          json branch_failure;
          auto st = walk(in, branch, branch_failure);
          if (st == walk_state::failed) {
            for (const auto& b : s.branches) abandon(in, b);
            fail_step(in, s, branch_failure);
            all_done = false;
            break;
          }
          if (st == walk_state::running) all_done = false;
          output.push_back(branch.empty() ? json()
                                          : peek(in, branch.back().name).value("output", json()));
        }
        if (all_done && peek(in, s.name).value("status", "") == k_running) {
          complete_step(in, s, output);
        }
      } else {
        const step_run* rs = find_run(in.run, s.name);
        const int chosen = rs != nullptr ? rs->chosen_case.value_or(-1) : -1;
        const sequence& branch =
            chosen >= 0 ? s.cases[static_cast<std::size_t>(chosen)].steps : s.default_steps;
        json branch_failure;
        auto st = walk(in, branch, branch_failure);
        if (st == walk_state::failed) {
          fail_step(in, s, branch_failure);
        } else if (st == walk_state::completed) {
          complete_step(
              in, s,
              branch.empty() ? json() : peek(in, branch.back().name).value("output", json()));
        }
      }
      status = peek(in, s.name).value("status", "");
    }
    if (status == k_running) return walk_state::running;
    if (status == k_failed) {
      if (const step_run* rs = find_run(in.run, s.name);
          rs != nullptr && rs->continued.value_or(false)) {
        continue;
      }
      failure = peek(in, s.name).value("error", json());
      return walk_state::failed;
    }
    // completed, skipped
  }
  return walk_state::completed;
}

void engine::start_step(instance& in, const step& s) {
  auto& v = vis(in, s.name);
  v["status"] = k_running;
  v["attempts"] = 0;
  v["started_us"] = now_us();
  touch(in);
  switch (s.kind) {
    case step_kind::command:
    case step_kind::publish:
    case step_kind::await:
    case step_kind::choreography:
    case step_kind::workflow:
      start_attempt(in, s);
      return;
    case step_kind::parallel:
      v["attempts"] = 1;  // runs once: no retry
      history(in, "step_started", s.name, json{{"kind", "parallel"}});
      return;
    case step_kind::switch_: {
      int chosen = -1;
      for (std::size_t i = 0; i < s.cases.size(); ++i) {
        auto r = evaluate(s.cases[i].when, in.state);
        if (!r) {
          fail_step(
              in, s,
              json{{"step", s.name}, {"code", "bad_expression"}, {"message", r.err().message}});
          return;
        }
        if (*r) {
          chosen = static_cast<int>(i);
          break;
        }
      }
      v["attempts"] = 1;
      run_of(in, s.name).chosen_case = chosen;
      history(in, "step_started", s.name, json{{"kind", "switch"}, {"case", chosen}});
      return;
    }
    case step_kind::wait: {
      auto& rs = run_of(in, s.name);
      v["attempts"] = 1;
      rs.phase = step_phase::waiting;
      rs.due_us = now_us() + s.duration.count() * 1000;
      arm(in, timer_kind::step, *rs.due_us, s.name);
      history(in, "step_started", s.name, json{{"kind", "wait"}, {"ms", s.duration.count()}});
      return;
    }
  }
}

void engine::start_attempt(instance& in, const step& s) {
  auto& v = vis(in, s.name);
  auto& rs = run_of(in, s.name);
  const std::uint32_t attempt = v.value("attempts", 0U) + 1;
  v["attempts"] = attempt;
  const std::string key = in.id + "/" + s.name + "/" + std::to_string(attempt);
  rs.key = key;
  touch(in);
  auto render_or_fail = [&](const std::optional<json>& tmpl, json fallback) -> std::optional<json> {
    if (!tmpl) return fallback;
    auto r = render(*tmpl, in.state);
    if (!r) {
      fail_step(in, s,
                json{{"step", s.name},
                     {"code", "bad_input"},
                     {"message", r.err().message},
                     {"attempts", attempt}});
      return std::nullopt;
    }
    return std::move(*r);
  };
  switch (s.kind) {
    case step_kind::command: {
      auto payload = render_or_fail(s.input, s.input ? json() : default_input(in));
      if (!payload) return;
      const std::string request_id = ids_.next();
      const auto timeout = s.timeout.value_or(opts_.default_timeout);
      rs.phase = step_phase::calling;
      rs.request_id = request_id;
      rs.deadline_us = now_us() + timeout.count() * 1000;  // shown by `get`
      if (clock_->is_virtual()) {
        // The step's timeout is the engine's timer, in workflow time; the broker still gets the
        // same span as the command's relative deadline_ms (docs/testing.md, "Time skipping").
        rs.due_us = rs.deadline_us;
        arm(in, timer_kind::step, *rs.due_us, s.name);
      }
      history(in, "step_started", s.name,
              json{{"kind", "command"},
                   {"service", s.service},
                   {"action", s.action},
                   {"attempt", attempt},
                   {"request_id", request_id}});
      send_call(in, reply_to::step, s.name, s.service, s.action, std::move(*payload), timeout,
                request_id, key, attempt);
      return;
    }
    case step_kind::publish: {
      auto payload = render_or_fail(
          s.event.payload.is_null() ? std::nullopt : std::optional<json>(s.event.payload),
          default_input(in));
      if (!payload) return;
      rs.phase = step_phase::publishing;
      history(in, "step_started", s.name,
              json{{"kind", "publish"}, {"topic", s.event.topic}, {"event_id", key}});
      add_outbox(in, s.event.topic, std::move(*payload), key, "publish", s.name);
      return;
    }
    case step_kind::await:
    case step_kind::choreography: {
      if (s.kind == step_kind::choreography) {
        auto payload = render_or_fail(
            s.event.payload.is_null() ? std::nullopt : std::optional<json>(s.event.payload),
            default_input(in));
        if (!payload) return;
        add_outbox(in, s.event.topic, std::move(*payload), key, "start", s.name);
      }
      rs.phase = step_phase::awaiting;
      rs.since_us = now_us();  // events older than this attempt are not its answer
      // The broker's journal, asked after a restart, stamps events in real time.
      if (clock_->is_virtual()) rs.since_real_us = clock_->real_us();
      rs.due_us = now_us() + s.timeout.value_or(opts_.default_timeout).count() * 1000;
      history(in, "step_started", s.name,
              json{{"kind", to_string(s.kind)},
                   {"until", s.until},
                   {"fail_on", s.fail_on},
                   {"attempt", attempt},
                   {"topic", s.kind == step_kind::choreography ? json(s.event.topic) : json()},
                   {"event_id", s.kind == step_kind::choreography ? json(key) : json()},
                   {"from", s.from.empty() ? json() : json(s.from)}});
      register_await(in, s);
      arm(in, timer_kind::step, *rs.due_us, s.name);
      try_buffer(in, s);
      return;
    }
    case step_kind::workflow: {
      auto child_def = latest_.count(s.workflow) != 0 ? latest_[s.workflow] : nullptr;
      if (!child_def) {
        fail_step(in, s,
                  json{{"step", s.name},
                       {"code", "not_found"},
                       {"message", "no workflow named " + s.workflow}});
        return;
      }
      auto child_input = render_or_fail(s.input, in.state["workflow"]["input"]);
      if (!child_input) return;
      const std::string child_id = key;
      rs.phase = step_phase::child;
      rs.child_id = child_id;
      history(in, "step_started", s.name,
              json{{"kind", "workflow"}, {"workflow", s.workflow}, {"child", child_id}});
      instance& child = create_instance(child_def, child_id, std::move(*child_input), in.id, s.name,
                                        in.run.trace_id, in.run.cause, in.started_by);
      if (s.timeout) {
        const auto due = child.created_us + s.timeout->count() * 1000;
        child.run.deadline_us = due;
        arm(child, timer_kind::deadline, due);
      }
      advance(child);
      return;
    }
    case step_kind::parallel:
    case step_kind::switch_:
    case step_kind::wait:
      return;
  }
}

void engine::complete_step(instance& in, const step& s, json output) {
  auto& v = vis(in, s.name);
  v["status"] = k_completed;
  v["ended_us"] = now_us();
  run_of(in, s.name).end_phase();
  json data = {{"attempts", v.value("attempts", 0U)}};
  if (!output.is_null()) data["output"] = output;
  if (v.contains("worker")) data["worker"] = v["worker"];
  v["output"] = std::move(output);
  in.run.completed.push_back(s.name);
  history(in, "step_completed", s.name, std::move(data));
  touch(in);
}

void engine::step_error(instance& in, const step& s, const error& err, bool timeout) {
  auto& v = vis(in, s.name);
  auto& rs = run_of(in, s.name);
  const auto attempt = v.value("attempts", 1U);
  const bool retryable = timeout || err.retryable || common::error::retryable_by_default(err.code);
  history(in, "attempt_failed", s.name, error_json("", err, attempt));
  if (s.retry.allows(err.code, retryable) && attempt < s.retry.max_attempts) {
    const auto delay = s.retry.delay_after(attempt);
    rs.phase = step_phase::backoff;
    rs.due_us = now_us() + delay.count() * 1000;
    arm(in, timer_kind::step, *rs.due_us, s.name);
    history(in, "retry_scheduled", s.name,
            json{{"attempt", attempt + 1}, {"delay_ms", delay.count()}});
    touch(in);
    return;
  }
  fail_step(in, s, error_json(s.name, err, attempt));
}

void engine::fail_step(instance& in, const step& s, json err) {
  auto& v = vis(in, s.name);
  v["status"] = k_failed;
  v["ended_us"] = now_us();
  v["error"] = err;
  auto& rs = run_of(in, s.name);
  rs.end_phase();
  history(in, "step_failed", s.name, err);
  touch(in);
  if (s.on_error.what == on_error_policy::kind::continue_) {
    rs.continued = true;
  } else if (s.on_error.what == on_error_policy::kind::go_to) {
    rs.continued = true;
    const sequence* seq = nullptr;
    std::size_t index = 0;
    if (locate(in.def->steps, s.name, seq, index)) {
      for (std::size_t i = index + 1; i < seq->size() && (*seq)[i].name != s.on_error.target; ++i) {
        vis(in, (*seq)[i].name)["status"] = "skipped";
        history(in, "step_skipped", (*seq)[i].name, json{{"goto", s.on_error.target}});
      }
    }
  }
}

void engine::abandon(instance& in, const sequence& seq) {
  for (const auto& s : seq) {
    if (peek(in, s.name).value("status", "") != k_running) continue;
    auto& v = vis(in, s.name);
    for (const auto& b : s.branches) abandon(in, b);
    for (const auto& c : s.cases) abandon(in, c.steps);
    abandon(in, s.default_steps);
    auto& rs = run_of(in, s.name);
    if (rs.phase == step_phase::awaiting) unregister_await(in, s);
    if (rs.phase == step_phase::child) {
      auto child = live_.find(rs.child_id.value_or(""));
      if (child != live_.end() && child->second->status == instance_status::running) {
        abandon(*child->second, child->second->def->steps);
        begin_compensation(*child->second, instance_status::cancelled,
                           json{{"code", "cancelled"}, {"message", "its parent stopped"}});
      }
    }
    rs.end_phase();
    v["status"] = "cancelled";
    v["ended_us"] = now_us();
    history(in, "step_cancelled", s.name, json());
    touch(in);
  }
}

void engine::begin_compensation(instance& in, instance_status final_status, json err) {
  in.status = instance_status::compensating;
  in.run.final_status = final_status;
  in.run.error = err;
  std::vector<std::string> list;
  const auto& done = in.run.completed;
  for (auto it = done.rbegin(); it != done.rend(); ++it) {
    const step* s = in.def->find(*it);
    if (s != nullptr && s->compensate) list.push_back(s->name);
  }
  in.run.comp.emplace();
  in.run.comp->list = list;
  history(in, "compensating", "", json{{"reason", err}, {"steps", list}});
  touch(in);
  log_->debug("instance {}: {} -> compensating {} step(s)", in.id, describe(err), list.size());
  progress_compensation(in);
}

void engine::progress_compensation(instance& in) {
  if (in.status != instance_status::compensating) return;
  if (!in.run.comp) in.run.comp.emplace();
  auto& comp = *in.run.comp;
  const auto& list = comp.list;
  const auto index = comp.index;
  if (index >= list.size()) {
    json err = in.run.error.value_or(json());
    if (in.run.comp_failures) err["compensation_failures"] = *in.run.comp_failures;
    finish(in, in.run.final_status.value_or(instance_status::failed), std::move(err));
    return;
  }
  if (comp.phase != step_phase::none) return;  // waiting for it
  const std::string name = list[index];
  const step* s = in.def->find(name);
  const compensation& c = *s->compensate;
  const std::uint32_t attempt = comp.attempt + 1;
  comp.attempt = attempt;
  const std::string key = in.id + "/" + name + "/compensate/" + std::to_string(attempt);
  json payload;
  if (c.what == compensation::kind::command) {
    auto r = c.input ? render(*c.input, in.state) : result<json>(default_input(in));
    if (r) payload = std::move(*r);
    const std::string request_id = ids_.next();
    comp.phase = step_phase::calling;
    comp.request_id = request_id;
    history(in, "compensation_started", name,
            json{{"service", c.service},
                 {"action", c.action},
                 {"attempt", attempt},
                 {"request_id", request_id}});
    send_call(in, reply_to::compensation, "", c.service, c.action, std::move(payload), c.timeout,
              request_id, key, attempt);
  } else {
    auto r = c.event.payload.is_null() ? result<json>(default_input(in))
                                       : render(c.event.payload, in.state);
    if (r) payload = std::move(*r);
    comp.phase = step_phase::publishing;
    comp.event_id = key;
    history(in, "compensation_started", name, json{{"topic", c.event.topic}, {"event_id", key}});
    add_outbox(in, c.event.topic, std::move(payload), key, "compensation", name);
  }
  comp.attempt = attempt;
  touch(in);
}

void engine::finish(instance& in, instance_status status, json result_or_error) {
  in.status = status;
  const bool ok = status == instance_status::completed;
  if (ok) {
    in.run.output = result_or_error;
  } else {
    in.run.error = result_or_error;
  }
  const std::string name(to_string(status));
  history(in, name, "", ok ? json{{"output", result_or_error}} : json{{"error", result_or_error}});
  json payload = {{"instance_id", in.id},
                  {"workflow", in.def->name},
                  {"version", in.def->version},
                  {"status", name}};
  payload[ok ? "output" : "error"] = result_or_error;
  add_outbox(in, "workflow." + in.def->name + "." + name, std::move(payload), in.id + "/" + name,
             "lifecycle", "");
  touch(in);
  {
    std::lock_guard lock(stats_mutex_);
    switch (status) {
      case instance_status::completed:
        ++stats_.completed;
        break;
      case instance_status::failed:
        ++stats_.failed;
        break;
      case instance_status::cancelled:
        ++stats_.cancelled;
        break;
      case instance_status::timed_out:
        ++stats_.timed_out;
        break;
      default:
        break;
    }
  }
  if (ok) {
    log_->debug("instance {}: {} completed", in.id, in.def->name);
  } else {
    log_->info("instance {}: {} {}: {}", in.id, in.def->name, name, describe(result_or_error));
  }
  if (in.parent_id.empty()) return;
  auto parent = live_.find(in.parent_id);
  if (parent == live_.end()) return;
  instance& p = *parent->second;
  const std::string step_name = in.run.parent_step.value_or("");
  const step* s = p.def->find(step_name);
  if (s == nullptr || p.status != instance_status::running) return;
  const step_run* rs = find_run(p.run, step_name);
  if (rs == nullptr || rs->phase != step_phase::child || rs->child_id.value_or("") != in.id) return;
  if (ok) {
    complete_step(p, *s, result_or_error);
  } else {
    step_error(
        p, *s,
        error{result_or_error.value("code", "child_failed"),
              "sub-workflow " + in.id + " " + name + ": " + describe(result_or_error), false});
  }
  advance(p);
}

// ---------------------------------------------------------------------------------------------
// Replies, acknowledgements and timers of steps and compensation

void engine::on_step_reply(instance& inst, const std::string& step_name,
                           const std::string& request_id, response_result& r) {
  const step* s = inst.def->find(step_name);
  if (s == nullptr || inst.status != instance_status::running) return;
  const step_run* rs = find_run(inst.run, s->name);
  if (rs == nullptr || rs->phase != step_phase::calling ||
      rs->request_id.value_or("") != request_id) {
    return;
  }
  // The reply is what causes whatever the instance does next.
  inst.run.cause = request_id;
  if (r) {
    vis(inst, s->name)["worker"] = r->worker;
    complete_step(inst, *s, std::move(r->payload));
  } else {
    step_error(inst, *s, r.err());
  }
  advance(inst);
}

void engine::on_compensation_reply(instance& inst, const std::string& request_id,
                                   response_result& r) {
  if (!inst.run.comp) return;
  auto& comp = *inst.run.comp;
  if (comp.phase != step_phase::calling || comp.request_id.value_or("") != request_id) return;
  const std::string name = comp.list.at(comp.index);
  const step* s = inst.def->find(name);
  if (r) {
    vis(inst, name)["status"] = "compensated";
    history(inst, "compensated", name, json{{"worker", r->worker}});
    ++comp.index;
    comp.phase = step_phase::none;
  } else {
    const auto attempt = comp.attempt;
    const bool retryable = r.err().retryable || common::error::retryable_by_default(r.err().code);
    history(inst, "compensation_attempt_failed", name, error_json("", r.err(), attempt));
    if (s->compensate->retry.allows(r.err().code, retryable) &&
        attempt < s->compensate->retry.max_attempts) {
      comp.phase = step_phase::backoff;
      arm(inst, timer_kind::compensation,
          now_us() + s->compensate->retry.delay_after(attempt).count() * 1000);
    } else {
      vis(inst, name)["status"] = "compensation_failed";
      if (!inst.run.comp_failures) inst.run.comp_failures.emplace();
      inst.run.comp_failures->push_back(error_json(name, r.err(), attempt));
      history(inst, "compensation_failed", name, error_json("", r.err(), attempt));
      ++comp.index;
      comp.phase = step_phase::none;
    }
  }
  touch(inst);
  progress_compensation(inst);
}

void engine::on_outbox_ack(instance& inst, const std::string& event_id, response_result& r) {
  auto& outbox = inst.run.outbox;
  auto entry = outbox.find(event_id);
  if (entry == outbox.end()) return;
  if (!r) {
    log_->warn("instance {}: event {} on {} not acknowledged: {}; publishing again", inst.id,
               event_id, entry->second.topic, r.err().to_string());
    arm(inst, timer_kind::outbox, now_us() + k_republish_us, event_id);
    return;
  }
  const std::string kind = entry->second.kind;
  const std::string step_name = entry->second.step.value_or("");
  outbox.erase(entry);
  touch(inst);
  {
    std::lock_guard lock(stats_mutex_);
    ++stats_.events_published;
  }
  if (kind == "publish") {
    const step* s = inst.def->find(step_name);
    if (s != nullptr) {
      auto& rs = run_of(inst, step_name);
      if (rs.phase == step_phase::publishing && rs.key.value_or("") == event_id) {
        complete_step(inst, *s, json{{"id", event_id}, {"seq", r->seq}});
        advance(inst);
      }
    }
  } else if (kind == "compensation" && inst.run.comp) {
    auto& comp = *inst.run.comp;
    if (comp.phase == step_phase::publishing && comp.event_id.value_or("") == event_id) {
      const std::string name = comp.list.at(comp.index);
      vis(inst, name)["status"] = "compensated";
      history(inst, "compensated", name, json{{"event", event_id}});
      ++comp.index;
      comp.phase = step_phase::none;
      progress_compensation(inst);
    }
  }
}

bool engine::on_timer(instance& inst, const timer& t) {
  switch (t.what) {
    case timer_kind::deadline:
      if (inst.status != instance_status::running || inst.run.deadline_us.value_or(0) != t.due_us) {
        return false;
      }
      abandon(inst, inst.def->steps);
      begin_compensation(
          inst, instance_status::timed_out,
          json{{"code", "timeout"},
               {"message", "the workflow's timeout of " +
                               std::to_string(inst.def->timeout->count()) + " ms passed"}});
      return true;
    case timer_kind::compensation: {
      if (!inst.run.comp || inst.run.comp->phase != step_phase::backoff) return false;
      inst.run.comp->phase = step_phase::none;
      progress_compensation(inst);
      return true;
    }
    case timer_kind::outbox:
      if (inst.run.outbox.count(t.name) == 0) return false;
      send_outbox(inst, t.name);
      return true;
    case timer_kind::step:
      break;
  }
  const step* s = inst.def->find(t.name);
  if (s == nullptr || inst.status != instance_status::running) return false;
  const step_run* rs = find_run(inst.run, s->name);
  if (rs == nullptr || rs->due_us.value_or(0) != t.due_us) return false;
  const step_phase phase = rs->phase;
  if (phase == step_phase::backoff) {
    start_attempt(inst, *s);
  } else if (phase == step_phase::waiting) {
    complete_step(inst, *s, json());
  } else if (phase == step_phase::calling) {
    // Only a virtual clock arms this: the attempt's timeout in workflow time.
    step_error(inst, *s,
               error{std::string(common::errc::deadline_exceeded),
                     "no reply from " + s->service + "." + s->action + " within " +
                         std::to_string(s->timeout.value_or(opts_.default_timeout).count()) + " ms",
                     true},
               true);
  } else if (phase == step_phase::awaiting) {
    unregister_await(inst, *s);
    step_error(inst, *s,
               error{"timeout",
                     "no matching event on " + s->until.front() + " within " +
                         std::to_string(s->timeout ? s->timeout->count() : 0) + " ms",
                     true},
               true);
  } else {
    return false;
  }
  advance(inst);
  return true;
}

}  // namespace ensemble::orchestrator::detail
