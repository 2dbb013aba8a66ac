// The instance's state document and the helpers every part uses on it: the accessors of a step's
// visible state ("steps.<name>") and bookkeeping
// ("run.steps.<name>"), the expressions' default view of an instance, and error documents. See
// engine.hpp for the shape of the document.
#include "engine.hpp"

namespace ensemble::orchestrator::detail {

std::string key_of(const std::string& a, const std::string& b) {
  return a + '\n' + b;
}

json error_json(const std::string& step, const error& e, std::uint32_t attempts) {
  json j = {{"code", e.code}, {"message", e.message}};
  if (!step.empty()) j["step"] = step;
  if (attempts > 0) j["attempts"] = attempts;
  return j;
}

std::string describe(const json& err) {
  std::string s;
  if (err.contains("step")) s += "step " + err["step"].get<std::string>() + ": ";
  s += err.value("code", std::string("error")) + ": " + err.value("message", std::string());
  if (err.contains("attempts")) {
    s += " (after " + std::to_string(err["attempts"].get<std::uint32_t>()) + " attempt(s))";
  }
  return s;
}

json& engine::vis(instance& in, const std::string& step) {
  in.step_changed(step);
  auto& v = in.state["steps"][step];
  if (!v.is_object()) v = json::object();
  return v;
}

step_run& engine::run_of(instance& in, const std::string& step) {
  in.step_changed(step);
  auto& r = in.run.steps[step];
  // As for the visible state: what is not an object is replaced by an empty one.
  if (!r.extra.is_null() && !r.extra.is_object()) r.extra = json();
  return r;
}

json engine::instance::document() const {
  json doc = state;
  doc["run"] = to_json(run);
  return doc;
}

const json& engine::peek(const instance& in, const std::string& step) {
  static const json empty = json::object();
  const auto& steps = in.state["steps"];
  auto it = steps.find(step);
  return it == steps.end() || !it->is_object() ? empty : *it;
}

json engine::default_input(const instance& in) const {
  // The documented shape (docs/workflows.md, "Data"): what expressions read, without the
  // engine's own bookkeeping.
  json steps = json::object();
  for (const auto& [name, v] : in.state["steps"].items()) {
    json entry = json::object();
    for (const char* field : {"output", "error", "attempts", "event"}) {
      if (v.contains(field)) entry[field] = v[field];
    }
    if (!entry.empty()) steps[name] = std::move(entry);
  }
  const auto& wf = in.state["workflow"];
  return json{{"workflow", {{"id", wf["id"]}, {"name", wf["name"]}, {"input", wf["input"]}}},
              {"steps", std::move(steps)}};
}
}  // namespace ensemble::orchestrator::detail
