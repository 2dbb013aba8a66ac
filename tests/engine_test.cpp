// The orchestrator's engine on its own: no broker, no agent, no thread. A fake effects sink
// records the commands and events the engine sends and lets the test answer them; a virtual
// clock moves only when the test sets it; the loop turns on the test's thread (run_stepped,
// run_once). The store is a real SQLite file in a temporary directory, so that a second engine
// can resume what the first left mid-flight.
#include "engine.hpp"

#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "effects.hpp"
#include "ensemble/agent/json.hpp"
#include "run_state.hpp"
#include "support/temp_dir.hpp"

namespace {

namespace orch = ensemble::orchestrator;
namespace detail = ensemble::orchestrator::detail;
using json = nlohmann::json;
using namespace std::chrono_literals;

constexpr std::int64_t k_start_us = 1'700'000'000'000'000;  // where virtual time starts
constexpr std::int64_t k_second_us = 1'000'000;

// Records what the engine sends. Calls wait for the test's answer; publishes are acknowledged
// at once (the acknowledgement is posted, and handled by the next turn) unless `hold_publishes`.
class fake_effects final : public detail::effects_sink {
 public:
  struct sent_call {
    detail::outgoing_call what;
    detail::response_callback done;
  };
  struct sent_event {
    detail::outgoing_event what;
    detail::response_callback done;
  };

  void call(detail::outgoing_call c, detail::response_callback done) override {
    std::lock_guard lock(mutex_);
    calls_.push_back({std::move(c), std::move(done)});
  }
  void publish(detail::outgoing_event e, detail::response_callback done) override {
    std::unique_lock lock(mutex_);
    published_.push_back(e);
    if (hold_publishes) {
      held_.push_back({std::move(e), std::move(done)});
      return;
    }
    lock.unlock();
    done(detail::response{json(), "", ++seq_});
  }
  ensemble::common::result<json> journal(const std::string& correlation_id) override {
    std::lock_guard lock(mutex_);
    journal_asked_.push_back(correlation_id);
    return json{{"entries", journal_entries}};
  }

  std::vector<sent_call>& calls() { return calls_; }
  const std::vector<detail::outgoing_event>& published() const { return published_; }
  // The topics published so far, in order.
  std::vector<std::string> topics() const {
    std::vector<std::string> out;
    for (const auto& e : published_) out.push_back(e.topic);
    return out;
  }
  // "service.action" of every call so far, in order.
  std::vector<std::string> actions() const {
    std::vector<std::string> out;
    for (const auto& c : calls_) out.push_back(c.what.service + "." + c.what.action);
    return out;
  }

  const std::vector<std::string>& journal_asked() const { return journal_asked_; }

  bool hold_publishes = false;
  json journal_entries = json::array();  // the broker's journal entries, for every correlation id

 private:
  std::mutex mutex_;
  std::vector<sent_call> calls_;
  std::vector<detail::outgoing_event> published_;
  std::vector<sent_event> held_;
  std::vector<std::string> journal_asked_;
  std::uint64_t seq_ = 0;
};

ensemble::common::error failure(std::string code, bool retryable) {
  return ensemble::common::error{std::move(code), "the test says no", retryable};
}

class engine_test : public ::testing::Test {
 protected:
  // A new engine over the store file (the same file each time within a test), with `defs`.
  void open(const std::vector<std::string>& defs) {
    open_with_store(defs, [](std::unique_ptr<orch::store> db) { return db; });
  }
  // The same, with the store file wrapped by `wrap`.
  void open_with_store(
      const std::vector<std::string>& defs,
      const std::function<std::unique_ptr<orch::store>(std::unique_ptr<orch::store>)>& wrap) {
    std::vector<orch::definition> parsed;
    for (const auto& d : defs) parsed.push_back(orch::parse_definition(json::parse(d), "test"));
    auto db = wrap(orch::open_sqlite_store(dir_.file("state.db")));
    auto kept = db->load_virtual_now();
    clock_ = std::make_shared<orch::virtual_clock>(kept && *kept ? **kept : k_start_us);
    fx_ = std::make_unique<fake_effects>();
    fx_->journal_entries = journal_;
    orch::options o;
    o.store = dir_.file("state.db");
    o.clock = orch::clock_kind::virtual_;
    engine_ = std::make_unique<detail::engine>(o, std::move(parsed), std::move(db), clock_);
    engine_->run_stepped(*fx_);
    settle();
  }
  // Stops and drops the engine (what it committed stays in the file); its sink goes with it.
  void close() {
    engine_.reset();
    fx_.reset();
  }

  // Turns the loop until nothing is left to handle (an acknowledgement posted by a send is
  // handled by the next turn).
  void settle() {
    for (int i = 0; i < 100; ++i) {
      if (engine_->run_once() == 0) return;
    }
    FAIL() << "the engine still had work after 100 turns";
  }

  json ask(const std::string& action, const json& args) {
    auto f = engine_->submit(action, args, {});
    settle();
    EXPECT_EQ(f.wait_for(0s), std::future_status::ready) << action << " not answered";
    auto r = f.get();
    EXPECT_TRUE(r) << action << ": " << (r ? "" : r.err().to_string());
    return r ? *r : json();
  }
  std::string start(const std::string& workflow, const json& input = json::object()) {
    return ask("start", {{"workflow", workflow}, {"input", input}})["id"];
  }
  json get(const std::string& id) { return ask("get", {{"id", id}}); }

