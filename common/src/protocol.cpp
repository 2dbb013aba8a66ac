#include "ensemble/common/protocol.hpp"

#include <array>
#include <cstdio>
#include <limits>
#include <msgpack.hpp>
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
    case msgpack::type::NIL:
      return "nil";
    case msgpack::type::BOOLEAN:
      return "bool";
    case msgpack::type::POSITIVE_INTEGER:
      return "uint";
    case msgpack::type::NEGATIVE_INTEGER:
      return "negative int";
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64:
      return "float";
    case msgpack::type::STR:
      return "str";
    case msgpack::type::BIN:
      return "bin";
    case msgpack::type::ARRAY:
      return "array";
    case msgpack::type::MAP:
      return "map";
    case msgpack::type::EXT:
      return "ext";
  }
  return "unknown";
}

// A string as an error message quotes it: at most 48 bytes, bytes outside printable ASCII as
// \xNN, so that a log line stays one readable line whatever a peer sent.
std::string quoted(std::string_view s) {
  constexpr std::size_t k_shown = 48;
  std::string out = "'";
  for (std::size_t i = 0; i < s.size() && i < k_shown; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  out += s.size() > k_shown ? "'... (" + std::to_string(s.size()) + " bytes)" : "'";
  return out;
}

// A value as an error message shows it: its msgpack type, and the value itself when short.
std::string describe(const msgpack::object& o) {
  switch (o.type) {
    case msgpack::type::BOOLEAN:
      return o.via.boolean ? "bool true" : "bool false";
    case msgpack::type::POSITIVE_INTEGER:
      return "uint " + std::to_string(o.via.u64);
    case msgpack::type::NEGATIVE_INTEGER:
      return "negative int " + std::to_string(o.via.i64);
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "float %g", o.via.f64);
      return buf;
    }
    case msgpack::type::STR:
      return "str " + quoted(std::string_view(o.via.str.ptr, o.via.str.size));
    case msgpack::type::BIN:
      return "bin of " + std::to_string(o.via.bin.size) + " bytes";
    case msgpack::type::ARRAY:
      return "array of " + std::to_string(o.via.array.size);
    case msgpack::type::MAP:
      return "map of " + std::to_string(o.via.map.size);
    default:
      return type_name(o.type);
  }
}

error field_error(std::string_view key, std::string_view rule, const msgpack::object& o) {
  return error::make(errc::bad_request, "header field '" + std::string(key) + "' must be " +
                                            std::string(rule) + ", got " + describe(o));
}

// One row per header field: its key, what its value must be (the rule that error messages
// quote), and how it is read. docs/protocol.md section 3 lists the same fields with their
// defaults (absent = empty, 0 or false). encode_header writes them by hand, in this order: going
// through the table costs about twice the time per header (measured), and the broker encodes
// one per message; protocol_test checks each field round-trips under its key.
struct field_codec {
  std::string_view key;
  std::string_view rule;
  std::optional<error> (*read)(const field_codec&, const msgpack::object&, header&);
};

template <std::string header::*member>
constexpr field_codec str_field(std::string_view key) {
  return {key, "a str",
          [](const field_codec& f, const msgpack::object& o, header& h) -> std::optional<error> {
            if (o.type != msgpack::type::STR) return field_error(f.key, f.rule, o);
            (h.*member).assign(o.via.str.ptr, o.via.str.size);
            return std::nullopt;
          }};
}

// A non-negative integer in any msgpack encoding (positive fixint, uint 8-64, or int 8-64
// holding a value >= 0: msgpack-c reads all of them as POSITIVE_INTEGER), within [min, Int max].
template <class Int, Int header::*member, std::uint64_t min = 0>
constexpr field_codec uint_field(std::string_view key, std::string_view rule) {
  return {key, rule,
          [](const field_codec& f, const msgpack::object& o, header& h) -> std::optional<error> {
            if (o.type != msgpack::type::POSITIVE_INTEGER) return field_error(f.key, f.rule, o);
            if (o.via.u64 > std::numeric_limits<Int>::max() || o.via.u64 < min) {
              return error::make(errc::bad_request, "header field '" + std::string(f.key) +
                                                        "' is " + std::to_string(o.via.u64) +
                                                        "; it must be " + std::string(f.rule));
            }
            h.*member = static_cast<Int>(o.via.u64);
            return std::nullopt;
          }};
}

