#include "ensemble/common/protocol.hpp"

#include <array>
#include <cstdio>
#include <cstring>
#include <limits>
#include <msgpack.hpp>
#include <optional>
#include <type_traits>
#include <utility>

#include "ensemble/common/msgpack_write.hpp"

namespace ensemble::common {
namespace {

// msgpack::packer writes into anything with write(const char*, size_t): the decoder uses it to
// keep unknown pairs verbatim.
struct string_sink {
  std::string& out;
  void write(const char* data, std::size_t size) { out.append(data, size); }
};
using packer = msgpack::packer<string_sink>;

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

// ---- msgpack, read in place ------------------------------------------------------------------
//
// decode_header reads the frame's bytes where they are: no zone, no object tree, a value at a
// time in byte order. It accepts and refuses exactly what msgpack-c's unpack (API v3, with the
// limits below) did when the decoder was built on it, with the same messages, and keeps unknown
// pairs as msgpack-c's packer re-wrote them; tests/protocol_differential_test.cpp holds it to
// that against the msgpack-c decoder, kept in tests/support/reference_header_decoder.hpp.

constexpr std::uint32_t k_max_array_items = 1024;
constexpr std::uint32_t k_max_map_pairs = 256;
// Containers on the way down, the header map itself being level 1 ({services: [{...}]} is 3
// levels deep).
constexpr std::size_t k_max_depth = 4;

namespace in_place {

enum class kind : std::uint8_t {
  nil,
  boolean,
  uint,      // any encoding of an integer >= 0 (msgpack-c's POSITIVE_INTEGER)
  negative,  // an integer < 0
  float32,
  float64,
  str,
  bin,
  ext,
  array,
  map,
};

// One value as the reader met it: a scalar whole, a container by its head (its elements
// follow it in the frame).
struct item {
  kind type = kind::nil;
  std::uint32_t size = 0;      // str, bin: bytes; ext: data bytes; array: elements; map: pairs
  const char* data = nullptr;  // str, bin: the bytes; ext: the type byte, then the data
  union {
    bool boolean;
    std::uint64_t u64 = 0;
    std::int64_t i64;
    double f64;  // float32 too, widened, as msgpack-c keeps it
  };
  std::string_view str() const { return {data, size}; }
};

// What stops the reader: the frame is not one well-formed msgpack value within the limits.
enum class fault : std::uint8_t {
  none,
  truncated,
  parse_error,  // 0xc1, the one byte msgpack never uses
  depth,
  array_size,
  map_size,
  str_size,
  bin_size,
  ext_size,
};

class reader {
 public:
  reader(std::string_view bytes, std::size_t max_str)
      : at_(bytes.data()), end_(bytes.data() + bytes.size()), max_str_(max_str) {}

  // Reads the head of the next value, which `open` containers enclose (the header map is read
  // at 0). False when the frame is at fault; failure() says how, and nothing more is read.
  bool next(item& it, std::size_t open) {
    if (at_ == end_) return fail(fault::truncated);
    const auto b = static_cast<std::uint8_t>(*at_++);
    if (b <= 0x7f) return scalar_uint(it, b);
    if (b >= 0xe0) {
      it.type = kind::negative;
      it.i64 = static_cast<std::int8_t>(b);
      return true;
    }
    if (b >= 0xa0 && b <= 0xbf) return bytes(it, kind::str, b & 0x1fu);
    if (b >= 0x90 && b <= 0x9f) return container(it, kind::array, b & 0x0fu, open);
    if (b >= 0x80 && b <= 0x8f) return container(it, kind::map, b & 0x0fu, open);
    std::uint64_t n = 0;
    switch (b) {
      case 0xc0:
        it.type = kind::nil;
        return true;
      case 0xc2:
      case 0xc3:
        it.type = kind::boolean;
        it.boolean = b == 0xc3;
        return true;
      case 0xc4:
      case 0xc5:
      case 0xc6:
        return be(n, 1u << (b - 0xc4)) && bytes(it, kind::bin, n);
      case 0xc7:
      case 0xc8:
      case 0xc9:
        return be(n, 1u << (b - 0xc7)) && ext(it, n);
      case 0xca: {
        if (!be(n, 4)) return false;
        const auto bits = static_cast<std::uint32_t>(n);
        float f;
        std::memcpy(&f, &bits, sizeof f);
        it.type = kind::float32;
        it.f64 = f;
        return true;
      }
      case 0xcb: {
        if (!be(n, 8)) return false;
        it.type = kind::float64;
        std::memcpy(&it.f64, &n, sizeof n);
        return true;
      }
      case 0xcc:
      case 0xcd:
      case 0xce:
      case 0xcf:
        return be(n, 1u << (b - 0xcc)) && scalar_uint(it, n);
      case 0xd0:
      case 0xd1:
      case 0xd2:
      case 0xd3: {
        const unsigned width = 1u << (b - 0xd0);
        if (!be(n, width)) return false;
        // Sign-extend from `width` bytes; a value >= 0 is an uint, as msgpack-c reads it.
        const unsigned shift = 64 - 8 * width;
        const auto v = static_cast<std::int64_t>(n << shift) >> shift;
        if (v >= 0) return scalar_uint(it, static_cast<std::uint64_t>(v));
        it.type = kind::negative;
        it.i64 = v;
        return true;
      }
      case 0xd4:
      case 0xd5:
      case 0xd6:
      case 0xd7:
      case 0xd8:
        return ext(it, std::uint64_t{1} << (b - 0xd4));
      case 0xd9:
      case 0xda:
      case 0xdb:
        return be(n, 1u << (b - 0xd9)) && bytes(it, kind::str, n);
      case 0xdc:
      case 0xdd:
        return be(n, 2u << (b - 0xdc)) && container(it, kind::array, n, open);
      case 0xde:
      case 0xdf:
        return be(n, 2u << (b - 0xde)) && container(it, kind::map, n, open);
      default:  // 0xc1
        return fail(fault::parse_error);
    }
  }

