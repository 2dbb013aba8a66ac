// The order-fulfillment example run secured (docs/deployments.md, "Security"): every process
// with its own key and derived rights, the workflow completes as in plain mode, and peers
// without the right key or the right are refused beside it (docs/protocol.md section 12).
#include <gtest/gtest.h>

#include <string>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/testkit/deployment.hpp"
#include "ensemble/testkit/event_recorder.hpp"
#include "ensemble/testkit/workflow_client.hpp"

namespace {

namespace tk = ensemble::testkit;
namespace ea = ensemble::agent;
using json = nlohmann::json;
using namespace std::chrono_literals;

const std::string k_example = std::string(ENSEMBLE_SOURCE_DIR) + "/examples/order-fulfillment";

json order(const std::string& id, const std::string& sku) {
  return {{"orderId", id}, {"items", json::array({{{"sku", sku}, {"qty", 1}}})}, {"amount", 42.5}};
}

}  // namespace

TEST(secured_deployment, the_example_runs_secured_and_refuses_who_has_no_right) {
  auto d = tk::deployment::from_file(k_example, {.secured = true});
  // A peer that may only publish shipment events, for the refusals below.
  d.identity("rogue", ensemble::cli::rights{.publish = {"shipment."}});
  d.start();
  ASSERT_TRUE(d.secured());

  tk::event_recorder rec(d.connect_as(), {"order.", "shipment."});
  tk::workflow_client wf(d.connect_as());
  auto done = wf.run("OrderFulfillment", order("s-1", "BOOK-1"), 30s);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "completed") << done->dump(2);
  // The events carry the identities the broker authenticated.
  const auto instance = done->at("id").get<std::string>();
  EXPECT_TRUE(rec.expect(
      tk::topic("shipment.dispatched").correlated(instance).where([](const tk::recorded_event& e) {
        return e.publisher == "shipping";
      }),
      10s));

  // A key the broker does not know: refused at the handshake, not a timeout.
  ea::agent stranger(d.connect_as_stranger());
  auto s = stranger.start();
  ASSERT_FALSE(s);
  EXPECT_EQ(s.err().code, "unauthorized") << s.err().to_string();

  // A client without keys cannot talk to a secured broker.
  auto plain_options = d.connect_as();
  plain_options.key_file.clear();
  plain_options.broker_key.clear();
  plain_options.start_timeout = 2s;
  ea::agent plain(plain_options);
  EXPECT_FALSE(plain.start());

  // A known identity without the right: its publish on order. is refused, on shipment. it
  // goes through; registering PaymentService is refused and the real worker keeps serving.
  ea::agent rogue(d.connect_as("rogue"));
  ASSERT_TRUE(rogue.start());
  auto forged = rogue.publish_acked("order.paid", ea::to_json_payload({{"orderId", "x"}}), 5s);
  ASSERT_FALSE(forged);
  EXPECT_EQ(forged.err().code, "unauthorized") << forged.err().to_string();
  auto allowed = rogue.publish_acked("shipment.note", ea::to_json_payload({{"orderId", "x"}}), 5s);
  EXPECT_TRUE(allowed) << allowed.err().to_string();

  ea::agent impostor(d.connect_as("rogue"));
  impostor.handle("PaymentService", "charge",
                  [](const ea::message&) -> ea::handler_result { return ea::bytes{}; });
  auto registered = impostor.start();
  ASSERT_FALSE(registered);
  EXPECT_EQ(registered.err().code, "unauthorized") << registered.err().to_string();

  auto again = wf.run("OrderFulfillment", order("s-2", "BOOK-2"), 30s);
  ASSERT_TRUE(again) << again.err().to_string();
  EXPECT_EQ(again->at("status"), "completed") << again->dump(2);
}
