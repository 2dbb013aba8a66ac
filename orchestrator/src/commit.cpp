// The commit and what follows it: each iteration's changes go to the store in one transaction,
// then the commands, events and answers they caused are sent; a failed commit (disk full, ...)
// keeps accepted work pending and drops what requests started since the last commit. Also the
// bookkeeping that feeds the commit: the effects queue, history entries, timers, dirty
// instances and their records.
#include <algorithm>
#include <future>

#include "engine.hpp"
#include "ensemble/common/logging.hpp"

namespace ensemble::orchestrator::detail {

using millis = std::chrono::milliseconds;

namespace {

// While the store cannot commit, the pending batch is tried again this often: the attempt is
// the probe that notices space has returned.
constexpr std::int64_t k_store_retry_us = 500'000;

}  // namespace

void engine::flush() {
  if (store_failure_ && clock_->real_us() < next_store_try_us_) {
    send_ready_answers();
    return;
  }
  for (const auto& id : dirty_) {
    auto it = live_.find(id);
    if (it == live_.end()) continue;
    instance& in = *it->second;
    instance_record r = record_of(in);
    // Lent to the batch rather than copied (a deep copy per instance per iteration was the
    // engine's largest cost); given back right after the commit.
    r.state = std::move(in.state);
    r.state["run"] = lend_json(in.run);
    batch_.instances.push_back(std::move(r));
  }
  auto give_back = [this] {
    for (auto& r : batch_.instances) {
      if (auto it = live_.find(r.id); it != live_.end()) {
        instance& in = *it->second;
        if (auto run = r.state.find("run"); run != r.state.end()) {
          take_back(in.run, *run);
          r.state.erase(run);  // held typed, in instance::run
        }
        in.state = std::move(r.state);
      }
    }
  };
  if (!batch_.empty()) {
    auto s = db_->commit(batch_);
    give_back();
    if (!s) {
      store_failed(s.err());
      return;
    }
    // Committed trigger marks are found in the store from now on (triggered_by).
    for (const auto& t : batch_.triggers) pending_triggers_.erase(key_of(t.workflow, t.event_id));
    // What is stored now is the base the next commit's changed_steps are counted from.
    for (const auto& r : batch_.instances) {
      if (auto it = live_.find(r.id); it != live_.end()) {
        it->second->changed_steps.clear();
        it->second->all_steps_changed = false;
      }
    }
    if (store_failure_ || store_probing_) {
      log_->info("store commits again ({} instance(s) in the first batch); accepting new work",
                 batch_.instances.size());
      store_failure_.reset();
      store_probing_ = false;
    }
    std::lock_guard lock(stats_mutex_);
    ++stats_.commits;
    stats_.committed_instances += batch_.instances.size();
  } else if (store_failure_) {
    // Nothing accepted is waiting to be committed, so nothing can tell whether space returned:
    // the next write request is let through as the probe (it is answered storage_full and
    // dropped if its commit fails, as above).
    store_failure_.reset();
    store_probing_ = true;
  }
  batch_ = commit_batch{};
  fresh_.clear();
  for (const auto& id : dirty_) {
    auto it = live_.find(id);
    if (it == live_.end()) continue;
    instance& in = *it->second;
    if (is_terminal(in.status) && in.run.outbox.empty()) live_.erase(it);
  }
  dirty_.clear();
  {
    std::lock_guard lock(stats_mutex_);
    stats_.active = live_.size();
    stats_.buffered_events = buffer_.size();
  }

  auto effects = std::move(effects_);
  effects_.clear();
  for (auto& e : effects) {
    switch (e.what) {
      case effect::kind::call: {
        auto* self = this;
        const std::string request_id = e.opts.id;
        effects_sink_->call(
            outgoing_call{e.service, e.action, std::move(e.payload), e.timeout, e.opts},
            [self, id = e.instance_id, to = e.to, step = e.step, request_id](response_result r) {
              inbound in;
              in.what = inbound::kind::reply;
              in.instance_id = id;
              in.to = to;
              in.step = step;
              in.request_id = request_id;
              in.answer = std::move(r);
              self->post(std::move(in));
            });
        break;
      }
      case effect::kind::publish: {
        auto* self = this;
        const std::string event_id = e.opts.id;
        effects_sink_->publish(outgoing_event{e.topic, std::move(e.payload), e.opts},
                               [self, id = e.instance_id, event_id](response_result r) {
                                 inbound in;
                                 in.what = inbound::kind::ack;
                                 in.instance_id = id;
                                 in.request_id = event_id;
                                 in.answer = std::move(r);
                                 self->post(std::move(in));
                               });
        break;
      }
      case effect::kind::answer:
        e.promise->set_value(e.answer ? e.answer() : std::move(*e.ready));
        break;
    }
  }
}

// Nothing leaves the process until its state is stored. The state changes of instances that
// were already committed (accepted work) stay pending — batch, dirty instances, their commands
// and events — and are committed by a later attempt. Instances that requests started since the
// last commit are dropped instead, and those requests answered with the failure: a client told
// "not started" must never find the instance later.
void engine::store_failed(const error& why) {
  batch_.instances.clear();  // rebuilt from dirty_ by the next attempt
  if (!store_failure_ && !store_probing_) {
    log_->error(
        "store commit failed: {}; refusing new work, answering reads, trying again every {} ms",
        why.message, k_store_retry_us / 1000);
  } else {
    log_->debug("store commit failed again: {}", why.message);
  }
  store_failure_ = why;
  next_store_try_us_ = clock_->real_us() + k_store_retry_us;
  drop_uncommitted_starts(why);
  send_ready_answers();
}

void engine::drop_uncommitted_starts(const error& why) {
  if (fresh_.empty()) return;
  std::unordered_set<std::string> drop = std::exchange(fresh_, {});
  // Sub-workflows they started in the same iteration were never committed either.
  for (bool grew = true; grew;) {
    grew = false;
    for (const auto& [id, in] : live_) {
      if (drop.count(id) == 0 && drop.count(in->parent_id) != 0) grew = drop.insert(id).second;
    }
  }
  for (const auto& id : drop) {
    live_.erase(id);
    dirty_.erase(id);
  }
  std::erase_if(batch_.history, [&](const history_entry& h) { return drop.count(h.instance_id); });
  std::erase_if(batch_.triggers, [&](const trigger_mark& t) { return drop.count(t.instance_id); });
  // A trigger whose instance is dropped may start it when its event comes again.
  std::erase_if(pending_triggers_, [&](const auto& kv) { return drop.count(kv.second) != 0; });
  std::erase_if(default_awaits_, [&](const auto& kv) {
    return drop.count(kv.first.substr(kv.first.find('\n') + 1)) != 0;
  });
  for (auto& [topic, waiting] : match_awaits_) {
    std::erase_if(waiting, [&](const auto& w) { return drop.count(w.first) != 0; });
  }
  std::erase_if(effects_, [&](effect& e) {
    if (drop.count(e.instance_id) == 0) return false;
    if (e.what == effect::kind::answer) {
      e.promise->set_value(error{why.code,
                                 "instance \"" + e.instance_id +
                                     "\" not started (nothing of it is stored): " + why.message,
                                 true});
    }
    return true;  // its commands and events are never sent
  });
  {
    std::lock_guard lock(stats_mutex_);
    stats_.started -= std::min<std::uint64_t>(stats_.started, drop.size());
  }
  log_->warn(
      "store cannot commit: {} instance(s) started by requests since the last commit "
      "dropped, their requests answered {}",
      drop.size(), why.code);
}

void engine::send_ready_answers() {
  std::erase_if(effects_, [](effect& e) {
    if (e.what != effect::kind::answer || e.durable) return false;
    e.promise->set_value(e.answer ? e.answer() : std::move(*e.ready));
    return true;
  });
}

// ---------------------------------------------------------------------------------------------
// Effects and bookkeeping

void engine::send_call(instance& in, reply_to to, const std::string& step,
                       const std::string& service, const std::string& action, json payload,
                       millis timeout, const std::string& request_id, const std::string& key,
                       std::uint32_t attempt) {
  effect e;
  e.what = effect::kind::call;
  e.instance_id = in.id;
  e.to = to;
  e.step = step;
  e.service = service;
  e.action = action;
  e.payload = std::move(payload);
  e.timeout = timeout;
  e.opts.id = request_id;
  e.opts.correlation_id = in.id;
  e.opts.causation_id = in.run.cause;
  e.opts.trace_id = in.run.trace_id;
  e.opts.idempotency_key = key;
  e.opts.attempt = attempt;
  e.opts.retryable = true;
  effects_.push_back(std::move(e));
  std::lock_guard lock(stats_mutex_);
  ++stats_.commands_sent;
}

void engine::add_outbox(instance& in, const std::string& topic, json payload,
                        const std::string& key, const std::string& kind, const std::string& step) {
  outbox_entry entry;
  entry.topic = topic;
  entry.payload = std::move(payload);
  entry.kind = kind;
  entry.cause = in.run.cause;
  if (!step.empty()) entry.step = step;
  in.run.outbox[key] = std::move(entry);
  touch(in);
  send_outbox(in, key);
}

void engine::send_outbox(instance& in, const std::string& event_id) {
  const auto& entry = in.run.outbox[event_id];
  effect e;
  e.what = effect::kind::publish;
  e.instance_id = in.id;
  e.topic = entry.topic;
  e.payload = entry.payload;
  e.opts.id = event_id;
  e.opts.correlation_id = in.id;
  e.opts.causation_id = entry.cause;
  e.opts.trace_id = in.run.trace_id;
  e.opts.idempotency_key = event_id;
  effects_.push_back(std::move(e));
}

void engine::arm(instance& in, timer_kind what, std::int64_t due_us, const std::string& name) {
  timers_.push(timer{due_us, in.id, what, name});
}

void engine::history(instance& in, const std::string& kind, const std::string& step, json data) {
  const std::uint64_t n = ++in.run.history_seq;
  batch_.history.push_back(history_entry{in.id, n, now_us(), kind, step, std::move(data)});
}

instance_record engine::record_of(instance& in) {
  instance_record r;
  r.id = in.id;
  r.workflow = in.def->name;
  r.version = in.def->version;
  r.status = in.status;
  r.parent_id = in.parent_id;
  r.started_by = in.started_by;
  r.created_us = in.created_us;
  r.updated_us = in.updated_us;
  r.active = !is_terminal(in.status) || !in.run.outbox.empty();
  if (!in.all_steps_changed) r.changed_steps = in.changed_steps;
  return r;
}

void engine::touch(instance& in) {
  in.updated_us = now_us();
  dirty_.insert(in.id);
}

}  // namespace ensemble::orchestrator::detail
