#include "ensemble/testkit/workflow_client.hpp"

#include <stdexcept>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/testkit/process.hpp"
#include "own_agent.hpp"

namespace ensemble::testkit {

namespace {

using detail::left_until;
using steady = std::chrono::steady_clock;
using json = nlohmann::json;
using namespace std::chrono_literals;

// Between retries of a call that failed for a retryable reason (nobody serves the orchestrator
// service while it restarts), and between polls of an instance that has not ended.
constexpr auto k_retry_interval = 20ms;
constexpr auto k_poll_interval = 20ms;

}  // namespace

workflow_client::workflow_client(const std::string& router, const std::string& events,
                                 std::string service, std::chrono::milliseconds deadline)
    : service_(std::move(service)) {
  agent_ = detail::start_own_agent("client", router, events, deadline);
}

workflow_client::workflow_client(const agent::options& connect, std::string service,
                                 std::chrono::milliseconds deadline)
    : service_(std::move(service)) {
  agent_ = detail::start_own_agent("client", connect, deadline);
}

workflow_client::~workflow_client() {
  agent_->stop(0ms);
}

bool workflow_client::ended(const std::string& status) {
  return status == "completed" || status == "failed" || status == "cancelled" ||
         status == "timed_out";
}

common::result<json> workflow_client::call(const std::string& action, const json& args,
                                           std::chrono::milliseconds deadline) {
  const auto until = steady::now() + deadline;
  // The condition: an answer, or a failure worth no retry (a retryable one — the orchestrator
  // or the broker coming back — is asked again until the deadline).
  common::result<json> last = common::error::make("deadline_exceeded", "not asked yet");
  wait_until(
      [&] {
        auto r = agent_->call(service_, action, agent::to_json_payload(args),
                              std::max(left_until(until), 1ms));
        if (!r) {
          last = r.err();
          return !r.err().retryable;
        }
        last = agent::from_json_payload(r->payload());
        return true;
      },
      deadline, k_retry_interval);
  return last;
}

common::result<json> workflow_client::start(const std::string& workflow, const json& input,
                                            const std::string& id,
                                            std::chrono::milliseconds deadline) {
  json args = {{"workflow", workflow}, {"input", input}};
  if (!id.empty()) args["id"] = id;
  return call("start", args, deadline);
}

common::result<json> workflow_client::get(const std::string& id,
                                          std::chrono::milliseconds deadline) {
  return call("get", {{"id", id}}, deadline);
}

common::result<json> workflow_client::wait(const std::string& id,
                                           std::chrono::milliseconds deadline) {
  const auto until = steady::now() + deadline;
  std::string status = "unknown";
  common::result<json> last = common::error::make("deadline_exceeded", "not asked yet");
  const bool done = wait_until(
      [&] {
        last = get(id, std::max(left_until(until), 1ms));
        if (!last) return !last.err().retryable;
        status = last->value("status", "");
        return ended(status);
      },
      deadline, k_poll_interval);
  if (done) return last;
  return common::error::make("deadline_exceeded",
                             "instance " + id + " has not ended; last status: " + status);
}

common::result<json> workflow_client::run(const std::string& workflow, const json& input,
                                          std::chrono::milliseconds deadline) {
  const auto until = steady::now() + deadline;
  auto started = start(workflow, input, {}, deadline);
  if (!started) return started.err();
  return wait(started->value("id", ""), left_until(until));
}

}  // namespace ensemble::testkit
