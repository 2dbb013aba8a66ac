// Workflow definitions: parsing and validation of the JSON format of docs/workflows.md.
//
// Two passes over one document. The first builds the step tree and checks everything local to a
// key (types, required and unknown keys, kinds, durations, names, topics, duplicate step names).
// The second, once every step name is known, checks what depends on the whole tree: the
// expressions (syntax, roots, and that a step only uses steps that complete before it) and the
// on_error goto targets. Every error is a common::config_error whose `where` is
// "<source>: <JSON pointer>".
#include "ensemble/orchestrator/definition.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ensemble/common/config_reader.hpp"
#include "ensemble/common/protocol.hpp"
#include "ensemble/common/result.hpp"
#include "ensemble/orchestrator/expression.hpp"

namespace ensemble::orchestrator {
namespace {

using common::config_error;
using std::string_view_literals::operator""sv;

constexpr std::size_t k_max_step_name_length = 128;
constexpr std::uint32_t k_max_retry_attempts = 100;
constexpr double k_max_duration_ms = 1e13;  // about 300 years: anything above is a typo

constexpr std::array<std::string_view, 8> k_kind_names{
    "command", "publish", "await", "choreography", "parallel", "switch", "wait", "workflow"};

constexpr std::array<std::string_view, 4> k_step_fields{"output", "error", "attempts", "event"};
constexpr std::array<std::string_view, 3> k_workflow_fields{"input", "id", "name"};

// Keys every step may have, then the keys of each kind (in step_kind order).
constexpr std::array<std::string_view, 5> k_common_keys{"name", "kind", "compensate", "on_error",
                                                        "description"};
const std::array<std::vector<std::string_view>, 8> k_kind_keys{{
    {"service", "action", "input", "timeout", "retry"},                  // command
    {"topic", "payload", "retry"},                                       // publish
    {"topic", "match", "from", "timeout", "retry"},                      // await
    {"start", "until", "fail_on", "match", "from", "timeout", "retry"},  // choreography
    {"branches"},                                                        // parallel
    {"cases", "default"},                                                // switch
    {"duration"},                                                        // wait
    {"workflow", "input", "timeout", "retry"},                           // workflow
}};

// Every key a step of some kind may have: what a key is compared with when "kind" is missing.
const std::vector<std::string_view> k_all_step_keys = [] {
  std::vector<std::string_view> keys(k_common_keys.begin(), k_common_keys.end());
  for (const auto& kind_keys : k_kind_keys) {
    for (std::string_view key : kind_keys) {
      if (std::find(keys.begin(), keys.end(), key) == keys.end()) keys.push_back(key);
    }
  }
  return keys;
}();

retry_policy default_retry(step_kind kind) {
  retry_policy r;
  if (kind == step_kind::command) r.max_attempts = 3;
  return r;
}

retry_policy default_command_retry() {
  return default_retry(step_kind::command);
}

// ---------------------------------------------------------------------------------------------
// Small helpers for messages

std::string in_quotes(std::string_view s) {
  return "\"" + std::string(s) + "\"";
}

template <class List>
std::string join(const List& items, std::string_view sep = ", ") {
  std::string out;
  for (const auto& item : items) {
    if (!out.empty()) out += sep;
    out += item;
  }
  return out;
}

std::string format_duration(millis d) {
  const auto ms = d.count();
  if (ms % 3'600'000 == 0 && ms > 0) return std::to_string(ms / 3'600'000) + "h";
  if (ms % 60'000 == 0 && ms > 0) return std::to_string(ms / 60'000) + "m";
  if (ms % 1000 == 0 && ms > 0) return std::to_string(ms / 1000) + "s";
  return std::to_string(ms) + "ms";
}

bool is_step_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-';
}

// The name segments of a reference path: "steps.A[0].output" -> steps, A, output.
std::vector<std::string_view> path_names(std::string_view path) {
  std::vector<std::string_view> names;
  std::size_t start = 0;
  while (start <= path.size()) {
    std::size_t dot = path.find('.', start);
    if (dot == std::string_view::npos) dot = path.size();
    std::string_view segment = path.substr(start, dot - start);
    segment = segment.substr(0, segment.find('['));
    names.push_back(segment);
    start = dot + 1;
  }
  return names;
}

const std::string k_duration_help =
    "must be a duration such as \"250ms\", \"2s\", \"1.5s\", \"1m\", \"1h\" or a whole number of "
    "milliseconds";

// ---------------------------------------------------------------------------------------------
// Where an expression is, and what it may refer to.

struct scope {
  bool allow_event = false;    // await/choreography match, triggers
  bool allow_workflow = true;  // false in triggers: no instance exists yet
  bool allow_steps = true;
  bool any_step = false;  // the workflow output: every step has finished
  const std::vector<std::string_view>* visible = nullptr;  // steps complete before this point
  std::string_view self;                                   // the step the expression belongs to
};

class parser {
 public:
  explicit parser(common::config_reader& r) : r_(r) {}

  // Whatever could be read; every problem is in the reader.
  definition parse(const json& doc) {
    definition def;
    def.source = r_.file();
    def.raw = doc;
    r_.attempt([&] { parse_document(doc, def); });
    return def;
  }

 private:
  [[noreturn]] void fail(const std::string& ptr, const std::string& what) const {
    r_.fail(ptr, what);
  }
  void report(const std::string& ptr, const std::string& what) const { r_.report(ptr, what); }
  template <class F>
  bool attempt(F&& f) const {
    return r_.attempt(std::forward<F>(f));
  }
  std::string child(const std::string& ptr, std::string_view key) const {
    return r_.child(ptr, key);
  }
  std::string child(const std::string& ptr, std::size_t index) const {
    return r_.child(ptr, index);
  }
  std::string got(const json& v) const { return r_.got(v); }
  const json& require(const json& obj, const std::string& ptr, std::string_view key,
                      std::string_view why) const {
    return r_.require(obj, ptr, key, why);
  }
  std::string string_at(const json& v, const std::string& ptr) const {
    return r_.string_at(v, ptr);
  }
  void check_keys(const json& obj, const std::string& ptr,
                  const std::vector<std::string_view>& allowed, std::string_view what,
                  const std::map<std::string_view, std::string_view>& hints = {}) const {
    r_.check_keys(obj, ptr, allowed, what, hints);
  }
  template <class F>
  bool optional_key(const json& obj, const std::string& ptr, std::string_view key, F&& f) const {
    return r_.with_key(obj, ptr, key, std::forward<F>(f));
  }

