#pragma once
// A DEALER that speaks the wire protocol by hand, for tests that check what the broker (or
// something in front of it, such as the testkit's fault proxy) does on the wire, without the
// SDK in between: what is tested is what an implementation in another language would see.
//
// `send` builds a well-formed message from a command and a header; `send_raw` sends whatever
// frames it is given, for tests of bad input. `next`/`expect` wait for the next message with a
// deadline and decode it; a malformed message from the broker is a test failure. HEARTBEATs
// are answered while a test waits, so that a registered peer stays alive, and are only
// returned when asked for. `next_answer` is for peers that are not registered: it waits for
// the next ERROR or REPLY and skips anything else.
//
// Every wait has a deadline (default `k_default_wait`, only reached when something is
// broken), and failures are reported through GoogleTest, so this header is for tests only.

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>
#include <zmq.hpp>

#include "ensemble/common/frames.hpp"
#include "ensemble/common/protocol.hpp"

namespace ensemble::test {

// A CURVE client's keys (docs/protocol.md section 12, "Connecting"): the broker's public key
// and the peer's own pair, as 40 Z85 characters each. Empty: a plain connection.
struct curve_client {
  std::string server_key;
  std::string public_key;
  std::string secret_key;

  bool empty() const { return server_key.empty(); }
  // Sets the options on a DEALER or SUB before it connects.
  void apply(zmq::socket_t& socket) const {
    if (empty()) return;
    socket.set(zmq::sockopt::curve_serverkey, server_key);
    socket.set(zmq::sockopt::curve_publickey, public_key);
    socket.set(zmq::sockopt::curve_secretkey, secret_key);
  }
};

// One message received by a raw_peer, decoded.
struct wire_message {
  common::command cmd = common::command::heartbeat;
  common::header hdr;
  std::string payload;
};

inline std::string to_string(const zmq::message_t& m) {
  return std::string(common::as_view(m));
}

class raw_peer {
 public:
  static constexpr std::chrono::milliseconds k_default_wait{5000};

  raw_peer(zmq::context_t& ctx, const std::string& endpoint, const curve_client& curve = {})
      : socket_(ctx, zmq::socket_type::dealer) {
    socket_.set(zmq::sockopt::linger, 0);
    curve.apply(socket_);
    socket_.connect(endpoint);
  }

  // For what a test needs beyond the protocol (a socket monitor).
  zmq::socket_t& socket() { return socket_; }

  void send(common::command cmd, const common::header& h, std::string_view payload = {}) {
    std::vector<zmq::message_t> frames;
    common::build_message(frames, cmd, h, zmq::message_t(payload.data(), payload.size()));
    send_frames(frames);
  }
  void send_raw(const std::vector<std::string>& parts) {
    std::vector<zmq::message_t> frames;
    for (const auto& p : parts) frames.emplace_back(p.data(), p.size());
    send_frames(frames);
  }

  // The next message, or nullopt at the deadline. HEARTBEATs are answered and skipped unless
  // `want_heartbeats`.
  std::optional<wire_message> next(std::chrono::milliseconds deadline = k_default_wait,
                                   bool want_heartbeats = false) {
    const auto until = std::chrono::steady_clock::now() + deadline;
    std::vector<zmq::message_t> frames;
    while (receive(frames, until)) {
      auto parsed = common::parse_message(frames, 0);
      if (!parsed) {
        ADD_FAILURE() << "the broker sent a malformed message: " << parsed.err().message;
        continue;
      }
      wire_message m{parsed->cmd, std::move(parsed->hdr), to_string(parsed->payload)};
      if (m.cmd == common::command::heartbeat && !want_heartbeats) {
        send(common::command::heartbeat, common::header{});
        continue;
      }
      return m;
    }
    return std::nullopt;
  }

  // The next message, which must be `cmd` (a failure otherwise, or if none arrives in time).
  wire_message expect(common::command cmd, std::chrono::milliseconds deadline = k_default_wait) {
    auto m = next(deadline, cmd == common::command::heartbeat);
    if (!m) {
      ADD_FAILURE() << "no " << common::command_name(static_cast<std::uint8_t>(cmd)) << " within "
                    << deadline.count() << " ms";
      return {};
    }
    EXPECT_EQ(m->cmd, cmd) << "got " << common::command_name(static_cast<std::uint8_t>(m->cmd))
                           << " error_code=" << m->hdr.error_code << " " << m->hdr.error_message;
    return std::move(*m);
  }

  // The header of the next ERROR or REPLY, or nullopt at the deadline. Other messages, and any
  // that do not parse, are skipped; HEARTBEATs are not answered.
  std::optional<common::header> next_answer(std::chrono::milliseconds deadline = k_default_wait) {
    const auto until = std::chrono::steady_clock::now() + deadline;
    std::vector<zmq::message_t> frames;
    while (receive(frames, until)) {
      auto parsed = common::parse_message(frames, 0);
      if (!parsed) continue;
      if (parsed->cmd == common::command::error || parsed->cmd == common::command::reply) {
        return std::move(parsed->hdr);
      }
    }
    return std::nullopt;
  }

 private:
  // Waits for one whole message until `until`; false at the deadline. A message already
  // waiting when the deadline is reached is still taken.
  bool receive(std::vector<zmq::message_t>& frames, std::chrono::steady_clock::time_point until) {
    while (true) {
      const auto left =
          std::chrono::ceil<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
      if (left.count() < 0) return false;
      zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, left);
      if ((item.revents & ZMQ_POLLIN) != 0 && common::recv_frames(socket_, frames)) return true;
      if (left.count() == 0) return false;
    }
  }

  void send_frames(std::vector<zmq::message_t>& frames) {
    ASSERT_TRUE(common::send_frames(socket_, frames, zmq::send_flags::none))
        << "could not send on the raw peer's DEALER";
  }

  zmq::socket_t socket_;
};

}  // namespace ensemble::test
