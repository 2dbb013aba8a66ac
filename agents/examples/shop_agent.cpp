// Example agent: subscribes to `inventory.`, calls InventoryService.reserve (a command), prints
// the reply, then the event the inventory published while handling it — both carry the same
// correlation id. With --orders N it places N orders and exits; otherwise it keeps listening.
#include <CLI/CLI.hpp>
#include <condition_variable>
#include <cstdio>
#include <iostream>
#include <mutex>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"

namespace ea = ensemble::agent;
using nlohmann::json;

int main(int argc, char** argv) {
  ea::options opts;
  opts.name = "shop";
  int orders = 1;
  bool keep_running = false;
  CLI::App app{"Example agent: calls InventoryService.reserve and listens to inventory events"};
  app.add_option("--broker", opts.broker, "broker router endpoint")->capture_default_str();
  app.add_option("--events", opts.events, "broker events endpoint")->capture_default_str();
  // A secured broker (docs/protocol.md section 12); `ensemble up` sets both variables.
  app.add_option("--key", opts.key_file, "this agent's secret key file")->envname("ENSEMBLE_KEY");
  app.add_option("--broker-key", opts.broker_key, "the broker's public key, or its key file")
      ->envname("ENSEMBLE_BROKER_KEY");
  app.add_option("--orders", orders, "orders to place")
      ->capture_default_str()
      ->check(CLI::Range(0, 1'000'000));
  app.add_flag("--keep-running", keep_running, "stay up after the orders, until SIGINT/SIGTERM");
  CLI11_PARSE(app, argc, argv);

  ea::agent agent(opts);
  std::mutex mutex;
  std::condition_variable cv;
  int events_seen = 0;
  (void)agent.subscribe("inventory.", [&](const ea::message& e) {
    auto body = ea::from_json_payload(e.payload());
    std::printf("[shop] event   %s seq=%llu from %s correlation=%s causation=%s: %s\n",
                e.topic().c_str(), static_cast<unsigned long long>(e.seq()), e.publisher().c_str(),
                e.correlation_id().c_str(), e.causation_id().c_str(),
                body ? body->dump().c_str() : "<undecodable>");
    std::fflush(stdout);
    std::lock_guard lock(mutex);
    ++events_seen;
    cv.notify_all();
  });
  if (auto s = agent.start(); !s) {
    std::cerr << "shop: " << s.err().to_string() << "\n";
    return 1;
  }

  int failures = 0;
  for (int i = 1; i <= orders; ++i) {
    json order = {{"sku", "blue-widget"}, {"quantity", i}};
    std::printf("[shop] command InventoryService.reserve %s\n", order.dump().c_str());
    auto reply = agent.call("InventoryService", "reserve", ea::to_json_payload(order),
                            std::chrono::seconds(5));
    if (!reply) {
      std::printf("[shop] error   %s\n", reply.err().to_string().c_str());
      ++failures;
      continue;
    }
    auto body = ea::from_json_payload(reply->payload());
    std::printf("[shop] reply   from %s id=%s correlation=%s: %s\n", reply->worker().c_str(),
                reply->id().c_str(), reply->correlation_id().c_str(),
                body ? body->dump().c_str() : "<undecodable>");
    std::fflush(stdout);
  }
  {
    // Wait (bounded) for the events the reservations caused.
    std::unique_lock lock(mutex);
    const int expected = orders - failures;
    if (!cv.wait_for(lock, std::chrono::seconds(5), [&] { return events_seen >= expected; })) {
      std::printf("[shop] only %d of %d events arrived within 5 s\n", events_seen, expected);
      ++failures;
    }
  }
  if (keep_running) ea::wait_for_shutdown_signal();
  agent.stop();
  return failures == 0 ? 0 : 1;
}