  // Answers call `i` (0-based, in the order sent) and turns the loop.
  void reply(std::size_t i, const json& payload) {
    ASSERT_LT(i, fx_->calls().size());
    fx_->calls()[i].done(detail::response{payload, "worker-1", 0});
    settle();
  }
  void reply_error(std::size_t i, ensemble::common::error e) {
    ASSERT_LT(i, fx_->calls().size());
    fx_->calls()[i].done(std::move(e));
    settle();
  }
  // Moves workflow time to `us` and turns the loop (firing what fell due).
  void set_clock(std::int64_t us) {
    clock_->set(us);
    settle();
  }
  std::int64_t now() const { return clock_->now_us(); }

  json journal_ = json::array();  // what the next open()'s journal holds
  ensemble::test::temp_dir dir_{"ensemble-engine"};
  std::shared_ptr<orch::virtual_clock> clock_;
  std::unique_ptr<fake_effects> fx_;
  std::unique_ptr<detail::engine> engine_;
};

const char* const k_one_command = R"({"workflow": {"name": "One", "steps": [
  {"name": "Charge", "service": "Pay", "action": "charge", "timeout": "10s"}]}})";

TEST_F(engine_test, command_step_sends_one_call_and_completes_with_its_reply) {
  open({k_one_command});
  const auto id = start("One", {{"amount", 5}});
  ASSERT_EQ(fx_->calls().size(), 1U);
  const auto& c = fx_->calls()[0].what;
  EXPECT_EQ(c.service, "Pay");
  EXPECT_EQ(c.action, "charge");
  EXPECT_EQ(c.timeout, 10s);
  EXPECT_EQ(c.opts.idempotency_key, id + "/Charge/1");
  EXPECT_EQ(c.opts.attempt, 1U);
  EXPECT_EQ(c.opts.correlation_id, id);
  EXPECT_EQ(c.payload["workflow"]["input"], json({{"amount", 5}}));
  EXPECT_EQ(get(id)["status"], "running");

  reply(0, {{"paid", true}});
  const auto v = get(id);
  EXPECT_EQ(v["status"], "completed");
  EXPECT_EQ(v["steps"]["Charge"]["output"], json({{"paid", true}}));
  EXPECT_EQ(v["output"], json({{"paid", true}}));
  EXPECT_EQ(fx_->calls().size(), 1U);
  EXPECT_EQ(fx_->topics(),
            (std::vector<std::string>{"workflow.One.started", "workflow.One.completed"}));
}

TEST_F(engine_test, a_reply_to_an_unknown_request_changes_nothing) {
  open({k_one_command});
  const auto id = start("One");
  // The same callback answered twice: the second is for a request no longer outstanding.
  reply(0, {{"first", true}});
  reply(0, {{"second", true}});
  EXPECT_EQ(get(id)["steps"]["Charge"]["output"], json({{"first", true}}));
}

TEST_F(engine_test, retry_backoff_fires_at_exactly_its_virtual_time) {
  open({R"({"workflow": {"name": "Flaky", "steps": [
    {"name": "Send", "service": "Mail", "action": "send", "timeout": "1h",
     "retry": {"max_attempts": 3, "initial_interval": "2s", "backoff": 3.0,
               "max_interval": "1h"}}]}})"});
  const auto id = start("Flaky");
  ASSERT_EQ(fx_->calls().size(), 1U);

  set_clock(k_start_us + 5 * k_second_us);  // the reply comes 5 s later
  reply_error(0, failure("unavailable", true));
  const auto first_due = now() + 2 * k_second_us;
  EXPECT_EQ(get(id)["steps"]["Send"]["status"], "running");
  set_clock(first_due - 1);
  EXPECT_EQ(fx_->calls().size(), 1U) << "attempt 2 sent a microsecond early";
  set_clock(first_due);
  ASSERT_EQ(fx_->calls().size(), 2U);
  EXPECT_EQ(fx_->calls()[1].what.opts.attempt, 2U);
  EXPECT_EQ(fx_->calls()[1].what.opts.idempotency_key, id + "/Send/2");

  reply_error(1, failure("unavailable", true));
  const auto second_due = now() + 6 * k_second_us;  // 2 s x 3.0
  set_clock(second_due - 1);
  EXPECT_EQ(fx_->calls().size(), 2U) << "attempt 3 sent a microsecond early";
  set_clock(second_due);
  ASSERT_EQ(fx_->calls().size(), 3U);
  EXPECT_EQ(fx_->calls()[2].what.opts.attempt, 3U);

  reply_error(2, failure("unavailable", true));  // the last attempt
  const auto v = get(id);
  EXPECT_EQ(v["status"], "failed");
  EXPECT_EQ(v["steps"]["Send"]["attempts"], 3);
  EXPECT_EQ(v["steps"]["Send"]["error"]["code"], "unavailable");
  EXPECT_EQ(fx_->calls().size(), 3U);
}

TEST_F(engine_test, a_non_retryable_error_is_not_retried) {
  open({R"({"workflow": {"name": "Strict", "steps": [
    {"name": "Send", "service": "Mail", "action": "send",
     "retry": {"max_attempts": 5, "initial_interval": "1s"}}]}})"});
  const auto id = start("Strict");
  reply_error(0, failure("bad_address", false));
  set_clock(k_start_us + 3600 * k_second_us);
  EXPECT_EQ(fx_->calls().size(), 1U);
  EXPECT_EQ(get(id)["status"], "failed");
}

