// The testkit's deployments, event recorder and workflow client, on real processes: the
// order-fulfillment example from its deployment file, and deployments built in code.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

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

const std::string k_fulfillment = std::string(ENSEMBLE_SOURCE_DIR) + "/examples/order-fulfillment";

json order(const std::string& id, const std::string& sku) {
  return {{"orderId", id}, {"items", json::array({{{"sku", sku}, {"qty", 1}}})}, {"amount", 42.5}};
}

// Running (a zombie waiting for its reaper does not count).
bool alive(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  if (!std::getline(stat, text)) return false;
  const auto close = text.rfind(')');
  return close != std::string::npos && close + 2 < text.size() && text[close + 2] != 'Z';
}

TEST(testkit_deployment, RunsTheMixedExampleFromItsFile) {
  auto d = tk::deployment::from_file(k_fulfillment);
  d.start();
  EXPECT_EQ(d.names(), (std::vector<std::string>{"broker", "orchestrator", "orders", "inventory",
                                                 "shipping", "notification"}));

  tk::event_recorder rec(d.connect_as(), {"order.", "inventory.", "shipment.", "fulfillment."});
  tk::workflow_client wf(d.connect_as());

  auto ok = wf.start("OrderFulfillment", order("o-1", "BOOK-1"), "o-1");
  ASSERT_TRUE(ok) << ok.err().to_string();
  auto done = wf.wait("o-1", 30s);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "completed") << done->dump(2);
  EXPECT_EQ(done->at("output").at("tracking"), "TRK-o-1");
  // The choreography, as the services published it, correlated to the instance.
  EXPECT_TRUE(rec.expect_sequence(
      {tk::topic("order.paid").correlated("o-1"), tk::topic("inventory.reserved").correlated("o-1"),
       tk::topic("shipment.dispatched").correlated("o-1")},
      10s));

  auto bad = wf.run("OrderFulfillment", order("o-2", "OUT-OF-STOCK"), 30s);
  ASSERT_TRUE(bad) << bad.err().to_string();
  EXPECT_EQ(bad->at("status"), "failed");
  EXPECT_EQ(bad->at("steps").at("ChargePayment").at("status"), "compensated") << bad->dump(2);
  EXPECT_TRUE(rec.expect(tk::topic("fulfillment.failed").where([](const tk::recorded_event& e) {
    return e.payload.value("reason", "") == "item out of stock";
  }),
                         5s));
  EXPECT_TRUE(rec.expect_none(
      tk::topic("shipment.dispatched").correlated(bad->at("id").get<std::string>()), 300ms));
}

TEST(testkit_deployment, ExpectationsExplainWhatWasRecordedInstead) {
  tk::deployment d;
  d.start();
  tk::event_recorder rec(d.connect_as(), {"news."});
  ea::agent publisher(ea::options{.name = "publisher", .broker = d.router(), .events = d.events()});
  ASSERT_TRUE(publisher.start());
  ASSERT_TRUE(publisher.publish_acked("news.sport", ea::to_json_payload({{"n", 1}}), 5s));

  auto missing = rec.expect(tk::topic("news.weather"), 50ms);
  EXPECT_FALSE(missing);
  EXPECT_NE(std::string(missing.message()).find("no event with topic news.weather"),
            std::string::npos)
      << missing.message();
  EXPECT_NE(std::string(missing.message()).find("news.sport"), std::string::npos)
      << missing.message();

  auto order_wrong =
      rec.expect_sequence({tk::topic("news.weather"), tk::topic("news.sport")}, 50ms);
  EXPECT_FALSE(order_wrong);
  EXPECT_NE(std::string(order_wrong.message()).find("matched 0 of 2"), std::string::npos)
      << order_wrong.message();

  // expect_none looks at what arrives during its window: the earlier event does not count,
  // one published during the window does.
  EXPECT_TRUE(rec.expect_none(tk::topic("news.sport"), 50ms));
  std::thread later([&] {
    (void)publisher.publish_acked("news.sport", ea::to_json_payload({{"n", 2}}), 5s);
  });
  auto seen = rec.expect_none(tk::topic("news."), 10s);
  later.join();
  EXPECT_FALSE(seen);
  EXPECT_EQ(rec.count(tk::topic("news.sport")), 2U);
}

// A deployment built in code, on ipc:// sockets, with a scriptable agent written inline; its
// processes can be killed, paused and restarted, the broker too.
TEST(testkit_deployment, BuiltInCodeOnIpcSurvivesRestarts) {
  tk::deployment d(tk::deployment_options{.transport = tk::transport::ipc});
  d.broker_args({"--heartbeat", "100"});
  d.scriptable_agent("echo", R"(name: echo
services:
  Echo:
    actions:
      say:
        reply: {said: "${request.text}"}
)");
  d.start();
  EXPECT_EQ(d.router().rfind("ipc://" + d.dir(), 0), 0U) << d.router();

  ea::agent client(ea::options{.name = "client", .broker = d.router(), .events = d.events()});
  ASSERT_TRUE(client.start());
  ea::send_options retryable;
  retryable.retryable = true;
  auto say = [&](const std::string& text) -> std::string {
    // Retryable: until the broker notices that a killed worker is gone (heartbeat x liveness),
    // it may dispatch to it; it then re-dispatches the request to the live one.
    auto r = client.call("Echo", "say", ea::to_json_payload({{"text", text}}), 5s, retryable);
    if (!r) return r.err().code;
    return ea::from_json_payload(r->payload())->value("said", "");
  };
  EXPECT_EQ(say("one"), "one");

  const pid_t first = d.proc("echo").pid();
  d.restart("echo");
  EXPECT_NE(d.proc("echo").pid(), first);
  EXPECT_FALSE(alive(first));
  EXPECT_EQ(say("two"), "two");

  // A paused agent holds its request; resumed, it answers it.
  d.pause("echo");
  EXPECT_NO_THROW(d.pause("echo"));  // already paused: returns at once
  auto pending = client.call_future("Echo", "say", ea::to_json_payload({{"text", "three"}}), 10s);
  EXPECT_EQ(pending.wait_for(200ms), std::future_status::timeout);
  d.resume("echo");
  EXPECT_NO_THROW(d.resume("echo"));  // already running: returns at once
  auto three = pending.get();
  ASSERT_TRUE(three) << three.err().to_string();

  // The broker comes back on the same ipc endpoints and the agent registers again.
  d.restart("broker");
  ASSERT_TRUE(tk::wait_until([&] { return say("four") == "four"; }, 15s, 50ms));
}

