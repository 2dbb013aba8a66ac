#pragma once
// A workflow definition as a Mermaid flowchart (`ensemble graph`), optionally styled by an
// instance's state: done, failed, compensated, running, skipped/cancelled, not reached.
//
// Shapes: commands are rectangles ("Name / Service.action"), publishes are flags, awaits are
// stadiums, choreographies are subroutines (the segment other services carry), parallel
// groups fork and join at hexagons, switches are diamonds whose edges carry the conditions,
// waits are circles, sub-workflows are double rectangles. A compensation is a dashed edge to
// the node that undoes the step.

#include <string>

#include <nlohmann/json.hpp>

#include "ensemble/orchestrator/definition.hpp"

namespace ensemble::cli {

// `instance`: the orchestrator's view of an instance (`get`), or null for the bare definition.
std::string mermaid_graph(const orchestrator::definition& def,
                          const nlohmann::json& instance = nullptr);

}  // namespace ensemble::cli
