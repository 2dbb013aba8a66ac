// A worker process for the integration tests: serves one service whose every action behaves
// as --mode says, and prints a line when it starts handling a request so that a test can act
// (kill it, stop it) while the request is in flight.
//   echo: replies {worker, action, request}
//   hang: blocks until 200 ms past the request's deadline, then replies (a worker that is too slow)
//   fail: replies error {code: "test_failure", retryable: --retryable-errors}
#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>
#include <thread>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"

namespace ea = ensemble::agent;

int main(int argc, char** argv) {
  ea::options opts;
  std::string service = "Echo";
  std::string mode = "echo";
  std::uint32_t capacity = 1;
  bool retryable_errors = false;
  CLI::App app{"ensemble test worker"};
  app.add_option("--broker", opts.broker)->required();
  app.add_option("--events", opts.events)->required();
  app.add_option("--name", opts.name)->required();
  app.add_option("--service", service)->capture_default_str();
  app.add_option("--mode", mode)->check(CLI::IsMember({"echo", "hang", "fail"}));
  app.add_option("--capacity", capacity)->check(CLI::Range(1, 1000));
  app.add_flag("--retryable-errors", retryable_errors);
  CLI11_PARSE(app, argc, argv);

  ea::agent agent(opts);
  agent.handle(service, "*", [&](const ea::message& m) -> ea::handler_result {
    std::printf("handling %s.%s id=%s attempt=%u\n", m.service().c_str(), m.action().c_str(),
                m.id().c_str(), m.attempt());
    std::fflush(stdout);
    // Busy until clearly past the deadline, so that the broker answers first.
    if (mode == "hang") std::this_thread::sleep_until(m.deadline() + std::chrono::milliseconds(200));
    if (mode == "fail") {
      return ea::error{"test_failure", opts.name + " fails by design", retryable_errors};
    }
    auto request = ea::from_json_payload(m.payload());
    return ea::to_json_payload({{"worker", opts.name},
                                {"action", m.action()},
                                {"request", request ? *request : nlohmann::json()}});
  });
  agent.set_capacity(service, capacity);
  if (auto s = agent.start(); !s) {
    std::cerr << opts.name << ": " << s.err().to_string() << "\n";
    return 1;
  }
  std::printf("test-worker ready\n");
  std::fflush(stdout);
  ea::wait_for_shutdown_signal();
  agent.stop();
  return 0;
}