  void parse_document(const json& doc, definition& def) {
    if (!doc.is_object()) {
      fail("",
           "a workflow definition must be a JSON object of the form {\"workflow\": {\"name\": "
           "..., \"steps\": [...]}}, got " +
               got(doc));
    }
    check_keys(doc, "", {"workflow"}, "the document");
    const json& w = require(doc, "", "workflow",
                            "a definition has the form {\"workflow\": {\"name\": ..., \"steps\": "
                            "[...]}}");
    const std::string ptr = "/workflow";
    if (!w.is_object()) fail(ptr, "must be an object, got " + got(w));
    check_keys(w, ptr, {"name", "version", "steps", "output", "timeout", "triggers", "description"},
               "the workflow");

    attempt([&] {
      def.name =
          workflow_name(require(w, ptr, "name", "every workflow needs a name"), child(ptr, "name"));
    });
    optional_key(w, ptr, "version", [&](const json& v, const std::string& at) {
      if (!v.is_number_integer() || v.get<std::int64_t>() < 1 ||
          v.get<std::int64_t>() > std::numeric_limits<std::uint32_t>::max()) {
        fail(at, "must be an integer ≥ 1, got " + got(v));
      }
      def.version = v.get<std::uint32_t>();
    });
    attempt([&] {
      def.steps = parse_sequence(require(w, ptr, "steps", "a workflow needs at least one step"),
                                 child(ptr, "steps"));
    });
    if (w.contains("output") && !w["output"].is_null()) def.output = w["output"];
    optional_key(w, ptr, "timeout", [&](const json& v, const std::string& at) {
      def.timeout = duration(v, at, true);
    });
    optional_key(w, ptr, "triggers", [&](const json& v, const std::string& at) {
      def.triggers = parse_triggers(v, at);
    });
    optional_key(w, ptr, "description", [&](const json& v, const std::string& at) {
      if (!v.is_string()) fail(at, "must be a string, got " + got(v));
    });

    // Second pass: expressions and jumps, now that every step is known.
    std::vector<std::string_view> visible;
    check_sequence(def.steps, visible);
    if (def.output) {
      scope sc;
      sc.any_step = true;
      check_template_at(*def.output, child(ptr, "output"), sc);
    }
    for (std::size_t i = 0; i < def.triggers.size(); ++i) {
      const std::string tptr = child(child(ptr, "triggers"), i);
      scope sc;
      sc.allow_event = true;
      sc.allow_workflow = false;
      sc.allow_steps = false;
      if (!def.triggers[i].match.empty()) {
        check_condition_at(def.triggers[i].match, child(tptr, "match"), sc);
      }
      if (def.triggers[i].input)
        check_template_at(*def.triggers[i].input, child(tptr, "input"), sc);
    }
  }

  // ---- values --------------------------------------------------------------------------------

  std::string workflow_name(const json& v, const std::string& ptr) const {
    std::string name = string_at(v, ptr);
    if (name.empty() || name.size() > k_max_step_name_length ||
        !std::all_of(name.begin(), name.end(), is_step_name_char)) {
      report(ptr, "workflow name " + in_quotes(name) +
                      " must be 1 to 128 characters from [A-Za-z0-9_-] (it is part of the "
                      "lifecycle topics workflow.<name>.started, ...)");
    }
    return name;
  }

  std::string service_name(const json& v, const std::string& ptr, std::string_view what) const {
    std::string name = string_at(v, ptr);
    if (std::string problem = common::check_name(what, name); !problem.empty()) {
      report(ptr, problem);
    }
    return name;
  }

  std::string topic(const json& v, const std::string& ptr) const {
    std::string t = string_at(v, ptr);
    if (std::string problem = common::check_topic(t); !problem.empty()) report(ptr, problem);
    return t;
  }

  std::vector<std::string> topic_list(const json& v, const std::string& ptr) const {
    if (!v.is_array() || v.empty()) {
      fail(ptr, "must be a non-empty array of topics, got " + got(v));
    }
    std::vector<std::string> topics;
    for (std::size_t i = 0; i < v.size(); ++i) {
      attempt([&] {
        std::string t = topic(v[i], child(ptr, i));
        if (std::find(topics.begin(), topics.end(), t) != topics.end()) {
          fail(child(ptr, i), "topic " + in_quotes(t) + " is listed twice");
        }
        topics.push_back(std::move(t));
      });
    }
    return topics;
  }

  // "from": agent names (identities in secured mode), as the broker writes them in `publisher`.
  std::vector<std::string> publisher_list(const json& v, const std::string& ptr) const {
    if (!v.is_array() || v.empty()) {
      fail(ptr,
           "must be a non-empty array of publisher names (agent names, or identities in secured "
           "mode), e.g. [\"shipping\"], got " +
               got(v));
    }
    std::vector<std::string> names;
    for (std::size_t i = 0; i < v.size(); ++i) {
      attempt([&] {
        std::string name = string_at(v[i], child(ptr, i));
        if (std::string problem = common::check_name("publisher name", name); !problem.empty()) {
          fail(child(ptr, i), problem);
        }
        if (std::find(names.begin(), names.end(), name) != names.end()) {
          fail(child(ptr, i), "publisher " + in_quotes(name) + " is listed twice");
        }
        names.push_back(std::move(name));
      });
    }
    return names;
  }

  millis duration(const json& v, const std::string& ptr, bool positive) const {
    const auto d = parse_duration(v);
    if (!d) fail(ptr, k_duration_help + ", got " + got(v));
    if (positive && d->count() <= 0) fail(ptr, "must be a duration greater than 0, got " + got(v));
    return *d;
  }

  std::string condition_at(const json& v, const std::string& ptr) const {
    std::string text = string_at(v, ptr);
    if (text.find_first_not_of(" \t\r\n") == std::string::npos) {
      fail(ptr,
           "must be a condition such as \"${event.payload.orderId} == "
           "${workflow.input.orderId}\", got an empty string");
    }
    return text;
  }

  // ---- steps ---------------------------------------------------------------------------------

  sequence parse_sequence(const json& v, const std::string& ptr) {
    if (!v.is_array() || v.empty()) fail(ptr, "must be a non-empty array of steps, got " + got(v));
    sequence seq;
    seq.reserve(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) seq.push_back(parse_step(v[i], child(ptr, i)));
    return seq;
  }

