#pragma once
// The engine: every workflow instance of one orchestrator, driven by one thread.
//
// Inputs (replies, acknowledgements, events, admin requests) are posted from the SDK's threads
// into a queue; the engine thread drains it, moves instances forward, and then, in this order:
// commits everything the iteration changed in one store transaction, sends the commands and
// events those changes cause, and answers the admin requests. Nothing leaves the process
// before the state that explains it is durable, and one transaction carries the work of many
// instances, which is what keeps SQLite from capping throughput.
//
// An instance's state is one JSON document, shaped so that expressions read it directly:
//   {"workflow": {"id", "name", "version", "input"},
//    "steps":    {"<name>": {"status", "attempts", "output", "error", "event", "started_us",
//                            "ended_us"}},
//    "run":      {engine bookkeeping: per-step phase, timers, outbox, compensation, ...}}
// The engine holds "workflow" and "steps" as JSON (what expressions read, and what `get` shows);
// "run" it holds typed (instance_run, run_state.hpp) and converts only at the edges: for the
// store (record_of), from the store (resume) and for the admin views.
//
// The engine's parts, one file each:
//   loop.cpp          the loop: construction, the thread and its inbox (or stepped turns), one
//                     turn, the dispatch of each input to its part, timers due, `advance`
//   steps.cpp         the walk: step kinds, attempts, retries, timeouts, failure policies,
//                     compensation, the end of an instance; the replies, acknowledgements and
//                     timers that move steps and compensation on (on_step_reply, on_timer, ...)
//   awaits.cpp        events: awaits, "from" filters, triggers, the early-event buffer
//   recovery.cpp      restart: loading and resuming instances, the journal catch-up
//   commit.cpp        commit then send: the store transaction of each turn, then its commands,
//                     events and answers; store failures; the effects queue, history, records
//   state.cpp         the state document's helpers: step accessors, error documents
//   run_state.cpp     the typed bookkeeping (run_state.hpp) and its stored JSON form
//   admin.cpp         the admin API (admin.hpp) and the views of instances
//   effects.hpp       the way out (effects_sink); agent_effects.cpp implements it over the agent
// Tests drive it without a broker (tests/engine_test.cpp): a fake effects_sink, a virtual_clock,
// run_stepped() and run_once() on the test's thread.

#include <spdlog/spdlog.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <queue>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "effects.hpp"
#include "ensemble/agent/agent.hpp"
#include "ensemble/common/ids.hpp"
#include "ensemble/common/protocol.hpp"
#include "ensemble/orchestrator/definition.hpp"
#include "ensemble/orchestrator/orchestrator.hpp"
#include "ensemble/orchestrator/store.hpp"
#include "run_state.hpp"

namespace ensemble::orchestrator::detail {

using common::error;
using common::result;

// Where an admin request came from: for the trace context of what it starts, and who asks
// (the DISPATCH's `caller` and `caller_scope`, docs/protocol.md section 12).
struct origin {
  std::string message_id;
  std::string trace_id;
  std::string caller;
  std::string caller_scope;  // "own": only instances `caller` started
};

// A step's status in an instance's state ("steps.<name>.status").
inline constexpr std::string_view k_running = "running";
inline constexpr std::string_view k_completed = "completed";
inline constexpr std::string_view k_failed = "failed";

// The admin API's table and the request its handlers get (admin.hpp).
struct admin_action;
struct admin_call;

class engine {
 public:
  // Every time the engine reads comes from `clk` (clock.hpp); with a virtual_clock, the
  // `advance` action moves it and fires the timers that became due.
  engine(options opts, std::vector<definition> defs, std::unique_ptr<store> db,
         std::shared_ptr<clock> clk);
  ~engine();

  // Binds the engine to its way out (effects.hpp; agent_effects in production), resumes the
  // active instances, and starts the engine thread and, after a restart, the catch-up thread.
  // `fx` must outlive the engine's stop().
  void run(effects_sink& fx);
  void stop();

  // Stepped mode, for tests: the same start as run() but no thread; the catch-up asks the
  // journal at once. The caller then drives the loop with run_once() on its own thread.
  void run_stepped(effects_sink& fx);
  // One turn of the loop, without waiting: handles every input posted so far, fires the timers
  // due at the clock's now, commits, then sends. Returns how many inputs it handled.
  std::size_t run_once();