TEST_F(engine_test, a_step_timeout_fails_the_attempt_at_its_deadline) {
  open({R"({"workflow": {"name": "Stuck", "steps": [
    {"name": "Send", "service": "Mail", "action": "send", "timeout": "1h",
     "retry": {"max_attempts": 1}}]}})"});
  const auto id = start("Stuck");
  ASSERT_EQ(fx_->calls().size(), 1U);
  set_clock(k_start_us + 3600 * k_second_us - 1);
  EXPECT_EQ(get(id)["status"], "running");
  set_clock(k_start_us + 3600 * k_second_us);
  const auto v = get(id);
  EXPECT_EQ(v["status"], "failed");
  EXPECT_EQ(v["steps"]["Send"]["error"]["code"], "deadline_exceeded");
  // A reply after the deadline is for a request that is no longer waited for.
  reply(0, {{"late", true}});
  EXPECT_EQ(get(id)["status"], "failed");
}

TEST_F(engine_test, compensation_undoes_completed_steps_in_reverse_order) {
  open({R"({"workflow": {"name": "Saga", "steps": [
    {"name": "One", "service": "Svc", "action": "do1", "compensate": {"service": "Svc", "action": "undo1"}},
    {"name": "Two", "service": "Svc", "action": "do2", "compensate": {"service": "Svc", "action": "undo2"}},
    {"name": "Three", "service": "Svc", "action": "do3", "compensate": {"service": "Svc", "action": "undo3"}}]}})"});
  const auto id = start("Saga");
  reply(0, {{"did", 1}});
  reply(1, {{"did", 2}});
  reply_error(2, failure("refused", false));
  // One at a time: undo1 is sent only once undo2 answered.
  EXPECT_EQ(fx_->actions(),
            (std::vector<std::string>{"Svc.do1", "Svc.do2", "Svc.do3", "Svc.undo2"}));
  EXPECT_EQ(get(id)["status"], "compensating");
  reply(3, json::object());
  EXPECT_EQ(fx_->actions(),
            (std::vector<std::string>{"Svc.do1", "Svc.do2", "Svc.do3", "Svc.undo2", "Svc.undo1"}));
  EXPECT_EQ(fx_->calls()[3].what.opts.idempotency_key, id + "/Two/compensate/1");
  reply(4, json::object());
  const auto v = get(id);
  EXPECT_EQ(v["status"], "failed");
  EXPECT_EQ(v["steps"]["One"]["status"], "compensated");
  EXPECT_EQ(v["steps"]["Two"]["status"], "compensated");
  EXPECT_EQ(v["steps"]["Three"]["status"], "failed");
  EXPECT_EQ(v["error"]["step"], "Three");
}

TEST_F(engine_test, a_wait_step_ends_at_exactly_its_duration) {
  open({R"({"workflow": {"name": "Nap", "steps": [
    {"name": "Sleep", "kind": "wait", "duration": "24h"},
    {"name": "Remind", "service": "Mail", "action": "send"}]}})"});
  const auto id = start("Nap");
  EXPECT_TRUE(fx_->calls().empty());
  set_clock(k_start_us + 24 * 3600 * k_second_us - 1);
  EXPECT_TRUE(fx_->calls().empty()) << "the wait ended a microsecond early";
  EXPECT_EQ(get(id)["steps"]["Sleep"]["status"], "running");
  set_clock(k_start_us + 24 * 3600 * k_second_us);
  ASSERT_EQ(fx_->actions(), (std::vector<std::string>{"Mail.send"}));
  EXPECT_EQ(get(id)["steps"]["Sleep"]["status"], "completed");
}

const char* const k_reserve_then_await = R"({"workflow": {"name": "Order", "steps": [
  {"name": "Reserve", "service": "Stock", "action": "reserve"},
  {"name": "Reserved", "kind": "await", "topic": "stock.reserved", "timeout": "5s"}]}})";

json event(const std::string& id, const std::string& topic, const std::string& correlation_id,
           const json& payload) {
  return {{"id", id},
          {"topic", topic},
          {"correlation_id", correlation_id},
          {"causation_id", ""},
          {"trace_id", ""},
          {"seq", 1},
          {"ts", 0},
          {"publisher", "stock"},
          {"payload", payload}};
}

TEST_F(engine_test, an_await_completes_with_the_event_correlated_to_its_instance) {
  open({k_reserve_then_await});
  const auto id = start("Order");
  reply(0, json::object());
  EXPECT_EQ(get(id)["steps"]["Reserved"]["status"], "running");
  // Another instance's event is not this await's answer: it is buffered.
  engine_->post_event(event("e-other", "stock.reserved", "someone-else", {{"n", 0}}));
  settle();
  EXPECT_EQ(get(id)["steps"]["Reserved"]["status"], "running");
  EXPECT_EQ(engine_->counters().buffered_events, 1U);
  engine_->post_event(event("e-1", "stock.reserved", id, {{"n", 1}}));
  settle();
  const auto v = get(id);
  EXPECT_EQ(v["status"], "completed");
  EXPECT_EQ(v["steps"]["Reserved"]["output"], json({{"n", 1}}));
  EXPECT_EQ(v["steps"]["Reserved"]["event"]["id"], "e-1");
}

