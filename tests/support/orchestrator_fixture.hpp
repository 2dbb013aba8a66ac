#pragma once
// Shared set-up for the orchestrator's integration tests: a real broker process, definition
// files in a fresh temp dir, in-process SDK agents and an in-process orchestrator (or the
// ensemble-orchestrator executable, for crash tests). Events are recorded with
// testkit::event_recorder.
#include <gtest/gtest.h>

#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "ensemble/agent/agent.hpp"
#include "ensemble/agent/json.hpp"
#include "ensemble/orchestrator/orchestrator.hpp"
#include "ensemble/testkit/event_recorder.hpp"
#include "ensemble/testkit/process.hpp"

namespace ensemble::test {

namespace ea = ensemble::agent;
namespace eo = ensemble::orchestrator;
namespace tk = ensemble::testkit;
using json = nlohmann::json;
using namespace std::chrono_literals;

class orchestrator_fixture : public ::testing::Test {
 protected:
  void SetUp() override {
    broker_ = tk::broker_process::start({"--heartbeat", "200", "--log-level", "warn"});
    char tmpl[] = "/tmp/ensemble-orch-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    orchestrator_.reset();
    agents_.clear();
    if (HasFailure() && broker_) std::cerr << "broker log:\n" << broker_->proc().tail(20);
    broker_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::string write(const std::string& file, const json& doc) {
    const auto path = dir_ + "/" + file;
    std::ofstream(path) << doc.dump(2);
    return path;
  }

  // A started agent; `setup` registers handlers before start.
  ea::agent& add_agent(const std::string& name, const std::function<void(ea::agent&)>& setup,
                       bool inline_handlers = false) {
    ea::options o{.name = name, .broker = broker_->router(), .events = broker_->events()};
    o.inline_handlers = inline_handlers;
    auto a = std::make_unique<ea::agent>(o);
    setup(*a);
    auto s = a->start();
    EXPECT_TRUE(s) << (s ? "" : s.err().to_string());
    agents_.push_back(std::move(a));
    return *agents_.back();
  }

  eo::orchestrator& start_orchestrator(std::vector<std::string> workflows,
                                       std::string store = ":memory:") {
    eo::options o;
    o.broker = broker_->router();
    o.events = broker_->events();
    o.store = std::move(store);
    o.workflows = std::move(workflows);
    orchestrator_ = std::make_unique<eo::orchestrator>(o);
    auto s = orchestrator_->start();
    EXPECT_TRUE(s) << (s ? "" : s.err().to_string());
    return *orchestrator_;
  }

  std::string start(const std::string& workflow, json input) {
    auto r = orchestrator_->request("start", {{"workflow", workflow}, {"input", std::move(input)}});
    EXPECT_TRUE(r) << (r ? "" : r.err().to_string());
    return r ? (*r)["id"].get<std::string>() : std::string();
  }

  // Polls the instance until it reaches a terminal status; returns its view.
  json wait_done(const std::string& id, std::chrono::milliseconds deadline = 15s) {
    json last;
    tk::wait_until(
        [&] {
          auto r = orchestrator_->request("get", {{"id", id}});
          if (!r) return false;
          last = *r;
          const std::string s = last["status"];
          return s != "running" && s != "compensating";
        },
        deadline, 10ms);
    return last;
  }

  // Polls the instance until its step `step` waits for an event (phase "awaiting").
  bool wait_awaiting(const std::string& id, const std::string& step,
                     std::chrono::milliseconds deadline = 10s) {
    const json::json_pointer phase("/steps/" + step + "/waiting/phase");
    return tk::wait_until(
        [&] {
          auto v = orchestrator_->request("get", {{"id", id}});
          return v && v->value(phase, "") == "awaiting";
        },
        deadline, 10ms);
  }

  std::unique_ptr<tk::broker_process> broker_;
  std::string dir_;
  std::vector<std::unique_ptr<ea::agent>> agents_;
  std::unique_ptr<eo::orchestrator> orchestrator_;
};

}  // namespace ensemble::test