  // Always returns the step, with what could be read of it: so that the steps after it do not
  // also report references to it.
  step parse_step(const json& j, const std::string& ptr) {
    step s;
    s.path = ptr;
    attempt([&] { read_step(j, ptr, s); });
    return s;
  }

  void read_step(const json& j, const std::string& ptr, step& s) {
    if (!j.is_object()) fail(ptr, "a step must be a JSON object, got " + got(j));
    attempt([&] { s.name = step_name(j, ptr); });

    const auto kind = kind_of(j, ptr);
    if (!kind) return;
    s.kind = *kind;
    const auto k = static_cast<std::size_t>(s.kind);
    std::vector<std::string_view> allowed(k_common_keys.begin(), k_common_keys.end());
    allowed.insert(allowed.begin() + 2, k_kind_keys[k].begin(), k_kind_keys[k].end());
    std::map<std::string_view, std::string_view> hints;
    if (s.kind == step_kind::parallel || s.kind == step_kind::switch_) {
      hints = {{"timeout", "give the steps inside it their own timeout"},
               {"retry", "give the steps inside it their own retry"}};
    } else if (s.kind == step_kind::wait) {
      hints = {{"timeout", "a wait lasts its \"duration\""}, {"retry", "a wait cannot fail"}};
    } else if (s.kind == step_kind::publish) {
      hints = {{"timeout", "publishing does not wait for anyone; use an await step"}};
    }
    if (s.kind != step_kind::await && s.kind != step_kind::choreography) {
      hints.emplace("from",
                    "only await and choreography steps take \"from\": the publishers whose "
                    "events may complete them");
    }
    check_keys(j, ptr, allowed,
               "a" + std::string(s.kind == step_kind::await ? "n " : " ") +
                   std::string(to_string(s.kind)) + " step",
               hints);

    s.retry = default_retry(s.kind);
    switch (s.kind) {
      case step_kind::command: {
        const std::string why = "a command step needs a service and an action";
        attempt([&] {
          s.service =
              service_name(require(j, ptr, "service", why), child(ptr, "service"), "service");
        });
        attempt([&] {
          s.action = service_name(require(j, ptr, "action", why), child(ptr, "action"), "action");
        });
        if (j.contains("input")) s.input = j["input"];
        break;
      }
      case step_kind::publish:
        attempt([&] {
          s.event.topic =
              topic(require(j, ptr, "topic", "a publish step needs the topic of its event"),
                    child(ptr, "topic"));
        });
        if (j.contains("payload")) s.event.payload = j["payload"];
        break;
      case step_kind::await:
        attempt([&] {
          s.until.push_back(
              topic(require(j, ptr, "topic", "an await step needs the topic to wait for"),
                    child(ptr, "topic")));
        });
        optional_key(j, ptr, "match",
                     [&](const json& v, const std::string& at) { s.match = condition_at(v, at); });
        optional_key(j, ptr, "from",
                     [&](const json& v, const std::string& at) { s.from = publisher_list(v, at); });
        attempt([&] {
          require(j, ptr, "timeout",
                  "an await step must say how long to wait, e.g. \"timeout\": \"30s\"");
        });
        break;
      case step_kind::choreography:
        parse_choreography(j, ptr, s);
        break;
      case step_kind::parallel:
        attempt([&] {
          const json& b = require(j, ptr, "branches", "a parallel step needs its branches");
          const std::string bptr = child(ptr, "branches");
          if (!b.is_array() || b.empty()) {
            fail(bptr,
                 "must be a non-empty array of branches, each a non-empty array of steps, got " +
                     got(b));
          }
          for (std::size_t i = 0; i < b.size(); ++i) {
            s.branches.emplace_back();
            attempt([&] { s.branches.back() = parse_sequence(b[i], child(bptr, i)); });
          }
        });
        break;
      case step_kind::switch_:
        parse_switch(j, ptr, s);
        break;
      case step_kind::wait:
        attempt([&] {
          s.duration =
              duration(require(j, ptr, "duration", "a wait step needs a duration, e.g. \"5s\""),
                       child(ptr, "duration"), true);
        });
        break;
      case step_kind::workflow:
        attempt([&] {
          s.workflow = workflow_name(require(j, ptr, "workflow",
                                             "a workflow step needs the name of the workflow to "
                                             "start"),
                                     child(ptr, "workflow"));
        });
        if (j.contains("input")) s.input = j["input"];
        break;
    }

    optional_key(j, ptr, "timeout",
                 [&](const json& v, const std::string& at) { s.timeout = duration(v, at, true); });
    optional_key(j, ptr, "retry", [&](const json& v, const std::string& at) {
      s.retry = parse_retry(v, at, s.retry);
    });
    optional_key(j, ptr, "compensate", [&](const json& v, const std::string& at) {
      s.compensate = parse_compensation(v, at);
    });
    optional_key(j, ptr, "on_error",
                 [&](const json& v, const std::string& at) { s.on_error = parse_on_error(v, at); });
    optional_key(j, ptr, "description", [&](const json& v, const std::string& at) {
      if (!v.is_string()) fail(at, "must be a string, got " + got(v));
    });
  }

  std::string step_name(const json& j, const std::string& ptr) {
    const std::string nptr = child(ptr, "name");
    std::string name = string_at(require(j, ptr, "name", "every step needs a name"), nptr);
    if (name.empty() || name.size() > k_max_step_name_length ||
        !std::all_of(name.begin(), name.end(), is_step_name_char)) {
      report(nptr, "step name " + in_quotes(name) +
                       " must be 1 to 128 characters from [A-Za-z0-9_-], so that "
                       "${steps.<name>...} can refer to it");
    }
    if (const auto it = step_paths_.find(name); it != step_paths_.end()) {
      report(nptr, "duplicate step name " + in_quotes(name) + ": the step at " + it->second +
                       " has it too (step names must be unique in the whole workflow, nested "
                       "steps included)");
    } else {
      step_paths_.emplace(name, ptr);
    }
    return name;
  }