TEST_F(engine_test, an_early_event_is_buffered_and_consumed_when_its_await_starts) {
  open({k_reserve_then_await});
  const auto id = start("Order");
  engine_->post_event(event("e-early", "stock.reserved", id, {{"early", true}}));
  settle();
  EXPECT_EQ(engine_->counters().buffered_events, 1U);
  EXPECT_EQ(get(id)["steps"]["Reserve"]["status"], "running");
  reply(0, json::object());  // Reserve completes: the await starts and finds the event
  const auto v = get(id);
  EXPECT_EQ(v["status"], "completed");
  EXPECT_EQ(v["steps"]["Reserved"]["output"], json({{"early", true}}));
  EXPECT_EQ(engine_->counters().buffered_events, 0U);
}

TEST_F(engine_test, an_await_times_out_at_its_deadline) {
  open({k_reserve_then_await});
  const auto id = start("Order");
  reply(0, json::object());
  const auto due = now() + 5 * k_second_us;
  set_clock(due - 1);
  EXPECT_EQ(get(id)["status"], "running");
  set_clock(due);
  const auto v = get(id);
  EXPECT_EQ(v["status"], "failed");
  EXPECT_EQ(v["steps"]["Reserved"]["error"]["code"], "timeout");
}

TEST_F(engine_test, a_restarted_engine_resends_the_outstanding_call_with_the_same_key) {
  open({k_one_command});
  const auto id = start("One");
  ASSERT_EQ(fx_->calls().size(), 1U);
  const auto first = fx_->calls()[0].what;
  close();  // mid-flight: the call was never answered

  open({k_one_command});
  ASSERT_EQ(fx_->calls().size(), 1U) << "the outstanding call was not sent again";
  const auto& again = fx_->calls()[0].what;
  EXPECT_EQ(again.service, "Pay");
  EXPECT_EQ(again.action, "charge");
  EXPECT_EQ(again.opts.idempotency_key, first.opts.idempotency_key);
  EXPECT_EQ(again.opts.attempt, 1U);
  EXPECT_EQ(again.payload, first.payload);
  // Its "started" event was acknowledged before the stop: not published again.
  EXPECT_TRUE(fx_->published().empty());
  reply(0, {{"paid", true}});
  EXPECT_EQ(get(id)["status"], "completed");
}

TEST_F(engine_test, a_restarted_engine_publishes_unacknowledged_events_again) {
  open({k_one_command});
  fx_->hold_publishes = true;
  const auto id = start("One");
  ASSERT_EQ(fx_->topics(), (std::vector<std::string>{"workflow.One.started"}));
  const auto event_id = fx_->published()[0].opts.id;
  close();

  open({k_one_command});
  ASSERT_EQ(fx_->topics(), (std::vector<std::string>{"workflow.One.started"}));
  EXPECT_EQ(fx_->published()[0].opts.id, event_id);
  EXPECT_EQ(fx_->published()[0].opts.idempotency_key, event_id);
}

const char* const k_hourly_retry = R"({"workflow": {"name": "Flaky", "steps": [
  {"name": "Send", "service": "Mail", "action": "send",
   "retry": {"max_attempts": 2, "initial_interval": "1h", "max_interval": "1h"}}]}})";

TEST_F(engine_test, a_restarted_engine_keeps_a_backoff_due_time) {
  open({k_hourly_retry});
  const auto id = start("Flaky");
  reply_error(0, failure("unavailable", true));
  const auto due = now() + 3600 * k_second_us;
  close();

  open({k_hourly_retry});
  EXPECT_TRUE(fx_->calls().empty());
  set_clock(due - 1);
  EXPECT_TRUE(fx_->calls().empty()) << "the resumed backoff fired early";
  set_clock(due);
  ASSERT_EQ(fx_->calls().size(), 1U);
  EXPECT_EQ(fx_->calls()[0].what.opts.idempotency_key, id + "/Send/2");
}

// A journal entry of the broker's `trace` answer (docs/protocol.md), for an event published
// after the await started (its ts_us is far in the future).
json journal_entry(const std::string& id, const std::string& topic,
                   const std::string& correlation_id, const json& payload) {
  const auto bytes = ensemble::agent::to_json_payload(payload);
  return {{"kind", "event"},
          {"id", id},
          {"topic", topic},
          {"correlation_id", correlation_id},
          {"ts_us", std::int64_t{1} << 62},
          {"from", "stock"},
          {"payload", json::binary(std::vector<std::uint8_t>(bytes.begin(), bytes.end()))}};
}

TEST_F(engine_test, a_restarted_engine_delivers_what_its_await_missed_from_the_journal) {
  open({k_reserve_then_await});
  const auto id = start("Order");
  reply(0, json::object());
  close();  // the await is waiting; its event is published meanwhile

  journal_ = json::array({journal_entry("e-missed", "stock.reserved", id, {{"n", 7}})});
  open({k_reserve_then_await});
  EXPECT_EQ(fx_->journal_asked(), std::vector<std::string>{id});
  const auto v = get(id);
  EXPECT_EQ(v["status"], "completed");
  EXPECT_EQ(v["steps"]["Reserved"]["output"], json({{"n", 7}}));
  EXPECT_EQ(engine_->counters().events_caught_up, 1U);
}

TEST_F(engine_test, a_restarted_engine_goes_on_awaiting_when_the_journal_has_nothing) {
  open({k_reserve_then_await});
  const auto id = start("Order");
  reply(0, json::object());
  close();

  open({k_reserve_then_await});
  EXPECT_EQ(fx_->journal_asked(), std::vector<std::string>{id});
  EXPECT_EQ(get(id)["steps"]["Reserved"]["status"], "running");
  engine_->post_event(event("e-1", "stock.reserved", id, {{"n", 1}}));
  settle();
  EXPECT_EQ(get(id)["status"], "completed");
}

