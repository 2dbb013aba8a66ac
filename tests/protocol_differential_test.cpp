// decode_header reads msgpack in place; before, msgpack-c unpacked the frame into an object tree.
// The two must agree on every frame: what is accepted, every decoded field (unknown pairs in
// `extra` byte for byte), and for a refused frame its code, its message and what it leaves in
// `partial`. Frames come from a seeded generator (so that a failure replays) of header maps in
// every msgpack encoding, valid and not, and from mutations of them: truncations, changed and
// inserted bytes, trailing bytes.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <string_view>
#include <tuple>

#include "ensemble/common/protocol.hpp"
#include "support/reference_header_decoder.hpp"

namespace ensemble::common {
bool operator==(const service_offer& a, const service_offer& b) {
  return a.name == b.name && a.capacity == b.capacity;
}
}  // namespace ensemble::common

namespace {

namespace ec = ensemble::common;
namespace reference = ensemble::test_support::reference;

// Writes msgpack by hand, in any encoding wide enough for a value (not only the smallest), so
// that the decoders meet what other peers' encoders may send.
class frame_generator {
 public:
  explicit frame_generator(std::uint64_t seed) : rng_(seed) {}

  std::string header_frame() {
    out_.clear();
    const std::uint64_t pairs = chance(5) ? pick(300) : pick(12);
    map_head(pairs);
    for (std::uint64_t i = 0; i < pairs; ++i) {
      const std::uint64_t what = pick(100);
      if (what < 65) {
        const auto& f = ec::k_header_field_infos[pick(ec::k_header_field_infos.size())];
        str(f.key);
        field_value(f);
      } else if (what < 90) {
        str(chance(2) ? "x_" + word(pick(8)) : word(pick(40)));
        any_value(1);
      } else {
        any_value(1);  // a key that is not a str, or is
        any_value(1);
      }
    }
    return out_;
  }

  std::uint64_t pick(std::uint64_t n) { return n == 0 ? 0 : rng_() % n; }
  bool chance(std::uint64_t one_in) { return pick(one_in) == 0; }

