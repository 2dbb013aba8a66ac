#include "ensemble/common/frames.hpp"

#include <cstdio>

namespace ensemble::common {

std::string_view as_view(const zmq::message_t& m) {
  return {static_cast<const char*>(m.data()), m.size()};
}

std::string hex_preview(const zmq::message_t& m, std::size_t max_bytes) {
  std::string out;
  const auto* p = static_cast<const unsigned char*>(m.data());
  for (std::size_t i = 0; i < m.size() && i < max_bytes; ++i) {
    char buf[4];
    std::snprintf(buf, sizeof buf, "%02x", p[i]);
    out += buf;
  }
  if (m.size() > max_bytes) out += "...";
  return out;
}

status parse_message(std::vector<zmq::message_t>& frames, std::size_t first, parsed_message& out,
                     parse_failure* failure) {
  // A failure is written whole, so that a loop can keep one for every message it parses.
  auto fail = [&](std::string message, std::string_view code = errc::bad_request) -> status {
    auto err = error::make(code, std::move(message));
    if (failure != nullptr) {
      failure->err = err;
      failure->command_byte = 0;
      failure->hdr = header{};
      failure->header_decoded = false;
    }
    return err;
  };
  const std::size_t n = frames.size() - first;
  if (frames.size() <= first) return fail("message has no frames after the routing id");
  if (as_view(frames[first]) != k_protocol_tag) {
    return fail("frame 0 must be the protocol tag 'ENS\\x01' (4 bytes), got " +
                std::to_string(frames[first].size()) + " bytes: " + hex_preview(frames[first]));
  }
  if (n < 3) {
    return fail("message has " + std::to_string(n) +
                " frames; at least 3 are required: tag, command, header");
  }
  if (frames[first + 1].size() != 1) {
    return fail("frame 1 (command) must be 1 byte, got " +
                std::to_string(frames[first + 1].size()));
  }
  const auto byte = *static_cast<const std::uint8_t*>(frames[first + 1].data());
  // The header is read before the rest is judged, so that any refusal from here on can carry
  // the id of the message it refuses (the fields that read, when it is refused itself).
  const auto decoded = decode_header(as_view(frames[first + 2]), out.hdr);
  auto fail_with_header = [&](std::string message, std::string_view code = errc::bad_request) {
    auto err = error::make(code, std::move(message));
    if (failure != nullptr) {
      failure->err = err;
      failure->command_byte = byte;
      failure->hdr = std::move(out.hdr);
      failure->header_decoded = decoded.ok();
    }
    return status(std::move(err));
  };
  if (!is_known_command(byte)) {
    return fail_with_header(
        "unknown command " + command_name(byte) +
        "; commands are 0x01 HELLO, 0x03 BYE, 0x10 REQUEST, 0x12 REPLY, 0x20 PUBLISH, "
        "0x30 HEARTBEAT, 0x40..0x46 durable consumers (docs/protocol.md section 2)");
  }
  if (n > 4) {
    return fail_with_header(command_name(byte) + " has " + std::to_string(n) +
                            " frames; at most 4 are allowed: tag, command, header, payload");
  }
  if (!decoded) {
    return fail_with_header(command_name(byte) + ": " + decoded.err().message, decoded.err().code);
  }
  out.cmd = static_cast<command>(byte);
  if (n == 4) out.payload = std::move(frames[first + 3]);
  return ok_status();
}

result<parsed_message> parse_message(std::vector<zmq::message_t>& frames, std::size_t first,
                                     parse_failure* failure) {
  parsed_message out;
  if (auto parsed = parse_message(frames, first, out, failure); !parsed) return parsed.err();
  return out;
}

void build_encoded_message(std::vector<zmq::message_t>& frames, command cmd,
                           std::string_view encoded_header, zmq::message_t payload) {
  frames.emplace_back(k_protocol_tag.data(), k_protocol_tag.size());
  const auto byte = static_cast<std::uint8_t>(cmd);
  frames.emplace_back(&byte, 1);
  frames.emplace_back(encoded_header.data(), encoded_header.size());
  frames.push_back(std::move(payload));
}

void build_message(std::vector<zmq::message_t>& frames, command cmd, const header& h,
                   zmq::message_t payload) {
  thread_local std::string buffer;
  buffer.clear();
  encode_header(h, buffer);
  build_encoded_message(frames, cmd, buffer, std::move(payload));
}

bool recv_frames(zmq::socket_t& socket, std::vector<zmq::message_t>& frames,
                 zmq::recv_flags flags) {
  frames.clear();
  while (true) {
    zmq::message_t frame;
    auto got = socket.recv(frame, frames.empty() ? flags : zmq::recv_flags::none);
    if (!got) return false;  // EAGAIN (only possible on the first frame) or EINTR
    const bool more = frame.more();
    frames.push_back(std::move(frame));
    if (!more) return true;
  }
}

bool send_frames(zmq::socket_t& socket, std::vector<zmq::message_t>& frames,
                 zmq::send_flags flags) {
  for (std::size_t i = 0; i < frames.size(); ++i) {
    const bool last = i + 1 == frames.size();
    auto f = last ? flags : (flags | zmq::send_flags::sndmore);
    try {
      if (!socket.send(frames[i], f)) {
        if (i == 0) {
          frames.clear();
          return false;
        }
      }
    } catch (const zmq::error_t&) {
      // EHOSTUNREACH from a ROUTER whose peer is gone (only possible on the first frame, so
      // nothing was sent), or the context is terminating.
      frames.clear();
      return false;
    }
  }
  frames.clear();
  return true;
}

}  // namespace ensemble::common
