// The engine's loop: the inbox and the thread (or the caller's turns, run_once), the inputs'
// dispatch, timers, the commit of each iteration and the sends that follow it, store failures;
// and the bookkeeping every part uses (the effects queue, history, timers). See engine.hpp for
// the shape of things and the other parts.
#include "engine.hpp"

#include <algorithm>
#include <future>
#include <iterator>
#include <limits>

#include "admin.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/common/clock.hpp"
#include "ensemble/common/logging.hpp"
#include "ensemble/orchestrator/expression.hpp"

namespace ensemble::orchestrator::detail {

using namespace std::chrono_literals;
using millis = std::chrono::milliseconds;

namespace {

constexpr std::int64_t k_republish_us = 1'000'000;
// While the store cannot commit, the pending batch is tried again this often: the attempt is
// the probe that notices space has returned.
constexpr std::int64_t k_store_retry_us = 500'000;
}  // namespace

std::string_view phase_name(step_phase p) {
  switch (p) {
    case step_phase::none:
      return "";
    case step_phase::calling:
      return "calling";
    case step_phase::backoff:
      return "backoff";
    case step_phase::awaiting:
      return "awaiting";
    case step_phase::waiting:
      return "waiting";
    case step_phase::publishing:
      return "publishing";
    case step_phase::child:
      return "child";
  }
  return "";
}

step_phase phase_of(const json& run_state) {
  const auto it = run_state.find("phase");
  if (it == run_state.end() || !it->is_string()) return step_phase::none;
  const auto& name = it->get_ref<const std::string&>();
  for (auto p : {step_phase::calling, step_phase::backoff, step_phase::awaiting,
                 step_phase::waiting, step_phase::publishing, step_phase::child}) {
    if (name == phase_name(p)) return p;
  }
  return step_phase::none;
}

void set_phase(json& run_state, step_phase p) {
  run_state["phase"] = std::string(phase_name(p));
}

std::string key_of(const std::string& a, const std::string& b) {
  return a + '\n' + b;
}

json error_json(const std::string& step, const error& e, std::uint32_t attempts) {
  json j = {{"code", e.code}, {"message", e.message}};
  if (!step.empty()) j["step"] = step;
  if (attempts > 0) j["attempts"] = attempts;
  return j;
}

std::string describe(const json& err) {
  std::string s;
  if (err.contains("step")) s += "step " + err["step"].get<std::string>() + ": ";
  s += err.value("code", std::string("error")) + ": " + err.value("message", std::string());
  if (err.contains("attempts")) {
    s += " (after " + std::to_string(err["attempts"].get<std::uint32_t>()) + " attempt(s))";
  }
  return s;
}

engine::engine(options opts, std::vector<definition> defs, std::unique_ptr<store> db,
               std::shared_ptr<clock> clk)
    : opts_(std::move(opts)),
      db_(std::move(db)),
      clock_(std::move(clk)),
      virtual_(dynamic_cast<virtual_clock*>(clock_.get())),
      log_(common::component_logger("orchestrator")) {
  for (auto& d : defs) {
    auto shared = std::make_shared<const definition>(std::move(d));
    const std::string lifecycle = "workflow." + shared->name + ".started";
    if (auto problem = common::check_topic(lifecycle); !problem.empty()) {
      throw common::config_error(
          shared->source + ": /workflow/name",
          "\"" + shared->name + "\" cannot name lifecycle topics: " + problem);
    }
    if (auto s = db_->save_definition(shared->name, shared->version, shared->raw); !s) {
      throw common::config_error(shared->source, s.err().message);
    }
    for (const auto& t : shared->triggers) triggers_[t.topic].push_back(shared);
    auto& latest = latest_[shared->name];
    if (!latest || latest->version < shared->version) latest = shared;
    defs_[{shared->name, shared->version}] = shared;
  }
  // Trigger topics are listened to but not buffered: nothing awaits them.
  std::set<std::string> awaited;
  for (const auto& [k, d] : defs_) {
    std::vector<const sequence*> todo{&d->steps};
    while (!todo.empty()) {
      const sequence* seq = todo.back();
      todo.pop_back();
      for (const auto& s : *seq) {
        for (const auto& t : s.until) awaited.insert(t);
        for (const auto& t : s.fail_on) awaited.insert(t);
        for (const auto& b : s.branches) todo.push_back(&b);
        for (const auto& c : s.cases) todo.push_back(&c.steps);
        todo.push_back(&s.default_steps);
      }
    }
  }
  await_topics_ = std::move(awaited);
  // Read now, so that a store whose rows do not decode stops the start-up with an error naming
  // the row, before anything connects.
  constexpr const char* k_way_out =
      ". The store is damaged: restore the file from a backup (docs/workflows.md, \"The store\")";
  auto buffer_rows = db_->load_buffer();
  if (!buffer_rows) throw store_damaged("", buffer_rows.err().message + k_way_out);
  loaded_buffer_ = std::move(*buffer_rows);
  auto active = db_->load_active();
  if (!active) throw store_damaged("", active.err().message + k_way_out);
  loaded_ = std::move(*active);
}

engine::~engine() {
  stop();
}

std::vector<std::string> engine::listened_topics() const {
  std::set<std::string> all(await_topics_.begin(), await_topics_.end());
  for (const auto& [topic, d] : triggers_) all.insert(topic);
  return {all.begin(), all.end()};
}

stats engine::counters() const {
  std::lock_guard lock(stats_mutex_);
  return stats_;
}

// ---------------------------------------------------------------------------------------------
// Thread plumbing

void engine::run(effects_sink& fx) {
  begin(fx);
  thread_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "orch-engine");
    loop();
  });
  auto topics = journal_topics();
  if (!catch_up_from_.empty() && !topics.empty()) {
    catch_up_thread_ = std::thread(
        [this, waiting = std::move(catch_up_from_), topics = std::move(topics)]() mutable {
          pthread_setname_np(pthread_self(), "orch-catch-up");
          catch_up(std::move(waiting), std::move(topics));
        });
  }
}