// ---------------------------------------------------------------------------------------------
// Stores written before the engine's bookkeeping was typed

const char* const k_saga = R"({"workflow": {"name": "Saga", "steps": [
  {"name": "One", "service": "Svc", "action": "do1", "compensate": {"service": "Svc", "action": "undo1"}},
  {"name": "Two", "service": "Svc", "action": "do2", "compensate": {"service": "Svc", "action": "undo2"}},
  {"name": "Three", "service": "Svc", "action": "do3"}]}})";

const char* const k_announce = R"({"workflow": {"name": "Announce", "steps": [
  {"name": "Tell", "kind": "publish", "topic": "orders.told"}]}})";

orch::instance_record old_record(const std::string& id, const std::string& workflow,
                                 orch::instance_status status, json state) {
  orch::instance_record r;
  r.id = id;
  r.workflow = workflow;
  r.version = 1;
  r.status = status;
  r.created_us = r.updated_us = k_start_us;
  r.active = true;
  r.state = std::move(state);
  return r;
}

json workflow_of(const std::string& id, const std::string& name) {
  return {{"id", id}, {"name", name}, {"version", 1}, {"input", json::object()}};
}

// The state documents of instances in flight, as the engine wrote them before its bookkeeping
// was typed ("run" in the shape of that code), with a key no version knows in "run" and in a
// step's bookkeeping.
std::vector<orch::instance_record> old_records() {
  const std::int64_t t = k_start_us;
  std::vector<orch::instance_record> out;
  // A command step in its backoff, due in an hour; attempt 2 of 2 is next.
  out.push_back(old_record(
      "i-backoff", "Flaky", orch::instance_status::running,
      {{"workflow", workflow_of("i-backoff", "Flaky")},
       {"steps", {{"Send", {{"status", "running"}, {"attempts", 1}, {"started_us", t}}}}},
       {"run",
        {{"trace_id", "t-backoff"},
         {"cause", "r-0"},
         {"history_seq", 4},
         {"completed", json::array()},
         {"outbox", json::object()},
         {"from_a_later_version", {{"kept", true}}},
         {"steps",
          {{"Send",
            {{"key", "i-backoff/Send/1"},
             {"phase", "backoff"},
             {"request_id", "r-1"},
             {"deadline_us", t + 30 * k_second_us},
             {"due_us", t + 3600 * k_second_us},
             {"also_unknown", 7}}}}}}}}));
  // An await waiting for its event (Reserve done).
  out.push_back(old_record(
      "i-await", "Order", orch::instance_status::running,
      {{"workflow", workflow_of("i-await", "Order")},
       {"steps",
        {{"Reserve",
          {{"status", "completed"},
           {"attempts", 1},
           {"started_us", t},
           {"ended_us", t},
           {"output", json::object()},
           {"worker", "worker-1"}}},
         {"Reserved", {{"status", "running"}, {"attempts", 1}, {"started_us", t}}}}},
       {"run",
        {{"trace_id", "t-await"},
         {"cause", "r-2"},
         {"history_seq", 5},
         {"completed", {"Reserve"}},
         {"outbox", json::object()},
         {"steps",
          {{"Reserve", {{"key", "i-await/Reserve/1"}, {"request_id", "r-2"}, {"deadline_us", t}}},
           {"Reserved",
            {{"key", "i-await/Reserved/1"},
             {"phase", "awaiting"},
             {"since_us", t},
             {"due_us", t + 5 * k_second_us}}}}}}}}));
  // Compensating after Three failed: undo2's command was in flight.
  const json refused = {{"step", "Three"}, {"code", "refused"}, {"message", "no"}, {"attempts", 1}};
  out.push_back(old_record(
      "i-comp", "Saga", orch::instance_status::compensating,
      {{"workflow", workflow_of("i-comp", "Saga")},
       {"steps",
        {{"One", {{"status", "completed"}, {"attempts", 1}, {"output", {{"did", 1}}}}},
         {"Two", {{"status", "completed"}, {"attempts", 1}, {"output", {{"did", 2}}}}},
         {"Three", {{"status", "failed"}, {"attempts", 1}, {"error", refused}}}}},
       {"run",
        {{"trace_id", "t-comp"},
         {"cause", "r-5"},
         {"history_seq", 11},
         {"completed", {"One", "Two"}},
         {"outbox", json::object()},
         {"final", "failed"},
         {"error", refused},
         {"comp",
          {{"list", {"Two", "One"}},
           {"index", 0},
           {"phase", "calling"},
           {"attempt", 1},
           {"request_id", "r-6"}}},
         {"steps",
          {{"One", {{"key", "i-comp/One/1"}, {"request_id", "r-3"}, {"deadline_us", t}}},
           {"Two", {{"key", "i-comp/Two/1"}, {"request_id", "r-4"}, {"deadline_us", t}}},
           {"Three", {{"key", "i-comp/Three/1"}, {"request_id", "r-5"}, {"deadline_us", t}}}}}}}}));
  // A publish step whose event was committed but never acknowledged.
  out.push_back(old_record(
      "i-pub", "Announce", orch::instance_status::running,
      {{"workflow", workflow_of("i-pub", "Announce")},
       {"steps", {{"Tell", {{"status", "running"}, {"attempts", 1}, {"started_us", t}}}}},
       {"run",
        {{"trace_id", "t-pub"},
         {"cause", "m-1"},
         {"history_seq", 3},
         {"completed", json::array()},
         {"outbox",
          {{"i-pub/Tell/1",
            {{"topic", "orders.told"},
             {"payload", {{"n", 1}}},
             {"kind", "publish"},
             {"cause", "m-1"},
             {"step", "Tell"}}}}},
         {"steps", {{"Tell", {{"key", "i-pub/Tell/1"}, {"phase", "publishing"}}}}}}}}));
  return out;
}