  // Any thread. Blocks until answered or `deadline`.
  result<json> request(std::string_view action, const json& args,
                       std::chrono::milliseconds deadline, const origin& from);
  // Any thread. Posts an admin request; the future is ready once the loop answered it.
  std::future<result<json>> submit(std::string_view action, const json& args, const origin& from);

  // Topics the engine must be subscribed to before the agent starts.
  std::vector<std::string> listened_topics() const;
  // Called on the SDK's event thread.
  void on_event(const agent::message& m);
  // Any thread: an event in the engine's JSON form (id, topic, correlation_id, causation_id,
  // trace_id, seq, ts, publisher, payload; stream and stream_seq for stored events).
  void post_event(json ev);
  // A delivery of the orchestrator's durable consumer: the future is ready once what the event
  // caused (an await satisfied, an instance triggered, the event buffered) is committed, or with
  // a retryable error when the store cannot commit — the delivery is acked only then, so an
  // event is never lost between the broker and the store.
  std::future<result<json>> on_durable_event(const agent::message& m);
  // Topics fed by the durable consumer (before run()): the broker's journal is not asked for
  // them after a restart, since the consumer delivers what arrived meanwhile.
  void set_durable_topics(std::set<std::string> topics);

  stats counters() const;

 private:
  struct instance;
  struct inbound;
  struct effect;
  // What a timer is for; `name` says which one where there can be several.
  enum class timer_kind {
    step,          // a step's due_us (backoff, wait, await or call timeout); name: the step
    deadline,      // the instance's timeout (run deadline_us)
    compensation,  // the end of a compensation's backoff
    outbox,        // publishing an unacknowledged event again; name: the event id
  };
  struct timer {
    std::int64_t due_us;
    std::string instance_id;
    timer_kind what;
    std::string name;
    bool operator>(const timer& o) const { return due_us > o.due_us; }
  };
  // Whose command a reply answers: a step's (named) or the instance's compensation.
  enum class reply_to { step, compensation };
  struct buffered {
    json event;
  };
  enum class walk_state { running, completed, failed };

  // --- thread plumbing
  void post(inbound in);
  // run() and run_stepped(): buffer and instances loaded, resumed, first commit.
  void begin(effects_sink& fx);
  void loop();
  // One iteration on `work`: handled, timers fired, buffer purged, committed, sent.
  void turn(std::vector<inbound>& work);
  // Hands one input to the part that handles it.
  void process(inbound& in);
  // Fires the timers due at the clock's now; returns how many of them still applied.
  std::size_t fire_timers();
  std::int64_t now_us() const { return clock_->now_us(); }
  // `advance` {by_ms | by}: moves a virtual clock forward, firing due timers in order.
  result<json> advance_clock(const json& args);
  void flush();
  // A commit failed (disk full, ...): the store is marked failing and the instances that
  // requests started since the last commit are dropped (their requests answered with the error).
  void store_failed(const error& why);
  void drop_uncommitted_starts(const error& why);
  // Sends the answers that do not wait for a commit (reads, refusals) and keeps the rest.
  void send_ready_answers();

  // --- instance lifecycle
  std::shared_ptr<const definition> find_definition(const std::string& name, std::uint32_t version);
  instance& create_instance(std::shared_ptr<const definition> def, const std::string& id,
                            json wf_input, const std::string& parent_id,
                            const std::string& parent_step, const std::string& trace_id,
                            const std::string& cause, const std::string& started_by);
  void resume(instance& in);
  void advance(instance& in);
  walk_state walk(instance& in, const sequence& seq, json& failure);
  void start_step(instance& in, const step& s);
  void start_attempt(instance& in, const step& s);
  void complete_step(instance& in, const step& s, json output);
  void step_error(instance& in, const step& s, const error& err, bool timeout = false);
  void fail_step(instance& in, const step& s, json err);
  void abandon(instance& in, const sequence& seq);
  void begin_compensation(instance& in, instance_status final_status, json err);
  void progress_compensation(instance& in);
  void finish(instance& in, instance_status status, json result);
  // What moves steps and compensation on (steps.cpp): a reply to a step's command, to a
  // compensation's, the broker's acknowledgement of an outbox event, a timer. A reply or
  // acknowledgement for a request that is no longer outstanding changes nothing; on_timer
  // returns whether the timer still applied.
  void on_step_reply(instance& in, const std::string& step_name, const std::string& request_id,
                     response_result& r);
  void on_compensation_reply(instance& in, const std::string& request_id, response_result& r);
  void on_outbox_ack(instance& in, const std::string& event_id, response_result& r);
  bool on_timer(instance& in, const timer& t);