  // Reads what follows a container's head, `it`, read at `open`: its elements, all the way down.
  bool skip_body(const item& it, std::size_t open) {
    if (it.type != kind::array && it.type != kind::map) return true;
    const std::uint64_t n = it.type == kind::map ? 2 * std::uint64_t{it.size} : it.size;
    item inner;
    for (std::uint64_t i = 0; i < n; ++i) {
      if (!next(inner, open + 1) || !skip_body(inner, open + 1)) return false;
    }
    return true;
  }

  // Reads the value whose head is `it` to its end, writing it as msgpack-c's packer writes the
  // object msgpack-c reads from it (the smallest encoding of each length and number; an
  // integral float as an integer).
  template <class Packer>
  bool copy(const item& it, std::size_t open, Packer& p) {
    switch (it.type) {
      case kind::nil:
        p.pack_nil();
        return true;
      case kind::boolean:
        it.boolean ? p.pack_true() : p.pack_false();
        return true;
      case kind::uint:
        p.pack_uint64(it.u64);
        return true;
      case kind::negative:
        p.pack_int64(it.i64);
        return true;
      case kind::float32:
        p.pack_float(static_cast<float>(it.f64));
        return true;
      case kind::float64:
        p.pack_double(it.f64);
        return true;
      case kind::str:
        p.pack_str(it.size);
        p.pack_str_body(it.data, it.size);
        return true;
      case kind::bin:
        p.pack_bin(it.size);
        p.pack_bin_body(it.data, it.size);
        return true;
      case kind::ext:
        p.pack_ext(it.size, static_cast<std::int8_t>(it.data[0]));
        p.pack_ext_body(it.data + 1, it.size);
        return true;
      case kind::array:
      case kind::map: {
        std::uint64_t n = it.size;
        if (it.type == kind::array) {
          p.pack_array(it.size);
        } else {
          p.pack_map(it.size);
          n *= 2;
        }
        item inner;
        for (std::uint64_t i = 0; i < n; ++i) {
          if (!next(inner, open + 1) || !copy(inner, open + 1, p)) return false;
        }
        return true;
      }
    }
    return true;
  }

  fault failure() const { return fault_; }
  std::size_t remaining() const { return static_cast<std::size_t>(end_ - at_); }

 private:
  bool fail(fault f) {
    fault_ = f;
    at_ = end_;
    return false;
  }
  // A big-endian number of `width` bytes.
  bool be(std::uint64_t& v, unsigned width) {
    if (remaining() < width) return fail(fault::truncated);
    v = 0;
    for (unsigned i = 0; i < width; ++i) v = (v << 8) | static_cast<std::uint8_t>(at_[i]);
    at_ += width;
    return true;
  }
  static bool scalar_uint(item& it, std::uint64_t v) {
    it.type = kind::uint;
    it.u64 = v;
    return true;
  }
  // str or bin of `n` bytes: truncation first, then the limit (msgpack-c's order).
  bool bytes(item& it, kind type, std::uint64_t n) {
    if (remaining() < n) return fail(fault::truncated);
    if (n > max_str_) return fail(type == kind::str ? fault::str_size : fault::bin_size);
    it.type = type;
    it.size = static_cast<std::uint32_t>(n);
    it.data = at_;
    at_ += n;
    return true;
  }
  // ext of `n` data bytes after its type byte; msgpack-c's limit counts the type byte.
  bool ext(item& it, std::uint64_t n) {
    if (remaining() < n + 1) return fail(fault::truncated);
    if (n + 1 > max_str_) return fail(fault::ext_size);
    it.type = kind::ext;
    it.size = static_cast<std::uint32_t>(n);
    it.data = at_;
    at_ += n + 1;
    return true;
  }
  // The count limit, then the depth, as msgpack-c checks them.
  bool container(item& it, kind type, std::uint64_t n, std::size_t open) {
    if (type == kind::array && n > k_max_array_items) return fail(fault::array_size);
    if (type == kind::map && n > k_max_map_pairs) return fail(fault::map_size);
    if (open >= k_max_depth) return fail(fault::depth);
    it.type = type;
    it.size = static_cast<std::uint32_t>(n);
    return true;
  }

