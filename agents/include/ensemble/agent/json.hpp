#pragma once
// nlohmann::json payload helpers: payloads travel as msgpack, handlers work with JSON values.

#include <nlohmann/json.hpp>

#include "ensemble/agent/agent.hpp"

namespace ensemble::agent {

inline bytes to_json_payload(const nlohmann::json& value) {
  const auto packed = nlohmann::json::to_msgpack(value);
  return bytes(packed.begin(), packed.end());
}

// An empty payload decodes as null. A payload that is not msgpack is a bad_request naming why.
inline result<nlohmann::json> from_json_payload(const bytes& payload) {
  if (payload.empty()) return nlohmann::json();
  try {
    return nlohmann::json::from_msgpack(payload);
  } catch (const nlohmann::json::exception& e) {
    return error{"bad_request", std::string("payload is not valid msgpack: ") + e.what(), false};
  }
}

}  // namespace ensemble::agent
