#include "ensemble/common/protocol.hpp"

#include <array>
#include <cstdio>
#include <cstring>
#include <limits>
#include <msgpack.hpp>
#include <optional>
#include <type_traits>
#include <utility>

namespace ensemble::common {
namespace {

// msgpack::packer writes into anything with write(const char*, size_t): the decoder uses it to
// keep unknown pairs verbatim.
struct string_sink {
  std::string& out;
  void write(const char* data, std::size_t size) { out.append(data, size); }
};
using packer = msgpack::packer<string_sink>;

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

// The decoder's view of k_header_fields: per row, its key, the rule its errors quote and its
// reader. A row's reader is read_field<I>, which knows the row's member and type.
struct field_codec {
  std::string_view key;
  std::string_view rule;
  std::optional<error> (*read)(const field_codec&, const msgpack::object&, header&);
};

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

template <std::size_t I>
using row_t = std::remove_cvref_t<decltype(std::get<I>(k_header_fields))>;

template <std::size_t I>
std::optional<error> read_field(const field_codec& f, const msgpack::object& o, header& h) {
  using row = row_t<I>;
  auto& value = h.*row::member;
  if constexpr (row::type == field_type::str) {
    if (o.type != msgpack::type::STR) return field_error(f.key, f.rule, o);
    value.assign(o.via.str.ptr, o.via.str.size);
  } else if constexpr (row::type == field_type::boolean) {
    if (o.type != msgpack::type::BOOLEAN) return field_error(f.key, f.rule, o);
    value = o.via.boolean;
  } else if constexpr (row::type == field_type::uint) {
    // Any msgpack encoding of a non-negative integer (positive fixint, uint 8-64, or int 8-64
    // holding a value >= 0: msgpack-c reads all of them as POSITIVE_INTEGER), in [min, max].
    constexpr header_field_info info = std::get<I>(k_header_fields).info();
    if (o.type != msgpack::type::POSITIVE_INTEGER) return field_error(f.key, f.rule, o);
    if (o.via.u64 > info.max || o.via.u64 < info.min) {
      return error::make(errc::bad_request, "header field '" + std::string(f.key) + "' is " +
                                                std::to_string(o.via.u64) + "; it must be " +
                                                std::string(f.rule));
    }
    value = static_cast<typename row::value_type>(o.via.u64);
  } else {
    return read_services(f, o, h);
  }
  return std::nullopt;
}

template <std::size_t... I>
constexpr auto make_codecs(std::index_sequence<I...>) {
  return std::array<field_codec, sizeof...(I)>{
      {{k_header_field_infos[I].key, k_header_field_infos[I].rule, &read_field<I>}...}};
}

constexpr auto k_fields = make_codecs(std::make_index_sequence<k_header_field_count>{});

const field_codec* find_field(std::string_view key) {
  for (const auto& f : k_fields) {
    if (f.key == key) return &f;
  }
  return nullptr;
}

// msgpack, written in place: the encodings msgpack-c's packer chooses (the smallest for each
// length or value), so that encode_header writes what it always wrote.
namespace wire {

char* put_be(char* at, std::uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) *at++ = static_cast<char>(v >> (8 * i));
  return at;
}

// Maps and arrays share one header shape: a fix form for up to 15 entries, then 16 and 32 bits.
std::size_t container_header_size(std::size_t n) {
  return n < 16 ? 1 : n < 65536 ? 3 : 5;
}
char* put_container_header(char* at, std::size_t n, std::uint8_t fix, std::uint8_t tag16,
                           std::uint8_t tag32) {
  if (n < 16) {
    *at++ = static_cast<char>(fix | n);
    return at;
  }
  *at++ = static_cast<char>(n < 65536 ? tag16 : tag32);
  return put_be(at, n, n < 65536 ? 2 : 4);
}
std::size_t map_header_size(std::uint32_t n) {
  return container_header_size(n);
}
char* put_map_header(char* at, std::uint32_t n) {
  return put_container_header(at, n, 0x80, 0xde, 0xdf);
}

std::size_t uint_size(std::uint64_t v) {
  return v < 128 ? 1 : v < 256 ? 2 : v < 65536 ? 3 : v < (std::uint64_t{1} << 32) ? 5 : 9;
}
char* put_uint(char* at, std::uint64_t v) {
  if (v < 128) {
    *at++ = static_cast<char>(v);
    return at;
  }
  const int bytes = v < 256 ? 1 : v < 65536 ? 2 : v < (std::uint64_t{1} << 32) ? 4 : 8;
  *at++ = static_cast<char>(bytes == 1 ? 0xcc : bytes == 2 ? 0xcd : bytes == 4 ? 0xce : 0xcf);
  return put_be(at, v, bytes);
}

std::size_t str_size(std::string_view s) {
  const std::size_t n = s.size();
  return n + (n < 32 ? 1 : n < 256 ? 2 : n < 65536 ? 3 : 5);
}
char* put_str(char* at, std::string_view s) {
  const std::size_t n = s.size();
  if (n < 32) {
    *at++ = static_cast<char>(0xa0 | n);
  } else {
    const int bytes = n < 256 ? 1 : n < 65536 ? 2 : 4;
    *at++ = static_cast<char>(bytes == 1 ? 0xd9 : bytes == 2 ? 0xda : 0xdb);
    at = put_be(at, n, bytes);
  }
  std::memcpy(at, s.data(), n);
  return at + n;
}

std::size_t array_header_size(std::size_t n) {
  return container_header_size(n);
}
char* put_array_header(char* at, std::size_t n) {
  return put_container_header(at, n, 0x90, 0xdc, 0xdd);
}

// A present value of each field type: str, uint, bool (true: false is absent), services.
std::size_t value_size(const std::string& v) {
  return str_size(v);
}
std::size_t value_size(std::uint64_t v) {
  return uint_size(v);
}
std::size_t value_size(std::uint32_t v) {
  return uint_size(v);
}
std::size_t value_size(bool) {
  return 1;
}
std::size_t value_size(const std::vector<service_offer>& v) {
  std::size_t size = array_header_size(v.size());
  // {name: str, capacity: uint}: the map byte, "name" and "capacity" with their fixstr bytes.
  for (const auto& s : v) size += 1 + 5 + str_size(s.name) + 9 + uint_size(s.capacity);
  return size;
}

char* put_value(char* at, const std::string& v) {
  return put_str(at, v);
}
char* put_value(char* at, std::uint64_t v) {
  return put_uint(at, v);
}
char* put_value(char* at, std::uint32_t v) {
  return put_uint(at, v);
}
char* put_value(char* at, bool) {
  *at++ = static_cast<char>(0xc3);
  return at;
}
char* put_value(char* at, const std::vector<service_offer>& v) {
  at = put_array_header(at, v.size());
  for (const auto& s : v) {
    at = put_map_header(at, 2);
    at = put_str(at, "name");
    at = put_str(at, s.name);
    at = put_str(at, "capacity");
    at = put_uint(at, s.capacity);
  }
  return at;
}

}  // namespace wire

// The encoder's and check_required's walk over k_header_fields: f(row<I>{}) for each row in
// order, unrolled at compile time, so that each call sees its row's member and type as
// constants.
template <std::size_t I>
struct row : row_t<I> {
  static constexpr std::size_t index = I;
};

template <class F, std::size_t... I>
void for_each_row(F&& f, std::index_sequence<I...>) {
  (f(row<I>{}), ...);
}

template <class F>
void for_each_row(F&& f) {
  for_each_row(f, std::make_index_sequence<k_header_field_count>{});
}

// A field with its default value is absent: not written, and missing where required.
template <class T>
bool present(const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    return v;
  } else if constexpr (std::is_integral_v<T>) {
    return v != 0;
  } else {
    return !v.empty();
  }
}

