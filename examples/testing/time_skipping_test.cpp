// Tests of a workflow that takes a week, run in well under a second: the trial deployment
// (trial/deployment.yaml) runs its orchestrator on a virtual clock (`clock: virtual`), and the
// test moves it with deployment::advance (docs/testing.md, "Time skipping").
#include <gtest/gtest.h>

#include <ensemble/agent/json.hpp>
#include <ensemble/testkit/deployment.hpp>
#include <ensemble/testkit/event_recorder.hpp>
#include <ensemble/testkit/workflow_client.hpp>

namespace {

namespace tk = ensemble::testkit;
using json = nlohmann::json;
using namespace std::chrono_literals;

class trial : public ::testing::Test {
 protected:
  void SetUp() override {
    deployment_.start();
    workflows_ = std::make_unique<tk::workflow_client>(deployment_.connect_as());
  }

  std::string step_status(const std::string& id, const std::string& step) {
    auto v = workflows_->get(id);
    return v ? v->at("steps").value(step, json::object()).value("status", "") : "";
  }

  tk::deployment deployment_ = tk::deployment::from_file(TRIAL_DEPLOYMENT);
  std::unique_ptr<tk::workflow_client> workflows_;
};

// Nobody converts: a day later the reminder, six days after it the goodbye.
TEST_F(trial, an_unconverted_trial_is_reminded_after_a_day_and_closed_after_a_week) {
  auto started = workflows_->start("Trial", {{"user", "ada"}}, "trial-ada");
  ASSERT_TRUE(started) << started.err().to_string();
  ASSERT_TRUE(tk::wait_until([&] { return step_status("trial-ada", "OneDay") == "running"; }, 30s));

  ASSERT_TRUE(deployment_.advance(23h));  // an hour short of the day: no reminder yet
  EXPECT_EQ(step_status("trial-ada", "OneDay"), "running");
  EXPECT_EQ(step_status("trial-ada", "Remind"), "");

  ASSERT_TRUE(deployment_.advance(1h));  // the day is over: the reminder goes out
  ASSERT_TRUE(
      tk::wait_until([&] { return step_status("trial-ada", "Converted") == "running"; }, 30s));

  ASSERT_TRUE(deployment_.advance(std::chrono::hours(6 * 24)));  // the rest of the week
  auto done = workflows_->wait("trial-ada", 30s);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "completed") << done->dump(2);
  EXPECT_EQ(done->at("output"), (json{{"sent", "goodbye"}, {"to", "ada"}}));
}

// The user converts on day three: the thank-you mail, no goodbye.
TEST_F(trial, a_trial_that_converts_is_thanked) {
  tk::event_recorder events(deployment_.connect_as(), {"workflow.Trial."});
  auto started = workflows_->start("Trial", {{"user", "bob"}}, "trial-bob");
  ASSERT_TRUE(started) << started.err().to_string();
  ASSERT_TRUE(tk::wait_until([&] { return step_status("trial-bob", "OneDay") == "running"; }, 30s));
  ASSERT_TRUE(deployment_.advance(24h));
  ASSERT_TRUE(
      tk::wait_until([&] { return step_status("trial-bob", "Converted") == "running"; }, 30s));
  ASSERT_TRUE(deployment_.advance(48h));

  auto client = std::make_unique<ensemble::agent::agent>(deployment_.connect_as());
  ASSERT_TRUE(client->start());
  ASSERT_TRUE(client->publish("trial.converted", ensemble::agent::to_json_payload(json::object()),
                              {.correlation_id = "trial-bob"}));
  auto done = workflows_->wait("trial-bob", 30s);
  ASSERT_TRUE(done) << done.err().to_string();
  EXPECT_EQ(done->at("status"), "completed") << done->dump(2);
  EXPECT_EQ(done->at("output"), (json{{"sent", "thanks"}, {"to", "bob"}}));
  EXPECT_TRUE(events.expect(tk::topic("workflow.Trial.completed").correlated("trial-bob"), 10s));
}

}  // namespace
