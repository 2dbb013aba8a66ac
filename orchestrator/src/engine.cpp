// The engine's state machine and loop; see engine.hpp for the shape of things.
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
// Events ignored for their publisher ("from") are logged at most this often per topic.
constexpr std::int64_t k_ignored_log_interval_us = 1'000'000;

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

json event_meta(const json& ev) {
  json m = ev;
  m.erase("payload");
  return m;
}

}  // namespace

struct engine::inbound {
  enum class kind { reply, ack, event, admin, stop } what = kind::reply;
  bool replayed = false;  // an event from the broker's journal (catch_up)
  std::string instance_id;
  std::string tag;  // step name, or "@comp"
  std::string request_id;
  std::optional<response_result> answer;
  json event;
  std::string action;
  json args;
  origin from;
  std::shared_ptr<std::promise<result<json>>> promise;
};

struct engine::effect {
  enum class kind { call, publish, answer } what = kind::call;
  std::string instance_id, tag, service, action, topic;
  json payload;
  millis timeout{0};
  agent::send_options opts;
  std::shared_ptr<std::promise<result<json>>> promise;
  std::function<result<json>()> answer;
  std::optional<result<json>> ready;
  // An answer that reports a state change (start, cancel): sent only once it is committed.
  bool durable = false;
};

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
    auto in = std::make_unique<instance>();
    in->id = r.id;
    in->def = def;
    in->status = r.status;
    in->parent_id = r.parent_id;
    in->started_by = r.started_by;
    in->created_us = r.created_us;
    in->updated_us = r.updated_us;
    in->state = std::move(r.state);
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
      if (s != nullptr && rs.value("phase", "") == "publishing" &&
          rs.value("key", "") == in.request_id) {
        complete_step(inst, *s, json{{"id", in.request_id}, {"seq", r->seq}});
        advance(inst);
      }
    } else if (kind == "compensation") {
      auto& comp = inst.run()["comp"];
      if (comp.value("phase", "") == "publishing" && comp.value("event_id", "") == in.request_id) {
        const std::string name = comp["list"][comp["index"].get<std::size_t>()];
        vis(inst, name)["status"] = "compensated";
        history(inst, "compensated", name, json{{"event", in.request_id}});
        comp["index"] = comp["index"].get<std::size_t>() + 1;
        comp["phase"] = "";
        progress_compensation(inst);
      }
    }
    return;
  }

  // A reply to a command: a step's, or a compensation's.
  if (in.tag == "@comp") {
    auto& comp = inst.run()["comp"];
    if (comp.value("phase", "") != "calling" || comp.value("request_id", "") != in.request_id) {
      return;
    }
    const std::string name = comp["list"][comp["index"].get<std::size_t>()];
    const step* s = inst.def->find(name);
    if (r) {
      vis(inst, name)["status"] = "compensated";
      history(inst, "compensated", name, json{{"worker", r->worker}});
      comp["index"] = comp["index"].get<std::size_t>() + 1;
      comp["phase"] = "";
    } else {
      const auto attempt = comp.value("attempt", 1U);
      const bool retryable = r.err().retryable || common::error::retryable_by_default(r.err().code);
      history(inst, "compensation_attempt_failed", name, error_json("", r.err(), attempt));
      if (s->compensate->retry.allows(r.err().code, retryable) &&
          attempt < s->compensate->retry.max_attempts) {
        comp["phase"] = "backoff";
        arm(inst, "@comp", now_us() + s->compensate->retry.delay_after(attempt).count() * 1000);
      } else {
        vis(inst, name)["status"] = "compensation_failed";
        inst.run()["comp_failures"].push_back(error_json(name, r.err(), attempt));
        history(inst, "compensation_failed", name, error_json("", r.err(), attempt));
        comp["index"] = comp["index"].get<std::size_t>() + 1;
        comp["phase"] = "";
      }
    }
    touch(inst);
    progress_compensation(inst);
    return;
  }
  const step* s = inst.def->find(in.tag);
  if (s == nullptr || inst.status != instance_status::running) return;
  auto& rs = run_of(inst, s->name);
  if (rs.value("phase", "") != "calling" || rs.value("request_id", "") != in.request_id) return;
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
      if (comp.value("phase", "") == "backoff") {
        ++fired;
        comp["phase"] = "";
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
    const std::string phase = rs.value("phase", "");
    if (phase == "backoff") {
      start_attempt(inst, *s);
    } else if (phase == "waiting") {
      complete_step(inst, *s, json());
    } else if (phase == "calling") {
      // Only a virtual clock arms this: the attempt's timeout in workflow time.
      step_error(
          inst, *s,
          error{std::string(common::errc::deadline_exceeded),
                "no reply from " + s->service + "." + s->action + " within " +
                    std::to_string(s->timeout.value_or(opts_.default_timeout).count()) + " ms",
                true},
          true);
    } else if (phase == "awaiting") {
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

// ---------------------------------------------------------------------------------------------
// Instances

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
                   {"steps", json::object()},
                   {"run",
                    {{"trace_id", trace_id.empty() ? common::random_id() : trace_id},
                     {"cause", cause},
                     {"history_seq", 0},
                     {"completed", json::array()},
                     {"outbox", json::object()},
                     {"steps", json::object()}}}};
  if (!parent_step.empty()) in->state["run"]["parent_step"] = parent_step;
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
    ref.run()["deadline_us"] = due;
    arm(ref, "@deadline", due);
  }
  {
    std::lock_guard lock(stats_mutex_);
    ++stats_.started;
  }
  log_->debug("instance {}: started {} v{}", id, def->name, def->version);
  return ref;
}

