// The typed bookkeeping's stored form (run_state.hpp): the "run" document of an instance's state.
#include "run_state.hpp"

#include <array>
#include <cstdint>

namespace ensemble::orchestrator::detail {

namespace {

constexpr std::array<step_phase, 6> k_phases = {step_phase::calling,    step_phase::backoff,
                                                step_phase::awaiting,   step_phase::waiting,
                                                step_phase::publishing, step_phase::child};

// Each reader takes a document's value and fills a typed field if the value has the expected
// type; it returns false otherwise, and the caller keeps the value in `extra`.
bool read(const json& v, std::string& out) {
  if (!v.is_string()) return false;
  out = v.get<std::string>();
  return true;
}
bool read(const json& v, std::int64_t& out) {
  if (!v.is_number_integer()) return false;
  if (v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX)) {
    return false;
  }
  out = v.get<std::int64_t>();
  return true;
}
bool read(const json& v, std::uint64_t& out) {
  // A whole number written as a float (5.0, in a state kept as JSON text) reads as that number,
  // as it did when the engine read the document itself.
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (!(d >= 0 && d < 18446744073709551616.0) ||
        d != static_cast<double>(static_cast<std::uint64_t>(d))) {
      return false;
    }
    out = static_cast<std::uint64_t>(d);
    return true;
  }
  if (!v.is_number_integer() || (!v.is_number_unsigned() && v.get<std::int64_t>() < 0)) {
    return false;
  }
  out = v.get<std::uint64_t>();
  return true;
}
bool read(const json& v, std::uint32_t& out) {
  std::uint64_t wide = 0;
  if (!read(v, wide) || wide > UINT32_MAX) return false;
  out = static_cast<std::uint32_t>(wide);
  return true;
}
bool read(const json& v, int& out) {
  std::int64_t wide = 0;
  if (!read(v, wide) || wide < INT32_MIN || wide > INT32_MAX) return false;
  out = static_cast<int>(wide);
  return true;
}
bool read(const json& v, bool& out) {
  if (!v.is_boolean()) return false;
  out = v.get<bool>();
  return true;
}
bool read(const json& v, std::vector<std::string>& out) {
  if (!v.is_array()) return false;
  std::vector<std::string> names;
  names.reserve(v.size());
  for (const auto& e : v) {
    if (!e.is_string()) return false;
    names.push_back(e.get<std::string>());
  }
  out = std::move(names);
  return true;
}
template <typename T>
bool read(const json& v, std::optional<T>& out) {
  T value{};
  if (!read(v, value)) return false;
  out = std::move(value);
  return true;
}

// A phase other than none, as a step's "phase".
bool read_step_phase(const json& v, step_phase& out) {
  if (!v.is_string()) return false;
  auto p = parse_phase(v.get_ref<const std::string&>());
  if (!p || *p == step_phase::none) return false;
  out = *p;
  return true;
}

void keep(json& extra, const std::string& key, const json& v) {
  if (!extra.is_object()) extra = json::object();
  extra[key] = v;
}

json object_with(const json& extra) {
  return extra.is_object() ? extra : json::object();
}

template <typename T>
void put(json& j, const char* key, const std::optional<T>& v) {
  if (v) j[key] = *v;
}

step_run step_from_json(const json& doc) {
  step_run s;
  if (!doc.is_object()) {
    s.extra = doc;
    return s;
  }
  for (const auto& [k, v] : doc.items()) {
    bool ok = false;
    if (k == "phase") {
      ok = read_step_phase(v, s.phase);
    } else if (k == "due_us") {
      ok = read(v, s.due_us);
    } else if (k == "key") {
      ok = read(v, s.key);
    } else if (k == "request_id") {
      ok = read(v, s.request_id);
    } else if (k == "deadline_us") {
      ok = read(v, s.deadline_us);
    } else if (k == "since_us") {
      ok = read(v, s.since_us);
    } else if (k == "since_real_us") {
      ok = read(v, s.since_real_us);
    } else if (k == "child_id") {
      ok = read(v, s.child_id);
    } else if (k == "case") {
      ok = read(v, s.chosen_case);
    } else if (k == "continued") {
      ok = read(v, s.continued);
    }
    if (!ok) keep(s.extra, k, v);
  }
  return s;
}

