#pragma once
// The orchestrator's admin API (docs/workflows.md, "The orchestrator service") as one table.
//
// Each action has a handler (an engine member, in admin.cpp) and says what engine::admin and
// the loop must know before calling it: how it treats a caller with caller_scope "own", and
// whether it changes state. engine::admin checks the arguments and the caller's scope, finds
// the action in engine::admin_actions() and calls its handler; an action that is not there is
// answered unknown_action, naming the table's actions in its order.

#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "engine.hpp"

namespace ensemble::orchestrator::detail {

// How an action treats a caller with caller_scope "own" (docs/protocol.md section 12).
enum class own_scope {
  checked,  // the handler acts only on the caller's instances (refuses or filters the others)
  any,      // concerns no instance: answered as for any caller
  refused,  // concerns every instance: refused unauthorized
};

// One admin request, as its handler gets it.
struct admin_call {
  std::string_view action;
  const json& args;  // an object, or null
  const origin& from;
  bool own;  // from.caller_scope is "own": only the instances from.caller started
  // Set by a handler whose answer reads the store: called after the iteration's commit.
  std::function<result<json>()>& later;
};

struct admin_action {
  std::string_view name;
  result<json> (engine::*handle)(const admin_call&);
  own_scope own;
  // Changes state: refused while the store cannot commit, answered once what it did is
  // committed.
  bool mutates;
  // own_scope::refused: why, for the caller.
  std::string_view own_refusal;
};

// A bad_request refusal of an admin call's arguments.
error bad_admin_args(std::string what);

}  // namespace ensemble::orchestrator::detail