void engine::run_stepped(effects_sink& fx) {
  begin(fx);
  auto topics = journal_topics();
  if (!catch_up_from_.empty() && !topics.empty()) {
    catch_up(std::exchange(catch_up_from_, {}), std::move(topics));
  }
}

std::size_t engine::run_once() {
  std::vector<inbound> work;
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return 0;
    work.swap(inbox_);
  }
  const auto handled = work.size();
  turn(work);
  return handled;
}

void engine::stop() {
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return;
    stopping_ = true;
  }
  wake_.notify_all();
  if (catch_up_thread_.joinable()) catch_up_thread_.join();
  if (thread_.joinable()) thread_.join();
  // Fail what is still waiting for an answer.
  std::vector<inbound> left;
  {
    std::lock_guard lock(mutex_);
    left.swap(inbox_);
  }
  for (auto& in : left) {
    if (in.promise) {
      in.promise->set_value(
          error{std::string(common::errc::shutting_down), "the orchestrator is stopping", true});
    }
  }
}

void engine::post(inbound in) {
  {
    std::lock_guard lock(mutex_);
    if (stopping_) {
      if (in.promise) {
        in.promise->set_value(
            error{std::string(common::errc::shutting_down), "the orchestrator is stopping", true});
      }
      return;
    }
    inbox_.push_back(std::move(in));
  }
  wake_.notify_one();
}

void engine::loop() {
  std::vector<inbound> work;
  while (true) {
    {
      std::unique_lock lock(mutex_);
      // A virtual clock's timers are due only once `advance` moves it: no sleeping towards them.
      std::int64_t wait_us = 1'000'000;
      if (!timers_.empty() && !clock_->is_virtual()) {
        wait_us = std::min(wait_us, timers_.top().due_us - now_us());
      }
      if (store_failure_) wait_us = std::min(wait_us, next_store_try_us_ - clock_->real_us());
      wake_.wait_for(lock, std::chrono::microseconds(std::max<std::int64_t>(wait_us, 0)),
                     [this] { return stopping_ || !inbox_.empty(); });
      if (stopping_) return;
      work.swap(inbox_);
    }
    turn(work);
  }
}