TEST_F(engine_test, a_store_written_before_typed_bookkeeping_resumes_and_completes) {
  {
    auto db = orch::open_sqlite_store(dir_.file("state.db"));
    orch::commit_batch batch;
    batch.instances = old_records();
    ASSERT_TRUE(db->commit(batch));
  }
  open({k_hourly_retry, k_reserve_then_await, k_saga, k_announce});
  // Resumed: the compensation's command again with the same key, the unacknowledged event
  // again with its id, nothing for the backoff yet.
  ASSERT_EQ(fx_->actions(), std::vector<std::string>{"Svc.undo2"});
  EXPECT_EQ(fx_->calls()[0].what.opts.idempotency_key, "i-comp/Two/compensate/1");
  EXPECT_EQ(fx_->topics(),
            (std::vector<std::string>{"orders.told", "workflow.Announce.completed"}));
  EXPECT_EQ(fx_->published()[0].opts.id, "i-pub/Tell/1");
  EXPECT_EQ(get("i-pub")["status"], "completed");

  engine_->post_event(event("e-1", "stock.reserved", "i-await", {{"n", 1}}));
  settle();
  EXPECT_EQ(get("i-await")["status"], "completed");
  EXPECT_EQ(get("i-await")["steps"]["Reserved"]["output"], json({{"n", 1}}));

  reply(0, json::object());
  ASSERT_EQ(fx_->actions(), (std::vector<std::string>{"Svc.undo2", "Svc.undo1"}));
  reply(1, json::object());
  const auto comp = get("i-comp");
  EXPECT_EQ(comp["status"], "failed");
  EXPECT_EQ(comp["steps"]["Two"]["status"], "compensated");
  EXPECT_EQ(comp["steps"]["One"]["status"], "compensated");

  set_clock(k_start_us + 3600 * k_second_us - 1);
  EXPECT_EQ(fx_->calls().size(), 2U) << "the resumed backoff fired early";
  set_clock(k_start_us + 3600 * k_second_us);
  ASSERT_EQ(fx_->calls().size(), 3U);
  EXPECT_EQ(fx_->calls()[2].what.opts.idempotency_key, "i-backoff/Send/2");
  EXPECT_EQ(fx_->calls()[2].what.opts.attempt, 2U);
  EXPECT_EQ(fx_->calls()[2].what.opts.trace_id, "t-backoff");
  reply(2, {{"sent", true}});
  EXPECT_EQ(get("i-backoff")["status"], "completed");
  close();

  // What this version does not know is written back as it was read.
  auto db = orch::open_sqlite_store(dir_.file("state.db"));
  auto stored = db->get("i-backoff");
  ASSERT_TRUE(stored && *stored);
  const json& run = (**stored).state["run"];
  EXPECT_EQ(run["from_a_later_version"], json({{"kept", true}}));
  EXPECT_EQ(run["steps"]["Send"]["also_unknown"], 7);
  EXPECT_FALSE(run["steps"]["Send"].contains("phase"));
  EXPECT_EQ(run["history_seq"], 4 + 3);  // step_started (attempt 2), step_completed, completed
}

// ---------------------------------------------------------------------------------------------
// The typed bookkeeping's stored form

// Every key the engine writes in "run", at every level, and keys it does not know.
json every_run_key() {
  const std::int64_t t = k_start_us;
  return {{"trace_id", "t-1"},
          {"cause", "r-9"},
          {"history_seq", 42},
          {"completed", {"A", "B"}},
          {"outbox",
           {{"i/B/1",
             {{"topic", "orders.b"},
              {"payload", {{"n", 1}, {"list", {1, 2.5, "x", nullptr}}}},
              {"kind", "publish"},
              {"cause", "r-8"},
              {"step", "B"},
              {"unknown_entry_key", "kept"}}},
            {"i/completed",
             {{"topic", "workflow.W.completed"},
              {"payload", nullptr},
              {"kind", "lifecycle"},
              {"cause", ""}}}}},
          {"steps",
           {{"A", json::object()},
            {"Call",
             {{"phase", "calling"},
              {"due_us", t + 1},
              {"key", "i/Call/2"},
              {"request_id", "r-1"},
              {"deadline_us", t + 2}}},
            {"Wait", {{"phase", "awaiting"}, {"since_us", t}, {"since_real_us", t - 5}}},
            {"Sub", {{"phase", "child"}, {"child_id", "i/Sub/1"}}},
            {"Pick", {{"case", -1}}},
            {"Bad", {{"continued", true}, {"phase_from_the_future", "x"}}},
            {"Odd", {{"phase", "a phase no version has"}, {"due_us", "not a number"}}}}},
          {"parent_step", "Outer"},
          {"deadline_us", t + 3},
          {"final", "timed_out"},
          {"error", {{"code", "timeout"}, {"message", "late"}}},
          {"comp",
           {{"list", {"B", "A"}},
            {"index", 1},
            {"phase", "backoff"},
            {"attempt", 2},
            {"request_id", "r-2"},
            {"event_id", "i/B/compensate/1"},
            {"comp_key_from_the_future", {1, 2}}}},
          {"comp_failures", {{{"step", "B"}, {"code", "refused"}, {"message", "no"}}}},
          {"output", nullptr},
          {"from_the_future", {{"a", 1}}}};
}