  // The step's kind, or nullopt (reported) when it cannot be known.
  std::optional<step_kind> kind_of(const json& j, const std::string& ptr) const {
    const std::vector<std::string_view> kinds(k_kind_names.begin(), k_kind_names.end());
    if (!j.contains("kind")) {
      if (j.contains("service")) return step_kind::command;
      // Without a kind the allowed keys are unknown; a key close to a known one is likelier the
      // problem than the missing kind ("servce": a command whose "service" is misspelt).
      bool typo = false;
      for (const auto& [key, value] : j.items()) {
        if (std::find(k_all_step_keys.begin(), k_all_step_keys.end(), key) !=
            k_all_step_keys.end()) {
          continue;
        }
        if (const auto best = common::closest_word(key, k_all_step_keys)) {
          typo = true;
          report(child(ptr, key),
                 "unknown key " + in_quotes(key) + " in a step (did you mean " + in_quotes(*best) +
                     "?); a step without \"kind\" is a command, and needs \"service\" and "
                     "\"action\"");
        }
      }
      if (!typo) {
        report(ptr, "missing required key \"kind\" (one of " + join(kinds) +
                        "); only a step with \"service\" and \"action\" may leave it out, and is "
                        "then a command");
      }
      return std::nullopt;
    }
    const std::string kind = string_at(j["kind"], child(ptr, "kind"));
    for (std::size_t i = 0; i < k_kind_names.size(); ++i) {
      if (kind == k_kind_names[i]) return static_cast<step_kind>(i);
    }
    std::string hint;
    if (const auto best = common::closest_word(kind, kinds)) {
      hint = " (did you mean " + in_quotes(*best) + "?)";
    }
    report(child(ptr, "kind"),
           "unknown step kind " + in_quotes(kind) + hint + "; valid kinds: " + join(kinds));
    return std::nullopt;
  }

  void parse_choreography(const json& j, const std::string& ptr, step& s) {
    const std::string why =
        "a choreography step publishes a start event and waits for one of the "
        "\"until\" or \"fail_on\" topics";
    attempt([&] { s.event = parse_event(require(j, ptr, "start", why), child(ptr, "start")); });
    attempt([&] { s.until = topic_list(require(j, ptr, "until", why), child(ptr, "until")); });
    optional_key(j, ptr, "fail_on",
                 [&](const json& v, const std::string& at) { s.fail_on = topic_list(v, at); });
    for (std::size_t i = 0; i < s.until.size(); ++i) {
      if (s.until[i] == s.event.topic) {
        report(child(child(ptr, "until"), i),
               "topic " + in_quotes(s.until[i]) +
                   " is also the start topic: the start event itself would end the step");
      }
      if (std::find(s.fail_on.begin(), s.fail_on.end(), s.until[i]) != s.fail_on.end()) {
        report(child(child(ptr, "until"), i),
               "topic " + in_quotes(s.until[i]) + " is in both \"until\" and \"fail_on\"");
      }
    }
    for (std::size_t i = 0; i < s.fail_on.size(); ++i) {
      if (s.fail_on[i] == s.event.topic) {
        report(child(child(ptr, "fail_on"), i),
               "topic " + in_quotes(s.fail_on[i]) +
                   " is also the start topic: the start event itself would fail the step");
      }
    }
    optional_key(j, ptr, "match",
                 [&](const json& v, const std::string& at) { s.match = condition_at(v, at); });
    optional_key(j, ptr, "from",
                 [&](const json& v, const std::string& at) { s.from = publisher_list(v, at); });
    attempt([&] {
      require(j, ptr, "timeout",
              "a choreography step must say how long to wait for its outcome, e.g. "
              "\"timeout\": \"30s\"");
    });
  }

  event_spec parse_event(const json& v, const std::string& ptr) const {
    if (!v.is_object())
      fail(ptr, "must be an object {\"topic\": ..., \"payload\": ...}, got " + got(v));
    check_keys(v, ptr, {"topic", "payload"}, "an event");
    event_spec e;
    e.topic = topic(require(v, ptr, "topic", "an event needs a topic"), child(ptr, "topic"));
    if (v.contains("payload")) e.payload = v["payload"];
    return e;
  }

  void parse_switch(const json& j, const std::string& ptr, step& s) {
    attempt([&] {
      const json& cases = require(j, ptr, "cases", "a switch step needs its cases");
      const std::string cptr = child(ptr, "cases");
      if (!cases.is_array() || cases.empty()) {
        fail(cptr, "must be a non-empty array of {\"when\": condition, \"steps\": [...]}, got " +
                       got(cases));
      }
      for (std::size_t i = 0; i < cases.size(); ++i) {
        s.cases.emplace_back();
        attempt([&] { parse_case(cases[i], child(cptr, i), s.cases.back()); });
      }
    });
    optional_key(j, ptr, "default", [&](const json& d, const std::string& at) {
      if (!d.is_array() || d.empty()) {
        fail(at, "must be a non-empty array of steps (leave \"default\" out to do nothing), got " +
                     got(d));
      }
      s.default_steps = parse_sequence(d, at);
    });
  }

  void parse_case(const json& c, const std::string& ptr, switch_case& sc) {
    if (!c.is_object()) {
      fail(ptr, "a case must be an object {\"when\": condition, \"steps\": [...]}, got " + got(c));
    }
    check_keys(c, ptr, {"when", "steps"}, "a switch case");
    attempt([&] {
      sc.when =
          condition_at(require(c, ptr, "when", "a case needs its condition"), child(ptr, "when"));
    });
    sc.steps = parse_sequence(require(c, ptr, "steps", "a case needs the steps it runs"),
                              child(ptr, "steps"));
  }

  retry_policy parse_retry(const json& v, const std::string& ptr, retry_policy r) const {
    if (!v.is_object()) fail(ptr, "must be an object such as {\"max_attempts\": 3}, got " + got(v));
    check_keys(v, ptr,
               {"max_attempts", "initial_interval", "backoff", "max_interval", "non_retryable"},
               "retry");
    optional_key(v, ptr, "max_attempts", [&](const json& m, const std::string& at) {
      r.max_attempts = static_cast<std::uint32_t>(r_.integer_at(m, at, 1, k_max_retry_attempts));
    });
    const bool initial_ok = optional_key(
        v, ptr, "initial_interval",
        [&](const json& d, const std::string& at) { r.initial_interval = duration(d, at, false); });
    optional_key(v, ptr, "backoff", [&](const json& b, const std::string& at) {
      if (!b.is_number() || !(b.get<double>() >= 1.0) || !std::isfinite(b.get<double>())) {
        fail(at, "must be a number ≥ 1.0, got " + got(b));
      }
      r.backoff = b.get<double>();
    });
    const bool max_ok = optional_key(
        v, ptr, "max_interval",
        [&](const json& d, const std::string& at) { r.max_interval = duration(d, at, true); });
    if (initial_ok && max_ok && r.max_interval < r.initial_interval) {
      report(child(ptr, v.contains("max_interval") ? "max_interval" : "initial_interval"),
             "max_interval (" + format_duration(r.max_interval) +
                 ") is shorter than initial_interval (" + format_duration(r.initial_interval) +
                 ")");
    }
    optional_key(v, ptr, "non_retryable", [&](const json& n, const std::string& at) {
      if (!n.is_array()) fail(at, "must be an array of error codes, got " + got(n));
      r.non_retryable.clear();
      for (std::size_t i = 0; i < n.size(); ++i) {
        attempt([&] {
          std::string code = string_at(n[i], child(at, i));
          if (code.empty()) fail(child(at, i), "an error code cannot be empty");
          r.non_retryable.push_back(std::move(code));
        });
      }
    });
    return r;
  }