  const char* at_;
  const char* end_;
  std::size_t max_str_;
  fault fault_ = fault::none;
};

error fault_error(fault f, std::size_t frame_size) {
  const auto fail = [](std::string message) {
    return error::make(errc::bad_request, std::move(message));
  };
  switch (f) {
    case fault::truncated:
      return fail("header is truncated msgpack (" + std::to_string(frame_size) +
                  " bytes end in the middle of a value)");
    case fault::depth:
      return fail("header nests deeper than " + std::to_string(k_max_depth) +
                  " levels; the header map is level 1, each array or map inside adds one");
    case fault::array_size:
      return fail("header has an array of more than " + std::to_string(k_max_array_items) +
                  " elements, the limit");
    case fault::map_size:
      return fail("header has a map of more than " + std::to_string(k_max_map_pairs) +
                  " pairs, the limit");
    case fault::str_size:
      return fail("header is not valid msgpack: str size overflow");
    case fault::bin_size:
      return fail("header is not valid msgpack: bin size overflow");
    case fault::ext_size:
      return fail("header is not valid msgpack: ext size overflow");
    case fault::parse_error:
    case fault::none:
      break;
  }
  return fail("header is not valid msgpack: parse error");
}

}  // namespace in_place

using in_place::item;
using in_place::kind;

// A value as an error message shows it: its msgpack type, and the value itself when short.
std::string describe(const item& o) {
  switch (o.type) {
    case kind::nil:
      return "nil";
    case kind::boolean:
      return o.boolean ? "bool true" : "bool false";
    case kind::uint:
      return "uint " + std::to_string(o.u64);
    case kind::negative:
      return "negative int " + std::to_string(o.i64);
    case kind::float32:
    case kind::float64: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "float %g", o.f64);
      return buf;
    }
    case kind::str:
      return "str " + quoted(o.str());
    case kind::bin:
      return "bin of " + std::to_string(o.size) + " bytes";
    case kind::ext:
      return "ext";
    case kind::array:
      return "array of " + std::to_string(o.size);
    case kind::map:
      return "map of " + std::to_string(o.size);
  }
  return "unknown";
}

error field_error(std::string_view key, std::string_view rule, const item& o) {
  return error::make(errc::bad_request, "header field '" + std::string(key) + "' must be " +
                                            std::string(rule) + ", got " + describe(o));
}

// The decoder's view of k_header_fields: per row, its key, the rule its errors quote and its
// reader. A row's reader is read_field<I>, which knows the row's member and type; it is given
// the head of the field's value, read one container deep (in the header map), and reads the
// rest of the value. It returns what is wrong with the value; a fault of the frame stops the
// reader instead.
struct field_codec {
  std::string_view key;
  std::string_view rule;
  std::optional<error> (*read)(const field_codec&, in_place::reader&, const item&, header&);
};

