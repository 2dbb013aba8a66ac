// Restart: what the store kept is loaded and resumed (outbox published again, timers re-armed,
// calls in flight re-sent with their idempotency keys, awaits registered again), and the broker's
// journal is asked for the events that the awaits missed meanwhile.
#include <algorithm>
#include <iterator>

#include "engine.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/orchestrator/expression.hpp"

namespace ensemble::orchestrator::detail {

using namespace std::chrono_literals;
using millis = std::chrono::milliseconds;

void engine::begin(effects_sink& fx) {
  effects_sink_ = &fx;
  for (auto& ev : std::exchange(loaded_buffer_, {})) {
    buffer_.push_back(std::move(ev.event));
    auto it = std::prev(buffer_.end());
    buffer_index_.emplace(
        key_of((*it)["topic"].get<std::string>(), it->value("correlation_id", std::string())), it);
  }
  auto records = std::exchange(loaded_, {});
  for (auto& r : records) {
    auto def = find_definition(r.workflow, r.version);
    if (!def) {
      log_->error("instance {}: workflow {} v{} is unknown and not in the store; left as is", r.id,
                  r.workflow, r.version);
      continue;
    }
    if (!r.state.is_object()) {
      log_->error("instance {}: its stored state is a JSON {}, not an object; left as is", r.id,
                  r.state.type_name());
      continue;
    }
    auto in = std::make_unique<instance>();
    in->id = r.id;
    in->def = def;
    in->status = r.status;
    in->parent_id = r.parent_id;
    in->started_by = r.started_by;
    in->created_us = r.created_us;
    in->updated_us = r.updated_us;
    in->state = std::move(r.state);
    if (auto run = in->state.find("run"); run != in->state.end()) {
      in->run = run_from_json(*run);
      in->state.erase(run);
    }
    live_.emplace(r.id, std::move(in));
  }
  for (auto& [id, in] : live_) resume(*in);
  if (!records.empty()) {
    log_->info("resumed {} active instance(s), {} buffered event(s)", live_.size(), buffer_.size());
  }
  for (auto& [id, in] : live_) advance(*in);
  // A virtual clock's time is kept from its first start on: a restart goes on from there.
  if (virtual_ != nullptr) batch_.virtual_now_us = virtual_->now_us();
  flush();
}

std::set<std::string> engine::journal_topics() const {
  // The durable consumer delivers what arrived on its topics while we were down; the broker's
  // journal is asked only for the others.
  std::set<std::string> topics;
  std::set_difference(await_topics_.begin(), await_topics_.end(), durable_topics_.begin(),
                      durable_topics_.end(), std::inserter(topics, topics.begin()));
  return topics;
}

void engine::resume(instance& in) {
  for (const auto& [event_id, entry] : in.run.outbox) send_outbox(in, event_id);
  if (in.run.deadline_us && in.status == instance_status::running) {
    arm(in, timer_kind::deadline, *in.run.deadline_us);
  }
  if (in.status == instance_status::compensating) {
    if (!in.run.comp) in.run.comp.emplace();
    auto& comp = *in.run.comp;
    if (comp.phase == step_phase::calling || comp.phase == step_phase::backoff) {
      comp.phase = step_phase::none;  // re-issue the same attempt: same idempotency key
      comp.attempt = comp.attempt - 1;
    }
    touch(in);
    progress_compensation(in);
    return;
  }
  if (in.status != instance_status::running) return;
  for (auto& [name, rs] : in.run.steps) {
    const step* s = in.def->find(name);
    if (s == nullptr || peek(in, name).value("status", "") != k_running) continue;
    const step_phase phase = rs.phase;
    if (phase == step_phase::calling) {
      // Re-send with the same attempt and idempotency key, so that the agent can recognise it.
      auto rendered = s->input ? render(*s->input, in.state) : result<json>(default_input(in));
      json payload = rendered ? std::move(*rendered) : json();
      const auto attempt = vis(in, name).value("attempts", 1U);
      const std::string request_id = ids_.next();
      const auto timeout = s->timeout.value_or(opts_.default_timeout);
      rs.request_id = request_id;
      rs.deadline_us = now_us() + timeout.count() * 1000;
      if (clock_->is_virtual()) {
        rs.due_us = rs.deadline_us;
        arm(in, timer_kind::step, *rs.due_us, name);
      }
      send_call(in, reply_to::step, name, s->service, s->action, std::move(payload), timeout,
                request_id, rs.key.value_or(""), attempt);
      touch(in);
    } else if (phase == step_phase::backoff || phase == step_phase::waiting) {
      arm(in, timer_kind::step, rs.due_us.value_or(0), name);
    } else if (phase == step_phase::awaiting) {
      register_await(in, *s);
      arm(in, timer_kind::step, rs.due_us.value_or(0), name);
      // What arrived for it while we were down is in the broker's journal: catch_up().
      const auto since = rs.since_real_us.value_or(rs.since_us.value_or(0));
      auto [it, first] = catch_up_from_.try_emplace(in.id, since);
      if (!first) it->second = std::min(it->second, since);
    }
  }
  for (auto& [name, rs] : in.run.steps) {
    const step* s = in.def->find(name);
    if (s != nullptr && rs.phase == step_phase::awaiting &&
        peek(in, name).value("status", "") == k_running) {
      try_buffer(in, *s);
    }
  }
}

void engine::catch_up(std::map<std::string, std::int64_t> waiting, std::set<std::string> topics) {
  std::size_t found = 0;
  std::size_t asked = 0;
  for (const auto& [id, since_us] : waiting) {
    {
      std::lock_guard lock(mutex_);
      if (stopping_) return;
    }
    ++asked;
    auto body = effects_sink_->journal(id);
    if (!body) {
      log_->warn("catch-up: cannot read the broker's journal for instance {}: {}", id,
                 body.err().to_string());
      continue;
    }
    for (const auto& e : body->value("entries", json::array())) {
      if (e.value("kind", "") != "event" || topics.count(e.value("topic", "")) == 0) continue;
      if (e.value("ts_us", std::int64_t{0}) < since_us || !e.contains("payload")) continue;
      const auto& bin = e["payload"].get_binary();
      auto payload = agent::from_json_payload(agent::bytes(bin.begin(), bin.end()));
      json ev = {{"id", e.value("id", "")},
                 {"topic", e.value("topic", "")},
                 {"correlation_id", e.value("correlation_id", "")},
                 {"causation_id", e.value("causation_id", "")},
                 {"trace_id", ""},
                 {"seq", e.value("seq", std::uint64_t{0})},
                 {"ts", e.value("ts_us", std::int64_t{0})},
                 {"publisher", e.value("from", "")},
                 {"payload", payload ? std::move(*payload) : json()}};
      inbound in;
      in.what = inbound::kind::event;
      in.replayed = true;
      in.event = std::move(ev);
      post(std::move(in));
      ++found;
    }
  }
  log_->info("catch-up: asked the broker's journal for {} waiting instance(s), found {} event(s)",
             asked, found);
}

}  // namespace ensemble::orchestrator::detail
