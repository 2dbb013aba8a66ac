#pragma once
// msgpack-c payload helpers, for agents that prefer typed msgpack values (MSGPACK_DEFINE
// structs, tuples, maps) to JSON. Opt-in: this header brings msgpack-c into the including file.

#include <msgpack.hpp>

#include "ensemble/agent/agent.hpp"

namespace ensemble::agent {

template <class T>
bytes to_msgpack_payload(const T& value) {
  msgpack::sbuffer buffer;
  msgpack::pack(buffer, value);
  return bytes(buffer.data(), buffer.size());
}

template <class T>
result<T> from_msgpack_payload(const bytes& payload) {
  try {
    auto handle = msgpack::unpack(payload.data(), payload.size());
    return handle.get().as<T>();
  } catch (const std::exception& e) {
    return error{"bad_request", std::string("payload does not decode as expected: ") + e.what(),
                 false};
  }
}

}  // namespace ensemble::agent
