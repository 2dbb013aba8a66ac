#pragma once
// The workflow store: where the orchestrator keeps definitions, instances, each instance's
// append-only history, trigger bookkeeping and events that arrived before anyone awaited them.
//
// It is the seam between the engine and durability (SQLite now; a server database such as
// PostgreSQL later, so that several orchestrators can share one). The engine calls it from one
// thread only. A state change is written with commit() before any of its effects (commands,
// events) is sent, and commit() takes a whole batch of changes to many instances in one
// transaction: grouping commits is what keeps durability from capping throughput.
//
// An instance's runtime state (step states, timers, awaits, pending events) is one JSON
// document owned by the engine; the store keeps it opaque and indexes the columns it needs,
// except that it stores the entries of its "steps" and "run.steps" objects one step at a time
// (see instance_record::changed_steps), and reads give back exactly the committed document.
//
// Reads return results: a row that does not decode, or a query that fails half way (a damaged
// file), is an error naming the row, never a shorter answer. A commit that fails because the
// disk (or the store's size limit) is full returns `storage_full` (retryable), any other
// failure `store_error`; either way nothing of the batch is stored.

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/common/result.hpp"

namespace ensemble::orchestrator {

using json = nlohmann::json;

// Error codes of the store's results (besides common::errc ones).
inline constexpr std::string_view k_store_error = "store_error";
inline constexpr std::string_view k_storage_full = "storage_full";

enum class instance_status { running, compensating, completed, failed, cancelled, timed_out };
std::string_view to_string(instance_status s);
std::optional<instance_status> parse_instance_status(std::string_view s);
inline bool is_terminal(instance_status s) {
  return s != instance_status::running && s != instance_status::compensating;
}

struct instance_record {
  std::string id;
  std::string workflow;
  std::uint32_t version = 1;
  instance_status status = instance_status::running;
  std::string parent_id;  // sub-workflows: the parent instance; empty otherwise
  // The `caller` of the `start` request (a sub-workflow: its parent's); empty when unknown (a
  // trigger, the C++ API without a requester, rows written before it was recorded).
  std::string started_by;
  std::int64_t created_us = 0;  // wall clock, microseconds since the Unix epoch
  std::int64_t updated_us = 0;
  // The engine still has work for it: not terminal, or terminal with events not yet
  // acknowledged by the broker. load_active() returns exactly these.
  bool active = true;
  json state;  // the engine's runtime state, opaque to the store
  // In a commit only: when set, the steps of `state` ("steps.<name>" and "run.steps.<name>")
  // not named here are unchanged since this instance's last commit, and the store may leave
  // them as stored. Unset: every step may have changed. Reads leave it unset.
  std::optional<std::vector<std::string>> changed_steps;
};

struct history_entry {
  std::string instance_id;
  std::uint64_t seq = 0;  // 1, 2, ... per instance, assigned by the engine
  std::int64_t ts_us = 0;
  std::string kind;  // "started", "step_started", "step_completed", "step_failed", ...
  std::string step;  // empty for instance-level entries
  json data;
};

// An event on an awaited topic that no await has consumed yet.
struct buffered_event {
  std::string id;  // event id (unique)
  std::string topic;
  std::string correlation_id;
  std::int64_t received_us = 0;
  json event;  // {"id","topic","correlation_id","causation_id","seq","ts","publisher","payload"}
};

struct trigger_mark {
  std::string workflow;
  std::string event_id;
  std::string instance_id;
};

// Everything one engine iteration changed; committed atomically.
struct commit_batch {
  std::vector<instance_record> instances;  // upserted (by id)
  std::vector<history_entry> history;      // appended
  std::vector<trigger_mark> triggers;      // inserted
  std::vector<buffered_event> buffer_add;  // inserted (an id already present is ignored)
  std::vector<std::string> buffer_remove;  // event ids deleted
  // A virtual clock's time (orchestrator --clock virtual), kept across restarts.
  std::optional<std::int64_t> virtual_now_us;
  bool empty() const {
    return instances.empty() && history.empty() && triggers.empty() && buffer_add.empty() &&
           buffer_remove.empty() && !virtual_now_us;
  }
};

struct list_filter {
  std::optional<instance_status> status;
  std::string workflow;                   // empty: all
  std::optional<std::string> started_by;  // only the instances this caller started
  std::size_t limit = 100;                // newest first
};

class store {
 public:
  virtual ~store() = default;

