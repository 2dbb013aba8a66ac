// The engine's loop: construction (definitions, what the store kept), the thread and its inbox
// (or the caller's turns: run_stepped, run_once), one turn (inputs handled, timers fired, the
// commit), the dispatch of each input to the part that handles it, and the virtual clock's
// `advance`. See engine.hpp for the shape of things and the other parts.
#include <algorithm>
#include <future>
#include <limits>

#include "admin.hpp"
#include "engine.hpp"
#include "ensemble/common/clock.hpp"
#include "ensemble/common/logging.hpp"
#include "ensemble/orchestrator/expression.hpp"

namespace ensemble::orchestrator::detail {

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
                     in.what == inbound::kind::reply
                         ? (in.to == reply_to::compensation ? "a compensation's reply"
                                                            : "step " + in.step + "'s reply")
                         : in.action,
                     e.what());
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
  if (in.what == inbound::kind::ack) {
    on_outbox_ack(inst, in.request_id, *in.answer);
  } else if (in.to == reply_to::compensation) {
    on_compensation_reply(inst, in.request_id, *in.answer);
  } else {
    on_step_reply(inst, in.step, in.request_id, *in.answer);
  }
}

std::size_t engine::fire_timers() {
  const auto now = now_us();
  std::size_t fired = 0;
  while (!timers_.empty() && timers_.top().due_us <= now) {
    timer t = timers_.top();
    timers_.pop();
    auto it = live_.find(t.instance_id);
    if (it == live_.end()) continue;
    if (on_timer(*it->second, t)) ++fired;
  }
  return fired;
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