TEST(testkit_deployment, StartFailureNamesTheProcessAndShowsItsLog) {
  tk::deployment d(tk::deployment_options{.ready_timeout = 5s});
  d.agent("broken", "/bin/sh", {"-c", "echo 'cannot open config.yaml'; exit 4"}, {"Nothing"});
  try {
    d.start();
    FAIL() << "start() should have thrown";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("broken is not ready: exited with 4"), std::string::npos) << what;
    EXPECT_NE(what.find("cannot open config.yaml"), std::string::npos) << what;
  }
  EXPECT_THROW(d.proc("nobody"), std::invalid_argument);
}

TEST(testkit_deployment, LogsNameEachProcess) {
  auto d = tk::deployment::from_file(std::string(ENSEMBLE_SOURCE_DIR) + "/examples/cart");
  d.start();
  const std::string logs = d.logs(5);
  EXPECT_NE(logs.find("----- broker (pid"), std::string::npos) << logs;
  EXPECT_NE(logs.find("----- recommendation (pid"), std::string::npos) << logs;
  EXPECT_NE(logs.find("ensemble-agent ready"), std::string::npos) << logs;
}

// Fails on purpose, in a child test process (see the next test): a deployment held by a fixture
// member must print its processes' logs when the test fails.
class failing_with_deployment : public ::testing::Test {
 protected:
  tk::deployment d_ =
      tk::deployment::from_file(std::string(ENSEMBLE_SOURCE_DIR) + "/examples/cart");
};
TEST_F(failing_with_deployment, DISABLED_FailsOnPurpose) {
  if (std::getenv("ENSEMBLE_TESTKIT_FAIL") == nullptr) GTEST_SKIP() << "helper";
  d_.start();
  ADD_FAILURE() << "failing on purpose";
}

TEST(testkit_deployment, AFailedTestPrintsEachProcesssLog) {
  tk::process_options o;
  o.program = std::filesystem::read_symlink("/proc/self/exe").string();
  o.args = {"--gtest_filter=failing_with_deployment.DISABLED_FailsOnPurpose",
            "--gtest_also_run_disabled_tests"};
  o.env = {{"ENSEMBLE_TESTKIT_FAIL", "1"}};
  auto child = tk::process::spawn(o);
  ASSERT_TRUE(child->wait_for_line("FAILED TEST", 60s)) << child->tail();
  ASSERT_TRUE(child->wait_exit(30s).has_value());
  const std::string out = child->tail(200);
  EXPECT_NE(out.find("the test failed; each process's log:"), std::string::npos) << out;
  EXPECT_NE(out.find("----- broker (pid"), std::string::npos) << out;
  EXPECT_NE(out.find("----- recommendation (pid"), std::string::npos) << out;
  EXPECT_NE(out.find("ensemble-broker ready"), std::string::npos) << out;
}

// The body of the next test, run in a child test process (this binary, re-executed): it starts
// a deployment, prints the pids, and waits to be killed.
TEST(testkit_deployment, DISABLED_HolderForOrphanTest) {
  if (std::getenv("ENSEMBLE_TESTKIT_HOLD") == nullptr) GTEST_SKIP() << "helper of OrphanTest";
  auto d = tk::deployment::from_file(std::string(ENSEMBLE_SOURCE_DIR) + "/examples/cart");
  d.start();
  std::ostringstream pids;
  for (const auto& name : d.names()) pids << " " << d.proc(name).pid();
  std::printf("holding pids:%s\n", pids.str().c_str());
  std::fflush(stdout);
  for (;;) ::pause();  // until the parent test kills this process
}

TEST(testkit_deployment, NoOrphansWhenTheTestProcessIsKilled) {
  tk::process_options o;
  o.program = std::filesystem::read_symlink("/proc/self/exe").string();
  o.args = {"--gtest_filter=testkit_deployment.DISABLED_HolderForOrphanTest",
            "--gtest_also_run_disabled_tests"};
  o.env = {{"ENSEMBLE_TESTKIT_HOLD", "1"}};
  o.name = "holder";
  auto holder = tk::process::spawn(o);
  auto line = holder->wait_for_line("holding pids:", 30s);
  ASSERT_TRUE(line) << holder->tail();
  std::vector<pid_t> pids;
  std::istringstream in(line->substr(line->find(':') + 1));
  for (pid_t p = 0; in >> p;) pids.push_back(p);
  ASSERT_EQ(pids.size(), 3U) << *line;  // broker, recommendation, inventory
  for (pid_t p : pids) EXPECT_TRUE(alive(p));

  holder->kill();
  ASSERT_TRUE(holder->wait_exit(10s));
  for (pid_t p : pids) {
    EXPECT_TRUE(tk::wait_until([&] { return !alive(p); }, 10s))
        << "pid " << p << " outlived the test";
  }
}

}  // namespace
