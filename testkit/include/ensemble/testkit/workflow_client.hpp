#pragma once
// Runs workflows on a deployment's orchestrator and waits for their outcome:
//
//   testkit::workflow_client wf(d.router(), d.events());
//   auto started = wf.start("OrderFulfillment", {{"orderId", "o-1"}}, "o-1");
//   auto done = wf.wait(started->at("id"), 30s);      // the instance's `get` view
//   EXPECT_EQ(done->at("status"), "completed");
//
// It speaks the orchestrator service (docs/workflows.md, "The orchestrator service") through an
// SDK agent. Calls that fail for a retryable reason (the orchestrator restarting, the broker
// restarting) are retried until their deadline, so a start with an `id` is safe to repeat.

#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "ensemble/agent/agent.hpp"
#include "ensemble/common/result.hpp"

namespace ensemble::testkit {

class workflow_client {
 public:
  // Throws std::runtime_error if the broker cannot be reached within `deadline`.
  workflow_client(const std::string& router, const std::string& events,
                  std::string service = "orchestrator",
                  std::chrono::milliseconds deadline = std::chrono::seconds(10));
  // Connected as `connect` says: a secured deployment's deployment::connect_as().
  explicit workflow_client(const agent::options& connect, std::string service = "orchestrator",
                           std::chrono::milliseconds deadline = std::chrono::seconds(10));
  ~workflow_client();
  workflow_client(const workflow_client&) = delete;
  workflow_client& operator=(const workflow_client&) = delete;

  // Any action of the orchestrator service.
  common::result<nlohmann::json> call(
      const std::string& action, const nlohmann::json& args,
      std::chrono::milliseconds deadline = std::chrono::seconds(10));
  // Starts an instance (idempotent when `id` is given); returns {id, workflow, version, status}.
  common::result<nlohmann::json> start(
      const std::string& workflow, const nlohmann::json& input, const std::string& id = {},
      std::chrono::milliseconds deadline = std::chrono::seconds(10));
  common::result<nlohmann::json> get(const std::string& id,
                                     std::chrono::milliseconds deadline = std::chrono::seconds(10));
  // Waits until the instance has ended (completed, failed, cancelled, timed_out) and returns
  // its `get` view; an error `deadline_exceeded` naming its last status otherwise.
  common::result<nlohmann::json> wait(const std::string& id, std::chrono::milliseconds deadline);
  // start + wait.
  common::result<nlohmann::json> run(const std::string& workflow, const nlohmann::json& input,
                                     std::chrono::milliseconds deadline);

  static bool ended(const std::string& status);

 private:
  std::string service_;
  std::unique_ptr<agent::agent> agent_;
};

}  // namespace ensemble::testkit
