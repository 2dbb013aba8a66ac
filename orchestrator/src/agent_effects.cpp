// The engine's effects over the orchestrator's agent; see effects.hpp.
#include "effects.hpp"
#include "ensemble/agent/json.hpp"

namespace ensemble::orchestrator::detail {

namespace {

using namespace std::chrono_literals;

// How long the broker may take to acknowledge an event before it is published again.
constexpr auto k_publish_deadline = 5s;
constexpr auto k_journal_deadline = 5s;

}  // namespace

void agent_effects::call(outgoing_call c, response_callback done) {
  agent_.call_async(
      c.service, c.action, agent::to_json_payload(c.payload), c.timeout,
      [done = std::move(done)](agent::call_result r) {
        if (!r) {
          done(r.err());
          return;
        }
        auto payload = agent::from_json_payload(r->payload());
        done(response{payload ? std::move(*payload) : json(), r->worker(), r->seq()});
      },
      c.opts);
}

void agent_effects::publish(outgoing_event e, response_callback done) {
  agent_.publish_async(
      e.topic, agent::to_json_payload(e.payload), k_publish_deadline,
      [done = std::move(done)](agent::call_result r) {
        if (!r) {
          done(r.err());
          return;
        }
        done(response{json(), r->worker(), r->seq()});
      },
      e.opts);
}

common::result<json> agent_effects::journal(const std::string& correlation_id) {
  auto r =
      agent_.call("broker", "trace",
                  agent::to_json_payload({{"correlation_id", correlation_id}, {"payloads", true}}),
                  k_journal_deadline);
  if (!r) return r.err();
  return agent::from_json_payload(r->payload());
}

}  // namespace ensemble::orchestrator::detail