TEST(run_state, a_document_with_every_key_round_trips_byte_for_byte) {
  const json doc = every_run_key();
  const detail::instance_run run = detail::run_from_json(doc);
  EXPECT_EQ(json::to_msgpack(detail::to_json(run)), json::to_msgpack(doc))
      << detail::to_json(run).dump() << "\n"
      << doc.dump();
  // Typed where the value has the expected type.
  EXPECT_EQ(run.steps.at("Call").phase, detail::step_phase::calling);
  EXPECT_EQ(run.steps.at("Pick").chosen_case, -1);
  EXPECT_EQ(run.comp->phase, detail::step_phase::backoff);
  EXPECT_EQ(run.final_status, orch::instance_status::timed_out);
  EXPECT_EQ(run.outbox.at("i/B/1").step, "B");
  // A document as stored comes back from msgpack with unsigned integers: the same bytes.
  const json stored = json::from_msgpack(json::to_msgpack(doc));
  EXPECT_EQ(json::to_msgpack(detail::to_json(detail::run_from_json(stored))),
            json::to_msgpack(doc));
}

TEST(run_state, a_fresh_instance_document_round_trips) {
  const json doc = {{"trace_id", "t"},          {"cause", ""},
                    {"history_seq", 0},         {"completed", json::array()},
                    {"outbox", json::object()}, {"steps", json::object()}};
  EXPECT_EQ(json::to_msgpack(detail::to_json(detail::run_from_json(doc))), json::to_msgpack(doc));
  EXPECT_EQ(detail::to_json(detail::instance_run{}), json({{"trace_id", ""},
                                                           {"cause", ""},
                                                           {"history_seq", 0},
                                                           {"completed", json::array()},
                                                           {"outbox", json::object()},
                                                           {"steps", json::object()}}));
}

TEST(run_state, an_outbox_entry_that_does_not_read_takes_no_other_with_it) {
  json doc = every_run_key();
  doc["outbox"]["broken"] = "not an entry";
  doc["history_seq"] = 5.0;  // a whole number as a float, as JSON text may hold it
  const auto run = detail::run_from_json(doc);
  EXPECT_EQ(run.outbox.count("i/B/1"), 1u) << "the readable entry stays typed, to be sent";
  EXPECT_EQ(run.outbox.count("broken"), 0u);
  EXPECT_EQ(run.history_seq, 5u);
  const json out = detail::to_json(run);
  EXPECT_EQ(out["outbox"]["broken"], "not an entry") << "kept as it was";
  EXPECT_EQ(out["outbox"]["i/B/1"], doc["outbox"]["i/B/1"]);
  EXPECT_EQ(out["history_seq"], 5u);
}

TEST(run_state, ending_a_phase_removes_it_and_its_due_time_even_when_kept_as_unknown) {
  json doc = every_run_key();
  auto run = detail::run_from_json(doc);
  run.steps.at("Odd").end_phase();
  run.steps.at("Call").end_phase();
  const json out = detail::to_json(run);
  EXPECT_EQ(out["steps"]["Odd"], json::object());
  EXPECT_EQ(out["steps"]["Call"],
            json({{"key", "i/Call/2"}, {"request_id", "r-1"}, {"deadline_us", k_start_us + 2}}));
}

TEST(run_state, a_lent_document_is_the_same_and_its_values_come_back) {
  auto run = detail::run_from_json(every_run_key());
  run.output = json{{"big", json::array({1, 2, 3})}};
  const json expected = detail::to_json(run);
  json lent = detail::lend_json(run);
  EXPECT_EQ(json::to_msgpack(lent), json::to_msgpack(expected));
  detail::take_back(run, lent);
  EXPECT_EQ(json::to_msgpack(detail::to_json(run)), json::to_msgpack(expected));
}

// ---------------------------------------------------------------------------------------------
// changed_steps: what a store may leave as stored

// A store that does what changed_steps allows a store to do: for an instance whose commit names
// the steps that changed, the other steps ("steps.<name>" and "run.steps.<name>") are kept as
// they were stored, whatever the commit holds for them. It also counts every step the commit
// holds differently from the stored one without naming it: a step the engine changed but did
// not name, which such a store would lose.
class partial_store final : public orch::store {
 public:
  partial_store(std::unique_ptr<orch::store> inner, std::vector<std::string>& unnamed)
      : inner_(std::move(inner)), unnamed_(unnamed) {}