  // --- awaits and events
  void register_await(instance& in, const step& s);
  void unregister_await(instance& in, const step& s);
  bool try_buffer(instance& in, const step& s);
  bool matches(instance& in, const step& s, const json& ev);
  void deliver(instance& in, const step& s, const json& ev);
  // Whether `ev`'s publisher may complete `s` (its "from" lists it, or it has none).
  static bool from_allowed(const step& s, const json& ev);
  // Counts and logs (rate-limited, per topic) an event that `s` refused for its publisher.
  void ignore_from(instance& in, const step& s, const json& ev);
  // `replayed`: found in the broker's journal by the catch-up after a restart. Only delivered to
  // an await that is waiting for it: never starts an instance, never buffered.
  // Returns the id of the instance a trigger started, if any.
  std::string handle_event(json ev, bool replayed = false);
  void count_caught_up();
  // After a restart: asks the broker's journal for the events that the awaits of `waiting`
  // (instance id -> since when, wall clock µs) missed while the orchestrator was down, and posts
  // them. Runs on its own thread: the broker answers while the engine goes on.
  void catch_up(std::map<std::string, std::int64_t> waiting, std::set<std::string> topics);
  // The topics catch_up asks the journal about: awaited ones not fed by the durable consumer.
  std::set<std::string> journal_topics() const;
  void buffer_event(json ev);
  void purge_buffer();
  void pop_oldest_buffered();  // the front of buffer_, and its index entry

  // --- effects
  void send_call(instance& in, reply_to to, const std::string& step, const std::string& service,
                 const std::string& action, json payload, std::chrono::milliseconds timeout,
                 const std::string& request_id, const std::string& key, std::uint32_t attempt);
  void add_outbox(instance& in, const std::string& topic, json payload, const std::string& key,
                  const std::string& kind, const std::string& step);
  void send_outbox(instance& in, const std::string& event_id);
  void arm(instance& in, timer_kind what, std::int64_t due_us, const std::string& name = {});
  void history(instance& in, const std::string& kind, const std::string& step, json data);
  void touch(instance& in);
  // Everything the store keeps of an instance except its state document.
  static instance_record record_of(instance& in);

  // --- admin (admin.cpp): engine::admin finds the action in one table and calls its handler
  result<json> admin(std::string_view action, const json& args, const origin& from,
                     std::function<result<json>()>& later);
  static std::span<const admin_action> admin_actions();
  static const admin_action* find_admin_action(std::string_view name);
  result<json> admin_start(const admin_call& c);
  result<json> admin_get(const admin_call& c);
  result<json> admin_list(const admin_call& c);
  result<json> admin_cancel(const admin_call& c);
  result<json> admin_history(const admin_call& c);
  result<json> admin_definitions(const admin_call& c);
  result<json> admin_stats(const admin_call& c);
  result<json> admin_advance(const admin_call& c);
  // Instance `id` as it is now: live, or from the store; nullopt if it exists nowhere.
  result<std::optional<instance_record>> snapshot(const std::string& id);
  json view(const instance_record& r) const;
  // What running step `s` waits on, for `get`: derived from its definition and bookkeeping.
  json waiting_of(const instance& in, const step& s) const;

  // A step's visible state, and its bookkeeping, for writing: both name the step as changed
  // (instance::changed_steps). Readers use peek() and run.steps.find().
  json& vis(instance& in, const std::string& step);
  // A step's bookkeeping, created (empty) if it has none yet.
  step_run& run_of(instance& in, const std::string& step);
  // A step's visible state without creating it: an empty object for steps not reached.
  static const json& peek(const instance& in, const std::string& step);
  json default_input(const instance& in) const;

  options opts_;
  std::unique_ptr<store> db_;
  std::shared_ptr<clock> clock_;
  virtual_clock* virtual_ = nullptr;  // clock_, when it is one
  effects_sink* effects_sink_ = nullptr;
  std::shared_ptr<spdlog::logger> log_;
  common::id_generator ids_;

  std::map<std::pair<std::string, std::uint32_t>, std::shared_ptr<const definition>> defs_;
  std::map<std::string, std::shared_ptr<const definition>> latest_;
  std::set<std::string> await_topics_;
  std::map<std::string, std::vector<std::shared_ptr<const definition>>> triggers_;