 private:
  void byte(std::uint64_t b) { out_.push_back(static_cast<char>(b & 0xff)); }
  void be(std::uint64_t v, int bytes) {
    for (int i = bytes - 1; i >= 0; --i) byte(v >> (8 * i));
  }
  // A length or count head: the fix form when it fits and chosen, else 8/16/32-bit forms.
  void head(std::uint64_t n, int fix_bits, std::uint8_t fix, std::uint8_t tag8, std::uint8_t tag16,
            std::uint8_t tag32) {
    const std::uint64_t choice = pick(4);
    if (choice == 0 && n < (std::uint64_t{1} << fix_bits)) {
      byte(fix | n);
    } else if (choice <= 1 && tag8 != 0 && n < 256) {
      byte(tag8), be(n, 1);
    } else if (choice <= 2 && n < 65536) {
      byte(tag16), be(n, 2);
    } else {
      byte(tag32), be(n, 4);
    }
  }
  void map_head(std::uint64_t n) { head(n, 4, 0x80, 0, 0xde, 0xdf); }
  void array_head(std::uint64_t n) { head(n, 4, 0x90, 0, 0xdc, 0xdd); }
  void str(std::string_view s) {
    head(s.size(), 5, 0xa0, 0xd9, 0xda, 0xdb);
    out_.append(s);
  }
  void bin(std::string_view s) {
    const std::uint64_t n = s.size();
    if (n < 256 && chance(2)) {
      byte(0xc4), be(n, 1);
    } else if (n < 65536 && chance(2)) {
      byte(0xc5), be(n, 2);
    } else {
      byte(0xc6), be(n, 4);
    }
    out_.append(s);
  }
  void ext(std::string_view data) {
    const std::uint64_t n = data.size();
    const bool fixed = n == 1 || n == 2 || n == 4 || n == 8 || n == 16;
    if (fixed && chance(2)) {
      byte(n == 1 ? 0xd4 : n == 2 ? 0xd5 : n == 4 ? 0xd6 : n == 8 ? 0xd7 : 0xd8);
    } else if (n < 256 && chance(2)) {
      byte(0xc7), be(n, 1);
    } else if (n < 65536 && chance(2)) {
      byte(0xc8), be(n, 2);
    } else {
      byte(0xc9), be(n, 4);
    }
    byte(pick(256));  // the ext type
    out_.append(data);
  }
  // A non-negative integer in any encoding that holds it, signed ones included.
  void uint(std::uint64_t v) {
    switch (pick(6)) {
      case 0:
        if (v < 128) return byte(v);
        break;
      case 1:
        if (v < 128) return byte(0xd0), be(v, 1);
        if (v < 32768) return byte(0xd1), be(v, 2);
        if (v < (std::uint64_t{1} << 31)) return byte(0xd2), be(v, 4);
        if (v < (std::uint64_t{1} << 63)) return byte(0xd3), be(v, 8);
        break;
      case 2:
        if (v < 256) return byte(0xcc), be(v, 1);
        break;
      case 3:
        if (v < 65536) return byte(0xcd), be(v, 2);
        break;
      case 4:
        if (v < (std::uint64_t{1} << 32)) return byte(0xce), be(v, 4);
        break;
      default:
        break;
    }
    byte(0xcf), be(v, 8);
  }
  void negative(std::int64_t v) {
    const auto u = static_cast<std::uint64_t>(v);
    if (v >= -32 && chance(2)) return byte(u);
    if (v >= -128 && chance(2)) return byte(0xd0), be(u, 1);
    if (v >= -32768 && chance(2)) return byte(0xd1), be(u, 2);
    if (v >= INT32_MIN && chance(2)) return byte(0xd2), be(u, 4);
    byte(0xd3), be(u, 8);
  }
  void float_value() {
    static constexpr double k_values[] = {0.0, 1.0, -1.0, 0.5, 3.0, -7.25, 1e10, 4e19, -1e30, 1e-7};
    double d = k_values[pick(std::size(k_values))];
    if (chance(4)) d = std::numeric_limits<double>::quiet_NaN();
    if (chance(2)) {
      const float f = static_cast<float>(d);
      std::uint32_t bits;
      std::memcpy(&bits, &f, sizeof bits);
      byte(0xca), be(bits, 4);
    } else {
      std::uint64_t bits;
      std::memcpy(&bits, &d, sizeof bits);
      byte(0xcb), be(bits, 8);
    }
  }
  std::uint64_t number() {
    switch (pick(8)) {
      case 0:
        return 0;
      case 1:
        return 1 + pick(127);
      case 2:
        return 128 + pick(200);
      case 3:
        return 60000 + pick(10000);
      case 4:
        return 4294967290ULL + pick(10);
      case 5:
        return rng_();
      default:
        return 1 + pick(100000);
    }
  }
  std::string word(std::uint64_t n) {
    static constexpr std::string_view k_letters = "abcdefghijklmnopqrstuvwxyz0123456789-_.";
    std::string s;
    for (std::uint64_t i = 0; i < n; ++i) {
      s += chance(40) ? static_cast<char>(pick(256)) : k_letters[pick(k_letters.size())];
    }
    return s;
  }
  std::string text() {
    const std::uint64_t r = pick(100);
    if (r < 2) return word(16385 + pick(100));  // a frame over the header limit
    if (r < 10) return word(31 + pick(260));
    return word(pick(32));
  }
  // Any value, containers `depth` deep (the header map is 1); deep ones make depth faults.
  void any_value(int depth) {
    switch (pick(depth < 6 ? 12 : 9)) {
      case 0:
        return byte(0xc0);
      case 1:
        return byte(chance(2) ? 0xc2 : 0xc3);
      case 2:
        return uint(number());
      case 3:
        return negative(-1 - static_cast<std::int64_t>(chance(2) ? number() >> 1 : pick(40)));
      case 4:
        return float_value();
      case 5:
        return str(text());
      case 6:
        return bin(word(pick(40)));
      case 7:
        return ext(word(chance(2) ? 1u << pick(5) : pick(300)));
      case 8:
        if (chance(50)) return byte(0xc1);
        return str(word(pick(10)));
      case 9:
      case 10: {
        // Now and then one near the element limit, of nils (a frame stays small).
        if (chance(40)) {
          const std::uint64_t n = 1020 + pick(10);
          array_head(n);
          out_.append(n, '\xc0');
          return;
        }
        const std::uint64_t n = pick(5);
        array_head(n);
        for (std::uint64_t i = 0; i < n; ++i) any_value(depth + 1);
        return;
      }
      default: {
        if (chance(40)) {
          const std::uint64_t n = 250 + pick(10);
          map_head(n);
          for (std::uint64_t i = 0; i < n; ++i) str(word(pick(4))), uint(number());
          return;
        }
        const std::uint64_t n = pick(4);
        map_head(n);
        for (std::uint64_t i = 0; i < 2 * n; ++i) any_value(depth + 1);
        return;
      }
    }
  }
  // A value for a known field: mostly of its type, sometimes out of its range or of another.
  void field_value(const ec::header_field_info& f) {
    if (chance(8)) return any_value(1);
    switch (f.type) {
      case ec::field_type::str:
        return str(text());
      case ec::field_type::boolean:
        return byte(chance(2) ? 0xc3 : 0xc2);
      case ec::field_type::uint:
        return uint(number());
      case ec::field_type::services: {
        const std::uint64_t n = pick(4);
        array_head(n);
        for (std::uint64_t i = 0; i < n; ++i) {
          if (chance(10)) {
            any_value(2);
            continue;
          }
          const std::uint64_t pairs = pick(4);
          map_head(pairs);
          for (std::uint64_t j = 0; j < pairs; ++j) {
            const std::uint64_t k = pick(10);
            if (k < 4) {
              str("name");
              chance(6) ? any_value(3) : str(chance(6) ? word(130) : word(pick(12)));
            } else if (k < 8) {
              str("capacity");
              chance(6) ? any_value(3) : uint(chance(4) ? number() : 1 + pick(1000));
            } else {
              any_value(3);
              any_value(3);
            }
          }
        }
        return;
      }
    }
  }

