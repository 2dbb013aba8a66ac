// Example agent for the order examples (examples/order-processing, examples/order-fulfillment):
// serves OrderService.validate, PaymentService.charge / refund and NotificationService.send.
//
// It shows what a well-behaved service does with the orchestrator's delivery guarantee
// (at least once): it remembers each idempotency key it has answered, so a command re-sent
// after an orchestrator restart gets the same answer without charging twice.
#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <functional>
#include <future>
#include <iostream>
#include <map>
#include <mutex>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/common/signals.hpp"

namespace ea = ensemble::agent;
using nlohmann::json;

namespace {

// Answers a repeated idempotency key with the first answer. A duplicate that arrives while the
// first is still being handled (the broker can deliver both at once, to two handler threads)
// waits for that answer instead of running the effect a second time.
class dedupe {
 public:
  ea::handler_result run(const ea::message& m, const std::function<ea::handler_result()>& f) {
    const std::string& key = m.idempotency_key();
    if (key.empty()) return f();
    std::promise<ea::handler_result> mine;
    std::shared_future<ea::handler_result> answer;
    bool first = false;
    {
      std::lock_guard lock(mutex_);
      auto [it, inserted] = seen_.try_emplace(key);
      if (inserted) it->second = mine.get_future().share();
      answer = it->second;
      first = inserted;
    }
    if (first) {
      try {
        mine.set_value(f());
      } catch (...) {
        mine.set_exception(std::current_exception());  // the SDK answers handler_failed
      }
    }
    return answer.get();
  }

 private:
  std::mutex mutex_;
  std::map<std::string, std::shared_future<ea::handler_result>> seen_;
};

void say(const char* what, const ea::message& m, const std::string& detail) {
  std::printf("[orders] %s %s (instance %s, key %s)\n", what, detail.c_str(),
              m.correlation_id().c_str(), m.idempotency_key().c_str());
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  ensemble::common::block_stop_signals();  // before any thread: all of them inherit it

  ea::options opts;
  opts.name = "orders";
  double limit = 1000;
  CLI::App app{"Example agent: OrderService, PaymentService, NotificationService"};
  app.add_option("--broker", opts.broker, "broker router endpoint")->capture_default_str();
  app.add_option("--events", opts.events, "broker events endpoint")->capture_default_str();
  // A secured broker (docs/protocol.md section 12); `ensemble up` sets both variables.
  app.add_option("--key", opts.key_file, "this agent's secret key file")->envname("ENSEMBLE_KEY");
  app.add_option("--broker-key", opts.broker_key, "the broker's public key, or its key file")
      ->envname("ENSEMBLE_BROKER_KEY");
  app.add_option("--name", opts.name, "agent name")->capture_default_str();
  app.add_option("--limit", limit, "charges above this amount are declined")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  ea::agent agent(opts);
  dedupe once;
  std::atomic<int> transactions{0};

  agent.handle("OrderService", "validate", [&](const ea::message& m) -> ea::handler_result {
    auto in = ea::from_json_payload(m.payload());
    if (!in) return in.err();
    // The seed workflow sends the default input ({workflow: {input}, steps}); mapped steps send
    // the order itself. Accept both.
    const json order = in->contains("workflow") ? (*in)["workflow"]["input"] : *in;
    if (!order.is_object() || !order.contains("orderId")) {
      return ea::error{"invalid_order", "an order needs an orderId", false};
    }
    say("validated", m, order["orderId"].dump());
    return ea::to_json_payload({{"orderId", order["orderId"]}, {"valid", true}});
  });
  agent.handle("PaymentService", "charge", [&](const ea::message& m) -> ea::handler_result {
    return once.run(m, [&]() -> ea::handler_result {
      auto in = ea::from_json_payload(m.payload());
      if (!in) return in.err();
      const json order = in->contains("workflow") ? (*in)["workflow"]["input"] : *in;
      const double amount = order.value("amount", 0.0);
      if (amount > limit) {
        return ea::error{"card_declined", "amount " + std::to_string(amount) + " is over the limit",
                         false};
      }
      const std::string tx = "tx-" + std::to_string(++transactions);
      say("charged", m, order.value("orderId", json()).dump() + " " + tx);
      return ea::to_json_payload({{"transactionId", tx}, {"amount", amount}});
    });
  });
  agent.handle("PaymentService", "refund", [&](const ea::message& m) -> ea::handler_result {
    return once.run(m, [&]() -> ea::handler_result {
      auto in = ea::from_json_payload(m.payload());
      if (!in) return in.err();
      say("refunded", m, in->value("transactionId", json()).dump());
      return ea::to_json_payload({{"refunded", in->value("transactionId", json())}});
    });
  });
  agent.handle("NotificationService", "send", [&](const ea::message& m) -> ea::handler_result {
    say("notified", m, "customer");
    return ea::to_json_payload({{"sent", true}});
  });
  for (const char* s : {"OrderService", "PaymentService", "NotificationService"}) {
    agent.set_capacity(s, 8);
  }
  if (auto s = agent.start(); !s) {
    std::cerr << "orders: " << s.err().to_string() << "\n";
    return 1;
  }
  std::printf("[orders] ready: OrderService, PaymentService, NotificationService\n");
  std::fflush(stdout);
  ea::wait_for_shutdown_signal();
  agent.stop();
  return 0;
}
