#pragma once
// Scriptable agents: an agent whose behaviour is declared in a YAML spec instead of written in
// C++ (`ensemble agent SPEC.yaml`; the format is documented in docs/agents.md).
//
//   auto spec = ensemble::cli::load_agent_spec("payments.yaml");   // throws config_error
//   ensemble::cli::scriptable_agent a(spec, {.broker = router, .events = events});
//   if (auto s = a.start(); !s) { ... s.err().message ... }
//   ...
//   auto c = a.counters();   // calls, failures injected, duplicates, events published
//
// A spec declares services and actions (reply templates, latency, failure injection, crash
// after N calls, events published while handling) and reactions (on an event, optionally after
// a delay, publish other events, or an alternative outcome). Templates and conditions are the
// orchestrator's expressions (ensemble/orchestrator/expression.hpp), so `${request.orderId}`
// means the same here as in a workflow.
//
// The spec is validated completely at load time: every error is a common::config_error whose
// message names the file and the YAML path ("payments.yaml: services.PaymentService.actions.
// charge.latency: ..."), unknown keys included. Once running, handlers never throw: a template
// that cannot be rendered for a request is answered with an error reply naming the spec path.

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ensemble/agent/agent.hpp"
#include "ensemble/common/result.hpp"

namespace ensemble::cli {

using millis = std::chrono::milliseconds;

// --- the spec, as loaded -------------------------------------------------------------------

// A fixed duration (min == max) or a uniformly random one in [min, max].
struct duration_range {
  millis min{0};
  millis max{0};
};

// An event to publish. `topic` and `payload` are templates; `when` (optional) a condition.
struct publish_spec {
  std::string path;  // YAML path, for messages
  nlohmann::json topic;
  nlohmann::json payload;
  std::string when;
};

// A failure rule. `when` selects the calls (events) it applies to (all when empty); among
// those, the first `first` fail, then each fails with probability `rate`. With neither `first`
// nor `rate`, every selected call fails.
struct fail_rule {
  std::string path;
  std::string when;
  std::optional<std::uint64_t> first;
  std::optional<double> rate;
  // Actions only: the error reply.
  std::string code = "injected_failure";
  nlohmann::json message;  // template (a string)
  bool retryable = true;
  // Events published instead of the normal ones (for reactions: the alternative outcome).
  std::vector<publish_spec> publish;
};

struct action_spec {
  std::string path;
  std::string service;
  std::string action;    // "*": every action of the service without a handler of its own
  nlohmann::json reply;  // template; null when absent
  std::optional<duration_range> latency;
  std::vector<fail_rule> fail;  // the first rule that fires decides
  std::optional<std::uint64_t> crash_after;
  std::vector<publish_spec> publish;
};

struct service_spec {
  std::string name;
  std::uint32_t capacity = 1;
  std::vector<action_spec> actions;
};

struct reaction_spec {
  std::string path;
  std::vector<std::string> on;  // exact topics, or prefixes when they end with '.'
  std::string when;
  std::optional<duration_range> delay;
  std::vector<publish_spec> publish;
  std::vector<fail_rule> fail;
};

// `consume:`: the reactions are fed by a durable consumer of a broker stream instead of a plain
// subscription (docs/agents.md, "Scriptable agents"): a delivery is acked once the reaction's
// events are stored (acked publishes with ids derived from the event's), nacked if they could
// not be, so a reaction survives the agent's and the broker's restarts.
struct consume_spec {
  std::string stream;
  std::string consumer;  // empty: the agent's name
  std::uint32_t capacity = 16;
  std::optional<std::chrono::milliseconds> ack_wait;
  std::optional<std::uint32_t> max_deliver;
  std::optional<std::string> ordered_by;
};

struct agent_spec {
  std::string source;  // the file (or label) it was loaded from
  std::string name;    // empty: the file name without extension
  bool dedupe = true;
  std::optional<std::uint64_t> seed;  // for rate and latency ranges; random when absent
  std::vector<service_spec> services;
  std::vector<reaction_spec> reactions;
  std::optional<consume_spec> consume;

  std::vector<std::string> service_names() const;
};

// Reads and validates a spec file. Throws common::config_error ("FILE: YAML.PATH: problem").
agent_spec load_agent_spec(const std::string& path);
// The same from text; `source` names it in errors.
agent_spec parse_agent_spec(std::string_view yaml, const std::string& source);

// --- running it ----------------------------------------------------------------------------

struct action_counters {
  std::uint64_t calls = 0;             // requests received (duplicates included)
  std::uint64_t duplicates = 0;        // answered from the dedupe cache
  std::uint64_t failures = 0;          // failure rules that fired
  std::uint64_t events_published = 0;  // events published while handling
};

struct reaction_counters {
  std::uint64_t events = 0;            // events received on its topics
  std::uint64_t triggered = 0;         // ... whose `when` held
  std::uint64_t failures = 0;          // failure rules that fired
  std::uint64_t events_published = 0;  // events published (normal or alternative outcome)
  std::uint64_t dropped = 0;           // delayed publishes dropped at shutdown
};

struct agent_counters {
  std::map<std::string, action_counters> actions;  // by "Service.action"
  std::vector<reaction_counters> reactions;        // in spec order
  std::uint64_t calls = 0;
  std::uint64_t duplicates = 0;
  std::uint64_t failures = 0;
  std::uint64_t events_published = 0;
};

struct connection {
  std::string broker = "tcp://127.0.0.1:5555";
  std::string events = "tcp://127.0.0.1:5556";
  std::string name;  // overrides the spec's name when not empty
  // Secured mode: agent::options::key_file and broker_key (both or neither).
  std::string key_file = {};
  std::string broker_key = {};
};

class scriptable_agent {
 public:
  scriptable_agent(agent_spec spec, connection conn);
  ~scriptable_agent();  // stop()
  scriptable_agent(const scriptable_agent&) = delete;
  scriptable_agent& operator=(const scriptable_agent&) = delete;

  // Registers the services, subscribes to the reactions' topics and starts the SDK agent.
  common::status start();
  // Stops taking work, wakes handlers sleeping on latency, drops pending delayed publishes.
  void stop(millis grace = std::chrono::seconds(5));

  const std::string& name() const;
  // "ensemble-agent ready name=NAME services=A,B": what `ensemble agent` prints once started.
  std::string ready_line() const;
  agent_counters counters() const;
  agent::agent& sdk();

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace ensemble::cli