json to_json(const step_run& s) {
  if (!s.extra.is_null() && !s.extra.is_object()) return s.extra;  // as it was loaded
  json j = object_with(s.extra);
  if (s.phase != step_phase::none) j["phase"] = std::string(phase_name(s.phase));
  put(j, "due_us", s.due_us);
  put(j, "key", s.key);
  put(j, "request_id", s.request_id);
  put(j, "deadline_us", s.deadline_us);
  put(j, "since_us", s.since_us);
  put(j, "since_real_us", s.since_real_us);
  put(j, "child_id", s.child_id);
  put(j, "case", s.chosen_case);
  put(j, "continued", s.continued);
  return j;
}

std::optional<compensation_run> comp_from_json(const json& doc) {
  if (!doc.is_object()) return std::nullopt;
  compensation_run c;
  for (const auto& [k, v] : doc.items()) {
    bool ok = false;
    if (k == "list") {
      ok = read(v, c.list);
    } else if (k == "index") {
      std::uint64_t index = 0;
      ok = read(v, index);
      c.index = static_cast<std::size_t>(index);
    } else if (k == "phase") {
      auto p = v.is_string() ? parse_phase(v.get_ref<const std::string&>()) : std::nullopt;
      ok = p.has_value();
      if (ok) c.phase = *p;
    } else if (k == "attempt") {
      ok = read(v, c.attempt);
    } else if (k == "request_id") {
      ok = read(v, c.request_id);
    } else if (k == "event_id") {
      ok = read(v, c.event_id);
    }
    if (!ok) keep(c.extra, k, v);
  }
  return c;
}

json to_json(const compensation_run& c) {
  json j = object_with(c.extra);
  j["list"] = c.list;
  j["index"] = c.index;
  // An unknown phase that was loaded stays until the engine sets one.
  if (c.phase != step_phase::none || !j.contains("phase")) {
    j["phase"] = std::string(phase_name(c.phase));
  }
  j["attempt"] = c.attempt;
  put(j, "request_id", c.request_id);
  put(j, "event_id", c.event_id);
  return j;
}

bool read_outbox_entry(const json& doc, outbox_entry& e) {
  if (!doc.is_object()) return false;
  for (const auto& [k, v] : doc.items()) {
    bool ok = false;
    if (k == "topic") {
      ok = read(v, e.topic);
    } else if (k == "payload") {
      e.payload = v;
      ok = true;
    } else if (k == "kind") {
      ok = read(v, e.kind);
    } else if (k == "cause") {
      ok = read(v, e.cause);
    } else if (k == "step") {
      ok = read(v, e.step);
    }
    if (!ok) keep(e.extra, k, v);
  }
  return true;
}

json to_json(const outbox_entry& e) {
  json j = object_with(e.extra);
  j["topic"] = e.topic;
  j["payload"] = e.payload;
  j["kind"] = e.kind;
  j["cause"] = e.cause;
  put(j, "step", e.step);
  return j;
}

}  // namespace

std::string_view phase_name(step_phase p) {
  switch (p) {
    case step_phase::none:
      return "";
    case step_phase::calling:
      return "calling";
    case step_phase::backoff:
      return "backoff";
    case step_phase::awaiting:
      return "awaiting";
    case step_phase::waiting:
      return "waiting";
    case step_phase::publishing:
      return "publishing";
    case step_phase::child:
      return "child";
  }
  return "";
}

std::optional<step_phase> parse_phase(std::string_view name) {
  if (name.empty()) return step_phase::none;
  for (auto p : k_phases) {
    if (name == phase_name(p)) return p;
  }
  return std::nullopt;
}

void step_run::end_phase() {
  phase = step_phase::none;
  due_us.reset();
  if (extra.is_object()) {
    extra.erase("phase");
    extra.erase("due_us");
  }
}

