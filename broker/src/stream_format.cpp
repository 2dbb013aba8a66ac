#include "stream_format.hpp"

#include <array>
#include <cstdio>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace ensemble::broker::streams::format {
namespace {

constexpr std::uint32_t k_poly = 0x82F63B78u;  // CRC32C (Castagnoli), reflected

constexpr std::array<std::uint32_t, 256> make_table() {
  std::array<std::uint32_t, 256> t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) != 0 ? (c >> 1) ^ k_poly : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr auto k_table = make_table();

std::uint32_t crc32c_portable(const unsigned char* p, std::size_t n, std::uint32_t crc) {
  for (std::size_t i = 0; i < n; ++i) crc = k_table[(crc ^ p[i]) & 0xffu] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) std::uint32_t crc32c_sse42(const unsigned char* p, std::size_t n,
                                                             std::uint32_t crc) {
  std::uint64_t c = crc;
  while (n >= 8) {
    std::uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  auto c32 = static_cast<std::uint32_t>(c);
  while (n > 0) {
    c32 = _mm_crc32_u8(c32, *p++);
    --n;
  }
  return c32;
}
const bool k_have_sse42 = __builtin_cpu_supports("sse4.2");
#endif

void put_u32(std::string& out, std::uint32_t v) {
  char b[4];
  for (int i = 0; i < 4; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xffu);
  out.append(b, 4);
}
void put_u64(std::string& out, std::uint64_t v) {
  char b[8];
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xffu);
  out.append(b, 8);
}
std::uint32_t get_u32(const char* p) {
  std::uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}
std::uint64_t get_u64(const char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

}  // namespace

std::uint32_t crc32c(const void* data, std::size_t size, std::uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
#if defined(__x86_64__)
  if (k_have_sse42) return ~crc32c_sse42(p, size, crc);
#endif
  return ~crc32c_portable(p, size, crc);
}

std::string segment_header(sequence first_seq) {
  std::string h(k_segment_magic);
  put_u64(h, first_seq);
  return h;
}

sequence parse_segment_header(std::string_view header) {
  if (header.size() < k_segment_header_size || header.substr(0, 8) != k_segment_magic) return 0;
  return get_u64(header.data() + 8);
}

std::string segment_file_name(sequence first_seq) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%020llu", static_cast<unsigned long long>(first_seq));
  return std::string(buf) + std::string(k_segment_suffix);
}

sequence parse_segment_file_name(std::string_view name) {
  if (name.size() != 20 + k_segment_suffix.size() || !name.ends_with(k_segment_suffix)) return 0;
  sequence v = 0;
  for (std::size_t i = 0; i < 20; ++i) {
    if (name[i] < '0' || name[i] > '9') return 0;
    v = v * 10 + static_cast<sequence>(name[i] - '0');
  }
  return v;
}

std::size_t frame_size(const record& r) {
  return k_frame_header_size + k_body_fixed_size + r.topic.size() + r.event_id.size() +
         r.header.size() + r.payload.size();
}

void encode_frame(std::string& out, sequence seq, std::int64_t ts_ms, const record& r) {
  const auto body_len = static_cast<std::uint32_t>(frame_size(r) - k_frame_header_size);
  const std::size_t start = out.size();
  put_u32(out, body_len);
  put_u32(out, crc32c(out.data() + start, 4));
  put_u32(out, 0);  // body crc, filled below
  const std::size_t body = out.size();
  put_u64(out, seq);
  put_u64(out, static_cast<std::uint64_t>(ts_ms));
  put_u32(out, static_cast<std::uint32_t>(r.topic.size()));
  put_u32(out, static_cast<std::uint32_t>(r.event_id.size()));
  put_u32(out, static_cast<std::uint32_t>(r.header.size()));
  put_u32(out, static_cast<std::uint32_t>(r.payload.size()));
  out += r.topic;
  out += r.event_id;
  out += r.header;
  out += r.payload;
  const std::uint32_t c = crc32c(out.data() + body, out.size() - body);
  for (int i = 0; i < 4; ++i)
    out[start + 8 + static_cast<std::size_t>(i)] = static_cast<char>((c >> (8 * i)) & 0xffu);
}

const char* to_string(frame_check c) {
  switch (c) {
    case frame_check::ok:
      return "ok";
    case frame_check::short_header:
      return "record header cut short";
    case frame_check::bad_length:
      return "record length checksum mismatch";
    case frame_check::short_body:
      return "record body cut short";
    case frame_check::bad_body:
      return "record body checksum mismatch";
    case frame_check::bad_layout:
      return "record field lengths do not add up";
  }
  return "?";
}

frame_check check_frame(std::string_view bytes, std::uint32_t& size) {
  if (bytes.size() < k_frame_header_size) return frame_check::short_header;
  const std::uint32_t body_len = get_u32(bytes.data());
  if (get_u32(bytes.data() + 4) != crc32c(bytes.data(), 4) || body_len < k_body_fixed_size ||
      body_len > k_max_body_size) {
    return frame_check::bad_length;
  }
  if (bytes.size() - k_frame_header_size < body_len) return frame_check::short_body;
  const char* body = bytes.data() + k_frame_header_size;
  if (get_u32(bytes.data() + 8) != crc32c(body, body_len)) return frame_check::bad_body;
  const std::uint64_t fields = std::uint64_t{get_u32(body + 16)} + get_u32(body + 20) +
                               get_u32(body + 24) + get_u32(body + 28);
  if (fields + k_body_fixed_size != body_len) return frame_check::bad_layout;
  size = static_cast<std::uint32_t>(k_frame_header_size + body_len);
  return frame_check::ok;
}

record decode_frame(std::string_view frame) {
  const char* body = frame.data() + k_frame_header_size;
  record r;
  r.seq = get_u64(body);
  r.ts_ms = static_cast<std::int64_t>(get_u64(body + 8));
  const std::size_t lens[4] = {get_u32(body + 16), get_u32(body + 20), get_u32(body + 24),
                               get_u32(body + 28)};
  const char* p = body + k_body_fixed_size;
  r.topic.assign(p, lens[0]);
  p += lens[0];
  r.event_id.assign(p, lens[1]);
  p += lens[1];
  r.header.assign(p, lens[2]);
  p += lens[2];
  r.payload.assign(p, lens[3]);
  return r;
}

void peek_frame(std::string_view frame, sequence& seq, std::int64_t& ts_ms,
                std::string_view& event_id) {
  const char* body = frame.data() + k_frame_header_size;
  seq = get_u64(body);
  ts_ms = static_cast<std::int64_t>(get_u64(body + 8));
  event_id = std::string_view(body + k_body_fixed_size + get_u32(body + 16), get_u32(body + 20));
}

}  // namespace ensemble::broker::streams::format