  compensation parse_compensation(const json& v, const std::string& ptr) const {
    const std::string shape =
        "{\"service\": ..., \"action\": ..., \"input\"?: ...} to call a command, or {\"publish\": "
        "{\"topic\": ..., \"payload\"?: ...}} to emit an event";
    if (!v.is_object()) fail(ptr, "must be " + shape + ", got " + got(v));
    compensation c;
    c.path = ptr;
    if (v.contains("publish")) {
      check_keys(v, ptr, {"publish"}, "a compensating event");
      c.what = compensation::kind::event;
      c.event = parse_event(v["publish"], child(ptr, "publish"));
      return c;
    }
    check_keys(v, ptr, {"service", "action", "input", "timeout", "retry"},
               "a compensating command");
    if (!v.contains("service") && !v.contains("action")) fail(ptr, "must be " + shape);
    const std::string why = "a compensating command needs a service and an action";
    c.what = compensation::kind::command;
    attempt([&] {
      c.service = service_name(require(v, ptr, "service", why), child(ptr, "service"), "service");
    });
    attempt([&] {
      c.action = service_name(require(v, ptr, "action", why), child(ptr, "action"), "action");
    });
    if (v.contains("input")) c.input = v["input"];
    optional_key(v, ptr, "timeout",
                 [&](const json& d, const std::string& at) { c.timeout = duration(d, at, true); });
    c.retry = default_command_retry();
    optional_key(v, ptr, "retry", [&](const json& rv, const std::string& at) {
      c.retry = parse_retry(rv, at, c.retry);
    });
    return c;
  }

  on_error_policy parse_on_error(const json& v, const std::string& ptr) const {
    on_error_policy p;
    const std::string shape =
        "must be \"fail\", \"continue\" or {\"goto\": \"<name of a later step in the same "
        "sequence>\"}";
    if (v.is_string()) {
      if (v == "fail") return p;
      if (v == "continue") {
        p.what = on_error_policy::kind::continue_;
        return p;
      }
      fail(ptr, shape + ", got " + got(v));
    }
    if (!v.is_object()) fail(ptr, shape + ", got " + got(v));
    check_keys(v, ptr, {"goto"}, "on_error");
    p.target = string_at(require(v, ptr, "goto", shape), child(ptr, "goto"));
    p.what = on_error_policy::kind::go_to;
    return p;
  }

  std::vector<trigger> parse_triggers(const json& v, const std::string& ptr) const {
    if (!v.is_array())
      fail(ptr,
           "must be an array of {\"topic\": ..., \"match\"?: ..., \"input\"?: ...}, got " + got(v));
    std::vector<trigger> triggers;
    for (std::size_t i = 0; i < v.size(); ++i) {
      attempt([&] { triggers.push_back(parse_trigger(v[i], child(ptr, i))); });
    }
    return triggers;
  }

  trigger parse_trigger(const json& t, const std::string& ptr) const {
    if (!t.is_object()) {
      fail(ptr,
           "a trigger must be an object {\"topic\": ..., \"match\"?: ..., \"input\"?: ...}, got " +
               got(t));
    }
    check_keys(t, ptr, {"topic", "match", "input"}, "a trigger");
    trigger tr;
    attempt([&] {
      tr.topic = topic(
          require(t, ptr, "topic", "a trigger starts an instance for each event on its topic"),
          child(ptr, "topic"));
    });
    optional_key(t, ptr, "match",
                 [&](const json& m, const std::string& at) { tr.match = condition_at(m, at); });
    if (t.contains("input")) tr.input = t["input"];
    return tr;
  }

  // ---- second pass ---------------------------------------------------------------------------

  static void collect_names(const step& s, std::vector<std::string_view>& out) {
    out.push_back(s.name);
    for (const auto& branch : s.branches) {
      for (const auto& inner : branch) collect_names(inner, out);
    }
    for (const auto& c : s.cases) {
      for (const auto& inner : c.steps) collect_names(inner, out);
    }
    for (const auto& inner : s.default_steps) collect_names(inner, out);
  }

  // `visible` holds the steps that complete before the sequence starts; restored on return.
  void check_sequence(const sequence& seq, std::vector<std::string_view>& visible) {
    const std::size_t restore = visible.size();
    for (std::size_t i = 0; i < seq.size(); ++i) {
      const step& s = seq[i];
      check_step(s, visible);
      if (s.on_error.what == on_error_policy::kind::go_to) attempt([&] { check_goto(seq, i); });
      collect_names(s, visible);
    }
    visible.resize(restore);
  }

  void check_step(const step& s, std::vector<std::string_view>& visible) {
    scope sc;
    sc.visible = &visible;
    sc.self = s.name;
    scope match_scope = sc;
    match_scope.allow_event = true;
    switch (s.kind) {
      case step_kind::command:
      case step_kind::workflow:
        if (s.input) check_template_at(*s.input, child(s.path, "input"), sc);
        break;
      case step_kind::publish:
        if (!s.event.payload.is_null())
          check_template_at(s.event.payload, child(s.path, "payload"), sc);
        break;
      case step_kind::await:
        if (!s.match.empty()) check_condition_at(s.match, child(s.path, "match"), match_scope);
        break;
      case step_kind::choreography:
        if (!s.event.payload.is_null()) {
          check_template_at(s.event.payload, child(child(s.path, "start"), "payload"), sc);
        }
        if (!s.match.empty()) check_condition_at(s.match, child(s.path, "match"), match_scope);
        break;
      case step_kind::parallel:
        for (std::size_t b = 0; b < s.branches.size(); ++b) check_sequence(s.branches[b], visible);
        break;
      case step_kind::switch_:
        for (std::size_t c = 0; c < s.cases.size(); ++c) {
          const std::string cptr = child(child(s.path, "cases"), c);
          check_condition_at(s.cases[c].when, child(cptr, "when"), sc);
          check_sequence(s.cases[c].steps, visible);
        }
        check_sequence(s.default_steps, visible);
        break;
      case step_kind::wait:
        break;
    }
    if (s.compensate) {
      // A compensation runs after its step completed: it may use the step itself.
      const std::size_t restore = visible.size();
      collect_names(s, visible);
      scope csc;
      csc.visible = &visible;
      const compensation& c = *s.compensate;
      if (c.what == compensation::kind::command && c.input) {
        check_template_at(*c.input, child(c.path, "input"), csc);
      } else if (c.what == compensation::kind::event && !c.event.payload.is_null()) {
        check_template_at(c.event.payload, child(child(c.path, "publish"), "payload"), csc);
      }
      visible.resize(restore);
    }
  }