  ensemble::common::status save_definition(const std::string& name, std::uint32_t version,
                                           const json& doc) override {
    return inner_->save_definition(name, version, doc);
  }
  std::optional<json> load_definition(const std::string& name, std::uint32_t version) override {
    return inner_->load_definition(name, version);
  }
  ensemble::common::status commit(const orch::commit_batch& batch) override {
    orch::commit_batch kept = batch;
    for (auto& r : kept.instances) {
      if (!r.changed_steps) continue;
      auto before = inner_->get(r.id);
      if (!before || !*before) {
        unnamed_.push_back(r.id + ": changed_steps set on its first commit");
        continue;
      }
      const json& old = (**before).state;
      const std::set<std::string> named(r.changed_steps->begin(), r.changed_steps->end());
      for (const char* part : {"steps", "run"}) {
        const json& old_steps = part == std::string("steps") ? old["steps"] : old["run"]["steps"];
        json& new_steps = part == std::string("steps") ? r.state["steps"] : r.state["run"]["steps"];
        std::set<std::string> names;
        for (const auto& [n, v] : old_steps.items()) names.insert(n);
        for (const auto& [n, v] : new_steps.items()) names.insert(n);
        for (const auto& n : names) {
          if (named.count(n) != 0) continue;
          const bool in_old = old_steps.contains(n);
          if (!in_old || !new_steps.contains(n) || old_steps[n] != new_steps[n]) {
            unnamed_.push_back(r.id + ": " + part + "." + n + " changed but not named");
          }
          if (in_old) {
            new_steps[n] = old_steps[n];
          } else {
            new_steps.erase(n);
          }
        }
      }
    }
    return inner_->commit(kept);
  }
  ensemble::common::result<std::vector<orch::instance_record>> load_active() override {
    return inner_->load_active();
  }
  ensemble::common::result<std::optional<orch::instance_record>> get(
      const std::string& id) override {
    return inner_->get(id);
  }
  ensemble::common::result<std::vector<orch::instance_record>> list(
      const orch::list_filter& f) override {
    return inner_->list(f);
  }
  ensemble::common::result<std::vector<orch::history_entry>> history(
      const std::string& id) override {
    return inner_->history(id);
  }
  std::vector<std::pair<orch::instance_status, std::uint64_t>> count_by_status() override {
    return inner_->count_by_status();
  }
  ensemble::common::result<std::optional<std::string>> triggered_by(
      const std::string& workflow, const std::string& event_id) override {
    return inner_->triggered_by(workflow, event_id);
  }
  ensemble::common::result<std::vector<orch::buffered_event>> load_buffer() override {
    return inner_->load_buffer();
  }
  ensemble::common::result<std::optional<std::int64_t>> load_virtual_now() override {
    return inner_->load_virtual_now();
  }
  std::size_t purge_buffer(std::int64_t before_us) override {
    return inner_->purge_buffer(before_us);
  }

 private:
  std::unique_ptr<orch::store> inner_;
  std::vector<std::string>& unnamed_;
};

const char* const k_every_kind = R"({"workflow": {"name": "Every", "steps": [
  {"name": "Call", "service": "Svc", "action": "do",
   "retry": {"max_attempts": 2, "initial_interval": "1s"},
   "compensate": {"service": "Svc", "action": "undo"}},
  {"name": "Pick", "kind": "switch", "cases": [
     {"when": "${steps.Call.output.go} == true", "steps": [
       {"name": "Nap", "kind": "wait", "duration": "10s"}]}]},
  {"name": "Both", "kind": "parallel", "branches": [
     [{"name": "Tell", "kind": "publish", "topic": "orders.told"}],
     [{"name": "Heard", "kind": "await", "topic": "orders.heard", "timeout": "1h"}]]},
  {"name": "Last", "service": "Svc", "action": "last"}]}})";

TEST_F(engine_test, every_change_of_a_step_is_named_in_its_commit_and_survives_a_restart) {
  std::vector<std::string> unnamed;
  // Each phase of the walk, then a restart on a store that keeps unnamed steps as stored.
  auto reopen = [&] {
    close();
    open_with_store({k_every_kind}, [&](std::unique_ptr<orch::store> db) {
      return std::make_unique<partial_store>(std::move(db), unnamed);
    });
  };
  reopen();
  const auto id = start("Every");
  reopen();  // Call in flight: sent again
  ASSERT_EQ(fx_->actions(), std::vector<std::string>{"Svc.do"});
  reply_error(0, failure("unavailable", true));  // backoff
  reopen();
  // Absolute times: a restart goes on from the virtual time last committed with `advance`.
  set_clock(k_start_us + k_second_us);  // the retry
  ASSERT_EQ(fx_->actions(), std::vector<std::string>{"Svc.do"});
  reply(0, {{"go", true}});  // Pick takes its case: Nap waits
  reopen();
  EXPECT_EQ(get(id)["steps"]["Nap"]["status"], "running");
  set_clock(k_start_us + 11 * k_second_us);  // Nap ends; Both: Tell published, Heard awaits
  reopen();
  EXPECT_EQ(get(id)["steps"]["Tell"]["status"], "completed");
  engine_->post_event(event("e-1", "orders.heard", id, {{"heard", true}}));
  settle();
  reopen();
  const auto mid = get(id);
  EXPECT_EQ(mid["steps"]["Heard"]["output"], json({{"heard", true}}));
  EXPECT_EQ(mid["steps"]["Both"]["status"], "completed");
  ASSERT_EQ(fx_->actions(), std::vector<std::string>{"Svc.last"});
  reply_error(0, failure("refused", false));  // Last fails: Call is compensated
  reopen();
  ASSERT_EQ(fx_->actions(), std::vector<std::string>{"Svc.undo"});
  reply(0, json::object());
  reopen();
  const auto v = get(id);
  EXPECT_EQ(v["status"], "failed");
  EXPECT_EQ(v["steps"]["Call"]["status"], "compensated");
  EXPECT_EQ(v["steps"]["Call"]["attempts"], 2);
  EXPECT_EQ(v["steps"]["Last"]["status"], "failed");
  EXPECT_TRUE(unnamed.empty()) << ::testing::PrintToString(unnamed);
}

}  // namespace
