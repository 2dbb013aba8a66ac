#pragma once
// MessagePack, written in place: the byte writers shared by the header encoder (protocol.cpp)
// and the workflow store's document encoder (orchestrator/src/sqlite_store.cpp).
//
// Each writer puts one value at `at`, which must have room for it (the matching *_size, or the
// k_max_*_head bound plus the payload), and returns where the next value goes. They choose the
// smallest encoding for each value or length, which is what msgpack-c's packer and nlohmann's
// json::to_msgpack both write for these types, so either caller keeps writing the bytes it
// always wrote (protocol_test's golden headers; the store's comparison with to_msgpack).
//
// Only what both callers need lives here; the store adds signed integers, floats, bin/ext, nil
// and booleans on top with put_be.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace ensemble::common::msgpack_write {

// The most bytes an uint, or the head of a str, an array or a map, takes.
inline constexpr std::size_t k_max_uint_size = 9;
inline constexpr std::size_t k_max_str_head = 5;
inline constexpr std::size_t k_max_container_head = 5;

// `v` as Bytes big-endian bytes.
template <std::size_t Bytes>
inline char* put_be(char* at, std::uint64_t v) {
  for (std::size_t i = 0; i < Bytes; ++i) {
    at[i] = static_cast<char>(v >> (8 * (Bytes - 1 - i)));
  }
  return at + Bytes;
}

inline constexpr std::size_t uint_size(std::uint64_t v) {
  return v < 128 ? 1 : v < 256 ? 2 : v < 65536 ? 3 : v < (std::uint64_t{1} << 32) ? 5 : 9;
}
// positive fixint, uint 8/16/32/64.
inline char* put_uint(char* at, std::uint64_t v) {
  if (v < 128) {
    *at = static_cast<char>(v);
    return at + 1;
  }
  if (v < 256) {
    *at = static_cast<char>(0xcc);
    return put_be<1>(at + 1, v);
  }
  if (v < 65536) {
    *at = static_cast<char>(0xcd);
    return put_be<2>(at + 1, v);
  }
  if (v < (std::uint64_t{1} << 32)) {
    *at = static_cast<char>(0xce);
    return put_be<4>(at + 1, v);
  }
  *at = static_cast<char>(0xcf);
  return put_be<8>(at + 1, v);
}

inline constexpr std::size_t str_head_size(std::size_t n) {
  return n < 32 ? 1 : n < 256 ? 2 : n < 65536 ? 3 : 5;
}
inline constexpr std::size_t str_size(std::string_view s) {
  return str_head_size(s.size()) + s.size();
}
// fixstr, str 8/16/32, then the bytes.
inline char* put_str(char* at, std::string_view s) {
  const std::size_t n = s.size();
  if (n < 32) {
    *at++ = static_cast<char>(0xa0 | n);
  } else if (n < 256) {
    *at = static_cast<char>(0xd9);
    at = put_be<1>(at + 1, n);
  } else if (n < 65536) {
    *at = static_cast<char>(0xda);
    at = put_be<2>(at + 1, n);
  } else {
    *at = static_cast<char>(0xdb);
    at = put_be<4>(at + 1, n);
  }
  if (n != 0) std::memcpy(at, s.data(), n);
  return at + n;
}

// Maps and arrays share one header shape: a fix form for up to 15 entries, then 16 and 32 bits.
inline constexpr std::size_t container_header_size(std::size_t n) {
  return n < 16 ? 1 : n < 65536 ? 3 : 5;
}
inline char* put_container_header(char* at, std::size_t n, std::uint8_t fix, std::uint8_t tag16,
                                  std::uint8_t tag32) {
  if (n < 16) {
    *at = static_cast<char>(fix | n);
    return at + 1;
  }
  if (n < 65536) {
    *at = static_cast<char>(tag16);
    return put_be<2>(at + 1, n);
  }
  *at = static_cast<char>(tag32);
  return put_be<4>(at + 1, n);
}
inline char* put_map_header(char* at, std::size_t n) {
  return put_container_header(at, n, 0x80, 0xde, 0xdf);
}
inline char* put_array_header(char* at, std::size_t n) {
  return put_container_header(at, n, 0x90, 0xdc, 0xdd);
}

}  // namespace ensemble::common::msgpack_write
