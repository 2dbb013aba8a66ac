#include "ensemble/common/protocol.hpp"

#include <msgpack.hpp>

#include <array>
#include <cstdio>
#include <limits>
#include <optional>

namespace ensemble::common {
namespace {

// msgpack::packer writes into anything with write(const char*, size_t).
struct string_sink {
  std::string& out;
  void write(const char* data, std::size_t size) { out.append(data, size); }
};
using packer = msgpack::packer<string_sink>;

void pack_str(packer& p, std::string_view s) {
  p.pack_str(static_cast<std::uint32_t>(s.size()));
  p.pack_str_body(s.data(), static_cast<std::uint32_t>(s.size()));
}

const char* type_name(msgpack::type::object_type t) {
  switch (t) {
    case msgpack::type::NIL: return "nil";
    case msgpack::type::BOOLEAN: return "bool";
    case msgpack::type::POSITIVE_INTEGER: return "uint";
    case msgpack::type::NEGATIVE_INTEGER: return "negative int";
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64: return "float";
    case msgpack::type::STR: return "str";
    case msgpack::type::BIN: return "bin";
    case msgpack::type::ARRAY: return "array";
    case msgpack::type::MAP: return "map";
    case msgpack::type::EXT: return "ext";
  }
  return "unknown";
}

error field_error(std::string_view key, std::string_view expected, const msgpack::object& o) {
  return error::make(errc::bad_request, "header field '" + std::string(key) + "' must be " +
                                            std::string(expected) + ", got " + type_name(o.type));
}

// Each known key has a reader; a reader returns an empty optional on success.
using reader = std::optional<error> (*)(std::string_view key, const msgpack::object&, header&);

template <std::string header::*field>
std::optional<error> read_str(std::string_view key, const msgpack::object& o, header& h) {
  if (o.type != msgpack::type::STR) return field_error(key, "str", o);
  if (o.via.str.size > k_max_header_bytes) return field_error(key, "a short str", o);
  (h.*field).assign(o.via.str.ptr, o.via.str.size);
  return std::nullopt;
}

template <class Int, Int header::*field>
std::optional<error> read_uint(std::string_view key, const msgpack::object& o, header& h) {
  if (o.type != msgpack::type::POSITIVE_INTEGER) return field_error(key, "uint", o);
  if (o.via.u64 > std::numeric_limits<Int>::max()) {
    return error::make(errc::bad_request,
                       "header field '" + std::string(key) + "' is out of range");
  }
  h.*field = static_cast<Int>(o.via.u64);
  return std::nullopt;
}

template <bool header::*field>
std::optional<error> read_bool(std::string_view key, const msgpack::object& o, header& h) {
  if (o.type != msgpack::type::BOOLEAN) return field_error(key, "bool", o);
  h.*field = o.via.boolean;
  return std::nullopt;
}

std::optional<error> read_services(std::string_view key, const msgpack::object& o, header& h) {
  if (o.type != msgpack::type::ARRAY) return field_error(key, "array of maps", o);
  h.services.clear();
  h.services.reserve(o.via.array.size);
  for (std::uint32_t i = 0; i < o.via.array.size; ++i) {
    const auto& item = o.via.array.ptr[i];
    const std::string where = "services[" + std::to_string(i) + "]";
    if (item.type != msgpack::type::MAP) return field_error(where, "map", item);
    service_offer offer;
    for (std::uint32_t j = 0; j < item.via.map.size; ++j) {
      const auto& kv = item.via.map.ptr[j];
      if (kv.key.type != msgpack::type::STR) return field_error(where + " key", "str", kv.key);
      std::string_view k(kv.key.via.str.ptr, kv.key.via.str.size);
      if (k == "name") {
        if (kv.val.type != msgpack::type::STR) return field_error(where + ".name", "str", kv.val);
        offer.name.assign(kv.val.via.str.ptr, kv.val.via.str.size);
      } else if (k == "capacity") {
        if (kv.val.type != msgpack::type::POSITIVE_INTEGER || kv.val.via.u64 == 0 ||
            kv.val.via.u64 > 1'000'000) {
          return field_error(where + ".capacity", "uint in 1..1000000", kv.val);
        }
        offer.capacity = static_cast<std::uint32_t>(kv.val.via.u64);
      }
    }
    if (auto problem = check_name(where + ".name", offer.name); !problem.empty()) {
      return error::make(errc::bad_request, problem);
    }
    h.services.push_back(std::move(offer));
  }
  return std::nullopt;
}

struct field_reader {
  std::string_view key;
  reader read;
};

constexpr std::array<field_reader, 24> k_readers{{
    {"id", &read_str<&header::id>},
    {"service", &read_str<&header::service>},
    {"action", &read_str<&header::action>},
    {"topic", &read_str<&header::topic>},
    {"deadline_ms", &read_uint<std::uint64_t, &header::deadline_ms>},
    {"correlation_id", &read_str<&header::correlation_id>},
    {"causation_id", &read_str<&header::causation_id>},
    {"trace_id", &read_str<&header::trace_id>},
    {"attempt", &read_uint<std::uint32_t, &header::attempt>},
    {"idempotency_key", &read_str<&header::idempotency_key>},
    {"retryable", &read_bool<&header::retryable>},
    {"ack", &read_bool<&header::ack>},
    {"token", &read_uint<std::uint64_t, &header::token>},
    {"worker", &read_str<&header::worker>},
    {"seq", &read_uint<std::uint64_t, &header::seq>},
    {"ts", &read_uint<std::uint64_t, &header::ts>},
    {"publisher", &read_str<&header::publisher>},
    {"error_code", &read_str<&header::error_code>},
    {"error_message", &read_str<&header::error_message>},
    {"agent", &read_str<&header::agent>},
    {"services", &read_services},
    {"heartbeat_ms", &read_uint<std::uint32_t, &header::heartbeat_ms>},
    {"max_message_size", &read_uint<std::uint64_t, &header::max_message_size>},
    {"broker", &read_str<&header::broker>},
}};

reader find_reader(std::string_view key) {
  for (const auto& r : k_readers) {
    if (r.key == key) return r.read;
  }
  return nullptr;
}

}  // namespace

std::string command_name(std::uint8_t byte) {
  switch (static_cast<command>(byte)) {
    case command::hello: return "HELLO";
    case command::welcome: return "WELCOME";
    case command::bye: return "BYE";
    case command::request: return "REQUEST";
    case command::dispatch: return "DISPATCH";
    case command::reply: return "REPLY";
    case command::publish: return "PUBLISH";
    case command::publish_ack: return "PUBLISH_ACK";
    case command::heartbeat: return "HEARTBEAT";
    case command::error: return "ERROR";
  }
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02x", byte);
  return buf;
}

bool is_known_command(std::uint8_t byte) { return command_name(byte).rfind("0x", 0) != 0; }

void encode_header(const header& h, std::string& out) {
  string_sink sink{out};
  packer p(sink);
  std::uint32_t n = h.extra_count;
  auto count_str = [&n](const std::string& s) { n += s.empty() ? 0 : 1; };
  auto count_num = [&n](std::uint64_t v) { n += v == 0 ? 0 : 1; };
  count_str(h.id), count_str(h.service), count_str(h.action), count_str(h.topic);
  count_num(h.deadline_ms);
  count_str(h.correlation_id), count_str(h.causation_id), count_str(h.trace_id);
  count_num(h.attempt), count_str(h.idempotency_key);
  n += h.retryable ? 1 : 0;
  n += h.ack ? 1 : 0;
  count_num(h.token), count_str(h.worker), count_num(h.seq), count_num(h.ts);
  count_str(h.publisher), count_str(h.error_code), count_str(h.error_message);
  count_str(h.agent);
  n += h.services.empty() ? 0 : 1;
  count_num(h.heartbeat_ms), count_num(h.max_message_size), count_str(h.broker);

  p.pack_map(n);
  auto put_str = [&p](std::string_view key, const std::string& v) {
    if (v.empty()) return;
    pack_str(p, key);
    pack_str(p, v);
  };
  auto put_num = [&p](std::string_view key, std::uint64_t v) {
    if (v == 0) return;
    pack_str(p, key);
    p.pack_uint64(v);
  };
  put_str("id", h.id);
  put_str("service", h.service);
  put_str("action", h.action);
  put_str("topic", h.topic);
  put_num("deadline_ms", h.deadline_ms);
  put_str("correlation_id", h.correlation_id);
  put_str("causation_id", h.causation_id);
  put_str("trace_id", h.trace_id);
  put_num("attempt", h.attempt);
  put_str("idempotency_key", h.idempotency_key);
  if (h.retryable) {
    pack_str(p, "retryable");
    p.pack_true();
  }
  if (h.ack) {
    pack_str(p, "ack");
    p.pack_true();
  }
  put_num("token", h.token);
  put_str("worker", h.worker);
  put_num("seq", h.seq);
  put_num("ts", h.ts);
  put_str("publisher", h.publisher);
  put_str("error_code", h.error_code);
  put_str("error_message", h.error_message);
  put_str("agent", h.agent);
  if (!h.services.empty()) {
    pack_str(p, "services");
    p.pack_array(static_cast<std::uint32_t>(h.services.size()));
    for (const auto& s : h.services) {
      p.pack_map(2);
      pack_str(p, "name");
      pack_str(p, s.name);
      pack_str(p, "capacity");
      p.pack_uint32(s.capacity);
    }
  }
  put_num("heartbeat_ms", h.heartbeat_ms);
  put_num("max_message_size", h.max_message_size);
  put_str("broker", h.broker);
  out.append(h.extra);
}

std::string encode_header(const header& h) {
  std::string out;
  out.reserve(128);
  encode_header(h, out);
  return out;
}

result<header> decode_header(std::string_view bytes) {
  if (bytes.empty()) return error::make(errc::bad_request, "header frame is empty");
  if (bytes.size() > k_max_header_bytes) {
    return error::make(errc::bad_request, "header frame is " + std::to_string(bytes.size()) +
                                              " bytes, more than the limit of " +
                                              std::to_string(k_max_header_bytes));
  }
  // One zone per thread, cleared after each header: no allocation in the steady state.
  thread_local msgpack::zone zone;
  struct clear_zone {
    ~clear_zone() { zone.clear(); }
  } clear_on_exit;

  msgpack::object root;
  std::size_t offset = 0;
  try {
    // Limits: (array, map, str, bin, ext, depth) — a header is small and shallow.
    const msgpack::unpack_limit limits(1024, 256, k_max_header_bytes, k_max_header_bytes,
                                       k_max_header_bytes, 4);
    root = msgpack::unpack(zone, bytes.data(), bytes.size(), offset, nullptr, nullptr, limits);
  } catch (const msgpack::insufficient_bytes&) {
    return error::make(errc::bad_request, "header is truncated msgpack");
  } catch (const std::exception& e) {
    return error::make(errc::bad_request, std::string("header is not valid msgpack: ") + e.what());
  }
  if (offset != bytes.size()) {
    return error::make(errc::bad_request, "header has " + std::to_string(bytes.size() - offset) +
                                              " trailing bytes after the msgpack map");
  }
  if (root.type != msgpack::type::MAP) {
    return error::make(errc::bad_request,
                       std::string("header must be a msgpack map, got ") + type_name(root.type));
  }

  header h;
  for (std::uint32_t i = 0; i < root.via.map.size; ++i) {
    const auto& kv = root.via.map.ptr[i];
    if (kv.key.type != msgpack::type::STR) {
      return error::make(errc::bad_request, std::string("header keys must be str, got ") +
                                                type_name(kv.key.type));
    }
    const std::string_view key(kv.key.via.str.ptr, kv.key.via.str.size);
    if (reader read = find_reader(key)) {
      if (auto problem = read(key, kv.val, h)) return std::move(*problem);
    } else {
      string_sink sink{h.extra};
      packer p(sink);
      p.pack(kv.key);
      p.pack(kv.val);
      ++h.extra_count;
    }
  }
  return h;
}

std::string check_topic(std::string_view topic) {
  if (topic.empty()) return "topic is empty";
  if (topic.size() > k_max_topic_length) {
    return "topic is " + std::to_string(topic.size()) + " bytes, more than " +
           std::to_string(k_max_topic_length);
  }
  char prev = '.';
  for (char c : topic) {
    const bool word = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      c == '_' || c == '-' || c == ':';
    if (c == '.' && prev == '.') return "topic '" + std::string(topic) + "' has an empty segment";
    if (!word && c != '.') {
      return "topic '" + std::string(topic) + "' has a character outside [A-Za-z0-9_:-.]";
    }
    prev = c;
  }
  if (prev == '.') return "topic '" + std::string(topic) + "' ends with '.'";
  return {};
}

std::string check_name(std::string_view what, std::string_view name) {
  if (name.empty()) return std::string(what) + " is empty";
  if (name.size() > k_max_name_length) {
    return std::string(what) + " is longer than " + std::to_string(k_max_name_length) + " bytes";
  }
  for (char c : name) {
    if (c <= ' ' || c > '~') {
      return std::string(what) + " '" + std::string(name) +
             "' has a character that is not printable ASCII";
    }
  }
  return {};
}

}  // namespace ensemble::common