instance_run run_from_json(const json& doc) {
  instance_run r;
  if (!doc.is_object()) return r;
  for (const auto& [k, v] : doc.items()) {
    bool ok = false;
    if (k == "trace_id") {
      ok = read(v, r.trace_id);
    } else if (k == "cause") {
      ok = read(v, r.cause);
    } else if (k == "history_seq") {
      ok = read(v, r.history_seq);
    } else if (k == "completed") {
      ok = read(v, r.completed);
    } else if (k == "outbox" && v.is_object()) {
      // Entry by entry: one that does not read is kept as it was (in extra's "outbox", which
      // to_json writes first), never taking the others with it.
      ok = true;
      for (const auto& [id, entry] : v.items()) {
        outbox_entry e;
        if (read_outbox_entry(entry, e)) {
          r.outbox.emplace(id, std::move(e));
        } else {
          if (!r.extra.is_object()) r.extra = json::object();
          r.extra["outbox"][id] = entry;
        }
      }
    } else if (k == "steps" && v.is_object()) {
      ok = true;
      for (const auto& [name, entry] : v.items()) r.steps.emplace(name, step_from_json(entry));
    } else if (k == "parent_step") {
      ok = read(v, r.parent_step);
    } else if (k == "deadline_us") {
      ok = read(v, r.deadline_us);
    } else if (k == "final") {
      auto s =
          v.is_string() ? parse_instance_status(v.get_ref<const std::string&>()) : std::nullopt;
      ok = s.has_value();
      r.final_status = s;
    } else if (k == "error") {
      r.error = v;
      ok = true;
    } else if (k == "comp") {
      r.comp = comp_from_json(v);
      ok = r.comp.has_value();
    } else if (k == "comp_failures" && v.is_array() && !v.empty()) {
      r.comp_failures.emplace(v.begin(), v.end());
      ok = true;
    } else if (k == "output") {
      r.output = v;
      ok = true;
    }
    if (!ok) keep(r.extra, k, v);
  }
  return r;
}

json lend_json(instance_run& r) {
  // Moved out here, copied by to_json, moved back after.
  std::vector<json> payloads;
  payloads.reserve(r.outbox.size());
  for (auto& [id, e] : r.outbox) payloads.push_back(std::move(e.payload));
  json output = r.output ? std::move(*r.output) : json();
  json error = r.error ? std::move(*r.error) : json();
  json doc = to_json(r);
  auto p = payloads.begin();
  json& outbox = doc["outbox"];
  for (auto& [id, e] : r.outbox) outbox[id]["payload"] = std::move(*p++);
  if (r.output) doc["output"] = std::move(output);
  if (r.error) doc["error"] = std::move(error);
  return doc;
}

void take_back(instance_run& r, json& doc) {
  if (auto out = doc.find("outbox"); out != doc.end()) {
    for (auto& [id, e] : r.outbox) {
      if (auto entry = out->find(id); entry != out->end())
        e.payload = std::move((*entry)["payload"]);
    }
  }
  if (r.output) *r.output = std::move(doc["output"]);
  if (r.error) *r.error = std::move(doc["error"]);
}

json to_json(const instance_run& r) {
  json j = object_with(r.extra);
  j["trace_id"] = r.trace_id;
  j["cause"] = r.cause;
  j["history_seq"] = r.history_seq;
  j["completed"] = r.completed;
  json& outbox = j["outbox"];  // entries that did not read (kept in extra), if any
  if (!outbox.is_object()) outbox = json::object();
  for (const auto& [id, e] : r.outbox) outbox[id] = to_json(e);
  json& steps = j["steps"] = json::object();
  for (const auto& [name, s] : r.steps) steps[name] = to_json(s);
  put(j, "parent_step", r.parent_step);
  put(j, "deadline_us", r.deadline_us);
  if (r.final_status) j["final"] = std::string(to_string(*r.final_status));
  put(j, "error", r.error);
  if (r.comp) j["comp"] = to_json(*r.comp);
  if (r.comp_failures) j["comp_failures"] = *r.comp_failures;
  put(j, "output", r.output);
  return j;
}

}  // namespace ensemble::orchestrator::detail