// A row's key as msgpack: the fixstr byte, then the key (keys are at most 31 bytes).
template <std::size_t I>
constexpr auto k_key_bytes = [] {
  constexpr std::string_view key = k_header_field_infos[I].key;
  std::array<char, key.size() + 1> bytes{};
  bytes[0] = static_cast<char>(0xa0 | key.size());
  for (std::size_t i = 0; i < key.size(); ++i) bytes[i + 1] = key[i];
  return bytes;
}();

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
  // Two passes over the rows: the size of what is present, then the bytes, written in place
  // into `out` grown once (msgpack-c's packer appends piece by piece, a call per key and per
  // value; this writes the same bytes).
  std::uint32_t n = h.extra_count;
  std::size_t bytes = h.extra.size();
  for_each_row([&](auto row) {
    using r = decltype(row);
    const auto& value = h.*r::member;
    if (!present(value)) return;
    ++n;
    bytes += k_key_bytes<r::index>.size() + wire::value_size(value);
  });
  bytes += wire::map_header_size(n);
  const std::size_t start = out.size();
  out.resize(start + bytes);
  char* at = wire::put_map_header(out.data() + start, n);
  for_each_row([&](auto row) {
    using r = decltype(row);
    const auto& value = h.*r::member;
    if (!present(value)) return;
    constexpr auto& key = k_key_bytes<r::index>;
    std::memcpy(at, key.data(), key.size());
    at = wire::put_value(at + key.size(), value);
  });
  std::memcpy(at, h.extra.data(), h.extra.size());
}

std::string check_required(command c, const header& h) {
  std::string problem;
  for_each_row([&](auto row) {
    using r = decltype(row);
    constexpr header_field_info info = k_header_field_infos[r::index];
    if constexpr (!info.required.empty()) {
      if (!problem.empty() || !info.required.contains(c) || present(h.*r::member)) return;
      const std::string name = command_name(static_cast<std::uint8_t>(c));
      problem = name + " without '" + std::string(info.key) + "': every " + name + " needs " +
                std::string(info.needs);
    }
  });
  return problem;
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
