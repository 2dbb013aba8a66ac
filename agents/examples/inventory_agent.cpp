// Example agent: serves InventoryService.reserve and publishes `inventory.reserved` for every
// reservation, so that other services can react without being called (choreography).
#include <CLI/CLI.hpp>
#include <atomic>
#include <cstdio>
#include <iostream>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"

namespace ea = ensemble::agent;
using nlohmann::json;

int main(int argc, char** argv) {
  ea::options opts;
  opts.name = "inventory";
  CLI::App app{"Example agent: InventoryService.reserve, publishes inventory.reserved"};
  app.add_option("--broker", opts.broker, "broker router endpoint")->capture_default_str();
  app.add_option("--events", opts.events, "broker events endpoint")->capture_default_str();
  // A secured broker (docs/protocol.md section 12); `ensemble up` sets both variables.
  app.add_option("--key", opts.key_file, "this agent's secret key file")->envname("ENSEMBLE_KEY");
  app.add_option("--broker-key", opts.broker_key, "the broker's public key, or its key file")
      ->envname("ENSEMBLE_BROKER_KEY");
  app.add_option("--name", opts.name, "agent name")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  ea::agent agent(opts);
  std::atomic<int> stock{100};
  agent.handle("InventoryService", "reserve", [&](const ea::message& m) -> ea::handler_result {
    auto request = ea::from_json_payload(m.payload());
    if (!request) return request.err();
    const std::string sku = request->value("sku", "");
    const int quantity = request->value("quantity", 1);
    if (sku.empty()) return ea::error{"invalid_input", "'sku' is required", false};
    if (quantity <= 0 || stock.fetch_sub(quantity) < quantity) {
      return ea::error{"out_of_stock", "cannot reserve " + std::to_string(quantity) + " x " + sku,
                       false};
    }
    json reservation = {{"sku", sku}, {"quantity", quantity}, {"left", stock.load()}};
    // Published while handling the request: carries its correlation id, caused by it.
    if (auto p = agent.publish("inventory.reserved", ea::to_json_payload(reservation)); !p) {
      return p.err();
    }
    std::printf("[inventory] reserved %d x %s (correlation %s)\n", quantity, sku.c_str(),
                m.correlation_id().c_str());
    std::fflush(stdout);
    return ea::to_json_payload(reservation);
  });
  agent.set_capacity("InventoryService", 4);

  if (auto s = agent.start(); !s) {
    std::cerr << "inventory: " << s.err().to_string() << "\n";
    return 1;
  }
  std::printf("[inventory] ready: serving InventoryService.reserve\n");
  std::fflush(stdout);
  ea::wait_for_shutdown_signal();
  agent.stop();
  return 0;
}