// services: [{name: str, capacity: uint}, ...]. The first bad element ends the reading of the
// list (the elements before it are kept), not the reading of the frame.
std::optional<error> read_services(const field_codec& f, in_place::reader& r, const item& v,
                                   header& h) {
  if (v.type != kind::array) {
    auto problem = field_error(f.key, f.rule, v);
    r.skip_body(v, 1);
    return problem;
  }
  h.services.clear();
  h.services.reserve(v.size);
  std::optional<error> problem;
  const auto where = [](std::uint32_t i) { return "services[" + std::to_string(i) + "]"; };
  item element, key, value;
  for (std::uint32_t i = 0; i < v.size; ++i) {
    if (!r.next(element, 2)) return std::nullopt;
    if (problem || element.type != kind::map) {
      if (!problem) {
        problem = field_error(where(i), "a map {name: str, capacity: uint 1..1000000}", element);
      }
      if (!r.skip_body(element, 2)) return std::nullopt;
      continue;
    }
    service_offer offer;
    for (std::uint32_t j = 0; j < element.size; ++j) {
      if (!r.next(key, 3)) return std::nullopt;
      if (!problem && key.type != kind::str) problem = field_error(where(i) + " key", "a str", key);
      if (!r.skip_body(key, 3) || !r.next(value, 3)) return std::nullopt;
      if (!problem) {
        if (key.str() == "name") {
          if (value.type != kind::str) {
            problem = field_error(where(i) + ".name", "a str", value);
          } else {
            offer.name.assign(value.data, value.size);
          }
        } else if (key.str() == "capacity") {
          if (value.type != kind::uint || value.u64 == 0 || value.u64 > 1'000'000) {
            problem =
                field_error(where(i) + ".capacity", "an integer in 1..1000000 (default 1)", value);
          } else {
            offer.capacity = static_cast<std::uint32_t>(value.u64);
          }
        }
      }
      if (!r.skip_body(value, 3)) return std::nullopt;
    }
    if (problem) continue;
    if (auto bad = check_name(where(i) + ".name", offer.name); !bad.empty()) {
      problem = error::make(errc::bad_request, bad);
      continue;
    }
    h.services.push_back(std::move(offer));
  }
  return problem;
}

template <std::size_t I>
using row_t = std::remove_cvref_t<decltype(std::get<I>(k_header_fields))>;

template <std::size_t I>
std::optional<error> read_field(const field_codec& f, in_place::reader& r, const item& o,
                                header& h) {
  using row = row_t<I>;
  auto& value = h.*row::member;
  if constexpr (row::type == field_type::services) {
    return read_services(f, r, o, h);
  } else {
    constexpr kind expected = row::type == field_type::str       ? kind::str
                              : row::type == field_type::boolean ? kind::boolean
                                                                 : kind::uint;
    if (o.type != expected) {
      auto problem = field_error(f.key, f.rule, o);
      r.skip_body(o, 1);
      return problem;
    }
    if constexpr (row::type == field_type::str) {
      value.assign(o.data, o.size);
    } else if constexpr (row::type == field_type::boolean) {
      value = o.boolean;
    } else {
      // Any msgpack encoding of a non-negative integer (positive fixint, uint 8-64, or int 8-64
      // holding a value >= 0), in [min, max].
      constexpr header_field_info info = std::get<I>(k_header_fields).info();
      if (o.u64 > info.max || o.u64 < info.min) {
        return error::make(errc::bad_request, "header field '" + std::string(f.key) + "' is " +
                                                  std::to_string(o.u64) + "; it must be " +
                                                  std::string(f.rule));
      }
      value = static_cast<typename row::value_type>(o.u64);
    }
    return std::nullopt;
  }
}

template <std::size_t... I>
constexpr auto make_codecs(std::index_sequence<I...>) {
  return std::array<field_codec, sizeof...(I)>{
      {{k_header_field_infos[I].key, k_header_field_infos[I].rule, &read_field<I>}...}};
}

constexpr auto k_fields = make_codecs(std::make_index_sequence<k_header_field_count>{});

// Keys to rows: an open-addressing table built at compile time, hashed on a key's length and
// its first and last bytes, so that a lookup is a probe or two instead of a walk of every key.
constexpr std::size_t k_key_slots = 128;  // a power of two, well over twice the rows
constexpr std::uint8_t k_no_row = 0xff;
static_assert(k_header_field_count < k_key_slots / 2 && k_header_field_count < k_no_row);

constexpr std::size_t key_slot(std::string_view key) {
  const std::size_t n = key.size();
  const auto first = static_cast<unsigned char>(n == 0 ? 0 : key[0]);
  const auto last = static_cast<unsigned char>(n == 0 ? 0 : key[n - 1]);
  return (n * 31 + first * 7 + last * 3) & (k_key_slots - 1);
}

constexpr auto k_key_table = [] {
  std::array<std::uint8_t, k_key_slots> table{};
  for (auto& slot : table) slot = k_no_row;
  for (std::size_t row = 0; row < k_header_field_count; ++row) {
    std::size_t s = key_slot(k_fields[row].key);
    while (table[s] != k_no_row) s = (s + 1) & (k_key_slots - 1);
    table[s] = static_cast<std::uint8_t>(row);
  }
  return table;
}();

const field_codec* find_field(std::string_view key) {
  for (std::size_t s = key_slot(key);; s = (s + 1) & (k_key_slots - 1)) {
    const std::uint8_t row = k_key_table[s];
    if (row == k_no_row) return nullptr;
    if (k_fields[row].key == key) return &k_fields[row];
  }
}

