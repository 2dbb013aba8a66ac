// ensemble-orchestrator: parses options and runs ensemble::orchestrator until SIGINT/SIGTERM,
// or validates definition files (--validate) and exits.
#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>
#include <iostream>

#include "ensemble/agent/agent.hpp"
#include "ensemble/common/curve_keys.hpp"
#include "ensemble/common/logging.hpp"
#include "ensemble/common/signals.hpp"
#include "ensemble/orchestrator/definition.hpp"
#include "ensemble/orchestrator/orchestrator.hpp"

namespace eo = ensemble::orchestrator;

namespace {
// Exit codes (docs/workflows.md, "The store"): 1 a definition fails --validate or the
// orchestrator cannot start, 2 bad configuration, 3 the store file is damaged.
constexpr int k_exit_config = 2;
constexpr int k_exit_store_damaged = 3;
// --key and --broker-key go together; their files are checked before anything starts, so that a
// mistake is one line naming the option and the file (exit 2), not a failed start.
void check_keys(eo::options& opts) {
  namespace ec = ensemble::common;
  if (opts.key_file.empty() != opts.broker_key.empty()) {
    throw ec::config_error(opts.key_file.empty() ? "--broker-key" : "--key",
                           "a secured broker needs both --key and --broker-key");
  }
  if (opts.key_file.empty()) return;
  ec::read_curve_key_file(opts.key_file, "--key", true);
  opts.broker_key = ec::read_public_key(opts.broker_key, "--broker-key");
}

}  // namespace

int main(int argc, char** argv) {
  // Block the stop signals before any thread exists, so that every thread inherits the mask
  // and the main thread alone receives them in wait_for_shutdown_signal().
  ensemble::common::block_stop_signals();

  eo::options opts;
  std::string log_level = "info";
  std::vector<std::string> validate;
  int timeout_ms = static_cast<int>(opts.default_timeout.count());
  std::string store_check = std::string(eo::to_string(opts.check_store));
  std::string store_sync = std::string(eo::to_string(opts.sync));
  std::string clock = std::string(eo::to_string(opts.clock));

  CLI::App app{"ensemble-orchestrator: runs JSON-defined workflows over an Ensemble broker"};
  app.add_option("--broker", opts.broker, "broker router endpoint")->capture_default_str();
  app.add_option("--events", opts.events, "broker events endpoint")->capture_default_str();
  app.add_option("--store", opts.store, "SQLite file for durable state, or :memory:")
      ->capture_default_str();
  app.add_option("--store-check", store_check,
                 "integrity check of the store file at start: quick, full or off")
      ->capture_default_str()
      ->check(CLI::IsMember({"quick", "full", "off"}));
  app.add_option("--store-max-size", opts.store_max_size,
                 "bytes the store file may grow to (0: no limit); beyond, as on a full disk")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--sync", store_sync,
                 "normal: a commit survives the process being killed; full: also a power loss "
                 "(fsync per commit)")
      ->capture_default_str()
      ->check(CLI::IsMember({"normal", "full"}));
  app.add_option("--clock", clock,
                 "wall, or virtual: workflow time moves only by the `advance` action (tests)")
      ->capture_default_str()
      ->check(CLI::IsMember({"wall", "virtual"}));
  app.add_option("--workflows", opts.workflows, "workflow definition files or directories");
  app.add_option("--name", opts.name, "agent name on the broker")->capture_default_str();
  app.add_option("--service", opts.service, "name of the admin service it offers")
      ->capture_default_str();
  app.add_option("--capacity", opts.capacity, "admin requests handled at once")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  app.add_option("--default-timeout", timeout_ms, "ms per attempt of command steps without one")
      ->capture_default_str()
      ->check(CLI::Range(1, 86'400'000));
  app.add_option("--validate", validate,
                 "check these definition files (and --workflows), print every problem, exit")
      ->expected(1, -1);
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off")
      ->capture_default_str();
  app.add_option("--key", opts.key_file,
                 "secured broker: this orchestrator's secret key file (NAME.key_secret)");
  app.add_option("--broker-key", opts.broker_key,
                 "secured broker: its public key, 40 characters or a key file");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help is 0; a bad command line is 2, as for `ensemble` (docs/workflows.md, exit codes).
    return app.exit(e) == 0 ? 0 : eo::k_usage_error;
  }

  try {
    ensemble::common::set_log_level(log_level);
    if (!validate.empty()) {
      // Sub-workflows may also come from --workflows. Exit codes: docs/workflows.md.
      validate.insert(validate.end(), opts.workflows.begin(), opts.workflows.end());
      return eo::validate_definition_files(validate, stdout, stderr);
    }
    check_keys(opts);
    opts.default_timeout = std::chrono::milliseconds(timeout_ms);
    opts.check_store = *eo::parse_store_check(store_check);
    opts.sync = *eo::parse_store_sync(store_sync);
    opts.clock = *eo::parse_clock_kind(clock);
    eo::orchestrator o(opts);
    if (auto s = o.start(); !s) {
      std::cerr << "ensemble-orchestrator: " << s.err().to_string() << "\n";
      return 1;
    }
    std::printf("ensemble-orchestrator ready name=%s service=%s store=%s\n", opts.name.c_str(),
                opts.service.c_str(), opts.store.c_str());
    std::fflush(stdout);
    ensemble::agent::wait_for_shutdown_signal();
    o.stop();
    return 0;
  } catch (const eo::store_damaged& e) {
    std::cerr << "ensemble-orchestrator: " << e.what() << "\n";
    return k_exit_store_damaged;
  } catch (const ensemble::common::config_error& e) {
    std::cerr << "ensemble-orchestrator: " << e.what() << "\n";
    return k_exit_config;
  }
}
