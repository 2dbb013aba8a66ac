#pragma once
// The engine's bookkeeping of one instance, typed: what each running step is doing (its phase,
// due time, request, child, ...), the compensation's progress, the outbox of events not yet
// acknowledged, the instance's deadline and its end. The engine reads and writes these fields;
// JSON is only how they are stored: the "run" member of the instance's state document
// (engine.hpp), written by to_json() for the store and the admin views, and read by
// from_json() when the engine resumes what the store kept.
//
// The stored document is the one the engine wrote before this bookkeeping was typed, key for
// key: a field that is absent in the document is absent here (std::nullopt, or the noted
// default), so that a load-then-save writes back exactly what was read. A key this code does
// not know (written by another version), or a known key whose value does not have the expected
// type, is kept as it was in `extra` and written back unchanged.

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/orchestrator/store.hpp"

namespace ensemble::orchestrator::detail {

using json = nlohmann::json;

// What a running step (or the compensation) is doing: "run.steps.<name>.phase" and
// "run.comp.phase" in the stored document.
enum class step_phase { none, calling, backoff, awaiting, waiting, publishing, child };
std::string_view phase_name(step_phase p);  // none: ""
// nullopt for a string that names no phase ("" is none).
std::optional<step_phase> parse_phase(std::string_view name);

// "run.steps.<name>": a step's bookkeeping. The entry exists once the engine touched the step's
// bookkeeping (see engine::run_of), and stays after the step ended.
struct step_run {
  step_phase phase = step_phase::none;        // "phase": absent when none
  std::optional<std::int64_t> due_us;         // its timer: backoff, wait, await or call timeout
  std::optional<std::string> key;             // the attempt's idempotency key / event id
  std::optional<std::string> request_id;      // the command in flight
  std::optional<std::int64_t> deadline_us;    // the call's deadline, shown by `get`
  std::optional<std::int64_t> since_us;       // an await: events before this are not its answer
  std::optional<std::int64_t> since_real_us;  // the same in real time (virtual clock only)
  std::optional<std::string> child_id;        // a sub-workflow step's instance
  std::optional<int> chosen_case;             // "case": a switch's case, -1 for its default
  std::optional<bool> continued;              // failed, and its on_error lets the walk go on
  json extra;                                 // keys not known here: an object, or null

  // The step ended (completed, failed, cancelled): no phase, no timer.
  void end_phase();
};

// "run.comp": compensation in progress (present once the instance began compensating).
struct compensation_run {
  std::vector<std::string> list;        // the steps to compensate, in order
  std::size_t index = 0;                // the one being compensated
  step_phase phase = step_phase::none;  // always stored ("" for none)
  std::uint32_t attempt = 0;
  std::optional<std::string> request_id;  // its command in flight
  std::optional<std::string> event_id;    // its event in the outbox
  json extra;
};

// "run.outbox.<event id>": an event committed but not yet acknowledged by the broker.
struct outbox_entry {
  std::string topic;
  json payload;
  std::string kind;  // "lifecycle", "publish", "start" (choreography), "compensation"
  std::string cause;
  std::optional<std::string> step;  // absent for lifecycle events
  json extra;
};

// "run": the whole bookkeeping of an instance.
struct instance_run {
  std::string trace_id;
  std::string cause;  // what caused what the instance does next: a request or event id
  std::uint64_t history_seq = 0;
  std::vector<std::string> completed;           // steps, in the order they completed
  std::map<std::string, outbox_entry> outbox;   // by event id
  std::map<std::string, step_run> steps;        // by step name
  std::optional<std::string> parent_step;       // a sub-workflow: its step in the parent
  std::optional<std::int64_t> deadline_us;      // the workflow's (or its step's) timeout
  std::optional<instance_status> final_status;  // "final": where compensation ends
  std::optional<json> error;
  std::optional<compensation_run> comp;
  std::optional<std::vector<json>> comp_failures;
  std::optional<json> output;
  json extra;
};

// The stored "run" document. Never fails: what does not fit a typed field goes to `extra`.
instance_run run_from_json(const json& doc);
json to_json(const instance_run& run);
// The same document as to_json(), but the values that may be large (outbox payloads, output,
// error) are moved into it rather than copied, and take_back() moves them back from it: for the
// commit, which needs the document only until the store has written it.
json lend_json(instance_run& run);
void take_back(instance_run& run, json& doc);

}  // namespace ensemble::orchestrator::detail