// msgpack, written in place (ensemble/common/msgpack_write.hpp): the encodings msgpack-c's
// packer chooses (the smallest for each length or value), so that encode_header writes what it
// always wrote. What follows adds the header's own field types on top.
namespace wire {

using namespace msgpack_write;

std::size_t map_header_size(std::uint32_t n) {
  return container_header_size(n);
}
std::size_t array_header_size(std::size_t n) {
  return container_header_size(n);
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

// Reads the pairs of the header map whose head is `root` into `h`: unknown keys into `extra`,
// known ones through their reader. A bad field does not stop the others from being read (so
// that the id of a refused message is known); the first problem is returned. A fault of the
// frame stops the reader (r.failure()), and then what was read does not count.
std::optional<error> read_map(in_place::reader& r, const item& root, header& h) {
  std::optional<error> first;
  item key, value;
  for (std::uint32_t i = 0; i < root.size; ++i) {
    if (!r.next(key, 1)) break;
    if (key.type != kind::str) {
      if (!first) {
        first =
            error::make(errc::bad_request, "header keys must be str, got " + describe(key) +
                                               " (pair " + std::to_string(i + 1) + " of the map)");
      }
      if (!r.skip_body(key, 1) || !r.next(value, 1) || !r.skip_body(value, 1)) break;
      continue;
    }
    if (!r.next(value, 1)) break;
    if (const field_codec* f = find_field(key.str())) {
      if (auto problem = f->read(*f, r, value, h); problem && !first) first = std::move(problem);
    } else {
      string_sink sink{h.extra};
      packer p(sink);
      p.pack_str(key.size);
      p.pack_str_body(key.data, key.size);
      if (!r.copy(value, 1, p)) break;
      ++h.extra_count;
    }
    if (r.failure() != in_place::fault::none) break;
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

namespace {

// decode_header's one implementation: reads `bytes` into `h` (empty on entry). On a refusal,
// `keep` says whether `h` holds what a refused header still says (the frame is one map, however
// bad some of its fields, or too large, or followed by trailing bytes); `want_partial` false
// spares the reading of a frame that is refused for its size alone.
std::optional<error> decode_into(std::string_view bytes, header& h, bool want_partial, bool& keep) {
  keep = false;
  if (bytes.empty()) {
    return error::make(errc::bad_request,
                       "header frame is empty; send {} (0x80) for a header with no fields");
  }
  const bool too_large = bytes.size() > k_max_header_bytes;
  const auto too_large_error = [&] {
    return error::make(errc::too_large, "header frame is " + std::to_string(bytes.size()) +
                                            " bytes, more than the limit of " +
                                            std::to_string(k_max_header_bytes) +
                                            " bytes for a header");
  };
  // A frame over the limit is refused whole, but read (it is already bounded by the socket's
  // message size limit) when the refusal can name the message it refuses.
  if (too_large && !want_partial) return too_large_error();

  in_place::reader r(bytes, too_large ? bytes.size() : k_max_header_bytes);
  item root;
  std::optional<error> problem;
  if (r.next(root, 0)) {
    if (root.type == kind::map) {
      problem = read_map(r, root, h);
    } else {
      r.skip_body(root, 0);
    }
  }
  const bool is_map = root.type == kind::map;
  if (const auto f = r.failure(); f != in_place::fault::none) {
    return too_large ? too_large_error() : in_place::fault_error(f, bytes.size());
  }
  if (too_large) {
    keep = r.remaining() == 0 && is_map;
    return too_large_error();
  }
  if (r.remaining() != 0) {
    // A map followed by trailing bytes was still read: keep what it says.
    keep = is_map;
    return error::make(errc::bad_request,
                       "header has " + std::to_string(r.remaining()) +
                           " trailing bytes after the msgpack map; the frame must hold exactly "
                           "one map");
  }
  if (!is_map) {
    return error::make(errc::bad_request,
                       "header must be a msgpack map with str keys, got " + describe(root));
  }
  keep = true;
  return problem;
}

}  // namespace

result<header> decode_header(std::string_view bytes, header* partial) {
  header h;
  bool keep = false;
  if (auto problem = decode_into(bytes, h, partial != nullptr, keep)) {
    if (partial != nullptr && keep) *partial = std::move(h);
    return std::move(*problem);
  }
  return h;
}

status decode_header(std::string_view bytes, header& out) {
  bool keep = false;
  if (auto problem = decode_into(bytes, out, true, keep)) {
    if (!keep) out = header{};
    return std::move(*problem);
  }
  return ok_status();
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