  std::mt19937_64 rng_;
  std::string out_;
};

bool same_header(const ec::header& a, const ec::header& b) {
  bool same = a.extra == b.extra && a.extra_count == b.extra_count;
  std::apply(
      [&](const auto&... row) { ((same = same && a.*(row.member) == b.*(row.member)), ...); },
      ec::k_header_fields);
  return same;
}

}  // namespace

namespace {

struct tally {
  std::size_t accepted = 0;
  std::size_t refused = 0;
  std::map<std::string, std::size_t> refusals;  // by the message's first words
};

// Decodes `frame` with both decoders and expects the same outcome; returns false on the
// first difference, having reported it.
bool agree(const std::string& frame, tally& t) {
  ec::header mine_partial, theirs_partial;
  mine_partial.id = theirs_partial.id = "untouched";
  const auto mine = ec::decode_header(frame, &mine_partial);
  const auto theirs = reference::decode_header(frame, &theirs_partial);
  // The decoding into a message's own header: what the other form returns, or on a refusal
  // what it leaves in `partial` (nothing: an empty header).
  ec::header into;
  const auto into_status = ec::decode_header(frame, into);
  const bool partial_set = mine_partial.id != "untouched";
  if (into_status.ok() != mine.ok() || !same_header(into, mine.ok()     ? *mine
                                                          : partial_set ? mine_partial
                                                                        : ec::header{})) {
    ADD_FAILURE() << "decode_header into a header differs from decode_header returning one";
    return false;
  }
  const auto shown = [&] {
    std::string hex;
    for (std::size_t i = 0; i < frame.size() && i < 96; ++i) {
      char b[4];
      std::snprintf(b, sizeof b, "%02x", static_cast<unsigned char>(frame[i]));
      hex += b;
    }
    return hex + (frame.size() > 96 ? "... (" + std::to_string(frame.size()) + " bytes)" : "");
  };
  if (mine.ok() != theirs.ok()) {
    ADD_FAILURE() << "accepted by " << (mine.ok() ? "the in-place reader" : "msgpack-c")
                  << " only: " << (mine.ok() ? theirs.err().message : mine.err().message)
                  << "\nframe: " << shown();
    return false;
  }
  if (mine.ok()) {
    ++t.accepted;
    if (!same_header(*mine, *theirs)) {
      ADD_FAILURE() << "decoded headers differ; frame: " << shown();
      return false;
    }
    return true;
  }
  ++t.refused;
  const std::string& message = mine.err().message;
  ++t.refusals[message.substr(0, message.find_first_of("',0123456789"))];
  if (mine.err().code != theirs.err().code || message != theirs.err().message) {
    ADD_FAILURE() << "refusals differ:\n  in place:  " << mine.err().code << " " << message
                  << "\n  msgpack-c: " << theirs.err().code << " " << theirs.err().message
                  << "\nframe: " << shown();
    return false;
  }
  if (!same_header(mine_partial, theirs_partial)) {
    ADD_FAILURE() << "partial headers differ (" << message << "); frame: " << shown();
    return false;
  }
  return true;
}

std::string mutated(std::string frame, frame_generator& g) {
  static constexpr std::uint8_t k_bytes[] = {0xc1, 0xc0, 0x00, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0,
                                             0xbf, 0xc4, 0xc7, 0xc9, 0xca, 0xcb, 0xcf, 0xd3, 0xd4,
                                             0xd8, 0xd9, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xe0, 0xff};
  const std::size_t at = g.pick(frame.size());
  switch (g.pick(6)) {
    case 0:
      frame.resize(at);
      break;
    case 1:
      frame[at] = static_cast<char>(g.pick(256));
      break;
    case 2:
      frame[at] = static_cast<char>(k_bytes[g.pick(std::size(k_bytes))]);
      break;
    case 3:
      frame.insert(at, 1, static_cast<char>(k_bytes[g.pick(std::size(k_bytes))]));
      break;
    case 4:
      frame.append(1 + g.pick(3), static_cast<char>(g.pick(256)));
      break;
    default:
      frame.erase(at, 1 + g.pick(4));
      break;
  }
  return frame;
}

TEST(protocol_differential_test, in_place_reader_agrees_with_msgpack_c_on_generated_frames) {
  frame_generator g(20261130);
  tally t;
  constexpr int k_frames = 20000;
  for (int i = 0; i < k_frames; ++i) {
    const std::string frame = g.header_frame();
    if (!agree(frame, t)) return;
    for (int m = 0; m < 4; ++m) {
      if (!agree(mutated(frame, g), t)) return;
    }
  }
  std::printf("frames: %zu accepted, %zu refused\n", t.accepted, t.refused);
  for (const auto& [words, n] : t.refusals) std::printf("  %6zu  %s...\n", n, words.c_str());
  // The generator reaches both sides, and every kind of fault of the frame.
  EXPECT_GT(t.accepted, std::size_t{1000});
  EXPECT_GT(t.refused, std::size_t{1000});
  for (const char* fault :
       {"header is truncated msgpack", "header nests deeper than", "header has an array of more",
        "header has a map of more", "header is not valid msgpack: parse error", "header has ",
        "header must be a msgpack map", "header keys must be str", "header field ",
        "header frame is "}) {
    bool seen = false;
    for (const auto& [words, n] : t.refusals) seen = seen || words.rfind(fault, 0) == 0;
    EXPECT_TRUE(seen) << "no generated frame was refused with \"" << fault << "...\"";
  }
}

// Frames a well-behaved peer sends: encode_header's own output, and the same with unknown
// pairs in non-canonical encodings, which both decoders must keep as msgpack-c re-wrote them.
TEST(protocol_differential_test, in_place_reader_agrees_with_msgpack_c_on_encoded_headers) {
  frame_generator g(7);
  tally t;
  for (int i = 0; i < 5000; ++i) {
    auto decoded = reference::decode_header(g.header_frame());
    if (!decoded.ok()) continue;
    const std::string frame = ec::encode_header(*decoded);
    if (!agree(frame, t)) return;
  }
  EXPECT_GT(t.accepted, std::size_t{500});
  EXPECT_EQ(t.refused, std::size_t{0});
}

}  // namespace
