#pragma once
// ZeroMQ framing of protocol messages, shared by the broker and the agent SDK.
//
// `parse_message` turns received frames into a command, a decoded header and the payload
// (moved, never copied); `build_message` does the reverse into a reusable frame vector. Both
// work from an offset so that the broker's ROUTER can keep the routing-id frame in front.

#include <cstdint>
#include <vector>
#include <zmq.hpp>

#include "ensemble/common/protocol.hpp"
#include "ensemble/common/result.hpp"

namespace ensemble::common {

struct parsed_message {
  command cmd = command::heartbeat;
  header hdr;
  zmq::message_t payload;
};

// What went wrong with a message that failed to parse, with as much of it as was understood so
// that the broker can still answer the request it belonged to.
struct parse_failure {
  error err;
  std::uint8_t command_byte = 0;  // 0 when the command frame itself was unreadable
  // What of the header could be read, once the command frame was: all of it when
  // header_decoded, else the fields decode_header could still read (the id, mostly).
  header hdr;
  bool header_decoded = false;
};

// Parses frames[first...] as [tag][command][header][payload?]. On success the payload frame
// is moved out of `frames`.
result<parsed_message> parse_message(std::vector<zmq::message_t>& frames, std::size_t first,
                                     parse_failure* failure = nullptr);
// The same into `out`, which must be default-constructed: the header is decoded into out.hdr,
// and no message or header is moved on the way. On failure `*failure` is written whole (every
// member), so that a receive loop can keep one for every message.
status parse_message(std::vector<zmq::message_t>& frames, std::size_t first, parsed_message& out,
                     parse_failure* failure = nullptr);

// Appends [tag][command][header][payload] to `frames`.
void build_message(std::vector<zmq::message_t>& frames, command cmd, const header& h,
                   zmq::message_t payload = zmq::message_t{});
// The same with the header already msgpack-encoded.
void build_encoded_message(std::vector<zmq::message_t>& frames, command cmd,
                           std::string_view encoded_header, zmq::message_t payload);

// Receives one whole multipart message into `frames` (cleared first). Returns false when no
// message was waiting (non-blocking) or the socket was interrupted.
bool recv_frames(zmq::socket_t& socket, std::vector<zmq::message_t>& frames,
                 zmq::recv_flags flags = zmq::recv_flags::dontwait);

// Sends all frames; returns false if the first frame could not be sent (EAGAIN, or
// EHOSTUNREACH on a ROUTER with ROUTER_MANDATORY). Frames are consumed.
bool send_frames(zmq::socket_t& socket, std::vector<zmq::message_t>& frames,
                 zmq::send_flags flags = zmq::send_flags::dontwait);

std::string_view as_view(const zmq::message_t& m);
std::string hex_preview(const zmq::message_t& m, std::size_t max_bytes = 16);

}  // namespace ensemble::common
