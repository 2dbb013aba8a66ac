#pragma once
// How the CLI writes what the orchestrator tells about an instance as text: one line per
// history entry (`run --wait`, `trace`) and, for a step still running, what it waits on
// (`status`). The same words in every command.
//
// The history is a log written over the orchestrator's versions, and a field may be missing,
// null (an await's `topic`) or of another type than expected. Everything here reads fields
// through the accessors below, which fall back instead of throwing: printing an instance
// never aborts the command.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace ensemble::cli {

using json = nlohmann::json;

// `obj[key]` as text: a string as is, a number, boolean, array or object as compact JSON;
// `fallback` when `obj` is not an object or the field is missing or null.
std::string text_field(const json& obj, std::string_view key, std::string_view fallback = "");
// `obj[key]` as an integer; `fallback` when missing or not a number.
std::int64_t int_field(const json& obj, std::string_view key, std::int64_t fallback = 0);
// `obj[key]` when it is an object (or array), else an empty object (or array).
const json& object_field(const json& obj, std::string_view key);
const json& array_field(const json& obj, std::string_view key);

// "850us", "12.5ms", "3.20s", "9m58s".
std::string format_us(std::int64_t us);
// A wall-clock time (µs since the Unix epoch) as "00:12:03.250 UTC (in 29.8s)", relative to
// `now_us`; "(... ago)" when past.
std::string format_due(std::int64_t due_us, std::int64_t now_us);
// Now, in µs since the Unix epoch.
std::int64_t wall_now_us();

// One history entry ({seq, ts_us, kind, step?, data?}) as a line without its time, e.g.
// "step_started Charge (Pay.charge, attempt 2)".
std::string describe_entry(const json& entry);
// What a running step waits on, from the `waiting` object the orchestrator's `get` gives each
// running step (docs/workflows.md, "The orchestrator service"), e.g. "waits for event
// order.approved with correlation_id X, deadline 00:12:03.250 UTC (in 29.8s)". Empty when
// `waiting` says nothing.
std::string describe_waiting(const json& waiting, std::int64_t now_us);

}  // namespace ensemble::cli