  void check_goto(const sequence& seq, std::size_t index) const {
    const step& s = seq[index];
    const std::string ptr = child(child(s.path, "on_error"), "goto");
    const std::string& target = s.on_error.target;
    const std::string rule =
        "on_error goto may only jump forward, to a later step of the same sequence (so that a "
        "workflow cannot loop)";
    if (target == s.name) fail(ptr, "a step cannot go to itself; " + rule);
    for (std::size_t i = 0; i < seq.size(); ++i) {
      if (seq[i].name != target) continue;
      if (i > index) return;
      fail(ptr, "step " + in_quotes(target) + " (at " + seq[i].path + ") comes before this step; " +
                    rule);
    }
    const auto it = step_paths_.find(target);
    if (it == step_paths_.end())
      fail(ptr, "no step named " + in_quotes(target) + " in this workflow; " + rule);
    fail(ptr, "step " + in_quotes(target) + " (at " + it->second +
                  ") is not in the same sequence as this step; " + rule);
  }

  // Checks every string of a template, so that an error points at the exact member.
  void check_template_at(const json& tmpl, const std::string& ptr, const scope& sc) const {
    if (tmpl.is_object()) {
      for (const auto& [key, value] : tmpl.items()) check_template_at(value, child(ptr, key), sc);
    } else if (tmpl.is_array()) {
      for (std::size_t i = 0; i < tmpl.size(); ++i) check_template_at(tmpl[i], child(ptr, i), sc);
    } else if (tmpl.is_string()) {
      attempt([&] {
        const expression_check c = check_template(tmpl);
        if (!c.problem.empty()) fail(ptr, "invalid expression " + c.problem);
        check_references(c, ptr, sc);
      });
    }
  }

  void check_condition_at(const std::string& condition, const std::string& ptr,
                          const scope& sc) const {
    attempt([&] {
      const expression_check c = check_condition(condition);
      if (!c.problem.empty()) {
        fail(ptr, "invalid condition " + in_quotes(condition) + ": " + c.problem);
      }
      check_references(c, ptr, sc);
    });
  }

  void check_references(const expression_check& c, const std::string& ptr, const scope& sc) const {
    for (const std::string& path : c.paths) {
      const std::vector<std::string_view> names = path_names(path);
      const std::string ref = "${" + path + "}";
      const std::string_view root = names[0];
      std::vector<std::string> roots;
      if (sc.allow_workflow) roots.emplace_back("workflow");
      if (sc.allow_steps) roots.emplace_back("steps");
      if (sc.allow_event) roots.emplace_back("event");
      const bool known = root == "workflow" || root == "steps" || root == "event";
      if (!known) {
        fail(ptr, "unknown root " + in_quotes(root) + " in " + ref + "; a reference starts with " +
                      join(roots, " or "));
      }
      if (root == "event" && !sc.allow_event) {
        fail(ptr, ref +
                      ": ${event...} is only available in the \"match\" of an await or "
                      "choreography step and in a trigger's \"match\" and \"input\"");
      }
      if (root != "event" && (root == "workflow" ? !sc.allow_workflow : !sc.allow_steps)) {
        fail(ptr, ref +
                      ": a trigger runs before the instance exists, so only ${event...} is "
                      "available here");
      }
      if (root == "workflow" && names.size() > 1 &&
          std::find(k_workflow_fields.begin(), k_workflow_fields.end(), names[1]) ==
              k_workflow_fields.end()) {
        fail(ptr, ref + ": workflow has no field " + in_quotes(names[1]) +
                      "; use workflow.input, workflow.id or workflow.name");
      }
      if (root == "steps" && names.size() > 1) check_step_reference(names, ref, ptr, sc);
    }
  }

  void check_step_reference(const std::vector<std::string_view>& names, const std::string& ref,
                            const std::string& ptr, const scope& sc) const {
    const std::string_view name = names[1];
    const auto it = step_paths_.find(name);
    if (it == step_paths_.end()) {
      fail(ptr, ref + " refers to step " + in_quotes(name) + ", which does not exist");
    }
    if (names.size() > 2 &&
        std::find(k_step_fields.begin(), k_step_fields.end(), names[2]) == k_step_fields.end()) {
      fail(ptr, ref + ": a step has no field " + in_quotes(names[2]) +
                    "; use steps.<name>.output, .error, .attempts or .event");
    }
    if (sc.any_step) return;
    if (name == sc.self) {
      fail(ptr, ref + " refers to the step itself, whose result does not exist yet");
    }
    if (std::find(sc.visible->begin(), sc.visible->end(), name) == sc.visible->end()) {
      fail(ptr, ref + " refers to step " + in_quotes(name) + " (at " + it->second +
                    "), which does not complete before this step; a step may only use the steps "
                    "before it in its own sequence and in the sequences that contain it, not later "
                    "steps or steps of another parallel branch");
    }
  }

