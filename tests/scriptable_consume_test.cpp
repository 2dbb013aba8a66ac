// Scriptable agents on durable streams (`consume:`): the reactions are fed by a durable
// consumer, so an event stored while the agent was down is reacted to when it comes back, and
// the reaction's events are stored under ids derived from the event's (a redelivery publishes
// nothing twice). Real broker with --data; in-process scriptable agents and SDK agents.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/cli/scriptable_agent.hpp"
#include "ensemble/common/result.hpp"
#include "ensemble/testkit/process.hpp"

namespace ea = ensemble::agent;
namespace ec = ensemble::cli;
namespace tk = ensemble::testkit;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

class scriptable_consume_test : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ensemble-scriptable-consume-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    std::ofstream(dir_ + "/streams.yaml")
        << "streams:\n  - name: orders\n    topics: [order., shipment.]\n";
    broker_ = tk::broker_process::start(
        {"--heartbeat", "200", "--data", dir_ + "/data", "--streams", dir_ + "/streams.yaml"});
  }
  void TearDown() override {
    broker_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::unique_ptr<ec::scriptable_agent> shipping() {
    auto a = std::make_unique<ec::scriptable_agent>(
        ec::parse_agent_spec(R"(
name: shipping
consume: {stream: orders, capacity: 4, ack_wait: 5s}
reactions:
  - on: order.paid
    publish:
      topic: shipment.dispatched
      payload: {orderId: "${event.payload.orderId}"}
)",
                             "shipping.yaml"),
        ec::connection{.broker = broker_->router(), .events = broker_->events(), .name = {}});
    auto s = a->start();
    EXPECT_TRUE(s) << (s ? "" : s.err().to_string());
    return a;
  }

  json admin(ea::agent& a, const std::string& action, const json& args) {
    auto r = a.call("broker", action, ea::to_json_payload(args), 5s);
    EXPECT_TRUE(r) << action << ": " << (r ? "" : r.err().to_string());
    if (!r) return json::object();
    auto body = ea::from_json_payload(r->payload());
    return body ? *body : json::object();
  }

  std::string dir_;
  std::unique_ptr<tk::broker_process> broker_;
};

TEST_F(scriptable_consume_test, an_event_stored_while_the_agent_was_down_is_reacted_to) {
  ea::agent shop(
      ea::options{.name = "shop", .broker = broker_->router(), .events = broker_->events()});
  ASSERT_TRUE(shop.start());
  { auto first = shipping(); }  // creates the consumer, then stops
  for (int i = 1; i <= 3; ++i) {
    ea::send_options o;
    o.id = "paid-" + std::to_string(i);
    o.correlation_id = "order-" + std::to_string(i);
    ASSERT_TRUE(shop.publish_acked("order.paid", ea::to_json_payload({{"orderId", i}}), 5s, o));
  }
  auto agent = shipping();
  std::vector<json> dispatched;
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto page = admin(shop, "stream_read", {{"name", "orders"}, {"from_seq", 4}});
        dispatched.clear();
        for (auto& r : page.value("records", json::array())) {
          if (r.value("topic", "") == "shipment.dispatched") dispatched.push_back(r);
        }
        return dispatched.size() == 3;
      },
      10s, 20ms));
  // Ids derived from the event's: a redelivery would publish the same ones, stored once. The
  // consumer has no ordered_by and the agent capacity 4, so the three reactions may run and
  // publish in any order: each is looked up by its id.
  for (int i = 1; i <= 3; ++i) {
    const std::string id = "shipping:paid-" + std::to_string(i) + ":0:0";
    const auto it = std::find_if(dispatched.begin(), dispatched.end(),
                                 [&](const json& r) { return r.value("id", "") == id; });
    ASSERT_NE(it, dispatched.end()) << "no " << id << " among " << json(dispatched).dump();
    EXPECT_EQ((*it)["header"]["correlation_id"], "order-" + std::to_string(i));
    EXPECT_EQ((*it)["header"]["causation_id"], "paid-" + std::to_string(i));
  }
  ASSERT_TRUE(tk::wait_until(
      [&] {
        auto info = admin(shop, "consumer_info", {{"stream", "orders"}, {"name", "shipping"}});
        return info.value("acked", 0) >= 3 && info.value("ack_pending", 1) == 0;
      },
      10s, 20ms));
}

TEST_F(scriptable_consume_test, a_consume_block_is_checked_with_file_and_path) {
  try {
    (void)ec::parse_agent_spec(
        "name: x\nconsume: {capacity: 0, stream: 'a b'}\nreactions:\n"
        "  - on: a.b\n    publish: {topic: c.d}\n",
        "x.yaml");
    FAIL() << "accepted";
  } catch (const std::exception& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("x.yaml"), std::string::npos) << m;
    EXPECT_NE(m.find("consume.stream"), std::string::npos) << m;
    EXPECT_NE(m.find("consume.capacity"), std::string::npos) << m;
  }
}

}  // namespace
