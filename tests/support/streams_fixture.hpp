#pragma once
// A real ensemble-broker with --data in a temporary directory, a raw DEALER client, and the
// broker.stream_* / broker.consumer_* admin calls: what the durable-stream tests share.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "ensemble/common/protocol.hpp"
#include "ensemble/testkit/process.hpp"
#include "raw_peer.hpp"

namespace ensemble::test {

namespace streams_fixture_detail {
namespace ec = ensemble::common;
namespace fs = std::filesystem;
namespace tk = ensemble::testkit;
using ec::command;
using ec::header;
using nlohmann::json;
using namespace std::chrono_literals;
inline constexpr auto k_wait = 10s;  // generous: only reached when something is broken

inline std::string make_temp_dir() {
  char tmpl[] = "/tmp/ensemble-broker-streams-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
  return tmpl;
}

class streams_fixture : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = make_temp_dir(); }
  void TearDown() override {
    if (HasFailure() && broker_)
      std::cerr << "broker output:\n" << broker_->proc().tail(60) << "\n";
    client_.reset();
    broker_.reset();
    if (mounted_) ::umount2(data_dir().c_str(), MNT_DETACH);
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::string data_dir() const { return dir_ + "/data"; }

  // A streams file declaring `orders` over order. and shipment.
  std::string write_streams_file(const std::string& text) {
    const auto path = dir_ + "/streams.yaml";
    std::ofstream(path) << text;
    return path;
  }

  void start(std::vector<std::string> args) {
    broker_ = tk::broker_process::start(std::move(args));
    client_ = std::make_unique<raw_peer>(ctx_, broker_->router());
  }
  void start_with_orders(std::vector<std::string> more = {}) {
    std::vector<std::string> args{"--data", data_dir(), "--streams",
                                  write_streams_file("streams:\n"
                                                     "  - name: orders\n"
                                                     "    topics: [order., shipment.]\n"
                                                     "    max_age: 7d\n")};
    args.insert(args.end(), more.begin(), more.end());
    start(std::move(args));
  }

  std::string next_id(const char* prefix = "e-") { return prefix + std::to_string(++ids_); }

  // A REPLY from the broker's own service: the payload map, or the error header.
  wire_message call(const std::string& action, const json& args = json::object()) {
    header h;
    h.id = next_id("c-");
    h.service = "broker";
    h.action = action;
    h.deadline_ms = 5000;
    const auto bytes = json::to_msgpack(args);
    client_->send(command::request, h, std::string(bytes.begin(), bytes.end()));
    auto r = client_->expect(command::reply, k_wait);
    EXPECT_EQ(r.hdr.id, h.id);
    EXPECT_EQ(r.hdr.worker, "broker");
    return r;
  }
  json admin(const std::string& action, const json& args = json::object()) {
    auto r = call(action, args);
    EXPECT_FALSE(r.hdr.is_error())
        << action << " " << args.dump(-1, ' ', false, json::error_handler_t::replace) << ": "
        << r.hdr.error_code << " " << r.hdr.error_message;
    if (r.hdr.is_error()) return json::object();
    return json::from_msgpack(r.payload);
  }
  header admin_error(const std::string& action, const json& args) {
    auto r = call(action, args);
    EXPECT_TRUE(r.hdr.is_error()) << action << " "
                                  << args.dump(-1, ' ', false, json::error_handler_t::replace)
                                  << " succeeded";
    return r.hdr;
  }

  header publish(raw_peer& peer, const std::string& topic, const std::string& id,
                 const std::string& payload, bool ack = true) {
    header e;
    e.id = id;
    e.topic = topic;
    e.correlation_id = "corr-" + id;
    e.ack = ack;
    peer.send(command::publish, e, payload);
    return e;
  }
  wire_message expect_ack(raw_peer& peer, const std::string& id) {
    auto a = peer.expect(command::publish_ack, k_wait);
    EXPECT_EQ(a.hdr.id, id);
    return a;
  }

  // Every record of a stream, through broker.stream_read pages.
  std::vector<json> read_all(const std::string& stream) {
    std::vector<json> out;
    std::uint64_t from = 1;
    while (true) {
      auto page = admin("stream_read", {{"name", stream}, {"from_seq", from}, {"limit", 1000}});
      if (!page.contains("records") || page["records"].empty()) break;
      for (auto& r : page["records"]) out.push_back(r);
      from = page["next_seq"].get<std::uint64_t>();
    }
    return out;
  }

  std::string dir_;
  bool mounted_ = false;
  zmq::context_t ctx_{1};
  std::unique_ptr<tk::broker_process> broker_;
  std::unique_ptr<raw_peer> client_;
  int ids_ = 0;
};

}  // namespace streams_fixture_detail

using streams_fixture_detail::streams_fixture;

}  // namespace ensemble::test
