#pragma once
// The orchestrator: runs workflow instances of the definitions it was given, as a client of an
// Ensemble broker like any agent.
//
//   ensemble::orchestrator::orchestrator o({.broker = router, .events = events,
//                                           .store = "state.db", .workflows = {"flows/"}});
//   if (auto s = o.start(); !s) { ... }
//   auto started = o.request("start", {{"workflow", "OrderProcessing"}, {"input", order}});
//   auto view = o.request("get", {{"id", (*started)["id"]}});
//
// Every operation is one JSON request, the same whether it comes from this C++ API or from the
// `orchestrator` service on the broker (docs/workflows.md, "The orchestrator service"):
// start, get, list, cancel, history, definitions, stats, advance (virtual clock only). One engine
// thread owns all instances; it commits every state change to the store before sending the commands
// and events it causes, grouping the changes of one loop iteration into one transaction. start()
// resumes every unfinished instance found in the store: timers re-armed, awaits re-registered,
// in-flight commands re-sent with the same idempotency key.
//
// The constructor loads definitions, opens the store (checking its integrity) and reads its
// unfinished instances; it throws common::config_error naming the file and JSON path of a
// problem, store_damaged (a config_error) for a damaged store. Everything after start()
// returns results.

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/common/result.hpp"
#include "ensemble/orchestrator/clock.hpp"
#include "ensemble/orchestrator/store.hpp"

namespace ensemble::orchestrator {

using json = nlohmann::json;

struct options {
  std::string name = "orchestrator";             // agent name on the broker
  std::string broker = "tcp://127.0.0.1:5555";   // the broker's router endpoint
  std::string events = "tcp://127.0.0.1:5556";   // the broker's events endpoint
  std::string store = ":memory:";                // SQLite file, or ":memory:"
  store_check check_store = store_check::quick;  // integrity check of the file at start
  std::int64_t store_max_size = 0;               // bytes the file may grow to; 0: no limit
  store_sync sync = store_sync::normal;          // fsync each commit (full) or not
  // wall, or virtual: workflow time starts at the wall time of the first start (then at what
  // the store kept) and moves only by the `advance` action (docs/testing.md, "Time skipping").
  clock_kind clock = clock_kind::wall;
  std::vector<std::string> workflows;                   // definition files and directories
  bool serve = true;                                    // offer the `orchestrator` service
  std::string service = "orchestrator";                 // its name
  std::uint32_t capacity = 16;                          // admin requests handled at once
  std::chrono::milliseconds default_timeout{10'000};    // command steps without `timeout`
  std::chrono::milliseconds buffer_retention{600'000};  // unawaited events are kept this long
  std::size_t buffer_limit = 100'000;                   // ... and at most this many
  // Secured broker: agent::options::key_file and broker_key (both or neither). `name` must then
  // be the key's identity in the broker's auth file.
  std::string key_file = {};
  std::string broker_key = {};
};

struct stats {
  std::uint64_t started = 0, completed = 0, failed = 0, cancelled = 0, timed_out = 0;
  std::uint64_t commands_sent = 0, events_published = 0, events_matched = 0;
  std::uint64_t events_caught_up =
      0;  // awaited events found in the broker's journal after a restart
  std::uint64_t commits = 0, committed_instances = 0;
  std::size_t active = 0, buffered_events = 0;
  // Events that matched an await or choreography step but whose publisher its "from" does not
  // list: ignored. In total and per topic.
  std::uint64_t events_ignored_from = 0;
  std::map<std::string, std::uint64_t> events_ignored_from_by_topic;
};

// Who sends an admin request, as the broker's DISPATCH says (docs/protocol.md section 12): the
// `orchestrator` service fills it from the `caller` and `caller_scope` header fields. `start`
// records `caller` as the instance's started_by; with scope "own" the actions on one instance
// are refused (`unauthorized`) for an instance that `caller` did not start, and `list` shows
// only its instances. An application embedding the orchestrator that authenticates its own
// users may pass it to request() too.
struct requester {
  std::string caller;  // empty: unknown (nobody is recorded as started_by)
  std::string scope;   // "" or "own"
};

class orchestrator {
 public:
  explicit orchestrator(options opts);
  ~orchestrator();  // stop()
  orchestrator(const orchestrator&) = delete;
  orchestrator& operator=(const orchestrator&) = delete;

  // Connects to the broker, registers the service, resumes active instances.
  common::status start();
  // Stops the engine (state already committed stays; running instances resume at next start).
  void stop();

  // One admin operation: "start" {workflow, input?, id?, version?}, "get" {id},
  // "list" {status?, workflow?, limit?}, "cancel" {id, reason?}, "history" {id},
  // "definitions" {}. Answers once the engine has handled (and committed) it, or
  // deadline_exceeded. Errors: bad_request (names the field), not_found, ...
  common::result<json> request(std::string_view action, const json& args,
                               std::chrono::milliseconds deadline = std::chrono::seconds(10));
  // The same, on behalf of `who`.
  common::result<json> request(std::string_view action, const json& args,
                               std::chrono::milliseconds deadline, const requester& who);

  stats counters() const;
  const options& config() const;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace ensemble::orchestrator