template <bool header::*member>
constexpr field_codec bool_field(std::string_view key) {
  return {key, "a bool (true or false)",
          [](const field_codec& f, const msgpack::object& o, header& h) -> std::optional<error> {
            if (o.type != msgpack::type::BOOLEAN) return field_error(f.key, f.rule, o);
            h.*member = o.via.boolean;
            return std::nullopt;
          }};
}

std::optional<error> read_services(const field_codec& f, const msgpack::object& o, header& h) {
  if (o.type != msgpack::type::ARRAY) return field_error(f.key, f.rule, o);
  h.services.clear();
  h.services.reserve(o.via.array.size);
  for (std::uint32_t i = 0; i < o.via.array.size; ++i) {
    const auto& item = o.via.array.ptr[i];
    const std::string where = "services[" + std::to_string(i) + "]";
    if (item.type != msgpack::type::MAP) {
      return field_error(where, "a map {name: str, capacity: uint 1..1000000}", item);
    }
    service_offer offer;
    for (std::uint32_t j = 0; j < item.via.map.size; ++j) {
      const auto& kv = item.via.map.ptr[j];
      if (kv.key.type != msgpack::type::STR) return field_error(where + " key", "a str", kv.key);
      std::string_view k(kv.key.via.str.ptr, kv.key.via.str.size);
      if (k == "name") {
        if (kv.val.type != msgpack::type::STR) return field_error(where + ".name", "a str", kv.val);
        offer.name.assign(kv.val.via.str.ptr, kv.val.via.str.size);
      } else if (k == "capacity") {
        if (kv.val.type != msgpack::type::POSITIVE_INTEGER || kv.val.via.u64 == 0 ||
            kv.val.via.u64 > 1'000'000) {
          return field_error(where + ".capacity", "an integer in 1..1000000 (default 1)", kv.val);
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

using u32 = std::uint32_t;
using u64 = std::uint64_t;
constexpr std::string_view k_any_uint = "a non-negative integer";
constexpr std::string_view k_any_u32 = "a non-negative integer up to 4294967295";

constexpr std::array<field_codec, 33> k_fields{{
    str_field<&header::id>("id"),
    str_field<&header::service>("service"),
    str_field<&header::action>("action"),
    str_field<&header::topic>("topic"),
    uint_field<u64, &header::deadline_ms, 1>(
        "deadline_ms", "a whole number of milliseconds, at least 1 (omit it rather than send 0)"),
    str_field<&header::correlation_id>("correlation_id"),
    str_field<&header::causation_id>("causation_id"),
    str_field<&header::trace_id>("trace_id"),
    uint_field<u32, &header::attempt>("attempt", k_any_u32),
    str_field<&header::idempotency_key>("idempotency_key"),
    bool_field<&header::retryable>("retryable"),
    bool_field<&header::ack>("ack"),
    uint_field<u64, &header::token>("token", k_any_uint),
    str_field<&header::worker>("worker"),
    uint_field<u64, &header::seq>("seq", k_any_uint),
    uint_field<u64, &header::ts>("ts", k_any_uint),
    str_field<&header::publisher>("publisher"),
    str_field<&header::caller>("caller"),
    str_field<&header::caller_scope>("caller_scope"),
    str_field<&header::stream>("stream"),
    uint_field<u64, &header::stream_seq>("stream_seq", k_any_uint),
    bool_field<&header::duplicate>("duplicate"),
    str_field<&header::consumer>("consumer"),
    uint_field<u32, &header::deliveries>("deliveries", k_any_u32),
    uint_field<u32, &header::capacity>("capacity", k_any_u32),
    uint_field<u64, &header::delay_ms>("delay_ms", k_any_uint),
    str_field<&header::error_code>("error_code"),
    str_field<&header::error_message>("error_message"),
    str_field<&header::agent>("agent"),
    {"services", "an array of maps {name: str, capacity: uint 1..1000000}", &read_services},
    uint_field<u32, &header::heartbeat_ms>("heartbeat_ms", k_any_u32),
    uint_field<u64, &header::max_message_size>("max_message_size", k_any_uint),
    str_field<&header::broker>("broker"),
}};

const field_codec* find_field(std::string_view key) {
  for (const auto& f : k_fields) {
    if (f.key == key) return &f;
  }
  return nullptr;
}

constexpr std::uint32_t k_max_array_items = 1024;
constexpr std::uint32_t k_max_map_pairs = 256;
constexpr std::size_t k_max_depth = 4;

// Unpacks `bytes` as exactly one msgpack object into `root` (strings no longer than
// `max_str`), or says what is wrong with the frame.
std::optional<error> unpack_one(std::string_view bytes, std::size_t max_str, msgpack::zone& zone,
                                msgpack::object& root) {
  std::size_t offset = 0;
  const auto fail = [](std::string message) {
    return error::make(errc::bad_request, std::move(message));
  };
  try {
    // Limits: (array, map, str, bin, ext, depth). The depth counts containers on the way down,
    // the header map itself being level 1 ({services: [{...}]} is 3 levels deep).
    const msgpack::unpack_limit limits(k_max_array_items, k_max_map_pairs, max_str, max_str,
                                       max_str, k_max_depth);
    root = msgpack::unpack(zone, bytes.data(), bytes.size(), offset, nullptr, nullptr, limits);
  } catch (const msgpack::insufficient_bytes&) {
    return fail("header is truncated msgpack (" + std::to_string(bytes.size()) +
                " bytes end in the middle of a value)");
  } catch (const msgpack::depth_size_overflow&) {
    return fail("header nests deeper than " + std::to_string(k_max_depth) +
                " levels; the header map is level 1, each array or map inside adds one");
  } catch (const msgpack::array_size_overflow&) {
    return fail("header has an array of more than " + std::to_string(k_max_array_items) +
                " elements, the limit");
  } catch (const msgpack::map_size_overflow&) {
    return fail("header has a map of more than " + std::to_string(k_max_map_pairs) +
                " pairs, the limit");
  } catch (const std::exception& e) {
    return fail(std::string("header is not valid msgpack: ") + e.what());
  }
  if (offset != bytes.size()) {
    return fail("header has " + std::to_string(bytes.size() - offset) +
                " trailing bytes after the msgpack map; the frame must hold exactly one map");
  }
  return std::nullopt;
}

// Reads every pair of the header map into `h`: unknown keys into `extra`, known ones through
// their reader. A bad field does not stop the others from being read (so that the id of a
// refused message is known); the first problem is returned.
std::optional<error> read_map(const msgpack::object& root, header& h) {
  std::optional<error> first;
  for (std::uint32_t i = 0; i < root.via.map.size; ++i) {
    const auto& kv = root.via.map.ptr[i];
    if (kv.key.type != msgpack::type::STR) {
      if (!first) {
        first =
            error::make(errc::bad_request, "header keys must be str, got " + describe(kv.key) +
                                               " (pair " + std::to_string(i + 1) + " of the map)");
      }
      continue;
    }
    const std::string_view key(kv.key.via.str.ptr, kv.key.via.str.size);
    if (const field_codec* f = find_field(key)) {
      if (auto problem = f->read(*f, kv.val, h); problem && !first) first = std::move(problem);
    } else {
      string_sink sink{h.extra};
      packer p(sink);
      p.pack(kv.key);
      p.pack(kv.val);
      ++h.extra_count;
    }
  }
  return first;
}

}  // namespace

std::string command_name(std::uint8_t byte) {
  switch (static_cast<command>(byte)) {
    case command::hello:
      return "HELLO";
    case command::welcome:
      return "WELCOME";
    case command::bye:
      return "BYE";
    case command::request:
      return "REQUEST";
    case command::dispatch:
      return "DISPATCH";
    case command::reply:
      return "REPLY";
    case command::publish:
      return "PUBLISH";
    case command::publish_ack:
      return "PUBLISH_ACK";
    case command::heartbeat:
      return "HEARTBEAT";
    case command::consume:
      return "CONSUME";
    case command::deliver:
      return "DELIVER";
    case command::ack:
      return "ACK";
    case command::nack:
      return "NACK";
    case command::term:
      return "TERM";
    case command::progress:
      return "PROGRESS";
    case command::consume_stop:
      return "CONSUME_STOP";
    case command::error:
      return "ERROR";
  }
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02x", byte);
  return buf;
}

bool is_known_command(std::uint8_t byte) {
  return command_name(byte).rfind("0x", 0) != 0;
}

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
  count_str(h.caller), count_str(h.caller_scope);
  count_str(h.agent);
  n += h.services.empty() ? 0 : 1;
  count_num(h.heartbeat_ms), count_num(h.max_message_size), count_str(h.broker);
  count_str(h.stream), count_num(h.stream_seq);
  n += h.duplicate ? 1 : 0;
  count_str(h.consumer), count_num(h.deliveries), count_num(h.capacity), count_num(h.delay_ms);

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
  put_str("caller", h.caller);
  put_str("caller_scope", h.caller_scope);
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
  put_str("stream", h.stream);
  put_num("stream_seq", h.stream_seq);
  if (h.duplicate) {
    pack_str(p, "duplicate");
    p.pack_true();
  }
  put_str("consumer", h.consumer);
  put_num("deliveries", h.deliveries);
  put_num("capacity", h.capacity);
  put_num("delay_ms", h.delay_ms);
  out.append(h.extra);
}

std::string encode_header(const header& h) {
  std::string out;
  out.reserve(128);
  encode_header(h, out);
  return out;
}

result<header> decode_header(std::string_view bytes, header* partial) {
  if (bytes.empty())
    return error::make(errc::bad_request,
                       "header frame is empty; send {} (0x80) for a header with no fields");
  // One zone per thread, cleared after each header: no allocation in the steady state.
  thread_local msgpack::zone zone;
  struct clear_zone {
    ~clear_zone() { zone.clear(); }
  } clear_on_exit;
  msgpack::object root;

  if (bytes.size() > k_max_header_bytes) {
    // Refused whole, but read (the frame is already bounded by the socket's message size
    // limit) so that the refusal can name the message it refuses.
    if (partial != nullptr && !unpack_one(bytes, bytes.size(), zone, root) &&
        root.type == msgpack::type::MAP) {
      header h;
      (void)read_map(root, h);
      *partial = std::move(h);
    }
    return error::make(errc::too_large, "header frame is " + std::to_string(bytes.size()) +
                                            " bytes, more than the limit of " +
                                            std::to_string(k_max_header_bytes) +
                                            " bytes for a header");
  }
  if (auto problem = unpack_one(bytes, k_max_header_bytes, zone, root)) {
    // A map followed by trailing bytes was still read: keep what it says.
    if (partial != nullptr && root.type == msgpack::type::MAP) {
      header h;
      (void)read_map(root, h);
      *partial = std::move(h);
    }
    return std::move(*problem);
  }
  if (root.type != msgpack::type::MAP) {
    return error::make(errc::bad_request,
                       "header must be a msgpack map with str keys, got " + describe(root));
  }
  header h;
  if (auto problem = read_map(root, h)) {
    if (partial != nullptr) *partial = std::move(h);
    return std::move(*problem);
  }
  return h;
}

std::string check_topic(std::string_view topic) {
  static constexpr std::string_view k_rule =
      "; a topic is dot-separated non-empty segments of [A-Za-z0-9_:-], at most 256 bytes";
  if (topic.empty()) return "topic is empty" + std::string(k_rule);
  if (topic.size() > k_max_topic_length) {
    return "topic is " + std::to_string(topic.size()) + " bytes, more than " +
           std::to_string(k_max_topic_length) + std::string(k_rule);
  }
  char prev = '.';
  for (std::size_t i = 0; i < topic.size(); ++i) {
    const char c = topic[i];
    const bool word = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      c == '_' || c == '-' || c == ':';
    if (c == '.' && prev == '.') {
      return "topic " + quoted(topic) + " has an empty segment at byte " + std::to_string(i) +
             std::string(k_rule);
    }
    if (!word && c != '.') {
      return "topic " + quoted(topic) + " has " + quoted(topic.substr(i, 1)) + " at byte " +
             std::to_string(i) + ", a character outside [A-Za-z0-9_:-.]" + std::string(k_rule);
    }
    prev = c;
  }
  if (prev == '.') return "topic " + quoted(topic) + " ends with '.'" + std::string(k_rule);
  return {};
}

std::string check_name(std::string_view what, std::string_view name) {
  const std::string rule = "; names are 1.." + std::to_string(k_max_name_length) +
                           " bytes of printable ASCII without spaces (0x21-0x7e)";
  if (name.empty()) return std::string(what) + " is empty" + rule;
  if (name.size() > k_max_name_length) {
    return std::string(what) + " is " + std::to_string(name.size()) +
           " bytes, longer than the limit of " + std::to_string(k_max_name_length) + rule;
  }
  for (std::size_t i = 0; i < name.size(); ++i) {
    const auto c = static_cast<unsigned char>(name[i]);
    if (c > ' ' && c < 0x7f) continue;
    char byte[8];
    std::snprintf(byte, sizeof byte, "0x%02x", c);
    const std::string found = c == ' '   ? std::string("a space")
                              : c < 0x80 ? "the control character " + std::string(byte)
                                         : "the non-ASCII byte " + std::string(byte);
    return std::string(what) + " " + quoted(name) + " has " + found + " at byte " +
           std::to_string(i) + rule;
  }
  return {};
}

}  // namespace ensemble::common