  common::config_reader& r_;
  std::map<std::string, std::string, std::less<>> step_paths_;  // step name -> its JSON pointer
};

void walk_steps(const sequence& seq, const std::function<void(const step&)>& visit) {
  for (const step& s : seq) {
    visit(s);
    for (const auto& branch : s.branches) walk_steps(branch, visit);
    for (const auto& c : s.cases) walk_steps(c.steps, visit);
    walk_steps(s.default_steps, visit);
  }
}

std::string read_file(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    throw config_error(path, "is a directory, not a workflow file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw config_error(path, std::string("cannot open: ") + std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) throw config_error(path, std::string("cannot read: ") + std::strerror(errno));
  return std::move(buffer).str();
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::string_view to_string(step_kind k) {
  const auto i = static_cast<std::size_t>(k);
  return i < k_kind_names.size() ? k_kind_names[i] : "unknown"sv;
}

millis retry_policy::delay_after(std::uint32_t failed_attempt) const {
  const double exponent = failed_attempt <= 1 ? 0.0 : static_cast<double>(failed_attempt - 1);
  const double cap = static_cast<double>(max_interval.count());
  double delay = static_cast<double>(initial_interval.count()) * std::pow(backoff, exponent);
  if (!(delay <= cap)) delay = cap;  // also catches inf and nan
  return millis(static_cast<millis::rep>(std::llround(delay)));
}

bool retry_policy::allows(std::string_view code, bool retryable) const {
  if (std::find(non_retryable.begin(), non_retryable.end(), code) != non_retryable.end()) {
    return false;
  }
  return retryable || common::error::retryable_by_default(code);
}

const step* definition::find(std::string_view step_name) const {
  const step* found = nullptr;
  walk_steps(steps, [&](const step& s) {
    if (!found && s.name == step_name) found = &s;
  });
  return found;
}

std::vector<std::string> definition::listened_topics() const {
  std::vector<std::string> topics;
  auto add = [&](const std::string& t) {
    if (std::find(topics.begin(), topics.end(), t) == topics.end()) topics.push_back(t);
  };
  walk_steps(steps, [&](const step& s) {
    if (s.kind != step_kind::await && s.kind != step_kind::choreography) return;
    for (const auto& t : s.until) add(t);
    for (const auto& t : s.fail_on) add(t);
  });
  for (const auto& t : triggers) add(t.topic);
  return topics;
}

std::vector<std::string> definition::sub_workflows() const {
  std::vector<std::string> names;
  walk_steps(steps, [&](const step& s) {
    if (s.kind == step_kind::workflow &&
        std::find(names.begin(), names.end(), s.workflow) == names.end()) {
      names.push_back(s.workflow);
    }
  });
  return names;
}

definition parse_definition(const json& doc, const std::string& source) {
  common::config_reader r(source, common::path_style::json_pointer);
  definition def = parser(r).parse(doc);
  r.throw_if_any();
  return def;
}

namespace {

// Reads and parses a file, collecting its problems in `problems` (JSON syntax errors name the
// file, line and column); the definition is whatever could be read.
definition read_definition_file(const std::string& path,
                                std::vector<common::diagnostic>& problems) {
  std::string text;
  try {
    text = read_file(path);
  } catch (const config_error& e) {
    problems = common::diagnostics_of(e);
    return {};
  }
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::parse_error& e) {
    // e.byte is the 1-based offset of the last character read: turn it into line:column.
    const std::size_t offset = std::min<std::size_t>(e.byte == 0 ? 0 : e.byte - 1, text.size());
    std::size_t line = 1;
    std::size_t line_start = 0;
    for (std::size_t i = 0; i < offset; ++i) {
      if (text[i] == '\n') {
        ++line;
        line_start = i + 1;
      }
    }
    const std::size_t column = offset - line_start + 1;
    std::string detail = e.what();
    if (const auto at = detail.find("parse error"); at != std::string::npos) {
      if (const auto colon = detail.find(": ", at); colon != std::string::npos) {
        detail = detail.substr(colon + 2);
      }
    }
    problems.push_back({path + ":" + std::to_string(line) + ":" + std::to_string(column),
                        "invalid JSON: " + detail});
    return {};
  }
  common::config_reader r(path, common::path_style::json_pointer, common::json_positions(text));
  definition def = parser(r).parse(doc);
  problems = r.diagnostics();
  return def;
}

// The files of `paths`: files as given, directories' *.json files in name order.
std::vector<std::string> expand_paths(const std::vector<std::string>& paths,
                                      std::vector<common::diagnostic>* problems) {
  namespace fs = std::filesystem;
  std::vector<std::string> files;
  for (const std::string& path : paths) {
    std::error_code ec;
    const auto status = fs::status(path, ec);
    if (ec || !fs::exists(status)) {
      if (!problems) throw config_error(path, "no such file or directory");
      problems->push_back({path, "no such file or directory"});
      continue;
    }
    if (!fs::is_directory(status)) {
      files.push_back(path);
      continue;
    }
    std::vector<std::string> in_dir;
    for (const auto& entry : fs::directory_iterator(path, ec)) {
      std::error_code file_ec;
      if (entry.path().extension() == ".json" && entry.is_regular_file(file_ec)) {
        in_dir.push_back(entry.path().string());
      }
    }
    if (ec) {
      if (!problems) throw config_error(path, "cannot list the directory: " + ec.message());
      problems->push_back({path, "cannot list the directory: " + ec.message()});
    }
    std::sort(in_dir.begin(), in_dir.end());
    files.insert(files.end(), in_dir.begin(), in_dir.end());
  }
  return files;
}

}  // namespace

definition load_definition_file(const std::string& path) {
  std::vector<common::diagnostic> problems;
  definition def = read_definition_file(path, problems);
  if (!problems.empty()) throw common::config_errors(std::move(problems));
  return def;
}

std::vector<definition> load_definitions(const std::vector<std::string>& paths) {
  std::vector<definition> defs;
  for (const std::string& file : expand_paths(paths, nullptr)) {
    defs.push_back(load_definition_file(file));
  }
  check_definition_set(defs);
  return defs;
}

void check_definition_set(const std::vector<definition>& defs) {
  auto problems = definition_set_problems(defs);
  if (!problems.empty()) throw common::config_errors(std::move(problems));
}

std::vector<common::diagnostic> definition_set_problems(
    const std::vector<definition>& defs, const std::vector<std::string>& also_known) {
  std::vector<common::diagnostic> problems;
  std::map<std::pair<std::string, std::uint32_t>, const definition*> seen;
  std::map<std::string, std::vector<std::string>> children;  // workflow name -> sub-workflows
  for (const definition& d : defs) {
    const auto [it, fresh] = seen.emplace(std::make_pair(d.name, d.version), &d);
    if (!fresh) {
      problems.push_back({d.source + ": /workflow/name",
                          "workflow " + in_quotes(d.name) + " version " +
                              std::to_string(d.version) + " is also defined in " +
                              it->second->source + "; give one of them another \"version\""});
    }
    auto& list = children[d.name];
    for (auto& name : d.sub_workflows()) list.push_back(std::move(name));
  }
  for (const definition& d : defs) {
    walk_steps(d.steps, [&](const step& s) {
      if (s.kind != step_kind::workflow || s.workflow.empty() || children.count(s.workflow) ||
          std::find(also_known.begin(), also_known.end(), s.workflow) != also_known.end()) {
        return;
      }
      std::vector<std::string> known;
      for (const auto& [name, _] : children) known.push_back(name);
      std::string hint;
      const std::vector<std::string_view> names(known.begin(), known.end());
      if (const auto best = common::closest_word(s.workflow, names)) {
        hint = "did you mean " + in_quotes(*best) + "? ";
      }
      problems.push_back({d.source + ": " + s.path + "/workflow",
                          "no definition provides workflow " + in_quotes(s.workflow) + " (" + hint +
                              "loaded: " + join(known) +
                              "; give the file that defines it too, or the deployment that "
                              "loads it)"});
    });
  }
  // A workflow that (through its sub-workflows) starts itself would never end.
  std::map<std::string, int> state;  // 1: on the current path, 2: done
  std::vector<std::string> trail;
  std::function<void(const std::string&)> visit = [&](const std::string& name) {
    state[name] = 1;
    trail.push_back(name);
    for (const std::string& next : children[name]) {
      if (state[next] == 1) {
        std::vector<std::string> cycle(std::find(trail.begin(), trail.end(), next), trail.end());
        cycle.push_back(next);
        const definition* owner = nullptr;
        for (const definition& d : defs) {
          if (d.name == name) owner = &d;
        }
        std::string where = owner ? owner->source : name;
        if (owner) {
          walk_steps(owner->steps, [&](const step& s) {
            if (s.kind == step_kind::workflow && s.workflow == next && where == owner->source) {
              where += ": " + s.path + "/workflow";
            }
          });
        }
        problems.push_back({where, "sub-workflows form a cycle: " + join(cycle, " -> ") +
                                       "; an instance would start itself forever"});
        continue;
      }
      if (state[next] == 0) visit(next);
    }
    trail.pop_back();
    state[name] = 2;
  };
  for (const auto& [name, _] : children) {
    if (state[name] == 0) visit(name);
  }
  return problems;
}

int validate_definition_files(const std::vector<std::string>& paths, std::FILE* out, std::FILE* err,
                              std::vector<common::diagnostic> problems) {
  // `problems`: found before (a deployment's), then the paths that cannot be read.
  const std::vector<std::string> files = expand_paths(paths, &problems);

  struct checked {
    std::string file;
    definition def;
    std::vector<common::diagnostic> problems;
  };
  std::vector<checked> all;
  std::set<std::string> seen;
  for (const std::string& file : files) {
    std::error_code ec;
    const auto canonical = std::filesystem::weakly_canonical(file, ec).string();
    if (!seen.insert(ec ? file : canonical).second) continue;  // named twice: checked once
    checked c;
    c.file = file;
    c.def = read_definition_file(file, c.problems);
    all.push_back(std::move(c));
  }
  // The set: valid definitions are checked together; invalid ones still provide their name,
  // so that a sub-workflow defined in a broken file is not reported twice.
  std::vector<definition> valid;
  std::vector<std::string> broken_names;
  for (const checked& c : all) {
    if (c.problems.empty()) {
      valid.push_back(c.def);
    } else if (!c.def.name.empty()) {
      broken_names.push_back(c.def.name);
    }
  }
  for (auto& d : definition_set_problems(valid, broken_names)) {
    const auto owner = std::find_if(all.begin(), all.end(), [&](const checked& c) {
      return d.where == c.file || d.where.rfind(c.file + ": ", 0) == 0;
    });
    if (owner == all.end()) {
      problems.push_back(std::move(d));
    } else {
      owner->problems.push_back(std::move(d));
    }
  }

  for (const auto& p : problems) std::fprintf(err, "%s\n", p.to_string().c_str());
  std::size_t count = problems.size();
  for (const checked& c : all) {
    if (c.problems.empty()) {
      std::fprintf(out, "%s: ok (%s v%u, %zu top-level step(s))\n", c.file.c_str(),
                   c.def.name.c_str(), c.def.version, c.def.steps.size());
      continue;
    }
    count += c.problems.size();
    for (const auto& p : c.problems) std::fprintf(err, "%s\n", p.to_string().c_str());
  }
  if (count > 0) {
    std::fprintf(err, "%zu problem%s found\n", count, count == 1 ? "" : "s");
  }
  std::fflush(out);
  std::fflush(err);
  return count == 0 ? k_valid : k_invalid;
}

std::optional<millis> parse_duration(const json& value) {
  if (value.is_number_unsigned()) {
    const auto n = value.get<std::uint64_t>();
    if (static_cast<double>(n) > k_max_duration_ms) return std::nullopt;
    return millis(static_cast<millis::rep>(n));
  }
  if (value.is_number_integer()) {
    const auto n = value.get<std::int64_t>();
    if (n < 0 || static_cast<double>(n) > k_max_duration_ms) return std::nullopt;
    return millis(n);
  }
  if (!value.is_string()) return std::nullopt;
  const std::string_view s = value.get_ref<const std::string&>();
  std::size_t digits_end = 0;
  bool dot = false;
  while (digits_end < s.size() &&
         ((s[digits_end] >= '0' && s[digits_end] <= '9') || (s[digits_end] == '.' && !dot))) {
    dot = dot || s[digits_end] == '.';
    ++digits_end;
  }
  const std::string_view number = s.substr(0, digits_end);
  const std::string_view unit = s.substr(digits_end);
  if (number.empty() || number == "." || number.front() == '.' || number.back() == '.') {
    return std::nullopt;
  }
  double factor = 0;
  if (unit == "ms") {
    factor = 1;
  } else if (unit == "s") {
    factor = 1000;
  } else if (unit == "m") {
    factor = 60'000;
  } else if (unit == "h") {
    factor = 3'600'000;
  } else {
    return std::nullopt;
  }
  double n = 0;
  const auto [end, ec] = std::from_chars(number.data(), number.data() + number.size(), n);
  if (ec != std::errc() || end != number.data() + number.size()) return std::nullopt;
  const double ms = n * factor;
  if (!std::isfinite(ms) || ms > k_max_duration_ms) return std::nullopt;
  return millis(static_cast<millis::rep>(std::llround(ms)));
}

}  // namespace ensemble::orchestrator