void engine::turn(std::vector<inbound>& work) {
  for (auto& in : work) {
    // The state machine works on JSON documents; a bug that throws must not take every
    // other instance down with it. Log it with the instance and go on.
    try {
      process(in);
    } catch (const std::exception& e) {
      log_->critical("instance {}: internal error while handling {}: {}", in.instance_id,
                     in.tag.empty() ? in.action : in.tag, e.what());
      if (in.promise) {
        effect answer;
        answer.what = effect::kind::answer;
        answer.promise = in.promise;
        answer.ready = result<json>(error{"internal", e.what(), false});
        effects_.push_back(std::move(answer));
      }
    }
  }
  work.clear();
  fire_timers();
  if (now_us() >= next_purge_us_) purge_buffer();
  flush();
}

void engine::process(inbound& in) {
  switch (in.what) {
    case inbound::kind::event: {
      if (!in.promise) {
        handle_event(std::move(in.event), in.replayed);
        return;
      }
      // A durable delivery: acked once its effects are committed, redelivered otherwise.
      effect e;
      e.what = effect::kind::answer;
      e.promise = in.promise;
      if (store_failure_) {
        e.ready = result<json>(
            error{store_failure_->code,
                  "event " + in.event.value("id", "") +
                      " not handled, the store cannot commit: " + store_failure_->message,
                  true});
      } else {
        // A trigger's instance stands or falls with its commit (drop_uncommitted_starts
        // answers this with the failure); anything else waits for the commit.
        e.instance_id = handle_event(std::move(in.event), false);
        e.durable = true;
        e.ready = result<json>(json::object());
      }
      effects_.push_back(std::move(e));
      return;
    }
    case inbound::kind::admin: {
      effect e;
      e.what = effect::kind::answer;
      e.promise = in.promise;
      const admin_action* action = find_admin_action(in.action);
      const bool writes = action != nullptr && action->mutates;
      if (writes && store_failure_) {
        // New work is refused while the store cannot commit: nothing is changed.
        e.ready = result<json>(error{store_failure_->code,
                                     "not " +
                                         std::string(in.action == "start"    ? "started"
                                                     : in.action == "cancel" ? "cancelled"
                                                                             : "advanced") +
                                         ", the store cannot commit: " + store_failure_->message,
                                     true});
        effects_.push_back(std::move(e));
        return;
      }
      std::function<result<json>()> later;
      auto r = admin(in.action, in.args, in.from, later);
      if (writes && r && r->is_object()) {
        // Answered once what it changed is committed (advance: what the timers it fired did).
        if (in.action == "cancel" || in.action == "advance") e.durable = true;
        // A start of an id that this iteration created stands or falls with that instance.
        if (in.action == "start" &&
            (r->value("created", false) || fresh_.count(r->value("id", "")) != 0)) {
          e.durable = true;
          e.instance_id = r->value("id", "");
          fresh_.insert(e.instance_id);
        }
      }
      if (later) {
        e.answer = std::move(later);
      } else {
        e.ready = std::move(r);
      }
      effects_.push_back(std::move(e));
      return;
    }
    case inbound::kind::stop:
      return;
    case inbound::kind::reply:
    case inbound::kind::ack:
      break;
  }
  auto it = live_.find(in.instance_id);
  if (it == live_.end()) return;
  instance& inst = *it->second;
  auto& r = *in.answer;

  if (in.what == inbound::kind::ack) {
    auto& outbox = inst.run()["outbox"];
    auto entry = outbox.find(in.request_id);
    if (entry == outbox.end()) return;
    if (!r) {
      log_->warn("instance {}: event {} on {} not acknowledged: {}; publishing again", inst.id,
                 in.request_id, (*entry)["topic"].get<std::string>(), r.err().to_string());
      arm(inst, "@outbox:" + in.request_id, now_us() + k_republish_us);
      return;
    }
    const std::string kind = (*entry)["kind"];
    const std::string step_name = entry->value("step", std::string());
    outbox.erase(entry);
    touch(inst);
    {
      std::lock_guard lock(stats_mutex_);
      ++stats_.events_published;
    }
    if (kind == "publish") {
      const step* s = inst.def->find(step_name);
      auto& rs = run_of(inst, step_name);
      if (s != nullptr && phase_of(rs) == step_phase::publishing &&
          rs.value("key", "") == in.request_id) {
        complete_step(inst, *s, json{{"id", in.request_id}, {"seq", r->seq}});
        advance(inst);
      }
    } else if (kind == "compensation") {
      auto& comp = inst.run()["comp"];
      if (phase_of(comp) == step_phase::publishing && comp.value("event_id", "") == in.request_id) {
        const std::string name = comp["list"][comp["index"].get<std::size_t>()];
        vis(inst, name)["status"] = "compensated";
        history(inst, "compensated", name, json{{"event", in.request_id}});
        comp["index"] = comp["index"].get<std::size_t>() + 1;
        set_phase(comp, step_phase::none);
        progress_compensation(inst);
      }
    }
    return;
  }

  // A reply to a command: a step's, or a compensation's.
  if (in.tag == "@comp") {
    auto& comp = inst.run()["comp"];
    if (phase_of(comp) != step_phase::calling || comp.value("request_id", "") != in.request_id) {
      return;
    }
    const std::string name = comp["list"][comp["index"].get<std::size_t>()];
    const step* s = inst.def->find(name);
    if (r) {
      vis(inst, name)["status"] = "compensated";
      history(inst, "compensated", name, json{{"worker", r->worker}});
      comp["index"] = comp["index"].get<std::size_t>() + 1;
      set_phase(comp, step_phase::none);
    } else {
      const auto attempt = comp.value("attempt", 1U);
      const bool retryable = r.err().retryable || common::error::retryable_by_default(r.err().code);
      history(inst, "compensation_attempt_failed", name, error_json("", r.err(), attempt));
      if (s->compensate->retry.allows(r.err().code, retryable) &&
          attempt < s->compensate->retry.max_attempts) {
        set_phase(comp, step_phase::backoff);
        arm(inst, "@comp", now_us() + s->compensate->retry.delay_after(attempt).count() * 1000);
      } else {
        vis(inst, name)["status"] = "compensation_failed";
        inst.run()["comp_failures"].push_back(error_json(name, r.err(), attempt));
        history(inst, "compensation_failed", name, error_json("", r.err(), attempt));
        comp["index"] = comp["index"].get<std::size_t>() + 1;
        set_phase(comp, step_phase::none);
      }
    }
    touch(inst);
    progress_compensation(inst);
    return;
  }
  const step* s = inst.def->find(in.tag);
  if (s == nullptr || inst.status != instance_status::running) return;
  auto& rs = run_of(inst, s->name);
  if (phase_of(rs) != step_phase::calling || rs.value("request_id", "") != in.request_id) return;
  // The reply is what causes whatever the instance does next.
  inst.run()["cause"] = in.request_id;
  if (r) {
    vis(inst, s->name)["worker"] = r->worker;
    complete_step(inst, *s, std::move(r->payload));
  } else {
    step_error(inst, *s, r.err());
  }
  advance(inst);
}

