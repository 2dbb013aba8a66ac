// `ensemble agent SPEC.yaml`: runs a scriptable agent (scriptable_agent.hpp, docs/agents.md).
#include <pthread.h>

#include <csignal>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

#include "ensemble/agent/agent.hpp"
#include "ensemble/cli/cli.hpp"
#include "ensemble/cli/scriptable_agent.hpp"
#include "ensemble/common/result.hpp"
#include "ensemble/common/signals.hpp"

namespace ensemble::cli {
namespace {

struct agent_args {
  std::string spec;
  std::string name;
  bool check = false;
};

int run_agent(const agent_args& args, const context& ctx) {
  agent_spec spec;
  try {
    spec = load_agent_spec(args.spec);
  } catch (const common::config_error& e) {
    std::cerr << "ensemble agent: " << e.what() << "\n";
    return 2;
  }
  if (args.check) {
    std::cout << args.spec << ": ok (name=" << (args.name.empty() ? spec.name : args.name) << ", "
              << spec.services.size() << " services, " << spec.reactions.size() << " reactions)\n";
    return 0;
  }
  if (!ctx.broker_problem.empty()) {
    std::cerr << "ensemble agent: " << ctx.broker_problem << "\n";
    return 1;
  }
  // SIGINT/SIGTERM are blocked before any thread starts, so that every thread inherits the mask
  // and the signal is taken by wait_for_shutdown_signal() below, on this thread.
  common::block_stop_signals();

  scriptable_agent a(std::move(spec), {.broker = ctx.broker,
                                       .events = ctx.events_endpoint(),
                                       .name = args.name,
                                       .key_file = ctx.key_file,
                                       .broker_key = ctx.broker_key});
  if (auto s = a.start(); !s) {
    std::cerr << "ensemble agent: " << args.spec << ": cannot start: " << s.err().to_string()
              << "\n";
    return 1;
  }
  std::printf("%s\n", a.ready_line().c_str());
  std::fflush(stdout);
  agent::wait_for_shutdown_signal();
  a.stop();
  return 0;
}

}  // namespace

void add_agent_commands(CLI::App& app, context& ctx) {
  auto args = std::make_shared<agent_args>();
  auto* cmd = app.add_subcommand("agent",
                                 "run a scriptable agent declared in a YAML spec (docs/agents.md)");
  cmd->footer(
      "The spec declares services and actions (reply templates, latency, failure injection, "
      "crash after N calls, events published while handling) and reactions to events (after a "
      "delay, publish other events). Once registered with the broker the agent prints\n"
      "  ensemble-agent ready name=NAME services=A,B\n"
      "and runs until SIGINT or SIGTERM, then exits 0. A bad spec is reported on stderr with "
      "the file and the YAML path of the problem, exit code 2; a broker that cannot be reached "
      "within 5 s, or that refuses its key (`unauthorized`), exit code 1. For a secured broker "
      "give "
      "--key and --broker-key (or ENSEMBLE_KEY and ENSEMBLE_BROKER_KEY): the agent's name (the "
      "spec's, or --name) must then be its key's identity in the broker's auth file.");
  cmd->add_option("spec", args->spec, "the agent spec (YAML)")->required();
  cmd->add_option("--name", args->name, "agent name (overrides the spec's `name`)");
  cmd->add_flag("--check", args->check, "validate the spec and exit without connecting");
  cmd->callback([args, &ctx] { ctx.exit_code = run_agent(*args, ctx); });
}

}  // namespace ensemble::cli
