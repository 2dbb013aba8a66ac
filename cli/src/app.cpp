// The top-level app: global options and the subcommand families.
#include <cstdlib>
#include <iostream>

#include "ensemble/cli/cli.hpp"
#include "ensemble/common/logging.hpp"
#include "ensemble/common/result.hpp"

namespace ensemble::cli {

std::string context::events_endpoint() const {
  if (!events.empty()) return events;
  // tcp://host:PORT -> tcp://host:PORT+1, the broker's default layout (5555/5556).
  const auto colon = broker.rfind(':');
  if (broker.rfind("tcp://", 0) == 0 && colon != std::string::npos) {
    try {
      const int port = std::stoi(broker.substr(colon + 1));
      return broker.substr(0, colon + 1) + std::to_string(port + 1);
    } catch (const std::exception&) {
    }
  }
  return "tcp://127.0.0.1:5556";
}

int run(int argc, char** argv) {
  context ctx;
  if (const char* b = std::getenv("ENSEMBLE_BROKER")) ctx.broker = b;
  if (const char* e = std::getenv("ENSEMBLE_EVENTS")) ctx.events = e;
  if (ctx.broker.empty()) ctx.broker = "tcp://127.0.0.1:5555";
  ctx.log_level = "warn";

  CLI::App app{"ensemble: launch a deployment, drive and trace workflows, talk to the broker"};
  app.require_subcommand(1);
  app.add_option("--broker", ctx.broker, "broker router endpoint (env ENSEMBLE_BROKER)")
      ->capture_default_str();
  app.add_option("--events", ctx.events,
                 "broker events endpoint (env ENSEMBLE_EVENTS; default: router port + 1)");
  app.add_option("--log-level", ctx.log_level, "trace, debug, info, warn, error, off")
      ->capture_default_str();
  app.parse_complete_callback([&ctx] {
    try {
      common::set_log_level(ctx.log_level);
    } catch (const common::config_error& e) {
      throw CLI::ValidationError("--log-level", e.what());
    }
  });
  add_up_commands(app, ctx);
  add_agent_commands(app, ctx);
  add_workflow_commands(app, ctx);
  add_broker_commands(app, ctx);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  } catch (const common::config_error& e) {
    std::cerr << "ensemble: " << e.what() << "\n";
    return 2;
  }
  return ctx.exit_code;
}

}  // namespace ensemble::cli
