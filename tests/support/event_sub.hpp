#pragma once
// A SUB on the broker's events endpoint that receives events as a plain ZeroMQ subscriber in
// any language would ([topic][header][payload]), and can wait until its subscriptions are
// active with the probe of docs/protocol.md, "Subscription". For tests only: failures are
// reported through GoogleTest, and every wait has a deadline.

#include <gtest/gtest.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "ensemble/common/frames.hpp"
#include "ensemble/common/protocol.hpp"
#include "raw_peer.hpp"

namespace ensemble::test {

class event_sub {
 public:
  event_sub(zmq::context_t& ctx, const std::string& endpoint, const curve_client& curve = {})
      : socket_(ctx, zmq::socket_type::sub) {
    socket_.set(zmq::sockopt::linger, 0);
    curve.apply(socket_);
    socket_.connect(endpoint);
  }
  void subscribe(const std::string& prefix) { socket_.set(zmq::sockopt::subscribe, prefix); }

  struct event {
    std::string topic;
    common::header hdr;
    std::string payload;
  };
  std::optional<event> next(std::chrono::milliseconds deadline) {
    zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, deadline) == 0) return std::nullopt;
    std::vector<zmq::message_t> frames;
    if (!common::recv_frames(socket_, frames)) return std::nullopt;
    EXPECT_EQ(frames.size(), 3u) << "an event is [topic][header][payload]";
    if (frames.size() != 3) return std::nullopt;
    auto h = common::decode_header(common::as_view(frames[1]));
    EXPECT_TRUE(h.ok()) << h.err().message;
    if (!h.ok()) return std::nullopt;
    return event{to_string(frames[0]), std::move(*h), to_string(frames[2])};
  }

  // Waits until the subscriptions made so far are active: subscribes to a probe topic and has
  // `publisher` publish to it until one arrives (docs/protocol.md, "Subscription").
  void sync(raw_peer& publisher, const std::string& probe_topic) {
    subscribe(probe_topic);
    const auto until = std::chrono::steady_clock::now() + raw_peer::k_default_wait;
    int n = 0;
    while (std::chrono::steady_clock::now() < until) {
      common::header probe;
      probe.id = "probe-" + std::to_string(++n);
      probe.topic = probe_topic;
      publisher.send(common::command::publish, probe);
      while (auto e = next(std::chrono::milliseconds(20))) {
        if (e->topic == probe_topic) {
          // Control topics are fanned out but not sequenced.
          EXPECT_EQ(e->hdr.seq, 0u);
          // Drain the probes that are still on their way.
          while (next(std::chrono::milliseconds(0))) {
          }
          return;
        }
      }
    }
    ADD_FAILURE() << "subscription probe never arrived";
  }

 private:
  zmq::socket_t socket_;
};

}  // namespace ensemble::test
