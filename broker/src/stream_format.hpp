#pragma once
// The on-disk format of a stream's segment files (docs/streams-storage.md, "Format on disk").
//
//   segment  = header frame*
//   header   = "ENSTRM01" first_seq:u64                                        (16 bytes)
//   frame    = body_len:u32 len_crc:u32 body_crc:u32 body                      (12 + body_len)
//   body     = seq:u64 ts_ms:i64 topic_len:u32 event_id_len:u32 header_len:u32 payload_len:u32
//              topic event_id header payload
//
// Integers are little-endian. len_crc is the CRC32C of the four length bytes, so that a damaged
// length is told apart from a torn tail; body_crc is the CRC32C of the body.

#include <cstddef>
#include <cstdint>
#include <ensemble/broker/stream_types.hpp>
#include <string>
#include <string_view>

namespace ensemble::broker::streams::format {

inline constexpr std::string_view k_segment_magic = "ENSTRM01";
inline constexpr std::size_t k_segment_header_size = 16;
inline constexpr std::size_t k_frame_header_size = 12;
inline constexpr std::size_t k_body_fixed_size = 32;
inline constexpr std::uint32_t k_max_body_size = 64u << 20;
inline constexpr std::string_view k_segment_suffix = ".seg";

std::uint32_t crc32c(const void* data, std::size_t size, std::uint32_t crc = 0);

std::string segment_header(sequence first_seq);
// The segment's first sequence if `header` (k_segment_header_size bytes) is one; 0 if not.
sequence parse_segment_header(std::string_view header);
// "00000000000000000001.seg": names sort as their first sequences.
std::string segment_file_name(sequence first_seq);
// The first sequence a segment file name stands for; 0 if it is not one.
sequence parse_segment_file_name(std::string_view name);

std::size_t frame_size(const record& r);
// Appends the frame of `r` to `out`, with `seq` and `ts_ms` in place of r.seq and r.ts_ms.
void encode_frame(std::string& out, sequence seq, std::int64_t ts_ms, const record& r);

enum class frame_check {
  ok,
  short_header,  // fewer than k_frame_header_size bytes left
  bad_length,    // len_crc does not match (or the length is out of range)
  short_body,    // the body runs past the available bytes
  bad_body,      // body_crc does not match
  bad_layout,    // checksums match but the lengths inside do not add up
};
const char* to_string(frame_check c);

// Checks the frame at the start of `bytes`; on ok, `size` is the whole frame's size.
frame_check check_frame(std::string_view bytes, std::uint32_t& size);
// Decodes a frame that check_frame() accepted.
record decode_frame(std::string_view frame);
// The seq and ts of a frame check_frame() accepted, without copying the strings.
void peek_frame(std::string_view frame, sequence& seq, std::int64_t& ts_ms,
                std::string_view& event_id);

}  // namespace ensemble::broker::streams::format