  // Definitions, by (name, version): instances keep running with the version they started
  // with, even if the file changes. Saving an identical document again is a no-op; a
  // different document for an existing (name, version) is an error (bad_request).
  virtual common::status save_definition(const std::string& name, std::uint32_t version,
                                         const json& doc) = 0;
  virtual std::optional<json> load_definition(const std::string& name, std::uint32_t version) = 0;

  // One transaction. On error nothing of the batch is stored.
  virtual common::status commit(const commit_batch& batch) = 0;

  // Errors (store_error) name the instance, history entry or event that does not decode.
  virtual common::result<std::vector<instance_record>> load_active() = 0;
  virtual common::result<std::optional<instance_record>> get(const std::string& id) = 0;
  // Newest first (created_us descending). `state` is filled.
  virtual common::result<std::vector<instance_record>> list(const list_filter& filter) = 0;
  virtual common::result<std::vector<history_entry>> history(const std::string& instance_id) = 0;
  // Instances per status, for stats.
  virtual std::vector<std::pair<instance_status, std::uint64_t>> count_by_status() = 0;

  // The instance a trigger event already started, if any.
  virtual common::result<std::optional<std::string>> triggered_by(const std::string& workflow,
                                                                  const std::string& event_id) = 0;

  virtual common::result<std::vector<buffered_event>> load_buffer() = 0;  // oldest first
  // The last virtual_now_us committed; nullopt if none ever was.
  virtual common::result<std::optional<std::int64_t>> load_virtual_now() = 0;
  // Deletes buffered events received before `before_us`; returns how many.
  virtual std::size_t purge_buffer(std::int64_t before_us) = 0;
};

// How much of an existing store file is verified at open: `quick` (PRAGMA quick_check: every
// page of every b-tree, O(file size)), `full` (PRAGMA integrity_check: also that every index
// matches its table), `off`. docs/workflows.md, "The store", has the times they take.
enum class store_check { off, quick, full };
std::string_view to_string(store_check c);
std::optional<store_check> parse_store_check(std::string_view s);

// How durable a commit is when commit() returns (docs/workflows.md, "Durability"): `normal`
// (WAL, synchronous=NORMAL: survives the process being killed; an OS crash or power loss may
// roll back the last transactions) or `full` (synchronous=FULL: the WAL is fsynced at every
// commit, so a committed transaction survives a power loss too).
enum class store_sync { normal, full };
std::string_view to_string(store_sync s);
std::optional<store_sync> parse_store_sync(std::string_view s);

struct sqlite_options {
  store_check check = store_check::quick;
  store_sync sync = store_sync::normal;
  // Largest size the database file may grow to, in bytes (rounded down to whole pages; 0: no
  // limit). Reaching it behaves exactly as a full disk: commits fail with storage_full.
  std::int64_t max_size_bytes = 0;
};

// Thrown at open when the file is an Ensemble store but is damaged: the integrity check found
// problems, SQLite reported corruption, or a row does not decode. The message names the file
// and what is wrong. ensemble-orchestrator exits with its own code for it (3).
class store_damaged : public common::config_error {
 public:
  using common::config_error::config_error;
};

// SQLite in WAL mode. `path` is a file (created if missing, with its directory's write access
// required) or ":memory:". Throws common::config_error naming the file if it cannot be opened
// or is not an Ensemble store, store_damaged if it is a damaged one; the schema is created or
// checked at open, and the file's integrity as `opts.check` says.
std::unique_ptr<store> open_sqlite_store(const std::string& path, const sqlite_options& opts = {});

}  // namespace ensemble::orchestrator
