#pragma once
// Expressions: how data flows between steps (docs/workflows.md, "Data").
//
// A *template* is any JSON value. Strings in it may contain `${path}` references:
//   - a string that is exactly one reference is replaced by the referenced JSON value
//     (whole-value substitution: numbers stay numbers, objects stay objects);
//   - a reference inside a longer string is replaced by its text (strings as-is, other values
//     as compact JSON, null as "").
// Objects and arrays are rendered member by member. "$${" is a literal "${".
//
// A path is dot-separated names with optional [index] parts, resolved against the context
// object: `workflow.input.items[0].sku`, `steps.ChargePayment.output.transactionId`,
// `event.payload.orderId`. A path that leads nowhere yields null.
//
// A *condition* (switch cases, await `match`, trigger `match`) compares values:
//   operands: references `${...}`, numbers, 'single' or "double" quoted strings, true, false, null
//   operators: == != < <= > >= (numbers, or strings), && || ! and parentheses.
// A bare reference is true when its value is truthy (not null/false/0/""/empty).
//
// Validation (check_*) runs at load time and reports syntax errors and which step names are
// referenced, so that references to unknown or later steps are caught before anything runs.

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/common/result.hpp"

namespace ensemble::orchestrator {

using json = nlohmann::json;

// Renders a template against `context`. Errors (bad_request) name the bad expression.
common::result<json> render(const json& tmpl, const json& context);
// Evaluates a condition. Errors name the bad expression (e.g. comparing a string with a number
// with < is an error; == between different types is false).
common::result<bool> evaluate(std::string_view condition, const json& context);
// The value at `path` ("steps.A.output.x") in `context`, or null.
json lookup(std::string_view path, const json& context);

struct expression_check {
  std::string problem;                  // empty when valid
  std::vector<std::string> roots;       // first path segment of every reference
  std::vector<std::string> step_names;  // second segment of every steps.* reference
  std::vector<std::string> paths;       // every reference's path, as written inside ${...}
};
expression_check check_template(const json& tmpl);
expression_check check_condition(std::string_view condition);

}  // namespace ensemble::orchestrator