void engine::resume(instance& in) {
  for (auto& [event_id, entry] : in.run()["outbox"].items()) {
    (void)entry;
    send_outbox(in, event_id);
  }
  if (in.run().contains("deadline_us") && in.status == instance_status::running) {
    arm(in, "@deadline", in.run()["deadline_us"].get<std::int64_t>());
  }
  if (in.status == instance_status::compensating) {
    auto& comp = in.run()["comp"];
    const std::string phase = comp.value("phase", "");
    if (phase == "calling" || phase == "backoff") {
      comp["phase"] = "";  // re-issue the same attempt: same idempotency key
      comp["attempt"] = comp.value("attempt", 1U) - 1;
    }
    touch(in);
    progress_compensation(in);
    return;
  }
  if (in.status != instance_status::running) return;
  for (auto& [name, rs] : in.run()["steps"].items()) {
    const step* s = in.def->find(name);
    if (s == nullptr || peek(in, name).value("status", "") != k_running) continue;
    const std::string phase = rs.value("phase", "");
    if (phase == "calling") {
      // Re-send with the same attempt and idempotency key, so that the agent can recognise it.
      auto rendered = s->input ? render(*s->input, in.state) : result<json>(default_input(in));
      json payload = rendered ? std::move(*rendered) : json();
      const auto attempt = vis(in, name).value("attempts", 1U);
      const std::string request_id = ids_.next();
      const auto timeout = s->timeout.value_or(opts_.default_timeout);
      rs["request_id"] = request_id;
      rs["deadline_us"] = now_us() + timeout.count() * 1000;
      if (clock_->is_virtual()) {
        rs["due_us"] = rs["deadline_us"];
        arm(in, name, rs["due_us"]);
      }
      send_call(in, name, s->service, s->action, std::move(payload), timeout, request_id, rs["key"],
                attempt);
      touch(in);
    } else if (phase == "backoff" || phase == "waiting") {
      arm(in, name, rs["due_us"].get<std::int64_t>());
    } else if (phase == "awaiting") {
      register_await(in, *s);
      arm(in, name, rs["due_us"].get<std::int64_t>());
      // What arrived for it while we were down is in the broker's journal: catch_up().
      const auto since = rs.value("since_real_us", rs.value("since_us", std::int64_t{0}));
      auto [it, first] = catch_up_from_.try_emplace(in.id, since);
      if (!first) it->second = std::min(it->second, since);
    }
  }
  for (auto& [name, rs] : in.run()["steps"].items()) {
    const step* s = in.def->find(name);
    if (s != nullptr && rs.value("phase", "") == "awaiting" &&
        peek(in, name).value("status", "") == k_running) {
      try_buffer(in, *s);
    }
  }
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
    std::string status = vis(in, s.name)["status"];
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
        if (all_done && vis(in, s.name)["status"] == k_running) complete_step(in, s, output);
      } else {
        const int chosen = run_of(in, s.name).value("case", -1);
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
      status = vis(in, s.name)["status"];
    }
    if (status == k_running) return walk_state::running;
    if (status == k_failed) {
      if (run_of(in, s.name).value("continued", false)) continue;
      failure = vis(in, s.name)["error"];
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
      run_of(in, s.name)["case"] = chosen;
      history(in, "step_started", s.name, json{{"kind", "switch"}, {"case", chosen}});
      return;
    }
    case step_kind::wait: {
      auto& rs = run_of(in, s.name);
      v["attempts"] = 1;
      rs["phase"] = "waiting";
      rs["due_us"] = now_us() + s.duration.count() * 1000;
      arm(in, s.name, rs["due_us"]);
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
  rs["key"] = key;
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
      rs["phase"] = "calling";
      rs["request_id"] = request_id;
      rs["deadline_us"] = now_us() + timeout.count() * 1000;  // shown by `get`
      if (clock_->is_virtual()) {
        // The step's timeout is the engine's timer, in workflow time; the broker still gets the
        // same span as the command's relative deadline_ms (docs/testing.md, "Time skipping").
        rs["due_us"] = rs["deadline_us"];
        arm(in, s.name, rs["due_us"]);
      }
      history(in, "step_started", s.name,
              json{{"kind", "command"},
                   {"service", s.service},
                   {"action", s.action},
                   {"attempt", attempt},
                   {"request_id", request_id}});
      send_call(in, s.name, s.service, s.action, std::move(*payload), timeout, request_id, key,
                attempt);
      return;
    }
    case step_kind::publish: {
      auto payload = render_or_fail(
          s.event.payload.is_null() ? std::nullopt : std::optional<json>(s.event.payload),
          default_input(in));
      if (!payload) return;
      rs["phase"] = "publishing";
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
      rs["phase"] = "awaiting";
      rs["since_us"] = now_us();  // events older than this attempt are not its answer
      // The broker's journal, asked after a restart, stamps events in real time.
      if (clock_->is_virtual()) rs["since_real_us"] = clock_->real_us();
      rs["due_us"] = now_us() + s.timeout.value_or(opts_.default_timeout).count() * 1000;
      history(in, "step_started", s.name,
              json{{"kind", to_string(s.kind)},
                   {"until", s.until},
                   {"fail_on", s.fail_on},
                   {"attempt", attempt},
                   {"topic", s.kind == step_kind::choreography ? json(s.event.topic) : json()},
                   {"event_id", s.kind == step_kind::choreography ? json(key) : json()},
                   {"from", s.from.empty() ? json() : json(s.from)}});
      register_await(in, s);
      arm(in, s.name, rs["due_us"]);
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
      rs["phase"] = "child";
      rs["child_id"] = child_id;
      history(in, "step_started", s.name,
              json{{"kind", "workflow"}, {"workflow", s.workflow}, {"child", child_id}});
      instance& child =
          create_instance(child_def, child_id, std::move(*child_input), in.id, s.name,
                          in.run()["trace_id"], in.run().value("cause", ""), in.started_by);
      if (s.timeout) {
        const auto due = child.created_us + s.timeout->count() * 1000;
        child.run()["deadline_us"] = due;
        arm(child, "@deadline", due);
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
  auto& rs = run_of(in, s.name);
  rs.erase("phase");
  rs.erase("due_us");
  json data = {{"attempts", v.value("attempts", 0U)}};
  if (!output.is_null()) data["output"] = output;
  if (v.contains("worker")) data["worker"] = v["worker"];
  v["output"] = std::move(output);
  in.run()["completed"].push_back(s.name);
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
    rs["phase"] = "backoff";
    rs["due_us"] = now_us() + delay.count() * 1000;
    arm(in, s.name, rs["due_us"]);
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
  rs.erase("phase");
  rs.erase("due_us");
  history(in, "step_failed", s.name, err);
  touch(in);
  if (s.on_error.what == on_error_policy::kind::continue_) {
    rs["continued"] = true;
  } else if (s.on_error.what == on_error_policy::kind::go_to) {
    rs["continued"] = true;
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
    if (rs.value("phase", "") == "awaiting") unregister_await(in, s);
    if (rs.value("phase", "") == "child") {
      auto child = live_.find(rs.value("child_id", ""));
      if (child != live_.end() && child->second->status == instance_status::running) {
        abandon(*child->second, child->second->def->steps);
        begin_compensation(*child->second, instance_status::cancelled,
                           json{{"code", "cancelled"}, {"message", "its parent stopped"}});
      }
    }
    rs.erase("phase");
    rs.erase("due_us");
    v["status"] = "cancelled";
    v["ended_us"] = now_us();
    history(in, "step_cancelled", s.name, json());
    touch(in);
  }
}

void engine::begin_compensation(instance& in, instance_status final_status, json err) {
  in.status = instance_status::compensating;
  in.run()["final"] = std::string(to_string(final_status));
  in.run()["error"] = err;
  json list = json::array();
  const auto& done = in.run()["completed"];
  for (auto it = done.rbegin(); it != done.rend(); ++it) {
    const step* s = in.def->find(it->get<std::string>());
    if (s != nullptr && s->compensate) list.push_back(s->name);
  }
  in.run()["comp"] = json{{"list", list}, {"index", 0}, {"phase", ""}, {"attempt", 0}};
  history(in, "compensating", "", json{{"reason", err}, {"steps", list}});
  touch(in);
  log_->debug("instance {}: {} -> compensating {} step(s)", in.id, describe(err), list.size());
  progress_compensation(in);
}

void engine::progress_compensation(instance& in) {
  if (in.status != instance_status::compensating) return;
  auto& comp = in.run()["comp"];
  const auto& list = comp["list"];
  const auto index = comp["index"].get<std::size_t>();
  if (index >= list.size()) {
    auto final_status = parse_instance_status(in.run()["final"].get<std::string>());
    json err = in.run()["error"];
    if (in.run().contains("comp_failures"))
      err["compensation_failures"] = in.run()["comp_failures"];
    finish(in, final_status.value_or(instance_status::failed), std::move(err));
    return;
  }
  if (!comp.value("phase", std::string()).empty()) return;  // waiting for it
  const std::string name = list[index];
  const step* s = in.def->find(name);
  const compensation& c = *s->compensate;
  const std::uint32_t attempt = comp.value("attempt", 0U) + 1;
  comp["attempt"] = attempt;
  const std::string key = in.id + "/" + name + "/compensate/" + std::to_string(attempt);
  json payload;
  if (c.what == compensation::kind::command) {
    auto r = c.input ? render(*c.input, in.state) : result<json>(default_input(in));
    if (r) payload = std::move(*r);
    const std::string request_id = ids_.next();
    comp["phase"] = "calling";
    comp["request_id"] = request_id;
    history(in, "compensation_started", name,
            json{{"service", c.service},
                 {"action", c.action},
                 {"attempt", attempt},
                 {"request_id", request_id}});
    send_call(in, "@comp", c.service, c.action, std::move(payload), c.timeout, request_id, key,
              attempt);
  } else {
    auto r = c.event.payload.is_null() ? result<json>(default_input(in))
                                       : render(c.event.payload, in.state);
    if (r) payload = std::move(*r);
    comp["phase"] = "publishing";
    comp["event_id"] = key;
    history(in, "compensation_started", name, json{{"topic", c.event.topic}, {"event_id", key}});
    add_outbox(in, c.event.topic, std::move(payload), key, "compensation", name);
  }
  comp["attempt"] = attempt;
  touch(in);
}

void engine::finish(instance& in, instance_status status, json result_or_error) {
  in.status = status;
  const bool ok = status == instance_status::completed;
  if (ok) {
    in.run()["output"] = result_or_error;
  } else {
    in.run()["error"] = result_or_error;
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
  const std::string step_name = in.run().value("parent_step", "");
  const step* s = p.def->find(step_name);
  if (s == nullptr || p.status != instance_status::running) return;
  auto& rs = run_of(p, step_name);
  if (rs.value("phase", "") != "child" || rs.value("child_id", "") != in.id) return;
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
// Awaits and events

void engine::register_await(instance& in, const step& s) {
  for (const auto* topics : {&s.until, &s.fail_on}) {
    for (const auto& t : *topics) {
      if (s.match.empty()) {
        default_awaits_[key_of(t, in.id)] = s.name;
      } else {
        match_awaits_[t].insert({in.id, s.name});
      }
    }
  }
}

void engine::unregister_await(instance& in, const step& s) {
  for (const auto* topics : {&s.until, &s.fail_on}) {
    for (const auto& t : *topics) {
      if (s.match.empty()) {
        auto it = default_awaits_.find(key_of(t, in.id));
        if (it != default_awaits_.end() && it->second == s.name) default_awaits_.erase(it);
      } else if (auto it = match_awaits_.find(t); it != match_awaits_.end()) {
        it->second.erase({in.id, s.name});
        if (it->second.empty()) match_awaits_.erase(it);
      }
    }
  }
}

bool engine::matches(instance& in, const step& s, const json& ev) {
  if (s.match.empty()) return ev.value("correlation_id", "") == in.id;
  in.state["event"] = ev;
  auto r = evaluate(s.match, in.state);
  in.state.erase("event");
  if (!r) {
    log_->warn("instance {}: step {}: match condition failed on event {}: {}", in.id, s.name,
               ev.value("id", ""), r.err().message);
    return false;
  }
  return *r;
}

bool engine::try_buffer(instance& in, const step& s) {
  for (const auto* topics : {&s.until, &s.fail_on}) {
    for (const auto& t : *topics) {
      if (s.match.empty()) {
        auto range = buffer_index_.equal_range(key_of(t, in.id));
        for (auto it = range.first; it != range.second; ++it) {
          // An event from a publisher that "from" does not list stays where it is: it is not
          // this step's answer.
          if (!from_allowed(s, *it->second)) {
            ignore_from(in, s, *it->second);
            continue;
          }
          json ev = std::move(*it->second);
          buffer_.erase(it->second);
          buffer_index_.erase(it);
          batch_.buffer_remove.push_back(ev["id"]);
          deliver(in, s, ev);
          return true;
        }
        continue;
      }
      for (auto it = buffer_.begin(); it != buffer_.end(); ++it) {
        if ((*it)["topic"] != t || !matches(in, s, *it)) continue;
        if (!from_allowed(s, *it)) {
          ignore_from(in, s, *it);
          continue;
        }
        json ev = std::move(*it);
        auto range = buffer_index_.equal_range(key_of(t, ev.value("correlation_id", "")));
        for (auto i = range.first; i != range.second; ++i) {
          if (i->second == it) {
            buffer_index_.erase(i);
            break;
          }
        }
        buffer_.erase(it);
        batch_.buffer_remove.push_back(ev["id"]);
        deliver(in, s, ev);
        return true;
      }
    }
  }
  return false;
}

void engine::deliver(instance& in, const step& s, const json& ev) {
  unregister_await(in, s);
  {
    std::lock_guard lock(stats_mutex_);
    ++stats_.events_matched;
  }
  const std::string topic = ev["topic"];
  in.run()["cause"] = ev.value("id", "");
  vis(in, s.name)["event"] = event_meta(ev);
  history(in, "event_matched", s.name, event_meta(ev));
  const bool failure = std::find(s.fail_on.begin(), s.fail_on.end(), topic) != s.fail_on.end();
  if (failure) {
    vis(in, s.name)["output"] = ev.value("payload", json());
    step_error(
        in, s,
        error{"choreography_failed",
              "the segment ended with " + topic + " (event " + ev.value("id", "") + ")", false});
  } else {
    complete_step(in, s, ev.value("payload", json()));
  }
}

namespace {
json event_json(const agent::message& m) {
  json ev = {{"id", m.id()},
             {"topic", m.topic()},
             {"correlation_id", m.correlation_id()},
             {"causation_id", m.causation_id()},
             {"trace_id", m.trace_id()},
             {"seq", m.seq()},
             {"ts", m.timestamp_us()},
             {"publisher", m.publisher()}};
  auto payload = agent::from_json_payload(m.payload());
  ev["payload"] = payload ? std::move(*payload) : json();
  if (!m.stream().empty()) {
    ev["stream"] = m.stream();
    ev["stream_seq"] = m.stream_seq();
  }
  return ev;
}
}  // namespace

void engine::on_event(const agent::message& m) {
  post_event(event_json(m));
}

void engine::post_event(json ev) {
  inbound in;
  in.what = inbound::kind::event;
  in.event = std::move(ev);
  post(std::move(in));
}

std::future<result<json>> engine::on_durable_event(const agent::message& m) {
  inbound in;
  in.what = inbound::kind::event;
  in.event = event_json(m);
  in.promise = std::make_shared<std::promise<result<json>>>();
  auto done = in.promise->get_future();
  post(std::move(in));
  return done;
}

void engine::set_durable_topics(std::set<std::string> topics) {
  durable_topics_ = std::move(topics);
}

std::string engine::handle_event(json ev, bool replayed) {
  std::string triggered;
  const std::string topic = ev["topic"];
  const std::string event_id = ev.value("id", "");
  // Triggers: one instance per (workflow, event id), ever.
  if (auto t = triggers_.find(topic); !replayed && t != triggers_.end()) {
    for (const auto& def : t->second) {
      for (const auto& trig : def->triggers) {
        if (trig.topic != topic) continue;
        json ctx = {{"event", ev}};
        if (!trig.match.empty()) {
          auto r = evaluate(trig.match, ctx);
          if (!r || !*r) continue;
        }
        if (store_failure_) {
          log_->warn("trigger {} of {}: event {} starts no instance, the store cannot commit: {}",
                     topic, def->name, event_id, store_failure_->message);
          continue;
        }
        const std::string mark = key_of(def->name, event_id);
        if (pending_triggers_.count(mark) != 0) {
          log_->debug("trigger {} event {}: already started an instance", topic, event_id);
          continue;
        }
        auto started = db_->triggered_by(def->name, event_id);
        if (!started || *started) {
          if (!started) {
            log_->error("trigger {} of {}: event {} starts no instance: {}", topic, def->name,
                        event_id, started.err().message);
          } else {
            log_->debug("trigger {} event {}: already started an instance", topic, event_id);
          }
          continue;
        }
        json start_input = ev.value("payload", json());
        if (trig.input) {
          auto r = render(*trig.input, ctx);
          if (!r) {
            log_->warn("trigger {} of {}: input for event {}: {}", topic, def->name, event_id,
                       r.err().message);
            continue;
          }
          start_input = std::move(*r);
        }
        const std::string id = ids_.next();
        pending_triggers_[mark] = id;
        batch_.triggers.push_back({def->name, event_id, id});
        instance& inst = create_instance(def, id, std::move(start_input), "", "",
                                         ev.value("trace_id", ""), event_id, "");
        advance(inst);
        if (triggered.empty()) triggered = id;
        break;
      }
    }
  }
  if (await_topics_.count(topic) == 0) return triggered;
  // An event that a waiting step refused for its publisher ("from") is not buffered either: it
  // is not the answer of the step it was addressed to.
  bool refused = false;
  // Awaits correlated by instance id.
  const std::string corr = ev.value("correlation_id", "");
  if (auto it = default_awaits_.find(key_of(topic, corr)); it != default_awaits_.end()) {
    auto inst = live_.find(corr);
    if (inst != live_.end()) {
      const step* s = inst->second->def->find(it->second);
      if (s != nullptr && !from_allowed(*s, ev)) {
        ignore_from(*inst->second, *s, ev);
        refused = true;
      } else if (s != nullptr) {
        if (replayed) count_caught_up();
        deliver(*inst->second, *s, ev);
        advance(*inst->second);
        return triggered;
      }
    }
  }
  // Awaits with a match condition.
  if (auto it = match_awaits_.find(topic); it != match_awaits_.end()) {
    const auto candidates = it->second;
    for (const auto& [id, step_name] : candidates) {
      auto inst = live_.find(id);
      if (inst == live_.end()) continue;
      const step* s = inst->second->def->find(step_name);
      if (s == nullptr || !matches(*inst->second, *s, ev)) continue;
      if (!from_allowed(*s, ev)) {
        ignore_from(*inst->second, *s, ev);
        refused = true;
        continue;
      }
      if (replayed) count_caught_up();
      deliver(*inst->second, *s, ev);
      advance(*inst->second);
      return triggered;
    }
  }
  if (!replayed && !refused) buffer_event(std::move(ev));
  return triggered;
}

bool engine::from_allowed(const step& s, const json& ev) {
  if (s.from.empty()) return true;
  const std::string publisher = ev.value("publisher", "");
  return std::find(s.from.begin(), s.from.end(), publisher) != s.from.end();
}

void engine::ignore_from(instance& in, const step& s, const json& ev) {
  const std::string topic = ev.value("topic", "");
  {
    std::lock_guard lock(stats_mutex_);
    ++stats_.events_ignored_from;
    ++stats_.events_ignored_from_by_topic[topic];
  }
  // One line per topic per second at most: a publisher that floods a topic must not flood the
  // log too.
  auto& limit = ignored_log_[topic];
  const auto now = clock_->real_us();
  if (limit.last_us != 0 && now - limit.last_us < k_ignored_log_interval_us) {
    ++limit.suppressed;
    return;
  }
  std::string listed;
  for (const auto& name : s.from) listed += (listed.empty() ? "" : ", ") + name;
  const std::string more = limit.suppressed == 0 ? std::string()
                                                 : " (and " + std::to_string(limit.suppressed) +
                                                       " more on this topic since the last line)";
  log_->warn(
      "instance {}: step {}: event {} on {} from publisher '{}' ignored: \"from\" lists only "
      "{}{}",
      in.id, s.name, ev.value("id", ""), topic, ev.value("publisher", ""), listed, more);
  limit.last_us = now;
  limit.suppressed = 0;
}

void engine::count_caught_up() {
  std::lock_guard lock(stats_mutex_);
  ++stats_.events_caught_up;
}

void engine::buffer_event(json ev) {
  const std::string topic = ev["topic"];
  const std::string corr = ev.value("correlation_id", "");
  buffered_event b;
  b.id = ev.value("id", "");
  b.topic = topic;
  b.correlation_id = corr;
  b.received_us = now_us();
  ev["received_us"] = b.received_us;
  b.event = ev;
  batch_.buffer_add.push_back(std::move(b));
  buffer_.push_back(std::move(ev));
  buffer_index_.emplace(key_of(topic, corr), std::prev(buffer_.end()));
  while (buffer_.size() > opts_.buffer_limit) {
    auto& oldest = buffer_.front();
    log_->warn("event buffer full ({}): dropping event {} on {}", opts_.buffer_limit,
               oldest.value("id", ""), oldest.value("topic", ""));
    auto range = buffer_index_.equal_range(
        key_of(oldest["topic"].get<std::string>(), oldest.value("correlation_id", "")));
    for (auto i = range.first; i != range.second; ++i) {
      if (i->second == buffer_.begin()) {
        buffer_index_.erase(i);
        break;
      }
    }
    batch_.buffer_remove.push_back(oldest.value("id", ""));
    buffer_.pop_front();
  }
}

void engine::purge_buffer() {
  const auto now = now_us();
  next_purge_us_ = now + 1'000'000;
  const auto before = now - opts_.buffer_retention.count() * 1000;
  bool any = false;
  while (!buffer_.empty() && buffer_.front().value("received_us", std::int64_t{0}) < before) {
    auto& oldest = buffer_.front();
    auto range = buffer_index_.equal_range(
        key_of(oldest["topic"].get<std::string>(), oldest.value("correlation_id", "")));
    for (auto i = range.first; i != range.second; ++i) {
      if (i->second == buffer_.begin()) {
        buffer_index_.erase(i);
        break;
      }
    }
    buffer_.pop_front();
    any = true;
  }
  if (any) db_->purge_buffer(before);
}

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
// Admin

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
  static const json none = json::object();
  const auto& steps = in.state["run"]["steps"];
  const auto found = steps.find(s.name);
  const json& rs = found == steps.end() || !found->is_object() ? none : *found;
  const std::string phase = rs.value("phase", "");
  const auto attempts = peek(in, s.name).value("attempts", 0U);
  json w = {{"kind", to_string(s.kind)}};
  if (s.kind == step_kind::parallel || s.kind == step_kind::switch_) {
    w["phase"] = "branches";
    return w;
  }
  w["phase"] = phase;
  if (s.kind == step_kind::command) {
    w["service"] = s.service;
    w["action"] = s.action;
  }
  if (phase == "calling") {
    w["attempt"] = attempts;
    w["request_id"] = rs.value("request_id", "");
    if (rs.contains("deadline_us")) w["deadline_us"] = rs["deadline_us"];
  } else if (phase == "backoff") {
    w["attempt"] = attempts + 1;  // the next one
    w["due_us"] = rs.value("due_us", std::int64_t{0});
  } else if (phase == "awaiting") {
    w["until"] = s.until;
    w["fail_on"] = s.fail_on;
    if (s.match.empty()) {
      w["correlation_id"] = in.id;
    } else {
      w["match"] = s.match;
    }
    if (!s.from.empty()) w["from"] = s.from;
    w["attempt"] = attempts;
    w["since_us"] = rs.value("since_us", std::int64_t{0});
    w["deadline_us"] = rs.value("due_us", std::int64_t{0});
  } else if (phase == "waiting") {
    w["due_us"] = rs.value("due_us", std::int64_t{0});
  } else if (phase == "publishing") {
    w["topic"] = s.event.topic;
    w["event_id"] = rs.value("key", "");
  } else if (phase == "child") {
    const std::string child_id = rs.value("child_id", "");
    w["workflow"] = s.workflow;
    w["child_id"] = child_id;
    if (auto child = live_.find(child_id); child != live_.end()) {
      const json& child_run = child->second->state["run"];
      if (child_run.contains("deadline_us")) w["deadline_us"] = child_run["deadline_us"];
    }
  }
  return w;
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
