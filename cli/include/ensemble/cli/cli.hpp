#pragma once
// The `ensemble` command line: one binary whose subcommands launch a local deployment (`up`),
// run scriptable agents (`agent`), drive and inspect workflows (`validate`, `run`, `status`,
// `list`, `cancel`, `trace`, `graph`) and talk to the broker (`services`, `events`,
// `publish`, `call`, and the durable streams' `streams`, `consumers`, `dlq`).
//
// Each family of subcommands lives in its own source file and registers itself on the CLI11
// app through one add_*_commands() function; main.cpp only calls run(). A subcommand reports
// its outcome through context::exit_code: 0 for success, 1 when what was asked for did not
// happen (a workflow that failed, a call answered with an error), 2 for bad input (arguments,
// files) — always with a message on stderr naming what is wrong. SIGINT or SIGTERM ends any
// command but `up` and `agent` at once with 130 or 143 (client.hpp, exit_on_stop_signal).

#include <CLI/CLI.hpp>
#include <string>

namespace ensemble::cli {

// Options every subcommand shares, filled before its callback runs.
struct context {
  // --broker, else ENSEMBLE_BROKER, else the endpoints a running `ensemble up` recorded in
  // .ensemble/up.json in the working directory, else tcp://127.0.0.1:5555.
  std::string broker;
  std::string events;     // --events, ENSEMBLE_EVENTS, the run file; else the broker's port + 1
  std::string log_level;  // --log-level; default warn
  // Where `broker` came from, for error messages: "--broker", "ENSEMBLE_BROKER", the run
  // file's path, or empty for the default.
  std::string broker_source;
  // Set when the run file cannot be used (its `up` is gone, it is not a run file): the reason,
  // naming the file. Commands that need the broker report it instead of connecting.
  std::string broker_problem;
  // Secured mode (docs/agents.md, "Keys"): this process's secret key file (--key, else
  // ENSEMBLE_KEY, else the run file's `key`) and the broker's public key (--broker-key, else
  // ENSEMBLE_BROKER_KEY, else the run file's `broker_key`), both empty for a plain broker.
  // Checked once the command line is parsed, for commands that connect: `broker_key` is then the
  // 40 Z85 characters, whichever form was given.
  std::string key_file;
  std::string broker_key;
  std::string key_source;         // "--key", "ENSEMBLE_KEY" or the run file's path
  std::string broker_key_source;  // "--broker-key", "ENSEMBLE_BROKER_KEY" or the run file's path
  int exit_code = 0;

  // The events endpoint to use: `events` if given, else derived from `broker`.
  std::string events_endpoint() const;
};

void add_up_commands(CLI::App& app, context& ctx);     // up
void add_key_commands(CLI::App& app, context& ctx);    // keygen
void add_agent_commands(CLI::App& app, context& ctx);  // agent
void add_workflow_commands(CLI::App& app,
                           context& ctx);  // validate run status list cancel trace graph
void add_broker_commands(CLI::App& app, context& ctx);  // services events publish call
                                                        // streams consumers dlq

// Parses argv, runs the chosen subcommand, returns the process exit code.
int run(int argc, char** argv);

}  // namespace ensemble::cli
