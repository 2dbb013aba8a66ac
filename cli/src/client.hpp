#pragma once
// A short-lived SDK agent for one CLI command: calls with JSON in and out, every call with a
// deadline, errors as results that the command prints.
#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "ensemble/agent/agent.hpp"
#include "ensemble/cli/cli.hpp"

namespace ensemble::cli {

using json = nlohmann::json;

class client {
 public:
  explicit client(const context& ctx,
                  std::chrono::milliseconds start_timeout = std::chrono::seconds(5));
  // Connects; the error names the endpoint.
  common::status start();
  common::result<json> call(const std::string& service, const std::string& action, const json& args,
                            std::chrono::milliseconds deadline, bool retryable = true);
  agent::agent& sdk() { return *agent_; }

 private:
  const context& ctx_;
  std::unique_ptr<agent::agent> agent_;
};

// Ctrl-C for commands that wait (events, run --wait, call): blocks SIGINT and SIGTERM in the
// calling thread, before any other thread exists (they inherit the mask), and starts a thread
// that takes them and ends the process at once with 128 + the signal (130, 143), stdout
// flushed. Call it first, from the main thread.
void exit_on_stop_signal();

// Prints "ensemble: <what>: <code>: <message>" on stderr; returns 1.
int report(const std::string& what, const common::error& e);
// JSON from a command-line argument: inline JSON, or @file. Throws common::config_error.
json parse_json_arg(const std::string& what, const std::string& text);
// "1.5s", "250ms", "2m" -> milliseconds; throws CLI::ValidationError naming the option.
std::chrono::milliseconds parse_duration_arg(const std::string& option, const std::string& text);

}  // namespace ensemble::cli

namespace ensemble::cli {
// `ensemble trace ID` (trace.cpp), registered by add_workflow_commands.
void add_trace_command(CLI::App& app, context& ctx);
}  // namespace ensemble::cli