  // Engine-thread state.
  std::unordered_map<std::string, std::unique_ptr<instance>> live_;
  std::unordered_map<std::string, std::string> default_awaits_;  // topic \n instance -> step
  std::unordered_map<std::string, std::set<std::pair<std::string, std::string>>> match_awaits_;
  std::list<json> buffer_;                                                        // arrival order
  std::unordered_multimap<std::string, std::list<json>::iterator> buffer_index_;  // topic \n corr
  std::unordered_map<std::string, std::string> pending_triggers_;  // workflow \n event -> id
  std::priority_queue<timer, std::vector<timer>, std::greater<>> timers_;
  commit_batch batch_;
  std::unordered_set<std::string> dirty_;
  std::vector<effect> effects_;
  // Instances that `start` requests created since the last successful commit: if the commit
  // fails they are dropped, and the requests answered with the failure.
  std::unordered_set<std::string> fresh_;
  // Set while commits fail: new work (start, cancel, triggers) is refused with this error, and
  // the pending batch is tried again at next_store_try_us_.
  std::optional<error> store_failure_;
  std::int64_t next_store_try_us_ = 0;
  bool store_probing_ = false;  // failing, but nothing pending: the next write is the probe
  // Read from the store by the constructor, consumed by run().
  std::vector<instance_record> loaded_;
  std::vector<buffered_event> loaded_buffer_;
  std::int64_t next_purge_us_ = 0;
  struct log_limit {
    std::int64_t last_us = 0;
    std::uint64_t suppressed = 0;
  };
  std::unordered_map<std::string, log_limit> ignored_log_;  // topic -> last warning

  // Cross-thread.
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<inbound> inbox_;
  bool stopping_ = false;
  std::thread thread_;
  std::thread catch_up_thread_;
  std::map<std::string, std::int64_t> catch_up_from_;  // filled by resume()
  std::set<std::string> durable_topics_;               // set before run()

  mutable std::mutex stats_mutex_;
  stats stats_;
};

struct engine::instance {
  std::string id;
  std::shared_ptr<const definition> def;
  instance_status status = instance_status::running;
  std::string parent_id;
  std::string started_by;  // the `caller` of its start (a sub-workflow: its parent's)
  std::int64_t created_us = 0;
  std::int64_t updated_us = 0;
  json state;        // "workflow" and "steps" (engine.hpp, top)
  instance_run run;  // "run", typed
  // The steps whose visible state or bookkeeping may have changed since the last commit: named
  // by the accessors that hand them out for writing (vis, run_of), cleared by a commit that
  // succeeded. all_steps_changed while unsure (created or resumed, not committed since).
  std::vector<std::string> changed_steps;
  bool all_steps_changed = true;
  void step_changed(const std::string& name) {
    if (all_steps_changed) return;
    if (std::find(changed_steps.begin(), changed_steps.end(), name) == changed_steps.end()) {
      changed_steps.push_back(name);
    }
  }
  // The state document as stored: `state` with "run".
  json document() const;
};

// An input of the loop, posted by any thread.
struct engine::inbound {
  enum class kind { reply, ack, event, admin, stop } what = kind::reply;
  bool replayed = false;  // an event from the broker's journal (catch_up)
  std::string instance_id;
  reply_to to = reply_to::step;  // a reply: whose command it answers
  std::string step;              // reply_to::step: the step's name
  std::string request_id;
  std::optional<response_result> answer;
  json event;
  std::string action;
  json args;
  origin from;
  std::shared_ptr<std::promise<result<json>>> promise;
};

// An output of the loop, sent once the iteration is committed.
struct engine::effect {
  enum class kind { call, publish, answer } what = kind::call;
  std::string instance_id, step, service, action, topic;
  reply_to to = reply_to::step;
  json payload;
  millis timeout{0};
  agent::send_options opts;
  std::shared_ptr<std::promise<result<json>>> promise;
  std::function<result<json>()> answer;
  std::optional<result<json>> ready;
  // An answer that reports a state change (start, cancel): sent only once it is committed.
  bool durable = false;
};

// Helpers shared by the engine's parts (state.cpp).
// The key of an (a, b) pair in the engine's string-keyed maps.
std::string key_of(const std::string& a, const std::string& b);
// An error as a step's or instance's "error" document.
json error_json(const std::string& step, const error& e, std::uint32_t attempts);
// One line for an "error" document.
std::string describe(const json& err);

}  // namespace ensemble::orchestrator::detail
