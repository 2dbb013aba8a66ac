// Scriptable agents (scriptable_agent.hpp, docs/agents.md): loading and validating a YAML spec,
// and running it as an SDK agent.
#include "ensemble/cli/scriptable_agent.hpp"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <mutex>
#include <queue>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <utility>

#include "ensemble/agent/json.hpp"
#include "ensemble/common/config_reader.hpp"
#include "ensemble/common/logging.hpp"
#include "ensemble/common/protocol.hpp"
#include "ensemble/common/signals.hpp"
#include "ensemble/orchestrator/definition.hpp"
#include "ensemble/orchestrator/expression.hpp"
#include "yaml_json.hpp"

namespace ensemble::cli {
namespace {

using json = nlohmann::json;
namespace ea = ensemble::agent;
using common::config_error;
using steady = std::chrono::steady_clock;

constexpr std::size_t k_dedupe_keep = 10'000;  // idempotency keys remembered, oldest forgotten
constexpr std::uint32_t k_max_capacity = 1'000;
constexpr std::chrono::milliseconds k_durable_publish_wait{10'000};  // a durable reaction's events

std::string join(const std::vector<std::string>& items, std::string_view sep = ", ") {
  std::string out;
  for (const auto& item : items) {
    if (!out.empty()) out += sep;
    out += item;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Validation of the document (the YAML converted to JSON, yaml_json.hpp).

const std::vector<std::string> k_request_roots = {"request", "message", "n", "agent"};
const std::vector<std::string> k_publish_roots = {"request", "message", "n", "agent", "reply"};
const std::vector<std::string> k_event_roots = {"event", "n", "agent"};

const std::string k_duration_help =
    "must be a duration such as \"250ms\", \"2s\", \"1.5s\", \"1m\", or a whole number of "
    "milliseconds, or {min: D, max: D} for a random one";

class spec_parser {
 public:
  explicit spec_parser(common::config_reader& r) : r_(r) {}

  // Whatever could be read; every problem is in the reader.
  agent_spec parse(const json& doc) {
    agent_spec spec;
    spec.source = r_.file();
    r_.attempt([&] { parse_document(doc, spec); });
    return spec;
  }

 private:
  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    r_.fail(path, what);
  }
  std::string child(const std::string& path, std::string_view key) const {
    return r_.child(path, key);
  }
  std::string child(const std::string& path, std::size_t index) const {
    return r_.child(path, index);
  }
  std::string got(const json& v) const { return r_.got(v); }
  template <class F>
  void with_key(const json& v, const std::string& path, std::string_view key, F&& f) const {
    r_.with_key(v, path, key, std::forward<F>(f));
  }

  void parse_document(const json& doc, agent_spec& spec) const {
    if (doc.is_null()) {
      fail("", "the spec is empty; an agent spec needs `services` and/or `reactions`");
    }
    if (!doc.is_object()) fail("", "the spec must be a mapping, got " + got(doc));
    r_.check_keys(doc, "", {"name", "dedupe", "seed", "services", "reactions", "consume"},
                  "an agent spec");
    with_key(doc, "", "name", [&](const json& v, const std::string& at) {
      spec.name = r_.string_at(v, at);
      if (auto problem = common::check_name("agent name", spec.name); !problem.empty()) {
        fail(at, problem);
      }
    });
    with_key(doc, "", "dedupe",
             [&](const json& v, const std::string& at) { spec.dedupe = r_.bool_at(v, at); });
    with_key(doc, "", "seed",
             [&](const json& v, const std::string& at) { spec.seed = count_at(v, at, 0); });
    with_key(doc, "", "services", [&](const json& services, const std::string& at) {
      if (!services.is_object() || services.empty()) {
        fail(at, "must be a mapping of service names to services, got " + got(services));
      }
      for (const auto& [name, value] : services.items()) {
        r_.attempt([&] { spec.services.push_back(parse_service(name, value, child(at, name))); });
      }
    });
    with_key(doc, "", "reactions", [&](const json& reactions, const std::string& at) {
      if (!reactions.is_array() || reactions.empty()) {
        fail(at, "must be a non-empty list of reactions, got " + got(reactions));
      }
      for (std::size_t i = 0; i < reactions.size(); ++i) {
        r_.attempt([&] { spec.reactions.push_back(parse_reaction(reactions[i], child(at, i))); });
      }
    });
    with_key(doc, "", "consume",
             [&](const json& v, const std::string& at) { spec.consume = parse_consume(v, at); });
    if (!doc.contains("services") && !doc.contains("reactions")) {
      fail("", "an agent spec needs `services` and/or `reactions`");
    }
    if (doc.contains("consume") && !doc.contains("reactions")) {
      fail("consume", "feeds the reactions, and the spec has none");
    }
  }

  consume_spec parse_consume(const json& v, const std::string& path) const {
    if (!v.is_object()) fail(path, "must be a mapping with `stream`, got " + got(v));
    r_.check_keys(v, path,
                  {"stream", "consumer", "capacity", "ack_wait", "max_deliver", "ordered_by"},
                  "a durable consumer");
    consume_spec c;
    if (!v.contains("stream")) r_.report(child(path, "stream"), "is required: the broker stream");
    const auto stream_name = [&](const json& x, const std::string& at) {
      std::string name = r_.string_at(x, at);
      const bool ok =
          !name.empty() && name.size() <= 64 && std::all_of(name.begin(), name.end(), [](char ch) {
            return std::isalnum(static_cast<unsigned char>(ch)) != 0 || ch == '_' || ch == '-';
          });
      if (!ok) fail(at, "'" + name + "' is not 1..64 characters of [A-Za-z0-9_-]");
      return name;
    };
    with_key(v, path, "stream",
             [&](const json& x, const std::string& at) { c.stream = stream_name(x, at); });
    with_key(v, path, "consumer",
             [&](const json& x, const std::string& at) { c.consumer = stream_name(x, at); });
    with_key(v, path, "capacity", [&](const json& x, const std::string& at) {
      const auto n = count_at(x, at, 1);
      if (n > 10'000) fail(at, "must be 1..10000, got " + std::to_string(n));
      c.capacity = static_cast<std::uint32_t>(n);
    });
    with_key(v, path, "ack_wait",
             [&](const json& x, const std::string& at) { c.ack_wait = duration_at(x, at).max; });
    with_key(v, path, "max_deliver", [&](const json& x, const std::string& at) {
      c.max_deliver =
          static_cast<std::uint32_t>(std::min<std::uint64_t>(count_at(x, at, 1), 1'000'000));
    });
    with_key(v, path, "ordered_by",
             [&](const json& x, const std::string& at) { c.ordered_by = r_.string_at(x, at); });
    return c;
  }

  std::uint64_t count_at(const json& v, const std::string& path, std::uint64_t min) const {
    if (!v.is_number_integer() || (!v.is_number_unsigned() && v.get<std::int64_t>() < 0) ||
        v.get<std::uint64_t>() < min) {
      fail(path, "must be a whole number of at least " + std::to_string(min) + ", got " + got(v));
    }
    return v.get<std::uint64_t>();
  }

  double rate_at(const json& v, const std::string& path) const {
    if (!v.is_number() || v.get<double>() < 0.0 || v.get<double>() > 1.0) {
      fail(path, "must be a fraction between 0 and 1 (0.1 fails one call in ten), got " + got(v));
    }
    return v.get<double>();
  }

  millis one_duration(const json& v, const std::string& path) const {
    const auto d = orchestrator::parse_duration(v);
    if (!d) fail(path, k_duration_help + ", got " + got(v));
    return *d;
  }

  duration_range duration_at(const json& v, const std::string& path) const {
    if (v.is_object()) {
      r_.check_keys(v, path, {"min", "max"}, "a random duration");
      if (!v.contains("min") || !v.contains("max")) {
        fail(path, "a random duration needs both min and max, e.g. {min: 10ms, max: 50ms}");
      }
      duration_range r{one_duration(v["min"], child(path, "min")),
                       one_duration(v["max"], child(path, "max"))};
      if (r.max < r.min) fail(child(path, "max"), "must not be less than min");
      return r;
    }
    const millis d = one_duration(v, path);
    return {d, d};
  }

  // Checks a template's syntax and that every reference starts with one of `roots`.
  void check_refs(const orchestrator::expression_check& check, const std::string& path,
                  const std::vector<std::string>& roots) const {
    if (!check.problem.empty()) fail(path, check.problem);
    for (const auto& ref : check.paths) {
      const std::string root = ref.substr(0, ref.find_first_of(".["));
      if (std::find(roots.begin(), roots.end(), root) == roots.end()) {
        fail(path, "unknown reference ${" + ref + "}: references here start with " +
                       join(roots, ", ") + " (e.g. ${" + roots.front() + "...})");
      }
    }
  }
  json template_at(const json& v, const std::string& path,
                   const std::vector<std::string>& roots) const {
    check_refs(orchestrator::check_template(v), path, roots);
    return v;
  }
  std::string condition_at(const json& v, const std::string& path,
                           const std::vector<std::string>& roots) const {
    const std::string text = r_.string_at(v, path);
    check_refs(orchestrator::check_condition(text), path, roots);
    return text;
  }

  service_spec parse_service(const std::string& name, const json& v,
                             const std::string& path) const {
    if (auto problem = common::check_name("service", name); !problem.empty()) {
      r_.report(path, problem);
    }
    if (!v.is_object()) fail(path, "a service must be a mapping with `actions`, got " + got(v));
    r_.check_keys(v, path, {"capacity", "actions"}, "a service");
    service_spec s;
    s.name = name;
    with_key(v, path, "capacity", [&](const json& c, const std::string& at) {
      const auto n = count_at(c, at, 1);
      if (n > k_max_capacity) fail(at, "must be at most " + std::to_string(k_max_capacity));
      s.capacity = static_cast<std::uint32_t>(n);
    });
    const std::string apath = child(path, "actions");
    if (!v.contains("actions")) fail(apath, "is required: the actions this service handles");
    const json& actions = v["actions"];
    if (!actions.is_object() || actions.empty()) {
      fail(apath, "must be a mapping of action names to actions, got " + got(actions));
    }
    for (const auto& [action, a] : actions.items()) {
      r_.attempt([&] { s.actions.push_back(parse_action(name, action, a, child(apath, action))); });
    }
    return s;
  }

  action_spec parse_action(const std::string& service, const std::string& action, const json& v,
                           const std::string& path) const {
    if (action != "*") {
      if (auto problem = common::check_name("action", action); !problem.empty()) {
        r_.report(path, problem);
      }
    }
    action_spec a;
    a.path = path;
    a.service = service;
    a.action = action;
    if (v.is_null()) return a;  // `charge:` alone: replies null
    if (!v.is_object()) fail(path, "an action must be a mapping, got " + got(v));
    r_.check_keys(v, path, {"reply", "latency", "fail", "crash_after", "publish"}, "an action");
    with_key(v, path, "reply", [&](const json& x, const std::string& at) {
      a.reply = template_at(x, at, k_request_roots);
    });
    with_key(v, path, "latency",
             [&](const json& x, const std::string& at) { a.latency = duration_at(x, at); });
    with_key(v, path, "fail", [&](const json& x, const std::string& at) {
      a.fail = parse_fail_rules(x, at, false);
    });
    with_key(v, path, "crash_after",
             [&](const json& x, const std::string& at) { a.crash_after = count_at(x, at, 1); });
    with_key(v, path, "publish", [&](const json& x, const std::string& at) {
      a.publish = parse_publishes(x, at, k_publish_roots);
    });
    return a;
  }

  std::vector<fail_rule> parse_fail_rules(const json& v, const std::string& path,
                                          bool reaction) const {
    std::vector<fail_rule> rules;
    if (v.is_object()) {
      rules.push_back(parse_fail_rule(v, path, reaction));
    } else if (v.is_array() && !v.empty()) {
      for (std::size_t i = 0; i < v.size(); ++i) {
        r_.attempt([&] { rules.push_back(parse_fail_rule(v[i], child(path, i), reaction)); });
      }
    } else {
      fail(path, "must be a failure rule (a mapping such as {first: 2}) or a list of them, got " +
                     got(v));
    }
    return rules;
  }

  fail_rule parse_fail_rule(const json& v, const std::string& path, bool reaction) const {
    if (!v.is_object()) fail(path, "a failure rule must be a mapping, got " + got(v));
    const auto& roots = reaction ? k_event_roots : k_request_roots;
    if (reaction) {
      r_.check_keys(v, path, {"first", "rate", "when", "publish"}, "a reaction's failure rule");
    } else {
      r_.check_keys(v, path, {"first", "rate", "when", "code", "message", "retryable", "publish"},
                    "a failure rule");
    }
    fail_rule r;
    r.path = path;
    with_key(v, path, "first",
             [&](const json& x, const std::string& at) { r.first = count_at(x, at, 0); });
    with_key(v, path, "rate",
             [&](const json& x, const std::string& at) { r.rate = rate_at(x, at); });
    with_key(v, path, "when",
             [&](const json& x, const std::string& at) { r.when = condition_at(x, at, roots); });
    with_key(v, path, "code", [&](const json& x, const std::string& at) {
      r.code = r_.string_at(x, at);
      if (r.code.empty()) fail(at, "must not be empty");
    });
    with_key(v, path, "message", [&](const json& x, const std::string& at) {
      r_.string_at(x, at);
      r.message = template_at(x, at, roots);
    });
    with_key(v, path, "retryable",
             [&](const json& x, const std::string& at) { r.retryable = r_.bool_at(x, at); });
    with_key(v, path, "publish", [&](const json& x, const std::string& at) {
      r.publish = parse_publishes(x, at, roots);
    });
    return r;
  }

  std::vector<publish_spec> parse_publishes(const json& v, const std::string& path,
                                            const std::vector<std::string>& roots) const {
    std::vector<publish_spec> out;
    if (v.is_array()) {
      if (v.empty()) fail(path, "must not be an empty list");
      for (std::size_t i = 0; i < v.size(); ++i) {
        r_.attempt([&] { out.push_back(parse_publish(v[i], child(path, i), roots)); });
      }
    } else {
      out.push_back(parse_publish(v, path, roots));
    }
    return out;
  }

  publish_spec parse_publish(const json& v, const std::string& path,
                             const std::vector<std::string>& roots) const {
    publish_spec p;
    p.path = path;
    // Default payload: what caused it (the request, or the event's payload).
    const bool for_event = roots == k_event_roots;
    p.payload = for_event ? json("${event.payload}") : json("${request}");
    if (v.is_string()) {
      p.topic = topic_at(v, path, roots);
      return p;
    }
    if (!v.is_object()) {
      fail(path,
           "must be an event {topic: T, payload: ...}, a topic, or a list of them, got " + got(v));
    }
    r_.check_keys(v, path, {"topic", "payload", "when"}, "an event");
    if (!v.contains("topic")) fail(child(path, "topic"), "is required");
    with_key(v, path, "topic",
             [&](const json& x, const std::string& at) { p.topic = topic_at(x, at, roots); });
    with_key(v, path, "payload",
             [&](const json& x, const std::string& at) { p.payload = template_at(x, at, roots); });
    with_key(v, path, "when",
             [&](const json& x, const std::string& at) { p.when = condition_at(x, at, roots); });
    return p;
  }

  json topic_at(const json& v, const std::string& path,
                const std::vector<std::string>& roots) const {
    const std::string topic = r_.string_at(v, path);
    if (topic.find("${") == std::string::npos) {
      if (auto problem = common::check_topic(topic); !problem.empty()) fail(path, problem);
    }
    return template_at(v, path, roots);
  }

  reaction_spec parse_reaction(const json& v, const std::string& path) const {
    if (!v.is_object()) fail(path, "a reaction must be a mapping with `on`, got " + got(v));
    r_.check_keys(v, path, {"on", "when", "delay", "publish", "fail"}, "a reaction");
    reaction_spec r;
    r.path = path;
    const std::string on_path = child(path, "on");
    if (!v.contains("on")) {
      r_.report(on_path, "is required: the topic (or prefix ending in '.') to react to");
    }
    with_key(v, path, "on", [&](const json& on, const std::string& at) {
      auto add_topic = [&](const json& t, const std::string& tpath) {
        std::string topic = r_.string_at(t, tpath);
        const std::string bare =
            !topic.empty() && topic.back() == '.' ? topic.substr(0, topic.size() - 1) : topic;
        if (auto problem = common::check_topic(bare); !problem.empty()) fail(tpath, problem);
        r.on.push_back(std::move(topic));
      };
      if (on.is_array() && !on.empty()) {
        for (std::size_t i = 0; i < on.size(); ++i) {
          r_.attempt([&] { add_topic(on[i], child(at, i)); });
        }
      } else {
        add_topic(on, at);
      }
    });
    with_key(v, path, "when", [&](const json& x, const std::string& at) {
      r.when = condition_at(x, at, k_event_roots);
    });
    with_key(v, path, "delay",
             [&](const json& x, const std::string& at) { r.delay = duration_at(x, at); });
    with_key(v, path, "publish", [&](const json& x, const std::string& at) {
      r.publish = parse_publishes(x, at, k_event_roots);
    });
    with_key(v, path, "fail",
             [&](const json& x, const std::string& at) { r.fail = parse_fail_rules(x, at, true); });
    if (!v.contains("publish") && !v.contains("fail")) {
      r_.report(path, "a reaction needs `publish` (and/or `fail` with its own publish)");
    }
    return r;
  }

  common::config_reader& r_;
};

std::string file_stem(const std::string& source) {
  return std::filesystem::path(source).stem().string();
}

bool topic_matches(const std::string& on, const std::string& topic) {
  if (!on.empty() && on.back() == '.') return topic.compare(0, on.size(), on) == 0;
  return topic == on;
}

// Threads we start never take the application's stop signals (see signals.hpp).
using common::spawn_quiet;

}  // namespace

std::vector<std::string> agent_spec::service_names() const {
  std::vector<std::string> names;
  names.reserve(services.size());
  for (const auto& s : services) names.push_back(s.name);
  return names;
}

agent_spec parse_agent_spec(std::string_view yaml, const std::string& source) {
  common::config_reader r(source, common::path_style::dotted);
  const json doc = yaml_to_json(yaml, r, yaml_scalars::typed);
  agent_spec spec = spec_parser(r).parse(doc);
  r.throw_if_any();
  if (spec.name.empty()) spec.name = file_stem(source);
  return spec;
}

agent_spec load_agent_spec(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    throw config_error(path, std::string("cannot read the agent spec: ") + std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  return parse_agent_spec(text.str(), path);
}

// ---------------------------------------------------------------------------------------------
// Running a spec.

struct scriptable_agent::impl {
  struct rule_state {
    const fail_rule* rule;
    std::atomic<std::uint64_t> matched{0};
  };
  struct action_state {
    const action_spec* spec;
    std::string label;  // "Service.action"
    std::atomic<std::uint64_t> calls{0}, duplicates{0}, failures{0}, published{0};
    std::deque<rule_state> rules;
  };
  struct reaction_state {
    const reaction_spec* spec;
    std::atomic<std::uint64_t> events{0}, triggered{0}, failures{0}, published{0}, dropped{0};
    std::deque<rule_state> rules;
  };
  struct timed_job {
    steady::time_point at;
    std::uint64_t seq;
    reaction_state* reaction;
    std::function<void()> job;
    bool operator>(const timed_job& o) const { return at != o.at ? at > o.at : seq > o.seq; }
  };

  agent_spec spec;
  connection conn;
  std::string name;
  std::shared_ptr<spdlog::logger> log = common::component_logger("agent");
  std::unique_ptr<ea::agent> sdk;
  std::deque<action_state> actions;
  std::deque<reaction_state> reactions;
  std::vector<std::string> prefixes;  // subscribed, sorted, unique

  std::mutex dedupe_mutex;
  std::unordered_map<std::string, std::shared_future<ea::handler_result>> answered;
  std::deque<std::string> answered_order;

  std::mutex rng_mutex;
  std::mt19937_64 rng;

  std::mutex stop_mutex;
  std::condition_variable stop_cv;
  bool stopping = false;
  bool started = false;

  std::mutex timer_mutex;
  std::condition_variable timer_cv;
  std::priority_queue<timed_job, std::vector<timed_job>, std::greater<>> timers;
  std::uint64_t timer_seq = 0;
  bool timer_stop = false;
  std::thread timer_thread;

  impl(agent_spec s, connection c) : spec(std::move(s)), conn(std::move(c)) {
    name = !conn.name.empty() ? conn.name : spec.name;
    rng.seed(spec.seed ? *spec.seed : std::random_device{}());
    for (const auto& svc : spec.services) {
      for (const auto& a : svc.actions) {
        auto& st = actions.emplace_back();
        st.spec = &a;
        st.label = a.service + "." + a.action;
        for (const auto& r : a.fail) st.rules.emplace_back().rule = &r;
      }
    }
    for (const auto& r : spec.reactions) {
      auto& st = reactions.emplace_back();
      st.spec = &r;
      for (const auto& f : r.fail) st.rules.emplace_back().rule = &f;
      for (const auto& on : r.on) prefixes.push_back(on);
    }
    std::sort(prefixes.begin(), prefixes.end());
    prefixes.erase(std::unique(prefixes.begin(), prefixes.end()), prefixes.end());
  }

  // --- helpers ---

  millis pick(const duration_range& r) {
    if (r.max <= r.min) return r.min;
    std::lock_guard lock(rng_mutex);
    return millis(std::uniform_int_distribution<millis::rep>(r.min.count(), r.max.count())(rng));
  }
  bool chance(double rate) {
    if (rate <= 0.0) return false;
    if (rate >= 1.0) return true;
    std::lock_guard lock(rng_mutex);
    return std::uniform_real_distribution<double>(0.0, 1.0)(rng) < rate;
  }
  // Sleeps for `d` unless the agent stops first; false if it did.
  bool pause(millis d) {
    std::unique_lock lock(stop_mutex);
    return !stop_cv.wait_for(lock, d, [this] { return stopping; });
  }
  ea::error spec_error(const std::string& path, const ea::error& e) const {
    return ea::error{e.code.empty() ? "bad_request" : e.code,
                     spec.source + ": " + path + ": " + e.message, false};
  }
  static std::string text_of(const json& v) {
    return v.is_string() ? v.get<std::string>()
                         : v.dump(-1, ' ', false, json::error_handler_t::replace);
  }

  // Whether `rule` fires for this call/event. Errors come from its `when`.
  common::result<bool> fires(rule_state& rs, const json& ctx) {
    const fail_rule& r = *rs.rule;
    if (!r.when.empty()) {
      auto w = orchestrator::evaluate(r.when, ctx);
      if (!w) return spec_error(r.path + ".when", w.err());
      if (!*w) return false;
    }
    const std::uint64_t n = ++rs.matched;
    if (r.first && n <= *r.first) return true;
    if (r.rate) return chance(*r.rate);
    return !r.first;  // neither first nor rate: every selected call fails
  }

  // Publishes `list` rendered against `ctx`; counts into `published`. With `so`, those trace
  // fields are used; otherwise the SDK fills them from the message being handled.
  // With `id_prefix` (durable reactions), each event gets the id `<prefix>:<index>` and is
  // published acked: a redelivered event publishes the same ids, which the stream stores once.
  common::status publish_all(const std::vector<publish_spec>& list, const json& ctx,
                             const ea::send_options& so, std::atomic<std::uint64_t>& published,
                             const std::string& id_prefix = {}) {
    std::size_t index = 0;
    for (const auto& p : list) {
      const std::size_t this_index = index++;
      if (!p.when.empty()) {
        auto w = orchestrator::evaluate(p.when, ctx);
        if (!w) return spec_error(p.path + ".when", w.err());
        if (!*w) continue;
      }
      auto topic = orchestrator::render(p.topic, ctx);
      if (!topic) return spec_error(p.path + ".topic", topic.err());
      const std::string t = text_of(*topic);
      if (auto problem = common::check_topic(t); !problem.empty()) {
        return ea::error{
            "bad_request",
            spec.source + ": " + p.path + ".topic: rendered topic \"" + t + "\": " + problem,
            false};
      }
      auto payload = orchestrator::render(p.payload, ctx);
      if (!payload) return spec_error(p.path + ".payload", payload.err());
      common::result<ea::published> sent = common::error{};
      if (id_prefix.empty()) {
        sent = sdk->publish(t, ea::to_json_payload(*payload), so);
      } else {
        ea::send_options acked = so;
        acked.id = id_prefix + ":" + std::to_string(this_index);
        sent = sdk->publish_acked(t, ea::to_json_payload(*payload), k_durable_publish_wait, acked);
      }
      if (!sent) return sent.err();
      ++published;
      log->debug("{}: published {} id={} correlation={}", name, t, sent->id,
                 so.correlation_id.empty() && ea::current_message() != nullptr
                     ? ea::current_message()->correlation_id()
                     : so.correlation_id);
    }
    return common::ok_status();
  }

  // --- requests ---

  ea::handler_result on_request(action_state& st, const ea::message& m) {
    const std::uint64_t n = ++st.calls;
    const action_spec& a = *st.spec;
    if (a.crash_after && n >= *a.crash_after) {
      std::fprintf(stderr, "ensemble-agent %s: crash_after=%llu reached by %s call %llu: exiting\n",
                   name.c_str(), static_cast<unsigned long long>(*a.crash_after), st.label.c_str(),
                   static_cast<unsigned long long>(n));
      std::fflush(stderr);
      std::_Exit(3);
    }
    log->debug("{}: handling {}.{} id={} correlation={} attempt={} key={}", name, m.service(),
               m.action(), m.id(), m.correlation_id(), m.attempt(), m.idempotency_key());
    if (!spec.dedupe || m.idempotency_key().empty()) return guarded(st, m, n);

    std::string key = m.service();
    key += '\n';
    key += m.action();
    key += '\n';
    key += m.idempotency_key();
    std::promise<ea::handler_result> promise;
    {
      std::unique_lock lock(dedupe_mutex);
      if (auto it = answered.find(key); it != answered.end()) {
        auto previous = it->second;
        lock.unlock();
        ++st.duplicates;
        log->debug("{}: duplicate {}.{} key={} correlation={}: replaying the first answer", name,
                   m.service(), m.action(), m.idempotency_key(), m.correlation_id());
        const auto deadline = m.deadline() == steady::time_point{}
                                  ? steady::now() + std::chrono::seconds(30)
                                  : m.deadline();
        if (previous.wait_until(deadline) != std::future_status::ready) {
          return ea::error{
              "deadline_exceeded",
              "duplicate of request " + m.idempotency_key() + " that is still being handled", true};
        }
        return previous.get();
      }
      answered.emplace(key, promise.get_future().share());
      answered_order.push_back(key);
      while (answered_order.size() > k_dedupe_keep) {
        answered.erase(answered_order.front());
        answered_order.pop_front();
      }
    }
    auto result = guarded(st, m, n);
    promise.set_value(result);
    return result;
  }

  ea::handler_result guarded(action_state& st, const ea::message& m, std::uint64_t n) {
    try {
      return execute(st, m, n);
    } catch (const std::exception& e) {
      log->error("{}: {} (id={}): {}", name, st.label, m.id(), e.what());
      return ea::error{"handler_failed", st.label + ": " + e.what(), false};
    } catch (...) {
      log->error("{}: {} (id={}): unknown exception", name, st.label, m.id());
      return ea::error{"handler_failed", st.label + ": unknown exception", false};
    }
  }

  ea::handler_result execute(action_state& st, const ea::message& m, std::uint64_t n) {
    const action_spec& a = *st.spec;
    auto request = ea::from_json_payload(m.payload());
    if (!request) return request.err();
    json ctx = {{"request", std::move(*request)},
                {"message",
                 {{"id", m.id()},
                  {"correlation_id", m.correlation_id()},
                  {"causation_id", m.causation_id()},
                  {"trace_id", m.trace_id()},
                  {"attempt", m.attempt()},
                  {"idempotency_key", m.idempotency_key()},
                  {"service", m.service()},
                  {"action", m.action()}}},
                {"n", n},
                {"agent", {{"name", name}}}};
    if (a.latency) {
      if (!pause(pick(*a.latency))) {
        return ea::error{"shutting_down", "agent " + name + " is stopping", true};
      }
    }
    for (auto& rs : st.rules) {
      auto fire = fires(rs, ctx);
      if (!fire) {
        log->warn("{}: {} id={}: {}", name, st.label, m.id(), fire.err().message);
        return fire.err();
      }
      if (!*fire) continue;
      const fail_rule& r = *rs.rule;
      ++st.failures;
      std::string text = "injected failure (" + spec.source + ": " + r.path + ")";
      if (!r.message.is_null()) {
        auto rendered = orchestrator::render(r.message, ctx);
        if (!rendered) return spec_error(r.path + ".message", rendered.err());
        text = text_of(*rendered);
      }
      ctx["reply"] = nullptr;
      if (auto s = publish_all(r.publish, ctx, {}, st.published); !s) return s.err();
      log->debug("{}: {} id={} correlation={}: failing with {}", name, st.label, m.id(),
                 m.correlation_id(), r.code);
      return ea::error{r.code, std::move(text), r.retryable};
    }
    auto reply = orchestrator::render(a.reply, ctx);
    if (!reply) return spec_error(a.path + ".reply", reply.err());
    ctx["reply"] = *reply;
    if (auto s = publish_all(a.publish, ctx, {}, st.published); !s) {
      log->warn("{}: {} id={}: {}", name, st.label, m.id(), s.err().message);
      return s.err();
    }
    return ea::to_json_payload(*reply);
  }

  // --- events ---

  // The SDK runs every subscription whose prefix matches a topic; the first matching prefix (in
  // sorted order) dispatches, so that overlapping `on` entries trigger a reaction only once.
  void on_event(const std::string& prefix, const ea::message& e) {
    const std::string& topic = e.topic();
    for (const auto& p : prefixes) {
      if (topic.compare(0, p.size(), p) == 0) {
        if (p != prefix) return;
        break;
      }
    }
    const json event = event_json(e);
    for (auto& st : reactions) {
      if (std::none_of(st.spec->on.begin(), st.spec->on.end(),
                       [&](const std::string& on) { return topic_matches(on, topic); })) {
        continue;
      }
      try {
        react(st, e, event);
      } catch (const std::exception& ex) {
        log->error("{}: {} on {} (id={}): {}", name, st.spec->path, topic, e.id(), ex.what());
      } catch (...) {
        log->error("{}: {} on {} (id={}): unknown exception", name, st.spec->path, topic, e.id());
      }
    }
  }

  // A delivery of the durable consumer: every matching reaction runs to the end (its delay
  // waited here, its events stored) before the delivery is acked; an error is a nack.
  common::status on_delivery(const ea::message& e) {
    const json event = event_json(e);
    std::size_t index = 0;
    for (auto& st : reactions) {
      const std::size_t reaction_index = index++;
      if (std::none_of(st.spec->on.begin(), st.spec->on.end(),
                       [&](const std::string& on) { return topic_matches(on, e.topic()); })) {
        continue;
      }
      auto planned = prepare(st, e, event);
      if (!planned) continue;
      if (st.spec->delay && !pause(pick(*st.spec->delay))) {
        return common::error{"shutting_down", "the agent is stopping", true};
      }
      const std::string id_prefix = name + ":" + e.id() + ":" + std::to_string(reaction_index);
      if (auto s =
              publish_all(*planned->outcome, planned->ctx, planned->so, st.published, id_prefix);
          !s) {
        log->warn("{}: {} on {} id={} #{}: {} (redelivered)", name, st.spec->path, e.topic(),
                  e.id(), e.stream_seq(), s.err().message);
        auto err = s.err();
        err.retryable = true;
        return err;
      }
    }
    return common::ok_status();
  }

  json event_json(const ea::message& e) const {
    const std::string& topic = e.topic();
    json payload;
    if (auto body = ea::from_json_payload(e.payload()); body) {
      payload = std::move(*body);
    } else {
      log->warn("{}: event {} id={}: {}", name, topic, e.id(), body.err().message);
      payload = nullptr;
    }
    const json event = {{"id", e.id()},
                        {"topic", topic},
                        {"correlation_id", e.correlation_id()},
                        {"causation_id", e.causation_id()},
                        {"trace_id", e.trace_id()},
                        {"seq", e.seq()},
                        {"timestamp_us", e.timestamp_us()},
                        {"publisher", e.publisher()},
                        {"payload", std::move(payload)}};
    return event;
  }

  // What a reaction does with one event: nullopt when its `when` says no (or fails).
  struct reaction_plan {
    const std::vector<publish_spec>* outcome = nullptr;
    json ctx;
    ea::send_options so;
  };
  std::optional<reaction_plan> prepare(reaction_state& st, const ea::message& e,
                                       const json& event) {
    const reaction_spec& r = *st.spec;
    const std::uint64_t n = ++st.events;
    json ctx = {{"event", event}, {"n", n}, {"agent", {{"name", name}}}};
    if (!r.when.empty()) {
      auto w = orchestrator::evaluate(r.when, ctx);
      if (!w) {
        log->warn("{}: {}.when on {} id={}: {}", name, r.path, e.topic(), e.id(), w.err().message);
        return std::nullopt;
      }
      if (!*w) return std::nullopt;
    }
    ++st.triggered;
    const std::vector<publish_spec>* outcome = &r.publish;
    for (auto& rs : st.rules) {
      auto fire = fires(rs, ctx);
      if (!fire) {
        log->warn("{}: {} on {} id={}: {}", name, r.path, e.topic(), e.id(), fire.err().message);
        return std::nullopt;
      }
      if (*fire) {
        ++st.failures;
        outcome = &rs.rule->publish;
        break;
      }
    }
    log->debug("{}: {} reacting to {} id={} correlation={}{}", name, r.path, e.topic(), e.id(),
               e.correlation_id(), outcome == &r.publish ? "" : " (failure outcome)");
    // The trace context of the triggering event, explicitly, so that a delayed publish (on the
    // timer thread) carries it as well as an immediate one.
    ea::send_options so;
    so.correlation_id = e.correlation_id().empty() ? e.id() : e.correlation_id();
    so.causation_id = e.id();
    so.trace_id = e.trace_id();
    return reaction_plan{outcome, std::move(ctx), so};
  }

  void react(reaction_state& st, const ea::message& e, const json& event) {
    const reaction_spec& r = *st.spec;
    auto p = prepare(st, e, event);
    if (!p) return;
    auto publish = [this, &st, outcome = p->outcome, ctx = std::move(p->ctx), so = p->so,
                    topic = e.topic()] {
      if (auto s = publish_all(*outcome, ctx, so, st.published); !s) {
        log->warn("{}: {} on {}: {}", name, st.spec->path, topic, s.err().message);
      }
    };
    if (!r.delay) {
      publish();
      return;
    }
    const millis d = pick(*r.delay);
    std::lock_guard lock(timer_mutex);
    if (timer_stop) {
      ++st.dropped;
      return;
    }
    timers.push(timed_job{steady::now() + d, timer_seq++, &st, std::move(publish)});
    timer_cv.notify_one();
  }

  void timer_main() {
    std::unique_lock lock(timer_mutex);
    while (true) {
      if (timer_stop) break;
      if (timers.empty()) {
        timer_cv.wait(lock);
        continue;
      }
      const auto at = timers.top().at;
      if (steady::now() < at) {
        timer_cv.wait_until(lock, at);
        continue;
      }
      auto job = std::move(const_cast<timed_job&>(timers.top()).job);
      timers.pop();
      lock.unlock();
      try {
        job();
      } catch (const std::exception& e) {
        log->error("{}: delayed publish: {}", name, e.what());
      }
      lock.lock();
    }
    std::size_t dropped = 0;
    while (!timers.empty()) {
      ++timers.top().reaction->dropped;
      timers.pop();
      ++dropped;
    }
    if (dropped > 0) log->info("{}: dropped {} delayed publishes at shutdown", name, dropped);
  }
};

scriptable_agent::scriptable_agent(agent_spec spec, connection conn)
    : impl_(std::make_unique<impl>(std::move(spec), std::move(conn))) {}

scriptable_agent::~scriptable_agent() {
  stop();
}

common::status scriptable_agent::start() {
  auto& d = *impl_;
  if (d.started) return common::error{"bad_request", "the agent is already started", false};
  d.started = true;
  ea::options opts;
  opts.name = d.name;
  opts.broker = d.conn.broker;
  opts.events = d.conn.events;
  opts.key_file = d.conn.key_file;
  opts.broker_key = d.conn.broker_key;
  d.sdk = std::make_unique<ea::agent>(opts);
  for (const auto& svc : d.spec.services) d.sdk->set_capacity(svc.name, svc.capacity);
  for (auto& st : d.actions) {
    auto* state = &st;
    d.sdk->handle(st.spec->service, st.spec->action,
                  [&d, state](const ea::message& m) { return d.on_request(*state, m); });
  }
  if (d.spec.consume) {
    const auto& c = *d.spec.consume;
    ea::consume_options co;
    co.stream = c.stream;
    co.consumer = c.consumer.empty() ? d.name : c.consumer;
    co.capacity = c.capacity;
    co.config.filter = d.prefixes;
    co.config.ack_wait = c.ack_wait;
    co.config.max_deliver = c.max_deliver;
    co.config.ordered_by = c.ordered_by;
    if (auto s = d.sdk->consume(co, [&d](const ea::message& e) { return d.on_delivery(e); }); !s) {
      return s.err();
    }
  } else {
    for (const auto& prefix : d.prefixes) {
      // A trailing '.' is a prefix subscription; an exact topic subscribes to itself as a
      // prefix and on_event filters the longer topics out.
      auto s =
          d.sdk->subscribe(prefix, [&d, prefix](const ea::message& e) { d.on_event(prefix, e); });
      if (!s) return s.err();
    }
  }
  d.timer_thread = spawn_quiet([&d] { d.timer_main(); });
  if (auto s = d.sdk->start(); !s) {
    stop();
    return s.err();
  }
  d.log->info("{}: scriptable agent from {} ready: services [{}], reactions on [{}]", d.name,
              d.spec.source, join(d.spec.service_names()), join(d.prefixes));
  return common::ok_status();
}

void scriptable_agent::stop(millis grace) {
  auto& d = *impl_;
  {
    std::lock_guard lock(d.stop_mutex);
    if (d.stopping || !d.started) return;
    d.stopping = true;
  }
  d.stop_cv.notify_all();
  {
    std::lock_guard lock(d.timer_mutex);
    d.timer_stop = true;
  }
  d.timer_cv.notify_all();
  if (d.timer_thread.joinable()) d.timer_thread.join();
  if (d.sdk) d.sdk->stop(grace);
}

const std::string& scriptable_agent::name() const {
  return impl_->sdk ? impl_->sdk->name() : impl_->name;
}

std::string scriptable_agent::ready_line() const {
  return "ensemble-agent ready name=" + name() +
         " services=" + join(impl_->spec.service_names(), ",");
}

agent_counters scriptable_agent::counters() const {
  agent_counters c;
  for (const auto& st : impl_->actions) {
    action_counters a{st.calls.load(), st.duplicates.load(), st.failures.load(),
                      st.published.load()};
    c.calls += a.calls;
    c.duplicates += a.duplicates;
    c.failures += a.failures;
    c.events_published += a.events_published;
    c.actions[st.label] = a;
  }
  for (const auto& st : impl_->reactions) {
    reaction_counters r{st.events.load(), st.triggered.load(), st.failures.load(),
                        st.published.load(), st.dropped.load()};
    c.failures += r.failures;
    c.events_published += r.events_published;
    c.reactions.push_back(r);
  }
  return c;
}

agent::agent& scriptable_agent::sdk() {
  return *impl_->sdk;
}

}  // namespace ensemble::cli