std::size_t engine::fire_timers() {
  const auto now = now_us();
  std::size_t fired = 0;
  while (!timers_.empty() && timers_.top().due_us <= now) {
    timer t = timers_.top();
    timers_.pop();
    auto it = live_.find(t.instance_id);
    if (it == live_.end()) continue;
    instance& inst = *it->second;
    if (t.tag == "@deadline") {
      if (inst.status != instance_status::running ||
          inst.run().value("deadline_us", std::int64_t{0}) != t.due_us) {
        continue;
      }
      ++fired;
      abandon(inst, inst.def->steps);
      begin_compensation(
          inst, instance_status::timed_out,
          json{{"code", "timeout"},
               {"message", "the workflow's timeout of " +
                               std::to_string(inst.def->timeout->count()) + " ms passed"}});
      continue;
    }
    if (t.tag == "@comp") {
      auto& comp = inst.run()["comp"];
      if (phase_of(comp) == step_phase::backoff) {
        ++fired;
        set_phase(comp, step_phase::none);
        progress_compensation(inst);
      }
      continue;
    }
    if (t.tag.rfind("@outbox:", 0) == 0) {
      const std::string event_id = t.tag.substr(8);
      if (inst.run()["outbox"].contains(event_id)) {
        ++fired;
        send_outbox(inst, event_id);
      }
      continue;
    }
    const step* s = inst.def->find(t.tag);
    if (s == nullptr || inst.status != instance_status::running) continue;
    auto& rs = run_of(inst, s->name);
    if (rs.value("due_us", std::int64_t{0}) != t.due_us) continue;
    const step_phase phase = phase_of(rs);
    if (phase == step_phase::backoff) {
      start_attempt(inst, *s);
    } else if (phase == step_phase::waiting) {
      complete_step(inst, *s, json());
    } else if (phase == step_phase::calling) {
      // Only a virtual clock arms this: the attempt's timeout in workflow time.
      step_error(
          inst, *s,
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
      continue;
    }
    ++fired;
    advance(inst);
  }
  return fired;
}

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
    batch_.instances.push_back(std::move(r));
  }
  auto give_back = [this] {
    for (auto& r : batch_.instances) {
      if (auto it = live_.find(r.id); it != live_.end()) it->second->state = std::move(r.state);
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
    if (is_terminal(in.status) && in.run()["outbox"].empty()) live_.erase(it);
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
            [self, id = e.instance_id, tag = e.tag, request_id](response_result r) {
              inbound in;
              in.what = inbound::kind::reply;
              in.instance_id = id;
              in.tag = tag;
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

namespace {}  // namespace

// ---------------------------------------------------------------------------------------------
// Effects and bookkeeping

void engine::send_call(instance& in, const std::string& tag, const std::string& service,
                       const std::string& action, json payload, millis timeout,
                       const std::string& request_id, const std::string& key,
                       std::uint32_t attempt) {
  effect e;
  e.what = effect::kind::call;
  e.instance_id = in.id;
  e.tag = tag;
  e.service = service;
  e.action = action;
  e.payload = std::move(payload);
  e.timeout = timeout;
  e.opts.id = request_id;
  e.opts.correlation_id = in.id;
  e.opts.causation_id = in.run().value("cause", "");
  e.opts.trace_id = in.run()["trace_id"];
  e.opts.idempotency_key = key;
  e.opts.attempt = attempt;
  e.opts.retryable = true;
  effects_.push_back(std::move(e));
  std::lock_guard lock(stats_mutex_);
  ++stats_.commands_sent;
}

void engine::add_outbox(instance& in, const std::string& topic, json payload,
                        const std::string& key, const std::string& kind, const std::string& step) {
  json entry = {{"topic", topic},
                {"payload", std::move(payload)},
                {"kind", kind},
                {"cause", in.run().value("cause", "")}};
  if (!step.empty()) entry["step"] = step;
  in.run()["outbox"][key] = std::move(entry);
  touch(in);
  send_outbox(in, key);
}

void engine::send_outbox(instance& in, const std::string& event_id) {
  const auto& entry = in.run()["outbox"][event_id];
  effect e;
  e.what = effect::kind::publish;
  e.instance_id = in.id;
  e.topic = entry["topic"];
  e.payload = entry["payload"];
  e.opts.id = event_id;
  e.opts.correlation_id = in.id;
  e.opts.causation_id = entry.value("cause", "");
  e.opts.trace_id = in.run()["trace_id"];
  e.opts.idempotency_key = event_id;
  effects_.push_back(std::move(e));
}

void engine::arm(instance& in, const std::string& tag, std::int64_t due_us) {
  timers_.push(timer{due_us, in.id, tag});
}

void engine::history(instance& in, const std::string& kind, const std::string& step, json data) {
  auto& seq = in.run()["history_seq"];
  const std::uint64_t n = seq.get<std::uint64_t>() + 1;
  seq = n;
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
  r.active = !is_terminal(in.status) || !in.run()["outbox"].empty();
  return r;
}

void engine::touch(instance& in) {
  in.updated_us = now_us();
  dirty_.insert(in.id);
}

json& engine::vis(instance& in, const std::string& step) {
  auto& v = in.state["steps"][step];
  if (!v.is_object()) v = json::object();
  return v;
}

json& engine::run_of(instance& in, const std::string& step) {
  auto& v = in.state["run"]["steps"][step];
  if (!v.is_object()) v = json::object();
  return v;
}

const json& engine::peek(const instance& in, const std::string& step) {
  static const json empty = json::object();
  const auto& steps = in.state["steps"];
  auto it = steps.find(step);
  return it == steps.end() || !it->is_object() ? empty : *it;
}

json engine::default_input(const instance& in) const {
  // The documented shape (docs/workflows.md, "Data"): what expressions read, without the
  // engine's own bookkeeping.
  json steps = json::object();
  for (const auto& [name, v] : in.state["steps"].items()) {
    json entry = json::object();
    for (const char* field : {"output", "error", "attempts", "event"}) {
      if (v.contains(field)) entry[field] = v[field];
    }
    if (!entry.empty()) steps[name] = std::move(entry);
  }
  const auto& wf = in.state["workflow"];
  return json{{"workflow", {{"id", wf["id"]}, {"name", wf["name"]}, {"input", wf["input"]}}},
              {"steps", std::move(steps)}};
}

// ---------------------------------------------------------------------------------------------
// Admin requests and the virtual clock

std::future<result<json>> engine::submit(std::string_view action, const json& args,
                                         const origin& from) {
  inbound in;
  in.what = inbound::kind::admin;
  in.action = std::string(action);
  in.args = args;
  in.from = from;
  in.promise = std::make_shared<std::promise<result<json>>>();
  auto future = in.promise->get_future();
  post(std::move(in));
  return future;
}

result<json> engine::request(std::string_view action, const json& args,
                             std::chrono::milliseconds deadline, const origin& from) {
  auto future = submit(action, args, from);
  if (future.wait_for(deadline) != std::future_status::ready) {
    return error{std::string(common::errc::deadline_exceeded),
                 "the orchestrator did not answer " + std::string(action) + " within " +
                     std::to_string(deadline.count()) + " ms",
                 true};
  }
  return future.get();
}

result<json> engine::advance_clock(const json& args) {
  const auto bad = bad_admin_args;
  if (virtual_ == nullptr) {
    return bad(
        "advance: this orchestrator runs on the wall clock; only one started with --clock "
        "virtual can be advanced");
  }
  const bool has_ms = args.is_object() && args.contains("by_ms");
  const bool has_text = args.is_object() && args.contains("by");
  if (has_ms == has_text) return bad("advance: give exactly one of \"by_ms\" and \"by\"");
  std::int64_t by_ms = 0;
  if (has_ms) {
    const json& v = args["by_ms"];
    if (!v.is_number_integer() || v.get<std::int64_t>() < 0) {
      return bad("advance: \"by_ms\" must be an integer >= 0 (milliseconds)");
    }
    by_ms = v.get<std::int64_t>();
  } else {
    // The duration grammar of workflow documents (docs/workflows.md, "Durations").
    auto d = args["by"].is_string() ? parse_duration(args["by"]) : std::nullopt;
    if (!d) {
      return bad("advance: \"by\" must be a duration such as \"250ms\", \"90s\", \"1.5h\"; got " +
                 args["by"].dump());
    }
    by_ms = d->count();
  }
  const std::int64_t from = now_us();
  if (by_ms > (std::numeric_limits<std::int64_t>::max() - from) / 1000) {
    return bad("advance: by " + std::to_string(by_ms) +
               " ms would move the clock past the largest time it can hold");
  }
  const std::int64_t to = from + by_ms * 1000;
  // In due order, each at its own time: what a timer's work arms (a retry after a timeout,
  // the next wait) fires in the same advance if it falls due before `to`.
  std::size_t fired = 0;
  while (!timers_.empty() && timers_.top().due_us <= to) {
    virtual_->set(timers_.top().due_us);
    fired += fire_timers();
  }
  virtual_->set(to);
  fired += fire_timers();
  batch_.virtual_now_us = now_us();
  log_->info("clock advanced by {} ms to {} us: {} timer(s) fired", by_ms, now_us(), fired);
  return json{{"from_us", from}, {"now_us", now_us()}, {"fired", fired}};
}

}  // namespace ensemble::orchestrator::detail
