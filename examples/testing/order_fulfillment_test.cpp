// Integration tests of the order-fulfillment deployment (examples/order-fulfillment), written
// the way a team would test its own services: the real broker, orchestrator and agents as
// processes, the deployment file they ship, and faults injected where the team fears them.
#include <gtest/gtest.h>

#include <ensemble/testkit/deployment.hpp>
#include <ensemble/testkit/event_recorder.hpp>
#include <ensemble/testkit/fault_proxy.hpp>
#include <ensemble/testkit/workflow_client.hpp>

namespace {

namespace tk = ensemble::testkit;
using json = nlohmann::json;
using namespace std::chrono_literals;

json order(const std::string& id, const std::string& sku) {
  return {{"orderId", id}, {"amount", 25}, {"items", json::array({{{"sku", sku}, {"qty", 1}}})}};
}

class order_fulfillment : public ::testing::Test {
 protected:
  // A fresh deployment per test, on its own ports; torn down (and its logs printed if the test
  // failed) when the test ends.
  void start() {
    deployment_.start();
    // connect_as(): the deployment is secured (security: curve), so the test's clients connect
    // with the keys of its `user` identity.
    events_ = std::make_unique<tk::event_recorder>(
        deployment_.connect_as(),
        std::vector<std::string>{"order.", "inventory.", "shipment.", "fulfillment.", "workflow."});
    workflows_ = std::make_unique<tk::workflow_client>(deployment_.connect_as());
  }

  tk::deployment deployment_ = tk::deployment::from_file(EXAMPLE_DEPLOYMENT);
  std::unique_ptr<tk::event_recorder> events_;
  std::unique_ptr<tk::workflow_client> workflows_;
};

TEST_F(order_fulfillment, a_paid_order_is_shipped_by_the_choreography) {
  start();
  auto done = workflows_->run("OrderFulfillment", order("A-1", "BOOK"), 30s);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "completed");
  const std::string id = done->at("id");
  // The events the services exchanged, in order, all correlated to the instance.
  EXPECT_TRUE(events_->expect_sequence(
      {tk::topic("order.paid").correlated(id), tk::topic("inventory.reserved").correlated(id),
       tk::topic("shipment.dispatched").correlated(id)},
      5s));
}

TEST_F(order_fulfillment, an_out_of_stock_order_is_refunded) {
  start();
  auto done = workflows_->run("OrderFulfillment", order("A-2", "OUT-OF-STOCK"), 30s);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "failed");
  EXPECT_EQ(done->at("steps").at("ChargePayment").at("status"), "compensated");
  EXPECT_TRUE(events_->expect_none(tk::topic("shipment.dispatched"), 200ms));
}

// Two payment agents; one is killed while orders are being placed. Every order still ships.
TEST_F(order_fulfillment, survives_losing_a_payment_agent) {
  deployment_.model().agents.at(0).replicas = 2;    // orders-1, orders-2
  deployment_.broker_args({"--heartbeat", "100"});  // lost workers noticed in 300 ms
  start();
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(workflows_->start("OrderFulfillment", order("B-" + std::to_string(i), "BOOK"),
                                  "b-" + std::to_string(i)));
    if (i == 5) deployment_.kill("orders-2");
  }
  for (int i = 0; i < 20; ++i) {
    auto done = workflows_->wait("b-" + std::to_string(i), 30s);
    ASSERT_TRUE(done) << done.err().to_string();
    EXPECT_EQ(done->at("status"), "completed") << done->dump(2);
  }
}

// The network delivers the shipment event to the orchestrator twice: the order completes once.
TEST_F(order_fulfillment, a_duplicated_shipment_event_completes_the_order_once) {
  // The fault proxy forwards messages, so it cannot sit inside an encrypted connection: this
  // test runs the deployment plain.
  deployment_.model().security.kind = ensemble::cli::security_section::mode::none;
  deployment_.through_proxy("orchestrator");
  start();
  tk::fault_rule twice;
  twice.chan = tk::channel::events;
  twice.topic_prefix = "shipment.dispatched";
  twice.duplicate = 1.0;
  deployment_.proxy("orchestrator").add_rule(twice);

  auto done = workflows_->run("OrderFulfillment", order("C-1", "BOOK"), 30s);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "completed");
  EXPECT_EQ(deployment_.proxy("orchestrator").stats().duplicated, 1U);
  const std::string id = done->at("id");
  const auto completed = tk::topic("workflow.OrderFulfillment.completed").correlated(id);
  ASSERT_TRUE(events_->expect(completed, 5s));
  EXPECT_TRUE(events_->expect_none(completed, 300ms));  // and no second one
}

}  // namespace
