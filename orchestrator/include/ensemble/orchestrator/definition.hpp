#pragma once
// Workflow definitions: the JSON format of docs/workflows.md, parsed and validated into a tree
// of steps that the engine walks.
//
// A definition is loaded once, at start-up (or when a client registers one), so this is the
// configuration tier: everything here throws common::config_error, whose message names the
// file, the JSON path (RFC 6901 pointer, e.g. "/workflow/steps/2/retry/max_attempts") and the
// problem. Every problem of a document is found in one pass: the error lists them all, one per
// line (common::config_errors::diagnostics()), in file order. Once parsed, a definition is
// immutable and shared by every instance of it.
//
// Step names are unique across the whole definition, nested steps included, so that
// `${steps.<name>...}` and `on_error.goto` are unambiguous.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/common/config_reader.hpp"

namespace ensemble::orchestrator {

using json = nlohmann::json;
using millis = std::chrono::milliseconds;

enum class step_kind { command, publish, await, choreography, parallel, switch_, wait, workflow };
// "command", "publish", ..., "switch", ...
std::string_view to_string(step_kind k);

struct retry_policy {
  std::uint32_t max_attempts = 1;          // 1: no retry
  millis initial_interval{200};            // delay before the 2nd attempt
  double backoff = 2.0;                    // each further delay is multiplied by this
  millis max_interval{10'000};             // cap on a delay
  std::vector<std::string> non_retryable;  // error codes that are never retried

  // Delay before attempt `failed_attempt + 1` (failed_attempt is 1-based).
  millis delay_after(std::uint32_t failed_attempt) const;
  // Whether an error with `code` and the sender's `retryable` flag may be retried at all.
  bool allows(std::string_view code, bool retryable) const;
};

// An event to publish; `payload` is a template (see expression.hpp).
struct event_spec {
  std::string topic;
  json payload;  // null: the default payload (docs/workflows.md, "Data")
};

// What undoes a completed step: a command, or an event for choreographed segments.
struct compensation {
  enum class kind { command, event };
  kind what = kind::command;
  std::string service, action;  // command
  std::optional<json> input;    // command: template; nullopt: the default input
  event_spec event;             // event
  millis timeout{10'000};       // command: deadline of each attempt
  retry_policy retry;           // command
  std::string path;             // JSON path, for messages
};

struct on_error_policy {
  enum class kind { fail, continue_, go_to };
  kind what = kind::fail;
  std::string target;  // go_to: a later step of the same sequence
};

struct step;
using sequence = std::vector<step>;

struct switch_case {
  std::string when;  // a condition (expression.hpp)
  sequence steps;
};

struct step {
  std::string name;
  step_kind kind = step_kind::command;
  std::string path;  // JSON path of this step in its file, e.g. "/workflow/steps/1"

  // command
  std::string service;
  std::string action;
  std::optional<json> input;  // template; nullopt: the default input (the expression context)

  // publish: the event; choreography: the start event
  event_spec event;

  // await: until = [topic]; choreography: until = success topics, fail_on = failure topics
  std::vector<std::string> until;
  std::vector<std::string> fail_on;
  // await, choreography: condition an event must satisfy besides its topic; empty: the event's
  // correlation_id must equal the instance id.
  std::string match;
  // await, choreography: the publishers (agent names; identities in secured mode) whose events
  // may complete the step; empty: anyone. An event from another publisher is ignored.
  std::vector<std::string> from;

  // parallel
  std::vector<sequence> branches;

  // switch: the first case whose condition holds runs; else default_steps (may be empty)
  std::vector<switch_case> cases;
  sequence default_steps;

  // wait
  millis duration{0};

  // workflow (sub-workflow): the child's input is `input`
  std::string workflow;

  // every kind
  std::optional<millis> timeout;  // command: per attempt; await/choreography: the wait;
                                  // workflow: the child's; others: unused
  retry_policy retry;
  std::optional<compensation> compensate;
  on_error_policy on_error;
};

// Starts one instance per matching event, at most once per event id.
struct trigger {
  std::string topic;          // exact topic
  std::string match;          // condition on the event; empty: every event on the topic
  std::optional<json> input;  // template over ${event...}; nullopt: the event's payload
};

struct definition {
  std::string name;
  std::uint32_t version = 1;
  std::string source;  // file name (or "<inline>") for messages
  sequence steps;
  std::optional<json> output;  // template; nullopt: the output of the last top-level step
  std::optional<millis> timeout;
  std::vector<trigger> triggers;
  json raw;  // the document as given, stored with instances

  // The step named `name` anywhere in the tree, or nullptr.
  const step* find(std::string_view step_name) const;
  // Every topic an await, a choreography or a trigger of this definition listens to.
  std::vector<std::string> listened_topics() const;
  // The names of every sub-workflow this definition starts.
  std::vector<std::string> sub_workflows() const;
};

// Parses and validates one definition document. `source` names it in errors.
// Throws one common::config_error listing every problem ("<source>: <json pointer>: <problem>").
definition parse_definition(const json& doc, const std::string& source);
// Reads and parses a file; JSON syntax errors name the file, line and column, and every other
// problem ends with "(line L, column C)".
definition load_definition_file(const std::string& path);
// Files, and directories (their *.json files, sorted). Also checks what only a set can show:
// duplicate (name, version) pairs, sub-workflows that no definition provides, cycles.
std::vector<definition> load_definitions(const std::vector<std::string>& paths);
// The cross-definition checks of load_definitions, for definitions built otherwise.
void check_definition_set(const std::vector<definition>& defs);
// The problems check_definition_set throws. Sub-workflows named in `also_known` count as
// provided.
std::vector<common::diagnostic> definition_set_problems(
    const std::vector<definition>& defs, const std::vector<std::string>& also_known = {});

// What `ensemble validate` and `ensemble-orchestrator --validate` do (docs/workflows.md,
// "Validating"): checks every file of `paths` (directories: their *.json files; a file named
// twice is checked once) and the set as a whole — sub-workflows resolve among these files.
// Prints "FILE: ok (...)" on `out` for a valid file, and on `err` one line per problem
// ("FILE: PATH: message"): `problems` found before (they count), then file by file, in file
// order; then "N problems found". Returns k_valid or k_invalid.
inline constexpr int k_valid = 0;
inline constexpr int k_invalid = 1;      // a file or the set has a problem, or cannot be read
inline constexpr int k_usage_error = 2;  // bad command line (the commands' own parsing)
int validate_definition_files(const std::vector<std::string>& paths, std::FILE* out, std::FILE* err,
                              std::vector<common::diagnostic> problems = {});

// "250ms", "2s", "1.5s", "1m", "1h", or an integer number of milliseconds. nullopt if invalid.
std::optional<millis> parse_duration(const json& value);

}  // namespace ensemble::orchestrator
