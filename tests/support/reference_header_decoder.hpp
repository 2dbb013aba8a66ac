#pragma once
// The header decoder as it was before common/src/protocol.cpp read msgpack in place: msgpack-c
// unpacks the frame into an object tree (msgpack::unpack into a zone) and the fields are read
// from the tree. Frozen here as the reference the in-place reader must agree with, byte for byte
// and message for message: tests/protocol_differential_test.cpp feeds both the same generated
// and mutated frames, and bench/bench_header.cpp measures both.
#include <array>
#include <cstdio>
#include <cstring>
#include <msgpack.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "ensemble/common/protocol.hpp"

namespace ensemble::test_support::reference {

using namespace ensemble::common;

namespace detail {

struct string_sink {
  std::string& out;
  void write(const char* data, std::size_t size) { out.append(data, size); }
};
using packer = msgpack::packer<string_sink>;

inline const char* type_name(msgpack::type::object_type t) {
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
inline std::string quoted(std::string_view s) {
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
inline std::string describe(const msgpack::object& o) {
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

inline error field_error(std::string_view key, std::string_view rule, const msgpack::object& o) {
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

inline std::optional<error> read_services(const field_codec& f, const msgpack::object& o,
                                          header& h) {
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

inline constexpr auto k_fields = make_codecs(std::make_index_sequence<k_header_field_count>{});

inline const field_codec* find_field(std::string_view key) {
  for (const auto& f : k_fields) {
    if (f.key == key) return &f;
  }
  return nullptr;
}
inline constexpr std::uint32_t k_max_array_items = 1024;
inline constexpr std::uint32_t k_max_map_pairs = 256;
inline constexpr std::size_t k_max_depth = 4;

// Unpacks `bytes` as exactly one msgpack object into `root` (strings no longer than
// `max_str`), or says what is wrong with the frame.
inline std::optional<error> unpack_one(std::string_view bytes, std::size_t max_str,
                                       msgpack::zone& zone, msgpack::object& root) {
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
inline std::optional<error> read_map(const msgpack::object& root, header& h) {
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

}  // namespace detail

inline result<header> decode_header(std::string_view bytes, header* partial = nullptr) {
  using namespace detail;
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

}  // namespace ensemble::test_support::reference
