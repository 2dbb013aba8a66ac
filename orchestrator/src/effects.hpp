#pragma once
// The engine's way out: every command it sends, event it publishes and journal it reads goes
// through an effects_sink. The engine never holds a connection; it hands the sink what to send
// and a callback for the answer, which the sink runs (on any thread) exactly once.
//
// In production the sink is agent_effects, over the orchestrator's agent (agent_effects.cpp):
// calls become call_async, publishes publish_async with a PUBLISH_ACK, and the journal is the
// broker's `trace` action. A test hands the engine a fake that records what was asked and answers
// when the test says so (tests/engine_test.cpp): the engine then runs without a broker.

#include <chrono>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "ensemble/agent/agent.hpp"
#include "ensemble/common/result.hpp"

namespace ensemble::orchestrator::detail {

using json = nlohmann::json;

// A command to one service's action.
struct outgoing_call {
  std::string service;
  std::string action;
  json payload;
  std::chrono::milliseconds timeout{0};
  agent::send_options opts;  // id (the request id), trace context, idempotency key, attempt
};

// An event to publish, acknowledged by the broker.
struct outgoing_event {
  std::string topic;
  json payload;
  agent::send_options opts;  // id (the event id), trace context, idempotency key
};

// A command's reply or an event's acknowledgement.
struct response {
  json payload;           // a reply's payload (null if it is not JSON); null for an acknowledgement
  std::string worker;     // replies: the agent that answered
  std::uint64_t seq = 0;  // acknowledgements: the event's seq on its topic
};
using response_result = common::result<response>;
using response_callback = std::function<void(response_result)>;

class effects_sink {
 public:
  virtual ~effects_sink() = default;
  // Sends `c`; `done` runs once with the reply or the error (deadline_exceeded after c.timeout).
  virtual void call(outgoing_call c, response_callback done) = 0;
  // Publishes `e`; `done` runs once with the broker's acknowledgement or the error.
  virtual void publish(outgoing_event e, response_callback done) = 0;
  // Blocking: the broker's journal entries for one correlation id, with payloads (the body of
  // the broker's `trace` action, docs/protocol.md). Used by the catch-up after a restart.
  virtual common::result<json> journal(const std::string& correlation_id) = 0;
};

// The production sink, over a started agent (which must outlive it).
class agent_effects final : public effects_sink {
 public:
  explicit agent_effects(agent::agent& ag) : agent_(ag) {}
  void call(outgoing_call c, response_callback done) override;
  void publish(outgoing_event e, response_callback done) override;
  common::result<json> journal(const std::string& correlation_id) override;

 private:
  agent::agent& agent_;
};

}  // namespace ensemble::orchestrator::detail
